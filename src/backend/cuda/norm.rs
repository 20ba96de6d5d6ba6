//! RMSNorm on the GPU: forward and backward over bf16 rows with an f32 weight, and the forward
//! fused with the residual add before it (kernels in `ptx/norm.cu`; the CPU oracle is [`crate::backend::cpu::rmsnorm_forward`] and
//! [`crate::backend::cpu_backward::rmsnorm_backward`]).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, rows_of, to_i64, MAX_GRID_X};
use super::pdl::{launch_step, step_kernel};
use crate::error::Result;
use cust::launch;

const MODULE: &str = "norm";
/// Threads per CTA (`NORM_THREADS` in ptx/norm.cu).
const THREADS: u32 = 256;
/// bf16 elements in one 16-byte vector (`BF16_PER_VEC` in ptx/vec8.cuh).
const BF16_PER_VEC: usize = 8;
/// The widest rows the forward and the backward stage in shared memory (one bf16 row forward,
/// x and dy backward: 32 KiB each, under the 48 KiB a launch may ask for without an opt-in).
const FORWARD_STAGED_WIDTH: usize = 16384;
const BACKWARD_STAGED_WIDTH: usize = 8192;

/// Dynamic shared memory for the vector path of a kernel that stages `rows_staged` bf16 rows of
/// `width`: none when the width is not a whole number of 16-byte vectors or is wider than
/// `max_width` (the kernel then takes its element path, which needs none).
fn staged_bytes(width: usize, rows_staged: usize, max_width: usize) -> u32 {
    if width % BF16_PER_VEC == 0 && width <= max_width {
        // width * rows_staged * 2 <= 32 KiB fits a u32.
        (width * rows_staged * 2) as u32
    } else {
        0
    }
}

/// Queues `out (rows, C) bf16 = weight * x / sqrt(mean(x²) + eps)` for `x (rows, C)` bf16 and
/// `weight (C)` f32.
pub fn rmsnorm_forward(
    device: &CudaDevice,
    out: &mut GpuBuffer<u16>,
    x: &GpuBuffer<u16>,
    weight: &GpuBuffer<f32>,
    eps: f32,
) -> Result<()> {
    let width = weight.len();
    let rows = rows_of("rmsnorm input", x.len(), width)?;
    check_len("rmsnorm output", out.len(), x.len())?;
    let grid = grid_dim(rows, MAX_GRID_X, "rmsnorm")?;
    let (rows_i, width_i) = (to_i64(rows, "rows")?, to_i64(width, "width")?);
    // A decode step's final norm: with PDL while a step's launches are on.
    let kernel = step_kernel(device, MODULE, "rmsnorm_forward_bf16")?;
    let smem = staged_bytes(width, 1, FORWARD_STAGED_WIDTH);
    let (x, weight, out) = (x.device_ptr(), weight.device_ptr(), out.device_ptr());
    // SAFETY: the arguments match rmsnorm_forward_bf16 in ptx/norm.cu; x and out hold
    // rows * width elements and weight width (checked above); one CTA per row; the kernel takes
    // its vector path only when the width, the pointers' alignment and the dynamic shared
    // memory given here (one row of bf16, or none) allow it.
    unsafe {
        launch_step!(
            kernel<<<grid, THREADS, smem>>>(x, weight, rows_i, width_i, eps, out),
            || format!("launching rmsnorm forward ({rows} x {width})")
        )
    }
}

/// Queues, in one kernel, a block's residual add and the next norm: `y (rows, C) f32 = x +
/// proj`, `y_bf16 = bf16(y)` and `out = rmsnorm(y_bf16)` (as [`rmsnorm_forward`] computes it),
/// for `x (rows, C)` f32, `proj (rows, C)` bf16 and `weight (C)` f32. Bit for bit the results of
/// copying x into y, [`super::elementwise::residual_add`] and [`rmsnorm_forward`].
pub fn residual_rmsnorm(
    device: &CudaDevice,
    x: &GpuBuffer<f32>,
    proj: &GpuBuffer<u16>,
    weight: &GpuBuffer<f32>,
    eps: f32,
    (y, y_bf16, out): (
        &mut GpuBuffer<f32>,
        &mut GpuBuffer<u16>,
        &mut GpuBuffer<u16>,
    ),
) -> Result<()> {
    let width = weight.len();
    let rows = rows_of("residual + rmsnorm input", x.len(), width)?;
    check_len("residual + rmsnorm projection", proj.len(), x.len())?;
    check_len("residual + rmsnorm residual output", y.len(), x.len())?;
    check_len("residual + rmsnorm bf16 residual", y_bf16.len(), x.len())?;
    check_len("residual + rmsnorm output", out.len(), x.len())?;
    let grid = grid_dim(rows, MAX_GRID_X, "residual + rmsnorm")?;
    let (rows_i, width_i) = (to_i64(rows, "rows")?, to_i64(width, "width")?);
    let kernel = device.function(MODULE, "residual_rmsnorm_bf16")?;
    let stream = device.stream();
    let (x, proj, weight) = (x.device_ptr(), proj.device_ptr(), weight.device_ptr());
    let (y, y_bf16, out) = (y.device_ptr(), y_bf16.device_ptr(), out.device_ptr());
    // SAFETY: the arguments match residual_rmsnorm_bf16 in ptx/norm.cu; x, proj, y, y_bf16 and
    // out hold rows * width elements and weight width (checked above); the three outputs are
    // distinct buffers borrowed mutably while the inputs are borrowed shared, so none aliases
    // another; one CTA of NORM_THREADS per row (the kernel checks its vectorized path's
    // alignment and width itself).
    unsafe {
        launch!(kernel<<<grid, THREADS, 0, stream>>>(
            x, proj, weight, rows_i, width_i, eps, y, y_bf16, out
        ))
    }
    .or_device(|| format!("launching residual + rmsnorm ({rows} x {width})"))
}

/// Queues the RMSNorm input gradient `dx (rows, C) bf16` from `dy` and the forward input `x`
/// (both (rows, C) bf16) and `weight (C)` f32; adds into `dx` when `accumulate`.
pub fn rmsnorm_backward(
    device: &CudaDevice,
    dx: &mut GpuBuffer<u16>,
    dy: &GpuBuffer<u16>,
    x: &GpuBuffer<u16>,
    weight: &GpuBuffer<f32>,
    eps: f32,
    accumulate: bool,
) -> Result<()> {
    let width = weight.len();
    let rows = rows_of("rmsnorm backward input", x.len(), width)?;
    check_len("rmsnorm backward dy", dy.len(), x.len())?;
    check_len("rmsnorm backward dx", dx.len(), x.len())?;
    let grid = grid_dim(rows, MAX_GRID_X, "rmsnorm backward")?;
    let (rows_i, width_i) = (to_i64(rows, "rows")?, to_i64(width, "width")?);
    let accumulate = i32::from(accumulate);
    let kernel = device.function(MODULE, "rmsnorm_backward_bf16")?;
    let stream = device.stream();
    let smem = staged_bytes(width, 2, BACKWARD_STAGED_WIDTH);
    let (dy, x, weight, dx) = (
        dy.device_ptr(),
        x.device_ptr(),
        weight.device_ptr(),
        dx.device_ptr(),
    );
    // SAFETY: the arguments match rmsnorm_backward_bf16 in ptx/norm.cu; dy, x and dx hold
    // rows * width elements and weight width (checked above); dx is a distinct buffer (it is
    // borrowed mutably while dy and x are borrowed shared); the kernel takes its vector path
    // only when the width, the pointers' alignment and the dynamic shared memory given here (x
    // and dy rows of bf16, or none) allow it.
    unsafe {
        launch!(kernel<<<grid, THREADS, smem, stream>>>(
            dy, x, weight, rows_i, width_i, eps, accumulate, dx
        ))
    }
    .or_device(|| format!("launching rmsnorm backward ({rows} x {width})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_paths_get_their_rows_of_shared_memory() {
        assert_eq!(staged_bytes(4096, 1, FORWARD_STAGED_WIDTH), 8192);
        assert_eq!(staged_bytes(4096, 2, BACKWARD_STAGED_WIDTH), 16384);
        assert_eq!(staged_bytes(16384, 1, FORWARD_STAGED_WIDTH), 32768);
        assert_eq!(staged_bytes(12288, 2, BACKWARD_STAGED_WIDTH), 0);
        assert_eq!(staged_bytes(257, 1, FORWARD_STAGED_WIDTH), 0);
        assert_eq!(staged_bytes(16392, 1, FORWARD_STAGED_WIDTH), 0);
    }
}
