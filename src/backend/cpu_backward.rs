//! The backward of each decoder op in [`super::cpu`], in the same order, for the training pass.
//!
//! Gradients flow to activations only (the base weights, norms and embeddings are frozen), so
//! every function here maps an upstream gradient to an input gradient. Shapes as in `cpu`:
//! T tokens, C model width, H query heads, KV key/value heads, D head width, F MLP width.
//! Training runs whole sequences from position 0, so attention here has no cache offset.

use super::cpu::{dot, softmax_in_place};
use rayon::prelude::*;

/// RMSNorm backward. With `r = 1/sqrt(mean(x²) + eps)` and `y = w ⊙ x · r`:
/// `dx = r · (w ⊙ dy) - x · r³ / C · Σ (w ⊙ dy ⊙ x)`. Adds into `dx` when `accumulate`.
pub fn rmsnorm_backward(
    dx: &mut [f32], // (T, C)
    dy: &[f32],     // (T, C)
    x: &[f32],      // (T, C)
    weight: &[f32], // (C)
    eps: f32,
    accumulate: bool,
) {
    let width = weight.len();
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "rmsnorm_backward: shapes differ"
    );
    dx.par_chunks_mut(width)
        .zip(dy.par_chunks(width))
        .zip(x.par_chunks(width))
        .for_each(|((dx, dy), x)| {
            let r = 1.0 / (dot(x, x) / width as f32 + eps).sqrt();
            let mut wdy_x = 0.0f32;
            for ((&g, &w), &xv) in dy.iter().zip(weight).zip(x) {
                wdy_x += g * w * xv;
            }
            let coef = r * r * r / width as f32 * wdy_x;
            for (((d, &g), &w), &xv) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
                let v = r * w * g - xv * coef;
                *d = if accumulate { *d + v } else { v };
            }
        });
}

/// RoPE backward: the forward is a rotation by θ of each `(x[i], x[i + D/2])` pair, so the
/// gradient is rotated by -θ: `dx1 = dy1 cos + dy2 sin`, `dx2 = dy2 cos - dy1 sin`. In place.
pub fn rope_backward(
    d: &mut [f32], // (T, heads * D)
    cos: &[f32],   // (T, D/2)
    sin: &[f32],   // (T, D/2)
    head_dim: usize,
) {
    let half = head_dim / 2;
    let rows = cos.len() / half;
    let width = d.len() / rows;
    for (row, (c, s)) in d
        .chunks_exact_mut(width)
        .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
    {
        for head in row.chunks_exact_mut(head_dim) {
            let (d1, d2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (d1[i], d2[i]);
                d1[i] = a * c[i] + b * s[i];
                d2[i] = b * c[i] - a * s[i];
            }
        }
    }
}

/// Causal GQA attention backward for a whole sequence (positions 0..T).
///
/// Per query row t and head h, with `p = softmax(q·kₛ / sqrt(D))` over s ≤ t and
/// `out = Σ pₛ vₛ`: `dpₛ = dout·vₛ`, `dsₛ = pₛ (dpₛ - Σⱼ pⱼ dpⱼ)`, `dq = Σ dsₛ kₛ / sqrt(D)`,
/// `dkₛ += dsₛ q / sqrt(D)`, `dvₛ += pₛ dout`. Pass 1 (parallel over rows and heads) recomputes
/// p, forms ds and dq and keeps p and ds (H, T, T); pass 2 (parallel over key rows) sums the
/// key and value gradients, so no two tasks write the same memory.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32], // (T, H * D)
    dk: &mut [f32], // (T, KV * D)
    dv: &mut [f32], // (T, KV * D)
    dout: &[f32],   // (T, H * D)
    q: &[f32],      // (T, H * D)
    k: &[f32],      // (T, KV * D)
    v: &[f32],      // (T, KV * D)
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) {
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
    let t_len = q.len() / q_dim;
    assert!(
        k.len() == t_len * kv_dim && v.len() == k.len() && dout.len() == q.len(),
        "attention_backward: shapes differ"
    );
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // (H, T, T): probabilities and score gradients, row t filled up to column t.
    let mut probs = vec![0.0f32; n_heads * t_len * t_len];
    let mut dscores = vec![0.0f32; n_heads * t_len * t_len];
    // Pass 1, one task per (head, row).
    let rows: Vec<(usize, usize)> = (0..n_heads)
        .flat_map(|h| (0..t_len).map(move |t| (h, t)))
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = rows
        .par_iter()
        .map(|&(h, t)| {
            let kv_off = (h / group) * head_dim;
            let qv = &q[t * q_dim + h * head_dim..][..head_dim];
            let go = &dout[t * q_dim + h * head_dim..][..head_dim];
            let mut p: Vec<f32> = (0..=t)
                .map(|s| dot(qv, &k[s * kv_dim + kv_off..][..head_dim]) * scale)
                .collect();
            softmax_in_place(&mut p);
            let dp: Vec<f32> = (0..=t)
                .map(|s| dot(go, &v[s * kv_dim + kv_off..][..head_dim]))
                .collect();
            let mean: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            let ds: Vec<f32> = p
                .iter()
                .zip(&dp)
                .map(|(pi, dpi)| pi * (dpi - mean))
                .collect();
            let mut dqv = vec![0.0f32; head_dim];
            for (s, &d) in ds.iter().enumerate() {
                let kr = &k[s * kv_dim + kv_off..][..head_dim];
                for (o, &kk) in dqv.iter_mut().zip(kr) {
                    *o += d * kk * scale;
                }
            }
            (p, ds, dqv)
        })
        .collect();
    for (&(h, t), (p, ds, dqv)) in rows.iter().zip(&results) {
        let base = (h * t_len + t) * t_len;
        probs[base..base + t + 1].copy_from_slice(p);
        dscores[base..base + t + 1].copy_from_slice(ds);
        dq[t * q_dim + h * head_dim..][..head_dim].copy_from_slice(dqv);
    }
    // Pass 2: key row s of kv head g gathers from every query row t >= s of the group's heads.
    dk.par_chunks_mut(kv_dim)
        .zip(dv.par_chunks_mut(kv_dim))
        .enumerate()
        .for_each(|(s, (dk_row, dv_row))| {
            dk_row.fill(0.0);
            dv_row.fill(0.0);
            for h in 0..n_heads {
                let off = (h / group) * head_dim;
                let (dkh, dvh) = (
                    &mut dk_row[off..off + head_dim],
                    &mut dv_row[off..off + head_dim],
                );
                for t in s..t_len {
                    let idx = (h * t_len + t) * t_len + s;
                    let (pv, dsv) = (probs[idx], dscores[idx] * scale);
                    let qv = &q[t * q_dim + h * head_dim..][..head_dim];
                    let go = &dout[t * q_dim + h * head_dim..][..head_dim];
                    for d in 0..head_dim {
                        dkh[d] += dsv * qv[d];
                        dvh[d] += pv * go[d];
                    }
                }
            }
        });
}

/// SwiGLU backward for `out = silu(g) · u`: `du = dout · silu(g)`,
/// `dg = dout · u · σ(g) (1 + g (1 - σ(g)))`.
pub fn swiglu_backward(
    dgate: &mut [f32], // (T, F)
    dup: &mut [f32],   // (T, F)
    dout: &[f32],      // (T, F)
    gate: &[f32],      // (T, F)
    up: &[f32],        // (T, F)
) {
    assert!(
        dgate.len() == dout.len()
            && dup.len() == dout.len()
            && gate.len() == dout.len()
            && up.len() == dout.len()
    );
    for ((((dg, du), &d), &g), &u) in dgate
        .iter_mut()
        .zip(dup.iter_mut())
        .zip(dout)
        .zip(gate)
        .zip(up)
    {
        let sig = 1.0 / (1.0 + (-g).exp());
        *du = d * g * sig;
        *dg = d * u * sig * (1.0 + g * (1.0 - sig));
    }
}
