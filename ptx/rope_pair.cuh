/*
 * rope_pair.cuh: the rotation of one RoPE pair with its rounding points spelled out (included,
 * not compiled alone). Shared by rope.cu (every RoPE kernel) and attention.cu (the fused decode
 * step, which rotates q and the new key itself), so both write the same bits.
 *
 *   rotate_pair<Backward>(a, b, c, sn, r1, r2): the pair (x1, x2) = (a, b) rotated by the angle
 *   with cosine c and sine sn: forward (x1', x2') = (a c - b sn, b c + a sn), backward the
 *   rotation by minus the angle. The roundings are the ones nvcc chose for the plain
 *   expressions before rope.cu's vector path (forward: a c and b sn rounded, the second product
 *   fused; backward, where the sine's negation folds away: a c fused into b sn, the second from
 *   two rounded products).
 */
#pragma once

template <bool Backward>
__device__ __forceinline__ void rotate_pair(float a, float b, float c, float sn, float& r1,
                                            float& r2) {
    if (Backward) {
        r1 = __fmaf_rn(a, c, __fmul_rn(b, sn));
        r2 = __fsub_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
    } else {
        r1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        r2 = __fmaf_rn(a, sn, __fmul_rn(b, c));
    }
}
