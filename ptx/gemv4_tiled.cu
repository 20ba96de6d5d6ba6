/*
 * gemv4_tiled.cu: the batch-1 4-bit GEMV over weights repacked into tensor-core tiles (the decode
 * layout), and the kernels that repack them from the bitsandbytes layout.
 *
 * Why a second layout: in bitsandbytes' row-major layout a tensor-core GEMV's warp reads pieces
 * of 8 or 16 rows per load instruction and must fetch each chunk's absmax separately. Here every
 * tile is 512 contiguous bytes, exactly one 16-byte load per lane, whose bytes are already the
 * A fragments of four mma.m16n8k16 (one per 16 k), and its scales are 64 contiguous bytes.
 *
 * Layout (backend::cuda::gemv_tiled builds it on the GPU with the tile4_pack_* kernels):
 *   A product with R output rows and K columns (K % 64 == 0) is cut into units of 8 output rows,
 *   units = ceil(R / 8), and each unit into P tiles; tile (u, p) has index u * P + p. A tile is
 *   one m16 row tile over 64 k: its fragment rows g (half 0) and 8 + g (half 1), g < 8, are
 *   columns o_h .. o_h + 64 of output row 8u + g, o_h = p * 128 + 64 h: half 0 holds the first 64
 *   columns of a 128-column piece of the row, half 1 the next 64, P = ceil(K / 128).
 *   records (units * P, 576 bytes): tile i's 512 code bytes, then its 16 f32 scales.
 *   codes: lane l = 4g + t's 16 bytes (record offset 16 l) hold, for mma j < 4 (u32 j), the code
 *          bytes of (half 0, columns c, c + 1), (half 1, c, c + 1), (half 0, c + 2, c + 3),
 *          (half 1, c + 2, c + 3), c = 16t + 4j (tile-relative), bitsandbytes' bytes verbatim
 *          (even column in the high nibble): decoded by the bf16 pair table they are the mma's A
 *          registers, whose k labels 2t, 2t + 1, 2t + 8, 2t + 9 are the tile columns
 *          16t + 4j + 0, 1, 2, 3.
 *   scales (8 g, 2 h) f32 at record offset 512: the absmax of (row 8u + g, columns
 *          o_h .. o_h + 64), decoded once from double quant when the tensor has it. A 64-column
 *          piece lies in one block because K % 64 == 0 and the blocksize is a power-of-two
 *          multiple of 64.
 *   Rows past R and pieces past K have code bytes 0 and scale 0, so they add exact zeros.
 *
 * tile4_pack_codes(packed, rows, cols, pieces, tiles, records)
 *   Thread (tile, lane) gathers its 16 code bytes. Launch: 1-D, 256 threads, one thread per
 *   (tile, lane). Checked by the GEMV below (selftest "gemv4 tiled" rows).
 * tile4_pack_scales_plain(absmax, rows, cols, blocksize, pieces, tiles, records)
 * tile4_pack_scales_double(codes, dyn_map, nested, offset, nested_blocksize, rows, cols,
 *                          blocksize, pieces, tiles, records)
 *   Thread (tile, g, h) writes one scale: absmax[block], or dyn_map[codes[block]] *
 *   nested[block / nested_blocksize] + offset (the dequantize kernels' expression), block =
 *   (row * cols + o_h) / blocksize. Launch: 1-D, 256 threads, one thread per scale.
 *
 * gemv4_tiled_bf16, gemv4_tiled_xcache_bf16, gemv4_tiled_w32_r2_bf16
 *   (records, table, rows, cols, units, pieces, x, y)
 *   y (rows,) bf16 = W x: x (cols,) bf16, the code table rounded to bf16 (the pair table), the
 *   four mmas of a tile into a fresh f32 accumulator that the lanes t = 0 scale by their rows'
 *   absmax into f32 sums, y rounded once: gemv4_mma's numerics, with the absmax applied per 64
 *   columns instead of per 32.
 *   B: column 0 holds x for half 0's columns and column 1 x for half 1's (lanes g = 0 and g = 1
 *   load them with predicated 16-byte shared loads, the other lanes hold zeros), so lane (g, 0)'s
 *   accumulator C[g][0] is half 0's partial sum of row g and C[g + 8][1] half 1's.
 *   Builds: W warps and a ring of D tiles a warp: gemv4_tiled_bf16 W = 16, D = 4;
 *   gemv4_tiled_xcache_bf16 the same for pieces == 2 W only (4096 columns), its two x
 *   fragments in registers; gemv4_tiled_w32_r2_bf16 W = 32, D = 2.
 *   Launch: 1-D, W x 32 threads, grid G <= the SM count (one CTA an SM, persistent). Dynamic
 *   shared memory (tiled_shared_bytes on the host): x padded with zeros to whole pieces, the
 *   slots (below), then the bf16 pair table (pair_table.cuh) at the first 64 KiB-aligned
 *   shared-window address, so that one byte_perm of a code word and the lane's table address
 *   is the lookup's whole address (the host adds 64 KiB - 1 of slack).
 *   CTA b owns units [units * b / G, units * (b + 1) / G), n = their tiles, contiguous in
 *   memory; warp w walks the CTA's tiles w, w + W, ... (the CTA's warps read neighbouring
 *   records at once). Each warp keeps D tiles in a register ring: once a tile is summed its
 *   slot loads the tile D ahead; no barrier in the loop; the first D loads go out before the
 *   pair table and x are staged. When a warp leaves a unit it writes its partial sums to the
 *   slot (unit, warp) in shared memory (zeroed first); after the loop and one barrier, warp w
 *   finishes units w, w + W, ...: it adds the W slots of the unit in warp order (a fixed order:
 *   deterministic), then half 0 + half 1, and writes y.
 *   Checked against: quant::dequantize_4bit_f32 then an f64 product on the CPU (sun selftest,
 *   "gemv4 tiled" rows: several shapes, NF4 and FP4, plain and double quant);
 *   ptx/tools/gemv4_tiled_emulate.py replays the packing, the fragments and the warps' walks.
 *
 * Built without --use_fast_math (nothing here is transcendental).
 */

#include <cuda_bf16.h>
#include <stdint.h>

#include "mma.cuh"
#include "pair_table.cuh"
#include "pdl.cuh"

#define TILE_UINT4 32      /* a tile's codes in uint4: one per lane */
#define TILE_SCALES 16     /* a tile's scales: 8 rows x 2 halves */
#define RECORD_BYTES 576   /* a tile's record: 512 bytes of codes, then its 16 f32 scales */
#define RECORD_UINT4 (RECORD_BYTES / 16)
#define RECORD_FLOATS (RECORD_BYTES / 4)
#define RECORD_CODE_BYTES 512
#define UNIT_ROWS 8        /* output rows per unit */
#define PIECE_COLS 128     /* columns of a row per tile: two halves of 64 */
#define HALF_COLS 64
#define PACK_THREADS 256

/* -------------------------------------------------------------------------------------------- */
/* repacking                                                                                     */

/* (row, first column) of half h of fragment row g of tile `tile`. */
struct TileSource {
    int64_t row;
    int64_t col;
};
__device__ __forceinline__ TileSource tile_source(int64_t tile, int pieces, int g, int h) {
    const int64_t unit = tile / pieces, piece = tile - unit * pieces;
    return TileSource{unit * UNIT_ROWS + g, piece * PIECE_COLS + h * HALF_COLS};
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_codes(const uint8_t* __restrict__ packed, int64_t rows, int64_t cols, int32_t pieces,
                 int64_t tiles, uint4* __restrict__ records) {
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
            const TileSource src = tile_source(tile, pieces, g, q & 1);
            const int64_t col = src.col + 16 * t + 4 * j + 2 * (q >> 1);
            if (src.row < rows && col < cols) /* cols is even: a byte never straddles rows */
                word |= (uint32_t)packed[(src.row * cols + col) >> 1] << (8 * q);
        }
        words[j] = word;
    }
    records[tile * RECORD_UINT4 + lane] = make_uint4(words[0], words[1], words[2], words[3]);
}

/* The absmax of scale i = (tile, g, h), or 0 past the matrix; Absmax(block) decodes a block. */
template <typename Absmax>
__device__ __forceinline__ void pack_scale(int64_t rows, int64_t cols, int64_t blocksize,
                                           int32_t pieces, int64_t tiles, float* records,
                                           Absmax absmax) {
    const int64_t i = (int64_t)blockIdx.x * PACK_THREADS + threadIdx.x;
    if (i >= tiles * TILE_SCALES) return;
    const int slot = (int)(i % TILE_SCALES);
    const int64_t tile = i / TILE_SCALES;
    const TileSource src = tile_source(tile, pieces, slot >> 1, slot & 1);
    records[tile * RECORD_FLOATS + RECORD_CODE_BYTES / 4 + slot] = src.row < rows && src.col < cols ? absmax((src.row * cols + src.col) / blocksize)
                                                 : 0.0f;
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_scales_plain(const float* __restrict__ absmax, int64_t rows, int64_t cols,
                        int64_t blocksize, int32_t pieces, int64_t tiles, float* records) {
    pack_scale(rows, cols, blocksize, pieces, tiles, records,
               [=](int64_t block) { return absmax[block]; });
}

extern "C" __global__ void __launch_bounds__(PACK_THREADS)
tile4_pack_scales_double(const uint8_t* __restrict__ codes, const float* __restrict__ dyn_map,
                         const float* __restrict__ nested, float offset, int64_t nested_blocksize,
                         int64_t rows, int64_t cols, int64_t blocksize, int32_t pieces,
                         int64_t tiles, float* records) {
    pack_scale(rows, cols, blocksize, pieces, tiles, records, [=](int64_t block) {
        return dyn_map[codes[block]] * nested[block / nested_blocksize] + offset;
    });
}

/* -------------------------------------------------------------------------------------------- */
/* the GEMV                                                                                      */

/* 32-bit shared-window loads (addresses from cvta.to.shared, so that a lookup's address is one
   byte_perm: see gemv4_tiled). Volatile: they stay after the barrier that publishes the
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

/* A lane's x fragment of one tile: lanes g < 2 hold B column g (half g's 16 columns 64 g + 16 t
   of the tile's piece), the others zeros. */
struct XFragment {
    uint4 first, second;
};

/* One tile: four mmas into a fresh accumulator, whose (g, 0) and (g + 8, 1) entries lanes t = 0
   scale by the two halves' absmax into acc (other lanes' products are unused). lane_table is
   the pair table's shared address (64 KiB-aligned) plus lane * 4: byte_perm puts code byte q of
   a word in its byte 1, so the lookup address is one instruction. */
__device__ __forceinline__ void tile_accumulate(uint32_t lane_table, uint4 codes, float2 scale,
                                                XFragment x, float (&acc)[2]) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t word = component(codes, j);
        uint32_t a[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] = lds32(__byte_perm(word, lane_table, 0x7604u | (q << 4)));
        /* x words 2j, 2j + 1 of the lane's 16 columns: columns 4j .. 4j + 3 */
        const uint4 xv = j < 2 ? x.first : x.second;
        const uint32_t b[2] = {component(xv, 2 * (j & 1)), component(xv, 2 * (j & 1) + 1)};
        mma_bf16(c, a, b);
    }
    acc[0] = fmaf(scale.x, c[0], acc[0]);
    acc[1] = fmaf(scale.y, c[3], acc[1]);
}

/* Bytes of x in shared memory: padded with zeros to whole pieces. */
__device__ __forceinline__ int tiled_x_bytes(int pieces) { return pieces * PIECE_COLS * 2; }

/* A warp's walk over the CTA's tiles w, w + W, ...: where its partial sums go and which x its
   next tile reads. */
template <int WARPS>
struct TileWalk {
    float* slots;   /* (units of the CTA, WARPS, 16) f32 */
    int pieces;
    int unit;       /* CTA-relative unit of the next tile */
    int piece;      /* its piece */
    uint32_t x_lane; /* this lane's x at piece 0 (lanes g < 2) */
    float acc[2];

    /* The x fragment of the next tile, from shared memory. */
    __device__ __forceinline__ XFragment x_fragment(bool x_lane_active) const {
        const uint32_t at = x_lane + (uint32_t)piece * (PIECE_COLS * 2);
        return XFragment{lds128_if(at, x_lane_active), lds128_if(at + 16, x_lane_active)};
    }

    /* Moves WARPS tiles on, writing the unit's partial sums (lanes t = 0: row g, halves 0 and 1)
       to its slot (unit, warp) when the walk leaves it. */
    __device__ __forceinline__ void advance(int lane, int warp) {
        piece += WARPS;
        if (piece >= pieces) {
            if ((lane & 3) == 0) {
                float* slot = slots + (unit * WARPS + warp) * TILE_SCALES + 2 * (lane >> 2);
                slot[0] = acc[0];
                slot[1] = acc[1];
            }
            acc[0] = acc[1] = 0.0f;
            do {
                piece -= pieces;
                ++unit;
            } while (piece >= pieces);
        }
    }
};

/* After the walks and a barrier: warp w finishes units w, w + W, ...: lane 2g + h sums half h of
   row g over the W warps' slots (zeros where a warp had no tile of the unit), in warp order,
   then the two halves, and writes y. */
template <int WARPS>
__device__ __forceinline__ void finish_units(const float* slots, int unit_count, int u0,
                                             int64_t rows, __nv_bfloat16* __restrict__ y) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = warp; k < unit_count; k += WARPS) {
        float sum = 0.0f;
        if (lane < TILE_SCALES)
            for (int w = 0; w < WARPS; ++w) sum += slots[(k * WARPS + w) * TILE_SCALES + lane];
        const float other = __shfl_down_sync(0xFFFFFFFFu, sum, 1); /* half 1 of the same row */
        const int64_t row = (int64_t)(u0 + k) * UNIT_ROWS + (lane >> 1);
        if (lane < TILE_SCALES && (lane & 1) == 0 && row < rows) y[row] = __float2bfloat16_rn(sum + other);
    }
}

/* XCACHE: pieces == 2 WARPS (e.g. 4096 columns at 16 warps), so warp w's tiles alternate
   between pieces w and w + W and its two x fragments stay in registers; else each tile loads
   its fragment from shared memory. */
template <int WARPS, int RING, bool XCACHE>
__device__ __forceinline__ void gemv4_tiled(const uint8_t* __restrict__ records,
                                            const float* __restrict__ table, int64_t rows,
                                            int cols, int units, int pieces,
                                            const __nv_bfloat16* __restrict__ x,
                                            __nv_bfloat16* __restrict__ y) {
    static_assert(!XCACHE || RING % 2 == 0, "XCACHE: ring slot parity is the piece");
    /* Dynamic shared memory: x, the slots, then the pair table at the first 64 KiB-aligned
       shared address after them (the host sizes it for the worst alignment). */
    uint8_t* dyn = dynamic_shared();
    const uint32_t dyn_sh = smem_addr(dyn);
    const int u0 = (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int unit_count = (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x) - u0;
    float* slots = reinterpret_cast<float*>(dyn + tiled_x_bytes(pieces));
    const uint32_t slots_end = dyn_sh + tiled_x_bytes(pieces) + unit_count * WARPS * TILE_SCALES * 4;
    const uint32_t table_sh = (slots_end + PAIR_TABLE_BYTES - 1) & ~(uint32_t)(PAIR_TABLE_BYTES - 1);
    uint32_t dyn_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_size));
    if (table_sh + PAIR_TABLE_BYTES > dyn_sh + dyn_size) return; /* the host's size is too small */
    if (XCACHE && pieces != 2 * WARPS) return;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n = unit_count * pieces;
    const int count = n > warp ? (n - warp + WARPS - 1) / WARPS : 0; /* tiles warp, warp + W, ... */
    /* this lane's 16 code bytes and its rows' two scales in the record of the walk's first tile */
    const uint8_t* record = records + ((int64_t)u0 * pieces + warp) * RECORD_BYTES;
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

    build_bf16_pair_table(table, dyn + (table_sh - dyn_sh));
    for (int i = threadIdx.x; i < unit_count * WARPS * TILE_SCALES; i += blockDim.x) slots[i] = 0.0f;
    pdl_wait(); /* x may come from the previous kernel */
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);
    uint4* x_sh = reinterpret_cast<uint4*>(dyn);
    for (int i = threadIdx.x; i < tiled_x_bytes(pieces) / 16; i += blockDim.x)
        x_sh[i] = i < cols / 8 ? __ldg(x_vec + i) : make_uint4(0, 0, 0, 0);
    __syncthreads();

    const uint32_t lane_table = table_sh + (uint32_t)lane * 4;
    const bool x_lane_active = g < 2;
    TileWalk<WARPS> walk;
    walk.slots = slots;
    walk.pieces = pieces;
    walk.unit = warp / pieces;
    walk.piece = warp - walk.unit * pieces;
    walk.x_lane = dyn_sh + (uint32_t)(g * HALF_COLS + 16 * t) * 2;
    walk.acc[0] = walk.acc[1] = 0.0f;
    XFragment cached[2];
    if (XCACHE) { /* pieces warp (even steps) and warp + W (odd steps) */
        cached[0] = walk.x_fragment(x_lane_active);
        walk.piece += WARPS;
        cached[1] = walk.x_fragment(x_lane_active);
        walk.piece -= WARPS;
    }

    /* Step i of the walk sits in ring slot i % RING; once it is summed, its slot loads step
       i + RING. */
    auto step = [&](int d, int i) {
        const XFragment xf = XCACHE ? cached[d & 1] : walk.x_fragment(x_lane_active);
        tile_accumulate(lane_table, ring_codes[d], ring_scales[d], xf, walk.acc);
        walk.advance(lane, warp);
        if (i + RING < count) {
            ring_codes[d] = __ldcs(codes_at + (i + RING) * CODES_STEP);
            ring_scales[d] = __ldcs(scales_at + (i + RING) * SCALES_STEP);
        }
    };
    int i = 0;
    for (; i + RING <= count; i += RING) {
#pragma unroll
        for (int d = 0; d < RING; ++d) step(d, i + d);
    }
#pragma unroll
    for (int d = 0; d < RING; ++d)
        if (i + d < count) step(d, i + d);
    __syncthreads();
    pdl_launch_dependents();
    finish_units<WARPS>(slots, unit_count, u0, rows, y);
}

/* The GEMV's conditions (the host checks them first; a launch that breaks them writes
   nothing). */
__device__ __forceinline__ bool tiled_fits(int64_t rows, int cols, int units, int pieces) {
    return rows > 0 && cols > 0 && cols % HALF_COLS == 0 &&
           units == (int)((rows + UNIT_ROWS - 1) / UNIT_ROWS) &&
           pieces == (cols + PIECE_COLS - 1) / PIECE_COLS;
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
