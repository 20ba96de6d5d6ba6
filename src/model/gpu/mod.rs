//! The decoder on the GPU (feature `cuda`): [`GpuLlama`] wraps a loaded CPU [`Llama`] and runs
//! its forward and training passes with the CUDA kernels, bf16 activations with f32
//! accumulation and an f32 residual stream.
//!
//! The host model stays the owner of everything that is not arithmetic: configuration, the
//! embedding table (rows are gathered on the host and uploaded per sequence), and the adapters'
//! host copy, which checkpoints are written from. The GPU holds the frozen weights (4-bit
//! linears, f32 norms, a bf16 lm_head) and, while training, the adapters' f32 master weights,
//! gradients and AdamW moments, with bf16 copies refreshed after each optimizer step. Either
//! side may be the current one: the host after it was edited (`adapters_stale`: uploaded before
//! the next pass), the device after an optimizer step (`host_current` false: copied back by
//! `sync_host`). Dropout masks are keyed from the caller's generator in the CPU's order and made
//! on the device with the same counter-based draw, so a GPU run sees the CPU run's masks.
//!
//! - `weights`: uploading the frozen weights; `adapters`: the adapters' device state;
//! - `linear`: a 4-bit linear with its adapter, forward and backward;
//! - `layer`: one decoder layer, forward with a tape and backward;
//! - `loss`: the final norm, lm_head and cross-entropy;
//! - `optimizer`: clipping and AdamW on the device, and copying the result to the host;
//! - `reduce`: summing the gradients across the ranks of a data-parallel run;
//! - `train`: whole training and evaluation passes; `forward`: inference with a KV cache on the
//!   GPU.

mod adapters;
mod forward;
mod layer;
mod linear;
mod loss;
mod optimizer;
mod reduce;
mod train;
mod weights;
mod workspace;

pub use forward::{GpuDecoder, GpuKvCache};

use self::adapters::GpuAdapter;
use self::layer::{LayerAdapters, LayerMasks, Rope};
use self::linear::DropoutMask;
use self::weights::{
    layer_linears, layer_linears_mut, upload_head, upload_layers, GpuHead, GpuLayer, LINEARS,
};
use self::workspace::{Scratch, Workspace};
use crate::backend::cpu::{embedding_forward, rope_cos_sin};
use crate::backend::cuda::adamw::MomentArena;
use crate::backend::cuda::elementwise::{dropout_mask_from_keys, upload_into};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::{Error, Result};
use crate::model::llama::Llama;
use crate::rng::Rng;
use std::rc::Rc;

/// A [`Llama`] with its frozen weights and adapters on the GPU.
pub struct GpuLlama<'d> {
    layers: Vec<GpuLayer>,
    head: GpuHead,
    /// Per layer, the adapters of q, k, v, o, gate, up, down.
    adapters: Vec<LayerAdapters>,
    /// The host's adapters changed since they were last uploaded.
    adapters_stale: bool,
    /// The host's factors and moments equal the device's.
    host_current: bool,
    /// The device holds gradients the host has not collected.
    grads_pending: bool,
    /// The AdamW moments of every adapter factor, from the first optimizer step on.
    moments: Option<MomentArena>,
    /// Activation buffers reused from pass to pass (shared with the passes' locals).
    workspace: Rc<Workspace>,
    host: Llama,
    device: &'d CudaDevice,
}

impl std::fmt::Debug for GpuLlama<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLlama")
            .field("device", &self.device.name())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl<'d> GpuLlama<'d> {
    /// Uploads `host`'s frozen weights and adapters to `device`. Fails when a decoder linear is
    /// dense (the GPU path runs 4-bit base weights), when the head width is not one the
    /// attention kernels support (64 or 128), or when the GPU runs out of memory.
    pub fn new(device: &'d CudaDevice, host: Llama) -> Result<Self> {
        let head_dim = host.config.head_dim;
        if head_dim != 64 && head_dim != 128 {
            return Err(Error::unsupported(format!(
                "the GPU attention kernels support head_dim 64 and 128; this model has \
                 {head_dim} (use --device cpu)"
            )));
        }
        let layers = upload_layers(device, &host)?;
        let head = upload_head(device, &host)?;
        let mut model = GpuLlama {
            adapters: (0..layers.len()).map(|_| [(); 7].map(|_| None)).collect(),
            layers,
            head,
            adapters_stale: true,
            host_current: true,
            grads_pending: false,
            moments: None,
            workspace: Rc::new(Workspace::new()),
            host,
            device,
        };
        model.sync_adapters()?;
        Ok(model)
    }

    /// The host model (configuration, adapters' master weights).
    pub fn host(&self) -> &Llama {
        &self.host
    }

    /// The GPU it runs on.
    pub fn device(&self) -> &CudaDevice {
        self.device
    }

    /// Device memory in use on the whole card (total minus free), in bytes.
    pub fn memory_in_use(&self) -> Result<usize> {
        let (free, total) = self.device.memory_info()?;
        Ok(total.saturating_sub(free))
    }

    /// Brings the device adapters in line with the host's (presence, shape, factors, pending
    /// gradients, which move to the device) when the host's may have changed. The moments are
    /// rebuilt from the host's at the next optimizer step.
    fn sync_adapters(&mut self) -> Result<()> {
        if !self.adapters_stale {
            return Ok(());
        }
        let device = self.device;
        for (host_layer, gpu_layer) in self.host.layers.iter_mut().zip(&mut self.adapters) {
            for (linear, slot) in layer_linears_mut(host_layer)
                .into_iter()
                .zip(gpu_layer.iter_mut())
            {
                match (&mut linear.lora, slot.as_mut()) {
                    (None, _) => *slot = None,
                    (Some(pair), Some(adapter)) if adapter.fits(pair) => {
                        adapter.upload_factors(device, pair)?;
                        pair.zero_grad();
                    }
                    (Some(pair), _) => {
                        *slot = Some(GpuAdapter::new(device, pair)?);
                        pair.zero_grad();
                    }
                }
            }
        }
        self.moments = None;
        self.adapters_stale = false;
        self.host_current = true;
        self.grads_pending = true;
        Ok(())
    }

    /// Adds the gradients accumulated on the device into the host adapters' gradients.
    fn flush_grads(&mut self) -> Result<()> {
        if !self.grads_pending {
            return Ok(());
        }
        let device = self.device;
        for (host_layer, gpu_layer) in self.host.layers.iter_mut().zip(&mut self.adapters) {
            for (linear, slot) in layer_linears_mut(host_layer)
                .into_iter()
                .zip(gpu_layer.iter_mut())
            {
                if let (Some(pair), Some(adapter)) = (linear.lora.as_mut(), slot.as_mut()) {
                    adapter.flush_grads(device, pair)?;
                }
            }
        }
        self.grads_pending = false;
        Ok(())
    }

    /// The embedding rows of `ids` (checked to be in the vocabulary), (T, C) f32 on the GPU.
    fn embed<'w>(&self, ws: &'w Workspace, ids: &[u32]) -> Result<Scratch<'w, f32>> {
        let c = &self.host.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the model's vocabulary of {} (wrong tokenizer?)",
                c.vocab_size
            )));
        }
        let mut rows = vec![0.0f32; ids.len() * c.hidden_size];
        embedding_forward(&mut rows, &self.host.embed_tokens, ids);
        let mut x = ws.f32.take(self.device, "embeddings", rows.len())?;
        upload_into(&mut x, &rows, "embeddings")?;
        Ok(x)
    }

    /// RoPE angles of positions `pos0..pos0 + t`, repeated for `batch` stacked sequences, on
    /// the GPU.
    fn rope(&self, pos0: usize, t: usize, batch: usize) -> Result<Rope> {
        let half = self.host.config.head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; t * half], vec![0.0f32; t * half]);
        rope_cos_sin(&mut cos, &mut sin, &self.host.inv_freq, pos0);
        Ok(Rope {
            cos: GpuBuffer::from_host(self.device, "rope cos", &cos.repeat(batch))?,
            sin: GpuBuffer::from_host(self.device, "rope sin", &sin.repeat(batch))?,
        })
    }

    /// The dropout keys of a training pass over `batch` sequences, drawn from `rng` exactly as
    /// the CPU pass draws them sequence by sequence (per sequence, per layer: q, k, v, o, gate,
    /// up, down where an adapter is attached, one `next_u64` each), laid out (layer, linear,
    /// sequence) on the device; `None` without dropout.
    fn dropout_keys(
        &self,
        batch: usize,
        dropout: f32,
        rng: &mut Rng,
    ) -> Result<Option<GpuBuffer<u64>>> {
        if dropout <= 0.0 {
            return Ok(None);
        }
        let layers = &self.host.layers;
        let mut keys = vec![0u64; layers.len() * LINEARS * batch];
        for s in 0..batch {
            for (l, layer) in layers.iter().enumerate() {
                for (i, linear) in layer_linears(layer).iter().enumerate() {
                    if linear.lora.is_some() {
                        keys[(l * LINEARS + i) * batch + s] = rng.next_u64();
                    }
                }
            }
        }
        GpuBuffer::from_host(self.device, "dropout keys", &keys).map(Some)
    }

    /// Layer `l`'s dropout masks for `batch` stacked sequences of `t` rows, made on the device
    /// from `keys` ([`GpuLlama::dropout_keys`]) with the CPU's counter-based draw
    /// (`rng::dropout_keeps`): every sequence gets the masks the CPU draws for it.
    fn layer_masks<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        keys: Option<&GpuBuffer<u64>>,
        (batch, t): (usize, usize),
        dropout: f32,
    ) -> Result<LayerMasks<'w>> {
        let mut masks: LayerMasks = [(); LINEARS].map(|_| None);
        let Some(keys) = keys else {
            return Ok(masks);
        };
        let keep = 1.0 / (1.0 - dropout);
        for (i, (linear, slot)) in layer_linears(&self.host.layers[l])
            .iter()
            .zip(masks.iter_mut())
            .enumerate()
        {
            if linear.lora.is_none() {
                continue;
            }
            let per_sequence = t * linear.in_features();
            let mut buffer = ws
                .u8
                .take(self.device, "dropout mask", batch * per_sequence)?;
            let first_key = (l * LINEARS + i) * batch;
            dropout_mask_from_keys(
                self.device,
                &mut buffer,
                keys,
                first_key,
                per_sequence,
                dropout,
            )?;
            *slot = Some(DropoutMask { mask: buffer, keep });
        }
        Ok(masks)
    }
}
