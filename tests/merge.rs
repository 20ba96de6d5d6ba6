//! `merge` folds an adapter into the base: the merged model's logits equal the base model's
//! with the adapter applied unmerged (dense base; and NF4 base, as QLoRA trained it).

use std::path::{Path, PathBuf};
use sun_assistant::merge::merge;
use sun_assistant::model::{Llama, LoadOptions};
use sun_assistant::tensor::DType;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(ids.len());
    model.forward(ids, &mut cache, false).unwrap()
}

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let err: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    err / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn merged_model_equals_base_plus_adapter() {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 256).collect();
    let base = fixture("tiny_llama/untied");
    let adapter = fixture("lora_grad/plain");
    for quantize in [false, true] {
        let out = std::env::temp_dir().join(format!("sun-merge-{}-{quantize}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let merged = merge(&base, &adapter, &out, DType::F32, !quantize, true).unwrap();
        assert_eq!(merged, 14, "2 layers x 7 modules");
        let mut unmerged = Llama::load(
            &base,
            &LoadOptions {
                quiet: true,
                quantize,
            },
        )
        .unwrap();
        unmerged.attach_adapter(&adapter).unwrap();
        let merged_model = Llama::load(
            &out,
            &LoadOptions {
                quiet: true,
                quantize: false,
            },
        )
        .unwrap();
        let plain = Llama::load(
            &base,
            &LoadOptions {
                quiet: true,
                quantize,
            },
        )
        .unwrap();
        let (want, got) = (logits(&unmerged, &ids), logits(&merged_model, &ids));
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "quantize {quantize}: merged vs unmerged {err}");
        assert!(
            relative_error(&logits(&plain, &ids), &want) > 1e-3,
            "the adapter changes the logits"
        );
        let config = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(!config.contains("quantization_config") && config.contains("float32"));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The NF4 model equals the dense model given the same dequantized weights (which is what
/// transformers computes from them: the dense path matches it to ~1e-6, tests/llama_parity.rs),
/// and a bitsandbytes folder written by `sun quantize` loads as the same 4-bit model.
#[test]
fn nf4_model_equals_dense_model_on_dequantized_weights() {
    use sun_assistant::quant::QuantType;
    use sun_assistant::quantize_model::{dequantize_path, quantize_path, QuantizeOptions};
    let ids: Vec<u32> = (0..24).map(|i| (i * 53 + 7) % 256).collect();
    let base = fixture("tiny_llama/untied");
    let dir = std::env::temp_dir().join(format!("sun-nf4-dense-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (q, d) = (dir.join("q"), dir.join("d"));
    let opts = QuantizeOptions {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant: true,
    };
    quantize_path(&base, &q, opts, true).unwrap();
    dequantize_path(&q, &d, Some(DType::F32), true).unwrap();
    let nf4 = Llama::load(
        &base,
        &LoadOptions {
            quiet: true,
            quantize: true,
        },
    )
    .unwrap();
    let from_bnb = Llama::load(
        &q,
        &LoadOptions {
            quiet: true,
            quantize: true,
        },
    )
    .unwrap();
    let dense = Llama::load(
        &d,
        &LoadOptions {
            quiet: true,
            quantize: false,
        },
    )
    .unwrap();
    let want = logits(&dense, &ids);
    for (name, model) in [
        ("quantized at load", &nf4),
        ("bitsandbytes folder", &from_bnb),
    ] {
        let err = relative_error(&logits(model, &ids), &want);
        assert!(err < 1e-5, "{name}: {err}");
        let one = relative_error(&logits(model, &ids[..1]), &logits(&dense, &ids[..1]));
        assert!(one < 1e-5, "{name}, one token (the 4-bit GEMV path): {one}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
