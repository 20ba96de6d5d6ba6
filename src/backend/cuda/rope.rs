//! RoPE on the GPU: rotates (or, backward, un-rotates) every head of bf16 rows in place
//! (kernels in `ptx/rope.cu`; the CPU oracle is [`crate::backend::cpu::rope_forward`] and
//! [`crate::backend::cpu_backward::rope_backward`]).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, rows_of, to_i64, MAX_GRID_X};
use crate::error::{Error, Result};
use cust::launch;

const MODULE: &str = "rope";
/// Threads per CTA (`ROPE_THREADS` in ptx/rope.cu).
const THREADS: u32 = 256;

/// Queues the rotation of `x (T, heads * D)` bf16 in place by the angles `cos, sin (T, D/2)`
/// (rotate_half convention).
pub fn rope_forward(
    device: &CudaDevice,
    x: &mut GpuBuffer<u16>,
    cos: &GpuBuffer<f32>,
    sin: &GpuBuffer<f32>,
    head_dim: usize,
) -> Result<()> {
    let rows = table_rows(cos, sin, head_dim)?;
    launch_rope(
        device,
        "rope_forward_bf16",
        x,
        (cos, sin),
        (0, rows),
        head_dim,
    )
}

/// Queues the rotation of `x (rows, heads * D)` bf16 in place by rows
/// `first_row..first_row + rows` of longer angle tables `cos, sin (positions, D/2)`: a KV cache's
/// table of every position, indexed by the positions of the rows being run (no per-step table).
pub fn rope_forward_at(
    device: &CudaDevice,
    x: &mut GpuBuffer<u16>,
    (cos, sin): (&GpuBuffer<f32>, &GpuBuffer<f32>),
    first_row: usize,
    rows: usize,
    head_dim: usize,
) -> Result<()> {
    launch_rope(
        device,
        "rope_forward_bf16",
        x,
        (cos, sin),
        (first_row, rows),
        head_dim,
    )
}

/// Queues the rotation of one row `x (1, heads * D)` bf16 in place by row `*step` of the angle
/// tables `cos, sin (positions, D/2)`, the row read from device memory when the kernel runs: a
/// decode step that a captured graph replays at every position. The caller keeps `*step` inside
/// the table (the kernel does nothing otherwise).
pub fn rope_forward_at_step(
    device: &CudaDevice,
    x: &mut GpuBuffer<u16>,
    (cos, sin): (&GpuBuffer<f32>, &GpuBuffer<f32>),
    step: &GpuBuffer<i64>,
    head_dim: usize,
) -> Result<()> {
    let positions = table_rows(cos, sin, head_dim)?;
    check_len("rope step", step.len(), 1)?;
    let heads = rows_of("rope input row", x.len(), head_dim)?;
    let pairs = heads * head_dim / 2;
    let grid = grid_dim(pairs.div_ceil(THREADS as usize), MAX_GRID_X, "rope")?;
    let (positions_i, heads_i, dim_i) = (
        to_i64(positions, "positions")?,
        to_i64(heads, "heads")?,
        to_i64(head_dim, "head_dim")?,
    );
    let kernel = device.function(MODULE, "rope_forward_bf16_at_step")?;
    let stream = device.stream();
    let (x, cos, sin, step) = (
        x.device_ptr(),
        cos.device_ptr(),
        sin.device_ptr(),
        step.device_ptr(),
    );
    // SAFETY: the arguments match rope_forward_bf16_at_step in ptx/rope.cu; x holds one row of
    // heads * head_dim elements, cos/sin `positions` rows of head_dim / 2 (checked above), step
    // one i64; the kernel reads the row from step and returns when it is outside the tables.
    unsafe {
        launch!(kernel<<<grid, THREADS, 0, stream>>>(
            x, cos, sin, step, positions_i, heads_i, dim_i
        ))
    }
    .or_device(|| format!("launching rope_forward_bf16_at_step ({heads} heads of {head_dim})"))
}

/// Queues the RoPE backward on a gradient `d (T, heads * D)` bf16 in place: the rotation by
/// minus the angles `cos, sin (T, D/2)`.
pub fn rope_backward(
    device: &CudaDevice,
    d: &mut GpuBuffer<u16>,
    cos: &GpuBuffer<f32>,
    sin: &GpuBuffer<f32>,
    head_dim: usize,
) -> Result<()> {
    let rows = table_rows(cos, sin, head_dim)?;
    launch_rope(
        device,
        "rope_backward_bf16",
        d,
        (cos, sin),
        (0, rows),
        head_dim,
    )
}

/// Rows of the angle tables `cos, sin (rows, D/2)`, checked to agree.
fn table_rows(cos: &GpuBuffer<f32>, sin: &GpuBuffer<f32>, head_dim: usize) -> Result<usize> {
    check_head_dim(head_dim)?;
    let rows = rows_of("rope cos table", cos.len(), head_dim / 2)?;
    check_len("rope sin table", sin.len(), cos.len())?;
    Ok(rows)
}

fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::invalid(format!(
            "rope: head_dim {head_dim} must be even and positive"
        )));
    }
    Ok(())
}

/// Rotates `x (rows, heads * D)` by rows `first_row..first_row + rows` of the tables.
fn launch_rope(
    device: &CudaDevice,
    kernel_name: &str,
    x: &mut GpuBuffer<u16>,
    (cos, sin): (&GpuBuffer<f32>, &GpuBuffer<f32>),
    (first_row, rows): (usize, usize),
    head_dim: usize,
) -> Result<()> {
    let table = table_rows(cos, sin, head_dim)?;
    let half = head_dim / 2;
    if rows == 0 || first_row.checked_add(rows).map_or(true, |end| end > table) {
        return Err(Error::invalid(format!(
            "rope: rows {first_row}..{first_row}+{rows} are outside the angle table of {table} \
             positions"
        )));
    }
    let heads = rows_of("rope input row", x.len() / rows, head_dim)?;
    check_len("rope input", x.len(), rows * heads * head_dim)?;
    let pairs = rows * heads * half;
    let grid = grid_dim(pairs.div_ceil(THREADS as usize), MAX_GRID_X, "rope")?;
    let (rows_i, heads_i, dim_i) = (
        to_i64(rows, "rows")?,
        to_i64(heads, "heads")?,
        to_i64(head_dim, "head_dim")?,
    );
    let kernel = device.function(MODULE, kernel_name)?;
    let stream = device.stream();
    // first_row + rows <= table (checked above): the offset tables stay inside their buffers.
    let offset = first_row * half;
    let (x, cos, sin) = (
        x.device_ptr(),
        cos.device_ptr().wrapping_add(offset),
        sin.device_ptr().wrapping_add(offset),
    );
    // SAFETY: the arguments match rope_{forward,backward}_bf16 in ptx/rope.cu; x holds
    // rows * heads * head_dim elements and cos/sin, from the offset row on, at least
    // rows * head_dim / 2 (checked above); the kernel bounds its thread index by the pair count.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, cos, sin, rows_i, heads_i, dim_i)) }
        .or_device(|| format!("launching {kernel_name} ({rows} rows, {heads} heads of {head_dim})"))
}
