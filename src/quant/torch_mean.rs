//! `torch.mean` of a contiguous f32 vector in the exact order PyTorch's CUDA reduction kernel
//! (`aten/src/ATen/native/cuda/Reduce.cuh`, `MeanOps`) adds it up, so that the `offset` of
//! double quantization is bit-identical to what bitsandbytes stores.
//!
//! The launch configuration (`setReduceConfig`) for one output over `n` inputs:
//! - vectorized loads of 4 (`input_vec_size`) when `n >= VECTORIZE_FROM`; `dim0 = n / 4`
//!   (else `dim0 = n`, four accumulators by iteration, `vt0 = 4`);
//! - `block_width = min(last_pow2(dim0), 512)` lanes, one row;
//! - when each lane would see `>= 256` values, the input is split across
//!   `ctas = max(min(sms * (2048 / block_width), ceil(vpt / 16)), ceil(vpt / 256))` thread
//!   blocks whose partial sums are reduced by the last block (`global_reduce`);
//! - each lane adds its vectors into 4 accumulators by position, then the leftover `n % 4`
//!   elements go to lanes `0..n % 4` (first block only); the accumulators combine left to right;
//! - `block_x_reduce`: halving through shared memory down to 32 lanes, then the warp shuffle
//!   tree `v[i] += v[i + offset]` for offsets 1, 2, 4, 8, 16;
//! - the mean is `sum * (1.0f32 / n as f32)`.
//!
//! Verified bit for bit against the 42 double-quantized fixtures (n = 1 to 521, H200). Where
//! the fixtures do not reach: `VECTORIZE_FROM` is known only to lie in 6..=64 (the n = 64
//! fixtures are summed as vectorized; PyTorch sources of earlier versions say `n > 128`), and
//! the multi-block split (n > 130 560) follows the source for a 132-SM device (H100/H200).

/// Number of inputs from which the kernel loads 4-element vectors (see the module docs).
const VECTORIZE_FROM: usize = 64;
/// Elements per vector load (`input_vec_size` for 4-byte types).
const VEC: usize = 4;
/// Independent accumulators per thread (`vt0`).
const VT0: usize = 4;
/// `MAX_NUM_THREADS` of the reduction kernel.
const MAX_THREADS: usize = 512;
/// Warp width.
const WARP: usize = 32;
/// Streaming multiprocessors of the device the fixtures were made on (H200; also H100 SXM).
const NUM_SMS: usize = 132;
/// `maxThreadsPerMultiProcessor` of Hopper.
const MAX_THREADS_PER_SM: usize = 2048;
/// `min_values_per_thread` / `max_values_per_thread` of `setReduceConfig`.
const MIN_VALUES_PER_THREAD: usize = 16;
const MAX_VALUES_PER_THREAD: usize = 256;

/// The mean of `values` as `torch.mean` computes it on a CUDA f32 tensor (see the module
/// docs). NaN for an empty slice, as torch gives.
pub fn torch_cuda_mean(values: &[f32]) -> f32 {
    let n = values.len();
    if n == 0 {
        return f32::NAN;
    }
    let factor = 1.0f32 / n as f32;
    cuda_sum(values) * factor
}

/// Largest power of two not above `n` (at least 1), as ATen's `last_pow2`.
fn last_pow2(n: usize) -> usize {
    if n == 0 {
        1
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// The sum in the kernel's order.
fn cuda_sum(a: &[f32]) -> f32 {
    let n = a.len();
    let vectorized = n >= VECTORIZE_FROM;
    let dim0 = if vectorized { n / VEC } else { n };
    let lanes = if dim0 < MAX_THREADS {
        last_pow2(dim0)
    } else {
        MAX_THREADS
    };
    let values_per_thread = n.div_ceil(lanes);
    let ctas = if values_per_thread >= MAX_VALUES_PER_THREAD {
        let target_grid = NUM_SMS * (MAX_THREADS_PER_SM / lanes);
        let by_min = values_per_thread.div_ceil(MIN_VALUES_PER_THREAD);
        let by_max = values_per_thread.div_ceil(MAX_VALUES_PER_THREAD);
        target_grid.min(by_min).max(by_max)
    } else {
        1
    };
    let mut lane_values = vec![0f32; lanes];
    let mut partials = Vec::with_capacity(ctas);
    for cta in 0..ctas {
        for (lane, slot) in lane_values.iter_mut().enumerate() {
            *slot = if vectorized {
                lane_sum_vectorized(
                    a,
                    lane + cta * lanes,
                    lanes * ctas,
                    cta == 0 && lane < n % VEC,
                )
            } else {
                lane_sum_strided(a, lane + cta * lanes, lanes * ctas)
            };
        }
        partials.push(block_x_reduce(&mut lane_values));
    }
    if ctas == 1 {
        return partials[0];
    }
    // global_reduce: lane t of the last block folds partials t, t + lanes, ... then the block
    // reduces its lanes again.
    for (t, slot) in lane_values.iter_mut().enumerate() {
        let mut v = 0f32;
        for p in partials.iter().skip(t).step_by(lanes) {
            v += p;
        }
        *slot = v;
    }
    block_x_reduce(&mut lane_values)
}

/// One lane of `input_vectorized_thread_reduce_impl`: vectors `first, first + stride, ...`
/// into 4 accumulators by position; `takes_tail` adds element `n - n % 4 + lane`.
fn lane_sum_vectorized(a: &[f32], first: usize, stride: usize, takes_tail: bool) -> f32 {
    let n = a.len();
    let mut acc = [0f32; VEC];
    let mut v = first;
    while v * VEC + VEC - 1 < n {
        for (i, slot) in acc.iter_mut().enumerate() {
            *slot += a[v * VEC + i];
        }
        v += stride;
    }
    if takes_tail {
        let lane = first % stride;
        acc[0] += a[n - n % VEC + lane];
    }
    combine(acc)
}

/// One lane of `thread_reduce_impl`: elements `first + k * stride`, the k-th into accumulator
/// `k % 4` (in rounds of four, then the leftovers in order).
fn lane_sum_strided(a: &[f32], first: usize, stride: usize) -> f32 {
    let n = a.len();
    let mut acc = [0f32; VT0];
    let mut idx = first;
    while idx + (VT0 - 1) * stride < n {
        for (i, slot) in acc.iter_mut().enumerate() {
            *slot += a[idx + i * stride];
        }
        idx += VT0 * stride;
    }
    for slot in acc.iter_mut() {
        if idx >= n {
            break;
        }
        *slot += a[idx];
        idx += stride;
    }
    combine(acc)
}

/// `((a0 + a1) + a2) + a3`.
fn combine(acc: [f32; 4]) -> f32 {
    acc[1..].iter().fold(acc[0], |s, &v| s + v)
}

/// `block_x_reduce` over a power-of-two number of lanes; returns lane 0's value.
fn block_x_reduce(lanes: &mut [f32]) -> f32 {
    let mut width = lanes.len();
    while width > WARP {
        let half = width / 2;
        for i in 0..half {
            lanes[i] += lanes[i + half];
        }
        width = half;
    }
    // Warp shuffle down: lane i adds lane i + offset (lanes past the end keep their value and
    // never reach lane 0).
    let mut offset = 1;
    while offset < width {
        for i in 0..width - offset {
            lanes[i] += lanes[i + offset];
        }
        offset <<= 1;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_means_are_exact_where_order_cannot_matter() {
        assert_eq!(torch_cuda_mean(&[3.0]), 3.0);
        assert_eq!(torch_cuda_mean(&[1.0, 2.0, 3.0, 6.0]), 3.0);
        assert!(torch_cuda_mean(&[]).is_nan());
        let ones = vec![1.0f32; 1_000_003];
        assert_eq!(torch_cuda_mean(&ones), 1.0);
    }

    #[test]
    fn every_element_is_summed_once() {
        // Distinct powers of two sum exactly in any order, so a lost or doubled element shows.
        for n in [
            1usize, 5, 63, 64, 127, 128, 129, 521, 2047, 2048, 2051, 140_000, 300_001,
        ] {
            let values: Vec<f32> = (0..n).map(|i| if i % 7 == 0 { 2.0 } else { 1.0 }).collect();
            let expect: f64 = values.iter().map(|&v| v as f64).sum();
            assert_eq!(cuda_sum(&values) as f64, expect, "n = {n}");
        }
    }

    #[test]
    fn last_pow2_matches_aten() {
        assert_eq!(last_pow2(0), 1);
        assert_eq!(last_pow2(1), 1);
        assert_eq!(last_pow2(5), 4);
        assert_eq!(last_pow2(64), 64);
        assert_eq!(last_pow2(130), 128);
    }
}
