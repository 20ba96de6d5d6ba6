//! Double quantization of the absmax values, as `quantize_4bit(compress_statistics=True)`:
//! `offset = absmax.mean()` (PyTorch CUDA order), then `absmax - offset` quantized blockwise
//! with the signed dynamic 8-bit code.

use super::codes::dynamic_code_signed;
use super::dynamic8::{dequantize_blockwise_8bit, quantize_blockwise_8bit};
use super::state::DoubleQuant;
use super::torch_mean::torch_cuda_mean;

/// Double-quantizes `absmax` with nested blocks of `nested_blocksize` values.
pub(crate) fn quantize_absmax(absmax: &[f32], nested_blocksize: usize) -> DoubleQuant {
    let offset = torch_cuda_mean(absmax);
    // A separate torch op: IEEE f32 subtraction, no flush-to-zero.
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) =
        quantize_blockwise_8bit(&centred, dynamic_code_signed(), nested_blocksize);
    DoubleQuant {
        codes,
        nested_absmax,
        offset,
        nested_blocksize,
    }
}

/// The per-block scales back: `code[q] * nested_absmax` (CUDA kernel, flush-to-zero), then
/// `+ offset` (a torch op, IEEE).
pub(crate) fn dequantize_absmax(dq: &DoubleQuant) -> Vec<f32> {
    let mut values = dequantize_blockwise_8bit(
        &dq.codes,
        &dq.nested_absmax,
        dynamic_code_signed(),
        dq.nested_blocksize.max(1),
    );
    for v in &mut values {
        *v += dq.offset;
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absmax_survives_double_quantization_closely() {
        let absmax: Vec<f32> = (0..1000)
            .map(|i| 0.5 + ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let dq = quantize_absmax(&absmax, 256);
        assert_eq!(dq.codes.len(), 1000);
        assert_eq!(dq.nested_absmax.len(), 4);
        let back = dequantize_absmax(&dq);
        for (a, b) in absmax.iter().zip(&back) {
            // Half the widest gap of the dynamic code (0.0140625) times the nested scale (< 0.51).
            assert!((a - b).abs() <= 0.0036, "{a} vs {b}");
        }
    }
}
