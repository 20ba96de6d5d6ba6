//! Matrix products on tensor cores: `C = alpha * A · Bᵀ + beta * C` in bf16 with f32
//! accumulation, B dense or a 4-bit weight dequantized inside the kernel, and the untransposed
//! `C = A · W` of the backward through a 4-bit weight (kernels in `ptx/matmul.cu`; the CPU oracle
//! is [`crate::backend::gemm::matmul_nt`]).
//!
//! Any M, N, K >= 1: when K (and for `A · W` also N) is a multiple of 8 the kernels move 16-byte
//! chunks with `cp.async`; otherwise the same kernels run with element-by-element loads.
//!
//! On a Hopper GPU (compute capability 9.0) both products through a 4-bit weight, the forward
//! `X Wᵀ` and the input gradient `dY W`, run on the warpgroup tensor cores instead
//! ([`matmul_nt_4bit_sm90`], [`matmul_nn_4bit_sm90`], `ptx/matmul_sm90.cu`) when the shape fits
//! them ([`sm90_fits`]); `SUN_NO_SM90=1` in the environment turns that off. From 256 rows on,
//! where the sm_90a GEMM takes the shape, both dequantize W once into a bf16 scratch and run the
//! GEMM instead ([`super::gemm_sm90`], [`dequant_gemm_fits`], [`dequant_gemm_nn_fits`]), and the
//! dense `A · Bᵀ` and `A · B` run on that GEMM when m, n and k are all at least 256.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{set_dynamic_shared_limit, OrDevice};
use super::gemm_sm90::{
    dense_nn_prefers_sm90, dense_prefers_sm90, gemm_nn_bf16_sm90, gemm_nt_bf16_sm90,
    matmul_nn_4bit_dequant_gemm, matmul_nt_4bit_dequant_gemm,
};
pub use super::gemm_sm90::{dequant_gemm_fits, dequant_gemm_nn_fits};
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::nf4::{Gpu4bit, GpuAbsmax, ScaleArgs};
use crate::error::{Error, Result};
use cust::function::{BlockSize, GridSize};
use cust::launch;
use cust::sys::cudaError_enum;
use std::sync::OnceLock;

const MODULE: &str = "matmul";
/// The sm_90a module (`ptx/matmul_sm90.cu`), loaded on compute capability 9.0 only.
const SM90_MODULE: &str = "matmul_sm90";
/// The sm90 kernel's tiles: M and N in steps of 128, K in steps of 64, one absmax block per
/// 64-element tile row.
const SM90_TILE_M: usize = 128;
const SM90_TILE_N: usize = 128;
const SM90_TILE_K: usize = 64;
const SM90_BLOCKSIZE: usize = 64;
/// The environment variable that keeps the dispatch off the sm90 kernel (`SUN_NO_SM90=1`).
const NO_SM90_VAR: &str = "SUN_NO_SM90";
/// Threads per CTA (`MM_THREADS` in ptx/matmul.cu).
const THREADS: u32 = 256;
/// The C tile of one CTA (`BM` x `BN`).
const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// The largest grid y dimension.
const MAX_GRID_Y: usize = 65535;

/// The shape of a product: C is (m, n) and the contraction runs over k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of A and C (tokens).
    pub m: usize,
    /// Columns of C (output features).
    pub n: usize,
    /// The contracted dimension (input features).
    pub k: usize,
}

impl GemmShape {
    fn validate(&self, what: &str) -> Result<(GridSize, i64, i64, i64)> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(Error::invalid(format!(
                "{what}: every dimension must be at least 1 (m {}, n {}, k {})",
                self.m, self.n, self.k
            )));
        }
        let x = grid_dim(self.n.div_ceil(TILE_N), MAX_GRID_X, what)?;
        let y = grid_dim(self.m.div_ceil(TILE_M), MAX_GRID_Y, what)?;
        Ok((
            GridSize::xy(x, y),
            to_i64(self.m, "m")?,
            to_i64(self.n, "n")?,
            to_i64(self.k, "k")?,
        ))
    }

    fn describe(&self) -> String {
        format!("m {}, n {}, k {}", self.m, self.n, self.k)
    }
}

/// Queues `c (m, n) = alpha * a (m, k) · b (n, k)ᵀ + beta * c`, all bf16 (`beta == 0` never
/// reads `c`): on the sm90 GEMM where it fits and m, n, k are all at least 256
/// ([`super::gemm_sm90::dense_prefers_sm90`]), otherwise on the mma.sync kernel.
pub fn matmul_nt_bf16(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    let (grid, m_i, n_i, k_i) = shape.validate("matmul")?;
    check_len("matmul A", a.len(), m * k)?;
    check_len("matmul B", b.len(), n * k)?;
    check_len("matmul C", c.len(), m * n)?;
    if sm90_enabled() && dense_prefers_sm90(device, shape) {
        return gemm_nt_bf16_sm90(device, a, b, c, shape, alpha, beta);
    }
    let name = if k % 8 == 0 {
        "matmul_nt_bf16_aligned"
    } else {
        "matmul_nt_bf16_any"
    };
    let kernel = device.function(MODULE, name)?;
    let shared = shared_bytes(&kernel, name)?;
    let stream = device.stream();
    let (a, b, c) = (a.device_ptr(), b.device_ptr(), c.device_ptr());
    // SAFETY: the arguments match matmul_nt_bf16_* in ptx/matmul.cu; a, b and c hold m * k,
    // n * k and m * n elements (checked above); the _aligned variant is chosen only when
    // k % 8 == 0, and the grid covers C with 128 x 128 tiles whose edges the kernel predicates.
    unsafe {
        launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
            a, b, c, m_i, n_i, k_i, alpha, beta
        ))
    }
    .or_device(|| format!("launching {name} ({})", shape.describe()))
}

/// Queues `c (m, n) = alpha * a (m, k) · b (k, n) + beta * c`, all bf16 (`beta == 0` never
/// reads `c`): the product by a dense matrix stored (k, n), with no transposed copy of it. On the
/// sm90 GEMM where it fits and m, n, k are all at least 256
/// ([`super::gemm_sm90::dense_nn_prefers_sm90`]: the loss head's `dlogits · W_lm`), otherwise on
/// the mma.sync kernel.
pub fn matmul_nn_bf16(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    let (grid, m_i, n_i, k_i) = shape.validate("matmul")?;
    check_len("matmul A", a.len(), m * k)?;
    check_len("matmul B", b.len(), k * n)?;
    check_len("matmul C", c.len(), m * n)?;
    if sm90_enabled() && dense_nn_prefers_sm90(device, shape) {
        return gemm_nn_bf16_sm90(device, a, b, c, shape, alpha, beta);
    }
    let name = if k % 8 == 0 && n % 8 == 0 {
        "matmul_nn_bf16_aligned"
    } else {
        "matmul_nn_bf16_any"
    };
    let kernel = device.function(MODULE, name)?;
    let shared = shared_bytes(&kernel, name)?;
    let stream = device.stream();
    let (a, b, c) = (a.device_ptr(), b.device_ptr(), c.device_ptr());
    // SAFETY: the arguments match matmul_nn_bf16_* in ptx/matmul.cu; a, b and c hold m * k,
    // k * n and m * n elements (checked above); the _aligned variant is chosen only when
    // k % 8 == 0 and n % 8 == 0, and the grid covers C with 128 x 128 tiles whose edges the
    // kernel predicates.
    unsafe {
        launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
            a, b, c, m_i, n_i, k_i, alpha, beta
        ))
    }
    .or_device(|| format!("launching {name} ({})", shape.describe()))
}

/// Queues `c (m, n) = alpha * a (m, k) · Wᵀ + beta * c` for a 4-bit weight W (n, k) (a linear
/// layer's forward, `X Wᵀ`): on Hopper from 256 rows W dequantized once and the sm90 GEMM
/// ([`dequant_gemm_fits`]), otherwise W dequantized to bf16 tile by tile.
pub fn matmul_nt_4bit(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if sm90_enabled() && dequant_gemm_fits(device, shape) {
        return matmul_nt_4bit_dequant_gemm(device, a, w, c, shape, alpha, beta);
    }
    if sm90_enabled() && sm90_fits(device, w, shape) {
        return matmul_nt_4bit_sm90(device, a, w, c, shape, alpha, beta);
    }
    matmul_nt_4bit_mma_sync(device, a, w, c, shape, alpha, beta)
}

/// [`matmul_nt_4bit`] on the `mma.sync` kernels of `ptx/matmul.cu` (any GPU, any shape),
/// whatever the dispatch would pick: what `sun bench kernels` sets beside the sm90 kernel.
pub fn matmul_nt_4bit_mma_sync(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let aligned = shape.k % 8 == 0;
    launch_4bit(device, "nt", a, w, c, shape, (alpha, beta), aligned)
}

/// Whether the dispatch may use the sm90 kernel: not when `SUN_NO_SM90=1` (read once).
fn sm90_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(NO_SM90_VAR).map_or(true, |v| v.trim() != "1"))
}

/// Whether [`matmul_nt_4bit_sm90`] and [`matmul_nn_4bit_sm90`] can compute their product at
/// `shape` on `device`: their module is loaded (a compute capability 9.0 GPU), m and n are
/// multiples of 128, k of 64, and the weight's blocksize is 64 (the same conditions for `X Wᵀ`
/// with W (n, k) and `dY W` with W (k, n)).
pub fn sm90_fits(device: &CudaDevice, w: &Gpu4bit, shape: GemmShape) -> bool {
    device.has_module(SM90_MODULE) && sm90_shape_fits(shape, w.blocksize)
}

/// The shape half of [`sm90_fits`].
fn sm90_shape_fits(GemmShape { m, n, k }: GemmShape, blocksize: usize) -> bool {
    m > 0
        && n > 0
        && k > 0
        && m % SM90_TILE_M == 0
        && n % SM90_TILE_N == 0
        && k % SM90_TILE_K == 0
        && blocksize == SM90_BLOCKSIZE
}

/// Queues `c (m, n) = alpha * a (m, k) · Wᵀ + beta * c` for a 4-bit weight W (n, k) on Hopper's
/// warpgroup tensor cores (`ptx/matmul_sm90.cu`), whatever the dispatch would pick. An error
/// when [`sm90_fits`] does not hold (no sm_90a module on this GPU, or a shape or blocksize the
/// kernel does not take).
pub fn matmul_nt_4bit_sm90(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    launch_4bit_sm90(device, "nt", a, w, c, shape, (alpha, beta))
}

/// Queues `c (m, n) = alpha * a (m, k) · W + beta * c` for a 4-bit weight W (k, n) (the input
/// gradient of a linear layer, `dY W`): on Hopper from 256 rows W dequantized once and the sm90
/// GEMM reading it (k, n) ([`dequant_gemm_nn_fits`]), otherwise W dequantized to bf16 tile by
/// tile.
pub fn matmul_nn_4bit(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if sm90_enabled() && dequant_gemm_nn_fits(device, shape) {
        return matmul_nn_4bit_dequant_gemm(device, a, w, c, shape, alpha, beta);
    }
    if sm90_enabled() && sm90_fits(device, w, shape) {
        return matmul_nn_4bit_sm90(device, a, w, c, shape, alpha, beta);
    }
    matmul_nn_4bit_mma_sync(device, a, w, c, shape, alpha, beta)
}

/// [`matmul_nn_4bit`] on the `mma.sync` kernels of `ptx/matmul.cu` (any GPU, any shape),
/// whatever the dispatch would pick: what `sun bench kernels` sets beside the sm90 kernel.
pub fn matmul_nn_4bit_mma_sync(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let aligned = shape.k % 8 == 0 && shape.n % 8 == 0;
    launch_4bit(device, "nn", a, w, c, shape, (alpha, beta), aligned)
}

/// Queues `c (m, n) = alpha * a (m, k) · W + beta * c` for a 4-bit weight W (k, n) on Hopper's
/// warpgroup tensor cores (`ptx/matmul_sm90.cu`), whatever the dispatch would pick. An error
/// when [`sm90_fits`] does not hold (no sm_90a module on this GPU, or a shape or blocksize the
/// kernel does not take).
pub fn matmul_nn_4bit_sm90(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    launch_4bit_sm90(device, "nn", a, w, c, shape, (alpha, beta))
}

/// Checks a 4-bit product's operands against `shape` (A (m, k), C (m, n), W n x k elements)
/// and returns its grid and sizes as the kernels take them.
fn check_4bit_operands(
    what: &str,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &GpuBuffer<u16>,
    shape: GemmShape,
) -> Result<(GridSize, i64, i64, i64)> {
    let GemmShape { m, n, k } = shape;
    let sizes = shape.validate(what)?;
    check_len("matmul A", a.len(), m * k)?;
    check_len("matmul C", c.len(), m * n)?;
    if n.checked_mul(k) != Some(w.numel) {
        return Err(Error::invalid(format!(
            "{what}: a 4-bit weight of {} elements is not {n} x {k}",
            w.numel
        )));
    }
    Ok(sizes)
}

/// "plain" or "double": the kernels' name for a weight's kind of block scales.
fn scale_kind(w: &Gpu4bit) -> &'static str {
    match w.absmax {
        GpuAbsmax::Plain(_) => "plain",
        GpuAbsmax::Double { .. } => "double",
    }
}

/// Launches `matmul_{layout}_4bit_{plain,double}_sm90` (`layout` "nt": W (n, k), `X Wᵀ`; "nn":
/// W (k, n), `dY W`) after checking what the kernels require.
fn launch_4bit_sm90(
    device: &CudaDevice,
    layout: &str,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    (alpha, beta): (f32, f32),
) -> Result<()> {
    let what = format!("4-bit matmul ({layout}, sm90)");
    if !device.has_module(SM90_MODULE) {
        return Err(Error::unsupported(format!(
            "{what}: the sm_90a kernels are loaded only on GPUs of compute capability 9.0; \
             this one is {}.{}",
            device.compute_capability().0,
            device.compute_capability().1
        )));
    }
    if !sm90_shape_fits(shape, w.blocksize) {
        return Err(Error::unsupported(format!(
            "{what}: takes m and n multiples of {SM90_TILE_M}, k a multiple of {SM90_TILE_K} and \
             blocksize {SM90_BLOCKSIZE}, not {} with blocksize {}",
            shape.describe(),
            w.blocksize
        )));
    }
    let (grid, m_i, n_i, k_i) = check_4bit_operands(&what, a, w, c, shape)?;
    let name = format!("matmul_{layout}_4bit_{}_sm90", scale_kind(w));
    let kernel = device.function(SM90_MODULE, &name)?;
    let shared = raise_shared_limit(&kernel, &name, SM90_SHARED_BYTES)?;
    let stream = device.stream();
    let (a, packed, table, c) = (
        a.device_ptr(),
        w.packed.device_ptr(),
        w.code_table.device_ptr(),
        c.device_ptr(),
    );
    // Both launches: the arguments match matmul_{nt,nn}_4bit_{plain,double}_sm90 in
    // ptx/matmul_sm90.cu (the same list for both layouts: layout is "nt" or "nn", the callers'
    // literals); a holds m * k and c m * n elements, the weight n * k with its scales
    // covering every block (validated at upload), the table 16 and the dynamic map 256 entries;
    // m, n are multiples of 128, k of 64 and the blocksize 64 (checked above), which the kernel
    // requires; every buffer is a whole device allocation (256-byte aligned), so the kernel's
    // 16-byte copies of A and the codes and 4-byte copies of the scales are aligned; the grid is
    // exactly (n / 128, m / 128) tiles of 128 x 128 with 256 threads each.
    let result = match w.absmax.args() {
        ScaleArgs::Plain(absmax) => {
            // SAFETY: as stated above, for the plain-scale argument list.
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a, packed, table, absmax, c, m_i, n_i, k_i, alpha, beta
                ))
            }
        }
        ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize) => {
            // SAFETY: as stated above, for the double-quantized argument list.
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a, packed, table, codes, dynamic_map, nested, offset, nested_blocksize, c,
                    m_i, n_i, k_i, alpha, beta
                ))
            }
        }
    };
    result.or_device(|| format!("launching {name} ({})", shape.describe()))
}

#[allow(clippy::too_many_arguments)]
fn launch_4bit(
    device: &CudaDevice,
    layout: &str,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    (alpha, beta): (f32, f32),
    aligned: bool,
) -> Result<()> {
    let what = format!("4-bit matmul ({layout})");
    let (grid, m_i, n_i, k_i) = check_4bit_operands(&what, a, w, c, shape)?;
    if w.blocksize % 8 != 0 {
        return Err(Error::invalid(format!(
            "{what}: blocksize {} is not a multiple of 8",
            w.blocksize
        )));
    }
    let blocksize = to_i64(w.blocksize, "blocksize")?;
    let variant = if aligned { "aligned" } else { "any" };
    let name = format!("matmul_{layout}_4bit_{}_{variant}", scale_kind(w));
    let kernel = device.function(MODULE, &name)?;
    let shared = shared_bytes(&kernel, &name)?;
    let stream = device.stream();
    let (a, packed, table, c) = (
        a.device_ptr(),
        w.packed.device_ptr(),
        w.code_table.device_ptr(),
        c.device_ptr(),
    );
    // Both launches: the arguments match matmul_{nt,nn}_4bit_{plain,double}_* in
    // ptx/matmul.cu; a holds m * k and c m * n elements, the weight n * k elements with its
    // scales covering every block (validated at upload), the table 16 and the dynamic map 256
    // entries; the _aligned variants are chosen only when their divisibility holds, and the grid
    // covers C with 128 x 128 tiles whose edges the kernel predicates.
    let result = match w.absmax.args() {
        ScaleArgs::Plain(absmax) => {
            // SAFETY: as stated above, for the plain-scale argument list.
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a, packed, table, absmax, blocksize, c, m_i, n_i, k_i, alpha, beta
                ))
            }
        }
        ScaleArgs::Double(codes, dynamic_map, nested, offset, nested_blocksize) => {
            // SAFETY: as stated above, for the double-quantized argument list.
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a, packed, table, codes, dynamic_map, nested, offset, nested_blocksize,
                    blocksize, c, m_i, n_i, k_i, alpha, beta
                ))
            }
        }
    };
    result.or_device(|| format!("launching {name} ({})", shape.describe()))
}

/// Dynamic shared memory of every matmul kernel (`MM_SHARED_BYTES` in ptx/matmul.cu): two
/// stages of the 128 x 64 A tile and of the B tile at a 72-element row pitch, the 16-entry code
/// table and the 256-entry dynamic map.
const SHARED_BYTES: usize = 8 * 128 * (64 + 8) + (16 + 256) * 4;

/// Dynamic shared memory of the sm90 kernels (`SM90_SHARED_BYTES` in ptx/matmul_sm90.cu):
/// four stages of the 128 x 64 bf16 A tile, two bf16 W stages, two stages of the W codes (4 KB)
/// and scales (1 KB), the code table and dynamic map, plus 1 KB to align the base to 1024 bytes.
const SM90_SHARED_BYTES: usize =
    4 * 16384 + 2 * 16384 + 2 * 4096 + 2 * 1024 + (16 + 256) * 4 + 1024;
// ptx/matmul_sm90.cu's USED_BYTES (109,632) plus the slack; two CTAs fit an H100/H200 SM (228 KB,
// 1 KB of it reserved per CTA), as its __launch_bounds__(256, 2) plans.
const _: () = assert!(SM90_SHARED_BYTES == 109_632 + 1024);
const _: () = assert!(2 * (SM90_SHARED_BYTES + 1024) <= 228 * 1024);

/// Raises `kernel`'s dynamic shared-memory limit to [`SHARED_BYTES`] (above the 48 KB default)
/// and returns it as a launch argument.
fn shared_bytes(kernel: &cust::function::Function<'_>, name: &str) -> Result<u32> {
    raise_shared_limit(kernel, name, SHARED_BYTES)
}

/// Raises `kernel`'s dynamic shared-memory limit to `bytes` and returns it as a launch argument.
fn raise_shared_limit(
    kernel: &cust::function::Function<'_>,
    name: &str,
    bytes: usize,
) -> Result<u32> {
    let status = set_dynamic_shared_limit(kernel, bytes);
    if status != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "{name} needs {bytes} bytes of shared memory per CTA; the GPU refused ({status:?})"
        )));
    }
    // The limits are constants of a few hundred KB at most.
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm90_takes_whole_tiles_and_blocksize_64_only() {
        let fits = |m, n, k, blocksize| sm90_shape_fits(GemmShape { m, n, k }, blocksize);
        assert!(fits(128, 128, 64, 64));
        // The 7B shape's linears, forward and dX alike: 11008 = 86 x 128 = 172 x 64.
        assert!(fits(4096, 11008, 4096, 64));
        assert!(fits(4096, 4096, 11008, 64));
        // SmolLM2's hidden width 576 = 4.5 x 128 as n falls back; as k (9 x 64) it fits.
        assert!(!fits(4096, 576, 1536, 64));
        assert!(fits(4096, 1536, 576, 64));
        assert!(!fits(100, 128, 64, 64));
        assert!(!fits(128, 130, 64, 64));
        assert!(!fits(128, 128, 96, 64));
        assert!(!fits(128, 128, 64, 128));
        assert!(!fits(0, 128, 64, 64));
    }
}
