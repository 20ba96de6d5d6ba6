/*
 * decode.cu: the RMSNorm of a decode step's one row fused with the LoRA A products that read
 * the normalized row (a batch-1 decode step, t = 1).
 *
 * rmsnorm_lora_a_bf16(x, weight, width, eps, a0, a1, a2, r0, r1, r2, xhat, z)
 *   x (width,) bf16: the residual stream's bf16 copy; weight (width,) f32: the norm's weight;
 *   a_i (r_i, width) bf16 row-major: up to three LoRA A factors (r_i = 0: absent, a_i unused);
 *   xhat (width,) bf16 = weight * (x / sqrt(mean(x^2) + eps)): every CTA computes the row's RMS
 *   itself, with rmsnorm_forward_bf16's expression, thread order (thread t: elements t,
 *   t + 256, ..., one fmaf chain) and block_sum, so xhat is bit for bit that kernel's output;
 *   CTA 0 writes it.
 *   z (r0 + r1 + r2,) bf16 = xhat [A_0; A_1; A_2]^T (f32 sums of the bf16 xhat, rounded once):
 *   z[j] for j < r0 is row j of A_0, then r1 rows of A_1, then r2 of A_2 (three pointers, no
 *   concatenated copy of the factors).
 *   Launch: block DECODE_THREADS (256), grid max(1, ceil((r0 + r1 + r2) / 8)): warp w of CTA b
 *   computes z[8b + w] (one warp per A row: lane l reads the row's 16-byte chunks l, l + 32, ...,
 *   four loads in flight, when width % 8 == 0; element by element otherwise). Dynamic shared
 *   memory: the normalized row, width * 2 bytes rounded up to 16.
 *   Checked against: backend::cpu::rmsnorm_forward and an f64 product on the CPU ("decode
 *   rmsnorm + LoRA A" rows of sun selftest), and bits equal to rmsnorm_forward_bf16.
 *
 * Built without --use_fast_math: sqrtf and the division are the ones rmsnorm_forward_bf16 uses.
 */

#include "common.cuh"
#include "pdl.cuh"
#include "vec8.cuh"

#define DECODE_THREADS 256
#define DECODE_WARPS (DECODE_THREADS / 32)
#define A_ROW_UNROLL 4 /* 16-byte loads of an A row a lane has in flight */

/* xhat . a_row over width elements, this lane's share (summed by the caller's butterfly). */
__device__ __forceinline__ float lane_dot(const uint16_t* __restrict__ a_row,
                                          const uint16_t* xhat_sh, int64_t width, int lane) {
    float acc = 0.0f;
    if (width % 8 == 0) { /* rows start on 16-byte boundaries (base 256-byte aligned) */
        const uint4* a_vecs = reinterpret_cast<const uint4*>(a_row);
        const uint4* x_vecs = reinterpret_cast<const uint4*>(xhat_sh);
        const int64_t vecs = width / 8;
        for (int64_t i0 = lane; i0 < vecs; i0 += 32 * A_ROW_UNROLL) {
            uint4 w[A_ROW_UNROLL];
#pragma unroll
            for (int u = 0; u < A_ROW_UNROLL; ++u) {
                const int64_t i = i0 + 32 * u;
                w[u] = i < vecs ? __ldg(a_vecs + i) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < A_ROW_UNROLL; ++u) {
                const int64_t i = i0 + 32 * u;
                if (i >= vecs) break;
                acc = dot_bf16x8(w[u], x_vecs[i], acc);
            }
        }
    } else {
        for (int64_t k = lane; k < width; k += 32)
            acc = fmaf(bf16_bits_to_f32(a_row[k]), bf16_bits_to_f32(xhat_sh[k]), acc);
    }
    return acc;
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
rmsnorm_lora_a_bf16(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                    int64_t width, float eps, const uint16_t* __restrict__ a0,
                    const uint16_t* __restrict__ a1, const uint16_t* __restrict__ a2, int64_t r0,
                    int64_t r1, int64_t r2, uint16_t* __restrict__ xhat,
                    uint16_t* __restrict__ z) {
    __shared__ float scratch[32];
    extern __shared__ __align__(16) uint16_t xhat_sh[]; /* (width,) rounded up to 8 */
    if (blockDim.x != DECODE_THREADS || width < 1 || r0 < 0 || r1 < 0 || r2 < 0) return;
    const int lane = threadIdx.x & 31;
    const int64_t j = (int64_t)blockIdx.x * DECODE_WARPS + (threadIdx.x >> 5);
    const uint16_t* a_row = j < r0        ? a0 + j * width
                            : j < r0 + r1 ? a1 + (j - r0) * width
                                          : a2 + (j - r0 - r1) * width;
    /* The A row depends on no earlier kernel: its 128-byte lines head for L2 before the wait
       (PDL only). */
    if (j < r0 + r1 + r2)
        for (int64_t e = (int64_t)lane * 64; e < width; e += 32 * 64) pdl_prefetch_l2(a_row + e);
    pdl_wait(); /* x: the previous kernel's output; xhat and z may still be read by it */
    pdl_launch_dependents();

    /* rmsnorm_forward_bf16, element for element */
    float sum_sq = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = bf16_bits_to_f32(x[c]);
        sum_sq = fmaf(v, v, sum_sq);
    }
    sum_sq = block_sum(sum_sq, scratch);
    const float inv_rms = 1.0f / sqrtf(sum_sq / (float)width + eps);
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
        const uint16_t n = f32_to_bf16_bits(weight[c] * (bf16_bits_to_f32(x[c]) * inv_rms));
        xhat_sh[c] = n;
        if (blockIdx.x == 0) xhat[c] = n;
    }
    __syncthreads();

    if (j >= r0 + r1 + r2) return; /* after the last barrier */
    const float dot = warp_sum(lane_dot(a_row, xhat_sh, width, lane));
    if (lane == 0) z[j] = f32_to_bf16_bits(dot);
}
