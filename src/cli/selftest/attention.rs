//! Attention checks: `cuda::attention` forward (whole sequences, batches of them, a chunk at an
//! offset, decode steps against a KV cache) against `cpu::attention_forward` plus an f64 log-sum-exp of the
//! same scores, and the backward against `cpu_backward::attention_backward`; timings at the
//! LLaMA-7B shape.

use super::harness::{
    bf16_to_f32, relative_error, Row, SplitMix64, Timing, BF16_BOUND, F32_BOUND, TIMED_RUNS,
    WARMUP_RUNS,
};
use crate::backend::cpu::attention_forward;
use crate::backend::cpu_backward::attention_backward;
use crate::backend::cuda::attention::{
    self, AttentionSaved, AttentionShape, DecodeCache, DecodePosition, DecodeRow, DecodeScratch,
};
use crate::backend::cuda::{median_ms, CudaDevice, GpuBuffer};
use crate::error::Result;

/// (B, T, H, KV, D) of batches of whole sequences: one token, SmolLM2's heads (9 query, 3
/// key/value, 64 wide) at odd lengths, a full-tile multiple, and 128-wide heads with and without
/// grouping; single sequences and batches of several.
const SEQUENCES: [(usize, usize, usize, usize, usize); 8] = [
    (1, 1, 9, 3, 64),
    (1, 3, 9, 3, 64),
    (1, 77, 9, 3, 64),
    (1, 512, 9, 3, 64),
    (1, 100, 4, 4, 128),
    (1, 33, 8, 2, 128),
    (3, 77, 9, 3, 64),
    (2, 100, 8, 2, 128),
];
/// (T, pos0, H, KV, D) against a cache: single rows through the forward kernel (T = 1; a model's
/// decode steps run the fused kernel, checked in `decode_attention`) and chunks of 7 at
/// position 50 (the forward kernel with an offset).
const CACHED: [(usize, usize, usize, usize, usize); 7] = [
    (1, 0, 9, 3, 64),
    (1, 76, 9, 3, 64),
    (1, 255, 9, 3, 64),
    (1, 999, 32, 32, 128),
    (1, 2047, 32, 8, 128),
    (7, 50, 9, 3, 64),
    (7, 50, 4, 2, 128),
];
/// Extra cache rows past pos0 + T, filled with data the kernels must not read.
const CACHE_SLACK: usize = 5;

/// Forward and backward per sequence shape, then the cached (decode and chunk) forwards.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(batch, t, heads, kv_heads, head_dim) in &SEQUENCES {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let label = if batch == 1 {
            format!("T{t} H{heads}/{kv_heads} D{head_dim}")
        } else {
            format!("{batch}xT{t} H{heads}/{kv_heads} D{head_dim}")
        };
        let rows_q = t * heads * head_dim;
        let rows_kv = t * kv_heads * head_dim;
        let (q_bits, q) = rng.bf16s(batch * rows_q, -2.0, 2.0);
        let (k_bits, k) = rng.bf16s(batch * rows_kv, -2.0, 2.0);
        let (v_bits, v) = rng.bf16s(batch * rows_kv, -1.0, 1.0);
        let (dout_bits, dout) = rng.bf16s(batch * rows_q, -1.0, 1.0);
        let q_gpu = GpuBuffer::from_host(gpu, "attention q", &q_bits)?;
        let k_gpu = GpuBuffer::from_host(gpu, "attention k", &k_bits)?;
        let v_gpu = GpuBuffer::from_host(gpu, "attention v", &v_bits)?;
        let dout_gpu = GpuBuffer::from_host(gpu, "attention dout", &dout_bits)?;

        let mut out = GpuBuffer::<u16>::zeroed(gpu, "attention out", q.len())?;
        let mut lse = GpuBuffer::<f32>::zeroed(gpu, "attention lse", batch * heads * t)?;
        attention::attention_forward(
            gpu, &q_gpu, &k_gpu, &v_gpu, &mut out, &mut lse, 0, batch, shape,
        )?;
        // The references run sequence by sequence.
        let mut want = vec![0.0f32; q.len()];
        let mut want_lse = Vec::with_capacity(batch * heads * t);
        for b in 0..batch {
            let (qs, ks) = (b * rows_q..(b + 1) * rows_q, b * rows_kv..(b + 1) * rows_kv);
            attention_forward(
                &mut want[qs.clone()],
                &q[qs.clone()],
                &k[ks.clone()],
                &v[ks.clone()],
                0,
                heads,
                kv_heads,
                head_dim,
            );
            want_lse.extend(reference_lse(&q[qs], &k[ks], 0, shape));
        }
        let got = bf16_to_f32(&out.to_host(gpu, "attention out")?);
        rows.push(Row::new(
            "attention fwd bf16",
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));
        let got_lse = lse.to_host(gpu, "attention lse")?;
        rows.push(Row::new(
            "attention lse f32",
            &label,
            relative_error(&got_lse, &want_lse),
            F32_BOUND,
        ));

        let (mut want_dq, mut want_dk, mut want_dv) = (
            vec![0.0f32; q.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; v.len()],
        );
        for b in 0..batch {
            let (qs, ks) = (b * rows_q..(b + 1) * rows_q, b * rows_kv..(b + 1) * rows_kv);
            attention_backward(
                &mut want_dq[qs.clone()],
                &mut want_dk[ks.clone()],
                &mut want_dv[ks.clone()],
                &dout[qs.clone()],
                &q[qs],
                &k[ks.clone()],
                &v[ks],
                heads,
                kv_heads,
                head_dim,
            );
        }
        let mut dq = GpuBuffer::<u16>::zeroed(gpu, "attention dq", q.len())?;
        let mut dk = GpuBuffer::<u16>::zeroed(gpu, "attention dk", k.len())?;
        let mut dv = GpuBuffer::<u16>::zeroed(gpu, "attention dv", v.len())?;
        let mut delta = GpuBuffer::<f32>::zeroed(gpu, "attention delta", batch * heads * t)?;
        let saved = AttentionSaved {
            q: &q_gpu,
            k: &k_gpu,
            v: &v_gpu,
            out: &out,
            lse: &lse,
        };
        attention::attention_backward(
            gpu, &saved, &dout_gpu, &mut dq, &mut dk, &mut dv, &mut delta, batch, shape,
        )?;
        for (name, got, want) in [
            ("attention bwd dq bf16", &dq, &want_dq),
            ("attention bwd dk bf16", &dk, &want_dk),
            ("attention bwd dv bf16", &dv, &want_dv),
        ] {
            let got = bf16_to_f32(&got.to_host(gpu, name)?);
            rows.push(Row::new(
                name,
                &label,
                relative_error(&got, want),
                BF16_BOUND,
            ));
        }
    }

    for &(t, pos0, heads, kv_heads, head_dim) in &CACHED {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let cache_rows = pos0 + t + CACHE_SLACK;
        let check = if t == 1 {
            "attention decode bf16"
        } else {
            "attention chunk bf16"
        };
        let label = format!("T{t}@{pos0} H{heads}/{kv_heads} D{head_dim}");
        let (q_bits, q) = rng.bf16s(t * heads * head_dim, -2.0, 2.0);
        let (k_bits, k) = rng.bf16s(cache_rows * kv_heads * head_dim, -2.0, 2.0);
        let (v_bits, v) = rng.bf16s(cache_rows * kv_heads * head_dim, -1.0, 1.0);
        let q_gpu = GpuBuffer::from_host(gpu, "attention q", &q_bits)?;
        let k_gpu = GpuBuffer::from_host(gpu, "attention k cache", &k_bits)?;
        let v_gpu = GpuBuffer::from_host(gpu, "attention v cache", &v_bits)?;
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "attention out", q.len())?;
        let mut lse = GpuBuffer::<f32>::zeroed(gpu, "attention lse", heads * t)?;
        attention::attention_forward(
            gpu, &q_gpu, &k_gpu, &v_gpu, &mut out, &mut lse, pos0, 1, shape,
        )?;
        let mut want = vec![0.0f32; q.len()];
        attention_forward(&mut want, &q, &k, &v, pos0, heads, kv_heads, head_dim);
        let got = bf16_to_f32(&out.to_host(gpu, "attention out")?);
        rows.push(Row::new(
            check,
            &label,
            relative_error(&got, &want),
            BF16_BOUND,
        ));
        let want_lse = reference_lse(&q, &k, pos0, shape);
        let got_lse = lse.to_host(gpu, "attention lse")?;
        rows.push(Row::new(
            "attention lse f32",
            &label,
            relative_error(&got_lse, &want_lse),
            F32_BOUND,
        ));
    }
    Ok(rows)
}

/// lse (H, T): per query row and head, log Σ exp(q·kₛ / sqrt(D)) over the keys it sees, in f64.
pub(super) fn reference_lse(q: &[f32], k: &[f32], pos0: usize, shape: AttentionShape) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let t_len = q.len() / (heads * head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut lse = vec![0.0f32; heads * t_len];
    for h in 0..heads {
        let kv_off = (h / group) * head_dim;
        for t in 0..t_len {
            let qv = &q[t * heads * head_dim + h * head_dim..][..head_dim];
            let scores: Vec<f64> = (0..=pos0 + t)
                .map(|s| {
                    let kr = &k[s * kv_heads * head_dim + kv_off..][..head_dim];
                    qv.iter()
                        .zip(kr)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            lse[h * t_len + t] = (max + sum.ln()) as f32;
        }
    }
    lse
}

/// Forward and backward at LLaMA-7B's attention (32 heads of 128) over a 2048-token sequence,
/// and a decode step against a 4096-row cache. FLOPs count the causal half of the products:
/// 4·T²·D·H/2 forward, 2.5 times that backward. The sequence operands (16 MB each) fit the L2;
/// attention at that size is bound by arithmetic. The decode step is bound by reading the cache.
pub(super) fn timings(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Timing>> {
    let (t, heads, head_dim) = (2048usize, 32usize, 128usize);
    let shape = AttentionShape {
        heads,
        kv_heads: heads,
        head_dim,
    };
    let n = t * heads * head_dim;
    let upload = |rng: &mut SplitMix64, what: &str| -> Result<GpuBuffer<u16>> {
        let (bits, _) = rng.bf16s(n, -2.0, 2.0);
        GpuBuffer::from_host(gpu, what, &bits)
    };
    let (q, k, v, dout) = (
        upload(rng, "timed q")?,
        upload(rng, "timed k")?,
        upload(rng, "timed v")?,
        upload(rng, "timed dout")?,
    );
    let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed out", n)?;
    let mut lse = GpuBuffer::<f32>::zeroed(gpu, "timed lse", heads * t)?;
    let forward_ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |_| {
        attention::attention_forward(gpu, &q, &k, &v, &mut out, &mut lse, 0, 1, shape)
    })?;
    let (mut dq, mut dk, mut dv) = (
        GpuBuffer::<u16>::zeroed(gpu, "timed dq", n)?,
        GpuBuffer::<u16>::zeroed(gpu, "timed dk", n)?,
        GpuBuffer::<u16>::zeroed(gpu, "timed dv", n)?,
    );
    let mut delta = GpuBuffer::<f32>::zeroed(gpu, "timed delta", heads * t)?;
    let saved = AttentionSaved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
    };
    let backward_ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |_| {
        attention::attention_backward(
            gpu, &saved, &dout, &mut dq, &mut dk, &mut dv, &mut delta, 1, shape,
        )
    })?;
    // A decode step (RoPE, cache write, attention, combine: one kernel) at position 4095 of a
    // 4096-row cache (K and V 64 MB together), two caches rotated.
    let cached = 4096usize;
    let cache_len = cached * heads * head_dim;
    let mut caches = (0..2)
        .map(|_| {
            let (bits, _) = rng.bf16s(cache_len, -2.0, 2.0);
            Ok((
                GpuBuffer::from_host(gpu, "timed k cache", &bits)?,
                GpuBuffer::from_host(gpu, "timed v cache", &bits)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let angles = rng.f32s(cached * head_dim / 2, -1.0, 1.0);
    let cos = GpuBuffer::from_host(gpu, "timed decode cos", &angles)?;
    let sin = GpuBuffer::from_host(gpu, "timed decode sin", &angles)?;
    let (row_bits, _) = rng.bf16s(heads * head_dim, -2.0, 2.0);
    let q1 = GpuBuffer::from_host(gpu, "timed decode q", &row_bits)?;
    let k1 = GpuBuffer::from_host(gpu, "timed decode k", &row_bits)?;
    let v1 = GpuBuffer::from_host(gpu, "timed decode v", &row_bits)?;
    let mut out1 = GpuBuffer::<u16>::zeroed(gpu, "timed decode out", heads * head_dim)?;
    let mut lse1 = GpuBuffer::<f32>::zeroed(gpu, "timed decode lse", heads)?;
    let mut partials = GpuBuffer::<f32>::zeroed(
        gpu,
        "timed decode partials",
        attention::decode_scratch_len(cached, shape),
    )?;
    let mut arrivals = GpuBuffer::<u32>::zeroed(gpu, "timed decode arrivals", heads)?;
    let decode_ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
        let copies = caches.len();
        let (keys, values) = &mut caches[i % copies];
        let row = DecodeRow {
            q: &q1,
            k: &k1,
            v: &v1,
        };
        let cache = DecodeCache {
            keys,
            values,
            cos: &cos,
            sin: &sin,
        };
        let scratch = DecodeScratch {
            partials: &mut partials,
            arrivals: &mut arrivals,
        };
        let at = DecodePosition::At(cached - 1);
        let outs = (&mut out1, &mut lse1);
        attention::attention_decode(gpu, row, cache, at, outs, shape, scratch)
    })?;

    let forward_flops = 4.0 * (t * t) as f64 * (head_dim * heads) as f64 / 2.0;
    let label = format!("T{t} H{heads} D{head_dim}");
    Ok(vec![
        Timing {
            kernel: "attention fwd (causal)".into(),
            shape: label.clone(),
            median_ms: forward_ms,
            bytes: 0,
            flops: forward_flops,
        },
        Timing {
            kernel: "attention bwd (causal)".into(),
            shape: label,
            median_ms: backward_ms,
            bytes: 0,
            flops: 2.5 * forward_flops,
        },
        Timing {
            kernel: "attention decode (fused step)".into(),
            shape: format!("S{cached} H{heads} D{head_dim}"),
            median_ms: decode_ms,
            bytes: 2 * 2 * cache_len,
            flops: 0.0,
        },
    ])
}
