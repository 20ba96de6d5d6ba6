//! The frozen weights on the GPU: each decoder linear as its 4-bit codes and f32 block scales,
//! the RMSNorm weights in f32, and the lm_head in bf16, (V, C): the logits use it as `X Wᵀ`, the
//! gradient of the hidden states as `dlogits W`.

use super::tiled_decode::TiledDecode;
use crate::backend::cuda::{CudaDevice, Gpu4bit, GpuBuffer, Host4bit, HostAbsmax};
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::quant::code_table;
use half::bf16;
use rayon::prelude::*;

/// The seven linears of a layer in the CPU's order (the order dropout masks are drawn in).
pub(crate) const LINEARS: usize = 7;
/// Indices into a layer's linears.
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// A layer's linears, mutably, in q, k, v, o, gate, up, down order.
pub(crate) fn layer_linears_mut(layer: &mut DecoderLayer) -> [&mut Linear; LINEARS] {
    [
        &mut layer.q_proj,
        &mut layer.k_proj,
        &mut layer.v_proj,
        &mut layer.o_proj,
        &mut layer.gate_proj,
        &mut layer.up_proj,
        &mut layer.down_proj,
    ]
}

/// A frozen 4-bit linear layer W (out, in) on the GPU.
pub(crate) struct GpuLinear {
    pub(crate) weight: Gpu4bit,
    pub(crate) in_features: usize,
    pub(crate) out_features: usize,
}

impl GpuLinear {
    /// Uploads a 4-bit layer; a dense one is refused (the GPU path runs the QLoRA base).
    fn upload(device: &CudaDevice, linear: &Linear, name: &str) -> Result<Self> {
        let (packed, absmax, quant_type, blocksize) =
            linear.quantized_parts().ok_or_else(|| {
                Error::unsupported(format!(
                    "{name} is a dense f32 weight; the GPU path runs 4-bit (NF4) base weights \
                 (drop --no-quant, or use --device cpu)"
                ))
            })?;
        let host = Host4bit {
            packed,
            code_table: code_table(quant_type),
            absmax: HostAbsmax::Plain(absmax),
            numel: linear.out_features() * linear.in_features(),
            blocksize,
        };
        Ok(GpuLinear {
            weight: Gpu4bit::upload(device, name, &host)?,
            in_features: linear.in_features(),
            out_features: linear.out_features(),
        })
    }
}

/// One decoder layer's frozen weights on the GPU.
pub(crate) struct GpuLayer {
    pub(crate) input_layernorm: GpuBuffer<f32>,          // (C)
    pub(crate) post_attention_layernorm: GpuBuffer<f32>, // (C)
    /// q, k, v, o, gate, up, down.
    pub(crate) linears: [GpuLinear; LINEARS],
    /// The linears in the tiled decode layout, once generation prepared them.
    pub(crate) tiled: Option<TiledDecode>,
}

/// The final norm and the lm_head on the GPU.
pub(crate) struct GpuHead {
    pub(crate) norm: GpuBuffer<f32>,   // (C)
    pub(crate) weight: GpuBuffer<u16>, // (V, C) bf16
}

/// f32 values rounded to bf16 bits.
pub(crate) fn to_bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .par_iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect()
}

/// Uploads every layer's frozen weights, layer `i` to `device_of(i)`.
pub(crate) fn upload_layers<'d>(
    device_of: &dyn Fn(usize) -> &'d CudaDevice,
    model: &Llama,
) -> Result<Vec<GpuLayer>> {
    let mut layers = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
        let device = device_of(i);
        let names = ["q", "k", "v", "o", "gate", "up", "down"];
        let host = layer.linears();
        let mut linears = Vec::with_capacity(LINEARS);
        for (lin, name) in host.iter().zip(names) {
            linears.push(GpuLinear::upload(
                device,
                lin,
                &format!("layer {i} {name}_proj"),
            )?);
        }
        let linears: [GpuLinear; LINEARS] = linears
            .try_into()
            .map_err(|_| Error::invalid("a decoder layer has seven linears"))?;
        layers.push(GpuLayer {
            input_layernorm: GpuBuffer::from_host(
                device,
                "input_layernorm",
                &layer.input_layernorm,
            )?,
            post_attention_layernorm: GpuBuffer::from_host(
                device,
                "post_attention_layernorm",
                &layer.post_attention_layernorm,
            )?,
            linears,
            tiled: None,
        });
    }
    Ok(layers)
}

/// Uploads the final norm and the lm_head (bf16).
pub(crate) fn upload_head(device: &CudaDevice, model: &Llama) -> Result<GpuHead> {
    let weight = to_bf16_bits(&model.lm_head.weight_f32());
    Ok(GpuHead {
        norm: GpuBuffer::from_host(device, "model.norm", &model.norm)?,
        weight: GpuBuffer::from_host(device, "lm_head", &weight)?,
    })
}
