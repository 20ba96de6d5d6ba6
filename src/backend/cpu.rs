//! The CPU oracle: the decoder's operations as plain f32 loops over row-major slices.
//!
//! Shapes use T for tokens in the chunk, S for positions in the KV cache, C for the model
//! width, H query heads, KV key/value heads, D head width, F the MLP width, V the vocabulary.
//! Each function fills a caller-owned output so that a forward pass allocates nothing per layer;
//! a backward for each one can sit right beside it.

use rayon::prelude::*;

/// Dot product with eight independent f32 accumulators, so the compiler can keep them in SIMD
/// registers (a plain left-to-right sum cannot be vectorised). Panics on unequal lengths.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y += alpha * x`.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy: length mismatch");
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `x += y`, elementwise (the residual connection).
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_in_place: length mismatch");
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Copies embedding rows: `out[t] = table[tokens[t]]`. The caller has checked every id is
/// below V.
pub fn embedding_forward(
    out: &mut [f32], // (T, C)
    table: &[f32],   // (V, C)
    tokens: &[u32],  // (T)
) {
    let width = out.len() / tokens.len();
    for (row, &id) in out.chunks_exact_mut(width).zip(tokens) {
        let id = id as usize;
        row.copy_from_slice(&table[id * width..(id + 1) * width]);
    }
}

/// RMSNorm of each row: `out = x / sqrt(mean(x^2) + eps) * weight`, in f32 as transformers'
/// `LlamaRMSNorm` computes it.
pub fn rmsnorm_forward(
    out: &mut [f32], // (T, C)
    x: &[f32],       // (T, C)
    weight: &[f32],  // (C)
    eps: f32,
) {
    let width = weight.len();
    assert_eq!(out.len(), x.len(), "rmsnorm: shapes differ");
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .for_each(|(out, x)| {
            let mean_square = dot(x, x) / width as f32;
            let inv_rms = 1.0 / (mean_square + eps).sqrt();
            for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
                *o = w * (x * inv_rms);
            }
        });
}

/// The RoPE angles of positions `pos0..pos0 + T`: `cos[t][i] = cos((pos0 + t) * inv_freq[i])`,
/// the product taken in f32 as transformers takes it.
pub fn rope_cos_sin(
    cos: &mut [f32],  // (T, D/2)
    sin: &mut [f32],  // (T, D/2)
    inv_freq: &[f32], // (D/2)
    pos0: usize,
) {
    let half = inv_freq.len();
    for (t, (c, s)) in cos
        .chunks_exact_mut(half)
        .zip(sin.chunks_exact_mut(half))
        .enumerate()
    {
        let position = (pos0 + t) as f32;
        for i in 0..half {
            let angle = position * inv_freq[i];
            c[i] = angle.cos();
            s[i] = angle.sin();
        }
    }
}

/// Rotates every head of every row in place, in transformers' `rotate_half` convention: the
/// pairs are `(x[i], x[i + D/2])`, `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
pub fn rope_forward(
    x: &mut [f32], // (T, heads * D)
    cos: &[f32],   // (T, D/2)
    sin: &[f32],   // (T, D/2)
    head_dim: usize,
) {
    let half = head_dim / 2;
    let rows = cos.len() / half;
    assert_eq!(
        x.len() % (rows * head_dim),
        0,
        "rope: x is not (T, heads * D)"
    );
    let width = x.len() / rows;
    for (row, (c, s)) in x
        .chunks_exact_mut(width)
        .zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)))
    {
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Replaces `x` by `softmax(x)`, in f32, shifted by the maximum for stability.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Causal grouped-query attention of T new queries against the cache.
///
/// Query row t sits at position `pos0 + t` and attends to key/value rows `0..=pos0 + t`
/// (`k` and `v` hold at least `pos0 + T` rows, the new ones already written). Query head h
/// reads key/value head `h / (H / KV)`, as transformers' `repeat_kv` lays them out.
/// `out = softmax(q k^T / sqrt(D)) v` per (row, head), parallel over (row, head).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32], // (T, H * D)
    q: &[f32],       // (T, H * D)
    k: &[f32],       // (S, KV * D)
    v: &[f32],       // (S, KV * D)
    pos0: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) {
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let rows = q.len() / q_dim;
    assert_eq!(out.len(), q.len(), "attention: out and q differ");
    assert!(
        k.len() >= (pos0 + rows) * kv_dim && v.len() == k.len(),
        "attention: the cache holds fewer than pos0 + T rows"
    );
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (i, out)| {
            let (row, head) = (i / n_heads, i % n_heads);
            let kv_offset = (head / group) * head_dim;
            let q = &q[row * q_dim + head * head_dim..][..head_dim];
            let n_keys = pos0 + row + 1;
            scores.clear();
            scores.extend(
                (0..n_keys).map(|s| dot(q, &k[s * kv_dim + kv_offset..][..head_dim]) * scale),
            );
            softmax_in_place(scores);
            out.fill(0.0);
            for (s, &p) in scores.iter().enumerate() {
                axpy(out, p, &v[s * kv_dim + kv_offset..][..head_dim]);
            }
        },
    );
}

/// SwiGLU: `out = silu(gate) * up` with `silu(g) = g / (1 + exp(-g))`.
pub fn swiglu_forward(
    out: &mut [f32], // (T, F)
    gate: &[f32],    // (T, F)
    up: &[f32],      // (T, F)
) {
    assert!(
        out.len() == gate.len() && gate.len() == up.len(),
        "swiglu: shapes differ"
    );
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "[{i}]: got {g}, want {w} (all: {got:?})"
            );
        }
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (1..=11).map(|i| i as f32).collect();
        let b = vec![2.0f32; 11];
        assert_eq!(dot(&a, &b), 132.0);
    }

    /// x = [1, 2, 3, 4]: mean(x^2) = 7.5, rms = 2.738613; w = [1, 1, 2, 0.5].
    #[test]
    fn rmsnorm_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0, -2.0, 0.0, 0.0, 0.0];
        let w = [1.0, 1.0, 2.0, 0.5];
        let mut out = [0f32; 8];
        rmsnorm_forward(&mut out, &x, &w, 0.0);
        close(
            &out,
            &[0.365148, 0.730297, 2.19089, 0.730297, -2.0, 0.0, 0.0, 0.0],
            1e-5,
        );
        // eps enters under the root: row [-2, 0, 0, 0] with eps = 1: 1 / sqrt(1 + 1).
        rmsnorm_forward(&mut out, &x, &w, 1.0);
        assert!((out[4] + 2.0 / 2f32.sqrt()).abs() < 1e-6, "{}", out[4]);
    }

    /// One head of width 4 at position 1, inv_freq [1, 0.01]: angles 1 and 0.01.
    /// x = [1, 2, 3, 4] pairs (1, 3) and (2, 4):
    /// 1 cos 1 - 3 sin 1 = -1.984111, 2 cos .01 - 4 sin .01 = 1.959900,
    /// 3 cos 1 + 1 sin 1 = 2.462378, 4 cos .01 + 2 sin .01 = 4.019800.
    #[test]
    fn rope_by_hand() {
        let inv_freq = [1.0, 0.01];
        let (mut cos, mut sin) = ([0f32; 4], [0f32; 4]);
        rope_cos_sin(&mut cos, &mut sin, &inv_freq, 0);
        close(&cos[..2], &[1.0, 1.0], 0.0);
        close(&sin[2..], &[1f32.sin(), 0.01f32.sin()], 0.0);
        // rows at positions 0 and 1, two identical heads each
        let mut x = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0].repeat(2);
        rope_forward(&mut x, &cos, &sin, 4);
        close(&x[..8], &[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], 0.0);
        let want = [-1.984111, 1.959901, 2.462378, 4.0198];
        close(&x[8..12], &want, 1e-5);
        close(&x[12..], &want, 1e-5);
    }

    /// D = 2, one key/value head shared by two query heads. Query row 0 (position 0) sees
    /// only key 0, so it returns v0. Query row 1 = [1, 0] scores [1/sqrt 2, 0] against keys
    /// [1, 0] and [0, 1]: p = [0.669762, 0.330238], out = p0 [1, 2] + p1 [3, 4].
    #[test]
    fn attention_by_hand() {
        let q = [9.0, -3.0, 9.0, -3.0, 1.0, 0.0, 0.0, 0.0];
        let k = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        let v = [1.0, 2.0, 3.0, 4.0, 7.0, 7.0];
        let mut out = [0f32; 8];
        attention_forward(&mut out, &q, &k, &v, 0, 2, 1, 2);
        close(&out[..4], &[1.0, 2.0, 1.0, 2.0], 1e-6);
        close(&out[4..6], &[1.660476, 2.660476], 1e-5);
        // head 1 of row 1 has q = 0: uniform weights over two keys
        close(&out[6..], &[2.0, 3.0], 1e-6);
        // the same query row alone, as a decode step at position 1
        let mut one = [0f32; 4];
        attention_forward(&mut one, &q[4..], &k, &v, 1, 2, 1, 2);
        close(&one, &out[4..], 0.0);
    }

    #[test]
    fn swiglu_by_hand() {
        let mut out = [0f32; 3];
        swiglu_forward(&mut out, &[0.0, 1.0, -2.0], &[5.0, 2.0, 3.0]);
        // silu(1) = 0.731059, silu(-2) = -0.238406
        close(&out, &[0.0, 1.462117, -0.715218], 1e-6);
    }
}
