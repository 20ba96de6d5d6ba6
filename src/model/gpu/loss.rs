//! The loss head on the GPU: final RMSNorm, the lm_head over chunks of scored rows (bf16
//! logits, f32 accumulation), cross-entropy with its gradient in place, and
//! `dX = dlogits · W_lm` scattered back to the scored positions: the device version of
//! `loss_head` in `model::train_pass`.

use super::weights::GpuHead;
use super::workspace::{Scratch, Workspace};
use crate::backend::cuda::elementwise::{
    gather_rows, residual_add, scatter_rows, to_bf16, zero_bf16, zero_f32, RowIndex,
};
use crate::backend::cuda::matmul::{matmul_nn_bf16, matmul_nt_bf16, GemmShape};
use crate::backend::cuda::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::backend::cuda::xent::{cross_entropy_bf16, GpuLabels};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::data::IGNORE_INDEX;
use crate::error::Result;
use crate::model::config::LlamaConfig;
use crate::model::train_pass::LossSum;

/// The bf16 logits of one chunk of scored rows take at most this many bytes (or
/// [`MIN_LOSS_ROWS`] rows, whichever is more).
const LOGITS_BUDGET_BYTES: usize = 128 << 20;
/// The fewest scored rows a chunk forms at once: fewer leave the input gradient's product
/// (rows x hidden over the vocabulary) a handful of CTAs walking all of the vocabulary.
const MIN_LOSS_ROWS: usize = 256;

/// Scored rows whose logits are formed at once for a vocabulary of `vocab`: as many as
/// [`LOGITS_BUDGET_BYTES`] holds, in whole 128-row tiles (`sun bench kernels` times the input
/// gradient's product at this many rows).
pub(crate) fn loss_rows(vocab: usize) -> usize {
    let fit = LOGITS_BUDGET_BYTES / (2 * vocab.max(1));
    (fit / 128 * 128).max(MIN_LOSS_ROWS)
}

/// Positions whose next token is scored: `(position, label)`, position t predicting
/// `labels[t + 1]` (as the CPU's loss head).
fn scored_positions(labels: &[i64]) -> Vec<(usize, i64)> {
    labels
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, &l)| (i - 1, l))
        .collect()
}

/// The gradient the loss head sends into the last layer.
pub(crate) struct HeadGradient<'w> {
    /// d(loss)/d(x) scaled, (T, C) f32: the residual stream's gradient.
    pub(crate) dres: Scratch<'w, f32>,
    /// Its bf16 copy.
    pub(crate) dxb: Scratch<'w, u16>,
}

/// The summed loss over the scored positions of `x (T, C)` f32; with `grad_scale`, also
/// `grad_scale x dloss/dx`.
pub(crate) fn loss_head<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    c: &LlamaConfig,
    head: &GpuHead,
    x: &GpuBuffer<f32>,
    labels: &[i64],
    grad_scale: Option<f32>,
) -> Result<(LossSum, Option<HeadGradient<'w>>)> {
    let (hidden, vocab) = (c.hidden_size, c.vocab_size);
    let t = labels.len();
    let mut xb = ws.bf16.take(device, "final hidden states", t * hidden)?;
    to_bf16(device, x, &mut xb)?;
    let mut normed = ws.bf16.take(device, "final norm", t * hidden)?;
    rmsnorm_forward(device, &mut normed, &xb, &head.norm, c.rms_norm_eps)?;
    // Rows that are not scored get no gradient: the scatter writes only the scored ones.
    let mut dnormed = match grad_scale {
        Some(_) => {
            let mut d = ws.bf16.take(device, "final norm gradient", t * hidden)?;
            zero_bf16(device, &mut d)?;
            Some(d)
        }
        None => None,
    };
    let scored = scored_positions(labels);
    let mut chunk_losses = Vec::new();
    for chunk in scored.chunks(loss_rows(vocab)) {
        let n = chunk.len();
        let positions: Vec<usize> = chunk.iter().map(|&(p, _)| p).collect();
        let chunk_labels: Vec<i64> = chunk.iter().map(|&(_, l)| l).collect();
        let index = RowIndex::upload(device, &positions, t)?;
        let mut rows = ws.bf16.take(device, "scored rows", n * hidden)?;
        gather_rows(device, &normed, &index, hidden, &mut rows)?;
        let mut logits = ws.bf16.take(device, "logits", n * vocab)?;
        let shape = GemmShape {
            m: n,
            n: vocab,
            k: hidden,
        };
        matmul_nt_bf16(device, &rows, &head.weight, &mut logits, shape, 1.0, 0.0)?;
        let gpu_labels = GpuLabels::upload(device, &chunk_labels, vocab)?;
        let mut losses = ws.f32.take(device, "losses", n)?;
        let scale = grad_scale.unwrap_or(0.0);
        cross_entropy_bf16(device, &mut logits, &gpu_labels, scale, &mut losses)?;
        chunk_losses.push(losses);
        if let Some(dnormed) = dnormed.as_mut() {
            // d(rows) = dlogits · W = dlogits · (Wᵀ)ᵀ: (n, V) x (C, V)ᵀ.
            let mut drows = ws.bf16.take(device, "scored rows gradient", n * hidden)?;
            let shape = GemmShape {
                m: n,
                n: hidden,
                k: vocab,
            };
            matmul_nn_bf16(device, &logits, &head.weight, &mut drows, shape, 1.0, 0.0)?;
            scatter_rows(device, &drows, &index, hidden, dnormed)?;
        }
    }
    let mut nll = 0.0f64;
    for losses in &chunk_losses {
        nll += losses
            .to_host(device, "losses")?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
    }
    let loss = LossSum {
        nll,
        tokens: scored.len(),
    };
    let Some(dnormed) = dnormed else {
        return Ok((loss, None));
    };
    let mut dxb = ws.bf16.take(device, "final hidden gradient", t * hidden)?;
    rmsnorm_backward(
        device,
        &mut dxb,
        &dnormed,
        &xb,
        &head.norm,
        c.rms_norm_eps,
        false,
    )?;
    let mut dres = ws.f32.take(device, "residual gradient", t * hidden)?;
    zero_f32(device, &mut dres)?;
    residual_add(device, &mut dres, &dxb, None)?;
    Ok((loss, Some(HeadGradient { dres, dxb })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_chunks_fill_the_logits_budget_in_whole_tiles() {
        // LLaMA (32000): 2048 rows of 64,000 bytes; SmolLM2 (49152): 1280 rows.
        assert_eq!(loss_rows(32000), 2048);
        assert_eq!(loss_rows(49152), 1280);
        // A huge vocabulary still forms at least the minimum.
        assert_eq!(loss_rows(1 << 30), MIN_LOSS_ROWS);
        for vocab in [1, 7, 32000, 128256] {
            let rows = loss_rows(vocab);
            assert!(rows % 128 == 0 && rows >= MIN_LOSS_ROWS);
            assert!(rows == MIN_LOSS_ROWS || 2 * vocab * rows <= LOGITS_BUDGET_BYTES);
        }
    }
}
