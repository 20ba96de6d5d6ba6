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
 * gemv4_tiled_w{W}_r{D}_bf16(records, table, rows, cols, units, pieces, x, y)
 *   y (rows,) bf16 = W x: x (cols,) bf16, the code table rounded to bf16 (the pair table), the
 *   four mmas of a tile into a fresh f32 accumulator that the lanes t = 0 scale by their rows'
 *   absmax into f32 sums, y rounded once: gemv4_mma's numerics, with the absmax applied per 64
 *   columns instead of per 32.
 *   B: column 0 holds x for half 0's columns and column 1 x for half 1's (lanes g = 0 and g = 1
 *   supply them, the other lanes 32 zero bytes), so lane (g, 0)'s accumulator C[g][0] is half
 *   0's partial sum of row g and C[g + 8][1] half 1's.
 *   Launch: 1-D, W x 32 threads, grid G <= the SM count (one CTA an SM, persistent). Dynamic
 *   shared memory (tiled_shared_bytes on the host): x padded with zeros to whole pieces, 32
 *   zero bytes, the slots (below), then the bf16 pair table (pair_table.cuh) at the first
 *   64 KiB-aligned shared-window address, so that one byte_perm of a code word and the lane's
 *   table address is the lookup's whole address (the host adds 64 KiB - 1 of slack).
 *   CTA b owns units [units * b / G, units * (b + 1) / G), n = their tiles; warp w owns the
 *   CTA's tiles [n w / W, n (w + 1) / W), contiguous in memory. Each warp keeps D tiles in a
 *   register ring: once a tile is summed its slot loads the tile D ahead; no barrier in the
 *   loop; the first D loads go out before the pair table and x are staged. When a warp leaves
 *   a unit it writes its partial sums to the slot (unit, warp) in shared memory; after the loop
 *   and one barrier, warp w finishes units w, w + W, ...: it adds the slots of the warps that
 *   own the unit's tiles in warp order (a fixed order: deterministic), then half 0 + half 1, and
 *   writes y.
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

/* 32-bit shared-window loads (addresses from cvta.to.shared, so the table's address is built by
   one byte_perm: see gemv4_tiled). Volatile: they must stay after the barrier that publishes the
   tables. */
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}

/* One tile: four mmas into a fresh accumulator, whose (g, 0) and (g + 8, 1) entries lanes t = 0
   scale by the two halves' absmax into acc (other lanes' products are unused). lane_table is
   the pair table's shared address (64 KiB-aligned) plus lane * 4: byte_perm puts code byte q of
   a word in its byte 1, so the lookup address is one instruction. x_addr: the lane's 16 columns
   of x for this tile (lanes g < 2) or 32 zero bytes. */
#define LAYOUT_ALIGNED 0 /* [x][32 zero bytes][slots][padding][pair table at a 64 KiB boundary] */
#define LAYOUT_COMPACT 1 /* [pair table][x][32 zero bytes][slots] */
#define LAYOUT_MINIMAL 2 /* [x][32 zero bytes][slots]: probes without the math only */

/* The shared address of code byte q (compile-time) of word in this lane's copy of the pair
   table: one byte_perm when the table is 64 KiB-aligned (lane_table = table + lane * 4), else
   byte_perm and an add (lane_table = lane * 4). */
template <int LAYOUT>
__device__ __forceinline__ uint32_t pair_address(uint32_t word, uint32_t table_sh,
                                                 uint32_t lane_table, int q) {
    if (LAYOUT == LAYOUT_ALIGNED) return __byte_perm(word, lane_table, 0x7604u | (q << 4));
    return table_sh + __byte_perm(word, lane_table, 0x5504u | (q << 4));
}

#define PART_ALL 0        /* the product */
#define PART_NO_X 1       /* probes: B from registers, no x loads */
#define PART_NO_LOOKUP 2  /* probes: A = the code words themselves, no pair-table loads */
#define PART_NO_MMA 3     /* probes: lookups and x loads folded with integer ops, no mma */

template <int LAYOUT, int PART = PART_ALL>
__device__ __forceinline__ void tile_accumulate(uint32_t table_sh, uint32_t lane_table,
                                                uint4 codes, float2 scale, uint32_t x_addr,
                                                float (&acc)[2]) {
    uint4 x0 = codes, x1 = codes;
    if (PART != PART_NO_X) {
        x0 = lds128(x_addr);
        x1 = lds128(x_addr + 16);
    }
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t fold = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t word = component(codes, j);
        uint32_t a[4];
#pragma unroll
        for (int q = 0; q < 4; ++q)
            a[q] = PART == PART_NO_LOOKUP ? word + q
                                          : lds32(pair_address<LAYOUT>(word, table_sh, lane_table, q));
        /* x words 2j, 2j + 1 of the lane's 16 columns: columns 4j .. 4j + 3 */
        const uint4 xv = j < 2 ? x0 : x1;
        const uint32_t b[2] = {component(xv, 2 * (j & 1)), component(xv, 2 * (j & 1) + 1)};
        if (PART == PART_NO_MMA) fold ^= a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1];
        else mma_bf16(c, a, b);
    }
    if (PART == PART_NO_MMA) c[0] = c[3] = __uint_as_float(fold & 0x3F800000u);
    acc[0] = fmaf(scale.x, c[0], acc[0]);
    acc[1] = fmaf(scale.y, c[3], acc[1]);
}

/* Bytes of x in shared memory: padded with zeros to whole pieces, then 32 zero bytes. */
__device__ __forceinline__ int tiled_x_bytes(int pieces) { return pieces * PIECE_COLS * 2 + 32; }

/* The warp owning tile x of the CTA's n tiles split over `warps` warps. */
__device__ __forceinline__ int tile_owner(int x, int n, int warps) {
    return (int)(((int64_t)(x + 1) * warps - 1) / n);
}

/* A warp's walk over its tiles (CTA tiles j = start, start + stride, ...): where its partial sums
   go and which x its next tile reads. */
template <int WARPS>
struct TileWalk {
    float* slots;   /* (units of the CTA, WARPS, 16) f32 */
    int pieces;
    int stride;     /* CTA tiles between two of the walk's */
    int unit;       /* CTA-relative unit of the next tile */
    int piece;      /* its piece */
    uint32_t x_lane, x_stride, x_addr;
    float acc[2];

    /* Writes the unit's partial sums (lanes t = 0: rows g, halves 0 and 1) to its slot. */
    __device__ __forceinline__ void flush(int lane, int warp) {
        if ((lane & 3) == 0) {
            float* slot = slots + (unit * WARPS + warp) * TILE_SCALES + 2 * (lane >> 2);
            slot[0] = acc[0];
            slot[1] = acc[1];
        }
        acc[0] = acc[1] = 0.0f;
    }

    /* Moves to the next tile of the walk, flushing when it leaves the unit. */
    __device__ __forceinline__ void advance(int lane, int warp) {
        piece += stride;
        if (piece >= pieces) { /* leaving the unit */
            flush(lane, warp);
            do {
                piece -= pieces;
                ++unit;
            } while (piece >= pieces);
        }
        x_addr = x_lane + (uint32_t)piece * x_stride;
    }
};

/* A stand-in for a tile's math that only consumes its loads (probe builds: how long the walk
   takes without the lookups and mmas). */
__device__ __forceinline__ void tile_consume(uint4 codes, float2 scale, float (&acc)[2]) {
    const uint32_t bits = (codes.x ^ codes.y ^ codes.z ^ codes.w) & 0x3F800000u;
    acc[0] = fmaf(__uint_as_float(bits), scale.x, acc[0]);
    acc[1] += scale.y;
}

/* After the walks and a barrier: warp w finishes units w, w + W, ...: lane 2g + h sums half h of
   row g over the warps that own the unit's tiles (all of them when strided: the others' slots
   hold zeros), in warp order, then the two halves, and writes y. */
template <int WARPS>
__device__ __forceinline__ void finish_units(const float* slots, int unit_count, int pieces, int n,
                                             int u0, bool strided, int64_t rows,
                                             __nv_bfloat16* __restrict__ y, int warp) {
    const int lane = threadIdx.x & 31;
    for (int k = warp; k < unit_count; k += WARPS) {
        const int w_first = strided ? 0 : tile_owner(k * pieces, n, WARPS);
        const int w_last = strided ? WARPS - 1 : tile_owner(k * pieces + pieces - 1, n, WARPS);
        float sum = 0.0f;
        if (lane < TILE_SCALES)
            for (int w = w_first; w <= w_last; ++w) sum += slots[(k * WARPS + w) * TILE_SCALES + lane];
        const float other = __shfl_down_sync(0xFFFFFFFFu, sum, 1); /* half 1 of the same row */
        const int64_t row = (int64_t)(u0 + k) * UNIT_ROWS + (lane >> 1);
        if (lane < TILE_SCALES && (lane & 1) == 0 && row < rows) y[row] = __float2bfloat16_rn(sum + other);
    }
}

/* STRIDED: warp w walks CTA tiles w, w + W, ... (the CTA's warps read neighbouring records at
   once); else the contiguous range [n w / W, n (w + 1) / W). MATH and PROLOGUE are off only in
   probe builds. */
template <int WARPS, int RING, bool STRIDED, bool MATH, bool PROLOGUE, bool GLOBAL = false,
          bool SCALES = true, int LAYOUT = LAYOUT_ALIGNED, int PART = PART_ALL>
__device__ __forceinline__ void gemv4_tiled(const uint8_t* __restrict__ records,
                                            const float* __restrict__ table, int64_t rows,
                                            int cols, int units, int pieces,
                                            const __nv_bfloat16* __restrict__ x,
                                            __nv_bfloat16* __restrict__ y) {
    /* Dynamic shared memory (LAYOUT_*): the pair table, x with 32 zero bytes after it, and the
       slots; the host sizes it for the layout (for the worst alignment when aligned). */
    uint8_t* dyn = dynamic_shared();
    const uint32_t dyn_sh = smem_addr(dyn);
    const int unit_count = (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x) -
                           (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int x_offset = LAYOUT == LAYOUT_COMPACT ? PAIR_TABLE_BYTES : 0;
    const int slots_offset = x_offset + tiled_x_bytes(pieces);
    const int slots_bytes = unit_count * WARPS * TILE_SCALES * 4;
    float* slots = reinterpret_cast<float*>(dyn + slots_offset);
    const uint32_t x_sh_addr = dyn_sh + x_offset;
    uint32_t table_sh = dyn_sh, needed = slots_offset + slots_bytes;
    if (LAYOUT == LAYOUT_ALIGNED) {
        table_sh = (dyn_sh + needed + PAIR_TABLE_BYTES - 1) & ~(uint32_t)(PAIR_TABLE_BYTES - 1);
        needed = table_sh - dyn_sh + PAIR_TABLE_BYTES;
    }
    uint32_t dyn_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_size));
    if (needed > dyn_size) return; /* the host's size is too small */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int u0 = (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int n = unit_count * pieces;
    int first = STRIDED ? warp : (int)((int64_t)n * warp / WARPS);
    int stride = STRIDED ? WARPS : 1;
    int count = STRIDED ? (n > warp ? (n - warp + WARPS - 1) / WARPS : 0)
                        : (int)((int64_t)n * (warp + 1) / WARPS) - first;
    int64_t record0 = (int64_t)u0 * pieces + first;
    if (GLOBAL) { /* probe: the grid's warps walk all tiles together, one window at a time */
        const int all = units * pieces, warps = gridDim.x * WARPS;
        const int gw = blockIdx.x * WARPS + warp;
        record0 = gw;
        stride = warps;
        count = all > gw ? (all - gw + warps - 1) / warps : 0;
    }
    /* this lane's 16 code bytes and its rows' two scales in the record of tile `first` */
    const uint8_t* record = records + record0 * RECORD_BYTES;
    const uint4* ring_codes_at = reinterpret_cast<const uint4*>(record) + lane;
    const float2* ring_scales_at = reinterpret_cast<const float2*>(record + RECORD_CODE_BYTES) + g;
    const int codes_step = stride * RECORD_UINT4, scales_step = stride * (RECORD_BYTES / 8);

    /* The ring's first loads go out before anything is staged. */
    uint4 ring_codes[RING];
    float2 ring_scales[RING];
#pragma unroll
    for (int d = 0; d < RING; ++d) {
        ring_scales[d] = make_float2(0.0f, 0.0f);
        if (d < count) {
            ring_codes[d] = __ldcs(ring_codes_at + d * codes_step);
            if (SCALES) ring_scales[d] = __ldcs(ring_scales_at + d * scales_step);
        }
    }

    if (PROLOGUE) {
        build_bf16_pair_table(table, dyn + (table_sh - dyn_sh));
        for (int i = threadIdx.x; i < unit_count * WARPS * TILE_SCALES; i += blockDim.x) slots[i] = 0.0f;
        pdl_wait(); /* x may come from the previous kernel */
        const uint4* x_vec = reinterpret_cast<const uint4*>(x);
        uint4* x_sh = reinterpret_cast<uint4*>(dyn + x_offset);
        for (int i = threadIdx.x; i < tiled_x_bytes(pieces) / 16; i += blockDim.x)
            x_sh[i] = i < cols / 8 ? __ldg(x_vec + i) : make_uint4(0, 0, 0, 0);
        __syncthreads();
    }

    const uint32_t lane_table = (LAYOUT == LAYOUT_ALIGNED ? table_sh : 0) + (uint32_t)lane * 4;
    TileWalk<WARPS> walk;
    walk.slots = slots;
    walk.pieces = pieces;
    walk.stride = stride;
    walk.unit = first / pieces;
    walk.piece = first - walk.unit * pieces;
    /* lanes g < 2 supply B column g: half g's columns 64 g + 16 t of each 128-column piece */
    walk.x_lane = g < 2 ? x_sh_addr + (uint32_t)(g * HALF_COLS + 16 * t) * 2
                        : x_sh_addr + (uint32_t)tiled_x_bytes(pieces) - 32;
    walk.x_stride = g < 2 ? PIECE_COLS * 2 : 0;
    walk.x_addr = walk.x_lane + (uint32_t)walk.piece * walk.x_stride;
    walk.acc[0] = walk.acc[1] = 0.0f;

    /* Step i of the walk sits in ring slot i % RING; once it is summed, its slot loads step
       i + RING. */
    int i = 0;
    for (; i + RING <= count; i += RING) {
#pragma unroll
        for (int d = 0; d < RING; ++d) {
            if (MATH) tile_accumulate<LAYOUT, PART>(table_sh, lane_table, ring_codes[d], ring_scales[d], walk.x_addr, walk.acc);
            else tile_consume(ring_codes[d], ring_scales[d], walk.acc);
            if (!GLOBAL) walk.advance(lane, warp);
            if (i + d + RING < count) {
                ring_codes[d] = __ldcs(ring_codes_at + (d + RING) * codes_step);
                if (SCALES) ring_scales[d] = __ldcs(ring_scales_at + (d + RING) * scales_step);
            }
        }
        ring_codes_at += RING * codes_step;
        ring_scales_at += RING * scales_step;
    }
#pragma unroll
    for (int d = 0; d < RING; ++d) {
        if (i + d < count) {
            if (MATH) tile_accumulate<LAYOUT, PART>(table_sh, lane_table, ring_codes[d], ring_scales[d], walk.x_addr, walk.acc);
            else tile_consume(ring_codes[d], ring_scales[d], walk.acc);
            if (!GLOBAL) walk.advance(lane, warp);
        }
    }
    if (count > 0 && walk.piece != 0 && !STRIDED && !GLOBAL) walk.flush(lane, warp); /* ends mid-unit */
    if (GLOBAL && walk.acc[0] == -1.25e-30f) y[lane] = __float2bfloat16_rn(walk.acc[1]); /* keeps the loads */
    __syncthreads();
    pdl_launch_dependents();

    finish_units<WARPS>(slots, unit_count, pieces, n, u0, STRIDED, rows, y, threadIdx.x >> 5);
}

/* 8 bytes global -> shared (cp.async.ca; 8-byte aligned). */
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async16_sh(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ float2 lds64f(uint32_t addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

/* The GEMV with each warp's ring in shared memory, filled by cp.async: a lane copies its own 16
   code bytes and its rows' two scales of each tile into its own slot and reads back only those,
   so no lane waits on another; cp.async.wait_group, not a register scoreboard, says when a slot
   has landed, so the lookups and mmas of one tile never wait for a later tile's loads.
   Layout: LAYOUT_COMPACT, then the rings: (W, RING, 32 lanes) x 16 bytes of codes, then
   (W, RING, 32) x 8 bytes of scales. Contiguous walks. */
template <int WARPS, int RING>
__device__ __forceinline__ void gemv4_tiled_async(const uint8_t* __restrict__ records,
                                                  const float* __restrict__ table, int64_t rows,
                                                  int cols, int units, int pieces,
                                                  const __nv_bfloat16* __restrict__ x,
                                                  __nv_bfloat16* __restrict__ y) {
    uint8_t* dyn = dynamic_shared();
    const uint32_t dyn_sh = smem_addr(dyn);
    const int units_per_cta = (units + gridDim.x - 1) / gridDim.x;
    const int unit_count = (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x) -
                           (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int x_offset = PAIR_TABLE_BYTES;
    const int slots_offset = x_offset + tiled_x_bytes(pieces);
    const int ring_offset = slots_offset + units_per_cta * WARPS * TILE_SCALES * 4;
    const int ring_scales_offset = ring_offset + WARPS * RING * 32 * 16;
    const uint32_t needed = ring_scales_offset + WARPS * RING * 32 * 8;
    uint32_t dyn_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_size));
    if (needed > dyn_size) return; /* the host's size is too small */
    float* slots = reinterpret_cast<float*>(dyn + slots_offset);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int u0 = (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int n = unit_count * pieces;
    const int first = (int)((int64_t)n * warp / WARPS);
    const int count = (int)((int64_t)n * (warp + 1) / WARPS) - first;
    const uint8_t* record = records + ((int64_t)u0 * pieces + first) * RECORD_BYTES;
    const uint8_t* codes_at = record + lane * 16;
    const uint8_t* scales_at = record + RECORD_CODE_BYTES + g * 8;
    const uint32_t ring_codes = dyn_sh + ring_offset + ((warp * RING) * 32 + lane) * 16;
    const uint32_t ring_scales = dyn_sh + ring_scales_offset + ((warp * RING) * 32 + lane) * 8;

    /* Slot d (d < RING) of this lane: codes at ring_codes + d * 512, scales at ring_scales +
       d * 256. One commit group per step, empty past the walk's end, so that "all but the
       newest RING - 1 groups" is always the step being taken. */
#pragma unroll
    for (int d = 0; d < RING; ++d) {
        if (d < count) {
            cp_async16_sh(ring_codes + d * 512, codes_at + (int64_t)d * RECORD_BYTES);
            cp_async8(ring_scales + d * 256, scales_at + (int64_t)d * RECORD_BYTES);
        }
        cp_async_commit();
    }

    build_bf16_pair_table(table, dyn);
    for (int i = threadIdx.x; i < unit_count * WARPS * TILE_SCALES; i += blockDim.x) slots[i] = 0.0f;
    pdl_wait(); /* x may come from the previous kernel */
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);
    uint4* x_sh = reinterpret_cast<uint4*>(dyn + x_offset);
    for (int i = threadIdx.x; i < tiled_x_bytes(pieces) / 16; i += blockDim.x)
        x_sh[i] = i < cols / 8 ? __ldg(x_vec + i) : make_uint4(0, 0, 0, 0);
    __syncthreads();

    const uint32_t lane_table = (uint32_t)lane * 4;
    TileWalk<WARPS> walk;
    walk.slots = slots;
    walk.pieces = pieces;
    walk.stride = 1;
    walk.unit = first / pieces;
    walk.piece = first - walk.unit * pieces;
    const uint32_t x_sh_addr = dyn_sh + x_offset;
    walk.x_lane = g < 2 ? x_sh_addr + (uint32_t)(g * HALF_COLS + 16 * t) * 2
                        : x_sh_addr + (uint32_t)tiled_x_bytes(pieces) - 32;
    walk.x_stride = g < 2 ? PIECE_COLS * 2 : 0;
    walk.x_addr = walk.x_lane + (uint32_t)walk.piece * walk.x_stride;
    walk.acc[0] = walk.acc[1] = 0.0f;

    for (int i = 0; i < count; i += RING) {
#pragma unroll
        for (int d = 0; d < RING; ++d) {
            if (i + d < count) { /* warp-uniform */
                cp_async_wait_group<RING - 1>();
                const uint4 codes = lds128(ring_codes + d * 512);
                const float2 scale = lds64f(ring_scales + d * 256);
                tile_accumulate<LAYOUT_COMPACT>(dyn_sh, lane_table, codes, scale, walk.x_addr,
                                                walk.acc);
                walk.advance(lane, warp);
                const int next = i + d + RING;
                if (next < count) {
                    cp_async16_sh(ring_codes + d * 512, codes_at + (int64_t)next * RECORD_BYTES);
                    cp_async8(ring_scales + d * 256, scales_at + (int64_t)next * RECORD_BYTES);
                }
                cp_async_commit();
            }
        }
    }
    if (count > 0 && walk.piece != 0) walk.flush(lane, warp); /* ends mid-unit */
    __syncthreads();
    pdl_launch_dependents();
    finish_units<WARPS>(slots, unit_count, pieces, n, u0, false, rows, y, threadIdx.x >> 5);
}

/* The GEMV's conditions (the host checks them first; a launch that breaks them writes
   nothing). */
__device__ __forceinline__ bool tiled_fits(int64_t rows, int cols, int units, int pieces) {
    return rows > 0 && cols > 0 && cols % HALF_COLS == 0 &&
           units == (int)((rows + UNIT_ROWS - 1) / UNIT_ROWS) &&
           pieces == (cols + PIECE_COLS - 1) / PIECE_COLS;
}

#define GEMV4_TILED(NAME, WARPS, RING, ...)                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(                           \
        const uint8_t* records, const float* table, int64_t rows, int32_t cols, int32_t units,   \
        int32_t pieces, const __nv_bfloat16* x, __nv_bfloat16* y) {                              \
        if (!tiled_fits(rows, cols, units, pieces)) return;                                      \
        gemv4_tiled<WARPS, RING, __VA_ARGS__>(records, table, rows, cols, units, pieces, x, y);  \
    }

#define GEMV4_TILED_ASYNC(NAME, WARPS, RING)                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) NAME(                           \
        const uint8_t* records, const float* table, int64_t rows, int32_t cols, int32_t units,   \
        int32_t pieces, const __nv_bfloat16* x, __nv_bfloat16* y) {                              \
        if (!tiled_fits(rows, cols, units, pieces)) return;                                      \
        gemv4_tiled_async<WARPS, RING>(records, table, rows, cols, units, pieces, x, y);         \
    }

GEMV4_TILED_ASYNC(gemv4_tiled_async_w32_r4_bf16, 32, 4)
GEMV4_TILED_ASYNC(gemv4_tiled_async_w32_r3_bf16, 32, 3)
GEMV4_TILED_ASYNC(gemv4_tiled_async_w16_r6_bf16, 16, 6)
GEMV4_TILED(gemv4_tiled_w32_r2_bf16, 32, 2, false, true, true)
GEMV4_TILED(gemv4_tiled_compact_w32_r2_bf16, 32, 2, false, true, true, false, true, LAYOUT_COMPACT)
GEMV4_TILED(gemv4_tiled_compact_strided_w32_r4_bf16, 32, 4, true, true, true, false, true, LAYOUT_COMPACT)
GEMV4_TILED(gemv4_tiled_strided_w32_r2_bf16, 32, 2, true, true, true)
GEMV4_TILED(gemv4_tiled_strided_w32_r3_bf16, 32, 3, true, true, true)
GEMV4_TILED(gemv4_tiled_strided_w16_r4_bf16, 16, 4, true, true, true)
/* probes: not a product */
GEMV4_TILED(gemv4_tiled_probe_nomath_w32_r2, 32, 2, false, false, true)
GEMV4_TILED(gemv4_tiled_probe_nomath_noprologue_w32_r2, 32, 2, false, false, false)
GEMV4_TILED(gemv4_tiled_probe_strided_nomath_w32_r4, 32, 4, true, false, true)
GEMV4_TILED(gemv4_tiled_probe_global_nomath_w32_r2, 32, 2, true, false, false, true)
GEMV4_TILED(gemv4_tiled_probe_global_nomath_w32_r4, 32, 4, true, false, false, true)
GEMV4_TILED(gemv4_tiled_probe_nomath_noscales_w32_r2, 32, 2, false, false, false, false, false)
GEMV4_TILED(gemv4_tiled_probe_global_nomath_noscales_w32_r4, 32, 4, true, false, false, true, false)
GEMV4_TILED(gemv4_tiled_probe_minimal_nomath_w32_r2, 32, 2, false, false, false, false, true, LAYOUT_MINIMAL)
GEMV4_TILED(gemv4_tiled_probe_minimal_global_nomath_w32_r4, 32, 4, true, false, false, true, true, LAYOUT_MINIMAL)
GEMV4_TILED(gemv4_tiled_probe_compact_nomath_w32_r2, 32, 2, false, false, false, false, true, LAYOUT_COMPACT)
GEMV4_TILED(gemv4_tiled_probe_nox_strided_w16_r4, 16, 4, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_X)
GEMV4_TILED(gemv4_tiled_probe_nolookup_strided_w16_r4, 16, 4, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_LOOKUP)
GEMV4_TILED(gemv4_tiled_probe_nomma_strided_w16_r4, 16, 4, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_MMA)
GEMV4_TILED(gemv4_tiled_probe_nox_strided_w32_r2, 32, 2, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_X)
GEMV4_TILED(gemv4_tiled_probe_nolookup_strided_w32_r2, 32, 2, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_LOOKUP)
GEMV4_TILED(gemv4_tiled_probe_nomma_strided_w32_r2, 32, 2, true, true, true, false, true, LAYOUT_ALIGNED, PART_NO_MMA)
