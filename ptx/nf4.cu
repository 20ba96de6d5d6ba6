/*
 * nf4.cu: 4-bit (NF4 / FP4) blockwise dequantization and the batch-1 NF4 GEMV used for decoding.
 *
 * Layout (bitsandbytes):
 *   packed   (ceil(n / 2),) u8   two 4-bit codes per byte, element 2i in the HIGH nibble of byte i,
 *                                element 2i+1 in the low nibble; an odd n leaves the last low
 *                                nibble unused.
 *   table    (16,) f32           the code table (NF4 or FP4), passed by the host (quant::code_table).
 *   absmax, plain   (nblocks,) f32, nblocks = ceil(n / blocksize).
 *   absmax, double  (nblocks,) u8 codes into dyn_map (256,) f32, bitsandbytes' signed 8-bit
 *                   dynamic map, with nested (ceil(nblocks / nested_blocksize),) f32 and offset:
 *                   absmax[b] = dyn_map[codes[b]] * nested[b / nested_blocksize] + offset.
 *   element e = table[code(e)] * absmax[e / blocksize].
 * blocksize must be a multiple of 32 (bitsandbytes uses 32..4096): 32 consecutive elements
 * starting at a multiple of 32 then share one absmax, which both kernels rely on. Block indices
 * are shifts when blocksize (and nested_blocksize) are powers of two, as bitsandbytes' always
 * are, and 64-bit divisions otherwise.
 *
 * Both kernels are memory-bound: they are built to keep many independent 16-byte loads in flight
 * per SM and to spend few instructions and shared-memory cycles per byte. Both use a persistent
 * grid: the host launches at most as many CTAs as fit on the GPU at once (occupancy query).
 *
 * dequant4_{plain,double}_{f32,bf16}(packed, table, absmax..., n, blocksize, out)
 *   out (n,) f32 or bf16 (round to nearest even).
 *   Work item: a group of 8 elements [8g, 8g + 8) = one u32 of codes, one absmax, one 16-byte
 *   store (bf16) or two (f32). Consecutive threads take consecutive groups, so a warp's loads are
 *   one 128-byte line and its bf16 stores 512 contiguous bytes. Each thread handles
 *   DEQUANT_UNROLL groups per iteration (all loads issued before the first use), grid-stride over
 *   groups. Launch: 1-D, 256 threads per CTA, grid = min(ceil(n / 8 / (256 * DEQUANT_UNROLL)),
 *   CTAs resident on the GPU), at least 1. The last n % 8 elements are done one by one by thread
 *   0 of CTA 0. Codes are looked up in a 16-entry f32 table in shared memory: 16 words in 16
 *   distinct banks, so a warp's lookups never conflict.
 *   Checked against: quant::dequantize_4bit_f32 (sun selftest, "dequant4" rows).
 *
 * gemv4_{plain,double}_bf16(packed, table, absmax..., rows, cols, blocksize, x, x_in_shared,
 *                           rows_per_group, y)
 *   y (rows,) bf16 = W (rows, cols; 4-bit packed as above, row-major, n = rows * cols) . x (cols,)
 *   bf16, accumulated in f32 with the f32 code table, rounded to bf16 once at the end. cols < 2^31.
 *   Launch: 1-D, 256 threads (8 warps) per CTA, at most 80 registers so 3 CTAs fit on an SM;
 *   grid = min(row groups, CTAs resident on the GPU). Warp w of the W = grid * 8 warps owns the
 *   contiguous range of row groups [groups * w / W, groups * (w + 1) / W), so every SM gets the
 *   same number of rows to within a few.
 *   Fast path (rows_per_group R = 4, 2 or 1 from the host; cols % 32 == 0, so every row starts on
 *   a 16-byte boundary of packed; blocksize and nested_blocksize powers of two; fewer than 2^32
 *   chunks, so chunk indices are u32): a "chunk" is 16 packed bytes = 32 codes of one row, all
 *   under one absmax. A warp works on a group of R rows; per step lane l loads chunks
 *   base + l + 32u (u < U = 4 / R) of each of the R rows: 4 independent 16-byte loads and their
 *   absmax. The next step's loads (the next group's first step at a group's end) are issued
 *   before the current step is computed, so every warp keeps a step in flight while it computes;
 *   the first step's loads go out before the CTA builds its tables. Each x quarter (8 bf16, one
 *   16-byte shared load) is converted once and used for the R rows.
 *   Dynamic shared memory (sized by the host, which raises the kernel's limit): the pair table,
 *   PAIR_TABLE_BYTES = 64 KiB, entry b (one per code byte) = (table[b >> 4], table[b & 15]) as two
 *   f32, 32 copies of it 8 bytes apart, entries 256 bytes apart; lane l reads copy l, so a warp's
 *   8-byte lookups are two wavefronts, the minimum, whatever the codes; one byte_perm makes the
 *   address (code byte * 256 + lane * 8). Then x, cols * 2 bytes, when x_in_shared != 0 (else x
 *   is read from global memory), with its four 16-byte quarters of chunk c rotated by c / 2, so
 *   the 16-byte x loads of 8 lanes (64-byte stride) fall in 8 distinct bank groups. Per chunk each
 *   row's 32 products are summed in f32 and the sum is scaled by the chunk's absmax once; absmax
 *   codes are loaded with the chunks and decoded when used.
 *   Other shapes (rows_per_group 0, e.g. 3 x 100) take a plain element-by-element path, one row
 *   per warp at a time, with x staged as it is at the start of dynamic shared memory when
 *   x_in_shared != 0.
 *   A warp-shuffle reduction gives the row sums; lane 0 writes them.
 *   Checked against: quant::dequantize_4bit_f32 followed by an f64 matrix-vector product on the
 *   CPU (sun selftest, "gemv4" rows).
 *
 * gemv4_mma_{plain,double}_bf16(packed, table, absmax..., rows, cols, blocksize, x, y)
 *   The same product on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate): the host
 *   picks it for products of at least 2^16 weights with cols % 32 == 0, power-of-two block
 *   sizes, fewer than 2^32 chunks, and the pair table plus x in shared memory. Numerics: the code
 *   table is rounded to bf16 (W[j, k] = bf16(table[code]) * absmax, the absmax applied in f32 to
 *   each chunk's partial sum), f32 accumulation, y rounded to bf16 once: relative error ~2e-3 on
 *   rows of thousands against the f32 table (bitsandbytes' own kernel rounds table * absmax to
 *   bf16 and multiplies in bf16).
 *   Launch: 1-D, 256 threads (8 warps), grid = ceil(rows / 16): CTA b owns rows [16b, 16b + 16);
 *   dynamic shared memory PAIR_TABLE_BYTES + cols * 2 (the bf16 pair table, then x rotated as
 *   above). The row's chunks are grouped in k-tiles of 4 chunks (128 columns); warp w takes
 *   k-tiles [tiles * w / 8, tiles * (w + 1) / 8). In a k-tile, lane l = 4g + t (g = l / 4, t =
 *   l % 4, the mma fragment's group and thread) loads chunk 4J + t of rows 16b + g and
 *   16b + g + 8 (two 16-byte loads; the 4 lanes of a quad read 64 contiguous bytes of a row) and
 *   their absmax. mma m (0..7) of the tile takes code bytes 2m and 2m + 1 of every lane's chunk:
 *   the logical k 2t, 2t+1, 2t+8, 2t+9 of lane t are elements 4m .. 4m+3 of chunk 4J + t. B
 *   column n (n < 4) holds x for the k of chunk 4J + n only (lane (g, t) supplies x when g == t;
 *   columns 4..7 are zero), so the accumulator's column n is chunk 4J + n's partial sum, which
 *   lanes t < 2 scale by that chunk's absmax (shuffled from the lane that loaded it) into f32
 *   sums. Pair table: entry b (256 bytes apart) = 32 copies, 4 bytes apart, of the bf16 pair
 *   (table[b >> 4] low, table[b & 15] high): lane l reads copy l, one wavefront per warp lookup
 *   whatever the codes (half the f32 pair table's two). Quads then CTA warps are summed in a
 *   fixed order (deterministic); threads 0..15 write y.
 *   Bytes in flight: two steps of 2 k-tiles per warp (the next step's loads are issued before
 *   the current one is computed) = 4 x 1 KiB; at 64-80 registers and 72-86 KiB of shared memory,
 *   2-3 CTAs (16-24 warps) per SM: 64-96 KiB per SM, above the ~36 KiB that 4.8 TB/s x ~1 us
 *   of latency needs on 132 SMs. At 4096 columns (4 k-tiles per warp) a warp's whole share is
 *   requested before its first mma. Issue per 2048 codes (one warp k-tile): 32 byte_perm + 32
 *   LDS.32 lookups + 8 mma + ~20 others; shared-memory wavefronts 32 + 4 (x): at 11008 x 4096,
 *   ~6.0 K cycles per SM against ~9.7 K of HBM time (~4.9 us at 4.8 TB/s), where the f32 pair
 *   table's 2 wavefronts per 64 codes alone took ~10.7 K cycles.
 *   Checked against: the same CPU product (sun selftest, "gemv4" rows at 4096 x 4096 and up;
 *   ptx/tools/gemv4_mma_emulate.py replays every index lane by lane against W x).
 *
 * gemv4_mma_fused_{plain,double}_bf16(FusedGemvArgs args)
 *   The tensor-core GEMV above (same body, same numerics: bf16 code table, f32 absmax per chunk,
 *   f32 accumulation) over up to three matrices of one width in one launch, for a batch-1 decode
 *   step, with a per-row epilogue. Per matrix i (FusedMatrix: codes, scales, rows, out, and an
 *   optional LoRA B (rows, r) bf16 with z (r,) bf16 and scale s): v[row] = W_i[row, :] . x +
 *   s . (B_i[row, :] . z_i), the B dot product in f32 (lane l of a warp: elements l, l + 32, ...,
 *   then the butterfly), computed while the CTA's first weight loads are in flight. Modes:
 *   FUSED_ROWS: out_i[row] = bf16(v) for q, k and v as one row space: CTA b of
 *     [first_cta[i], first_cta[i + 1]) owns rows 16 (b - first_cta[i]) .. + 16 of matrix i
 *     (first_cta[i + 1] = first_cta[i] + ceil(rows_i / 16); a CTA never straddles matrices);
 *   FUSED_RESIDUAL (one matrix, o or down): residual_out[row] = residual[row] + bf16(v) (f32),
 *     out[row] = bf16(residual_out[row]): what residual_add does after a separate GEMV;
 *   FUSED_SWIGLU (gate, up of equal rows): CTA b's fragment rows 0..7 are gate rows 8b .. 8b + 7
 *     and 8..15 the same rows of up (each half of the m16 tile reads its own matrix), grid
 *     ceil(rows / 8); out_0[row] = bf16(silu(g) u), g and u the bf16-rounded v, swiglu.cu's
 *     expression.
 *   Launch: 1-D, 256 threads, dynamic shared memory PAIR_TABLE_BYTES + cols * 2 (as the GEMV);
 *   the kernel re-checks every condition (mma_gemv_fits per matrix, the mode's counts) and
 *   writes nothing when one fails. Warp 0 finishes the 16 rows (lanes 0..15; for SwiGLU lane g
 *   takes up's value from lane g + 8 by a shuffle).
 *   Checked against: dequantize + f64 products and the epilogue's math on the CPU (sun selftest,
 *   "decode gemv4" rows), and the model's decode against the unfused GPU path.
 *
 * Built without --use_fast_math: nothing here is transcendental, and IEEE denormals keep the f32
 * output equal to the CPU's product table * absmax.
 */

#include <cuda_bf16.h>
#include <stdint.h>

#include "pair_table.cuh"
#include "pdl.cuh"

#define THREADS_PER_CTA 256
#define WARPS_PER_CTA (THREADS_PER_CTA / 32)
#define CHUNK_ELEMENTS 32  /* elements per 16-byte load of packed codes (GEMV) */
#define DEQUANT_GROUP 8    /* elements per dequantize work item: one u32 of codes */
#define DEQUANT_UNROLL 4   /* dequantize work items in flight per thread */
#define GEMV_LANE_CHUNKS 4 /* chunks a lane loads per GEMV step: rows per group (4, 2, 1) x chunks per row (1, 2, 4) */
#define GEMV_MIN_CTAS_PER_SM 3 /* register cap (80) so 24 warps fit on an SM */

static_assert(THREADS_PER_CTA == 256, "build_pair_table: one thread per pair-table entry");

/* -------------------------------------------------------------------------------------------- */
/* block indices and absmax                                                                      */

/* x / 2^shift: the fast paths' block indices (bitsandbytes' block sizes are powers of two). */
struct Shift {
    uint32_t shift;
    __device__ __forceinline__ uint64_t operator()(uint64_t x) const { return x >> shift; }
};

/* x / divisor, divisor >= 1: the general paths' block indices. */
struct Divide {
    uint64_t divisor;
    __device__ __forceinline__ uint64_t operator()(uint64_t x) const { return x / divisor; }
};

__device__ __forceinline__ bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
/* log2 of a power of two */
__device__ __forceinline__ Shift shift_for(int64_t power_of_two) {
    return Shift{(uint32_t)(__ffsll((long long)power_of_two) - 1)};
}

/* The absmax of a block is read in two steps so the loads can be issued long before the value is
   needed: load() reads global memory, decode() turns what it read into the f32 absmax. */
struct PlainAbsmax {
    const float* absmax; /* (nblocks,) */
    typedef float Raw;
    __device__ __forceinline__ Raw load(uint64_t block) const { return __ldg(absmax + block); }
    __device__ __forceinline__ float decode(Raw raw, const float* /*dyn_sh*/) const { return raw; }
};

/* NestedIndex: Shift or Divide, block -> index into nested. */
template <typename NestedIndex>
struct DoubleAbsmax {
    const uint8_t* codes; /* (nblocks,) */
    const float* nested;  /* (ceil(nblocks / nested_blocksize),) */
    float offset;
    NestedIndex nested_of_block;
    struct Raw {
        uint32_t code;
        float nested;
    };
    __device__ __forceinline__ Raw load(uint64_t block) const {
        Raw raw;
        raw.code = __ldg(codes + block);
        raw.nested = __ldg(nested + nested_of_block(block));
        return raw;
    }
    /* dyn_sh: (256,) f32, the dynamic map in shared memory */
    __device__ __forceinline__ float decode(Raw raw, const float* dyn_sh) const {
        return dyn_sh[raw.code] * raw.nested + offset;
    }
};

/* The code table and the dynamic map in shared memory (one set per kernel). */
struct SharedTables {
    float* table;   /* (16,) */
    float* dyn_map; /* (256,), staged for double quant only */
};
__device__ __forceinline__ SharedTables shared_tables() {
    __shared__ float table_sh[16];
    __shared__ float dyn_sh[256];
    return SharedTables{table_sh, dyn_sh};
}

/* Stages the code table (and, for double quant, the dynamic map) in shared memory. */
__device__ __forceinline__ void stage_tables(const float* __restrict__ table,
                                             const float* __restrict__ dyn_map, SharedTables sh) {
    int t = threadIdx.x;
    if (t < 16) sh.table[t] = __ldg(table + t);
    if (dyn_map != nullptr && t < 256) sh.dyn_map[t] = __ldg(dyn_map + t);
}

__device__ __forceinline__ uint32_t code_at(const uint8_t* packed, int64_t e) {
    uint32_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

/* -------------------------------------------------------------------------------------------- */
/* dequantize                                                                                    */

__device__ __forceinline__ void store_out(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* out, int64_t i, float v) {
    out[i] = __float2bfloat16_rn(v);
}

/* Writes 8 values starting at out + e0 (e0 a multiple of 8: 32-byte / 16-byte aligned). */
__device__ __forceinline__ void store_group(float* out, int64_t e0, const float* v) {
    float4* dst = reinterpret_cast<float4*>(out + e0);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store_group(__nv_bfloat16* out, int64_t e0, const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        __nv_bfloat162 pair = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        w[j] = *reinterpret_cast<uint32_t*>(&pair); /* .x (first element) in the low half */
    }
    *reinterpret_cast<uint4*>(out + e0) = make_uint4(w[0], w[1], w[2], w[3]);
}

/* Every whole group of 8 elements; GroupIndex maps a group to its absmax block. */
template <typename Absmax, typename GroupIndex, typename Out>
__device__ __forceinline__ void dequant4_groups(const uint8_t* __restrict__ packed,
                                                const Absmax& absmax, GroupIndex block_of_group,
                                                int64_t n, SharedTables sh,
                                                Out* __restrict__ out) {
    const int64_t groups = n / DEQUANT_GROUP;
    /* u32 g holds the codes of elements [8g, 8g + 8); packed is 256-byte aligned (cuMemAlloc). */
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t g0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g0 < groups;
         g0 += stride * DEQUANT_UNROLL) {
        uint32_t word[DEQUANT_UNROLL];
        typename Absmax::Raw raw[DEQUANT_UNROLL];
#pragma unroll
        for (int u = 0; u < DEQUANT_UNROLL; ++u) {
            const int64_t g = g0 + u * stride;
            word[u] = 0;
            raw[u] = typename Absmax::Raw();
            if (g < groups) {
                word[u] = __ldg(words + g);
                raw[u] = absmax.load(block_of_group((uint64_t)g));
            }
        }
#pragma unroll
        for (int u = 0; u < DEQUANT_UNROLL; ++u) {
            const int64_t g = g0 + u * stride;
            if (g < groups) {
                const float scale = absmax.decode(raw[u], sh.dyn_map);
                float v[DEQUANT_GROUP];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const uint32_t byte = (word[u] >> (8 * b)) & 0xFF; /* little-endian: byte b */
                    v[2 * b] = sh.table[byte >> 4] * scale;
                    v[2 * b + 1] = sh.table[byte & 0xF] * scale;
                }
                store_group(out, g * DEQUANT_GROUP, v);
            }
        }
    }
}

template <typename Absmax, typename Out>
__device__ __forceinline__ void dequant4(const uint8_t* __restrict__ packed,
                                         const float* __restrict__ table, const Absmax& absmax,
                                         const float* __restrict__ dyn_map, int64_t n,
                                         int64_t blocksize, Out* __restrict__ out) {
    const SharedTables sh = shared_tables();
    stage_tables(table, dyn_map, sh);
    __syncthreads();

    if (is_power_of_two(blocksize))
        dequant4_groups(packed, absmax, shift_for(blocksize / DEQUANT_GROUP), n, sh, out);
    else
        dequant4_groups(packed, absmax, Divide{(uint64_t)blocksize / DEQUANT_GROUP}, n, sh, out);
    if (blockIdx.x == 0 && threadIdx.x == 0) { /* the last n % 8 elements */
        for (int64_t e = n / DEQUANT_GROUP * DEQUANT_GROUP; e < n; ++e) {
            const float scale = absmax.decode(absmax.load((uint64_t)(e / blocksize)), sh.dyn_map);
            store_out(out, e, sh.table[code_at(packed, e)] * scale);
        }
    }
}

/* Double quant: the nested index is a shift when nested_blocksize is a power of two. */
template <typename Out>
__device__ __forceinline__ void dequant4_double(const uint8_t* packed, const float* table,
                                                const uint8_t* absmax_codes, const float* dyn_map,
                                                const float* nested, float offset,
                                                int64_t nested_blocksize, int64_t n,
                                                int64_t blocksize, Out* out) {
    if (is_power_of_two(nested_blocksize)) {
        const DoubleAbsmax<Shift> absmax{absmax_codes, nested, offset, shift_for(nested_blocksize)};
        dequant4(packed, table, absmax, dyn_map, n, blocksize, out);
    } else {
        const DoubleAbsmax<Divide> absmax{absmax_codes, nested, offset,
                                          Divide{(uint64_t)nested_blocksize}};
        dequant4(packed, table, absmax, dyn_map, n, blocksize, out);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_plain_f32(const uint8_t* packed, const float* table, const float* absmax, int64_t n,
                   int64_t blocksize, float* out) {
    dequant4(packed, table, PlainAbsmax{absmax}, nullptr, n, blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_plain_bf16(const uint8_t* packed, const float* table, const float* absmax, int64_t n,
                    int64_t blocksize, __nv_bfloat16* out) {
    dequant4(packed, table, PlainAbsmax{absmax}, nullptr, n, blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_double_f32(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                    const float* dyn_map, const float* nested, float offset,
                    int64_t nested_blocksize, int64_t n, int64_t blocksize, float* out) {
    dequant4_double(packed, table, absmax_codes, dyn_map, nested, offset, nested_blocksize, n,
                    blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_double_bf16(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                     const float* dyn_map, const float* nested, float offset,
                     int64_t nested_blocksize, int64_t n, int64_t blocksize, __nv_bfloat16* out) {
    dequant4_double(packed, table, absmax_codes, dyn_map, nested, offset, nested_blocksize, n,
                    blocksize, out);
}

/* -------------------------------------------------------------------------------------------- */
/* batch-1 GEMV                                                                                  */

__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xFFFF0000u); }

/* Fills the pair table at pairs (PAIR_TABLE_BYTES): thread t builds entry t = (table[t >> 4],
   table[t & 15]) and writes its 32 copies (8 bytes each) as 16 16-byte stores, rotated by t so
   that a warp's stores spread evenly over the 8 16-byte bank groups. Needs THREADS_PER_CTA == 256. */
__device__ __forceinline__ void build_pair_table(const float* __restrict__ table, uint8_t* pairs) {
    const int t = threadIdx.x;
    const float first = __ldg(table + (t >> 4));
    const float second = __ldg(table + (t & 15));
    const float4 two_copies = make_float4(first, second, first, second);
    float4* entry = reinterpret_cast<float4*>(pairs + t * PAIR_ENTRY_BYTES);
#pragma unroll
    for (int i = 0; i < PAIR_COPIES / 2; ++i) entry[(i + t) & (PAIR_COPIES / 2 - 1)] = two_copies;
}

/* Position of x quarter q (8 bf16, 16 bytes) of chunk c in the staged layout, in 16-byte units:
   the four quarters of a chunk are rotated by c / 2 (see the header). */
__device__ __forceinline__ int x_slot(int c, int q) { return 4 * c + ((q + (c >> 1)) & 3); }

/* Stages x (cols,) bf16, cols % 32 == 0, in the rotated layout. */
__device__ __forceinline__ void stage_x_rotated(const __nv_bfloat16* __restrict__ x, int cols,
                                                uint4* x_sh) {
    const uint4* src = reinterpret_cast<const uint4*>(x);
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) x_sh[x_slot(i >> 2, i & 3)] = __ldg(src + i);
}

/* Stages x (cols,) bf16 as it is: 16 bytes at a time, then the tail one by one. */
__device__ __forceinline__ void stage_x_plain(const __nv_bfloat16* __restrict__ x, int64_t cols,
                                              uint4* x_sh) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x);
    uint16_t* dst = reinterpret_cast<uint16_t*>(x_sh);
    const int64_t vecs = cols / 8;
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x)
        x_sh[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
    for (int64_t i = vecs * 8 + threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

/* The contiguous range [begin, end) of `count` work items that this warp owns: warp w of the
   gridDim.x * WARPS_PER_CTA warps gets [count * w / warps, count * (w + 1) / warps). */
__device__ __forceinline__ void warp_range(int64_t count, int64_t* begin, int64_t* end) {
    const int64_t warps = (int64_t)gridDim.x * WARPS_PER_CTA;
    const int64_t warp_id = (int64_t)blockIdx.x * WARPS_PER_CTA + (threadIdx.x >> 5);
    *begin = count * warp_id / warps;
    *end = count * (warp_id + 1) / warps;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    return v;
}

/* What one lane loads for one step of a row group: U chunks of each of the group's R rows and
   their absmax, zero where a chunk or row does not exist. */
template <int R, int U, typename Absmax>
struct GemvStage {
    uint4 codes[R][U];
    typename Absmax::Raw scale[R][U];

    /* Chunks base + lane + 32u of rows group * R + r, r < R, of the rows below row_limit (rows,
       or 0 to load nothing). packed is viewed as (n / 32,) uint4, one per chunk, fewer than 2^32
       of them; row r's chunk c is chunk r * cpr + c. */
    __device__ __forceinline__ void load(const uint4* __restrict__ chunks, const Absmax& absmax,
                                         Shift block_of_chunk, int64_t row_limit, int cpr,
                                         int64_t group, int base, int lane) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int64_t row = group * R + r;
            const uint32_t row_chunk = (uint32_t)(row * cpr); /* used only when row < rows */
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = base + lane + 32 * u;
                codes[r][u] = make_uint4(0, 0, 0, 0);
                scale[r][u] = typename Absmax::Raw();
                if (row < row_limit && c < cpr) {
                    const uint32_t chunk = row_chunk + (uint32_t)c;
                    /* __ldcs: read once, evict first (keeps x and the tables in L1/L2). */
                    codes[r][u] = __ldcs(chunks + chunk);
                    scale[r][u] = absmax.load(block_of_chunk(chunk));
                }
            }
        }
    }
};

/* Adds this lane's share of one step (chunks base + lane + 32u of the group's R rows) to acc:
   per chunk and row, the 32 products in f32, then the sum times the chunk's absmax. */
template <int R, int U, bool X_SHARED, typename Absmax>
__device__ __forceinline__ void accumulate_step(const GemvStage<R, U, Absmax>& stage,
                                                const Absmax& absmax, const float* dyn_sh,
                                                const uint8_t* pairs, uint32_t lane_offset,
                                                const uint4* x_sh, const uint4* x_global,
                                                int cpr, int base, int lane, float (&acc)[R]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = base + lane + 32 * u;
        if (c >= cpr) continue;
        float partial[R];
#pragma unroll
        for (int r = 0; r < R; ++r) partial[r] = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            /* x[32c + 8q .. + 8) and the codes of the same elements: word q of the chunk */
            const uint4 xv = X_SHARED ? x_sh[x_slot(c, q)] : __ldg(x_global + 4 * c + q);
            float xf[8];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                xf[2 * b] = bf16_lo(component(xv, b));
                xf[2 * b + 1] = bf16_hi(component(xv, b));
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint32_t word = component(stage.codes[r][u], q);
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const float2 w = *reinterpret_cast<const float2*>(
                        pairs + pair_offset(word, lane_offset, b));
                    partial[r] = fmaf(w.x, xf[2 * b], partial[r]);
                    partial[r] = fmaf(w.y, xf[2 * b + 1], partial[r]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
            acc[r] = fmaf(absmax.decode(stage.scale[r][u], dyn_sh), partial[r], acc[r]);
    }
}

/* Fast path: cols % 32 == 0, blocksize a power of two, fewer than 2^32 chunks. R rows per warp
   at once, U chunks per row and lane per step. X_SHARED: x is staged in shared memory (rotated
   layout, after the pair table), else read from global memory. */
template <int R, int U, bool X_SHARED, typename Absmax>
__device__ __forceinline__ void gemv4_groups(const uint8_t* __restrict__ packed,
                                             const float* __restrict__ table, const Absmax& absmax,
                                             const float* __restrict__ dyn_map, int64_t rows,
                                             int64_t cols, int64_t blocksize,
                                             const __nv_bfloat16* __restrict__ x,
                                             __nv_bfloat16* __restrict__ y) {
    const SharedTables sh = shared_tables();
    uint8_t* pairs = dynamic_shared();
    uint4* x_sh = reinterpret_cast<uint4*>(pairs + PAIR_TABLE_BYTES);
    const int lane = threadIdx.x & 31;
    const int cpr = (int)(cols / CHUNK_ELEMENTS); /* chunks per row; the host keeps cols < 2^31 */
    const int steps = (cpr + 32 * U - 1) / (32 * U); /* steps per row group */
    const Shift block_of_chunk = shift_for(blocksize / CHUNK_ELEMENTS);
    const uint4* chunks = reinterpret_cast<const uint4*>(packed);
    int64_t group, group_end;
    warp_range((rows + R - 1) / R, &group, &group_end);

    /* The first step's loads go out before the tables are built, so their latency overlaps it. */
    int step = 0; /* step within the group, the same for the whole warp */
    GemvStage<R, U, Absmax> current;
    current.load(chunks, absmax, block_of_chunk, group < group_end ? rows : 0, cpr, group, 0,
                 lane);

    stage_tables(table, dyn_map, sh);
    build_pair_table(table, pairs);
    if (X_SHARED) stage_x_rotated(x, (int)cols, x_sh);
    __syncthreads();

    const uint32_t lane_offset = (uint32_t)lane * 8; /* this lane's copy in every entry */
    const uint4* x_global = reinterpret_cast<const uint4*>(x);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;

    while (group < group_end) {
        /* The next step (the next group's first at a group's end) is loaded before this one is
           used, so a step's loads are in flight while the previous one is computed. */
        int next_step = step + 1;
        int64_t next_group = group;
        if (next_step == steps) {
            next_step = 0;
            ++next_group;
        }
        GemvStage<R, U, Absmax> next;
        next.load(chunks, absmax, block_of_chunk, next_group < group_end ? rows : 0, cpr,
                  next_group, next_step * 32 * U, lane);

        accumulate_step<R, U, X_SHARED>(current, absmax, sh.dyn_map, pairs, lane_offset, x_sh,
                                        x_global, cpr, step * 32 * U, lane, acc);
        if (next_step == 0) { /* the group's rows are done */
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float sum = warp_sum(acc[r]);
                const int64_t row = group * R + r;
                if (lane == 0 && row < rows) y[row] = __float2bfloat16_rn(sum);
                acc[r] = 0.0f;
            }
        }
        current = next;
        step = next_step;
        group = next_group;
    }
}

/* Any shape: element by element, one row per warp at a time. X_SHARED: x is staged in dynamic
   shared memory as it is, else read from global memory. */
template <bool X_SHARED, typename Absmax>
__device__ __forceinline__ void gemv4_elements(const uint8_t* __restrict__ packed,
                                               const float* __restrict__ table,
                                               const Absmax& absmax,
                                               const float* __restrict__ dyn_map, int64_t rows,
                                               int64_t cols, int64_t blocksize,
                                               const __nv_bfloat16* __restrict__ x,
                                               __nv_bfloat16* __restrict__ y) {
    const SharedTables sh = shared_tables();
    uint4* x_sh = reinterpret_cast<uint4*>(dynamic_shared());
    stage_tables(table, dyn_map, sh);
    if (X_SHARED) stage_x_plain(x, cols, x_sh);
    __syncthreads();

    const uint16_t* x_bits =
        X_SHARED ? reinterpret_cast<const uint16_t*>(x_sh) : reinterpret_cast<const uint16_t*>(x);
    const int lane = threadIdx.x & 31;
    const Divide block_of_element{(uint64_t)blocksize};
    int64_t row, row_end;
    warp_range(rows, &row, &row_end);
    for (; row < row_end; ++row) {
        float acc = 0.0f;
        const int64_t row_start = row * cols; /* element index of W[row, 0] */
        for (int64_t k = lane; k < cols; k += 32) {
            const int64_t e = row_start + k;
            const float scale =
                absmax.decode(absmax.load(block_of_element((uint64_t)e)), sh.dyn_map);
            const float w = sh.table[code_at(packed, e)] * scale;
            acc = fmaf(w, __uint_as_float((uint32_t)x_bits[k] << 16), acc);
        }
        const float sum = warp_sum(acc);
        if (lane == 0) y[row] = __float2bfloat16_rn(sum);
    }
}

/* The fast path with R rows per group (U = GEMV_LANE_CHUNKS / R), x staged or not. */
template <int R, typename Absmax>
__device__ __forceinline__ void gemv4_fast(const uint8_t* packed, const float* table,
                                           const Absmax& absmax, const float* dyn_map,
                                           int64_t rows, int64_t cols, int64_t blocksize,
                                           const __nv_bfloat16* x, int x_in_shared,
                                           __nv_bfloat16* y) {
    constexpr int U = GEMV_LANE_CHUNKS / R;
    if (x_in_shared)
        gemv4_groups<R, U, true>(packed, table, absmax, dyn_map, rows, cols, blocksize, x, y);
    else
        gemv4_groups<R, U, false>(packed, table, absmax, dyn_map, rows, cols, blocksize, x, y);
}

/* Picks the path: the fast one needs rows_per_group != 0 (the host sized the shared memory for
   the pair table), cols % 32 == 0, a power-of-two blocksize and fewer than 2^32 chunks
   (FastAbsmax), else elements (GeneralAbsmax). */
template <typename FastAbsmax, typename GeneralAbsmax>
__device__ __forceinline__ void gemv4(bool fast_absmax, const FastAbsmax& fast,
                                      const GeneralAbsmax& general,
                                      const uint8_t* __restrict__ packed,
                                      const float* __restrict__ table,
                                      const float* __restrict__ dyn_map, int64_t rows,
                                      int64_t cols, int64_t blocksize,
                                      const __nv_bfloat16* __restrict__ x, int x_in_shared,
                                      int rows_per_group, __nv_bfloat16* __restrict__ y) {
    const bool chunked = rows_per_group != 0 && fast_absmax && cols % CHUNK_ELEMENTS == 0 &&
                         is_power_of_two(blocksize) && rows * (cols / CHUNK_ELEMENTS) < (1ll << 32);
    if (chunked) {
        if (rows_per_group == 4)
            gemv4_fast<4>(packed, table, fast, dyn_map, rows, cols, blocksize, x, x_in_shared, y);
        else if (rows_per_group == 2)
            gemv4_fast<2>(packed, table, fast, dyn_map, rows, cols, blocksize, x, x_in_shared, y);
        else
            gemv4_fast<1>(packed, table, fast, dyn_map, rows, cols, blocksize, x, x_in_shared, y);
    } else {
        if (x_in_shared)
            gemv4_elements<true>(packed, table, general, dyn_map, rows, cols, blocksize, x, y);
        else
            gemv4_elements<false>(packed, table, general, dyn_map, rows, cols, blocksize, x, y);
    }
}

/* -------------------------------------------------------------------------------------------- */
/* batch-1 GEMV on the tensor cores (gemv4_mma_*: see the header)                               */

#define MMA_ROWS 16          /* rows of W per CTA: one m16n8k16 row tile */
#define MMA_TILE_CHUNKS 4    /* chunks per k-tile (128 columns): one per lane of a quad */
#define MMA_STEP_TILES 2     /* k-tiles a warp loads per step; two steps are in flight */
#define MMA_MIN_CTAS_PER_SM 3 /* register cap (80) so 24 warps fit on an SM */

/* c (16 x 8 f32) = a (16 x 16 bf16, row) . b (16 x 8 bf16, col) + c */
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}


/* Where the two halves of a CTA's 16 fragment rows come from: half h (fragment rows 8h + g,
   g < 8) is rows row0[h] + g of a matrix given by its chunks, absmax and row count, the absmax
   decoded with the dynamic map dyn_sh[h] (double quant). gemv4_mma_*: both halves from one
   matrix, row0 = {16 b, 16 b + 8}; the fused GEMV: each half from its own (gate and up). */
template <typename Absmax>
struct MmaHalves {
    const uint4* chunks[2];
    Absmax absmax[2];
    const float* dyn_sh[2];
    int64_t row0[2];
    int64_t rows[2];
};

/* What one lane loads for one step of the tensor-core GEMV: for k-tiles tile + s (s <
   MMA_STEP_TILES), its chunk 4 (tile + s) + t of rows row0[h] + g of half h, and their absmax;
   zero where the tile is past the warp's range, the chunk past the row or the row past the
   matrix. */
template <typename Absmax>
struct MmaStage {
    uint4 codes[MMA_STEP_TILES][2]; /* [s][h]: row row0[h] + g */
    typename Absmax::Raw scale[MMA_STEP_TILES][2];

    __device__ __forceinline__ void load(const MmaHalves<Absmax>& src, Shift block_of_chunk,
                                         int cpr, int tile, int tile_end, int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int s = 0; s < MMA_STEP_TILES; ++s) {
            const int c = (tile + s) * MMA_TILE_CHUNKS + t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = src.row0[h] + g;
                codes[s][h] = make_uint4(0, 0, 0, 0);
                scale[s][h] = typename Absmax::Raw();
                if (tile + s < tile_end && c < cpr && row < src.rows[h]) {
                    /* the host keeps rows * cpr < 2^32 */
                    const uint32_t chunk = (uint32_t)row * (uint32_t)cpr + (uint32_t)c;
                    codes[s][h] = __ldcs(src.chunks[h] + chunk); /* read once: evict first */
                    scale[s][h] = src.absmax[h].load(block_of_chunk(chunk));
                }
            }
        }
    }
};

/* Adds one step's k-tiles to acc. Per k-tile: 8 mmas over the lane quads' four chunks (logical
   k 2t, 2t+1, 2t+8, 2t+9 of mma m are elements 4m .. 4m+3 of the quad lane t's chunk), B column
   n holding x only for the k of chunk n (n < 4), so C[row][n] is chunk n's partial sum; then
   acc[2h + j] += absmax(row g + 8h, chunk 2t + j) * C[g + 8h][2t + j] for the lanes t < 2 (C
   columns 4..7 are zero). */
template <typename Absmax>
__device__ __forceinline__ void mma_accumulate_step(const MmaStage<Absmax>& stage,
                                                    const MmaHalves<Absmax>& src,
                                                    const uint8_t* pairs, const uint4* x_sh,
                                                    int cpr, int tile, int tile_end, int lane,
                                                    float (&acc)[4]) {
    const int g = lane >> 2, t = lane & 3;
    const uint32_t lane_offset = (uint32_t)lane * 4; /* this lane's copy in every entry */
    /* absmax of (row g + 8h, chunk 4J + 2t + j) is decoded by lane 4g + 2t + j (for t >= 2 the
       sources are lanes of the same quad; their products with zero C columns are unused) */
    const int source0 = (lane & ~3) | ((2 * t) & 3);
#pragma unroll
    for (int s = 0; s < MMA_STEP_TILES; ++s) {
        if (tile + s >= tile_end) break; /* warp-uniform */
        const int c = (tile + s) * MMA_TILE_CHUNKS + t;
        const bool supplies_x = g == t && c < cpr; /* B column g = t: this lane's chunk */
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            /* x[32c + 8q .. + 8): words 4q .. 4q + 3 of the chunk's x, mmas 2q and 2q + 1 */
            const uint4 xq = supplies_x ? x_sh[x_slot(c, q)] : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int half = 0; half < 2; ++half) { /* mma m = 2q + half: code bytes 2m, 2m + 1 */
                const uint32_t w0 = component(stage.codes[s][0], q);
                const uint32_t w1 = component(stage.codes[s][1], q);
                const uint32_t a[4] = {
                    bf16_pair(pairs, w0, lane_offset, 2 * half),     /* (g, 2t..2t+1) */
                    bf16_pair(pairs, w1, lane_offset, 2 * half),     /* (g+8, 2t..2t+1) */
                    bf16_pair(pairs, w0, lane_offset, 2 * half + 1), /* (g, 2t+8..2t+9) */
                    bf16_pair(pairs, w1, lane_offset, 2 * half + 1), /* (g+8, 2t+8..2t+9) */
                };
                const uint32_t b[2] = {component(xq, 2 * half), component(xq, 2 * half + 1)};
                mma_16816(part, a, b);
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            /* (g + 8h, chunk c) */
            const float own = src.absmax[h].decode(stage.scale[s][h], src.dyn_sh[h]);
            const float first = __shfl_sync(0xFFFFFFFFu, own, source0);
            const float second = __shfl_sync(0xFFFFFFFFu, own, source0 + 1);
            acc[2 * h] = fmaf(first, part[2 * h], acc[2 * h]);
            acc[2 * h + 1] = fmaf(second, part[2 * h + 1], acc[2 * h + 1]);
        }
    }
}

/* The tensor-core GEMV's body: the CTA's 8 warps split the k-tiles (128 columns each) evenly,
   and the warps' partial sums of the 16 fragment rows meet in shared memory: on return (after a
   barrier) fragment row f's sum is the sum over w of sums[w][f], in that order. stage_more()
   runs after the first step's loads are issued and the pair table is built, before x is
   staged and the barrier that publishes the tables: the caller stages what src.dyn_sh points
   at (and anything else it needs) there; the fused GEMV also waits for the earlier kernels
   there (pdl_wait), so everything before it reads weights and tables only. */
template <typename Absmax, typename StageMore>
__device__ __forceinline__ void gemv4_mma_sums(const MmaHalves<Absmax>& src,
                                               const float* __restrict__ table, int64_t cols,
                                               int64_t blocksize,
                                               const __nv_bfloat16* __restrict__ x,
                                               StageMore stage_more,
                                               float (&sums)[WARPS_PER_CTA][MMA_ROWS]) {
    uint8_t* pairs = dynamic_shared();
    uint4* x_sh = reinterpret_cast<uint4*>(pairs + PAIR_TABLE_BYTES);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cpr = (int)(cols / CHUNK_ELEMENTS); /* chunks per row; the host keeps cols < 2^31 */
    const int tiles = (cpr + MMA_TILE_CHUNKS - 1) / MMA_TILE_CHUNKS;
    const int tile_begin = (int)((int64_t)tiles * warp / WARPS_PER_CTA);
    const int tile_end = (int)((int64_t)tiles * (warp + 1) / WARPS_PER_CTA);
    const Shift block_of_chunk = shift_for(blocksize / CHUNK_ELEMENTS);

    /* The first step's loads go out before the tables and x are staged. */
    MmaStage<Absmax> current;
    current.load(src, block_of_chunk, cpr, tile_begin, tile_end, lane);

    build_bf16_pair_table(table, pairs);
    stage_more();
    stage_x_rotated(x, (int)cols, x_sh);
    __syncthreads();

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int tile = tile_begin; tile < tile_end; tile += MMA_STEP_TILES) {
        /* the next step's loads are in flight while this one is computed */
        MmaStage<Absmax> next;
        next.load(src, block_of_chunk, cpr, tile + MMA_STEP_TILES, tile_end, lane);
        mma_accumulate_step(current, src, pairs, x_sh, cpr, tile, tile_end, lane, acc);
        current = next;
    }

    /* Lanes t = 0, 1 of quad g hold chunks 2t, 2t + 1 (mod 4) of rows g and g + 8. */
    float row_g = acc[0] + acc[1], row_g8 = acc[2] + acc[3];
    row_g += __shfl_xor_sync(0xFFFFFFFFu, row_g, 1);
    row_g8 += __shfl_xor_sync(0xFFFFFFFFu, row_g8, 1);
    if ((lane & 3) == 0) {
        sums[warp][lane >> 2] = row_g;
        sums[warp][(lane >> 2) + 8] = row_g8;
    }
    __syncthreads();
}

/* The tensor-core GEMV: CTA blockIdx.x owns rows [16 b, 16 b + 16). */
template <typename Absmax>
__device__ __forceinline__ void gemv4_mma(const uint8_t* __restrict__ packed,
                                          const float* __restrict__ table, const Absmax& absmax,
                                          const float* __restrict__ dyn_map, int64_t rows,
                                          int64_t cols, int64_t blocksize,
                                          const __nv_bfloat16* __restrict__ x,
                                          __nv_bfloat16* __restrict__ y) {
    __shared__ float warp_sums[WARPS_PER_CTA][MMA_ROWS];
    const SharedTables sh = shared_tables();
    const int64_t row0 = (int64_t)blockIdx.x * MMA_ROWS;
    const uint4* chunks = reinterpret_cast<const uint4*>(packed);
    const MmaHalves<Absmax> src{{chunks, chunks},
                                {absmax, absmax},
                                {sh.dyn_map, sh.dyn_map},
                                {row0, row0 + 8},
                                {rows, rows}};
    gemv4_mma_sums(src, table, cols, blocksize, x, [&] { stage_tables(table, dyn_map, sh); },
                   warp_sums);
    if (threadIdx.x < MMA_ROWS) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS_PER_CTA; ++w) sum += warp_sums[w][threadIdx.x];
        const int64_t row = row0 + threadIdx.x;
        if (row < rows) y[row] = __float2bfloat16_rn(sum);
    }
}

/* The tensor-core GEMV's conditions (the host checks them before launching; a launch that
   breaks them writes nothing): whole chunks per row, power-of-two blocksize, fewer than 2^32
   chunks, cols < 2^31. */
__device__ __forceinline__ bool mma_gemv_fits(int64_t rows, int64_t cols, int64_t blocksize) {
    return cols > 0 && cols % CHUNK_ELEMENTS == 0 && cols < (1ll << 31) &&
           is_power_of_two(blocksize) && blocksize >= CHUNK_ELEMENTS &&
           rows * (cols / CHUNK_ELEMENTS) < (1ll << 32);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, MMA_MIN_CTAS_PER_SM)
gemv4_mma_plain_bf16(const uint8_t* packed, const float* table, const float* absmax,
                     int64_t rows, int64_t cols, int64_t blocksize, const __nv_bfloat16* x,
                     __nv_bfloat16* y) {
    if (!mma_gemv_fits(rows, cols, blocksize)) return;
    gemv4_mma(packed, table, PlainAbsmax{absmax}, nullptr, rows, cols, blocksize, x, y);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, MMA_MIN_CTAS_PER_SM)
gemv4_mma_double_bf16(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                      const float* dyn_map, const float* nested, float offset,
                      int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                      const __nv_bfloat16* x, __nv_bfloat16* y) {
    if (!mma_gemv_fits(rows, cols, blocksize) || !is_power_of_two(nested_blocksize)) return;
    const DoubleAbsmax<Shift> absmax{absmax_codes, nested, offset, shift_for(nested_blocksize)};
    gemv4_mma(packed, table, absmax, dyn_map, rows, cols, blocksize, x, y);
}

/* -------------------------------------------------------------------------------------------- */
/* the fused decode GEMV (gemv4_mma_fused_*: see the header)                                    */

#define FUSED_MAX_MATRICES 3
#define FUSED_ROWS 0     /* y_i = W_i x (+ LoRA) for up to 3 matrices, one row space */
#define FUSED_RESIDUAL 1 /* one matrix: residual_out = residual + bf16(W x (+ LoRA)) */
#define FUSED_SWIGLU 2   /* two matrices (gate, up): out = silu(g) u, g and u rounded to bf16 */

/* One matrix of a fused launch; every pointer is a device address (the host's #[repr(C)]
   twin is backend::cuda::fused::FusedMatrix: 80 bytes, the same field order). */
struct FusedMatrix {
    const uint8_t* packed;   /* (rows * cols / 2,) codes */
    const void* absmax;      /* plain: (nblocks,) f32; double: (nblocks,) u8 codes */
    const float* nested;     /* double: nested f32 scales; plain: unused */
    const float* dyn_map;    /* double: (256,) f32; plain: unused */
    const uint16_t* lora_b;  /* (rows, lora_rank) bf16 when lora_rank > 0 */
    const uint16_t* lora_z;  /* (lora_rank,) bf16 when lora_rank > 0 */
    uint16_t* out;           /* (rows,) bf16 */
    int64_t rows;
    int32_t lora_rank;       /* 0: no adapter */
    float lora_scale;
    float offset;            /* double: added to every decoded absmax */
    int32_t nested_shift;    /* double: log2(nested_blocksize) */
};
static_assert(sizeof(FusedMatrix) == 80, "FusedMatrix: the host's layout");

/* All arguments of a fused launch, passed by value (312 bytes of kernel parameters). */
struct FusedGemvArgs {
    FusedMatrix matrix[FUSED_MAX_MATRICES];
    const float* table;      /* (16,) f32 code table, shared by the matrices */
    const uint16_t* x;       /* (cols,) bf16 */
    const float* residual;   /* FUSED_RESIDUAL: (rows,) f32 */
    float* residual_out;     /* FUSED_RESIDUAL: (rows,) f32, not aliasing residual */
    int64_t cols;
    int64_t blocksize;
    int32_t count;           /* matrices used: 1..3 (FUSED_ROWS), 1 (RESIDUAL), 2 (SWIGLU) */
    int32_t mode;
    int32_t first_cta[FUSED_MAX_MATRICES + 1]; /* FUSED_ROWS: CTA of matrix i's first 16-row
                                                  tile; first_cta[count] = the grid */
};
static_assert(sizeof(FusedGemvArgs) == 312, "FusedGemvArgs: the host's layout");

/* Field f of matrix i (0..2), selected without indexing the parameter array at run time (which
   would copy the whole array to local memory). */
#define FUSED_FIELD(args, i, f) \
    ((i) == 0 ? (args).matrix[0].f : (i) == 1 ? (args).matrix[1].f : (args).matrix[2].f)

/* What a CTA needs of the matrix of one half of its fragment rows, in registers. */
template <typename Absmax>
struct FusedHalf {
    const uint4* chunks;
    Absmax absmax;
    const float* dyn_map;
    const uint16_t* lora_b;
    const uint16_t* lora_z;
    uint16_t* out;
    int64_t rows;
    int lora_rank;
    float lora_scale;
};

__device__ __forceinline__ PlainAbsmax fused_absmax(const FusedGemvArgs& args, int i,
                                                    PlainAbsmax*) {
    return PlainAbsmax{static_cast<const float*>(FUSED_FIELD(args, i, absmax))};
}
__device__ __forceinline__ DoubleAbsmax<Shift> fused_absmax(const FusedGemvArgs& args, int i,
                                                            DoubleAbsmax<Shift>*) {
    return DoubleAbsmax<Shift>{static_cast<const uint8_t*>(FUSED_FIELD(args, i, absmax)),
                               FUSED_FIELD(args, i, nested), FUSED_FIELD(args, i, offset),
                               Shift{(uint32_t)FUSED_FIELD(args, i, nested_shift)}};
}

template <typename Absmax>
__device__ __forceinline__ FusedHalf<Absmax> fused_half(const FusedGemvArgs& args, int i) {
    Absmax* tag = nullptr;
    return FusedHalf<Absmax>{reinterpret_cast<const uint4*>(FUSED_FIELD(args, i, packed)),
                             fused_absmax(args, i, tag),
                             FUSED_FIELD(args, i, dyn_map),
                             FUSED_FIELD(args, i, lora_b),
                             FUSED_FIELD(args, i, lora_z),
                             FUSED_FIELD(args, i, out),
                             FUSED_FIELD(args, i, rows),
                             FUSED_FIELD(args, i, lora_rank),
                             FUSED_FIELD(args, i, lora_scale)};
}

/* The launch's conditions, uniform over the grid (the host checks them first; a launch that
   breaks them writes nothing). */
__device__ __forceinline__ bool fused_args_fit(const FusedGemvArgs& args, bool double_quant) {
    const int count = args.count;
    if (args.mode == FUSED_ROWS) {
        if (count < 1 || count > FUSED_MAX_MATRICES || args.first_cta[0] != 0) return false;
    } else if (args.mode == FUSED_RESIDUAL) {
        if (count != 1 || args.first_cta[0] != 0) return false;
    } else if (args.mode == FUSED_SWIGLU) {
        if (count != 2 || args.matrix[0].rows != args.matrix[1].rows) return false;
    } else {
        return false;
    }
#pragma unroll
    for (int i = 0; i < FUSED_MAX_MATRICES; ++i) {
        if (i >= count) break;
        const FusedMatrix& m = args.matrix[i];
        if (!mma_gemv_fits(m.rows, args.cols, args.blocksize) || m.lora_rank < 0) return false;
        if (double_quant && (m.nested_shift < 0 || m.nested_shift > 62)) return false;
    }
    return true;
}

/* The tensor-core GEMV over the matrices of args, with each row's epilogue (see the header). */
template <typename Absmax>
__device__ __forceinline__ void gemv4_mma_fused(const FusedGemvArgs& args) {
    __shared__ float warp_sums[WARPS_PER_CTA][MMA_ROWS];
    __shared__ float lora_dot[MMA_ROWS];     /* B[row, :] . z of fragment row f, unscaled */
    __shared__ float residual_in[MMA_ROWS];  /* FUSED_RESIDUAL: residual[row] of row f */
    __shared__ float dyn_sh[2][256];         /* double quant: the halves' dynamic maps */
    const bool double_quant = sizeof(Absmax) != sizeof(PlainAbsmax);
    if (!fused_args_fit(args, double_quant)) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = blockIdx.x;

    /* Which matrix and rows each half of the 16 fragment rows is. */
    int mat0, mat1;
    int64_t row0[2];
    if (args.mode == FUSED_SWIGLU) { /* half 0: gate rows 8b.., half 1: up rows 8b.. */
        mat0 = 0;
        mat1 = 1;
        row0[0] = row0[1] = 8 * b;
        if (row0[0] >= args.matrix[0].rows) return; /* past the grid the host sized */
    } else {
        if (b >= args.first_cta[args.count]) return; /* past the grid the host sized */
        int i = 0;
        if (args.count > 1 && b >= args.first_cta[1]) i = 1;
        if (args.count > 2 && b >= args.first_cta[2]) i = 2;
        mat0 = mat1 = i;
        row0[0] = (b - (i == 0 ? args.first_cta[0] : i == 1 ? args.first_cta[1] : args.first_cta[2])) * MMA_ROWS;
        row0[1] = row0[0] + 8;
    }
    const FusedHalf<Absmax> h0 = fused_half<Absmax>(args, mat0);
    const FusedHalf<Absmax> h1 = fused_half<Absmax>(args, mat1);
    const MmaHalves<Absmax> src{{h0.chunks, h1.chunks},
                                {h0.absmax, h1.absmax},
                                {dyn_sh[0], dyn_sh[1]},
                                {row0[0], row0[1]},
                                {h0.rows, h1.rows}};

    /* Staged while the first step's loads are in flight: the dynamic maps, and per fragment row
       f = 2 warp + j (half f / 8, row row0 + f % 8) the adapter's dot product B[row, :] . z
       (lane l sums elements l, l + 32, ..., then the butterfly) and the residual's value. */
    auto stage_more = [&] {
        if (double_quant) {
            dyn_sh[0][threadIdx.x] = __ldg(h0.dyn_map + threadIdx.x);
            dyn_sh[1][threadIdx.x] = __ldg(h1.dyn_map + threadIdx.x);
        }
        /* With PDL: the B rows head for L2 (one 128-byte line per 64 elements), then the wait
           for the earlier kernels (z, the residual, x) that everything below reads, and before
           any global write. */
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int f = 2 * warp + j;
            const bool first_half = f < 8; /* warp-uniform */
            const int64_t row = (first_half ? row0[0] : row0[1]) + (f & 7);
            const int rank = first_half ? h0.lora_rank : h1.lora_rank;
            const uint16_t* lora_b = first_half ? h0.lora_b : h1.lora_b;
            if (row < (first_half ? h0.rows : h1.rows))
                for (int e = lane * 64; e < rank; e += 32 * 64) pdl_prefetch_l2(lora_b + row * rank + e);
        }
        pdl_wait();
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int f = 2 * warp + j;
            const bool first_half = f < 8; /* warp-uniform */
            const int64_t row = (first_half ? row0[0] : row0[1]) + (f & 7);
            const int64_t rows = first_half ? h0.rows : h1.rows;
            const int rank = first_half ? h0.lora_rank : h1.lora_rank;
            const uint16_t* lora_b = first_half ? h0.lora_b : h1.lora_b;
            const uint16_t* lora_z = first_half ? h0.lora_z : h1.lora_z;
            const bool valid = row < rows;
            float dot = 0.0f;
            if (valid && rank > 0) {
                const uint16_t* b_row = lora_b + row * rank;
                for (int e = lane; e < rank; e += 32)
                    dot = fmaf(bf16_lo(__ldg(b_row + e)), bf16_lo(__ldg(lora_z + e)), dot);
                dot = warp_sum(dot);
            }
            if (lane == 0) {
                lora_dot[f] = dot;
                residual_in[f] = valid && args.mode == FUSED_RESIDUAL ? __ldg(args.residual + row)
                                                                      : 0.0f;
            }
        }
    };
    gemv4_mma_sums(src, args.table, args.cols, args.blocksize,
                   reinterpret_cast<const __nv_bfloat16*>(args.x), stage_more, warp_sums);
    pdl_launch_dependents(); /* the weights and x are read; only the epilogue is left */

    /* Warp 0: lane f < 16 finishes fragment row f; for SwiGLU lane g < 8 pairs gate row g
       (lane g) with up row g (lane g + 8). */
    if (warp != 0) return;
    const int f = lane & 15;
    const bool first_half = f < 8;
    const int64_t row = (first_half ? row0[0] : row0[1]) + (f & 7);
    const int64_t rows = first_half ? h0.rows : h1.rows;
    const int rank = first_half ? h0.lora_rank : h1.lora_rank;
    const float scale = first_half ? h0.lora_scale : h1.lora_scale;
    uint16_t* out = first_half ? h0.out : h1.out;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS_PER_CTA; ++w) sum += warp_sums[w][f];
    const float value = rank > 0 ? fmaf(scale, lora_dot[f], sum) : sum;
    const float rounded = __bfloat162float(__float2bfloat16_rn(value));
    if (args.mode == FUSED_SWIGLU) {
        const float up = __shfl_down_sync(0xFFFFFFFFu, rounded, 8);
        if (lane < 8 && row < rows) {
            const float gate = rounded;
            const float hidden = gate / (1.0f + expf(-gate)) * up;
            h0.out[row] = __bfloat16_as_ushort(__float2bfloat16_rn(hidden));
        }
    } else if (lane < 16 && row < rows) {
        if (args.mode == FUSED_RESIDUAL) {
            const float y = residual_in[f] + rounded;
            args.residual_out[row] = y;
            out[row] = __bfloat16_as_ushort(__float2bfloat16_rn(y));
        } else {
            out[row] = __bfloat16_as_ushort(__float2bfloat16_rn(value));
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, MMA_MIN_CTAS_PER_SM)
gemv4_mma_fused_plain_bf16(const FusedGemvArgs args) {
    gemv4_mma_fused<PlainAbsmax>(args);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, MMA_MIN_CTAS_PER_SM)
gemv4_mma_fused_double_bf16(const FusedGemvArgs args) {
    gemv4_mma_fused<DoubleAbsmax<Shift>>(args);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, GEMV_MIN_CTAS_PER_SM)
gemv4_plain_bf16(const uint8_t* packed, const float* table, const float* absmax, int64_t rows,
                 int64_t cols, int64_t blocksize, const __nv_bfloat16* x, int x_in_shared,
                 int rows_per_group, __nv_bfloat16* y) {
    const PlainAbsmax plain{absmax};
    gemv4(true, plain, plain, packed, table, nullptr, rows, cols, blocksize, x, x_in_shared,
          rows_per_group, y);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA, GEMV_MIN_CTAS_PER_SM)
gemv4_double_bf16(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                  const float* dyn_map, const float* nested, float offset,
                  int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                  const __nv_bfloat16* x, int x_in_shared, int rows_per_group,
                  __nv_bfloat16* y) {
    const bool shift = is_power_of_two(nested_blocksize);
    const DoubleAbsmax<Shift> fast{absmax_codes, nested, offset,
                                   Shift{shift ? (uint32_t)(__ffsll(nested_blocksize) - 1) : 0}};
    const DoubleAbsmax<Divide> general{absmax_codes, nested, offset,
                                       Divide{(uint64_t)nested_blocksize}};
    gemv4(shift, fast, general, packed, table, dyn_map, rows, cols, blocksize, x, x_in_shared,
          rows_per_group, y);
}
