//! RoPE checks: `cuda::rope` against `cpu::rope_forward` and `cpu_backward::rope_backward`, the
//! forward reading its angles at an offset of a longer table (a KV cache's, by position), and
//! the fused q, k rotation with the KV-cache writes against the kernels it replaces.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cpu::{rope_cos_sin, rope_forward};
use crate::backend::cpu_backward::rope_backward;
use crate::backend::cuda::elementwise::copy_into_at;
use crate::backend::cuda::rope::{rope_qk_into_cache, QkvRows};
use crate::backend::cuda::{rope, CudaDevice, GpuBuffer};
use crate::error::Result;

/// (rows, heads, head_dim): one row, SmolLM2's 9 query / 3 key-value heads of 64, a long
/// chunk at LLaMA-7B's 32 heads of 128, three 16-byte vectors a half head (48), and head
/// widths the vector path does not take (6, 20: the element path).
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 9, 64),
    (3, 3, 64),
    (77, 9, 64),
    (512, 32, 128),
    (3, 5, 48),
    (5, 2, 6),
    (4, 2, 20),
];
const THETA: f32 = 1e5;
/// (rows, heads, kv_heads, head_dim) of the fused rotation + cache write: single rows at
/// SmolLM2's and LLaMA-7B's shapes, a prefill chunk with grouped heads, and a tiny odd head
/// width.
const CACHE_SHAPES: [(usize, usize, usize, usize); 4] = [
    (1, 9, 3, 64),
    (1, 32, 32, 128),
    (7, 32, 8, 128),
    (3, 3, 1, 6),
];

/// Forward and backward per shape, at a random starting position.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(t, heads, d) in &SHAPES {
        let shape = format!("{t}x{heads}x{d}");
        let half = d / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / THETA.powf(2.0 * i as f32 / d as f32))
            .collect();
        let (mut cos, mut sin) = (vec![0.0f32; t * half], vec![0.0f32; t * half]);
        rope_cos_sin(&mut cos, &mut sin, &inv_freq, rng.below(4096));
        let cos_gpu = GpuBuffer::from_host(gpu, "rope cos", &cos)?;
        let sin_gpu = GpuBuffer::from_host(gpu, "rope sin", &sin)?;
        for backward in [false, true] {
            let (bits, mut want) = rng.bf16s(t * heads * d, -2.0, 2.0);
            let mut x = GpuBuffer::from_host(gpu, "rope x", &bits)?;
            if backward {
                rope_backward(&mut want, &cos, &sin, d);
                rope::rope_backward(gpu, &mut x, &cos_gpu, &sin_gpu, d)?;
            } else {
                rope_forward(&mut want, &cos, &sin, d);
                rope::rope_forward(gpu, &mut x, &cos_gpu, &sin_gpu, d)?;
            }
            let got = bf16_to_f32(&x.to_host(gpu, "rope x")?);
            let check = if backward {
                "rope bwd bf16"
            } else {
                "rope fwd bf16"
            };
            rows.push(Row::new(
                check,
                &shape,
                relative_error(&got, &want),
                BF16_BOUND,
            ));
        }
        rows.push(forward_at_check(gpu, rng, (t, heads, d), &inv_freq)?);
    }
    for &shape in &CACHE_SHAPES {
        rows.extend(qk_cache_checks(gpu, rng, shape)?);
    }
    Ok(rows)
}

/// The device state of a fused check: q, k, v and the two caches.
struct CacheCase {
    q: GpuBuffer<u16>,
    k: GpuBuffer<u16>,
    v: GpuBuffer<u16>,
    keys: GpuBuffer<u16>,
    values: GpuBuffer<u16>,
}

impl CacheCase {
    fn upload(gpu: &CudaDevice, host: [&[u16]; 5]) -> Result<Self> {
        let [q, k, v, keys, values] = host;
        Ok(CacheCase {
            q: GpuBuffer::from_host(gpu, "rope q", q)?,
            k: GpuBuffer::from_host(gpu, "rope k", k)?,
            v: GpuBuffer::from_host(gpu, "rope v", v)?,
            keys: GpuBuffer::from_host(gpu, "key cache", keys)?,
            values: GpuBuffer::from_host(gpu, "value cache", values)?,
        })
    }

    fn download(&self, gpu: &CudaDevice) -> Result<[Vec<u16>; 5]> {
        Ok([
            self.q.to_host(gpu, "rope q")?,
            self.k.to_host(gpu, "rope k")?,
            self.v.to_host(gpu, "rope v")?,
            self.keys.to_host(gpu, "key cache")?,
            self.values.to_host(gpu, "value cache")?,
        ])
    }
}

/// `rope_qk_into_cache` at a random position of caches with random contents: every bit of q,
/// k and both caches against `rope_forward_at` twice and `copy_into_at` twice, and the rotated
/// q and cached keys against the CPU's rotation.
fn qk_cache_checks(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    (t, heads, kv_heads, d): (usize, usize, usize, usize),
) -> Result<Vec<Row>> {
    let half = d / 2;
    let (q_dim, kv_dim) = (heads * d, kv_heads * d);
    let pos0 = rng.below(64);
    let positions = pos0 + t + rng.below(5);
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / THETA.powf(2.0 * i as f32 / d as f32))
        .collect();
    let (mut cos, mut sin) = (
        vec![0.0f32; positions * half],
        vec![0.0f32; positions * half],
    );
    rope_cos_sin(&mut cos, &mut sin, &inv_freq, 0);
    let cos_gpu = GpuBuffer::from_host(gpu, "rope cos table", &cos)?;
    let sin_gpu = GpuBuffer::from_host(gpu, "rope sin table", &sin)?;
    let angles = (&cos_gpu, &sin_gpu);
    let (q_bits, mut want_q) = rng.bf16s(t * q_dim, -2.0, 2.0);
    let (k_bits, mut want_k) = rng.bf16s(t * kv_dim, -2.0, 2.0);
    let (v_bits, _) = rng.bf16s(t * kv_dim, -2.0, 2.0);
    let (keys_bits, _) = rng.bf16s(positions * kv_dim, -2.0, 2.0);
    let (values_bits, _) = rng.bf16s(positions * kv_dim, -2.0, 2.0);
    let host = [&q_bits[..], &k_bits, &v_bits, &keys_bits, &values_bits];

    let mut separate = CacheCase::upload(gpu, host)?;
    let offset = pos0 * kv_dim;
    rope::rope_forward_at(gpu, &mut separate.q, angles, pos0, t, d)?;
    rope::rope_forward_at(gpu, &mut separate.k, angles, pos0, t, d)?;
    copy_into_at(gpu, &separate.k, &mut separate.keys, offset)?;
    copy_into_at(gpu, &separate.v, &mut separate.values, offset)?;
    let want_bits = separate.download(gpu)?;

    let mut case = CacheCase::upload(gpu, host)?;
    let rows = QkvRows {
        q: &mut case.q,
        k: &mut case.k,
        v: &case.v,
    };
    let caches = (&mut case.keys, &mut case.values);
    rope_qk_into_cache(gpu, rows, angles, caches, pos0, (heads, kv_heads, d))?;
    let fused = case.download(gpu)?;
    let shape = format!("{t}x{heads}/{kv_heads}x{d} @{pos0}/{positions}");
    let mut rows = vec![Row::new(
        "rope q,k + cache = separate (exact)",
        &shape,
        if fused == want_bits { 0.0 } else { 1.0 },
        0.0,
    )];
    let (table_cos, table_sin) = (&cos[pos0 * half..], &sin[pos0 * half..]);
    let (table_cos, table_sin) = (&table_cos[..t * half], &table_sin[..t * half]);
    rope_forward(&mut want_q, table_cos, table_sin, d);
    rope_forward(&mut want_k, table_cos, table_sin, d);
    let got_q = bf16_to_f32(&fused[0]);
    let got_keys = bf16_to_f32(&fused[3][offset..offset + t * kv_dim]);
    let mut got = got_q;
    got.extend(got_keys);
    want_q.extend(want_k);
    rows.push(Row::new(
        "rope q,k + cache fwd bf16",
        &shape,
        relative_error(&got, &want_q),
        BF16_BOUND,
    ));
    Ok(rows)
}

/// `rope_forward_at` with a table of positions 0..P (P past the rows run) read from a random
/// first position, against the CPU rotation by the angles of those positions.
fn forward_at_check(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    (t, heads, d): (usize, usize, usize),
    inv_freq: &[f32],
) -> Result<Row> {
    let half = d / 2;
    let first = rng.below(64);
    let positions = first + t + rng.below(5);
    let (mut table_cos, mut table_sin) = (
        vec![0.0f32; positions * half],
        vec![0.0f32; positions * half],
    );
    rope_cos_sin(&mut table_cos, &mut table_sin, inv_freq, 0);
    let (mut cos, mut sin) = (vec![0.0f32; t * half], vec![0.0f32; t * half]);
    rope_cos_sin(&mut cos, &mut sin, inv_freq, first);
    let cos_gpu = GpuBuffer::from_host(gpu, "rope cos table", &table_cos)?;
    let sin_gpu = GpuBuffer::from_host(gpu, "rope sin table", &table_sin)?;
    let (bits, mut want) = rng.bf16s(t * heads * d, -2.0, 2.0);
    let mut x = GpuBuffer::from_host(gpu, "rope x", &bits)?;
    rope_forward(&mut want, &cos, &sin, d);
    rope::rope_forward_at(gpu, &mut x, (&cos_gpu, &sin_gpu), first, t, d)?;
    let got = bf16_to_f32(&x.to_host(gpu, "rope x")?);
    Ok(Row::new(
        "rope fwd bf16 at position",
        &format!("{t}x{heads}x{d} @{first}/{positions}"),
        relative_error(&got, &want),
        BF16_BOUND,
    ))
}
