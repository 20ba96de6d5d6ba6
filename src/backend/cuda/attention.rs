//! Causal grouped-query attention on the GPU, flash style: the forward (whole sequences, chunks
//! at a cache offset) keeps each row's log-sum-exp, and the backward recomputes the
//! probabilities from it; a decode step (one row: RoPE, the cache write and the attention over
//! the cache) is one kernel (kernels in `ptx/attention.cu`; the CPU oracle is
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
/// Positions one recorded decode step serves ([`DecodePosition::Step`]): the grid of
/// [`attention_decode`] is the same for every cache length in a run of this many.
pub const DECODE_CHUNK: usize = 256;
/// Keys a split of a decode step's attention (flash decoding; `DECODE_SPLIT` in the kernel).
const DECODE_SPLIT: usize = 32;
/// The most CTAs a query head of a decode step (`DECODE_HEAD_CTAS`): past this many splits a
/// CTA takes several, one after another.
const DECODE_HEAD_CTAS: usize = 16;
const _: () = assert!(
    DECODE_CHUNK % DECODE_SPLIT == 0,
    "a recorded grid holds whole splits"
);
/// The splits of the whole chunks that hold `cached_rows` keys: what a recorded grid is sized
/// for, so that it serves every position of its chunk.
fn chunk_splits(cached_rows: usize) -> usize {
    cached_rows.div_ceil(DECODE_CHUNK) * (DECODE_CHUNK / DECODE_SPLIT)
}
/// The CTAs a head of a decode step's grid for `cached_rows` keys: one a split of the chunks,
/// at most DECODE_HEAD_CTAS (the CTAs past the splits a position needs return at once).
fn decode_ctas(cached_rows: usize) -> usize {
    chunk_splits(cached_rows).min(DECODE_HEAD_CTAS)
}
/// The splits' stages in a decode CTA's shared memory: 2 (one split's copies in flight while
/// it works on the one before) where some position of the chunk gives a CTA several splits.
fn decode_stages(cached_rows: usize) -> usize {
    if chunk_splits(cached_rows) > DECODE_HEAD_CTAS {
        2
    } else {
        1
    }
}
/// Bytes of one stage (`DecodeStage<D>`): a split's K and V rows, bf16 at pitch D + 8.
fn decode_stage_bytes(head_dim: usize) -> usize {
    2 * DECODE_SPLIT * (head_dim + 8) * 2
}

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

    /// Values of a query row: H·D.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values of a key (or value) row: KV·D.
    pub fn kv_width(&self) -> usize {
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

/// f32 scratch values of the partial results [`attention_decode`] needs for a cache of
/// `cached_rows` rows (one partial of D + 2 values a head and CTA of the grid).
pub fn decode_scratch_len(cached_rows: usize, shape: AttentionShape) -> usize {
    shape.heads * decode_ctas(cached_rows) * (shape.head_dim + 2)
}

/// Where a decode step's row sits in its KV cache.
#[derive(Clone, Copy)]
pub enum DecodePosition<'a> {
    /// At this position, given now.
    At(usize),
    /// At the position held in `step` (one i64) when the kernel runs: a decode step that a
    /// recorded graph replays at every position. `recorded` is its value when the launch is
    /// queued; it sets the number of key chunks (the grid) and the partials' size, which stay
    /// right for every position with as many chunks. The caller keeps `*step` inside the
    /// cache; a position outside it, or one needing another chunk count, makes the kernel do
    /// nothing.
    Step {
        /// The position, in device memory.
        step: &'a GpuBuffer<i64>,
        /// Its value now.
        recorded: usize,
    },
}

impl DecodePosition<'_> {
    /// The position as the host knows it.
    fn host(&self) -> usize {
        match *self {
            DecodePosition::At(pos) | DecodePosition::Step { recorded: pos, .. } => pos,
        }
    }
}

/// A decode step's new row, straight from its projections (before RoPE).
pub struct DecodeRow<'a> {
    /// (H·D) bf16 query.
    pub q: &'a GpuBuffer<u16>,
    /// (KV·D) bf16 key.
    pub k: &'a GpuBuffer<u16>,
    /// (KV·D) bf16 value.
    pub v: &'a GpuBuffer<u16>,
}

/// A layer's KV cache and the RoPE angles of its positions.
pub struct DecodeCache<'a> {
    /// (positions, KV·D) bf16 keys after RoPE.
    pub keys: &'a mut GpuBuffer<u16>,
    /// (positions, KV·D) bf16 values.
    pub values: &'a mut GpuBuffer<u16>,
    /// (positions, D/2) f32 cosines of every position's angles.
    pub cos: &'a GpuBuffer<f32>,
    /// (positions, D/2) f32 sines.
    pub sin: &'a GpuBuffer<f32>,
}

/// The device memory a decode step works in besides its inputs and outputs.
pub struct DecodeScratch<'a> {
    /// [`decode_scratch_len`] f32 of partial results (unused when the keys fit one chunk).
    pub partials: &'a mut GpuBuffer<f32>,
    /// H u32 arrival counters, all zero before the first launch; every launch leaves them
    /// zero, so one buffer serves every layer and step queued on one stream.
    pub arrivals: &'a mut GpuBuffer<u32>,
}

/// Queues a whole decode step's attention in one kernel: the row `row` (q, k, v before RoPE)
/// at position `pos` ([`DecodePosition`]) rotated by the cache's angles at `pos`, its rotated
/// key and its value written into row `pos` of the cache, and `out (H·D)` bf16 and `lse (H)`
/// f32 of the rotated query attending to the cache's rows `0..=pos` (rows before `pos` written
/// by earlier steps). `q` and `k` are left as they came. What [`super::rope::rope_qk_into_cache`]
/// followed by [`attention_forward`] with T = 1 at `pos0 = pos` computes: the keys in splits
/// of 32 (flash decoding) over at most 16 CTAs a head, each staging its first keys' rows before
/// the previous kernel ends, the last CTA of each head merging their partials in a fixed order
/// (deterministic).
pub fn attention_decode(
    device: &CudaDevice,
    row: DecodeRow<'_>,
    cache: DecodeCache<'_>,
    at: DecodePosition<'_>,
    (out, lse): (&mut GpuBuffer<u16>, &mut GpuBuffer<f32>),
    shape: AttentionShape,
    scratch: DecodeScratch<'_>,
) -> Result<()> {
    let (h_i, kv_i, scale) = shape.validate()?;
    let DecodeRow { q, k, v } = row;
    let DecodeCache {
        keys,
        values,
        cos,
        sin,
    } = cache;
    let DecodeScratch { partials, arrivals } = scratch;
    check_len("decode query", q.len(), shape.q_width())?;
    check_len("decode key", k.len(), shape.kv_width())?;
    check_len("decode value", v.len(), shape.kv_width())?;
    check_len("decode output", out.len(), shape.q_width())?;
    check_len("decode lse", lse.len(), shape.heads)?;
    check_len("decode arrival counters", arrivals.len(), shape.heads)?;
    let cache_rows = rows_of("decode key cache", keys.len(), shape.kv_width())?;
    check_len("decode value cache", values.len(), keys.len())?;
    let table_rows = rows_of("decode RoPE cos table", cos.len(), shape.head_dim / 2)?;
    check_len("decode RoPE sin table", sin.len(), cos.len())?;
    // The positions that the caches and the angle tables all hold.
    let positions = cache_rows.min(table_rows);
    let pos = at.host();
    if pos >= positions {
        return Err(Error::invalid(format!(
            "decode: position {pos} is outside a cache (and angle table) of {positions} positions"
        )));
    }
    let cached_rows = pos + 1;
    check_positions(cached_rows)?;
    check_len(
        "decode partials",
        partials.len(),
        decode_scratch_len(cached_rows, shape),
    )?;
    let grid = GridSize::xy(
        grid_dim(shape.heads, MAX_GRID_X, "decode heads")?,
        grid_dim(decode_ctas(cached_rows), MAX_GRID_Y, "decode CTAs a head")?,
    );
    let stages = decode_stages(cached_rows);
    let shared = u32::try_from(stages * decode_stage_bytes(shape.head_dim))
        .map_err(|_| Error::invalid("decode: the attention stages overflow shared memory"))?;
    let stages_i = stages as i32;
    let (q, k, v) = (q.device_ptr(), k.device_ptr(), v.device_ptr());
    let (cos, sin) = (cos.device_ptr(), sin.device_ptr());
    let (keys, values) = (keys.device_ptr(), values.device_ptr());
    let (out, lse) = (out.device_ptr(), lse.device_ptr());
    let (part, arrived) = (partials.device_ptr(), arrivals.device_ptr());
    let name = match at {
        DecodePosition::At(_) => format!("attention_decode_fused_d{}", shape.head_dim),
        DecodePosition::Step { .. } => format!("attention_decode_fused_step_d{}", shape.head_dim),
    };
    // Both kernels with PDL while a decode step's launches are on.
    let kernel = step_kernel(device, MODULE, &name)?;
    let block = BlockSize::x(DECODE_THREADS);
    let what = || format!("launching {name} (position {pos}, {shape:?})");
    match at {
        DecodePosition::At(_) => {
            let pos_i = to_i64(pos, "position")?;
            // SAFETY: the arguments match attention_decode_fused_d{64,128} in ptx/attention.cu
            // (head_dim picks the entry point); q and out hold H·D elements, k and v KV·D, the
            // caches and angle tables more than `pos` rows of theirs, lse and arrivals H
            // values, partials H · G · (D + 2) f32 for the grid's G CTAs a head (checked
            // above); the kernel spreads the ceil((pos + 1) / 32) splits over G CTAs, those past
            // them return, so every CTA's keys lie in 0..=pos; `shared` holds `stages` of the
            // kernel's DecodeStage<D> (34 KB at most, under the 48 KB default); the kernel
            // writes cache row pos only, from one CTA a kv head.
            unsafe {
                launch_step!(
                    kernel<<<grid, block, shared>>>(
                        q, k, v, cos, sin, keys, values, pos_i, h_i, kv_i, scale, stages_i,
                        part, arrived, out, lse
                    ),
                    what
                )
            }
        }
        DecodePosition::Step { step, .. } => {
            check_len("decode step", step.len(), 1)?;
            let positions_i = to_i64(positions, "positions")?;
            let chunk_i = to_i64(DECODE_CHUNK, "chunk")?;
            let step = step.device_ptr();
            // SAFETY: as above for attention_decode_fused_step_d{64,128}, which reads the
            // position from `step` (one i64) and does nothing when it is outside 0..positions
            // (the rows the caches and the tables all hold) or needs another grid than this
            // one (the one for its chunk of `chunk` = DECODE_CHUNK positions, which also sets
            // `stages`), so its keys, partials and cache row stay inside the checked sizes.
            unsafe {
                launch_step!(
                    kernel<<<grid, block, shared>>>(
                        q, k, v, cos, sin, keys, values, step, positions_i, h_i, kv_i, scale,
                        chunk_i, stages_i, part, arrived, out, lse
                    ),
                    what
                )
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode grid, replayed with the kernel's own split arithmetic at every cache length
    /// of the first 16 chunks: every split has a CTA of the grid, a recorded grid fits every
    /// position of its chunk, and two stages are there wherever a CTA takes several splits.
    #[test]
    fn decode_grid_covers_every_split_of_its_chunk() {
        for s in 1..=16 * DECODE_CHUNK {
            let grid = decode_ctas(s);
            assert!((1..=DECODE_HEAD_CTAS).contains(&grid), "S {s}");
            // The kernel: n splits, k a CTA, ceil(n / k) CTAs working.
            let n = s.div_ceil(DECODE_SPLIT);
            let per_cta = n.div_ceil(grid);
            assert!(n.div_ceil(per_cta) <= grid, "S {s}");
            if per_cta > 1 {
                assert_eq!(decode_stages(s), 2, "S {s}");
            }
            // The step entry's check: min(ceil(S / chunk) * chunk / 32, 16) is the grid.
            let chunk_first = (s - 1) / DECODE_CHUNK * DECODE_CHUNK + 1;
            assert_eq!(decode_ctas(chunk_first), grid, "S {s}");
            assert_eq!(decode_stages(chunk_first), decode_stages(s), "S {s}");
        }
        assert_eq!((decode_ctas(160), decode_stages(160)), (8, 1));
        assert_eq!((decode_ctas(512), decode_stages(512)), (16, 1));
        assert_eq!((decode_ctas(513), decode_stages(513)), (16, 2));
    }
}
