//! Dense bf16 products with few rows: `C = alpha * A · Bᵀ + beta * C` for A of at most
//! [`GEMV_MAX_ROWS`] rows (kernels in `ptx/gemv.cu`; the CPU oracle is
//! [`crate::backend::gemm::matmul_nt`]). A decode step's LoRA products and lm_head run here:
//! the tensor-core GEMM's 128 x 128 tiles leave one CTA to walk all of K when C has a single
//! row and r = 64 columns. [`matmul_nt_bf16_by_rows`] picks this kernel or the GEMM by the row
//! count, so training's products (many rows) keep the GEMM.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use super::matmul::{matmul_nt_bf16, GemmShape};
use super::pdl::{launch_step, step_kernel};
use crate::error::{Error, Result};

const MODULE: &str = "gemv";
/// Threads per CTA (`GEMV_THREADS` in ptx/gemv.cu).
const THREADS: usize = 256;
/// The most rows of A the GEMV takes (its largest entry point, `_m8`).
pub const GEMV_MAX_ROWS: usize = 8;
/// Loads each thread of a row's group should make at least (16-byte chunks, or elements on the
/// unaligned path).
const LOADS_PER_THREAD: usize = 2;
/// Above this many threads in the grid, groups wider than a warp are narrowed (towards 32) so
/// that each thread makes more loads instead: the rows alone keep the GPU busy.
const FILL_THREADS: usize = 1 << 20;

/// Queues `c (m, n) = alpha * a (m, k) · b (n, k)ᵀ + beta * c`, all bf16, for
/// `1 <= m <= GEMV_MAX_ROWS` (`beta == 0` never reads `c`).
pub fn gemv_nt_bf16(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    if m == 0 || m > GEMV_MAX_ROWS || n == 0 || k == 0 {
        return Err(Error::invalid(format!(
            "gemv: m must be 1..={GEMV_MAX_ROWS} and n, k at least 1 (m {m}, n {n}, k {k})"
        )));
    }
    check_len("gemv A", a.len(), m * k)?;
    check_len("gemv B", b.len(), n * k)?;
    check_len("gemv C", c.len(), m * n)?;
    let aligned = k % 8 == 0;
    let group = group_size(n, k, aligned);
    let grid = grid_dim(n.div_ceil(THREADS / group), MAX_GRID_X, "gemv")?;
    let entry_rows = m.next_power_of_two();
    let variant = if aligned { "aligned" } else { "any" };
    let name = format!("gemv_bf16_{variant}_m{entry_rows}");
    let (m_i, n_i, k_i) = (to_i64(m, "m")?, to_i64(n, "n")?, to_i64(k, "k")?);
    // group is a power of two in 1..=256 (group_size).
    let group_i = group as i32;
    // A decode step's LoRA A products and lm_head: with PDL while a step's launches are on.
    let kernel = step_kernel(device, MODULE, &name)?;
    let (a, b, c) = (a.device_ptr(), b.device_ptr(), c.device_ptr());
    // SAFETY: the arguments match gemv_bf16_{aligned,any}_m{1,2,4,8} in ptx/gemv.cu; a, b and c
    // hold m * k, n * k and m * n elements (checked above), m is at most the entry point's row
    // count (the next power of two, <= 8), the _aligned variant is chosen only when k % 8 == 0
    // (whole buffers: 256-byte aligned starts), c is distinct from a and b (a mutable borrow);
    // the grid covers n rows in groups of `group` threads and the kernel bounds rows by n.
    unsafe {
        launch_step!(
            kernel<<<grid, THREADS as u32, 0>>>(a, b, c, m_i, n_i, k_i, group_i, alpha, beta),
            || format!("launching {name} (m {m}, n {n}, k {k}, group {group})")
        )
    }
}

/// Queues `c = alpha * a · bᵀ + beta * c` (as [`matmul_nt_bf16`]) with the kernel that suits the
/// row count: [`gemv_nt_bf16`] for `m <= GEMV_MAX_ROWS`, the tensor-core GEMM above.
pub fn matmul_nt_bf16_by_rows(
    device: &CudaDevice,
    a: &GpuBuffer<u16>,
    b: &GpuBuffer<u16>,
    c: &mut GpuBuffer<u16>,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if shape.m <= GEMV_MAX_ROWS {
        gemv_nt_bf16(device, a, b, c, shape, alpha, beta)
    } else {
        matmul_nt_bf16(device, a, b, c, shape, alpha, beta)
    }
}

/// Threads per output row: enough for [`LOADS_PER_THREAD`] loads each over a row of `k`
/// (clamped to 1..=256), then halved towards a warp while `n` rows of that many threads exceed
/// [`FILL_THREADS`]. Always a power of two in 1..=256.
pub(crate) fn group_size(n: usize, k: usize, aligned: bool) -> usize {
    let loads = if aligned { k / 8 } else { k };
    let mut group = loads
        .div_ceil(LOADS_PER_THREAD)
        .clamp(1, THREADS)
        .next_power_of_two();
    while group > 32 && n.saturating_mul(group) > FILL_THREADS {
        group /= 2;
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_powers_of_two_within_a_cta() {
        for n in [1, 7, 64, 4096, 32000, 1 << 22] {
            for k in [1, 7, 8, 64, 100, 4096, 11008, 1 << 20] {
                for aligned in [false, true] {
                    let g = group_size(n, k, aligned);
                    assert!(g.is_power_of_two() && g <= THREADS, "n {n} k {k}: {g}");
                }
            }
        }
    }

    #[test]
    fn decode_shapes_get_the_planned_groups() {
        // z = u Aᵀ at the 7B shape: 64 rows of 4096 (512 chunks): a whole CTA per row.
        assert_eq!(group_size(64, 4096, true), 256);
        // out += s z Bᵀ: 4096 rows of 64 (8 chunks): 4 threads of 2 chunks.
        assert_eq!(group_size(4096, 64, true), 4);
        // The lm_head, 32000 rows of 4096: narrowed to a warp (16 chunks a lane).
        assert_eq!(group_size(32000, 4096, true), 32);
        // Element-wise path: 7 elements, 4 threads.
        assert_eq!(group_size(5, 7, false), 4);
        assert_eq!(group_size(1, 1, false), 1);
    }
}
