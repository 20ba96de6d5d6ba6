//! RoPE checks: `cuda::rope` against `cpu::rope_forward` and `cpu_backward::rope_backward`, and
//! the forward reading its angles at an offset of a longer table (a KV cache's, by position).

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cpu::{rope_cos_sin, rope_forward};
use crate::backend::cpu_backward::rope_backward;
use crate::backend::cuda::{rope, CudaDevice, GpuBuffer};
use crate::error::Result;

/// (rows, heads, head_dim): one row, SmolLM2's 9 query / 3 key-value heads of 64, a long
/// chunk at LLaMA-7B's 32 heads of 128, and a tiny odd head width.
const SHAPES: [(usize, usize, usize); 5] = [
    (1, 9, 64),
    (3, 3, 64),
    (77, 9, 64),
    (512, 32, 128),
    (5, 2, 6),
];
const THETA: f32 = 1e5;

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
