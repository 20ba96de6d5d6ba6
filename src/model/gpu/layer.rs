//! One decoder layer on the GPU, forward (keeping a tape) and backward: the device version of
//! `layer_forward` / `layer_backward` in `model::train_pass`, op for op. The residual stream
//! and its gradient are f32; every other activation is bf16.

use super::adapters::GpuAdapter;
use super::linear::{
    adapter_activations, linear_backward, linear_forward, AdapterActivations, DropoutMask,
};
use super::weights::{GpuLayer, DOWN, GATE, K, LINEARS, O, Q, UP, V};
use super::workspace::{Scratch, Workspace};
use crate::backend::cuda::attention::{
    attention_backward, attention_decode, attention_forward, decode_scratch_len, AttentionSaved,
    AttentionShape, DecodeCache, DecodePosition, DecodeRow, DecodeScratch,
};
use crate::backend::cuda::elementwise::residual_add;
use crate::backend::cuda::norm::{residual_rmsnorm, rmsnorm_backward, rmsnorm_forward};
use crate::backend::cuda::profile::span;
use crate::backend::cuda::rope::{rope_backward, rope_forward_at, rope_qk_into_cache, QkvRows};
use crate::backend::cuda::swiglu::{swiglu_backward, swiglu_forward};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// The adapters of a layer's seven linears (q, k, v, o, gate, up, down); `None` where none is
/// attached.
pub(crate) type LayerAdapters = [Option<GpuAdapter>; LINEARS];
/// The dropout masks of a layer's seven linears for the rows being run.
pub(crate) type LayerMasks<'w> = [Option<DropoutMask<'w>>; LINEARS];

/// RoPE angles on the GPU: for [`KvTarget::Sequences`], one row per row being run (each row's
/// own position); for [`KvTarget::Cache`], one row per position of the cache, the rows being run
/// reading theirs from `pos0` on.
pub(crate) struct Rope {
    pub(crate) cos: GpuBuffer<f32>, // (rows, D/2)
    pub(crate) sin: GpuBuffer<f32>, // (rows, D/2)
}

/// What a layer's forward keeps for its backward (T: the rows run, batch x padded length). A
/// slim tape ([`LayerTape::slim`]) lacks n1, n2 and hidden; the backward remakes them. (A
/// decode step's tape, never used, holds q and k before RoPE: see [`cached_attention`].)
pub(crate) struct LayerTape<'w> {
    xb: Scratch<'w, u16>,             // (T, C) the input, bf16
    n1: Option<Scratch<'w, u16>>,     // (T, C) RMSNorm(xb)
    q: Scratch<'w, u16>,              // (T, H * D) after RoPE
    k: Scratch<'w, u16>,              // (T, KV * D) after RoPE
    v: Scratch<'w, u16>,              // (T, KV * D)
    attn: Scratch<'w, u16>,           // (T, H * D)
    lse: Scratch<'w, f32>,            // (H, T)
    x2b: Scratch<'w, u16>,            // (T, C) after the attention residual, bf16
    n2: Option<Scratch<'w, u16>>,     // (T, C) RMSNorm(x2b)
    gate: Scratch<'w, u16>,           // (T, F)
    up: Scratch<'w, u16>,             // (T, F)
    hidden: Option<Scratch<'w, u16>>, // (T, F) SwiGLU(gate, up)
    acts: [Option<AdapterActivations<'w>>; LINEARS],
}

impl LayerTape<'_> {
    /// The tape without the three activations the backward can remake bit for bit from what
    /// stays (n1 = RMSNorm(xb), n2 = RMSNorm(x2b) and the SwiGLU output, by the kernels that
    /// made them; the fused residual + RMSNorm that made n2 equals RMSNorm(x2b) bit for bit):
    /// their buffers go back to the workspace now.
    pub(crate) fn slim(mut self) -> Self {
        self.n1 = None;
        self.n2 = None;
        self.hidden = None;
        self
    }
}

/// `kept`, or a buffer of `len` from `ws` that `remake` fills (a slim tape's activation).
fn kept_or_remade<'a, 'w>(
    kept: &'a Option<Scratch<'w, u16>>,
    remade: &'a mut Option<Scratch<'w, u16>>,
    ws: &'w Workspace,
    device: &CudaDevice,
    (what, len): (&str, usize),
    remake: impl FnOnce(&mut GpuBuffer<u16>) -> Result<()>,
) -> Result<&'a GpuBuffer<u16>> {
    if let Some(kept) = kept {
        return Ok(kept);
    }
    let mut buffer = ws.bf16.take(device, what, len)?;
    remake(&mut buffer)?;
    Ok(remade.insert(buffer))
}

/// Where a forward's keys and values go: kept in the tape (whole sequences from position 0), or
/// written into a KV cache at `pos0` and attended over with the cached rows.
pub(crate) enum KvTarget<'a> {
    /// `batch` whole sequences from position 0, right-padded to a common length and stacked
    /// (training, evaluation).
    Sequences { batch: usize },
    /// Rows at `pos0..` of a cache of (max_len, KV * D) bf16 keys and values. With `step` (one
    /// decode row, T = 1), the kernels read the position from `step` (holding `pos0` when they
    /// run) instead of taking `pos0` as an argument: the launches a decode graph records.
    Cache {
        keys: &'a mut GpuBuffer<u16>,
        values: &'a mut GpuBuffer<u16>,
        pos0: usize,
        step: Option<&'a GpuBuffer<i64>>,
    },
}

/// The attention kernels' head counts and width of a model.
pub(crate) fn attention_shape(c: &LlamaConfig) -> AttentionShape {
    AttentionShape {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    }
}

/// A layer's output: the residual stream (T, C) f32 and its bf16 copy.
type LayerOutput<'w> = (Scratch<'w, f32>, Scratch<'w, u16>);

/// Runs one layer over `x (T, C)` f32 (with `xb`, its bf16 copy): returns the output (f32 and
/// bf16) and the tape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_forward<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &LayerAdapters,
    masks: &LayerMasks<'_>,
    x: &GpuBuffer<f32>,
    xb: Scratch<'w, u16>,
    rope: &Rope,
    kv: KvTarget<'_>,
) -> Result<(Scratch<'w, f32>, Scratch<'w, u16>, LayerTape<'w>)> {
    let inputs = (x, xb, rope, kv);
    let (output, tape) = forward_pass(device, ws, c, layer, adapters, masks, inputs, true)?;
    let (y, yb) = output.ok_or_else(|| Error::invalid("a layer's forward made no output"))?;
    Ok((y, yb, tape))
}

/// The tape of layer_forward over whole sequences (`batch` of them stacked in `x`), without the
/// layer's output: a checkpointed layer's recompute before its backward, which reads the tape
/// only. The down projection's base product and the last residual add are skipped (only its
/// adapter's z goes on the tape): ~1 / 7 of the layer's products. The tape is bit for bit
/// layer_forward's (the same kernels on the same inputs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_recompute_tape<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &LayerAdapters,
    masks: &LayerMasks<'_>,
    x: &GpuBuffer<f32>,
    xb: Scratch<'w, u16>,
    rope: &Rope,
    batch: usize,
) -> Result<LayerTape<'w>> {
    let inputs = (x, xb, rope, KvTarget::Sequences { batch });
    Ok(forward_pass(device, ws, c, layer, adapters, masks, inputs, false)?.1)
}

/// layer_forward's body; with `with_output` false it stops at the down projection's adapter
/// activations (layer_recompute_tape).
#[allow(clippy::too_many_arguments)]
fn forward_pass<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &LayerAdapters,
    masks: &LayerMasks<'_>,
    (x, xb, rope, kv): (&GpuBuffer<f32>, Scratch<'w, u16>, &Rope, KvTarget<'_>),
    with_output: bool,
) -> Result<(Option<LayerOutput<'w>>, LayerTape<'w>)> {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let t = x.len() / hidden;
    let [lq, lk, lv, lo, lg, lu, ld] = &layer.linears;
    let run = |i: usize, lin, input: &GpuBuffer<u16>, out: &mut GpuBuffer<u16>| {
        linear_forward(
            device,
            ws,
            lin,
            adapters[i].as_ref(),
            masks[i].as_ref(),
            input,
            t,
            out,
        )
    };
    // attention block
    let mut n1 = ws.bf16.take(device, "n1", t * hidden)?;
    let norm = span(device, "layer: norms and residuals");
    rmsnorm_forward(device, &mut n1, &xb, &layer.input_layernorm, c.rms_norm_eps)?;
    drop(norm);
    let mut q = ws.bf16.take(device, "q", t * c.q_dim())?;
    let mut k = ws.bf16.take(device, "k", t * c.kv_dim())?;
    let mut v = ws.bf16.take(device, "v", t * c.kv_dim())?;
    let aq = run(Q, lq, &n1, &mut q)?;
    let ak = run(K, lk, &n1, &mut k)?;
    let av = run(V, lv, &n1, &mut v)?;
    let shape = attention_shape(c);
    let mut attn = ws.bf16.take(device, "attention output", t * c.q_dim())?;
    let mut lse = ws
        .f32
        .take(device, "attention lse", c.num_attention_heads * t)?;
    let angles = (&rope.cos, &rope.sin);
    let attention = span(device, "layer: RoPE and attention");
    match kv {
        KvTarget::Sequences { batch } => {
            rope_forward_at(device, &mut q, angles, 0, t, c.head_dim)?;
            rope_forward_at(device, &mut k, angles, 0, t, c.head_dim)?;
            attention_forward(device, &q, &k, &v, &mut attn, &mut lse, 0, batch, shape)?;
        }
        KvTarget::Cache {
            keys,
            values,
            pos0,
            step,
        } => {
            let qkv = (&mut *q, &mut *k, &*v);
            let cache = (keys, values, pos0, step);
            cached_attention(device, ws, c, qkv, rope, cache, (&mut attn, &mut lse))?;
        }
    }
    drop(attention);
    let mut proj = ws.bf16.take(device, "projection", t * hidden)?;
    let ao = run(O, lo, &attn, &mut proj)?;
    // MLP block: y = x + proj (f32), x2b = bf16(y), n2 = RMSNorm(x2b), in one kernel.
    let mut y = ws.f32.take(device, "residual stream", t * hidden)?;
    let mut x2b = ws.bf16.take(device, "x2", t * hidden)?;
    let mut n2 = ws.bf16.take(device, "n2", t * hidden)?;
    let norm = span(device, "layer: norms and residuals");
    residual_rmsnorm(
        device,
        x,
        &proj,
        &layer.post_attention_layernorm,
        c.rms_norm_eps,
        (&mut y, &mut x2b, &mut n2),
    )?;
    drop(norm);
    let mut gate = ws.bf16.take(device, "gate", t * ffn)?;
    let mut up = ws.bf16.take(device, "up", t * ffn)?;
    let ag = run(GATE, lg, &n2, &mut gate)?;
    let au = run(UP, lu, &n2, &mut up)?;
    let mut mlp_hidden = ws.bf16.take(device, "swiglu", t * ffn)?;
    let swiglu = span(device, "layer: SwiGLU");
    swiglu_forward(device, &mut mlp_hidden, &gate, &up)?;
    drop(swiglu);
    let (ad, output) = if with_output {
        let ad = run(DOWN, ld, &mlp_hidden, &mut proj)?;
        let mut yb = ws.bf16.take(device, "layer output", t * hidden)?;
        let residual = span(device, "layer: norms and residuals");
        residual_add(device, &mut y, &proj, Some(&mut yb))?;
        drop(residual);
        (ad, Some((y, yb)))
    } else {
        let ad = adapter_activations(
            device,
            ws,
            adapters[DOWN].as_ref(),
            masks[DOWN].as_ref(),
            &mlp_hidden,
            t,
        )?;
        (ad, None)
    };
    let tape = LayerTape {
        xb,
        n1: Some(n1),
        q,
        k,
        v,
        attn,
        lse,
        x2b,
        n2: Some(n2),
        gate,
        up,
        hidden: Some(mlp_hidden),
        acts: [aq, ak, av, ao, ag, au, ad],
    };
    Ok((output, tape))
}

/// The attention of a forward that extends a KV cache, for `t` rows at `pos0..` (`t` = the
/// rows of `q`), into `attn (T, H * D)` and `lse`. A decode step (t = 1) is one kernel: RoPE of
/// q and k, k and v into the cache row and the attention over the cache, keys split over CTAs
/// (flash decoding); q and k are left unrotated. With `step` (a recorded decode step) it reads
/// the position from `step`. Chunks of several rows rotate q and k in place and write them
/// into the cache (one kernel), then run the tensor-core forward.
#[allow(clippy::type_complexity)]
pub(crate) fn cached_attention(
    device: &CudaDevice,
    ws: &Workspace,
    c: &LlamaConfig,
    (q, k, v): (&mut GpuBuffer<u16>, &mut GpuBuffer<u16>, &GpuBuffer<u16>),
    rope: &Rope,
    (keys, values, pos0, step): (
        &mut GpuBuffer<u16>,
        &mut GpuBuffer<u16>,
        usize,
        Option<&GpuBuffer<i64>>,
    ),
    (attn, lse): (&mut GpuBuffer<u16>, &mut GpuBuffer<f32>),
) -> Result<()> {
    let t = q.len() / c.q_dim();
    let shape = attention_shape(c);
    if t != 1 {
        let rows = QkvRows { q: &mut *q, k, v };
        let heads = (shape.heads, shape.kv_heads, c.head_dim);
        let angles = (&rope.cos, &rope.sin);
        rope_qk_into_cache(
            device,
            rows,
            angles,
            (&mut *keys, &mut *values),
            pos0,
            heads,
        )?;
        return attention_forward(device, q, keys, values, attn, lse, pos0, 1, shape);
    }
    let at = match step {
        Some(step) => DecodePosition::Step {
            step,
            recorded: pos0,
        },
        None => DecodePosition::At(pos0),
    };
    let mut partials = ws.f32.take(
        device,
        "attention decode partials",
        decode_scratch_len(pos0 + 1, shape),
    )?;
    let mut arrivals = ws.decode_arrivals(device, shape.heads)?;
    let scratch = DecodeScratch {
        partials: &mut partials,
        arrivals: &mut arrivals,
    };
    let row = DecodeRow { q, k, v };
    let cache = DecodeCache {
        keys,
        values,
        cos: &rope.cos,
        sin: &rope.sin,
    };
    attention_decode(device, row, cache, at, (attn, lse), shape, scratch)
}

/// Backward through one layer run over `batch` stacked sequences: `dres (T, C)` f32 holds the
/// gradient of the layer's output on entry (with `dyb` its bf16 copy) and of its input on
/// return; returns the input gradient's bf16 copy. Adds the adapters' gradients to their
/// accumulators.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_backward<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &mut LayerAdapters,
    masks: &LayerMasks<'_>,
    tape: &LayerTape<'_>,
    rope: &Rope,
    batch: usize,
    dres: &mut GpuBuffer<f32>,
    dyb: &GpuBuffer<u16>,
) -> Result<Scratch<'w, u16>> {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let t = dres.len() / hidden;
    let mut back = |i: usize,
                    input: &GpuBuffer<u16>,
                    dy: &GpuBuffer<u16>,
                    dx: &mut GpuBuffer<u16>,
                    accumulate: bool| {
        linear_backward(
            device,
            ws,
            &layer.linears[i],
            adapters[i].as_mut(),
            masks[i].as_ref(),
            input,
            tape.acts[i].as_ref(),
            dy,
            t,
            dx,
            accumulate,
        )
    };
    // MLP block: y = x2 + down(swiglu(gate(n2), up(n2))).
    let mut remade = None;
    let swiglu = span(device, "layer: SwiGLU");
    let mlp_hidden = kept_or_remade(
        &tape.hidden,
        &mut remade,
        ws,
        device,
        ("swiglu", t * ffn),
        |h| swiglu_forward(device, h, &tape.gate, &tape.up),
    )?;
    drop(swiglu);
    let mut dhidden = ws.bf16.take(device, "dhidden", t * ffn)?;
    back(DOWN, mlp_hidden, dyb, &mut dhidden, false)?;
    drop(remade);
    let mut dgate = ws.bf16.take(device, "dgate", t * ffn)?;
    let mut dup = ws.bf16.take(device, "dup", t * ffn)?;
    let swiglu = span(device, "layer: SwiGLU");
    swiglu_backward(device, &mut dgate, &mut dup, &dhidden, &tape.gate, &tape.up)?;
    drop(swiglu);
    let mut remade = None;
    let norm = span(device, "layer: norms and residuals");
    let n2 = kept_or_remade(&tape.n2, &mut remade, ws, device, ("n2", t * hidden), |n| {
        rmsnorm_forward(
            device,
            n,
            &tape.x2b,
            &layer.post_attention_layernorm,
            c.rms_norm_eps,
        )
    })?;
    drop(norm);
    let mut dn2 = ws.bf16.take(device, "dn2", t * hidden)?;
    back(GATE, n2, &dgate, &mut dn2, false)?;
    back(UP, n2, &dup, &mut dn2, true)?;
    drop(remade);
    let mut dnorm = ws.bf16.take(device, "rmsnorm input gradient", t * hidden)?;
    let norm = span(device, "layer: norms and residuals");
    rmsnorm_backward(
        device,
        &mut dnorm,
        &dn2,
        &tape.x2b,
        &layer.post_attention_layernorm,
        c.rms_norm_eps,
        false,
    )?;
    let mut dx2b = ws.bf16.take(device, "dx2", t * hidden)?;
    residual_add(device, dres, &dnorm, Some(&mut dx2b))?;
    drop(norm);
    // Attention block: x2 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
    let mut dattn = ws.bf16.take(device, "dattn", t * c.q_dim())?;
    back(O, &tape.attn, &dx2b, &mut dattn, false)?;
    let mut dq = ws.bf16.take(device, "dq", t * c.q_dim())?;
    let mut dk = ws.bf16.take(device, "dk", t * c.kv_dim())?;
    let mut dv = ws.bf16.take(device, "dv", t * c.kv_dim())?;
    let mut delta = ws
        .f32
        .take(device, "attention delta", c.num_attention_heads * t)?;
    let attention = span(device, "layer: RoPE and attention");
    let saved = AttentionSaved {
        q: &tape.q,
        k: &tape.k,
        v: &tape.v,
        out: &tape.attn,
        lse: &tape.lse,
    };
    attention_backward(
        device,
        &saved,
        &dattn,
        &mut dq,
        &mut dk,
        &mut dv,
        &mut delta,
        batch,
        attention_shape(c),
    )?;
    rope_backward(device, &mut dq, &rope.cos, &rope.sin, c.head_dim)?;
    rope_backward(device, &mut dk, &rope.cos, &rope.sin, c.head_dim)?;
    drop(attention);
    let mut remade = None;
    let norm = span(device, "layer: norms and residuals");
    let n1 = kept_or_remade(&tape.n1, &mut remade, ws, device, ("n1", t * hidden), |n| {
        rmsnorm_forward(device, n, &tape.xb, &layer.input_layernorm, c.rms_norm_eps)
    })?;
    drop(norm);
    let mut dn1 = ws.bf16.take(device, "dn1", t * hidden)?;
    back(Q, n1, &dq, &mut dn1, false)?;
    back(K, n1, &dk, &mut dn1, true)?;
    back(V, n1, &dv, &mut dn1, true)?;
    drop(remade);
    let _norm = span(device, "layer: norms and residuals");
    rmsnorm_backward(
        device,
        &mut dnorm,
        &dn1,
        &tape.xb,
        &layer.input_layernorm,
        c.rms_norm_eps,
        false,
    )?;
    let mut dxb = ws.bf16.take(device, "dx", t * hidden)?;
    residual_add(device, dres, &dnorm, Some(&mut dxb))?;
    Ok(dxb)
}
