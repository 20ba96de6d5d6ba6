/*
 * attention.cu: causal grouped-query attention, flash style (online softmax over key tiles; no
 * T x T matrix in memory), forward (whole sequences, chunks at an offset, and decoding) and
 * backward, on bf16 activations with f32 arithmetic. CUDA cores, not tensor cores.
 *
 * Layouts: q, out, dout, dq (T, H * D) bf16; k, v (rows, KV * D) bf16; dk, dv (T, KV * D);
 * lse, delta (H, T) f32. A batch of B sequences of T rows each (right-padded to a common T)
 * stacks these per sequence: q (B, T, H * D), k (B, pos0 + T, KV * D), lse (B, H, T) and so on;
 * grid.z (grid.y of the delta kernel) is the sequence, and each entry point moves its pointers
 * to its sequence before running the one-sequence code. Batches have pos0 = 0. Padding rows at
 * the end of a sequence are never attended to by its real rows (causality), so they change
 * nothing there. Query head h reads key/value head h / (H / KV) (transformers'
 * repeat_kv). Scores are q . k * scale with scale = 1 / sqrt(D). D is 64 or 128 (the _d64 and
 * _d128 entry points); H a multiple of KV.
 *
 * attention_forward_d{64,128}(q, k, v, out, lse, T, pos0, H, KV, scale)
 *   Query row t sits at position pos0 + t and attends to key rows 0 ..= pos0 + t (k and v hold
 *   at least pos0 + T rows). pos0 = 0 for training; a decode step is T = 1, pos0 = S - 1 against
 *   a KV cache of S rows. lse[h, t] = the row's log-sum-exp of scaled scores, kept for the
 *   backward.
 *   On tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulation), FlashAttention-2 style:
 *   Launch: grid (ceil(T / 64), H, B), 128 threads = 4 warps, each warp owns 16 query rows of
 *   the CTA's 64; blockIdx.x counts query tiles from the last (the longest) down. The CTA's Q
 *   tile sits in shared memory (read as A fragments by ldmatrix at every key tile, so no
 *   registers hold it) and key and value tiles of 64 rows stream through shared memory
 *   (cp.async, rows padded to D + 8 elements so ldmatrix is free of bank conflicts): dynamic
 *   shared memory 3 x 64 x (D + 8) x 2 bytes (52.2 KB at D = 128; the host raises the limit).
 *   Built for 3 CTAs an SM (FWD_CTAS_PER_SM: at most 168 registers). Per tile a warp computes
 *   S = Q K^T (16 x 64, f32), masks it causally, updates each row's running max and sum (quad
 *   shuffles), rescales its output accumulator (unless no row's max moved) and adds P V, with
 *   P rounded to bf16 as the A operand (the accumulator layout of S is the A layout of P, two
 *   8-key tiles per 16-key chunk). A warp skips tiles wholly after its rows and masks only the
 *   tiles that reach past its first row (the tile and mask bounds of the three training kernels
 *   are replayed in ptx/tools/attention_masks.py). The exponentials are
 *   p = 2^(s scale log2 e - m scale log2 e) by ex2.approx (one FFMA and one MUFU a score); lse
 *   is converted back to natural log once per row. Positions are int: pos0 + T < 2^31.
 *   Checked against: backend::cpu::attention_forward (out) and an f64 log-sum-exp of the same
 *   scores ("attention fwd", "attention decode" and "attention lse" rows of sun selftest).
 *
 * attention_backward_delta(out, dout, delta, T, H, D)
 *   delta[h, t] = sum_d dout[t, h, d] * out[t, h, d]. One warp per (t, h); grid
 *   (ceil(T * H / 8), B), 256 threads.
 * attention_backward_dq_d{64,128}(q, k, v, dout, lse, delta, dq, T, H, KV, scale)
 *   Whole sequences (pos0 = 0), on tensor cores like the forward. Per query row, recomputing
 *   p = exp(s - lse) key tile by key tile: dp = dout . v, ds = p (dp - delta),
 *   dq = scale * sum_s ds k_s, with p = 2^(s scale log2 e - lse log2 e) by ex2.approx and the
 *   mask only on tiles reaching past a warp's first row. Launch as the forward: grid
 *   (ceil(T / 64), H, B), the last query tile first, 128 threads, each warp 16 query rows;
 *   the CTA's q and dout tiles and 64-key K and V tiles in dynamic shared memory (4 x 64 x
 *   (D + 8) x 2 bytes: 69.6 KB at D = 128), 3 CTAs an SM; S = Q K^T and dP = dO V^T by mma
 *   (q, dout rows as A by ldmatrix), dS rounded to bf16 as the A operand of dS K.
 * attention_backward_dkv_d{64,128}(q, k, v, dout, lse, delta, dk, dv, T, H, KV, scale)
 *   Per key row s of kv head g, over the query rows t >= s of every query head of the group:
 *   dv_s = sum p dout_t, dk_s = scale * sum ds q_t. No atomics: one CTA owns 64 key rows of one
 *   kv head. Launch: grid (ceil(T / 64), KV, B), 128 threads, each warp owns 16 key rows; the
 *   CTA's K and V rows and each 64-row query and dout tile sit in dynamic shared memory
 *   (DKV_SHARED_BYTES: 70 KB for D = 128, so the host raises the kernel's limit), with the
 *   tile's lse (in log2 units) and delta; per tile S^T = K Q^T and dP^T = V dO^T by mma (K, V
 *   rows as A by ldmatrix), P^T by ex2.approx (masked only on tiles starting before a warp's
 *   last key), then dV += P^T dO and dK += dS^T Q with P^T, dS^T rounded to bf16. 2 CTAs an SM
 *   (~250 registers: dK and dV accumulators, 128 f32 a thread).
 *   Checked against: backend::cpu_backward::attention_backward ("attention bwd" rows).
 *
 * attention_decode_fused_d{64,128}(q, k, v, cos, sin, keys, values, pos, H, KV, scale, stages,
 *                                  part, arrived, out, lse)
 *   A whole decode step's attention in one launch (what rope_qk_cache_bf16, a split-key
 *   partial kernel and a combine kernel did in three): the new row at position pos, q (H * D)
 *   and k, v (KV * D) bf16 straight from their projections (before RoPE), against a cache
 *   keys, values (rows, KV * D) bf16 whose rows 0 .. pos - 1 earlier steps wrote; cos, sin
 *   (positions, D / 2) the cache's angle tables. Writes out (H * D) bf16 and lse (H) f32, and
 *   cache row pos (the rotated k and v). Flash decoding: S = pos + 1 keys in n = ceil(S / 32)
 *   splits of DECODE_SPLIT (32) keys. Launch: grid (H, G), DECODE_THREADS (128) = 4 warps, and
 *   `stages` DecodeStage<D> of dynamic shared memory (17 KB each at D = 128). CTA (h, c) takes
 *   splits c k .. c k + k - 1 of query head h, k = ceil(n / G) (one split a CTA while n <= G;
 *   the CTAs past ceil(n / k) return at once), with 2 stages (stages = 2) one split's copies
 *   in flight while it works on the previous one.
 *   A decode step is a chain of memory round trips, so the kernel makes as few as it can:
 *   - Before pdl_wait, the first splits' cached K and V rows go into shared memory by cp.async,
 *     all in flight at once, and the angles at pos into registers. Those rows (< pos) were written
 *     by earlier steps: every kernel of a step calls pdl_launch_dependents only after its own
 *     pdl_wait, so when this kernel starts, every kernel two or more launches back has
 *     completed (and a graph replay starts after the previous one ends).
 *   - RoPE after the wait: every CTA rotates head h of q itself (threads < D / 2, one pair
 *     each, rotate_pair and the bf16 rounding of rope_qk_cache_bf16, so the bits match) into
 *     shared memory; q is not written back. The CTAs holding key pos (the last split) also
 *     rotate kv head h / (H / KV) of k and stage it and the new v row as key pos's rows.
 *     Exactly one CTA a kv head, the last split's of the group's first query head, writes them
 *     into cache row pos. Every other key read is of a row < pos, which nobody writes during
 *     the launch (no race).
 *   - A split's scores: lane j key j, warp w the w-th quarter of the columns (in column order),
 *     the quarters added in warp order; then every warp makes the same online-softmax step (f32,
 *     expf; with one split a CTA, the plain softmax of its keys) and thread d < D column d of
 *     the unnormalised output, keys in order.
 *   - Combine, folded in: with one CTA a head it writes out and lse itself. Otherwise each CTA
 *     writes its partial part[h, c] (D + 2 f32; part holds H * G of them), fences
 *     (__threadfence) and adds 1 to arrived[h] (u32, one a query head); the CTA that brings the
 *     count to the working CTAs' merges the head's partials in CTA order 0, 1, ... (so the
 *     result never depends on which CTA came last: deterministic), reading them from L2
 *     (__ldcg), and sets arrived[h] back to 0. arrived must be all zeros before the first
 *     launch (the host zeroes it once; every launch leaves it so). The merge: m = max over the
 *     partials, l = sum l_c exp(m_c - m), out = bf16(sum o_c exp(m_c - m) / l),
 *     lse = m + log l.
 * attention_decode_fused_step_d{64,128}(q, k, v, cos, sin, keys, values, step, positions, H, KV,
 *                                       scale, chunk, stages, part, arrived, out, lse)
 *   The same with pos = *step read from device memory (a decode step's position, so a captured
 *   CUDA graph replays for every step), before pdl_wait: the host copies it in before it queues
 *   the step. A recorded grid serves `chunk` positions (a multiple of 32): its y is
 *   G = min(ceil(S / chunk) * chunk / 32, DECODE_HEAD_CTAS = 16) for every S it serves. Nothing
 *   is done (by any CTA) when pos is outside 0 .. positions (the rows the cache and the angle
 *   tables hold) or when the grid's y is not that for pos.
 *   Checked against: backend::cpu::rope_forward then backend::cpu::attention_forward with T = 1
 *   and pos0 = pos ("attention decode fused" rows of sun selftest), the cache row against
 *   rope_qk_cache_bf16 (bits equal) and two runs against each other (bits equal).
 *
 * Built without --use_fast_math (expf, logf and divisions are the accurate ones). The forward,
 * dQ and dK/dV kernels take their softmax exponentials from exp2_approx (ex2.approx.ftz, ~2 ulp)
 * with log2 e folded into the score scale and the log-sum-exp; the decode kernel keeps expf.
 */

#include "common.cuh"
#include "pdl.cuh"
#include "mma.cuh"
#include "rope_pair.cuh"

#define ATT_THREADS 256  /* the delta kernel: 8 warps */
#define FULL 0xFFFFFFFFu
#define FWD_THREADS 128  /* the forward: 4 warps, 16 query rows each, on tensor cores */
#define FQ 64            /* query rows per forward CTA */
#define FT 64            /* key rows per forward tile */
/* CTAs an SM that the forward and dQ kernels are built for (__launch_bounds__): 3 x 4 warps at
   most 168 registers a thread, where 2 CTAs (8 warps) left the scheduler too few warps to issue
   from while others wait on mma, shuffle and ex2 latencies. */
#define FWD_CTAS_PER_SM 3

#define LOG2E 1.4426950408889634f /* log2(e): exp(x) = 2^(x log2 e) */

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xFF800000u); }
/* 2^x on the SFU (ex2.approx.ftz: relative error ~2^-22, about 2 ulp, far under bf16's 2^-8;
   2^-inf = 0). The training kernels' softmax exponentials, with log2 e folded into the scale. */
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float lo_f32(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float hi_f32(uint32_t pair) { return __uint_as_float(pair & 0xFFFF0000u); }

/* -------------------------------------------------------------------------------------------- */
/* forward                                                                                       */

/* Copies rows [0, 64) of a tile of K, V, Q or dout rows (row r at src + r * stride, D bf16
   each; rows >= valid become zeros) into shared memory with row pitch D + 8, 16 bytes per
   cp.async. Thread i copies 16-byte column i % (D / 8) of rows i / (D / 8),
   + FWD_THREADS / (D / 8), ... (a fixed count). */
template <int D>
__device__ __forceinline__ void load_kv_tile_async(uint16_t* dst, const uint16_t* src,
                                                   int64_t stride, int64_t valid) {
    constexpr int CHUNKS = D / 8;                  /* 16-byte chunks per row */
    constexpr int ROW_STEP = FWD_THREADS / CHUNKS; /* rows between one thread's copies */
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const int rows = (int)min(valid, (int64_t)FT);
#pragma unroll
    for (int i = 0; i < FT / ROW_STEP; ++i) {
        const int r = r0 + i * ROW_STEP;
        const bool ok = r < rows;
        cp_async16(dst + r * (D + 8) + c * 8, ok ? src + r * stride + c * 8 : src, ok ? 16 : 0);
    }
}

/* A fragment of k16 chunk c of the 16 rows row .. row + 15 of a shared tile at pitch D + 8
   (lane l addresses row row + l % 16, columns c * 16 + (l / 16) * 8: the four 8 x 8 matrices are
   A's (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)). */
template <int D>
__device__ __forceinline__ void load_a_shared(uint32_t f[4], const uint16_t* tile, int row, int c) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(f, tile + (row + (lane & 15)) * (D + 8) + c * 16 + (lane >> 4) * 8);
}

/* S (16 x 64) += A (16 x 16, one A fragment: k16 chunk c of a head) . B^T for that chunk, B's
   64 rows of D in shared memory at pitch D + 8 ([n][k]: keys or queries by head columns). */
template <int D>
__device__ __forceinline__ void mma_chunk_by_tile(float acc[FT / 8][4], const uint32_t a[4],
                                                  const uint16_t* b_rows, int c) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int pair = 0; pair < FT / 16; ++pair) {
        const int n = pair * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int kk = c * 16 + ((lane >> 3) & 1) * 8;
        uint32_t r[4];
        ldmatrix_x4(r, b_rows + n * (D + 8) + kk);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        mma_bf16(acc[2 * pair], a, b0);
        mma_bf16(acc[2 * pair + 1], a, b1);
    }
}

/* S (16 x 64) += A (16 x D: rows a_row .. a_row + 15 of a shared tile, read chunk by chunk) .
   B^T over the whole head. */
template <int D>
__device__ __forceinline__ void mma_rows_by_tile(float acc[FT / 8][4], const uint16_t* a_rows,
                                                 int a_row, const uint16_t* b_rows) {
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        uint32_t a[4];
        load_a_shared<D>(a, a_rows, a_row, c);
        mma_chunk_by_tile<D>(acc, a, b_rows, c);
    }
}

/* acc (16 x D) += P (16 x 64, accumulator tiles rounded to bf16) . B, B's 64 rows of D in shared
   memory at pitch D + 8 ([k][n]: the 64 rows are P's columns). */
template <int D>
__device__ __forceinline__ void mma_tile_by_rows(float acc[D / 8][4], const float p[FT / 8][4],
                                                 const uint16_t* b_rows) {
    constexpr int KP = D + 8;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < FT / 16; ++c) {
        const uint32_t pa[4] = {pack_bf16x2(p[2 * c][0], p[2 * c][1]),
                                pack_bf16x2(p[2 * c][2], p[2 * c][3]),
                                pack_bf16x2(p[2 * c + 1][0], p[2 * c + 1][1]),
                                pack_bf16x2(p[2 * c + 1][2], p[2 * c + 1][3])};
#pragma unroll
        for (int pair = 0; pair < D / 16; ++pair) {
            const int kr = c * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int n = pair * 16 + (lane >> 4) * 8;
            uint32_t r[4];
            ldmatrix_x4_trans(r, b_rows + kr * KP + n);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_bf16(acc[2 * pair], pa, b0);
            mma_bf16(acc[2 * pair + 1], pa, b1);
        }
    }
}

template <int D>
__device__ void attention_forward(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                                  const uint16_t* __restrict__ v, uint16_t* __restrict__ out,
                                  float* __restrict__ lse, int64_t T, int64_t pos0, int64_t H,
                                  int64_t KV, float scale) {
    constexpr int KP = D + 8; /* padded pitch of Q, K and V rows: ldmatrix free of conflicts */
    constexpr int DN = D / 8; /* n8 tiles of a head */
    extern __shared__ __align__(16) uint8_t fwd_shared[];
    uint16_t* Qs = reinterpret_cast<uint16_t*>(fwd_shared); /* (FQ, KP) */
    uint16_t* Ks = Qs + FQ * KP;                              /* (FT, KP) */
    uint16_t* Vs = Ks + FT * KP;                              /* (FT, KP) */
    const int64_t h = blockIdx.y;
    /* The last query tiles (the most key tiles) first, so the short ones fill the grid's tail. */
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * FQ;
    const int64_t kvh = h / (H / KV);
    const int64_t q_stride = H * D, kv_stride = KV * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    /* This warp's rows: q0 + warp * 16 + g (r = 0) and + 8 (r = 1). Positions and key
       indices below are int: the host keeps pos0 + T under 2^31. */
    const int64_t row0 = q0 + warp * 16 + g;

    /* The CTA's Q rows (rows >= T as zeros) join the first K/V tile's copies; the warps read
       them as A fragments by ldmatrix at every tile (no registers held for them). */
    load_kv_tile_async<D>(Qs, q + q0 * q_stride + h * D, q_stride, T - q0);

    float o[DN][4];
#pragma unroll
    for (int j = 0; j < DN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[j][i] = 0.0f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};

    const int keys_end = (int)(pos0 + min(T, q0 + FQ));   /* exclusive */
    const int warp_first = (int)(pos0 + q0) + warp * 16; /* this warp's first row's position */
    const int warp_last = warp_first + 15;               /* and its last row's */
    /* Scores stay raw (q . k) until the exponent: p = 2^(s scale log2 e - m scale log2 e), one
       FFMA and one ex2 per score; m is the row's running max of raw scores. */
    const float scale_log2 = scale * LOG2E;
    const uint16_t* k_head = k + kvh * D;
    const uint16_t* v_head = v + kvh * D;
    for (int k0 = 0; k0 < keys_end; k0 += FT) {
        __syncthreads(); /* the previous tile is consumed */
        load_kv_tile_async<D>(Ks, k_head + (int64_t)k0 * kv_stride, kv_stride, keys_end - k0);
        load_kv_tile_async<D>(Vs, v_head + (int64_t)k0 * kv_stride, kv_stride, keys_end - k0);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        if (k0 > warp_last) continue; /* warp-uniform: every key is in this warp's future */

        /* S = Q K^T (16 x 64 per warp), f32. */
        float s[FT / 8][4];
#pragma unroll
        for (int j = 0; j < FT / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
        mma_rows_by_tile<D>(s, Qs, warp * 16, Ks);

        /* Causal mask, only where the tile reaches past the warp's first row (warp-uniform):
           key k0 + col is in row r's future when col > pos(r) - k0, which lies in [-15, 77]
           here (k0 <= warp_last, k0 + 63 > warp_first). */
        if (k0 + FT - 1 > warp_first) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int last_col = warp_first + g + 8 * r - k0; /* row r's position - k0 */
#pragma unroll
                for (int j = 0; j < FT / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (j * 8 + 2 * tq + e > last_col) s[j][2 * r + e] = neg_inf();
            }
        }

        /* Online softmax per row: running max and sum (quad shuffles). */
        float p_scale[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = neg_inf();
#pragma unroll
            for (int j = 0; j < FT / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 2));
            const float m_new = fmaxf(m[r], mx); /* finite: key 0 is never masked */
            const float m_scaled = m_new * scale_log2;
            /* Exactly 1 when the max stays (then the rescale below can be skipped); 0 on the
               first tile (m = -inf). */
            p_scale[r] = m_new == m[r] ? 1.0f : exp2_approx((m[r] - m_new) * scale_log2);
            m[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < FT / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2_approx(fmaf(s[j][2 * r + e], scale_log2, -m_scaled));
                    s[j][2 * r + e] = p;
                    sum += p;
                }
            l[r] = l[r] * p_scale[r] + sum; /* this thread's share; summed over the quad at the end */
        }
        /* Rescale the output where a row's max moved (multiplying by 1 changes nothing: skipped
           when no row of the warp moved, warp-uniform). */
        if (__any_sync(FULL, p_scale[0] != 1.0f || p_scale[1] != 1.0f)) {
#pragma unroll
            for (int j = 0; j < DN; ++j) {
                o[j][0] *= p_scale[0];
                o[j][1] *= p_scale[0];
                o[j][2] *= p_scale[1];
                o[j][3] *= p_scale[1];
            }
        }

        /* O += P V: P's accumulator tiles are, pairwise, the A fragments of k16 chunks of keys. */
        mma_tile_by_rows<D>(o, s, Vs);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(FULL, l[r], 1);
        l[r] += __shfl_xor_sync(FULL, l[r], 2);
        const int64_t t = row0 + 8 * r;
        if (t >= T) continue;
        const float inv = 1.0f / l[r];
#pragma unroll
        for (int j = 0; j < DN; ++j)
            *reinterpret_cast<uint32_t*>(out + t * q_stride + h * D + j * 8 + 2 * tq) =
                pack_bf16x2(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        if (tq == 0) lse[h * T + t] = m[r] * scale + logf(l[r]); /* natural log, as the CPU's */
    }
}

/* -------------------------------------------------------------------------------------------- */
/* backward                                                                                      */

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_backward_delta(const uint16_t* __restrict__ out, const uint16_t* __restrict__ dout,
                         float* __restrict__ delta, int64_t T, int64_t H, int64_t D) {
    const int64_t item = (int64_t)blockIdx.x * (ATT_THREADS / 32) + (threadIdx.x >> 5);
    if (item >= T * H) return; /* warp-uniform */
    const int64_t b = blockIdx.y; /* the sequence */
    out += b * T * H * D;
    dout += b * T * H * D;
    delta += b * H * T;
    const int64_t t = item / H, h = item % H;
    const int lane = threadIdx.x & 31;
    const uint16_t* o = out + t * H * D + h * D;
    const uint16_t* g = dout + t * H * D + h * D;
    float s = 0.0f;
    for (int64_t d = lane; d < D; d += 32) s = fmaf(bf16_bits_to_f32(o[d]), bf16_bits_to_f32(g[d]), s);
    s = warp_sum(s);
    if (lane == 0) delta[h * T + t] = s;
}

template <int D>
__device__ void attention_backward_dq(const uint16_t* __restrict__ q,
                                      const uint16_t* __restrict__ k,
                                      const uint16_t* __restrict__ v,
                                      const uint16_t* __restrict__ dout,
                                      const float* __restrict__ lse,
                                      const float* __restrict__ delta, uint16_t* __restrict__ dq,
                                      int64_t T, int64_t H, int64_t KV, float scale) {
    constexpr int KP = D + 8, DN = D / 8;
    extern __shared__ __align__(16) uint8_t dq_shared[];
    uint16_t* Qs = reinterpret_cast<uint16_t*>(dq_shared); /* (FQ, KP) */
    uint16_t* dOs = Qs + FQ * KP;                            /* (FQ, KP) */
    uint16_t* Ks = dOs + FQ * KP;                            /* (FT, KP) */
    uint16_t* Vs = Ks + FT * KP;                             /* (FT, KP) */
    const int64_t h = blockIdx.y;
    /* The last query tiles (the most key tiles) first, so the short ones fill the grid's tail. */
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * FQ;
    const int64_t kvh = h / (H / KV);
    const int64_t q_stride = H * D, kv_stride = KV * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int64_t row0 = q0 + warp * 16 + g; /* rows row0 (r = 0) and row0 + 8 (r = 1) */

    /* The CTA's Q and dout rows (rows >= T as zeros) join the first K/V tile's copies; the
       warps read them as A fragments by ldmatrix at every tile. */
    load_kv_tile_async<D>(Qs, q + q0 * q_stride + h * D, q_stride, T - q0);
    load_kv_tile_async<D>(dOs, dout + q0 * q_stride + h * D, q_stride, T - q0);
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t t = row0 + 8 * r;
        row_lse[r] = t < T ? lse[h * T + t] * LOG2E : 0.0f; /* in log2 units */
        row_delta[r] = t < T ? delta[h * T + t] : 0.0f;
    }
    const float scale_log2 = scale * LOG2E;
    const int warp_first = (int)q0 + warp * 16; /* this warp's first row */
    float acc[DN][4];
#pragma unroll
    for (int j = 0; j < DN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;

    const int keys_end = (int)min(T, q0 + FQ); /* int: the host keeps T under 2^31 */
    const uint16_t* k_head = k + kvh * D;
    const uint16_t* v_head = v + kvh * D;
    for (int k0 = 0; k0 < keys_end; k0 += FT) {
        __syncthreads();
        load_kv_tile_async<D>(Ks, k_head + (int64_t)k0 * kv_stride, kv_stride, keys_end - k0);
        load_kv_tile_async<D>(Vs, v_head + (int64_t)k0 * kv_stride, kv_stride, keys_end - k0);
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();
        if (k0 > warp_first + 15) continue; /* warp-uniform: every key is after this warp's rows */
        float s[FT / 8][4], dp[FT / 8][4];
#pragma unroll
        for (int j = 0; j < FT / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.0f;
        mma_rows_by_tile<D>(s, Qs, warp * 16, Ks);   /* S = Q K^T */
        mma_rows_by_tile<D>(dp, dOs, warp * 16, Vs); /* dP = dO V^T */
        /* P = 2^(S scale log2 e - lse log2 e) = exp(S scale - lse), 0 where the key is in the
           row's future: masked only where the tile reaches past the warp's first row
           (warp-uniform), key k0 + col being in the future when col > row - k0 (in [-15, 77]). */
#pragma unroll
        for (int j = 0; j < FT / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                s[j][i] = exp2_approx(fmaf(s[j][i], scale_log2, -row_lse[i >> 1]));
        if (k0 + FT - 1 > warp_first) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int last_col = warp_first + g + 8 * r - k0; /* row r - k0 */
#pragma unroll
                for (int j = 0; j < FT / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (j * 8 + 2 * tq + e > last_col) s[j][2 * r + e] = 0.0f;
            }
        }
        /* dS = P (dP - delta). */
#pragma unroll
        for (int j = 0; j < FT / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] *= dp[j][i] - row_delta[i >> 1];
        mma_tile_by_rows<D>(acc, s, Ks); /* dQ += dS K */
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t t = row0 + 8 * r;
        if (t >= T) continue;
#pragma unroll
        for (int j = 0; j < DN; ++j)
            *reinterpret_cast<uint32_t*>(dq + t * q_stride + h * D + j * 8 + 2 * tq) =
                pack_bf16x2(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
    }
}

/* Dynamic shared memory of the dK/dV kernel: own K and V tiles, a query and a dout tile (all
   64 rows at pitch D + 8), and 64 log-sum-exps and deltas. */
#define DKV_SHARED_BYTES(D) ((2 * FT + 2 * FQ) * ((D) + 8) * 2 + 2 * FQ * 4)

template <int D>
__device__ void attention_backward_dkv(const uint16_t* __restrict__ q,
                                       const uint16_t* __restrict__ k,
                                       const uint16_t* __restrict__ v,
                                       const uint16_t* __restrict__ dout,
                                       const float* __restrict__ lse,
                                       const float* __restrict__ delta,
                                       uint16_t* __restrict__ dk, uint16_t* __restrict__ dv,
                                       int64_t T, int64_t H, int64_t KV, float scale) {
    constexpr int KP = D + 8, DC = D / 16, DN = D / 8;
    extern __shared__ __align__(16) uint8_t dkv_shared[];
    uint16_t* Ks = reinterpret_cast<uint16_t*>(dkv_shared);
    uint16_t* Vs = Ks + FT * KP;
    uint16_t* Qs = Vs + FT * KP;
    uint16_t* dOs = Qs + FQ * KP;
    float* lse_s = reinterpret_cast<float*>(dOs + FQ * KP);
    float* delta_s = lse_s + FQ;
    const int64_t gkv = blockIdx.y;
    const int64_t j0 = (int64_t)blockIdx.x * FT;
    const int64_t group = H / KV;
    const int64_t q_stride = H * D, kv_stride = KV * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int64_t key0 = j0 + warp * 16 + g; /* keys key0 (r = 0) and key0 + 8 (r = 1) */
    const int64_t warp_key0 = j0 + warp * 16; /* this warp's first key */
    const float scale_log2 = scale * LOG2E;

    load_kv_tile_async<D>(Ks, k + j0 * kv_stride + gkv * D, kv_stride, T - j0);
    load_kv_tile_async<D>(Vs, v + j0 * kv_stride + gkv * D, kv_stride, T - j0);
    cp_async_commit();

    float dk_acc[DN][4], dv_acc[DN][4];
#pragma unroll
    for (int j = 0; j < DN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk_acc[j][i] = dv_acc[j][i] = 0.0f;

    for (int64_t hi = 0; hi < group; ++hi) {
        const int64_t h = gkv * group + hi;
        for (int64_t t0 = j0; t0 < T; t0 += FQ) { /* earlier queries see none of these keys */
            __syncthreads();
            load_kv_tile_async<D>(Qs, q + t0 * q_stride + h * D, q_stride, T - t0);
            load_kv_tile_async<D>(dOs, dout + t0 * q_stride + h * D, q_stride, T - t0);
            cp_async_commit();
            if (threadIdx.x < FQ) {
                const int64_t t = t0 + threadIdx.x;
                lse_s[threadIdx.x] = t < T ? lse[h * T + t] * LOG2E : 0.0f; /* log2 units */
                delta_s[threadIdx.x] = t < T ? delta[h * T + t] : 0.0f;
            }
            cp_async_wait_all();
            __syncthreads();
            float s[FQ / 8][4], dp[FQ / 8][4];
#pragma unroll
            for (int j = 0; j < FQ / 8; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.0f;
            /* S^T = K Q^T and dP^T = V dO^T (16 keys x 64 queries), K and V rows as A. */
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                uint32_t a[4];
                load_a_shared<D>(a, Ks, warp * 16, c);
                mma_chunk_by_tile<D>(s, a, Qs, c);
                load_a_shared<D>(a, Vs, warp * 16, c);
                mma_chunk_by_tile<D>(dp, a, dOs, c);
            }
            /* P^T = 2^(S^T scale log2 e - lse log2 e), 0 where the query is before the key:
               masked only where the tile starts before the warp's last key (warp-uniform),
               query t0 + col being before key r when col < key - t0 (in [-14, 63]). Queries
               at or past T need no mask: their q and dout rows are zeros (and lse, delta 0), so
               P^T is 1 there and dS^T 0, and both multiply zero rows. */
#pragma unroll
            for (int j = 0; j < FQ / 8; ++j) {
                const float2 row_lse = *reinterpret_cast<const float2*>(lse_s + j * 8 + 2 * tq);
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    s[j][i] = exp2_approx(
                        fmaf(s[j][i], scale_log2, -((i & 1) ? row_lse.y : row_lse.x)));
            }
            if (t0 < warp_key0 + 15) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int first_col = (int)(key0 + 8 * r - t0);
#pragma unroll
                    for (int j = 0; j < FQ / 8; ++j)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            if (j * 8 + 2 * tq + e < first_col) s[j][2 * r + e] = 0.0f;
                }
            }
            /* dS^T = P^T (dP^T - delta). */
#pragma unroll
            for (int j = 0; j < FQ / 8; ++j) {
                const float2 row_delta =
                    *reinterpret_cast<const float2*>(delta_s + j * 8 + 2 * tq);
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    dp[j][i] = s[j][i] * (dp[j][i] - ((i & 1) ? row_delta.y : row_delta.x));
            }
            mma_tile_by_rows<D>(dv_acc, s, dOs); /* dV += P^T dO */
            mma_tile_by_rows<D>(dk_acc, dp, Qs); /* dK += dS^T Q */
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t key = key0 + 8 * r;
        if (key >= T) continue;
#pragma unroll
        for (int j = 0; j < DN; ++j) {
            const int64_t at = key * kv_stride + gkv * D + j * 8 + 2 * tq;
            *reinterpret_cast<uint32_t*>(dk + at) =
                pack_bf16x2(dk_acc[j][2 * r] * scale, dk_acc[j][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv + at) =
                pack_bf16x2(dv_acc[j][2 * r], dv_acc[j][2 * r + 1]);
        }
    }
}

/* -------------------------------------------------------------------------------------------- */
/* decode: one step's RoPE, cache write, split-key attention and combine, in one launch         */

#define DECODE_THREADS 128
#define DECODE_WARPS (DECODE_THREADS / 32)
#define DECODE_SPLIT 32     /* keys a split: one a lane */
#define DECODE_HEAD_CTAS 16 /* the most CTAs a head; past 16 splits a CTA takes several */

/* One split's K and V rows in shared memory (bf16, pitch D + 8: 16-byte rows whose 16-byte
   loads at one column fall in distinct banks). */
template <int D>
struct DecodeStage {
    uint16_t k[DECODE_SPLIT][D + 8];
    uint16_t v[DECODE_SPLIT][D + 8];
};

/* The last CTA of head h to arrive merges its partials: out[h] (D) bf16 and lse[h] from
   p[0 .. ctas) = (max, sum, unnormalised output (D)) of head h, in CTA order (the order never
   depends on which CTA arrives last). Reads the partials from L2 (__ldcg): other CTAs wrote them
   during this launch. Thread d < D owns column d. */
template <int D>
__device__ __forceinline__ void merge_splits(const float* __restrict__ p, int64_t h,
                                             int64_t ctas, uint16_t* __restrict__ out,
                                             float* __restrict__ lse) {
    float m_all = neg_inf();
    for (int64_t c = 0; c < ctas; ++c) m_all = fmaxf(m_all, __ldcg(p + c * (D + 2)));
    float l_all = 0.0f;
    for (int64_t c = 0; c < ctas; ++c)
        l_all += __ldcg(p + c * (D + 2) + 1) * expf(__ldcg(p + c * (D + 2)) - m_all);
    if (threadIdx.x < D) {
        const int d = threadIdx.x;
        float acc = 0.0f;
        for (int64_t c = 0; c < ctas; ++c)
            acc += __ldcg(p + c * (D + 2) + 2 + d) * expf(__ldcg(p + c * (D + 2)) - m_all);
        out[h * D + d] = f32_to_bf16_bits(acc / l_all);
    }
    if (threadIdx.x == 0) lse[h] = m_all + logf(l_all);
}

/* Queues cp.async copies of the cached K and V rows of split `split` (keys 32 split ..) of kv
   head kvh into `stage`: keys < S but pos, whose rows the caller stages itself. */
template <int D>
__device__ __forceinline__ void stage_split(DecodeStage<D>& stage,
                                            const uint16_t* __restrict__ keys,
                                            const uint16_t* __restrict__ values, int64_t split,
                                            int64_t pos, int64_t kv_stride, int64_t kvh) {
    constexpr int PIECES = D / 8; /* 16-byte pieces a row */
    const int64_t start = split * DECODE_SPLIT;
    for (int i = threadIdx.x; i < DECODE_SPLIT * PIECES; i += DECODE_THREADS) {
        const int j = i / PIECES, piece = i % PIECES;
        const int64_t key = start + j;
        if (key < pos) {
            const int64_t at = key * kv_stride + kvh * D + piece * 8;
            cp_async16(&stage.k[j][piece * 8], keys + at, 16);
            cp_async16(&stage.v[j][piece * 8], values + at, 16);
        }
    }
    cp_async_commit();
}

/* The decode step at position pos (S = pos + 1 keys, n = ceil(S / 32) splits) for CTA (h, c)
   of a grid whose y is G: see the header. The caller has checked that pos lies in the cache;
   CTAs past the ones the splits need do nothing. `stages` (1 or 2) is how many DecodeStage<D>
   the dynamic shared memory holds. */
template <int D>
__device__ void attention_decode_fused(const uint16_t* __restrict__ q,
                                       const uint16_t* __restrict__ k_new,
                                       const uint16_t* __restrict__ v_new,
                                       const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t,
                                       uint16_t* __restrict__ keys, uint16_t* __restrict__ values,
                                       int64_t pos, int64_t H, int64_t KV, float scale,
                                       int stages, float* __restrict__ part,
                                       unsigned int* __restrict__ arrived,
                                       uint16_t* __restrict__ out, float* __restrict__ lse) {
    static_assert(D <= DECODE_THREADS, "one thread a column in the products and merges");
    constexpr int HALF = D / 2;
    constexpr int QUARTER = D / 4; /* the columns of a score that one warp sums */
    extern __shared__ __align__(16) uint8_t decode_shared[];
    DecodeStage<D>* stage = reinterpret_cast<DecodeStage<D>*>(decode_shared);
    __shared__ float q_sh[D];                        /* head h's query after RoPE (bf16 values) */
    __shared__ uint16_t new_k_sh[D], new_v_sh[D];    /* the new row's key after RoPE, value */
    __shared__ float score_sh[DECODE_WARPS][DECODE_SPLIT]; /* each warp's quarter of a score */
    __shared__ bool last_sh;
    const int64_t h = blockIdx.x, c = blockIdx.y;
    const int64_t S = pos + 1, splits = (S + DECODE_SPLIT - 1) / DECODE_SPLIT;
    const int64_t per_cta = (splits + gridDim.y - 1) / gridDim.y;
    const int64_t ctas = (splits + per_cta - 1) / per_cta;
    if (c >= ctas) return;
    const int64_t first = c * per_cta, last = min(splits, first + per_cta);
    const int depth = stages >= 2 && last - first > 1 ? 2 : 1; /* splits in flight */
    const int64_t group = H / KV, kvh = h / group;
    const int64_t kv_stride = KV * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool holds_new = last == splits; /* key pos is this step's row */

    /* Before the wait: the first splits' cached K and V rows into shared memory (every copy in
       flight at once) and the angles at pos. Rows < pos were written by earlier steps, whose
       kernels have completed (see the header); the new row comes after the wait. */
    for (int i = 0; i < depth; ++i)
        stage_split<D>(stage[i], keys, values, first + i, pos, kv_stride, kvh);
    float cs = 0.0f, sn = 0.0f;
    if (threadIdx.x < HALF) {
        cs = cos_t[pos * HALF + threadIdx.x];
        sn = sin_t[pos * HALF + threadIdx.x];
    }
    pdl_wait(); /* q, k, v: the projections' output; before the cache row's write */
    pdl_launch_dependents();

    /* RoPE at position pos, pair i = threadIdx.x (rope_qk_cache_bf16's expression and bf16
       rounding): head h of q, kept in shared memory only; in the CTA holding key pos also the
       new key, kept with the new value for that key's rows, which the first query head of each
       group writes into cache row pos. */
    if (threadIdx.x < HALF) {
        const int i = threadIdx.x;
        float r1, r2;
        rotate_pair<false>(bf16_bits_to_f32(q[h * D + i]), bf16_bits_to_f32(q[h * D + i + HALF]),
                           cs, sn, r1, r2);
        q_sh[i] = bf16_bits_to_f32(f32_to_bf16_bits(r1));
        q_sh[i + HALF] = bf16_bits_to_f32(f32_to_bf16_bits(r2));
        if (holds_new) {
            const int64_t at = kvh * D + i; /* x1 of the pair in a (KV * D) row; x2 = + HALF */
            rotate_pair<false>(bf16_bits_to_f32(k_new[at]), bf16_bits_to_f32(k_new[at + HALF]),
                               cs, sn, r1, r2);
            const uint16_t k1 = f32_to_bf16_bits(r1), k2 = f32_to_bf16_bits(r2);
            const uint16_t v1 = v_new[at], v2 = v_new[at + HALF];
            new_k_sh[i] = k1;
            new_k_sh[i + HALF] = k2;
            new_v_sh[i] = v1;
            new_v_sh[i + HALF] = v2;
            if (h % group == 0) {
                const int64_t row = pos * kv_stride + at;
                keys[row] = k1;
                keys[row + HALF] = k2;
                values[row] = v1;
                values[row + HALF] = v2;
            }
        }
    }
    __syncthreads();

    /* Online softmax over the CTA's splits, one split a round: m, l as every warp holds them,
       acc column threadIdx.x (< D) of the unnormalised output. */
    float m = neg_inf(), l = 0.0f, acc = 0.0f;
    for (int64_t split = first; split < last; ++split) {
        DecodeStage<D>& st = stage[(split - first) % depth];
        if (depth == 2 && split + 1 < last)
            cp_async_wait_group<1>(); /* this split's copies; the next one's may fly on */
        else
            cp_async_wait_all();
        const int64_t start = split * DECODE_SPLIT;
        const int keys_here = (int)min((int64_t)DECODE_SPLIT, S - start);
        if (split == splits - 1 && threadIdx.x < D) { /* the new row: key pos */
            st.k[pos - start][threadIdx.x] = new_k_sh[threadIdx.x];
            st.v[pos - start][threadIdx.x] = new_v_sh[threadIdx.x];
        }
        __syncthreads();

        /* Scores: lane j's key, warp w's quarter of the columns, in column order; the quarters
           are added in warp order. */
        float dot = 0.0f;
        if (lane < keys_here) {
            const uint4* row = reinterpret_cast<const uint4*>(&st.k[lane][warp * QUARTER]);
#pragma unroll
            for (int u = 0; u < QUARTER / 8; ++u) {
                const uint4 w = row[u];
                const uint32_t words[4] = {w.x, w.y, w.z, w.w};
                const float* qq = q_sh + warp * QUARTER + 8 * u;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    dot = fmaf(qq[2 * b], lo_f32(words[b]), dot);
                    dot = fmaf(qq[2 * b + 1], hi_f32(words[b]), dot);
                }
            }
        }
        score_sh[warp][lane] = dot;
        __syncthreads();
        /* Every warp makes the same softmax step (lane j: key j of the split). */
        float s = neg_inf();
        if (lane < keys_here) {
            float sum = score_sh[0][lane];
#pragma unroll
            for (int w = 1; w < DECODE_WARPS; ++w) sum += score_sh[w][lane];
            s = sum * scale;
        }
        const float m_new = fmaxf(m, warp_max(s)); /* finite: key `start` is in the split */
        const float correction = expf(m - m_new);  /* 0 on the first split */
        const float p = expf(s - m_new);
        l = l * correction + warp_sum(p);
        /* The split's V rows in key order. */
        acc *= correction;
        if (threadIdx.x < D) {
            for (int j = 0; j < keys_here; ++j)
                acc = fmaf(__shfl_sync(FULL, p, j), bf16_bits_to_f32(st.v[j][threadIdx.x]), acc);
        }
        m = m_new;
        __syncthreads(); /* the stage and the scores are read: both may be overwritten */
        if (split + depth < last)
            stage_split<D>(st, keys, values, split + depth, pos, kv_stride, kvh);
    }

    if (ctas == 1) {
        /* merge_splits of one partial, whose weight is exp(0) = 1: the same bits, no round
           trip. */
        if (threadIdx.x < D) out[h * D + threadIdx.x] = f32_to_bf16_bits(acc / l);
        if (threadIdx.x == 0) lse[h] = m + logf(l);
        return;
    }
    float* head_part = part + h * gridDim.y * (D + 2);
    float* mine = head_part + c * (D + 2);
    if (threadIdx.x < D) mine[2 + threadIdx.x] = acc;
    if (threadIdx.x == 0) {
        mine[0] = m;
        mine[1] = l;
    }
    __threadfence(); /* this thread's part of the partial is visible to every CTA ... */
    __syncthreads(); /* ... for all of the CTA's threads, before it counts as arrived */
    if (threadIdx.x == 0) {
        const unsigned int before = atomicAdd(arrived + h, 1u);
        __threadfence(); /* the others' partials, counted before this, are visible after it */
        last_sh = before == (unsigned int)(ctas - 1);
    }
    __syncthreads();
    if (!last_sh) return;
    merge_splits<D>(head_part, h, ctas, out, lse);
    /* Every CTA of head h has counted: ready for the next launch. */
    if (threadIdx.x == 0) arrived[h] = 0;
}

/* -------------------------------------------------------------------------------------------- */
/* entry points                                                                                  */

#define ATTENTION_ENTRIES(D)                                                                      \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS, FWD_CTAS_PER_SM)                   \
    attention_forward_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v,              \
                           uint16_t* out, float* lse, int64_t T, int64_t pos0, int64_t H,        \
                           int64_t KV, float scale) {                                            \
        const int64_t b = blockIdx.z, qo = b * T * H * D, ko = b * (pos0 + T) * KV * D;          \
        attention_forward<D>(q + qo, k + ko, v + ko, out + qo, lse + b * H * T, T, pos0, H, KV,  \
                             scale);                                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS, FWD_CTAS_PER_SM)                   \
    attention_backward_dq_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v,          \
                               const uint16_t* dout, const float* lse, const float* delta,       \
                               uint16_t* dq, int64_t T, int64_t H, int64_t KV, float scale) {    \
        const int64_t b = blockIdx.z, qo = b * T * H * D, ko = b * T * KV * D, lo = b * H * T;   \
        attention_backward_dq<D>(q + qo, k + ko, v + ko, dout + qo, lse + lo, delta + lo,        \
                                 dq + qo, T, H, KV, scale);                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS)                                    \
    attention_backward_dkv_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v,         \
                                const uint16_t* dout, const float* lse, const float* delta,      \
                                uint16_t* dk, uint16_t* dv, int64_t T, int64_t H, int64_t KV,    \
                                float scale) {                                                   \
        const int64_t b = blockIdx.z, qo = b * T * H * D, ko = b * T * KV * D, lo = b * H * T;   \
        attention_backward_dkv<D>(q + qo, k + ko, v + ko, dout + qo, lse + lo, delta + lo,       \
                                  dk + ko, dv + ko, T, H, KV, scale);                            \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                 \
    attention_decode_fused_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v,         \
                                const float* cos_t, const float* sin_t, uint16_t* keys,          \
                                uint16_t* values, int64_t pos, int64_t H, int64_t KV,            \
                                float scale, int32_t stages, float* part,                        \
                                unsigned int* arrived, uint16_t* out, float* lse) {              \
        attention_decode_fused<D>(q, k, v, cos_t, sin_t, keys, values, pos, H, KV, scale,        \
                                  stages, part, arrived, out, lse);                              \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                 \
    attention_decode_fused_step_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v,    \
                                     const float* cos_t, const float* sin_t, uint16_t* keys,     \
                                     uint16_t* values, const int64_t* step, int64_t positions,   \
                                     int64_t H, int64_t KV, float scale, int64_t chunk,          \
                                     int32_t stages, float* part, unsigned int* arrived,         \
                                     uint16_t* out, float* lse) {                                \
        /* Before pdl_wait: the host copies the position in before it queues the step. */        \
        const int64_t pos = *step;                                                               \
        /* Uniform over the grid: a position outside the cache, or one whose chunk count needs  \
           another grid than this one, does nothing. */                                          \
        if (pos < 0 || pos >= positions ||                                                       \
            min((pos + chunk) / chunk * (chunk / DECODE_SPLIT), (int64_t)DECODE_HEAD_CTAS) !=    \
                (int64_t)gridDim.y)                                                              \
            return;                                                                              \
        attention_decode_fused<D>(q, k, v, cos_t, sin_t, keys, values, pos, H, KV, scale,        \
                                  stages, part, arrived, out, lse);                              \
    }

ATTENTION_ENTRIES(64)
ATTENTION_ENTRIES(128)
