//! Cross-entropy checks: `cuda::xent` (f32 and bf16 logits) against the loss head's math
//! (`model::train_pass`), written out here in f64: per row max, log-sum-exp, loss = lse - z[y],
//! gradient (softmax - onehot) * scale, and ignored rows (label -100) all zero.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND, F32_BOUND};
use crate::backend::cuda::xent::{self, GpuLabels, IGNORE_INDEX};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;

/// (rows, vocab): one row, LLaMA's 32000, a small odd vocabulary, SmolLM2's 49152.
const SHAPES: [(usize, usize); 4] = [(1, 49152), (3, 32000), (77, 1001), (64, 49152)];

/// Loss and gradient rows for f32 and bf16 logits per shape; about one row in five ignored.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(t, vocab) in &SHAPES {
        let labels: Vec<i64> = (0..t)
            .map(|r| {
                if r % 5 == 4 {
                    IGNORE_INDEX
                } else {
                    rng.below(vocab) as i64
                }
            })
            .collect();
        let scored = labels.iter().filter(|&&l| l >= 0).count().max(1);
        let scale = 1.0 / scored as f32;
        let gpu_labels = GpuLabels::upload(gpu, &labels, vocab)?;
        for use_bf16 in [false, true] {
            let shape = format!("{t}x{vocab}");
            let (bits, logits) = rng.bf16s(t * vocab, -10.0, 10.0);
            let (want_loss, want_grad) = reference(&logits, &labels, vocab, scale);
            let mut losses = GpuBuffer::<f32>::zeroed(gpu, "losses", t)?;
            let got_grad = if use_bf16 {
                let mut z = GpuBuffer::from_host(gpu, "logits", &bits)?;
                xent::cross_entropy_bf16(gpu, &mut z, &gpu_labels, scale, &mut losses)?;
                bf16_to_f32(&z.to_host(gpu, "logits")?)
            } else {
                let mut z = GpuBuffer::from_host(gpu, "logits", &logits)?;
                xent::cross_entropy_f32(gpu, &mut z, &gpu_labels, scale, &mut losses)?;
                z.to_host(gpu, "logits")?
            };
            let got_loss = losses.to_host(gpu, "losses")?;
            let (dtype, grad_bound) = if use_bf16 {
                ("bf16", BF16_BOUND)
            } else {
                ("f32", F32_BOUND)
            };
            rows.push(Row::new(
                format!("xent loss ({dtype} logits) f32"),
                &shape,
                relative_error(&got_loss, &want_loss),
                F32_BOUND,
            ));
            rows.push(Row::new(
                format!("xent grad {dtype}"),
                &shape,
                relative_error(&got_grad, &want_grad),
                grad_bound,
            ));
        }
    }
    // The upload refuses a label outside the vocabulary: 0 when refused, 1 when accepted.
    let refused = GpuLabels::upload(gpu, &[0, 1001], 1001).is_err();
    rows.push(Row::new(
        "xent label >= vocab refused",
        "2x1001",
        if refused { 0.0 } else { 1.0 },
        0.0,
    ));
    Ok(rows)
}

/// The loss head's cross-entropy in f64: (losses (rows), gradient (rows, vocab) * scale).
fn reference(logits: &[f32], labels: &[i64], vocab: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut losses = vec![0.0f32; labels.len()];
    let mut grad = vec![0.0f32; logits.len()];
    for (r, &label) in labels.iter().enumerate() {
        if label < 0 {
            continue;
        }
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&z| f64::from(z - max).exp()).sum();
        let lse = f64::from(max) + sum.ln();
        losses[r] = (lse - f64::from(row[label as usize])) as f32;
        let g = &mut grad[r * vocab..(r + 1) * vocab];
        for (g, &z) in g.iter_mut().zip(row) {
            *g = ((f64::from(z) - lse).exp() as f32) * scale;
        }
        g[label as usize] -= scale;
    }
    (losses, grad)
}
