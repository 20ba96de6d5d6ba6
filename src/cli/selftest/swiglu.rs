//! SwiGLU checks: `cuda::swiglu` against `cpu::swiglu_forward` and
//! `cpu_backward::swiglu_backward`.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND};
use crate::backend::cpu::swiglu_forward;
use crate::backend::cpu_backward::swiglu_backward;
use crate::backend::cuda::{swiglu, CudaDevice, GpuBuffer};
use crate::error::Result;

/// (rows, width): one element, odd sizes, SmolLM2's and LLaMA-7B's MLP widths.
const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 1537), (77, 1536), (512, 1536), (64, 11008)];

/// Forward and backward per shape; gate values span the saturated ends of the sigmoid.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(t, f) in &SHAPES {
        let shape = format!("{t}x{f}");
        let n = t * f;
        let (gate_bits, gate) = rng.bf16s(n, -8.0, 8.0);
        let (up_bits, up) = rng.bf16s(n, -2.0, 2.0);
        let (dout_bits, dout) = rng.bf16s(n, -1.0, 1.0);
        let gate_gpu = GpuBuffer::from_host(gpu, "swiglu gate", &gate_bits)?;
        let up_gpu = GpuBuffer::from_host(gpu, "swiglu up", &up_bits)?;
        let dout_gpu = GpuBuffer::from_host(gpu, "swiglu dout", &dout_bits)?;

        let mut want = vec![0.0f32; n];
        swiglu_forward(&mut want, &gate, &up);
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "swiglu out", n)?;
        swiglu::swiglu_forward(gpu, &mut out, &gate_gpu, &up_gpu)?;
        let got = bf16_to_f32(&out.to_host(gpu, "swiglu out")?);
        rows.push(Row::new(
            "swiglu fwd bf16",
            &shape,
            relative_error(&got, &want),
            BF16_BOUND,
        ));

        let (mut want_dg, mut want_du) = (vec![0.0f32; n], vec![0.0f32; n]);
        swiglu_backward(&mut want_dg, &mut want_du, &dout, &gate, &up);
        let mut dg = GpuBuffer::<u16>::zeroed(gpu, "swiglu dgate", n)?;
        let mut du = GpuBuffer::<u16>::zeroed(gpu, "swiglu dup", n)?;
        swiglu::swiglu_backward(gpu, &mut dg, &mut du, &dout_gpu, &gate_gpu, &up_gpu)?;
        let got_dg = bf16_to_f32(&dg.to_host(gpu, "swiglu dgate")?);
        let got_du = bf16_to_f32(&du.to_host(gpu, "swiglu dup")?);
        rows.push(Row::new(
            "swiglu bwd dgate bf16",
            &shape,
            relative_error(&got_dg, &want_dg),
            BF16_BOUND,
        ));
        rows.push(Row::new(
            "swiglu bwd dup bf16",
            &shape,
            relative_error(&got_du, &want_du),
            BF16_BOUND,
        ));
    }
    Ok(rows)
}
