/*
 * pair_table.cuh: the code-byte pair tables of the batch-1 4-bit GEMVs (included by nf4.cu and
 * gemv4_tiled.cu, not compiled alone).
 *
 * A 4-bit code byte holds two elements, the even one in the HIGH nibble (bitsandbytes). A pair
 * table has one entry per code byte value (256), PAIR_ENTRY_BYTES apart, and each entry holds
 * 32 copies of the byte's two decoded elements, one copy per lane: lane l reads copy l, so a
 * warp's lookups fall in distinct banks whatever the codes. The f32 table (nf4.cu's
 * build_pair_table) stores (f32, f32) copies 8 bytes apart; the bf16 table here stores one
 * bf16 pair (even element in the low half, k order) per copy, 4 bytes apart, using the first
 * 128 bytes of each entry. Both live at the start of dynamic shared memory.
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#define PAIR_COPIES 32       /* copies of each pair-table entry, one per lane */
#define PAIR_ENTRY_BYTES 256 /* one entry: 32 copies of (f32, f32), or of a bf16 pair */
#define PAIR_TABLE_BYTES (256 * PAIR_ENTRY_BYTES) /* 64 KiB, at the start of dynamic shared memory */

/* Component i (compile-time after unrolling) of v. */
__device__ __forceinline__ uint32_t component(uint4 v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* Dynamic shared memory, sized by the host (each kernel's header says what it holds). */
__device__ __forceinline__ uint8_t* dynamic_shared() {
    extern __shared__ __align__(16) uint8_t dynamic_sh[];
    return dynamic_sh;
}

/* Byte offset in a pair table of code byte b (0..3, compile-time) of word, in the copy at
   lane_offset (lane * 8 for the f32 table, lane * 4 for the bf16 one; < 256): byte 1 of the
   result is the code byte (entry * 256), byte 0 the lane offset, bytes 2 and 3 zero (byte 1 of
   lane_offset). */
__device__ __forceinline__ uint32_t pair_offset(uint32_t word, uint32_t lane_offset, int b) {
    return __byte_perm(word, lane_offset, 0x5504u | ((uint32_t)b << 4));
}

/* Fills the bf16 pair table at pairs (PAIR_TABLE_BYTES): entry b holds 32 copies, 4 bytes
   apart, of the bf16 pair (table[b >> 4] in the low half, table[b & 15] in the high half), i.e.
   code byte b's two elements in k order; its upper 128 bytes are unused. Any block size: thread
   t builds entries t, t + blockDim.x, ..., each with 8 16-byte stores rotated by the entry (a
   warp's stores spread over the 8 16-byte bank groups). */
__device__ __forceinline__ void build_bf16_pair_table(const float* __restrict__ table,
                                                      uint8_t* pairs) {
    for (int e = threadIdx.x; e < 256; e += blockDim.x) {
        const __nv_bfloat162 pair =
            __floats2bfloat162_rn(__ldg(table + (e >> 4)), __ldg(table + (e & 15)));
        const uint32_t bits = *reinterpret_cast<const uint32_t*>(&pair); /* .x in the low half */
        const uint4 four_copies = make_uint4(bits, bits, bits, bits);
        uint4* entry = reinterpret_cast<uint4*>(pairs + e * PAIR_ENTRY_BYTES);
#pragma unroll
        for (int i = 0; i < 8; ++i) entry[(i + e) & 7] = four_copies;
    }
}

/* The bf16 pair of code byte b (0..3, compile-time) of word, from the copy at lane_offset
   (lane * 4). */
__device__ __forceinline__ uint32_t bf16_pair(const uint8_t* pairs, uint32_t word,
                                              uint32_t lane_offset, int b) {
    return *reinterpret_cast<const uint32_t*>(pairs + pair_offset(word, lane_offset, b));
}
