/*
 * swiglu.cu: the SwiGLU activation of the LLaMA MLP, forward and backward, bf16 in and out,
 * f32 arithmetic.
 *
 * swiglu_forward_bf16(gate, up, n, out)
 *   out = silu(gate) * up, silu(g) = g / (1 + exp(-g)); all (n,) bf16 (any shape flattened).
 *   Checked against: backend::cpu::swiglu_forward ("swiglu fwd" rows of sun selftest).
 *
 * swiglu_backward_bf16(dout, gate, up, n, dgate, dup)
 *   du = dout * silu(g), dg = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))); all (n,) bf16.
 *   Each thread reads its element of every input before writing, so dgate may alias gate and
 *   dup may alias up (in-place backward).
 *   Checked against: backend::cpu_backward::swiglu_backward ("swiglu bwd" rows).
 *
 * Launch (both): 1-D, SWIGLU_THREADS (256) threads per CTA, one element per thread:
 * grid = ceil(n / 256).
 */

#include "common.cuh"

#define SWIGLU_THREADS 256

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
swiglu_forward_bf16(const uint16_t* __restrict__ gate, const uint16_t* __restrict__ up,
                    int64_t n, uint16_t* __restrict__ out) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = bf16_bits_to_f32(gate[i]), u = bf16_bits_to_f32(up[i]);
    out[i] = f32_to_bf16_bits(g / (1.0f + expf(-g)) * u);
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
swiglu_backward_bf16(const uint16_t* dout, const uint16_t* gate, const uint16_t* up, int64_t n,
                     uint16_t* dgate, uint16_t* dup) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float d = bf16_bits_to_f32(dout[i]);
    const float g = bf16_bits_to_f32(gate[i]), u = bf16_bits_to_f32(up[i]);
    const float sig = 1.0f / (1.0f + expf(-g));
    dup[i] = f32_to_bf16_bits(d * g * sig);
    dgate[i] = f32_to_bf16_bits(d * u * sig * (1.0f + g * (1.0f - sig)));
}
