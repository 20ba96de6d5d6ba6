/*
 * gemv4_tiled.cu: the batch-1 4-bit GEMV over weights repacked into tensor-core tiles (the decode
 * layout), its fused twin for a decode step (LoRA B, residual add, SwiGLU in the epilogue), and
 * the kernels that repack the weights from the bitsandbytes layout.
 *
 * Why a second layout: in bitsandbytes' row-major layout a tensor-core GEMV's warp reads pieces
 * of 8 or 16 rows per load instruction and must fetch each chunk's absmax separately. Here every
 * tile is 512 contiguous bytes, exactly one 16-byte load per lane, whose bytes are already the
 * A fragments of four mma.m16n8k16 (one per 16 k), and its scales are 64 contiguous bytes.
 *
 * Layout (backend::cuda::gemv_tiled builds it on the GPU with the tile4_pack_* kernels):
 *   A product with K columns (K % 64 == 0) is cut into units of 8 output rows, and each unit
 *   into P tiles; tile (u, p) has index u * P + p. A tile is one m16 row tile over 64 k: its
 *   fragment rows g (half 0) and 8 + g (half 1), g < 8, are 64 columns o_h .. o_h + 64 of a row,
 *   o_h = p * PC + h * HO, in one of two arrangements, (PC, HO) = (piece columns, half offset):
 *   SPLIT (128, 64): both halves are row 8u + g of one matrix: half 0 holds the first 64 columns
 *          of a 128-column piece of the row, half 1 the next 64, P = ceil(K / 128); the unit's
 *          value is half 0 + half 1. A ROW SPACE of up to 3 matrices of the same K (q, k, v):
 *          matrix i's ceil(R_i / 8) units follow matrix i - 1's (first_unit[i]), each matrix
 *          padded to whole units (rows past R_i are zeros), so a unit never straddles matrices.
 *   PAIR (64, 0): half 0 is row 8u + g of matrix 0 (gate), half 1 the same row of matrix 1
 *          (up), both over columns 64p .. 64p + 64, P = K / 64; the halves are NOT added.
 *   records (units * P, 576 bytes): tile i's 512 code bytes, then its 16 f32 scales.
 *   codes: lane l = 4g + t's 16 bytes (record offset 16 l) hold, for mma j < 4 (u32 j), the code
 *          bytes of (half 0, columns c, c + 1), (half 1, c, c + 1), (half 0, c + 2, c + 3),
 *          (half 1, c + 2, c + 3), c = 16t + 4j (half-relative), bitsandbytes' bytes verbatim
 *          (even column in the high nibble): decoded by the bf16 pair table they are the mma's A
 *          registers, whose k labels 2t, 2t + 1, 2t + 8, 2t + 9 are the half's columns
 *          16t + 4j + 0, 1, 2, 3.
 *   scales (8 g, 2 h) f32 at record offset 512: the absmax of (row 8u + g, columns
 *          o_h .. o_h + 64) of half h's matrix, decoded once from double quant when that matrix
 *          has it. A 64-column piece lies in one block because K % 64 == 0 and the blocksize is
 *          a power-of-two multiple of 64.
 *   Rows past R and columns past K have code bytes 0 and scale 0, so they add exact zeros.
 *
 * tile4_pack_codes(packed0, packed1, rows, cols, piece_cols, half_offset, pieces, tiles, records)
 *   Thread (tile, lane) gathers its 16 code bytes, half h's from packed_h (SPLIT: the same
 *   matrix twice). The host calls it once per matrix of a row space, records advanced to the
 *   matrix's first unit. Launch: 1-D, 256 threads, one thread per (tile, lane).
 * tile4_pack_scales_plain(absmax, rows, cols, blocksize, piece_cols, half_offset, half_mask,
 *                         pieces, tiles, records)
 * tile4_pack_scales_double(codes, dyn_map, nested, offset, nested_blocksize, rows, cols,
 *                          blocksize, piece_cols, half_offset, half_mask, pieces, tiles, records)
 *   Thread (tile, g, h) writes one scale where bit h of half_mask is set (PAIR: called once per
 *   half, with that half's matrix): absmax[block], or dyn_map[codes[block]] *
 *   nested[block / nested_blocksize] + offset (the dequantize kernels' expression), block =
 *   (row * cols + o_h) / blocksize. Launch: 1-D, 256 threads, one thread per scale.
 *   Both checked by the GEMVs below (selftest "gemv4 tiled" and "decode tiled" rows).
 *
 * gemv4_tiled_bf16, gemv4_tiled_xcache_bf16, gemv4_tiled_w32_r2_bf16
 *   (records, table, rows, cols, units, pieces, x, y)   (SPLIT, 1 matrix)
 *   y (rows,) bf16 = W x: x (cols,) bf16, the code table rounded to bf16 (the pair table), the
 *   four mmas of a tile into a fresh f32 accumulator that the lanes t = 0 scale by their rows'
 *   absmax into f32 sums, y rounded once: gemv4_mma's numerics, with the absmax applied per 64
 *   columns instead of per 32.
 *   B: column 0 holds x for half 0's columns and column 1 x for half 1's (lanes g = 0 and g = 1
 *   load x's 16 columns PC p + HO g + 16 t .. + 16 with predicated 16-byte shared loads; the
 *   other lanes hold zeros), so lane (g, 0)'s accumulator C[g][0] is half 0's partial sum of
 *   row g and C[g + 8][1] half 1's.
 *   Builds: W warps and a ring of D tiles a warp: gemv4_tiled_bf16 W = 16, D = 4;
 *   gemv4_tiled_xcache_bf16 the same for pieces == 2 W only (4096 columns);
 *   gemv4_tiled_w32_r2_bf16 W = 32, D = 2.
 *   Launch: 1-D, W x 32 threads, grid G <= the SM count (one CTA an SM, persistent). Dynamic
 *   shared memory (tiled_shared_bytes on the host): x padded with zeros to whole pieces, the
 *   slots (below), the fused kernel's regions (below), then the bf16 pair table
 *   (pair_table.cuh) at the first 64 KiB-aligned shared-window address, so that one byte_perm
 *   of a code word and the lane's table address is the lookup's whole address (the host adds
 *   64 KiB - 1 of slack).
 *   CTA b owns units [units * b / G, units * (b + 1) / G), n = their tiles; warp w walks the
 *   CTA's tiles w, w + W, w + 2W, ... Each warp keeps D tiles in a register ring: once a tile's
 *   codes are looked up its slot loads the tile D ahead; the first D loads go out before the
 *   pair table and x are staged. Tiles go two at a time with their lookups and mmas
 *   interleaved (two independent chains a warp), and a round of D tiles has no branch
 *   (predicated refills and slot stores) when pieces >= W. When a warp leaves a unit it writes
 *   its partial sums to the slot (unit, warp) in shared memory; after the loop and one barrier,
 *   warp w
 *   finishes units w, w + W, ...: lane 2g + h adds half h of row g over the W warps' slots in
 *   warp order (a fixed order: deterministic); the plain GEMV then adds half 0 + half 1 and
 *   writes y. The xcache build (pieces == 2W: warp w's tiles alternate between pieces w and
 *   w + W) keeps its two x fragments in registers.
 *   Checked against: quant::dequantize_4bit_f32 then an f64 product on the CPU (sun selftest,
 *   "gemv4 tiled" rows: several shapes, NF4 and FP4, plain and double quant).
 *
 * gemv4_tiled_fused_bf16(TiledFusedArgs args)
 *   The same walk (15 walkers, ring 4, x from shared memory; one more warp, the LoRA warp,
 *   below: 16 warps leave the walk 128 registers) over a SPLIT row space (modes ROWS,
 *   RESIDUAL) or a PAIR (mode SWIGLU), with the epilogue of gemv4_mma_fused_* (nf4.cu) per
 *   unit: v = W u + s (B[row, :] . z) for the matrix the row belongs to, the LoRA
 *   term in f32 where rank > 0:
 *   TILED_ROWS (1..3 matrices): out_i[row] = bf16(v);
 *   TILED_RESIDUAL (1 matrix): residual_out[row] = residual[row] + bf16(v) (f32), out[row] =
 *     bf16(residual_out[row]);
 *   TILED_SWIGLU (PAIR, gate and up of equal rows): g = bf16(v_gate), u = bf16(v_up),
 *     out_0[row] = bf16(g / (1 + exp(-g)) u) (swiglu.cu's expression, as nf4.cu's).
 *   The kernel makes the LoRA products' inputs itself (no launch before it for them):
 *   - the norm: with norm_weight, the product's input u is RMSNorm(x) (rmsnorm_forward_bf16's
 *     expression and sum order, bit for bit), computed by every CTA from x in shared memory;
 *   - z_m = A_m u, rounded to bf16 once, by the last warp of each CTA (the LoRA warp) while the
 *     15 others walk: the A rows (all matrices' in order) are dealt to the CTAs (CTA b: rows b,
 *     b + G, ...), copied into shared memory by cp.async before pdl_wait (a weight); once u is
 *     staged the LoRA warp writes its rows' z to z_rows, releases them and adds one to
 *     grid_sync[0], waits for all G arrivals, and reads the whole z into shared memory. All
 *     CTAs are resident (one an SM, grid <= SM count), so the wait ends; the last CTA to leave
 *     resets the counters. At the 7B shapes this ends well before the walk does.
 *   The CTA's B rows (8 a unit for SPLIT, 16 for PAIR: gate rows then up rows) are copied into
 *   shared memory by cp.async before pdl_wait (B is a weight), one warp a row, as bf16 pairs,
 *   rows lora_words u32 apart with zeros past the rank, with the norm's weight; x by cp.async
 *   after it (every copy of a thread in flight at once: a loop of loads and stores would wait
 *   one memory round trip an iteration), and the residual of the CTA's rows (RESIDUAL). In the
 *   finish, lane l takes row l % RB (RB = 8
 *   or 16 rows of B a unit) and words l / RB, l / RB + 32 / RB, ...: lora_words = LPR (mod 32),
 *   LPR = 32 / RB, so a warp's 32 word loads fall in 32 banks; the lanes of a row are summed by
 *   shuffles (xor RB, 2 RB, ...). Nothing in the finish reads global memory.
 *   Dynamic shared memory: x, slots (unit_count * W * 16 f32), z (3 * 2 lora_words f32),
 *   B (unit_count * RB * lora_words u32), residual (unit_count * 8 f32), with a norm 32 + cols
 *   f32 (block_sum's scratch, the weight), with adapters ceil(total rank / G) A rows (cols
 *   bf16 each), then the pair table 64 KiB-aligned; the host sizes it for the largest
 *   unit_count (decode_tiled::fused_shared_bytes).
 *   The kernel re-checks the arguments (tiled_fused_fits) and writes nothing when one fails.
 *   Checked against: dequantize + f64 products and the epilogue's math on the CPU (sun selftest,
 *   "decode tiled" rows, the "decode gemv4" rows' shapes, bounds and oracle), and the model's
 *   decode against the unfused path ("model decode ..." rows, the tiled copy prepared).
 *   ptx/tools/gemv4_tiled_emulate.py replays the packing, the fragments, the walks and the
 *   finish (bank mapping included) in numpy against W x.
 *
 * Built without --use_fast_math (the SwiGLU expf must be the accurate one, as in nf4.cu).
 */

#include <cuda_bf16.h>
#include <stdint.h>

#include "mma.cuh"
#include "pair_table.cuh"
#include "pdl.cuh"
#include "vec8.cuh"

#define TILE_UINT4 32      /* a tile's codes in uint4: one per lane */
#define TILE_SCALES 16     /* a tile's scales: 8 rows x 2 halves */
#define RECORD_BYTES 576   /* a tile's record: 512 bytes of codes, then its 16 f32 scales */
#define RECORD_UINT4 (RECORD_BYTES / 16)
#define RECORD_FLOATS (RECORD_BYTES / 4)
#define RECORD_CODE_BYTES 512
#define UNIT_ROWS 8        /* output rows per unit */
#define HALF_COLS 64       /* columns of a half */
#define SPLIT_PIECE_COLS 128 /* SPLIT: columns of a row per tile, two halves of 64 */
#define PAIR_PIECE_COLS 64   /* PAIR: columns per tile, the same 64 for both halves */
#define PACK_THREADS 256

/* -------------------------------------------------------------------------------------------- */
/* repacking                                                                                     */

/* (row, first column) of half h of fragment row g of tile `tile`. */
struct TileSource {
    int64_t row;
    int64_t col;
};
__device__ __forceinline__ TileSource tile_source(int64_t tile, int pieces, int piece_cols,
                                                  int half_offset, int g, int h) {
    const int64_t unit = tile / pieces, piece = tile - unit * pieces;
    return TileSource{unit * UNIT_ROWS + g, piece * piece_cols + h * half_offset};
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_codes(const uint8_t* __restrict__ packed0, const uint8_t* __restrict__ packed1,
                 int64_t rows, int64_t cols, int32_t piece_cols, int32_t half_offset,
                 int32_t pieces, int64_t tiles, uint4* __restrict__ records) {
    const int64_t i = (int64_t)blockIdx.x * PACK_THREADS + threadIdx.x;
    if (i >= tiles * TILE_UINT4) return;
    const int64_t tile = i / TILE_UINT4;
    const int lane = (int)(i % TILE_UINT4), g = lane >> 2, t = lane & 3;
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        uint32_t word = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int h = q & 1;
            const TileSource src = tile_source(tile, pieces, piece_cols, half_offset, g, h);
            const int64_t col = src.col + 16 * t + 4 * j + 2 * (q >> 1);
            const uint8_t* packed = h == 0 ? packed0 : packed1;
            if (src.row < rows && col < cols) /* cols is even: a byte never straddles rows */
                word |= (uint32_t)packed[(src.row * cols + col) >> 1] << (8 * q);
        }
        words[j] = word;
    }
    records[tile * RECORD_UINT4 + lane] = make_uint4(words[0], words[1], words[2], words[3]);
}

/* The absmax of scale i = (tile, g, h) where bit h of half_mask is set, or 0 past the matrix;
   Absmax(block) decodes a block. */
template <typename Absmax>
__device__ __forceinline__ void pack_scale(int64_t rows, int64_t cols, int64_t blocksize,
                                           int piece_cols, int half_offset, int half_mask,
                                           int32_t pieces, int64_t tiles, float* records,
                                           Absmax absmax) {
    const int64_t i = (int64_t)blockIdx.x * PACK_THREADS + threadIdx.x;
    if (i >= tiles * TILE_SCALES) return;
    const int slot = (int)(i % TILE_SCALES);
    if (((half_mask >> (slot & 1)) & 1) == 0) return;
    const int64_t tile = i / TILE_SCALES;
    const TileSource src = tile_source(tile, pieces, piece_cols, half_offset, slot >> 1, slot & 1);
    records[tile * RECORD_FLOATS + RECORD_CODE_BYTES / 4 + slot] =
        src.row < rows && src.col < cols ? absmax((src.row * cols + src.col) / blocksize) : 0.0f;
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_scales_plain(const float* __restrict__ absmax, int64_t rows, int64_t cols,
                        int64_t blocksize, int32_t piece_cols, int32_t half_offset,
                        int32_t half_mask, int32_t pieces, int64_t tiles, float* records) {
    pack_scale(rows, cols, blocksize, piece_cols, half_offset, half_mask, pieces, tiles, records,
               [=](int64_t block) { return absmax[block]; });
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_scales_double(const uint8_t* __restrict__ codes, const float* __restrict__ dyn_map,
                         const float* __restrict__ nested, float offset, int64_t nested_blocksize,
                         int64_t rows, int64_t cols, int64_t blocksize, int32_t piece_cols,
                         int32_t half_offset, int32_t half_mask, int32_t pieces, int64_t tiles,
                         float* records) {
    pack_scale(rows, cols, blocksize, piece_cols, half_offset, half_mask, pieces, tiles, records,
               [=](int64_t block) {
                   return dyn_map[codes[block]] * nested[block / nested_blocksize] + offset;
               });
}

/* -------------------------------------------------------------------------------------------- */
/* the walk shared by the GEMVs                                                                  */

/* 32-bit shared-window loads (addresses from cvta.to.shared, so that a lookup's address is one
   byte_perm: see tile_mma). Volatile: they stay after the barrier that publishes the
   tables. */
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
/* 16 bytes at addr where `active`, else zeros: only the active lanes take a shared-memory
   cycle. */
__device__ __forceinline__ uint4 lds128_if(uint32_t addr, bool active) {
    uint4 v;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.u32 p, %5, 0;\n"
        "mov.b32 %0, 0;\n"
        "mov.b32 %1, 0;\n"
        "mov.b32 %2, 0;\n"
        "mov.b32 %3, 0;\n"
        "@p ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "r"(addr), "r"((uint32_t)active));
    return v;
}

/* Stores (a, b) as 8 bytes at shared address addr where `active`: a predicated store. */
__device__ __forceinline__ void sts64_if(uint32_t addr, float a, float b, bool active) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.u32 p, %3, 0;\n"
        "@p st.shared.v2.f32 [%0], {%1, %2};\n"
        "}\n" ::"r"(addr), "f"(a), "f"(b), "r"((uint32_t)active)
        : "memory");
}

/* v = *p (streaming: evict first) where `active`, else v unchanged: a predicated load, so that a
   ring's refills need no branch. */
__device__ __forceinline__ void ldcs_if(uint4& v, const uint4* p, bool active) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.u32 p, %5, 0;\n"
        "@p ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"((uint32_t)active));
}
__device__ __forceinline__ void ldcs_if(float2& v, const float2* p, bool active) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.u32 p, %3, 0;\n"
        "@p ld.global.cs.v2.f32 {%0, %1}, [%2];\n"
        "}\n"
        : "+f"(v.x), "+f"(v.y)
        : "l"(p), "r"((uint32_t)active));
}

/* A compile-time int as a value (picks a generic lambda's instantiation). */
template <int V>
struct Const {
    static constexpr int value = V;
};

/* (piece columns, half offset) of a layout: SPLIT (128, 64), PAIR (64, 0). */
template <bool PAIR>
struct TiledLayout {
    static constexpr int PIECE_COLS = PAIR ? PAIR_PIECE_COLS : SPLIT_PIECE_COLS;
    static constexpr int HALF_OFFSET = PAIR ? 0 : HALF_COLS;
};

/* A lane's x fragment of one tile: lanes g < 2 hold B column g (half g's 16 columns
   PC p + HO g + 16 t), the others zeros. */
struct XFragment {
    uint4 first, second;
};

/* Lookups and mma j (0..3) of one tile into its accumulator c: the four A registers are code
   word j's bytes through the pair table (lane_table is the table's shared address, 64 KiB-aligned,
   plus lane * 4: byte_perm puts code byte q of the word in its byte 1, so a lookup's address is
   one instruction), B is x's words 2j, 2j + 1 of the lane's 16 columns (columns 4j .. 4j + 3). */
__device__ __forceinline__ void tile_mma(uint32_t lane_table, uint4 codes, XFragment x, int j,
                                         float (&c)[4]) {
    const uint32_t word = component(codes, j);
    uint32_t a[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) a[q] = lds32(__byte_perm(word, lane_table, 0x7604u | (q << 4)));
    const uint4 xv = j < 2 ? x.first : x.second;
    const uint32_t b[2] = {component(xv, 2 * (j & 1)), component(xv, 2 * (j & 1) + 1)};
    mma_bf16(c, a, b);
}

/* N tiles' products, each tile's four mmas into a fresh accumulator: products[t] is tile t's
   entries (g, 0) and (g + 8, 1), i.e. half 0 and half 1 of row g on lanes t = 0 (other lanes'
   products are unused). The tiles' lookups and mmas are interleaved (mma j of every tile, then
   j + 1): N independent chains, so a warp has work while the others' lookups or mmas are in
   flight. */
template <int N>
__device__ __forceinline__ void tile_products(uint32_t lane_table, const uint4 (&codes)[N],
                                              const XFragment (&x)[N], float2 (&products)[N]) {
    float c[N][4];
#pragma unroll
    for (int t = 0; t < N; ++t) c[t][0] = c[t][1] = c[t][2] = c[t][3] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int t = 0; t < N; ++t) tile_mma(lane_table, codes[t], x[t], j, c[t]);
    }
#pragma unroll
    for (int t = 0; t < N; ++t) products[t] = make_float2(c[t][0], c[t][3]);
}

/* Bytes of x in shared memory: padded with zeros to whole pieces. */
template <bool PAIR>
__device__ __forceinline__ int tiled_x_bytes(int pieces) {
    return pieces * TiledLayout<PAIR>::PIECE_COLS * 2;
}

/* Where a tile of a warp's walk lies: its CTA-relative unit and its piece. */
struct TilePos {
    int unit;
    int piece;
};

/* A warp's walk over the CTA's tiles w, w + W, ...: where its partial sums go and which x a
   tile reads. */
template <int WARPS, bool PAIR>
struct TileWalk {
    uint32_t lane_slot; /* shared-window address of this lane's pair in slot (unit 0, warp):
                           slots (units of the CTA, WARPS, 16) f32, lane 4g + t at 2g */
    int pieces;
    uint32_t x_lane; /* this lane's x at piece 0 (lanes g < 2) */
    float acc[2];

    /* The position WARPS tiles after p. ONE_WRAP (pieces >= WARPS: a step crosses at most one
       unit boundary) without a branch. */
    template <bool ONE_WRAP>
    __device__ __forceinline__ TilePos next(TilePos p) const {
        p.piece += WARPS;
        if (ONE_WRAP) {
            const bool wraps = p.piece >= pieces;
            p.piece = wraps ? p.piece - pieces : p.piece;
            p.unit += wraps ? 1 : 0;
        } else {
            while (p.piece >= pieces) {
                p.piece -= pieces;
                ++p.unit;
            }
        }
        return p;
    }

    /* The x fragment of the tile at p, from shared memory. */
    __device__ __forceinline__ XFragment x_fragment(TilePos p, bool x_lane_active) const {
        const uint32_t at = x_lane + (uint32_t)p.piece * (TiledLayout<PAIR>::PIECE_COLS * 2);
        return XFragment{lds128_if(at, x_lane_active), lds128_if(at + 16, x_lane_active)};
    }

    /* Adds the products of the tile at p, scaled by its rows' absmax, to acc; when the walk's
       next tile (at next) lies in another unit, writes acc to the slot (p.unit, warp) (lanes
       t = 0: row g, halves 0 and 1) with a predicated store and restarts it. */
    __device__ __forceinline__ void fold(float2 products, float2 scale, TilePos p, TilePos next,
                                         int lane) {
        acc[0] = fmaf(scale.x, products.x, acc[0]);
        acc[1] = fmaf(scale.y, products.y, acc[1]);
        const bool leaving = next.unit != p.unit; /* uniform over the warp */
        const uint32_t slot = lane_slot + (uint32_t)p.unit * (WARPS * TILE_SCALES * 4);
        sts64_if(slot, acc[0], acc[1], leaving && (lane & 3) == 0);
        acc[0] = leaving ? 0.0f : acc[0];
        acc[1] = leaving ? 0.0f : acc[1];
    }
};

/* A CTA's share of the units and where its shared memory goes. */
struct TiledCta {
    int u0;          /* first unit */
    int unit_count;  /* units it owns */
    uint8_t* dyn;    /* dynamic shared memory (generic address) */
    uint32_t dyn_sh; /* its shared-window address */
};

__device__ __forceinline__ TiledCta tiled_cta(int units) {
    TiledCta cta;
    cta.u0 = (int)((int64_t)units * blockIdx.x / gridDim.x);
    cta.unit_count = (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x) - cta.u0;
    cta.dyn = dynamic_shared();
    cta.dyn_sh = smem_addr(cta.dyn);
    return cta;
}

/* The pair table's shared address: the first 64 KiB-aligned address at or after `end` (a
   shared-window address), or 0 when it would run past the dynamic shared memory the host gave
   (the host's size is too small: the kernel then writes nothing). */
__device__ __forceinline__ uint32_t pair_table_at(const TiledCta& cta, uint32_t end) {
    const uint32_t table_sh = (end + PAIR_TABLE_BYTES - 1) & ~(uint32_t)(PAIR_TABLE_BYTES - 1);
    uint32_t dyn_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_size));
    return table_sh + PAIR_TABLE_BYTES <= cta.dyn_sh + dyn_size ? table_sh : 0;
}

/* No extra staging (the plain GEMV). */
struct NoStaging {
    __device__ __forceinline__ void before_wait() const {}
    __device__ __forceinline__ void after_wait() const {}
    __device__ __forceinline__ void before_walk() const {}
};

/* The walk of the CTA's tiles into the slots: the ring's first loads, then staging (the pair
   table, zeroed slots, staging.before_wait(); pdl_wait; x by cp.async, the walking warps'
   wait for their copies, staging.after_wait()), a barrier,
   staging.before_walk(), the walk, and a barrier: the slots then hold every warp's partial
   sums. XCACHE: pieces == 2 WARPS, so warp w's tiles alternate between pieces w and w + W and
   its two x fragments stay in registers; else each tile loads its fragment from shared memory. */
template <int WARPS, int RING, bool XCACHE, bool PAIR, typename Staging>
__device__ __forceinline__ void tiled_walk(const TiledCta& cta, uint32_t table_sh,
                                           const uint8_t* __restrict__ records,
                                           const float* __restrict__ table, int cols, int pieces,
                                           const __nv_bfloat16* __restrict__ x, float* slots,
                                           Staging& staging) {
    static_assert(RING % 2 == 0,
                  "steps go in pairs of ring slots (XCACHE: slot parity is the piece)");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n = cta.unit_count * pieces;
    /* tiles warp, warp + W, ...; none for a warp past W (the fused kernel's LoRA warp) */
    const int count = warp < WARPS && n > warp ? (n - warp + WARPS - 1) / WARPS : 0;
    /* this lane's 16 code bytes and its rows' two scales in the record of the walk's first tile */
    const uint8_t* record = records + ((int64_t)cta.u0 * pieces + warp) * RECORD_BYTES;
    const uint4* codes_at = reinterpret_cast<const uint4*>(record) + lane;
    const float2* scales_at = reinterpret_cast<const float2*>(record + RECORD_CODE_BYTES) + g;
    constexpr int CODES_STEP = WARPS * RECORD_UINT4, SCALES_STEP = WARPS * (RECORD_BYTES / 8);

    /* The ring's first loads go out before anything is staged. */
    uint4 ring_codes[RING];
    float2 ring_scales[RING];
#pragma unroll
    for (int d = 0; d < RING; ++d) {
        if (d < count) {
            ring_codes[d] = __ldcs(codes_at + d * CODES_STEP);
            ring_scales[d] = __ldcs(scales_at + d * SCALES_STEP);
        }
    }

    staging.before_wait();
    build_bf16_pair_table(table, cta.dyn + (table_sh - cta.dyn_sh));
    for (int i = threadIdx.x; i < cta.unit_count * WARPS * TILE_SCALES; i += blockDim.x)
        slots[i] = 0.0f;
    pdl_wait(); /* x (and what the staging reads after it) may come from the previous kernel */
    if (warp < WARPS) {
        /* x by cp.async (zeros past cols; cols % 64 == 0): all of a thread's copies in flight
           at once, then one wait for them and for the staging's own copies */
        const uint4* x_vec = reinterpret_cast<const uint4*>(x);
        uint4* x_sh = reinterpret_cast<uint4*>(cta.dyn);
        for (int i = threadIdx.x; i < tiled_x_bytes<PAIR>(pieces) / 16; i += WARPS * 32) {
            const bool inside = i < cols / 8;
            cp_async16(x_sh + i, inside ? x_vec + i : x_vec, inside ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait_all();
    }
    staging.after_wait();
    __syncthreads();
    staging.before_walk();

    const uint32_t lane_table = table_sh + (uint32_t)lane * 4;
    const bool x_lane_active = g < 2;
    TileWalk<WARPS, PAIR> walk;
    walk.lane_slot = smem_addr(slots) + (uint32_t)(warp * TILE_SCALES + 2 * g) * 4;
    walk.pieces = pieces;
    walk.x_lane = cta.dyn_sh + (uint32_t)(g * TiledLayout<PAIR>::HALF_OFFSET + 16 * t) * 2;
    walk.acc[0] = walk.acc[1] = 0.0f;
    TilePos pos{warp / pieces, warp % pieces};
    XFragment cached[2];
    if (XCACHE && count > 0) { /* pieces warp (even steps) and warp + W (odd steps) */
        cached[0] = walk.x_fragment(pos, x_lane_active);
        cached[1] = walk.x_fragment(TilePos{pos.unit, pos.piece + WARPS}, x_lane_active);
    }

    /* Step i of the walk sits in ring slot i % RING; once its codes are looked up, its slot
       loads step i + RING. Steps go two at a time (slots d, d + 1; the last one may go alone),
       their products interleaved; the refills are predicated loads and the slot writes
       predicated stores, so a round of RING steps has no branch. */
    auto walk_all = [&](auto one_wrap) {
        constexpr bool ONE_WRAP = decltype(one_wrap)::value;
        auto x_of = [&](int d, TilePos p) {
            return XCACHE ? cached[d & 1] : walk.x_fragment(p, x_lane_active);
        };
        /* the records of the round after the current one: step i + RING of slot d is
           next_codes + d CODES_STEP (an immediate offset) */
        const uint4* next_codes = codes_at + RING * CODES_STEP;
        const float2* next_scales = scales_at + RING * SCALES_STEP;
        auto refill = [&](int d, int i) {
            const bool more = i + RING < count;
            ldcs_if(ring_codes[d], next_codes + d * CODES_STEP, more);
            ldcs_if(ring_scales[d], next_scales + d * SCALES_STEP, more);
        };
        /* steps i .. i + N - 1 in slots d .. d + N - 1 */
        auto steps = [&](auto n, int d, int i) {
            constexpr int N = decltype(n)::value;
            TilePos at[N + 1];
            at[0] = pos;
#pragma unroll
            for (int t = 0; t < N; ++t) at[t + 1] = walk.template next<ONE_WRAP>(at[t]);
            uint4 codes[N];
            XFragment xf[N];
            float2 scales[N], products[N];
#pragma unroll
            for (int t = 0; t < N; ++t) {
                codes[t] = ring_codes[d + t];
                xf[t] = x_of(d + t, at[t]);
                scales[t] = ring_scales[d + t];
            }
            tile_products<N>(lane_table, codes, xf, products);
#pragma unroll
            for (int t = 0; t < N; ++t) refill(d + t, i + t);
#pragma unroll
            for (int t = 0; t < N; ++t) walk.fold(products[t], scales[t], at[t], at[t + 1], lane);
            pos = at[N];
        };
        int i = 0;
        for (; i + RING <= count; i += RING) {
#pragma unroll
            for (int d = 0; d < RING; d += 2) steps(Const<2>{}, d, i + d);
            next_codes += RING * CODES_STEP;
            next_scales += RING * SCALES_STEP;
        }
#pragma unroll
        for (int d = 0; d < RING; d += 2) {
            if (i + d + 1 < count)
                steps(Const<2>{}, d, i + d);
            else if (i + d < count)
                steps(Const<1>{}, d, i + d);
        }
    };
    if (pieces >= WARPS)
        walk_all(Const<true>{});
    else
        walk_all(Const<false>{});
    __syncthreads();
}

/* Lane 2g + h (< 16) of a warp: half h of row g of CTA-relative unit k, summed over the WARPS
   warps' slots in warp order (zeros where a warp had no tile of the unit); other lanes 0. */
template <int WARPS>
__device__ __forceinline__ float unit_half_sum(const float* slots, int k, int lane) {
    float sum = 0.0f;
    if (lane < TILE_SCALES)
        for (int w = 0; w < WARPS; ++w) sum += slots[(k * WARPS + w) * TILE_SCALES + lane];
    return sum;
}

/* -------------------------------------------------------------------------------------------- */
/* the plain GEMV                                                                                */

/* The GEMV's conditions (the host checks them first; a launch that breaks them writes
   nothing). */
__device__ __forceinline__ bool tiled_fits(int64_t rows, int cols, int units, int pieces) {
    return rows > 0 && cols > 0 && cols % HALF_COLS == 0 &&
           units == (int)((rows + UNIT_ROWS - 1) / UNIT_ROWS) &&
           pieces == (cols + SPLIT_PIECE_COLS - 1) / SPLIT_PIECE_COLS;
}

template <int WARPS, int RING, bool XCACHE>
__device__ __forceinline__ void gemv4_tiled(const uint8_t* __restrict__ records,
                                            const float* __restrict__ table, int64_t rows,
                                            int cols, int units, int pieces,
                                            const __nv_bfloat16* __restrict__ x,
                                            __nv_bfloat16* __restrict__ y) {
    if (XCACHE && pieces != 2 * WARPS) return;
    /* Dynamic shared memory: x, the slots, then the pair table. */
    const TiledCta cta = tiled_cta(units);
    float* slots = reinterpret_cast<float*>(cta.dyn + tiled_x_bytes<false>(pieces));
    const uint32_t table_sh = pair_table_at(
        cta, cta.dyn_sh + tiled_x_bytes<false>(pieces) + cta.unit_count * WARPS * TILE_SCALES * 4);
    if (table_sh == 0) return;
    NoStaging staging;
    tiled_walk<WARPS, RING, XCACHE, false>(cta, table_sh, records, table, cols, pieces, x, slots,
                                           staging);
    pdl_launch_dependents();
    /* warp w finishes units w, w + W, ...: lane 2g adds half 1 (lane 2g + 1) to half 0 */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = warp; k < cta.unit_count; k += WARPS) {
        const float sum = unit_half_sum<WARPS>(slots, k, lane);
        const float other = __shfl_down_sync(0xFFFFFFFFu, sum, 1); /* half 1 of the same row */
        const int64_t row = (int64_t)(cta.u0 + k) * UNIT_ROWS + (lane >> 1);
        if (lane < TILE_SCALES && (lane & 1) == 0 && row < rows)
            y[row] = __float2bfloat16_rn(sum + other);
    }
}

#define GEMV4_TILED(NAME, WARPS, RING, XCACHE)                                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(                           \
        const uint8_t* records, const float* table, int64_t rows, int32_t cols, int32_t units,   \
        int32_t pieces, const __nv_bfloat16* x, __nv_bfloat16* y) {                              \
        if (!tiled_fits(rows, cols, units, pieces)) return;                                      \
        gemv4_tiled<WARPS, RING, XCACHE>(records, table, rows, cols, units, pieces, x, y);       \
    }

GEMV4_TILED(gemv4_tiled_bf16, 16, 4, false)
GEMV4_TILED(gemv4_tiled_xcache_bf16, 16, 4, true)
GEMV4_TILED(gemv4_tiled_w32_r2_bf16, 32, 2, false)

/* -------------------------------------------------------------------------------------------- */
/* the fused decode GEMV (gemv4_tiled_fused_*: see the header)                                  */

#define TILED_MAX_MATRICES 3
#define TILED_ROWS 0     /* SPLIT row space: out_i = bf16(W_i x (+ LoRA)) for 1..3 matrices */
#define TILED_RESIDUAL 1 /* SPLIT, 1 matrix: residual_out = residual + bf16(W x (+ LoRA)) */
#define TILED_SWIGLU 2   /* PAIR (gate, up): out = silu(g) u, g and u rounded to bf16 */
/* Warps that walk the tiles: with the LoRA warp (warp index FUSED_WARPS) a CTA is 16 warps, 4
   a scheduler, so the walk may use 128 registers a thread (a 17th warp puts 5 on one scheduler,
   and ptxas caps the CTA at 96 registers a thread). */
#define FUSED_WARPS 15
#define LORA_WARP FUSED_WARPS /* the warp that makes z beside the walk */
#define FUSED_THREADS ((FUSED_WARPS + 1) * 32)
#define FUSED_RING 4

/* One matrix of a fused launch (the host's #[repr(C)] twin is
   backend::cuda::decode_tiled::TiledMatrix: 40 bytes, the same field order). */
struct TiledMatrix {
    const uint16_t* lora_b; /* (rows, lora_rank) bf16 when lora_rank > 0 */
    const uint16_t* lora_a; /* (lora_rank, cols) bf16 when lora_rank > 0 */
    uint16_t* out;          /* ROWS: (rows,) bf16; RESIDUAL, SWIGLU: matrix 0's is the output */
    int64_t rows;
    int32_t lora_rank;      /* 0: no adapter */
    float lora_scale;
};
static_assert(sizeof(TiledMatrix) == 40, "TiledMatrix: the host's layout");

/* All arguments of a fused launch, passed by value (232 bytes of kernel parameters; the host's
   twin is backend::cuda::decode_tiled::TiledFusedArgs). */
struct TiledFusedArgs {
    TiledMatrix matrix[TILED_MAX_MATRICES];
    const uint8_t* records;  /* (units * pieces, 576) the tiled copy */
    const float* table;      /* (16,) f32 code table of every matrix */
    const uint16_t* x;       /* (cols,) bf16 */
    const float* residual;   /* RESIDUAL: (rows,) f32 */
    float* residual_out;     /* RESIDUAL: (rows,) f32, not aliasing residual */
    const float* norm_weight; /* (cols,) f32: the product's input is RMSNorm(x); null: x itself */
    float* z_rows;           /* (total rank,) f32 when an adapter is present: z, bf16 values */
    uint32_t* grid_sync;     /* (2,) u32 (arrivals, departures), zeros between launches */
    int32_t cols;
    int32_t units;
    int32_t pieces;
    int32_t count;           /* matrices: 1..3 (ROWS), 1 (RESIDUAL), 2 (SWIGLU) */
    int32_t mode;
    int32_t lora_words;      /* u32 per B row in shared memory: 0 without adapters, else
                                >= ceil(max rank / 2) and = 32 / RB (mod 32) */
    int32_t first_unit[TILED_MAX_MATRICES + 1]; /* SPLIT: matrix i's first unit; [count] = units */
    float norm_eps;
};
static_assert(sizeof(TiledFusedArgs) == 232, "TiledFusedArgs: the host's layout");

/* Field f of matrix i (0..2), selected without indexing the parameter array at run time (which
   would copy the whole array to local memory). */
#define TILED_FIELD(args, i, f) \
    ((i) == 0 ? (args).matrix[0].f : (i) == 1 ? (args).matrix[1].f : (args).matrix[2].f)
#define TILED_FIRST_UNIT(args, i) \
    ((i) == 0 ? (args).first_unit[0] : (i) == 1 ? (args).first_unit[1] : (args).first_unit[2])

/* Rows of B (and output rows) a unit has: SPLIT 8 of one matrix, PAIR 8 of gate then 8 of up;
   lanes of a warp per B row in the finish. */
template <bool PAIR>
struct FusedRows {
    static constexpr int RB = PAIR ? 16 : 8;
    static constexpr int LPR = 32 / RB;
};

/* The launch's conditions, uniform over the grid (the host checks them first; a launch that
   breaks them writes nothing). */
__device__ __forceinline__ bool tiled_fused_fits(const TiledFusedArgs& args) {
    const bool pair = args.mode == TILED_SWIGLU;
    const int count = args.count;
    const int piece_cols = pair ? PAIR_PIECE_COLS : SPLIT_PIECE_COLS;
    if (args.cols <= 0 || args.cols % HALF_COLS != 0 ||
        args.pieces != (args.cols + piece_cols - 1) / piece_cols || args.first_unit[0] != 0)
        return false;
    if (args.mode == TILED_ROWS) {
        if (count < 1 || count > TILED_MAX_MATRICES) return false;
    } else if (args.mode == TILED_RESIDUAL) {
        if (count != 1) return false;
    } else if (pair) {
        if (count != 2 || args.matrix[0].rows != args.matrix[1].rows) return false;
    } else {
        return false;
    }
    int max_rank = 0;
#pragma unroll
    for (int i = 0; i < TILED_MAX_MATRICES; ++i) {
        if (i >= count) break;
        const TiledMatrix& m = args.matrix[i];
        if (m.rows <= 0 || m.lora_rank < 0) return false;
        max_rank = max(max_rank, m.lora_rank);
        const int64_t units = (m.rows + UNIT_ROWS - 1) / UNIT_ROWS;
        if (pair ? units != args.units
                 : units != (int64_t)args.first_unit[i + 1] - args.first_unit[i])
            return false;
    }
    if (!pair && args.first_unit[count] != args.units) return false;
    if (args.norm_weight != nullptr && !(args.norm_eps >= 0.0f)) return false;
    const int lpr = pair ? FusedRows<true>::LPR : FusedRows<false>::LPR;
    return max_rank == 0 ? args.lora_words == 0
                         : args.lora_words >= (max_rank + 1) / 2 && args.lora_words % 32 == lpr &&
                               args.z_rows != nullptr && args.grid_sync != nullptr;
}

/* Which matrix a row of B (row rho < RB of unit u) belongs to, and its row there. */
struct RowRef {
    int matrix;
    int64_t row;
};
template <bool PAIR>
__device__ __forceinline__ RowRef row_of(const TiledFusedArgs& args, int u, int rho) {
    if (PAIR) return RowRef{rho >> 3, (int64_t)u * UNIT_ROWS + (rho & 7)};
    const int m = (args.count > 1 && u >= args.first_unit[1]) + (args.count > 2 && u >= args.first_unit[2]);
    return RowRef{m, (int64_t)(u - TILED_FIRST_UNIT(args, m)) * UNIT_ROWS + rho};
}

/* The LoRA A products z_m = A_m u (u: x after the norm where there is one), made by each CTA's
   LoRA warp beside the walk, one whole A row at a time: row j of the matrices' A rows in order
   (matrix 0's lora_rank rows, then matrix 1's, ...) is CTA (j mod G)'s, its k-th (k = j / G),
   copied into the CTA's A rows in shared memory before pdl_wait. */
struct LoraRows {
    int total;   /* the matrices' ranks summed */
    int per_cta; /* ceil(total / G): the A rows a CTA's shared memory holds */

    __device__ __forceinline__ LoraRows(const TiledFusedArgs& args) {
        total = 0;
#pragma unroll
        for (int m = 0; m < TILED_MAX_MATRICES; ++m)
            if (m < args.count) total += TILED_FIELD(args, m, lora_rank);
        per_cta = (total + (int)gridDim.x - 1) / (int)gridDim.x;
    }

    /* A row j: the row of its matrix's factor. */
    __device__ __forceinline__ const uint16_t* row(const TiledFusedArgs& args, int j) const {
        int m = 0;
        while (m + 1 < args.count && j >= TILED_FIELD(args, m, lora_rank)) {
            j -= TILED_FIELD(args, m, lora_rank);
            ++m;
        }
        return TILED_FIELD(args, m, lora_a) + (int64_t)j * args.cols;
    }
};

/* Acquire load (gpu scope) of a counter other CTAs add to. */
__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* The fused GEMV's staging: before pdl_wait, cp.async copies of the CTA's B rows and the norm's
   weight (weights; tiled_walk waits for them with x); after it, the residual of the CTA's rows
   and the norm of x in place; after the barrier that publishes x, the LoRA warp's z (the
   walking warps go straight on to the walk). */
template <bool PAIR>
struct LoraStaging {
    const TiledFusedArgs& args;
    TiledCta cta;
    uint32_t* b_sh;     /* (unit_count * RB, lora_words) bf16 pairs, zeros past the rank */
    float* z_sh;        /* (3, 2 lora_words) f32, zeros past the rank */
    float* residual_sh; /* RESIDUAL: (unit_count * 8) f32 */
    float* norm_sh;     /* with a norm: 32 f32 of block_sum scratch, then the weight (cols,) */
    uint16_t* a_sh;     /* (rows.per_cta, cols) bf16: this CTA's A rows */
    LoraRows rows;

    /* The LoRA warp starts the cp.async copies of the CTA's A rows (lane l: 16-byte pieces l,
       l + 32, ... of each). The walking warps start cp.async copies of the norm's weight and of
       the CTA's B rows (waited for with x, in tiled_walk): warp w copies B rows w, w + W, ...
       (row rr = unit k * RB + rho), lane l its words l, l + 32, ..., zeros past the rank. Where
       the rank is odd a word straddles two elements: those rows are two u16 loads a word
       instead, and rows past the matrix or without an adapter are plain zero stores. */
    __device__ __forceinline__ void before_wait() const {
        constexpr int RB = FusedRows<PAIR>::RB, WALKERS = FUSED_WARPS * 32;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int words = args.lora_words;
        if (warp == LORA_WARP) {
            if (words == 0) return;
            const int pieces16 = args.cols / 8; /* cols % 64 == 0 */
            for (int k = 0, j = (int)blockIdx.x; j < rows.total; ++k, j += (int)gridDim.x) {
                const uint4* src = reinterpret_cast<const uint4*>(rows.row(args, j));
                uint4* dst = reinterpret_cast<uint4*>(a_sh + (int64_t)k * args.cols);
                for (int i = lane; i < pieces16; i += 32) cp_async16(dst + i, src + i, 16);
            }
            cp_async_commit();
            return;
        }
        if (args.norm_weight != nullptr) {
            float* weight_sh = norm_sh + 32;
            const bool aligned =
                ((reinterpret_cast<uintptr_t>(args.norm_weight) | smem_addr(weight_sh)) & 15) == 0;
            if (aligned) /* cols % 64 == 0: whole 16-byte pieces */
                for (int i = 4 * threadIdx.x; i < args.cols; i += 4 * WALKERS)
                    cp_async16(weight_sh + i, args.norm_weight + i, 16);
            else
                for (int i = threadIdx.x; i < args.cols; i += WALKERS)
                    cp_async4(weight_sh + i, args.norm_weight + i, 4);
        }
        for (int rr = warp; words > 0 && rr < cta.unit_count * RB; rr += FUSED_WARPS) {
            const RowRef ref = row_of<PAIR>(args, cta.u0 + rr / RB, rr % RB);
            const int rank = TILED_FIELD(args, ref.matrix, lora_rank);
            const bool valid = rank > 0 && ref.row < TILED_FIELD(args, ref.matrix, rows);
            uint32_t* dst = b_sh + rr * words;
            if (!valid) {
                for (int w = lane; w < words; w += 32) dst[w] = 0u;
                continue;
            }
            const uint16_t* b_row = TILED_FIELD(args, ref.matrix, lora_b) + ref.row * rank;
            if ((rank & 1) == 0) { /* the row starts on 4 bytes */
                const uint32_t* src = reinterpret_cast<const uint32_t*>(b_row);
                for (int w = lane; w < words; w += 32) {
                    const bool inside = 2 * w < rank;
                    cp_async4(dst + w, inside ? src + w : src, inside ? 4 : 0);
                }
            } else {
                for (int w = lane; w < words; w += 32) {
                    uint32_t word = 0;
                    if (2 * w < rank) {
                        const uint32_t hi = 2 * w + 1 < rank ? __ldg(b_row + 2 * w + 1) : 0u;
                        word = (uint32_t)__ldg(b_row + 2 * w) | (hi << 16);
                    }
                    dst[w] = word;
                }
            }
        }
        cp_async_commit();
    }

    /* x_sh holds x (cols bf16) once a barrier passes (each walking thread has waited for its
       copies). The norm: rmsnorm_forward_bf16's expression and sum order (thread t < 256:
       elements t, t + 256, ... in one fmaf chain, then block_sum; threads past 256 add zeros),
       so the normalized row is bit for bit that kernel's output (and decode.cu's
       rmsnorm_lora_a_bf16's). */
    __device__ __forceinline__ void after_wait() const {
        if (args.mode == TILED_RESIDUAL)
            for (int i = threadIdx.x; i < cta.unit_count * UNIT_ROWS; i += blockDim.x) {
                const int64_t row = (int64_t)cta.u0 * UNIT_ROWS + i;
                residual_sh[i] = row < args.matrix[0].rows ? __ldg(args.residual + row) : 0.0f;
            }
        if (args.norm_weight == nullptr) return;
        uint16_t* x_sh = reinterpret_cast<uint16_t*>(cta.dyn);
        constexpr int NORM_THREADS = 256;
        __syncthreads(); /* x_sh complete */
        float sum_sq = 0.0f;
        if (threadIdx.x < NORM_THREADS)
            for (int c = threadIdx.x; c < args.cols; c += NORM_THREADS) {
                const float v = bf16_bits_to_f32(x_sh[c]);
                sum_sq = fmaf(v, v, sum_sq);
            }
        sum_sq = block_sum(sum_sq, norm_sh);
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)args.cols + args.norm_eps);
        for (int c = threadIdx.x; c < args.cols; c += blockDim.x)
            x_sh[c] = f32_to_bf16_bits(norm_sh[32 + c] * (bf16_bits_to_f32(x_sh[c]) * inv_rms));
    }

    /* The LoRA warp, while the others walk: z_j = bf16(A_j . u) of the CTA's rows j into
       z_rows (lane l sums 16-byte pieces l, l + 32, ... in order, then warp_sum), a release of
       them and an arrival on grid_sync[0]; once all G CTAs have arrived, z of every matrix into
       z_sh; then a departure on grid_sync[1], the last CTA to depart setting both counters back
       to zero for the next launch (which adds to them only after its pdl_wait, so after this
       kernel has completed). Every CTA of the grid is resident (at most one CTA an SM, one CTA
       taking an SM), so the wait ends; past ~4 s it traps rather than hang. */
    __device__ __forceinline__ void before_walk() const {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int words = args.lora_words;
        if (warp != LORA_WARP || words == 0) return;
        const uint4* x_vecs = reinterpret_cast<const uint4*>(cta.dyn);
        const int pieces16 = args.cols / 8;
        cp_async_wait_all();
        __syncwarp();
        for (int k = 0, j = (int)blockIdx.x; j < rows.total; ++k, j += (int)gridDim.x) {
            const uint4* a_vecs = reinterpret_cast<const uint4*>(a_sh + (int64_t)k * args.cols);
            float dot = 0.0f;
            for (int i = lane; i < pieces16; i += 32) dot = dot_bf16x8(a_vecs[i], x_vecs[i], dot);
            dot = warp_sum(dot);
            if (lane == 0) args.z_rows[j] = bf16_bits_to_f32(f32_to_bf16_bits(dot));
        }
        if (lane == 0) {
            __threadfence();
            atomicAdd(args.grid_sync, 1u);
        }
        for (uint32_t spins = 0; load_acquire(args.grid_sync) < gridDim.x; ++spins) {
            if (spins == (1u << 26)) __trap();
            __nanosleep(32);
        }
        for (int i = lane; i < TILED_MAX_MATRICES * 2 * words; i += 32) {
            const int m = i / (2 * words), e = i - m * 2 * words;
            float z = 0.0f;
            if (m < args.count && e < TILED_FIELD(args, m, lora_rank)) {
                int j = e;
                for (int p = 0; p < m; ++p) j += TILED_FIELD(args, p, lora_rank);
                z = __ldcg(args.z_rows + j);
            }
            z_sh[i] = z;
        }
        __syncwarp();
        if (lane == 0 && atomicAdd(args.grid_sync + 1, 1u) == gridDim.x - 1) {
            atomicExch(args.grid_sync, 0u);
            atomicExch(args.grid_sync + 1, 0u);
        }
    }
};

/* After the walk: warp w finishes units w, w + W, ... Lane l takes row rho = l % RB of B (and
   of the unit's values) and its words l / RB + j LPR; the value v of row rho comes from the
   slot sums by shuffles, the dot product from shared memory and shuffles (xor RB, 2 RB, ...),
   then lanes rho < 8 write. */
template <bool PAIR>
__device__ __forceinline__ void tiled_fused_finish(const TiledFusedArgs& args, const TiledCta& cta,
                                                   const float* slots, const uint32_t* b_sh,
                                                   const float* z_sh, const float* residual_sh) {
    constexpr int RB = FusedRows<PAIR>::RB, LPR = FusedRows<PAIR>::LPR;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rho = lane & (RB - 1), s = lane / RB;
    const int words = args.lora_words;
    if (warp >= FUSED_WARPS) return; /* the LoRA warp */
    for (int k = warp; k < cta.unit_count; k += FUSED_WARPS) {
        const int u = cta.u0 + k;
        const float part = unit_half_sum<FUSED_WARPS>(slots, k, lane); /* lane 2g + h */
        float v;
        if (PAIR) { /* half rho >> 3 (gate, up) of row rho & 7 */
            v = __shfl_sync(0xFFFFFFFFu, part, 2 * (rho & 7) + (rho >> 3));
        } else { /* half 0 + half 1 of row rho */
            const float h0 = __shfl_sync(0xFFFFFFFFu, part, 2 * rho);
            const float h1 = __shfl_sync(0xFFFFFFFFu, part, 2 * rho + 1);
            v = h0 + h1;
        }
        const RowRef ref = row_of<PAIR>(args, u, rho);
        const int rank = TILED_FIELD(args, ref.matrix, lora_rank);
        float dot = 0.0f;
        if (words > 0) { /* uniform; words % LPR == 0: every lane runs the same trip count */
            const uint32_t* b_row = b_sh + (k * RB + rho) * words;
            const float2* z = reinterpret_cast<const float2*>(z_sh + ref.matrix * 2 * words);
            for (int w = s; w < words; w += LPR) {
                const uint32_t pair = b_row[w];
                const float2 zz = z[w];
                dot = fmaf(__uint_as_float(pair << 16), zz.x, dot);
                dot = fmaf(__uint_as_float(pair & 0xFFFF0000u), zz.y, dot);
            }
#pragma unroll
            for (int o = RB; o < 32; o <<= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
        }
        const float value = rank > 0 ? fmaf(TILED_FIELD(args, ref.matrix, lora_scale), dot, v) : v;
        const float rounded = __bfloat162float(__float2bfloat16_rn(value));
        const bool valid = ref.row < TILED_FIELD(args, ref.matrix, rows);
        if (PAIR) {
            const float up = __shfl_down_sync(0xFFFFFFFFu, rounded, 8); /* lane rho + 8: up */
            if (lane < UNIT_ROWS && valid) {
                const float gate = rounded;
                const float hidden = gate / (1.0f + expf(-gate)) * up;
                args.matrix[0].out[ref.row] = __bfloat16_as_ushort(__float2bfloat16_rn(hidden));
            }
        } else if (lane < UNIT_ROWS && valid) {
            if (args.mode == TILED_RESIDUAL) {
                const float y = residual_sh[k * UNIT_ROWS + rho] + rounded;
                args.residual_out[ref.row] = y;
                args.matrix[0].out[ref.row] = __bfloat16_as_ushort(__float2bfloat16_rn(y));
            } else {
                TILED_FIELD(args, ref.matrix, out)[ref.row] =
                    __bfloat16_as_ushort(__float2bfloat16_rn(value));
            }
        }
    }
}

/* x comes from shared memory: the xcache walk needs pieces == 2 W, which 15 walkers never meet. */
template <bool PAIR>
__device__ __forceinline__ void gemv4_tiled_fused(const TiledFusedArgs& args) {
    constexpr int RB = FusedRows<PAIR>::RB;
    if (blockDim.x != FUSED_THREADS) return;
    const TiledCta cta = tiled_cta(args.units);
    const int words = args.lora_words;
    /* Dynamic shared memory: x, the slots, z, B, the residual, the norm's scratch and weight
       (with a norm), then the pair table. */
    uint8_t* at = cta.dyn + tiled_x_bytes<PAIR>(args.pieces);
    float* slots = reinterpret_cast<float*>(at);
    at += cta.unit_count * FUSED_WARPS * TILE_SCALES * 4;
    float* z_sh = reinterpret_cast<float*>(at);
    at += TILED_MAX_MATRICES * 2 * words * 4;
    uint32_t* b_sh = reinterpret_cast<uint32_t*>(at);
    at += cta.unit_count * RB * words * 4;
    float* residual_sh = reinterpret_cast<float*>(at);
    at += cta.unit_count * UNIT_ROWS * 4;
    float* norm_sh = reinterpret_cast<float*>(at);
    if (args.norm_weight != nullptr) at += (32 + args.cols) * 4;
    const LoraRows rows(args);
    uint16_t* a_sh = reinterpret_cast<uint16_t*>(at);
    if (words > 0) at += (int64_t)rows.per_cta * args.cols * 2;
    const uint32_t table_sh = pair_table_at(cta, cta.dyn_sh + (uint32_t)(at - cta.dyn));
    if (table_sh == 0) return;
    LoraStaging<PAIR> staging{args, cta, b_sh, z_sh, residual_sh, norm_sh, a_sh, rows};
    tiled_walk<FUSED_WARPS, FUSED_RING, false, PAIR>(
        cta, table_sh, args.records, args.table, args.cols, args.pieces,
        reinterpret_cast<const __nv_bfloat16*>(args.x), slots, staging);
    pdl_launch_dependents(); /* the weights, x and z are read; only the epilogue is left */
    tiled_fused_finish<PAIR>(args, cta, slots, b_sh, z_sh, residual_sh);
}

extern "C" __global__ void __launch_bounds__(FUSED_THREADS, 1)
gemv4_tiled_fused_bf16(const TiledFusedArgs args) {
    if (!tiled_fused_fits(args)) return;
    if (args.mode == TILED_SWIGLU)
        gemv4_tiled_fused<true>(args);
    else
        gemv4_tiled_fused<false>(args);
}
