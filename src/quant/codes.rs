//! The code tables: NF4, FP4 and the signed 8-bit dynamic code, plus the branch-free 4-bit
//! encoders that reproduce bitsandbytes' CUDA decision trees.
//!
//! Two views of each 4-bit table exist in bitsandbytes and they differ in one bit: the Python
//! table (`get_4bit_type`, what a `QuantState` carries and what [`code_table`] returns) has
//! `+0.0` for FP4 code `0b1000`, while the CUDA dequantization kernel computes that code as
//! `0.0 * -1.0 = -0.0`. Dequantization here uses the kernel's values ([`dequant_lut`]).

// The literals are copied digit for digit from bitsandbytes (functional.py and the CUDA
// kernels) so that they round to the same f32 values there and here.
#![allow(clippy::excessive_precision)]

use super::QuantType;

/// NF4 (NormalFloat4), as `bitsandbytes.functional.get_4bit_type("nf4")` and the CUDA
/// `nf4_dequantization_lut` give it.
static NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 3), normalised by its largest value 12, as
/// `get_4bit_type("fp4")` gives it (code `0b1000` is `+0.0` there).
static FP4_CODE: [f32; 16] = [
    0.0,
    0.005208333333,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
    0.0,
    -0.005208333333,
    -0.66666667,
    -1.0,
    -0.33333333,
    -0.5,
    -0.16666667,
    -0.25,
];

/// FP4 as the CUDA kernel dequantizes it: `fp4_dequantization_lut[q & 7] * sign`, so code
/// `0b1000` is `-0.0`.
static FP4_KERNEL: [f32; 16] = [
    0.0,
    0.005208333333,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
    -0.0,
    -0.005208333333,
    -0.66666667,
    -1.0,
    -0.33333333,
    -0.5,
    -0.16666667,
    -0.25,
];

/// `create_dynamic_map(signed=True)` of bitsandbytes: 256 sorted values in [-1, 1], the code of
/// the nested (double) quantization of the absmax values.
static DYNAMIC_SIGNED: [f32; 256] = [
    -0.99296874,
    -0.9789063,
    -0.96484375,
    -0.9507812,
    -0.93671876,
    -0.92265624,
    -0.9085938,
    -0.89453125,
    -0.8804687,
    -0.86640626,
    -0.85234374,
    -0.8382813,
    -0.82421875,
    -0.8101562,
    -0.79609376,
    -0.78203124,
    -0.7679688,
    -0.75390625,
    -0.7398437,
    -0.72578126,
    -0.7117188,
    -0.6976563,
    -0.68359375,
    -0.6695312,
    -0.65546876,
    -0.6414063,
    -0.6273438,
    -0.61328125,
    -0.5992187,
    -0.58515626,
    -0.5710938,
    -0.5570313,
    -0.54296875,
    -0.5289062,
    -0.5148437,
    -0.50078124,
    -0.4867187,
    -0.47265625,
    -0.45859373,
    -0.44453126,
    -0.43046874,
    -0.41640624,
    -0.40234375,
    -0.38828123,
    -0.37421876,
    -0.36015624,
    -0.34609374,
    -0.33203125,
    -0.31796873,
    -0.30390626,
    -0.28984374,
    -0.27578127,
    -0.26171875,
    -0.24765624,
    -0.23359375,
    -0.21953125,
    -0.20546874,
    -0.19140625,
    -0.17734376,
    -0.16328125,
    -0.14921875,
    -0.13515624,
    -0.12109375,
    -0.107031256,
    -0.09859375,
    -0.09578126,
    -0.092968754,
    -0.09015625,
    -0.08734375,
    -0.08453125,
    -0.08171876,
    -0.07890625,
    -0.07609375,
    -0.07328125,
    -0.070468746,
    -0.067656256,
    -0.06484375,
    -0.06203125,
    -0.059218753,
    -0.05640625,
    -0.05359375,
    -0.05078125,
    -0.04796875,
    -0.04515625,
    -0.042343747,
    -0.03953125,
    -0.036718752,
    -0.03390625,
    -0.03109375,
    -0.028281251,
    -0.02546875,
    -0.02265625,
    -0.019843752,
    -0.01703125,
    -0.01421875,
    -0.01140625,
    -0.00971875,
    -0.009156249,
    -0.00859375,
    -0.00803125,
    -0.00746875,
    -0.00690625,
    -0.00634375,
    -0.00578125,
    -0.0052187503,
    -0.0046562497,
    -0.00409375,
    -0.0035312497,
    -0.00296875,
    -0.00240625,
    -0.00184375,
    -0.0012812499,
    -9.437501e-04,
    -8.3125e-04,
    -7.1875006e-04,
    -6.062501e-04,
    -4.9375003e-04,
    -3.8125002e-04,
    -2.6875004e-04,
    -1.5625001e-04,
    -8.875e-05,
    -6.625e-05,
    -4.375e-05,
    -2.1249998e-05,
    -7.75e-06,
    -3.2500002e-06,
    -5.5000004e-07,
    0.0,
    5.5000004e-07,
    3.2500002e-06,
    7.75e-06,
    2.1249998e-05,
    4.375e-05,
    6.625e-05,
    8.875e-05,
    1.5625001e-04,
    2.6875004e-04,
    3.8125002e-04,
    4.9375003e-04,
    6.062501e-04,
    7.1875006e-04,
    8.3125e-04,
    9.437501e-04,
    0.0012812499,
    0.00184375,
    0.00240625,
    0.00296875,
    0.0035312497,
    0.00409375,
    0.0046562497,
    0.0052187503,
    0.00578125,
    0.00634375,
    0.00690625,
    0.00746875,
    0.00803125,
    0.00859375,
    0.009156249,
    0.00971875,
    0.01140625,
    0.01421875,
    0.01703125,
    0.019843752,
    0.02265625,
    0.02546875,
    0.028281251,
    0.03109375,
    0.03390625,
    0.036718752,
    0.03953125,
    0.042343747,
    0.04515625,
    0.04796875,
    0.05078125,
    0.05359375,
    0.05640625,
    0.059218753,
    0.06203125,
    0.06484375,
    0.067656256,
    0.070468746,
    0.07328125,
    0.07609375,
    0.07890625,
    0.08171876,
    0.08453125,
    0.08734375,
    0.09015625,
    0.092968754,
    0.09578126,
    0.09859375,
    0.107031256,
    0.12109375,
    0.13515624,
    0.14921875,
    0.16328125,
    0.17734376,
    0.19140625,
    0.20546874,
    0.21953125,
    0.23359375,
    0.24765624,
    0.26171875,
    0.27578127,
    0.28984374,
    0.30390626,
    0.31796873,
    0.33203125,
    0.34609374,
    0.36015624,
    0.37421876,
    0.38828123,
    0.40234375,
    0.41640624,
    0.43046874,
    0.44453126,
    0.45859373,
    0.47265625,
    0.4867187,
    0.50078124,
    0.5148437,
    0.5289062,
    0.54296875,
    0.5570313,
    0.5710938,
    0.58515626,
    0.5992187,
    0.61328125,
    0.6273438,
    0.6414063,
    0.65546876,
    0.6695312,
    0.68359375,
    0.6976563,
    0.7117188,
    0.72578126,
    0.7398437,
    0.75390625,
    0.7679688,
    0.78203124,
    0.79609376,
    0.8101562,
    0.82421875,
    0.8382813,
    0.85234374,
    0.86640626,
    0.8804687,
    0.89453125,
    0.9085938,
    0.92265624,
    0.93671876,
    0.9507812,
    0.96484375,
    0.9789063,
    0.99296874,
    1.0,
];

/// The 4-bit code table of `q`, exactly as bitsandbytes' Python side holds it (the `code` of a
/// `QuantState`).
pub fn code_table(q: QuantType) -> &'static [f32; 16] {
    match q {
        QuantType::Nf4 => &NF4_CODE,
        QuantType::Fp4 => &FP4_CODE,
    }
}

/// The values the CUDA dequantization kernel multiplies by the block's absmax (differs from
/// [`code_table`] only in the sign of FP4's zero at code `0b1000`).
pub(crate) fn dequant_lut(q: QuantType) -> &'static [f32; 16] {
    match q {
        QuantType::Nf4 => &NF4_CODE,
        QuantType::Fp4 => &FP4_KERNEL,
    }
}

/// bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`), used for the
/// nested quantization of the absmax values.
pub fn dynamic_code_signed() -> &'static [f32; 256] {
    &DYNAMIC_SIGNED
}

/// The 15 decision thresholds of `dQuantizeNF4`, ascending. The CUDA kernel walks them as a
/// binary tree; the code it reaches is the number of thresholds strictly below `x`, which is
/// what [`encode_nf4`] counts (NaN passes no comparison and gets code 0, as in the tree).
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The 7 magnitude thresholds of `dQuantizeFP4`, ascending.
const FP4_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];

/// FP4 code (without sign) of the n-th magnitude interval: codes are not monotone in value.
const FP4_CODE_BY_RANK: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// The 4-bit code bitsandbytes' CUDA kernel assigns to a normalised value `x` (an element
/// times the reciprocal of its block's absmax): `dQuantizeNF4` / `dQuantizeFP4`, with the
/// flush-to-zero of the fast-math build.
pub fn encode_4bit(quant_type: QuantType, x: f32) -> u8 {
    match quant_type {
        QuantType::Nf4 => encode_nf4(x),
        QuantType::Fp4 => encode_fp4(x),
    }
}

/// NF4 code of a normalised value (`x / absmax`), exactly as `dQuantizeNF4` decides it.
#[inline(always)]
pub(crate) fn encode_nf4(x: f32) -> u8 {
    let mut code = 0u8;
    for t in NF4_THRESHOLDS {
        code += u8::from(x > t);
    }
    code
}

/// FP4 code of a normalised value, exactly as `dQuantizeFP4` decides it under the CUDA
/// build's flush-to-zero: a negative value too small to be a normal f32 has been flushed to
/// `-0.0` by the multiply and so gets no sign bit.
#[inline(always)]
pub(crate) fn encode_fp4(x: f32) -> u8 {
    let sign = if x <= -f32::MIN_POSITIVE { 0b1000 } else { 0 };
    let magnitude = x.abs();
    let mut rank = 0usize;
    for t in FP4_THRESHOLDS {
        rank += usize::from(magnitude > t);
    }
    FP4_CODE_BY_RANK[rank] | sign
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::SafeTensors;
    use std::path::Path;

    /// The f32 bits of tensor `name` of the float32 bitsandbytes fixture.
    fn fixture_bits(name: &str) -> Vec<u32> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bnb4/bnb4_s1_float32.safetensors");
        let file = SafeTensors::open(&path).unwrap();
        let view = file.tensor(name).unwrap();
        view.bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn tables_match_bitsandbytes() {
        // Case 0 is NF4, case 3 FP4, case 2 double-quantized (see the fixture README).
        assert_eq!(bits(code_table(QuantType::Nf4)), fixture_bits("case0.code"));
        assert_eq!(bits(code_table(QuantType::Fp4)), fixture_bits("case3.code"));
        assert_eq!(
            bits(dynamic_code_signed()),
            fixture_bits("case2.nested_code")
        );
    }

    #[test]
    fn kernel_lut_differs_only_in_the_sign_of_fp4_zero() {
        assert_eq!(dequant_lut(QuantType::Nf4), code_table(QuantType::Nf4));
        for (i, (k, p)) in FP4_KERNEL.iter().zip(&FP4_CODE).enumerate() {
            let expect = if i == 8 {
                (-0.0f32).to_bits()
            } else {
                p.to_bits()
            };
            assert_eq!(k.to_bits(), expect, "code {i}");
        }
    }

    #[test]
    fn every_code_value_encodes_to_its_own_code() {
        for q in [QuantType::Nf4, QuantType::Fp4] {
            for (i, &v) in dequant_lut(q).iter().enumerate() {
                // FP4's -0.0 compares as zero (code 0); code 8 is for small negative values.
                let v = if q == QuantType::Fp4 && i == 8 {
                    -0.001
                } else {
                    v
                };
                assert_eq!(usize::from(encode_4bit(q, v)), i, "{q} code {i} ({v})");
            }
        }
    }
}
