/*
 * xent.cu: cross-entropy over a chunk of logit rows, the loss and its gradient in one kernel.
 *
 * cross_entropy_f32(logits, labels, rows, vocab, scale, losses)
 * cross_entropy_bf16(logits, labels, rows, vocab, scale, losses)
 *   logits (rows, vocab) f32 or bf16, row-major, overwritten in place by the gradient;
 *   labels (rows,) i32; losses (rows,) f32. Per row, in f32:
 *     max = max_j z_j,  lse = max + log(sum_j exp(z_j - max)),  loss = lse - z[label],
 *     z_j <- (exp(z_j - lse) - [j == label]) * scale      ((softmax - onehot) * scale)
 *   A negative label (-100, the ignore index) gives loss 0 and an all-zero gradient row; a label
 *   >= vocab (which the host's upload refuses) gives a NaN loss and a zero row, never an
 *   out-of-bounds access.
 *   Launch: grid (rows,), one CTA per row; XENT_THREADS (512) threads striding over the row
 *   three times (max, sum, gradient), reductions by warp shuffles through shared memory.
 *   Checked against: the math of loss_head in model/train_pass.rs, written out in f64 in the
 *   selftest ("xent" rows).
 */

#include "common.cuh"

#define XENT_THREADS 512

__device__ __forceinline__ float load_logit(const float* row, int64_t j) { return row[j]; }
__device__ __forceinline__ float load_logit(const uint16_t* row, int64_t j) {
    return bf16_bits_to_f32(row[j]);
}
__device__ __forceinline__ void store_grad(float* row, int64_t j, float g) { row[j] = g; }
__device__ __forceinline__ void store_grad(uint16_t* row, int64_t j, float g) {
    row[j] = f32_to_bf16_bits(g);
}

template <typename Logit>
__device__ void cross_entropy(Logit* __restrict__ logits, const int32_t* __restrict__ labels,
                              int64_t rows, int64_t vocab, float scale,
                              float* __restrict__ losses) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return; /* uniform across the CTA */
    Logit* z = logits + row * vocab;
    const int64_t label = labels[row];
    if (label < 0 || label >= vocab) {
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store_grad(z, j, 0.0f);
        if (threadIdx.x == 0) losses[row] = label < 0 ? 0.0f : __int_as_float(0x7FC00000); /* NaN */
        return;
    }
    /* Read before the first barrier, so no thread has started overwriting the row. */
    const float label_logit = load_logit(z, label);

    float max = __int_as_float(0xFF800000u); /* -inf */
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, load_logit(z, j));
    max = block_max(max, scratch);

    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(load_logit(z, j) - max);
    sum = block_sum(sum, scratch);
    const float lse = max + logf(sum);
    if (threadIdx.x == 0) losses[row] = lse - label_logit;

    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
        float g = expf(load_logit(z, j) - lse) * scale;
        if (j == label) g -= scale;
        store_grad(z, j, g);
    }
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
cross_entropy_f32(float* logits, const int32_t* labels, int64_t rows, int64_t vocab, float scale,
                  float* losses) {
    cross_entropy(logits, labels, rows, vocab, scale, losses);
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
cross_entropy_bf16(uint16_t* logits, const int32_t* labels, int64_t rows, int64_t vocab,
                   float scale, float* losses) {
    cross_entropy(logits, labels, rows, vocab, scale, losses);
}
