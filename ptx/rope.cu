/*
 * rope.cu: rotary position embedding, forward and backward, in place on bf16 activations.
 *
 * rope_forward_bf16(x, cos, sin, rows, heads, head_dim)
 * rope_backward_bf16(x, cos, sin, rows, heads, head_dim)
 * rope_forward_bf16_at_step(x, cos, sin, step, positions, heads, head_dim)
 *   One row (a decode step) rotated by row *step of tables of `positions` rows: the position
 *   read from device memory, so a captured CUDA graph replays for every step (nothing is done
 *   when *step is outside the table; the host checks it before writing it).
 *   x (rows, heads * head_dim) bf16, row-major, rotated in place; cos, sin (rows, head_dim / 2)
 *   f32, the angles of each row's position (the host builds them with cpu::rope_cos_sin).
 *   transformers' rotate_half convention: the pairs are (x[i], x[i + D/2]) of every head,
 *     forward:  x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin;
 *     backward: the rotation by -angle (the same with sin negated), applied to the gradient.
 *   head_dim must be even (the host checks).
 *   Launch: 1-D, ROPE_THREADS (256) threads per CTA, one thread per pair:
 *   grid = ceil(rows * heads * head_dim / 2 / 256).
 *   Checked against: backend::cpu::rope_forward, backend::cpu_backward::rope_backward
 *   (sun selftest, "rope" rows).
 */

#include "common.cuh"

#define ROPE_THREADS 256

__device__ __forceinline__ void rope(uint16_t* __restrict__ x, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, int64_t rows,
                                     int64_t heads, int64_t head_dim, float sin_sign) {
    const int64_t half = head_dim / 2;
    const int64_t pairs = rows * heads * half;
    const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    const int64_t row = p / (heads * half);
    const int64_t within = p - row * heads * half;
    const int64_t head = within / half;
    const int64_t i = within - head * half;
    const float c = cos_t[row * half + i];
    const float s = sin_sign * sin_t[row * half + i];
    uint16_t* x1 = x + row * heads * head_dim + head * head_dim + i;
    uint16_t* x2 = x1 + half;
    const float a = bf16_bits_to_f32(*x1), b = bf16_bits_to_f32(*x2);
    *x1 = f32_to_bf16_bits(a * c - b * s);
    *x2 = f32_to_bf16_bits(b * c + a * s);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_forward_bf16(uint16_t* x, const float* cos_t, const float* sin_t, int64_t rows,
                  int64_t heads, int64_t head_dim) {
    rope(x, cos_t, sin_t, rows, heads, head_dim, 1.0f);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_backward_bf16(uint16_t* x, const float* cos_t, const float* sin_t, int64_t rows,
                   int64_t heads, int64_t head_dim) {
    rope(x, cos_t, sin_t, rows, heads, head_dim, -1.0f);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_forward_bf16_at_step(uint16_t* x, const float* cos_t, const float* sin_t,
                          const int64_t* step, int64_t positions, int64_t heads,
                          int64_t head_dim) {
    const int64_t row = *step;
    if (row < 0 || row >= positions) return;
    const int64_t offset = row * (head_dim / 2);
    rope(x, cos_t + offset, sin_t + offset, 1, heads, head_dim, 1.0f);
}
