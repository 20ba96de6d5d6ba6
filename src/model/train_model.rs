//! [`TrainModel`]: what the trainer asks of a model, so that one training loop drives the CPU
//! oracle ([`Llama`]) or its copy on a GPU alike. The LoRA master weights, their gradients and
//! the optimizer live on the host in both cases.

use crate::error::Result;
use crate::formats::peft::AdapterConfig;
use crate::model::llama::Llama;
use crate::model::lora::LoraPair;
use crate::model::train_pass::{LossSum, PassOptions};
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

    /// The summed loss of one sequence, without gradients or dropout.
    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum>;

    /// Where it computes: "cpu" or "cuda (<GPU name>)".
    fn device_name(&self) -> String;

    /// Device memory in use (total minus free, as the driver reports it), in bytes; `None` on
    /// the CPU.
    fn device_memory_in_use(&self) -> Result<Option<usize>>;
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

    fn sequence_loss(&mut self, ids: &[u32], labels: &[i64]) -> Result<LossSum> {
        Llama::sequence_loss(self, ids, labels)
    }

    fn device_name(&self) -> String {
        "cpu".to_string()
    }

    fn device_memory_in_use(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}
