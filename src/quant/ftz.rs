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

/// `1/x` under flush-to-zero (exact IEEE reciprocal of the flushed operand, flushed result).
#[inline(always)]
pub(crate) fn recip(x: f32) -> f32 {
    flush(1.0 / flush(x))
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
}
