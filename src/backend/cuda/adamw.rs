//! The optimizer on the GPU: bitsandbytes' 32-bit AdamW step over f32 parameters, with the
//! moments in device or managed (paged) memory, and the global gradient norm (kernels in
//! `ptx/adamw.cu`; the CPU oracle is [`crate::optim::adamw_step`] and
//! [`crate::optim::global_norm`]). [`adamw_step`] updates one tensor; the training step updates
//! all of a GPU's tensors at once through [`super::adamw_multi`], with the same arithmetic.

use super::adamw_multi::TensorTable;
use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::managed::ManagedBuffer;
use crate::error::{Error, Result};
use crate::optim::AdamWConfig;
use cust::launch;
use cust::memory::DevicePointer;

const MODULE: &str = "adamw";
/// Threads per CTA (`OPT_THREADS` in ptx/adamw.cu).
pub(super) const THREADS: u32 = 256;

/// Where the moments live.
enum MomentStorage {
    /// Device memory (`--optim adamw_32bit`).
    Device(GpuBuffer<f32>),
    /// Managed memory the driver may page out to the host (`--optim paged_adamw_32bit`).
    Managed(ManagedBuffer<f32>),
}

/// The two AdamW moments of many parameter tensors in one allocation: the first moments of
/// all `params` values, then the second moments. A tensor is addressed by its offset in the
/// flat parameter order, so one prefetch moves the whole optimizer state.
pub struct MomentArena {
    storage: MomentStorage,
    params: usize,
}

impl MomentArena {
    /// Zeroed moments for `params` values, in managed memory when `paged`, else in device
    /// memory.
    pub fn new(device: &CudaDevice, params: usize, paged: bool) -> Result<Self> {
        let len = params
            .checked_mul(2)
            .ok_or_else(|| Error::invalid("AdamW moments: too many parameters"))?;
        let storage = if paged {
            MomentStorage::Managed(ManagedBuffer::new(device, "AdamW moments (paged)", len)?)
        } else {
            MomentStorage::Device(GpuBuffer::zeroed(device, "AdamW moments", len)?)
        };
        Ok(MomentArena { storage, params })
    }

    /// True when the moments are in managed (pageable) memory.
    pub fn is_paged(&self) -> bool {
        matches!(self.storage, MomentStorage::Managed(_))
    }

    /// Queues a migration of paged moments to the GPU (nothing for device memory): the
    /// paged optimizer's prefetch before each step.
    pub fn prefetch_to_device(&self, device: &CudaDevice) -> Result<()> {
        match &self.storage {
            MomentStorage::Device(_) => Ok(()),
            MomentStorage::Managed(buffer) => buffer.prefetch_to_device(device),
        }
    }

    /// The (first, second) moments of the `len` values at `offset`, copied to the host (this
    /// waits for queued work).
    pub fn read(
        &self,
        device: &CudaDevice,
        offset: usize,
        len: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_range(offset, len)?;
        let (m, v) = (
            offset..offset + len,
            self.params + offset..self.params + offset + len,
        );
        match &self.storage {
            MomentStorage::Device(buffer) => Ok((
                buffer.range_to_host(device, m, "AdamW first moment")?,
                buffer.range_to_host(device, v, "AdamW second moment")?,
            )),
            MomentStorage::Managed(buffer) => {
                let all = buffer.host_slice(device)?;
                Ok((all[m].to_vec(), all[v].to_vec()))
            }
        }
    }

    /// Overwrites the moments of the `m.len()` values at `offset` (`v` as long).
    pub fn write(
        &mut self,
        device: &CudaDevice,
        offset: usize,
        m: &[f32],
        v: &[f32],
    ) -> Result<()> {
        check_len("AdamW second moment", v.len(), m.len())?;
        self.check_range(offset, m.len())?;
        let v_offset = self.params + offset;
        match &mut self.storage {
            MomentStorage::Device(buffer) => {
                buffer.range_from_host(offset, m, "AdamW first moment")?;
                buffer.range_from_host(v_offset, v, "AdamW second moment")
            }
            MomentStorage::Managed(buffer) => {
                let all = buffer.host_slice_mut(device)?;
                all[offset..offset + m.len()].copy_from_slice(m);
                all[v_offset..v_offset + v.len()].copy_from_slice(v);
                Ok(())
            }
        }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.params => Ok(()),
            _ => Err(Error::invalid(format!(
                "AdamW moments: values {offset}..{offset}+{len} are outside the {} held",
                self.params
            ))),
        }
    }

    /// Device addresses of the first and second moments of the `len` values at `offset`.
    pub(super) fn pointers(
        &mut self,
        offset: usize,
        len: usize,
    ) -> Result<(DevicePointer<f32>, DevicePointer<f32>)> {
        self.check_range(offset, len)?;
        let base = match &mut self.storage {
            MomentStorage::Device(buffer) => buffer.device_ptr(),
            MomentStorage::Managed(buffer) => buffer.device_ptr(),
        };
        // offset + len <= params and the allocation holds 2 * params values, so both ranges
        // stay inside it.
        Ok((
            base.wrapping_add(offset),
            base.wrapping_add(self.params + offset),
        ))
    }
}

/// What changes from one optimizer step to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// Step number, counting from 1.
    pub step: u64,
    /// Multiplier of the gradients: the clipping coefficient, or 1.
    pub grad_scale: f32,
}

/// The scalar arguments of the AdamW kernels for one step: computed once on the host, in f32
/// as [`crate::optim::adamw_step`] does, and passed alike to the per-tensor and the
/// multi-tensor kernel (so both do the same arithmetic).
#[derive(Clone, Copy, Debug)]
pub(super) struct StepConstants {
    pub(super) beta1: f32,
    pub(super) beta2: f32,
    /// `eps * sqrt(1 - beta2^t)`.
    pub(super) eps_scaled: f32,
    /// `-lr * sqrt(1 - beta2^t) / (1 - beta1^t)`.
    pub(super) step_size: f32,
    /// `1 - lr * weight_decay`.
    pub(super) decay: f32,
    /// 1 when the weight decay is positive.
    pub(super) apply_decay: i32,
    pub(super) grad_scale: f32,
}

impl StepConstants {
    /// The constants of `step` under `cfg`; an error for step 0 (steps count from 1).
    pub(super) fn new(cfg: &AdamWConfig, step: AdamWStep) -> Result<Self> {
        if step.step == 0 {
            return Err(Error::invalid("AdamW steps count from 1"));
        }
        // The same f32 arithmetic as optim::adamw_step.
        let t = step.step as f32;
        let correction1 = 1.0 - cfg.beta1.powf(t);
        let correction2 = (1.0 - cfg.beta2.powf(t)).sqrt();
        Ok(StepConstants {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps_scaled: cfg.eps * correction2,
            step_size: -step.lr * correction2 / correction1,
            decay: 1.0 - step.lr * cfg.weight_decay,
            apply_decay: i32::from(cfg.weight_decay > 0.0),
            grad_scale: step.grad_scale,
        })
    }
}

/// Queues one AdamW step over `params` with gradients `grads * grad_scale` and the moments at
/// `offset` in `moments`; elements with a non-finite scaled gradient are left untouched, as
/// [`crate::optim::adamw_step`] does.
pub fn adamw_step(
    device: &CudaDevice,
    cfg: &AdamWConfig,
    step: AdamWStep,
    params: &mut GpuBuffer<f32>,
    grads: &GpuBuffer<f32>,
    moments: &mut MomentArena,
    offset: usize,
) -> Result<()> {
    let n = params.len();
    check_len("AdamW gradients", grads.len(), n)?;
    let k = StepConstants::new(cfg, step)?;
    if n == 0 {
        return Ok(());
    }
    let (m, v) = moments.pointers(offset, n)?;
    let grid = grid_dim(n.div_ceil(THREADS as usize), MAX_GRID_X, "AdamW")?;
    let n_i = to_i64(n, "parameter count")?;
    let kernel = device.function(MODULE, "adamw32_step")?;
    let stream = device.stream();
    let (params, grads) = (params.device_ptr(), grads.device_ptr());
    // SAFETY: the arguments match adamw32_step in ptx/adamw.cu; params, grads, m and v hold n
    // f32 each (checked above and by MomentArena::pointers; managed memory is addressable from
    // the GPU) and the kernel bounds its index by n.
    unsafe {
        launch!(kernel<<<grid, THREADS, 0, stream>>>(
            params, grads, m, v, n_i, k.beta1, k.beta2, k.eps_scaled, k.step_size,
            k.decay, k.apply_decay, k.grad_scale
        ))
    }
    .or_device(|| format!("launching the AdamW step ({n} parameters)"))
}

/// The L2 norm of all `grads` together (f64 sums of squares, in the same order on every run:
/// [`sum_of_squares`]). Waits for the GPU.
pub fn global_norm(device: &CudaDevice, grads: &[&GpuBuffer<f32>]) -> Result<f32> {
    Ok(sum_of_squares(device, grads)?.sqrt() as f32)
}

/// The sum of the squares of all `grads` in f64, the same on every run (no atomics; see
/// [`TensorTable::sum_of_squares`], here with a table made for this one call): the norm's
/// partial sum on one GPU, for a model split over several. Waits for the GPU.
pub fn sum_of_squares(device: &CudaDevice, grads: &[&GpuBuffer<f32>]) -> Result<f64> {
    TensorTable::new().sum_of_squares(device, grads)
}
