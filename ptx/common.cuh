/*
 * common.cuh: small device helpers shared by the kernel files (included, not compiled alone:
 * build.rs compiles only *.cu).
 *
 *   bf16 <-> f32 on raw 16-bit patterns (the host keeps bf16 as u16), round to nearest even;
 *   warp_sum / warp_max: butterfly reductions over the 32 lanes of a full warp;
 *   block_sum / block_max: the same over a whole CTA (blockDim.x a multiple of 32, at most
 *   1024), through 32 floats of shared memory; every thread of the CTA must call them, and every
 *   thread gets the result.
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t bits) {
    return __uint_as_float((uint32_t)bits << 16);
}

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float v) {
    __nv_bfloat16 b = __float2bfloat16_rn(v);
    return *reinterpret_cast<uint16_t*>(&b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
    return v;
}

/* Sum over the CTA. `scratch` is 32 floats of shared memory, reused across calls (the leading
   __syncthreads protects it from the previous call's readers). */
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float best = __int_as_float(0xFF800000u); /* -inf */
    for (int w = 0; w < warps; ++w) best = fmaxf(best, scratch[w]);
    return best;
}
