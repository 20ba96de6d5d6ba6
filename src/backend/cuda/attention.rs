//! Causal grouped-query attention on the GPU, flash style: the forward (whole sequences, chunks
//! at a cache offset, single decode steps) keeps each row's log-sum-exp, and the backward
//! recomputes the probabilities from it (kernels in `ptx/attention.cu`; the CPU oracle is
//! [`crate::backend::cpu::attention_forward`] and
//! [`crate::backend::cpu_backward::attention_backward`]).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{raise_shared_limit, OrDevice};
use super::launch_checks::{check_len, grid_dim, rows_of, to_i64, MAX_GRID_X};
use super::pdl::{launch_step, step_kernel};
use crate::error::{Error, Result};
use cust::function::{BlockSize, GridSize};
use cust::launch;

const MODULE: &str = "attention";
/// Threads per CTA (`ATT_THREADS` in ptx/attention.cu).
const THREADS: u32 = 256;
/// Threads per CTA and query (or key) rows per CTA of the tensor-core kernels: the forward and
/// the dQ and dK/dV backward (`FWD_THREADS`, `FQ`, `FT`).
const FORWARD_THREADS: u32 = 128;
const FORWARD_ROWS_PER_CTA: usize = 64;
/// Dynamic shared memory of the tensor-core kernels (ptx/attention.cu): 64-row bf16 tiles at
/// pitch D + 8, three for the forward (Q, K, V), four for dQ (Q, dout, K, V), four plus 64
/// log-sum-exps and deltas (f32) for dK/dV (`DKV_SHARED_BYTES`).
fn tile_bytes(head_dim: usize) -> usize {
    FORWARD_ROWS_PER_CTA * (head_dim + 8) * 2
}
/// Warps per CTA, each one (t, h) item in the delta kernel.
const WARPS: usize = THREADS as usize / 32;
const MAX_GRID_Y: usize = 65535;
/// Threads per CTA of the decode kernels (`DECODE_THREADS`).
const DECODE_THREADS: u32 = 128;
/// Keys per CTA of a decode step (flash decoding's split).
/// Keys per CTA of a decode step (`attention_decode`): its grid is ceil(cached rows / this).
pub const DECODE_CHUNK: usize = 256;

/// Head counts and width of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads KV (H a multiple of KV).
    pub kv_heads: usize,
    /// Head width D: 64 or 128.
    pub head_dim: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<(i64, i64, f32)> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = *self;
        if kv_heads == 0 || heads == 0 || heads % kv_heads != 0 {
            return Err(Error::invalid(format!(
                "attention: {heads} query heads are not a multiple of {kv_heads} key/value heads"
            )));
        }
        if head_dim != 64 && head_dim != 128 {
            return Err(Error::unsupported(format!(
                "attention on the GPU supports head_dim 64 and 128, not {head_dim}"
            )));
        }
        Ok((
            to_i64(heads, "heads")?,
            to_i64(kv_heads, "kv_heads")?,
            1.0 / (head_dim as f32).sqrt(),
        ))
    }

    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The kernels index positions (pos0 + T) in 32 bits.
fn check_positions(positions: usize) -> Result<()> {
    if positions > i32::MAX as usize {
        return Err(Error::unsupported(format!(
            "attention on the GPU covers at most {} positions a sequence, not {positions}",
            i32::MAX
        )));
    }
    Ok(())
}

/// The rows per sequence of `rows` rows holding `batch` sequences of equal (padded) length.
fn rows_per_sequence(rows: usize, batch: usize) -> Result<usize> {
    if batch == 0 || rows % batch != 0 {
        return Err(Error::invalid(format!(
            "attention: {rows} rows do not split into {batch} sequences of equal length"
        )));
    }
    Ok(rows / batch)
}

/// Queues `out (T, H·D) = softmax(q kᵀ / sqrt(D)) v` causally, query row t at position
/// `pos0 + t` seeing key rows `0..=pos0 + t` of `k, v` (at least `pos0 + T` rows of KV·D), and
/// `lse (H, T)` f32 the rows' log-sum-exp. A decode step is T = 1 with `pos0` = cached rows - 1.
/// With `batch` > 1 (and `pos0` = 0), q, k, v and out stack `batch` sequences of T rows each
/// and lse is (batch, H, T); each sequence attends only to itself.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    device: &CudaDevice,
    q: &GpuBuffer<u16>,
    k: &GpuBuffer<u16>,
    v: &GpuBuffer<u16>,
    out: &mut GpuBuffer<u16>,
    lse: &mut GpuBuffer<f32>,
    pos0: usize,
    batch: usize,
    shape: AttentionShape,
) -> Result<()> {
    let (h_i, kv_i, scale) = shape.validate()?;
    let rows = rows_of("attention q", q.len(), shape.q_width())?;
    let t = rows_per_sequence(rows, batch)?;
    if batch > 1 && (pos0 != 0 || k.len() != rows * shape.kv_width()) {
        return Err(Error::invalid(format!(
            "attention: a batch of {batch} sequences needs pos0 0 and keys for every row"
        )));
    }
    check_len("attention output", out.len(), q.len())?;
    check_len("attention lse", lse.len(), shape.heads * rows)?;
    check_len("attention v", v.len(), k.len())?;
    check_positions(pos0 + t)?;
    let needed = (pos0 + t) * shape.kv_width();
    if k.len() < needed || k.len() % shape.kv_width() != 0 {
        return Err(Error::invalid(format!(
            "attention: k and v hold {} elements; rows of {} covering positions 0..{} need {needed}",
            k.len(),
            shape.kv_width(),
            pos0 + t
        )));
    }
    let grid = GridSize::xyz(
        grid_dim(t.div_ceil(FORWARD_ROWS_PER_CTA), MAX_GRID_X, "attention")?,
        grid_dim(shape.heads, MAX_GRID_Y, "attention heads")?,
        grid_dim(batch, MAX_GRID_Y, "attention batch")?,
    );
    let (t_i, pos0_i) = (to_i64(t, "T")?, to_i64(pos0, "pos0")?);
    let name = format!("attention_forward_d{}", shape.head_dim);
    let kernel = device.function(MODULE, &name)?;
    let shared = raise_shared_limit(&kernel, &name, 3 * tile_bytes(shape.head_dim))?;
    let stream = device.stream();
    let (q, k, v, out, lse) = (
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
        out.device_ptr(),
        lse.device_ptr(),
    );
    // SAFETY: the arguments match attention_forward_d{64,128} in ptx/attention.cu (head_dim
    // picks the entry point); q and out hold batch·T rows of H·D, k and v at least pos0 + T
    // rows of KV·D per sequence (batch·T rows when batch > 1) and lse batch·H·T values (checked
    // above); H is a multiple of KV, pos0 + T fits the kernel's 32-bit positions, and the
    // kernel bounds every row by T and every key by pos0 + T within its sequence; the dynamic
    // shared memory is the Q, K and V tiles the kernel lays out (the limit raised to it).
    unsafe {
        launch!(kernel<<<grid, BlockSize::x(FORWARD_THREADS), shared, stream>>>(
            q, k, v, out, lse, t_i, pos0_i, h_i, kv_i, scale
        ))
    }
    .or_device(|| format!("launching {name} ({batch} x T {t}, pos0 {pos0}, {shape:?})"))
}

/// f32 scratch values [`attention_decode`] needs for a cache of `cached_rows` rows.
pub fn decode_scratch_len(cached_rows: usize, shape: AttentionShape) -> usize {
    shape.heads * cached_rows.div_ceil(DECODE_CHUNK) * (shape.head_dim + 2)
}

/// Queues one decode step: `out (H·D)` bf16 and `lse (H)` f32 for the single query row `q (H·D)`
/// at position `cached_rows - 1`, against key/value rows `0..cached_rows` of the cache `k, v`
/// (at least that many rows of KV·D). The keys are split over CTAs of 256 (flash decoding);
/// `scratch` holds [`decode_scratch_len`] f32 of partial results. Computes what
/// [`attention_forward`] computes with T = 1 and `pos0 = cached_rows - 1`, with more of the GPU.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    device: &CudaDevice,
    q: &GpuBuffer<u16>,
    k: &GpuBuffer<u16>,
    v: &GpuBuffer<u16>,
    out: &mut GpuBuffer<u16>,
    lse: &mut GpuBuffer<f32>,
    cached_rows: usize,
    shape: AttentionShape,
    scratch: &mut GpuBuffer<f32>,
) -> Result<()> {
    launch_decode(
        device,
        (q, k, v),
        (out, lse),
        DecodeRows::Host(cached_rows),
        shape,
        scratch,
    )
}

/// As [`attention_decode`] with the query at position `*step`, read from device memory when
/// the kernel runs (`cached_rows = *step + 1`): a decode step that a captured graph replays at
/// every position. `cached_rows` is the host's value of `*step + 1` at capture: it sets the
/// number of key chunks (CTAs), which stays right for every position with as many chunks, and
/// `scratch`'s size ([`decode_scratch_len`] of it). The caller keeps `*step` inside the cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_at_step(
    device: &CudaDevice,
    q: &GpuBuffer<u16>,
    k: &GpuBuffer<u16>,
    v: &GpuBuffer<u16>,
    out: &mut GpuBuffer<u16>,
    lse: &mut GpuBuffer<f32>,
    (step, cached_rows): (&GpuBuffer<i64>, usize),
    shape: AttentionShape,
    scratch: &mut GpuBuffer<f32>,
) -> Result<()> {
    check_len("decode step", step.len(), 1)?;
    let rows = DecodeRows::Device { step, cached_rows };
    launch_decode(device, (q, k, v), (out, lse), rows, shape, scratch)
}

/// Where a decode step's key count comes from.
enum DecodeRows<'a> {
    /// Known on the host.
    Host(usize),
    /// `*step + 1`, read by the kernel; `cached_rows` its value at capture (the chunk count).
    Device {
        step: &'a GpuBuffer<i64>,
        cached_rows: usize,
    },
}

fn launch_decode(
    device: &CudaDevice,
    (q, k, v): (&GpuBuffer<u16>, &GpuBuffer<u16>, &GpuBuffer<u16>),
    (out, lse): (&mut GpuBuffer<u16>, &mut GpuBuffer<f32>),
    rows: DecodeRows<'_>,
    shape: AttentionShape,
    scratch: &mut GpuBuffer<f32>,
) -> Result<()> {
    let cached_rows = match rows {
        DecodeRows::Host(n) | DecodeRows::Device { cached_rows: n, .. } => n,
    };
    let (h_i, kv_i, scale) = shape.validate()?;
    check_len("decode query", q.len(), shape.q_width())?;
    check_len("decode output", out.len(), shape.q_width())?;
    check_len("decode lse", lse.len(), shape.heads)?;
    check_len("decode v cache", v.len(), k.len())?;
    check_len(
        "decode scratch",
        scratch.len(),
        decode_scratch_len(cached_rows, shape),
    )?;
    if cached_rows == 0 || k.len() < cached_rows * shape.kv_width() {
        return Err(Error::invalid(format!(
            "decode: the cache holds {} elements, fewer than {cached_rows} rows of {} (and at \
             least one row is needed)",
            k.len(),
            shape.kv_width()
        )));
    }
    let splits = cached_rows.div_ceil(DECODE_CHUNK);
    let grid = GridSize::xy(
        grid_dim(splits, MAX_GRID_X, "decode")?,
        grid_dim(shape.heads, MAX_GRID_Y, "decode heads")?,
    );
    let (s_i, chunk_i, splits_i) = (
        to_i64(cached_rows, "cached rows")?,
        to_i64(DECODE_CHUNK, "chunk")?,
        to_i64(splits, "splits")?,
    );
    let d_i = to_i64(shape.head_dim, "head_dim")?;
    let capacity_i = to_i64(k.len() / shape.kv_width(), "cache rows")?;
    let (q, k, v, out, lse, part) = (
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
        out.device_ptr(),
        lse.device_ptr(),
        scratch.device_ptr(),
    );
    let name = match rows {
        DecodeRows::Host(_) => format!("attention_decode_partial_d{}", shape.head_dim),
        DecodeRows::Device { .. } => format!("attention_decode_partial_step_d{}", shape.head_dim),
    };
    // Both kernels with PDL while a decode step's launches are on.
    let kernel = step_kernel(device, MODULE, &name)?;
    let block = BlockSize::x(DECODE_THREADS);
    let what = || format!("launching {name} ({cached_rows} cached rows, {shape:?})");
    match rows {
        // SAFETY: the arguments match attention_decode_partial_d{64,128} in ptx/attention.cu; q
        // holds H·D elements, k and v at least cached_rows rows of KV·D, scratch
        // H · splits · (D + 2) f32 (checked above); every CTA's key range starts below
        // cached_rows and ends at most there.
        DecodeRows::Host(_) => unsafe {
            launch_step!(
                kernel<<<grid, block, 0>>>(q, k, v, s_i, h_i, kv_i, scale, chunk_i, part),
                what
            )
        },
        DecodeRows::Device { step, .. } => {
            let step = step.device_ptr();
            // SAFETY: as above for attention_decode_partial_step_d{64,128}, which reads
            // S = *step + 1 from `step` (one i64) and does nothing when S is outside
            // 1..=capacity_i, the rows k and v hold, or when a CTA's chunk starts at or past S.
            unsafe {
                launch_step!(
                    kernel<<<grid, block, 0>>>(
                        q, k, v, step, capacity_i, h_i, kv_i, scale, chunk_i, part
                    ),
                    what
                )
            }
        }
    }?;
    let kernel = step_kernel(device, MODULE, "attention_decode_combine")?;
    let heads = grid_dim(shape.heads, MAX_GRID_X, "decode heads")?;
    // SAFETY: the arguments match attention_decode_combine; scratch holds H · splits · (D + 2)
    // f32 written by the launch before it on the same stream, out H·D and lse H elements.
    unsafe {
        launch_step!(
            kernel<<<heads, DECODE_THREADS, 0>>>(part, splits_i, h_i, d_i, out, lse),
            || format!("launching attention_decode_combine ({shape:?})")
        )
    }
}

/// The tensors of a whole-sequence attention forward that its backward reads.
pub struct AttentionSaved<'a> {
    /// (T, H·D) bf16 queries (after RoPE).
    pub q: &'a GpuBuffer<u16>,
    /// (T, KV·D) bf16 keys (after RoPE).
    pub k: &'a GpuBuffer<u16>,
    /// (T, KV·D) bf16 values.
    pub v: &'a GpuBuffer<u16>,
    /// (T, H·D) bf16 forward output.
    pub out: &'a GpuBuffer<u16>,
    /// (H, T) f32 log-sum-exp from the forward.
    pub lse: &'a GpuBuffer<f32>,
}

/// Queues the backward of a whole-sequence (pos0 = 0) forward: `dq (T, H·D)`, `dk, dv
/// (T, KV·D)` bf16 from `dout (T, H·D)`; `delta (H, T)` f32 is scratch. With `batch` > 1,
/// every tensor stacks `batch` sequences as in [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    device: &CudaDevice,
    saved: &AttentionSaved<'_>,
    dout: &GpuBuffer<u16>,
    dq: &mut GpuBuffer<u16>,
    dk: &mut GpuBuffer<u16>,
    dv: &mut GpuBuffer<u16>,
    delta: &mut GpuBuffer<f32>,
    batch: usize,
    shape: AttentionShape,
) -> Result<()> {
    let (h_i, kv_i, scale) = shape.validate()?;
    let rows = rows_of("attention backward q", saved.q.len(), shape.q_width())?;
    let t = rows_per_sequence(rows, batch)?;
    let kv_len = rows * shape.kv_width();
    for (what, len, expected) in [
        ("attention backward out", saved.out.len(), saved.q.len()),
        ("attention backward dout", dout.len(), saved.q.len()),
        ("attention backward dq", dq.len(), saved.q.len()),
        ("attention backward k", saved.k.len(), kv_len),
        ("attention backward v", saved.v.len(), kv_len),
        ("attention backward dk", dk.len(), kv_len),
        ("attention backward dv", dv.len(), kv_len),
        (
            "attention backward lse",
            saved.lse.len(),
            shape.heads * rows,
        ),
        ("attention backward delta", delta.len(), shape.heads * rows),
    ] {
        check_len(what, len, expected)?;
    }
    check_positions(t)?;
    let t_i = to_i64(t, "T")?;
    let d_i = to_i64(shape.head_dim, "head_dim")?;
    let stream = device.stream();
    let (q, k, v, out, lse) = (
        saved.q.device_ptr(),
        saved.k.device_ptr(),
        saved.v.device_ptr(),
        saved.out.device_ptr(),
        saved.lse.device_ptr(),
    );
    let (dout, dq, dk, dv, delta) = (
        dout.device_ptr(),
        dq.device_ptr(),
        dk.device_ptr(),
        dv.device_ptr(),
        delta.device_ptr(),
    );

    let kernel = device.function(MODULE, "attention_backward_delta")?;
    let batch_dim = grid_dim(batch, MAX_GRID_Y, "attention batch")?;
    let grid = GridSize::xy(
        grid_dim(
            (t * shape.heads).div_ceil(WARPS),
            MAX_GRID_X,
            "attention delta",
        )?,
        batch_dim,
    );
    // SAFETY: the arguments match attention_backward_delta; out and dout hold batch·T·H·D
    // elements and delta batch·H·T (checked above); the kernel bounds its (t, h) item by T·H
    // within its sequence.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(out, dout, delta, t_i, h_i, d_i)) }
        .or_device(|| format!("launching attention_backward_delta (T {t}, {shape:?})"))?;

    let tiles = grid_dim(
        t.div_ceil(FORWARD_ROWS_PER_CTA),
        MAX_GRID_X,
        "attention backward",
    )?;
    let name = format!("attention_backward_dq_d{}", shape.head_dim);
    let kernel = device.function(MODULE, &name)?;
    let shared = raise_shared_limit(&kernel, &name, 4 * tile_bytes(shape.head_dim))?;
    let grid = GridSize::xyz(
        tiles,
        grid_dim(shape.heads, MAX_GRID_Y, "heads")?,
        batch_dim,
    );
    // SAFETY: the arguments match attention_backward_dq_d{64,128}; every buffer's length was
    // checked above against batch, T, H, KV and D; T fits the kernel's 32-bit positions, and the
    // kernel bounds rows and keys by T within its sequence; the dynamic shared memory is the Q,
    // dout, K and V tiles the kernel lays out (the limit raised to it).
    unsafe {
        launch!(kernel<<<grid, BlockSize::x(FORWARD_THREADS), shared, stream>>>(
            q, k, v, dout, lse, delta, dq, t_i, h_i, kv_i, scale
        ))
    }
    .or_device(|| format!("launching {name} (T {t}, {shape:?})"))?;

    let name = format!("attention_backward_dkv_d{}", shape.head_dim);
    let kernel = device.function(MODULE, &name)?;
    let grid = GridSize::xyz(
        tiles,
        grid_dim(shape.kv_heads, MAX_GRID_Y, "kv heads")?,
        batch_dim,
    );
    // Own K and V tiles, a query and a dout tile, 64 lse and delta values (DKV_SHARED_BYTES in
    // ptx/attention.cu).
    let shared = raise_shared_limit(
        &kernel,
        &name,
        4 * tile_bytes(shape.head_dim) + 2 * FORWARD_ROWS_PER_CTA * 4,
    )?;
    // SAFETY: the arguments match attention_backward_dkv_d{64,128}; lengths checked as above;
    // the dynamic shared memory is the size the kernel lays out (and the limit was raised to
    // it); each CTA writes only its own 64 key rows of one kv head.
    unsafe {
        launch!(kernel<<<grid, BlockSize::x(FORWARD_THREADS), shared, stream>>>(
            q, k, v, dout, lse, delta, dk, dv, t_i, h_i, kv_i, scale
        ))
    }
    .or_device(|| format!("launching {name} (T {t}, {shape:?})"))
}
