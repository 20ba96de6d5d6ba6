//! The sm_90a GEMM with B stored (n, k) (`gemm_sm90::gemm_nt_bf16_sm90`) and (k, n)
//! (`gemm_nn_bf16_sm90`) against `gemm::matmul_nt` on the bf16 inputs (B transposed on the host
//! for the latter), at M, N and K edges, with alpha/beta, and the NN kernel at the 7B training
//! shapes (rows sampled from every M tile); and the two 4-bit products on the dequantize + GEMM
//! path (called directly, not through the dispatch) at 7B widths with few rows, plain and
//! double-quantized scales.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use super::matmul::{reference, round_bf16};
use super::quant4::Random4bit;
use crate::backend::cuda::gemm_sm90::{
    gemm_nn_bf16_sm90, gemm_nt_bf16_sm90, gemm_sm90_fits, matmul_nn_4bit_dequant_gemm,
    matmul_nt_4bit_dequant_gemm, matmul_nt_4bit_low_rank, LowRank,
};
use crate::backend::cuda::matmul::GemmShape;
use crate::backend::cuda::{CudaDevice, Gpu4bit, GpuBuffer};
use crate::backend::gemm::{matmul_nt, transpose};
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

/// (m, n, k, alpha, beta) of the GEMM with B stored (k, n), every element checked: one row and
/// N = 8 (one B box, 8 of its 64 columns; the tile's three other boxes not loaded), N = 64 (one
/// whole box), M and N edges (N = 200: the fourth box straddles N), K edges (72: the second step
/// zero-filled past K; 200 with N = 4104: a last N tile of one box), SmolLM2's widths, the TMA
/// reduction (beta 1, at the edges too) and the plain-store epilogue (any other beta).
const NN_SHAPES: [(usize, usize, usize, f32, f32); 9] = [
    (1, 8, 64, 1.0, 0.0),
    (1024, 64, 512, 1.0, 0.0),
    (127, 200, 128, 1.0, 0.0),
    (130, 328, 72, -1.0, 1.0),
    (300, 4104, 200, 1.0, 0.0),
    (200, 1536, 576, -0.75, 0.0),
    (77, 576, 1536, 1.0, 0.0),
    (256, 512, 640, 0.5, 1.0),
    (300, 200, 1024, -1.5, 0.25),
];

/// (m, n, k) of the GEMM with B stored (k, n) at LLaMA-7B training sizes, each with alpha/beta
/// 1/0 and 0.5/1: dX of q/k/v/o (W 4096 x 4096), of gate/up (W 11008 x 4096: k 11008) and of
/// down (W 4096 x 11008: n 11008) at 4096 tokens, and the loss head's input gradient `dlogits ·
/// W_lm` over a 32,000-word vocabulary for a chunk of 2,048 rows. The oracle computes
/// [`SAMPLED_ROWS_PER_TILE`] rows of every 128-row M tile (all columns).
const NN_7B_SHAPES: [(usize, usize, usize); 4] = [
    (4096, 4096, 4096),
    (4096, 4096, 11008),
    (4096, 11008, 4096),
    (2048, 4096, 32000),
];
/// Rows of each 128-row M tile the 7B checks compare: one in each consumer's half.
const SAMPLED_ROWS_PER_TILE: usize = 2;

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
        let ops = Operands::random(gpu, rng, shape)?; // B (n, k)
        let mut c = GpuBuffer::from_host(gpu, "gemm C", &ops.c0_bits)?;
        gemm_nt_bf16_sm90(gpu, &ops.a_gpu, &ops.b_gpu, &mut c, shape, alpha, beta)?;
        let want = reference(&ops.a, &ops.b, shape, alpha, beta, &ops.c0);
        let got = bf16_to_f32(&c.to_host(gpu, "gemm C")?);
        let suffix = if beta != 0.0 { " +=" } else { "" };
        rows.push(Row::new(
            format!("gemm bf16 sm90 (A B^T, alpha {alpha}){suffix}"),
            &format!("{m}x{n}x{k}"),
            relative_error(&got, &want),
            BF16_BOUND,
        ));
    }
    for &(m, n, k, alpha, beta) in &NN_SHAPES {
        rows.push(nn_product(gpu, rng, GemmShape { m, n, k }, alpha, beta)?);
    }
    for &(m, n, k) in &NN_7B_SHAPES {
        rows.extend(nn_sampled(gpu, rng, GemmShape { m, n, k })?);
    }
    for &(m, n, k, r) in &PRODUCT_SHAPES {
        for double_quant in [false, true] {
            rows.extend(products(gpu, rng, GemmShape { m, n, k }, r, double_quant)?);
        }
    }
    Ok(rows)
}

/// A GEMM's random bf16 operands at a shape: A (m, k), B's n * k elements (either layout) and
/// the starting C0 (m, n), drawn in that order, as f32 on the host; A and B also on the GPU,
/// and C0's bits for each run's C to start from.
struct Operands {
    a: Vec<f32>,
    b: Vec<f32>,
    c0: Vec<f32>,
    c0_bits: Vec<u16>,
    a_gpu: GpuBuffer<u16>,
    b_gpu: GpuBuffer<u16>,
}

impl Operands {
    fn random(gpu: &CudaDevice, rng: &mut SplitMix64, shape: GemmShape) -> Result<Self> {
        let GemmShape { m, n, k } = shape;
        let (a_bits, a) = rng.bf16s(m * k, -1.0, 1.0);
        let (b_bits, b) = rng.bf16s(n * k, -1.0, 1.0);
        let (c0_bits, c0) = rng.bf16s(m * n, -1.0, 1.0);
        Ok(Operands {
            a_gpu: GpuBuffer::from_host(gpu, "gemm A", &a_bits)?,
            b_gpu: GpuBuffer::from_host(gpu, "gemm B", &b_bits)?,
            a,
            b,
            c0,
            c0_bits,
        })
    }
}

/// `gemm_nn_bf16_sm90` against the oracle on B transposed to (n, k) on the host, every element.
fn nn_product(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    shape: GemmShape,
    alpha: f32,
    beta: f32,
) -> Result<Row> {
    let GemmShape { m, n, k } = shape;
    let ops = Operands::random(gpu, rng, shape)?; // B (k, n)
    let mut c = GpuBuffer::from_host(gpu, "gemm C", &ops.c0_bits)?;
    gemm_nn_bf16_sm90(gpu, &ops.a_gpu, &ops.b_gpu, &mut c, shape, alpha, beta)?;
    let mut b_nk = vec![0.0f32; n * k];
    transpose(&ops.b, k, n, &mut b_nk);
    let want = reference(&ops.a, &b_nk, shape, alpha, beta, &ops.c0);
    let got = bf16_to_f32(&c.to_host(gpu, "gemm C")?);
    let suffix = if beta != 0.0 { " +=" } else { "" };
    Ok(Row::new(
        format!("gemm bf16 sm90 nn (A B, alpha {alpha}){suffix}"),
        &format!("{m}x{n}x{k}"),
        relative_error(&got, &want),
        BF16_BOUND,
    ))
}

/// `gemm_nn_bf16_sm90` at a 7B shape, C = A B then C = 0.5 A B + C0, against the oracle on
/// [`SAMPLED_ROWS_PER_TILE`] rows of every M tile (the whole product on the host would take
/// minutes): a fault in any tile, consumer half, column or K step shows in them.
fn nn_sampled(gpu: &CudaDevice, rng: &mut SplitMix64, shape: GemmShape) -> Result<Vec<Row>> {
    let GemmShape { m, n, k } = shape;
    let Operands {
        a,
        b: b_kn,
        c0,
        c0_bits,
        a_gpu,
        b_gpu,
    } = Operands::random(gpu, rng, shape)?;
    let mut b_nk = vec![0.0f32; n * k];
    transpose(&b_kn, k, n, &mut b_nk);
    drop(b_kn);
    let sampled = sampled_rows(m, rng);
    let mut a_rows = Vec::with_capacity(sampled.len() * k);
    for &row in &sampled {
        a_rows.extend_from_slice(&a[row * k..(row + 1) * k]);
    }
    let mut product = vec![0.0f32; sampled.len() * n]; // (sampled, n)
    matmul_nt(&a_rows, &b_nk, sampled.len(), n, k, &mut product, false);
    let mut rows = Vec::new();
    for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0)] {
        let mut c = GpuBuffer::from_host(gpu, "gemm C", &c0_bits)?;
        gemm_nn_bf16_sm90(gpu, &a_gpu, &b_gpu, &mut c, shape, alpha, beta)?;
        let c = bf16_to_f32(&c.to_host(gpu, "gemm C")?);
        let mut got = Vec::with_capacity(product.len());
        let mut want = Vec::with_capacity(product.len());
        for (i, &row) in sampled.iter().enumerate() {
            got.extend_from_slice(&c[row * n..(row + 1) * n]);
            let c0_row = &c0[row * n..(row + 1) * n];
            let p_row = &product[i * n..(i + 1) * n];
            want.extend(
                p_row
                    .iter()
                    .zip(c0_row)
                    .map(|(&p, &c0)| alpha * p + beta * c0),
            );
        }
        let suffix = if beta != 0.0 { " +=" } else { "" };
        rows.push(Row::new(
            format!("gemm bf16 sm90 nn (A B, alpha {alpha}){suffix}, sampled rows"),
            &format!("{m}x{n}x{k}"),
            relative_error(&got, &want),
            BF16_BOUND,
        ));
    }
    Ok(rows)
}

/// [`SAMPLED_ROWS_PER_TILE`] rows of every 128-row tile of `m` rows, at random positions: one in
/// each 64-row half (the two consumers), those below m.
fn sampled_rows(m: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut rows = Vec::new();
    for tile in (0..m).step_by(128) {
        for half in 0..SAMPLED_ROWS_PER_TILE {
            let row = tile + 64 * half + rng.below(64);
            if row < m {
                rows.push(row);
            }
        }
    }
    rows
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
