/*
 * pdl.cuh: programmatic dependent launch (PDL) in the kernels of a decode step (included, not
 * compiled alone).
 *
 * A kernel launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while
 * the previous kernel of its stream is still running, once every CTA of that kernel has called
 * pdl_launch_dependents() or exited. Its pdl_wait() (griddepcontrol.wait) then blocks until the
 * previous kernel has COMPLETED and its memory is visible, so where the trigger sits changes
 * only how early the next kernel starts, never what it reads. A kernel launched that way must
 * call pdl_wait() before its first read of anything an earlier kernel writes and before its
 * first global write (the previous kernel may still read that buffer); only data nothing in the
 * step writes (weights, scales, code tables, LoRA factors, RoPE tables) may be read before it.
 *
 *   pdl_wait()              griddepcontrol.wait (also a compiler memory barrier);
 *   pdl_launch_dependents() griddepcontrol.launch_dependents;
 *   pdl_prefetch_l2(p)      prefetch.global.L2 of p's line: a weight's first bytes head for L2
 *                           before the wait.
 *
 * All three exist only where SUN_PDL is defined: the ptx/<file>_pdl.cu twins, built for
 * compute_90 (griddepcontrol needs sm_90), define it and #include <file>.cu. Elsewhere (the
 * compute_80 modules) they are empty and emit nothing.
 */
#pragma once

#ifdef SUN_PDL
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "SUN_PDL needs compute_90 or newer (griddepcontrol)"
#endif
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void pdl_prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
#else
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_launch_dependents() {}
__device__ __forceinline__ void pdl_prefetch_l2(const void*) {}
#endif
