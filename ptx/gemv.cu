/*
 * gemv.cu: dense bf16 products with few rows, y = alpha * x W^T + beta * y, f32 accumulation:
 * the LoRA factors' products and the lm_head of a decode step, where the tensor-core GEMM of
 * matmul.cu (128 x 128 tiles) would run one CTA down the whole of K.
 *
 * gemv_bf16_{aligned,any}_m{1,2,4,8}(x, w, y, m, n, k, group, alpha, beta)
 *   x (m, k) bf16 row-major, 1 <= m <= the entry point's M (1, 2, 4 or 8);
 *   w (n, k) bf16 row-major (an adapter's A (r, in) or B (out, r), the lm_head (V, C));
 *   y (m, n) bf16 row-major: y = alpha * (x w^T) + beta * y, the sum in f32; beta == 0 never
 *   reads y (it may hold anything). y must not alias x or w.
 *   _aligned: k % 8 == 0 (the host checks; cust's allocations are 256-byte aligned), every
 *   thread moves 16-byte chunks of 8 elements; _any: any k >= 1, element by element.
 *
 * Launch: block GEMV_THREADS (256); a group of `group` threads (a power of two, 1..256, the
 * host's choice) per output row, 256 / group rows per CTA: grid = ceil(n / (256 / group)).
 * Each thread of a group strides over its row's chunks (four loads in flight), the group sums by
 * warp shuffles and, when it spans several warps, through shared memory; its first thread
 * writes the m outputs of the row. Rows past n compute nothing but reach the barrier.
 *
 * Checked against: backend::gemm::matmul_nt on the bf16-rounded inputs (sun selftest, "gemv"
 * rows).
 */

#include "common.cuh"
#include "pdl.cuh"

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
#define GEMV_UNROLL 4

/* acc[i] += <x row i, w chunk> over the 8 elements of a 16-byte chunk at element offset e. */
template <int M>
__device__ __forceinline__ void gemv_chunk(const uint16_t* __restrict__ x, int64_t m, int64_t k,
                                           int64_t e, const uint4& wv, float* acc) {
    const uint32_t wpairs[4] = {wv.x, wv.y, wv.z, wv.w};
    float wf[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        wf[2 * j] = __uint_as_float(wpairs[j] << 16);
        wf[2 * j + 1] = __uint_as_float(wpairs[j] & 0xFFFF0000u);
    }
#pragma unroll
    for (int i = 0; i < M; ++i) {
        if (i < m) {
            const uint4 xv = *reinterpret_cast<const uint4*>(x + i * k + e);
            const uint32_t xpairs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc[i] = fmaf(__uint_as_float(xpairs[j] << 16), wf[2 * j], acc[i]);
                acc[i] = fmaf(__uint_as_float(xpairs[j] & 0xFFFF0000u), wf[2 * j + 1], acc[i]);
            }
        }
    }
}

template <int M, bool ALIGNED>
__device__ __forceinline__ void gemv_bf16(const uint16_t* __restrict__ x,
                                          const uint16_t* __restrict__ w,
                                          uint16_t* __restrict__ y, int64_t m, int64_t n,
                                          int64_t k, int group, float alpha, float beta) {
    __shared__ float partial[GEMV_WARPS][M];
    /* The host passes a power of two in 1..256; anything else does nothing (uniform). */
    if (group < 1 || group > GEMV_THREADS || (group & (group - 1)) != 0 || m < 1 || m > M) return;
    const int rows_per_cta = GEMV_THREADS / group;
    const int lane = threadIdx.x & (group - 1);
    const int64_t row = (int64_t)blockIdx.x * rows_per_cta + threadIdx.x / group;
    const bool active = row < n;

    /* w depends on no earlier kernel: its first chunks head for L2 before the wait (PDL only). */
    if (active && ALIGNED) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
            if (lane + u * group < k / 8) pdl_prefetch_l2(w + row * k + (lane + u * group) * 8);
    }
    pdl_wait(); /* x (and y when beta != 0): earlier kernels' output */

    float acc[M];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = 0.0f;

    if (active) {
        const uint16_t* wr = w + row * k;
        if (ALIGNED) {
            const int64_t chunks = k / 8;
            int64_t c = lane;
            for (; c + (GEMV_UNROLL - 1) * group < chunks; c += GEMV_UNROLL * group) {
                uint4 wv[GEMV_UNROLL];
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; ++u)
                    wv[u] = __ldg(reinterpret_cast<const uint4*>(wr + (c + u * group) * 8));
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; ++u)
                    gemv_chunk<M>(x, m, k, (c + u * group) * 8, wv[u], acc);
            }
            for (; c < chunks; c += group) {
                const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wr + c * 8));
                gemv_chunk<M>(x, m, k, c * 8, wv, acc);
            }
        } else {
            for (int64_t e = lane; e < k; e += group) {
                const float wf = bf16_bits_to_f32(wr[e]);
#pragma unroll
                for (int i = 0; i < M; ++i)
                    if (i < m) acc[i] = fmaf(bf16_bits_to_f32(x[i * k + e]), wf, acc[i]);
            }
        }
    }

    pdl_launch_dependents(); /* x and w are read */

    /* Sum within the group: lanes of one warp by shuffles (groups are aligned to their size, so
       xor offsets below min(group, 32) stay inside the group); every lane runs them. */
    const int in_warp = group < 32 ? group : 32;
#pragma unroll
    for (int i = 0; i < M; ++i)
        for (int offset = in_warp / 2; offset > 0; offset >>= 1)
            acc[i] += __shfl_xor_sync(0xFFFFFFFFu, acc[i], offset);
    if (group > 32) { /* uniform across the CTA */
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) {
#pragma unroll
            for (int i = 0; i < M; ++i) partial[warp][i] = acc[i];
        }
        __syncthreads();
        if (lane == 0) {
            const int first = warp, warps = group / 32;
#pragma unroll
            for (int i = 0; i < M; ++i) {
                float total = 0.0f;
                for (int q = 0; q < warps; ++q) total += partial[first + q][i];
                acc[i] = total;
            }
        }
    }
    if (active && lane == 0) {
#pragma unroll
        for (int i = 0; i < M; ++i) {
            if (i < m) {
                float v = alpha * acc[i];
                if (beta != 0.0f) v = fmaf(beta, bf16_bits_to_f32(y[i * n + row]), v);
                y[i * n + row] = f32_to_bf16_bits(v);
            }
        }
    }
}

#define GEMV_ENTRY(M, VARIANT, ALIGNED)                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                 \
        gemv_bf16_##VARIANT##_m##M(const uint16_t* x, const uint16_t* w, uint16_t* y,          \
                                   int64_t m, int64_t n, int64_t k, int group, float alpha,    \
                                   float beta) {                                               \
        gemv_bf16<M, ALIGNED>(x, w, y, m, n, k, group, alpha, beta);                           \
    }

GEMV_ENTRY(1, aligned, true)
GEMV_ENTRY(2, aligned, true)
GEMV_ENTRY(4, aligned, true)
GEMV_ENTRY(8, aligned, true)
GEMV_ENTRY(1, any, false)
GEMV_ENTRY(2, any, false)
GEMV_ENTRY(4, any, false)
GEMV_ENTRY(8, any, false)
