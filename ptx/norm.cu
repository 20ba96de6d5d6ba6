/*
 * norm.cu: RMSNorm forward and backward on bf16 activations, f32 weight, f32 arithmetic.
 *
 * rmsnorm_forward_bf16(x, weight, rows, width, eps, out)
 *   x, out (rows, width) bf16 row-major; weight (width,) f32.
 *   out = weight * (x / sqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm in f32.
 *   Checked against: backend::cpu::rmsnorm_forward (sun selftest, "rmsnorm fwd" rows).
 *
 * rmsnorm_backward_bf16(dy, x, weight, rows, width, eps, accumulate, dx)
 *   dy, x, dx (rows, width) bf16; weight (width,) f32. With r = 1 / sqrt(mean(x^2) + eps):
 *   dx = r * w * dy - x * r^3 / width * sum(w * dy * x); when accumulate != 0 the result is
 *   added to dx (the residual stream's gradient). dx must not alias dy or x.
 *   Checked against: backend::cpu_backward::rmsnorm_backward ("rmsnorm bwd" rows).
 *
 * residual_rmsnorm_bf16(x, proj, weight, rows, width, eps, y, y_bf16, out)
 *   x, y (rows, width) f32; proj, y_bf16, out (rows, width) bf16; weight (width,) f32.
 *   y = x + proj (the residual stream after a block), y_bf16 = bf16(y), out = RMSNorm(y_bf16):
 *   bit for bit what copy (x -> y), residual_add_bf16 (y += proj, y_bf16) and
 *   rmsnorm_forward_bf16 (y_bf16 -> out) produce, in one launch. The norm sums the squares of
 *   the bf16-rounded values with the same per-thread order (thread t: elements t, t + 256, ...,
 *   one fmaf chain) and the same block_sum as rmsnorm_forward_bf16. y must not alias x, and no
 *   output may alias an input or another output.
 *   Vectorized path (width % 4 == 0, width <= FUSED_MAX_WIDTH, x, weight, y 16-byte aligned and
 *   proj, y_bf16, out 8-byte aligned; the kernel checks): thread t owns the 4-element vectors
 *   t, t + 256, ... (at most FUSED_MAX_VECS) and issues every load of its vectors (x, proj and
 *   the weight) before using any, so the row costs one memory round trip, not one per element
 *   pass; the rounded values go through shared memory (bf16 bits) so that the sum of squares
 *   keeps rmsnorm_forward_bf16's element order. Otherwise element by element, in that order.
 *   Checked against: the three kernels it replaces, bits equal ("residual+rmsnorm = separate"
 *   rows), and backend::cpu::rmsnorm_forward on bf16(x + proj) ("residual+rmsnorm fwd" rows).
 *
 * Launch (all): grid (rows,), one CTA per row; block NORM_THREADS (256) threads striding over
 * the row; the row sums use warp shuffles and 32 floats of shared memory (the fused kernel also
 * 2 * FUSED_MAX_WIDTH bytes of static shared memory for the rounded row). No dynamic shared
 * memory. Any width >= 1.
 */

#include "common.cuh"
#include "pdl.cuh"

#define NORM_THREADS 256
/* The fused kernel's vectorized path: 4-element vectors a thread holds, and the widest row. */
#define FUSED_MAX_VECS 8
#define FUSED_MAX_WIDTH (FUSED_MAX_VECS * 4 * NORM_THREADS)

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
rmsnorm_forward_bf16(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                     int64_t rows, int64_t width, float eps, uint16_t* __restrict__ out) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return; /* uniform across the CTA: no thread reaches a barrier */
    pdl_wait(); /* x: the previous kernel's output (a decode step's final norm) */
    pdl_launch_dependents();
    const uint16_t* xr = x + row * width;
    uint16_t* outr = out + row * width;
    float sum_sq = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
        float v = bf16_bits_to_f32(xr[c]);
        sum_sq = fmaf(v, v, sum_sq);
    }
    sum_sq = block_sum(sum_sq, scratch);
    const float inv_rms = 1.0f / sqrtf(sum_sq / (float)width + eps);
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x)
        outr[c] = f32_to_bf16_bits(weight[c] * (bf16_bits_to_f32(xr[c]) * inv_rms));
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
rmsnorm_backward_bf16(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ x,
                      const float* __restrict__ weight, int64_t rows, int64_t width, float eps,
                      int accumulate, uint16_t* __restrict__ dx) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return;
    const uint16_t* xr = x + row * width;
    const uint16_t* dyr = dy + row * width;
    uint16_t* dxr = dx + row * width;
    float sum_sq = 0.0f, sum_wdyx = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
        float xv = bf16_bits_to_f32(xr[c]);
        sum_sq = fmaf(xv, xv, sum_sq);
        sum_wdyx = fmaf(bf16_bits_to_f32(dyr[c]) * weight[c], xv, sum_wdyx);
    }
    sum_sq = block_sum(sum_sq, scratch);
    sum_wdyx = block_sum(sum_wdyx, scratch);
    const float r = 1.0f / sqrtf(sum_sq / (float)width + eps);
    const float coef = r * r * r / (float)width * sum_wdyx;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
        float v = r * weight[c] * bf16_bits_to_f32(dyr[c]) - bf16_bits_to_f32(xr[c]) * coef;
        if (accumulate) v += bf16_bits_to_f32(dxr[c]);
        dxr[c] = f32_to_bf16_bits(v);
    }
}

/* bf16 bits of the low / high half of a 32-bit pair (element 2i in the low half). */
__device__ __forceinline__ float pair_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float pair_hi(uint32_t pair) {
    return __uint_as_float(pair & 0xFFFF0000u);
}

__device__ __forceinline__ uint32_t pack_bf16_pair(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
residual_rmsnorm_bf16(const float* __restrict__ x, const uint16_t* __restrict__ proj,
                      const float* __restrict__ weight, int64_t rows, int64_t width, float eps,
                      float* __restrict__ y, uint16_t* __restrict__ y_bf16,
                      uint16_t* __restrict__ out) {
    __shared__ float scratch[32];
    /* the row's y_bf16, written with 8-byte stores */
    __shared__ __align__(16) uint16_t rounded[FUSED_MAX_WIDTH];
    const int64_t row = blockIdx.x;
    if (row >= rows) return; /* uniform across the CTA: no thread reaches a barrier */
    const int64_t base = row * width;
    const bool aligned16 = (((uintptr_t)(x + base) | (uintptr_t)weight | (uintptr_t)(y + base)) &
                            15) == 0;
    const bool aligned8 =
        (((uintptr_t)(proj + base) | (uintptr_t)(y_bf16 + base) | (uintptr_t)(out + base)) & 7) ==
        0;
    /* Uniform across the CTA (depends on the row's pointers and width only). */
    const bool vectorized = blockDim.x == NORM_THREADS && width % 4 == 0 &&
                            width <= FUSED_MAX_WIDTH && aligned16 && aligned8;
    float sum_sq = 0.0f;
    if (vectorized) {
        const int vecs = (int)(width / 4);
        const float4* xv = reinterpret_cast<const float4*>(x + base);
        const uint2* pv = reinterpret_cast<const uint2*>(proj + base);
        const float4* wv = reinterpret_cast<const float4*>(weight);
        float4* yv = reinterpret_cast<float4*>(y + base);
        uint2* ybv = reinterpret_cast<uint2*>(y_bf16 + base);
        uint2* ov = reinterpret_cast<uint2*>(out + base);
        float4 xs[FUSED_MAX_VECS], ws[FUSED_MAX_VECS];
        uint2 ps[FUSED_MAX_VECS], bits[FUSED_MAX_VECS];
        /* Every load first: vector q = t + 256 i holds elements 4q .. 4q + 3. */
#pragma unroll
        for (int i = 0; i < FUSED_MAX_VECS; ++i) {
            const int q = threadIdx.x + i * NORM_THREADS;
            if (q < vecs) {
                xs[i] = xv[q];
                ps[i] = pv[q];
                ws[i] = __ldg(wv + q);
            }
        }
#pragma unroll
        for (int i = 0; i < FUSED_MAX_VECS; ++i) {
            const int q = threadIdx.x + i * NORM_THREADS;
            if (q < vecs) {
                float4 v;
                v.x = xs[i].x + pair_lo(ps[i].x);
                v.y = xs[i].y + pair_hi(ps[i].x);
                v.z = xs[i].z + pair_lo(ps[i].y);
                v.w = xs[i].w + pair_hi(ps[i].y);
                yv[q] = v;
                const uint16_t b0 = f32_to_bf16_bits(v.x), b1 = f32_to_bf16_bits(v.y);
                const uint16_t b2 = f32_to_bf16_bits(v.z), b3 = f32_to_bf16_bits(v.w);
                bits[i] = make_uint2(pack_bf16_pair(b0, b1), pack_bf16_pair(b2, b3));
                ybv[q] = bits[i];
                *reinterpret_cast<uint2*>(rounded + 4 * q) = bits[i];
            }
        }
        __syncthreads();
        /* rmsnorm_forward_bf16's order: element t, t + 256, ... of the rounded row. */
        for (int c = threadIdx.x; c < (int)width; c += NORM_THREADS) {
            const float v = bf16_bits_to_f32(rounded[c]);
            sum_sq = fmaf(v, v, sum_sq);
        }
        sum_sq = block_sum(sum_sq, scratch);
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)width + eps);
#pragma unroll
        for (int i = 0; i < FUSED_MAX_VECS; ++i) {
            const int q = threadIdx.x + i * NORM_THREADS;
            if (q < vecs) {
                const uint16_t o0 = f32_to_bf16_bits(ws[i].x * (pair_lo(bits[i].x) * inv_rms));
                const uint16_t o1 = f32_to_bf16_bits(ws[i].y * (pair_hi(bits[i].x) * inv_rms));
                const uint16_t o2 = f32_to_bf16_bits(ws[i].z * (pair_lo(bits[i].y) * inv_rms));
                const uint16_t o3 = f32_to_bf16_bits(ws[i].w * (pair_hi(bits[i].y) * inv_rms));
                ov[q] = make_uint2(pack_bf16_pair(o0, o1), pack_bf16_pair(o2, o3));
            }
        }
    } else {
        const float* xr = x + base;
        const uint16_t* pr = proj + base;
        float* yr = y + base;
        uint16_t* ybr = y_bf16 + base;
        uint16_t* outr = out + base;
        for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
            const float v = xr[c] + bf16_bits_to_f32(pr[c]);
            yr[c] = v;
            const uint16_t b = f32_to_bf16_bits(v);
            ybr[c] = b;
            const float r = bf16_bits_to_f32(b);
            sum_sq = fmaf(r, r, sum_sq);
        }
        sum_sq = block_sum(sum_sq, scratch);
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)width + eps);
        /* Each thread rereads only the elements it wrote itself. */
        for (int64_t c = threadIdx.x; c < width; c += blockDim.x)
            outr[c] = f32_to_bf16_bits(weight[c] * (bf16_bits_to_f32(ybr[c]) * inv_rms));
    }
}
