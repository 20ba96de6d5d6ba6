//! Flush-to-zero, as CUDA's `--use_fast_math` (`-ftz=true`) applies it to f32 arithmetic.

/// `x` with a subnormal value replaced by a zero of the same sign (NaN and normal values pass).
#[inline(always)]
pub(crate) fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// The f32 product `a * b` under flush-to-zero: subnormal operands and a subnormal result
/// become signed zeros.
#[inline(always)]
pub(crate) fn mul(a: f32, b: f32) -> f32 {
    flush(flush(a) * flush(b))
}

/// The GPU's `rcp.approx.ftz.f32` against the correctly rounded reciprocal, for every mantissa
/// of [1, 2): two bits each (entry i at bit 2 (i % 4) of byte i / 4): 0 equal, 1 one ulp above,
/// 2 one ulp below. Measured on an H200 by `sun selftest --write-rcp-table` (ptx/rcp.cu); the
/// instruction's result for m 2^e is its result for m, scaled by 2^-e.
static RCP_APPROX: &[u8; 1 << 21] = include_bytes!("rcp_approx.bin");

/// `1/x` as bitsandbytes' fast-math kernels compute it: `rcp.approx.ftz.f32`, i.e. the
/// correctly rounded reciprocal of the flushed operand moved by the measured ulp of its
/// mantissa, then flushed.
#[inline(always)]
pub(crate) fn recip(x: f32) -> f32 {
    let x = flush(x);
    let exact = 1.0 / x;
    if !exact.is_normal() || !x.is_normal() {
        return flush(exact);
    }
    let mantissa = (x.to_bits() & 0x007f_ffff) as usize;
    let bits = exact.to_bits();
    let adjusted = match (RCP_APPROX[mantissa / 4] >> (2 * (mantissa % 4))) & 3 {
        1 => bits + 1,
        2 => bits - 1,
        _ => bits,
    };
    flush(f32::from_bits(adjusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_become_signed_zeros() {
        let tiny = f32::MIN_POSITIVE / 2.0;
        assert_eq!(flush(tiny).to_bits(), 0.0f32.to_bits());
        assert_eq!(flush(-tiny).to_bits(), (-0.0f32).to_bits());
        assert_eq!(flush(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
        assert!(flush(f32::NAN).is_nan());
        assert_eq!(mul(tiny, 1e30), 0.0);
        assert_eq!(mul(1e-20, 1e-20), 0.0);
        assert_eq!(recip(f32::MAX).to_bits(), 0.0f32.to_bits());
        assert_eq!(recip(-f32::MAX).to_bits(), (-0.0f32).to_bits());
        assert_eq!(recip(0.0), f32::INFINITY);
    }

    #[test]
    fn reciprocal_is_within_an_ulp_and_scale_invariant() {
        let mut differs = 0;
        for i in (0..1u32 << 23).step_by(977) {
            let m = f32::from_bits(0x3f80_0000 | i);
            let r = recip(m);
            let exact = 1.0 / m;
            assert!(
                r.to_bits().abs_diff(exact.to_bits()) <= 1,
                "{m}: {r} vs {exact}"
            );
            differs += usize::from(r != exact);
            // Same mantissa, other exponents: the same relative result.
            assert_eq!(recip(m * 1024.0), r / 1024.0);
            assert_eq!(recip(m / 8.0), r * 8.0);
        }
        assert!(differs > 0, "the table moves some reciprocals");
        assert_eq!(recip(2.0), 0.5);
    }
}
