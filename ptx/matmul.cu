/*
 * matmul.cu: bf16 matrix products on tensor cores (mma.sync m16n8k16, f32 accumulation), with
 * the second operand either dense bf16 or 4-bit (NF4/FP4, bitsandbytes layout) dequantized to
 * bf16 tile by tile inside the main loop: the base-weight products of QLoRA.
 *
 * Products (all row-major, C (M, N) bf16, C = alpha * A . op(B) + beta * C, beta == 0 never
 * reads C):
 *   matmul_nt_bf16_*      A (M, K) bf16, B (N, K) bf16:        C = A . B^T   (a linear layer)
 *   matmul_nn_bf16_*      A (M, K) bf16, B (K, N) bf16:        C = A . B     (dY B of a dense B)
 *   matmul_nt_4bit_*      A (M, K) bf16, W (N, K) 4-bit:       C = A . W^T   (X W^T, forward)
 *   matmul_nn_4bit_*      A (M, K) bf16, W (K, N) 4-bit:       C = A . W     (dY W, backward)
 *   4-bit W: packed (ceil(rows * cols / 2),) u8, element 2i in the high nibble of byte i; table
 *   (16,) f32 code values; absmax per `blocksize` consecutive elements, plain f32 or double
 *   quantized (u8 codes into the (256,) f32 dynamic map, times nested[b / nested_blocksize],
 *   plus offset), exactly as in nf4.cu. blocksize must be a multiple of 8 (bitsandbytes: 64..4096).
 *   Suffix _aligned: K % 8 == 0 for the nt products, N % 8 == 0 for nn (every 8-element chunk
 *   of a row starts on a 16-byte boundary of the bf16 operands and a 4-byte boundary of the
 *   codes, and shares one absmax); operands move with cp.async (16 bytes) / 32-bit code loads.
 *   Suffix _any: any M, N, K >= 1; the same kernel with element-by-element, bounds-checked loads.
 *   The host picks the variant.
 *
 * Tiling: a CTA computes a 128 x 128 tile of C (grid (ceil(N / 128), ceil(M / 128))) with 256
 * threads = 8 warps as 2 (M) x 4 (N), each warp 64 x 32 = 4 x 4 mma tiles of 16 x 8. The K loop
 * steps by 64 through two shared-memory stages (64, not 32: a step's math must outlast the
 * next step's global loads, which a 32-deep step did not): while the tensor cores work on one stage, the
 * next tile of A (and dense B) streams into the other with cp.async, and the next 4-bit codes
 * load into registers, to be dequantized into the other stage after the math. Rows and columns
 * past M, N, K load as zeros and are never stored. Shared tiles have padded rows (72 or 136
 * elements) so ldmatrix reads are free of bank conflicts. Dynamic shared memory:
 * MM_SHARED_BYTES (74.8 KB; the host raises each kernel's limit and passes it).
 *   A, dense B^T, W^T tiles: [row][k] (128 x 64, stride 72), read with ldmatrix.x4;
 *   the W tile of nn: [k][n] (64 x 128, stride 136), read with ldmatrix.x4.trans.
 *
 * Checked against: backend::gemm::matmul_nt on the bf16-rounded inputs (the 4-bit operand
 * dequantized by quant::dequantize_4bit_f32 and rounded to bf16, transposed for nn), relative
 * error bound 1e-2 ("matmul" rows of sun selftest).
 */

#include "common.cuh"
#include "mma.cuh"

#define BM 128
#define BN 128
#define BK 64
#define MM_THREADS 256
#define ROW_STRIDE (BK + 8)  /* [row][k] tiles: 144-byte rows */
#define KN_STRIDE (BN + 8)   /* [k][n] tiles: 272-byte rows */
#define ROW_TILE (BM * ROW_STRIDE)
#define KN_TILE (BK * KN_STRIDE)
#define ROW_CHUNKS (BK / 8)                          /* 8-element chunks per [row][k] tile row */
#define CHUNKS_PER_THREAD (BM * BK / 8 / MM_THREADS) /* 4: a tile is 1024 chunks */
/* Dynamic shared memory: two stages of A and of B (the larger, [row][k], B tile), the code
   table and the dynamic map. */
#define MM_SHARED_BYTES (4 * ROW_TILE * 2 + (16 + 256) * 4)

/* -------------------------------------------------------------------------------------------- */
/* Loaders. Each thread moves 4 8-element chunks per tile (1024 chunks of 8 = 8192 elements).    */

/* A dense (rows_total, K) bf16 tile [row0, row0 + 128) x [k0, k0 + 64) -> [row][k] shared. */
template <bool ALIGNED>
__device__ __forceinline__ void load_rows_tile(uint16_t* dst, const uint16_t* __restrict__ src,
                                               int64_t rows_total, int64_t K, int64_t row0,
                                               int64_t k0) {
#pragma unroll
    for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
        const int c = threadIdx.x + i * MM_THREADS;
        const int r = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS;
        const int64_t row = row0 + r, col = k0 + chunk * 8;
        uint16_t* d = dst + r * ROW_STRIDE + chunk * 8;
        if (ALIGNED) {
            const bool valid = row < rows_total && col < K; /* col + 8 <= K as K % 8 == 0 */
            cp_async16(d, valid ? (const void*)(src + row * K + col) : (const void*)src,
                       valid ? 16 : 0);
        } else {
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint32_t lo = 0, hi = 0;
                if (row < rows_total && col + 2 * j < K) lo = src[row * K + col + 2 * j];
                if (row < rows_total && col + 2 * j + 1 < K) hi = src[row * K + col + 2 * j + 1];
                w[j] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

/* e / blocksize; bitsandbytes' blocksizes are powers of two, so a shift instead of a 64-bit
   division (tens of instructions) where that holds. */
__device__ __forceinline__ int64_t block_index(int64_t e, int64_t blocksize) {
    return (blocksize & (blocksize - 1)) == 0 ? e >> (__ffsll(blocksize) - 1) : e / blocksize;
}

/* Absmax sources. fetch(block) issues the global loads only; resolve() computes the scale from
   what they loaded, after the math of the current stage, so the loads' latency overlaps it. */
struct PlainAbsmax {
    const float* absmax;
    typedef float Raw;
    __device__ __forceinline__ Raw fetch(int64_t block) const { return __ldg(absmax + block); }
    __device__ __forceinline__ float resolve(Raw raw, const float* /*dyn_map*/) const {
        return raw;
    }
};

struct DoubleAbsmax {
    const uint8_t* codes;
    const float* nested;
    float offset;
    int64_t nested_blocksize;
    struct Raw {
        uint32_t code;
        float nested;
    };
    __device__ __forceinline__ Raw fetch(int64_t block) const {
        return Raw{__ldg(codes + block), __ldg(nested + block_index(block, nested_blocksize))};
    }
    __device__ __forceinline__ float resolve(Raw raw, const float* dyn_map) const {
        return dyn_map[raw.code] * raw.nested + offset;
    }
};

__device__ __forceinline__ uint32_t code_at(const uint8_t* packed, int64_t e) {
    uint32_t byte = __ldg(packed + (e >> 1));
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

/* A 4-bit weight (rows, cols) row-major read as chunks of 8 consecutive elements of a row.
   fetch() issues the global loads into registers; store() dequantizes them to bf16 in shared
   memory. For the aligned variant a chunk is one 32-bit word of codes and one absmax; for the
   other the chunk is dequantized at fetch time, element by element. */
template <bool ALIGNED, typename Absmax>
struct Chunks4bit {
    const uint8_t* packed;
    const float* table_sh; /* (16,) shared */
    const float* dyn_sh;   /* (256,) shared, double quantization only */
    Absmax absmax;
    int64_t rows, cols, blocksize;
    uint32_t word[CHUNKS_PER_THREAD];
    typename Absmax::Raw scale_raw[CHUNKS_PER_THREAD];
    uint4 ready[CHUNKS_PER_THREAD];
    bool valid[CHUNKS_PER_THREAD];

    /* chunk i (< CHUNKS_PER_THREAD) of this thread: elements (row, col .. col + 8) */
    __device__ __forceinline__ void fetch(int i, int64_t row, int64_t col) {
        valid[i] = row < rows && col < cols;
        if (ALIGNED) {
            if (valid[i]) {
                const int64_t e0 = row * cols + col; /* a multiple of 8 */
                word[i] = __ldg(reinterpret_cast<const uint32_t*>(packed + (e0 >> 1)));
                scale_raw[i] = absmax.fetch(block_index(e0, blocksize));
            }
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
            if (valid[i]) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (col + j < cols) {
                        const int64_t e = row * cols + col + j;
                        const float scale =
                            absmax.resolve(absmax.fetch(block_index(e, blocksize)), dyn_sh);
                        const float v = table_sh[code_at(packed, e)] * scale;
                        w[j >> 1] |= (uint32_t)f32_to_bf16_bits(v) << (16 * (j & 1));
                    }
                }
            }
            ready[i] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }

    __device__ __forceinline__ void store(int i, uint16_t* dst) const {
        uint4 out;
        if (ALIGNED) {
            if (valid[i]) {
                const float scale = absmax.resolve(scale_raw[i], dyn_sh);
                uint32_t w[4];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const uint32_t byte = (word[i] >> (8 * b)) & 0xFF; /* elements 2b, 2b + 1 */
                    w[b] = pack_bf16x2(table_sh[byte >> 4] * scale, table_sh[byte & 0xF] * scale);
                }
                out = make_uint4(w[0], w[1], w[2], w[3]);
            } else {
                out = make_uint4(0, 0, 0, 0);
            }
        } else {
            out = ready[i];
        }
        *reinterpret_cast<uint4*>(dst) = out;
    }
};

/* -------------------------------------------------------------------------------------------- */
/* B operand sources: fetch(k0, stage) starts moving tile k0 toward shared stage `stage`,
   finish(stage) completes it (after the math on the other stage), fragments() reads the
   mma B fragments of warp column `wn` at k offset kk from a stage.                             */

/* Dense B (N, K) bf16, [n][k] tiles. */
template <bool ALIGNED>
struct DenseNT {
    const uint16_t* b;
    int64_t N, K, n0;
    __device__ __forceinline__ void fetch(int64_t k0, uint16_t* stage) {
        load_rows_tile<ALIGNED>(stage, b, N, K, n0, k0);
    }
    __device__ __forceinline__ void finish(uint16_t*) {}
};

/* Dense B (K, N) bf16, [k][n] tiles: BK k-rows x 16 chunks of 8 n, as Quant4NN lays them. */
template <bool ALIGNED>
struct DenseNN {
    const uint16_t* b;
    int64_t K, N, n0;
    __device__ __forceinline__ void fetch(int64_t k0, uint16_t* stage) {
#pragma unroll
        for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
            const int c = threadIdx.x + i * MM_THREADS;
            const int64_t row = k0 + (c >> 4), col = n0 + (c & 15) * 8;
            uint16_t* d = stage + (c >> 4) * KN_STRIDE + (c & 15) * 8;
            if (ALIGNED) {
                const bool valid = row < K && col < N; /* col + 8 <= N as N % 8 == 0 */
                cp_async16(d, valid ? (const void*)(b + row * N + col) : (const void*)b,
                           valid ? 16 : 0);
            } else {
                uint32_t w[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    uint32_t lo = 0, hi = 0;
                    if (row < K && col + 2 * j < N) lo = b[row * N + col + 2 * j];
                    if (row < K && col + 2 * j + 1 < N) hi = b[row * N + col + 2 * j + 1];
                    w[j] = lo | (hi << 16);
                }
                *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    }
    __device__ __forceinline__ void finish(uint16_t*) {}
};

/* 4-bit W (N, K), [n][k] tiles: 128 n-rows x ROW_CHUNKS chunks of 8 k. */
template <bool ALIGNED, typename Absmax>
struct Quant4NT {
    Chunks4bit<ALIGNED, Absmax> w;
    int64_t n0;
    __device__ __forceinline__ void fetch(int64_t k0, uint16_t*) {
#pragma unroll
        for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
            const int c = threadIdx.x + i * MM_THREADS;
            w.fetch(i, n0 + c / ROW_CHUNKS, k0 + (c % ROW_CHUNKS) * 8);
        }
    }
    __device__ __forceinline__ void finish(uint16_t* stage) {
#pragma unroll
        for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
            const int c = threadIdx.x + i * MM_THREADS;
            w.store(i, stage + (c / ROW_CHUNKS) * ROW_STRIDE + (c % ROW_CHUNKS) * 8);
        }
    }
};

/* 4-bit W (K, N), [k][n] tiles: BK k-rows x 16 chunks of 8 n. */
template <bool ALIGNED, typename Absmax>
struct Quant4NN {
    Chunks4bit<ALIGNED, Absmax> w;
    int64_t n0;
    __device__ __forceinline__ void fetch(int64_t k0, uint16_t*) {
#pragma unroll
        for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
            const int c = threadIdx.x + i * MM_THREADS;
            w.fetch(i, k0 + (c >> 4), n0 + (c & 15) * 8);
        }
    }
    __device__ __forceinline__ void finish(uint16_t* stage) {
#pragma unroll
        for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
            const int c = threadIdx.x + i * MM_THREADS;
            w.store(i, stage + (c >> 4) * KN_STRIDE + (c & 15) * 8);
        }
    }
};

/* B fragments of warp column wn (32 n) at k offset kk: b[ni][2] for the 4 n8 tiles. */
__device__ __forceinline__ void b_fragments_nk(uint32_t b[4][2], const uint16_t* stage, int wn,
                                               int kk) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
        const int n = wn * 32 + pair * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int k = kk + ((lane >> 3) & 1) * 8;
        uint32_t r[4];
        ldmatrix_x4(r, stage + n * ROW_STRIDE + k);
        b[2 * pair][0] = r[0];
        b[2 * pair][1] = r[1];
        b[2 * pair + 1][0] = r[2];
        b[2 * pair + 1][1] = r[3];
    }
}

__device__ __forceinline__ void b_fragments_kn(uint32_t b[4][2], const uint16_t* stage, int wn,
                                               int kk) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
        const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int n = wn * 32 + pair * 16 + (lane >> 4) * 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, stage + k * KN_STRIDE + n);
        b[2 * pair][0] = r[0];
        b[2 * pair][1] = r[1];
        b[2 * pair + 1][0] = r[2];
        b[2 * pair + 1][1] = r[3];
    }
}

/* -------------------------------------------------------------------------------------------- */
/* The main loop, shared by every product.                                                       */

template <bool ALIGNED_A, bool KN_LAYOUT, int B_TILE, typename BSource>
__device__ __forceinline__ void matmul_main(const uint16_t* __restrict__ A, BSource bsrc,
                                            uint16_t* __restrict__ C, int64_t M, int64_t N,
                                            int64_t K, float alpha, float beta,
                                            uint16_t (*As)[ROW_TILE], uint16_t (*Bs)[B_TILE]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp >> 2, wn = warp & 3; /* 2 x 4 warps */
    const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    const int64_t ktiles = (K + BK - 1) / BK;
    load_rows_tile<ALIGNED_A>(As[0], A, M, K, m0, 0);
    bsrc.fetch(0, Bs[0]);
    cp_async_commit();
    bsrc.finish(Bs[0]);
    cp_async_wait_all();
    __syncthreads();

    for (int64_t kt = 0; kt < ktiles; ++kt) {
        const int cur = (int)(kt & 1), nxt = cur ^ 1;
        const bool more = kt + 1 < ktiles;
        if (more) {
            load_rows_tile<ALIGNED_A>(As[nxt], A, M, K, m0, (kt + 1) * BK);
            bsrc.fetch((kt + 1) * BK, Bs[nxt]);
            cp_async_commit();
        }
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int row = wm * 64 + mi * 16 + (lane & 15);
                const int col = kk + (lane >> 4) * 8;
                ldmatrix_x4(a[mi], As[cur] + row * ROW_STRIDE + col);
            }
            if (KN_LAYOUT)
                b_fragments_kn(b, Bs[cur], wn, kk);
            else
                b_fragments_nk(b, Bs[cur], wn, kk);
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], a[mi], b[ni]);
        }
        if (more) bsrc.finish(Bs[nxt]);
        cp_async_wait_all();
        __syncthreads();
    }

    /* Epilogue: c0, c1 at (row g, cols 2t, 2t + 1), c2, c3 at row g + 8. */
    const bool pairs_aligned = (N % 2) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int64_t row = m0 + wm * 64 + mi * 16 + (lane >> 2) + half * 8;
            if (row >= M) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int64_t col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
                float v0 = alpha * acc[mi][ni][2 * half], v1 = alpha * acc[mi][ni][2 * half + 1];
                uint16_t* out = C + row * N + col;
                if (pairs_aligned && col + 1 < N) {
                    if (beta != 0.0f) {
                        const uint32_t old = *reinterpret_cast<const uint32_t*>(out);
                        v0 += beta * bf16_bits_to_f32((uint16_t)(old & 0xFFFF));
                        v1 += beta * bf16_bits_to_f32((uint16_t)(old >> 16));
                    }
                    *reinterpret_cast<uint32_t*>(out) = pack_bf16x2(v0, v1);
                } else {
                    if (col < N) {
                        if (beta != 0.0f) v0 += beta * bf16_bits_to_f32(out[0]);
                        out[0] = f32_to_bf16_bits(v0);
                    }
                    if (col + 1 < N) {
                        if (beta != 0.0f) v1 += beta * bf16_bits_to_f32(out[1]);
                        out[1] = f32_to_bf16_bits(v1);
                    }
                }
            }
        }
    }
}

/* Stages the 16-entry code table (and the dynamic map) in shared memory. */
__device__ __forceinline__ void stage_tables(const float* table, const float* dyn_map,
                                             float* table_sh, float* dyn_sh) {
    const int t = threadIdx.x;
    if (t < 16) table_sh[t] = table[t];
    if (dyn_map != nullptr && t < 256) dyn_sh[t] = dyn_map[t];
    __syncthreads();
}

/* -------------------------------------------------------------------------------------------- */
/* Entry points                                                                                  */

/* The CTA's dynamic shared memory (MM_SHARED_BYTES, set by the host) as two A stages, two B
   stages of B_TILE elements, the code table and the dynamic map. */
#define SHARED_TILES(B_TILE)                                                                      \
    extern __shared__ __align__(16) uint8_t mm_shared[];                                          \
    uint16_t(*As)[ROW_TILE] = reinterpret_cast<uint16_t(*)[ROW_TILE]>(mm_shared);                 \
    uint16_t(*Bs)[B_TILE] = reinterpret_cast<uint16_t(*)[B_TILE]>(mm_shared + 4 * ROW_TILE);     \
    float* table_sh = reinterpret_cast<float*>(mm_shared + 8 * ROW_TILE);                        \
    float* dyn_sh = table_sh + 16;                                                                \
    (void)table_sh;                                                                               \
    (void)dyn_sh

#define DENSE_NT(NAME, ALIGNED)                                                                   \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, 2)                                     \
    NAME(const uint16_t* A, const uint16_t* B, uint16_t* C, int64_t M, int64_t N, int64_t K,    \
         float alpha, float beta) {                                                              \
        SHARED_TILES(ROW_TILE);                                                                  \
        DenseNT<ALIGNED> src{B, N, K, (int64_t)blockIdx.x * BN};                                 \
        matmul_main<ALIGNED, false, ROW_TILE>(A, src, C, M, N, K, alpha, beta, As, Bs);          \
    }

DENSE_NT(matmul_nt_bf16_aligned, true)
DENSE_NT(matmul_nt_bf16_any, false)

/* B (K, N): aligned needs K % 8 == 0 (A's rows) and N % 8 == 0 (B's rows). */
#define DENSE_NN(NAME, ALIGNED)                                                                   \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, 2)                                  \
    NAME(const uint16_t* A, const uint16_t* B, uint16_t* C, int64_t M, int64_t N, int64_t K,    \
         float alpha, float beta) {                                                              \
        SHARED_TILES(KN_TILE);                                                                   \
        DenseNN<ALIGNED> src{B, K, N, (int64_t)blockIdx.x * BN};                                 \
        matmul_main<ALIGNED, true, KN_TILE>(A, src, C, M, N, K, alpha, beta, As, Bs);            \
    }

DENSE_NN(matmul_nn_bf16_aligned, true)
DENSE_NN(matmul_nn_bf16_any, false)

/* NT: W (N, K), [n][k] tiles; NN: W (K, N), [k][n] tiles. The A operand is aligned when K % 8
   == 0, which the nt variants require for W too; the nn variants need N % 8 == 0 for W and K % 8
   for A, so "aligned" means both there. */
#define QUANT_PLAIN(NAME, SOURCE, ALIGNED, KN, TILE, WROWS, WCOLS)                                \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, 2)                                     \
    NAME(const uint16_t* A, const uint8_t* packed, const float* table, const float* absmax,      \
         int64_t blocksize, uint16_t* C, int64_t M, int64_t N, int64_t K, float alpha,           \
         float beta) {                                                                           \
        SHARED_TILES(TILE);                                                                      \
        stage_tables(table, nullptr, table_sh, nullptr);                                         \
        SOURCE<ALIGNED, PlainAbsmax> src{                                                        \
            {packed, table_sh, nullptr, PlainAbsmax{absmax}, WROWS, WCOLS, blocksize},           \
            (int64_t)blockIdx.x * BN};                                                           \
        matmul_main<ALIGNED, KN, TILE>(A, src, C, M, N, K, alpha, beta, As, Bs);                 \
    }

#define QUANT_DOUBLE(NAME, SOURCE, ALIGNED, KN, TILE, WROWS, WCOLS)                               \
    extern "C" __global__ void __launch_bounds__(MM_THREADS, 2)                                     \
    NAME(const uint16_t* A, const uint8_t* packed, const float* table,                           \
         const uint8_t* absmax_codes, const float* dyn_map, const float* nested, float offset,   \
         int64_t nested_blocksize, int64_t blocksize, uint16_t* C, int64_t M, int64_t N,         \
         int64_t K, float alpha, float beta) {                                                   \
        SHARED_TILES(TILE);                                                                      \
        stage_tables(table, dyn_map, table_sh, dyn_sh);                                          \
        SOURCE<ALIGNED, DoubleAbsmax> src{                                                       \
            {packed, table_sh, dyn_sh,                                                           \
             DoubleAbsmax{absmax_codes, nested, offset, nested_blocksize}, WROWS, WCOLS,         \
             blocksize},                                                                         \
            (int64_t)blockIdx.x * BN};                                                           \
        matmul_main<ALIGNED, KN, TILE>(A, src, C, M, N, K, alpha, beta, As, Bs);                 \
    }

QUANT_PLAIN(matmul_nt_4bit_plain_aligned, Quant4NT, true, false, ROW_TILE, N, K)
QUANT_PLAIN(matmul_nt_4bit_plain_any, Quant4NT, false, false, ROW_TILE, N, K)
QUANT_DOUBLE(matmul_nt_4bit_double_aligned, Quant4NT, true, false, ROW_TILE, N, K)
QUANT_DOUBLE(matmul_nt_4bit_double_any, Quant4NT, false, false, ROW_TILE, N, K)
QUANT_PLAIN(matmul_nn_4bit_plain_aligned, Quant4NN, true, true, KN_TILE, K, N)
QUANT_PLAIN(matmul_nn_4bit_plain_any, Quant4NN, false, true, KN_TILE, K, N)
QUANT_DOUBLE(matmul_nn_4bit_double_aligned, Quant4NN, true, true, KN_TILE, K, N)
QUANT_DOUBLE(matmul_nn_4bit_double_any, Quant4NN, false, true, KN_TILE, K, N)
