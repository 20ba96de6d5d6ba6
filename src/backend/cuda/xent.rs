//! Cross-entropy on the GPU: the per-row loss of a chunk of logits and, in place, its gradient
//! `(softmax - onehot) * scale` (kernels in `ptx/xent.cu`; the oracle is the math of the CPU
//! training pass's loss head).

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, rows_of, to_i64, MAX_GRID_X};
use crate::error::{Error, Result};
use cust::launch;
use cust::memory::DeviceCopy;

const MODULE: &str = "xent";
/// Threads per CTA (`XENT_THREADS` in ptx/xent.cu).
const THREADS: u32 = 512;
/// The label of positions that are not scored (PyTorch's ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// Labels of a chunk of rows on the GPU, each checked at upload to be a token id below the
/// vocabulary size or [`IGNORE_INDEX`].
pub struct GpuLabels {
    labels: GpuBuffer<i32>,
    vocab: usize,
}

impl GpuLabels {
    /// Validates `labels` against `vocab` and copies them to the GPU.
    pub fn upload(device: &CudaDevice, labels: &[i64], vocab: usize) -> Result<Self> {
        let narrow = checked_labels(labels, vocab)?;
        Ok(GpuLabels {
            labels: GpuBuffer::from_host(device, "labels", &narrow)?,
            vocab,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The labels as the kernel's i32, each a token id below `vocab` or [`IGNORE_INDEX`].
fn checked_labels(labels: &[i64], vocab: usize) -> Result<Vec<i32>> {
    labels
        .iter()
        .enumerate()
        .map(|(row, &label)| {
            let valid = label == IGNORE_INDEX || (label >= 0 && (label as u64) < vocab as u64);
            i32::try_from(label).ok().filter(|_| valid).ok_or_else(|| {
                Error::invalid(format!(
                    "label {label} of row {row} is neither a token id below the vocabulary size \
                     {vocab} nor the ignore index {IGNORE_INDEX}"
                ))
            })
        })
        .collect()
}

/// Queues the cross-entropy of `logits (rows, V)` f32 against `labels`: `losses (rows)` f32 gets
/// each row's loss (0 for ignored rows) and `logits` becomes the gradient times `scale`.
pub fn cross_entropy_f32(
    device: &CudaDevice,
    logits: &mut GpuBuffer<f32>,
    labels: &GpuLabels,
    scale: f32,
    losses: &mut GpuBuffer<f32>,
) -> Result<()> {
    launch_xent(device, "cross_entropy_f32", logits, labels, scale, losses)
}

/// As [`cross_entropy_f32`], with `logits` (and the gradient written over them) in bf16.
pub fn cross_entropy_bf16(
    device: &CudaDevice,
    logits: &mut GpuBuffer<u16>,
    labels: &GpuLabels,
    scale: f32,
    losses: &mut GpuBuffer<f32>,
) -> Result<()> {
    launch_xent(device, "cross_entropy_bf16", logits, labels, scale, losses)
}

fn launch_xent<T: DeviceCopy>(
    device: &CudaDevice,
    kernel_name: &str,
    logits: &mut GpuBuffer<T>,
    labels: &GpuLabels,
    scale: f32,
    losses: &mut GpuBuffer<f32>,
) -> Result<()> {
    let vocab = labels.vocab;
    let rows = rows_of("cross-entropy logits", logits.len(), vocab)?;
    check_len("cross-entropy labels", labels.len(), rows)?;
    check_len("cross-entropy losses", losses.len(), rows)?;
    let grid = grid_dim(rows, MAX_GRID_X, "cross-entropy")?;
    let (rows_i, vocab_i) = (to_i64(rows, "rows")?, to_i64(vocab, "vocabulary size")?);
    let kernel = device.function(MODULE, kernel_name)?;
    let stream = device.stream();
    let (z, y, l) = (
        logits.device_ptr(),
        labels.labels.device_ptr(),
        losses.device_ptr(),
    );
    // SAFETY: the arguments match cross_entropy_{f32,bf16} in ptx/xent.cu (T is f32 or the u16
    // bits of bf16, chosen by the public wrappers); logits hold rows * vocab elements, labels and
    // losses rows (checked above); one CTA per row, and the kernel bounds-checks each label.
    unsafe { launch!(kernel<<<grid, THREADS, 0, stream>>>(z, y, rows_i, vocab_i, scale, l)) }
        .or_device(|| format!("launching {kernel_name} ({rows} x {vocab})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_token_ids_or_the_ignore_index() {
        assert_eq!(checked_labels(&[0, 4, -100], 5).unwrap(), vec![0, 4, -100]);
        let msg = checked_labels(&[0, 5], 5).unwrap_err().to_string();
        assert!(msg.contains("label 5 of row 1"), "{msg}");
        assert!(checked_labels(&[-1], 5).is_err());
        assert!(checked_labels(&[1 << 40], usize::MAX).is_err());
    }
}
