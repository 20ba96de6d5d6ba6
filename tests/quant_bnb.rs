//! Bit-exactness against bitsandbytes 0.50.2 on CUDA: every case of tests/fixtures/bnb4
//! (made on an H200 by `quantize_4bit` / `dequantize_4bit`; see the README there), compared
//! bit for bit:
//! - absmax (or nested codes, nested absmax and offset), shape and the code tables: exact;
//! - dequantizing bitsandbytes' own packed codes and state: exact, every dtype;
//! - packed codes: exact (this needs the GPU's approximate reciprocal, which the quantizer
//!   reproduces from a table measured on the H200: see `quant::ftz::recip`).

use std::path::Path;
use sun_assistant::formats::safetensors::SafeTensors;
use sun_assistant::quant::{
    code_table, dequantize_4bit, dynamic_code_signed, quantize_4bit, Absmax, DoubleQuant,
    QuantState, QuantType,
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
        fail("packed", first_difference(&q.packed, want_packed));
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
    (cases.len(), failures)
}

fn f32_values(view: &TensorView) -> Vec<f32> {
    f32_bits(view).into_iter().map(f32::from_bits).collect()
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
