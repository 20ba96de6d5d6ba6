//! The fused decode-step kernels (`backend::cuda::decode`) against the CPU: RMSNorm + LoRA A,
//! and the fused 4-bit GEMV (q/k/v as one row space with LoRA B, o/down with the residual add,
//! gate/up with SwiGLU), NF4 and FP4, plain and double-quantized scales, with and without
//! adapters, odd ranks and widths that are not multiples of 256; then the same products on the
//! tiled copy (`backend::cuda::decode_tiled`: "decode tiled" rows), whose kernels make z from
//! A themselves and, for q|k|v and gate/up, normalize x first: against the same oracle on the
//! CPU's normalized row, and the same bounds.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use super::quant4::Random4bit;
use crate::backend::cpu;
use crate::backend::cuda::decode::{
    gemv4_residual, gemv4_rows, gemv4_swiglu, rmsnorm_lora_a, FusedProduct, LoraTerm,
};
use crate::backend::cuda::decode_tiled::{
    tiled_residual, tiled_rows, tiled_swiglu, z_rows_len, TiledInput, TiledLora, TiledNorm,
};
use crate::backend::cuda::gemv_tiled::{tiled_gemv_fits, Tiled4bit};
use crate::backend::cuda::norm::rmsnorm_forward;
use crate::backend::cuda::{CudaDevice, Gpu4bit, GpuBuffer};
use crate::error::Result;
use crate::quant::QuantType;
use half::bf16;
use rayon::prelude::*;

const BLOCKSIZE: usize = 64;
const EPS: f32 = 1e-5;

/// (width, LoRA ranks): the 7B shape, SmolLM2's width with odd ranks, no adapter, a width that
/// is not a multiple of 8 (the element path) and one adapter of rank 1.
const NORM_SHAPES: [(usize, &[usize]); 5] = [
    (4096, &[64, 64, 64]),
    (576, &[5, 5, 5]),
    (576, &[]),
    (100, &[3, 37]),
    (256, &[1]),
];

/// q/k/v shapes: (q rows, kv rows, cols, rank; 0 = no adapter): the 7B shape, SmolLM2's (GQA:
/// 576 q rows, 192 k and v rows; 576 columns, not a multiple of 256, a partial k-tile) with
/// rank 5, a partial last 16-row tile without an adapter.
const QKV_SHAPES: [(usize, usize, usize, usize); 3] = [
    (4096, 1024, 4096, 64),
    (576, 192, 576, 5),
    (264, 40, 256, 0),
];

/// Single-matrix (o, down) shapes: (rows, cols, rank).
const RESIDUAL_SHAPES: [(usize, usize, usize); 3] =
    [(4096, 11008, 64), (576, 1536, 5), (250, 320, 0)];

/// Gate/up shapes: (rows, cols, rank); 1540 rows leave a partial last 8-row group.
const SWIGLU_SHAPES: [(usize, usize, usize); 3] =
    [(11008, 4096, 64), (1540, 576, 37), (320, 256, 0)];

pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(width, ranks) in &NORM_SHAPES {
        rows.extend(check_norm(gpu, rng, width, ranks)?);
    }
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        for double_quant in [false, true] {
            let kind = Kind {
                quant_type,
                double_quant,
            };
            for &shape in &QKV_SHAPES {
                rows.extend(check_qkv(gpu, rng, kind, shape)?);
            }
            for &shape in &RESIDUAL_SHAPES {
                rows.extend(check_residual(gpu, rng, kind, shape)?);
            }
            for &shape in &SWIGLU_SHAPES {
                rows.extend(check_swiglu(gpu, rng, kind, shape)?);
            }
        }
    }
    Ok(rows)
}

/// The norm's x̂ against the CPU in f64 and bit for bit against `rmsnorm_forward`; z against
/// an f64 product with that x̂.
fn check_norm(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    width: usize,
    ranks: &[usize],
) -> Result<Vec<Row>> {
    let (x_bits, x) = rng.bf16s(width, -2.0, 2.0);
    let weight = rng.f32s(width, 0.5, 1.5);
    let factors: Vec<(Vec<u16>, Vec<f32>)> = ranks
        .iter()
        .map(|&r| rng.bf16s(r * width, -0.1, 0.1))
        .collect();
    let mean_sq = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / width as f64;
    let inv_rms = 1.0 / (mean_sq + f64::from(EPS)).sqrt();
    let want_xhat: Vec<f64> = x
        .iter()
        .zip(&weight)
        .map(|(&v, &w)| f64::from(w) * f64::from(v) * inv_rms)
        .collect();

    let x_gpu = GpuBuffer::from_host(gpu, "norm x", &x_bits)?;
    let w_gpu = GpuBuffer::from_host(gpu, "norm weight", &weight)?;
    let a_gpu: Vec<GpuBuffer<u16>> = factors
        .iter()
        .map(|(bits, _)| GpuBuffer::from_host(gpu, "LoRA A", bits))
        .collect::<Result<_>>()?;
    let args: Vec<(&GpuBuffer<u16>, usize)> = a_gpu.iter().zip(ranks.iter().copied()).collect();
    let total: usize = ranks.iter().sum();
    let mut xhat = GpuBuffer::<u16>::zeroed(gpu, "xhat", width)?;
    let mut z = GpuBuffer::<u16>::zeroed(gpu, "z", total.max(1))?;
    rmsnorm_lora_a(gpu, &x_gpu, &w_gpu, EPS, &args, (&mut xhat, &mut z))?;
    let mut separate = GpuBuffer::<u16>::zeroed(gpu, "rmsnorm out", width)?;
    rmsnorm_forward(gpu, &mut separate, &x_gpu, &w_gpu, EPS)?;
    let got_xhat_bits = xhat.to_host(gpu, "xhat")?;
    let got_z = bf16_to_f32(&z.to_host(gpu, "z")?[..total]);
    // z is the product of the bf16 x̂ the kernel wrote (checked above against the f64 norm and
    // bit for bit against rmsnorm_forward), in f64: against the unrounded x̂ the error of a lone
    // z (r = 1) has no bound, its sum cancelling while x̂'s roundings do not.
    let xhat_used: Vec<f64> = bf16_to_f32(&got_xhat_bits)
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let want_z: Vec<f32> = factors
        .iter()
        .flat_map(|(_, a)| a.chunks(width).map(|row| dot_f64(row, &xhat_used) as f32))
        .collect();
    let want_xhat: Vec<f32> = want_xhat.iter().map(|&v| v as f32).collect();

    let shape = format!("{width} r{ranks:?}");
    let mut rows = vec![
        Row::new(
            "decode rmsnorm + LoRA A: xhat",
            &shape,
            relative_error(&bf16_to_f32(&got_xhat_bits), &want_xhat),
            BF16_BOUND,
        ),
        Row::new(
            "decode rmsnorm + LoRA A: xhat = rmsnorm (exact)",
            &shape,
            if got_xhat_bits == separate.to_host(gpu, "rmsnorm out")? {
                0.0
            } else {
                1.0
            },
            0.0,
        ),
    ];
    if total > 0 {
        rows.push(Row::new(
            "decode rmsnorm + LoRA A: z",
            &shape,
            relative_error(&got_z, &want_z),
            BF16_BOUND,
        ));
    }
    Ok(rows)
}

/// The kind of 4-bit weights of a check.
#[derive(Clone, Copy)]
struct Kind {
    quant_type: QuantType,
    double_quant: bool,
}

impl Kind {
    fn label(self) -> String {
        let name = match self.quant_type {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        };
        format!("{name}{}", if self.double_quant { "+dq" } else { "" })
    }
}

/// A random 4-bit matrix on the GPU with its adapter (A, B, and z = bf16(A x) for the kernels
/// that take z), and the CPU's `W x + s B z` in f64 for a given x.
struct Case {
    weight: Gpu4bit,
    rows: usize,
    /// W dequantized (rows, cols) f32, for the CPU products.
    dense: Vec<f32>,
    adapter: Option<CaseAdapter>,
    /// The CPU's `W x + s · B z` (f64), per row.
    want: Vec<f64>,
}

/// A case's adapter: A (rank, cols), B (rows, rank) random bf16, z = bf16(A x) for the x it was
/// made with, on the GPU and as f32 values.
struct CaseAdapter {
    a: GpuBuffer<u16>,
    b: GpuBuffer<u16>,
    z: GpuBuffer<u16>,
    a_vals: Vec<f32>,
    b_vals: Vec<f32>,
    rank: usize,
    scale: f32,
}

impl Case {
    /// W (rows, cols) of `kind`, A and B random bf16, the scale chosen so that the adapter's
    /// term has about the base product's size over the whole output (many rows: the sum's norm
    /// cannot cancel, unlike the one-row check the reverted epilogue failed on).
    fn new(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        kind: Kind,
        (rows, cols, rank): (usize, usize, usize),
        x: &[f32],
    ) -> Result<Self> {
        let random = Random4bit::new(
            rng,
            kind.quant_type,
            kind.double_quant,
            (rows, cols, BLOCKSIZE),
        );
        let dense = random.dequantize()?;
        let weight = Gpu4bit::upload(gpu, "decode selftest weight", &random.host())?;
        let mut case = Case {
            weight,
            rows,
            dense,
            adapter: None,
            want: Vec::new(),
        };
        if rank > 0 {
            let (a_bits, a_vals) = rng.bf16s(rank * cols, -0.1, 0.1);
            let (b_bits, b_vals) = rng.bf16s(rows * rank, -1.0, 1.0);
            let z_vals = lora_z(&a_vals, x);
            let z_bits: Vec<u16> = z_vals
                .iter()
                .map(|&v| bf16::from_f32(v).to_bits())
                .collect();
            let term: Vec<f64> = b_vals
                .chunks(rank)
                .map(|row| dot_f64_f32(row, &z_vals))
                .collect();
            let base = case.base(x);
            let rms = |v: &[f64]| (v.iter().map(|t| t * t).sum::<f64>() / v.len() as f64).sqrt();
            let (base, lora) = (rms(&base), rms(&term));
            let scale = if base > 0.0 && lora > 0.0 {
                (base / lora) as f32
            } else {
                1.0
            };
            case.adapter = Some(CaseAdapter {
                a: GpuBuffer::from_host(gpu, "LoRA A", &a_bits)?,
                b: GpuBuffer::from_host(gpu, "LoRA B", &b_bits)?,
                z: GpuBuffer::from_host(gpu, "LoRA z", &z_bits)?,
                a_vals,
                b_vals,
                rank,
                scale,
            });
        }
        case.want = case.want_for(x);
        Ok(case)
    }

    /// W u in f64, per row.
    fn base(&self, u: &[f32]) -> Vec<f64> {
        self.dense
            .par_chunks(u.len())
            .map(|w| dot_f64_f32(w, u))
            .collect()
    }

    /// `W u + s · B bf16(A u)` in f64, per row: the fused kernels' product on input u.
    fn want_for(&self, u: &[f32]) -> Vec<f64> {
        let mut want = self.base(u);
        if let Some(ad) = &self.adapter {
            let z = lora_z(&ad.a_vals, u);
            for (w, row) in want.iter_mut().zip(ad.b_vals.chunks(ad.rank)) {
                *w += f64::from(ad.scale) * dot_f64_f32(row, &z);
            }
        }
        want
    }

    /// The row-major kernels' view: W and the adapter's B with z given.
    fn product(&self) -> FusedProduct<'_> {
        FusedProduct {
            weight: &self.weight,
            rows: self.rows,
            lora: self.adapter.as_ref().map(|ad| LoraTerm {
                b: &ad.b,
                z: &ad.z,
                z_offset: 0,
                rank: ad.rank,
                scale: ad.scale,
            }),
        }
    }

    /// The tiled kernels' view of the adapter: A and B (they compute z).
    fn tiled_lora(&self) -> Option<TiledLora<'_>> {
        self.adapter.as_ref().map(|ad| TiledLora {
            a: &ad.a,
            b: &ad.b,
            rank: ad.rank,
            scale: ad.scale,
        })
    }
}

/// z = A u (rank rows of A over u's width) in f64, each rounded to bf16 as the kernels round
/// z (as f32 values).
fn lora_z(a: &[f32], u: &[f32]) -> Vec<f32> {
    a.chunks(u.len())
        .map(|row| bf16::from_f64(dot_f64_f32(row, u)).to_f32())
        .collect()
}

/// A random RMSNorm weight on the GPU, and the input the products read after it: the CPU's
/// `rmsnorm_forward` of x rounded to bf16 (the kernels' normalized row).
fn random_norm(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    x: &[f32],
) -> Result<(GpuBuffer<f32>, Vec<f32>)> {
    let weight = rng.f32s(x.len(), 0.5, 1.5);
    let mut normed = vec![0.0f32; x.len()];
    cpu::rmsnorm_forward(&mut normed, x, &weight, EPS);
    let normed = normed.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    Ok((GpuBuffer::from_host(gpu, "norm weight", &weight)?, normed))
}

/// A tiled launch's input that the kernel normalizes first (with `weight` and [`EPS`]).
fn normed_input<'a>(
    x: &'a GpuBuffer<u16>,
    weight: &'a GpuBuffer<f32>,
    z_rows: &'a mut GpuBuffer<f32>,
) -> TiledInput<'a> {
    TiledInput {
        x,
        norm: Some(TiledNorm { weight, eps: EPS }),
        z_rows,
    }
}

/// The z buffer a tiled launch with these adapters needs.
fn z_buffer(gpu: &CudaDevice, loras: &[Option<TiledLora<'_>>]) -> Result<GpuBuffer<f32>> {
    GpuBuffer::zeroed(gpu, "LoRA z", z_rows_len(loras))
}

fn random_x(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    cols: usize,
) -> Result<(GpuBuffer<u16>, Vec<f32>)> {
    let (bits, values) = rng.bf16s(cols, -1.0, 1.0);
    Ok((
        GpuBuffer::from_host(gpu, "decode selftest x", &bits)?,
        values,
    ))
}

fn as_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// q, k and v (GQA: k and v narrower than q) in one launch, each against `W x + s B z`.
fn check_qkv(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    kind: Kind,
    (q_rows, kv_rows, cols, rank): (usize, usize, usize, usize),
) -> Result<Vec<Row>> {
    let (x_gpu, x) = random_x(gpu, rng, cols)?;
    let cases = [q_rows, kv_rows, kv_rows]
        .into_iter()
        .map(|rows| Case::new(gpu, rng, kind, (rows, cols, rank), &x))
        .collect::<Result<Vec<_>>>()?;
    let mut outs = cases
        .iter()
        .map(|c| GpuBuffer::<u16>::zeroed(gpu, "fused gemv out", c.rows))
        .collect::<Result<Vec<_>>>()?;
    let products: Vec<FusedProduct<'_>> = cases.iter().map(Case::product).collect();
    let mut out_refs: Vec<&mut GpuBuffer<u16>> = outs.iter_mut().collect();
    gemv4_rows(gpu, &products, &x_gpu, &mut out_refs)?;
    let shape = format!("{q_rows}/{kv_rows}/{kv_rows}x{cols} r{rank}");
    let mut rows = Vec::new();
    for ((case, out), name) in cases.iter().zip(&outs).zip(["q", "k", "v"]) {
        let got = bf16_to_f32(&out.to_host(gpu, "fused gemv out")?);
        rows.push(Row::new(
            format!("decode gemv4 {} q,k,v + LoRA B: {name}", kind.label()),
            &shape,
            relative_error(&got, &as_f32(&case.want)),
            BF16_BOUND,
        ));
    }
    if !tiles(&cases, cols) {
        return Ok(rows);
    }
    // The same three products on the tiled row space, reading x through an RMSNorm the kernel
    // applies (as a decode step's q|k|v does), z made by the kernel from A.
    let matrices: Vec<(&Gpu4bit, usize)> = cases.iter().map(|c| (&c.weight, c.rows)).collect();
    let tiled = Tiled4bit::pack_rows(gpu, &matrices, cols)?;
    let loras: Vec<_> = cases.iter().map(Case::tiled_lora).collect();
    let (norm_weight, normed) = random_norm(gpu, rng, &x)?;
    let mut z_rows = z_buffer(gpu, &loras)?;
    let mut tiled_outs = cases
        .iter()
        .map(|c| GpuBuffer::<u16>::zeroed(gpu, "tiled fused gemv out", c.rows))
        .collect::<Result<Vec<_>>>()?;
    // Twice: the second launch finds the grid counters the first left (zeros) and must agree.
    let mut got_runs = Vec::new();
    for _ in 0..2 {
        let mut out_refs: Vec<&mut GpuBuffer<u16>> = tiled_outs.iter_mut().collect();
        let input = normed_input(&x_gpu, &norm_weight, &mut z_rows);
        tiled_rows(gpu, &tiled, &loras, input, &mut out_refs)?;
        let runs = tiled_outs
            .iter()
            .map(|out| out.to_host(gpu, "tiled fused gemv out"))
            .collect::<Result<Vec<_>>>()?;
        got_runs.push(runs);
    }
    for ((case, got), name) in cases.iter().zip(&got_runs[0]).zip(["q", "k", "v"]) {
        rows.push(Row::new(
            format!("decode tiled {} norm, q,k,v + LoRA: {name}", kind.label()),
            &shape,
            relative_error(&bf16_to_f32(got), &as_f32(&case.want_for(&normed))),
            BF16_BOUND,
        ));
    }
    rows.push(Row::new(
        format!("decode tiled {} q,k,v: run 2 = run 1 (exact)", kind.label()),
        &shape,
        if got_runs[0] == got_runs[1] { 0.0 } else { 1.0 },
        0.0,
    ));
    Ok(rows)
}

/// Whether every case's matrix has a tiled copy of `cols` columns.
fn tiles(cases: &[Case], cols: usize) -> bool {
    cases
        .iter()
        .all(|c| tiled_gemv_fits(&c.weight, (c.rows, cols)))
}

/// One matrix with the residual add: y = residual + (W x + s B z) in f32 and its bf16 copy.
fn check_residual(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    kind: Kind,
    (rows, cols, rank): (usize, usize, usize),
) -> Result<Vec<Row>> {
    let (x_gpu, x) = random_x(gpu, rng, cols)?;
    let case = Case::new(gpu, rng, kind, (rows, cols, rank), &x)?;
    let residual = rng.f32s(rows, -4.0, 4.0);
    let want: Vec<f32> = residual
        .iter()
        .zip(&case.want)
        .map(|(&r, &p)| (f64::from(r) + p) as f32)
        .collect();
    let residual_gpu = GpuBuffer::from_host(gpu, "residual", &residual)?;
    let mut y = GpuBuffer::<f32>::zeroed(gpu, "residual out", rows)?;
    let mut yb = GpuBuffer::<u16>::zeroed(gpu, "residual out bf16", rows)?;
    gemv4_residual(
        gpu,
        &case.product(),
        &x_gpu,
        &residual_gpu,
        (&mut y, &mut yb),
    )?;
    let got = y.to_host(gpu, "residual out")?;
    let got_b = bf16_to_f32(&yb.to_host(gpu, "residual out bf16")?);
    let shape = format!("{rows}x{cols} r{rank}");
    let label = kind.label();
    let mut checks = vec![
        Row::new(
            format!("decode gemv4 {label} + LoRA B + residual: f32"),
            &shape,
            relative_error(&got, &want),
            BF16_BOUND,
        ),
        Row::new(
            format!("decode gemv4 {label} + LoRA B + residual: bf16"),
            &shape,
            relative_error(&got_b, &want),
            BF16_BOUND,
        ),
    ];
    if !tiles(std::slice::from_ref(&case), cols) {
        return Ok(checks);
    }
    let tiled = Tiled4bit::pack(gpu, &case.weight, (rows, cols))?;
    let mut y = GpuBuffer::<f32>::zeroed(gpu, "tiled residual out", rows)?;
    let mut yb = GpuBuffer::<u16>::zeroed(gpu, "tiled residual out bf16", rows)?;
    let lora = case.tiled_lora();
    let mut z_rows = z_buffer(gpu, &[lora])?;
    let input = TiledInput {
        x: &x_gpu,
        norm: None,
        z_rows: &mut z_rows,
    };
    tiled_residual(gpu, &tiled, lora, input, &residual_gpu, (&mut y, &mut yb))?;
    let got = y.to_host(gpu, "tiled residual out")?;
    let got_b = bf16_to_f32(&yb.to_host(gpu, "tiled residual out bf16")?);
    checks.push(Row::new(
        format!("decode tiled {label} + LoRA + residual: f32"),
        &shape,
        relative_error(&got, &want),
        BF16_BOUND,
    ));
    checks.push(Row::new(
        format!("decode tiled {label} + LoRA + residual: bf16"),
        &shape,
        relative_error(&got_b, &want),
        BF16_BOUND,
    ));
    Ok(checks)
}

/// Gate and up with their adapters, then SwiGLU: silu(g) u against the CPU's f64.
fn check_swiglu(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    kind: Kind,
    (rows, cols, rank): (usize, usize, usize),
) -> Result<Vec<Row>> {
    let (x_gpu, x) = random_x(gpu, rng, cols)?;
    let gate = Case::new(gpu, rng, kind, (rows, cols, rank), &x)?;
    let up = Case::new(gpu, rng, kind, (rows, cols, rank), &x)?;
    let want: Vec<f32> = gate
        .want
        .iter()
        .zip(&up.want)
        .map(|(&g, &u)| (g / (1.0 + (-g).exp()) * u) as f32)
        .collect();
    let mut hidden = GpuBuffer::<u16>::zeroed(gpu, "swiglu out", rows)?;
    gemv4_swiglu(gpu, (&gate.product(), &up.product()), &x_gpu, &mut hidden)?;
    let got = bf16_to_f32(&hidden.to_host(gpu, "swiglu out")?);
    let shape = format!("{rows}x{cols} r{rank}");
    let mut checks = vec![Row::new(
        format!("decode gemv4 {} gate,up + LoRA B + SwiGLU", kind.label()),
        &shape,
        relative_error(&got, &want),
        BF16_BOUND,
    )];
    let cases = [gate, up];
    if !tiles(&cases, cols) {
        return Ok(checks);
    }
    let [gate, up] = &cases;
    let tiled = Tiled4bit::pack_pair(gpu, (&gate.weight, &up.weight), (rows, cols))?;
    let mut hidden = GpuBuffer::<u16>::zeroed(gpu, "tiled swiglu out", rows)?;
    let loras = [gate.tiled_lora(), up.tiled_lora()];
    // Through an RMSNorm the kernel applies, as a decode step's gate/up does.
    let (norm_weight, normed) = random_norm(gpu, rng, &x)?;
    let mut z_rows = z_buffer(gpu, &loras)?;
    let input = normed_input(&x_gpu, &norm_weight, &mut z_rows);
    tiled_swiglu(gpu, &tiled, (loras[0], loras[1]), input, &mut hidden)?;
    let got = bf16_to_f32(&hidden.to_host(gpu, "tiled swiglu out")?);
    let want: Vec<f32> = gate
        .want_for(&normed)
        .iter()
        .zip(&up.want_for(&normed))
        .map(|(&g, &u)| (g / (1.0 + (-g).exp()) * u) as f32)
        .collect();
    checks.push(Row::new(
        format!(
            "decode tiled {} norm, gate,up + LoRA + SwiGLU",
            kind.label()
        ),
        &shape,
        relative_error(&got, &want),
        BF16_BOUND,
    ));
    Ok(checks)
}

fn dot_f64(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&p, &q)| f64::from(p) * q).sum()
}

fn dot_f64_f32(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&p, &q)| f64::from(p) * f64::from(q))
        .sum()
}
