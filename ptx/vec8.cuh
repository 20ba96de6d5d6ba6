/*
 * vec8.cuh: eight bf16 values in one 16-byte vector, for the memory-bound kernels' 16-byte loads
 * and stores (included, not compiled alone: build.rs compiles only *.cu).
 *
 *   A uint4 holds elements 0..7 of a bf16 run as memory does (little-endian): element 2k in the
 *   low half of word k, element 2k + 1 in its high half.
 *   unpack_bf16x8: the eight values as f32 (exact: bf16 widens without rounding);
 *   pack_bf16x8: eight f32 rounded to bf16 with f32_to_bf16_bits (round to nearest even), the
 *   same rounding as the scalar stores, so a vector path writes the scalar path's bits;
 *   dot_bf16x8: acc plus the dot product of two such vectors, one fmaf an element in element
 *   order (the decode kernels' LoRA A products: the same order wherever it is used);
 *   aligned16: whether a pointer may be read or written as 16-byte vectors.
 */
#pragma once

#include "common.cuh"

/* Elements per 16-byte vector of bf16. */
#define BF16_PER_VEC 8

__device__ __forceinline__ void unpack_bf16x8(uint4 v, float (&f)[BF16_PER_VEC]) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(words[k] << 16);
        f[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);
    }
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&f)[BF16_PER_VEC]) {
    uint32_t words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
        words[k] = (uint32_t)f32_to_bf16_bits(f[2 * k]) |
                   ((uint32_t)f32_to_bf16_bits(f[2 * k + 1]) << 16);
    return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ float dot_bf16x8(uint4 a, uint4 x, float acc) {
    const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, xw[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        acc = fmaf(__uint_as_float(aw[k] << 16), __uint_as_float(xw[k] << 16), acc);
        acc = fmaf(__uint_as_float(aw[k] & 0xFFFF0000u), __uint_as_float(xw[k] & 0xFFFF0000u), acc);
    }
    return acc;
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }
