//! Multi-tensor optimizer checks: `cuda::adamw_multi::TensorTable::adamw_step` against the
//! per-tensor kernels it replaces in the training step (`adamw::adamw_step`, then
//! `elementwise::to_bf16` and `elementwise::zero_f32`, tensor by tensor), bit for bit on the
//! parameters, both moments and the bf16 copies over three steps of ragged tensors (NaN and
//! infinite gradients among them, a clipping scale at one step), the gradients zeroed after and
//! the arena's values past the tensors untouched, with moments in device and in managed memory
//! (one table object for both, so the second builds a new table); and
//! `TensorTable::sum_of_squares` against an f64 sum on the host, the same on a second call, and
//! NaN when a gradient is.

use super::harness::{Row, SplitMix64};
use crate::backend::cuda::adamw::{self, AdamWStep, MomentArena};
use crate::backend::cuda::adamw_multi::{StepTensor, TensorTable};
use crate::backend::cuda::elementwise::{to_bf16, upload_into, zero_f32};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::optim::AdamWConfig;

/// Tensor lengths: one value, a partial chunk, chunk edges (4096 values a chunk), several chunks.
const LENGTHS: [usize; 7] = [1, 7, 4096 + 3, 4096, 1000, 3 * 4096 + 1, (1 << 18) + 5];
const STEPS: u64 = 3;
const LR: f32 = 1e-2;
/// Arena values past the last tensor, which no step may touch.
const FENCE: usize = 5;
/// The norm's bound: relative to an f64 sum of squares on the host.
const NORM_BOUND: f64 = 1e-6;

/// 0 when `a` and `b` hold the same bits, else 1 (a row with bound 0 is then an exact check).
fn identical<T: bytemuck::Pod>(a: &[T], b: &[T]) -> f64 {
    let (a, b): (&[u8], &[u8]) = (bytemuck::cast_slice(a), bytemuck::cast_slice(b));
    if a == b {
        0.0
    } else {
        1.0
    }
}

/// One set of device tensors: f32 parameters, gradients and bf16 copies.
struct Tensors {
    params: Vec<GpuBuffer<f32>>,
    grads: Vec<GpuBuffer<f32>>,
    bf16: Vec<GpuBuffer<u16>>,
}

impl Tensors {
    /// Parameters `p0`, zero gradients, and bf16 copies holding a pattern no step writes back.
    fn upload(gpu: &CudaDevice, p0: &[Vec<f32>]) -> Result<Self> {
        let mut set = Tensors {
            params: Vec::new(),
            grads: Vec::new(),
            bf16: Vec::new(),
        };
        for p in p0 {
            set.params
                .push(GpuBuffer::from_host(gpu, "multi-tensor params", p)?);
            set.grads
                .push(GpuBuffer::zeroed(gpu, "multi-tensor grads", p.len())?);
            let stale = vec![0x7FC1u16; p.len()]; // a NaN pattern the rounding never makes
            set.bf16
                .push(GpuBuffer::from_host(gpu, "multi-tensor bf16", &stale)?);
        }
        Ok(set)
    }

    /// Every tensor's (params, grads, bf16) copied to the host, concatenated.
    fn download(&self, gpu: &CudaDevice) -> Result<(Vec<f32>, Vec<f32>, Vec<u16>)> {
        let (mut p, mut g, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..self.params.len() {
            p.extend(self.params[t].to_host(gpu, "multi-tensor params")?);
            g.extend(self.grads[t].to_host(gpu, "multi-tensor grads")?);
            b.extend(self.bf16[t].to_host(gpu, "multi-tensor bf16")?);
        }
        Ok((p, g, b))
    }
}

/// Zeroed moments for `total` values and FENCE more, with `m0`/`v0` at the start and the
/// fence values after them.
fn arena(gpu: &CudaDevice, managed: bool, m0: &[f32], v0: &[f32]) -> Result<MomentArena> {
    let mut arena = MomentArena::new(gpu, m0.len() + FENCE, managed)?;
    arena.write(gpu, 0, m0, v0)?;
    let fence = vec![1.5f32; FENCE];
    arena.write(gpu, m0.len(), &fence, &fence)?;
    Ok(arena)
}

/// The step and norm rows, with moments in device memory, then in managed memory.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let total: usize = LENGTHS.iter().sum();
    let shape = |managed: bool| {
        format!(
            "{} tensors, {total}{}",
            LENGTHS.len(),
            if managed { " managed" } else { "" }
        )
    };
    let mut rows = Vec::new();
    // One table for both runs: the second run's buffers differ, so it must build a new table.
    let mut table = TensorTable::new();
    for managed in [false, true] {
        let p0: Vec<Vec<f32>> = LENGTHS.iter().map(|&n| rng.f32s(n, -0.05, 0.05)).collect();
        let m0 = rng.f32s(total, -1e-3, 1e-3);
        let v0 = rng.f32s(total, 0.0, 1e-5);
        let mut want = Tensors::upload(gpu, &p0)?;
        let mut got = Tensors::upload(gpu, &p0)?;
        let mut want_moments = arena(gpu, false, &m0, &v0)?;
        let mut got_moments = arena(gpu, managed, &m0, &v0)?;
        for step in 1..=STEPS {
            let grad_scale = if step == 2 { 0.7 } else { 1.0 };
            for (t, &n) in LENGTHS.iter().enumerate() {
                let mut grads = rng.f32s(n, -1.0, 1.0);
                if n > 100 && t % 2 == 0 {
                    grads[97] = f32::NAN;
                    grads[98] = f32::INFINITY;
                    grads[99] = f32::NEG_INFINITY;
                }
                upload_into(&mut want.grads[t], &grads, "multi-tensor grads")?;
                upload_into(&mut got.grads[t], &grads, "multi-tensor grads")?;
            }
            let step = AdamWStep {
                lr: LR,
                step,
                grad_scale,
            };
            let mut offset = 0;
            for (t, &n) in LENGTHS.iter().enumerate() {
                let (p, g) = (&mut want.params[t], &mut want.grads[t]);
                adamw::adamw_step(gpu, &cfg, step, p, g, &mut want_moments, offset)?;
                to_bf16(gpu, p, &mut want.bf16[t])?;
                zero_f32(gpu, g)?;
                offset += n;
            }
            let mut tensors: Vec<StepTensor<'_>> = got
                .params
                .iter_mut()
                .zip(&mut got.grads)
                .zip(&mut got.bf16)
                .map(|((params, grads), bf16)| StepTensor {
                    params,
                    grads,
                    bf16,
                })
                .collect();
            table.adamw_step(gpu, &cfg, step, &mut tensors, &mut got_moments)?;
        }
        let (want_p, _, want_b) = want.download(gpu)?;
        let (got_p, got_g, got_b) = got.download(gpu)?;
        let (want_m, want_v) = want_moments.read(gpu, 0, total + FENCE)?;
        let (got_m, got_v) = got_moments.read(gpu, 0, total + FENCE)?;
        let shape = shape(managed);
        for (check, error) in [
            (
                "adamw multi-tensor params (exact)",
                identical(&got_p, &want_p),
            ),
            ("adamw multi-tensor m (exact)", identical(&got_m, &want_m)),
            ("adamw multi-tensor v (exact)", identical(&got_v, &want_v)),
            (
                "adamw multi-tensor bf16 copies (exact)",
                identical(&got_b, &want_b),
            ),
            (
                "adamw multi-tensor grads zeroed (exact)",
                identical(&got_g, &vec![0.0f32; total]),
            ),
            (
                "adamw multi-tensor params moved",
                if got_p == p0.concat() { 1.0 } else { 0.0 },
            ),
        ] {
            rows.push(Row::new(check, &shape, error, 0.0));
        }
    }
    rows.extend(norm_checks(gpu, rng)?);
    Ok(rows)
}

/// The sum of squares against the host's in f64, bit-equal on a second call (the cached
/// table), and NaN when one gradient is.
fn norm_checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut host: Vec<Vec<f32>> = LENGTHS.iter().map(|&n| rng.f32s(n, -1.0, 1.0)).collect();
    let want: f64 = host
        .iter()
        .flatten()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum();
    let mut grads = host
        .iter()
        .map(|g| GpuBuffer::from_host(gpu, "norm input", g))
        .collect::<Result<Vec<_>>>()?;
    let mut table = TensorTable::new();
    let first = table.sum_of_squares(gpu, &grads.iter().collect::<Vec<_>>())?;
    let second = table.sum_of_squares(gpu, &grads.iter().collect::<Vec<_>>())?;
    let shape = format!(
        "{} tensors, {}",
        LENGTHS.len(),
        LENGTHS.iter().sum::<usize>()
    );
    let last = LENGTHS.len() - 1;
    host[last][LENGTHS[last] - 2] = f32::NAN;
    upload_into(&mut grads[last], &host[last], "norm input")?;
    let with_nan = table.sum_of_squares(gpu, &grads.iter().collect::<Vec<_>>())?;
    Ok(vec![
        Row::new(
            "multi-tensor sum of squares vs f64 host sum",
            &shape,
            (first - want).abs() / want,
            NORM_BOUND,
        ),
        Row::new(
            "multi-tensor sum of squares repeats (exact)",
            &shape,
            identical(&[first], &[second]),
            0.0,
        ),
        Row::new(
            "multi-tensor sum of squares NaN propagates",
            &shape,
            if with_nan.is_nan() { 0.0 } else { 1.0 },
            0.0,
        ),
    ])
}
