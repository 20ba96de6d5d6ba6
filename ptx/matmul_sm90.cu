/*
 * matmul_sm90.cu: the two products of a 4-bit linear on Hopper's warpgroup tensor cores
 * (wgmma.mma_async, sm_90a only), W dequantized to bf16 in shared memory tile by tile inside the
 * main loop: the forward C = alpha * A . W^T + beta * C and the input gradient
 * C = alpha * A . W + beta * C.
 * wgmma exists only on sm_90a: the module is built for compute_90a (the marker line below)
 * and the host loads it only on GPUs of compute capability 9.0.
 *
 * Products (row-major, f32 accumulation, beta == 0 never reads C):
 *   matmul_nt_4bit_plain_sm90, matmul_nt_4bit_double_sm90 (forward, X W^T):
 *     A (M, K) bf16, W (N, K) 4-bit, C (M, N) bf16: C = alpha * A . W^T + beta * C.
 *   matmul_nn_4bit_plain_sm90, matmul_nn_4bit_double_sm90 (input gradient, dY W):
 *     A (M, K) bf16, W (K, N) 4-bit, C (M, N) bf16: C = alpha * A . W + beta * C
 *     (dX (T, K_in) = dY (T, N_out) . W (N_out, K_in): K = N_out, N = K_in).
 *   W in the layout of matmul.cu / nf4.cu: packed (rows * cols / 2,) u8, element 2i in the high
 *   nibble of byte i; table (16,) f32 code values; one absmax per 64 consecutive elements, plain
 *   f32 or double quantized (u8 codes into the (256,) f32 dynamic map, times
 *   nested[b / nested_blocksize], plus offset).
 *   Cases: M % 128 == 0, N % 128 == 0, K % 64 == 0, blocksize 64, A 16-byte aligned: the host
 *   checks them and uses matmul.cu otherwise. Every global access is still bounds-checked.
 *
 * Both products share everything but the making of the B tile (WeightNT, WeightNN): the A tile,
 * the pipeline, the descriptors and the epilogue are the same code. In the wgmma view both have
 * B K-major in shared memory, 128 rows n of 64 k (below); only where the codes come from and how
 * the dequantization writes them differ.
 *
 * Tiling: a CTA computes a 128 x 128 tile of C (grid (N / 128, M / 128)) with 256 threads = two
 * warpgroups; warpgroup g owns rows [64 g, 64 g + 64) of the tile and issues
 * wgmma.mma_async.m64n128k16 with both operands in shared memory. The K loop steps by 64:
 *   - four A stages (128 x 64 bf16, 16 KB, stored by cp.async straight into the 128-byte-swizzled
 *     wgmma layout), filled three steps ahead;
 *   - two code stages, filled two steps ahead: the W codes of the tile (4 KB: nt 128 W rows x
 *     32 bytes, nn 64 W rows x 64 bytes) and their 128 scales (nt one per W row: 64 elements =
 *     one absmax block; nn two per W row);
 *   - two W stages of bf16 (128 x 64, 16 KB each, 128-byte swizzle).
 *   Step k's wgmmas stay in flight while the threads wait for step k - 1's (wgmma.wait_group 1),
 *   then dequantize step k + 1's codes into the W stage step k - 1 read: step k runs under the
 *   threads' barriers and dequantization instead of after them, and the next step is issued
 *   before the current one has to end. The exact order, the stage
 *   ownership and the cp.async group counts are in the comment above the main loop;
 *   ptx/tools/sm90_pipeline.py replays them with adversarial timing.
 * Dynamic shared memory: SM90_SHARED_BYTES (110,656 bytes, two CTAs per SM; the host raises the
 * kernel's limit and passes it).
 *
 * Shared-memory operand layout (K-major, 128-byte swizzle; PTX ISA "Shared Memory Matrix Layout",
 * CUTLASS Swizzle<3,4,3>): a tile row holds 64 bf16 = 128 bytes = 8 chunks of 16 bytes; row r
 * lives at byte r * 128 of the tile, and its logical chunk j at physical chunk j ^ (r % 8). Eight
 * rows make a 1024-byte swizzle atom; tiles start on 1024-byte boundaries, so r % 8 equals the
 * address bits [7, 10) that the hardware XORs into bits [4, 7).
 * Matrix descriptor (64 bits; PTX "Matrix Descriptor Format", CUTLASS GmmaDescriptor):
 *   bits [0, 14)  start address >> 4
 *   bits [16, 30) leading-dimension byte offset >> 4: unused for swizzled K-major layouts
 *                 (assumed 1); we write 1
 *   bits [32, 46) stride-dimension byte offset >> 4: from one 8-row group to the next,
 *                 1024 >> 4 = 64
 *   bits [49, 52) base offset: 0 (atoms are 1024-aligned)
 *   bits [62, 64) layout type: 1 = SWIZZLE_128B
 * The k16 step kk (0..3) of a 64-deep tile starts 32 * kk bytes into each row: the hardware
 * forms logical address start + row * 128 + 16 c (c = 0, 1 the two 8-element chunks of the k16
 * slice), whose chunk bits are 2 kk + c and row bits r % 8, and XORs them: physical chunk
 * (2 kk + c) ^ (r % 8), which is where the element k = 16 kk + 8 c + e was stored. So the
 * descriptor of step kk is the step-0 descriptor plus 32 >> 4 = 2 in its address field.
 *   A of warpgroup g: start = A stage + g * 64 rows * 128 bytes (8 atoms, 1024-aligned), M = 64.
 *   B = W tile: start = W stage, N = 128 rows (16 atoms). Both K-major: imm-trans-a/b = 0.
 *
 * Accumulator layout (PTX "Matrix Fragments for wgmma.mma_async.m64nNk16", f32 D): thread
 * t of the warpgroup, warp w = t / 32, lane l, g = l / 4, q = l % 4; for n-block j (0..15)
 *   d[4j + 0] = (row 16 w + g,     col 8 j + 2 q),  d[4j + 1] = (16 w + g,     8 j + 2 q + 1)
 *   d[4j + 2] = (row 16 w + g + 8, col 8 j + 2 q),  d[4j + 3] = (16 w + g + 8, 8 j + 2 q + 1)
 *
 * The nn weight tile (WeightNN). In the GEMM view B = W is K x N with N contiguous (MN-major).
 * wgmma could read that through imm-trans-b = 1 with an MN-major descriptor, whose leading and
 * stride byte offsets mean different things than in the K-major case and which no kernel here
 * has yet been checked with on a GPU. Instead the dequantization transposes: it writes the
 * step's 64 x 128 slice of W as the same K-major, 128-byte-swizzled 128 x 64 tile the forward
 * writes (B-tile row n = column n0 + n of W, element k of the row = W row k0 + k), so the
 * forward's descriptors, swizzle and wgmma instruction apply unchanged, already run on the H200.
 *   Codes of a step: W rows k0 .. k0 + 63, columns n0 .. n0 + 127: in global memory row k's 64
 *   bytes start at (k N + n0) / 2 (k N + n0 is even, and a multiple of 128 as N and n0 are, so
 *   the byte offset is 16-byte aligned); its byte i holds columns n0 + 2i (high nibble) and
 *   n0 + 2i + 1 (low). Code stage: 64 rows of 64
 *   bytes, row r = W row k0 + r; thread t copies logical 16-byte chunk c = t % 4 of row
 *   r = t / 4 to physical chunk c ^ ((r / 8) % 4) (why: the reads below). 4096 bytes, the
 *   forward's CODES_BYTES.
 *   Scales: 64 rows x 2 blocks (columns [n0, n0 + 64) and [n0 + 64, n0 + 128); blocksize 64 and
 *   N % 64 == 0 put each block inside one row): block (k0 + r) (N / 64) + n0 / 64 + b for W row
 *   k0 + r and half b; slot 64 b + r of the stage's 128 (thread t < 128: b = t / 64, r = t % 64).
 *   Double quant reads the 4-byte word at byte (block & ~3) of the codes: in bounds as the
 *   number of blocks K N / 64 is a multiple of 4 (K % 64 == 0, N / 64 even).
 *   Dequantization: thread t of warp w, lane l takes the 8 x 4 block of W rows k0 + 8 kg + j
 *   (j = 0..7) by columns n0 + 4 ng + i (i = 0..3) with
 *     kg = 4 (w / 4) + l % 4   (0..7),   ng = 8 (w % 4) + 2 (l / 8) + (l / 4) % 2   (0..31),
 *   a bijection of the 256 threads onto 8 x 32 blocks. From code row r = 8 kg + j it reads the
 *   16-bit word at logical byte 2 ng = 16 (ng / 8) + 2 (ng % 8): physical chunk
 *   (ng / 8) ^ ((r / 8) % 4) = (ng / 8) ^ (kg % 4), byte 2 (ng % 8) in it. Little end: bits
 *   [0, 8) are the byte of columns 4 ng (high nibble, bits [4, 8)) and 4 ng + 1 (bits [0, 4)),
 *   bits [8, 16) columns 4 ng + 2 (bits [12, 16)) and 4 ng + 3 (bits [8, 12)). Its scale: slot
 *   64 (ng / 16) + r (column 4 ng + i < 64 iff ng < 16). It then holds, for each column
 *   n = 4 ng + i, the 8 values k = 8 kg .. 8 kg + 7 (packed low k first: bf16 pairs (k, k + 1)
 *   at the lower address), which is logical chunk kg of B-tile row n: one 16-byte store at
 *   n * 128 + ((kg ^ (n % 8)) << 4). Each (n, chunk) is written by exactly one thread.
 *   Bank conflicts: the stores go out 8 threads (a quarter warp: l / 8 fixed, so ng / 2 fixed,
 *   kg % 4 and ng % 2 vary) at a time; with n % 8 = 4 (ng % 2) + i, the chunk kg ^ (n % 8) =
 *   4 (kg / 4 ^ ng % 2) + (kg % 4 ^ i) takes 8 distinct values: conflict-free. The 16-bit reads
 *   of a warp (fixed j: rows 8 kg + j for 4 values of kg % 4, ng / 8 = w % 4 fixed, ng % 8 all
 *   8) touch 4 rows at the same row parity (bank offset 16 (j % 2)), each at a distinct physical
 *   chunk (ng / 8) ^ (kg % 4), 4 words each (pairs of threads share a word): 16 distinct banks,
 *   one wavefront; without the chunk swizzle all 4 rows would hit the same 4 banks. The scale
 *   reads (slot 64 b + 8 kg + j, b fixed within a warp) hit 4 distinct banks.
 *   A Python emulation of exactly these formulas (not kept in the repository) checked every
 *   stored element's code and block against W[k0 + k][n0 + n] for all tiles of a 192 x 384 W,
 *   and the conflict counts above.
 *
 * Checked against: backend::gemm::matmul_nt on the bf16-rounded inputs (W dequantized by
 * quant::dequantize_4bit_f32 and rounded to bf16, transposed for nn), relative error bound 1e-2
 * (the "matmul sm90" rows of sun selftest).
 */

// build: -arch=compute_90a

#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define SM90_BM 128
#define SM90_BN 128
#define SM90_BK 64
#define SM90_THREADS 256
#define SM90_A_STAGES 4    /* A tiles: cp.async three steps ahead */
#define SM90_CODE_STAGES 2 /* W codes and scales: cp.async two steps ahead */
#define SM90_W_STAGES 2    /* bf16 W tiles: step k's (read by its wgmmas), step k + 1's */
#define SM90_BLOCKSIZE 64

/* Shared-memory map, in bytes from the 1024-aligned base. */
#define TILE_BYTES (SM90_BM * SM90_BK * 2)                 /* 16384: a bf16 128 x 64 tile */
#define A_OFFSET 0                                        /* 4 A stages */
#define WBF_OFFSET (A_OFFSET + SM90_A_STAGES * TILE_BYTES) /* 2 bf16 W stages */
#define CODES_BYTES (SM90_BN * SM90_BK / 2)               /* 4096: 128 rows x 32 bytes */
#define CODES_OFFSET (WBF_OFFSET + SM90_W_STAGES * TILE_BYTES) /* 2 code stages */
#define SCALES_BYTES (SM90_BN * 8)                        /* 1024: 128 u32 + 128 f32 */
#define SCALES_OFFSET (CODES_OFFSET + SM90_CODE_STAGES * CODES_BYTES) /* 2 scale stages */
#define TABLE_OFFSET (SCALES_OFFSET + SM90_CODE_STAGES * SCALES_BYTES) /* (16,) f32 */
#define DYN_OFFSET (TABLE_OFFSET + 16 * 4)                /* (256,) f32 */
#define USED_BYTES (DYN_OFFSET + 256 * 4)                 /* 109632 */
/* What the host passes: the map plus the slack to round the base up to 1024 bytes. */
#define SM90_SHARED_BYTES (USED_BYTES + 1024)

static_assert(USED_BYTES == 109632, "the host's SM90_SHARED_BYTES assumes this map");
static_assert(TILE_BYTES % 1024 == 0 && WBF_OFFSET % 1024 == 0, "swizzle atoms need 1024 alignment");
/* The main loop picks code and W stages by tile & 1. */
static_assert(SM90_CODE_STAGES == 2 && SM90_W_STAGES == 2, "stage index tile & 1");
/* Two CTAs per SM: 2 x (SM90_SHARED_BYTES + 1 KB reserved per CTA) <= 228 KB. */
static_assert(2 * (SM90_SHARED_BYTES + 1024) <= 228 * 1024, "two CTAs per SM");

/* -------------------------------------------------------------------------------------------- */
/* Hopper primitives                                                                            */

/* Makes this thread's earlier generic-proxy writes to shared memory (stores, completed
   cp.async) visible to the async proxy that wgmma reads operands through. */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/* d (64 x 128 f32, the warpgroup's fragment) += A (64 x 16, K-major) . B (128 x 16, K-major)^T */
__device__ __forceinline__ void wgmma_m64n128k16(float d[64], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;\n" /* scale-d 1 (accumulate), scale-a/b 1, no transposes */
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b));
}

/* -------------------------------------------------------------------------------------------- */
/* Scales of one tile: 128 slots r, each one absmax block (which block a slot holds is the      */
/* weight layout's business: WeightNT, WeightNN below).                                         */

__device__ __forceinline__ int64_t nested_index(int64_t block, int64_t nested_blocksize) {
    return (nested_blocksize & (nested_blocksize - 1)) == 0
               ? block >> (__ffsll(nested_blocksize) - 1)
               : block / nested_blocksize;
}

struct PlainScales {
    const float* absmax;
    /* Copies block `block`'s absmax into word[r] of the stage (row_valid false: zeros). */
    __device__ __forceinline__ void load(uint32_t* words, float* /*nested*/, int r, int64_t block,
                                         bool row_valid) const {
        cp_async4(words + r, row_valid ? (const void*)(absmax + block) : (const void*)absmax,
                  row_valid ? 4 : 0);
    }
    __device__ __forceinline__ float resolve(const uint32_t* words, const float* /*nested*/,
                                             int r, int64_t /*block*/,
                                             const float* /*dyn_sh*/) const {
        return __uint_as_float(words[r]);
    }
};

struct DoubleScales {
    const uint8_t* codes;
    const float* nested;
    float offset;
    int64_t nested_blocksize;
    /* The 4-byte word holding code `block` (bytes [block & ~3, + 4): in bounds, as the number
       of blocks, rows * cols / 64 with one side a multiple of 128 and the other of 64, is a
       multiple of 4) and the nested scale. */
    __device__ __forceinline__ void load(uint32_t* words, float* nested_sh, int r, int64_t block,
                                         bool row_valid) const {
        cp_async4(words + r, row_valid ? (const void*)(codes + (block & ~(int64_t)3)) : codes,
                  row_valid ? 4 : 0);
        cp_async4(nested_sh + r,
                  row_valid ? (const void*)(nested + nested_index(block, nested_blocksize))
                            : (const void*)nested,
                  row_valid ? 4 : 0);
    }
    __device__ __forceinline__ float resolve(const uint32_t* words, const float* nested_sh, int r,
                                             int64_t block, const float* dyn_sh) const {
        const uint32_t code = (words[r] >> (8 * (uint32_t)(block & 3))) & 0xFF; /* little end */
        return dyn_sh[code] * nested_sh[r] + offset;
    }
};

/* -------------------------------------------------------------------------------------------- */
/* Weight layouts: where a tile's codes and scales come from (load, into code stage s) and how  */
/* they become the K-major bf16 B tile (dequantize, into W stage p). Both write the same B tile:*/
/* row n (0..127) of the C tile's columns, 64 k of the step, 128-byte swizzle.                  */

/* The forward's W (N, K): the B tile's rows are W's rows n0 .. n0 + 127, k along a row. */
template <typename Scales>
struct WeightNT {
    const uint8_t* packed;
    Scales scales;
    int64_t N, K, n0;
    int64_t blocks_per_row; /* K / 64 */

    /* W codes: row r = tid / 2, bytes [16 h, 16 h + 16) of its 32 (h = tid % 2); the row's codes
       of this tile start at byte (n * K + k0) / 2, a multiple of 32. Scales: threads 0..127, one
       row each, slot r = tid, block (n0 + r) * (K / 64) + kt. */
    __device__ __forceinline__ void load(uint8_t* base, int tid, int s, int64_t kt) const {
        const int64_t k0 = kt * SM90_BK;
        {
            const int r = tid >> 1, h = tid & 1;
            const int64_t n = n0 + r;
            const bool valid = n < N && k0 + SM90_BK <= K;
            cp_async16(base + CODES_OFFSET + s * CODES_BYTES + r * 32 + h * 16,
                       valid ? (const void*)(packed + ((n * K + k0) >> 1) + h * 16)
                             : (const void*)packed,
                       valid ? 16 : 0);
        }
        if (tid < SM90_BN) {
            const int64_t n = n0 + tid;
            uint32_t* words = reinterpret_cast<uint32_t*>(base + SCALES_OFFSET + s * SCALES_BYTES);
            scales.load(words, reinterpret_cast<float*>(words + SM90_BN), tid,
                        n * blocks_per_row + kt, n < N && kt < blocks_per_row);
        }
    }

    /* Thread t takes row r = t / 2, elements [32 h, 32 h + 32) (h = t % 2): 16 code bytes, byte
       i = elements 2i (high nibble) and 2i + 1; word i of them is logical chunk 4 h + i, stored at
       its swizzled place. */
    __device__ __forceinline__ void dequantize(uint8_t* base, int tid, int s, int p, int64_t kt,
                                               const float* table_sh,
                                               const float* dyn_sh) const {
        const int r = tid >> 1, h = tid & 1;
        const uint4 codes = *reinterpret_cast<const uint4*>(base + CODES_OFFSET + s * CODES_BYTES +
                                                            r * 32 + h * 16);
        const uint32_t* words =
            reinterpret_cast<const uint32_t*>(base + SCALES_OFFSET + s * SCALES_BYTES);
        const float scale = scales.resolve(words, reinterpret_cast<const float*>(words + SM90_BN),
                                           r, (n0 + r) * blocks_per_row + kt, dyn_sh);
        uint8_t* row = base + WBF_OFFSET + p * TILE_BYTES + r * 128;
        const uint32_t word[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t out[4];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint32_t byte = (word[i] >> (8 * b)) & 0xFF;
                out[b] = pack_bf16x2(table_sh[byte >> 4] * scale, table_sh[byte & 0xF] * scale);
            }
            const int j = 4 * h + i;
            *reinterpret_cast<uint4*>(row + ((j ^ (r & 7)) << 4)) =
                make_uint4(out[0], out[1], out[2], out[3]);
        }
    }
};

/* The input gradient's W (K, N) (the linear's (N_out, K_in) weight read untransposed): the B
   tile's row n holds column n0 + n of W, one element from each of the step's 64 W rows k0 ..
   k0 + 63. The codes arrive row-wise (64 W rows x 64 bytes) and the dequantization transposes
   them in registers; the derivations are in the file comment, "The nn weight tile". */
template <typename Scales>
struct WeightNN {
    const uint8_t* packed;
    Scales scales;
    int64_t N, K, n0;
    int64_t blocks_per_row; /* N / 64 */

    /* Codes: thread t copies the 16-byte logical chunk c = t % 4 of code row r = t / 4 (W row
       k0 + r, columns n0 + 32 c .. + 31: global byte ((k0 + r) N + n0) / 2 + 16 c, a multiple of
       16) to physical chunk c ^ ((r / 8) % 4) of the stage's 64-byte row r. Scales: threads
       0..127, slot t = 64 b + r for W row k0 + r (r = t % 64) and column half b = t / 64 (the
       block (k0 + r) (N / 64) + n0 / 64 + b). */
    __device__ __forceinline__ void load(uint8_t* base, int tid, int s, int64_t kt) const {
        const int64_t k0 = kt * SM90_BK;
        const bool columns_valid = n0 + SM90_BN <= N;
        {
            const int r = tid >> 2, c = tid & 3;
            const int64_t k = k0 + r;
            const bool valid = k < K && columns_valid;
            cp_async16(base + CODES_OFFSET + s * CODES_BYTES + r * 64 + ((c ^ ((r >> 3) & 3)) << 4),
                       valid ? (const void*)(packed + ((k * N + n0) >> 1) + c * 16)
                             : (const void*)packed,
                       valid ? 16 : 0);
        }
        if (tid < SM90_BN) {
            const int b = tid >> 6, r = tid & 63;
            const int64_t k = k0 + r;
            uint32_t* words = reinterpret_cast<uint32_t*>(base + SCALES_OFFSET + s * SCALES_BYTES);
            scales.load(words, reinterpret_cast<float*>(words + SM90_BN), tid,
                        k * blocks_per_row + (n0 >> 6) + b, k < K && columns_valid);
        }
    }

    /* Thread t (warp w, lane l) takes the 8 x 4 block of W rows k0 + 8 kg + j (j = 0..7) and
       columns n0 + 4 ng + i (i = 0..3), kg = 4 (w / 4) + l % 4, ng = 8 (w % 4) + 2 (l / 8) +
       (l / 4) % 2: from each of its 8 code rows one 16-bit word (4 nibbles), one scale (the
       column half b = ng / 16); out to 4 B-tile rows n = 4 ng + i, one 16-byte chunk each
       (logical chunk kg: k = 8 kg .. 8 kg + 7), at physical chunk kg ^ (n % 8). */
    __device__ __forceinline__ void dequantize(uint8_t* base, int tid, int s, int p, int64_t kt,
                                               const float* table_sh,
                                               const float* dyn_sh) const {
        const int lane = tid & 31, warp = tid >> 5;
        const int kg = ((warp >> 2) << 2) | (lane & 3);
        const int ng = ((warp & 3) << 3) | ((lane >> 3) << 1) | ((lane >> 2) & 1);
        const int b = ng >> 4;
        const uint8_t* codes = base + CODES_OFFSET + s * CODES_BYTES;
        /* Logical chunk ng / 8 of code rows 8 kg + j sits at physical chunk (ng / 8) ^ (kg % 4);
           the 16-bit word of columns 4 ng .. 4 ng + 3 at byte 2 (ng % 8) of the chunk. */
        const int code_offset = (((ng >> 3) ^ (kg & 3)) << 4) + 2 * (ng & 7);
        const uint32_t* words =
            reinterpret_cast<const uint32_t*>(base + SCALES_OFFSET + s * SCALES_BYTES);
        const float* nested_sh = reinterpret_cast<const float*>(words + SM90_BN);
        const int64_t block0 = (kt * SM90_BK + 8 * kg) * blocks_per_row + (n0 >> 6) + b;
        uint32_t out[4][4]; /* [column i][k pair jp]: bf16 of k = 8 kg + 2 jp (low), + 1 (high) */
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
            float v[2][4]; /* [k parity][column i] */
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = 2 * jp + e, r = 8 * kg + j;
                /* Little end: bits [0, 8) are the byte of columns 4 ng (high nibble) and 4 ng + 1,
                   bits [8, 16) that of 4 ng + 2 (high nibble) and 4 ng + 3. */
                const uint32_t pair =
                    *reinterpret_cast<const uint16_t*>(codes + r * 64 + code_offset);
                const float scale = scales.resolve(words, nested_sh, 64 * b + r,
                                                   block0 + j * blocks_per_row, dyn_sh);
                v[e][0] = table_sh[(pair >> 4) & 0xF] * scale;
                v[e][1] = table_sh[pair & 0xF] * scale;
                v[e][2] = table_sh[(pair >> 12) & 0xF] * scale;
                v[e][3] = table_sh[(pair >> 8) & 0xF] * scale;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) out[i][jp] = pack_bf16x2(v[0][i], v[1][i]);
        }
        uint8_t* stage = base + WBF_OFFSET + p * TILE_BYTES;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = 4 * ng + i;
            *reinterpret_cast<uint4*>(stage + n * 128 + ((kg ^ (n & 7)) << 4)) =
                make_uint4(out[i][0], out[i][1], out[i][2], out[i][3]);
        }
    }
};

/* -------------------------------------------------------------------------------------------- */
/* The kernel body, shared by both products: C (M, N) = alpha * A (M, K) . B + beta * C, the B  */
/* tile of each K step produced by `weight` (WeightNT or WeightNN).                             */

template <typename Weight>
__device__ __forceinline__ void matmul_4bit_sm90(const uint16_t* __restrict__ A, Weight weight,
                                                 const float* table, const float* dyn_map,
                                                 uint16_t* __restrict__ C, int64_t M, int64_t N,
                                                 int64_t K, float alpha, float beta) {
    extern __shared__ __align__(16) uint8_t sm90_shared[];
    /* Round the dynamic base up to 1024 bytes (SM90_SHARED_BYTES includes the slack). */
    const uint32_t raw_base = smem_addr(sm90_shared);
    uint8_t* base = sm90_shared + (((raw_base + 1023u) & ~1023u) - raw_base);
    const uint32_t base_addr = smem_addr(base);
    float* table_sh = reinterpret_cast<float*>(base + TABLE_OFFSET);
    float* dyn_sh = reinterpret_cast<float*>(base + DYN_OFFSET);

    const int tid = threadIdx.x;
    const int64_t m0 = (int64_t)blockIdx.y * SM90_BM, n0 = (int64_t)blockIdx.x * SM90_BN;
    const int64_t ktiles = K / SM90_BK;

    if (tid < 16) table_sh[tid] = table[tid];
    if (dyn_map != nullptr) dyn_sh[tid] = dyn_map[tid]; /* 256 threads, 256 entries */

    /* Issues the cp.async copies of tile kt's A into A stage s (the caller commits). */
    auto load_a = [&](int s, int64_t kt) {
        const int64_t k0 = kt * SM90_BK;
        uint8_t* a_stage = base + A_OFFSET + s * TILE_BYTES;
        /* A: 1024 chunks of 16 bytes, 4 per thread: chunk c = row c / 8, logical chunk c % 8. */
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = tid + i * SM90_THREADS;
            const int r = c >> 3, j = c & 7;
            const int64_t row = m0 + r;
            const bool valid = row < M && k0 + SM90_BK <= K;
            cp_async16(a_stage + r * 128 + ((j ^ (r & 7)) << 4),
                       valid ? (const void*)(A + row * K + k0 + j * 8) : (const void*)A,
                       valid ? 16 : 0);
        }
    };

    const int warpgroup = tid >> 7;
    const uint32_t a_addr = base_addr + A_OFFSET + warpgroup * (64 * 128);
    const uint32_t w_addr = base_addr + WBF_OFFSET;

    /* The pipeline. Tile t's A lives in A stage t % 4, its codes and scales in code stage t % 2,
       its bf16 W in W stage t % 2. Iteration kt of the loop, in program order:
         (a) [codes t = kt + 2] cp.async into code stage kt % 2; commit.
         (b) issue step kt's 4 wgmmas (A stage kt % 4, W stage kt % 2); commit.
         (c) wgmma.wait_group 1: this warpgroup's step kt - 1 is complete; step kt may run on.
         (d) cp.async.wait_group 2: the thread's copies of A (kt + 1) and codes (kt + 1) landed
             (the two most recent groups, A (kt + 2) and codes (kt + 2), may be in flight).
         (e) __syncthreads (B1).
         (f) [A t = kt + 3] cp.async into A stage (kt + 3) % 4; commit.
         (g) dequantize tile kt + 1: code stage (kt + 1) % 2 -> W stage (kt + 1) % 2.
         (h) fence.proxy.async; __syncthreads (B2).
       Ownership (each stage written only when nothing can still read it):
         - A stage (kt + 3) % 4 = (kt - 1) % 4 at (f) held A (kt - 1), read only by step kt - 1's
           wgmmas: both warpgroups passed (c) (step kt - 1 complete) before B1. A (kt), A (kt + 1)
           and A (kt + 2) sit in the three other stages.
         - Code stage (kt + 2) % 2 = kt % 2 at (a) held tile kt's codes, read only by (g) of
           iteration kt - 1 (or the prologue's dequantization for kt = 0), which every thread
           finished before B2 of iteration kt - 1 (the prologue's last barrier).
         - W stage (kt + 1) % 2 = (kt - 1) % 2 at (g) held W (kt - 1), read only by step
           kt - 1's wgmmas, complete in both warpgroups before B1. Step kt's wgmmas, possibly
           still running, read the other W stage.
       Visibility (what step kt + 1 reads at (b) of iteration kt + 1): A (kt + 1) landed for each
       thread at (d) of iteration kt and its W tile was stored at (g); each thread then fenced
       (h: its generic-proxy writes, the completed cp.async included, made visible to the async
       proxy that wgmma reads through) before B2.
       cp.async group count: the prologue commits 4 groups, {A 0, codes 0}, {codes 1}, {A 1},
       {A 2}; iteration kt commits {codes kt + 2} at (a) and {A kt + 3} at (f) (empty past the
       last tile, so the count stays exact). At (d) of iteration kt the newest groups are, newest
       first, {codes kt + 2}, then {A kt + 2} (f of iteration kt - 1; the prologue's last for
       kt = 0); wait_group 2 leaves those two pending and completes every older one, among them
       {codes kt + 1} (a of iteration kt - 1, or the prologue) and {A kt + 1} (f of iteration
       kt - 2, or the prologue). ptx/tools/sm90_pipeline.py replays this schedule and checks
       every rule above for 1 .. 12 tiles. */

    /* Prologue: tile 0 landed, dequantized into W stage 0 and visible to wgmma; codes 1, A 1 and
       A 2 in flight. */
    load_a(0, 0);
    weight.load(base, tid, 0, 0);
    cp_async_commit();
    if (ktiles > 1) weight.load(base, tid, 1, 1);
    cp_async_commit();
    if (ktiles > 1) load_a(1, 1);
    cp_async_commit();
    if (ktiles > 2) load_a(2, 2);
    cp_async_commit();
    cp_async_wait_group<3>(); /* {A 0, codes 0} landed */
    __syncthreads();    /* every thread's part of tile 0, and the tables */
    weight.dequantize(base, tid, 0, 0, 0, table_sh, dyn_sh);
    fence_proxy_async();
    __syncthreads();

    /* The accumulators come to life after the prologue, which then has their 64 registers for
       its address arithmetic (the nn prologue spilled without that). */
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    fence_accumulators(acc);

    for (int64_t kt = 0; kt < ktiles; ++kt) {
        /* (a) */
        if (kt + 2 < ktiles) weight.load(base, tid, (int)(kt & 1), kt + 2);
        cp_async_commit();

        /* (b) */
        wgmma_fence();
        const uint64_t desc_a = sw128_descriptor(a_addr + (int)(kt % SM90_A_STAGES) * TILE_BYTES);
        const uint64_t desc_b = sw128_descriptor(w_addr + (int)(kt & 1) * TILE_BYTES);
#pragma unroll
        for (int kk = 0; kk < SM90_BK / 16; ++kk)
            wgmma_m64n128k16(acc, desc_a + 2 * kk, desc_b + 2 * kk); /* + 32 bytes per k16 */
        wgmma_commit();
        fence_accumulators(acc);

        /* (c) */
        wgmma_wait<1>();
        fence_accumulators(acc);

        /* (d), (e) */
        cp_async_wait_group<2>();
        __syncthreads();

        /* (f) */
        if (kt + 3 < ktiles) load_a((int)((kt + 3) % SM90_A_STAGES), kt + 3);
        cp_async_commit();

        /* (g) */
        if (kt + 1 < ktiles)
            weight.dequantize(base, tid, (int)((kt + 1) & 1), (int)((kt + 1) & 1), kt + 1,
                              table_sh, dyn_sh);

        /* (h) */
        fence_proxy_async();
        __syncthreads();
    }
    wgmma_wait<0>();
    fence_accumulators(acc);
    cp_async_wait_group<0>(); /* only empty groups are left; no copy outlives the CTA */

    /* Epilogue: warp w of the warpgroup, lane l: rows 16 w + l / 4 (+ 8), cols 8 j + 2 (l % 4). */
    const int warp = (tid >> 5) & 3, lane = tid & 31;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + warpgroup * 64 + warp * 16 + (lane >> 2) + 8 * half;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int64_t col = n0 + 8 * j + 2 * (lane & 3);
            float v0 = alpha * acc[4 * j + 2 * half], v1 = alpha * acc[4 * j + 2 * half + 1];
            uint16_t* out = C + row * N + col;
            if (col + 1 < N) { /* N even: the pair is 4-byte aligned */
                if (beta != 0.0f) {
                    const uint32_t old = *reinterpret_cast<const uint32_t*>(out);
                    v0 += beta * bf16_bits_to_f32((uint16_t)(old & 0xFFFF));
                    v1 += beta * bf16_bits_to_f32((uint16_t)(old >> 16));
                }
                *reinterpret_cast<uint32_t*>(out) = pack_bf16x2(v0, v1);
            } else if (col < N) {
                if (beta != 0.0f) v0 += beta * bf16_bits_to_f32(out[0]);
                out[0] = f32_to_bf16_bits(v0);
            }
        }
    }
}

/* -------------------------------------------------------------------------------------------- */
/* Entry points                                                                                  */

/* The forward: C (M, N) = alpha * A (M, K) . W^T + beta * C, W (N, K). */
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nt_4bit_plain_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                              const float* absmax, uint16_t* C, int64_t M, int64_t N, int64_t K,
                              float alpha, float beta) {
    const WeightNT<PlainScales> weight{packed, PlainScales{absmax}, N, K,
                                       (int64_t)blockIdx.x * SM90_BN, K / SM90_BLOCKSIZE};
    matmul_4bit_sm90(A, weight, table, nullptr, C, M, N, K, alpha, beta);
}

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nt_4bit_double_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                               const uint8_t* absmax_codes, const float* dyn_map,
                               const float* nested, float offset, int64_t nested_blocksize,
                               uint16_t* C, int64_t M, int64_t N, int64_t K, float alpha,
                               float beta) {
    const WeightNT<DoubleScales> weight{
        packed, DoubleScales{absmax_codes, nested, offset, nested_blocksize}, N, K,
        (int64_t)blockIdx.x * SM90_BN, K / SM90_BLOCKSIZE};
    matmul_4bit_sm90(A, weight, table, dyn_map, C, M, N, K, alpha, beta);
}

/* The input gradient: C (M, N) = alpha * A (M, K) . W + beta * C, W (K, N). */
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nn_4bit_plain_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                              const float* absmax, uint16_t* C, int64_t M, int64_t N, int64_t K,
                              float alpha, float beta) {
    const WeightNN<PlainScales> weight{packed, PlainScales{absmax}, N, K,
                                       (int64_t)blockIdx.x * SM90_BN, N / SM90_BLOCKSIZE};
    matmul_4bit_sm90(A, weight, table, nullptr, C, M, N, K, alpha, beta);
}

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nn_4bit_double_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                               const uint8_t* absmax_codes, const float* dyn_map,
                               const float* nested, float offset, int64_t nested_blocksize,
                               uint16_t* C, int64_t M, int64_t N, int64_t K, float alpha,
                               float beta) {
    const WeightNN<DoubleScales> weight{
        packed, DoubleScales{absmax_codes, nested, offset, nested_blocksize}, N, K,
        (int64_t)blockIdx.x * SM90_BN, N / SM90_BLOCKSIZE};
    matmul_4bit_sm90(A, weight, table, dyn_map, C, M, N, K, alpha, beta);
}
