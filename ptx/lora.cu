/*
 * lora.cu: the LoRA adapter's products at training sizes, where one side of every product is
 * the rank r (8-128) and T (the rows: tokens) is in the thousands. A 128 x 128 GEMM tile leaves
 * those either half empty (n = r = 64) or a handful of CTAs walking all T rows (the gradients);
 * these kernels take tiles of 64 by 128 along the long side, split the contraction (k for z and
 * dz, T for the gradients) over CTAs, read every operand in its stored layout (no transposed
 * copies), and apply the dropout mask while loading (no dropped copy of the input):
 *
 *   lora_down_bf16(x, mask, keep, a, z, part, T, r, k, chunk, alpha)
 *     z (T, r) = alpha * drop(x) (T, k) · A (r, k)ᵀ                 the forward's z = u Aᵀ
 *   lora_dz_bf16(dy, b, dz, part, T, r, k, chunk, alpha)
 *     dz (T, r) = alpha * dy (T, k) · B (k, r)                      the backward's dz = s dy B
 *     Both contract over k in splits of `chunk` (one per grid z). With one split they write
 *     bf16 into z / dz; with several (part != null) each writes its f32 partial sum into
 *     part[s] (T, r) and lora_rows_reduce_bf16 adds them up: T in the few thousands leaves a
 *     rank-wide output only T / 64 tiles, too few to fill the GPU over a long k.
 *   lora_rows_reduce_bf16(part, splits, len, out)
 *     out[i] = bf16(Σ_{s < splits} part[s * len + i]), s in order
 *   lora_grad_partial_tall(p, q, mask, keep, part, T, m, n, chunk, alpha)
 *   lora_grad_partial_wide(p, q, mask, keep, part, T, m, n, chunk, alpha)
 *     part[s] (m, n) = alpha * Σ_{t in chunk s} p[t, m] drop(q)[t, n], rows t of chunk s:
 *     [s * chunk, min(T, (s + 1) * chunk)), one split per grid z   dB = s dyᵀ z, dA = dzᵀ u
 *     (the same sums; _tall's tiles suit m >= n: dB (out, r); _wide's n > m: dA (r, k))
 *   lora_grad_reduce(part, splits, mn, g)
 *     g[i] += Σ_{s < splits} part[s * mn + i], s in order: the same sum on every run
 *
 *   lora_up_masked_add_bf16(dz, a, mask, keep, dx, T, r, n)
 *     dx (T, n) = bf16(dx + keep * bf16(dz (T, r) · A (r, n))) where mask[t, c] (mask given),
 *     dx (T, n) = bf16(dx + dz · A) everywhere (mask null): the backward's input-gradient term
 *     dx += drop'(dz A) in one pass over dx (read once, written once; no (T, n) scratch). The
 *     masked form rounds the product to bf16 before scaling it, as the two kernels it replaces
 *     did (matmul_nn_bf16 into a bf16 du, then masked_add_bf16); unmasked it is matmul_nn_bf16's
 *     beta = 1 epilogue.
 *
 * drop(v)[i] = mask[i] ? bf16(v[i] * keep) : 0 where mask is given (laid out as v; keep =
 * 1 / (1 - p): the adapter input `x * mask` of model::lora), v itself where mask is null.
 *
 * Tiles: every warp computes 32 x 32 of C as 2 x 4 mma.sync m16n8k16 bf16 fragments (f32
 * accumulation), K in steps of 64, 256 threads a CTA: tall tiles of 128 x 64 (4 x 2 warps) for
 * the outputs long in m (z and dz (T, r), dB (out, r)), wide tiles of 64 x 128 (2 x 4 warps) for
 * dA (r, k). The small operand (A, B, z or dz) is read once per 128 of the long operand's rows
 * or columns (x, dy). The K steps run through a ring of slots in dynamic shared memory (3 slots
 * where an operand may carry a mask, 4 otherwise; 90-108 KiB a CTA, two CTAs an SM at 128
 * registers): a slot holds both operand tiles in their global layout (the fast dimension
 * contiguous, rows padded by 8 elements: ldmatrix free of bank conflicts) and the masked
 * operand's mask bytes. Each thread copies its own 16-byte chunks (and their 8 mask bytes) by
 * cp.async two or three K steps ahead of the MMAs (48-64 KiB of x and mask, 32-48 KiB of dy, in
 * flight a CTA), and once they have landed applies the mask to them in place (drop_chunk: a
 * select mask per bf16 pair from two prmt, one cvt.rn.bf16x2 per pair); one barrier a K step
 * publishes the step and frees the slot the next copies fill. Fragments by ldmatrix, .trans
 * where the operand's fast dimension is not the MMA's K, so a transposed operand costs nothing.
 * Each fragment adds its K in steps of 16 in order (the MMAs WMMA's 16 x 16 x 16 fragments
 * compiled to before), so a split's sum depends neither on the K step nor on the tile shape,
 * only on where the splits fall. The C fragments go straight from registers to z / dz (bf16) or
 * the split's partial sums (f32). Any shape: cp.async where the fast dimension's stride is a
 * multiple of 8 and the 8 elements are in range, element loads (zero beyond the edges) stored
 * at once otherwise. ptx/tools/lora_ring.py replays the ring's group counts and the ldmatrix
 * lane addressing against the fragment layouts.
 * lora_up_masked_add_bf16: a CTA of 256 threads (8 warps as 2 x 4, each 32 x 32) owns a 64 x 128
 * tile of dx; r in steps of 64 staged whole in shared memory (dz 64 x 64, A 64 x 128), the
 * fragments' K only up to r rounded to 16; the tile's dx and mask chunks (4 of 16 + 8 bytes a
 * thread) are loaded before the products and combined with the f32 tile from shared memory.
 *
 * Launch, with (m, n) C's shape: lora_down_bf16 and lora_dz_bf16 block 256, grid (ceil(r / 64),
 * ceil(T / 128), splits); lora_grad_partial_tall block 256, grid (ceil(n / 64), ceil(m / 128),
 * splits); lora_grad_partial_wide block 256, grid (ceil(n / 128), ceil(m / 64), splits); their
 * dynamic shared memory is the ring (Mainloop::SHARED_BYTES: 107,520 bytes for lora_down_bf16,
 * 110,592 lora_dz_bf16, 92,160 lora_grad_partial_tall, 104,448 _wide). Each of the four also
 * has a shallow twin, name + "_2" (two slots: 71,680, 55,296, 61,440, 69,632 bytes), for GPUs
 * whose SM cannot hold two deep CTAs (sm_80, sm_86, sm_89; ring_stages). The reductions: block
 * 256, a grid-stride loop; lora_up_masked_add_bf16: block 256, grid (ceil(n / 128),
 * ceil(T / 64)).
 * Checked against: the CPU oracle in the "lora" family of sun selftest (every entry point, with
 * and without masks, r = 1, 5, 64 and 128, ragged T, widths not a multiple of 8), and end to end
 * by the model family's LoRA gradient rows.
 */

#include <mma.h>

#include "common.cuh"
#include "mma.cuh"

using namespace nvcuda;

#define BK 64
/* Row pitch padding of the shared tiles (elements): keeps rows 16-byte aligned (cp.async,
   ldmatrix; WMMA's 32 bytes in lora_up_masked_add_bf16) and breaks bank conflicts between
   consecutive rows. */
#define PAD 8
/* The main loops' tiles: 128 along the long dimension of C (T for z and dz, out for dB, k for
   dA) by 64, 256 threads, a ring of 90-108 KiB of dynamic shared memory and at most 128
   registers a thread: two CTAs an SM. */
#define LONG_THREADS 256
#define LONG_CTAS_PER_SM 2
/* lora_up_masked_add_bf16's CTA: threads, dx tile (rows x columns) and the r step. */
#define UP_THREADS 256
#define UP_BM 64
#define UP_BN 128
#define UP_BK 64
#define UP_CHUNKS (UP_BM * UP_BN / 8 / UP_THREADS) /* 4: dx chunks of 8 a thread */

static_assert(UP_CHUNKS * UP_THREADS * 8 == UP_BM * UP_BN, "whole dx chunks per thread");

/* A main loop's shape: the C tile (TM x TN) and the CTA's threads (warps as (TM / 32) x
   (TN / 32), each 32 x 32 of C). */
template <int TM_, int TN_, int THREADS_>
struct TileShape {
    static constexpr int TM = TM_, TN = TN_, THREADS = THREADS_;
    static constexpr int WARPS_N = TN / 32;
    static_assert((TM / 32) * (TN / 32) * 32 == THREADS, "one warp per 32 x 32 of C");
};
/* z and dz (T, r): 128 rows of T by 64 of r; dB (out, r): 128 of out by 64 of r. */
using TallTiles = TileShape<128, 64, LONG_THREADS>;
/* dA (r, k): 64 of r by 128 of k. */
using WideTiles = TileShape<64, 128, LONG_THREADS>;

/* One operand tile in shared memory, in the operand's global layout: `rows` x `cols` with the
   columns (the global fast dimension) contiguous at a pitch of cols + PAD. */
template <int ROWS, int COLS>
struct Tile {
    __align__(32) uint16_t v[ROWS][COLS + PAD];
};

/* An operand in global memory: element (row, col) at ptr[row * ld + col], rows and cols in
   range below `rows` and `cols`; mask (nullable) laid out the same. */
struct Operand {
    const uint16_t* ptr;
    const uint8_t* mask;
    float keep;
    int64_t ld, rows, cols;
};

/* Bit 7 of byte b is set where byte b of m is nonzero: (m & 0x7F) + 0x7F reaches bit 7 for any
   nonzero low 7 bits and never carries past it (at most 0xFE); m's own bit 7 covers the rest. */
__device__ __forceinline__ uint32_t nonzero_byte_signs(uint32_t m) {
    return ((m & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | m;
}

/* prmt.b32 in its default mode: selector nibble b picks source byte (nibble & 7) for result
   byte b, replicating that byte's bit 7 over the result byte where the nibble's bit 3 is set. */
__device__ __forceinline__ uint32_t byte_perm_signs(uint32_t a, uint32_t selector) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0u), "r"(selector));
    return d;
}

/* drop() of a pair of bf16 (element 0 in the low half): bf16(v * keep) rounded to nearest even
   in one cvt for both, then zeroed where `select` (0xFFFF per kept half, from the mask) is 0.
   Bit for bit f32_to_bf16_bits(bf16_bits_to_f32(v) * keep) where kept, 0 where dropped. */
__device__ __forceinline__ uint32_t drop_pair(uint32_t pair, uint32_t select, float keep) {
    const float lo = __uint_as_float(pair << 16) * keep;
    const float hi = __uint_as_float(pair & 0xFFFF0000u) * keep;
    uint32_t packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed & select;
}

/* drop() of 8 bf16 (v, element i in bits 16 (i % 2) of word i / 2) under their 8 mask bytes (m,
   element i in byte i % 4 of word i / 4). */
__device__ __forceinline__ uint4 drop_chunk(uint4 v, uint2 m, float keep) {
    const uint32_t lo = nonzero_byte_signs(m.x), hi = nonzero_byte_signs(m.y);
    /* 0x9988: result bytes 0-1 from mask byte 0's sign, 2-3 from byte 1's; 0xBBAA: bytes 2, 3. */
    v.x = drop_pair(v.x, byte_perm_signs(lo, 0x9988u), keep);
    v.y = drop_pair(v.y, byte_perm_signs(lo, 0xBBAAu), keep);
    v.z = drop_pair(v.z, byte_perm_signs(hi, 0x9988u), keep);
    v.w = drop_pair(v.w, byte_perm_signs(hi, 0xBBAAu), keep);
    return v;
}

/* The 8 elements at (row, col..col + 8) of `op` as stored (zero outside), and where `with_mask`
   their mask bytes (zero outside): the loads only, so the registers can be in flight while the
   MMAs run; drop_chunk applies the mask when the chunk is stored to shared memory. */
__device__ __forceinline__ void load_raw(const Operand& op, int64_t row, int64_t col,
                                         bool with_mask, uint4* v, uint2* m) {
    *v = make_uint4(0, 0, 0, 0);
    *m = make_uint2(0, 0);
    if (row >= op.rows) return;
    const int64_t at = row * op.ld + col;
    if ((op.ld & 7) == 0 && col + 8 <= op.cols) {
        /* ld % 8 == 0 and col % 8 == 0: a 16-byte (8-byte for the mask) aligned chunk (buffers
           are 256-byte aligned). */
        *v = *reinterpret_cast<const uint4*>(op.ptr + at);
        if (with_mask) *m = *reinterpret_cast<const uint2*>(op.mask + at);
        return;
    }
    uint32_t w[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (col + i < op.cols) {
            w[i / 2] |= (uint32_t)op.ptr[at + i] << (16 * (i % 2));
            if (with_mask) b[i / 4] |= (uint32_t)op.mask[at + i] << (8 * (i % 4));
        }
    }
    *v = make_uint4(w[0], w[1], w[2], w[3]);
    *m = make_uint2(b[0], b[1]);
}

/* The chunks of one ROWS x COLS tile whose top-left element is (row0, col0) of `op`, loaded by
   a CTA of THREADS: thread `tid` owns chunks tid + c * THREADS, chunk i at row i / (COLS / 8),
   column 8 (i % (COLS / 8)). MASKABLE: the operand may carry a dropout mask (op.mask not null),
   whose bytes are held beside the values and applied by `store`. */
template <int ROWS, int COLS, int THREADS, bool MASKABLE>
struct Staged {
    static constexpr int CHUNKS = ROWS * COLS / 8 / THREADS;
    static_assert(CHUNKS * THREADS * 8 == ROWS * COLS, "whole chunks per thread");
    uint4 chunk[CHUNKS];
    uint2 mask[MASKABLE ? CHUNKS : 1];

    __device__ __forceinline__ void load(const Operand& op, int64_t row0, int64_t col0) {
        const bool with_mask = MASKABLE && op.mask != nullptr;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const int r = i / (COLS / 8), q = 8 * (i % (COLS / 8));
            uint2 m;
            load_raw(op, row0 + r, col0 + q, with_mask, &chunk[c], &m);
            if (MASKABLE) mask[c] = m;
        }
    }

    __device__ __forceinline__ void store(Tile<ROWS, COLS>& tile, const Operand& op) const {
        const bool with_mask = MASKABLE && op.mask != nullptr;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const int r = i / (COLS / 8), q = 8 * (i % (COLS / 8));
            const uint4 v = with_mask ? drop_chunk(chunk[c], mask[MASKABLE ? c : 0], op.keep)
                                      : chunk[c];
            *reinterpret_cast<uint4*>(&tile.v[r][q]) = v;
        }
    }
};

/* cp.async of 8 bytes (a chunk's mask bytes) global -> shared, through L1 (.cg takes only 16). */
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
}

/* The ring's depth. Deep: three slots where a mask rides along (35 KiB a slot), four otherwise
   (27 KiB), two CTAs an SM on sm_90's 228 KiB (under 113 KiB a CTA). Shallow (the _2 entry
   points): two slots, under the 99 KiB a CTA of sm_86/sm_89 and two CTAs an SM on an A100's
   164 KiB; the host picks (backend/cuda/lora.rs). */
enum class Ring { Deep, Shallow };
template <Ring R, bool MASKED>
constexpr int ring_stages() {
    return R == Ring::Shallow ? 2 : (MASKED ? 3 : 4);
}

/* The operand ring of the main loops, in dynamic shared memory (the host raises the limit to
   the kernel's SHARED_BYTES). */
extern __shared__ __align__(16) uint8_t lora_ring[];

/* C = A (M x K) · B (K x N) for the CTA's TM x TN tile of C at (m0, n0), K rows k0..k1, shaped
   by S (a TileShape). A_KM: A is stored with K contiguous (element (m, k) of A at a.ptr[m * lda +
   k]: a "row" operand, rows m); otherwise M contiguous (at a.ptr[k * lda + m]: rows k). B_KN: B
   stored with N contiguous (element (k, n) at b.ptr[k * ldb + n]: rows k); otherwise K contiguous
   (at b.ptr[n * ldb + k]: rows n). The Operand's rows/cols are in its stored orientation. A_MASK
   / B_MASK: that operand may carry a dropout mask.
   The K steps of BK run through a ring of STAGES slots of shared memory: slot s holds step s's
   A tile, B tile (both in their stored layout, rows at a pitch of cols + PAD) and, for a masked
   operand, its mask bytes (rows at a pitch of cols). Each thread copies its own chunks (cp.async,
   16 bytes, 8 for their mask bytes) STAGES - 1 steps ahead of the MMAs, applies the mask to its
   own chunks in place once they have landed (drop_chunk: the same rounding as before), and one
   barrier a step then makes the step visible to every warp and frees the slot the next copies
   go to. Fragments by ldmatrix (.trans where the operand's fast dimension is not the MMA's K),
   m16n8k16 MMAs: each warp 32 x 32 of C as 2 x 4 fragments of 16 x 8. */
template <class S, bool A_KM, bool B_KN, bool A_MASK, bool B_MASK, int STAGES_>
struct Mainloop {
    static constexpr int TM = S::TM, TN = S::TN, THREADS = S::THREADS;
    /* The ring's slots (ring_stages): any count from 2 works, the copies running STAGES - 1
       steps ahead. */
    static constexpr int STAGES = STAGES_;
    static_assert(STAGES >= 2, "a ring of two slots at least");
    /* Stored orientation of each operand's tile and its row pitch (elements). */
    static constexpr int A_ROWS = A_KM ? TM : BK, A_COLS = A_KM ? BK : TM;
    static constexpr int B_ROWS = B_KN ? BK : TN, B_COLS = B_KN ? TN : BK;
    static constexpr int A_PITCH = A_COLS + PAD, B_PITCH = B_COLS + PAD;
    /* A slot: A tile, B tile, then the masked operand's mask bytes (none without one). */
    static constexpr int A_BYTES = A_ROWS * A_PITCH * 2, B_BYTES = B_ROWS * B_PITCH * 2;
    static constexpr int MASK_BYTES = A_MASK ? A_ROWS * A_COLS : (B_MASK ? B_ROWS * B_COLS : 0);
    static constexpr int SLOT_BYTES = A_BYTES + B_BYTES + MASK_BYTES;
    static constexpr int SHARED_BYTES = STAGES * SLOT_BYTES;
    static_assert(!(A_MASK && B_MASK), "one masked operand");
    static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && MASK_BYTES % 16 == 0,
                  "16-byte aligned tiles in a slot");

    /* This warp's 32 x 32 of C: rows wm.., columns wn.. of the tile. */
    __device__ static int warp_m() { return 32 * ((threadIdx.x >> 5) / S::WARPS_N); }
    __device__ static int warp_n() { return 32 * ((threadIdx.x >> 5) % S::WARPS_N); }

    __device__ static uint16_t* a_tile(int slot) {
        return reinterpret_cast<uint16_t*>(lora_ring + slot * SLOT_BYTES);
    }
    __device__ static uint16_t* b_tile(int slot) {
        return reinterpret_cast<uint16_t*>(lora_ring + slot * SLOT_BYTES + A_BYTES);
    }
    __device__ static uint8_t* mask_tile(int slot) {
        return lora_ring + slot * SLOT_BYTES + A_BYTES + B_BYTES;
    }

    /* Starts the copies of this thread's chunks of one ROWS x COLS tile whose top-left element
       is (row0, col0) of `op` (and, with_mask, of their mask bytes): chunk i = tid + c * THREADS
       at tile row i / (COLS / 8), column 8 (i % (COLS / 8)). Whole in-range chunks of an
       operand whose row stride is a multiple of 8 go by cp.async; the others (edges, odd
       strides) are loaded element by element, zero outside, and stored at once. */
    template <int ROWS, int COLS>
    __device__ static void copy_tile(uint16_t* tile, uint8_t* mask_bytes, const Operand& op,
                                     bool with_mask, int64_t row0, int64_t col0) {
        constexpr int CHUNKS = ROWS * COLS / 8 / THREADS;
        static_assert(CHUNKS * THREADS * 8 == ROWS * COLS, "whole chunks per thread");
        const bool aligned = (op.ld & 7) == 0;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const int r = i / (COLS / 8), q = 8 * (i % (COLS / 8));
            const int64_t row = row0 + r, col = col0 + q;
            uint16_t* dst = tile + r * (COLS + PAD) + q;
            uint8_t* mdst = mask_bytes + r * COLS + q;
            if (aligned && row < op.rows && col + 8 <= op.cols) {
                /* 16-byte (8-byte for the mask) aligned: ld % 8 == 0, col % 8 == 0, buffers
                   256-byte aligned. */
                const int64_t at = row * op.ld + col;
                cp_async16(dst, op.ptr + at, 16);
                if (with_mask) cp_async8(mdst, op.mask + at);
            } else {
                uint4 v;
                uint2 m;
                load_raw(op, row, col, with_mask, &v, &m);
                *reinterpret_cast<uint4*>(dst) = v;
                if (with_mask) *reinterpret_cast<uint2*>(mdst) = m;
            }
        }
    }

    /* drop() applied in place to this thread's chunks of a ROWS x COLS tile (the chunks it
       copied: their copies are the ones its cp.async wait covers). */
    template <int ROWS, int COLS>
    __device__ static void drop_tile(uint16_t* tile, const uint8_t* mask_bytes, float keep) {
        constexpr int CHUNKS = ROWS * COLS / 8 / THREADS;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const int i = threadIdx.x + c * THREADS;
            const int r = i / (COLS / 8), q = 8 * (i % (COLS / 8));
            uint4* v = reinterpret_cast<uint4*>(tile + r * (COLS + PAD) + q);
            const uint2 m = *reinterpret_cast<const uint2*>(mask_bytes + r * COLS + q);
            *v = drop_chunk(*v, m, keep);
        }
    }

    /* Starts the copies of K step `step` (K offset k0 + step * BK) into slot step % STAGES. */
    __device__ static void copy_step(const Operand& a, const Operand& b, int64_t m0, int64_t n0,
                                     int64_t k, int slot) {
        const bool a_mask = A_MASK && a.mask != nullptr, b_mask = B_MASK && b.mask != nullptr;
        if (A_KM) {
            copy_tile<A_ROWS, A_COLS>(a_tile(slot), mask_tile(slot), a, a_mask, m0, k);
        } else {
            copy_tile<A_ROWS, A_COLS>(a_tile(slot), mask_tile(slot), a, a_mask, k, m0);
        }
        if (B_KN) {
            copy_tile<B_ROWS, B_COLS>(b_tile(slot), mask_tile(slot), b, b_mask, k, n0);
        } else {
            copy_tile<B_ROWS, B_COLS>(b_tile(slot), mask_tile(slot), b, b_mask, n0, k);
        }
    }

    /* The A fragment (16 x 16) at tile rows i.. (M) and K offset kk of a slot's A tile. Stored
       [m][k]: lane l addresses row i + l % 16, column kk + 8 (l / 16). Stored [k][m]: the
       transposed load, lane l addressing k row kk + l % 8 + 8 (l / 16), column i + 8 ((l / 8) %
       2), so the four 8 x 8 matrices are A's (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8,
       2t + 8..) either way. */
    __device__ static void a_fragment(uint32_t f[4], const uint16_t* t, int i, int kk) {
        const int lane = threadIdx.x & 31;
        if (A_KM) {
            ldmatrix_x4(f, t + (i + (lane & 15)) * A_PITCH + kk + (lane >> 4) * 8);
        } else {
            ldmatrix_x4_trans(f, t + (kk + (lane & 7) + (lane >> 4) * 8) * A_PITCH + i +
                                     ((lane >> 3) & 1) * 8);
        }
    }

    /* The B fragments (16 x 8) of columns j.. and j + 8.. (N) at K offset kk of a slot's B
       tile: f[0..1] the first, f[2..3] the second. Stored [n][k]: lane l addresses n row j + l %
       8 + 8 (l / 16), column kk + 8 ((l / 8) % 2). Stored [k][n]: the transposed load, k row kk
       + l % 8 + 8 ((l / 8) % 2), column j + 8 (l / 16). */
    __device__ static void b_fragments(uint32_t f[4], const uint16_t* t, int kk, int j) {
        const int lane = threadIdx.x & 31;
        if (B_KN) {
            ldmatrix_x4_trans(f, t + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * B_PITCH + j +
                                     (lane >> 4) * 8);
        } else {
            ldmatrix_x4(f, t + (j + (lane & 7) + (lane >> 4) * 8) * B_PITCH + kk +
                               ((lane >> 3) & 1) * 8);
        }
    }

    /* Runs K rows [k0, k1) into acc (the warp's 2 x 4 fragments of 16 x 8: acc[i][j] at rows wm
       + 16 i.., columns wn + 8 j..). Each fragment adds K in steps of 16 in order. */
    __device__ static void run(const Operand& a, const Operand& b, int64_t m0, int64_t n0,
                               int64_t k0, int64_t k1, float acc[2][4][4]) {
        const int wm = warp_m(), wn = warp_n();
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
        if (k0 >= k1) return;
        const int64_t steps = (k1 - k0 + BK - 1) / BK;
        /* The first STAGES - 1 steps in flight; one commit group a step (empty past the end),
           so "step s has landed" is always "at most STAGES - 2 groups pending". */
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) copy_step(a, b, m0, n0, k0 + s * BK, s);
            cp_async_commit();
        }
        for (int64_t step = 0; step < steps; ++step) {
            const int slot = (int)(step % STAGES);
            cp_async_wait_group<STAGES - 2>();
            /* This thread's chunks of the step have landed: drop them in place. */
            if (A_MASK && a.mask != nullptr) drop_tile<A_ROWS, A_COLS>(a_tile(slot), mask_tile(slot), a.keep);
            if (B_MASK && b.mask != nullptr) drop_tile<B_ROWS, B_COLS>(b_tile(slot), mask_tile(slot), b.keep);
            /* Every thread's chunks of this step are in (and dropped), and every warp is done
               with the previous step's slot, which the next copies reuse. */
            __syncthreads();
            const int64_t ahead = step + STAGES - 1;
            if (ahead < steps) copy_step(a, b, m0, n0, k0 + ahead * BK, (int)(ahead % STAGES));
            cp_async_commit();
            const int64_t k = k0 + step * BK;
            const uint16_t* ta = a_tile(slot);
            const uint16_t* tb = b_tile(slot);
#pragma unroll
            for (int kk = 0; kk < BK; kk += 16) {
                /* Past the split's end the operands are zeros: skip those fragments. */
                if (k + kk >= k1) break;
                uint32_t fa[2][4], fb[2][4];
#pragma unroll
                for (int i = 0; i < 2; ++i) a_fragment(fa[i], ta, wm + 16 * i, kk);
#pragma unroll
                for (int j = 0; j < 2; ++j) b_fragments(fb[j], tb, kk, wn + 16 * j);
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma_bf16(acc[i][j], fa[i], &fb[j / 2][2 * (j % 2)]);
            }
        }
        /* A ragged last step reads zeros past K: the operands' bounds (k1 for a K-split's
           rows) zero-fill them, so nothing of the next split is added; its fragments wholly
           past k1 are skipped, so the MMAs are those of any K step that is a multiple of 16.
           Only empty commit groups can still be pending here. */
    }
};

/* The warp's accumulators (L's fragment layout) scaled by alpha, into C (m, n) at the tile
   (m0, n0): bf16 into out (part null), or f32 into split blockIdx.z's slice of part (m x n
   floats a split). Lane l holds rows g, g + 8 (g = l / 4) and columns 2t, 2t + 1 (t = l % 4)
   of each 16 x 8 fragment: a pair stored in one access where n is even. */
template <class L>
__device__ __forceinline__ void store_fragments(const float acc[2][4][4], int64_t m0, int64_t n0,
                                                int64_t m, int64_t n, float alpha, uint16_t* out,
                                                float* part) {
    float* slice = part == nullptr ? nullptr : part + (int64_t)blockIdx.z * m * n;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const bool pairs = (n & 1) == 0;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int64_t row = m0 + L::warp_m() + 16 * i + g + 8 * h;
                const int64_t col = n0 + L::warp_n() + 8 * j + 2 * t;
                if (row >= m || col >= n) continue;
                const float v0 = alpha * acc[i][j][2 * h], v1 = alpha * acc[i][j][2 * h + 1];
                const int64_t at = row * n + col;
                if (slice != nullptr) {
                    if (pairs) {
                        *reinterpret_cast<float2*>(slice + at) = make_float2(v0, v1);
                    } else {
                        slice[at] = v0;
                        if (col + 1 < n) slice[at + 1] = v1;
                    }
                } else if (pairs) {
                    *reinterpret_cast<uint32_t*>(out + at) =
                        (uint32_t)f32_to_bf16_bits(v0) | ((uint32_t)f32_to_bf16_bits(v1) << 16);
                } else {
                    out[at] = f32_to_bf16_bits(v0);
                    if (col + 1 < n) out[at + 1] = f32_to_bf16_bits(v1);
                }
            }
}

/* z (T, r) = alpha * drop(x) (T, k) · A (r, k)ᵀ over k in [s * chunk, (s + 1) * chunk): A
   operand x (rows T, K contiguous, masked), B operand A_lora stored (r, k): element (k, n) at
   a[n * k + k'], K contiguous. The split's end bounds both operands' columns, so nothing past it
   is read as more than zero. Tall tiles: 128 rows of T by 64 of r. */
template <Ring R>
using DownLoop = Mainloop<TallTiles, true, false, true, false, ring_stages<R, true>()>;
static_assert(DownLoop<Ring::Deep>::SHARED_BYTES == 107520 &&
                  DownLoop<Ring::Shallow>::SHARED_BYTES == 71680,
              "lora_down_bf16's rings (backend/cuda/lora.rs)");
template <Ring R>
__device__ __forceinline__ void lora_down(const uint16_t* x, const uint8_t* mask, float keep,
                                          const uint16_t* a, uint16_t* z, float* part, int64_t T,
                                          int64_t r, int64_t k, int64_t chunk, float alpha) {
    using Loop = DownLoop<R>;
    const int64_t n0 = (int64_t)blockIdx.x * Loop::TN, m0 = (int64_t)blockIdx.y * Loop::TM;
    const int64_t k0 = (int64_t)blockIdx.z * chunk, k1 = min(k, k0 + chunk);
    const Operand xa{x, mask, keep, k, T, k1};
    const Operand ab{a, nullptr, 1.0f, k, r, k1};
    float acc[2][4][4];
    Loop::run(xa, ab, m0, n0, k0, k1, acc);
    store_fragments<Loop>(acc, m0, n0, T, r, alpha, z, part);
}
extern "C" __global__ void __launch_bounds__(LONG_THREADS, LONG_CTAS_PER_SM)
lora_down_bf16(const uint16_t* __restrict__ x, const uint8_t* __restrict__ mask, float keep,
               const uint16_t* __restrict__ a, uint16_t* __restrict__ z, float* __restrict__ part,
               int64_t T, int64_t r, int64_t k, int64_t chunk, float alpha) {
    lora_down<Ring::Deep>(x, mask, keep, a, z, part, T, r, k, chunk, alpha);
}
extern "C" __global__ void __launch_bounds__(LONG_THREADS, LONG_CTAS_PER_SM)
lora_down_bf16_2(const uint16_t* __restrict__ x, const uint8_t* __restrict__ mask, float keep,
                 const uint16_t* __restrict__ a, uint16_t* __restrict__ z,
                 float* __restrict__ part, int64_t T, int64_t r, int64_t k, int64_t chunk,
                 float alpha) {
    lora_down<Ring::Shallow>(x, mask, keep, a, z, part, T, r, k, chunk, alpha);
}

/* dz (T, r) = alpha * dy (T, k) · B (k, r) over k in [s * chunk, (s + 1) * chunk): both
   operands with their fast dimension as stored (dy K contiguous: a row-major A operand; B (out,
   r) = (k, n) N contiguous: a row-major B operand, its tile 64 rows of k by 64 of r). Tall tiles,
   as z: 128 rows of T by 64 of r. */
template <Ring R>
using DzLoop = Mainloop<TallTiles, true, true, false, false, ring_stages<R, false>()>;
static_assert(DzLoop<Ring::Deep>::SHARED_BYTES == 110592 &&
                  DzLoop<Ring::Shallow>::SHARED_BYTES == 55296,
              "lora_dz_bf16's rings (backend/cuda/lora.rs)");
template <Ring R>
__device__ __forceinline__ void lora_dz(const uint16_t* dy, const uint16_t* b, uint16_t* dz,
                                        float* part, int64_t T, int64_t r, int64_t k,
                                        int64_t chunk, float alpha) {
    using Loop = DzLoop<R>;
    const int64_t n0 = (int64_t)blockIdx.x * Loop::TN, m0 = (int64_t)blockIdx.y * Loop::TM;
    const int64_t k0 = (int64_t)blockIdx.z * chunk, k1 = min(k, k0 + chunk);
    const Operand ya{dy, nullptr, 1.0f, k, T, k1};
    const Operand bb{b, nullptr, 1.0f, r, k1, r};
    float acc[2][4][4];
    Loop::run(ya, bb, m0, n0, k0, k1, acc);
    store_fragments<Loop>(acc, m0, n0, T, r, alpha, dz, part);
}
extern "C" __global__ void __launch_bounds__(LONG_THREADS, LONG_CTAS_PER_SM)
lora_dz_bf16(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ b,
             uint16_t* __restrict__ dz, float* __restrict__ part, int64_t T, int64_t r,
             int64_t k, int64_t chunk, float alpha) {
    lora_dz<Ring::Deep>(dy, b, dz, part, T, r, k, chunk, alpha);
}
extern "C" __global__ void __launch_bounds__(LONG_THREADS, LONG_CTAS_PER_SM)
lora_dz_bf16_2(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ b,
               uint16_t* __restrict__ dz, float* __restrict__ part, int64_t T, int64_t r,
               int64_t k, int64_t chunk, float alpha) {
    lora_dz<Ring::Shallow>(dy, b, dz, part, T, r, k, chunk, alpha);
}

/* part[s] (m, n) = alpha * p[chunk s]ᵀ drop(q)[chunk s]: A = pᵀ, p stored (T, m) (M
   contiguous, rows k = t); B = q stored (T, n) (N contiguous, rows k = t, maskable). */
template <class S, Ring R>
using GradLoop = Mainloop<S, false, true, false, true, ring_stages<R, true>()>;
static_assert(GradLoop<TallTiles, Ring::Deep>::SHARED_BYTES == 92160 &&
                  GradLoop<WideTiles, Ring::Deep>::SHARED_BYTES == 104448 &&
                  GradLoop<TallTiles, Ring::Shallow>::SHARED_BYTES == 61440 &&
                  GradLoop<WideTiles, Ring::Shallow>::SHARED_BYTES == 69632,
              "lora_grad_partial_*'s rings (backend/cuda/lora.rs)");
template <class S, Ring R>
__device__ __forceinline__ void grad_partial(const uint16_t* p, const uint16_t* q,
                                             const uint8_t* mask, float keep, float* part,
                                             int64_t T, int64_t m, int64_t n, int64_t chunk,
                                             float alpha) {
    using Loop = GradLoop<S, R>;
    const int64_t n0 = (int64_t)blockIdx.x * Loop::TN, m0 = (int64_t)blockIdx.y * Loop::TM;
    const int64_t k0 = (int64_t)blockIdx.z * chunk, k1 = min(T, k0 + chunk);
    /* Rows past this split's end read as zero: the operands' row count is k1, not T. */
    const Operand pa{p, nullptr, 1.0f, m, k1, m};
    const Operand qb{q, mask, keep, n, k1, n};
    float acc[2][4][4];
    Loop::run(pa, qb, m0, n0, k0, k1, acc);
    store_fragments<Loop>(acc, m0, n0, m, n, alpha, nullptr, part);
}

/* The gradient entry points, each with its ring deep and shallow (_2). */
#define LORA_GRAD_ENTRY(name, tiles, ring)                                                     \
    extern "C" __global__ void __launch_bounds__(LONG_THREADS, LONG_CTAS_PER_SM)              \
        name(const uint16_t* __restrict__ p, const uint16_t* __restrict__ q,                  \
             const uint8_t* __restrict__ mask, float keep, float* __restrict__ part,          \
             int64_t T, int64_t m, int64_t n, int64_t chunk, float alpha) {                   \
        grad_partial<tiles, ring>(p, q, mask, keep, part, T, m, n, chunk, alpha);             \
    }
/* The gradient of a tall or square (m, n), m >= n (dB: (out, r)), tall tiles: 128 of m by 64
   of n. A = pᵀ's tile is 64 rows of T by 128 of m (transposed fragment loads, as dA loads x),
   B's 64 by 64 of q. */
LORA_GRAD_ENTRY(lora_grad_partial_tall, TallTiles, Ring::Deep)
LORA_GRAD_ENTRY(lora_grad_partial_tall_2, TallTiles, Ring::Shallow)
/* The gradient of a wide (m, n), n > m (dA: (r, k)), wide tiles: 64 of m by 128 of n. */
LORA_GRAD_ENTRY(lora_grad_partial_wide, WideTiles, Ring::Deep)
LORA_GRAD_ENTRY(lora_grad_partial_wide_2, WideTiles, Ring::Shallow)

/* The 8 dx elements at (row, col..col + 8) of a (T, n) gradient, two to a word (element i in
   bits 16 (i % 2) of word i / 2), and their mask bytes (element i in bits 8 (i % 4) of mask word
   i / 4; all 1 where there is no mask). Nothing is read outside the gradient: those elements
   stay 0. Built with shifts on whole words, so the chunk lives in registers. */
struct DxChunk {
    uint32_t v[4];
    uint32_t m[2];
};

__device__ __forceinline__ bool dx_chunk_whole(int64_t n, int64_t col) {
    /* n % 8 == 0 and col % 8 == 0: 16-byte (8-byte for the mask) aligned chunks. */
    return (n & 7) == 0 && col + 8 <= n;
}

/* The chunk at element `at` of dx (and the mask), 16-byte aligned and wholly inside. */
__device__ __forceinline__ DxChunk load_dx_whole(const uint16_t* dx, const uint8_t* mask,
                                                 int64_t at) {
    DxChunk c{{0u, 0u, 0u, 0u}, {0x01010101u, 0x01010101u}};
    const uint4 v = *reinterpret_cast<const uint4*>(dx + at);
    c.v[0] = v.x;
    c.v[1] = v.y;
    c.v[2] = v.z;
    c.v[3] = v.w;
    if (mask != nullptr) {
        const uint2 m = *reinterpret_cast<const uint2*>(mask + at);
        c.m[0] = m.x;
        c.m[1] = m.y;
    }
    return c;
}

/* The chunk at (row, col) anywhere: whole where it can be, else element by element. */
__device__ __forceinline__ DxChunk load_dx_chunk(const uint16_t* dx, const uint8_t* mask,
                                                 int64_t T, int64_t n, int64_t row, int64_t col) {
    if (row < T && dx_chunk_whole(n, col)) return load_dx_whole(dx, mask, row * n + col);
    DxChunk c{{0u, 0u, 0u, 0u}, {0x01010101u, 0x01010101u}};
    if (row >= T) return c;
    const int64_t at = row * n + col;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (col + i < n) {
            c.v[i / 2] |= (uint32_t)dx[at + i] << (16 * (i % 2));
            if (mask != nullptr) {
                const int shift = 8 * (i % 4);
                c.m[i / 4] = (c.m[i / 4] & ~(0xFFu << shift)) | ((uint32_t)mask[at + i] << shift);
            }
        }
    }
    return c;
}

__device__ __forceinline__ void store_dx_chunk(uint16_t* dx, int64_t T, int64_t n, int64_t row,
                                               int64_t col, const uint32_t v[4]) {
    if (row >= T) return;
    const int64_t at = row * n + col;
    if (dx_chunk_whole(n, col)) {
        *reinterpret_cast<uint4*>(dx + at) = make_uint4(v[0], v[1], v[2], v[3]);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (col + i < n) dx[at + i] = (uint16_t)(v[i / 2] >> (16 * (i % 2)));
}

/* lora_up_masked_add_bf16's shared memory: one r step's operands (dz 64 x 64 and A 64 x 128, in
   their global layouts), then the f32 product tile in the same bytes (33 KiB). */
union UpShared {
    struct {
        Tile<UP_BM, UP_BK> dz;
        Tile<UP_BK, UP_BN> a;
    } ops;
    struct {
        __align__(32) float v[UP_BM][UP_BN + 4];
    } ct;
};

/* dx (T, n) (+)= drop'(dz (T, r) · A (r, n)) for the CTA's 64 x 128 tile at (m0, n0): dz is a
   row-major A operand (K = r contiguous), A_lora a row-major B operand (N contiguous). The tile's
   dx and mask chunks are loaded first and stay in registers while the products run; the r steps
   load dz and A through registers into shared memory (zero past r, T and n). */
extern "C" __global__ void __launch_bounds__(UP_THREADS, 2)
lora_up_masked_add_bf16(const uint16_t* __restrict__ dz, const uint16_t* __restrict__ a,
                        const uint8_t* __restrict__ mask, float keep, uint16_t* __restrict__ dx,
                        int64_t T, int64_t r, int64_t n) {
    using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
    using BFrag = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
    using CFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
    __shared__ UpShared sm;
    const int64_t n0 = (int64_t)blockIdx.x * UP_BN, m0 = (int64_t)blockIdx.y * UP_BM;
    const int warp = threadIdx.x >> 5;
    const int wm = 32 * (warp >> 2), wn = 32 * (warp & 3);

    /* Chunk c of this thread: i = tid + c * UP_THREADS at tile row i / (UP_BN / 8) = row0 + c *
       ROW_STEP, column 8 (i % (UP_BN / 8)) = col0; a warp reads two whole 256-byte rows. A tile
       wholly inside dx (n % 8 == 0) loads its chunks now and keeps them in registers while the
       products run; an edge tile loads them, bounded, after. */
    constexpr int ROW_STEP = UP_THREADS / (UP_BN / 8);
    const int row0 = threadIdx.x / (UP_BN / 8), col0 = 8 * (threadIdx.x % (UP_BN / 8));
    const bool interior = (n & 7) == 0 && m0 + UP_BM <= T && n0 + UP_BN <= n;
    const int64_t at0 = (m0 + row0) * n + n0 + col0;
    DxChunk old[UP_CHUNKS];
    if (interior) {
#pragma unroll
        for (int c = 0; c < UP_CHUNKS; ++c) old[c] = load_dx_whole(dx, mask, at0 + c * ROW_STEP * n);
    }

    const Operand dzo{dz, nullptr, 1.0f, r, T, r};
    const Operand ao{a, nullptr, 1.0f, n, r, n};
    CFrag acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < r; k0 += UP_BK) {
        Staged<UP_BM, UP_BK, UP_THREADS, false> sdz;
        Staged<UP_BK, UP_BN, UP_THREADS, false> sa;
        sdz.load(dzo, m0, k0);
        sa.load(ao, k0, n0);
        /* The previous step's fragment loads are done before its tiles are overwritten. */
        if (k0 > 0) __syncthreads();
        sdz.store(sm.ops.dz, dzo);
        sa.store(sm.ops.a, ao);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < UP_BK; kk += 16) {
            /* Past r the tiles are zeros: skip those fragments. */
            if (k0 + kk >= r) break;
            AFrag fa[2];
            BFrag fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const uint16_t* p = &sm.ops.dz.v[wm + 16 * i][kk];
                wmma::load_matrix_sync(fa[i], reinterpret_cast<const __nv_bfloat16*>(p),
                                       UP_BK + PAD);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint16_t* p = &sm.ops.a.v[kk][wn + 16 * j];
                wmma::load_matrix_sync(fb[j], reinterpret_cast<const __nv_bfloat16*>(p),
                                       UP_BN + PAD);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    /* Every warp's last fragment loads are done before the product tile overwrites them. */
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&sm.ct.v[wm + 16 * i][wn + 16 * j], acc[i][j], UP_BN + 4,
                                    wmma::mem_row_major);
    __syncthreads();

#pragma unroll
    for (int c = 0; c < UP_CHUNKS; ++c) {
        const int row = row0 + c * ROW_STEP;
        if (!interior) old[c] = load_dx_chunk(dx, mask, T, n, m0 + row, n0 + col0);
        const float4 lo = *reinterpret_cast<const float4*>(&sm.ct.v[row][col0]);
        const float4 hi = *reinterpret_cast<const float4*>(&sm.ct.v[row][col0 + 4]);
        const float p[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        uint32_t out[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            uint32_t word = 0;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * w + h;
                uint16_t bits = (uint16_t)(old[c].v[w] >> (16 * h));
                const float was = bf16_bits_to_f32(bits);
                if (mask == nullptr) {
                    bits = f32_to_bf16_bits(was + p[j]);
                } else if ((old[c].m[j / 4] >> (8 * (j % 4))) & 0xFFu) {
                    /* du = bf16(dz A), as the product's bf16 output was before this kernel. */
                    bits = f32_to_bf16_bits(was + bf16_bits_to_f32(f32_to_bf16_bits(p[j])) * keep);
                }
                word |= (uint32_t)bits << (16 * h);
            }
            out[w] = word;
        }
        if (interior) {
            *reinterpret_cast<uint4*>(dx + at0 + c * ROW_STEP * n) =
                make_uint4(out[0], out[1], out[2], out[3]);
        } else {
            store_dx_chunk(dx, T, n, m0 + row, n0 + col0, out);
        }
    }
}

/* Σ_{s < splits} part[s * len + i], s in order: the same sum on every run. */
__device__ __forceinline__ float sum_of_splits(const float* __restrict__ part, int64_t splits,
                                               int64_t len, int64_t i) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += part[s * len + i];
    return sum;
}

#define GRID_STRIDE(i, n)                                                                     \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                 \
         i += (int64_t)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256)
lora_grad_reduce(const float* __restrict__ part, int64_t splits, int64_t mn,
                 float* __restrict__ g) {
    GRID_STRIDE(i, mn) { g[i] += sum_of_splits(part, splits, mn, i); }
}

extern "C" __global__ void __launch_bounds__(256)
lora_rows_reduce_bf16(const float* __restrict__ part, int64_t splits, int64_t len,
                      uint16_t* __restrict__ out) {
    GRID_STRIDE(i, len) { out[i] = f32_to_bf16_bits(sum_of_splits(part, splits, len, i)); }
}
