//! Matrix products on tensor cores: `C = alpha * A · Bᵀ + beta * C` in bf16 with f32
//! accumulation, B dense or a 4-bit weight dequantized inside the kernel, and the untransposed
//! `C = A · W` of the backward through a 4-bit weight (kernels in `ptx/matmul.cu`; the CPU oracle
//! is [`crate::backend::gemm::matmul_nt`]).
//!
//! Any M, N, K >= 1: when K (and for `A · W` also N) is a multiple of 8 the kernels move 16-byte
//! chunks with `cp.async`; otherwise the same kernels run with element-by-element loads.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{set_dynamic_shared_limit, OrDevice};
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::nf4::{Gpu4bit, GpuAbsmax, ScaleArgs};
use crate::error::{Error, Result};
use cust::function::{BlockSize, GridSize};
use cust::launch;
use cust::sys::cudaError_enum;

const MODULE: &str = "matmul";
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
/// reads `c`).
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
/// reads `c`): the product by a dense matrix stored (k, n), with no transposed copy of it.
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
/// layer's forward, `X Wᵀ`), W dequantized to bf16 tile by tile.
pub fn matmul_nt_4bit(
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

/// Queues `c (m, n) = alpha * a (m, k) · W + beta * c` for a 4-bit weight W (k, n) (the input
/// gradient of a linear layer, `dY W`), W dequantized to bf16 tile by tile.
pub fn matmul_nn_4bit(
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
    let GemmShape { m, n, k } = shape;
    let what = format!("4-bit matmul ({layout})");
    let (grid, m_i, n_i, k_i) = shape.validate(&what)?;
    check_len("matmul A", a.len(), m * k)?;
    check_len("matmul C", c.len(), m * n)?;
    if n.checked_mul(k) != Some(w.numel) {
        return Err(Error::invalid(format!(
            "{what}: a 4-bit weight of {} elements is not {n} x {k}",
            w.numel
        )));
    }
    if w.blocksize % 8 != 0 {
        return Err(Error::invalid(format!(
            "{what}: blocksize {} is not a multiple of 8",
            w.blocksize
        )));
    }
    let blocksize = to_i64(w.blocksize, "blocksize")?;
    let variant = if aligned { "aligned" } else { "any" };
    let kind = match w.absmax {
        GpuAbsmax::Plain(_) => "plain",
        GpuAbsmax::Double { .. } => "double",
    };
    let name = format!("matmul_{layout}_4bit_{kind}_{variant}");
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

/// Raises `kernel`'s dynamic shared-memory limit to [`SHARED_BYTES`] (above the 48 KB default)
/// and returns it as a launch argument.
fn shared_bytes(kernel: &cust::function::Function<'_>, name: &str) -> Result<u32> {
    let status = set_dynamic_shared_limit(kernel, SHARED_BYTES);
    if status != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "{name} needs {SHARED_BYTES} bytes of shared memory per CTA; the GPU refused \
             ({status:?})"
        )));
    }
    Ok(SHARED_BYTES as u32)
}
