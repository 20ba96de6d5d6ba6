//! Dense GEMV checks: `cuda::gemv::gemv_nt_bf16` (`C = alpha A·Bᵀ + beta C` for A of at most 8
//! rows) against `gemm::matmul_nt` on the bf16-rounded inputs, on shapes that reach every
//! entry point (m 1, 2, 4, 8 and counts between), both load paths (k a multiple of 8 or not)
//! and every way a row's group sums (one thread, shuffles within a warp, across warps through
//! shared memory, and the lm_head-sized grid where the group narrows to a warp).

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cuda::gemv::gemv_nt_bf16;
use crate::backend::cuda::matmul::GemmShape;
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::backend::gemm::matmul_nt;
use crate::error::Result;

/// (m, n, k, accumulate): a single element; a decode step's adapter products at the 7B shape
/// (z = u Aᵀ over 4096 and 11008 inputs: a CTA per row; out += s z Bᵀ: four threads a row);
/// odd k on the element path with a group across warps; m = 8 across warps; m = 5 and 7 (the
/// m8 entry point partly used); odd k with a tiny group; a grid large enough that the group
/// narrows from 64 threads to a warp.
const SHAPES: [(usize, usize, usize, bool); 10] = [
    (1, 1, 1, false),
    (1, 64, 4096, false),
    (1, 64, 11008, false),
    (1, 4096, 64, true),
    (3, 37, 100, true),
    (8, 130, 520, false),
    (5, 1000, 72, true),
    (2, 300, 7, false),
    (7, 11008, 64, true),
    (1, 20000, 1024, false),
];

/// One row per shape; the accumulating shapes compute `0.25 A·Bᵀ + C0`.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(m, n, k, accumulate) in &SHAPES {
        let (alpha, beta) = if accumulate { (0.25, 1.0) } else { (1.0, 0.0) };
        let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
        let (b_bits, b) = rng.bf16s(n * k, -1.0, 1.0);
        let (c0_bits, c0) = rng.bf16s(m * n, -1.0, 1.0);
        let a_gpu = GpuBuffer::from_host(gpu, "gemv A", &a_bits)?;
        let b_gpu = GpuBuffer::from_host(gpu, "gemv B", &b_bits)?;
        let mut c = GpuBuffer::from_host(gpu, "gemv C", &c0_bits)?;
        let shape = GemmShape { m, n, k };
        gemv_nt_bf16(gpu, &a_gpu, &b_gpu, &mut c, shape, alpha, beta)?;
        let got = bf16_to_f32(&c.to_host(gpu, "gemv C")?);
        let mut want = vec![0.0f32; m * n];
        matmul_nt(&a, &b, m, n, k, &mut want, false);
        for (w, &c) in want.iter_mut().zip(&c0) {
            *w = alpha * *w + beta * c;
        }
        let check = if accumulate {
            "gemv bf16 +="
        } else {
            "gemv bf16"
        };
        rows.push(Row::new(
            check,
            &format!("{m}x{n}x{k}"),
            relative_error(&got, &want),
            BF16_BOUND,
        ));
    }
    Ok(rows)
}
