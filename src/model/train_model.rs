//! [`TrainModel`]: what the trainer asks of a model, so that one training loop drives the CPU
//! oracle ([`Llama`]) or its copy on a GPU alike. On the CPU the LoRA master weights, their
//! gradients and the AdamW moments live in the host adapters; on a GPU they live on the device
//! and the host adapters are brought up to date on request ([`TrainModel::sync_host`]).

use crate::dist::GradientReducer;
use crate::error::{Error, Result};
use crate::formats::peft::AdapterConfig;
use crate::model::llama::Llama;
use crate::model::lora::LoraPair;
use crate::model::tape_budget::TapeUse;
use crate::model::train_pass::{LossSum, PassOptions};
use crate::optim::{adamw_step, clip_coefficient, global_norm, OptimizerStep};
use crate::rng::Rng;
use std::path::Path;

/// A decoder with LoRA adapters that can run training passes.
pub trait TrainModel {
    /// The host model: configuration, the adapters' master weights, sequence checks.
    fn llama(&self) -> &Llama;

    /// Every adapter, mutably, in the order of [`Llama::adapters`], with every gradient
    /// computed so far added into `grad_a`/`grad_b`. A device copy of the factors is refreshed
    /// before the next pass.
    fn adapters_mut(&mut self) -> Result<Vec<&mut LoraPair>>;

    /// Loads a PEFT adapter folder onto the model (as [`Llama::attach_adapter`]).
    fn attach_adapter(&mut self, dir: &Path) -> Result<AdapterConfig>;

    /// Forward and backward over one sequence, as [`Llama::train_sequence`]: returns the summed
    /// loss and adds `grad_scale x d(loss)/d(adapter)` to the adapters' gradients (which
    /// [`TrainModel::adapters_mut`] shows). Dropout masks are drawn from `rng` in the CPU's
    /// order, so both backends see the same masks.
    fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum>;

    /// [`TrainModel::train_sequence`] over each of `batch`'s (ids, labels) in order, with the
    /// same results (a GPU runs them as one padded batch). Returns the summed loss.
    fn train_batch(
        &mut self,
        batch: &[(&[u32], &[i64])],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        let mut total = LossSum::default();
        for (ids, labels) in batch {
            let loss = self.train_sequence(ids, labels, grad_scale, opts, rng)?;
            total.nll += loss.nll;
            total.tokens += loss.tokens;
        }
        Ok(total)
    }

    /// Advances `rng` past the dropout keys that training `sequences` sequences with `opts`
    /// would draw, computing nothing: one key per sequence, layer and attached adapter when
    /// dropout is on (the order [`Llama::train_sequence`] and the GPU draw them in), none
    /// without dropout. A data-parallel rank skips the other ranks' sequences with it, so every
    /// sequence gets the masks a one-process run gives it.
    fn skip_dropout_draws(&self, sequences: usize, opts: PassOptions, rng: &mut Rng) {
        if opts.lora_dropout <= 0.0 {
            return;
        }
        let per_sequence = self.llama().adapters().len();
        for _ in 0..sequences * per_sequence {
            rng.next_u64();
        }
    }

    /// Sums every adapter's accumulated gradients across the ranks of `reducer`, in place, so
    /// each rank holds the gradient of the whole global batch.
    fn reduce_gradients(&mut self, reducer: &mut dyn GradientReducer) -> Result<()>;

    /// The summed loss of one sequence, without gradients or dropout.
    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum>;

    /// One optimizer step over every adapter: the global gradient norm, clipping to
    /// `opt.max_grad_norm`, bitsandbytes' 32-bit AdamW, and zeroed gradients. Returns the norm
    /// before clipping; a non-finite norm is an error and leaves the adapters unchanged.
    fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32>;

    /// Brings the host adapters' factors and moments (what [`TrainModel::llama`] shows) up to
    /// date with the device's; nothing to do on the CPU.
    fn sync_host(&mut self) -> Result<()>;

    /// Where it computes: "cpu" or "cuda (<GPU name>)".
    fn device_name(&self) -> String;

    /// Device memory in use (total minus free, as the driver reports it), in bytes; `None` on
    /// the CPU.
    fn device_memory_in_use(&self) -> Result<Option<usize>>;

    /// The layers whose tapes the last training pass kept from its forward (every layer
    /// without checkpointing, those `PassOptions::tape_budget` bought with it) and the bytes
    /// the tapes held; `None` on the CPU.
    fn tapes_kept(&self) -> Option<TapeUse> {
        None
    }
}

impl TrainModel for Llama {
    fn llama(&self) -> &Llama {
        self
    }

    fn adapters_mut(&mut self) -> Result<Vec<&mut LoraPair>> {
        Ok(Llama::adapters_mut(self))
    }

    fn attach_adapter(&mut self, dir: &Path) -> Result<AdapterConfig> {
        Llama::attach_adapter(self, dir)
    }

    fn train_sequence(
        &mut self,
        ids: &[u32],
        labels: &[i64],
        grad_scale: f32,
        opts: PassOptions,
        rng: &mut Rng,
    ) -> Result<LossSum> {
        Llama::train_sequence(self, ids, labels, grad_scale, opts, rng)
    }

    fn reduce_gradients(&mut self, reducer: &mut dyn GradientReducer) -> Result<()> {
        let mut pairs = Llama::adapters_mut(self);
        let mut flat: Vec<f32> = Vec::new();
        for pair in &pairs {
            flat.extend_from_slice(&pair.grad_a);
            flat.extend_from_slice(&pair.grad_b);
        }
        reducer.sum_f32(&mut flat)?;
        let mut rest = &flat[..];
        for pair in pairs.iter_mut() {
            for grad in [&mut pair.grad_a, &mut pair.grad_b] {
                let (mine, tail) = rest.split_at(grad.len());
                grad.copy_from_slice(mine);
                rest = tail;
            }
        }
        Ok(())
    }

    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        Llama::sequence_loss(self, ids, labels)
    }

    fn optimizer_step(&mut self, opt: &OptimizerStep) -> Result<f32> {
        host_optimizer_step(Llama::adapters_mut(self), opt)
    }

    fn sync_host(&mut self) -> Result<()> {
        Ok(())
    }

    fn device_name(&self) -> String {
        "cpu".to_string()
    }

    fn device_memory_in_use(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}

/// [`TrainModel::optimizer_step`] over host adapters.
fn host_optimizer_step(mut pairs: Vec<&mut LoraPair>, opt: &OptimizerStep) -> Result<f32> {
    let mut grads: Vec<&mut [f32]> = Vec::with_capacity(pairs.len() * 2);
    for pair in pairs.iter_mut() {
        grads.push(&mut pair.grad_a[..]);
        grads.push(&mut pair.grad_b[..]);
    }
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    if !norm.is_finite() {
        return Err(Error::invalid(format!(
            "the gradient norm became {norm} at step {}; stopping",
            opt.step
        )));
    }
    if let Some(coef) = clip_coefficient(norm, opt.max_grad_norm) {
        grads
            .iter_mut()
            .flat_map(|g| g.iter_mut())
            .for_each(|x| *x *= coef);
    }
    for pair in pairs {
        let [ma, mb] = &mut pair.moments;
        adamw_step(&opt.adamw, opt.lr, opt.step, &mut pair.a, &pair.grad_a, ma);
        adamw_step(&opt.adamw, opt.lr, opt.step, &mut pair.b, &pair.grad_b, mb);
        pair.zero_grad();
    }
    Ok(norm)
}
