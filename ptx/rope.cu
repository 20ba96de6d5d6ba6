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
 *   head_dim must be even (the host checks). Each pair's roundings are spelled out
 *   (rotate_pair, rope_pair.cuh): the bits are those of the one-pair-a-thread kernels before the
 *   vector path.
 *   Vector path (head_dim % 16 == 0, x, cos and sin 16-byte aligned, fewer than 2^32 elements):
 *   a unit is 8 pairs of one head, x1 and x2 one 16-byte vector each (both loads issued before
 *   either is used) and the 8 angles two float4 of cos and two of sin (read by every head of
 *   the row: L1 hits after the first); units in (row, head, group) order, so a warp reads
 *   whole 128-byte lines. Index arithmetic in 32 bits. Element path otherwise: one pair at a
 *   time.
 *   Launch: 1-D, ROPE_THREADS (256) threads per CTA, a grid-stride loop over units (vector
 *   path) or pairs; the host sizes the grid at one unit a thread, ceil(rows * heads * head_dim
 *   / 16 / 256), when head_dim % 16 == 0, else one pair a thread. __launch_bounds__(256, 6):
 *   40 registers (at 32 the vector path spills), 6 CTAs an SM.
 *   Bandwidth at 8192 x 32 x 128 (the 7B training q): 134.2 MB of x read and written in place
 *   plus 4.2 MB of angles, 138.4 MB, bound 32.2 us. 2,097,152 units, 8192 CTAs (10.3 waves of
 *   6 x 132); 32 B of x a thread in flight, 48 KB an SM (the pair-a-thread kernel had 4 B a
 *   thread, two 2-byte loads: 94.5 us, 34%). Prediction: forward and backward ~40 us (~80%).
 *   Checked against: backend::cpu::rope_forward, backend::cpu_backward::rope_backward
 *   (sun selftest, "rope" rows).
 *
 * rope_qk_cache_bf16(q, k, v, cos, sin, keys, values, pos0, rows, heads, kv_heads, head_dim)
 *   The attention's position-dependent work of rows at positions pos0.. of a KV cache in one
 *   launch: q (rows, heads * D) and k (rows, kv_heads * D) rotated in place as
 *   rope_forward_bf16 rotates them, the rotated k also written into keys rows pos0.., and
 *   v (rows, kv_heads * D) copied into values rows pos0..; cos, sin are the cache's tables of
 *   every position (positions, D/2), keys and values (positions, kv_heads * D) (the host checks
 *   pos0 + rows <= positions for all four). Bit for bit two rope_forward_bf16 and two copies.
 *   Used by chunks of several rows (prefill); a decode step's single row is rotated and cached
 *   by the fused decode attention (attention.cu, attention_decode_step_*), with the same
 *   rotate_pair, so both write the same cache bits.
 *   q, k, v, keys and values must not alias one another.
 *   Launch: 1-D, ROPE_THREADS threads per CTA, one thread per pair of q, then one per pair of k
 *   (which also moves the pair of v at the same place): grid = ceil(rows * (heads + kv_heads) *
 *   D / 2 / 256).
 *   Checked against: the four kernels it replaces, bits equal (sun selftest, "rope q,k + cache"
 *   rows), and backend::cpu::rope_forward.
 */

#include "common.cuh"
#include "vec8.cuh"
#include "rope_pair.cuh"

#define ROPE_THREADS 256
/* CTAs an SM the training kernels' register budget is set for (6 x 256 threads: 40 registers;
   at 32 the vector path spills). */
#define ROPE_CTAS_PER_SM 6

/* The vector path: unit u of the rows' (row, head, group) triples rotates pairs i .. i + 7 of a
   head, x1 and x2 one 16-byte vector each. Every element offset fits 32 bits (the caller
   checks): 32-bit index arithmetic, whose divisions cost a fraction of 64-bit ones; u + stride
   stays below 2^32 for the host's grid (at most one thread a unit, 255 over). */
template <bool Backward>
__device__ __forceinline__ void rope_vectors(uint16_t* __restrict__ x,
                                             const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, uint32_t rows,
                                             uint32_t heads, uint32_t half) {
    typedef uint32_t Index;
    const Index groups = half / BF16_PER_VEC; /* vectors in half a head */
    const Index units = rows * heads * groups;
    const Index stride = (Index)gridDim.x * blockDim.x;
    for (Index u = (Index)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
        const Index row_head = u / groups; /* row * heads + head */
        const Index i = (u - row_head * groups) * BF16_PER_VEC;
        const Index row = row_head / heads;
        uint4* x1 = reinterpret_cast<uint4*>(x + row_head * 2 * half + i);
        uint4* x2 = reinterpret_cast<uint4*>(x + row_head * 2 * half + half + i);
        const float4* cv = reinterpret_cast<const float4*>(cos_t + row * half + i);
        const float4* sv = reinterpret_cast<const float4*>(sin_t + row * half + i);
        const uint4 a_bits = *x1, b_bits = *x2;
        const float4 c_lo = __ldg(cv), c_hi = __ldg(cv + 1);
        const float4 s_lo = __ldg(sv), s_hi = __ldg(sv + 1);
        float a[BF16_PER_VEC], b[BF16_PER_VEC];
        unpack_bf16x8(a_bits, a);
        unpack_bf16x8(b_bits, b);
        const float c[BF16_PER_VEC] = {c_lo.x, c_lo.y, c_lo.z, c_lo.w,
                                       c_hi.x, c_hi.y, c_hi.z, c_hi.w};
        const float sn[BF16_PER_VEC] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w,
                                        s_hi.x, s_hi.y, s_hi.z, s_hi.w};
        float r1[BF16_PER_VEC], r2[BF16_PER_VEC];
#pragma unroll
        for (int k = 0; k < BF16_PER_VEC; ++k)
            rotate_pair<Backward>(a[k], b[k], c[k], sn[k], r1[k], r2[k]);
        *x1 = pack_bf16x8(r1);
        *x2 = pack_bf16x8(r2);
    }
}

template <bool Backward>
__device__ __forceinline__ void rope(uint16_t* __restrict__ x, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, int64_t rows,
                                     int64_t heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    /* Uniform across the grid. */
    if (half % BF16_PER_VEC == 0 && rows * heads * head_dim <= (int64_t)UINT32_MAX &&
        aligned16(x) && aligned16(cos_t) && aligned16(sin_t)) {
        rope_vectors<Backward>(x, cos_t, sin_t, (uint32_t)rows, (uint32_t)heads, (uint32_t)half);
        return;
    }
    /* Element path: one pair at a time, p over the rows' (row, head, i) triples. */
    const int64_t pairs = rows * heads * half;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += stride) {
        const int64_t row = p / (heads * half);
        const int64_t within = p - row * heads * half;
        const int64_t head = within / half;
        const int64_t i = within - head * half;
        uint16_t* x1 = x + row * heads * head_dim + head * head_dim + i;
        uint16_t* x2 = x1 + half;
        float r1, r2;
        rotate_pair<Backward>(bf16_bits_to_f32(*x1), bf16_bits_to_f32(*x2),
                              cos_t[row * half + i], sin_t[row * half + i], r1, r2);
        *x1 = f32_to_bf16_bits(r1);
        *x2 = f32_to_bf16_bits(r2);
    }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS, ROPE_CTAS_PER_SM)
rope_forward_bf16(uint16_t* x, const float* cos_t, const float* sin_t, int64_t rows,
                  int64_t heads, int64_t head_dim) {
    rope<false>(x, cos_t, sin_t, rows, heads, head_dim);
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS, ROPE_CTAS_PER_SM)
rope_backward_bf16(uint16_t* x, const float* cos_t, const float* sin_t, int64_t rows,
                   int64_t heads, int64_t head_dim) {
    rope<true>(x, cos_t, sin_t, rows, heads, head_dim);
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
    const int64_t offset = row * row_heads * head_dim + head * head_dim + i; /* x1; x2 = + half */
    uint16_t* x = is_q ? q : k;
    float rotated1, rotated2;
    rotate_pair<false>(bf16_bits_to_f32(x[offset]), bf16_bits_to_f32(x[offset + half]),
                       cos_t[angle], sin_t[angle], rotated1, rotated2);
    const uint16_t r1 = f32_to_bf16_bits(rotated1);
    const uint16_t r2 = f32_to_bf16_bits(rotated2);
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
    rope_qk_cache(q, k, v, cos_t, sin_t, keys, values, pos0, rows, heads, kv_heads, head_dim);
}
