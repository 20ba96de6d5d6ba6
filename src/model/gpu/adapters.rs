//! LoRA adapters on the GPU: the f32 master factors (updated on the device by the optimizer),
//! bf16 copies of them for the products, refreshed after every optimizer step, and f32 gradient
//! accumulators.

use crate::backend::cuda::elementwise::{to_bf16, upload_into, zero_f32};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::model::lora::LoraPair;
use rayon::prelude::*;

/// One adapter's device state. A (r, in), B (out, r) as on the host.
pub(crate) struct GpuAdapter {
    pub(crate) rank: usize,
    pub(crate) in_features: usize,
    pub(crate) out_features: usize,
    pub(crate) scale: f32,
    pub(crate) a_f32: GpuBuffer<f32>,  // (r, in) master
    pub(crate) b_f32: GpuBuffer<f32>,  // (out, r) master
    pub(crate) a: GpuBuffer<u16>,      // (r, in) bf16
    pub(crate) b: GpuBuffer<u16>,      // (out, r) bf16
    pub(crate) grad_a: GpuBuffer<f32>, // (r, in) accumulated over the step's sequences
    pub(crate) grad_b: GpuBuffer<f32>, // (out, r)
}

impl GpuAdapter {
    /// Device buffers for `pair`'s shape, with its factors and gradients.
    pub(crate) fn new(device: &CudaDevice, pair: &LoraPair) -> Result<Self> {
        let (r, din, dout) = (pair.rank, pair.in_features, pair.out_features);
        let bf16 = |what: &str, len: usize| GpuBuffer::<u16>::zeroed(device, what, len);
        let f32 = |what: &str, len: usize| GpuBuffer::<f32>::zeroed(device, what, len);
        let mut adapter = GpuAdapter {
            rank: r,
            in_features: din,
            out_features: dout,
            scale: pair.scale,
            a_f32: f32("LoRA A", r * din)?,
            b_f32: f32("LoRA B", dout * r)?,
            a: bf16("LoRA A", r * din)?,
            b: bf16("LoRA B", dout * r)?,
            grad_a: f32("LoRA A gradient", r * din)?,
            grad_b: f32("LoRA B gradient", dout * r)?,
        };
        adapter.upload_factors(device, pair)?;
        Ok(adapter)
    }

    /// True when the device buffers have `pair`'s shape and scale.
    pub(crate) fn fits(&self, pair: &LoraPair) -> bool {
        (self.rank, self.in_features, self.out_features)
            == (pair.rank, pair.in_features, pair.out_features)
            && self.scale == pair.scale
    }

    /// Copies the host factors and gradients in and rebuilds the bf16 copies and transposes.
    pub(crate) fn upload_factors(&mut self, device: &CudaDevice, pair: &LoraPair) -> Result<()> {
        upload_into(&mut self.a_f32, &pair.a, "LoRA A")?;
        upload_into(&mut self.b_f32, &pair.b, "LoRA B")?;
        upload_into(&mut self.grad_a, &pair.grad_a, "LoRA A gradient")?;
        upload_into(&mut self.grad_b, &pair.grad_b, "LoRA B gradient")?;
        self.refresh_bf16(device)
    }

    /// Rebuilds the bf16 copies from the f32 masters.
    pub(crate) fn refresh_bf16(&mut self, device: &CudaDevice) -> Result<()> {
        to_bf16(device, &self.a_f32, &mut self.a)?;
        to_bf16(device, &self.b_f32, &mut self.b)
    }

    /// Copies the f32 masters into the host's factors.
    pub(crate) fn download_factors(&self, device: &CudaDevice, pair: &mut LoraPair) -> Result<()> {
        pair.a = self.a_f32.to_host(device, "LoRA A")?;
        pair.b = self.b_f32.to_host(device, "LoRA B")?;
        Ok(())
    }

    /// Zeroes the gradient accumulators.
    pub(crate) fn zero_grads(&mut self, device: &CudaDevice) -> Result<()> {
        zero_f32(device, &mut self.grad_a)?;
        zero_f32(device, &mut self.grad_b)
    }

    /// Adds the accumulated gradients into the host's `grad_a`/`grad_b` and zeroes them here.
    pub(crate) fn flush_grads(&mut self, device: &CudaDevice, pair: &mut LoraPair) -> Result<()> {
        let grad_a = self.grad_a.to_host(device, "LoRA A gradient")?;
        let grad_b = self.grad_b.to_host(device, "LoRA B gradient")?;
        pair.grad_a
            .par_iter_mut()
            .zip(&grad_a)
            .for_each(|(g, d)| *g += d);
        pair.grad_b
            .par_iter_mut()
            .zip(&grad_b)
            .for_each(|(g, d)| *g += d);
        self.zero_grads(device)
    }
}
