//! One decoder layer for one row (a batch-1 decode step, t = 1) through the fused kernels of
//! `backend::cuda::decode`: the device version of `layer_forward` at t = 1 in fewer, larger
//! launches. Per layer, with an adapter on every linear:
//! 1. RMSNorm + LoRA A of q, k, v (one launch: every CTA normalizes the row itself);
//! 2. the 4-bit GEMV of q, k and v as one row space, each row + s · B z;
//! 3. attention over the cache, RoPE of q and k and the KV-cache writes included (one launch,
//!    `backend::cuda::attention::attention_decode`);
//! 4. LoRA A of o (the dense GEMV), 5. the 4-bit GEMV of o + B z + the residual add;
//! 6. RMSNorm + LoRA A of gate and up, 7. the GEMV of gate and up + B z, then SwiGLU;
//! 8. LoRA A of down, 9. the GEMV of down + B z + the residual add.
//!
//! 9 launches (from 21); without adapters 1 and 6 are the norm alone and 4 and 8 go: 7 (from
//! 14). The tape is not kept (decoding has no backward).
//!
//! Where generation made the layer's tiled copy ([`TiledDecode`]), the GEMVs 2, 5, 7 and 9 read
//! it (`backend::cuda::decode_tiled`, the same epilogues), each unless its adapters' factors do
//! not fit the tiled kernel's shared memory (a large rank): that product then reads the
//! bitsandbytes layout, as it does without a copy. The tiled kernels also make what 1, 4, 6 and
//! 8 make (the norm, z = A u), so those launches go: 5 launches a layer (4 GEMVs, attention).

use super::adapters::GpuAdapter;
use super::layer::{cached_attention, LayerAdapters, Rope};
use super::tiled_decode::TiledDecode;
use super::weights::{GpuLayer, GpuLinear, DOWN, GATE, K, O, Q, UP, V};
use super::workspace::{Scratch, Workspace};
use crate::backend::cuda::decode::{
    fused_gemv_fits, gemv4_residual, gemv4_rows, gemv4_swiglu, rmsnorm_lora_a, rmsnorm_lora_a_fits,
    FusedProduct, LoraTerm,
};
use crate::backend::cuda::decode_tiled::{
    tiled_fused_fits, tiled_residual, tiled_rows, tiled_swiglu, z_rows_len, LoraRanks, TiledInput,
    TiledLora, TiledNorm,
};
use crate::backend::cuda::gemv::matmul_nt_bf16_by_rows;
use crate::backend::cuda::gemv_tiled::Tiled4bit;
use crate::backend::cuda::matmul::GemmShape;
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::model::config::LlamaConfig;

/// Where a decode step's keys and values go: the layer's cache, the row `pos0`, and with
/// `step` the device copy of `pos0` that a recorded step reads.
pub(crate) struct DecodeCache<'a> {
    pub(crate) keys: &'a mut GpuBuffer<u16>,
    pub(crate) values: &'a mut GpuBuffer<u16>,
    pub(crate) pos0: usize,
    pub(crate) step: Option<&'a GpuBuffer<i64>>,
}

/// Whether every linear of `layer` fits the fused GEMV (and the row the norm kernel), so that
/// [`layer_decode`] can run it.
pub(crate) fn layer_decode_fits(device: &CudaDevice, c: &LlamaConfig, layer: &GpuLayer) -> bool {
    rmsnorm_lora_a_fits(c.hidden_size)
        && layer
            .linears
            .iter()
            .all(|lin| fused_gemv_fits(device, &lin.weight, (lin.out_features, lin.in_features)))
}

/// Runs one layer over the one row `x (C)` f32 (with `xb`, its bf16 copy), its key and value
/// into `cache`: returns the output (f32 and bf16). The caller checked [`layer_decode_fits`];
/// `tiled` is the layer's tiled copy where the GEMVs should read it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_decode<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    (layer, tiled): (&GpuLayer, Option<&TiledDecode>),
    adapters: &LayerAdapters,
    x: &GpuBuffer<f32>,
    xb: Scratch<'w, u16>,
    rope: &Rope,
    cache: DecodeCache<'_>,
) -> Result<(Scratch<'w, f32>, Scratch<'w, u16>)> {
    let (hidden, ffn, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
    let lin = &layer.linears;
    // 1, 2: norm + LoRA A of q, k, v; the three products as one row space (tiled: one launch).
    let mut q = ws.bf16.take(device, "q", c.q_dim())?;
    let mut k = ws.bf16.take(device, "k", c.kv_dim())?;
    let mut v = ws.bf16.take(device, "v", c.kv_dim())?;
    let outs = &mut [&mut *q, &mut *k, &mut *v];
    let norm = TiledNorm {
        weight: &layer.input_layernorm,
        eps,
    };
    match takes(device, tiled.map(|t| &t.qkv), adapters, &[Q, K, V], true) {
        Some(copy) => {
            let loras = tiled_loras(adapters, &[Q, K, V]);
            let mut z_rows = ws.f32.take(device, "LoRA z", z_rows_len(&loras))?;
            let input = TiledInput {
                x: &xb,
                norm: Some(norm),
                z_rows: &mut z_rows,
            };
            tiled_rows(device, copy, &loras, input, outs)?
        }
        None => {
            let mut n1 = ws.bf16.take(device, "n1", hidden)?;
            let z1 = norm_and_lora_a(device, ws, &xb, norm, adapters, &[Q, K, V], &mut n1)?;
            gemv4_rows(device, &products(lin, adapters, &[Q, K, V], &z1), &n1, outs)?
        }
    }
    // 3: RoPE + cache write + attention.
    let mut attn = ws.bf16.take(device, "attention output", c.q_dim())?;
    let mut lse = ws
        .f32
        .take(device, "attention lse", c.num_attention_heads)?;
    let kv = (cache.keys, cache.values, cache.pos0, cache.step);
    let qkv = (&mut *q, &mut *k, &*v);
    cached_attention(device, ws, c, qkv, rope, kv, (&mut attn, &mut lse))?;
    // 4, 5: LoRA A of o; o + B z + the residual add (tiled: one launch).
    let mut y = ws.f32.take(device, "residual stream", hidden)?;
    let mut x2b = ws.bf16.take(device, "x2", hidden)?;
    let o = (O, tiled.map(|t| &t.o));
    residual_product(device, ws, (lin, adapters), o, &attn, x, (&mut y, &mut x2b))?;
    // 6, 7: norm + LoRA A of gate, up; gate and up + B z, SwiGLU (tiled: one launch).
    let mut mlp_hidden = ws.bf16.take(device, "swiglu", ffn)?;
    let norm = TiledNorm {
        weight: &layer.post_attention_layernorm,
        eps,
    };
    match takes(
        device,
        tiled.map(|t| &t.gate_up),
        adapters,
        &[GATE, UP],
        true,
    ) {
        Some(copy) => {
            let loras = tiled_loras(adapters, &[GATE, UP]);
            let mut z_rows = ws.f32.take(device, "LoRA z", z_rows_len(&loras))?;
            let input = TiledInput {
                x: &x2b,
                norm: Some(norm),
                z_rows: &mut z_rows,
            };
            tiled_swiglu(device, copy, (loras[0], loras[1]), input, &mut mlp_hidden)?
        }
        None => {
            let mut n2 = ws.bf16.take(device, "n2", hidden)?;
            let z2 = norm_and_lora_a(device, ws, &x2b, norm, adapters, &[GATE, UP], &mut n2)?;
            let gate_up = products(lin, adapters, &[GATE, UP], &z2);
            gemv4_swiglu(device, (&gate_up[0], &gate_up[1]), &n2, &mut mlp_hidden)?
        }
    }
    // 8, 9: LoRA A of down; down + B z + the residual add (tiled: one launch).
    let mut out = ws.f32.take(device, "layer output f32", hidden)?;
    let mut outb = ws.bf16.take(device, "layer output", hidden)?;
    let down = (DOWN, tiled.map(|t| &t.down));
    let outs = (&mut *out, &mut *outb);
    residual_product(device, ws, (lin, adapters), down, &mlp_hidden, &y, outs)?;
    Ok((out, outb))
}

/// `outs = residual + W u + s B (A u)` for linear `index` (o or down) and the rounded bf16 copy:
/// through its tiled copy's fused kernel where `tiled` has one that takes the adapter (one
/// launch), else LoRA A, then the row-major fused GEMV.
fn residual_product(
    device: &CudaDevice,
    ws: &Workspace,
    (lin, adapters): (&[GpuLinear], &LayerAdapters),
    (index, tiled): (usize, Option<&Tiled4bit>),
    u: &GpuBuffer<u16>,
    residual: &GpuBuffer<f32>,
    outs: (&mut GpuBuffer<f32>, &mut GpuBuffer<u16>),
) -> Result<()> {
    match takes(device, tiled, adapters, &[index], false) {
        Some(copy) => {
            let lora = tiled_loras(adapters, &[index])[0];
            let mut z_rows = ws.f32.take(device, "LoRA z", z_rows_len(&[lora]))?;
            let input = TiledInput {
                x: u,
                norm: None,
                z_rows: &mut z_rows,
            };
            tiled_residual(device, copy, lora, input, residual, outs)
        }
        None => {
            let z = lora_a(device, ws, adapters[index].as_ref(), u)?;
            let product = products(lin, adapters, &[index], &z);
            gemv4_residual(device, &product[0], u, residual, outs)
        }
    }
}

/// The tiled copy, where there is one and its fused kernel takes the `linears`' adapters (and
/// the norm of x where `normed`).
fn takes<'t>(
    device: &CudaDevice,
    copy: Option<&'t Tiled4bit>,
    adapters: &LayerAdapters,
    linears: &[usize],
    normed: bool,
) -> Option<&'t Tiled4bit> {
    let ranks = LoraRanks::from_ranks(
        linears
            .iter()
            .filter_map(|&i| adapters[i].as_ref().map(|a| a.rank)),
    );
    copy.filter(|copy| tiled_fused_fits(device, copy, ranks, normed))
}

/// The `linears`' adapters as the tiled kernels take them, in order.
fn tiled_loras<'a>(adapters: &'a LayerAdapters, linears: &[usize]) -> Vec<Option<TiledLora<'a>>> {
    linears
        .iter()
        .map(|&i| {
            adapters[i].as_ref().map(|a| TiledLora {
                a: &a.a,
                b: &a.b,
                rank: a.rank,
                scale: a.scale,
            })
        })
        .collect()
}

/// The norm of `x` into `xhat` with the LoRA A products of the `linears` that have an adapter,
/// in that order, into the returned z (at least one element, so it exists without adapters).
fn norm_and_lora_a<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    x: &GpuBuffer<u16>,
    TiledNorm { weight, eps }: TiledNorm<'_>,
    adapters: &LayerAdapters,
    linears: &[usize],
    xhat: &mut GpuBuffer<u16>,
) -> Result<Scratch<'w, u16>> {
    let factors: Vec<(&GpuBuffer<u16>, usize)> = linears
        .iter()
        .filter_map(|&i| adapters[i].as_ref().map(|a| (&a.a, a.rank)))
        .collect();
    let rows: usize = factors.iter().map(|&(_, r)| r).sum();
    let mut z = ws.bf16.take(device, "LoRA z", rows.max(1))?;
    rmsnorm_lora_a(device, x, weight, eps, &factors, (xhat, &mut z))?;
    Ok(z)
}

/// z = u Aᵀ (r,) for an adapter (the dense GEMV), or a one-element placeholder without one.
fn lora_a<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    adapter: Option<&GpuAdapter>,
    u: &GpuBuffer<u16>,
) -> Result<Scratch<'w, u16>> {
    let Some(adapter) = adapter else {
        return ws.bf16.take(device, "LoRA z", 1);
    };
    let mut z = ws.bf16.take(device, "LoRA z", adapter.rank)?;
    let shape = GemmShape {
        m: 1,
        n: adapter.rank,
        k: adapter.in_features,
    };
    matmul_nt_bf16_by_rows(device, u, &adapter.a, &mut z, shape, 1.0, 0.0)?;
    Ok(z)
}

/// The fused GEMV's view of `linears`, each with its adapter's B product reading its z from
/// `z`, where the adapters' z follow one another in the order of `linears`.
fn products<'a>(
    lin: &'a [GpuLinear],
    adapters: &'a LayerAdapters,
    linears: &[usize],
    z: &'a GpuBuffer<u16>,
) -> Vec<FusedProduct<'a>> {
    let mut z_offset = 0;
    linears
        .iter()
        .map(|&i| {
            let lora = adapters[i].as_ref().map(|a| {
                let term = LoraTerm {
                    b: &a.b,
                    z,
                    z_offset,
                    rank: a.rank,
                    scale: a.scale,
                };
                z_offset += a.rank;
                term
            });
            FusedProduct {
                weight: &lin[i].weight,
                rows: lin[i].out_features,
                lora,
            }
        })
        .collect()
}
