//! The batch-1 4-bit GEMV on weights repacked into tensor-core tiles: [`Tiled4bit`], a copy of a
//! [`Gpu4bit`] in the decode layout of `ptx/gemv4_tiled.cu` (whose header defines it), made on the
//! GPU. Every tile is 512 contiguous bytes that a warp reads with one 16-byte load a lane, and
//! whose bytes are already the mma's A fragments; its 16 absmax follow in one 64-byte piece.
//!
//! A copy holds one matrix, a row space of up to three matrices of one width (q, k, v: each
//! padded to whole units of 8 rows, one after the other) or gate and up as pairs
//! ([`TiledLayout`]); the decode step's fused kernels (`backend::cuda::decode_tiled`) read the
//! last two.
//!
//! The copy costs the tensor's code bytes again plus 4 bytes of scale per 64 weights (the double
//! quant is decoded once, when packing), so it is made only for generation
//! ([`Gpu4bit::prepare_tiled_gemv`], the model's tiled decode layers); training keeps the
//! bitsandbytes layout alone.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::nf4::{opt_in_dynamic_limit, GpuAbsmax, ScaleArgs, PAIR_TABLE_BYTES};
use super::Gpu4bit;
use crate::error::{Error, Result};
use cust::launch;
use std::sync::OnceLock;

const MODULE: &str = "gemv4_tiled";
/// Output rows per unit (`UNIT_ROWS`), columns per tile (`PIECE_COLS`) and per half
/// (`HALF_COLS`), bytes and scales per tile.
pub(super) const UNIT_ROWS: usize = 8;
const PIECE_COLS: usize = 128;
pub(super) const HALF_COLS: usize = 64;
pub(super) const TILE_SCALES: usize = 16;
/// A tile's record: 512 bytes of codes, then its 16 f32 scales (`RECORD_BYTES`).
const RECORD_BYTES: usize = 576;
/// Threads per CTA of the packing kernels (`PACK_THREADS`).
const PACK_THREADS: usize = 256;

/// A build of the GEMV in `ptx/gemv4_tiled.cu`: its entry point, warps per CTA, and whether it
/// keeps its two x fragments in registers (it then takes only matrices of `2 * warps` pieces).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TiledVariant {
    /// The kernel's entry point.
    pub name: &'static str,
    /// Warps per CTA (one CTA an SM).
    pub warps: usize,
    /// x in registers: only for `pieces == 2 * warps`.
    pub x_cached: bool,
}

const fn variant(name: &'static str, warps: usize, x_cached: bool) -> TiledVariant {
    TiledVariant {
        name,
        warps,
        x_cached,
    }
}

impl TiledVariant {
    /// Whether the build takes a matrix of `cols` columns.
    pub fn takes(self, cols: usize) -> bool {
        !self.x_cached || cols.div_ceil(PIECE_COLS) == 2 * self.warps
    }
}

/// Every build; [`Tiled4bit::gemv_bf16`] runs the first that takes the matrix.
pub const TILED_VARIANTS: [TiledVariant; 3] = [
    variant("gemv4_tiled_xcache_bf16", 16, true),
    variant("gemv4_tiled_bf16", 16, false),
    variant("gemv4_tiled_w32_r2_bf16", 32, false),
];

/// How a tile's two halves of 64 columns are arranged (`ptx/gemv4_tiled.cu`'s header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TiledLayout {
    /// Both halves are one row of one matrix, 128 columns a tile: one matrix, or a row space of
    /// up to three of the same width (q, k, v), each padded to whole units of 8 rows.
    Split,
    /// Half 0 is a row of gate, half 1 the same row of up, over the same 64 columns: the unit's
    /// halves are two products, not one.
    Pair,
}

impl TiledLayout {
    /// (columns a tile covers, column offset of half 1): the pack kernels' `piece_cols` and
    /// `half_offset`.
    pub(crate) fn piece_and_half_offset(self) -> (usize, usize) {
        match self {
            TiledLayout::Split => (PIECE_COLS, HALF_COLS),
            TiledLayout::Pair => (HALF_COLS, 0),
        }
    }

    /// Tiles per unit for `cols` columns.
    pub(crate) fn pieces(self, cols: usize) -> usize {
        cols.div_ceil(self.piece_and_half_offset().0)
    }

    /// Device bytes of the records of `units` units of `cols` columns.
    pub(crate) fn bytes(self, units: usize, cols: usize) -> usize {
        units * self.pieces(cols) * RECORD_BYTES
    }
}

/// Matrices one row space holds (`TILED_MAX_MATRICES`).
pub(crate) const MAX_ROW_SPACE: usize = 3;

/// 4-bit matrices of one width in the tiled decode layout: one matrix or a row space
/// ([`TiledLayout::Split`]), or gate and up ([`TiledLayout::Pair`]).
pub struct Tiled4bit {
    /// (tiles, 576) bytes: each tile's codes, then its scales.
    records: GpuBuffer<u8>,
    table: GpuBuffer<f32>,
    table_values: [f32; 16],
    layout: TiledLayout,
    /// Per matrix (Split) or per half (Pair): its rows; Split matrix i's units start at
    /// `first_units[i]`.
    rows: Vec<usize>,
    first_units: Vec<usize>,
    cols: usize,
    units: usize,
    pieces: usize,
    /// The fused kernels' dynamic shared-memory limit, set on first use
    /// (`backend::cuda::decode_tiled`).
    pub(super) fused_shared_limit: OnceLock<usize>,
    /// The fused kernels' two grid counters (arrivals, departures), zero between launches: one
    /// fused launch over the copy at a time (the decode step queues them on one stream).
    grid_sync: GpuBuffer<u32>,
}

/// Whether a `rows x cols` view of `weight` can be tiled: whole 64-column halves, and blocks of a
/// power-of-two multiple of 64 (so a half never straddles two absmax), within the kernels' int32
/// counts.
pub fn tiled_gemv_fits(weight: &Gpu4bit, (rows, cols): (usize, usize)) -> bool {
    let nested_ok = match weight.absmax {
        GpuAbsmax::Plain(_) => true,
        GpuAbsmax::Double {
            nested_blocksize, ..
        } => nested_blocksize > 0,
    };
    nested_ok
        && rows > 0
        && cols > 0
        && rows.checked_mul(cols) == Some(weight.numel)
        && cols % HALF_COLS == 0
        && weight.blocksize.is_power_of_two()
        && weight.blocksize % HALF_COLS == 0
        && i32::try_from(cols).is_ok()
        && i32::try_from(rows.div_ceil(UNIT_ROWS)).is_ok()
}

/// The units of a Split row space of matrices of `rows` rows each (each padded to whole units):
/// every matrix's first unit, then the total.
pub(crate) fn row_space_units(rows: &[usize]) -> Vec<usize> {
    let mut first = Vec::with_capacity(rows.len() + 1);
    let mut units = 0;
    for &r in rows {
        first.push(units);
        units += r.div_ceil(UNIT_ROWS);
    }
    first.push(units);
    first
}

impl Tiled4bit {
    /// Packs `weight`, viewed as row-major `rows x cols`, into the tiled layout (on the GPU, on
    /// the device's stream). Errors if [`tiled_gemv_fits`] does not hold.
    pub fn pack(
        device: &CudaDevice,
        weight: &Gpu4bit,
        (rows, cols): (usize, usize),
    ) -> Result<Self> {
        Self::pack_rows(device, &[(weight, rows)], cols)
    }

    /// Packs up to three matrices of `cols` columns as one Split row space (q, k, v): matrix
    /// i's units follow matrix i - 1's, each matrix padded to whole units of 8 rows. They must
    /// share the code table.
    pub fn pack_rows(
        device: &CudaDevice,
        matrices: &[(&Gpu4bit, usize)],
        cols: usize,
    ) -> Result<Self> {
        if matrices.is_empty() || matrices.len() > MAX_ROW_SPACE {
            return Err(Error::invalid(format!(
                "tiled gemv: a row space of {} matrices (1 to {MAX_ROW_SPACE})",
                matrices.len()
            )));
        }
        let rows: Vec<usize> = matrices.iter().map(|&(_, r)| r).collect();
        let mut first_units = row_space_units(&rows);
        let units = first_units.pop().unwrap_or(0);
        let mut tiled =
            Self::allocate(device, matrices[0].0, TiledLayout::Split, rows, cols, units)?;
        for (&(weight, rows), &first) in matrices.iter().zip(&first_units) {
            tiled.check_matrix(weight, (rows, cols))?;
            tiled.pack_half(device, weight, Some(weight), rows, first, 0b11)?;
        }
        tiled.first_units = first_units;
        Ok(tiled)
    }

    /// Packs gate and up (each `rows x cols`) as a Pair: a unit's half 0 is 8 rows of gate, its
    /// half 1 the same rows of up. They must share the code table.
    pub fn pack_pair(
        device: &CudaDevice,
        (gate, up): (&Gpu4bit, &Gpu4bit),
        (rows, cols): (usize, usize),
    ) -> Result<Self> {
        let units = rows.div_ceil(UNIT_ROWS);
        let mut tiled = Self::allocate(
            device,
            gate,
            TiledLayout::Pair,
            vec![rows, rows],
            cols,
            units,
        )?;
        for weight in [gate, up] {
            tiled.check_matrix(weight, (rows, cols))?;
        }
        // The codes of both halves in one pass, then each half's scales from its own tensor.
        tiled.pack_half(device, gate, Some(up), rows, 0, 0b01)?;
        tiled.pack_half(device, up, None, rows, 0, 0b10)?;
        tiled.first_units = vec![0];
        Ok(tiled)
    }

    /// The zeroed records of `units` units and the code table of `first`.
    fn allocate(
        device: &CudaDevice,
        first: &Gpu4bit,
        layout: TiledLayout,
        rows: Vec<usize>,
        cols: usize,
        units: usize,
    ) -> Result<Self> {
        let pieces = layout.pieces(cols);
        if i32::try_from(units).is_err() || i32::try_from(cols).is_err() {
            return Err(Error::invalid(format!(
                "tiled gemv: {units} units of {cols} columns exceed the kernels' 32-bit counts"
            )));
        }
        Ok(Tiled4bit {
            records: GpuBuffer::<u8>::zeroed(
                device,
                "tiled gemv records",
                layout.bytes(units, cols),
            )?,
            table: GpuBuffer::from_host(device, "tiled gemv code table", &first.table_values)?,
            table_values: first.table_values,
            layout,
            rows,
            first_units: Vec::new(),
            cols,
            units,
            pieces,
            fused_shared_limit: OnceLock::new(),
            grid_sync: GpuBuffer::zeroed(device, "tiled gemv grid counters", 2)?,
        })
    }

    /// Errors unless `weight` tiles as `rows x cols` with the code table of the copy.
    fn check_matrix(&self, weight: &Gpu4bit, (rows, cols): (usize, usize)) -> Result<()> {
        if !tiled_gemv_fits(weight, (rows, cols)) {
            return Err(Error::invalid(format!(
                "tiled gemv: a {rows} x {cols} view of a 4-bit tensor of {} elements with blocksize \
                 {} cannot be tiled (64-column halves and power-of-two blocks of 64 or more)",
                weight.numel, weight.blocksize
            )));
        }
        if weight.table_values != self.table_values {
            return Err(Error::invalid(
                "tiled gemv: the matrices of one tiled copy need the same code table",
            ));
        }
        Ok(())
    }

    /// Packs the `rows` rows of `weight` into the units from `first_unit`: the codes (half 0's
    /// from `weight`, half 1's from `codes_of_half1`; none: the codes are left as they are) and
    /// the scales of the halves in `half_mask` from `weight`'s absmax.
    fn pack_half(
        &self,
        device: &CudaDevice,
        weight: &Gpu4bit,
        codes_of_half1: Option<&Gpu4bit>,
        rows: usize,
        first_unit: usize,
        half_mask: i32,
    ) -> Result<()> {
        let cols = self.cols;
        let (piece_cols, half_offset) = self.layout.piece_and_half_offset();
        let pieces = self.pieces;
        let tiles = rows.div_ceil(UNIT_ROWS) * pieces;
        let (rows_i, cols_i) = (to_i64(rows, "rows")?, to_i64(cols, "cols")?);
        let (tiles_i, blocksize) = (
            to_i64(tiles, "tiles")?,
            to_i64(weight.blocksize, "blocksize")?,
        );
        // allocate keeps units and cols (so pieces and the piece columns) under 2^31.
        let (pieces_i, piece_cols, half_offset) =
            (pieces as i32, piece_cols as i32, half_offset as i32);
        // The matrix's records start at its first unit (within the buffer: the caller's units).
        let out = self.records.device_ptr().as_raw() + (first_unit * pieces * RECORD_BYTES) as u64;
        let stream = device.stream();

        if let Some(half1) = codes_of_half1 {
            let kernel = device.function(MODULE, "tile4_pack_codes")?;
            let grid = grid_dim(
                (tiles * 32).div_ceil(PACK_THREADS),
                MAX_GRID_X,
                "tiled gemv pack",
            )?;
            let (packed0, packed1) = (weight.packed.device_ptr(), half1.packed.device_ptr());
            // SAFETY: the arguments match tile4_pack_codes in ptx/gemv4_tiled.cu; both packed
            // tensors hold rows * cols codes (check_matrix), the records from `out` hold tiles
            // * 576 bytes (allocate sized them for every matrix's units) and the grid covers
            // tiles * 32 threads, each writing its own 16 code bytes of a record.
            unsafe {
                launch!(kernel<<<grid, PACK_THREADS as u32, 0, stream>>>(
                    packed0, packed1, rows_i, cols_i, piece_cols, half_offset, pieces_i, tiles_i, out
                ))
            }
            .or_device(|| format!("launching tile4_pack_codes ({rows} x {cols})"))?;
        }

        let grid = grid_dim(
            (tiles * TILE_SCALES).div_ceil(PACK_THREADS),
            MAX_GRID_X,
            "tiled gemv pack",
        )?;
        let result = match weight.absmax.args() {
            ScaleArgs::Plain(absmax) => {
                let kernel = device.function(MODULE, "tile4_pack_scales_plain")?;
                // SAFETY: the arguments match tile4_pack_scales_plain; absmax holds a scale per
                // block of the rows * cols elements, the records from `out` tiles * 576 bytes
                // (16 f32 scales after each tile's codes) and the grid covers one thread per
                // scale.
                unsafe {
                    launch!(kernel<<<grid, PACK_THREADS as u32, 0, stream>>>(
                        absmax, rows_i, cols_i, blocksize, piece_cols, half_offset, half_mask,
                        pieces_i, tiles_i, out
                    ))
                }
            }
            ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize) => {
                let kernel = device.function(MODULE, "tile4_pack_scales_double")?;
                // SAFETY: as above for tile4_pack_scales_double; the codes cover every block,
                // nested every nested block, the dynamic map 256 entries.
                unsafe {
                    launch!(kernel<<<grid, PACK_THREADS as u32, 0, stream>>>(
                        codes, dynamic_map, nested, offset, nested_blocksize, rows_i, cols_i,
                        blocksize, piece_cols, half_offset, half_mask, pieces_i, tiles_i, out
                    ))
                }
            }
        };
        result.or_device(|| format!("launching the tiled gemv's scale packing ({rows} x {cols})"))
    }

    /// The layout of the copy.
    pub fn layout(&self) -> TiledLayout {
        self.layout
    }

    /// Rows of each matrix (Split) or of each half (Pair).
    pub fn matrix_rows(&self) -> &[usize] {
        &self.rows
    }

    /// Columns of every matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The code table's device copy, the records, and the (units, pieces) of the copy, for the
    /// fused kernels' arguments.
    pub(super) fn kernel_view(&self) -> (u64, u64, usize, usize, &[usize]) {
        (
            self.table.device_ptr().as_raw(),
            self.records.device_ptr().as_raw(),
            self.units,
            self.pieces,
            &self.first_units,
        )
    }

    /// The device address of the fused kernels' grid counters (two u32, zero between launches).
    pub(super) fn grid_sync_ptr(&self) -> u64 {
        self.grid_sync.device_ptr().as_raw()
    }

    /// The (rows, cols) of a single packed matrix; for a row space its rows in all, for a Pair
    /// the rows of each half.
    pub fn shape(&self) -> (usize, usize) {
        match self.layout {
            TiledLayout::Split => (self.rows.iter().sum(), self.cols),
            TiledLayout::Pair => (self.rows[0], self.cols),
        }
    }

    /// Device bytes of the tiled copy (codes and f32 scales).
    pub fn bytes(&self) -> usize {
        self.records.len()
    }

    /// Queues `y (rows,) bf16 = W · x (cols,) bf16` with the default build.
    pub fn gemv_bf16(
        &self,
        device: &CudaDevice,
        x: &GpuBuffer<u16>,
        y: &mut GpuBuffer<u16>,
    ) -> Result<()> {
        let variant = TILED_VARIANTS
            .into_iter()
            .find(|v| v.takes(self.cols))
            .unwrap_or(TILED_VARIANTS[1]);
        self.gemv_bf16_with(device, variant, x, y)
    }

    /// [`Tiled4bit::gemv_bf16`] with a given build (`sun bench kernels` times each).
    pub fn gemv_bf16_with(
        &self,
        device: &CudaDevice,
        variant: TiledVariant,
        x: &GpuBuffer<u16>,
        y: &mut GpuBuffer<u16>,
    ) -> Result<()> {
        let rows =
            match (self.layout, self.rows.as_slice()) {
                (TiledLayout::Split, &[rows]) => rows,
                _ => return Err(Error::invalid(
                    "tiled gemv: the plain GEMV takes one Split matrix (the fused kernels take \
                     row spaces and pairs)",
                )),
            };
        check_len("tiled gemv x", x.len(), self.cols)?;
        check_len("tiled gemv y", y.len(), rows)?;
        if !variant.takes(self.cols) {
            return Err(Error::invalid(format!(
                "tiled gemv: {} takes only {} columns, not {}",
                variant.name,
                2 * variant.warps * PIECE_COLS,
                self.cols
            )));
        }
        let name = variant.name;
        let kernel = device.function(MODULE, name)?;
        let grid = self.units.min(device.sm_count() as usize).max(1);
        let shared = tiled_shared_bytes(self.pieces, self.units.div_ceil(grid), variant.warps);
        let limit = opt_in_dynamic_limit(device, &kernel)?;
        if shared > limit {
            return Err(Error::invalid(format!(
                "tiled gemv: {} columns need {shared} bytes of shared memory a CTA; the GPU gives {limit}",
                self.cols
            )));
        }
        // grid <= the SM count; shared <= limit < 2^32.
        let (grid, shared) = (grid as u32, shared as u32);
        let threads = (variant.warps * 32) as u32;
        let rows_i = to_i64(rows, "rows")?;
        let cols = self.cols as i32; // allocate keeps it under 2^31
                                     // allocate keeps units and pieces under 2^31.
        let (units, pieces) = (self.units as i32, self.pieces as i32);
        let (records, table) = (self.records.device_ptr(), self.table.device_ptr());
        let (x, y) = (x.device_ptr(), y.device_ptr());
        let stream = device.stream();
        // SAFETY: the arguments match every GEMV4_TILED build in ptx/gemv4_tiled.cu; records
        // hold units * pieces tiles (packed for this shape), x cols and y rows bf16
        // (checked above); the dynamic shared memory is the kernel's layout for this grid, under
        // the limit it was raised to, and the kernel re-checks units and pieces.
        unsafe {
            launch!(kernel<<<grid, threads, shared, stream>>>(
                records, table, rows_i, cols, units, pieces, x, y
            ))
        }
        .or_device(|| format!("launching {name} ({rows} x {})", self.cols))
    }
}

/// Dynamic shared memory of the GEMV's CTA: x padded to whole pieces, a slot of 16 f32 for
/// every (unit, warp) of the CTA's at most `units_per_cta` units, then the bf16 pair table at a
/// 64 KiB-aligned shared address (up to 64 KiB - 1 of padding before it).
fn tiled_shared_bytes(pieces: usize, units_per_cta: usize, warps: usize) -> usize {
    pieces * PIECE_COLS * 2 + units_per_cta * warps * TILE_SCALES * 4 + 2 * PAIR_TABLE_BYTES - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_holds_the_table_x_and_the_slots() {
        // 11008 x 4096 on 132 SMs: 1376 units, at most 11 a CTA, 32 pieces, 16 warps.
        assert_eq!(
            tiled_shared_bytes(32, 11, 16),
            8192 + 11 * 16 * 64 + 2 * 65536 - 1
        );
        // 576 columns are padded to 5 pieces of 128.
        assert_eq!(
            tiled_shared_bytes(576usize.div_ceil(PIECE_COLS), 1, 32),
            1280 + 2048 + 2 * 65536 - 1
        );
    }

    #[test]
    fn a_row_space_pads_each_matrix_to_whole_units() {
        // SmolLM2's q, k, v: 576, 192, 192 rows; 7B's: 4096, 1024, 1024; rows not a multiple
        // of 8 start the next matrix on a fresh unit.
        assert_eq!(row_space_units(&[576, 192, 192]), vec![0, 72, 96, 120]);
        assert_eq!(row_space_units(&[4096, 1024, 1024]), vec![0, 512, 640, 768]);
        assert_eq!(row_space_units(&[264, 41, 40]), vec![0, 33, 39, 44]);
        assert_eq!(row_space_units(&[250]), vec![0, 32]);
    }

    #[test]
    fn split_tiles_cover_128_columns_and_pairs_64() {
        assert_eq!(TiledLayout::Split.piece_and_half_offset(), (128, 64));
        assert_eq!(TiledLayout::Pair.piece_and_half_offset(), (64, 0));
        // 576 columns: 5 Split pieces (the last half zeros), 9 Pair pieces.
        assert_eq!(TiledLayout::Split.pieces(576), 5);
        assert_eq!(TiledLayout::Pair.pieces(576), 9);
        assert_eq!(TiledLayout::Split.pieces(11008), 86);
        assert_eq!(TiledLayout::Pair.pieces(4096), 64);
    }

    #[test]
    fn the_x_cached_build_takes_only_two_pieces_a_warp() {
        let cached = TILED_VARIANTS[0];
        assert!(
            cached.x_cached && cached.takes(4096) && !cached.takes(11008) && !cached.takes(576)
        );
        assert!(TILED_VARIANTS[1].takes(11008) && TILED_VARIANTS[1].takes(576));
        assert!(TILED_VARIANTS.iter().all(|v| v.warps * 32 <= 1024));
    }
}
