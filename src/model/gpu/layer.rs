//! One decoder layer on the GPU, forward (keeping a tape) and backward: the device version of
//! `layer_forward` / `layer_backward` in `model::train_pass`, op for op. The residual stream
//! and its gradient are f32; every other activation is bf16.

use super::adapters::GpuAdapter;
use super::linear::{linear_backward, linear_forward, AdapterActivations, DropoutMask};
use super::weights::{GpuLayer, DOWN, GATE, K, LINEARS, O, Q, UP, V};
use crate::backend::cuda::attention::{
    attention_backward, attention_forward, AttentionSaved, AttentionShape,
};
use crate::backend::cuda::elementwise::{copy_f32, copy_into_at, residual_add};
use crate::backend::cuda::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::backend::cuda::rope::{rope_backward, rope_forward};
use crate::backend::cuda::swiglu::{swiglu_backward, swiglu_forward};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::model::config::LlamaConfig;

/// The adapters of a layer's seven linears (q, k, v, o, gate, up, down); `None` where none is
/// attached.
pub(crate) type LayerAdapters = [Option<GpuAdapter>; LINEARS];
/// The dropout masks of a layer's seven linears for one sequence.
pub(crate) type LayerMasks = [Option<DropoutMask>; LINEARS];

/// RoPE angles of the rows being run, on the GPU.
pub(crate) struct Rope {
    pub(crate) cos: GpuBuffer<f32>, // (T, D/2)
    pub(crate) sin: GpuBuffer<f32>, // (T, D/2)
}

/// What a layer's forward keeps for its backward.
pub(crate) struct LayerTape {
    xb: GpuBuffer<u16>,     // (T, C) the input, bf16
    n1: GpuBuffer<u16>,     // (T, C)
    q: GpuBuffer<u16>,      // (T, H * D) after RoPE
    k: GpuBuffer<u16>,      // (T, KV * D) after RoPE
    v: GpuBuffer<u16>,      // (T, KV * D)
    attn: GpuBuffer<u16>,   // (T, H * D)
    lse: GpuBuffer<f32>,    // (H, T)
    x2b: GpuBuffer<u16>,    // (T, C) after the attention residual, bf16
    n2: GpuBuffer<u16>,     // (T, C)
    gate: GpuBuffer<u16>,   // (T, F)
    up: GpuBuffer<u16>,     // (T, F)
    hidden: GpuBuffer<u16>, // (T, F)
    acts: [Option<AdapterActivations>; LINEARS],
}

/// Where a forward's keys and values go: kept in the tape (a whole sequence, position 0), or
/// written into a KV cache at `pos0` and attended over with the cached rows.
pub(crate) enum KvTarget<'a> {
    /// A whole sequence from position 0 (training, evaluation).
    Sequence,
    /// Rows at `pos0..` of a cache of (max_len, KV * D) bf16 keys and values.
    Cache {
        keys: &'a mut GpuBuffer<u16>,
        values: &'a mut GpuBuffer<u16>,
        pos0: usize,
    },
}

pub(crate) fn attention_shape(c: &LlamaConfig) -> AttentionShape {
    AttentionShape {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    }
}

fn zeros(device: &CudaDevice, what: &str, len: usize) -> Result<GpuBuffer<u16>> {
    GpuBuffer::zeroed(device, what, len)
}

/// Runs one layer over `x (T, C)` f32 (with `xb`, its bf16 copy): returns the output (f32 and
/// bf16) and the tape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_forward(
    device: &CudaDevice,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &LayerAdapters,
    masks: &LayerMasks,
    x: &GpuBuffer<f32>,
    xb: GpuBuffer<u16>,
    rope: &Rope,
    kv: KvTarget<'_>,
) -> Result<(GpuBuffer<f32>, GpuBuffer<u16>, LayerTape)> {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let t = x.len() / hidden;
    let [lq, lk, lv, lo, lg, lu, ld] = &layer.linears;
    let run = |i: usize, lin, input: &GpuBuffer<u16>, out: &mut GpuBuffer<u16>| {
        linear_forward(
            device,
            lin,
            adapters[i].as_ref(),
            masks[i].as_ref(),
            input,
            t,
            out,
        )
    };
    // attention block
    let mut n1 = zeros(device, "n1", t * hidden)?;
    rmsnorm_forward(device, &mut n1, &xb, &layer.input_layernorm, c.rms_norm_eps)?;
    let mut q = zeros(device, "q", t * c.q_dim())?;
    let mut k = zeros(device, "k", t * c.kv_dim())?;
    let mut v = zeros(device, "v", t * c.kv_dim())?;
    let aq = run(Q, lq, &n1, &mut q)?;
    let ak = run(K, lk, &n1, &mut k)?;
    let av = run(V, lv, &n1, &mut v)?;
    rope_forward(device, &mut q, &rope.cos, &rope.sin, c.head_dim)?;
    rope_forward(device, &mut k, &rope.cos, &rope.sin, c.head_dim)?;
    let mut attn = zeros(device, "attention output", t * c.q_dim())?;
    let mut lse = GpuBuffer::<f32>::zeroed(device, "attention lse", c.num_attention_heads * t)?;
    let shape = attention_shape(c);
    match kv {
        KvTarget::Sequence => {
            attention_forward(device, &q, &k, &v, &mut attn, &mut lse, 0, shape)?;
        }
        KvTarget::Cache { keys, values, pos0 } => {
            copy_into_at(device, &k, keys, pos0 * c.kv_dim())?;
            copy_into_at(device, &v, values, pos0 * c.kv_dim())?;
            attention_forward(device, &q, keys, values, &mut attn, &mut lse, pos0, shape)?;
        }
    }
    let mut proj = zeros(device, "projection", t * hidden)?;
    let ao = run(O, lo, &attn, &mut proj)?;
    let mut y = GpuBuffer::<f32>::zeroed(device, "residual stream", t * hidden)?;
    copy_f32(device, x, &mut y)?;
    let mut x2b = zeros(device, "x2", t * hidden)?;
    residual_add(device, &mut y, &proj, Some(&mut x2b))?;
    // MLP block
    let mut n2 = zeros(device, "n2", t * hidden)?;
    rmsnorm_forward(
        device,
        &mut n2,
        &x2b,
        &layer.post_attention_layernorm,
        c.rms_norm_eps,
    )?;
    let mut gate = zeros(device, "gate", t * ffn)?;
    let mut up = zeros(device, "up", t * ffn)?;
    let ag = run(GATE, lg, &n2, &mut gate)?;
    let au = run(UP, lu, &n2, &mut up)?;
    let mut mlp_hidden = zeros(device, "swiglu", t * ffn)?;
    swiglu_forward(device, &mut mlp_hidden, &gate, &up)?;
    let ad = run(DOWN, ld, &mlp_hidden, &mut proj)?;
    let mut yb = zeros(device, "layer output", t * hidden)?;
    residual_add(device, &mut y, &proj, Some(&mut yb))?;
    let tape = LayerTape {
        xb,
        n1,
        q,
        k,
        v,
        attn,
        lse,
        x2b,
        n2,
        gate,
        up,
        hidden: mlp_hidden,
        acts: [aq, ak, av, ao, ag, au, ad],
    };
    Ok((y, yb, tape))
}

/// Backward through one layer: `dres (T, C)` f32 holds the gradient of the layer's output on
/// entry (with `dyb` its bf16 copy) and of its input on return; returns the input gradient's
/// bf16 copy. Adds the adapters' gradients to their accumulators.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_backward(
    device: &CudaDevice,
    c: &LlamaConfig,
    layer: &GpuLayer,
    adapters: &mut LayerAdapters,
    masks: &LayerMasks,
    tape: &LayerTape,
    rope: &Rope,
    dres: &mut GpuBuffer<f32>,
    dyb: &GpuBuffer<u16>,
) -> Result<GpuBuffer<u16>> {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let t = dres.len() / hidden;
    let mut back = |i: usize,
                    input: &GpuBuffer<u16>,
                    dy: &GpuBuffer<u16>,
                    dx: &mut GpuBuffer<u16>,
                    accumulate: bool| {
        linear_backward(
            device,
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
    let mut dhidden = zeros(device, "dhidden", t * ffn)?;
    back(DOWN, &tape.hidden, dyb, &mut dhidden, false)?;
    let mut dgate = zeros(device, "dgate", t * ffn)?;
    let mut dup = zeros(device, "dup", t * ffn)?;
    swiglu_backward(device, &mut dgate, &mut dup, &dhidden, &tape.gate, &tape.up)?;
    let mut dn2 = zeros(device, "dn2", t * hidden)?;
    back(GATE, &tape.n2, &dgate, &mut dn2, false)?;
    back(UP, &tape.n2, &dup, &mut dn2, true)?;
    let mut dnorm = zeros(device, "rmsnorm input gradient", t * hidden)?;
    rmsnorm_backward(
        device,
        &mut dnorm,
        &dn2,
        &tape.x2b,
        &layer.post_attention_layernorm,
        c.rms_norm_eps,
        false,
    )?;
    let mut dx2b = zeros(device, "dx2", t * hidden)?;
    residual_add(device, dres, &dnorm, Some(&mut dx2b))?;
    // Attention block: x2 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))).
    let mut dattn = zeros(device, "dattn", t * c.q_dim())?;
    back(O, &tape.attn, &dx2b, &mut dattn, false)?;
    let mut dq = zeros(device, "dq", t * c.q_dim())?;
    let mut dk = zeros(device, "dk", t * c.kv_dim())?;
    let mut dv = zeros(device, "dv", t * c.kv_dim())?;
    let mut delta = GpuBuffer::<f32>::zeroed(device, "attention delta", c.num_attention_heads * t)?;
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
        attention_shape(c),
    )?;
    rope_backward(device, &mut dq, &rope.cos, &rope.sin, c.head_dim)?;
    rope_backward(device, &mut dk, &rope.cos, &rope.sin, c.head_dim)?;
    let mut dn1 = zeros(device, "dn1", t * hidden)?;
    back(Q, &tape.n1, &dq, &mut dn1, false)?;
    back(K, &tape.n1, &dk, &mut dn1, true)?;
    back(V, &tape.n1, &dv, &mut dn1, true)?;
    rmsnorm_backward(
        device,
        &mut dnorm,
        &dn1,
        &tape.xb,
        &layer.input_layernorm,
        c.rms_norm_eps,
        false,
    )?;
    let mut dxb = zeros(device, "dx", t * hidden)?;
    residual_add(device, dres, &dnorm, Some(&mut dxb))?;
    Ok(dxb)
}
