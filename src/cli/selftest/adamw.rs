//! Optimizer checks: `cuda::adamw::adamw_step` against `optim::adamw_step` over three steps
//! (moments in device and in managed memory, each tensor at a nonzero offset of its arena, NaN
//! and infinite gradients among the values, a clipping scale), the arena's read and write, and
//! `cuda::adamw::global_norm` against `optim::global_norm`.

use super::harness::{relative_error, Row, SplitMix64, F32_BOUND};
use crate::backend::cuda::adamw::{self, AdamWStep, MomentArena};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::optim::{adamw_step, global_norm, AdamState, AdamWConfig};

/// Parameter counts: one, a partial block, LoRA-sized tensors.
const SIZES: [usize; 4] = [1, 1000, 12289, 1 << 20];
const STEPS: u64 = 3;
const LR: f32 = 1e-2;

/// Per size: the parameter update (p - p0), and both moments, after three steps.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut rows = Vec::new();
    for (i, &n) in SIZES.iter().enumerate() {
        let managed = i % 2 == 1;
        let shape = format!("{n}{}", if managed { " managed" } else { "" });
        let p0 = rng.f32s(n, -0.05, 0.05);
        let mut want_p = p0.clone();
        let mut state = AdamState::default();
        let mut params = GpuBuffer::from_host(gpu, "adamw params", &p0)?;
        // The tensor sits after `pad` other values in its arena, as a later adapter does.
        let pad = 7;
        let mut moments = MomentArena::new(gpu, pad + n, managed)?;
        let fence = vec![1.5f32; pad];
        moments.write(gpu, 0, &fence, &fence)?;
        for step in 1..=STEPS {
            let mut grads = rng.f32s(n, -1.0, 1.0);
            if n > 100 {
                grads[97] = f32::NAN;
                grads[98] = f32::INFINITY;
                grads[99] = f32::NEG_INFINITY;
            }
            let grad_scale = if step == 2 { 0.7 } else { 1.0 };
            let scaled: Vec<f32> = grads.iter().map(|g| g * grad_scale).collect();
            adamw_step(&cfg, LR, step, &mut want_p, &scaled, &mut state);
            let grads_gpu = GpuBuffer::from_host(gpu, "adamw grads", &grads)?;
            adamw::adamw_step(
                gpu,
                &cfg,
                AdamWStep {
                    lr: LR,
                    step,
                    grad_scale,
                },
                &mut params,
                &grads_gpu,
                &mut moments,
                pad,
            )?;
        }
        let got_p = params.to_host(gpu, "adamw params")?;
        let (got_m, got_v) = moments.read(gpu, pad, n)?;
        let (fence_m, fence_v) = moments.read(gpu, 0, pad)?;
        let untouched = fence_m == fence && fence_v == fence;
        let delta = |p: &[f32]| -> Vec<f32> { p.iter().zip(&p0).map(|(a, b)| a - b).collect() };
        rows.push(Row::new(
            "adamw update p - p0 f32",
            &shape,
            relative_error(&delta(&got_p), &delta(&want_p)),
            F32_BOUND,
        ));
        rows.push(Row::new(
            "adamw m f32",
            &shape,
            relative_error(&got_m, &state.m),
            F32_BOUND,
        ));
        rows.push(Row::new(
            "adamw v f32",
            &shape,
            relative_error(&got_v, &state.v),
            F32_BOUND,
        ));
        rows.push(Row::new(
            "adamw neighbours untouched",
            &shape,
            if untouched { 0.0 } else { f64::INFINITY },
            F32_BOUND,
        ));
    }

    let tensors: Vec<Vec<f32>> = [3usize, 4096, 77777, 1 << 22]
        .iter()
        .map(|&n| rng.f32s(n, -1.0, 1.0))
        .collect();
    let host: Vec<&[f32]> = tensors.iter().map(|t| t.as_slice()).collect();
    let want = global_norm(&host);
    let on_gpu = tensors
        .iter()
        .map(|t| GpuBuffer::from_host(gpu, "norm input", t))
        .collect::<Result<Vec<_>>>()?;
    let got = adamw::global_norm(gpu, &on_gpu.iter().collect::<Vec<_>>())?;
    rows.push(Row::new(
        "global norm f32",
        "4 tensors, 4.3M",
        relative_error(&[got], &[want]),
        F32_BOUND,
    ));
    Ok(rows)
}
