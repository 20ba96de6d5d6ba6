//! 4-bit (NF4/FP4) weights on the GPU: upload, dequantize (to f32 or bf16), and the batch-1 GEMV
//! used when decoding. The kernels are in `ptx/nf4.cu`; the layout is bitsandbytes' (see there).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{set_dynamic_shared_limit, set_max_shared_carveout, OrDevice};
use super::gemv_tiled::{tiled_gemv_fits, Tiled4bit};
use super::launch_checks::{check_len, check_len_at_least, to_i64};
use crate::error::{Error, Result};
use cust::function::{BlockSize, Function, FunctionAttribute};
use cust::launch;
use cust::memory::{DeviceCopy, DevicePointer};
use cust::sys::cudaError_enum;
use std::sync::OnceLock;

const MODULE: &str = "nf4";
/// Threads per CTA of every kernel in `ptx/nf4.cu` (its `THREADS_PER_CTA`).
pub(super) const THREADS_PER_CTA: u32 = 256;
const WARPS_PER_CTA: usize = THREADS_PER_CTA as usize / 32;
/// Elements under one 16-byte load of packed codes: the block size must be a multiple of it.
const CHUNK_ELEMENTS: usize = 32;
/// Elements per dequantize work item (`DEQUANT_GROUP`) and items each thread has in flight
/// (`DEQUANT_UNROLL`): a CTA covers 256 * 4 * 8 elements per pass of its grid-stride loop.
const DEQUANT_GROUP: usize = 8;
const DEQUANT_UNROLL: usize = 4;
/// Rows a GEMV warp may work on at once, largest first (the kernel's `rows_per_group`).
const GEMV_ROWS_PER_GROUP: [usize; 3] = [4, 2, 1];
/// The fast GEMV's pair table at the start of dynamic shared memory (`PAIR_TABLE_BYTES`).
pub(super) const PAIR_TABLE_BYTES: usize = 256 * 256;
/// Rows per CTA of the tensor-core GEMV (`MMA_ROWS`).
pub(super) const MMA_ROWS: usize = 16;
/// Products with fewer weights than this keep the f32-table GEMV: the tensor-core one rounds the
/// code table to bf16 (relative error ~2e-3 on long rows), which on a row of a few dozen terms
/// with cancellation is a large relative error, and such products are too small to time.
const MMA_MIN_ELEMENTS: usize = 1 << 16;
/// Shared memory (static + dynamic) a CTA may use before its kernel opts in to more.
const DEFAULT_SHARED_LIMIT: usize = 48 * 1024;

/// Per-block scales of a 4-bit tensor, as the host holds them.
#[derive(Clone, Copy, Debug)]
pub enum HostAbsmax<'a> {
    /// One f32 per block.
    Plain(&'a [f32]),
    /// Double quantization: `absmax[b] = dynamic_map[codes[b]] * nested[b / nested_blocksize]
    /// + offset`.
    Double {
        /// (nblocks,) 8-bit codes into `dynamic_map`.
        codes: &'a [u8],
        /// bitsandbytes' signed 8-bit dynamic map.
        dynamic_map: &'a [f32; 256],
        /// (ceil(nblocks / nested_blocksize),) f32 scales of the codes.
        nested: &'a [f32],
        /// Added to every decoded absmax (the mean bitsandbytes subtracted).
        offset: f32,
        /// Blocks per nested scale (256 in bitsandbytes).
        nested_blocksize: usize,
    },
}

/// A 4-bit tensor as the host holds it (bitsandbytes layout), ready to upload.
#[derive(Clone, Copy, Debug)]
pub struct Host4bit<'a> {
    /// (ceil(numel / 2),) two codes per byte, first element in the high nibble.
    pub packed: &'a [u8],
    /// The 16-value code table (NF4 or FP4).
    pub code_table: &'a [f32; 16],
    /// Per-block scales.
    pub absmax: HostAbsmax<'a>,
    /// Number of elements.
    pub numel: usize,
    /// Elements per absmax block: a multiple of 32.
    pub blocksize: usize,
}

impl Host4bit<'_> {
    /// Checks that the buffers' lengths agree with `numel` and the block sizes.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |problem: String| Err(Error::invalid(format!("{what}: {problem}")));
        if self.numel == 0 {
            return bad("a 4-bit tensor needs at least one element".into());
        }
        if self.blocksize < CHUNK_ELEMENTS || self.blocksize % CHUNK_ELEMENTS != 0 {
            return bad(format!(
                "blocksize {} is not supported on the GPU (it must be a multiple of 32)",
                self.blocksize
            ));
        }
        if self.packed.len() != self.numel.div_ceil(2) {
            return bad(format!(
                "{} packed bytes for {} elements; expected {}",
                self.packed.len(),
                self.numel,
                self.numel.div_ceil(2)
            ));
        }
        let blocks = self.numel.div_ceil(self.blocksize);
        match self.absmax {
            HostAbsmax::Plain(absmax) if absmax.len() != blocks => bad(format!(
                "{} absmax values for {blocks} blocks",
                absmax.len()
            )),
            HostAbsmax::Plain(_) => Ok(()),
            HostAbsmax::Double {
                codes,
                nested,
                nested_blocksize,
                ..
            } => {
                if codes.len() != blocks {
                    return bad(format!("{} absmax codes for {blocks} blocks", codes.len()));
                }
                if nested_blocksize == 0 || nested.len() != blocks.div_ceil(nested_blocksize) {
                    return bad(format!(
                        "{} nested absmax values for {blocks} blocks in groups of \
                         {nested_blocksize}",
                        nested.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Per-block scales on the GPU (the matmul kernels read them too).
pub(super) enum GpuAbsmax {
    Plain(GpuBuffer<f32>),
    Double {
        codes: GpuBuffer<u8>,
        dynamic_map: GpuBuffer<f32>,
        nested: GpuBuffer<f32>,
        offset: f32,
        nested_blocksize: i64,
    },
}

/// The scales as kernel arguments: one pointer, or the double-quantized set (codes, dynamic
/// map, nested scales, offset, nested blocksize) that the `_double` kernels take.
pub(super) enum ScaleArgs {
    Plain(DevicePointer<f32>),
    Double(
        DevicePointer<u8>,
        DevicePointer<f32>,
        DevicePointer<f32>,
        f32,
        i64,
    ),
}

impl GpuAbsmax {
    /// The scales as kernel arguments.
    pub(super) fn args(&self) -> ScaleArgs {
        match self {
            GpuAbsmax::Plain(absmax) => ScaleArgs::Plain(absmax.device_ptr()),
            GpuAbsmax::Double {
                codes,
                dynamic_map,
                nested,
                offset,
                nested_blocksize,
            } => ScaleArgs::Double(
                codes.device_ptr(),
                dynamic_map.device_ptr(),
                nested.device_ptr(),
                *offset,
                *nested_blocksize,
            ),
        }
    }
}

/// A 4-bit tensor in device memory (bitsandbytes layout).
pub struct Gpu4bit {
    pub(super) packed: GpuBuffer<u8>,
    pub(super) code_table: GpuBuffer<f32>,
    pub(super) absmax: GpuAbsmax,
    pub(super) numel: usize,
    pub(super) blocksize: usize,
    /// The code table's values (the fused GEMV checks that its matrices share one).
    pub(super) table_values: [f32; 16],
    /// The fused decode GEMV's dynamic shared-memory limit, set on first use
    /// (`backend::cuda::decode`).
    pub(super) fused_shared_limit: OnceLock<usize>,
    /// Launch shapes worked out on first use (driver queries kept off the per-call path).
    gemv_launch: OnceLock<GemvLaunch>,
    /// Dequantize grids, for the f32 and the bf16 kernel.
    dequant_grid: [OnceLock<u32>; 2],
    /// The tiled copy the batch-1 GEMV reads when one was made
    /// ([`Gpu4bit::prepare_tiled_gemv`]).
    tiled: OnceLock<Tiled4bit>,
}

/// How the GEMV is launched for one (rows, cols).
#[derive(Clone, Copy, Debug)]
struct GemvLaunch {
    shape: (usize, usize),
    /// The tensor-core kernel (`gemv4_mma_*`: one CTA per 16 rows, x staged after the pair
    /// table); else the warp-per-row-group kernel (`gemv4_*`) with the fields below.
    mma: bool,
    grid: u32,
    /// Rows per warp of the fast path (4, 2 or 1), or 0 for the element-by-element path (the
    /// kernel's `rows_per_group`).
    rows_per_group: i32,
    /// Whether x is staged in shared memory (the kernel's `x_in_shared`).
    x_in_shared: bool,
    /// Dynamic shared memory per CTA: the fast path's pair table (64 KiB) then x (rounded up to
    /// 16 bytes) when staged; the element path's x alone, or 0.
    shared_bytes: usize,
}

impl Gpu4bit {
    /// Validates `host` and copies it to the GPU. `what` names the tensor in errors.
    pub fn upload(device: &CudaDevice, what: &str, host: &Host4bit<'_>) -> Result<Self> {
        host.validate(what)?;
        let absmax = match host.absmax {
            HostAbsmax::Plain(absmax) => {
                GpuAbsmax::Plain(GpuBuffer::from_host(device, what, absmax)?)
            }
            HostAbsmax::Double {
                codes,
                dynamic_map,
                nested,
                offset,
                nested_blocksize,
            } => GpuAbsmax::Double {
                codes: GpuBuffer::from_host(device, what, codes)?,
                dynamic_map: GpuBuffer::from_host(device, what, dynamic_map)?,
                nested: GpuBuffer::from_host(device, what, nested)?,
                offset,
                nested_blocksize: to_i64(nested_blocksize, what)?,
            },
        };
        Ok(Gpu4bit {
            packed: GpuBuffer::from_host(device, what, host.packed)?,
            code_table: GpuBuffer::from_host(device, what, host.code_table)?,
            absmax,
            numel: host.numel,
            blocksize: host.blocksize,
            table_values: *host.code_table,
            fused_shared_limit: OnceLock::new(),
            gemv_launch: OnceLock::new(),
            dequant_grid: [OnceLock::new(), OnceLock::new()],
            tiled: OnceLock::new(),
        })
    }

    /// Makes the tiled copy (`backend::cuda::gemv_tiled`) that [`Gpu4bit::gemv_bf16`] then reads
    /// for a `rows x cols` product, where the shape and block size allow one; returns whether
    /// the tensor has one. It costs the code bytes again plus 4 bytes per 64 weights of device
    /// memory: for generation, where the batch-1 GEMV is most of a token's time. Products under
    /// `MMA_MIN_ELEMENTS` weights keep the f32-table GEMV (the tiled one rounds the code table to
    /// bf16, as the tensor-core one does).
    pub fn prepare_tiled_gemv(&self, device: &CudaDevice, shape: (usize, usize)) -> Result<bool> {
        if let Some(tiled) = self.tiled.get() {
            return Ok(tiled.shape() == shape);
        }
        if self.numel < MMA_MIN_ELEMENTS || !tiled_gemv_fits(self, shape) {
            return Ok(false);
        }
        let tiled = Tiled4bit::pack(device, self, shape)?;
        Ok(self.tiled.get_or_init(|| tiled).shape() == shape)
    }

    /// The code table's 16 values.
    pub fn code_table_values(&self) -> &[f32; 16] {
        &self.table_values
    }

    /// The tiled copy, if [`Gpu4bit::prepare_tiled_gemv`] made one.
    pub fn tiled(&self) -> Option<&Tiled4bit> {
        self.tiled.get()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Queues `out (numel,) f32 = dequantize(self)`.
    pub fn dequantize_f32(&self, device: &CudaDevice, out: &mut GpuBuffer<f32>) -> Result<()> {
        check_len("dequantize output", out.len(), self.numel)?;
        // SAFETY: `out` holds numel f32, the element type of the `_f32` kernels.
        unsafe { self.launch_dequant(device, "f32", out.device_ptr()) }
    }

    /// Queues `out (numel,) bf16 bits = dequantize(self)`, rounded to nearest even.
    pub fn dequantize_bf16(&self, device: &CudaDevice, out: &mut GpuBuffer<u16>) -> Result<()> {
        check_len("dequantize output", out.len(), self.numel)?;
        // SAFETY: `out` holds numel u16, the bf16 bits the `_bf16` kernels write.
        unsafe { self.launch_dequant(device, "bf16", out.device_ptr()) }
    }

    /// Queues the first `numel` elements of `out` = dequantize(self) as bf16 bits (the rest is
    /// left as it is): [`Gpu4bit::dequantize_bf16`] into a longer buffer (a reused scratch).
    pub(crate) fn dequantize_bf16_prefix(
        &self,
        device: &CudaDevice,
        out: &mut GpuBuffer<u16>,
    ) -> Result<()> {
        check_len_at_least("dequantize output", out.len(), self.numel)?;
        // SAFETY: `out` holds at least numel u16, the bf16 bits the `_bf16` kernels write.
        unsafe { self.launch_dequant(device, "bf16", out.device_ptr()) }
    }

    /// Queues `y (rows,) bf16 = W (rows, cols) · x (cols,) bf16` with W this tensor viewed as
    /// row-major (rows, cols); f32 accumulation.
    pub fn gemv_bf16(
        &self,
        device: &CudaDevice,
        (rows, cols): (usize, usize),
        x: &GpuBuffer<u16>,
        y: &mut GpuBuffer<u16>,
    ) -> Result<()> {
        if rows.checked_mul(cols) != Some(self.numel) {
            return Err(Error::invalid(format!(
                "gemv: a {rows} x {cols} matrix does not match a 4-bit tensor of {} elements",
                self.numel
            )));
        }
        check_len("gemv x", x.len(), cols)?;
        check_len("gemv y", y.len(), rows)?;
        if i32::try_from(cols).is_err() {
            return Err(Error::invalid(format!(
                "gemv: {cols} columns are more than the GPU kernel takes (2^31 - 1)"
            )));
        }
        if let Some(tiled) = self.tiled.get().filter(|t| t.shape() == (rows, cols)) {
            return tiled.gemv_bf16(device, x, y);
        }
        let double = matches!(self.absmax, GpuAbsmax::Double { .. });
        let launch = match self.gemv_launch.get() {
            Some(launch) if launch.shape == (rows, cols) => *launch,
            _ => {
                let fast = self.gemv_fast_path_fits((rows, cols));
                let launch = GemvLaunch::plan(device, double, (rows, cols), fast)?;
                // The first shape is kept; a tensor used with several shapes plans the others
                // on every call.
                let _ = self.gemv_launch.set(launch);
                launch
            }
        };
        let name = gemv_kernel_name(launch.mma, double);
        let kernel = device.function(MODULE, name)?;
        let grid = launch.grid;
        let x_in_shared = i32::from(launch.x_in_shared);
        let rows_per_group = launch.rows_per_group;
        let shared_bytes = u32::try_from(launch.shared_bytes)
            .map_err(|_| Error::invalid(format!("gemv: {cols} columns are too many")))?;
        let (rows_i, cols_i) = (to_i64(rows, "gemv rows")?, to_i64(cols, "gemv cols")?);
        let blocksize = to_i64(self.blocksize, "blocksize")?;
        let stream = device.stream();
        let (packed, table) = (self.packed.device_ptr(), self.code_table.device_ptr());
        let (x, y) = (x.device_ptr(), y.device_ptr());
        let result = match (launch.mma, self.absmax.args()) {
            (true, ScaleArgs::Plain(absmax)) => {
                // SAFETY: arguments match gemv4_mma_plain_bf16 in ptx/nf4.cu; packed/absmax
                // hold numel = rows * cols elements (validated at upload), x holds cols and y
                // rows (checked above); the plan chose this kernel only when cols % 32 == 0,
                // the blocksize is a power of two, rows * cols / 32 < 2^32 (which the kernel
                // re-checks, writing nothing otherwise) and the pair table plus x fit the
                // dynamic shared memory it set; one CTA per 16 rows.
                unsafe {
                    launch!(kernel<<<grid, THREADS_PER_CTA, shared_bytes, stream>>>(
                        packed, table, absmax, rows_i, cols_i, blocksize, x, y
                    ))
                }
            }
            (true, ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize)) => {
                // SAFETY: as above, for gemv4_mma_double_bf16's argument list; codes/nested
                // cover every block (validated at upload), the dynamic map has 256 entries and
                // the nested blocksize is a power of two (the plan's condition, re-checked).
                unsafe {
                    launch!(kernel<<<grid, THREADS_PER_CTA, shared_bytes, stream>>>(
                        packed, table, codes, dynamic_map, nested, offset, nested_blocksize,
                        rows_i, cols_i, blocksize, x, y
                    ))
                }
            }
            (false, ScaleArgs::Plain(absmax)) => {
                // SAFETY: arguments match gemv4_plain_bf16 in ptx/nf4.cu; packed/absmax hold
                // numel = rows * cols elements (validated at upload), x holds cols and y rows
                // (checked above), cols < 2^31; dynamic shared memory holds what the plan's
                // rows_per_group and x_in_shared need (the pair table, x) within the limit the
                // plan set on the kernel; the kernel re-checks the fast path's conditions and
                // takes any grid size.
                unsafe {
                    launch!(kernel<<<grid, THREADS_PER_CTA, shared_bytes, stream>>>(
                        packed, table, absmax, rows_i, cols_i, blocksize, x, x_in_shared,
                        rows_per_group, y
                    ))
                }
            }
            (false, ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize)) => {
                // SAFETY: as above, for gemv4_double_bf16's argument list; codes/nested cover
                // every block (validated at upload) and the dynamic map has 256 entries.
                unsafe {
                    launch!(kernel<<<grid, THREADS_PER_CTA, shared_bytes, stream>>>(
                        packed, table, codes, dynamic_map, nested, offset, nested_blocksize,
                        rows_i, cols_i, blocksize, x, x_in_shared, rows_per_group, y
                    ))
                }
            }
        };
        result.or_device(|| format!("launching {name} ({rows} x {cols})"))
    }

    /// Whether a `rows x cols` GEMV of this tensor meets the fast path's conditions (the kernel
    /// checks them again): whole 32-element chunks per row, power-of-two block sizes (plain and
    /// nested) and fewer than 2^32 chunks.
    pub(super) fn gemv_fast_path_fits(&self, (rows, cols): (usize, usize)) -> bool {
        let nested_ok = match self.absmax {
            GpuAbsmax::Plain(_) => true,
            GpuAbsmax::Double {
                nested_blocksize, ..
            } => nested_blocksize > 0 && (nested_blocksize as u64).is_power_of_two(),
        };
        let chunks = (rows as u64).saturating_mul(cols as u64 / CHUNK_ELEMENTS as u64);
        nested_ok
            && cols % CHUNK_ELEMENTS == 0
            && self.blocksize.is_power_of_two()
            && chunks < 1 << 32
    }

    /// Launches `dequant4_{plain|double}_{dtype}` writing to `out`.
    ///
    /// # Safety
    /// `out` must point to `numel` elements of the kernel's output type (f32 for "f32", u16
    /// bf16 bits for "bf16").
    unsafe fn launch_dequant<T: DeviceCopy>(
        &self,
        device: &CudaDevice,
        dtype: &str,
        out: DevicePointer<T>,
    ) -> Result<()> {
        let kind = match self.absmax {
            GpuAbsmax::Plain(_) => "plain",
            GpuAbsmax::Double { .. } => "double",
        };
        let name = format!("dequant4_{kind}_{dtype}");
        let kernel = device.function(MODULE, &name)?;
        let grid_slot = &self.dequant_grid[usize::from(dtype == "bf16")];
        let grid = match grid_slot.get() {
            Some(grid) => *grid,
            None => {
                let items = self.numel / DEQUANT_GROUP;
                let per_pass = THREADS_PER_CTA as usize * DEQUANT_UNROLL;
                let ctas = items
                    .div_ceil(per_pass)
                    .min(resident_ctas(device, &kernel, 0)?)
                    .max(1);
                let grid = u32::try_from(ctas).map_err(|_| {
                    Error::invalid(format!("dequantize: {} elements are too many", self.numel))
                })?;
                *grid_slot.get_or_init(|| grid)
            }
        };
        let n = to_i64(self.numel, "numel")?;
        let blocksize = to_i64(self.blocksize, "blocksize")?;
        let stream = device.stream();
        let (packed, table) = (self.packed.device_ptr(), self.code_table.device_ptr());
        // SAFETY (both launches): the argument lists match the kernels' signatures in
        // ptx/nf4.cu; packed, absmax (or codes and nested) cover numel elements (validated at
        // upload), the dynamic map has 256 entries, the table 16, and `out` numel (the caller's
        // contract); the kernels take 256 threads per CTA and any grid size (grid-stride).
        let result = match self.absmax.args() {
            ScaleArgs::Plain(absmax) => {
                launch!(kernel<<<grid, THREADS_PER_CTA, 0, stream>>>(
                    packed, table, absmax, n, blocksize, out
                ))
            }
            ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize) => {
                launch!(kernel<<<grid, THREADS_PER_CTA, 0, stream>>>(
                    packed, table, codes, dynamic_map, nested, offset, nested_blocksize, n,
                    blocksize, out
                ))
            }
        };
        result.or_device(|| format!("launching {name} ({} elements)", self.numel))
    }
}

impl GemvLaunch {
    /// Kernel, grid and shared memory of a `rows x cols` GEMV; `double`: double-quantized
    /// scales; `fast`: the shape and scales allow the chunked paths
    /// ([`Gpu4bit::gemv_fast_path_fits`]).
    ///
    /// The tensor-core kernel takes every product of at least `MMA_MIN_ELEMENTS` weights whose
    /// pair table and x fit its shared memory: one CTA per 16 rows. Otherwise the
    /// warp-per-row-group kernel: its dynamic shared-memory limit is set to all the GPU gives a
    /// CTA (the same value for every tensor, so no plan lowers another's). Its fast path needs
    /// the 64 KiB pair table under that limit, and stages x after it when x fits too; the
    /// element path stages x when it fits. The grid is every CTA resident at once, or one per
    /// row group when there are fewer: the warps split the row groups evenly. Rows per group:
    /// the most (4, then 2) that still leave at least one group for every other resident warp,
    /// else 1.
    fn plan(
        device: &CudaDevice,
        double: bool,
        (rows, cols): (usize, usize),
        fast: bool,
    ) -> Result<Self> {
        let x_bytes = (cols * 2).next_multiple_of(16);
        if fast && rows.saturating_mul(cols) >= MMA_MIN_ELEMENTS {
            let kernel = device.function(MODULE, gemv_kernel_name(true, double))?;
            let dynamic_limit = opt_in_dynamic_limit(device, &kernel)?;
            let shared_bytes = PAIR_TABLE_BYTES + x_bytes;
            if shared_bytes <= dynamic_limit {
                let grid = u32::try_from(rows.div_ceil(MMA_ROWS)).map_err(|_| {
                    Error::invalid(format!("gemv: {rows} rows are too many for one launch"))
                })?;
                return Ok(GemvLaunch {
                    shape: (rows, cols),
                    mma: true,
                    grid,
                    rows_per_group: 0,
                    x_in_shared: true,
                    shared_bytes,
                });
            }
        }
        let kernel = device.function(MODULE, gemv_kernel_name(false, double))?;
        let dynamic_limit = opt_in_dynamic_limit(device, &kernel)?;
        let (fast, x_in_shared, shared_bytes) = gemv_shared_layout(fast, x_bytes, dynamic_limit);
        let resident = resident_ctas(device, &kernel, shared_bytes)?;
        let rows_per_group = if fast {
            gemv_rows_per_group(rows, resident * WARPS_PER_CTA)
        } else {
            1
        };
        let groups = rows.div_ceil(rows_per_group);
        let ctas = groups.min(resident).max(1);
        let grid = u32::try_from(ctas).map_err(|_| {
            Error::invalid(format!("gemv: {rows} rows are too many for one launch"))
        })?;
        Ok(GemvLaunch {
            shape: (rows, cols),
            mma: false,
            grid,
            rows_per_group: if fast { rows_per_group as i32 } else { 0 },
            x_in_shared,
            shared_bytes,
        })
    }
}

/// The GEMV entry point: tensor-core (`mma`) or warp-per-row-group, plain or double-quantized
/// scales.
fn gemv_kernel_name(mma: bool, double: bool) -> &'static str {
    match (mma, double) {
        (true, false) => "gemv4_mma_plain_bf16",
        (true, true) => "gemv4_mma_double_bf16",
        (false, false) => "gemv4_plain_bf16",
        (false, true) => "gemv4_double_bf16",
    }
}

/// Raises `kernel`'s dynamic shared-memory limit to all the GPU gives a CTA beside its static
/// shared memory, with the largest shared-memory carveout, and returns the dynamic bytes a
/// launch may then ask for (the default 48 KiB less the static bytes if the driver refuses).
pub(super) fn opt_in_dynamic_limit(device: &CudaDevice, kernel: &Function<'_>) -> Result<usize> {
    let static_bytes = kernel
        .get_attribute(FunctionAttribute::SharedMemorySizeBytes)
        .or_device(|| "reading the GEMV kernel's static shared-memory size")?;
    let static_bytes = usize::try_from(static_bytes).map_err(|_| {
        Error::Device(format!(
            "the driver reports {static_bytes} bytes of static shared memory for the GEMV"
        ))
    })?;
    let default_limit = DEFAULT_SHARED_LIMIT.saturating_sub(static_bytes);
    let optin_limit = device.shared_per_block_optin().saturating_sub(static_bytes);
    if optin_limit > default_limit
        && set_dynamic_shared_limit(kernel, optin_limit) == cudaError_enum::CUDA_SUCCESS
    {
        // The weights stream past L1 (evict-first loads): of the L1/shared array the kernel
        // needs shared memory, so ask for the largest carveout, for as many CTAs as the
        // occupancy query counts. A refusal only costs occupancy, which the query reports.
        set_max_shared_carveout(kernel);
        Ok(optin_limit)
    } else {
        Ok(default_limit)
    }
}

/// Where the GEMV's dynamic shared memory goes, given whether the fast path's conditions hold,
/// x's staged size and the kernel's dynamic limit: (fast path, x staged, bytes per CTA). The fast
/// path needs its pair table; x follows it when both fit, and the element path stages x alone
/// when it fits.
fn gemv_shared_layout(fast: bool, x_bytes: usize, dynamic_limit: usize) -> (bool, bool, usize) {
    if fast && PAIR_TABLE_BYTES <= dynamic_limit {
        if PAIR_TABLE_BYTES + x_bytes <= dynamic_limit {
            (true, true, PAIR_TABLE_BYTES + x_bytes)
        } else {
            (true, false, PAIR_TABLE_BYTES)
        }
    } else if x_bytes <= dynamic_limit {
        (false, true, x_bytes)
    } else {
        (false, false, 0)
    }
}

/// Rows per warp of the fast GEMV: the most (4, then 2) that still leave a row group for at
/// least every other one of the `resident_warps`, else 1. More rows per warp share each x load;
/// more groups keep more warps (and their loads) busy.
fn gemv_rows_per_group(rows: usize, resident_warps: usize) -> usize {
    GEMV_ROWS_PER_GROUP
        .into_iter()
        .find(|&r| rows.div_ceil(r) >= resident_warps / 2)
        .unwrap_or(1)
}

/// CTAs of `kernel` (256 threads and `shared_bytes` of dynamic shared memory each) that the
/// whole GPU holds at once: the size of a persistent grid. At least one.
fn resident_ctas(device: &CudaDevice, kernel: &Function<'_>, shared_bytes: usize) -> Result<usize> {
    let per_sm = kernel
        .max_active_blocks_per_multiprocessor(BlockSize::x(THREADS_PER_CTA), shared_bytes)
        .or_device(|| "querying the occupancy of a 4-bit kernel")?;
    Ok((per_sm as usize).max(1) * device.sm_count() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: [f32; 16] = [
        -1.0, -0.75, -0.5, -0.375, -0.25, -0.125, -0.0625, 0.0, 0.0625, 0.125, 0.25, 0.375, 0.5,
        0.625, 0.75, 1.0,
    ];

    fn host<'a>(packed: &'a [u8], absmax: HostAbsmax<'a>, numel: usize) -> Host4bit<'a> {
        Host4bit {
            packed,
            code_table: &TABLE,
            absmax,
            numel,
            blocksize: 64,
        }
    }

    #[test]
    fn gemv_layout_puts_the_pair_table_first_and_x_where_it_fits() {
        let optin = 227 * 1024;
        assert_eq!(
            gemv_shared_layout(true, 8192, optin),
            (true, true, PAIR_TABLE_BYTES + 8192)
        );
        assert_eq!(
            gemv_shared_layout(true, 200_000, optin),
            (true, false, PAIR_TABLE_BYTES)
        );
        // Without the opt-in (48 KiB less the static tables) the table does not fit.
        assert_eq!(gemv_shared_layout(true, 8192, 47_000), (false, true, 8192));
        assert_eq!(gemv_shared_layout(false, 8192, optin), (false, true, 8192));
        assert_eq!(gemv_shared_layout(false, 60_000, 47_000), (false, false, 0));
    }

    #[test]
    fn gemv_rows_per_group_keeps_half_the_resident_warps_busy() {
        // An H200 at 3 CTAs of 8 warps per SM: 3168 resident warps.
        assert_eq!(gemv_rows_per_group(11008, 3168), 4); // 2752 groups
        assert_eq!(gemv_rows_per_group(4096, 3168), 2); // 2048 groups
        assert_eq!(gemv_rows_per_group(2048, 3168), 1);
        assert_eq!(gemv_rows_per_group(3, 3168), 1);
        assert_eq!(gemv_rows_per_group(4096, 1056), 4);
    }

    #[test]
    fn validate_checks_every_length() {
        let packed = [0u8; 50]; // 100 elements, 2 blocks of 64
        assert!(host(&packed, HostAbsmax::Plain(&[1.0, 2.0]), 100)
            .validate("w")
            .is_ok());
        let msg = host(&packed, HostAbsmax::Plain(&[1.0]), 100)
            .validate("w")
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "w: 1 absmax values for 2 blocks");
        assert!(host(&packed, HostAbsmax::Plain(&[1.0, 2.0]), 99)
            .validate("w")
            .is_ok());
        assert!(host(&packed, HostAbsmax::Plain(&[1.0, 2.0]), 98)
            .validate("w")
            .is_err());
        let mut odd_blocks = host(&packed, HostAbsmax::Plain(&[1.0; 3]), 100);
        odd_blocks.blocksize = 48;
        assert!(odd_blocks.validate("w").is_err());
        let map = [0.5f32; 256];
        let double = |nested: &'static [f32], nested_blocksize| HostAbsmax::Double {
            codes: &[1, 2],
            dynamic_map: &map,
            nested,
            offset: 0.1,
            nested_blocksize,
        };
        assert!(host(&packed, double(&[1.0], 256), 100)
            .validate("w")
            .is_ok());
        assert!(host(&packed, double(&[1.0, 1.0], 256), 100)
            .validate("w")
            .is_err());
        assert!(host(&packed, double(&[1.0], 0), 100).validate("w").is_err());
    }

    /// The kernels against a plain CPU loop written from the layout description, on a real GPU;
    /// skipped (with a note) where none initialises. `sun selftest` checks against the quant
    /// module on many more shapes.
    #[test]
    fn kernels_match_a_plain_cpu_loop_on_a_gpu() {
        let gpu = match CudaDevice::new() {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("skipped: no GPU ({e})");
                return;
            }
        };
        // An odd width (partial blocks, the element-by-element GEMV), a width of whole
        // 32-element chunks with an odd number of rows (the chunked GEMV, a lone last row), and
        // a product large enough for the tensor-core GEMV (a partial last 16-row tile, two
        // 128-column k-tiles for eight warps).
        for (rows, cols) in [(3usize, 100usize), (37, 1024), (300, 256)] {
            let numel = rows * cols;
            let packed: Vec<u8> = (0..numel.div_ceil(2))
                .map(|i| (i * 37 + 11) as u8)
                .collect();
            let absmax: Vec<f32> = (0..numel.div_ceil(64))
                .map(|b| 0.5 + (b % 7) as f32 * 0.25)
                .collect();
            let x: Vec<f32> = (0..cols).map(|k| ((k % 7) as f32 - 3.0) / 4.0).collect();
            let expected: Vec<f32> = (0..numel)
                .map(|e| {
                    let byte = packed[e / 2];
                    let code = if e % 2 == 0 { byte >> 4 } else { byte & 0xF };
                    TABLE[code as usize] * absmax[e / 64]
                })
                .collect();
            let expected_y: Vec<f32> = expected
                .chunks(cols)
                .map(|w| w.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect();

            let weight =
                Gpu4bit::upload(&gpu, "w", &host(&packed, HostAbsmax::Plain(&absmax), numel))
                    .unwrap();
            let mut out = GpuBuffer::<f32>::zeroed(&gpu, "out", numel).unwrap();
            weight.dequantize_f32(&gpu, &mut out).unwrap();
            assert_eq!(out.to_host(&gpu, "out").unwrap(), expected);

            let x_bits: Vec<u16> = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let x_gpu = GpuBuffer::from_host(&gpu, "x", &x_bits).unwrap();
            let mut y_gpu = GpuBuffer::<u16>::zeroed(&gpu, "y", rows).unwrap();
            weight
                .gemv_bf16(&gpu, (rows, cols), &x_gpu, &mut y_gpu)
                .unwrap();
            let y = y_gpu.to_host(&gpu, "y").unwrap();
            for (got, want) in y.iter().zip(&expected_y) {
                let got = half::bf16::from_bits(*got).to_f32();
                assert!(
                    (got - want).abs() <= 1e-2 * want.abs().max(1.0),
                    "{rows} x {cols}: {got} vs {want}"
                );
            }
        }
    }
}
