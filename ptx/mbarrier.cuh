/*
 * mbarrier.cuh: Hopper's transaction barriers and the bulk copies that complete on them (included
 * by the compute_90 kernel files gemm_sm90.cu and gemv4_tiled_sm90.cu, not compiled alone).
 * A barrier is an 8-byte word in shared memory, addressed by its 32-bit shared-window address; a
 * phase completes when its arrivals and its expected transaction bytes have all come in, and
 * waiters name the phase by its parity.
 */
#pragma once

#include <stdint.h>

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
/* `bytes` (a multiple of 16; 16-byte aligned addresses) from global memory at src into shared
   memory at dst, completing on mbarrier `bar`. */
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
        ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}
