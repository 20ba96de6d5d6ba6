//! The decode step's fused 4-bit GEMVs on the tiled layout (`gemv4_tiled_fused_*` in
//! `ptx/gemv4_tiled.cu`): the operations of [`super::decode`]'s [`gemv4_rows`],
//! [`gemv4_residual`] and [`gemv4_swiglu`] with the same epilogues (LoRA B, residual add,
//! SwiGLU) and the same rounding points, reading a [`Tiled4bit`] copy instead of the
//! bitsandbytes layout. Each CTA copies its LoRA B rows into shared memory before it waits for
//! the previous kernel; [`tiled_fused_fits`] says whether they fit next to x, the slots and
//! the pair table (a large rank does not: the caller then takes the row-major kernels).
//!
//! Unlike the row-major kernels, these also make their adapters' inputs: the RMSNorm of x where
//! a [`TiledNorm`] is given, and z = A x (the LoRA A rows dealt to the CTAs, each CTA's share
//! stored, then the whole z read by every CTA once all have stored theirs). So a decode step
//! needs no norm or LoRA A launch before them.
//!
//! [`gemv4_rows`]: super::decode::gemv4_rows
//! [`gemv4_residual`]: super::decode::gemv4_residual
//! [`gemv4_swiglu`]: super::decode::gemv4_swiglu

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::gemv_tiled::{Tiled4bit, TiledLayout, MAX_ROW_SPACE, TILE_SCALES, UNIT_ROWS};
use super::launch_checks::check_len;
use super::nf4::{opt_in_dynamic_limit, PAIR_TABLE_BYTES};
use super::pdl::{launch_step, step_kernel};
use crate::error::{Error, Result};
use cust::memory::DeviceCopy;

const MODULE: &str = "gemv4_tiled";
/// The fused kernel.
const KERNEL: &str = "gemv4_tiled_fused_bf16";
/// Warps per CTA of the fused kernel that walk the tiles (`FUSED_WARPS`); one more, the LoRA
/// warp, makes z beside them (16 warps, 4 a scheduler: the walk gets 128 registers a thread).
const WARPS: usize = 15;
const THREADS: u32 = (WARPS as u32 + 1) * 32;
/// The modes (`TILED_ROWS`, `TILED_RESIDUAL`, `TILED_SWIGLU`).
const MODE_ROWS: i32 = 0;
const MODE_RESIDUAL: i32 = 1;
const MODE_SWIGLU: i32 = 2;

/// A product's adapter for the tiled fused kernels, which compute `z = A x` themselves.
#[derive(Clone, Copy)]
pub struct TiledLora<'a> {
    /// A (rank, cols) bf16.
    pub a: &'a GpuBuffer<u16>,
    /// B (rows, rank) bf16.
    pub b: &'a GpuBuffer<u16>,
    /// The adapter's rank r >= 1.
    pub rank: usize,
    /// The adapter's scale (alpha / r).
    pub scale: f32,
}

/// The RMSNorm a fused launch applies to its x first (`weight (cols,) f32`, `eps`): the
/// products then read `weight * x / sqrt(mean(x^2) + eps)` rounded to bf16, as
/// `rmsnorm_forward_bf16` writes it.
#[derive(Clone, Copy)]
pub struct TiledNorm<'a> {
    /// The norm's weight (cols,) f32.
    pub weight: &'a GpuBuffer<f32>,
    /// The epsilon under the square root.
    pub eps: f32,
}

/// `TiledMatrix` in ptx/gemv4_tiled.cu: every pointer a device address, 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TiledMatrix {
    lora_b: u64,
    lora_a: u64,
    out: u64,
    rows: i64,
    lora_rank: i32,
    lora_scale: f32,
}

/// `TiledFusedArgs` in ptx/gemv4_tiled.cu, passed by value: 232 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TiledFusedArgs {
    matrix: [TiledMatrix; MAX_ROW_SPACE],
    records: u64,
    table: u64,
    x: u64,
    residual: u64,
    residual_out: u64,
    norm_weight: u64,
    z_rows: u64,
    grid_sync: u64,
    cols: i32,
    units: i32,
    pieces: i32,
    count: i32,
    mode: i32,
    lora_words: i32,
    first_unit: [i32; MAX_ROW_SPACE + 1],
    norm_eps: f32,
}

const _: () = assert!(std::mem::size_of::<TiledMatrix>() == 40);
const _: () = assert!(std::mem::size_of::<TiledFusedArgs>() == 232);

// SAFETY: plain old data (integers and floats, no references): a bitwise copy is what the
// kernel receives as its parameter.
unsafe impl DeviceCopy for TiledFusedArgs {}

/// B rows a unit holds in shared memory: 8 (Split) or 16 (Pair: gate's then up's).
fn b_rows_per_unit(layout: TiledLayout) -> usize {
    match layout {
        TiledLayout::Split => UNIT_ROWS,
        TiledLayout::Pair => 2 * UNIT_ROWS,
    }
}

/// u32 words a B row takes in shared memory for adapters of rank at most `max_rank`: 0
/// without adapters, else at least ceil(max_rank / 2) and `32 / rows` (mod 32), so that the
/// finish's 32 word loads (lane l: row l % rows) fall in 32 distinct banks.
fn lora_words(layout: TiledLayout, max_rank: usize) -> usize {
    if max_rank == 0 {
        return 0;
    }
    let lanes_per_row = 32 / b_rows_per_unit(layout);
    let words = max_rank.div_ceil(2);
    lanes_per_row + words.saturating_sub(lanes_per_row).div_ceil(32) * 32
}

/// The fused kernel's CTAs for `units`: one an SM, at most one a unit.
fn grid(device: &CudaDevice, units: usize) -> usize {
    units.min(device.sm_count() as usize).max(1)
}

/// Dynamic shared memory of a fused CTA of at most `units_per_cta` units: x padded to whole
/// pieces, the slots (16 f32 a unit and warp), z (3 matrices), B (`lora_words` u32 a row), the
/// residual (8 f32 a unit), with a norm of `norm_cols` columns its block_sum scratch (32 f32)
/// and weight (`norm_cols` f32), the CTA's `a_rows_per_cta` LoRA A rows (`cols` bf16 each),
/// then the pair table at a 64 KiB-aligned shared address (up to 64 KiB - 1 of padding before
/// it).
fn fused_shared_bytes(
    layout: TiledLayout,
    (pieces, units_per_cta): (usize, usize),
    words: usize,
    norm_cols: Option<usize>,
    (a_rows_per_cta, cols): (usize, usize),
) -> usize {
    let piece_cols = layout.piece_and_half_offset().0;
    pieces * piece_cols * 2
        + units_per_cta * WARPS * TILE_SCALES * 4
        + MAX_ROW_SPACE * 2 * words * 4
        + units_per_cta * b_rows_per_unit(layout) * words * 4
        + units_per_cta * UNIT_ROWS * 4
        + norm_cols.map_or(0, |cols| (32 + cols) * 4)
        + a_rows_per_cta * cols * 2
        + 2 * PAIR_TABLE_BYTES
        - 1
}

/// The fused kernel's dynamic shared-memory limit (the least of it and its PDL twin), opting
/// them in on first use.
fn shared_limit(device: &CudaDevice, tiled: &Tiled4bit) -> Result<usize> {
    if let Some(limit) = tiled.fused_shared_limit.get() {
        return Ok(*limit);
    }
    let mut limit = usize::MAX;
    for module in [MODULE, "gemv4_tiled_pdl"] {
        if module != MODULE && !device.has_module(module) {
            continue;
        }
        limit = limit.min(opt_in_dynamic_limit(
            device,
            &device.function(module, KERNEL)?,
        )?);
    }
    Ok(*tiled.fused_shared_limit.get_or_init(|| limit))
}

/// The adapters' ranks of a fused launch: the largest (B's shared-memory rows) and their sum (z,
/// and the A rows dealt to the CTAs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraRanks {
    /// The largest rank (0: no adapter).
    pub max: usize,
    /// The ranks summed.
    pub total: usize,
}

impl LoraRanks {
    /// The ranks of `loras`.
    pub fn of(loras: &[Option<TiledLora<'_>>]) -> Self {
        Self::from_ranks(loras.iter().flatten().map(|l| l.rank))
    }

    /// The largest and the sum of `ranks`.
    pub fn from_ranks(ranks: impl Iterator<Item = usize> + Clone) -> Self {
        LoraRanks {
            max: ranks.clone().max().unwrap_or(0),
            total: ranks.sum(),
        }
    }
}

/// The dynamic shared memory a fused launch over `tiled` with adapters of `ranks` (and a norm
/// of x where `normed`) needs, or `None` when it is over the kernels' limit.
fn shared_bytes(
    device: &CudaDevice,
    tiled: &Tiled4bit,
    ranks: LoraRanks,
    normed: bool,
) -> Result<Option<usize>> {
    let (_, _, units, pieces, _) = tiled.kernel_view();
    let ctas = grid(device, units);
    let per_cta = units.div_ceil(ctas);
    let words = lora_words(tiled.layout(), ranks.max);
    let norm_cols = normed.then_some(tiled.cols());
    let a_rows = (ranks.total.div_ceil(ctas), tiled.cols());
    let bytes = fused_shared_bytes(tiled.layout(), (pieces, per_cta), words, norm_cols, a_rows);
    Ok((bytes <= shared_limit(device, tiled)?).then_some(bytes))
}

/// Whether the fused kernels take `tiled` with adapters of `ranks`, with a norm of x where
/// `normed` (their B rows, A rows and the norm's weight fit the shared memory left).
pub fn tiled_fused_fits(
    device: &CudaDevice,
    tiled: &Tiled4bit,
    ranks: LoraRanks,
    normed: bool,
) -> bool {
    matches!(shared_bytes(device, tiled, ranks, normed), Ok(Some(_)))
}

/// The f32 elements of the z buffer a fused launch with these adapters needs (their ranks
/// summed, at least one).
pub fn z_rows_len(loras: &[Option<TiledLora<'_>>]) -> usize {
    LoraRanks::of(loras).total.max(1)
}

/// A fused launch's input: x (cols,) bf16, the norm to apply to it first if any, and the
/// scratch the kernel's CTAs pass z through (`z_rows_len` f32; any contents).
pub struct TiledInput<'a> {
    /// x (cols,) bf16.
    pub x: &'a GpuBuffer<u16>,
    /// The RMSNorm of x the products read instead of x.
    pub norm: Option<TiledNorm<'a>>,
    /// Scratch of [`z_rows_len`] f32.
    pub z_rows: &'a mut GpuBuffer<f32>,
}

/// Queues `out_i (rows_i,) bf16 = W_i u + scale_i · B_i (A_i u)` for the matrices of a Split
/// row space (q, k, v) in one launch, `u` the input (x, or its norm): `loras[i]` is matrix i's
/// adapter, `outs[i]` its output.
pub fn tiled_rows(
    device: &CudaDevice,
    tiled: &Tiled4bit,
    loras: &[Option<TiledLora<'_>>],
    input: TiledInput<'_>,
    outs: &mut [&mut GpuBuffer<u16>],
) -> Result<()> {
    let rows = tiled.matrix_rows();
    if tiled.layout() != TiledLayout::Split || loras.len() != rows.len() || outs.len() != rows.len()
    {
        return Err(Error::invalid(format!(
            "tiled fused gemv: a row space of {} matrices takes as many adapters and outputs \
             (got {} and {})",
            rows.len(),
            loras.len(),
            outs.len()
        )));
    }
    let mut args = base_args(tiled, loras, &input)?;
    args.mode = MODE_ROWS;
    for (i, out) in outs.iter_mut().enumerate() {
        check_len("tiled fused gemv output", out.len(), rows[i])?;
        args.matrix[i].out = out.device_ptr().as_raw();
    }
    launch(device, tiled, &args)
}

/// Queues the product of a block's last linear and the residual add after it: `y (rows,) f32 =
/// residual + bf16(W u + scale · B (A u))`, `y_bf16 = bf16(y)`, for a one-matrix Split copy.
pub fn tiled_residual(
    device: &CudaDevice,
    tiled: &Tiled4bit,
    lora: Option<TiledLora<'_>>,
    input: TiledInput<'_>,
    residual: &GpuBuffer<f32>,
    (y, y_bf16): (&mut GpuBuffer<f32>, &mut GpuBuffer<u16>),
) -> Result<()> {
    let rows = match (tiled.layout(), tiled.matrix_rows()) {
        (TiledLayout::Split, &[rows]) => rows,
        _ => {
            return Err(Error::invalid(
                "tiled fused gemv + residual: takes one Split matrix",
            ))
        }
    };
    let loras = [lora];
    let mut args = base_args(tiled, &loras, &input)?;
    check_len("tiled fused gemv residual", residual.len(), rows)?;
    check_len("tiled fused gemv residual output", y.len(), rows)?;
    check_len("tiled fused gemv residual bf16 output", y_bf16.len(), rows)?;
    args.mode = MODE_RESIDUAL;
    args.residual = residual.device_ptr().as_raw();
    args.residual_out = y.device_ptr().as_raw();
    args.matrix[0].out = y_bf16.device_ptr().as_raw();
    launch(device, tiled, &args)
}

/// Queues gate and up of a Pair copy with SwiGLU: `hidden (F,) bf16 = silu(g) · u` with
/// `g = bf16(W_gate u + ...)` and `u = bf16(W_up u + ...)` (swiglu_forward's expression).
pub fn tiled_swiglu(
    device: &CudaDevice,
    tiled: &Tiled4bit,
    (gate, up): (Option<TiledLora<'_>>, Option<TiledLora<'_>>),
    input: TiledInput<'_>,
    hidden: &mut GpuBuffer<u16>,
) -> Result<()> {
    if tiled.layout() != TiledLayout::Pair {
        return Err(Error::invalid(
            "tiled fused gate/up gemv: takes a Pair copy (Tiled4bit::pack_pair)",
        ));
    }
    let loras = [gate, up];
    let mut args = base_args(tiled, &loras, &input)?;
    check_len(
        "tiled fused SwiGLU output",
        hidden.len(),
        tiled.matrix_rows()[0],
    )?;
    args.mode = MODE_SWIGLU;
    args.matrix[0].out = hidden.device_ptr().as_raw();
    launch(device, tiled, &args)
}

/// The arguments every mode shares, after checking x's width, the norm's, the partials' and
/// each adapter's A and B against its rank.
fn base_args(
    tiled: &Tiled4bit,
    loras: &[Option<TiledLora<'_>>],
    input: &TiledInput<'_>,
) -> Result<TiledFusedArgs> {
    let cols = tiled.cols();
    check_len("tiled fused gemv x", input.x.len(), cols)?;
    let (table, records, units, pieces, first_units) = tiled.kernel_view();
    let ranks = LoraRanks::of(loras);
    if i32::try_from(ranks.total).is_err() {
        return Err(Error::invalid(format!(
            "tiled fused gemv: adapters of ranks summing to {} exceed the kernel's 32-bit count",
            ranks.total
        )));
    }
    check_len("tiled fused gemv z", input.z_rows.len(), z_rows_len(loras))?;
    // Tiled4bit keeps units and cols under 2^31; the ranks are checked below.
    let mut args = TiledFusedArgs {
        records,
        table,
        x: input.x.device_ptr().as_raw(),
        z_rows: input.z_rows.device_ptr().as_raw(),
        grid_sync: tiled.grid_sync_ptr(),
        cols: cols as i32,
        units: units as i32,
        pieces: pieces as i32,
        count: loras.len() as i32, // at most MAX_ROW_SPACE (the callers' checks)
        lora_words: i32::try_from(lora_words(tiled.layout(), ranks.max))
            .map_err(|_| Error::invalid(format!("tiled fused gemv: LoRA rank {}", ranks.max)))?,
        ..TiledFusedArgs::default()
    };
    if let Some(norm) = input.norm {
        check_len("tiled fused gemv norm weight", norm.weight.len(), cols)?;
        if norm.eps.is_nan() || norm.eps < 0.0 {
            return Err(Error::invalid(format!(
                "tiled fused gemv: norm epsilon {} (want a number >= 0)",
                norm.eps
            )));
        }
        args.norm_weight = norm.weight.device_ptr().as_raw();
        args.norm_eps = norm.eps;
    }
    for (i, &first) in first_units.iter().enumerate() {
        args.first_unit[i] = first as i32;
    }
    if tiled.layout() == TiledLayout::Split {
        args.first_unit[loras.len()] = units as i32;
    }
    for (i, (lora, &rows)) in loras.iter().zip(tiled.matrix_rows()).enumerate() {
        let m = &mut args.matrix[i];
        m.rows = rows as i64; // rows * cols elements exist: under 2^63
        let Some(lora) = lora else { continue };
        let rank = i32::try_from(lora.rank)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tiled fused gemv: LoRA rank {} (1 to 2^31 - 1)",
                    lora.rank
                ))
            })?;
        check_len("tiled fused gemv LoRA A", lora.a.len(), lora.rank * cols)?;
        check_len("tiled fused gemv LoRA B", lora.b.len(), rows * lora.rank)?;
        m.lora_a = lora.a.device_ptr().as_raw();
        m.lora_b = lora.b.device_ptr().as_raw();
        m.lora_rank = rank;
        m.lora_scale = lora.scale;
    }
    Ok(args)
}

/// Launches the fused kernel over one CTA an SM.
fn launch(device: &CudaDevice, tiled: &Tiled4bit, args: &TiledFusedArgs) -> Result<()> {
    // The adapters and the norm as base_args wrote them into the arguments.
    let matrices = &args.matrix[..args.count as usize];
    let ranks = LoraRanks::from_ranks(matrices.iter().map(|m| m.lora_rank as usize));
    let normed = args.norm_weight != 0;
    let shared = shared_bytes(device, tiled, ranks, normed)?.ok_or_else(|| {
        Error::invalid(format!(
            "tiled fused gemv: LoRA factors of ranks {ranks:?} do not fit shared memory (check \
             tiled_fused_fits first)"
        ))
    })?;
    let (_, _, units, _, _) = tiled.kernel_view();
    let kernel = step_kernel(device, MODULE, KERNEL)?;
    let ctas = grid(device, units);
    // grid <= the SM count; shared <= the limit, under 2^32.
    let (grid, shared) = (ctas as u32, shared as u32);
    let args = *args;
    // SAFETY: TiledFusedArgs has the layout of the kernel's only parameter (sizes asserted on
    // both sides); the records hold units * pieces tiles packed for these matrices, x holds
    // cols bf16 (and the norm's weight cols f32), every output and the residual the rows of its
    // matrix, each adapter's A rank x cols and B rows x rank values, z_rows one f32 a rank row
    // (base_args and the callers' checks); grid_sync is the copy's two zeroed counters, which
    // the kernel leaves zeroed; the grid is at most one CTA an SM and a unit (its CTAs wait for
    // one another once: they must all be resident, and one CTA takes an SM's shared memory) and
    // the dynamic shared memory is the layout the kernel computes for its largest share of
    // units, within the limit set on the kernel (which re-checks the arguments and its shared
    // memory, writing nothing otherwise).
    unsafe {
        launch_step!(kernel<<<grid, THREADS, shared>>>(args), || format!(
            "launching {KERNEL} ({units} units of {} columns)",
            tiled.cols()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_block_has_the_kernels_offsets() {
        // Offsets of TiledFusedArgs in ptx/gemv4_tiled.cu (static_assert'ed there as 232 bytes).
        let args = TiledFusedArgs::default();
        let base = &args as *const _ as usize;
        let at = |p: *const u8| p as usize - base;
        assert_eq!(at(&args.records as *const _ as *const u8), 120);
        assert_eq!(at(&args.residual_out as *const _ as *const u8), 152);
        assert_eq!(at(&args.norm_weight as *const _ as *const u8), 160);
        assert_eq!(at(&args.z_rows as *const _ as *const u8), 168);
        assert_eq!(at(&args.grid_sync as *const _ as *const u8), 176);
        assert_eq!(at(&args.cols as *const _ as *const u8), 184);
        assert_eq!(at(&args.lora_words as *const _ as *const u8), 204);
        assert_eq!(at(&args.first_unit as *const _ as *const u8), 208);
        assert_eq!(at(&args.norm_eps as *const _ as *const u8), 224);
        let m = TiledMatrix::default();
        let base = &m as *const _ as usize;
        assert_eq!(&m.rows as *const _ as usize - base, 24);
        assert_eq!(&m.lora_scale as *const _ as usize - base, 36);
    }

    #[test]
    fn b_rows_take_words_that_spread_a_warps_loads_over_the_banks() {
        for layout in [TiledLayout::Split, TiledLayout::Pair] {
            let rows = b_rows_per_unit(layout);
            let lanes_per_row = 32 / rows;
            assert_eq!(lora_words(layout, 0), 0);
            for rank in [1, 5, 37, 63, 64, 65, 128, 256] {
                let words = lora_words(layout, rank);
                assert!(
                    2 * words >= rank && words % 32 == lanes_per_row,
                    "{layout:?} r{rank}"
                );
                // The finish: lane l reads word (row l % rows) * words + l / rows (+ j * lpr).
                let mut banks: Vec<usize> = (0..32)
                    .map(|l| ((l % rows) * words + l / rows) % 32)
                    .collect();
                banks.sort_unstable();
                banks.dedup();
                assert_eq!(banks.len(), 32, "{layout:?} r{rank}");
            }
        }
        assert_eq!(lora_words(TiledLayout::Pair, 64), 34);
        assert_eq!(lora_words(TiledLayout::Split, 64), 36);
    }

    #[test]
    fn the_7b_shapes_fit_an_h200_at_rank_128_not_256() {
        // 227 KiB a CTA (Hopper's opt-in), 132 SMs; gate/up and q|k|v normalize their 4096-wide
        // x in the kernel, and each CTA holds ceil(total rank / 132) A rows.
        let limit = 227 * 1024;
        let norm = Some(4096);
        let a_rows = |total: usize, cols: usize| (total.div_ceil(132), cols);
        // gate/up: 11008 rows -> 1376 units, at most 11 a CTA, 64 pieces of 64 columns.
        let gate_up = |r: usize| {
            fused_shared_bytes(
                TiledLayout::Pair,
                (64, 11),
                lora_words(TiledLayout::Pair, r),
                norm,
                a_rows(2 * r, 4096),
            )
        };
        assert_eq!(
            gate_up(64),
            8192 + 11 * 15 * 16 * 4 // 15 walking warps' slots
                + 3 * 68 * 4
                + 11 * 16 * 34 * 4
                + 11 * 8 * 4
                + (32 + 4096) * 4
                + 4096 * 2
                + 2 * 65536
                - 1
        );
        assert!(gate_up(64) <= limit && gate_up(128) <= limit && gate_up(256) > limit);
        // q|k|v: 12288 rows -> 1536 units, at most 12 a CTA, 32 pieces of 128 columns.
        let qkv = |r: usize| {
            fused_shared_bytes(
                TiledLayout::Split,
                (32, 12),
                lora_words(TiledLayout::Split, r),
                norm,
                a_rows(3 * r, 4096),
            )
        };
        assert!(qkv(64) <= limit && qkv(128) <= limit);
        // down: 4096 rows -> 512 units, at most 4 a CTA, 86 pieces of 128 columns, no norm.
        let down = |r: usize| {
            fused_shared_bytes(
                TiledLayout::Split,
                (86, 4),
                lora_words(TiledLayout::Split, r),
                None,
                a_rows(r, 11008),
            )
        };
        assert!(down(64) <= limit && down(128) <= limit);
    }

    #[test]
    fn ranks_are_the_largest_and_the_sum() {
        let ranks = LoraRanks::from_ranks([64, 5, 64].into_iter());
        assert_eq!(
            ranks,
            LoraRanks {
                max: 64,
                total: 133
            }
        );
        let none = LoraRanks::from_ranks(std::iter::empty());
        assert_eq!(none, LoraRanks { max: 0, total: 0 });
    }
}
