//! The optimizer on the GPU: bitsandbytes' 32-bit AdamW step over f32 parameters, with the
//! moments in device or managed (paged) memory, and the global gradient norm (kernels in
//! `ptx/adamw.cu`; the CPU oracle is [`crate::optim::adamw_step`] and
//! [`crate::optim::global_norm`]).

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
const THREADS: u32 = 256;
/// The most CTAs of the sum-of-squares reduction (each then loops over its share).
const NORM_MAX_CTAS: usize = 1024;

/// Where a parameter tensor's two AdamW moments live.
pub enum AdamMoments<'a> {
    /// Device memory.
    Device {
        /// First moment, one f32 per parameter.
        m: &'a mut GpuBuffer<f32>,
        /// Second moment, one f32 per parameter.
        v: &'a mut GpuBuffer<f32>,
    },
    /// Managed memory the driver may page out to the host (the paged optimizer).
    Managed {
        /// First moment, one f32 per parameter.
        m: &'a mut ManagedBuffer<f32>,
        /// Second moment, one f32 per parameter.
        v: &'a mut ManagedBuffer<f32>,
    },
}

impl AdamMoments<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            AdamMoments::Device { m, v } => (m.len(), v.len()),
            AdamMoments::Managed { m, v } => (m.len(), v.len()),
        }
    }

    fn pointers(&mut self) -> (DevicePointer<f32>, DevicePointer<f32>) {
        match self {
            AdamMoments::Device { m, v } => (m.device_ptr(), v.device_ptr()),
            AdamMoments::Managed { m, v } => (m.device_ptr(), v.device_ptr()),
        }
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

/// Queues one AdamW step over `params` with gradients `grads * grad_scale`; elements with a
/// non-finite scaled gradient are left untouched, as [`crate::optim::adamw_step`] does.
pub fn adamw_step(
    device: &CudaDevice,
    cfg: &AdamWConfig,
    AdamWStep {
        lr,
        step,
        grad_scale,
    }: AdamWStep,
    params: &mut GpuBuffer<f32>,
    grads: &GpuBuffer<f32>,
    mut moments: AdamMoments<'_>,
) -> Result<()> {
    if step == 0 {
        return Err(Error::invalid("AdamW steps count from 1"));
    }
    let n = params.len();
    check_len("AdamW gradients", grads.len(), n)?;
    let (m_len, v_len) = moments.lens();
    check_len("AdamW first moment", m_len, n)?;
    check_len("AdamW second moment", v_len, n)?;
    if n == 0 {
        return Ok(());
    }
    // The same f32 arithmetic as optim::adamw_step.
    let correction1 = 1.0 - cfg.beta1.powf(step as f32);
    let correction2 = (1.0 - cfg.beta2.powf(step as f32)).sqrt();
    let step_size = -lr * correction2 / correction1;
    let eps_scaled = cfg.eps * correction2;
    let decay = 1.0 - lr * cfg.weight_decay;
    let apply_decay = i32::from(cfg.weight_decay > 0.0);
    let (beta1, beta2) = (cfg.beta1, cfg.beta2);
    let grid = grid_dim(n.div_ceil(THREADS as usize), MAX_GRID_X, "AdamW")?;
    let n_i = to_i64(n, "parameter count")?;
    let kernel = device.function(MODULE, "adamw32_step")?;
    let stream = device.stream();
    let (m, v) = moments.pointers();
    let (params, grads) = (params.device_ptr(), grads.device_ptr());
    // SAFETY: the arguments match adamw32_step in ptx/adamw.cu; params, grads, m and v hold n
    // f32 each (checked above; managed memory is addressable from the GPU) and the kernel bounds
    // its index by n.
    unsafe {
        launch!(kernel<<<grid, THREADS, 0, stream>>>(
            params, grads, m, v, n_i, beta1, beta2, eps_scaled, step_size, decay, apply_decay,
            grad_scale
        ))
    }
    .or_device(|| format!("launching the AdamW step ({n} parameters)"))
}

/// The L2 norm of all `grads` together (sums of squares in f32 per thread, f64 across CTAs and
/// tensors). Waits for the GPU.
pub fn global_norm(device: &CudaDevice, grads: &[&GpuBuffer<f32>]) -> Result<f32> {
    let acc = GpuBuffer::<f64>::zeroed(device, "gradient norm accumulator", 1)?;
    let kernel = device.function(MODULE, "sum_squares_f32")?;
    let stream = device.stream();
    for grad in grads.iter().filter(|g| !g.is_empty()) {
        let n = grad.len();
        let ctas = n.div_ceil(THREADS as usize).min(NORM_MAX_CTAS);
        let grid = grid_dim(ctas, MAX_GRID_X, "gradient norm")?;
        let n_i = to_i64(n, "gradient length")?;
        let (x, acc_ptr) = (grad.device_ptr(), acc.device_ptr());
        // SAFETY: the arguments match sum_squares_f32 in ptx/adamw.cu; x holds n f32 and acc one
        // f64; the kernel's grid-stride loop bounds its index by n.
        unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, n_i, acc_ptr)) }
            .or_device(|| format!("launching the gradient norm ({n} values)"))?;
    }
    let sum = acc.to_host(device, "gradient norm")?;
    Ok(sum[0].sqrt() as f32)
}
