/*
 * wgmma.cuh: Hopper warpgroup tensor-core building blocks shared by the sm_90a kernels
 * (matmul_sm90.cu, gemm_sm90.cu; included, not compiled alone, and only into files built for
 * compute_90a): the wgmma fence / commit / wait, the accumulator fence, and the matrix
 * descriptor of a K-major operand in shared memory with the 128-byte swizzle (PTX ISA, "Matrix
 * Descriptor Format"; CUTLASS's GmmaDescriptor): start address >> 4, leading byte offset 1
 * (unused for swizzled K-major), stride byte offset 1024 >> 4 (8-row groups of 128-byte rows),
 * base offset 0, layout type 1 (SWIZZLE_128B). The k16 step kk of a 64-wide tile starts 32 kk
 * bytes into each row: + 2 kk in the address field. And the descriptor of an MN-major operand
 * with the same swizzle (mn_sw128_descriptor: gemm_sm90.cu's B stored (K, N)).
 */
#pragma once

#include <stdint.h>

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
/* Waits until at most `Pending` of this warpgroup's committed wgmma groups, the most recent
   ones, are still in flight (the older ones have read their operands and written d). */
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
/* Ties the N accumulators to this point of the program, so the compiler neither reads them
   before the wgmmas that write them are waited for, nor moves their initialisation past the
   first wgmma (CUTLASS's warpgroup_fence_operand). */
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
/* The descriptor of a K-major, 128-byte-swizzled operand starting at shared address `addr`
   (1024-aligned, or that plus 32 * kk for the k16 step kk). */
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4)   /* start address */
           | ((uint64_t)1 << 16)               /* leading byte offset (unused): 1 */
           | ((uint64_t)(1024 >> 4) << 32)     /* stride byte offset: 1024 bytes */
           | ((uint64_t)1 << 62);              /* SWIZZLE_128B */
}
/* The descriptor of an MN-major, 128-byte-swizzled operand starting at shared address `addr`
   (1024-aligned): rows of 64 MN-elements (128 bytes) one k apart, as TMA writes a (K, MN)
   row-major box of 64 columns; the stride byte offset 1024 steps to the next 8 rows (k), the
   leading byte offset `block_bytes` to the next 64 MN-elements (the next box). PTX ISA, the
   canonical layout ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) with Swizzle<3,4,3>; CUTLASS's
   make_gmma_desc<Major::MN> (leading = stride<0,1>, stride = stride<1,1>). The k16 step kk
   starts 16 kk rows on: + 2048 kk bytes, + 128 kk in the address field. */
__device__ __forceinline__ uint64_t mn_sw128_descriptor(uint32_t addr, uint32_t block_bytes) {
    return (uint64_t)((addr & 0x3FFFF) >> 4)                 /* start address */
           | ((uint64_t)((block_bytes & 0x3FFFF) >> 4) << 16) /* leading byte offset */
           | ((uint64_t)(1024 >> 4) << 32)                   /* stride byte offset: 1024 bytes */
           | ((uint64_t)1 << 62);                            /* SWIZZLE_128B */
}
