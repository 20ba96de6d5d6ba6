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
 *   runs = ceil(n / per_key) <= 65535, x strides over a run's 16-byte groups of the mask, 16
 *   counters a thread and one 16-byte store (byte stores in the groups a run shares with its
 *   neighbours or the buffer's end). The draw in 32-bit words (splitmix_top_word): the counter
 *   value key + (j + 1) * golden advanced by one 64-bit add an element, and of the last product
 *   only the high word (the top 24 bits are all that is used; the final z ^= z >> 31 leaves
 *   bits 33-63 as they were), compared as an integer with ceil(p * 2^24) (dropout_threshold).
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
#define SPLITMIX_C1_HI 0xBF58476Du
#define SPLITMIX_C1_LO 0x1CE4E5B9u
#define SPLITMIX_C2_HI 0x94D049BBu
#define SPLITMIX_C2_LO 0x133111EBu
/* Elements of a mask a thread draws and stores at once (one 16-byte store). */
#define MASK_GROUP 16
static_assert(MASK_GROUP == 16, "one uint4 store a group");

/* The high 32 bits of the SplitMix64 finaliser of z = (hi, lo): z ^= z >> 30; z *= C1; z ^= z
   >> 27; z *= C2; z ^= z >> 31. The last xor changes nothing in bits 33-63 (z >> 31 has none),
   and of the last product only the high word is needed: hi32(y * C2 mod 2^64) = umulhi(y_lo,
   C2_lo) + y_lo * C2_hi + y_hi * C2_lo (mod 2^32). */
__device__ __forceinline__ uint32_t splitmix_top_word(uint32_t lo, uint32_t hi) {
    const uint32_t xlo = lo ^ __funnelshift_r(lo, hi, 30), xhi = hi ^ (hi >> 30);
    const unsigned long long w = (unsigned long long)xlo * SPLITMIX_C1_LO;
    const uint32_t zlo = (uint32_t)w;
    const uint32_t zhi = (uint32_t)(w >> 32) + xlo * SPLITMIX_C1_HI + xhi * SPLITMIX_C1_LO;
    const uint32_t ylo = zlo ^ __funnelshift_r(zlo, zhi, 27), yhi = zhi ^ (zhi >> 27);
    return __umulhi(ylo, SPLITMIX_C2_LO) + ylo * SPLITMIX_C2_HI + yhi * SPLITMIX_C2_LO;
}

/* The least top-24-bit draw u that is kept: u * 2^-24 >= p (exact in f32: u < 2^24) holds iff
   u >= ceil(p * 2^24) (p * 2^24 exact: a power-of-two scaling). All kept for p <= 0, none for
   p >= 1 or NaN (2^24: above every u). */
__device__ __forceinline__ uint32_t dropout_threshold(float p) {
    if (!(p > 0.0f)) return p <= 0.0f ? 0u : (1u << 24);
    if (p >= 1.0f) return 1u << 24;
    return (uint32_t)ceilf(p * 16777216.0f);
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
    for (int64_t at = first + MASK_GROUP * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x);
         at < end; at += MASK_GROUP * (int64_t)gridDim.x * blockDim.x) {
        /* key + (j + 1) * golden for the group's first counter j = at - start (mod 2^64, so a
           negative j before the run is the same line), then one add per element. */
        unsigned long long z = key + (unsigned long long)(at - start + 1) * SPLITMIX_GOLDEN;
        uint32_t words[MASK_GROUP / 4];
#pragma unroll
        for (int w = 0; w < MASK_GROUP / 4; ++w) {
            uint32_t word = 0;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint32_t top = splitmix_top_word((uint32_t)z, (uint32_t)(z >> 32));
                word |= (uint32_t)((top >> 8) >= threshold) << (8 * b);
                z += SPLITMIX_GOLDEN;
            }
            words[w] = word;
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
