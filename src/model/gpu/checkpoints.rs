//! Where a training pass keeps each layer's f32 input between the layer's forward and its
//! backward (with gradient checkpointing the layer is run again from it): on the GPU, or parked
//! in pinned host memory ([`HostStash`], one per stage) and fetched back one layer ahead of the
//! backward.
//!
//! With the inputs on the host, layer `l`'s input is copied out while layer `l`'s forward runs
//! and its device buffer returns to the pool once the copy is done; the backward of layer `l`
//! starts the copy of layer `l - 1`'s input back into a pool buffer, so that it arrives while
//! layer `l` is recomputed and differentiated. The last layer's input stays on the GPU: its
//! backward comes right after the loss head. At most two inputs are on a GPU at a time (the
//! one in use and the one on its way), against every layer's with the inputs kept there.
//!
//! A layer whose tape the pass keeps (`--tape-budget`, [`crate::model::tape_budget`]) is not
//! run again, so its input is neither kept nor parked: it has no slot.
//!
//! The copies move bits: the backward reads exactly the values the forward wrote, so a pass
//! gives the same loss and gradients either way.

use super::workspace::{Pool, Scratch};
use super::{GpuLlama, Stage};
use crate::backend::cuda::profile::span;
use crate::backend::cuda::{CudaDevice, GpuBuffer, HostStash};
use crate::error::{Error, Result};

/// Per layer, its slot in its stage's stash: the layers of each stage numbered in order, the
/// model's last layer excepted (`None`: its input stays on the GPU), and the layers whose tapes
/// are `kept` (`None`: no input is needed).
pub(crate) fn stash_slots(layer_stage: &[usize], kept: &[bool]) -> Vec<Option<usize>> {
    let last = layer_stage.len().saturating_sub(1);
    let mut next_slot = Vec::<usize>::new();
    layer_stage
        .iter()
        .enumerate()
        .map(|(l, &s)| {
            if l == last || kept.get(l).copied().unwrap_or(false) {
                return None;
            }
            if next_slot.len() <= s {
                next_slot.resize(s + 1, 0);
            }
            let slot = next_slot[s];
            next_slot[s] += 1;
            Some(slot)
        })
        .collect()
}

/// How many slots each of `stages` stages needs for [`stash_slots`]'s numbering.
pub(crate) fn slots_per_stage(layer_stage: &[usize], kept: &[bool], stages: usize) -> Vec<usize> {
    let mut counts = vec![0; stages];
    for (slot, &s) in stash_slots(layer_stage, kept).iter().zip(layer_stage) {
        if slot.is_some() {
            counts[s] += 1;
        }
    }
    counts
}

impl GpuLlama<'_> {
    /// Gives every stage a stash with the slots its layers need (none on a stage holding only
    /// the last layer or layers whose tapes are `kept`), each of `len` values (a pass's hidden
    /// states), before a pass that parks its layer inputs on the host.
    pub(super) fn reserve_stashes(&mut self, len: usize, kept: &[bool]) -> Result<()> {
        let counts = slots_per_stage(&self.layer_stage, kept, self.stages.len());
        for (stage, count) in self.stages.iter_mut().zip(counts) {
            let stash = match &mut stage.stash {
                Some(stash) => stash,
                empty => empty.insert(HostStash::new(stage.device)?),
            };
            stash.reserve(count, len)?;
        }
        Ok(())
    }
}

/// Every stage's stash, in stage order (borrowing only `stages`, so that a pass may update the
/// adapters meanwhile); an error naming the stage when one was not reserved.
pub(super) fn stage_stashes<'s, 'd>(stages: &'s [Stage<'d>]) -> Result<Vec<&'s HostStash<'d>>> {
    stages
        .iter()
        .enumerate()
        .map(|(s, stage)| {
            stage.stash.as_ref().ok_or_else(|| {
                Error::invalid(format!(
                    "stage {s} has no checkpoint stash: reserve_stashes must run before the pass"
                ))
            })
        })
        .collect()
}

/// The parked side of [`LayerInputs`]: every stage's stash and every layer's slot.
struct Parked<'s, 'd> {
    /// Indexed by stage.
    stashes: Vec<&'s HostStash<'d>>,
    layer_stage: &'s [usize],
    slots: Vec<Option<usize>>,
}

impl<'s, 'd> Parked<'s, 'd> {
    /// Layer `l`'s stash and slot, when its input is parked.
    fn slot(&self, l: usize) -> Option<(&'s HostStash<'d>, usize)> {
        let slot = (*self.slots.get(l)?)?;
        Some((self.stashes[self.layer_stage[l]], slot))
    }
}

/// The layer inputs of one training pass, on the GPU or parked on the host.
pub(crate) struct LayerInputs<'w, 's, 'd> {
    /// Per layer, its input while it is on the GPU.
    on_gpu: Vec<Option<Scratch<'w, f32>>>,
    parked: Option<Parked<'s, 'd>>,
}

impl<'w, 's, 'd> LayerInputs<'w, 's, 'd> {
    /// Every one of `layers` inputs kept on the GPU.
    pub(crate) fn on_gpu(layers: usize) -> Self {
        LayerInputs {
            on_gpu: (0..layers).map(|_| None).collect(),
            parked: None,
        }
    }

    /// Inputs parked in `stashes` (indexed by stage, each with [`slots_per_stage`]'s slots
    /// reserved for this pass's length), the layers on the stages `layer_stage` gives, none for
    /// the layers whose tapes are `kept`.
    pub(crate) fn on_host(
        stashes: Vec<&'s HostStash<'d>>,
        layer_stage: &'s [usize],
        kept: &[bool],
    ) -> Self {
        LayerInputs {
            on_gpu: (0..layer_stage.len()).map(|_| None).collect(),
            parked: Some(Parked {
                stashes,
                slots: stash_slots(layer_stage, kept),
                layer_stage,
            }),
        }
    }

    /// Before layer `l`'s forward is queued: starts copying its input `x` out when it is
    /// parked.
    pub(crate) fn forward_starts(&self, l: usize, x: &GpuBuffer<f32>) -> Result<()> {
        match self.parked.as_ref().and_then(|p| p.slot(l)) {
            Some((stash, slot)) => stash.download(slot, x),
            None => Ok(()),
        }
    }

    /// After layer `l`'s forward is queued: keeps its input `x`, or, when it is parked, orders
    /// the device's later work after the copy out and lets `x` return to its pool.
    pub(crate) fn forward_done(
        &mut self,
        device: &CudaDevice,
        l: usize,
        x: Scratch<'w, f32>,
    ) -> Result<()> {
        match self.parked.as_ref().and_then(|p| p.slot(l)) {
            Some((stash, slot)) => {
                let _wait = span(device, "pass: checkpoint copy-out wait");
                stash.release_source(slot)
            }
            None => {
                let kept = self.on_gpu.get_mut(l).ok_or_else(|| missing(l))?;
                *kept = Some(x);
                Ok(())
            }
        }
    }

    /// Before layer `l + 1`'s backward is queued: when layer `l`'s input is parked, takes a
    /// buffer of `len` values from `pool` (layer `l`'s stage's, on `device`) and starts copying
    /// the input back into it. Nothing for a layer whose input is on the GPU.
    pub(crate) fn prefetch(
        &mut self,
        device: &CudaDevice,
        pool: &'w Pool<f32>,
        l: usize,
        len: usize,
    ) -> Result<()> {
        let Some((stash, slot)) = self.parked.as_ref().and_then(|p| p.slot(l)) else {
            return Ok(());
        };
        let mut buffer = pool.take(device, "layer checkpoint", len)?;
        stash.upload(slot, &mut buffer)?;
        let kept = self.on_gpu.get_mut(l).ok_or_else(|| missing(l))?;
        *kept = Some(buffer);
        Ok(())
    }

    /// Layer `l`'s input for its recompute, on the GPU: the device's later work waits for its
    /// copy back when it was parked (an error if [`LayerInputs::prefetch`] did not start one).
    pub(crate) fn take(&mut self, device: &CudaDevice, l: usize) -> Result<Scratch<'w, f32>> {
        if let Some((stash, slot)) = self.parked.as_ref().and_then(|p| p.slot(l)) {
            let _wait = span(device, "pass: checkpoint copy-back wait");
            stash.await_upload(slot)?;
        }
        self.on_gpu
            .get_mut(l)
            .and_then(Option::take)
            .ok_or_else(|| missing(l))
    }
}

impl Drop for LayerInputs<'_, '_, '_> {
    fn drop(&mut self) {
        // A pass that stopped half-way (an error) may have left copies that no wait orders
        // before the device's later work; afterwards every copy is. Errors here mean the GPU
        // context is broken, which the caller's next call reports.
        if let Some(parked) = &self.parked {
            for stash in &parked.stashes {
                let _ = stash.join();
            }
        }
    }
}

fn missing(l: usize) -> Error {
    Error::invalid(format!(
        "layer {l}'s checkpointed input is not on the GPU when its backward needs it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_but_the_last_gets_a_slot_on_its_stage() {
        let none = [false; 4];
        assert_eq!(
            stash_slots(&[0, 0, 0, 0], &none),
            [Some(0), Some(1), Some(2), None]
        );
        assert_eq!(slots_per_stage(&[0, 0, 0, 0], &none, 1), [3]);
        // Split 0 | 1, 2 | 3 over three stages (the selftest's placement): the last stage holds
        // only the last layer, so it needs no slot.
        assert_eq!(
            stash_slots(&[0, 1, 1, 2], &none),
            [Some(0), Some(0), Some(1), None]
        );
        assert_eq!(slots_per_stage(&[0, 1, 1, 2], &none, 3), [1, 2, 0]);
        assert_eq!(stash_slots(&[0], &[false]), [None]);
        assert_eq!(slots_per_stage(&[0], &[false], 1), [0]);
        assert!(stash_slots(&[], &[]).is_empty());
    }

    #[test]
    fn layers_that_keep_their_tapes_get_no_slot() {
        let kept = [false, false, true, true];
        assert_eq!(
            stash_slots(&[0, 0, 0, 0], &kept),
            [Some(0), Some(1), None, None]
        );
        assert_eq!(slots_per_stage(&[0, 0, 0, 0], &kept, 1), [2]);
        // Each stage of 0 | 1, 2 | 3 keeping its last layer's tape: only layer 1 is parked.
        let kept = [true, false, true, true];
        assert_eq!(
            stash_slots(&[0, 1, 1, 2], &kept),
            [None, Some(0), None, None]
        );
        assert_eq!(slots_per_stage(&[0, 1, 1, 2], &kept, 3), [0, 1, 0]);
        // Every tape kept (no checkpointing): nothing is parked.
        assert_eq!(slots_per_stage(&[0, 0, 0, 0], &[true; 4], 1), [0]);
    }
}
