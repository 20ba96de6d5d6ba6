/*
 * swiglu.cu: the SwiGLU activation of the LLaMA MLP, forward and backward, bf16 in and out,
 * f32 arithmetic.
 *
 * swiglu_forward_bf16(gate, up, n, out)
 *   out = silu(gate) * up, silu(g) = g / (1 + exp(-g)); all (n,) bf16 (any shape flattened).
 *   Checked against: backend::cpu::swiglu_forward ("swiglu fwd" rows of sun selftest).
 *
 * swiglu_backward_bf16(dout, gate, up, n, dgate, dup)
 *   du = dout * silu(g), dg = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))); all (n,) bf16.
 *   Each thread reads its elements of every input before writing them, so dgate may alias
 *   gate and dup may alias up (in-place backward).
 *   Checked against: backend::cpu_backward::swiglu_backward ("swiglu bwd" rows).
 *
 * Both compute each element with the expression they always have (swiglu, swiglu_grad below;
 * the per-element PTX dataflow, nvcc's contractions included, is the one of the
 * one-element-a-thread kernels), so the bits are unchanged.
 *
 * Launch (both): 1-D, SWIGLU_THREADS (256) threads per CTA, a grid-stride loop; the host sizes
 * the grid at one pass, ceil(n / 16 / 256) CTAs.
 * Vector path (every pointer 16-byte aligned, as GpuBuffer allocations are): CTA b's pass takes
 * the 512 16-byte vectors (8 bf16 each) from 512 b, thread t vectors t and t + 256
 * (SWIGLU_VECS = 2), every input's vectors loaded before any is used; the last n % 8 elements
 * one a thread. Element path (a misaligned pointer): one element at a time over the grid.
 *
 * Bandwidth at 8192 x 11008 (the 7B MLP, n = 90.2M): forward 541.1 MB (gate, up read; out
 * written), bound 125.8 us; backward 901.8 MB (dout, gate, up read; dgate, dup written), bound
 * 209.7 us. Forward: 44 registers, 5 CTAs an SM, 64 B of loads a thread in flight (80 KB an
 * SM; the element-a-thread kernel had 4 B a thread: 278.8 us, 45%). Backward: 60 registers, 4
 * CTAs an SM, 96 B a thread (96 KB an SM; was 313.4 us, 67%). The arithmetic is not free: the
 * forward's accurate expf and IEEE division are ~26 SASS instructions an element, ~70 us of
 * issue over the whole GPU, the backward's ~35, ~95 us; both hide under the memory time with
 * 32-40 warps an SM. Prediction: forward ~150 us (~84%), backward ~245 us (~86%).
 */

#include "common.cuh"
#include "vec8.cuh"

#define SWIGLU_THREADS 256
/* 16-byte vectors of every input a thread loads before it uses any. */
#define SWIGLU_VECS 2

/* out = silu(g) * u, the expression the kernel has always used (g / (1 + exp(-g)), then * u). */
__device__ __forceinline__ float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* The backward of one element: du = d * silu(g) as d * g * sig, and dg. */
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
    const float sig = 1.0f / (1.0f + expf(-g));
    du = d * g * sig;
    dg = d * u * sig * (1.0f + g * (1.0f - sig));
}

extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
swiglu_forward_bf16(const uint16_t* __restrict__ gate, const uint16_t* __restrict__ up,
                    int64_t n, uint16_t* __restrict__ out) {
    const int64_t thread = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t threads = (int64_t)gridDim.x * blockDim.x;
    if (aligned16(gate) && aligned16(up) && aligned16(out)) { /* uniform across the grid */
        const int64_t vecs = n / BF16_PER_VEC;
        const uint4* gv = reinterpret_cast<const uint4*>(gate);
        const uint4* uv = reinterpret_cast<const uint4*>(up);
        uint4* ov = reinterpret_cast<uint4*>(out);
        /* CTA b's SWIGLU_VECS * 256 vectors: thread t has t, t + 256, ... (coalesced). */
        for (int64_t first = (int64_t)blockIdx.x * blockDim.x * SWIGLU_VECS + threadIdx.x;
             first < vecs; first += threads * SWIGLU_VECS) {
            uint4 g_bits[SWIGLU_VECS], u_bits[SWIGLU_VECS];
#pragma unroll
            for (int j = 0; j < SWIGLU_VECS; ++j) {
                const int64_t q = first + (int64_t)j * blockDim.x;
                if (q < vecs) {
                    g_bits[j] = gv[q];
                    u_bits[j] = uv[q];
                }
            }
#pragma unroll
            for (int j = 0; j < SWIGLU_VECS; ++j) {
                const int64_t q = first + (int64_t)j * blockDim.x;
                if (q < vecs) {
                    float g[BF16_PER_VEC], u[BF16_PER_VEC];
                    unpack_bf16x8(g_bits[j], g);
                    unpack_bf16x8(u_bits[j], u);
#pragma unroll
                    for (int k = 0; k < BF16_PER_VEC; ++k) g[k] = swiglu(g[k], u[k]);
                    ov[q] = pack_bf16x8(g);
                }
            }
        }
        /* The last n % 8 elements, one a thread. */
        const int64_t i = vecs * BF16_PER_VEC + thread;
        if (i < n)
            out[i] = f32_to_bf16_bits(swiglu(bf16_bits_to_f32(gate[i]), bf16_bits_to_f32(up[i])));
        return;
    }
    for (int64_t i = thread; i < n; i += threads)
        out[i] = f32_to_bf16_bits(swiglu(bf16_bits_to_f32(gate[i]), bf16_bits_to_f32(up[i])));
}

/* No __restrict__: dgate may alias gate and dup up. */
extern "C" __global__ void __launch_bounds__(SWIGLU_THREADS)
swiglu_backward_bf16(const uint16_t* dout, const uint16_t* gate, const uint16_t* up, int64_t n,
                     uint16_t* dgate, uint16_t* dup) {
    const int64_t thread = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t threads = (int64_t)gridDim.x * blockDim.x;
    if (aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) &&
        aligned16(dup)) { /* uniform across the grid */
        const int64_t vecs = n / BF16_PER_VEC;
        const uint4* dv = reinterpret_cast<const uint4*>(dout);
        const uint4* gv = reinterpret_cast<const uint4*>(gate);
        const uint4* uv = reinterpret_cast<const uint4*>(up);
        uint4* dgv = reinterpret_cast<uint4*>(dgate);
        uint4* duv = reinterpret_cast<uint4*>(dup);
        for (int64_t first = (int64_t)blockIdx.x * blockDim.x * SWIGLU_VECS + threadIdx.x;
             first < vecs; first += threads * SWIGLU_VECS) {
            uint4 d_bits[SWIGLU_VECS], g_bits[SWIGLU_VECS], u_bits[SWIGLU_VECS];
#pragma unroll
            for (int j = 0; j < SWIGLU_VECS; ++j) {
                const int64_t q = first + (int64_t)j * blockDim.x;
                if (q < vecs) {
                    d_bits[j] = dv[q];
                    g_bits[j] = gv[q];
                    u_bits[j] = uv[q];
                }
            }
            /* Every load of the thread's vectors is above every store: in place is safe. */
#pragma unroll
            for (int j = 0; j < SWIGLU_VECS; ++j) {
                const int64_t q = first + (int64_t)j * blockDim.x;
                if (q < vecs) {
                    float d[BF16_PER_VEC], g[BF16_PER_VEC], u[BF16_PER_VEC];
                    unpack_bf16x8(d_bits[j], d);
                    unpack_bf16x8(g_bits[j], g);
                    unpack_bf16x8(u_bits[j], u);
                    float dg[BF16_PER_VEC], du[BF16_PER_VEC];
#pragma unroll
                    for (int k = 0; k < BF16_PER_VEC; ++k)
                        swiglu_grad(d[k], g[k], u[k], dg[k], du[k]);
                    duv[q] = pack_bf16x8(du);
                    dgv[q] = pack_bf16x8(dg);
                }
            }
        }
        const int64_t i = vecs * BF16_PER_VEC + thread;
        if (i < n) {
            float dg, du;
            swiglu_grad(bf16_bits_to_f32(dout[i]), bf16_bits_to_f32(gate[i]),
                        bf16_bits_to_f32(up[i]), dg, du);
            dup[i] = f32_to_bf16_bits(du);
            dgate[i] = f32_to_bf16_bits(dg);
        }
        return;
    }
    for (int64_t i = thread; i < n; i += threads) {
        float dg, du;
        swiglu_grad(bf16_bits_to_f32(dout[i]), bf16_bits_to_f32(gate[i]), bf16_bits_to_f32(up[i]),
                    dg, du);
        dup[i] = f32_to_bf16_bits(du);
        dgate[i] = f32_to_bf16_bits(dg);
    }
}
