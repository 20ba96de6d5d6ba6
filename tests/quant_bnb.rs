//! Bit-exactness against bitsandbytes 0.50.2 on CUDA: every case of tests/fixtures/bnb4
//! (made on an H200 by `quantize_4bit` / `dequantize_4bit`; see the README there), compared
//! bit for bit:
//! - absmax (or nested codes, nested absmax and offset), shape and the code tables: exact;
//! - dequantizing bitsandbytes' own packed codes and state: exact, every dtype;
//! - packed codes: exact, except elements that sit within one ulp of an FP4 decision
//!   threshold, where the GPU's approximate reciprocal (`rcp.approx`, fast-math) and our IEEE
//!   `1/absmax` differ by an ulp. Each such element must be explained by that (the GPU's code
//!   is what the neighbouring reciprocal gives) and is counted and printed; anything else fails.

use std::path::Path;
use sun_assistant::formats::safetensors::SafeTensors;
use sun_assistant::quant::{
    code_table, dequantize_4bit, dynamic_code_signed, encode_4bit, quantize_4bit, Absmax,
    DoubleQuant, QuantState, QuantType,
};
use sun_assistant::tensor::{DType, TensorView};

fn f32_bits(view: &TensorView) -> Vec<u32> {
    assert_eq!(view.dtype, DType::F32);
    view.bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Index and value of the first difference, for the failure message.
fn first_difference<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != {}", got.len(), want.len()));
    }
    let diffs = got.iter().zip(want).filter(|(a, b)| a != b).count();
    got.iter().zip(want).position(|(a, b)| a != b).map(|i| {
        format!(
            "{diffs} differ, first at [{i}]: {:?} != {:?}",
            got[i], want[i]
        )
    })
}

/// Checks every case of one fixture file; returns a line per mismatch.
fn check_file(name: &str) -> (usize, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bnb4")
        .join(name);
    let file = SafeTensors::open(&path).expect("fixture opens");
    let cases: serde_json::Value =
        serde_json::from_str(&file.metadata()["cases"]).expect("cases metadata is JSON");
    let cases = cases.as_array().expect("cases is a list");
    let mut failures = Vec::new();
    let mut rcp_elements = 0;
    for case in cases {
        let i = case["case"].as_u64().expect("case index");
        let quant_type = QuantType::from_name(case["quant_type"].as_str().unwrap()).unwrap();
        let blocksize = case["blocksize"].as_u64().unwrap() as usize;
        let double_quant = case["double_quant"].as_bool().unwrap();
        let label = format!("{name} case {i} ({case})");
        let t = |field: &str| {
            file.tensor(&format!("case{i}.{field}"))
                .expect("fixture tensor")
        };
        let input = t("input");
        let q = quantize_4bit(input, quant_type, blocksize, double_quant).expect("quantizes");
        let mut fail = |what: &str, diff: Option<String>| {
            if let Some(d) = diff {
                failures.push(format!("{label}: {what}: {d}"));
            }
        };
        let want_packed = t("packed").bytes;
        let explained = reciprocal_ulp_differences(&q.packed, want_packed, &input, &q.state);
        match explained {
            Ok(n) => rcp_elements += n,
            Err(e) => fail("packed", Some(e)),
        }
        fail(
            "code",
            first_difference(&bits(code_table(quant_type)), &f32_bits(&t("code"))),
        );
        match &q.state.absmax {
            Absmax::Plain(absmax) => {
                assert!(!double_quant, "{label}: plain absmax for double quant");
                fail(
                    "absmax",
                    first_difference(&bits(absmax), &f32_bits(&t("absmax"))),
                );
            }
            Absmax::Double(dq) => {
                assert!(double_quant, "{label}: double absmax without double quant");
                fail(
                    "absmax codes",
                    first_difference(&dq.codes, t("absmax").bytes),
                );
                fail(
                    "nested_absmax",
                    first_difference(&bits(&dq.nested_absmax), &f32_bits(&t("nested_absmax"))),
                );
                fail(
                    "offset",
                    first_difference(&[dq.offset.to_bits()], &f32_bits(&t("offset"))),
                );
                fail(
                    "nested_code",
                    first_difference(&bits(dynamic_code_signed()), &f32_bits(&t("nested_code"))),
                );
                let nested = case["nested_blocksize"].as_u64().unwrap() as usize;
                fail(
                    "nested_blocksize",
                    (dq.nested_blocksize != nested).then(|| format!("{}", dq.nested_blocksize)),
                );
            }
        }
        // Dequantize bitsandbytes' own packed codes and state.
        let want = t("dequant");
        let absmax = if double_quant {
            Absmax::Double(DoubleQuant {
                codes: t("absmax").bytes.to_vec(),
                nested_absmax: f32_values(&t("nested_absmax")),
                offset: f32_values(&t("offset"))[0],
                nested_blocksize: case["nested_blocksize"].as_u64().unwrap() as usize,
            })
        } else {
            Absmax::Plain(f32_values(&t("absmax")))
        };
        let bnb_state = QuantState {
            absmax,
            ..q.state.clone()
        };
        let ours = dequantize_4bit(want_packed, &bnb_state, want.dtype).expect("dequantizes");
        fail("dequant", first_difference(&ours, want.bytes));
        cases_checked_shape(&label, &q.state.shape, input.shape, &mut failures);
    }
    if rcp_elements > 0 {
        eprintln!("{name}: {rcp_elements} element(s) one reciprocal ulp from bitsandbytes' code");
    }
    (cases.len(), failures)
}

fn f32_values(view: &TensorView) -> Vec<f32> {
    f32_bits(view).into_iter().map(f32::from_bits).collect()
}

/// Neighbouring f32 values (one ulp towards and away from zero) of a positive finite `x`.
fn neighbours(x: f32) -> [f32; 2] {
    [
        f32::from_bits(x.to_bits() - 1),
        f32::from_bits(x.to_bits() + 1),
    ]
}

/// Ok(number of differing elements) when every element whose code differs is one that the
/// GPU's reciprocal, one ulp off ours, explains; Err(description) otherwise.
fn reciprocal_ulp_differences(
    got: &[u8],
    want: &[u8],
    input: &TensorView,
    state: &QuantState,
) -> Result<usize, String> {
    if got.len() != want.len() {
        return Err(format!("length {} != {}", got.len(), want.len()));
    }
    let mut x = vec![0f32; input.numel()];
    sun_assistant::tensor::bytes_to_f32(input.dtype, input.bytes, &mut x).expect("float input");
    let scales = match &state.absmax {
        Absmax::Plain(v) => v.clone(),
        Absmax::Double(_) => {
            // The 4-bit pass used the plain absmax; recompute it (exact, order-free max).
            x.chunks(state.blocksize)
                .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
                .collect()
        }
    };
    let mut count = 0;
    for (byte, (&g, &w)) in got.iter().zip(want).enumerate() {
        for (shift, element) in [(4, 2 * byte), (0, 2 * byte + 1)] {
            let (gc, wc) = ((g >> shift) & 15, (w >> shift) & 15);
            if gc == wc {
                continue;
            }
            let Some(&v) = x.get(element) else {
                return Err(format!("padding nibble of byte {byte}: {gc} != {wc}"));
            };
            let inv = 1.0 / scales[element / state.blocksize];
            let explained = inv.is_finite()
                && inv > 0.0
                && neighbours(inv)
                    .iter()
                    .any(|&r| encode_4bit(state.quant_type, v * r) == wc);
            if !explained {
                return Err(format!("element {element} ({v}): code {gc} != {wc}"));
            }
            count += 1;
        }
    }
    Ok(count)
}

fn cases_checked_shape(label: &str, got: &[usize], want: &[usize], failures: &mut Vec<String>) {
    if got != want {
        failures.push(format!("{label}: shape {got:?} != {want:?}"));
    }
}

fn run(name: &str) {
    let (count, failures) = check_file(name);
    assert_eq!(count, 42, "{name}: expected 42 cases");
    for f in &failures {
        eprintln!("MISMATCH {f}");
    }
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches (listed above)",
        failures.len()
    );
}

#[test]
fn float32_cases_are_bit_exact() {
    run("bnb4_s1_float32.safetensors");
}

#[test]
fn bfloat16_cases_are_bit_exact() {
    run("bnb4_s1_bfloat16.safetensors");
}

#[test]
fn float16_cases_are_bit_exact() {
    run("bnb4_s1_float16.safetensors");
}
