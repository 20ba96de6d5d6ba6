//! RoPE on the GPU: rotates (or, backward, un-rotates) every head of bf16 rows in place, and,
//! for rows going into a KV cache, rotates q and k and writes k and v into the cache in one
//! launch (kernels in `ptx/rope.cu`; the CPU oracle is [`crate::backend::cpu::rope_forward`] and
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
/// Pairs a thread rotates on the training kernels' vector path (one 16-byte vector of bf16).
const PAIRS_PER_VECTOR: usize = 8;

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

/// The query, key and value rows of a chunk going into a KV cache.
pub struct QkvRows<'a> {
    /// (T, heads * D) bf16, rotated in place.
    pub q: &'a mut GpuBuffer<u16>,
    /// (T, kv_heads * D) bf16, rotated in place and written into the key cache.
    pub k: &'a mut GpuBuffer<u16>,
    /// (T, kv_heads * D) bf16, written into the value cache.
    pub v: &'a GpuBuffer<u16>,
}

/// Queues in one kernel what a chunk of `T` rows at the cache positions `pos0..` needs before
/// its attention: `q` and `k` rotated in place by the rows of the cache's angle tables
/// `cos, sin (positions, D/2)`, the rotated `k` written into rows `pos0..` of `keys` and `v`
/// into those of `values` (both (positions, kv_heads * D) bf16). Bit for bit two
/// [`rope_forward_at`] and two copies. (A decode step's single row does this inside
/// [`super::attention::attention_decode`], with the same bits.)
pub fn rope_qk_into_cache(
    device: &CudaDevice,
    rows: QkvRows<'_>,
    (cos, sin): (&GpuBuffer<f32>, &GpuBuffer<f32>),
    (keys, values): (&mut GpuBuffer<u16>, &mut GpuBuffer<u16>),
    pos0: usize,
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> Result<()> {
    let QkvRows { q, k, v } = rows;
    let table = table_rows(cos, sin, head_dim)?;
    if heads == 0 || kv_heads == 0 {
        return Err(Error::invalid(format!(
            "rope + cache: {heads} query and {kv_heads} key-value heads"
        )));
    }
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    let t = rows_of("rope + cache queries", q.len(), q_dim)?;
    check_len("rope + cache keys", k.len(), t * kv_dim)?;
    check_len("rope + cache values", v.len(), t * kv_dim)?;
    let cached = rows_of("rope + cache key cache", keys.len(), kv_dim)?;
    check_len("rope + cache value cache", values.len(), keys.len())?;
    // The rows that the caches and the angle tables all hold.
    let positions = cached.min(table);
    let pairs = t * (heads + kv_heads) * (head_dim / 2);
    let grid = grid_dim(pairs.div_ceil(THREADS as usize), MAX_GRID_X, "rope + cache")?;
    let (heads_i, kv_heads_i, dim_i) = (
        to_i64(heads, "heads")?,
        to_i64(kv_heads, "kv heads")?,
        to_i64(head_dim, "head_dim")?,
    );
    let (q, k, v) = (q.device_ptr(), k.device_ptr(), v.device_ptr());
    let (cos, sin) = (cos.device_ptr(), sin.device_ptr());
    let (keys, values) = (keys.device_ptr(), values.device_ptr());
    let what = || format!("launching rope + cache ({t} rows, {heads} + {kv_heads} heads)");
    if pos0.checked_add(t).map_or(true, |end| end > positions) {
        return Err(Error::invalid(format!(
            "rope + cache: rows {pos0}..{pos0}+{t} do not fit a cache (and angle table) of \
             {positions} positions"
        )));
    }
    let (pos0_i, rows_i) = (to_i64(pos0, "position")?, to_i64(t, "rows")?);
    let kernel = device.function(MODULE, "rope_qk_cache_bf16")?;
    let stream = device.stream();
    // SAFETY: the arguments match rope_qk_cache_bf16 in ptx/rope.cu; q holds t * heads *
    // head_dim elements, k and v t * kv_heads * head_dim, keys and values and the angle tables
    // at least pos0 + t rows of theirs (checked above); the kernel bounds its thread index by
    // the pair count; v, keys and values are distinct buffers (two mutable borrows and a shared
    // one), as are q and k.
    unsafe {
        launch!(kernel<<<grid, THREADS, 0, stream>>>(
            q, k, v, cos, sin, keys, values, pos0_i, rows_i, heads_i, kv_heads_i, dim_i
        ))
    }
    .or_device(what)
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
    // The vector path rotates 8 pairs a thread where half a head is whole 16-byte vectors (the
    // kernel also checks alignment; the element path it falls back to strides over the grid).
    let per_thread = if half % PAIRS_PER_VECTOR == 0 {
        PAIRS_PER_VECTOR
    } else {
        1
    };
    let threads = pairs.div_ceil(per_thread);
    let grid = grid_dim(threads.div_ceil(THREADS as usize), MAX_GRID_X, "rope")?;
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
    // rows * head_dim / 2 (checked above); the kernel strides over the grid and bounds its index
    // by the count of units (or pairs) it rotates.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, cos, sin, rows_i, heads_i, dim_i)) }
        .or_device(|| format!("launching {kernel_name} ({rows} rows, {heads} heads of {head_dim})"))
}
