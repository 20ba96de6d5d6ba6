/*
 * gemm_sm90.cu: the dense bf16 GEMM on Hopper (sm_90a only): C (M, N) = alpha * A (M, K) . B (N, K)^T
 * + beta * C, with TMA loads, an mbarrier ring, a producer warpgroup and two wgmma consumer
 * warpgroups. The 4-bit products use it after dequantizing W once into a bf16 scratch
 * (src/backend/cuda/gemm_sm90.rs).
 *
 * Layouts: A (M, K) and B (N, K) bf16, K contiguous (K-major); C (M, N) bf16 row-major; f32
 * accumulation; beta == 0 never reads C. Cases: K a multiple of 64, N a multiple of 8, M, N, K
 * below 2^31, A and B 16-byte aligned (the host checks them; the tensor maps need K * 2 % 16 == 0).
 * M and N edges: TMA fills rows past M (A) and past N (B) with zeros, and the epilogue stores only
 * rows < M and columns < N.
 *
 * B stored (K, N) ("NN": gemm_nn_bf16_sm90, C = alpha * A (M, K) . B (K, N) + beta * C, N
 * contiguous: a dense weight applied untransposed, dlogits . W_lm of the loss head, dY . W of a
 * 4-bit linear dequantized as stored). The same kernel (gemm_bf16_sm90<true>): the A side, the
 * ring, the tiles and the epilogues are the NT kernel's; only B's boxes, its shared-memory layout,
 * its descriptor and the wgmma's imm-trans-b differ, and there is no low-rank term (K2 = 0).
 * Cases: N and K multiples of 8 (16-byte rows for the tensor maps), M, N, K below 2^31. K edge:
 * the steps are ceil(K / 64), and TMA fills A's columns and B's rows past K with zeros (which add
 * nothing). N edge: a B box (64 columns) that starts at or past N is not loaded (its columns of
 * the accumulator are never stored, whatever the stage held), one that straddles N is zero-filled
 * past it, and the epilogue stores only columns < N, as in NT.
 *   b_map: dims {N, K}, row stride N * 2 bytes, box {64, 64} (64 columns = 128 bytes, the
 *     swizzle span; 64 k-rows), SWIZZLE_128B, zero fill. Per step the producer issues the A box
 *     and the tile's B boxes j = 0..3 at (n0 + 64 j, k0) that start below N, into the B stage at
 *     + 8192 j, and arms full[s] with 16,384 + 8,192 x (those boxes) bytes.
 *   Shared-memory layout of a B stage (32 KB, 1024-aligned): box j holds columns n0 + 64 j ..
 *     + 63 for the step's 64 k; k-row r (128 bytes) at byte 8192 j + 128 r, its 16-byte chunk c
 *     (columns 8 c .. 8 c + 7) at physical chunk c ^ (r % 8): the TMA 128-byte swizzle, r % 8
 *     being the address bits [7, 10) since the box is 1024-aligned. So element (k, n) of the tile
 *     is at 8192 (n / 64) + 128 k + 16 ((n % 64 / 8) ^ (k % 8)) + 2 (n % 8).
 *   Descriptor (MN-major, wgmma.cuh's mn_sw128_descriptor): the PTX ISA's canonical MN-major
 *     128B-swizzle layout, in 16-byte units ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) composed with
 *     Swizzle<3,4,3> (T = 8 bf16): 8 contiguous chunks make 64 N-elements of one k (128 bytes),
 *     8 such rows one k apart (128 bytes) make the 1024-byte atom; the m-mode (the next 64 N) is
 *     the leading byte offset, the k-mode (the next 8 k) the stride byte offset (CUTLASS's
 *     make_gmma_desc for Major::MN with a swizzle: leading = stride<0,1>, stride = stride<1,1>).
 *     Here: LBO = 8192 (box to box, field 512), SBO = 1024 (field 64), base offset 0 (atoms on
 *     1024-byte boundaries), layout type 1 (SWIZZLE_128B). The k16 step kk starts 16 k-rows on:
 *     + 2048 kk bytes, + 128 kk in the address field (still 1024-aligned, so the swizzle phase
 *     is the row's k % 8, as TMA wrote it). The wgmma reads B (16 x 256) with imm-trans-b = 1.
 *   ptx/tools/gemm_sm90_ring.py checks this addressing against the TMA layout element by
 *   element (and that the swapped LBO/SBO would be caught).
 *
 * Low-rank term. With K2 > 0 the same tile loop continues over a second pair of operands,
 * A2 (M, K2) and B2 (N, K2), for ceil(K2 / 64) more steps: C = alpha * (A B^T + A2 B2^T) + beta C,
 * one accumulator, no second pass over C. A LoRA adapter's B (N, r) with the rows' z (M, r)
 * (already scaled) is such a term: the linear and its adapter in one GEMM. The maps' boxes are
 * the same 64 wide as A's and B's; past K2 (r < 64) TMA fills zeros, which add nothing. With K2
 * == 0, a2_map and b2_map are never read (the host passes A's and B's).
 *
 * Launch: gemm_nt_bf16_sm90(a_map, b_map, a2_map, b2_map, c_map, C, M, N, K, K2, alpha, beta) or
 * gemm_nn_bf16_sm90(a_map, b_map, c_map, C, M, N, K, alpha, beta), 384 threads, dynamic shared
 * memory GEMM_SHARED_BYTES (230,464: one CTA per SM), a persistent grid of min(tiles, SMs) CTAs.
 * a_map / b_map (NT; NN's b_map is in "B stored (K, N)" above): CUtensorMap (128 bytes) built by
 * the host with cuTensorMapEncodeTiled: bf16, rank 2, dims {K, M} / {K, N}, row stride K * 2
 * bytes, box {64, 128} / {64, 256}, no interleave, SWIZZLE_128B, zero out-of-bounds fill; passed
 * by value as __grid_constant__ parameters.
 * c_map: the same encoding of C (dims {N, M}, row stride N * 2 bytes, box {64, 64}), for the
 * epilogue's TMA stores (TMA writes nothing outside C).
 *
 * Tiles. A CTA computes 128 x 256 tiles of C, tile t = blockIdx.x, blockIdx.x + gridDim.x, ...
 * (the same sequence for every warpgroup of the CTA). Tile t -> (m tile, n tile) in groups of
 * GEMM_GROUP_M m tiles (tile_origin): within a group the m tile varies fastest, so the ~132 CTAs
 * in flight together read ~16 A row-blocks and ~8 B row-blocks. Per tile, K / 64 steps.
 *
 * Roles (warpgroup w = threadIdx.x / 128):
 *   w = 0, the producer: setmaxnreg.dec to 40 registers; thread 0 alone walks the tiles and
 *     steps and, per step, waits for the stage to be empty, arms its full barrier with the
 *     stage's byte count and issues two TMA copies (A 128 x 64, B 256 x 64) that complete on it.
 *     The other 127 threads exit.
 *   w = 1, 2, the consumers: setmaxnreg.inc to 232; consumer c = w - 1 owns rows [64 c, 64 c + 64)
 *     of the tile: 128 f32 accumulators a thread (64 x 256 over 128 threads), four
 *     wgmma.m64n256k16 per step.
 *
 * The ring. GEMM_STAGES stages, each an A tile (16 KB) and a B tile (32 KB); two mbarriers per
 * stage: full[s] (arrival count 1: the producer's arrive.expect_tx; the transaction count is the
 * stage's 49,152 bytes, which the two TMA copies complete: a box is counted whole, zero-filled
 * parts included) and empty[s] (arrival count 8: lane 0 of each of the 8 consumer warps, once the
 * wgmmas that read the stage are complete in its warp).
 * Every role numbers the steps it has seen in this CTA, i = 0, 1, 2, ... across tiles; step i
 * uses stage s = i % GEMM_STAGES, and it is the (i / GEMM_STAGES)-th use of that stage, so:
 *   - full[s] completes its phase j when step s + j * GEMM_STAGES has landed: the consumers wait
 *     for step i with parity (i / GEMM_STAGES) & 1;
 *   - empty[s] completes its phase j when the consumers have released step s + j * GEMM_STAGES:
 *     the producer, before refilling the stage for step i >= GEMM_STAGES, needs phase
 *     i / GEMM_STAGES - 1 complete and waits with parity ((i / GEMM_STAGES) & 1) ^ 1; for
 *     i < GEMM_STAGES that parity is 1, and a fresh barrier (in phase 0) reports the phase
 *     "before" it, parity 1, as complete: the first pass never waits.
 *   Parities are unambiguous: the producer cannot arm step i + GEMM_STAGES before the consumers
 *   released step i, and they cannot release what has not landed, so no barrier ever runs two
 *   phases ahead of a waiter. ptx/tools/gemm_sm90_ring.py replays this with adversarial timing.
 * Consumer step i: wait full[s]; wgmma.fence; 4 wgmmas; commit; wgmma.wait_group 1 (step i - 1 of
 * this tile is complete, step i may still run); lane 0 arrives on empty[(i - 1) % GEMM_STAGES].
 * After a tile's last step: wgmma.wait_group 0, arrive on that step's empty barrier, epilogue.
 * Proxies: the stages are written by TMA and read by wgmma, both in the async proxy; the landed
 * bytes are visible to the waiters of full[s] (complete_tx), and the producer's wait on empty[s]
 * (acquire) orders its next copy after the consumers' arrivals (release), as in CUTLASS's
 * PipelineTmaAsync. No generic-proxy access touches a stage.
 *
 * Shared-memory operand layout (K-major, 128-byte swizzle; PTX ISA "Tensor copy swizzle modes",
 * "Shared Memory Matrix Layout"; CUTLASS Swizzle<3,4,3>): TMA writes box row r (64 bf16 = 128
 * bytes = 8 chunks of 16 bytes) at byte r * 128 of the stage with its logical chunk j at physical
 * chunk j ^ (r % 8); stages start on 1024-byte boundaries, so r % 8 are the address bits [7, 10)
 * that the swizzle XORs into bits [4, 7), the layout matmul_sm90.cu writes by hand and has run.
 * Matrix descriptor (as matmul_sm90.cu's sw128_descriptor): start address >> 4, leading byte
 * offset 1 (unused for swizzled K-major), stride byte offset 1024 >> 4 (8-row groups), base offset
 * 0, layout type 1 (SWIZZLE_128B); the k16 step kk starts 32 kk bytes into each row: + 2 kk in the
 * address field. Consumer c's A: stage A + c * 64 rows * 128 bytes = + 8192 (1024-aligned), M 64;
 * B: the stage's B tile, N 256 rows = 32 groups of 8, 1024 bytes apart.
 *
 * Accumulator layout (PTX "Matrix Fragments for wgmma.mma_async.m64nNk16", f32 D): thread t of the
 * warpgroup, warp w = t / 32, lane l; for the 8-column block j (0..31)
 *   d[4j + 0], d[4j + 1] = (row 16 w + l / 4,     cols 8 j + 2 (l % 4) + 0, 1)
 *   d[4j + 2], d[4j + 3] = (row 16 w + l / 4 + 8, cols 8 j + 2 (l % 4) + 0, 1)
 * Epilogue (beta == 0 or 1: every product of the training step): through shared memory and TMA, so
 * the consumer goes on to its next tile while its stores drain. Each consumer owns two 8 KB boxes
 * (64 rows x 64 columns of bf16, 128-byte swizzle: row r's 16-byte chunk c at byte
 * r * 128 + 16 (c ^ r % 8)). Its 64 x 256 part of the tile leaves in four quarters of 64 columns
 * q = 0..3, quarter q through box q % 2: thread 0 of the consumer waits until at most one of its
 * bulk store groups is still reading shared memory (cp.async.bulk.wait_group.read 1: the store
 * of quarter q - 2, which read this box, is done), a named barrier of the consumer's 128 threads,
 * each thread writes its pairs (8-column blocks j = 8q .. 8q + 7, rows of both halves: one
 * st.shared.b32 each, the 8 rows of a warp instruction in 8 distinct chunks: no bank conflict),
 * fence.proxy.async (generic writes -> the async proxy), the barrier again, and thread 0 issues
 * the box's TMA store at (n0 + 64 q, m0 + 64 c) and commits it as a bulk group (an empty group
 * when the box lies wholly past N or M: the group count stays one a quarter). With beta == 1
 * the store is a TMA reduction (cp.reduce.async.bulk.tensor .add: C += the box, element by
 * element in L2, bf16 as c_map says): C is never read by the SM, and each element of C is
 * added to once, so the result is deterministic; it rounds twice (bf16(alpha acc), then the sum)
 * where the plain epilogue rounds alpha acc + C once. Before the CTA exits, thread 0 waits for
 * all of its groups (cp.async.bulk.wait_group 0).
 * Any other beta keeps the plain epilogue (it reads C): each pair is one 4-byte store at
 * C + row * N + col (col even, N a multiple of 8: aligned, and col < N implies col + 1 < N).
 *
 * Checked against: backend::gemm::matmul_nt on the bf16 inputs (the "gemm bf16 sm90" rows of
 * sun selftest, M and N edges, alpha and beta; NN against the oracle on B transposed on the host,
 * also at K edges and the 7B shapes), relative error bound 1e-2.
 */

// build: -arch=compute_90a

#include <cuda.h> /* CUtensorMap: 128 opaque bytes built by the host */

#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define GEMM_BM 128
#define GEMM_BN 256
#define GEMM_BK 64
#define GEMM_STAGES 4
#define GEMM_THREADS 384  /* producer warpgroup + two consumer warpgroups */
#define GEMM_CONSUMER_WARPS 8
#define GEMM_GROUP_M 16   /* m tiles per raster group */
#define PRODUCER_REGISTERS 40
#define CONSUMER_REGISTERS 232

/* Shared-memory map, in bytes from the 1024-aligned base. */
#define A_STAGE_BYTES (GEMM_BM * GEMM_BK * 2)                /* 16384 */
#define B_STAGE_BYTES (GEMM_BN * GEMM_BK * 2)                /* 32768 */
#define STAGE_TX_BYTES (A_STAGE_BYTES + B_STAGE_BYTES)       /* 49152: both boxes, whole */
/* B stored (K, N): a stage's B tile is B_BOXES boxes of 64 k-rows x 64 columns (128 bytes). */
#define B_BOX_COLS 64
#define B_BOXES (GEMM_BN / B_BOX_COLS)                      /* 4 */
#define B_BOX_BYTES (GEMM_BK * B_BOX_COLS * 2)               /* 8192 */
#define A_OFFSET 0
#define B_OFFSET (A_OFFSET + GEMM_STAGES * A_STAGE_BYTES)    /* 65536 */
#define EPI_BOX_BYTES (64 * 64 * 2)                          /* 8192: one 64 x 64 bf16 box */
#define EPI_OFFSET (B_OFFSET + GEMM_STAGES * B_STAGE_BYTES)  /* 196608: 2 boxes a consumer */
#define FULL_OFFSET (EPI_OFFSET + 4 * EPI_BOX_BYTES)         /* 229376: 8-byte mbarriers */
#define EMPTY_OFFSET (FULL_OFFSET + 8 * GEMM_STAGES)
#define USED_BYTES (EMPTY_OFFSET + 8 * GEMM_STAGES)          /* 229440 */
/* What the host passes: the map plus the slack to round the base up to 1024 bytes. */
#define GEMM_SHARED_BYTES (USED_BYTES + 1024)

static_assert(USED_BYTES == 229440, "the host's GEMM_SHARED_BYTES assumes this map");
static_assert(A_STAGE_BYTES % 1024 == 0 && B_STAGE_BYTES % 1024 == 0 && B_OFFSET % 1024 == 0,
              "swizzle atoms and TMA destinations need 1024-byte alignment");
static_assert(EPI_OFFSET % 1024 == 0 && EPI_BOX_BYTES % 1024 == 0, "the epilogue boxes, too");
static_assert(B_BOX_BYTES % 1024 == 0 && B_BOXES * B_BOX_BYTES == B_STAGE_BYTES,
              "the N-major B boxes tile the B stage on swizzle-atom boundaries");
/* One CTA per SM: 227 KB of shared memory a CTA at most (plus 1 KB reserved). */
static_assert(GEMM_SHARED_BYTES <= 227 * 1024, "fits a CTA's shared memory");
/* The register file: 128 x 40 + 256 x 232 = 64,512 <= 65,536, and the entry allocation
   (__launch_bounds__(384, 1): at most 168 a thread) is what setmaxnreg redistributes. */
static_assert(128 * PRODUCER_REGISTERS + 256 * CONSUMER_REGISTERS <= 65536, "register file");

/* -------------------------------------------------------------------------------------------- */
/* Hopper primitives                                                                            */

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
/* Makes the initialised barriers visible to the async proxy (TMA's complete_tx) and the CTA. */
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* Spins until the phase of parity `parity` has completed (see the file comment). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n"
            ".reg .pred complete;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
            "selp.u32 %0, 1, 0, complete;\n"
            "}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (done == 0);
}
/* One arrival, and `bytes` more expected transaction bytes for the current phase. */
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* The box at (col, row) of `map` (col: the contiguous coordinate) into shared memory at `dst`,
   completing on mbarrier `bar`. */
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t col, int32_t row) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
        : "memory");
}
/* Shared memory at `src` (a box in the map's layout) to the box at (col, row) of `map`, as one
   more operation of this thread's open bulk group. */
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int32_t col,
                                             int32_t row) {
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
            reinterpret_cast<uint64_t>(map)),
        "r"(col), "r"(row), "r"(src)
        : "memory");
}
/* Adds the shared-memory box at `src` into the box at (col, row) of `map` (element-wise, in the
   map's type), as one more operation of this thread's open bulk group. */
__device__ __forceinline__ void tma_reduce_add_2d(const CUtensorMap* map, uint32_t src,
                                                  int32_t col, int32_t row) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], "
        "[%3];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
        "r"(col), "r"(row), "r"(src)
        : "memory");
}
/* Closes this thread's open bulk group (possibly empty). */
__device__ __forceinline__ void bulk_commit_group() {
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
/* Waits until at most N of this thread's bulk groups are still reading their shared memory. */
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
/* Waits until every bulk group of this thread is complete (its writes performed). */
__device__ __forceinline__ void bulk_wait_group_all() {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}
/* Orders this thread's generic-proxy shared-memory writes before later async-proxy reads. */
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* Named barrier `id` (1.. : 0 is __syncthreads) of `threads` threads. */
__device__ __forceinline__ void named_barrier(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
template <int Registers>
__device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
}
template <int Registers>
__device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

/* d (64 x 256 f32, the warpgroup's fragment) += A (64 x 16, K-major) . B (16 x 256): B K-major
   (TransB 0, stored (256, 16)) or MN-major (TransB 1, stored (16, 256): the instruction's
   imm-trans-b). */
template <int TransB>
__device__ __forceinline__ void wgmma_m64n256k16(float d[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, "
        "%66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, "
        "%98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "
        "%124, %125, %126, %127}, "
        "%128, %129, 1, 1, 1, 0, %130;\n" /* scale-d 1 (accumulate), scale-a/b 1, A K-major */
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
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]),
          "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
          "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]),
          "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),
          "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),
          "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),
          "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]),
          "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]),
          "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),
          "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),
          "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "n"(TransB));
}

/* Tile `tile` -> its first row m0 and column n0 of C: groups of GEMM_GROUP_M m tiles, m tile
   fastest inside a group (a bijection of [0, m_tiles * n_tiles); the last group may be shorter). */
__device__ __forceinline__ void tile_origin(int64_t tile, int64_t m_tiles, int64_t n_tiles,
                                            int32_t* m0, int32_t* n0) {
    const int64_t per_group = (int64_t)GEMM_GROUP_M * n_tiles;
    const int64_t group = tile / per_group;
    const int64_t first_m = group * GEMM_GROUP_M;
    const int64_t rows = min(m_tiles - first_m, (int64_t)GEMM_GROUP_M);
    const int64_t local = tile - group * per_group;
    *m0 = (int32_t)((first_m + local % rows) * GEMM_BM);
    *n0 = (int32_t)((local / rows) * GEMM_BN);
}

/* The consumer's 64 x 256 part of the tile (rows m0 + 64 consumer ..) to C through its two
   shared-memory boxes and TMA stores (the file comment's "Epilogue"): C = alpha * acc, or with
   `accumulate` C += alpha * acc. */
__device__ __forceinline__ void epilogue_tma(const float (&acc)[128], float alpha, bool accumulate,
                                             const CUtensorMap* c_map, uint32_t boxes,
                                             int consumer, int warp, int lane, int32_t m0,
                                             int32_t n0, int64_t M, int64_t N) {
    const bool leader = warp == 0 && lane == 0;
    const uint32_t barrier = 1 + (uint32_t)consumer; /* named barriers 1 and 2 */
    const int32_t row0 = m0 + consumer * 64;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const uint32_t box = boxes + (uint32_t)(q & 1) * EPI_BOX_BYTES;
        if (leader) bulk_wait_group_read<1>(); /* quarter q - 2's store has read this box */
        named_barrier(barrier, 128);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const uint32_t r = (uint32_t)(warp * 16 + (lane >> 2) + 8 * half); /* row in box */
            const uint32_t row_base = box + r * 128 + (uint32_t)(lane & 3) * 4;
#pragma unroll
            for (int c = 0; c < 8; ++c) { /* 8-column block j = 8 q + c: chunk c of the row */
                const int j = 8 * q + c;
                const uint32_t v = pack_bf16x2(alpha * acc[4 * j + 2 * half],
                                               alpha * acc[4 * j + 2 * half + 1]);
                const uint32_t addr = row_base + (((uint32_t)c ^ (r & 7)) << 4);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
            }
        }
        fence_proxy_async_shared();
        named_barrier(barrier, 128);
        if (leader) {
            const int32_t col = n0 + 64 * q;
            if (col < N && row0 < M) {
                if (accumulate)
                    tma_reduce_add_2d(c_map, box, col, row0);
                else
                    tma_store_2d(c_map, box, col, row0);
            }
            bulk_commit_group();
        }
    }
}

/* The consumer's part of the tile to C with plain stores, C = alpha * acc + beta * C: rows
   16 warp + lane / 4 (+ 8) of this consumer's 64, columns 8 j + 2 (l % 4). */
__device__ __forceinline__ void epilogue_direct(const float (&acc)[128], float alpha, float beta,
                                                uint16_t* __restrict__ C, int consumer, int warp,
                                                int lane, int32_t m0, int32_t n0, int64_t M,
                                                int64_t N) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int64_t row = (int64_t)m0 + consumer * 64 + warp * 16 + (lane >> 2) + 8 * half;
        if (row >= M) continue;
        uint16_t* c_row = C + row * N;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            const int64_t col = (int64_t)n0 + 8 * j + 2 * (lane & 3);
            if (col >= N) continue;
            float v0 = alpha * acc[4 * j + 2 * half], v1 = alpha * acc[4 * j + 2 * half + 1];
            uint32_t* out = reinterpret_cast<uint32_t*>(c_row + col);
            const uint32_t old = *out;
            v0 += beta * bf16_bits_to_f32((uint16_t)(old & 0xFFFF));
            v1 += beta * bf16_bits_to_f32((uint16_t)(old >> 16));
            *out = pack_bf16x2(v0, v1);
        }
    }
}

/* -------------------------------------------------------------------------------------------- */

/* The whole kernel for either layout of B (the file comment): BStoredKN false, B (N, K) K-major
   and the low-rank term; true, B (K, N) N-major in B_BOXES boxes a stage, no low-rank term
   (the entry point passes K2 = 0). */
template <bool BStoredKN>
__device__ __forceinline__ void gemm_bf16_sm90(const CUtensorMap* a_map, const CUtensorMap* b_map,
                                               const CUtensorMap* a2_map,
                                               const CUtensorMap* b2_map,
                                               const CUtensorMap* c_map, uint16_t* __restrict__ C,
                                               int64_t M, int64_t N, int64_t K, int64_t K2,
                                               float alpha, float beta) {
    extern __shared__ __align__(16) uint8_t gemm_shared[];
    /* Round the dynamic base up to 1024 bytes (GEMM_SHARED_BYTES includes the slack). */
    const uint32_t raw_base = smem_addr(gemm_shared);
    const uint32_t base = (raw_base + 1023u) & ~1023u;
    const uint32_t full0 = base + FULL_OFFSET, empty0 = base + EMPTY_OFFSET;

    const int tid = threadIdx.x;
    const int warpgroup = tid >> 7;
    const int64_t m_tiles = (M + GEMM_BM - 1) / GEMM_BM, n_tiles = (N + GEMM_BN - 1) / GEMM_BN;
    const int64_t tiles = m_tiles * n_tiles;
    /* The product's ceil(K / 64) steps (zero-filled past K; the NT host passes K a multiple of
       64), then the low-rank term's ceil(K2 / 64) (zero-filled past K2). */
    const int ksteps = (int)((K + GEMM_BK - 1) / GEMM_BK);
    const int total_steps = ksteps + (int)((K2 + GEMM_BK - 1) / GEMM_BK);

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < GEMM_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, GEMM_CONSUMER_WARPS);
        }
        mbar_init_fence();
        prefetch_tensor_map(a_map);
        prefetch_tensor_map(b_map);
        prefetch_tensor_map(c_map);
        if (K2 > 0) {
            prefetch_tensor_map(a2_map);
            prefetch_tensor_map(b2_map);
        }
    }
    __syncthreads(); /* the last CTA-wide barrier: the producer's idle threads exit below */

    if (warpgroup == 0) {
        registers_decrease<PRODUCER_REGISTERS>();
        if (tid != 0) return;
        uint32_t step = 0; /* i of the file comment */
        for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            int32_t m0, n0;
            tile_origin(tile, m_tiles, n_tiles, &m0, &n0);
            /* NN: the tile's B boxes that hold a column < N; the others are not loaded. */
            const int32_t b_boxes =
                (int32_t)min((N - n0 + B_BOX_COLS - 1) / B_BOX_COLS, (int64_t)B_BOXES);
            const uint32_t stage_bytes =
                BStoredKN ? A_STAGE_BYTES + (uint32_t)b_boxes * B_BOX_BYTES : STAGE_TX_BYTES;
            for (int ks = 0; ks < total_steps; ++ks, ++step) {
                const uint32_t s = step % GEMM_STAGES, parity = (step / GEMM_STAGES) & 1;
                /* Steps past the product's K read the low-rank term's operands (same boxes). */
                const bool low_rank = ks >= ksteps;
                const CUtensorMap* am = low_rank ? a2_map : a_map;
                const CUtensorMap* bm = low_rank ? b2_map : b_map;
                const int32_t k0 = (low_rank ? ks - ksteps : ks) * GEMM_BK;
                const uint32_t b_stage = base + B_OFFSET + s * B_STAGE_BYTES;
                mbar_wait(empty0 + 8 * s, parity ^ 1);
                mbar_arrive_expect_tx(full0 + 8 * s, stage_bytes);
                tma_load_2d(base + A_OFFSET + s * A_STAGE_BYTES, am, full0 + 8 * s, k0, m0);
                if (BStoredKN) {
                    for (int32_t box = 0; box < b_boxes; ++box)
                        tma_load_2d(b_stage + (uint32_t)box * B_BOX_BYTES, bm, full0 + 8 * s,
                                    n0 + box * B_BOX_COLS, k0);
                } else {
                    tma_load_2d(b_stage, bm, full0 + 8 * s, k0, n0);
                }
            }
        }
        return;
    }

    registers_increase<CONSUMER_REGISTERS>();
    const int consumer = warpgroup - 1;
    const int warp = (tid >> 5) & 3, lane = tid & 31;
    const uint32_t a_rows = (uint32_t)consumer * 64 * 128; /* this consumer's 64 rows of A */
    float acc[128];
    uint32_t step = 0;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int32_t m0, n0;
        tile_origin(tile, m_tiles, n_tiles, &m0, &n0);
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
        fence_accumulators(acc);
        for (int ks = 0; ks < total_steps; ++ks, ++step) {
            const uint32_t s = step % GEMM_STAGES, parity = (step / GEMM_STAGES) & 1;
            mbar_wait(full0 + 8 * s, parity);
            wgmma_fence();
            const uint64_t desc_a = sw128_descriptor(base + A_OFFSET + s * A_STAGE_BYTES + a_rows);
            const uint32_t b_stage = base + B_OFFSET + s * B_STAGE_BYTES;
            const uint64_t desc_b = BStoredKN ? mn_sw128_descriptor(b_stage, B_BOX_BYTES)
                                              : sw128_descriptor(b_stage);
#pragma unroll
            for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
                /* A: + 32 bytes per k16 along its rows; B K-major the same, B N-major + 16 rows
                   of 128 bytes (two 8-row groups). */
                const uint64_t b_step = BStoredKN ? (2048 >> 4) : 2;
                wgmma_m64n256k16<BStoredKN ? 1 : 0>(acc, desc_a + 2 * kk, desc_b + b_step * kk);
            }
            wgmma_commit();
            fence_accumulators(acc);
            wgmma_wait<1>(); /* this tile's previous step is complete */
            fence_accumulators(acc);
            if (ks > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((step - 1) % GEMM_STAGES));
        }
        wgmma_wait<0>();
        fence_accumulators(acc);
        if (lane == 0) mbar_arrive(empty0 + 8 * ((step - 1) % GEMM_STAGES)); /* steps >= 1 */

        if (beta == 0.0f || beta == 1.0f) {
            const uint32_t boxes = base + EPI_OFFSET + consumer * 2 * EPI_BOX_BYTES;
            epilogue_tma(acc, alpha, beta == 1.0f, c_map, boxes, consumer, warp, lane, m0, n0, M,
                         N);
        } else {
            epilogue_direct(acc, alpha, beta, C, consumer, warp, lane, m0, n0, M, N);
        }
    }
    if ((tid & 127) == 0) bulk_wait_group_all(); /* the last stores' writes, before exit */
}

/* C = alpha A B^T (+ A2 B2^T) + beta C, B (N, K): the file comment. */
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)
    gemm_nt_bf16_sm90(const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap b_map,
                      const __grid_constant__ CUtensorMap a2_map,
                      const __grid_constant__ CUtensorMap b2_map,
                      const __grid_constant__ CUtensorMap c_map, uint16_t* __restrict__ C,
                      int64_t M, int64_t N, int64_t K, int64_t K2, float alpha, float beta) {
    gemm_bf16_sm90<false>(&a_map, &b_map, &a2_map, &b2_map, &c_map, C, M, N, K, K2, alpha, beta);
}

/* C = alpha A B + beta C, B (K, N): the file comment's "B stored (K, N)". The low-rank maps are
   never read (K2 = 0): A's and B's stand in. */
extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)
    gemm_nn_bf16_sm90(const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap b_map,
                      const __grid_constant__ CUtensorMap c_map, uint16_t* __restrict__ C,
                      int64_t M, int64_t N, int64_t K, float alpha, float beta) {
    gemm_bf16_sm90<true>(&a_map, &b_map, &a_map, &b_map, &c_map, C, M, N, K, 0, alpha, beta);
}
