//! Data-parallel gradient sums on the GPU: every adapter's accumulated f32 gradients, summed
//! across ranks in place on the device (one NCCL group), before the optimizer step.

use super::GpuLlama;
use crate::backend::cuda::GpuBuffer;
use crate::dist::GradientReducer;
use crate::error::Result;

impl GpuLlama<'_> {
    /// As [`crate::model::train_model::TrainModel::reduce_gradients`], on the device: the
    /// gradients of every adapter (A then B, in adapter order) are summed across the ranks of
    /// `reducer`.
    pub fn reduce_gradients(&mut self, reducer: &mut dyn GradientReducer) -> Result<()> {
        // Gradients the host holds (a pending edit) move to the device first.
        self.sync_adapters()?;
        let device = self.device;
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
