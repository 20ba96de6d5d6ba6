//! LoRA product checks: `cuda::lora`'s `z = drop(x) Aᵀ`, `dz = s dy B`, the factor gradients
//! `g += alpha pᵀ drop(q)` and the input gradient's term `dx += drop'(dz A)` against
//! `gemm::matmul_nt` and plain host loops on the bf16-rounded inputs, with dropout masks applied
//! on the host as `dropout_apply_bf16` does (bf16(x * keep) where kept). The shapes reach both
//! load paths (widths a multiple of 8 or not), ragged tiles (rows, rank and widths not multiples
//! of 64 or 32), odd ranks, a rank of 128 (two K steps of the fused input-gradient kernel),
//! products whose contraction is split (few rows over a long width: z and dz over 4096 and
//! 11008) and gradients whose rows are split over many CTAs. The fused input-gradient term is
//! also compared with the two kernels it replaced (matmul_nn_bf16, then masked_add): 0 there
//! means bit-identical.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cuda::elementwise::masked_add;
use crate::backend::cuda::lora::{
    lora_down, lora_dz, lora_grad, lora_grad_scratch_len, lora_rows_scratch_len,
    lora_up_masked_add, Dropout, RowsOut,
};
use crate::backend::cuda::matmul::{matmul_nn_bf16, GemmShape};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::backend::gemm::matmul_nt;
use crate::error::Result;
use half::bf16;

/// Bound on f32 gradients: the same products summed in another order (split partial sums).
const GRAD_BOUND: f64 = 1e-4;
/// The dropout keep scale of the masked checks (p = 0.25).
const KEEP: f32 = 1.0 / 0.75;

/// (rows t, rank r, width k, masked): one element; an odd rank over an unaligned width, with
/// and without dropout; rank 64 over an unaligned width; rank 128; the SmolLM2 and 7B widths;
/// rows far from a multiple of 64 with dropout; enough rows that the gradients split into many
/// partial sums; rank 1 over an odd width and rows past two 128-row tiles (a (T, 1) dz and a
/// (k, 1) dB on the tall tiles, with element loads of B, z and dz); a rank above the width (dA
/// (r, k) on the tall tiles with a mask, dB (k, r) on the wide ones); splits of several K steps
/// through the copy rings (z and dz: 11 splits of 384 over 4104, 6 steps wrapping the 3- and
/// 4-slot rings, the last split 264 long ending in a step of 8; dA and dB: 4 splits of 384 over
/// 1500 rows, the last 348 long), rank 96 (a half-empty second column tile).
const SHAPES: [(usize, usize, usize, bool); 13] = [
    (1, 1, 1, false),
    (333, 1, 1003, true),
    (200, 128, 100, true),
    (300, 5, 100, true),
    (45, 5, 130, false),
    (77, 64, 203, false),
    (150, 128, 264, true),
    (130, 16, 576, false),
    (517, 64, 1536, true),
    (96, 64, 4096, true),
    (4096, 64, 576, true),
    (2048, 8, 11008, false),
    (1500, 96, 4104, true),
];

/// `v` after dropout with `mask` (bf16(v * keep) where kept, else 0), as f32.
fn dropped(v: &[f32], mask: Option<&[u8]>) -> Vec<f32> {
    match mask {
        None => v.to_vec(),
        Some(mask) => v
            .iter()
            .zip(mask)
            .map(|(&x, &m)| {
                if m != 0 {
                    bf16::from_f32(x * KEEP).to_f32()
                } else {
                    0.0
                }
            })
            .collect(),
    }
}

/// `(rows, cols)` row-major `v` transposed.
fn transposed(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Six rows per shape: z, dz, the two gradients (dB unmasked, dA masked where the shape is),
/// and the input gradient's term (masked where the shape is) against the oracle and against the
/// kernels it replaced.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(t, r, k, masked) in &SHAPES {
        let label = format!("t{t} r{r} k{k}{}", if masked { " p0.25" } else { "" });
        let (x_bits, x) = rng.bf16s(t * k, -1.0, 1.0);
        let (a_bits, a) = rng.bf16s(r * k, -1.0, 1.0);
        let mask: Option<Vec<u8>> = masked.then(|| {
            rng.bytes(t * k)
                .iter()
                .map(|b| u8::from(b % 4 != 0))
                .collect()
        });
        let x_gpu = GpuBuffer::from_host(gpu, "LoRA x", &x_bits)?;
        let a_gpu = GpuBuffer::from_host(gpu, "LoRA A", &a_bits)?;
        let mask_gpu = match &mask {
            Some(m) => Some(GpuBuffer::from_host(gpu, "LoRA mask", m)?),
            None => None,
        };
        let dropout = mask_gpu.as_ref().map(|mask| Dropout { mask, keep: KEEP });
        let u = dropped(&x, mask.as_deref());

        // z = 0.5 drop(x) Aᵀ.
        let mut z_gpu = GpuBuffer::<u16>::zeroed(gpu, "LoRA z", t * r)?;
        let mut rows_scratch = GpuBuffer::<f32>::zeroed(
            gpu,
            "LoRA partial sums",
            lora_rows_scratch_len(gpu, (t, r, k)).max(1),
        )?;
        let out = RowsOut {
            out: &mut z_gpu,
            scratch: &mut rows_scratch,
        };
        lora_down(gpu, &x_gpu, dropout, &a_gpu, out, (t, r, k), 0.5)?;
        let mut want = vec![0.0f32; t * r];
        matmul_nt(&u, &a, t, r, k, &mut want, false);
        want.iter_mut().for_each(|w| *w *= 0.5);
        let got = bf16_to_f32(&z_gpu.to_host(gpu, "LoRA z")?);
        rows.push(Row::new(
            "lora z = drop(x) A^T",
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        // dz = 0.25 dy B, dy (t, k) standing for the output gradient, B (k, r).
        let (b_bits, b) = rng.bf16s(k * r, -1.0, 1.0);
        let b_gpu = GpuBuffer::from_host(gpu, "LoRA B", &b_bits)?;
        let mut dz_gpu = GpuBuffer::<u16>::zeroed(gpu, "LoRA dz", t * r)?;
        let out = RowsOut {
            out: &mut dz_gpu,
            scratch: &mut rows_scratch,
        };
        lora_dz(gpu, &x_gpu, &b_gpu, out, (t, r, k), 0.25)?;
        let mut want = vec![0.0f32; t * r];
        matmul_nt(&x, &transposed(&b, k, r), t, r, k, &mut want, false);
        want.iter_mut().for_each(|w| *w *= 0.25);
        let got = bf16_to_f32(&dz_gpu.to_host(gpu, "LoRA dz")?);
        rows.push(Row::new(
            "lora dz = dy B",
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        // dB += 0.5 dyᵀ z with dy = x (t, k), z (t, r): g (k, r), starting from g0.
        let (z_bits, z) = rng.bf16s(t * r, -1.0, 1.0);
        let z_in = GpuBuffer::from_host(gpu, "LoRA z", &z_bits)?;
        let g0 = rng.f32s(k * r, -1.0, 1.0);
        let mut g_gpu = GpuBuffer::from_host(gpu, "LoRA dB", &g0)?;
        let mut scratch = GpuBuffer::<f32>::zeroed(
            gpu,
            "LoRA gradient scratch",
            lora_grad_scratch_len(gpu, t, (k, r)).max(lora_grad_scratch_len(gpu, t, (r, k))),
        )?;
        lora_grad(
            gpu,
            &x_gpu,
            &z_in,
            None,
            &mut g_gpu,
            (t, k, r),
            0.5,
            &mut scratch,
        )?;
        let mut product = vec![0.0f32; k * r]; // xᵀ z
        matmul_nt(
            &transposed(&x, t, k),
            &transposed(&z, t, r),
            k,
            r,
            t,
            &mut product,
            false,
        );
        let want: Vec<f32> = g0
            .iter()
            .zip(&product)
            .map(|(&g, &p)| g + 0.5 * p)
            .collect();
        let got = g_gpu.to_host(gpu, "LoRA dB")?;
        rows.push(Row::new(
            "lora dB += s dy^T z",
            &label,
            relative_error(&got, &want),
            GRAD_BOUND,
        ));

        // dA += dzᵀ drop(x) with dz = z (t, r): g (r, k).
        let g0 = rng.f32s(r * k, -1.0, 1.0);
        let mut g_gpu = GpuBuffer::from_host(gpu, "LoRA dA", &g0)?;
        lora_grad(
            gpu,
            &z_in,
            &x_gpu,
            dropout,
            &mut g_gpu,
            (t, r, k),
            1.0,
            &mut scratch,
        )?;
        let mut want = g0.clone();
        matmul_nt(
            &transposed(&z, t, r),
            &transposed(&u, t, k),
            r,
            k,
            t,
            &mut want,
            true,
        );
        let got = g_gpu.to_host(gpu, "LoRA dA")?;
        rows.push(Row::new(
            "lora dA += dz^T drop(x)",
            &label,
            relative_error(&got, &want),
            GRAD_BOUND,
        ));

        // dx += drop'(dz A) with dz = z (t, r), A (r, k), dx (t, k) from dx0, dx0 small beside
        // the term so that an error in the term shows in dx.
        let (dx_bits, dx0) = rng.bf16s(t * k, -0.25, 0.25);
        let mut dx_gpu = GpuBuffer::from_host(gpu, "LoRA dx", &dx_bits)?;
        lora_up_masked_add(gpu, &z_in, &a_gpu, dropout, &mut dx_gpu, (t, r, k))?;
        let fused = bf16_to_f32(&dx_gpu.to_host(gpu, "LoRA dx")?);
        rows.push(Row::new(
            "lora dx += drop'(dz A)",
            &label,
            up_error(&fused, &dx0, &z, &a, mask.as_deref(), (t, r, k)),
            BF16_BOUND,
        ));
        let before = up_as_before(gpu, (&z_in, &a_gpu), dropout, &dx_bits, (t, r, k))?;
        rows.push(Row::new(
            "lora dx fused vs matmul_nn + masked_add",
            &label,
            relative_error(&fused, &before),
            BF16_BOUND,
        ));
    }
    Ok(rows)
}

/// The error of `got` against the oracle's `dx0 + drop'(dz A)` (f32 product, keep-scaled where
/// kept, 0 where dropped), as ||got - want|| / (||dx0|| + ||term||): the scale of the two bf16
/// roundings the kernel makes (of the term, then of the sum), so the figure stays below ~2^-8
/// however the sum cancels, while an error in the term (an element written where the mask drops
/// it too) is measured against the term's own size (the caller draws dx0 small beside it). A
/// plain relative error fails on a lone element whose term or sum is tiny.
fn up_error(
    got: &[f32],
    dx0: &[f32],
    dz: &[f32],
    a: &[f32],
    mask: Option<&[u8]>,
    (t, r, k): (usize, usize, usize),
) -> f64 {
    let mut product = vec![0.0f32; t * k];
    matmul_nt(dz, &transposed(a, r, k), t, k, r, &mut product, false);
    let want: Vec<f32> = match mask {
        None => product,
        Some(mask) => product
            .iter()
            .zip(mask)
            .map(|(&p, &m)| if m != 0 { KEEP * p } else { 0.0 })
            .collect(),
    };
    let miss = l2(got
        .iter()
        .zip(dx0)
        .zip(&want)
        .map(|((&g, &d), &w)| g - (d + w)));
    let scale = l2(dx0.iter().copied()) + l2(want.iter().copied());
    if scale > 0.0 {
        miss / scale
    } else {
        miss
    }
}

/// `dx0 + drop'(dz A)` the way it ran before the fused kernel: `matmul_nn_bf16` into a bf16 du,
/// then `masked_add` (or `matmul_nn_bf16` with beta = 1 where there is no mask).
fn up_as_before(
    gpu: &CudaDevice,
    (dz, a): (&GpuBuffer<u16>, &GpuBuffer<u16>),
    dropout: Option<Dropout<'_>>,
    dx0_bits: &[u16],
    (t, r, k): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut dx = GpuBuffer::from_host(gpu, "LoRA dx (before)", dx0_bits)?;
    let shape = GemmShape { m: t, n: k, k: r };
    match dropout {
        Some(d) => {
            let mut du = GpuBuffer::<u16>::zeroed(gpu, "LoRA du", t * k)?;
            matmul_nn_bf16(gpu, dz, a, &mut du, shape, 1.0, 0.0)?;
            masked_add(gpu, &mut dx, &du, d.mask, d.keep)?;
        }
        None => matmul_nn_bf16(gpu, dz, a, &mut dx, shape, 1.0, 1.0)?,
    }
    Ok(bf16_to_f32(&dx.to_host(gpu, "LoRA dx (before)")?))
}

/// The Euclidean norm of `values`, summed in f64.
fn l2(values: impl Iterator<Item = f32>) -> f64 {
    values.map(|v| f64::from(v).powi(2)).sum::<f64>().sqrt()
}
