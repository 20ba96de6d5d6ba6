//! SwiGLU on the GPU: `silu(gate) * up` and its backward over bf16 tensors (kernels in
//! `ptx/swiglu.cu`; the CPU oracle is [`crate::backend::cpu::swiglu_forward`] and
//! [`crate::backend::cpu_backward::swiglu_backward`]).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use crate::error::{Error, Result};
use cust::launch;

const MODULE: &str = "swiglu";
/// Threads per CTA (`SWIGLU_THREADS` in ptx/swiglu.cu).
const THREADS: u32 = 256;

/// Queues `out = silu(gate) * up`, elementwise over equal-length bf16 buffers.
pub fn swiglu_forward(
    device: &CudaDevice,
    out: &mut GpuBuffer<u16>,
    gate: &GpuBuffer<u16>,
    up: &GpuBuffer<u16>,
) -> Result<()> {
    let n = gate.len();
    check_len("swiglu up", up.len(), n)?;
    check_len("swiglu output", out.len(), n)?;
    let grid = grid_for(n)?;
    let n_i = to_i64(n, "swiglu length")?;
    let kernel = device.function(MODULE, "swiglu_forward_bf16")?;
    let stream = device.stream();
    let (gate, up, out) = (gate.device_ptr(), up.device_ptr(), out.device_ptr());
    // SAFETY: the arguments match swiglu_forward_bf16 in ptx/swiglu.cu; every buffer holds n
    // elements (checked above) and the kernel bounds its indices by n (16-byte vectors only
    // below n / 8 * 8, and only on 16-byte aligned buffers).
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(gate, up, n_i, out)) }
        .or_device(|| format!("launching swiglu forward ({n} elements)"))
}

/// Queues the SwiGLU backward: `dgate` and `dup` from `dout` and the forward inputs, all
/// equal-length bf16 buffers.
pub fn swiglu_backward(
    device: &CudaDevice,
    dgate: &mut GpuBuffer<u16>,
    dup: &mut GpuBuffer<u16>,
    dout: &GpuBuffer<u16>,
    gate: &GpuBuffer<u16>,
    up: &GpuBuffer<u16>,
) -> Result<()> {
    let n = dout.len();
    for (what, len) in [
        ("swiglu gate", gate.len()),
        ("swiglu up", up.len()),
        ("swiglu dgate", dgate.len()),
        ("swiglu dup", dup.len()),
    ] {
        check_len(what, len, n)?;
    }
    let grid = grid_for(n)?;
    let n_i = to_i64(n, "swiglu length")?;
    let kernel = device.function(MODULE, "swiglu_backward_bf16")?;
    let stream = device.stream();
    let (dout, gate, up) = (dout.device_ptr(), gate.device_ptr(), up.device_ptr());
    let (dgate, dup) = (dgate.device_ptr(), dup.device_ptr());
    // SAFETY: the arguments match swiglu_backward_bf16 in ptx/swiglu.cu; every buffer holds n
    // elements (checked above) and the kernel bounds its indices by n (16-byte vectors only
    // below n / 8 * 8, and only on 16-byte aligned buffers).
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(dout, gate, up, n_i, dgate, dup)) }
        .or_device(|| format!("launching swiglu backward ({n} elements)"))
}

/// Elements a thread takes (`SWIGLU_VECS` 16-byte vectors of 8 bf16 in ptx/swiglu.cu).
const ELEMENTS_PER_THREAD: usize = 2 * 8;

/// One thread per `ELEMENTS_PER_THREAD` elements (the kernels stride over the grid, so any grid
/// covers every element; this one is a single pass on their vector path).
fn grid_for(n: usize) -> Result<u32> {
    if n == 0 {
        return Err(Error::invalid("swiglu: empty input"));
    }
    let threads = n.div_ceil(ELEMENTS_PER_THREAD);
    grid_dim(threads.div_ceil(THREADS as usize), MAX_GRID_X, "swiglu")
}
