//! Matmul checks: `cuda::matmul` (dense bf16 `A Bᵀ` and `A B`, and 4-bit weights forward `X Wᵀ`
//! and backward `dY W`) against `gemm::matmul_nt` on the bf16-rounded inputs, the sm_90a wgmma
//! kernels of both products called directly (not through the dispatch), and the timings at the
//! LLaMA-7B MLP shape (4096 tokens, 4096 -> 11008).

use super::harness::{
    bf16_to_f32, relative_error, Row, SplitMix64, Timing, BF16_BOUND, ROTATION_BYTES, TIMED_RUNS,
    WARMUP_RUNS,
};
use super::quant4::Random4bit;
use crate::backend::cuda::matmul::{self, GemmShape};
use crate::backend::cuda::{median_ms, CudaDevice, Gpu4bit, GpuBuffer};
use crate::backend::gemm::{matmul_nt, transpose};
use crate::error::Result;
use crate::quant::QuantType;
use half::bf16;

/// (m, n, k): a single element, sizes below one tile and not multiples of 8 (the element-wise
/// path), exact tiles, edges in every dimension, SmolLM2's MLP and attention widths.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 8),
    (3, 5, 7),
    (77, 130, 64),
    (128, 128, 32),
    (200, 300, 520),
    (129, 257, 1000),
    (512, 1536, 576),
    (77, 576, 1536),
];
/// Shapes at this index accumulate: `C = 0.5 A·Bᵀ + C0`.
const ACCUMULATE_AT: usize = 4;
const BLOCKSIZE: usize = 64;

/// Dense, 4-bit forward and 4-bit backward products per shape, NF4 with plain and
/// double-quantized scales.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (index, &(m, n, k)) in SHAPES.iter().enumerate() {
        let shape = GemmShape { m, n, k };
        let label = format!("{m}x{n}x{k}");
        let (alpha, beta) = if index == ACCUMULATE_AT {
            (0.5, 1.0)
        } else {
            (1.0, 0.0)
        };
        let suffix = if beta != 0.0 { " +=" } else { "" };
        let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
        let a_gpu = GpuBuffer::from_host(gpu, "matmul A", &a_bits)?;
        let (c0_bits, c0) = rng.bf16s(m * n, -1.0, 1.0);

        // Dense: b (n, k).
        let (b_bits, b) = rng.bf16s(n * k, -1.0, 1.0);
        let b_gpu = GpuBuffer::from_host(gpu, "matmul B", &b_bits)?;
        let mut c = GpuBuffer::from_host(gpu, "matmul C", &c0_bits)?;
        matmul::matmul_nt_bf16(gpu, &a_gpu, &b_gpu, &mut c, shape, alpha, beta)?;
        let want = reference(&a, &b, shape, alpha, beta, &c0);
        let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
        rows.push(Row::new(
            format!("matmul nt bf16{suffix}"),
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        // Dense, B stored (k, n): C = A B; the oracle multiplies by Bᵀ stored (n, k).
        let (b_kn_bits, b_kn) = rng.bf16s(k * n, -1.0, 1.0);
        let mut b_nk = vec![0.0f32; n * k];
        transpose(&b_kn, k, n, &mut b_nk);
        let b_gpu = GpuBuffer::from_host(gpu, "matmul B", &b_kn_bits)?;
        let mut c = GpuBuffer::from_host(gpu, "matmul C", &c0_bits)?;
        matmul::matmul_nn_bf16(gpu, &a_gpu, &b_gpu, &mut c, shape, alpha, beta)?;
        let want = reference(&a, &b_nk, shape, alpha, beta, &c0);
        let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
        rows.push(Row::new(
            format!("matmul nn bf16{suffix}"),
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        for double_quant in [false, true] {
            let kind = if double_quant { "nf4+dq" } else { "nf4" };
            // Forward: W (n, k).
            let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (n, k, BLOCKSIZE));
            let w_ref = round_bf16(&w.dequantize()?);
            let w_gpu = Gpu4bit::upload(gpu, "matmul weight", &w.host())?;
            let mut c = GpuBuffer::from_host(gpu, "matmul C", &c0_bits)?;
            matmul::matmul_nt_4bit(gpu, &a_gpu, &w_gpu, &mut c, shape, alpha, beta)?;
            let want = reference(&a, &w_ref, shape, alpha, beta, &c0);
            let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
            rows.push(Row::new(
                format!("matmul nt {kind} (X W^T){suffix}"),
                &label,
                relative_error(&got, &want),
                BF16_BOUND,
            ));

            // Backward: W (k, n), C = A W; the oracle multiplies by Wᵀ stored (n, k).
            let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (k, n, BLOCKSIZE));
            let w_kn = round_bf16(&w.dequantize()?);
            let mut w_nk = vec![0.0f32; n * k];
            transpose(&w_kn, k, n, &mut w_nk);
            let w_gpu = Gpu4bit::upload(gpu, "matmul weight", &w.host())?;
            let mut c = GpuBuffer::from_host(gpu, "matmul C", &c0_bits)?;
            matmul::matmul_nn_4bit(gpu, &a_gpu, &w_gpu, &mut c, shape, alpha, beta)?;
            let want = reference(&a, &w_nk, shape, alpha, beta, &c0);
            let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
            rows.push(Row::new(
                format!("matmul nn {kind} (dY W){suffix}"),
                &label,
                relative_error(&got, &want),
                BF16_BOUND,
            ));
        }
    }
    Ok(rows)
}

/// (m, n, k, accumulate) for the sm90 forward kernel: one tile and one K step, two K steps (the
/// prologue's second stage), a long K loop with several CTAs in both directions, and the 7B
/// shape's up projection at 512 tokens (4096 -> 11008: 86 x 4 CTAs, 64 K steps).
const SM90_SHAPES: [(usize, usize, usize, bool); 5] = [
    (128, 128, 64, false),
    (128, 256, 128, true),
    (256, 384, 4096, false),
    (256, 384, 4096, true),
    (512, 11008, 4096, false),
];

/// (m, n, k, accumulate) for the sm90 input-gradient kernel (W stored (k, n)): the forward's
/// small shapes, then the 7B shape's two dX products at 512 tokens: through gate/up (W 11008 x
/// 4096: 172 K steps) and through down (W 4096 x 11008: 86 x 4 CTAs).
const SM90_NN_SHAPES: [(usize, usize, usize, bool); 6] = [
    (128, 128, 64, false),
    (128, 256, 128, true),
    (256, 384, 4096, false),
    (256, 384, 4096, true),
    (512, 4096, 11008, false),
    (512, 11008, 4096, false),
];

/// The two sm90 products: the forward `X Wᵀ` (W (n, k)) and the input gradient `dY W` (W (k, n)).
#[derive(Clone, Copy)]
enum Sm90Product {
    Forward,
    InputGradient,
}

/// `matmul_nt_4bit_sm90` and `matmul_nn_4bit_sm90` (NF4, plain and double-quantized scales)
/// called directly against the oracle; no rows, and a note, on a GPU without the sm_90a module.
pub(super) fn sm90_checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let (major, minor) = gpu.compute_capability();
    let products = [
        (Sm90Product::Forward, &SM90_SHAPES[..]),
        (Sm90Product::InputGradient, &SM90_NN_SHAPES[..]),
    ];
    for (product, shapes) in products {
        for &(m, n, k, accumulate) in shapes {
            let shape = GemmShape { m, n, k };
            let (alpha, beta) = if accumulate { (0.5, 1.0) } else { (1.0, 0.0) };
            let suffix = if accumulate { " +=" } else { "" };
            let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
            let a_gpu = GpuBuffer::from_host(gpu, "matmul A", &a_bits)?;
            let (c0_bits, c0) = rng.bf16s(m * n, -1.0, 1.0);
            for double_quant in [false, true] {
                let kind = if double_quant { "nf4+dq" } else { "nf4" };
                // The weight as stored: (n, k) for the forward, (k, n) for dY W.
                let stored = match product {
                    Sm90Product::Forward => (n, k),
                    Sm90Product::InputGradient => (k, n),
                };
                let w = Random4bit::new(
                    rng,
                    QuantType::Nf4,
                    double_quant,
                    (stored.0, stored.1, BLOCKSIZE),
                );
                let w_gpu = Gpu4bit::upload(gpu, "matmul weight", &w.host())?;
                if !matmul::sm90_fits(gpu, &w_gpu, shape) {
                    eprintln!(
                        "matmul sm90: skipped: the sm_90a kernels load on compute capability \
                         9.0 only, this GPU is {major}.{minor}"
                    );
                    return Ok(rows);
                }
                let w_stored = round_bf16(&w.dequantize()?);
                let mut c = GpuBuffer::from_host(gpu, "matmul C", &c0_bits)?;
                // The oracle multiplies by a (n, k) matrix: W itself, or Wᵀ for dY W.
                let (w_nk, label) = match product {
                    Sm90Product::Forward => {
                        matmul::matmul_nt_4bit_sm90(
                            gpu, &a_gpu, &w_gpu, &mut c, shape, alpha, beta,
                        )?;
                        (w_stored, "X W^T")
                    }
                    Sm90Product::InputGradient => {
                        matmul::matmul_nn_4bit_sm90(
                            gpu, &a_gpu, &w_gpu, &mut c, shape, alpha, beta,
                        )?;
                        let mut w_nk = vec![0.0f32; n * k];
                        transpose(&w_stored, k, n, &mut w_nk);
                        (w_nk, "dY W")
                    }
                };
                let want = reference(&a, &w_nk, shape, alpha, beta, &c0);
                let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
                rows.push(Row::new(
                    format!("matmul sm90 wgmma {kind} ({label}){suffix}"),
                    &format!("{m}x{n}x{k}"),
                    relative_error(&got, &want),
                    BF16_BOUND,
                ));
            }
        }
    }
    Ok(rows)
}

/// `alpha * a (m, k) · b (n, k)ᵀ + beta * c0` by the CPU oracle.
pub(super) fn reference(
    a: &[f32],
    b: &[f32],
    GemmShape { m, n, k }: GemmShape,
    alpha: f32,
    beta: f32,
    c0: &[f32],
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    matmul_nt(a, b, m, n, k, &mut out, false);
    for (o, &c) in out.iter_mut().zip(c0) {
        *o = alpha * *o + beta * c;
    }
    out
}

/// Each value rounded to bf16 (as f32).
pub(super) fn round_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// The LLaMA-7B MLP products at 4096 tokens: dense bf16 and NF4 `X Wᵀ` (4096 -> 11008), and the
/// NF4 `dY W` back (11008 -> 4096), weights rotated through copies larger than the L2 cache.
pub(super) fn timings(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Timing>> {
    let (tokens, d_in, d_out) = (4096usize, 4096usize, 11008usize);
    let flops = 2.0 * tokens as f64 * d_in as f64 * d_out as f64;
    let mut timings = Vec::new();
    let time = |name: &str, shape: &str, ms: f64| Timing {
        kernel: name.to_string(),
        shape: shape.to_string(),
        median_ms: ms,
        bytes: 0,
        flops,
    };

    // Dense: the weight as bf16, 90 MB a copy.
    let (x_bits, _) = rng.bf16s(tokens * d_in, -1.0, 1.0);
    let x = GpuBuffer::from_host(gpu, "timed X", &x_bits)?;
    let mut y = GpuBuffer::<u16>::zeroed(gpu, "timed Y", tokens * d_out)?;
    let forward = GemmShape {
        m: tokens,
        n: d_out,
        k: d_in,
    };
    let shape = format!("{tokens}x{d_in}->{d_out}");
    {
        let (w_bits, _) = rng.bf16s(d_out * d_in, -1.0, 1.0);
        let copies = ROTATION_BYTES.div_ceil(2 * w_bits.len()).clamp(1, 4);
        let weights = (0..copies)
            .map(|_| GpuBuffer::from_host(gpu, "timed W", &w_bits))
            .collect::<Result<Vec<_>>>()?;
        let ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
            matmul::matmul_nt_bf16(gpu, &x, &weights[i % copies], &mut y, forward, 1.0, 0.0)
        })?;
        timings.push(time("matmul nt bf16", &shape, ms));
    }

    for double_quant in [false, true] {
        let kind = if double_quant { "nf4+dq" } else { "nf4" };
        let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (d_out, d_in, BLOCKSIZE));
        let host = w.host();
        let copies = ROTATION_BYTES
            .div_ceil(host.packed.len() + 4 * host.numel / BLOCKSIZE)
            .clamp(1, 16);
        let weights = (0..copies)
            .map(|_| Gpu4bit::upload(gpu, "timed weight", &host))
            .collect::<Result<Vec<_>>>()?;
        let ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
            matmul::matmul_nt_4bit(gpu, &x, &weights[i % copies], &mut y, forward, 1.0, 0.0)
        })?;
        timings.push(time(&format!("matmul nt {kind} (X W^T)"), &shape, ms));

        // dX (tokens, d_in) = dY (tokens, d_out) · W (d_out, d_in): the same weight, read
        // untransposed.
        let backward = GemmShape {
            m: tokens,
            n: d_in,
            k: d_out,
        };
        let mut dx = GpuBuffer::<u16>::zeroed(gpu, "timed dX", tokens * d_in)?;
        let ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
            matmul::matmul_nn_4bit(gpu, &y, &weights[i % copies], &mut dx, backward, 1.0, 0.0)
        })?;
        timings.push(time(
            &format!("matmul nn {kind} (dY W)"),
            &format!("{tokens}x{d_out}->{d_in}"),
            ms,
        ));
    }
    Ok(timings)
}
