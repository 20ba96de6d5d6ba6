//! A decode step's attention (`ptx/attention.cu`, `attention_decode_fused_d*`): RoPE of the new
//! row, its cache write and the split-key attention with the combine folded in, one kernel, at
//! a few cache lengths of a batch-1 generation. The caches are rotated through copies larger
//! than the L2 cache: in a decode step the layers' weights have pushed them out of L2 by the
//! time a layer comes back to them. Bytes count the cached K and V rows read once, the new
//! row's q, k and v, the output and the cache row written.

use super::{copies_for, random_bf16, time, timing};
use crate::backend::cuda::attention::{
    attention_decode, decode_scratch_len, DecodeCache, DecodePosition, DecodeRow, DecodeScratch,
};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::cli::bench_kernels::report::KernelBench;
use crate::cli::selftest::harness::{SplitMix64, Timing};
use crate::error::Result;
use crate::model::gpu::attention_shape;

/// Cached keys (S = position + 1) of the timed steps: the side-by-side's generation (32 prompt
/// tokens + 128 new ones) ends at 160; 512 is the last length with one 32-key split a CTA;
/// 2048 is a long chat's context, 8192 a long document's.
const CACHE_LENGTHS: [usize; 4] = [160, 512, 2048, 8192];

/// One row per cache length in [`CACHE_LENGTHS`].
pub(super) fn rows(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    bench: &KernelBench,
) -> Result<Vec<Timing>> {
    let c = &bench.config;
    let shape = attention_shape(c);
    let (q_width, kv_width, half) = (shape.q_width(), shape.kv_width(), c.head_dim / 2);
    let q = random_bf16(gpu, rng, "timed decode q", q_width)?;
    let k = random_bf16(gpu, rng, "timed decode k", kv_width)?;
    let v = random_bf16(gpu, rng, "timed decode v", kv_width)?;
    let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed decode out", q_width)?;
    let mut lse = GpuBuffer::<f32>::zeroed(gpu, "timed decode lse", shape.heads)?;
    let mut arrivals = GpuBuffer::<u32>::zeroed(gpu, "timed decode arrivals", shape.heads)?;
    let mut timings = Vec::new();
    for s in CACHE_LENGTHS {
        let pos = s - 1;
        // Angles of any values: the kernel reads the row at pos.
        let cos = GpuBuffer::from_host(gpu, "timed decode cos", &vec![0.6f32; s * half])?;
        let sin = GpuBuffer::from_host(gpu, "timed decode sin", &vec![0.8f32; s * half])?;
        let cache_bytes = 2 * 2 * s * kv_width;
        let copies = copies_for(cache_bytes);
        let mut caches = (0..copies)
            .map(|_| {
                Ok((
                    random_bf16(gpu, rng, "timed decode keys", s * kv_width)?,
                    random_bf16(gpu, rng, "timed decode values", s * kv_width)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut partials =
            GpuBuffer::<f32>::zeroed(gpu, "timed decode partials", decode_scratch_len(s, shape))?;
        let ms = time(gpu, |i| {
            let (keys, values) = &mut caches[i % copies];
            attention_decode(
                gpu,
                DecodeRow {
                    q: &q,
                    k: &k,
                    v: &v,
                },
                DecodeCache {
                    keys,
                    values,
                    cos: &cos,
                    sin: &sin,
                },
                DecodePosition::At(pos),
                (&mut out, &mut lse),
                shape,
                DecodeScratch {
                    partials: &mut partials,
                    arrivals: &mut arrivals,
                },
            )
        })?;
        // Scores and the weighted sum: 2 FLOPs a multiply-add, H·D of each a key.
        let flops = 4.0 * (s * q_width) as f64;
        timings.push(timing(
            "attention decode step (fused)",
            &format!(
                "S{s} H{} KV{} D{}",
                shape.heads, shape.kv_heads, shape.head_dim
            ),
            ms,
            cache_bytes + 2 * (2 * q_width + 4 * kv_width) + 4 * shape.heads,
            flops,
        ));
    }
    Ok(timings)
}
