/*
 * gemv4_tiled_sm90.cu: the tiled batch-1 4-bit GEMV (gemv4_tiled.cu, whose header defines the
 * layout and the numerics) with its tile records moved by bulk copies (TMA) into a ring of
 * shared-memory stages, for compute capability 9.0 and newer. Also holds gemv4_tiled.cu's
 * kernels (included), so the host can take every build from this module on such GPUs.
 *
 * gemv4_tiled_tma_c{C}_s{S}_bf16(records, table, rows, cols, units, pieces, x, y)
 *   Launch: 1-D, (C + 1) x 32 threads, grid G <= the SM count (one CTA an SM, persistent),
 *   dynamic shared memory PAIR_TABLE_BYTES + x + slots + S x C x 576 + 2 S x 8 (the host's
 *   tiled_shared_bytes). CTA b owns units [units b / G, units (b + 1) / G), n tiles, contiguous
 *   in memory; stage k holds its tiles [k C, k C + C), one bulk copy of up to C x 576 bytes.
 *   Warp 0 is the producer: its lane 0 fills stage k into slot k % S once the consumers have
 *   released the slot's previous stage (mbarrier empty[slot], C arrivals), the first S before
 *   the pair table and x are staged. Warps 1..C consume: warp 1 + w takes tile k C + w of each
 *   stage after full[slot] completes (the copy's bytes), sums it as gemv4_tiled does (strided
 *   walk, stride C) and releases the slot. The loads never pass through the lanes' load/store
 *   path, so they cannot queue behind the lookups.
 *   Checked against: the CPU product (sun selftest, "gemv4 tiled" rows).
 */
// build: -arch=compute_90

#include "gemv4_tiled.cu"
#include "mbarrier.cuh"

template <int C, int S>
__device__ __forceinline__ void gemv4_tiled_tma(const uint8_t* __restrict__ records,
                                                const float* __restrict__ table, int64_t rows,
                                                int cols, int units, int pieces,
                                                const __nv_bfloat16* __restrict__ x,
                                                __nv_bfloat16* __restrict__ y) {
    uint8_t* dyn = dynamic_shared();
    const uint32_t dyn_sh = smem_addr(dyn);
    const int units_per_cta = (units + gridDim.x - 1) / gridDim.x;
    const int u0 = (int)((int64_t)units * blockIdx.x / gridDim.x);
    const int unit_count = (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x) - u0;
    const int x_offset = PAIR_TABLE_BYTES;
    const int slots_offset = x_offset + tiled_x_bytes(pieces);
    const int stages_offset = slots_offset + units_per_cta * C * TILE_SCALES * 4;
    const int bars_offset = stages_offset + S * C * RECORD_BYTES;
    uint32_t dyn_size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_size));
    if ((uint32_t)(bars_offset + 2 * S * 8) > dyn_size) return; /* the host's size is too small */
    float* slots = reinterpret_cast<float*>(dyn + slots_offset);
    const uint32_t stages = dyn_sh + stages_offset;
    const uint32_t full = dyn_sh + bars_offset, empty = full + S * 8; /* [S] each */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = unit_count * pieces;
    const int stage_count = (n + C - 1) / C;
    const uint8_t* cta_records = records + (int64_t)u0 * pieces * RECORD_BYTES;

    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(full + s * 8, 1);
            mbar_init(empty + s * 8, C);
        }
        mbar_init_fence();
    }
    __syncthreads();
    /* stage k into slot k % S: the producer's lane 0 */
    auto fill = [&](int k) {
        const int slot = k % S;
        const uint32_t bytes = (uint32_t)min(C, n - k * C) * RECORD_BYTES;
        mbar_arrive_expect_tx(full + slot * 8, bytes);
        bulk_load(stages + slot * C * RECORD_BYTES, cta_records + (int64_t)k * C * RECORD_BYTES,
                  bytes, full + slot * 8);
    };
    if (warp == 0 && lane == 0)
        for (int k = 0; k < S && k < stage_count; ++k) fill(k);

    build_bf16_pair_table(table, dyn);
    for (int i = threadIdx.x; i < unit_count * C * TILE_SCALES; i += blockDim.x) slots[i] = 0.0f;
    pdl_wait(); /* x may come from the previous kernel */
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);
    uint4* x_sh = reinterpret_cast<uint4*>(dyn + x_offset);
    for (int i = threadIdx.x; i < tiled_x_bytes(pieces) / 16; i += blockDim.x)
        x_sh[i] = i < cols / 8 ? __ldg(x_vec + i) : make_uint4(0, 0, 0, 0);
    __syncthreads();

    if (warp == 0) {
        if (lane == 0)
            for (int k = S; k < stage_count; ++k) {
                mbar_wait(empty + (k % S) * 8, ((k / S) - 1) & 1); /* stage k - S released */
                fill(k);
            }
    } else {
        const int w = warp - 1, g = lane >> 2, t = lane & 3;
        TileWalk<C> walk;
        walk.slots = slots;
        walk.pieces = pieces;
        walk.stride = C;
        walk.unit = w / pieces;
        walk.piece = w - walk.unit * pieces;
        const uint32_t x_sh_addr = dyn_sh + x_offset;
        walk.x_lane = g < 2 ? x_sh_addr + (uint32_t)(g * HALF_COLS + 16 * t) * 2
                            : x_sh_addr + (uint32_t)tiled_x_bytes(pieces) - 32;
        walk.x_stride = g < 2 ? PIECE_COLS * 2 : 0;
        walk.x_addr = walk.x_lane + (uint32_t)walk.piece * walk.x_stride;
        walk.acc[0] = walk.acc[1] = 0.0f;
        const uint32_t lane_table = (uint32_t)lane * 4;
        for (int k = 0; k < stage_count; ++k) {
            const int slot = k % S;
            mbar_wait(full + slot * 8, (k / S) & 1);
            if (k * C + w < n) {
                const uint32_t record = stages + (slot * C + w) * RECORD_BYTES;
                const uint4 codes = lds128(record + lane * 16);
                const float2 scale = lds64f(record + RECORD_CODE_BYTES + g * 8);
                tile_accumulate<LAYOUT_COMPACT>(dyn_sh, lane_table, codes, scale, walk.x_addr,
                                                walk.acc);
                walk.advance(lane, w);
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + slot * 8);
        }
    }
    __syncthreads();
    pdl_launch_dependents();
    if (warp > 0) finish_units<C>(slots, unit_count, pieces, n, u0, true, rows, y, warp - 1);
}

#define GEMV4_TILED_TMA(C, S)                                                                    \
    extern "C" __global__ void __launch_bounds__((C + 1) * 32, 1) gemv4_tiled_tma_c##C##_s##S##_bf16( \
        const uint8_t* records, const float* table, int64_t rows, int32_t cols, int32_t units,   \
        int32_t pieces, const __nv_bfloat16* x, __nv_bfloat16* y) {                              \
        if (!tiled_fits(rows, cols, units, pieces)) return;                                      \
        gemv4_tiled_tma<C, S>(records, table, rows, cols, units, pieces, x, y);                  \
    }

GEMV4_TILED_TMA(31, 4)
GEMV4_TILED_TMA(16, 6)
GEMV4_TILED_TMA(24, 4)
