//! Whole-sequence passes on the GPU: the training pass over a padded batch of sequences
//! (forward with per-layer checkpoints or tapes, the loss head, backward into the adapters) and
//! the evaluation loss, and [`TrainModel`] for [`GpuLlama`].
//!
//! With checkpointing, the layers a tape budget buys (`PassOptions::tape_budget`,
//! [`crate::model::tape_budget`]) keep their tapes from the forward and skip the recompute;
//! the backward reads what the recompute would have written (the same kernels on the same
//! inputs), so the loss and gradients are the same bit for bit.

use super::checkpoints::{stage_stashes, LayerInputs};
use super::layer::{
    layer_backward, layer_forward, layer_recompute_tape, KvTarget, LayerMasks, LayerTape, Rope,
};
use super::loss::loss_head;
use super::workspace::{Scratch, Workspace};
use super::GpuLlama;
use crate::backend::cuda::elementwise::to_bf16;
use crate::backend::cuda::profile::span;
use crate::backend::cuda::GpuBuffer;
use crate::data::IGNORE_INDEX;
use crate::dist::GradientReducer;
use crate::error::{Error, Result};
use crate::formats::peft::AdapterConfig;
use crate::model::lora::LoraPair;
use crate::model::tape_budget::{layer_tape_bytes, plan_tapes, TapeForm, TapePlan, TapeUse};
use crate::model::train_model::TrainModel;
use crate::model::train_pass::{CheckpointPlace, LossSum, PassOptions};
use crate::model::Llama;
use crate::optim::OptimizerStep;
use crate::rng::Rng;
use std::path::Path;

/// Sequences stacked into one pass: B sequences right-padded to T rows each.
struct PaddedBatch {
    /// (B * T) token ids, padding rows holding token 0.
    ids: Vec<u32>,
    /// (B * T) labels in the loss head's convention (row r's label scores row r - 1): each
    /// sequence's labels, its first one and its padding ignored, so no row is scored against
    /// another sequence's token.
    labels: Vec<i64>,
    batch: usize,
    t: usize,
}

impl PaddedBatch {
    fn new(batch: &[(&[u32], &[i64])]) -> Self {
        let t = batch.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch.len() * t];
        let mut labels = vec![IGNORE_INDEX; batch.len() * t];
        for (s, (seq_ids, seq_labels)) in batch.iter().enumerate() {
            ids[s * t..s * t + seq_ids.len()].copy_from_slice(seq_ids);
            if let Some(scored) = seq_labels.get(1..) {
                labels[s * t + 1..s * t + seq_labels.len()].copy_from_slice(scored);
            }
        }
        PaddedBatch {
            ids,
            labels,
            batch: batch.len(),
            t,
        }
    }
}

impl GpuLlama<'_> {
    /// Runs layer `l` over `x` (`batch` stacked sequences, on the layer's GPU, `ws` its
    /// stage's workspace) with `masks`, returning its output (f32 and bf16) and tape.
    #[allow(clippy::too_many_arguments)]
    fn run_layer<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        x: &GpuBuffer<f32>,
        masks: &LayerMasks<'_>,
        rope: &Rope,
        batch: usize,
    ) -> Result<(Scratch<'w, f32>, Scratch<'w, u16>, LayerTape<'w>)> {
        let xb = self.bf16_input(ws, l, x)?;
        layer_forward(
            self.device_of(l),
            ws,
            &self.host.config,
            &self.layers[l],
            &self.adapters[l],
            masks,
            x,
            xb,
            rope,
            KvTarget::Sequences { batch },
        )
    }

    /// The tape of [`Self::run_layer`] without the layer's output (its recompute before the
    /// backward: [`layer_recompute_tape`]).
    fn recompute_tape<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        x: &GpuBuffer<f32>,
        masks: &LayerMasks<'_>,
        rope: &Rope,
        batch: usize,
    ) -> Result<LayerTape<'w>> {
        let xb = self.bf16_input(ws, l, x)?;
        let (device, c) = (self.device_of(l), &self.host.config);
        let (layer, adapters) = (&self.layers[l], &self.adapters[l]);
        layer_recompute_tape(device, ws, c, layer, adapters, masks, x, xb, rope, batch)
    }

    /// The bf16 copy of layer `l`'s input `x`, which its forward reads beside the f32 stream.
    fn bf16_input<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        x: &GpuBuffer<f32>,
    ) -> Result<Scratch<'w, u16>> {
        let device = self.device_of(l);
        let mut xb = ws.bf16.take(device, "hidden states", x.len())?;
        to_bf16(device, x, &mut xb)?;
        Ok(xb)
    }

    /// As [`Llama::train_sequence`] over each of `batch`'s (ids, labels) in order, in one pass
    /// on the GPU: the sequences are right-padded to the longest and stacked, so every matrix
    /// product runs over all their rows at once. Returns the summed loss and adds `grad_scale x
    /// d(loss)/d(adapter)` to the adapters' gradients; the dropout masks are the ones the CPU
    /// draws for the sequences one after another. Padding rows are never attended to nor
    /// scored, so they add nothing to the loss or the gradients. With the layers split, the
    /// hidden states cross to the next GPU at each boundary, and their gradients cross back.
    pub fn train_batch(
        &mut self,
        batch: &[(&[u32], &[i64])],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        for (ids, labels) in batch {
            self.host.check_sequence(ids, labels)?;
        }
        if batch.is_empty() {
            return Ok(LossSum::default());
        }
        let _whole = span(self.device(), "pass: the whole training pass");
        self.sync_adapters()?;
        let padded = PaddedBatch::new(batch);
        let (b, t) = (padded.batch, padded.t);
        let hidden_len = b * t * self.host.config.hidden_size;
        let TapePlan { kept, form, .. } = self.plan_tapes(b * t, opts);
        let parked = opts.gradient_checkpointing && opts.checkpoints == CheckpointPlace::Host;
        if parked {
            self.reserve_stashes(hidden_len, &kept)?;
        }
        let wss = self.begin_pass(b * t);
        let keys = self.dropout_keys(b, opts.lora_dropout, rng)?;
        let masks_of = |model: &Self, l: usize| {
            let ws = &wss[model.layer_stage[l]];
            model.layer_masks(ws, l, keys.as_ref(), (b, t), opts.lora_dropout)
        };
        let ropes = self.rope(0, t, b)?;
        let mut stage = self.first_stage();
        let (mut x, _token_ids) = self.embed(&wss[stage], &padded.ids)?;
        // Forward: a layer in `kept` keeps its tape (every layer without checkpointing); any
        // other keeps its input (f32), on the GPU or parked on the host (see `checkpoints`),
        // for its recompute. The masks are remade from their keys where the backward needs
        // them.
        let n_layers = self.layers.len();
        let mut inputs = if parked {
            LayerInputs::on_host(stage_stashes(&self.stages)?, &self.layer_stage, &kept)
        } else {
            LayerInputs::on_gpu(n_layers)
        };
        let mut tapes: Vec<Option<LayerTape>> = (0..n_layers).map(|_| None).collect();
        for l in 0..n_layers {
            let s = self.layer_stage[l];
            if let Some(moved) = self.carry(&wss[s].f32, &x, (stage, s), "hidden states")? {
                (x, stage) = (moved, s);
            }
            let masks = masks_of(self, l)?;
            if !kept[l] {
                inputs.forward_starts(l, &x)?;
            }
            let forward = span(self.device_of(l), "pass: layer forward");
            let (y, _, tape) = self.run_layer(&wss[s], l, &x, &masks, &ropes[s], b)?;
            drop(forward);
            let input = std::mem::replace(&mut x, y);
            if kept[l] {
                // The tape holds what the backward reads (the input's bf16 copy among it): the
                // f32 input goes back to its pool, the tape's buffers stay out of theirs until
                // the layer's backward (a slim tape's three remade ones go back now).
                tapes[l] = Some(match form {
                    TapeForm::Whole => tape,
                    TapeForm::Slim => tape.slim(),
                });
                drop(input);
            } else {
                inputs.forward_done(self.device_of(l), l, input)?;
            }
        }
        let head_ws = &wss[self.head_stage()];
        let head = span(self.stages[self.head_stage()].device, "pass: loss head");
        let (loss, grad) = loss_head(
            self.stages[self.head_stage()].device,
            head_ws,
            &self.host.config,
            &self.head,
            &x,
            &padded.labels,
            Some(grad_scale),
        )?;
        drop((x, head));
        let grad = grad.ok_or_else(|| {
            Error::invalid("the loss head returned no gradient for a training pass")
        })?;
        let (mut dres, mut dyb) = (grad.dres, grad.dxb);
        self.grads_pending = true;
        for l in (0..n_layers).rev() {
            let s = self.layer_stage[l];
            if let Some(moved) = self.carry(&wss[s].f32, &dres, (stage, s), "gradients")? {
                dres = moved;
                dyb = self
                    .carry(&wss[s].bf16, &dyb, (stage, s), "gradients")?
                    .ok_or_else(|| Error::invalid("a stage boundary moved one gradient of two"))?;
                stage = s;
            }
            let masks = masks_of(self, l)?;
            // The next layer down's input, when it is parked, starts on its way back while this
            // layer runs (recomputed or not).
            if let Some(below) = l.checked_sub(1) {
                let pool = &wss[self.layer_stage[below]].f32;
                inputs.prefetch(self.device_of(below), pool, below, hidden_len)?;
            }
            let tape = match tapes[l].take() {
                Some(tape) => tape,
                None => {
                    let input = inputs.take(self.device_of(l), l)?;
                    let _recompute = span(self.device_of(l), "pass: layer recompute");
                    self.recompute_tape(&wss[s], l, &input, &masks, &ropes[s], b)?
                }
            };
            let _backward = span(self.device_of(l), "pass: layer backward");
            dyb = layer_backward(
                self.device_of(l),
                &wss[s],
                &self.host.config,
                &self.layers[l],
                &mut self.adapters[l],
                &masks,
                &tape,
                &ropes[s],
                b,
                &mut dres,
                &dyb,
            )?;
        }
        Ok(loss)
    }

    /// Per layer, whether a training pass over `rows` rows with `opts` keeps its tape from the
    /// forward, and in which form: every layer, whole, without checkpointing; else the last
    /// layers of each stage whose tapes fit `opts.tape_budget`, slim where that buys more of
    /// them ([`plan_tapes`]). Records what they hold for [`TrainModel::tapes_kept`].
    fn plan_tapes(&mut self, rows: usize, opts: PassOptions) -> TapePlan {
        let bytes = |form| -> Vec<usize> {
            self.adapters
                .iter()
                .map(|adapters| {
                    let ranks: Vec<usize> = adapters.iter().flatten().map(|a| a.rank).collect();
                    layer_tape_bytes(&self.host.config, rows, &ranks, form)
                })
                .collect()
        };
        let whole = bytes(TapeForm::Whole);
        let plan = if opts.gradient_checkpointing {
            plan_tapes(
                &whole,
                &bytes(TapeForm::Slim),
                &self.layer_stage,
                opts.tape_budget,
            )
        } else {
            let kept = vec![true; whole.len()];
            let used = TapeUse::of(&kept, &whole);
            TapePlan {
                kept,
                form: TapeForm::Whole,
                used,
            }
        };
        self.tapes_kept = plan.used;
        plan
    }

    /// As [`Llama::sequence_loss`], on the GPU: the summed loss without gradients or dropout.
    pub fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        self.host.check_sequence(ids, labels)?;
        self.sync_adapters()?;
        let wss = self.begin_pass(ids.len());
        let ropes = self.rope(0, ids.len(), 1)?;
        let mut stage = self.first_stage();
        let (mut x, _token_ids) = self.embed(&wss[stage], ids)?;
        let no_masks: LayerMasks = [(); 7].map(|_| None);
        for l in 0..self.layers.len() {
            let s = self.layer_stage[l];
            if let Some(moved) = self.carry(&wss[s].f32, &x, (stage, s), "hidden states")? {
                (x, stage) = (moved, s);
            }
            x = self.run_layer(&wss[s], l, &x, &no_masks, &ropes[s], 1)?.0;
        }
        let (loss, _) = loss_head(
            self.stages[self.head_stage()].device,
            &wss[self.head_stage()],
            &self.host.config,
            &self.head,
            &x,
            labels,
            None,
        )?;
        Ok(loss)
    }
}

impl TrainModel for GpuLlama<'_> {
    fn llama(&self) -> &Llama {
        &self.host
    }

    fn adapters_mut(&mut self) -> Result<Vec<&mut LoraPair>> {
        self.sync_host()?;
        self.flush_grads()?;
        self.adapters_stale = true;
        Ok(self.host.adapters_mut())
    }

    fn attach_adapter(&mut self, dir: &Path) -> Result<AdapterConfig> {
        self.sync_host()?;
        self.flush_grads()?;
        self.adapters_stale = true;
        self.host.attach_adapter(dir)
    }

    fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        GpuLlama::train_batch(self, &[(ids, labels)], grad_scale, opts, rng)
    }

    fn train_batch(
        &mut self,
        batch: &[(&[u32], &[i64])],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        GpuLlama::train_batch(self, batch, grad_scale, opts, rng)
    }

    fn reduce_gradients(&mut self, reducer: &mut dyn GradientReducer) -> Result<()> {
        GpuLlama::reduce_gradients(self, reducer)
    }

    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        GpuLlama::sequence_loss(self, ids, labels)
    }

    fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32> {
        GpuLlama::optimizer_step(self, opt)
    }

    fn sync_host(&mut self) -> Result<()> {
        GpuLlama::sync_host(self)
    }

    fn device_name(&self) -> String {
        match self.stages.len() {
            1 => format!("cuda ({})", self.device().name()),
            n => format!(
                "cuda ({} GPUs, layers {})",
                n,
                self.placement()
                    .iter()
                    .map(|(name, layers)| format!("{}-{} on {name}", layers.start, layers.end - 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn device_memory_in_use(&self) -> Result<Option<usize>> {
        self.memory_in_use().map(Some)
    }

    fn tapes_kept(&self) -> Option<TapeUse> {
        Some(self.tapes_kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_batches_keep_each_label_within_its_sequence() {
        let (ids_a, labels_a) = ([1u32, 2, 3], [IGNORE_INDEX, 5, 6]);
        let (ids_b, labels_b) = ([7u32, 8], [9i64, 10]);
        let padded = PaddedBatch::new(&[(&ids_a, &labels_a), (&ids_b, &labels_b)]);
        assert_eq!((padded.batch, padded.t), (2, 3));
        assert_eq!(padded.ids, [1, 2, 3, 7, 8, 0]);
        // Row r's label scores row r - 1: sequence b's first label (9) would score sequence a's
        // last row, so it is dropped, as the one-sequence pass never scores a first label.
        let i = IGNORE_INDEX;
        assert_eq!(padded.labels, [i, 5, 6, i, 10, i]);
    }
}
