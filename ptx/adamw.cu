/*
 * adamw.cu: the optimizer step and the gradient norm, in f32.
 *
 * adamw32_step(params, grads, m, v, n, beta1, beta2, eps_scaled, step_size, decay,
 *              apply_decay, grad_scale)
 *   params, grads, m, v: (n,) f32 (m and v may be managed memory: the kernel only sees
 *   addresses). bitsandbytes' 32-bit two-state AdamW (kOptimizer32bit2State, ADAM), per element:
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
 * sum_squares_f32(x, n, acc)
 *   acc (1,) f64 += sum of x[i]^2 over x (n,) f32: each thread sums a grid-stride slice in f32,
 *   the CTA reduces with warp shuffles, and one f64 atomicAdd per CTA adds the CTA's sum. The
 *   host zeroes acc, calls this once per gradient tensor and takes the square root: the global
 *   norm of clipping.
 *   Launch: 1-D, OPT_THREADS threads per CTA, any grid (the host caps it at 1024 CTAs).
 *   Checked against: optim::global_norm ("global norm" rows).
 */

#include "common.cuh"

#define OPT_THREADS 256

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
adamw32_step(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ m,
             float* __restrict__ v, int64_t n, float beta1, float beta2, float eps_scaled,
             float step_size, float decay, int apply_decay, float grad_scale) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grads[i] * grad_scale;
    if (!isfinite(g)) return;
    const float m_new = m[i] * beta1 + (1.0f - beta1) * g;
    const float v_new = v[i] * beta2 + (1.0f - beta2) * (g * g);
    float p = params[i] + step_size * (m_new / (sqrtf(v_new) + eps_scaled));
    if (apply_decay) p *= decay;
    m[i] = m_new;
    v[i] = v_new;
    params[i] = p;
}

extern "C" __global__ void __launch_bounds__(OPT_THREADS)
sum_squares_f32(const float* __restrict__ x, int64_t n, double* __restrict__ acc) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        s = fmaf(x[i], x[i], s);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(acc, (double)s);
}
