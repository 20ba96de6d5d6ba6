//! `sun quantize` writes the layout transformers + bitsandbytes write.
//!
//! Reference: tests/fixtures/bnb_layout/reference/, tiny_llama/untied loaded with
//! BitsAndBytesConfig(nf4, double quant) and saved by transformers (make_fixture.py there).

use serde_json::Value;
use std::path::{Path, PathBuf};
use sun_assistant::formats::bnb;
use sun_assistant::formats::safetensors::ModelWeights;
use sun_assistant::quant::{dequantize_4bit_f32, QuantType};
use sun_assistant::quantize_model::{quantize_path, QuantizeOptions};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn quant_state(weights: &ModelWeights, name: &str) -> serde_json::Map<String, Value> {
    let bytes = weights.tensor(name).unwrap().bytes;
    serde_json::from_slice::<Value>(bytes)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

#[test]
fn quantized_folder_matches_transformers_and_bitsandbytes() {
    let out = std::env::temp_dir().join(format!("sun-bnb-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opts = QuantizeOptions {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
    };
    quantize_path(&fixture("tiny_llama/untied"), &out, opts, true).unwrap();

    let ours = ModelWeights::open(&out).unwrap();
    let theirs = ModelWeights::open(&fixture("bnb_layout/reference")).unwrap();
    let mut our_names: Vec<&str> = ours.names().collect();
    let mut their_names: Vec<&str> = theirs.names().collect();
    our_names.sort();
    their_names.sort();
    assert_eq!(our_names, their_names, "tensor names differ");

    for name in their_names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!(a.dtype, b.dtype, "{name}: dtype");
        if name.contains(".quant_state.") {
            // JSON bytes: equal fields; the offset is a mean that bitsandbytes' CPU backend
            // (which made this reference) sums in another order than CUDA, which we follow.
            let weight = bnb::weight_of_quant_state(name).unwrap();
            let dequant = |w: &ModelWeights| {
                let (packed, state) = bnb::read_quantized(w, weight).unwrap();
                let mut out = vec![0f32; state.numel()];
                dequantize_4bit_f32(packed, &state, &mut out).unwrap();
                out
            };
            let (da, db) = (dequant(&ours), dequant(&theirs));
            let err: f64 = da
                .iter()
                .zip(&db)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = db.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                err <= 1e-4 * norm,
                "{weight}: dequantized weights differ by {err} (norm {norm})"
            );
            let (qa, qb) = (quant_state(&ours, name), quant_state(&theirs, name));
            assert_eq!(
                qa.keys().collect::<Vec<_>>(),
                qb.keys().collect::<Vec<_>>(),
                "{name}: fields and their order"
            );
            for (k, va) in &qa {
                let vb = &qb[k];
                if k == "nested_offset" {
                    let (x, y) = (va.as_f64().unwrap(), vb.as_f64().unwrap());
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "{name}: nested_offset {x} vs {y}"
                    );
                } else {
                    assert_eq!(va, vb, "{name}: {k}");
                }
            }
            continue;
        }
        assert_eq!(a.shape, b.shape, "{name}: shape");
        if name.ends_with(".absmax") || name.ends_with(".nested_absmax") {
            // The double-quantized scales follow the offset's last bit (see above), which can
            // move an 8-bit code across a boundary; they are compared dequantized, below.
            continue;
        }
        assert!(a.bytes == b.bytes, "{name}: bytes differ");
    }

    let config = |dir: &Path| -> Value {
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        v["quantization_config"].clone()
    };
    assert_eq!(config(&out), config(&fixture("bnb_layout/reference")));
    std::fs::remove_dir_all(&out).unwrap();
}
