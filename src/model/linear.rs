//! The linear layers of the decoder (q, k, v, o, gate, up, down and lm_head): `y = x W^T`
//! with W of shape (out, in), no bias, plus an optional LoRA adapter beside it.
//!
//! The weight is dense f32 or NF4/FP4 (packed codes and one f32 scale per block, the double
//! quantized scales decoded once at load). Products over many rows dequantize the whole
//! weight and run the tiled [`matmul_nt`]; a single row (decoding) walks the weight one output
//! row at a time through `weight_row`, which decodes only that row, so the 4-bit codes are
//! all that is read from memory.

use crate::backend::cpu::{axpy, dot};
use crate::backend::gemm::{matmul_nt, transpose};
use crate::backend::gemv_4bit::{gemv_4bit, gemv_4bit_supported};
use crate::error::{Error, Result};
use crate::model::lora::LoraPair;
use crate::quant::{code_table, dequantize_range_f32, quantize_4bit_f32, QuantState, QuantType};
use crate::tensor::DType;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

/// Output rows handed to one rayon task in the row-wise paths.
const ROWS_PER_TASK: usize = 16;
/// Rows of input from which the dequantize-then-GEMM paths pay off.
const GEMM_MIN_ROWS: usize = 2;
/// Rows of upstream gradient from which transposing W for the GEMM pays off.
const GEMM_MIN_ROWS_BACKWARD: usize = 64;

/// A 4-bit weight: bitsandbytes' packed codes with decoded per-block scales.
struct QuantizedWeight {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    quant_type: QuantType,
    blocksize: usize,
}

/// How the weight is stored.
enum LinearWeight {
    /// Plain f32, row-major (out, in); shared so a tied lm_head can reuse the embedding.
    Dense(Arc<[f32]>),
    /// 4-bit, row-major over the (out, in) weight.
    Quantized(QuantizedWeight),
}

/// A bias-free linear layer with weight W of shape (out, in), and an optional adapter.
pub struct Linear {
    in_features: usize,
    out_features: usize,
    weight: LinearWeight,
    /// The LoRA adapter added to the output, if attached.
    pub(crate) lora: Option<LoraPair>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.weight {
            LinearWeight::Dense(_) => "dense f32".to_string(),
            LinearWeight::Quantized(q) => {
                format!("{} blocksize {}", q.quant_type.name(), q.blocksize)
            }
        };
        let lora = self
            .lora
            .as_ref()
            .map(|l| format!(", LoRA r={}", l.rank))
            .unwrap_or_default();
        write!(
            f,
            "Linear({} -> {}, {kind}{lora})",
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
            lora: None,
        })
    }

    /// A 4-bit layer from packed codes and their quant state (e.g. read from a bitsandbytes
    /// folder); the state's shape must be (out, in).
    pub fn quantized(
        name: &str,
        out_features: usize,
        in_features: usize,
        packed: Vec<u8>,
        state: &QuantState,
    ) -> Result<Self> {
        if state.shape != [out_features, in_features] {
            return Err(Error::invalid(format!(
                "{name}: quantized shape {:?} differs from the expected [{out_features}, {in_features}]",
                state.shape
            )));
        }
        state
            .validate(packed.len())
            .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        let weight = QuantizedWeight {
            packed,
            absmax: state.absmax_f32(),
            quant_type: state.quant_type,
            blocksize: state.blocksize,
        };
        Ok(Linear {
            in_features,
            out_features,
            weight: LinearWeight::Quantized(weight),
            lora: None,
        })
    }

    /// Quantizes a dense (out, in) weight to NF4 as QLoRA does (blocksize 64, double quant).
    /// `dtype` is the dtype the values were stored in.
    pub fn nf4_from_dense(
        name: &str,
        out_features: usize,
        in_features: usize,
        weight: &[f32],
        dtype: DType,
    ) -> Result<Self> {
        let q = quantize_4bit_f32(
            weight,
            &[out_features, in_features],
            dtype,
            QuantType::Nf4,
            64,
            true,
        )
        .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        Self::quantized(name, out_features, in_features, q.packed, &q.state)
    }

    /// Input width, `in`.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width, `out`.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// A 4-bit weight's parts (packed codes, decoded per-block scales, code type, blocksize),
    /// for uploading it to a device or sizing it there; `None` for a dense weight.
    pub(crate) fn quantized_parts(&self) -> Option<(&[u8], &[f32], QuantType, usize)> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized(q) => Some((&q.packed, &q.absmax, q.quant_type, q.blocksize)),
        }
    }

    /// The whole weight as f32 (out, in): borrowed when dense, decoded when quantized.
    pub fn weight_f32(&self) -> Cow<'_, [f32]> {
        match &self.weight {
            LinearWeight::Dense(w) => Cow::Borrowed(w),
            LinearWeight::Quantized(q) => {
                let mut out = vec![0f32; self.out_features * self.in_features];
                let chunk = q.blocksize * 256;
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(i, block)| {
                        dequantize_range_f32(
                            &q.packed,
                            &q.absmax,
                            q.quant_type,
                            q.blocksize,
                            i * chunk,
                            block,
                        );
                    });
                Cow::Owned(out)
            }
        }
    }

    /// Row `j` of W as `in` f32 values: borrowed for a dense weight; a quantized weight decodes
    /// the blocks covering the row into `scratch` and returns the row's part.
    fn weight_row<'a>(&'a self, j: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let n = self.in_features;
        match &self.weight {
            LinearWeight::Dense(w) => &w[j * n..(j + 1) * n],
            LinearWeight::Quantized(q) => {
                let (start, end) = (j * n, (j + 1) * n);
                let first = start / q.blocksize * q.blocksize;
                let last = (end.div_ceil(q.blocksize) * q.blocksize).min(self.out_features * n);
                scratch.resize(last - first, 0.0);
                dequantize_range_f32(
                    &q.packed,
                    &q.absmax,
                    q.quant_type,
                    q.blocksize,
                    first,
                    scratch,
                );
                &scratch[start - first..end - first]
            }
        }
    }

    /// `out = x W^T + adapter(x)` (no dropout: inference).
    pub fn forward(
        &self,
        x: &[f32],       // (N, in)
        out: &mut [f32], // (N, out)
    ) {
        self.forward_base(x, out);
        if let Some(lora) = &self.lora {
            let n = x.len() / self.in_features;
            let mut no_dropout = crate::rng::Rng::new(0);
            lora.forward(x, out, n, 0.0, &mut no_dropout);
        }
    }

    /// `out = x W^T`, the frozen weight alone. Panics if the slices are not (N, in) and
    /// (N, out) for one N.
    pub fn forward_base(
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
        if n >= GEMM_MIN_ROWS {
            let w = self.weight_f32();
            matmul_nt(x, &w, n, self.out_features, self.in_features, out, false);
            return;
        }
        if let LinearWeight::Quantized(q) = &self.weight {
            if gemv_4bit_supported(self.in_features, q.blocksize) {
                gemv_4bit(
                    &q.packed,
                    &q.absmax,
                    code_table(q.quant_type),
                    q.blocksize,
                    self.in_features,
                    x,
                    out,
                );
                return;
            }
        }
        // One row: (1, out) is also (out, 1); each task decodes and dots its weight rows.
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each_init(
            Vec::new,
            |scratch, (block, out_rows)| {
                for (r, y) in out_rows.iter_mut().enumerate() {
                    *y = dot(x, self.weight_row(block * ROWS_PER_TASK + r, scratch));
                }
            },
        );
    }

    /// The input gradient `dx = dy W` (for a frozen weight). Panics if the slices are not
    /// (N, out) and (N, in) for one N.
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
        if n >= GEMM_MIN_ROWS_BACKWARD {
            // dx = dy · (Wᵀ)ᵀ with Wᵀ (in, out) row-major.
            let w = self.weight_f32();
            let mut w_t = vec![0f32; w.len()];
            transpose(&w, self.out_features, self.in_features, &mut w_t);
            matmul_nt(dy, &w_t, n, self.in_features, self.out_features, dx, false);
            return;
        }
        // Few rows: each group of dx rows reads every weight row once.
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
