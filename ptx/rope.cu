/*
 * rope.cu: rotary position embedding, forward and backward, in place on bf16 activations.
 *
 * rope_forward_bf16(x, cos, sin, rows, heads, head_dim)
 * rope_backward_bf16(x, cos, sin, rows, heads, head_dim)
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
 *
 * rope_qk_cache_bf16(q, k, v, cos, sin, keys, values, pos0, rows, heads, kv_heads, head_dim)
 * rope_qk_cache_bf16_at_step(q, k, v, cos, sin, keys, values, step, positions, heads, kv_heads,
 *                            head_dim)
 *   The attention's position-dependent work of rows at positions pos0.. of a KV cache in one
 *   launch: q (rows, heads * D) and k (rows, kv_heads * D) rotated in place as
 *   rope_forward_bf16 rotates them, the rotated k also written into keys rows pos0.., and
 *   v (rows, kv_heads * D) copied into values rows pos0..; cos, sin are the cache's tables of
 *   every position (positions, D/2), keys and values (positions, kv_heads * D) (the host checks
 *   pos0 + rows <= positions for all four). Bit for bit two rope_forward_bf16 and two copies.
 *   The _at_step variant runs one row at position *step, read from device memory, so a captured
 *   CUDA graph replays for every decode step; nothing when *step is outside 0..positions.
 *   q, k, v, keys and values must not alias one another.
 *   Launch: 1-D, ROPE_THREADS threads per CTA, one thread per pair of q, then one per pair of k
 *   (which also moves the pair of v at the same place): grid = ceil(rows * (heads + kv_heads) *
 *   D / 2 / 256).
 *   Checked against: the four kernels it replaces, bits equal (sun selftest, "rope q,k + cache"
 *   rows), and backend::cpu::rope_forward.
 */

#include "common.cuh"
#include "pdl.cuh"

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

/* Pair p of the rows' q pairs then k pairs (see the header); pos0: the position of row 0. */
__device__ __forceinline__ void rope_qk_cache(uint16_t* __restrict__ q, uint16_t* __restrict__ k,
                                              const uint16_t* __restrict__ v,
                                              const float* __restrict__ cos_t,
                                              const float* __restrict__ sin_t,
                                              uint16_t* __restrict__ keys,
                                              uint16_t* __restrict__ values, int64_t pos0,
                                              int64_t rows, int64_t heads, int64_t kv_heads,
                                              int64_t head_dim) {
    const int64_t half = head_dim / 2;
    const int64_t q_pairs = rows * heads * half;
    const int64_t k_pairs = rows * kv_heads * half;
    const int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= q_pairs + k_pairs) return;
    const bool is_q = p < q_pairs;
    const int64_t pair = is_q ? p : p - q_pairs;
    const int64_t row_heads = is_q ? heads : kv_heads;
    const int64_t row = pair / (row_heads * half);
    const int64_t within = pair - row * row_heads * half;
    const int64_t head = within / half;
    const int64_t i = within - head * half;
    const int64_t angle = (pos0 + row) * half + i;
    const float c = cos_t[angle];
    const float s = sin_t[angle];
    const int64_t offset = row * row_heads * head_dim + head * head_dim + i; /* x1; x2 = + half */
    uint16_t* x = is_q ? q : k;
    const float a = bf16_bits_to_f32(x[offset]), b = bf16_bits_to_f32(x[offset + half]);
    const uint16_t r1 = f32_to_bf16_bits(a * c - b * s);
    const uint16_t r2 = f32_to_bf16_bits(b * c + a * s);
    x[offset] = r1;
    x[offset + half] = r2;
    if (!is_q) {
        /* Cache row pos0 + row: the same layout as k's row, kv_heads * D wide. */
        const int64_t cached = pos0 * kv_heads * head_dim + offset;
        keys[cached] = r1;
        keys[cached + half] = r2;
        values[cached] = v[offset];
        values[cached + half] = v[offset + half];
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qk_cache_bf16(uint16_t* q, uint16_t* k, const uint16_t* v, const float* cos_t,
                   const float* sin_t, uint16_t* keys, uint16_t* values, int64_t pos0,
                   int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim) {
    pdl_wait(); /* q, k, v: the previous kernel's output; before the cache writes */
    pdl_launch_dependents();
    rope_qk_cache(q, k, v, cos_t, sin_t, keys, values, pos0, rows, heads, kv_heads, head_dim);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qk_cache_bf16_at_step(uint16_t* q, uint16_t* k, const uint16_t* v, const float* cos_t,
                           const float* sin_t, uint16_t* keys, uint16_t* values,
                           const int64_t* step, int64_t positions, int64_t heads,
                           int64_t kv_heads, int64_t head_dim) {
    pdl_wait(); /* before the step's position, q, k and v, and any write */
    pdl_launch_dependents();
    const int64_t pos = *step;
    if (pos < 0 || pos >= positions) return;
    rope_qk_cache(q, k, v, cos_t, sin_t, keys, values, pos, 1, heads, kv_heads, head_dim);
}
