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
 *   counter-based draw of rng::dropout_keeps: quad q = j / 4 is the SplitMix64 finaliser of
 *   key + (q + 1) * golden, element j takes its 16 bits 16 * (j % 4) .. as a uniform, kept when
 *   >= ceil(p * 2^16) (dropout_threshold); bit for bit what the CPU path draws for element j of
 *   the sequence keyed with that key. A batch of sequences (padded to a common length, per_key =
 *   T * in) thus gets each sequence's own mask. Launch: grid (x, runs) with runs =
 *   ceil(n / per_key) <= 65535, x strides over a run's 16-byte groups of the mask, one 16-byte
 *   store a thread (byte stores in the groups a run shares with its neighbours or the buffer's
 *   end). Where the run starts on a multiple of 4 (per_key % 4 == 0, the model's case) a group
 *   is 4 whole quads: 4 hashes, its four halfwords compared two at a time (vcmpgeu2) and
 *   packed into one 4-byte word; otherwise every element hashes its own quad.
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
#include "pdl.cuh"

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
    pdl_wait(); /* x is a decode step's input; out may still be read by the previous kernel */
    pdl_launch_dependents();
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16_bits(x[i]); }
}

/* rng::dropout_keeps's constants: the counter step (golden) and the finaliser's multipliers. */
#define SPLITMIX_GOLDEN 0x9E3779B97F4A7C15ull
#define SPLITMIX_C1 0xBF58476D1CE4E5B9ull
#define SPLITMIX_C2 0x94D049BB133111EBull
/* Elements of a mask a thread draws and stores at once (one 16-byte store): 4 quads. */
#define MASK_GROUP 16
static_assert(MASK_GROUP == 16, "one uint4 store a group");
/* A threshold above every 16-bit draw: nothing is kept. */
#define DRAW_NONE_KEPT (1u << 16)

/* SplitMix64's finaliser (rng::splitmix64_finalize). */
__device__ __forceinline__ unsigned long long splitmix64_finalize(unsigned long long z) {
    z = (z ^ (z >> 30)) * SPLITMIX_C1;
    z = (z ^ (z >> 27)) * SPLITMIX_C2;
    return z ^ (z >> 31);
}

/* rng::dropout_threshold: the least 16-bit draw u that is kept, u / 2^16 >= p iff u >=
   ceil(p * 2^16) (p * 2^16 exact: a power-of-two scaling). 0 (all kept) for p <= 0;
   DRAW_NONE_KEPT for p >= 1 or NaN. */
__device__ __forceinline__ uint32_t dropout_threshold(float p) {
    if (!(p > 0.0f)) return p <= 0.0f ? 0u : DRAW_NONE_KEPT;
    if (p >= 1.0f) return DRAW_NONE_KEPT;
    return (uint32_t)ceilf(p * 65536.0f);
}

/* The 4 mask bytes of one quad's hash h (byte b = 1 when halfword b of h >= threshold):
   vcmpgeu2 sets a halfword to 0xFFFF where it holds, byte_perm takes each halfword's low byte. */
__device__ __forceinline__ uint32_t quad_mask_word(unsigned long long h, uint32_t threshold) {
    if (threshold >= DRAW_NONE_KEPT) return 0u;
    const uint32_t both = threshold | (threshold << 16);
    const uint32_t lo = __vcmpgeu2((uint32_t)h, both), hi = __vcmpgeu2((uint32_t)(h >> 32), both);
    return __byte_perm(lo, hi, 0x6420) & 0x01010101u;
}

/* Run blockIdx.y (its key keys[blockIdx.y], its elements [run * per_key, min(n, ...))) is
   strided over by the x dimension in the mask's 16-byte groups that hold its elements: the first
   group starts at or before the run (counters below 0 are drawn and not stored). A group wholly
   in the run is one 16-byte store; a group the run shares with a neighbour run (or that the
   buffer ends in) stores its bytes in the run one by one. */
extern "C" __global__ void __launch_bounds__(EW_THREADS)
dropout_mask_from_keys(uint8_t* __restrict__ mask, int64_t n,
                       const unsigned long long* __restrict__ keys, int64_t per_key, float p) {
    const int64_t start = (int64_t)blockIdx.y * per_key;
    const int64_t end = min(n, start + per_key);
    const unsigned long long key = keys[blockIdx.y];
    const uint32_t threshold = dropout_threshold(p);
    const int64_t first = start & ~(int64_t)(MASK_GROUP - 1);
    const bool quads_aligned = (start & 3) == 0; /* block-uniform */
    for (int64_t at = first + MASK_GROUP * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x);
         at < end; at += MASK_GROUP * (int64_t)gridDim.x * blockDim.x) {
        const int64_t j0 = at - start; /* the group's first counter; negative before the run */
        uint32_t words[MASK_GROUP / 4];
        if (quads_aligned) {
            /* j0 % 4 == 0: word w is quad j0 / 4 + w; key + (q + 1) * golden mod 2^64, so a
               negative q is the same line */
            unsigned long long z = key + (unsigned long long)(j0 / 4 + 1) * SPLITMIX_GOLDEN;
#pragma unroll
            for (int w = 0; w < MASK_GROUP / 4; ++w) {
                words[w] = quad_mask_word(splitmix64_finalize(z), threshold);
                z += SPLITMIX_GOLDEN;
            }
        } else {
#pragma unroll
            for (int w = 0; w < MASK_GROUP / 4; ++w) {
                uint32_t word = 0;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int64_t j = j0 + 4 * w + b;
                    const int64_t q = j >> 2; /* floor, also below the run */
                    const unsigned long long h =
                        splitmix64_finalize(key + (unsigned long long)(q + 1) * SPLITMIX_GOLDEN);
                    const uint32_t lane_byte = (quad_mask_word(h, threshold) >> (8 * (j & 3))) & 1u;
                    word |= lane_byte << (8 * b);
                }
                words[w] = word;
            }
        }
        if (at >= start && at + MASK_GROUP <= end) {
            /* at is a multiple of 16 and the buffer 256-byte aligned. */
            *reinterpret_cast<uint4*>(mask + at) = make_uint4(words[0], words[1], words[2], words[3]);
        } else {
#pragma unroll
            for (int e = 0; e < MASK_GROUP; ++e) {
                if (at + e >= start && at + e < end)
                    mask[at + e] = (uint8_t)(words[e / 4] >> (8 * (e % 4)));
            }
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
