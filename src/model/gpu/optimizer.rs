//! The optimizer on the GPU: gradient norm, clipping and bitsandbytes' 32-bit AdamW over every
//! adapter's f32 master factors, with each stage's moments in one [`MomentArena`] (managed
//! memory for the paged optimizer, prefetched to the card before each step). Nothing crosses to
//! the host but the norm (a partial sum per GPU when the layers are split);
//! [`GpuLlama::sync_host`] copies factors and moments back for checkpoints.
//!
//! A step is a handful of launches a GPU, whatever the number of adapters: two for the norm's
//! sum of squares and one for AdamW with the bf16 copies and the zeroed gradients
//! ([`crate::backend::cuda::adamw_multi`]). Each stage keeps the two device tables these
//! launches read ([`OptimizerTables`], beside its moments); a table is rebuilt exactly when
//! what it describes changed (buffers, lengths, arena), which [`TensorTable`] checks on every
//! call.

use super::adapters::GpuAdapter;
use super::layer::LayerAdapters;
use super::GpuLlama;
use crate::backend::cuda::adamw::{AdamWStep, MomentArena};
use crate::backend::cuda::adamw_multi::{StepTensor, TensorTable};
use crate::backend::cuda::profile::span;
use crate::backend::cuda::GpuBuffer;
use crate::error::{Error, Result};
use crate::optim::{clip_coefficient, AdamState, OptimizerStep};

/// A stage's multi-tensor tables: its adapters' gradients (the norm) and its whole AdamW step
/// (factors, gradients, moments, bf16 copies).
#[derive(Default)]
pub(super) struct OptimizerTables {
    norm: TensorTable,
    adamw: TensorTable,
}

/// The adapters of stage `s`'s layers, in layer and linear order (the order of the stage's
/// moment arena).
fn stage_adapters<'a>(
    adapters: &'a [LayerAdapters],
    layer_stage: &'a [usize],
    s: usize,
) -> impl Iterator<Item = &'a GpuAdapter> {
    adapters
        .iter()
        .zip(layer_stage)
        .filter(move |(_, &stage)| stage == s)
        .flat_map(|(layer, _)| layer.iter().flatten())
}

/// [`stage_adapters`], mutably.
fn stage_adapters_mut<'a>(
    adapters: &'a mut [LayerAdapters],
    layer_stage: &'a [usize],
    s: usize,
) -> impl Iterator<Item = &'a mut GpuAdapter> {
    adapters
        .iter_mut()
        .zip(layer_stage)
        .filter(move |(_, &stage)| stage == s)
        .flat_map(|(layer, _)| layer.iter_mut().flatten())
}

/// An adapter's two factors as the tensors of a multi-tensor step: A, then B.
fn step_tensors(adapter: &mut GpuAdapter) -> [StepTensor<'_>; 2] {
    let GpuAdapter {
        a_f32,
        b_f32,
        a,
        b,
        grad_a,
        grad_b,
        ..
    } = adapter;
    [
        StepTensor {
            params: a_f32,
            grads: grad_a,
            bf16: a,
        },
        StepTensor {
            params: b_f32,
            grads: grad_b,
            bf16: b,
        },
    ]
}

impl GpuLlama<'_> {
    /// As [`crate::model::train_model::TrainModel::optimizer_step`], on the device.
    pub fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32> {
        let _span = span(self.device(), "optimizer step");
        self.sync_adapters()?;
        let mut squares = 0.0f64;
        for (s, stage) in self.stages.iter_mut().enumerate() {
            let grads: Vec<&GpuBuffer<f32>> = stage_adapters(&self.adapters, &self.layer_stage, s)
                .flat_map(|a| [&a.grad_a, &a.grad_b])
                .collect();
            squares += stage
                .optimizer_tables
                .norm
                .sum_of_squares(stage.device, &grads)?;
        }
        let norm = squares.sqrt() as f32;
        if !norm.is_finite() {
            return Err(Error::invalid(format!(
                "the gradient norm became {norm} at step {}; stopping",
                opt.step
            )));
        }
        if self.moments_paged != Some(opt.paged) {
            // Built at the first step; a change of memory kind carries the current moments
            // over through the host.
            self.sync_host()?;
            for s in 0..self.stages.len() {
                let moments = self.moments_from_host(s, opt.paged)?;
                self.stages[s].moments = moments;
            }
            self.moments_paged = Some(opt.paged);
        }
        let step = AdamWStep {
            lr: opt.lr,
            step: opt.step,
            grad_scale: clip_coefficient(norm, opt.max_grad_norm).unwrap_or(1.0),
        };
        for (s, stage) in self.stages.iter_mut().enumerate() {
            let Some(moments) = stage.moments.as_mut() else {
                continue; // a stage without adapters
            };
            let device = stage.device;
            moments.prefetch_to_device(device)?;
            let mut tensors: Vec<StepTensor<'_>> =
                stage_adapters_mut(&mut self.adapters, &self.layer_stage, s)
                    .flat_map(step_tensors)
                    .collect();
            stage.optimizer_tables.adamw.adamw_step(
                device,
                &opt.adamw,
                step,
                &mut tensors,
                moments,
            )?;
        }
        self.host_current = false;
        Ok(norm)
    }

    /// A moment arena for the adapters of stage `s` (A then B, in adapter order), holding the
    /// host adapters' moments where they have any (a resumed run) and zeros elsewhere; `None`
    /// when the stage has no adapters.
    fn moments_from_host(&self, s: usize, paged: bool) -> Result<Option<MomentArena>> {
        let device = self.stages[s].device;
        let pairs: Vec<_> = self
            .host
            .layers
            .iter()
            .zip(&self.layer_stage)
            .filter(|(_, &stage)| stage == s)
            .flat_map(|(layer, _)| layer.linears())
            .filter_map(|linear| linear.lora.as_ref())
            .collect();
        let total: usize = pairs.iter().map(|p| p.a.len() + p.b.len()).sum();
        if total == 0 {
            return Ok(None);
        }
        let mut arena = MomentArena::new(device, total, paged)?;
        let mut offset = 0;
        for pair in pairs {
            for (state, len) in pair.moments.iter().zip([pair.a.len(), pair.b.len()]) {
                if !state.m.is_empty() {
                    if state.m.len() != len || state.v.len() != len {
                        return Err(Error::invalid(format!(
                            "an adapter of {} x {} (rank {}): AdamW moments of {} values for a \
                             factor of {len}",
                            pair.out_features,
                            pair.in_features,
                            pair.rank,
                            state.m.len()
                        )));
                    }
                    arena.write(device, offset, &state.m, &state.v)?;
                }
                offset += len;
            }
        }
        Ok(Some(arena))
    }

    /// Copies the device's master factors and moments into the host adapters, when they
    /// changed since the host's were last current.
    pub fn sync_host(&mut self) -> Result<()> {
        if self.host_current {
            return Ok(());
        }
        let mut offsets = vec![0usize; self.stages.len()];
        for (s, stage, linear, slot) in self.linear_slots() {
            let (Some(pair), Some(adapter)) = (linear.lora.as_mut(), slot.as_ref()) else {
                continue;
            };
            adapter.download_factors(stage.device, pair)?;
            if let Some(moments) = &stage.moments {
                for (state, len) in pair.moments.iter_mut().zip([pair.a.len(), pair.b.len()]) {
                    let (m, v) = moments.read(stage.device, offsets[s], len)?;
                    *state = AdamState { m, v };
                    offsets[s] += len;
                }
            }
        }
        self.host_current = true;
        Ok(())
    }
}
