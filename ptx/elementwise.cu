/*
 * elementwise.cu: the glue between the GPU model's big kernels: residual adds into an f32
 * stream, dtype conversion, LoRA dropout masks and their backward, row gathers (embeddings too)
 * and scatters,
 * fills and copies. Plain memory-bound loops; f32 arithmetic, bf16 rounded to nearest even.
 *
 * residual_add_bf16(x, y, n, out, write_out)
 *   x (n,) f32 += y (n,) bf16; when write_out != 0, out (n,) bf16 = bf16(x) after the add
 *   (the bf16 copy the next RMSNorm reads). out must not alias x or y.
 * f32_to_bf16(x, n, out)
 *   out (n,) bf16 = bf16(x (n,) f32).
 * dropout_mask_from_keys(mask, n, keys, per_key, p)
 *   mask (n,) u8 = 1 where element i is kept, in runs of per_key elements each drawn with its
 *   own key: element i uses key = keys[i / per_key] and counter j = i % per_key, the
 *   counter-based draw of rng::dropout_keeps (the SplitMix64 finaliser of key + (j + 1) * golden,
 *   its top 24 bits as a uniform in [0, 1), kept when >= p), bit for bit what the CPU path draws
 *   for element j of the sequence keyed with that key. A batch of sequences (padded to a common
 *   length, per_key = T * in) thus gets each sequence's own mask. Launch: grid (x, runs) with
 *   runs = ceil(n / per_key) <= 65535, x strides over a run four elements a thread.
 * masked_add_bf16(dx, du, mask, n, keep)
 *   dx[i] = bf16(dx[i] + (mask[i] ? du[i] * keep : 0)): the dropout's backward into the input
 *   gradient. du must not alias dx.
 * gather_rows_bf16(src, rows, count, width, dst)
 *   dst[r] = src[rows[r]] for r < count, rows of `width` bf16; the host checks every index.
 * embedding_rows_f32(table, ids, count, width, out)
 *   out[r] = table[ids[r]] for r < count, rows of `width` f32: the token embeddings of a pass.
 *   Ids may repeat; the host checks every id against the table's rows before the upload.
 * scatter_rows_bf16(src, rows, count, width, dst)
 *   dst[rows[r]] = src[r]; the host checks the indices are in range and distinct.
 * fill_u32(x, n, value) / fill_u16(x, n, value)
 *   x[i] = value: zeroes f32 and bf16 buffers (all-zero bits) or sets a bit pattern.
 * copy_u16(src, n, dst) / copy_u32(src, n, dst)
 *   dst[i] = src[i]: bf16 rows into a KV cache (the host offsets dst), f32 residual copies.
 *
 * Launch: 1-D, EW_THREADS (256) threads per CTA, grid-stride loops,
 * grid = min(ceil(n / 256), 65535) (rows x width for the row kernels).
 * Checked against: plain host loops in the "model" family of sun selftest, and end to end by
 * the GPU model's logits, losses and LoRA gradients against the CPU oracle.
 */

#include "common.cuh"

#define EW_THREADS 256

#define GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (int64_t)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(EW_THREADS)
residual_add_bf16(float* __restrict__ x, const uint16_t* __restrict__ y, int64_t n,
                  uint16_t* __restrict__ out, int write_out) {
    GRID_STRIDE(i, n) {
        const float v = x[i] + bf16_bits_to_f32(y[i]);
        x[i] = v;
        if (write_out) out[i] = f32_to_bf16_bits(v);
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
f32_to_bf16(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ out) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16_bits(x[i]); }
}

/* The keep decision of counter j under key (rng::dropout_keeps). */
__device__ __forceinline__ uint32_t dropout_keeps(unsigned long long key, unsigned long long j,
                                                  float p) {
    unsigned long long z = key + (j + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float uniform = (float)(z >> 40) * (1.0f / 16777216.0f);
    return uniform >= p ? 1u : 0u;
}

/* Run blockIdx.y (its key keys[blockIdx.y], its elements [run * per_key, min(n, ...))) is
   strided over by the x dimension, four consecutive counters a thread: no division per element,
   and one 4-byte store where the four bytes are aligned and in the run. */
extern "C" __global__ void __launch_bounds__(EW_THREADS)
dropout_mask_from_keys(uint8_t* __restrict__ mask, int64_t n,
                       const unsigned long long* __restrict__ keys, int64_t per_key, float p) {
    const int64_t start = (int64_t)blockIdx.y * per_key;
    const int64_t len = min(per_key, n - start);
    const unsigned long long key = keys[blockIdx.y];
    for (int64_t j = 4 * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x); j < len;
         j += 4 * (int64_t)gridDim.x * blockDim.x) {
        uint8_t* out = mask + start + j;
        if (j + 4 <= len && ((start + j) & 3) == 0) {
            uint32_t four = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) four |= dropout_keeps(key, j + e, p) << (8 * e);
            *reinterpret_cast<uint32_t*>(out) = four;
        } else {
            for (int e = 0; e < 4 && j + e < len; ++e) out[e] = (uint8_t)dropout_keeps(key, j + e, p);
        }
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
masked_add_bf16(uint16_t* __restrict__ dx, const uint16_t* __restrict__ du,
                const uint8_t* __restrict__ mask, int64_t n, float keep) {
    GRID_STRIDE(i, n) {
        if (mask[i]) dx[i] = f32_to_bf16_bits(bf16_bits_to_f32(dx[i]) + bf16_bits_to_f32(du[i]) * keep);
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
gather_rows_bf16(const uint16_t* __restrict__ src, const int32_t* __restrict__ rows,
                 int64_t count, int64_t width, uint16_t* __restrict__ dst) {
    GRID_STRIDE(i, count * width) {
        const int64_t r = i / width, c = i - r * width;
        dst[i] = src[(int64_t)rows[r] * width + c];
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
scatter_rows_bf16(const uint16_t* __restrict__ src, const int32_t* __restrict__ rows,
                  int64_t count, int64_t width, uint16_t* __restrict__ dst) {
    GRID_STRIDE(i, count * width) {
        const int64_t r = i / width, c = i - r * width;
        dst[(int64_t)rows[r] * width + c] = src[i];
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
embedding_rows_f32(const float* __restrict__ table, const uint32_t* __restrict__ ids,
                   int64_t count, int64_t width, float* __restrict__ out) {
    GRID_STRIDE(i, count * width) {
        const int64_t r = i / width, c = i - r * width;
        out[i] = table[(int64_t)ids[r] * width + c];
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
fill_u32(uint32_t* __restrict__ x, int64_t n, uint32_t value) {
    GRID_STRIDE(i, n) { x[i] = value; }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
fill_u16(uint16_t* __restrict__ x, int64_t n, uint32_t value) {
    GRID_STRIDE(i, n) { x[i] = (uint16_t)value; }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
copy_u16(const uint16_t* __restrict__ src, int64_t n, uint16_t* __restrict__ dst) {
    GRID_STRIDE(i, n) { dst[i] = src[i]; }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
copy_u32(const uint32_t* __restrict__ src, int64_t n, uint32_t* __restrict__ dst) {
    GRID_STRIDE(i, n) { dst[i] = src[i]; }
}
