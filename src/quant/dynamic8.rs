//! Blockwise 8-bit quantization with a 256-entry code (`kQuantizeBlockwise<General8bit>` and
//! `kDequantizeBlockwise<General8bit>` of bitsandbytes), used for the nested absmax values.

use super::blockwise::block_absmax;
use super::ftz;

/// Quantizes `x` blockwise with `code` (256 sorted values in [-1, 1]): returns one code byte
/// per element and one absmax per block of `blocksize`.
pub(crate) fn quantize_blockwise_8bit(
    x: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let scale = block_absmax(block, block.len() < blocksize);
        absmax.push(scale);
        let inv = ftz::recip(scale);
        codes.extend(
            block
                .iter()
                .map(|&v| encode_dynamic(code, ftz::mul(v, inv))),
        );
    }
    (codes, absmax)
}

/// `code[q] * absmax` for each code, the blocks' products under flush-to-zero.
pub(crate) fn dequantize_blockwise_8bit(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Vec<f32> {
    codes
        .chunks(blocksize)
        .zip(absmax)
        .flat_map(|(block, &scale)| {
            block
                .iter()
                .map(move |&q| ftz::mul(code[q as usize], scale))
        })
        .collect()
}

/// `dQuantize<0>` of bitsandbytes: a 7-step binary search for `x` in the sorted `code`, then
/// the nearer neighbour by comparing with the midpoints.
fn encode_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    // Pivots stay within 0..=255, so the casts below never truncate.
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dynamic_code_signed;

    #[test]
    fn code_values_encode_to_themselves() {
        let code = dynamic_code_signed();
        for (i, &c) in code.iter().enumerate() {
            assert_eq!(encode_dynamic(code, c) as usize, i, "code[{i}] = {c}");
        }
    }

    #[test]
    fn encodes_to_the_nearest_code() {
        let code = dynamic_code_signed();
        let mut x = -1.0f32;
        while x <= 1.0 {
            let q = encode_dynamic(code, x) as usize;
            let err = (code[q] - x).abs();
            let best = code.iter().map(|c| (c - x).abs()).fold(f32::MAX, f32::min);
            assert!(
                err <= best * 1.0001 + 1e-7,
                "x {x}: code {q} err {err} best {best}"
            );
            x += 0.000_731;
        }
    }

    #[test]
    fn round_trip_of_a_short_last_block() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let (codes, absmax) = quantize_blockwise_8bit(&x, dynamic_code_signed(), 256);
        assert_eq!((codes.len(), absmax.len()), (300, 2));
        let back = dequantize_blockwise_8bit(&codes, &absmax, dynamic_code_signed(), 256);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            let scale = absmax[i / 256];
            assert!((a - b).abs() <= 0.0071 * scale, "element {i}: {a} vs {b}");
        }
    }
}
