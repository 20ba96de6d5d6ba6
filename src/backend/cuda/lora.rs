//! The LoRA adapter's rank-sized products over many rows (kernels in `ptx/lora.cu`): the
//! forward's `z = drop(x) Aᵀ` and the backward's `dz = s dy B` (split over their contraction
//! when the rows alone are too few tiles to fill the GPU), and the factor gradients `dB = s
//! dyᵀ z` and `dA = dzᵀ drop(x)` added straight into their f32 accumulators, and the input
//! gradient's adapter term `dx += drop'(dz A)` in one pass over dx. Every operand is read as
//! stored (no transposed copies) and the dropout mask is applied as the input is loaded (no
//! dropped copy). The CPU oracle is [`crate::backend::gemm::matmul_nt`] on the same operands.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{raise_shared_limit, OrDevice};
use super::launch_checks::{check_len, grid_dim, to_i64};
use crate::error::{Error, Result};
use cust::function::{Function, GridSize};
use cust::launch;
use cust::memory::{DeviceCopy, DevicePointer};
use std::sync::OnceLock;

const MODULE: &str = "lora";

/// A main-loop kernel's C tile (rows x columns), CTA (`TileShape` in ptx/lora.cu) and how its
/// contraction is split (`(length, tiles, SM count) -> (splits, split length)`).
#[derive(Clone, Copy)]
struct Tiling {
    rows: usize,
    cols: usize,
    threads: u32,
    splits: fn(usize, usize, usize) -> (usize, usize),
}

/// A main-loop kernel's two builds (ptx/lora.cu, `ring_stages`): the deep ring (3 K-step slots
/// where a mask rides along, 4 otherwise) and its shallow twin (2 slots), with their dynamic
/// shared memory (`Mainloop::SHARED_BYTES`, which ptx/lora.cu static_asserts).
#[derive(Clone, Copy)]
struct Ring {
    deep: (&'static str, usize),
    shallow: (&'static str, usize),
}

/// z: slots of x, its mask and A.
const DOWN_RING: Ring = Ring {
    deep: ("lora_down_bf16", 107_520),
    shallow: ("lora_down_bf16_2", 71_680),
};
/// dz: slots of dy and B.
const DZ_RING: Ring = Ring {
    deep: ("lora_dz_bf16", 110_592),
    shallow: ("lora_dz_bf16_2", 55_296),
};
/// The gradients: slots of p, q and q's mask, tall and wide tiles.
const GRAD_TALL_RING: Ring = Ring {
    deep: ("lora_grad_partial_tall", 92_160),
    shallow: ("lora_grad_partial_tall_2", 61_440),
};
const GRAD_WIDE_RING: Ring = Ring {
    deep: ("lora_grad_partial_wide", 104_448),
    shallow: ("lora_grad_partial_wide_2", 69_632),
};
/// Shared memory the driver keeps per CTA beside its dynamic share.
const CTA_RESERVED_SHARED: usize = 1024;

/// Set to 1, every LoRA main loop takes its shallow ring (read once): how the shallow builds,
/// the ones sm_80/86/89 run, are checked on an H100/H200 (`SUN_LORA_SHALLOW_RING=1 sun
/// selftest`).
pub const SHALLOW_RING_VARIABLE: &str = "SUN_LORA_SHALLOW_RING";

/// Whether [`SHALLOW_RING_VARIABLE`] is set to 1.
fn shallow_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(SHALLOW_RING_VARIABLE).is_ok_and(|v| v.trim() == "1"))
}

/// The build of `ring` for this GPU, loaded with its shared-memory limit raised: the deep ring
/// where an SM holds two of its CTAs (sm_90: 228 KiB), else the shallow one (an A100's 164 KiB,
/// the 100 KiB of sm_86/sm_89), which fits one CTA on every GPU this backend loads on. Returns
/// the kernel and its launch's shared-memory argument.
fn ring_kernel(device: &CudaDevice, ring: Ring) -> Result<(Function<'_>, u32)> {
    let deep_fits = !shallow_forced()
        && 2 * (ring.deep.1 + CTA_RESERVED_SHARED) <= device.shared_per_sm()
        && ring.deep.1 <= device.shared_per_block_optin();
    let (name, bytes) = if deep_fits { ring.deep } else { ring.shallow };
    let kernel = device.function(MODULE, name)?;
    let shared = raise_shared_limit(&kernel, name, bytes)?;
    Ok((kernel, shared))
}

/// z and dz (T, r), dB (out, r) and any gradient at least as tall as wide: 128 rows by 64
/// columns, 256 threads (`TallTiles`).
const TALL_TILES: Tiling = Tiling {
    rows: 128,
    cols: 64,
    threads: 256,
    splits: wave_splits,
};
/// dA (r, k) and any gradient wider than tall: 64 by 128 columns, 256 threads (`WideTiles`).
const WIDE_TILES: Tiling = Tiling {
    rows: 64,
    cols: 128,
    threads: 256,
    splits: wave_splits,
};
/// CTAs of the main-loop kernels resident on one SM (`LONG_CTAS_PER_SM`: their launch
/// bounds hold them to 128 registers a thread).
const LONG_CTAS_PER_SM: usize = 2;
/// The granule of a split's length: splits start at multiples of 32 (16-byte aligned chunks;
/// the kernels step K by 64, `BK`, and skip a last step's fragments past the split's end, so the
/// splits and their sums are those of the earlier 32-wide step).
const TILE_K: usize = 32;
/// Threads per CTA of the partial sums' reductions.
const REDUCE_THREADS: u32 = 256;
/// The largest grid y and z dimensions.
const MAX_GRID_YZ: usize = 65535;
/// The largest grid x dimension.
const MAX_GRID_X: usize = (1 << 31) - 1;
/// `lora_up_masked_add_bf16`'s CTA (`UP_THREADS`) and its dx tile (`UP_BM` x `UP_BN`).
const UP_THREADS: u32 = 256;
const UP_TILE_ROWS: usize = 64;
const UP_TILE_COLS: usize = 128;

/// A dropout mask over an operand laid out as the operand (`mask[i] == 1` keeps element i,
/// scaled by `keep`).
#[derive(Clone, Copy)]
pub struct Dropout<'a> {
    /// 1 where the element is kept, 0 where it is dropped.
    pub mask: &'a GpuBuffer<u8>,
    /// The scale of a kept element, 1 / (1 - p).
    pub keep: f32,
}

/// The mask's pointer and scale as the kernels take them (null: no dropout), after checking
/// that it covers `len` elements.
fn mask_args(dropout: Option<Dropout<'_>>, len: usize) -> Result<(DevicePointer<u8>, f32)> {
    match dropout {
        Some(d) => {
            check_len("LoRA dropout mask", d.mask.len(), len)?;
            Ok((d.mask.device_ptr(), d.keep))
        }
        None => Ok((DevicePointer::null(), 1.0)),
    }
}

/// The grid of `tiling`'s tiles over C (m, n) with `splits` K-splits.
fn grid(tiling: Tiling, m: usize, n: usize, splits: usize, what: &str) -> Result<GridSize> {
    let x = grid_dim(n.div_ceil(tiling.cols), MAX_GRID_YZ, what)?;
    let y = grid_dim(m.div_ceil(tiling.rows), MAX_GRID_YZ, what)?;
    let z = grid_dim(splits, MAX_GRID_YZ, what)?;
    Ok(GridSize::xyz(x, y, z))
}

/// Every dimension at least 1.
fn check_dims(what: &str, dims: &[(&str, usize)]) -> Result<()> {
    match dims.iter().find(|(_, d)| *d == 0) {
        Some((name, _)) => Err(Error::invalid(format!("{what}: {name} must be at least 1"))),
        None => Ok(()),
    }
}

/// A row product's output: bf16, and the f32 scratch of its split partial sums (at least
/// [`lora_rows_scratch_len`] floats; unused when that is 0).
pub struct RowsOut<'a> {
    /// The (t, r) bf16 result.
    pub out: &'a mut GpuBuffer<u16>,
    /// The partial sums' scratch.
    pub scratch: &'a mut GpuBuffer<f32>,
}

/// Launches a row product kernel (`lora_down_bf16` or `lora_dz_bf16`, both on `TALL_TILES`,
/// arguments built by `launch` from the output pointer, the partials' pointer (null for one
/// split) and the split length), then the partials' reduction when there are several splits.
fn row_product(
    device: &CudaDevice,
    what: &str,
    (t, r, k): (usize, usize, usize),
    rows: RowsOut<'_>,
    launch: impl FnOnce(GridSize, DevicePointer<u16>, DevicePointer<f32>, i64) -> Result<()>,
) -> Result<()> {
    check_len(what, rows.out.len(), t * r)?;
    let (splits, chunk) = splits_for(TALL_TILES, k, (t, r), device.sm_count() as usize);
    let part = if splits > 1 {
        if rows.scratch.len() < splits * t * r {
            return Err(Error::invalid(format!(
                "{what}: {} floats of scratch for {splits} splits of {t} x {r}",
                rows.scratch.len()
            )));
        }
        rows.scratch.device_ptr()
    } else {
        DevicePointer::null()
    };
    let grid = grid(TALL_TILES, t, r, splits, what)?;
    launch(
        grid,
        rows.out.device_ptr(),
        part,
        to_i64(chunk, "split length")?,
    )?;
    if splits == 1 {
        return Ok(());
    }
    let out = rows.out.device_ptr();
    // SAFETY: part holds splits * t * r floats, all written by the launch above, and the output
    // t * r elements (checked above).
    unsafe { reduce_splits(device, "lora_rows_reduce_bf16", part, splits, t * r, out) }
}

/// Launches `kernel` (`lora_grad_reduce` or `lora_rows_reduce_bf16`: `out[i] (+)= Σ_s part[s *
/// len + i]`) over `len` outputs.
///
/// # Safety
/// `part` must hold `splits * len` floats written by work queued before, and `out` `len`
/// elements of the kernel's output type.
unsafe fn reduce_splits<T: DeviceCopy>(
    device: &CudaDevice,
    kernel: &str,
    part: DevicePointer<f32>,
    splits: usize,
    len: usize,
    out: DevicePointer<T>,
) -> Result<()> {
    let blocks = grid_dim(
        len.div_ceil(REDUCE_THREADS as usize).min(4096),
        MAX_GRID_YZ,
        kernel,
    )?;
    let (splits_i, len_i) = (to_i64(splits, "splits")?, to_i64(len, "length")?);
    let function = device.function(MODULE, kernel)?;
    let stream = device.stream();
    // SAFETY: the arguments match both reductions in ptx/lora.cu (part, splits, len, out); the
    // caller guarantees the buffers' sizes, and the kernel bounds its index by len.
    unsafe { launch!(function<<<blocks, REDUCE_THREADS, 0, stream>>>(part, splits_i, len_i, out)) }
        .or_device(|| format!("launching {kernel} ({len} elements)"))
}

/// Queues `z (t, r) = alpha · drop(x) (t, k) · A (r, k)ᵀ` (bf16): the adapter's first product.
pub fn lora_down(
    device: &CudaDevice,
    x: &GpuBuffer<u16>,
    dropout: Option<Dropout<'_>>,
    a: &GpuBuffer<u16>,
    z: RowsOut<'_>,
    (t, r, k): (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    let what = "LoRA z = x Aᵀ";
    check_dims(what, &[("rows", t), ("rank", r), ("input width", k)])?;
    check_len("LoRA input", x.len(), t * k)?;
    check_len("LoRA A", a.len(), r * k)?;
    let (mask, keep) = mask_args(dropout, t * k)?;
    let (t_i, r_i, k_i) = (to_i64(t, "rows")?, to_i64(r, "rank")?, to_i64(k, "width")?);
    let (kernel, shared) = ring_kernel(device, DOWN_RING)?;
    let stream = device.stream();
    let (x, a) = (x.device_ptr(), a.device_ptr());
    let threads = TALL_TILES.threads;
    row_product(device, what, (t, r, k), z, |grid, z, part, chunk| {
        // SAFETY: the arguments match lora_down_bf16 in ptx/lora.cu; x, A, z (and the mask,
        // when given) hold t * k, r * k, t * r (t * k) elements (checked above), part (when not
        // null) splits * t * r floats; the kernel bounds every access by t, r, k and its split;
        // the dynamic shared memory is its ring (the limit raised to it).
        unsafe {
            launch!(kernel<<<grid, threads, shared, stream>>>(
                x, mask, keep, a, z, part, t_i, r_i, k_i, chunk, alpha
            ))
        }
        .or_device(|| format!("launching {what} (t {t}, r {r}, k {k})"))
    })
}

/// Queues `dz (t, r) = alpha · dy (t, k) · B (k, r)` (bf16): the gradient of the adapter's
/// middle activation, B being the adapter's (out, r) factor.
pub fn lora_dz(
    device: &CudaDevice,
    dy: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    dz: RowsOut<'_>,
    (t, r, k): (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    let what = "LoRA dz = dy B";
    check_dims(what, &[("rows", t), ("rank", r), ("output width", k)])?;
    check_len("LoRA output gradient", dy.len(), t * k)?;
    check_len("LoRA B", b.len(), k * r)?;
    let (t_i, r_i, k_i) = (to_i64(t, "rows")?, to_i64(r, "rank")?, to_i64(k, "width")?);
    let (kernel, shared) = ring_kernel(device, DZ_RING)?;
    let stream = device.stream();
    let (dy, b) = (dy.device_ptr(), b.device_ptr());
    let threads = TALL_TILES.threads;
    row_product(device, what, (t, r, k), dz, |grid, dz, part, chunk| {
        // SAFETY: the arguments match lora_dz_bf16 in ptx/lora.cu; dy, B, dz hold t * k,
        // k * r, t * r elements (checked above), part (when not null) splits * t * r floats;
        // the kernel bounds every access by t, r, k and its split; the dynamic shared memory
        // is its ring (the limit raised to it).
        unsafe {
            launch!(kernel<<<grid, threads, shared, stream>>>(
                dy, b, dz, part, t_i, r_i, k_i, chunk, alpha
            ))
        }
        .or_device(|| format!("launching {what} (t {t}, r {r}, k {k})"))
    })
}

/// The splits of the main-loop kernels (two CTAs an SM): as many as fill one wave of resident
/// CTAs and no more (a second wave's few CTAs would take as long as the first).
pub(crate) fn wave_splits(k: usize, tiles: usize, sm_count: usize) -> (usize, usize) {
    split_length(k, (LONG_CTAS_PER_SM * sm_count / tiles.max(1)).max(1))
}

/// `wanted` splits of a contraction of length `k` (fewer where each would be under 256 long:
/// 8 granules), and the length of each.
fn split_length(k: usize, wanted: usize) -> (usize, usize) {
    let most = k.div_ceil(8 * TILE_K).max(1);
    let splits = wanted.clamp(1, most.min(MAX_GRID_YZ));
    let chunk = k.div_ceil(splits).div_ceil(TILE_K) * TILE_K;
    (k.div_ceil(chunk), chunk)
}

/// The splits of a contraction of length `k` into a (m, n) output on `tiling`'s kernel.
fn splits_for(tiling: Tiling, k: usize, (m, n): (usize, usize), sm_count: usize) -> (usize, usize) {
    let tiles = m.div_ceil(tiling.rows) * n.div_ceil(tiling.cols);
    (tiling.splits)(k, tiles, sm_count)
}

/// The kernel of a gradient (m, n): the wide tiles where it is wider than tall (dA: (r, in)),
/// the tall ones otherwise (dB: (out, r)); with its ring.
fn grad_kernel(m: usize, n: usize) -> (Ring, Tiling) {
    if n > m {
        (GRAD_WIDE_RING, WIDE_TILES)
    } else {
        (GRAD_TALL_RING, TALL_TILES)
    }
}

/// The f32 scratch [`lora_grad`] needs for a gradient `(m, n)` over `t` rows on `device`.
pub fn lora_grad_scratch_len(device: &CudaDevice, t: usize, (m, n): (usize, usize)) -> usize {
    let (_, tiling) = grad_kernel(m, n);
    splits_for(tiling, t, (m, n), device.sm_count() as usize).0 * m * n
}

/// The f32 scratch [`lora_down`] and [`lora_dz`] need for a (t, r) output contracted over `k`
/// on `device` (the same for both: one tiling, one split rule): the split partial sums, none
/// (0) when one split does.
pub fn lora_rows_scratch_len(device: &CudaDevice, (t, r, k): (usize, usize, usize)) -> usize {
    match splits_for(TALL_TILES, k, (t, r), device.sm_count() as usize) {
        (1, _) => 0,
        (splits, _) => splits * t * r,
    }
}

/// Queues `g (m, n) += alpha · p (t, m)ᵀ · drop(q) (t, n)` into an f32 accumulator, the rows
/// split over CTAs and their partial sums added in a fixed order (the same result on every
/// run). `scratch` holds at least [`lora_grad_scratch_len`] floats. With p = dy, q = z it is
/// dB (scaled by the adapter's scale); with p = dz, q = x and the dropout mask, dA.
#[allow(clippy::too_many_arguments)]
pub fn lora_grad(
    device: &CudaDevice,
    p: &GpuBuffer<u16>,
    q: &GpuBuffer<u16>,
    dropout: Option<Dropout<'_>>,
    g: &mut GpuBuffer<f32>,
    (t, m, n): (usize, usize, usize),
    alpha: f32,
    scratch: &mut GpuBuffer<f32>,
) -> Result<()> {
    check_dims("LoRA gradient", &[("rows", t), ("m", m), ("n", n)])?;
    check_len("LoRA gradient left operand", p.len(), t * m)?;
    check_len("LoRA gradient right operand", q.len(), t * n)?;
    check_len("LoRA gradient accumulator", g.len(), m * n)?;
    let (mask, keep) = mask_args(dropout, t * n)?;
    let (ring, tiling) = grad_kernel(m, n);
    let (splits, chunk) = splits_for(tiling, t, (m, n), device.sm_count() as usize);
    if scratch.len() < splits * m * n {
        return Err(Error::invalid(format!(
            "LoRA gradient scratch: {} floats for {splits} splits of {m} x {n}",
            scratch.len()
        )));
    }
    let grid = grid(tiling, m, n, splits, "LoRA gradient")?;
    let (t_i, m_i, n_i) = (to_i64(t, "rows")?, to_i64(m, "m")?, to_i64(n, "n")?);
    let chunk_i = to_i64(chunk, "rows per split")?;
    let (kernel, shared) = ring_kernel(device, ring)?;
    let stream = device.stream();
    let (p, q, part) = (p.device_ptr(), q.device_ptr(), scratch.device_ptr());
    let threads = tiling.threads;
    // SAFETY: the arguments match lora_grad_partial_tall and _wide in ptx/lora.cu
    // (launched with their tiling's threads and ring); p, q (and the mask) hold t * m, t * n
    // (t * n) elements, scratch at least splits * m * n (checked above); split s reads rows
    // [s * chunk, min(t, (s + 1) * chunk)) and writes its own m * n slice.
    unsafe {
        launch!(kernel<<<grid, threads, shared, stream>>>(
            p, q, mask, keep, part, t_i, m_i, n_i, chunk_i, alpha
        ))
    }
    .or_device(|| format!("launching the LoRA gradient (t {t}, {m} x {n}, {splits} splits)"))?;
    // SAFETY: part holds splits * m * n floats, all written above, and g m * n (checked above).
    unsafe {
        reduce_splits(
            device,
            "lora_grad_reduce",
            part,
            splits,
            m * n,
            g.device_ptr(),
        )
    }
}

/// Queues `dx (t, n) += drop'(dz (t, r) · A (r, n))` in one pass over dx: where a dropout is
/// given, `dx = bf16(dx + keep · bf16(dz A))` at the elements its mask keeps (the others
/// unchanged); without one, `dx = bf16(dx + dz A)` everywhere. The backward's input-gradient
/// term of an adapter whose input was `drop(x)`, with no (t, n) scratch.
pub fn lora_up_masked_add(
    device: &CudaDevice,
    dz: &GpuBuffer<u16>,
    a: &GpuBuffer<u16>,
    dropout: Option<Dropout<'_>>,
    dx: &mut GpuBuffer<u16>,
    (t, r, n): (usize, usize, usize),
) -> Result<()> {
    let what = "LoRA dx += drop'(dz A)";
    check_dims(what, &[("rows", t), ("rank", r), ("input width", n)])?;
    check_len("LoRA dz", dz.len(), t * r)?;
    check_len("LoRA A", a.len(), r * n)?;
    check_len("LoRA input gradient", dx.len(), t * n)?;
    let (mask, keep) = mask_args(dropout, t * n)?;
    let grid = GridSize::xy(
        grid_dim(n.div_ceil(UP_TILE_COLS), MAX_GRID_X, what)?,
        grid_dim(t.div_ceil(UP_TILE_ROWS), MAX_GRID_YZ, what)?,
    );
    let (t_i, r_i, n_i) = (to_i64(t, "rows")?, to_i64(r, "rank")?, to_i64(n, "width")?);
    let kernel = device.function(MODULE, "lora_up_masked_add_bf16")?;
    let stream = device.stream();
    let (dz, a, dx) = (dz.device_ptr(), a.device_ptr(), dx.device_ptr());
    // SAFETY: the arguments match lora_up_masked_add_bf16 in ptx/lora.cu; dz, A, dx (and the
    // mask, when given) hold t * r, r * n, t * n (t * n) elements (checked above), dz and A are
    // distinct from dx (a shared and a mutable borrow); the kernel bounds every access by t, r
    // and n, and each dx element is read and written by one thread.
    unsafe {
        launch!(kernel<<<grid, UP_THREADS, 0, stream>>>(
            dz, a, mask, keep, dx, t_i, r_i, n_i
        ))
    }
    .or_device(|| format!("launching {what} (t {t}, r {r}, n {n})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_tiles_fill_one_wave() {
        let sms = 132;
        for &(k, tiles) in &[
            (4096, 64),
            (11008, 64),
            (8192, 32),
            (8192, 86),
            (576, 64),
            (7, 300),
        ] {
            let (splits, chunk) = wave_splits(k, tiles, sms);
            assert!(
                splits * tiles <= LONG_CTAS_PER_SM * sms || splits == 1,
                "{k} {tiles}"
            );
            assert!(chunk % TILE_K == 0 && splits * chunk >= k && (splits - 1) * chunk < k);
        }
        // z at 8192 rows (64 tall tiles): 4 splits, 256 CTAs of the 264 one wave holds.
        assert_eq!(wave_splits(4096, 64, sms), (4, 1024));
        assert_eq!(wave_splits(11008, 64, sms), (4, 2752));
        // dA (64, 4096) over 8192 rows: 32 wide tiles, 8 splits; (64, 11008): 86 tiles, 3.
        assert_eq!(wave_splits(8192, 32, sms), (8, 1024));
        assert_eq!(wave_splits(8192, 86, sms), (3, 2752));
        // SmolLM2's z over 576 inputs: at most 3 splits of at least 256.
        assert_eq!(wave_splits(576, 64, sms), (3, 192));
    }

    #[test]
    fn gradients_wider_than_tall_take_the_wide_tiles() {
        assert_eq!(grad_kernel(64, 4096).0.deep.0, "lora_grad_partial_wide");
        assert_eq!(grad_kernel(4096, 64).0.deep.0, "lora_grad_partial_tall");
        assert_eq!(grad_kernel(64, 64).0.deep.0, "lora_grad_partial_tall");
    }

    #[test]
    fn every_ring_has_a_shallow_twin_that_fits_sm_86_and_89() {
        // The shallow build is name + "_2" and fits the 99 KiB a CTA of sm_86/sm_89; the deep
        // one holds two CTAs on sm_90's 228 KiB SM.
        for ring in [DOWN_RING, DZ_RING, GRAD_TALL_RING, GRAD_WIDE_RING] {
            assert_eq!(ring.shallow.0, format!("{}_2", ring.deep.0));
            assert!(ring.shallow.1 <= 99 * 1024);
            assert!(2 * (ring.deep.1 + CTA_RESERVED_SHARED) <= 228 * 1024);
        }
    }

    #[test]
    fn dz_and_db_fill_one_wave_of_tall_tiles() {
        let sms = 132;
        // dz (8192, 64) = dy B over 4096 or 11008 outputs: z's 64 tall tiles and splits.
        assert_eq!(splits_for(TALL_TILES, 4096, (8192, 64), sms), (4, 1024));
        assert_eq!(splits_for(TALL_TILES, 11008, (8192, 64), sms), (4, 2752));
        // dB (4096, 64) over 8192 rows: 32 tall tiles, 8 splits (256 CTAs); (11008, 64): 86
        // tiles, 3 splits (258 CTAs), as dA's wide tiles at the transposed shapes.
        let (ring, tiling) = grad_kernel(4096, 64);
        assert_eq!(ring.deep.0, "lora_grad_partial_tall");
        assert_eq!(splits_for(tiling, 8192, (4096, 64), sms), (8, 1024));
        assert_eq!(splits_for(tiling, 8192, (11008, 64), sms), (3, 2752));
        // The same split counts as dA's, so one gradient scratch serves both.
        assert_eq!(
            splits_for(tiling, 8192, (11008, 64), sms),
            splits_for(WIDE_TILES, 8192, (64, 11008), sms)
        );
    }
}
