//! A frozen 4-bit linear layer with its LoRA adapter on the GPU, forward and backward: the
//! device version of `Linear::forward_base` + `LoraPair::forward` and of
//! `Linear::backward_input` + `LoraPair::backward` (see `model::lora` for the algebra).

use super::adapters::GpuAdapter;
use super::weights::GpuLinear;
use super::workspace::{Scratch, Workspace};
use crate::backend::cuda::elementwise::{dropout_apply, masked_add, transpose_bf16};
use crate::backend::cuda::gemv::matmul_nt_bf16_by_rows;
use crate::backend::cuda::matmul::{
    matmul_nn_4bit, matmul_nn_bf16, matmul_nt_4bit, matmul_nt_bf16, GemmShape,
};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;

/// A LoRA dropout mask on the GPU: 1 where the input is kept (then scaled by `keep`).
pub(crate) struct DropoutMask<'w> {
    pub(crate) mask: Scratch<'w, u8>, // (N, in)
    pub(crate) keep: f32,
}

/// What the adapter's forward keeps for its backward.
pub(crate) struct AdapterActivations<'w> {
    /// The adapter's input after dropout (N, in); `None` without dropout (then it is x).
    dropped: Option<Scratch<'w, u16>>,
    /// z = u Aᵀ, (N, r).
    z: Scratch<'w, u16>,
}

/// `out (N, out) = x (N, in) Wᵀ + scale · (drop(x) Aᵀ) Bᵀ`; returns the adapter's activations
/// when there is an adapter.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    linear: &GpuLinear,
    adapter: Option<&GpuAdapter>,
    mask: Option<&DropoutMask<'_>>,
    x: &GpuBuffer<u16>,
    n: usize,
    out: &mut GpuBuffer<u16>,
) -> Result<Option<AdapterActivations<'w>>> {
    let (din, dout) = (linear.in_features, linear.out_features);
    if n == 1 {
        linear.weight.gemv_bf16(device, (dout, din), x, out)?;
    } else {
        let shape = GemmShape {
            m: n,
            n: dout,
            k: din,
        };
        matmul_nt_4bit(device, x, &linear.weight, out, shape, 1.0, 0.0)?;
    }
    let Some(adapter) = adapter else {
        return Ok(None);
    };
    let r = adapter.rank;
    let dropped = match mask {
        Some(mask) => {
            let mut u = ws.bf16.take(device, "LoRA dropped input", n * din)?;
            dropout_apply(device, x, &mask.mask, mask.keep, &mut u)?;
            Some(u)
        }
        None => None,
    };
    let u = dropped.as_deref().unwrap_or(x);
    let mut z = ws.bf16.take(device, "LoRA z", n * r)?;
    // A few rows (a decode step) go through the GEMV, many through the tensor-core GEMM.
    let shape = GemmShape { m: n, n: r, k: din };
    matmul_nt_bf16_by_rows(device, u, &adapter.a, &mut z, shape, 1.0, 0.0)?; // (N, r)
    let shape = GemmShape {
        m: n,
        n: dout,
        k: r,
    };
    matmul_nt_bf16_by_rows(device, &z, &adapter.b, out, shape, adapter.scale, 1.0)?; // (N, out)
    Ok(Some(AdapterActivations { dropped, z }))
}

/// The input gradient `dx (N, in) (+)= dy W + drop'(scale · dy B A)` of a forward with input
/// `x`, and the adapter's sequence gradients (dA, dB, in bf16) added to its accumulators.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    device: &CudaDevice,
    ws: &Workspace,
    linear: &GpuLinear,
    adapter: Option<&mut GpuAdapter>,
    mask: Option<&DropoutMask<'_>>,
    x: &GpuBuffer<u16>,
    act: Option<&AdapterActivations<'_>>,
    dy: &GpuBuffer<u16>,
    n: usize,
    dx: &mut GpuBuffer<u16>,
    accumulate: bool,
) -> Result<()> {
    let (din, dout) = (linear.in_features, linear.out_features);
    let shape = GemmShape {
        m: n,
        n: din,
        k: dout,
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    matmul_nn_4bit(device, dy, &linear.weight, dx, shape, 1.0, beta)?; // (N, in)
    let (Some(adapter), Some(act)) = (adapter, act) else {
        return Ok(());
    };
    let r = adapter.rank;
    // dz = scale · dy B: (N, out) x (out, r).
    let mut dz = ws.bf16.take(device, "LoRA dz", n * r)?;
    let shape = GemmShape {
        m: n,
        n: r,
        k: dout,
    };
    matmul_nn_bf16(device, dy, &adapter.b, &mut dz, shape, adapter.scale, 0.0)?;
    // dB = scale · dyᵀ z = scale · (dyᵀ) (zᵀ)ᵀ: (out, N) x (r, N)ᵀ.
    let mut dy_t = ws.bf16.take(device, "LoRA dy transposed", dout * n)?;
    transpose_bf16(device, dy, (n, dout), &mut dy_t)?;
    let mut z_t = ws.bf16.take(device, "LoRA z transposed", r * n)?;
    transpose_bf16(device, &act.z, (n, r), &mut z_t)?;
    let shape = GemmShape {
        m: dout,
        n: r,
        k: n,
    };
    matmul_nt_bf16(
        device,
        &dy_t,
        &z_t,
        &mut adapter.seq_grad_b,
        shape,
        adapter.scale,
        0.0,
    )?;
    // dA = dzᵀ u = (dzᵀ) (uᵀ)ᵀ: (r, N) x (in, N)ᵀ.
    let u = act.dropped.as_deref().unwrap_or(x);
    let mut dz_t = ws.bf16.take(device, "LoRA dz transposed", r * n)?;
    transpose_bf16(device, &dz, (n, r), &mut dz_t)?;
    let mut u_t = ws.bf16.take(device, "LoRA input transposed", din * n)?;
    transpose_bf16(device, u, (n, din), &mut u_t)?;
    let shape = GemmShape { m: r, n: din, k: n };
    matmul_nt_bf16(
        device,
        &dz_t,
        &u_t,
        &mut adapter.seq_grad_a,
        shape,
        1.0,
        0.0,
    )?;
    adapter.accumulate_sequence_grads(device)?;
    // dx += drop'(dz A): (N, r) x (r, in).
    let shape = GemmShape { m: n, n: din, k: r };
    match mask {
        Some(mask) => {
            let mut du = ws.bf16.take(device, "LoRA input gradient", n * din)?;
            matmul_nn_bf16(device, &dz, &adapter.a, &mut du, shape, 1.0, 0.0)?;
            masked_add(device, dx, &du, &mask.mask, mask.keep)
        }
        None => matmul_nn_bf16(device, &dz, &adapter.a, dx, shape, 1.0, 1.0),
    }
}
