//! The LoRA adapter's products of a training step at one linear (`ptx/lora.cu`), and the dropout
//! mask of its input drawn from sequence keys (`ptx/elementwise.cu`): the forward's
//! `z = drop(x) Aᵀ`, the backward's `dz = s dy B`, the factor gradients `dB += dyᵀ z` and
//! `dA += dzᵀ drop(x)`, and the input gradient's adapter term `dx += drop'(dz A)`, at the bench's
//! token count and rank with a dropout mask of p = 0.1 (the QLoRA recipe's). Bytes count what
//! each kernel must read and write at least once; the activations (x, dy, dx and the mask) are
//! rotated through copies larger than the L2 cache, the factors are not (they stay in L2 in a
//! real step too).

use super::{copies_for, random_bf16, time, timing, uploads};
use crate::backend::cuda::elementwise::{dropout_mask_from_keys, masked_add};
use crate::backend::cuda::lora::{
    lora_down, lora_dz, lora_grad, lora_grad_scratch_len, lora_rows_scratch_len,
    lora_up_masked_add, Dropout, RowsOut,
};
use crate::backend::cuda::matmul::{matmul_nn_bf16, GemmShape};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::cli::bench_kernels::report::KernelBench;
use crate::cli::selftest::harness::{SplitMix64, Timing};
use crate::error::Result;

/// The dropout probability of the timed masks.
const DROPOUT: f64 = 0.1;
/// Rows of one sequence (one dropout key) in the timed mask draw: a 16 x 512 batch's.
const SEQUENCE_ROWS: usize = 512;

/// A random keep mask (1 with probability 1 - DROPOUT) of `len` bytes.
fn keep_mask(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let threshold = (DROPOUT * 256.0) as u8;
    rng.bytes(len)
        .iter()
        .map(|&b| u8::from(b >= threshold))
        .collect()
}

/// The dropout mask of one `out x inp` linear's input at `bench.tokens` rows (one key per 512
/// rows), the five adapter rows at rank `bench.lora_rank`, plus the input gradient's term the
/// way it ran before the fused kernel (matmul_nn_bf16 into a scratch, then masked_add), for
/// comparison in the same call.
pub(super) fn rows(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    bench: &KernelBench,
    names: &str,
    out: usize,
    inp: usize,
) -> Result<Vec<Timing>> {
    let (t, r) = (bench.tokens, bench.lora_rank);
    let keep = (1.0 / (1.0 - DROPOUT)) as f32;
    let scale = 0.25;
    let shape = format!("{names} T{t} r{r} {inp}->{out}");
    let mut timings = Vec::new();

    // The factors: A (r, in), B (out, r), small as trained adapters are.
    let (a_bits, _) = rng.bf16s(r * inp, -0.05, 0.05);
    let a = GpuBuffer::from_host(gpu, "timed LoRA A", &a_bits)?;
    let (b_bits, _) = rng.bf16s(out * r, -0.05, 0.05);
    let b = GpuBuffer::from_host(gpu, "timed LoRA B", &b_bits)?;
    let mut grad_a = GpuBuffer::<f32>::zeroed(gpu, "timed LoRA dA", r * inp)?;
    let mut grad_b = GpuBuffer::<f32>::zeroed(gpu, "timed LoRA dB", out * r)?;

    // The layer input and its mask (T, in), rotated.
    let x_copies = copies_for(3 * t * inp);
    let (x_bits, _) = rng.bf16s(t * inp, -1.0, 1.0);
    let xs = uploads(gpu, "timed LoRA x", &x_bits, x_copies)?;
    drop(x_bits);
    let mut masks = uploads(gpu, "timed LoRA mask", &keep_mask(rng, t * inp), x_copies)?;

    // The masks drawn from keys, as a training pass draws them (into the rotated masks: still
    // p = 0.1 masks for the rows below).
    let per_key = t.min(SEQUENCE_ROWS) * inp;
    let keys: Vec<u64> = (0..t.div_ceil(SEQUENCE_ROWS))
        .map(|_| rng.next_u64())
        .collect();
    let keys = GpuBuffer::from_host(gpu, "timed dropout keys", &keys)?;
    let ms = time(gpu, |i| {
        let mask = &mut masks[i % x_copies];
        dropout_mask_from_keys(gpu, mask, &keys, 0, per_key, DROPOUT as f32)
    })?;
    timings.push(timing(
        "dropout mask from keys (train)",
        &format!("{names} T{t} x {inp}"),
        ms,
        t * inp,
        0.0,
    ));
    let dropout = |i: usize| Dropout {
        mask: &masks[i % x_copies],
        keep,
    };
    let mut z = random_bf16(gpu, rng, "timed LoRA z", t * r)?;
    let mut dz = random_bf16(gpu, rng, "timed LoRA dz", t * r)?;
    let rows_len = lora_rows_scratch_len(gpu, (t, r, inp))
        .max(lora_rows_scratch_len(gpu, (t, r, out)))
        .max(1);
    let mut rows_scratch = GpuBuffer::<f32>::zeroed(gpu, "timed LoRA partial sums", rows_len)?;
    let grad_len =
        lora_grad_scratch_len(gpu, t, (out, r)).max(lora_grad_scratch_len(gpu, t, (r, inp)));
    let mut grad_scratch = GpuBuffer::<f32>::zeroed(gpu, "timed LoRA grad partials", grad_len)?;

    let ms = time(gpu, |i| {
        let rows = RowsOut {
            out: &mut z,
            scratch: &mut rows_scratch,
        };
        lora_down(
            gpu,
            &xs[i % x_copies],
            Some(dropout(i)),
            &a,
            rows,
            (t, r, inp),
            scale,
        )
    })?;
    timings.push(timing(
        "lora z = drop(x) A^T (train)",
        &shape,
        ms,
        3 * t * inp + 2 * r * inp + 2 * t * r,
        2.0 * (t * r * inp) as f64,
    ));

    // The output gradient (T, out), rotated.
    let dy_copies = copies_for(2 * t * out);
    let (dy_bits, _) = rng.bf16s(t * out, -1.0, 1.0);
    let dys = uploads(gpu, "timed LoRA dy", &dy_bits, dy_copies)?;
    drop(dy_bits);
    let ms = time(gpu, |i| {
        let rows = RowsOut {
            out: &mut dz,
            scratch: &mut rows_scratch,
        };
        lora_dz(gpu, &dys[i % dy_copies], &b, rows, (t, r, out), scale)
    })?;
    timings.push(timing(
        "lora dz = s dy B (train)",
        &shape,
        ms,
        2 * t * out + 2 * out * r + 2 * t * r,
        2.0 * (t * r * out) as f64,
    ));
    let ms = time(gpu, |i| {
        let dy = &dys[i % dy_copies];
        lora_grad(
            gpu,
            dy,
            &z,
            None,
            &mut grad_b,
            (t, out, r),
            1.0,
            &mut grad_scratch,
        )
    })?;
    timings.push(timing(
        "lora dB += dy^T z (train)",
        &shape,
        ms,
        2 * t * out + 2 * t * r + 8 * out * r,
        2.0 * (t * r * out) as f64,
    ));
    drop(dys);
    let ms = time(gpu, |i| {
        let x = &xs[i % x_copies];
        let g = &mut grad_a;
        lora_grad(
            gpu,
            &dz,
            x,
            Some(dropout(i)),
            g,
            (t, r, inp),
            1.0,
            &mut grad_scratch,
        )
    })?;
    timings.push(timing(
        "lora dA += dz^T drop(x) (train)",
        &shape,
        ms,
        2 * t * r + 3 * t * inp + 8 * r * inp,
        2.0 * (t * r * inp) as f64,
    ));
    drop(xs);

    // The input gradient (T, in), rotated with the masks: updated in place run after run (the
    // small factors keep it finite).
    let (dx_bits, _) = rng.bf16s(t * inp, -1.0, 1.0);
    let mut dxs = uploads(gpu, "timed LoRA dx", &dx_bits, x_copies)?;
    drop(dx_bits);
    let dx_bytes = 2 * t * r + 2 * r * inp + 5 * t * inp;
    let dx_flops = 2.0 * (t * r * inp) as f64;
    let ms = time(gpu, |i| {
        let j = i % x_copies;
        lora_up_masked_add(gpu, &dz, &a, Some(dropout(j)), &mut dxs[j], (t, r, inp))
    })?;
    timings.push(timing(
        "lora dx += drop'(dz A) (train)",
        &shape,
        ms,
        dx_bytes,
        dx_flops,
    ));
    let mut du = GpuBuffer::<u16>::zeroed(gpu, "timed LoRA du", t * inp)?;
    let product = GemmShape { m: t, n: inp, k: r };
    let ms = time(gpu, |i| {
        let j = i % x_copies;
        matmul_nn_bf16(gpu, &dz, &a, &mut du, product, 1.0, 0.0)?;
        masked_add(gpu, &mut dxs[j], &du, &masks[j], keep)
    })?;
    timings.push(timing(
        "lora dx: matmul_nn + masked_add (before)",
        &shape,
        ms,
        dx_bytes,
        dx_flops,
    ));
    Ok(timings)
}
