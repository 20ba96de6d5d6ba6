//! The optimizer on the GPU: gradient norm, clipping and bitsandbytes' 32-bit AdamW over every
//! adapter's f32 master factors, with all moments in one [`MomentArena`] (managed memory for
//! the paged optimizer, prefetched to the card before each step). Nothing crosses to the host
//! but the norm; [`GpuLlama::sync_host`] copies factors and moments back for checkpoints.

use super::weights::layer_linears_mut;
use super::GpuLlama;
use crate::backend::cuda::adamw::{adamw_step, global_norm, AdamWStep, MomentArena};
use crate::backend::cuda::GpuBuffer;
use crate::error::{Error, Result};
use crate::optim::{clip_coefficient, AdamState, OptimizerStep};

impl GpuLlama<'_> {
    /// As [`crate::model::train_model::TrainModel::optimizer_step`], on the device.
    pub fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32> {
        self.sync_adapters()?;
        let device = self.device;
        let grads: Vec<&GpuBuffer<f32>> = (self.adapters.iter().flatten().flatten())
            .flat_map(|a| [&a.grad_a, &a.grad_b])
            .collect();
        let norm = global_norm(device, &grads)?;
        if !norm.is_finite() {
            return Err(Error::invalid(format!(
                "the gradient norm became {norm} at step {}; stopping",
                opt.step
            )));
        }
        if self.moments.as_ref().map(MomentArena::is_paged) != Some(opt.paged) {
            // A change of memory kind carries the current moments over through the host.
            self.sync_host()?;
            self.moments = Some(self.moments_from_host(opt.paged)?);
        }
        let Some(moments) = self.moments.as_mut() else {
            unreachable!("the moments were just built")
        };
        moments.prefetch_to_device(device)?;
        let step = AdamWStep {
            lr: opt.lr,
            step: opt.step,
            grad_scale: clip_coefficient(norm, opt.max_grad_norm).unwrap_or(1.0),
        };
        let mut offset = 0;
        for adapter in self.adapters.iter_mut().flatten().flatten() {
            adamw_step(
                device,
                &opt.adamw,
                step,
                &mut adapter.a_f32,
                &adapter.grad_a,
                moments,
                offset,
            )?;
            offset += adapter.a_f32.len();
            adamw_step(
                device,
                &opt.adamw,
                step,
                &mut adapter.b_f32,
                &adapter.grad_b,
                moments,
                offset,
            )?;
            offset += adapter.b_f32.len();
            adapter.refresh_bf16(device)?;
            adapter.zero_grads(device)?;
        }
        self.host_current = false;
        Ok(norm)
    }

    /// A moment arena for every adapter (A then B, in adapter order), holding the host
    /// adapters' moments where they have any (a resumed run) and zeros elsewhere.
    fn moments_from_host(&self, paged: bool) -> Result<MomentArena> {
        let pairs = self.host.adapters();
        let total = pairs.iter().map(|(_, p)| p.a.len() + p.b.len()).sum();
        let mut arena = MomentArena::new(self.device, total, paged)?;
        let mut offset = 0;
        for (module, pair) in pairs {
            for (state, len) in pair.moments.iter().zip([pair.a.len(), pair.b.len()]) {
                if !state.m.is_empty() {
                    if state.m.len() != len || state.v.len() != len {
                        return Err(Error::invalid(format!(
                            "{module}: AdamW moments of {} values for a factor of {len}",
                            state.m.len()
                        )));
                    }
                    arena.write(self.device, offset, &state.m, &state.v)?;
                }
                offset += len;
            }
        }
        Ok(arena)
    }

    /// Copies the device's master factors and moments into the host adapters, when they
    /// changed since the host's were last current.
    pub fn sync_host(&mut self) -> Result<()> {
        if self.host_current {
            return Ok(());
        }
        let device = self.device;
        let mut offset = 0;
        for (host_layer, gpu_layer) in self.host.layers.iter_mut().zip(&self.adapters) {
            for (linear, slot) in layer_linears_mut(host_layer).into_iter().zip(gpu_layer) {
                let (Some(pair), Some(adapter)) = (linear.lora.as_mut(), slot.as_ref()) else {
                    continue;
                };
                adapter.download_factors(device, pair)?;
                if let Some(moments) = &self.moments {
                    for (state, len) in pair.moments.iter_mut().zip([pair.a.len(), pair.b.len()]) {
                        let (m, v) = moments.read(device, offset, len)?;
                        *state = AdamState { m, v };
                        offset += len;
                    }
                }
            }
        }
        self.host_current = true;
        Ok(())
    }
}
