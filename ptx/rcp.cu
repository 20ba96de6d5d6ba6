/* rcp.cu: the GPU's approximate reciprocal, measured so the CPU quantizer can reproduce it.
 *
 * bitsandbytes is built with --use_fast_math, so its quantize kernels compute 1/absmax with
 * `rcp.approx.ftz.f32`, which may differ from the correctly rounded reciprocal by one ulp. For
 * x = m * 2^e the instruction's result is rcp(m) * 2^-e (outside the flush-to-zero range), so
 * its behaviour is fixed by the 2^23 mantissas of [1, 2).
 *
 * rcp_approx_table: thread i (of 2^23) takes x = 1 + i * 2^-23 and writes, as two bits of
 *   out[i / 4] (entry i at bit 2 * (i % 4)), bits(rcp.approx(x)) - bits(1/x correctly rounded):
 *   0 for equal, 1 for one ulp above, 2 for one ulp below, 3 for anything else.
 *   Launch: 2^23 / 4 threads, one output byte each (4 mantissas), 256 threads per CTA.
 * Checked against: the table the CPU quantizer embeds (src/quant/rcp_approx.bin, read by
 *   quant::ftz::recip), which this kernel produced.
 */
#include <stdint.h>

extern "C" __global__ void rcp_approx_table(uint8_t *out, int n_bytes) {
    int byte = blockIdx.x * blockDim.x + threadIdx.x;
    if (byte >= n_bytes) return;
    uint8_t packed = 0;
    for (int k = 0; k < 4; ++k) {
        uint32_t mantissa = (uint32_t)byte * 4u + (uint32_t)k;
        float x = __uint_as_float(0x3f800000u | mantissa);
        float approx;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(approx) : "f"(x));
        float exact = __frcp_rn(x);
        int diff = (int)__float_as_uint(approx) - (int)__float_as_uint(exact);
        uint8_t code = diff == 0 ? 0 : diff == 1 ? 1 : diff == -1 ? 2 : 3;
        packed |= (uint8_t)(code << (2 * k));
    }
    out[byte] = packed;
}
