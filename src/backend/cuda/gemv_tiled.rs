//! The batch-1 4-bit GEMV on weights repacked into tensor-core tiles: [`Tiled4bit`], a copy of a
//! [`Gpu4bit`] in the decode layout of `ptx/gemv4_tiled.cu` (whose header defines it), made on the
//! GPU. Every tile is 512 contiguous bytes that a warp reads with one 16-byte load a lane, and
//! whose bytes are already the mma's A fragments; its 16 absmax follow in one 64-byte piece.
//!
//! The copy costs the tensor's code bytes again plus 4 bytes of scale per 64 weights (the double
//! quant is decoded once, when packing), so it is made only for generation
//! ([`Gpu4bit::prepare_tiled_gemv`]); training keeps the bitsandbytes layout alone.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::nf4::{opt_in_dynamic_limit, GpuAbsmax, ScaleArgs, PAIR_TABLE_BYTES};
use super::Gpu4bit;
use crate::error::{Error, Result};
use cust::launch;

const MODULE: &str = "gemv4_tiled";
/// Output rows per unit (`UNIT_ROWS`), columns per tile (`PIECE_COLS`) and per half
/// (`HALF_COLS`), bytes and scales per tile.
const UNIT_ROWS: usize = 8;
const PIECE_COLS: usize = 128;
const HALF_COLS: usize = 64;
const TILE_SCALES: usize = 16;
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

/// A 4-bit matrix of `rows x cols` in the tiled decode layout.
pub struct Tiled4bit {
    /// (tiles, 576) bytes: each tile's codes, then its scales.
    records: GpuBuffer<u8>,
    table: GpuBuffer<f32>,
    rows: usize,
    cols: usize,
    units: usize,
    pieces: usize,
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

impl Tiled4bit {
    /// Packs `weight`, viewed as row-major `rows x cols`, into the tiled layout (on the GPU, on
    /// the device's stream). Errors if [`tiled_gemv_fits`] does not hold.
    pub fn pack(
        device: &CudaDevice,
        weight: &Gpu4bit,
        (rows, cols): (usize, usize),
    ) -> Result<Self> {
        if !tiled_gemv_fits(weight, (rows, cols)) {
            return Err(Error::invalid(format!(
                "tiled gemv: a {rows} x {cols} view of a 4-bit tensor of {} elements with blocksize \
                 {} cannot be tiled (64-column halves and power-of-two blocks of 64 or more)",
                weight.numel, weight.blocksize
            )));
        }
        let units = rows.div_ceil(UNIT_ROWS);
        let pieces = cols.div_ceil(PIECE_COLS);
        let tiles = units * pieces;
        let records = GpuBuffer::<u8>::zeroed(device, "tiled gemv records", tiles * RECORD_BYTES)?;
        let table = GpuBuffer::from_host(device, "tiled gemv code table", &weight.table_values)?;
        let (rows_i, cols_i) = (to_i64(rows, "rows")?, to_i64(cols, "cols")?);
        let (tiles_i, blocksize) = (
            to_i64(tiles, "tiles")?,
            to_i64(weight.blocksize, "blocksize")?,
        );
        // tiled_gemv_fits keeps pieces <= cols < 2^31.
        let pieces_i = pieces as i32;
        let stream = device.stream();

        let kernel = device.function(MODULE, "tile4_pack_codes")?;
        let grid = grid_dim(
            (tiles * 32).div_ceil(PACK_THREADS),
            MAX_GRID_X,
            "tiled gemv pack",
        )?;
        let (packed, out) = (weight.packed.device_ptr(), records.device_ptr());
        // SAFETY: the arguments match tile4_pack_codes in ptx/gemv4_tiled.cu; packed holds
        // rows * cols codes (tiled_gemv_fits), records has tiles * 576 bytes and the grid covers
        // tiles * 32 threads, each writing its own 16 code bytes of a record.
        unsafe {
            launch!(kernel<<<grid, PACK_THREADS as u32, 0, stream>>>(
                packed, rows_i, cols_i, pieces_i, tiles_i, out
            ))
        }
        .or_device(|| format!("launching tile4_pack_codes ({rows} x {cols})"))?;

        let grid = grid_dim(
            (tiles * TILE_SCALES).div_ceil(PACK_THREADS),
            MAX_GRID_X,
            "tiled gemv pack",
        )?;
        let out = records.device_ptr();
        let result = match weight.absmax.args() {
            ScaleArgs::Plain(absmax) => {
                let kernel = device.function(MODULE, "tile4_pack_scales_plain")?;
                // SAFETY: the arguments match tile4_pack_scales_plain; absmax holds a scale per
                // block of the rows * cols elements, records tiles * 576 bytes (16 f32 scales
                // after each tile's codes) and the grid covers one thread per scale.
                unsafe {
                    launch!(kernel<<<grid, PACK_THREADS as u32, 0, stream>>>(
                        absmax, rows_i, cols_i, blocksize, pieces_i, tiles_i, out
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
                        blocksize, pieces_i, tiles_i, out
                    ))
                }
            }
        };
        result
            .or_device(|| format!("launching the tiled gemv's scale packing ({rows} x {cols})"))?;
        Ok(Tiled4bit {
            records,
            table,
            rows,
            cols,
            units,
            pieces,
        })
    }

    /// The (rows, cols) of the packed matrix.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
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
        check_len("tiled gemv x", x.len(), self.cols)?;
        check_len("tiled gemv y", y.len(), self.rows)?;
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
        let (rows, cols) = (to_i64(self.rows, "rows")?, self.cols as i32);
        // tiled_gemv_fits keeps units and pieces under 2^31.
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
                records, table, rows, cols, units, pieces, x, y
            ))
        }
        .or_device(|| format!("launching {name} ({} x {})", self.rows, self.cols))
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
    fn the_x_cached_build_takes_only_two_pieces_a_warp() {
        let cached = TILED_VARIANTS[0];
        assert!(
            cached.x_cached && cached.takes(4096) && !cached.takes(11008) && !cached.takes(576)
        );
        assert!(TILED_VARIANTS[1].takes(11008) && TILED_VARIANTS[1].takes(576));
        assert!(TILED_VARIANTS.iter().all(|v| v.warps * 32 <= 1024));
    }
}
