//! Matrix-vector product with a 4-bit weight, for decoding: `y = W x` reading only the packed
//! codes and one scale per block, never a dequantized copy of W.
//!
//! The codes of a row alternate between even elements (high nibbles) and odd elements (low
//! nibbles), so x is split once into its even and odd halves and each nibble stream meets its
//! half directly. With AVX2 + FMA, eight codes at a time are widened to 32-bit indices and
//! looked up in the 16-entry table held in two registers (`vpermps` on each half, a blend on
//! the index's bit 3); each block's partial sum is scaled by its absmax once.

use rayon::prelude::*;

/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// True when [`gemv_4bit`] can take a weight of `cols` columns in blocks of `blocksize`: every
/// row starts on a block boundary and a block is whole groups of 16 codes.
pub fn gemv_4bit_supported(cols: usize, blocksize: usize) -> bool {
    blocksize % 16 == 0 && cols % blocksize == 0
}

/// `y (rows) = W (rows, cols) · x (cols)` for W as packed 4-bit codes (row-major, first element
/// of a pair in the high nibble), one f32 scale per block of `blocksize`, and the 16-entry code
/// `table`. Panics unless [`gemv_4bit_supported`] and the slices match the shape.
pub fn gemv_4bit(
    packed: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let rows = y.len();
    assert!(
        gemv_4bit_supported(cols, blocksize),
        "gemv_4bit: cols {cols} / blocksize {blocksize} unsupported"
    );
    assert!(
        packed.len() >= rows * cols / 2
            && absmax.len() >= rows * cols / blocksize
            && x.len() == cols,
        "gemv_4bit: shapes"
    );
    let x_even: Vec<f32> = x.iter().step_by(2).copied().collect(); // (cols/2)
    let x_odd: Vec<f32> = x.iter().skip(1).step_by(2).copied().collect(); // (cols/2)
    let row_dot = select_row_dot();
    let blocks = cols / blocksize;
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, ys)| {
            for (r, out) in ys.iter_mut().enumerate() {
                let j = task * ROWS_PER_TASK + r;
                let codes = &packed[j * cols / 2..(j + 1) * cols / 2];
                *out = row_dot(
                    codes,
                    &absmax[j * blocks..(j + 1) * blocks],
                    table,
                    blocksize,
                    &x_even,
                    &x_odd,
                );
            }
        });
}

/// One row: Σ over blocks of absmax · Σ code·x.
type RowDot = fn(&[u8], &[f32], &[f32; 16], usize, &[f32], &[f32]) -> f32;

fn select_row_dot() -> RowDot {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return row_dot_avx2_entry;
        }
    }
    row_dot_scalar
}

/// Portable row kernel; also the reference for the SIMD one.
fn row_dot_scalar(
    codes: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    x_even: &[f32],
    x_odd: &[f32],
) -> f32 {
    let half = blocksize / 2;
    let mut total = 0.0f32;
    for (b, &scale) in absmax.iter().enumerate() {
        let mut acc = 0.0f32;
        for i in b * half..(b + 1) * half {
            let byte = codes[i];
            acc += table[usize::from(byte >> 4)] * x_even[i]
                + table[usize::from(byte & 0x0f)] * x_odd[i];
        }
        total += acc * scale;
    }
    total
}

#[cfg(target_arch = "x86_64")]
fn row_dot_avx2_entry(
    codes: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    x_even: &[f32],
    x_odd: &[f32],
) -> f32 {
    let half = blocksize / 2;
    assert!(
        codes.len() >= absmax.len() * half
            && x_even.len() >= codes.len()
            && x_odd.len() >= codes.len()
            && half % 8 == 0
    );
    // SAFETY: selected only after AVX2 and FMA were detected; the assertion bounds every load
    // (8 codes and 8 + 8 values of x per step, within `absmax.len() * half` elements).
    unsafe { row_dot_avx2(codes, absmax, table, half, x_even, x_odd) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(
    codes: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    half: usize,
    x_even: &[f32],
    x_odd: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let tab_lo = _mm256_loadu_ps(table.as_ptr());
    let tab_hi = _mm256_loadu_ps(table.as_ptr().add(8));
    let low_nibble = _mm256_set1_epi32(0x0f);
    // Code value of each of eight 4-bit indices.
    let lookup = |idx: __m256i| {
        let lo = _mm256_permutevar8x32_ps(tab_lo, idx);
        let hi = _mm256_permutevar8x32_ps(tab_hi, idx);
        _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
    };
    let mut total = _mm256_setzero_ps();
    for (b, &scale) in absmax.iter().enumerate() {
        let mut acc = _mm256_setzero_ps();
        let mut i = b * half;
        while i < (b + 1) * half {
            let bytes =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
            let even = lookup(_mm256_srli_epi32(bytes, 4));
            let odd = lookup(_mm256_and_si256(bytes, low_nibble));
            acc = _mm256_fmadd_ps(even, _mm256_loadu_ps(x_even.as_ptr().add(i)), acc);
            acc = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x_odd.as_ptr().add(i)), acc);
            i += 8;
        }
        total = _mm256_fmadd_ps(acc, _mm256_set1_ps(scale), total);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{code_table, dequantize_4bit_f32, quantize_4bit_f32, QuantType};
    use crate::rng::Rng;
    use crate::tensor::DType;

    #[test]
    fn matches_dequantize_then_dot() {
        let mut rng = Rng::new(9);
        for &(rows, cols, bs) in &[(3, 64, 64), (37, 576, 64), (5, 1536, 128), (2, 256, 256)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let q =
                quantize_4bit_f32(&w, &[rows, cols], DType::F32, QuantType::Nf4, bs, true).unwrap();
            let mut dense = vec![0.0f32; rows * cols];
            dequantize_4bit_f32(&q.packed, &q.state, &mut dense).unwrap();
            let x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
            let mut y = vec![0.0f32; rows];
            gemv_4bit(
                &q.packed,
                &q.state.absmax_f32(),
                code_table(QuantType::Nf4),
                bs,
                cols,
                &x,
                &mut y,
            );
            for (j, &got) in y.iter().enumerate() {
                let want: f64 = (0..cols)
                    .map(|i| dense[j * cols + i] as f64 * x[i] as f64)
                    .sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (cols as f64).sqrt(),
                    "({rows},{cols},{bs}) row {j}: {got} vs {want}"
                );
            }
            // The portable kernel agrees too.
            let (xe, xo): (Vec<f32>, Vec<f32>) = (
                x.iter().step_by(2).copied().collect(),
                x.iter().skip(1).step_by(2).copied().collect(),
            );
            let blocks = cols / bs;
            let s = row_dot_scalar(
                &q.packed[..cols / 2],
                &q.state.absmax_f32()[..blocks],
                code_table(QuantType::Nf4),
                bs,
                &xe,
                &xo,
            );
            assert!((s - y[0]).abs() <= 1e-4 * s.abs().max(1.0));
        }
    }
}
