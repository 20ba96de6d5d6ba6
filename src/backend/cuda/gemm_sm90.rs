//! The dense bf16 GEMM on Hopper (`ptx/gemm_sm90.cu`: TMA loads into an mbarrier ring, a
//! producer warpgroup, two `wgmma` consumer warpgroups, 128 x 256 tiles, a persistent grid), with
//! B stored (n, k) (`A · Bᵀ`, [`gemm_nt_bf16_sm90`]) or (k, n) (`A · B`, [`gemm_nn_bf16_sm90`]),
//! and the 4-bit products built on it: W dequantized once, as stored, into the device's bf16
//! scratch ([`CudaDevice::with_dequant_scratch`]), then one GEMM.
//!
//! The module is built for `compute_90a` and loaded on compute capability 9.0 only; callers ask
//! [`gemm_sm90_fits`] (or [`gemm_nn_sm90_fits`]) first, and the dispatch in [`super::matmul`]
//! keeps the other kernels for every other GPU and shape.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::{set_dynamic_shared_limit, OrDevice};
use super::driver_api::cuTensorMapEncodeTiled;
use super::launch_checks::{check_len, check_len_at_least, to_i64};
use super::matmul::GemmShape;
use super::nf4::Gpu4bit;
use crate::error::{Error, Result};
use cust::function::{BlockSize, GridSize};
use cust::launch;
use cust::memory::{DeviceCopy, DevicePointer};
use cust::sys::cudaError_enum;
use std::ffi::c_void;

/// The sm_90a module (`ptx/gemm_sm90.cu`).
const MODULE: &str = "gemm_sm90";
const KERNEL: &str = "gemm_nt_bf16_sm90";
/// The same kernel reading B stored (k, n), N contiguous.
const NN_KERNEL: &str = "gemm_nn_bf16_sm90";
/// The kernel's C tile and K step (`GEMM_BM`, `GEMM_BN`, `GEMM_BK`).
const TILE_M: usize = 128;
const TILE_N: usize = 256;
const TILE_K: usize = 64;
/// N must be a multiple of this: the epilogue stores bf16 pairs 4-byte aligned (and B (k, n)'s
/// rows must be 16-byte aligned for its tensor map).
const N_MULTIPLE: usize = 8;
/// With B stored (k, n), K must be a multiple of this (A's rows 16-byte aligned for its tensor
/// map); the kernel zero-fills the last K step past K.
const NN_K_MULTIPLE: usize = 8;
/// Every tensor map's box is this many elements wide: 64 bf16 = 128 bytes, the swizzle span.
const BOX_COLS: usize = 64;
/// Rows (k) of a B (k, n) box: one K step.
const NN_B_BOX_ROWS: usize = TILE_K;
/// Threads per CTA (`GEMM_THREADS`): the producer warpgroup and two consumers.
const THREADS: u32 = 384;
/// Dynamic shared memory (`GEMM_SHARED_BYTES`): 4 stages of a 128 x 64 A tile (16 KB) and a
/// 256 x 64 B tile (32 KB), the epilogue's four 64 x 64 bf16 boxes (8 KB each), 8 mbarriers, and
/// 1 KB to align the base to 1024 bytes.
const SHARED_BYTES: usize = 4 * (16384 + 32768) + 4 * 8192 + 8 * 8 + 1024;
/// Rows of C a TMA store writes (`c_map`'s box: 64 columns x 64 rows).
const STORE_BOX_ROWS: usize = 64;
// ptx/gemm_sm90.cu's USED_BYTES (229,440) plus the slack, under the 227 KB a CTA may have.
const _: () = assert!(SHARED_BYTES == 229_440 + 1024);
const _: () = assert!(SHARED_BYTES <= 227 * 1024);
/// Products with fewer rows than this keep the in-loop kernels: see [`dequant_gemm_fits`].
pub const DEQUANT_GEMM_MIN_ROWS: usize = 256;
/// A dense product is routed to this GEMM when each of m, n and k is at least this: the
/// 128 x 256 tile is then mostly full and the K loop is long enough for the ring to run ahead.
pub const DENSE_MIN_DIM: usize = 256;

/// cuda.h's enum values for `cuTensorMapEncodeTiled` (CUDA 13.0 `include/cuda.h`):
/// `CU_TENSOR_MAP_DATA_TYPE_BFLOAT16` is the tenth of `CUtensorMapDataType` (UINT8 = 0, UINT16,
/// UINT32, INT32, UINT64, INT64, FLOAT16, FLOAT32, FLOAT64, BFLOAT16).
const TENSOR_MAP_DATA_TYPE_BFLOAT16: u32 = 9;
/// `CU_TENSOR_MAP_INTERLEAVE_NONE = 0`.
const TENSOR_MAP_INTERLEAVE_NONE: u32 = 0;
/// `CU_TENSOR_MAP_SWIZZLE_128B` (NONE = 0, 32B, 64B, 128B).
const TENSOR_MAP_SWIZZLE_128B: u32 = 3;
/// `CU_TENSOR_MAP_L2_PROMOTION_L2_256B` (NONE = 0, L2_64B, L2_128B, L2_256B).
const TENSOR_MAP_L2_PROMOTION_256B: u32 = 3;
/// `CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0`: elements outside the tensor are read as zeros.
const TENSOR_MAP_OOB_FILL_ZEROS: u32 = 0;

/// `CUtensorMap`: 128 opaque bytes, 64-byte aligned for the driver (cuda.h 13.0 declares 128),
/// passed to the kernel by value.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: a tensor map is plain bytes the driver wrote; it holds a device address, no host
// pointer, and the launch copies it into the kernel's parameter space.
unsafe impl DeviceCopy for TensorMap {}

/// Whether the GEMM takes `shape` on `device`: its module is loaded (compute capability 9.0),
/// k is a multiple of 64, n of 8, and every dimension is from 1 to 2^31 - 1.
pub fn gemm_sm90_fits(device: &CudaDevice, shape: GemmShape) -> bool {
    device.has_module(MODULE) && shape_fits(shape)
}

/// The shape half of [`gemm_sm90_fits`].
fn shape_fits(GemmShape { m, n, k }: GemmShape) -> bool {
    dims_fit(m, n, k) && k % TILE_K == 0 && n % N_MULTIPLE == 0
}

/// Whether the GEMM with B stored (k, n) takes `shape` on `device`: its module is loaded
/// (compute capability 9.0), n and k are multiples of 8, and every dimension is from 1 to
/// 2^31 - 1.
pub fn gemm_nn_sm90_fits(device: &CudaDevice, shape: GemmShape) -> bool {
    device.has_module(MODULE) && nn_shape_fits(shape)
}

/// The shape half of [`gemm_nn_sm90_fits`].
fn nn_shape_fits(GemmShape { m, n, k }: GemmShape) -> bool {
    dims_fit(m, n, k) && k % NN_K_MULTIPLE == 0 && n % N_MULTIPLE == 0
}

/// Every dimension from 1 to 2^31 - 1 (the kernel's int32 coordinates).
fn dims_fit(m: usize, n: usize, k: usize) -> bool {
    let below_2_31 = |v: usize| v > 0 && v < (1 << 31);
    below_2_31(m) && below_2_31(n) && below_2_31(k)
}

/// Whether a dense `matmul_nt_bf16` at `shape` is better on this GEMM than on the mma.sync
/// kernel: it fits, and m, n, k are all at least [`DENSE_MIN_DIM`] (the LoRA products, with r
/// as n or k, stay where they were).
pub fn dense_prefers_sm90(device: &CudaDevice, shape: GemmShape) -> bool {
    shape.m >= DENSE_MIN_DIM
        && shape.n >= DENSE_MIN_DIM
        && shape.k >= DENSE_MIN_DIM
        && gemm_sm90_fits(device, shape)
}

/// Whether a dense `matmul_nn_bf16` (B stored (k, n)) at `shape` is better on this GEMM than on
/// the mma.sync kernel: it fits ([`gemm_nn_sm90_fits`]) and m, n, k are all at least
/// [`DENSE_MIN_DIM`].
pub fn dense_nn_prefers_sm90(device: &CudaDevice, shape: GemmShape) -> bool {
    shape.m >= DENSE_MIN_DIM
        && shape.n >= DENSE_MIN_DIM
        && shape.k >= DENSE_MIN_DIM
        && gemm_nn_sm90_fits(device, shape)
}

/// Whether a 4-bit product at `shape` (C (m, n), contraction k) goes through dequantize + GEMM:
/// the GEMM fits and m >= [`DEQUANT_GEMM_MIN_ROWS`].
///
/// Why 256: the dequantization is a fixed cost per call (W read as 4 bits, written as bf16: ~35
/// us for 11008 x 4096) and the GEMM then reads bf16 W; at ~700 TFLOP/s the product costs
/// 0.13 us per row of 4096 -> 11008 against 0.29 us on the in-loop wgmma kernel (~315 TFLOP/s),
/// so the two meet at 35 / (0.29 - 0.13) ~ 220 rows; from 256 rows on the new path is ahead.
pub fn dequant_gemm_fits(device: &CudaDevice, shape: GemmShape) -> bool {
    shape.m >= DEQUANT_GEMM_MIN_ROWS && gemm_sm90_fits(device, shape)
}

/// [`dequant_gemm_fits`] for the input gradient `dY W` (W stored (k, n)): the GEMM with B
/// stored (k, n) fits ([`gemm_nn_sm90_fits`]) and m >= [`DEQUANT_GEMM_MIN_ROWS`].
pub fn dequant_gemm_nn_fits(device: &CudaDevice, shape: GemmShape) -> bool {
    shape.m >= DEQUANT_GEMM_MIN_ROWS && gemm_nn_sm90_fits(device, shape)
}

/// Queues `c (m, n) = alpha * a (m, k) · b (n, k)ᵀ + beta * c`, all bf16 (`beta == 0` never reads
/// `c`), on the sm_90a GEMM. An error when [`gemm_sm90_fits`] does not hold.
pub fn gemm_nt_bf16_sm90(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_len("gemm sm90 B", b.len(), shape.n.saturating_mul(shape.k))?;
    launch_gemm(device, a, b, BLayout::Nk(None), c, shape, (alpha, beta))
}

/// Queues `c (m, n) = alpha * a (m, k) · b (k, n) + beta * c`, all bf16, B stored (k, n) with n
/// contiguous (`beta == 0` never reads `c`), on the sm_90a GEMM. An error when
/// [`gemm_nn_sm90_fits`] does not hold.
pub fn gemm_nn_bf16_sm90(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_len("gemm sm90 B", b.len(), shape.k.saturating_mul(shape.n))?;
    launch_gemm(device, a, b, BLayout::Kn, c, shape, (alpha, beta))
}

/// Queues `c (m, n) = alpha * a (m, k) · Wᵀ + beta * c` for a 4-bit weight W (n, k): W
/// dequantized into the device's bf16 scratch, then the GEMM. An error when
/// [`gemm_sm90_fits`] does not hold.
pub fn matmul_nt_4bit_dequant_gemm(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let what = "4-bit matmul (nt, dequantize + GEMM)";
    nt_dequant_gemm(device, what, a, w, None, c, shape, (alpha, beta))
}

/// W (n, k) dequantized into the device's scratch, then the GEMM with `a` and, if given, the
/// low-rank term.
#[allow(clippy::too_many_arguments)]
fn nt_dequant_gemm(
    device: &CudaDevice,
    what: &str,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    low_rank: Option<LowRank<'_>>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha_beta: (f32, f32),
) -> Result<()> {
    check_weight(what, w, shape)?;
    device.with_dequant_scratch(w.numel(), |scratch| {
        w.dequantize_bf16_prefix(device, scratch)?; // (n, k)
        launch_gemm(
            device,
            a,
            scratch,
            BLayout::Nk(low_rank),
            c,
            shape,
            alpha_beta,
        )
    })
}

/// A low-rank term `A2 B2ᵀ` added to a GEMM's product in the same pass: A2 (m, r), B2 (n, r),
/// bf16, r a multiple of [`LOW_RANK_MULTIPLE`] (LoRA's z, already scaled, and its B).
pub struct LowRank<'a> {
    /// A2 (m, r).
    pub a: &'a GpuBuffer<u16>,
    /// B2 (n, r).
    pub b: &'a GpuBuffer<u16>,
    /// The rank r.
    pub r: usize,
}

/// A low-rank term's rank must keep its rows 16-byte aligned for the tensor maps.
pub const LOW_RANK_MULTIPLE: usize = 8;

/// Whether [`matmul_nt_4bit_low_rank`] takes a product of `shape` with a rank-`r` term on
/// `device`: the dequantize + GEMM path fits ([`dequant_gemm_fits`]) and r is a positive
/// multiple of [`LOW_RANK_MULTIPLE`].
pub fn low_rank_fits(device: &CudaDevice, shape: GemmShape, r: usize) -> bool {
    rank_fits(r) && dequant_gemm_fits(device, shape)
}

/// r is a positive multiple of [`LOW_RANK_MULTIPLE`].
fn rank_fits(r: usize) -> bool {
    r > 0 && r % LOW_RANK_MULTIPLE == 0
}

/// Queues `c (m, n) = a (m, k) · Wᵀ + A2 B2ᵀ` for a 4-bit weight W (n, k) and a low-rank term
/// (a linear layer and its LoRA adapter, z = s drop(x) Aᵀ as A2 and the adapter's B as B2), in
/// one GEMM after dequantizing W: no second pass over c. An error unless [`low_rank_fits`].
pub fn matmul_nt_4bit_low_rank(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    low_rank: LowRank<'_>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
) -> Result<()> {
    if !rank_fits(low_rank.r) {
        return Err(Error::unsupported(format!(
            "a GEMM's low-rank term must have a rank that is a positive multiple of \
             {LOW_RANK_MULTIPLE}, not {}",
            low_rank.r
        )));
    }
    let what = "4-bit matmul + low-rank term (dequantize + GEMM)";
    nt_dequant_gemm(device, what, a, w, Some(low_rank), c, shape, (1.0, 0.0))
}

/// Queues `c (m, n) = alpha * a (m, k) · W + beta * c` for a 4-bit weight W (k, n): W
/// dequantized as stored into the device's bf16 scratch, then the GEMM with B stored (k, n). An
/// error when [`gemm_nn_sm90_fits`] does not hold.
pub fn matmul_nn_4bit_dequant_gemm(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    w: &Gpu4bit,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_weight("4-bit matmul (nn, dequantize + GEMM)", w, shape)?;
    device.with_dequant_scratch(w.numel(), |scratch| {
        w.dequantize_bf16_prefix(device, scratch)?; // (k, n)
        launch_gemm(device, a, scratch, BLayout::Kn, c, shape, (alpha, beta))
    })
}

/// The weight holds n x k elements and the GEMM takes the shape.
fn check_weight(what: &str, w: &Gpu4bit, shape: GemmShape) -> Result<()> {
    if shape.n.checked_mul(shape.k) != Some(w.numel()) {
        return Err(Error::invalid(format!(
            "{what}: a 4-bit weight of {} elements is not {} x {}",
            w.numel(),
            shape.n,
            shape.k
        )));
    }
    Ok(())
}

/// How the GEMM reads B, and which kernel that is.
enum BLayout<'a> {
    /// B (n, k), k contiguous (`gemm_nt_bf16_sm90`), with a low-rank term or without.
    Nk(Option<LowRank<'a>>),
    /// B (k, n), n contiguous (`gemm_nn_bf16_sm90`); no low-rank term.
    Kn,
}

/// Checks the operands, builds the tensor maps and launches the kernel of `layout`; `b` may be
/// longer than n * k (the scratch): its first n * k elements are B.
fn launch_gemm(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    layout: BLayout<'_>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    (alpha, beta): (f32, f32),
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    let stored = if matches!(layout, BLayout::Kn) {
        "B (k, n)"
    } else {
        "B (n, k)"
    };
    let what = format!("gemm sm90, {stored} (m {m}, n {n}, k {k})");
    if !device.has_module(MODULE) {
        let (major, minor) = device.compute_capability();
        return Err(Error::unsupported(format!(
            "{what}: the sm_90a GEMM is loaded only on GPUs of compute capability 9.0; this \
             one is {major}.{minor}"
        )));
    }
    let (fits, name) = match layout {
        BLayout::Nk(_) => (shape_fits(shape), KERNEL),
        BLayout::Kn => (nn_shape_fits(shape), NN_KERNEL),
    };
    if !fits {
        let k_multiple = match layout {
            BLayout::Nk(_) => TILE_K,
            BLayout::Kn => NN_K_MULTIPLE,
        };
        return Err(Error::unsupported(format!(
            "{what}: takes k a multiple of {k_multiple}, n a multiple of {N_MULTIPLE} and every \
             dimension from 1 to 2^31 - 1"
        )));
    }
    check_len("gemm sm90 A", a.len(), m * k)?;
    check_len("gemm sm90 C", c.len(), m * n)?;
    check_len_at_least("gemm sm90 B", b.len(), n * k)?;
    let kernel = device.function(MODULE, name)?; // binds the context the maps are made in
    let a_map = tensor_map(a.device_ptr(), m, k, TILE_M, "A")?;
    // C (m, n) in the same encoding, 64 x 64 boxes: the epilogue's TMA stores (beta 0) and
    // reductions (beta 1).
    let c_map = tensor_map(c.device_ptr(), m, n, STORE_BOX_ROWS, "C")?;
    let status = set_dynamic_shared_limit(&kernel, SHARED_BYTES);
    if status != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "{name} needs {SHARED_BYTES} bytes of shared memory per CTA; the GPU refused \
             ({status:?})"
        )));
    }
    let tiles = m.div_ceil(TILE_M) * n.div_ceil(TILE_N);
    let grid = GridSize::x(tiles.min(device.sm_count() as usize).max(1) as u32);
    let (m_i, n_i, k_i) = (to_i64(m, "m")?, to_i64(n, "n")?, to_i64(k, "k")?);
    let stream = device.stream();
    let c = c.device_ptr();
    let shared = SHARED_BYTES as u32;
    let result = match layout {
        BLayout::Nk(low_rank) => {
            let b_map = tensor_map(b.device_ptr(), n, k, TILE_N, "B")?;
            // Without a low-rank term the kernel never reads the second pair: A's and B's stand
            // in.
            let (a2_map, b2_map, r) = match low_rank {
                Some(LowRank { a: a2, b: b2, r }) => {
                    check_len("gemm sm90 low-rank A2", a2.len(), m * r)?;
                    check_len("gemm sm90 low-rank B2", b2.len(), n * r)?;
                    let a2_map = tensor_map(a2.device_ptr(), m, r, TILE_M, "low-rank A2")?;
                    (
                        a2_map,
                        tensor_map(b2.device_ptr(), n, r, TILE_N, "low-rank B2")?,
                        r,
                    )
                }
                None => (a_map, b_map, 0),
            };
            let r_i = to_i64(r, "low-rank r")?;
            // SAFETY: the arguments match gemm_nt_bf16_sm90 in ptx/gemm_sm90.cu (five tensor
            // maps by value, C, M, N, K, K2, alpha, beta); the maps describe A (m, k), the first
            // n * k elements of B and, with a low-rank term, A2 (m, r) and B2 (n, r), which the
            // buffers hold (checked above; without one K2 = 0 and the second pair is never
            // read), so TMA reads only inside them; c_map describes C (m, n), which C holds, so
            // the TMA stores and reductions write only inside it, and the plain stores (any
            // other beta) touch only rows < m and columns < n; k % 64 == 0, n % 8 == 0 and the
            // dimensions below 2^31 (shape_fits) are what the kernel requires; 384 threads, the
            // dynamic shared memory the kernel's limit was raised to, and any grid size
            // (persistent).
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a_map, b_map, a2_map, b2_map, c_map, c, m_i, n_i, k_i, r_i, alpha, beta
                ))
            }
        }
        BLayout::Kn => {
            let b_map = tensor_map(b.device_ptr(), k, n, NN_B_BOX_ROWS, "B (k, n)")?;
            // SAFETY: the arguments match gemm_nn_bf16_sm90 in ptx/gemm_sm90.cu (three tensor
            // maps by value, C, M, N, K, alpha, beta); the maps describe A (m, k) and the first
            // k * n elements of B, which the buffers hold (checked above), so TMA reads only
            // inside them (zeros past K and N); c_map describes C (m, n), which C holds, so the
            // TMA stores and reductions write only inside it, and the plain stores (any other
            // beta) touch only rows < m and columns < n; k % 8 == 0, n % 8 == 0 and the
            // dimensions below 2^31 (nn_shape_fits) are what the kernel requires; 384 threads,
            // the dynamic shared memory the kernel's limit was raised to, and any grid size
            // (persistent).
            unsafe {
                launch!(kernel<<<grid, BlockSize::x(THREADS), shared, stream>>>(
                    a_map, b_map, c_map, c, m_i, n_i, k_i, alpha, beta
                ))
            }
        }
    };
    result.or_device(|| format!("launching {name} ({what})"))
}

/// The tensor map of a row-major bf16 matrix (rows, cols) at `ptr`, in boxes of 64 (cols) x
/// `box_rows` with the 128-byte swizzle: loads read zeros past its edges, stores write nothing
/// there.
fn tensor_map(
    ptr: DevicePointer<u16>,
    rows: usize,
    cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap> {
    let mut map = TensorMap([0; 16]);
    let dims: [u64; 2] = [cols as u64, rows as u64]; // innermost first
    let strides: [u64; 1] = [cols as u64 * 2]; // bytes from one row to the next: a multiple of 16
    let boxes: [u32; 2] = [BOX_COLS as u32, box_rows as u32]; // 128 bytes, the swizzle span
    let element_strides: [u32; 2] = [1, 1];
    // SAFETY: `map` is 128 writable bytes, 128-byte aligned; the four arrays hold `rank` = 2
    // entries (one stride); the address is a device allocation (256-byte aligned) the caller
    // keeps alive while the kernel reads it; the function only encodes, it touches no memory.
    let status = unsafe {
        cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast::<c_void>(),
            TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr.as_raw() as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            TENSOR_MAP_INTERLEAVE_NONE,
            TENSOR_MAP_SWIZZLE_128B,
            TENSOR_MAP_L2_PROMOTION_256B,
            TENSOR_MAP_OOB_FILL_ZEROS,
        )
    };
    if status != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "encoding the tensor map of gemm sm90 {what} ({rows} x {cols} bf16) failed: \
             {status:?}"
        )));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gemm_takes_k_in_steps_of_64_and_n_in_steps_of_8() {
        let fits = |m, n, k| shape_fits(GemmShape { m, n, k });
        assert!(fits(1, 8, 64));
        assert!(fits(4096, 11008, 4096));
        assert!(fits(4096, 4096, 11008)); // 11008 = 172 x 64
        assert!(fits(300, 4104, 128));
        assert!(fits(4096, 576, 1536)); // SmolLM2's widths, as n and as k
        assert!(fits(4096, 1536, 576));
        assert!(!fits(128, 8, 96));
        assert!(!fits(128, 12, 64));
        assert!(!fits(0, 8, 64));
        assert!(!fits(1 << 31, 8, 64));
    }

    #[test]
    fn with_b_stored_k_by_n_the_gemm_takes_n_and_k_in_steps_of_8() {
        let fits = |m, n, k| nn_shape_fits(GemmShape { m, n, k });
        assert!(fits(1, 8, 64));
        assert!(fits(4096, 4096, 11008)); // dX through gate/up: W (11008, 4096)
        assert!(fits(4096, 11008, 4096)); // dX through down: W (4096, 11008)
        assert!(fits(2048, 4096, 32000)); // the loss head's dlogits · W_lm
        assert!(fits(130, 328, 72)); // K = 72: the last step zero-filled past K
        assert!(fits(300, 4104, 200));
        assert!(!fits(128, 12, 64));
        assert!(!fits(128, 64, 100));
        assert!(!fits(0, 8, 64));
        assert!(!fits(128, 8, 1 << 31));
    }

    #[test]
    fn the_tensor_map_is_the_drivers_size_and_alignment() {
        assert_eq!(std::mem::size_of::<TensorMap>(), 128);
        assert_eq!(std::mem::align_of::<TensorMap>() % 64, 0);
    }
}
