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
 * Launch (both): grid (rows,), one CTA per row; block NORM_THREADS (256) threads striding over
 * the row; the row sums use warp shuffles and 32 floats of shared memory. No dynamic shared
 * memory. Any width >= 1.
 */

#include "common.cuh"

#define NORM_THREADS 256

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
rmsnorm_forward_bf16(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                     int64_t rows, int64_t width, float eps, uint16_t* __restrict__ out) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return; /* uniform across the CTA: no thread reaches a barrier */
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
