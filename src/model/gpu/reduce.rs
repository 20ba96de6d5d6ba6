//! Data-parallel gradient sums on the GPU: every adapter's accumulated f32 gradients, summed
//! across ranks in place on the device (one NCCL group), before the optimizer step.

use super::GpuLlama;
use crate::backend::cuda::GpuBuffer;
use crate::dist::GradientReducer;
use crate::error::{Error, Result};

impl GpuLlama<'_> {
    /// As [`crate::model::train_model::TrainModel::reduce_gradients`], on the device: the
    /// gradients of every adapter (A then B, in adapter order) are summed across the ranks of
    /// `reducer`. A rank runs the whole model on one GPU: data parallelism over a layer split
    /// is refused.
    pub fn reduce_gradients(&mut self, reducer: &mut dyn GradientReducer) -> Result<()> {
        if self.stages.len() > 1 {
            return Err(Error::unsupported(
                "data-parallel training runs one GPU per rank; it does not combine with a layer \
                 split (--devices with more than one GPU)",
            ));
        }
        // Gradients the host holds (a pending edit) move to the device first.
        self.sync_adapters()?;
        let device = self.stages[0].device;
        let mut grads: Vec<&mut GpuBuffer<f32>> = self
            .adapters
            .iter_mut()
            .flatten()
            .flatten()
            .flat_map(|a| [&mut a.grad_a, &mut a.grad_b])
            .collect();
        reducer.sum_device_f32(device, &mut grads)
    }
}
