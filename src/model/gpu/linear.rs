//! A frozen 4-bit linear layer with its LoRA adapter on the GPU, forward and backward: the
//! device version of `Linear::forward_base` + `LoraPair::forward` and of
//! `Linear::backward_input` + `LoraPair::backward` (see `model::lora` for the algebra).

use super::adapters::GpuAdapter;
use super::weights::GpuLinear;
use super::workspace::{Scratch, Workspace};
use crate::backend::cuda::gemm_sm90::{low_rank_fits, matmul_nt_4bit_low_rank, LowRank};
use crate::backend::cuda::gemv::{matmul_nt_bf16_by_rows, GEMV_MAX_ROWS};
use crate::backend::cuda::lora::{
    lora_down, lora_dz, lora_grad, lora_grad_scratch_len, lora_rows_scratch_len,
    lora_up_masked_add, Dropout, RowsOut,
};
use crate::backend::cuda::matmul::{matmul_nn_4bit, matmul_nt_4bit, GemmShape};
use crate::backend::cuda::profile::span;
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;

/// A LoRA dropout mask on the GPU: 1 where the input is kept (then scaled by `keep`).
pub(crate) struct DropoutMask<'w> {
    pub(crate) mask: Scratch<'w, u8>, // (N, in)
    pub(crate) keep: f32,
}

impl DropoutMask<'_> {
    fn dropout(&self) -> Dropout<'_> {
        Dropout {
            mask: &self.mask,
            keep: self.keep,
        }
    }
}

/// What the adapter's forward keeps for its backward: z = scale · drop(x) Aᵀ, (N, r). The
/// dropped input itself is not kept: the kernels apply the mask to x as they read it.
pub(crate) struct AdapterActivations<'w> {
    z: Scratch<'w, u16>,
}

/// `out (N, out) = x (N, in) Wᵀ + scale · (drop(x) Aᵀ) Bᵀ`; returns the adapter's activations
/// when there is an adapter. Where the dequantize + GEMM path takes the product, the adapter's
/// B term rides in the same GEMM (z first, then one pass over `out`).
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
    let shape = GemmShape {
        m: n,
        n: dout,
        k: din,
    };
    let Some(adapter) = adapter else {
        base_forward(device, linear, x, shape, out)?;
        return Ok(None);
    };
    let r = adapter.rank;
    let z = adapter_z(device, ws, adapter, mask, x, n)?;
    if n > GEMV_MAX_ROWS && low_rank_fits(device, shape, r) {
        let _fused = span(device, "linear: base X W^T + LoRA B");
        let low_rank = LowRank {
            a: &z,
            b: &adapter.b,
            r,
        };
        matmul_nt_4bit_low_rank(device, x, &linear.weight, low_rank, out, shape)?;
    } else {
        base_forward(device, linear, x, shape, out)?;
        let _lora = span(device, "LoRA: y += z B^T");
        let shape = GemmShape {
            m: n,
            n: dout,
            k: r,
        };
        matmul_nt_bf16_by_rows(device, &z, &adapter.b, out, shape, 1.0, 1.0)?; // (N, out)
    }
    Ok(Some(AdapterActivations { z }))
}

/// The adapter's activations of [`linear_forward`] without its output: what a recompute keeps
/// for the backward where the linear's output itself is not needed. `None` without an adapter.
pub(crate) fn adapter_activations<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    adapter: Option<&GpuAdapter>,
    mask: Option<&DropoutMask<'_>>,
    x: &GpuBuffer<u16>,
    n: usize,
) -> Result<Option<AdapterActivations<'w>>> {
    let Some(adapter) = adapter else {
        return Ok(None);
    };
    let z = adapter_z(device, ws, adapter, mask, x, n)?;
    Ok(Some(AdapterActivations { z }))
}

/// `out = x Wᵀ`: the GEMV for one row, else the 4-bit matmul.
fn base_forward(
    device: &CudaDevice,
    linear: &GpuLinear,
    x: &GpuBuffer<u16>,
    shape: GemmShape,
    out: &mut GpuBuffer<u16>,
) -> Result<()> {
    let _base = span(device, "linear: base X W^T");
    if shape.m == 1 {
        linear.weight.gemv_bf16(device, (shape.n, shape.k), x, out)
    } else {
        matmul_nt_4bit(device, x, &linear.weight, out, shape, 1.0, 0.0)
    }
}

/// The adapter's middle activation, scaled: `z (N, r) = scale · drop(x) Aᵀ`.
fn adapter_z<'w>(
    device: &CudaDevice,
    ws: &'w Workspace,
    adapter: &GpuAdapter,
    mask: Option<&DropoutMask<'_>>,
    x: &GpuBuffer<u16>,
    n: usize,
) -> Result<Scratch<'w, u16>> {
    let _span = span(device, "LoRA: z = drop(x) A^T");
    let (r, din, scale) = (adapter.rank, adapter.in_features, adapter.scale);
    let mut z = ws.bf16.take(device, "LoRA z", n * r)?;
    match mask {
        // A decode step's row or few (never dropped) go through the GEMV.
        None if n <= GEMV_MAX_ROWS => {
            let shape = GemmShape { m: n, n: r, k: din };
            matmul_nt_bf16_by_rows(device, x, &adapter.a, &mut z, shape, scale, 0.0)?;
        }
        _ => {
            let dropout = mask.map(DropoutMask::dropout);
            let len = lora_rows_scratch_len(device, (n, r, din)).max(1);
            let mut scratch = ws.f32.take(device, "LoRA z partial sums", len)?;
            let rows = RowsOut {
                out: &mut z,
                scratch: &mut scratch,
            };
            lora_down(device, x, dropout, &adapter.a, rows, (n, r, din), scale)?;
        }
    }
    Ok(z)
}

/// The input gradient `dx (N, in) (+)= dy W + drop'(scale · dy B A)` of a forward with input
/// `x`, and the adapter's gradients (dA, dB) added to its f32 accumulators.
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
    let base = span(device, "linear: base dY W");
    matmul_nn_4bit(device, dy, &linear.weight, dx, shape, 1.0, beta)?; // (N, in)
    drop(base);
    let (Some(adapter), Some(act)) = (adapter, act) else {
        return Ok(());
    };
    let _lora = span(device, "linear: LoRA backward");
    let r = adapter.rank;
    // dz = scale · dy B: (N, out) x (out, r).
    let mut dz = ws.bf16.take(device, "LoRA dz", n * r)?;
    let len = lora_rows_scratch_len(device, (n, r, dout)).max(1);
    let mut scratch = ws.f32.take(device, "LoRA dz partial sums", len)?;
    let rows = RowsOut {
        out: &mut dz,
        scratch: &mut scratch,
    };
    lora_dz(device, dy, &adapter.b, rows, (n, r, dout), adapter.scale)?;
    drop(scratch);
    // dB += dyᵀ z (z holds scale · drop(x) Aᵀ): (out, N) x (N, r); dA += dzᵀ drop(x): (r, N)
    // x (N, in).
    let grads = span(device, "LoRA: dA and dB");
    let most =
        lora_grad_scratch_len(device, n, (dout, r)).max(lora_grad_scratch_len(device, n, (r, din)));
    let mut scratch = ws.f32.take(device, "LoRA gradient partial sums", most)?;
    let (grad_a, grad_b) = (&mut adapter.grad_a, &mut adapter.grad_b);
    lora_grad(
        device,
        dy,
        &act.z,
        None,
        grad_b,
        (n, dout, r),
        1.0,
        &mut scratch,
    )?;
    lora_grad(
        device,
        &dz,
        x,
        mask.map(DropoutMask::dropout),
        grad_a,
        (n, r, din),
        1.0,
        &mut scratch,
    )?;
    drop(grads);
    // dx += drop'(dz A): (N, r) x (r, in), in one pass over dx.
    let dropout = mask.map(DropoutMask::dropout);
    let _up = span(device, "LoRA: dx += drop'(dz A)");
    lora_up_masked_add(device, &dz, &adapter.a, dropout, dx, (n, r, din))
}
