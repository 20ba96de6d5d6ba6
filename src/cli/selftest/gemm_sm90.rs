//! The sm_90a GEMM (`gemm_sm90::gemm_nt_bf16_sm90`) against `gemm::matmul_nt` on the bf16 inputs,
//! at M and N edges and with alpha/beta; the transposing dequantize against the plain one, bit
//! for bit; and the two 4-bit products on the dequantize + GEMM path (called directly, not
//! through the dispatch) at 7B widths with few rows, plain and double-quantized scales.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use super::matmul::{reference, round_bf16};
use super::quant4::Random4bit;
use crate::backend::cuda::gemm_sm90::{
    gemm_nt_bf16_sm90, gemm_sm90_fits, matmul_nn_4bit_dequant_gemm, matmul_nt_4bit_dequant_gemm,
    matmul_nt_4bit_low_rank, LowRank,
};
use crate::backend::cuda::matmul::GemmShape;
use crate::backend::cuda::{CudaDevice, Gpu4bit, GpuBuffer};
use crate::backend::gemm::transpose;
use crate::error::Result;
use crate::quant::QuantType;

/// (m, n, k, alpha, beta): one row (M far below a tile), N = 8 (one 8-column block of a
/// 256-wide tile), M and N edges (127, 200, 300, 4096 + 8), exact tiles with a long K loop
/// (more K steps than ring stages, several tiles per CTA on small GPUs), a scale without
/// accumulation (the TMA-store epilogue, beta 0), accumulation (beta 1: the TMA reduction, also
/// at M and N edges) and a scaled C (any other beta: the plain-store epilogue).
const GEMM_SHAPES: [(usize, usize, usize, f32, f32); 9] = [
    (1, 8, 64, 1.0, 0.0),
    (127, 200, 128, 1.0, 0.0),
    (300, 4104, 192, 1.0, 0.0),
    (128, 256, 4096, 1.0, 0.0),
    (256, 512, 640, 0.5, 1.0),
    (300, 200, 1024, -1.5, 0.25),
    (1024, 1024, 512, 1.0, 0.0),
    (200, 328, 256, -0.75, 0.0),
    (130, 200, 320, -1.0, 1.0),
];

/// (rows, cols) of W for the transposed dequantize: one tile, edges in both directions, a 7B
/// weight (11008 x 4096: 172 x 64 tiles).
const TRANSPOSE_SHAPES: [(usize, usize); 4] = [(64, 64), (72, 200), (520, 1032), (11008, 4096)];

/// (m, n, k, r) of the 4-bit products: the 7B gate/up (4096 -> 11008) and down (11008 -> 4096)
/// widths at 128 rows, and an M edge at SmolLM2's widths; r the rank of the low-rank term the
/// forward also runs with (a whole 64-wide step, and ranks the zero fill pads to one).
const PRODUCT_SHAPES: [(usize, usize, usize, usize); 3] = [
    (128, 11008, 4096, 64),
    (128, 4096, 11008, 16),
    (300, 1536, 576, 8),
];
const BLOCKSIZE: usize = 64;

/// Every check of the family; no rows, and a note, on a GPU without the sm_90a module.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if !gemm_sm90_fits(gpu, GemmShape { m: 1, n: 8, k: 64 }) {
        let (major, minor) = gpu.compute_capability();
        eprintln!(
            "gemm sm90: skipped: the sm_90a GEMM loads on compute capability 9.0 only, this GPU \
             is {major}.{minor}"
        );
        return Ok(rows);
    }
    for &(m, n, k, alpha, beta) in &GEMM_SHAPES {
        let shape = GemmShape { m, n, k };
        let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
        let (b_bits, b) = rng.bf16s(n * k, -1.0, 1.0);
        let (c0_bits, c0) = rng.bf16s(m * n, -1.0, 1.0);
        let a_gpu = GpuBuffer::from_host(gpu, "gemm A", &a_bits)?;
        let b_gpu = GpuBuffer::from_host(gpu, "gemm B", &b_bits)?;
        let mut c = GpuBuffer::from_host(gpu, "gemm C", &c0_bits)?;
        gemm_nt_bf16_sm90(gpu, &a_gpu, &b_gpu, &mut c, shape, alpha, beta)?;
        let want = reference(&a, &b, shape, alpha, beta, &c0);
        let got = bf16_to_f32(&c.to_host(gpu, "gemm C")?);
        let suffix = if beta != 0.0 { " +=" } else { "" };
        rows.push(Row::new(
            format!("gemm bf16 sm90 (A B^T, alpha {alpha}){suffix}"),
            &format!("{m}x{n}x{k}"),
            relative_error(&got, &want),
            BF16_BOUND,
        ));
    }
    for &(r, c) in &TRANSPOSE_SHAPES {
        for double_quant in [false, true] {
            rows.push(transposed_dequantize(gpu, rng, (r, c), double_quant)?);
        }
    }
    for &(m, n, k, r) in &PRODUCT_SHAPES {
        for double_quant in [false, true] {
            rows.extend(products(gpu, rng, GemmShape { m, n, k }, r, double_quant)?);
        }
    }
    Ok(rows)
}

/// `dequantize_bf16_transposed` of a (rows, cols) weight against `dequantize_bf16` transposed on
/// the host: every bit equal (error 0) or the row fails (error 1).
fn transposed_dequantize(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    (rows, cols): (usize, usize),
    double_quant: bool,
) -> Result<Row> {
    let kind = if double_quant { "nf4+dq" } else { "nf4" };
    let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (rows, cols, BLOCKSIZE));
    let w_gpu = Gpu4bit::upload(gpu, "transposed weight", &w.host())?;
    let mut plain = GpuBuffer::<u16>::zeroed(gpu, "dequantized", rows * cols)?;
    w_gpu.dequantize_bf16(gpu, &mut plain)?;
    let mut transposed = GpuBuffer::<u16>::zeroed(gpu, "dequantized, transposed", rows * cols)?;
    w_gpu.dequantize_bf16_transposed(gpu, (rows, cols), &mut transposed)?;
    let plain = plain.to_host(gpu, "dequantized")?;
    let transposed = transposed.to_host(gpu, "dequantized, transposed")?;
    let equal =
        (0..rows).all(|i| (0..cols).all(|j| transposed[j * rows + i] == plain[i * cols + j]));
    Ok(Row::new(
        format!("dequant4 {kind} -> bf16 transposed = plain (exact)"),
        &format!("{rows}x{cols}"),
        if equal { 0.0 } else { 1.0 },
        0.0,
    ))
}

/// The forward `X Wᵀ` (W (n, k)), alone and with a rank-`r` term `Z B2ᵀ` (a LoRA adapter's),
/// and the input gradient `dY W` (W (k, n)) on the dequantize + GEMM path, against the oracle on
/// W dequantized by the CPU and rounded to bf16.
fn products(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    shape: GemmShape,
    r: usize,
    double_quant: bool,
) -> Result<Vec<Row>> {
    let GemmShape { m, n, k } = shape;
    let kind = if double_quant { "nf4+dq" } else { "nf4" };
    let label = format!("{m}x{n}x{k}");
    let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
    let a_gpu = GpuBuffer::from_host(gpu, "matmul A", &a_bits)?;
    let zeros = vec![0.0f32; m * n];
    let mut rows = Vec::new();

    let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (n, k, BLOCKSIZE));
    let w_nk = round_bf16(&w.dequantize()?);
    let w_gpu = Gpu4bit::upload(gpu, "matmul weight", &w.host())?;
    let mut c = GpuBuffer::<u16>::zeroed(gpu, "matmul C", m * n)?;
    matmul_nt_4bit_dequant_gemm(gpu, &a_gpu, &w_gpu, &mut c, shape, 1.0, 0.0)?;
    let want = reference(&a, &w_nk, shape, 1.0, 0.0, &zeros);
    let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
    rows.push(Row::new(
        format!("matmul {kind} dequant + gemm sm90 (X W^T)"),
        &label,
        relative_error(&got, &want),
        BF16_BOUND,
    ));

    let (z_bits, z) = rng.bf16s(m * r, -1.0, 1.0);
    let (b2_bits, b2) = rng.bf16s(n * r, -1.0, 1.0);
    let z_gpu = GpuBuffer::from_host(gpu, "low-rank Z", &z_bits)?;
    let b2_gpu = GpuBuffer::from_host(gpu, "low-rank B2", &b2_bits)?;
    let low_rank = LowRank {
        a: &z_gpu,
        b: &b2_gpu,
        r,
    };
    matmul_nt_4bit_low_rank(gpu, &a_gpu, &w_gpu, low_rank, &mut c, shape)?;
    let want = reference(&z, &b2, GemmShape { m, n, k: r }, 1.0, 1.0, &want);
    let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
    rows.push(Row::new(
        format!("matmul {kind} dequant + gemm sm90 (X W^T + Z B2^T)"),
        &format!("{label} r{r}"),
        relative_error(&got, &want),
        BF16_BOUND,
    ));

    let w = Random4bit::new(rng, QuantType::Nf4, double_quant, (k, n, BLOCKSIZE));
    let w_kn = round_bf16(&w.dequantize()?);
    let mut w_nk = vec![0.0f32; n * k];
    transpose(&w_kn, k, n, &mut w_nk);
    let w_gpu = Gpu4bit::upload(gpu, "matmul weight", &w.host())?;
    let mut c = GpuBuffer::<u16>::zeroed(gpu, "matmul C", m * n)?;
    matmul_nn_4bit_dequant_gemm(gpu, &a_gpu, &w_gpu, &mut c, shape, 1.0, 0.0)?;
    let want = reference(&a, &w_nk, shape, 1.0, 0.0, &zeros);
    let got = bf16_to_f32(&c.to_host(gpu, "matmul C")?);
    rows.push(Row::new(
        format!("matmul {kind} dequant + gemm sm90 (dY W)"),
        &label,
        relative_error(&got, &want),
        BF16_BOUND,
    ));
    Ok(rows)
}
