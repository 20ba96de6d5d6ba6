//! Dense f32 matrix products for the CPU backend.
//!
//! One primitive, `out (N, M) = a (N, K) · b (M, K)ᵀ`: both operands row-major with K
//! contiguous, so every output element is a dot product of two contiguous rows. A linear layer
//! is exactly this (`y = x Wᵀ`, W stored (out, in) as PyTorch does); the other products of
//! training are brought to this form by transposing the smaller operand.
//!
//! The inner kernel computes a 2 x 4 tile of dot products with eight 8-wide FMA accumulators
//! (AVX2 + FMA, detected at run time), with a portable scalar kernel as fallback and as the
//! reference in tests. Work is split across rayon threads by output rows, or by output columns
//! when there are few rows (decoding).

use rayon::prelude::*;

/// Rows of `a` per kernel tile.
const MR: usize = 2;
/// Rows of `b` per kernel tile.
const NR: usize = 4;

/// `out (n, m) = a (n, k) · b (m, k)ᵀ`, or `out += ...` when `accumulate`.
///
/// Panics if a slice is shorter than its shape says (a caller bug, not user input).
pub fn matmul_nt(
    a: &[f32],
    b: &[f32],
    n: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(
        a.len() >= n * k && b.len() >= m * k && out.len() >= n * m,
        "matmul_nt: slice shorter than its shape"
    );
    if n == 0 || m == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if n >= 4 * threads || m < 64 {
        // Split by rows of the output: each task owns whole rows.
        let rows_per_task = n.div_ceil(threads * 4).max(MR);
        out[..n * m]
            .par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(t, out_rows)| {
                let r0 = t * rows_per_task;
                let rows = out_rows.len() / m;
                tile_loop(
                    &a[r0 * k..(r0 + rows) * k],
                    b,
                    rows,
                    m,
                    k,
                    out_rows,
                    m,
                    accumulate,
                );
            });
    } else {
        // Few rows (decoding): split by columns. Each task writes a column band of every row,
        // staged in its own buffer and copied out, so no two tasks share an output slice.
        let cols_per_task = m.div_ceil(threads * 4).next_multiple_of(NR);
        let bands: Vec<(usize, Vec<f32>)> = (0..m)
            .step_by(cols_per_task)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| {
                let cols = cols_per_task.min(m - c0);
                let mut band = vec![0.0f32; n * cols];
                if accumulate {
                    for r in 0..n {
                        band[r * cols..(r + 1) * cols]
                            .copy_from_slice(&out[r * m + c0..r * m + c0 + cols]);
                    }
                }
                tile_loop(
                    a,
                    &b[c0 * k..(c0 + cols) * k],
                    n,
                    cols,
                    k,
                    &mut band,
                    cols,
                    accumulate,
                );
                (c0, band)
            })
            .collect();
        for (c0, band) in bands {
            let cols = band.len() / n;
            for r in 0..n {
                out[r * m + c0..r * m + c0 + cols].copy_from_slice(&band[r * cols..(r + 1) * cols]);
            }
        }
    }
}

/// Serial tiling over an (n, m) output block with row stride `ldo`.
#[allow(clippy::too_many_arguments)]
fn tile_loop(
    a: &[f32],
    b: &[f32],
    n: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
    ldo: usize,
    accumulate: bool,
) {
    let kernel = select_kernel();
    let mut tile = [0.0f32; MR * NR];
    for j0 in (0..m).step_by(NR) {
        let nb = NR.min(m - j0);
        for i0 in (0..n).step_by(MR) {
            let na = MR.min(n - i0);
            kernel(&a[i0 * k..], na, &b[j0 * k..], nb, k, &mut tile);
            for i in 0..na {
                let row = &mut out[(i0 + i) * ldo + j0..(i0 + i) * ldo + j0 + nb];
                for (j, o) in row.iter_mut().enumerate() {
                    let v = tile[i * NR + j];
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }
    }
}

/// A tile kernel: dot products of `na` rows of `a` with `nb` rows of `b`, each of length `k`,
/// into `tile[i * NR + j]`.
type TileKernel = fn(&[f32], usize, &[f32], usize, usize, &mut [f32; MR * NR]);

fn select_kernel() -> TileKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return tile_avx2_entry;
        }
    }
    tile_scalar
}

/// Portable kernel; also the reference for the SIMD one.
fn tile_scalar(a: &[f32], na: usize, b: &[f32], nb: usize, k: usize, tile: &mut [f32; MR * NR]) {
    for i in 0..MR {
        for j in 0..NR {
            tile[i * NR + j] = if i < na && j < nb {
                let (x, y) = (&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                // Eight partial sums, as the SIMD kernel keeps, so both round alike.
                let mut acc = [0.0f32; 8];
                let full = k / 8 * 8;
                for c in (0..full).step_by(8) {
                    for l in 0..8 {
                        acc[l] += x[c + l] * y[c + l];
                    }
                }
                let mut s = acc.iter().sum::<f32>();
                for c in full..k {
                    s += x[c] * y[c];
                }
                s
            } else {
                0.0
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx2_entry(
    a: &[f32],
    na: usize,
    b: &[f32],
    nb: usize,
    k: usize,
    tile: &mut [f32; MR * NR],
) {
    assert!(
        a.len() >= na * k && b.len() >= nb * k,
        "tile kernel: slices shorter than the tile"
    );
    // SAFETY: this entry is selected only after `is_x86_feature_detected!` confirmed AVX2 and
    // FMA, and the assertion above guarantees every row the kernel reads lies inside a and b.
    unsafe { tile_avx2(a, na, b, nb, k, tile) }
}

/// AVX2 + FMA kernel. Rows past `na`/`nb` are replaced by row 0 (valid memory) and their
/// results discarded.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    a: &[f32],
    na: usize,
    b: &[f32],
    nb: usize,
    k: usize,
    tile: &mut [f32; MR * NR],
) {
    use std::arch::x86_64::*;
    let arow = |i: usize| a.as_ptr().add(if i < na { i * k } else { 0 });
    let brow = |j: usize| b.as_ptr().add(if j < nb { j * k } else { 0 });
    let (a0, a1) = (arow(0), arow(1));
    let (b0, b1, b2, b3) = (brow(0), brow(1), brow(2), brow(3));
    let mut acc = [_mm256_setzero_ps(); MR * NR];
    let full = k / 8 * 8;
    let mut c = 0;
    while c < full {
        let x0 = _mm256_loadu_ps(a0.add(c));
        let x1 = _mm256_loadu_ps(a1.add(c));
        let y0 = _mm256_loadu_ps(b0.add(c));
        let y1 = _mm256_loadu_ps(b1.add(c));
        let y2 = _mm256_loadu_ps(b2.add(c));
        let y3 = _mm256_loadu_ps(b3.add(c));
        acc[0] = _mm256_fmadd_ps(x0, y0, acc[0]);
        acc[1] = _mm256_fmadd_ps(x0, y1, acc[1]);
        acc[2] = _mm256_fmadd_ps(x0, y2, acc[2]);
        acc[3] = _mm256_fmadd_ps(x0, y3, acc[3]);
        acc[4] = _mm256_fmadd_ps(x1, y0, acc[4]);
        acc[5] = _mm256_fmadd_ps(x1, y1, acc[5]);
        acc[6] = _mm256_fmadd_ps(x1, y2, acc[6]);
        acc[7] = _mm256_fmadd_ps(x1, y3, acc[7]);
        c += 8;
    }
    let rows = [a0, a1];
    let cols = [b0, b1, b2, b3];
    for i in 0..MR {
        for j in 0..NR {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i * NR + j]);
            let mut s = lanes.iter().sum::<f32>();
            for t in full..k {
                s += *rows[i].add(t) * *cols[j].add(t);
            }
            tile[i * NR + j] = s;
        }
    }
}

/// Transposes `src` (rows, cols) into `dst` (cols, rows).
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose: slice shorter than its shape"
    );
    // Tiles of B x B; each task writes B whole rows of dst (B columns of src), all cores.
    const B: usize = 32;
    if rows * cols == 0 {
        return;
    }
    dst[..rows * cols]
        .par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(block, dst_rows)| {
            let c0 = block * B;
            let c_end = (c0 + B).min(cols);
            for r0 in (0..rows).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    let src_row = &src[r * cols..(r + 1) * cols];
                    for c in c0..c_end {
                        dst_rows[(c - c0) * rows + r] = src_row[c];
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], n: usize, m: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..k)
                    .map(|c| a[i * k + c] as f64 * b[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        let mut rng = Rng::new(7);
        for &(n, m, k) in &[
            (1, 1, 1),
            (1, 300, 77),
            (3, 5, 9),
            (17, 70, 130),
            (64, 65, 576),
            (5, 1000, 33),
            (200, 3, 8),
        ] {
            let a: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let want = naive(&a, &b, n, m, k);
            let mut out = vec![1.0f32; n * m];
            matmul_nt(&a, &b, n, m, k, &mut out, true);
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (o as f64 - (w + 1.0)).abs() <= 1e-4 * (k as f64).sqrt() * 4.0,
                    "({n},{m},{k}) [{i}]: {o} vs {}",
                    w + 1.0
                );
            }
            matmul_nt(&a, &b, n, m, k, &mut out, false);
            assert!(out
                .iter()
                .zip(&want)
                .all(|(&o, &w)| (o as f64 - w).abs() <= 1e-4 * (k as f64).sqrt() * 4.0));
        }
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        let mut rng = Rng::new(3);
        let k = 203;
        let a: Vec<f32> = (0..MR * k).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..NR * k).map(|_| rng.normal()).collect();
        let (mut t1, mut t2) = ([0.0f32; MR * NR], [0.0f32; MR * NR]);
        tile_scalar(&a, MR, &b, NR, k, &mut t1);
        select_kernel()(&a, MR, &b, NR, k, &mut t2);
        for (x, y) in t1.iter().zip(&t2) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn transpose_round_trips() {
        let src: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let mut t = vec![0.0; src.len()];
        let mut back = vec![0.0; src.len()];
        transpose(&src, 35, 70, &mut t);
        for r in 0..35 {
            for c in 0..70 {
                assert_eq!(t[c * 35 + r], src[r * 70 + c], "({r}, {c})");
            }
        }
        transpose(&t, 70, 35, &mut back);
        assert_eq!(src, back);
    }
}
