//! RMSNorm checks: `cuda::norm` against `cpu::rmsnorm_forward` and
//! `cpu_backward::rmsnorm_backward` on bf16-rounded inputs; the fused residual + RMSNorm
//! against the three kernels it replaces (bits equal) and against the CPU.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND, F32_BOUND};
use crate::backend::cpu::rmsnorm_forward;
use crate::backend::cpu_backward::rmsnorm_backward;
use crate::backend::cuda::elementwise::{copy_f32, residual_add};
use crate::backend::cuda::{norm, CudaDevice, GpuBuffer};
use crate::error::Result;
use half::bf16;

/// (rows, width): one row, tiny and odd widths (not multiples of the 256-thread block; the
/// element paths), SmolLM2's and LLaMA-7B's widths, the backward's widest vector row (4 vectors
/// a thread), and a row only the forward stages (6 vectors a thread; the backward's element
/// path).
const SHAPES: [(usize, usize); 7] = [
    (1, 576),
    (3, 5),
    (77, 257),
    (512, 576),
    (64, 4096),
    (4, 8192),
    (2, 12288),
];
const EPS: f32 = 1e-5;
/// (rows, width) of the fused residual + RMSNorm: the shapes above (odd widths take the
/// element path), the widest row of the vectorized path, and one just past it (element path).
const FUSED_SHAPES: [(usize, usize); 7] = [
    (1, 576),
    (3, 5),
    (77, 257),
    (512, 576),
    (64, 4096),
    (2, 8192),
    (1, 8196),
];

/// Forward, backward, and backward accumulating into an existing gradient, per shape.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(t, c) in &SHAPES {
        let shape = format!("{t}x{c}");
        let (x_bits, x) = rng.bf16s(t * c, -2.0, 2.0);
        let weight = rng.f32s(c, 0.5, 1.5);
        let (dy_bits, dy) = rng.bf16s(t * c, -1.0, 1.0);
        let (dx0_bits, dx0) = rng.bf16s(t * c, -0.5, 0.5);

        let x_gpu = GpuBuffer::from_host(gpu, "rmsnorm x", &x_bits)?;
        let w_gpu = GpuBuffer::from_host(gpu, "rmsnorm weight", &weight)?;
        let dy_gpu = GpuBuffer::from_host(gpu, "rmsnorm dy", &dy_bits)?;

        let mut want = vec![0.0f32; t * c];
        rmsnorm_forward(&mut want, &x, &weight, EPS);
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "rmsnorm out", t * c)?;
        norm::rmsnorm_forward(gpu, &mut out, &x_gpu, &w_gpu, EPS)?;
        let got = bf16_to_f32(&out.to_host(gpu, "rmsnorm out")?);
        rows.push(Row::new(
            "rmsnorm fwd bf16",
            &shape,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        let mut want_dx = vec![0.0f32; t * c];
        rmsnorm_backward(&mut want_dx, &dy, &x, &weight, EPS, false);
        let mut dx = GpuBuffer::<u16>::zeroed(gpu, "rmsnorm dx", t * c)?;
        norm::rmsnorm_backward(gpu, &mut dx, &dy_gpu, &x_gpu, &w_gpu, EPS, false)?;
        let got = bf16_to_f32(&dx.to_host(gpu, "rmsnorm dx")?);
        rows.push(Row::new(
            "rmsnorm bwd bf16",
            &shape,
            relative_error(&got, &want_dx),
            BF16_BOUND,
        ));

        let mut want_acc = dx0;
        rmsnorm_backward(&mut want_acc, &dy, &x, &weight, EPS, true);
        let mut dx_acc = GpuBuffer::from_host(gpu, "rmsnorm dx", &dx0_bits)?;
        norm::rmsnorm_backward(gpu, &mut dx_acc, &dy_gpu, &x_gpu, &w_gpu, EPS, true)?;
        let got = bf16_to_f32(&dx_acc.to_host(gpu, "rmsnorm dx")?);
        rows.push(Row::new(
            "rmsnorm bwd += bf16",
            &shape,
            relative_error(&got, &want_acc),
            BF16_BOUND,
        ));
    }
    for &shape in &FUSED_SHAPES {
        rows.extend(check_residual_rmsnorm(gpu, rng, shape)?);
    }
    Ok(rows)
}

/// `residual_rmsnorm` on random `x (t, c)` f32 and `proj` bf16: its three outputs against
/// copy + `residual_add` + `rmsnorm_forward` on the GPU (every bit), and against the CPU's
/// `x + proj`, its bf16 rounding and `rmsnorm_forward` of that.
fn check_residual_rmsnorm(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    (t, c): (usize, usize),
) -> Result<Vec<Row>> {
    let shape = format!("{t}x{c}");
    let x = rng.f32s(t * c, -2.0, 2.0);
    let (proj_bits, proj) = rng.bf16s(t * c, -1.0, 1.0);
    let weight = rng.f32s(c, 0.5, 1.5);
    let x_gpu = GpuBuffer::from_host(gpu, "residual x", &x)?;
    let proj_gpu = GpuBuffer::from_host(gpu, "residual projection", &proj_bits)?;
    let w_gpu = GpuBuffer::from_host(gpu, "rmsnorm weight", &weight)?;

    let mut y = GpuBuffer::<f32>::zeroed(gpu, "fused y", t * c)?;
    let mut yb = GpuBuffer::<u16>::zeroed(gpu, "fused y bf16", t * c)?;
    let mut out = GpuBuffer::<u16>::zeroed(gpu, "fused out", t * c)?;
    let outputs = (&mut y, &mut yb, &mut out);
    norm::residual_rmsnorm(gpu, &x_gpu, &proj_gpu, &w_gpu, EPS, outputs)?;
    let got_y = y.to_host(gpu, "fused y")?;
    let got_yb = yb.to_host(gpu, "fused y bf16")?;
    let got_out = out.to_host(gpu, "fused out")?;

    let mut sep_y = GpuBuffer::<f32>::zeroed(gpu, "separate y", t * c)?;
    let mut sep_yb = GpuBuffer::<u16>::zeroed(gpu, "separate y bf16", t * c)?;
    let mut sep_out = GpuBuffer::<u16>::zeroed(gpu, "separate out", t * c)?;
    copy_f32(gpu, &x_gpu, &mut sep_y)?;
    residual_add(gpu, &mut sep_y, &proj_gpu, Some(&mut sep_yb))?;
    norm::rmsnorm_forward(gpu, &mut sep_out, &sep_yb, &w_gpu, EPS)?;
    let same_y = got_y.iter().map(|v| v.to_bits()).eq(sep_y
        .to_host(gpu, "separate y")?
        .iter()
        .map(|v| v.to_bits()));
    let same = same_y
        && got_yb == sep_yb.to_host(gpu, "separate y bf16")?
        && got_out == sep_out.to_host(gpu, "separate out")?;

    let want_y: Vec<f32> = x.iter().zip(&proj).map(|(a, b)| a + b).collect();
    let want_yb: Vec<f32> = want_y.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let mut want_out = vec![0.0f32; t * c];
    rmsnorm_forward(&mut want_out, &want_yb, &weight, EPS);
    Ok(vec![
        Row::new(
            "residual+rmsnorm = separate (exact)",
            &shape,
            if same { 0.0 } else { 1.0 },
            0.0,
        ),
        Row::new(
            "residual+rmsnorm residual f32",
            &shape,
            relative_error(&got_y, &want_y),
            F32_BOUND,
        ),
        Row::new(
            "residual+rmsnorm fwd bf16",
            &shape,
            relative_error(&bf16_to_f32(&got_out), &want_out),
            BF16_BOUND,
        ),
    ])
}
