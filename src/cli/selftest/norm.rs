//! RMSNorm checks: `cuda::norm` against `cpu::rmsnorm_forward` and
//! `cpu_backward::rmsnorm_backward` on bf16-rounded inputs.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cpu::rmsnorm_forward;
use crate::backend::cpu_backward::rmsnorm_backward;
use crate::backend::cuda::{norm, CudaDevice, GpuBuffer};
use crate::error::Result;

/// (rows, width): one row, tiny and odd widths (not multiples of the 256-thread block),
/// SmolLM2's and LLaMA-7B's widths.
const SHAPES: [(usize, usize); 5] = [(1, 576), (3, 5), (77, 257), (512, 576), (64, 4096)];
const EPS: f32 = 1e-5;

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
    Ok(rows)
}
