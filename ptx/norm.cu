/*
 * norm.cu: RMSNorm forward and backward on bf16 activations, f32 weight, f32 arithmetic.
 *
 * rmsnorm_forward_bf16(x, weight, rows, width, eps, out)
 *   x, out (rows, width) bf16 row-major; weight (width,) f32.
 *   out = weight * (x / sqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm in f32.
 *   Sum of squares, on either path: thread t of the 256 sums elements t, t + 256, ... in one
 *   fmaf chain, then block_sum (warp butterflies, then the 8 warps in order). The fused kernels
 *   (residual_rmsnorm_bf16 below, decode.cu's rmsnorm_lora_a_bf16) keep this order, and their
 *   outputs equal this kernel's bit for bit.
 *   Vector path (width % 8 == 0, x, out and weight 16-byte aligned, and width * 2 bytes of
 *   dynamic shared memory given: the host gives them up to width 16384): the row is read once,
 *   as 16-byte vectors (thread t: vectors t, t + 256, ..., NORM_LOADS = 4 loads issued before
 *   the first is used), staged in shared memory, summed from there in the order above, and
 *   scaled from there (weights as float4 pairs, mostly L1 hits), out written as 16-byte vectors.
 *   The element path (any other width) reads x twice, two bytes at a time.
 *   Checked against: backend::cpu::rmsnorm_forward (sun selftest, "rmsnorm fwd" rows).
 *
 * rmsnorm_backward_bf16(dy, x, weight, rows, width, eps, accumulate, dx)
 *   dy, x, dx (rows, width) bf16; weight (width,) f32. With r = 1 / sqrt(mean(x^2) + eps):
 *   dx = r * w * dy - x * r^3 / width * sum(w * dy * x); when accumulate != 0 the result is
 *   added to dx (the residual stream's gradient). dx must not alias dy or x.
 *   Vector path (width % 8 == 0, dy, x, dx and weight 16-byte aligned, width * 4 bytes of
 *   dynamic shared memory given: the host gives them up to width 8192): thread t loads its
 *   vectors t, t + 256, ... of x and dy, NORM_BWD_LOADS = 2 of each (4 loads) before using
 *   any, adds them into its two sums, and keeps them in shared memory (its own slots: no
 *   exchange) for the second pass, whose dx loads (accumulate) are issued two at a time before
 *   use. Sums' order there: thread t over its vectors in order, elements 0..7 of each, one
 *   fmaf chain a sum, then block_sum. The element path (any other width) keeps the order of
 *   the forward (elements t, t + 256, ...). Both deterministic; the results of the two paths
 *   differ in the last bits of the sums.
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
 * 2 * FUSED_MAX_WIDTH bytes of static shared memory for the rounded row). The forward's and the
 * backward's vector paths stage rows in dynamic shared memory (width * 2 and width * 4 bytes;
 * none given: the element path); the fused kernel takes none. Any width >= 1.
 *
 * Bandwidth (H200: 132 SMs, 64K registers and 2048 threads an SM, ~4.3 TB/s copy rate), for
 * the 7B training shape 8192 x 4096 (one CTA a row, 8192 CTAs):
 *   forward: 134.2 MB (x read once, out written once; the 16 KB weight stays in L1/L2), bound
 *   31.2 us. 32 registers (__launch_bounds__(256, 8)) and 8 KB of shared memory a CTA: 8 CTAs
 *   an SM (7.8 waves), 2 x 16 B of x a thread loaded at once, 64 KB an SM in flight while the
 *   CTAs load (the element path's loop kept one two-byte load a thread in flight, 4 KB an SM,
 *   and read x twice: 92.4 us, 34%). The fused residual kernel, with 72 KB an SM in flight
 *   (3 CTAs of 24 KB) and the same one-CTA-a-row structure, runs at 91% of its bound.
 *   Prediction: ~38 us (~82%); the time a CTA spends in its barriers and block_sum, not
 *   loading, is what keeps it from the fused kernel's 91%.
 *   backward: 201.3 MB (dy, x read, dx written; accumulate adds a read of dx, 268.4 MB), bound
 *   46.8 us. 40 registers (__launch_bounds__(256, 6), 32 spill) and 16 KB of shared memory: 6
 *   CTAs an SM (10.3 waves), 4 x 16 B loads a thread at once, 96 KB an SM in flight in the
 *   first pass. Was 114.5 us (41%). Prediction: ~57 us (~82%); accumulate ~76 us.
 */

#include "common.cuh"
#include "pdl.cuh"
#include "vec8.cuh"

#define NORM_THREADS 256
/* The fused kernel's vectorized path: 4-element vectors a thread holds, and the widest row. */
#define FUSED_MAX_VECS 8
#define FUSED_MAX_WIDTH (FUSED_MAX_VECS * 4 * NORM_THREADS)

/* The vector paths (16-byte vectors of 8 bf16): vectors a thread loads before it stores or uses
   any, and the CTAs an SM the register budget is set for (forward 8 x 256 threads: 32
   registers; backward 6 x 256: 40 registers, where 32 spill). */
#define NORM_LOADS 4
#define NORM_BWD_LOADS 2
#define NORM_CTAS_PER_SM 8
#define NORM_BWD_CTAS_PER_SM 6

/* Bytes of dynamic shared memory the launch gave this CTA. */
__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

/* The eight f32 weights of vector q (weight 16-byte aligned). */
__device__ __forceinline__ void load_weight8(const float* __restrict__ weight, int q,
                                             float (&w)[BF16_PER_VEC]) {
    const float4* wv = reinterpret_cast<const float4*>(weight) + 2 * q;
    const float4 lo = __ldg(wv), hi = __ldg(wv + 1);
    w[0] = lo.x, w[1] = lo.y, w[2] = lo.z, w[3] = lo.w;
    w[4] = hi.x, w[5] = hi.y, w[6] = hi.z, w[7] = hi.w;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS, NORM_CTAS_PER_SM)
rmsnorm_forward_bf16(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                     int64_t rows, int64_t width, float eps, uint16_t* __restrict__ out) {
    extern __shared__ uint4 staged[]; /* the vector path's copy of the row: width bf16 */
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return; /* uniform across the CTA: no thread reaches a barrier */
    pdl_wait(); /* x: the previous kernel's output (a decode step's final norm) */
    pdl_launch_dependents();
    const uint16_t* xr = x + row * width;
    uint16_t* outr = out + row * width;
    /* Uniform across the CTA (the launch, the width and the row's pointers). */
    const bool vectorized = blockDim.x == NORM_THREADS && width % BF16_PER_VEC == 0 &&
                            width <= (int64_t)(dynamic_smem_bytes() / 2) && aligned16(xr) &&
                            aligned16(outr) && aligned16(weight);
    if (vectorized) {
        const int vecs = (int)(width / BF16_PER_VEC);
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        /* The row, once from memory: NORM_LOADS vectors a thread in flight, then into shared. */
        for (int first = threadIdx.x; first < vecs; first += NORM_LOADS * NORM_THREADS) {
            uint4 loaded[NORM_LOADS];
#pragma unroll
            for (int j = 0; j < NORM_LOADS; ++j) {
                const int q = first + j * NORM_THREADS;
                if (q < vecs) loaded[j] = xv[q];
            }
#pragma unroll
            for (int j = 0; j < NORM_LOADS; ++j) {
                const int q = first + j * NORM_THREADS;
                if (q < vecs) staged[q] = loaded[j];
            }
        }
        __syncthreads();
        /* The element path's order: thread t sums elements t, t + 256, ... (one fmaf chain). */
        const uint16_t* staged_bits = reinterpret_cast<const uint16_t*>(staged);
        float sum_sq = 0.0f;
        for (int c = threadIdx.x; c < (int)width; c += NORM_THREADS) {
            const float v = bf16_bits_to_f32(staged_bits[c]);
            sum_sq = fmaf(v, v, sum_sq);
        }
        sum_sq = block_sum(sum_sq, scratch);
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)width + eps);
        uint4* ov = reinterpret_cast<uint4*>(outr);
        for (int q = threadIdx.x; q < vecs; q += NORM_THREADS) {
            float v[BF16_PER_VEC], w[BF16_PER_VEC];
            unpack_bf16x8(staged[q], v);
            load_weight8(weight, q, w);
#pragma unroll
            for (int k = 0; k < BF16_PER_VEC; ++k) v[k] = w[k] * (v[k] * inv_rms);
            ov[q] = pack_bf16x8(v);
        }
    } else {
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
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS, NORM_BWD_CTAS_PER_SM)
rmsnorm_backward_bf16(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ x,
                      const float* __restrict__ weight, int64_t rows, int64_t width, float eps,
                      int accumulate, uint16_t* __restrict__ dx) {
    extern __shared__ uint4 staged[]; /* the vector path's rows: x (width bf16), then dy */
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return;
    const uint16_t* xr = x + row * width;
    const uint16_t* dyr = dy + row * width;
    uint16_t* dxr = dx + row * width;
    const bool vectorized = blockDim.x == NORM_THREADS && width % BF16_PER_VEC == 0 &&
                            width <= (int64_t)(dynamic_smem_bytes() / 4) && aligned16(xr) &&
                            aligned16(dyr) && aligned16(dxr) && aligned16(weight);
    float sum_sq = 0.0f, sum_wdyx = 0.0f;
    if (vectorized) {
        const int vecs = (int)(width / BF16_PER_VEC);
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        const uint4* dyv = reinterpret_cast<const uint4*>(dyr);
        uint4* dxv = reinterpret_cast<uint4*>(dxr);
        uint4* staged_x = staged;
        uint4* staged_dy = staged + vecs;
        /* Thread t's vectors q = t, t + 256, ... in order, each element 0..7: the sums' order.
           Each thread reads back from shared memory only the vectors it wrote itself. */
        for (int first = threadIdx.x; first < vecs; first += NORM_BWD_LOADS * NORM_THREADS) {
            uint4 xs[NORM_BWD_LOADS], dys[NORM_BWD_LOADS];
#pragma unroll
            for (int j = 0; j < NORM_BWD_LOADS; ++j) {
                const int q = first + j * NORM_THREADS;
                if (q < vecs) {
                    xs[j] = xv[q];
                    dys[j] = dyv[q];
                }
            }
#pragma unroll
            for (int j = 0; j < NORM_BWD_LOADS; ++j) {
                const int q = first + j * NORM_THREADS;
                if (q < vecs) {
                    staged_x[q] = xs[j];
                    staged_dy[q] = dys[j];
                    float xf[BF16_PER_VEC], dyf[BF16_PER_VEC], w[BF16_PER_VEC];
                    unpack_bf16x8(xs[j], xf);
                    unpack_bf16x8(dys[j], dyf);
                    load_weight8(weight, q, w);
#pragma unroll
                    for (int k = 0; k < BF16_PER_VEC; ++k) {
                        sum_sq = fmaf(xf[k], xf[k], sum_sq);
                        sum_wdyx = fmaf(dyf[k] * w[k], xf[k], sum_wdyx);
                    }
                }
            }
        }
        sum_sq = block_sum(sum_sq, scratch);
        sum_wdyx = block_sum(sum_wdyx, scratch);
        const float r = 1.0f / sqrtf(sum_sq / (float)width + eps);
        const float coef = r * r * r / (float)width * sum_wdyx;
        for (int first = threadIdx.x; first < vecs; first += NORM_BWD_LOADS * NORM_THREADS) {
            uint4 old[NORM_BWD_LOADS];
            if (accumulate) {
#pragma unroll
                for (int j = 0; j < NORM_BWD_LOADS; ++j) {
                    const int q = first + j * NORM_THREADS;
                    if (q < vecs) old[j] = dxv[q];
                }
            }
#pragma unroll
            for (int j = 0; j < NORM_BWD_LOADS; ++j) {
                const int q = first + j * NORM_THREADS;
                if (q < vecs) {
                    float xf[BF16_PER_VEC], dyf[BF16_PER_VEC], w[BF16_PER_VEC];
                    unpack_bf16x8(staged_x[q], xf);
                    unpack_bf16x8(staged_dy[q], dyf);
                    load_weight8(weight, q, w);
                    float v[BF16_PER_VEC];
#pragma unroll
                    for (int k = 0; k < BF16_PER_VEC; ++k) v[k] = r * w[k] * dyf[k] - xf[k] * coef;
                    if (accumulate) {
                        float prev[BF16_PER_VEC];
                        unpack_bf16x8(old[j], prev);
#pragma unroll
                        for (int k = 0; k < BF16_PER_VEC; ++k) v[k] += prev[k];
                    }
                    dxv[q] = pack_bf16x8(v);
                }
            }
        }
    } else {
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
