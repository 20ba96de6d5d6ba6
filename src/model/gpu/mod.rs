//! The decoder on the GPU (feature `cuda`): [`GpuLlama`] wraps a loaded CPU [`Llama`] and runs
//! its forward and training passes with the CUDA kernels, bf16 activations with f32
//! accumulation and an f32 residual stream.
//!
//! The host model stays the owner of everything that is not arithmetic: configuration, the
//! embedding table (rows are gathered on the host and uploaded per sequence), the LoRA master
//! weights and gradients, and the optimizer. The GPU holds the frozen weights (4-bit linears,
//! f32 norms, a bf16 lm_head), bf16 copies of the adapters refreshed after each optimizer step,
//! and f32 gradient accumulators collected once per step. Dropout masks are keyed from the
//! caller's generator in the CPU's order and made on the device with the same counter-based draw,
//! so a GPU run sees the CPU run's masks.
//!
//! - `weights`: uploading the frozen weights; `adapters`: the adapters' device state;
//! - `linear`: a 4-bit linear with its adapter, forward and backward;
//! - `layer`: one decoder layer, forward with a tape and backward;
//! - `loss`: the final norm, lm_head and cross-entropy;
//! - `train`: whole training and evaluation passes; `forward`: inference with a KV cache on the
//!   GPU.

mod adapters;
mod forward;
mod layer;
mod linear;
mod loss;
mod train;
mod weights;
mod workspace;

pub use forward::{GpuDecoder, GpuKvCache};

use self::adapters::GpuAdapter;
use self::layer::{LayerAdapters, LayerMasks, Rope};
use self::linear::DropoutMask;
use self::weights::{layer_linears, upload_head, upload_layers, GpuHead, GpuLayer};
use self::workspace::{Scratch, Workspace};
use crate::backend::cpu::{embedding_forward, rope_cos_sin};
use crate::backend::cuda::elementwise::{dropout_mask_from_key, upload_into};
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
    /// The host's factors changed since they were last uploaded.
    adapters_stale: bool,
    /// The device holds gradients the host has not collected.
    grads_pending: bool,
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
            grads_pending: false,
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

    /// Brings the device adapters in line with the host's (presence, shape, factors) when the
    /// host's may have changed.
    fn sync_adapters(&mut self) -> Result<()> {
        if !self.adapters_stale {
            return Ok(());
        }
        let device = self.device;
        for (host_layer, gpu_layer) in self.host.layers.iter().zip(&mut self.adapters) {
            for (linear, slot) in layer_linears(host_layer).iter().zip(gpu_layer.iter_mut()) {
                match (&linear.lora, slot.as_mut()) {
                    (None, _) => *slot = None,
                    (Some(pair), Some(adapter)) if adapter.fits(pair) => {
                        adapter.upload_factors(device, pair)?;
                    }
                    (Some(pair), _) => *slot = Some(GpuAdapter::new(device, pair)?),
                }
            }
        }
        self.adapters_stale = false;
        Ok(())
    }

    /// Adds the gradients accumulated on the device into the host adapters' gradients.
    fn flush_grads(&mut self) -> Result<()> {
        if !self.grads_pending {
            return Ok(());
        }
        let device = self.device;
        for (host_layer, gpu_layer) in self.host.layers.iter_mut().zip(&mut self.adapters) {
            let linears = [
                &mut host_layer.q_proj,
                &mut host_layer.k_proj,
                &mut host_layer.v_proj,
                &mut host_layer.o_proj,
                &mut host_layer.gate_proj,
                &mut host_layer.up_proj,
                &mut host_layer.down_proj,
            ];
            for (linear, slot) in linears.into_iter().zip(gpu_layer.iter_mut()) {
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

    /// RoPE angles of positions `pos0..pos0 + t` on the GPU.
    fn rope(&self, pos0: usize, t: usize) -> Result<Rope> {
        let half = self.host.config.head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; t * half], vec![0.0f32; t * half]);
        rope_cos_sin(&mut cos, &mut sin, &self.host.inv_freq, pos0);
        Ok(Rope {
            cos: GpuBuffer::from_host(self.device, "rope cos", &cos)?,
            sin: GpuBuffer::from_host(self.device, "rope sin", &sin)?,
        })
    }

    /// Layer `l`'s dropout masks for `t` rows, keyed from `rng` exactly as the CPU pass keys
    /// them (q, k, v, o, gate, up, down; only where an adapter is attached; one `next_u64` key
    /// each) and made on the device with the CPU's counter-based draw (`rng::dropout_keeps`).
    fn draw_masks<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        t: usize,
        dropout: f32,
        rng: &mut Rng,
    ) -> Result<LayerMasks<'w>> {
        let mut masks: LayerMasks = [(); 7].map(|_| None);
        if dropout <= 0.0 {
            return Ok(masks);
        }
        let keep = 1.0 / (1.0 - dropout);
        for (linear, slot) in layer_linears(&self.host.layers[l])
            .iter()
            .zip(masks.iter_mut())
        {
            if linear.lora.is_none() {
                continue;
            }
            let key = rng.next_u64();
            let mut buffer = ws
                .u8
                .take(self.device, "dropout mask", t * linear.in_features())?;
            dropout_mask_from_key(self.device, &mut buffer, key, dropout)?;
            *slot = Some(DropoutMask { mask: buffer, keep });
        }
        Ok(masks)
    }
}
