/*
 * matmul_sm90.cu: the forward product of a 4-bit linear, C = alpha * A . W^T + beta * C, on
 * Hopper's warpgroup tensor cores (wgmma.mma_async, sm_90a only), W dequantized to bf16 in
 * shared memory tile by tile inside the main loop.
 * wgmma exists only on sm_90a: the module is built for compute_90a (the marker line below)
 * and the host loads it only on GPUs of compute capability 9.0.
 *
 * Products (row-major, f32 accumulation, beta == 0 never reads C):
 *   matmul_nt_4bit_plain_sm90, matmul_nt_4bit_double_sm90:
 *     A (M, K) bf16, W (N, K) 4-bit, C (M, N) bf16: C = alpha * A . W^T + beta * C.
 *   W in the layout of matmul.cu / nf4.cu: packed (N * K / 2,) u8, element 2i in the high nibble
 *   of byte i; table (16,) f32 code values; one absmax per 64 consecutive elements, plain f32
 *   or double quantized (u8 codes into the (256,) f32 dynamic map, times
 *   nested[b / nested_blocksize], plus offset).
 *   Cases: M % 128 == 0, N % 128 == 0, K % 64 == 0, blocksize 64, A 16-byte aligned: the host
 *   checks them and uses matmul.cu otherwise. Every global access is still bounds-checked.
 *
 * Tiling: a CTA computes a 128 x 128 tile of C (grid (N / 128, M / 128)) with 256 threads = two
 * warpgroups; warpgroup g owns rows [64 g, 64 g + 64) of the tile and issues
 * wgmma.mma_async.m64n128k16 with both operands in shared memory. The K loop steps by 64:
 *   - three load stages, filled by cp.async two steps ahead: the A tile (128 x 64 bf16, 16 KB,
 *     stored straight into its 128-byte-swizzled wgmma layout), the W codes of the tile
 *     (128 rows x 32 bytes) and their scales (one per row: 64 elements = one absmax block);
 *   - two W stages of bf16 (128 x 64, 16 KB each, 128-byte swizzle): step k's wgmmas read one
 *     while the threads dequantize step k + 1's codes into the other.
 *   Per step: issue the cp.async of step k + 2; issue 4 wgmmas (k16 each) on step k; wait for
 *   step k + 1's loads, dequantize them; wait for the wgmmas (wgmma.wait_group 0);
 *   fence.proxy.async (the generic-proxy stores and cp.async writes become visible to the async
 *   proxy that wgmma reads through); __syncthreads.
 * Dynamic shared memory: SM90_SHARED_BYTES (99,392 bytes, two CTAs per SM; the host raises the
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
 * Checked against: backend::gemm::matmul_nt on the bf16-rounded inputs (W dequantized by
 * quant::dequantize_4bit_f32 and rounded to bf16), relative error bound 1e-2 (the "matmul sm90"
 * rows of sun selftest).
 */

// build: -arch=compute_90a

#include "common.cuh"
#include "mma.cuh"

#define SM90_BM 128
#define SM90_BN 128
#define SM90_BK 64
#define SM90_THREADS 256
#define SM90_LOAD_STAGES 3
#define SM90_BLOCKSIZE 64

/* Shared-memory map, in bytes from the 1024-aligned base. */
#define TILE_BYTES (SM90_BM * SM90_BK * 2)                 /* 16384: a bf16 128 x 64 tile */
#define A_OFFSET 0                                        /* 3 A stages */
#define WBF_OFFSET (A_OFFSET + SM90_LOAD_STAGES * TILE_BYTES) /* 2 bf16 W stages */
#define CODES_BYTES (SM90_BN * SM90_BK / 2)               /* 4096: 128 rows x 32 bytes */
#define CODES_OFFSET (WBF_OFFSET + 2 * TILE_BYTES)        /* 3 code stages */
#define SCALES_BYTES (SM90_BN * 8)                        /* 1024: 128 u32 + 128 f32 */
#define SCALES_OFFSET (CODES_OFFSET + SM90_LOAD_STAGES * CODES_BYTES) /* 3 scale stages */
#define TABLE_OFFSET (SCALES_OFFSET + SM90_LOAD_STAGES * SCALES_BYTES) /* (16,) f32 */
#define DYN_OFFSET (TABLE_OFFSET + 16 * 4)                /* (256,) f32 */
#define USED_BYTES (DYN_OFFSET + 256 * 4)                 /* 98368 */
/* What the host passes: the map plus the slack to round the base up to 1024 bytes. */
#define SM90_SHARED_BYTES (USED_BYTES + 1024)

static_assert(USED_BYTES == 98368, "the host's SM90_SHARED_BYTES assumes this map");
static_assert(TILE_BYTES % 1024 == 0 && WBF_OFFSET % 1024 == 0, "swizzle atoms need 1024 alignment");

/* -------------------------------------------------------------------------------------------- */
/* Hopper primitives                                                                            */

/* 4 bytes global -> shared (cp.async .ca is the only form below 16 bytes); src_bytes 0 fills
   zeros (src must still be a valid address). */
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}
/* Waits until at most one committed cp.async group of this thread is still pending. */
__device__ __forceinline__ void cp_async_wait_all_but_one() {
    asm volatile("cp.async.wait_group 1;\n" ::);
}
/* Makes this thread's earlier generic-proxy writes to shared memory (stores, completed
   cp.async) visible to the async proxy that wgmma reads operands through. */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
/* Ties the accumulators to this point of the program, so the compiler neither reads them
   before the wgmmas that write them are waited for, nor moves their initialisation past the
   first wgmma (CUTLASS's warpgroup_fence_operand). */
__device__ __forceinline__ void fence_accumulators(float d[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/* The descriptor of a K-major, 128-byte-swizzled operand starting at shared address `addr`
   (1024-aligned, or that plus 32 * kk for the k16 step kk): see the file comment. */
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4)   /* start address */
           | ((uint64_t)1 << 16)               /* leading byte offset (unused): 1 */
           | ((uint64_t)(1024 >> 4) << 32)     /* stride byte offset: 1024 bytes */
           | ((uint64_t)1 << 62);              /* SWIZZLE_128B */
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
/* Scales of one tile: one per W row (64 elements of a row = one absmax block, as K % 64 == 0  */
/* and tiles start at multiples of 64). Row r's block is b = (n0 + r) * (K / 64) + kt.          */

__device__ __forceinline__ int64_t nested_index(int64_t block, int64_t nested_blocksize) {
    return (nested_blocksize & (nested_blocksize - 1)) == 0
               ? block >> (__ffsll(nested_blocksize) - 1)
               : block / nested_blocksize;
}

struct PlainScales {
    const float* absmax;
    /* Copies row r's absmax into word[r] of the stage (row_valid false: zeros). */
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
       of blocks N * K / 64 is a multiple of 4 when N % 128 == 0) and the nested scale. */
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
/* The kernel body                                                                              */

template <typename Scales>
__device__ __forceinline__ void matmul_nt_4bit_sm90(const uint16_t* __restrict__ A,
                                                    const uint8_t* __restrict__ packed,
                                                    const float* table, const float* dyn_map,
                                                    Scales scales, uint16_t* __restrict__ C,
                                                    int64_t M, int64_t N, int64_t K, float alpha,
                                                    float beta) {
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
    const int64_t blocks_per_row = K / SM90_BLOCKSIZE;

    if (tid < 16) table_sh[tid] = table[tid];
    if (dyn_map != nullptr) dyn_sh[tid] = dyn_map[tid]; /* 256 threads, 256 entries */

    /* Issues the cp.async copies of tile kt into load stage s (the caller commits). */
    auto load_tile = [&](int s, int64_t kt) {
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
        /* W codes: row r = tid / 2, bytes [16 h, 16 h + 16) of its 32 (h = tid % 2); the row's
           codes of this tile start at byte (n * K + k0) / 2, a multiple of 32. */
        {
            const int r = tid >> 1, h = tid & 1;
            const int64_t n = n0 + r;
            const bool valid = n < N && k0 + SM90_BK <= K;
            cp_async16(base + CODES_OFFSET + s * CODES_BYTES + r * 32 + h * 16,
                       valid ? (const void*)(packed + ((n * K + k0) >> 1) + h * 16)
                             : (const void*)packed,
                       valid ? 16 : 0);
        }
        /* Scales: threads 0..127, one row each. */
        if (tid < SM90_BN) {
            const int64_t n = n0 + tid;
            uint32_t* words = reinterpret_cast<uint32_t*>(base + SCALES_OFFSET + s * SCALES_BYTES);
            scales.load(words, reinterpret_cast<float*>(words + SM90_BN), tid,
                        n * blocks_per_row + kt, n < N && kt < blocks_per_row);
        }
    };

    /* Dequantizes tile kt from load stage s into bf16 W stage p: thread t takes row r = t / 2,
       elements [32 h, 32 h + 32) (h = t % 2): 16 code bytes, byte i = elements 2i (high nibble)
       and 2i + 1; word i of them is logical chunk 4 h + i, stored at its swizzled place. */
    auto dequantize_tile = [&](int s, int p, int64_t kt) {
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
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    fence_accumulators(acc);

    const int warpgroup = tid >> 7;
    const uint32_t a_addr = base_addr + A_OFFSET + warpgroup * (64 * 128);
    const uint32_t w_addr = base_addr + WBF_OFFSET;

    /* Prologue: tiles 0 and 1 in flight; tile 0 landed, dequantized, visible to wgmma. */
    load_tile(0, 0);
    cp_async_commit();
    if (ktiles > 1) load_tile(1, 1);
    cp_async_commit();
    cp_async_wait_all_but_one();
    __syncthreads(); /* tile 0's copies of every thread, and the tables */
    dequantize_tile(0, 0, 0);
    fence_proxy_async();
    __syncthreads();

    for (int64_t kt = 0; kt < ktiles; ++kt) {
        const int s = (int)(kt % SM90_LOAD_STAGES), p = (int)(kt & 1);
        /* Stage (kt + 2) % 3 held tile kt - 1: its A was read by step kt - 1's wgmmas, waited
           for before the barrier that ended step kt - 1; its codes were dequantized before. */
        if (kt + 2 < ktiles) load_tile((int)((kt + 2) % SM90_LOAD_STAGES), kt + 2);
        cp_async_commit(); /* possibly empty: one group per step keeps the wait count right */

        wgmma_fence();
        const uint64_t desc_a = sw128_descriptor(a_addr + s * TILE_BYTES);
        const uint64_t desc_b = sw128_descriptor(w_addr + p * TILE_BYTES);
#pragma unroll
        for (int kk = 0; kk < SM90_BK / 16; ++kk)
            wgmma_m64n128k16(acc, desc_a + 2 * kk, desc_b + 2 * kk); /* + 32 bytes per k16 */
        wgmma_commit();

        if (kt + 1 < ktiles) {
            /* Groups pending: tiles kt + 1 and kt + 2; wait for kt + 1 (every thread's part). */
            cp_async_wait_all_but_one();
            __syncthreads();
            /* W stage p ^ 1 was read by step kt - 1's wgmmas, complete since step kt - 1. */
            dequantize_tile((int)((kt + 1) % SM90_LOAD_STAGES), p ^ 1, kt + 1);
        }
        wgmma_wait_all();
        fence_accumulators(acc);
        fence_proxy_async();
        __syncthreads();
    }
    cp_async_wait_all();

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

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nt_4bit_plain_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                              const float* absmax, uint16_t* C, int64_t M, int64_t N, int64_t K,
                              float alpha, float beta) {
    matmul_nt_4bit_sm90(A, packed, table, nullptr, PlainScales{absmax}, C, M, N, K, alpha, beta);
}

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 2)
    matmul_nt_4bit_double_sm90(const uint16_t* A, const uint8_t* packed, const float* table,
                               const uint8_t* absmax_codes, const float* dyn_map,
                               const float* nested, float offset, int64_t nested_blocksize,
                               uint16_t* C, int64_t M, int64_t N, int64_t K, float alpha,
                               float beta) {
    matmul_nt_4bit_sm90(A, packed, table, dyn_map,
                        DoubleScales{absmax_codes, nested, offset, nested_blocksize}, C, M, N, K,
                        alpha, beta);
}
