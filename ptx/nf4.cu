/*
 * nf4.cu: 4-bit (NF4 / FP4) blockwise dequantization and the batch-1 NF4 GEMV used for decoding.
 *
 * Layout (bitsandbytes):
 *   packed   (ceil(n / 2),) u8   two 4-bit codes per byte, element 2i in the HIGH nibble of byte i,
 *                                element 2i+1 in the low nibble; an odd n leaves the last low
 *                                nibble unused.
 *   table    (16,) f32           the code table (NF4 or FP4), passed by the host (quant::code_table).
 *   absmax, plain   (nblocks,) f32, nblocks = ceil(n / blocksize).
 *   absmax, double  (nblocks,) u8 codes into dyn_map (256,) f32, bitsandbytes' signed 8-bit
 *                   dynamic map, with nested (ceil(nblocks / nested_blocksize),) f32 and offset:
 *                   absmax[b] = dyn_map[codes[b]] * nested[b / nested_blocksize] + offset.
 *   element e = table[code(e)] * absmax[e / blocksize].
 * blocksize must be a multiple of 32 (bitsandbytes uses 32..4096): 32 consecutive elements
 * starting at a multiple of 32 then share one absmax, which both kernels rely on.
 *
 * dequant4_{plain,double}_{f32,bf16}(packed, table, absmax..., n, blocksize, out)
 *   out (n,) f32 or bf16 (round to nearest even).
 *   Launch: 1-D, 256 threads per CTA; thread t handles the 16 packed bytes [16t, 16t + 16), i.e.
 *   elements [32t, 32t + 32): one 16-byte load, one absmax, eight float4 / four 16-byte stores.
 *   Grid = ceil(ceil(n / 32) / 256). The last, partial chunk is handled element by element.
 *   Checked against: quant::dequantize_4bit_f32 (sun selftest, "dequant4" rows).
 *
 * gemv4_{plain,double}_bf16(packed, table, absmax..., rows, cols, blocksize, x, x_in_shared, y)
 *   y (rows,) bf16 = W (rows, cols; 4-bit packed as above, row-major, n = rows * cols) . x (cols,)
 *   bf16, accumulated in f32, rounded to bf16 once at the end.
 *   Launch: 1-D, 256 threads (8 warps) per CTA; warp w of CTA c handles rows
 *   r = c * 8 + w, r += gridDim.x * 8 (grid-stride), so the host picks how many rows a warp does.
 *   Dynamic shared memory: cols * 2 bytes (rounded up to 16) when x_in_shared != 0: x is staged
 *   there once per CTA; for very wide rows the host passes 0 and x is read from global (L1/L2).
 *   Fast path (cols % 32 == 0, so every row starts on a 16-byte boundary of packed): each lane
 *   loads 16 packed bytes (32 codes) per step, looks code pairs up in a 256-entry shared table of
 *   (table[hi], table[lo]), multiplies with x from shared and scales the 32-element partial sum by
 *   the chunk's absmax once. Lanes read their four 16-byte quarters of x in a rotated order so
 *   the shared-memory reads of a quarter-warp hit eight different bank groups.
 *   Other widths (e.g. 3 x 100) take a plain element-by-element path.
 *   A warp-shuffle reduction gives the row sum; lane 0 writes it.
 *   Checked against: quant::dequantize_4bit_f32 followed by an f64 matrix-vector product on the
 *   CPU (sun selftest, "gemv4" rows).
 *
 * Built without --use_fast_math: nothing here is transcendental, and IEEE denormals keep the f32
 * output equal to the CPU's product table * absmax.
 */

#include <cuda_bf16.h>
#include <stdint.h>

#define THREADS_PER_CTA 256
#define WARPS_PER_CTA (THREADS_PER_CTA / 32)
#define CHUNK_ELEMENTS 32 /* elements per 16-byte load of packed codes */

/* -------------------------------------------------------------------------------------------- */
/* absmax of one quantization block, plain or double-quantized                                   */

struct PlainAbsmax {
    const float* absmax; /* (nblocks,) */
    __device__ float operator()(int64_t block, const float* /*dyn_map*/) const {
        return __ldg(absmax + block);
    }
};

struct DoubleAbsmax {
    const uint8_t* codes;  /* (nblocks,) */
    const float* nested;   /* (ceil(nblocks / nested_blocksize),) */
    float offset;
    int64_t nested_blocksize;
    /* dyn_map: (256,) f32, in shared memory */
    __device__ float operator()(int64_t block, const float* dyn_map) const {
        return dyn_map[__ldg(codes + block)] * __ldg(nested + block / nested_blocksize) + offset;
    }
};

/* Stages the code table (and, for double quant, the dynamic map) in shared memory. */
__device__ __forceinline__ void stage_tables(const float* __restrict__ table,
                                             const float* __restrict__ dyn_map,
                                             float* table_sh, float* dyn_sh) {
    int t = threadIdx.x;
    if (t < 16) table_sh[t] = table[t];
    if (dyn_map != nullptr && t < 256) dyn_sh[t] = dyn_map[t];
}

__device__ __forceinline__ uint32_t code_at(const uint8_t* packed, int64_t e) {
    uint32_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

/* -------------------------------------------------------------------------------------------- */
/* dequantize                                                                                    */

__device__ __forceinline__ void store_out(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* out, int64_t i, float v) {
    out[i] = __float2bfloat16_rn(v);
}

/* Writes 32 values starting at out + e0 (e0 a multiple of 32, so 128-byte / 64-byte aligned). */
__device__ __forceinline__ void store_chunk(float* out, int64_t e0, const float* v) {
    float4* dst = reinterpret_cast<float4*>(out + e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
__device__ __forceinline__ void store_chunk(__nv_bfloat16* out, int64_t e0, const float* v) {
    uint4* dst = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            __nv_bfloat162 pair = __floats2bfloat162_rn(v[8 * i + 2 * j], v[8 * i + 2 * j + 1]);
            w[j] = *reinterpret_cast<uint32_t*>(&pair); /* .x (first element) in the low half */
        }
        dst[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

template <typename Absmax, typename Out>
__device__ void dequant4(const uint8_t* __restrict__ packed, const float* __restrict__ table,
                         Absmax absmax, const float* __restrict__ dyn_map, int64_t n,
                         int64_t blocksize, Out* __restrict__ out) {
    __shared__ float table_sh[16];
    __shared__ float dyn_sh[256];
    stage_tables(table, dyn_map, table_sh, dyn_sh);
    __syncthreads();

    int64_t chunk = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t e0 = chunk * CHUNK_ELEMENTS;
    if (e0 >= n) return;
    float scale = absmax(e0 / blocksize, dyn_sh);
    if (e0 + CHUNK_ELEMENTS <= n) {
        /* packed + e0 / 2 is 16-byte aligned: e0 / 2 is a multiple of 16 and the buffer base is
           at least 256-byte aligned (cuMemAlloc). */
        uint4 q = __ldg(reinterpret_cast<const uint4*>(packed + e0 / 2));
        uint32_t words[4] = {q.x, q.y, q.z, q.w};
        float v[CHUNK_ELEMENTS];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                uint32_t byte = (words[w] >> (8 * b)) & 0xFF; /* little-endian: byte 4w + b */
                v[8 * w + 2 * b] = table_sh[byte >> 4] * scale;
                v[8 * w + 2 * b + 1] = table_sh[byte & 0xF] * scale;
            }
        }
        store_chunk(out, e0, v);
    } else {
        for (int64_t e = e0; e < n; ++e) store_out(out, e, table_sh[code_at(packed, e)] * scale);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_plain_f32(const uint8_t* packed, const float* table, const float* absmax, int64_t n,
                   int64_t blocksize, float* out) {
    dequant4(packed, table, PlainAbsmax{absmax}, nullptr, n, blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_plain_bf16(const uint8_t* packed, const float* table, const float* absmax, int64_t n,
                    int64_t blocksize, __nv_bfloat16* out) {
    dequant4(packed, table, PlainAbsmax{absmax}, nullptr, n, blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_double_f32(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                    const float* dyn_map, const float* nested, float offset,
                    int64_t nested_blocksize, int64_t n, int64_t blocksize, float* out) {
    dequant4(packed, table, DoubleAbsmax{absmax_codes, nested, offset, nested_blocksize}, dyn_map,
             n, blocksize, out);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
dequant4_double_bf16(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                     const float* dyn_map, const float* nested, float offset,
                     int64_t nested_blocksize, int64_t n, int64_t blocksize, __nv_bfloat16* out) {
    dequant4(packed, table, DoubleAbsmax{absmax_codes, nested, offset, nested_blocksize}, dyn_map,
             n, blocksize, out);
}

/* -------------------------------------------------------------------------------------------- */
/* batch-1 GEMV                                                                                  */

__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) { return __uint_as_float(pair & 0xFFFF0000u); }

__device__ __forceinline__ uint32_t pick(uint4 v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename Absmax>
__device__ void gemv4(const uint8_t* __restrict__ packed, const float* __restrict__ table,
                      Absmax absmax, const float* __restrict__ dyn_map, int64_t rows, int64_t cols,
                      int64_t blocksize, const __nv_bfloat16* __restrict__ x, int x_in_shared,
                      __nv_bfloat16* __restrict__ y) {
    __shared__ float table_sh[16];
    __shared__ float dyn_sh[256];
    __shared__ float2 pair_sh[256]; /* (table[b >> 4], table[b & 15]) for every byte b */
    extern __shared__ __align__(16) uint8_t x_dynamic[];

    stage_tables(table, dyn_map, table_sh, dyn_sh);
    const uint16_t* x_bits = reinterpret_cast<const uint16_t*>(x);
    if (x_in_shared) {
        /* x (cols,) bf16 -> shared, 16 bytes at a time, then the tail one by one. */
        uint16_t* x_sh = reinterpret_cast<uint16_t*>(x_dynamic);
        int64_t vecs = cols / 8;
        for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x)
            reinterpret_cast<uint4*>(x_sh)[i] = __ldg(reinterpret_cast<const uint4*>(x_bits) + i);
        for (int64_t i = vecs * 8 + threadIdx.x; i < cols; i += blockDim.x) x_sh[i] = x_bits[i];
        x_bits = x_sh;
    }
    __syncthreads();
    {
        int t = threadIdx.x;
        if (t < 256) pair_sh[t] = make_float2(table_sh[t >> 4], table_sh[t & 0xF]);
    }
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const bool vectorised = (cols % CHUNK_ELEMENTS) == 0;
    /* Rotation of the four x quarters so a quarter-warp (8 lanes, 64-byte stride) reads eight
       distinct 16-byte bank groups. */
    const int rotation = lane + (lane >> 2);

    for (int64_t row = (int64_t)blockIdx.x * WARPS_PER_CTA + warp; row < rows;
         row += (int64_t)gridDim.x * WARPS_PER_CTA) {
        float acc = 0.0f;
        const int64_t row_start = row * cols; /* element index of W[row, 0] */
        if (vectorised) {
            const uint4* w_vec = reinterpret_cast<const uint4*>(packed + row_start / 2);
            const int64_t chunks = cols / CHUNK_ELEMENTS;
            for (int64_t c = lane; c < chunks; c += 32) {
                uint4 q = __ldg(w_vec + c); /* 32 codes of W[row, 32c .. 32c + 32) */
                float scale = absmax((row_start + c * CHUNK_ELEMENTS) / blocksize, dyn_sh);
                const uint4* xq = reinterpret_cast<const uint4*>(x_bits + c * CHUNK_ELEMENTS);
                float partial = 0.0f;
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    int quarter = (rotation + s) & 3;
                    uint4 xv = xq[quarter];               /* x[32c + 8 quarter .. + 8) */
                    uint32_t codes = pick(q, quarter);    /* 4 bytes = 8 codes */
                    uint32_t xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        float2 wv = pair_sh[(codes >> (8 * b)) & 0xFF];
                        partial = fmaf(wv.x, bf16_lo(xs[b]), partial);
                        partial = fmaf(wv.y, bf16_hi(xs[b]), partial);
                    }
                }
                acc = fmaf(scale, partial, acc);
            }
        } else {
            for (int64_t k = lane; k < cols; k += 32) {
                int64_t e = row_start + k;
                float w = table_sh[code_at(packed, e)] * absmax(e / blocksize, dyn_sh);
                acc = fmaf(w, __uint_as_float((uint32_t)x_bits[k] << 16), acc);
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
        if (lane == 0) y[row] = __float2bfloat16_rn(acc);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
gemv4_plain_bf16(const uint8_t* packed, const float* table, const float* absmax, int64_t rows,
                 int64_t cols, int64_t blocksize, const __nv_bfloat16* x, int x_in_shared,
                 __nv_bfloat16* y) {
    gemv4(packed, table, PlainAbsmax{absmax}, nullptr, rows, cols, blocksize, x, x_in_shared, y);
}

extern "C" __global__ void __launch_bounds__(THREADS_PER_CTA)
gemv4_double_bf16(const uint8_t* packed, const float* table, const uint8_t* absmax_codes,
                  const float* dyn_map, const float* nested, float offset,
                  int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                  const __nv_bfloat16* x, int x_in_shared, __nv_bfloat16* y) {
    gemv4(packed, table, DoubleAbsmax{absmax_codes, nested, offset, nested_blocksize}, dyn_map,
          rows, cols, blocksize, x, x_in_shared, y);
}
