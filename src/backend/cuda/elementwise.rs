//! The small kernels between the GPU model's big ones (kernels in `ptx/elementwise.cu`):
//! residual adds into an f32 stream, f32 -> bf16, LoRA dropout masks and their
//! backward, row gathers (token embeddings too) and scatters, fills, copies at an offset, and copies from the host into
//! an existing buffer. Each is checked against a plain host loop by the selftest's "model"
//! family.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64};
use super::pdl::{launch_step, step_kernel};
use crate::error::{Error, Result};
use cust::launch;
use cust::memory::{CopyDestination, DeviceCopy, DevicePointer, DeviceSlice};

const MODULE: &str = "elementwise";
/// Threads per CTA of the 1-D kernels (`EW_THREADS`).
const THREADS: u32 = 256;
/// Mask bytes a thread of `dropout_mask_from_keys` draws and stores at once (`MASK_GROUP`).
const MASK_GROUP: usize = 16;
/// The grid-stride kernels use at most this many CTAs.
const MAX_CTAS: usize = 65535;

/// CTAs of a grid-stride launch over `n` elements (n >= 1).
fn grid_for(n: usize, what: &str) -> Result<u32> {
    grid_dim(n.div_ceil(THREADS as usize).min(MAX_CTAS), MAX_CTAS, what)
}

/// Copies `data` into `dst` (same length), after the GPU has finished the work queued before.
pub fn upload_into<T: DeviceCopy>(dst: &mut GpuBuffer<T>, data: &[T], what: &str) -> Result<()> {
    check_len(what, data.len(), dst.len())?;
    // SAFETY: the slice covers exactly the buffer's `len` elements, which `dst` owns and
    // borrows mutably for the duration of the copy.
    let mut slice = unsafe { DeviceSlice::from_raw_parts_mut(dst.device_ptr(), dst.len()) };
    slice
        .copy_from(data)
        .or_device(|| format!("copying {what} to the GPU"))
}

/// `x (n) f32 += y (n) bf16`; with `out`, also `out (n) bf16 = bf16(x)` after the add.
pub fn residual_add(
    device: &CudaDevice,
    x: &mut GpuBuffer<f32>,
    y: &GpuBuffer<u16>,
    out: Option<&mut GpuBuffer<u16>>,
) -> Result<()> {
    let n = x.len();
    check_len("residual add y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (out_ptr, write_out) = match out {
        Some(out) => {
            check_len("residual add output", out.len(), n)?;
            (out.device_ptr(), 1i32)
        }
        None => (DevicePointer::null(), 0i32),
    };
    let grid = grid_for(n, "residual add")?;
    let n_i = to_i64(n, "residual add length")?;
    let kernel = device.function(MODULE, "residual_add_bf16")?;
    let stream = device.stream();
    let (x, y) = (x.device_ptr(), y.device_ptr());
    // SAFETY: the arguments match residual_add_bf16; x, y (and out when write_out is 1) hold n
    // elements (checked above); out is null only when write_out is 0, and never aliases x or y
    // (distinct borrows).
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, y, n_i, out_ptr, write_out)) }
        .or_device(|| format!("launching residual_add_bf16 ({n} elements)"))
}

/// `out (n) bf16 = bf16(x (n) f32)`.
pub fn to_bf16(device: &CudaDevice, x: &GpuBuffer<f32>, out: &mut GpuBuffer<u16>) -> Result<()> {
    let n = x.len();
    check_len("f32 -> bf16 output", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "f32 -> bf16")?;
    let n_i = to_i64(n, "f32 -> bf16 length")?;
    // A decode step's first kernel: with PDL while a step's launches are on.
    let kernel = step_kernel(device, MODULE, "f32_to_bf16")?;
    let (x, out) = (x.device_ptr(), out.device_ptr());
    // SAFETY: the arguments match f32_to_bf16; x and out hold n elements (checked above).
    unsafe {
        launch_step!(kernel<<<grid, THREADS, 0>>>(x, n_i, out), || format!(
            "launching f32_to_bf16 ({n} elements)"
        ))
    }
}

/// CTAs of dropout_mask_from_keys resident on an SM (256 threads at 32 registers).
const MASK_CTAS_PER_SM: usize = 8;

/// `mask (n) u8` = 1 where kept: run `s` of `per_key` elements drawn with
/// `keys[first_key + s]`, each element with its index in the run as the counter
/// (`rng::dropout_keeps`). One key per sequence of a padded batch gives every sequence the mask
/// the CPU draws for it alone.
pub fn dropout_mask_from_keys(
    device: &CudaDevice,
    mask: &mut GpuBuffer<u8>,
    keys: &GpuBuffer<u64>,
    first_key: usize,
    per_key: usize,
    p: f32,
) -> Result<()> {
    let n = mask.len();
    if n == 0 {
        return Ok(());
    }
    if per_key == 0 || first_key + n.div_ceil(per_key) > keys.len() {
        return Err(Error::invalid(format!(
            "dropout mask: {n} elements in runs of {per_key} from key {first_key} need more \
             than the {} keys given",
            keys.len()
        )));
    }
    // One grid row per run (key); x strides over the 16-byte groups of the mask that hold a
    // run's elements (at most per_key / 16 + 2 of them, the first starting at or before the run),
    // a group a thread per stride. The grid stays near one wave at full occupancy (32
    // registers: 8 CTAs an SM), so a thread draws several groups for its one key load and setup.
    let runs = n.div_ceil(per_key);
    if runs > MAX_CTAS {
        return Err(Error::invalid(format!(
            "dropout mask: {runs} sequences in one launch; at most {MAX_CTAS}"
        )));
    }
    let groups = per_key.div_ceil(MASK_GROUP) + 1;
    let one_wave = (device.sm_count() as usize * MASK_CTAS_PER_SM).div_ceil(runs);
    let across = groups
        .div_ceil(THREADS as usize)
        .min(one_wave)
        .min(MAX_CTAS);
    let grid = (
        grid_dim(across, MAX_CTAS, "dropout mask")?,
        grid_dim(runs, MAX_CTAS, "dropout mask")?,
    );
    let n_i = to_i64(n, "dropout mask length")?;
    let per_key_i = to_i64(per_key, "dropout run length")?;
    let kernel = device.function(MODULE, "dropout_mask_from_keys")?;
    let stream = device.stream();
    let (out, keys) = (mask.device_ptr(), keys.device_ptr().wrapping_add(first_key));
    // SAFETY: the arguments match dropout_mask_from_keys; the kernel writes mask[i] for i < n,
    // the buffer's length, and reads key first_key + run for run < ceil(n / per_key), so below
    // keys.len() (checked above).
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(out, n_i, keys, per_key_i, p)) }
        .or_device(|| format!("launching dropout_mask_from_keys ({n} elements)"))
}

/// `dx += mask ? du * keep : 0` elementwise (dropout's backward into the input gradient).
pub fn masked_add(
    device: &CudaDevice,
    dx: &mut GpuBuffer<u16>,
    du: &GpuBuffer<u16>,
    mask: &GpuBuffer<u8>,
    keep: f32,
) -> Result<()> {
    let n = dx.len();
    check_len("masked add du", du.len(), n)?;
    check_len("masked add mask", mask.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "masked add")?;
    let n_i = to_i64(n, "masked add length")?;
    let kernel = device.function(MODULE, "masked_add_bf16")?;
    let stream = device.stream();
    let (dx, du, mask) = (dx.device_ptr(), du.device_ptr(), mask.device_ptr());
    // SAFETY: the arguments match masked_add_bf16; dx, du and mask hold n elements (checked
    // above), du distinct from dx.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(dx, du, mask, n_i, keep)) }
        .or_device(|| format!("launching masked_add_bf16 ({n} elements)"))
}

/// Row indices on the GPU, checked at upload to lie below `bound` and to be distinct.
pub struct RowIndex {
    rows: GpuBuffer<i32>,
    bound: usize,
}

impl RowIndex {
    /// Validates `rows` (each below `bound`, no repeats) and copies them to the GPU.
    pub fn upload(device: &CudaDevice, rows: &[usize], bound: usize) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::invalid("a row index needs at least one row"));
        }
        let mut seen = vec![false; bound];
        let mut narrow = Vec::with_capacity(rows.len());
        for &r in rows {
            if r >= bound || seen[r] {
                return Err(Error::invalid(format!(
                    "row index {r} is out of range (0..{bound}) or repeated"
                )));
            }
            seen[r] = true;
            narrow.push(
                i32::try_from(r).map_err(|_| Error::invalid(format!("row {r} is too large")))?,
            );
        }
        Ok(RowIndex {
            rows: GpuBuffer::from_host(device, "row index", &narrow)?,
            bound,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Never true (an index holds at least one row).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Token ids on the GPU, checked at upload to lie below `vocab` (the rows of the embedding
/// table they index); unlike [`RowIndex`] they may repeat.
pub struct TokenIds {
    ids: GpuBuffer<u32>,
    vocab: usize,
}

impl TokenIds {
    /// Validates `ids` (each below `vocab`) and copies them to the GPU.
    pub fn upload(device: &CudaDevice, ids: &[u32], vocab: usize) -> Result<Self> {
        if ids.is_empty() {
            return Err(Error::invalid(
                "an embedding lookup needs at least one token",
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the model's vocabulary of {vocab} (wrong tokenizer?)"
            )));
        }
        Ok(TokenIds {
            ids: GpuBuffer::from_host(device, "token ids", ids)?,
            vocab,
        })
    }
}

/// `out (count, width) = table[ids]` with `table (vocab, width)` f32: the embedding rows of a
/// pass's tokens.
pub fn embedding_rows(
    device: &CudaDevice,
    table: &GpuBuffer<f32>,
    ids: &TokenIds,
    width: usize,
    out: &mut GpuBuffer<f32>,
) -> Result<()> {
    let count = ids.ids.len();
    check_len("embedding table", table.len(), ids.vocab * width)?;
    check_len("embedding rows", out.len(), count * width)?;
    let n = count * width;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "embedding_rows_f32")?;
    let (count_i, width_i) = (to_i64(count, "token count")?, to_i64(width, "row width")?);
    let kernel = device.function(MODULE, "embedding_rows_f32")?;
    let stream = device.stream();
    let (table, idx, out) = (table.device_ptr(), ids.ids.device_ptr(), out.device_ptr());
    // SAFETY: the arguments match embedding_rows_f32; the table holds vocab * width elements and
    // out count * width (checked above), every id is below vocab (checked at upload).
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(table, idx, count_i, width_i, out)) }
        .or_device(|| format!("launching embedding_rows_f32 ({count} rows of {width})"))
}

/// `dst (count, width) = src[rows]` with `src (bound, width)`.
pub fn gather_rows(
    device: &CudaDevice,
    src: &GpuBuffer<u16>,
    rows: &RowIndex,
    width: usize,
    dst: &mut GpuBuffer<u16>,
) -> Result<()> {
    launch_rows(device, "gather_rows_bf16", src, rows, width, dst, false)
}

/// `dst[rows] = src (count, width)` with `dst (bound, width)`; other rows of dst untouched.
pub fn scatter_rows(
    device: &CudaDevice,
    src: &GpuBuffer<u16>,
    rows: &RowIndex,
    width: usize,
    dst: &mut GpuBuffer<u16>,
) -> Result<()> {
    launch_rows(device, "scatter_rows_bf16", src, rows, width, dst, true)
}

fn launch_rows(
    device: &CudaDevice,
    name: &str,
    src: &GpuBuffer<u16>,
    rows: &RowIndex,
    width: usize,
    dst: &mut GpuBuffer<u16>,
    scatter: bool,
) -> Result<()> {
    let count = rows.len();
    let (compact, full) = if scatter {
        (src.len(), dst.len())
    } else {
        (dst.len(), src.len())
    };
    check_len(&format!("{name} rows"), compact, count * width)?;
    check_len(&format!("{name} table"), full, rows.bound * width)?;
    let n = count * width;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, name)?;
    let (count_i, width_i) = (to_i64(count, "row count")?, to_i64(width, "row width")?);
    let kernel = device.function(MODULE, name)?;
    let stream = device.stream();
    let (src, idx, dst) = (src.device_ptr(), rows.rows.device_ptr(), dst.device_ptr());
    // SAFETY: the arguments match gather_rows_bf16 / scatter_rows_bf16 (one signature); the
    // compact side holds count * width elements and the table bound * width (checked above),
    // every index is below bound and distinct (checked at upload), src and dst are distinct.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(src, idx, count_i, width_i, dst)) }
        .or_device(|| format!("launching {name} ({count} rows of {width})"))
}

/// Sets every element of an f32 buffer to zero.
pub fn zero_f32(device: &CudaDevice, x: &mut GpuBuffer<f32>) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "fill")?;
    let n_i = to_i64(n, "fill length")?;
    let kernel = device.function(MODULE, "fill_u32")?;
    let stream = device.stream();
    let x = x.device_ptr().cast::<u32>();
    // SAFETY: the arguments match fill_u32; x holds n 4-byte elements (f32 and u32 have one
    // size), and all-zero bits are the f32 value 0.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, n_i, 0u32)) }
        .or_device(|| format!("launching fill_u32 ({n} elements)"))
}

/// Sets every element of a bf16 buffer to zero.
pub fn zero_bf16(device: &CudaDevice, x: &mut GpuBuffer<u16>) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "fill")?;
    let n_i = to_i64(n, "fill length")?;
    let kernel = device.function(MODULE, "fill_u16")?;
    let stream = device.stream();
    let x = x.device_ptr();
    // SAFETY: the arguments match fill_u16; x holds n u16 elements; 0 is bf16 zero.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(x, n_i, 0u32)) }
        .or_device(|| format!("launching fill_u16 ({n} elements)"))
}

/// `dst[offset .. offset + src.len()] = src` (bf16): new rows into a KV cache.
pub fn copy_into_at(
    device: &CudaDevice,
    src: &GpuBuffer<u16>,
    dst: &mut GpuBuffer<u16>,
    offset: usize,
) -> Result<()> {
    let n = src.len();
    if offset.checked_add(n).map_or(true, |end| end > dst.len()) {
        return Err(Error::invalid(format!(
            "copy: {n} elements at offset {offset} do not fit a buffer of {}",
            dst.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "copy")?;
    let n_i = to_i64(n, "copy length")?;
    let kernel = device.function(MODULE, "copy_u16")?;
    let stream = device.stream();
    let src = src.device_ptr();
    // SAFETY: offset + n <= dst.len() (checked above), so the offset pointer stays inside dst's
    // allocation.
    let dst = unsafe { dst.device_ptr().add(offset) };
    // SAFETY: the arguments match copy_u16; src holds n elements and dst (offset) has n elements
    // of room; the buffers are distinct.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(src, n_i, dst)) }
        .or_device(|| format!("launching copy_u16 ({n} elements at {offset})"))
}

/// `dst = src`, two f32 buffers of one length.
pub fn copy_f32(device: &CudaDevice, src: &GpuBuffer<f32>, dst: &mut GpuBuffer<f32>) -> Result<()> {
    let n = src.len();
    check_len("f32 copy destination", dst.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let grid = grid_for(n, "copy")?;
    let n_i = to_i64(n, "copy length")?;
    let kernel = device.function(MODULE, "copy_u32")?;
    let stream = device.stream();
    let (src, dst) = (
        src.device_ptr().cast::<u32>(),
        dst.device_ptr().cast::<u32>(),
    );
    // SAFETY: the arguments match copy_u32; both buffers hold n 4-byte elements (checked
    // above) and are distinct; the bits are copied unchanged.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(src, n_i, dst)) }
        .or_device(|| format!("launching copy_u32 ({n} elements)"))
}
