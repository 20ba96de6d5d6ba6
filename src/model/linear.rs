//! The linear layers of the decoder (q, k, v, o, gate, up, down and lm_head): `y = x W^T`
//! with W of shape (out, in), no bias.
//!
//! Every matmul walks the weight one output row at a time through a private `weight_row`, so a
//! compressed weight (NF4 blocks of 64 along a row) only has to produce a row of `in` f32 values
//! into a scratch buffer; the loops around it stay the same.

use crate::backend::cpu::{axpy, dot};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Output rows handed to one rayon task in [`Linear::forward`].
const ROWS_PER_TASK: usize = 16;

/// How the weight is stored.
enum LinearWeight {
    /// Plain f32, row-major (out, in); shared so a tied lm_head can reuse the embedding.
    Dense(Arc<[f32]>),
}

/// A bias-free linear layer with weight W of shape (out, in).
pub struct Linear {
    in_features: usize,
    out_features: usize,
    weight: LinearWeight,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.weight {
            LinearWeight::Dense(_) => "dense f32",
        };
        write!(
            f,
            "Linear({} -> {}, {kind})",
            self.in_features, self.out_features
        )
    }
}

impl Linear {
    /// A dense layer from a row-major (out, in) f32 weight. `name` labels the error when the
    /// length is not `out * in`.
    pub fn dense(
        name: &str,
        out_features: usize,
        in_features: usize,
        weight: Arc<[f32]>,
    ) -> Result<Self> {
        if out_features.checked_mul(in_features) != Some(weight.len()) || in_features == 0 {
            return Err(Error::invalid(format!(
                "{name}: {} weights do not fill shape [{out_features}, {in_features}]",
                weight.len()
            )));
        }
        Ok(Linear {
            in_features,
            out_features,
            weight: LinearWeight::Dense(weight),
        })
    }

    /// Input width, `in`.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width, `out`.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Row `j` of W as `in` f32 values: borrowed for a dense weight; a compressed weight
    /// decodes into `scratch` and returns it.
    fn weight_row<'a>(&'a self, j: usize, _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.weight {
            LinearWeight::Dense(w) => &w[j * self.in_features..(j + 1) * self.in_features],
        }
    }

    /// `out = x W^T`. Parallel over blocks of output rows, each weight row read once for all
    /// N inputs. Panics if the slices are not (N, in) and (N, out) for one N.
    pub fn forward(
        &self,
        x: &[f32],       // (N, in)
        out: &mut [f32], // (N, out)
    ) {
        let n = x.len() / self.in_features;
        assert!(
            x.len() == n * self.in_features && out.len() == n * self.out_features,
            "Linear::forward: x has {} values, out {} for {:?}",
            x.len(),
            out.len(),
            self
        );
        if n == 1 {
            // (1, out) is also (out, 1): write straight into out.
            self.forward_transposed(x, out, 1);
        } else {
            let mut out_t = vec![0f32; out.len()]; // (out, N)
            self.forward_transposed(x, &mut out_t, n);
            for (j, column) in out_t.chunks_exact(n).enumerate() {
                for (t, &value) in column.iter().enumerate() {
                    out[t * self.out_features + j] = value;
                }
            }
        }
    }

    /// `out_t = W x^T`, so that each task owns a contiguous block of output rows.
    fn forward_transposed(
        &self,
        x: &[f32],         // (N, in)
        out_t: &mut [f32], // (out, N)
        n: usize,
    ) {
        out_t
            .par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (block, out_block)| {
                for (r, out_row) in out_block.chunks_exact_mut(n).enumerate() {
                    let w = self.weight_row(block * ROWS_PER_TASK + r, scratch);
                    for (y, x) in out_row.iter_mut().zip(x.chunks_exact(self.in_features)) {
                        *y = dot(x, w);
                    }
                }
            });
    }

    /// The input gradient `dx = dy W` (for a frozen weight). Parallel over groups of rows of
    /// dx, each weight row read once per group. Panics if the slices are not (N, out) and
    /// (N, in) for one N.
    pub fn backward_input(
        &self,
        dy: &[f32],     // (N, out)
        dx: &mut [f32], // (N, in)
    ) {
        let n = dy.len() / self.out_features;
        assert!(
            dy.len() == n * self.out_features && dx.len() == n * self.in_features,
            "Linear::backward_input: dy has {} values, dx {} for {:?}",
            dy.len(),
            dx.len(),
            self
        );
        let group = n.div_ceil(4 * rayon::current_num_threads()).clamp(1, 32);
        dx.par_chunks_mut(group * self.in_features)
            .zip(dy.par_chunks(group * self.out_features))
            .for_each_init(Vec::new, |scratch, (dx_group, dy_group)| {
                dx_group.fill(0.0);
                for j in 0..self.out_features {
                    let w = self.weight_row(j, scratch);
                    for (dx_row, dy_row) in dx_group
                        .chunks_exact_mut(self.in_features)
                        .zip(dy_group.chunks_exact(self.out_features))
                    {
                        axpy(dx_row, dy_row[j], w);
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, non-trivial values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ seed.rotate_left(7))
                    .wrapping_mul(2654435761)
                    .rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Independent reference: the textbook triple loop in f64.
    fn naive(x: &[f32], w: &[f32], n: usize, out_f: usize, in_f: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * out_f];
        for t in 0..n {
            for j in 0..out_f {
                let s: f64 = (0..in_f)
                    .map(|i| x[t * in_f + i] as f64 * w[j * in_f + i] as f64)
                    .sum();
                y[t * out_f + j] = s as f32;
            }
        }
        y
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn forward_matches_the_triple_loop() {
        let (out_f, in_f) = (37, 21); // odd sizes: partial task blocks and dot tails
        let w = values(out_f * in_f, 1);
        let layer = Linear::dense("w", out_f, in_f, w.clone().into()).unwrap();
        for n in [1, 2, 5] {
            let x = values(n * in_f, 2 + n as u32);
            let mut y = vec![f32::NAN; n * out_f];
            layer.forward(&x, &mut y);
            let want = naive(&x, &w, n, out_f, in_f);
            assert!(max_diff(&y, &want) < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn backward_input_matches_the_triple_loop() {
        let (out_f, in_f) = (19, 40);
        let w = values(out_f * in_f, 3);
        // W^T as an (in, out) matrix: dx = dy W = dy (W^T)^T
        let mut w_t = vec![0f32; w.len()];
        for j in 0..out_f {
            for i in 0..in_f {
                w_t[i * out_f + j] = w[j * in_f + i];
            }
        }
        let layer = Linear::dense("w", out_f, in_f, w.into()).unwrap();
        for n in [1, 3, 70] {
            let dy = values(n * out_f, 4 + n as u32);
            let mut dx = vec![f32::NAN; n * in_f];
            layer.backward_input(&dy, &mut dx);
            let want = naive(&dy, &w_t, n, in_f, out_f);
            assert!(max_diff(&dx, &want) < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn refuses_a_weight_of_the_wrong_size() {
        let err = Linear::dense(
            "model.layers.0.mlp.up_proj.weight",
            3,
            4,
            vec![0.0; 11].into(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("up_proj") && err.contains("[3, 4]"), "{err}");
    }
}
