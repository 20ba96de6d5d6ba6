//! Arbitrary bytes -> (dtype, quant type, blocksize, double quant, values) -> quantize ->
//! dequantize. Never panics; for finite blocks every element comes back within half the
//! widest gap of the code table times its block's absmax (with double quantization: plus
//! the error of the dequantized absmax, itself bounded by the nested 8-bit code); NaN
//! elements get code 0 and blocks with an absmax above 2^126 dequantize to zeros (the
//! documented rules of `sun_assistant::quant`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sun_assistant::quant::{
    code_table, dequantize_4bit, dequantize_4bit_f32, dynamic_code_signed, quantize_4bit, Absmax,
    QuantType,
};
use sun_assistant::tensor::{bytes_to_f32, DType, TensorView};

/// Half the widest gap between neighbouring sorted values of `code`.
fn half_widest_gap(code: &[f32]) -> f32 {
    let mut sorted = code.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let dtype = [DType::F32, DType::BF16, DType::F16][usize::from(selector % 3)];
    let quant_type = if selector & 0x04 == 0 {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    let blocksize = 64usize << ((selector >> 3) % 7);
    let double_quant = selector & 0x80 != 0;
    let numel = body.len() / dtype.size();
    let bytes = &body[..numel * dtype.size()];
    let shape = if numel % 3 == 0 && numel > 0 {
        vec![3, numel / 3]
    } else {
        vec![numel]
    };
    let view = TensorView {
        dtype,
        shape: &shape,
        bytes,
    };

    let quantized = match quantize_4bit(view, quant_type, blocksize, double_quant) {
        Ok(q) => q,
        Err(_) => {
            assert_eq!(numel, 0, "only an empty tensor may be refused");
            return;
        }
    };
    let state = &quantized.state;
    state
        .validate(quantized.packed.len())
        .expect("a fresh state validates");
    let mut x = vec![0f32; numel];
    bytes_to_f32(dtype, bytes, &mut x).expect("float dtype");
    let mut y = vec![0f32; numel];
    dequantize_4bit_f32(&quantized.packed, state, &mut y).expect("dequantizes");
    for out in [DType::F32, DType::BF16, DType::F16] {
        let typed = dequantize_4bit(&quantized.packed, state, out).expect("dequantizes");
        assert_eq!(typed.len(), numel * out.size());
    }

    // NaN elements get code 0.
    for (i, v) in x.iter().enumerate() {
        if v.is_nan() {
            let byte = quantized.packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            assert_eq!(code, 0, "NaN element {i} got code {code}");
        }
    }

    // Error bounds, for blocks of finite values whose scales are finite.
    let plain = quantize_4bit(view, quant_type, blocksize, false).expect("quantizes");
    let Absmax::Plain(true_absmax) = &plain.state.absmax else {
        unreachable!("plain quantization gives plain absmax");
    };
    let used_absmax = state.absmax_f32();
    if let Absmax::Double(dq) = &state.absmax {
        if !dq.offset.is_finite() || dq.nested_absmax.iter().any(|v| !v.is_finite()) {
            return;
        }
        let nested_gap = half_widest_gap(dynamic_code_signed());
        for (k, (&a, &b)) in true_absmax.iter().zip(&used_absmax).enumerate() {
            let scale = dq.nested_absmax[k / dq.nested_blocksize];
            if 1.0 / scale < f32::MIN_POSITIVE {
                // The same flush at the nested level: every code is zero's, so b = offset.
                assert_eq!(b.to_bits(), (0.0 + dq.offset).to_bits(), "block {k}");
                continue;
            }
            let slack = 1e-6 * (a.abs() + dq.offset.abs()) + 2.0 * f32::MIN_POSITIVE;
            assert!(
                (a - b).abs() <= nested_gap * scale * (1.0 + 1e-6) + slack,
                "block {k}: absmax {a} came back as {b} (nested scale {scale})"
            );
        }
    }
    let gap = half_widest_gap(code_table(quant_type));
    for (k, block) in x.chunks(blocksize).enumerate() {
        let (a, b) = (true_absmax[k], used_absmax[k]);
        if block.iter().any(|v| !v.is_finite()) || !a.is_finite() || !b.is_finite() {
            continue;
        }
        if 1.0 / a < f32::MIN_POSITIVE {
            // Documented: an absmax above 2^126 has a subnormal reciprocal, which the fast-math
            // kernel flushes to zero, so every element is coded as zero.
            assert!(y[k * blocksize..][..block.len()]
                .iter()
                .all(|&w| w == 0.0 || w.is_nan()));
            continue;
        }
        let bound = gap * a + (a - b).abs() + 1e-6 * a + 2.0 * f32::MIN_POSITIVE;
        for (j, (&v, &w)) in block.iter().zip(&y[k * blocksize..]).enumerate() {
            assert!(
                (v - w).abs() <= bound,
                "block {k} element {j}: {v} came back as {w} (absmax {a}, used {b})"
            );
        }
    }
});
