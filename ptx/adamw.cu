/*
 * adamw.cu: the optimizer step and the gradient norm, in f32.
 *
 * adamw32_step(params, grads, m, v, n, beta1, beta2, eps_scaled, step_size, decay,
 *              apply_decay, grad_scale)
 *   params, grads, m, v: (n,) f32 (m and v may be managed memory: the kernel only sees
 *   addresses). bitsandbytes' 32-bit two-state AdamW (kOptimizer32bit2State, ADAM), per element
 *   (adamw32_element, shared with adamw32_multi so that both do the same instructions):
 *     g = grads[i] * grad_scale             (grad_scale: the clipping coefficient, or 1)
 *     skip the element entirely when g is NaN or infinite
 *     m = m * beta1 + (1 - beta1) * g
 *     v = v * beta2 + (1 - beta2) * g * g
 *     p = p + step_size * m / (sqrt(v) + eps_scaled)
 *     p = p * decay                          (only when apply_decay: decoupled, after the update)
 *   The host computes, in f32 as optim::adamw_step does: c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t),
 *   step_size = -lr * c2 / c1, eps_scaled = eps * c2, decay = 1 - lr * weight_decay.
 *   Launch: 1-D, OPT_THREADS (256) threads per CTA, one element per thread, grid = ceil(n / 256).
 *   Checked against: optim::adamw_step ("adamw" rows of sun selftest).
 *
 * Multi-tensor kernels. A stage's tensors are described by a device table of TensorEntry (8
 * 64-bit words each, written by backend/cuda/adamw_multi.rs): the f32 params, the f32 grads,
 * the first and second moments (addresses inside a MomentArena), the bf16 copy, the length n
 * and first_chunk, the number of MT_CHUNK-value (4096) chunks of the tensors before it. Chunk
 * c of the whole set is chunk c - first_chunk of tensor chunk_tensor[c] (a (chunks,) i32 array
 * beside the table); it covers that tensor's values [(c - first_chunk) * MT_CHUNK, + MT_CHUNK),
 * cut at n. Launch: 1-D, OPT_THREADS threads per CTA, one CTA per chunk (grid = chunks), each
 * thread strides over its chunk by OPT_THREADS (sum_partials_f64: one CTA). Tensors must not
 * overlap each other (the host passes distinct buffers and disjoint moment ranges).
 *
 * sum_squares_multi(tensors, chunk_tensor, partials)
 *   partials (chunks,) f64: partials[c] = sum of grads^2 over chunk c, in f64 (each thread sums
 *   its values in a fixed order, the CTA reduces with a fixed butterfly and tree). Reads only
 *   the grads of the table (other addresses may be null).
 * sum_partials_f64(partials, count, total)
 *   total (1,) f64 = sum of partials (count,): one CTA of PARTIAL_THREADS (1024) threads;
 *   thread t sums partials t, t + PARTIAL_THREADS, ... in that order, then the CTA's fixed
 *   reduction. Together the two kernels give the global norm's sum of squares with the same
 *   rounding on every run (no atomics): the host takes the square root. Checked against:
 *   optim::global_norm ("global norm" rows) and an f64 host sum ("multi-tensor sum of squares"
 *   rows).
 * adamw32_multi(tensors, chunk_tensor, beta1, beta2, eps_scaled, step_size, decay, apply_decay,
 *               grad_scale)
 *   Per value of every tensor: adamw32_step's update (bit for bit the same params, m and v),
 *   then bf16[i] = bf16(params[i]) (f32_to_bf16's rounding: nearest even) and grads[i] = 0,
 *   which is what adamw32_step, f32_to_bf16 and fill_u32(0) do one tensor at a time. A value
 *   whose scaled gradient is not finite keeps its params, m and v; its bf16 copy is rewritten
 *   from the unchanged params and its gradient still zeroed. Checked against: those per-tensor
 *   kernels, bit for bit ("adamw multi-tensor ... (exact)" rows).
 */

#include "common.cuh"

#define OPT_THREADS 256
/* Threads of sum_partials_f64's one CTA (PARTIAL_THREADS in backend/cuda/adamw_multi.rs). */
#define PARTIAL_THREADS 1024
/* Values one CTA of the multi-tensor kernels covers (CHUNK in backend/cuda/adamw_multi.rs). */
#define MT_CHUNK 4096

/* One tensor of a multi-tensor launch (TensorEntry words in backend/cuda/adamw_multi.rs). */
struct TensorEntry {
    float* params;       /* (n,) f32 master values */
    float* grads;        /* (n,) f32 */
    float* m;            /* (n,) f32 first moments */
    float* v;            /* (n,) f32 second moments */
    uint16_t* bf16;      /* (n,) bf16 copy of params */
    int64_t n;
    int64_t first_chunk; /* chunks of the tensors before this one */
    int64_t unused;      /* pads the entry to 64 bytes */
};
static_assert(sizeof(TensorEntry) == 64, "a table entry is 8 words");

/* One element of the 32-bit AdamW update, g already scaled and finite. */
__device__ __forceinline__ void adamw32_element(float& p, float& m, float& v, float g, float beta1,
                                                float beta2, float eps_scaled, float step_size,
                                                float decay, int apply_decay) {
    m = m * beta1 + (1.0f - beta1) * g;
    v = v * beta2 + (1.0f - beta2) * (g * g);
    p = p + step_size * (m / (sqrtf(v) + eps_scaled));
    if (apply_decay) p *= decay;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
adamw32_step(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ m,
             float* __restrict__ v, int64_t n, float beta1, float beta2, float eps_scaled,
             float step_size, float decay, int apply_decay, float grad_scale) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grads[i] * grad_scale;
    if (!isfinite(g)) return;
    float p = params[i], m_i = m[i], v_i = v[i];
    adamw32_element(p, m_i, v_i, g, beta1, beta2, eps_scaled, step_size, decay, apply_decay);
    m[i] = m_i;
    v[i] = v_i;
    params[i] = p;
}

/* Sum over the CTA in f64, the same order on every run (butterfly in each warp, then the warps'
   sums in warp order). `scratch`: 32 doubles of shared memory. Every thread must call it; every
   thread gets the result. */
__device__ __forceinline__ double block_sum_f64(double s, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, offset);
    __syncthreads();
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
    return total;
}

/* The range of tensor values chunk `c` covers: [*begin, *end). */
__device__ __forceinline__ void chunk_range(const TensorEntry& t, int64_t c, int64_t* begin,
                                            int64_t* end) {
    *begin = (c - t.first_chunk) * MT_CHUNK;
    *end = min(t.n, *begin + MT_CHUNK);
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
sum_squares_multi(const TensorEntry* __restrict__ tensors, const int32_t* __restrict__ chunk_tensor,
                  double* __restrict__ partials) {
    __shared__ double scratch[32];
    const int64_t c = blockIdx.x;
    const TensorEntry t = tensors[chunk_tensor[c]];
    int64_t begin, end;
    chunk_range(t, c, &begin, &end);
    const float* __restrict__ grads = t.grads;
    double s = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += OPT_THREADS) {
        const double x = (double)grads[i];
        s = fma(x, x, s);
    }
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partials[c] = s;
}

extern "C" __global__ void __launch_bounds__(PARTIAL_THREADS)
sum_partials_f64(const double* __restrict__ partials, int64_t count, double* __restrict__ total) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += PARTIAL_THREADS) s += partials[i];
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) total[0] = s;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
adamw32_multi(const TensorEntry* __restrict__ tensors, const int32_t* __restrict__ chunk_tensor,
              float beta1, float beta2, float eps_scaled, float step_size, float decay,
              int apply_decay, float grad_scale) {
    const int64_t c = blockIdx.x;
    const TensorEntry t = tensors[chunk_tensor[c]];
    int64_t begin, end;
    chunk_range(t, c, &begin, &end);
    float* __restrict__ params = t.params;
    float* __restrict__ grads = t.grads;
    float* __restrict__ m = t.m;
    float* __restrict__ v = t.v;
    uint16_t* __restrict__ bf16 = t.bf16;
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += OPT_THREADS) {
        float p = params[i];
        const float g = grads[i] * grad_scale;
        if (isfinite(g)) {
            float m_i = m[i], v_i = v[i];
            adamw32_element(p, m_i, v_i, g, beta1, beta2, eps_scaled, step_size, decay,
                            apply_decay);
            m[i] = m_i;
            v[i] = v_i;
            params[i] = p;
        }
        bf16[i] = f32_to_bf16_bits(p);
        grads[i] = 0.0f;
    }
}
