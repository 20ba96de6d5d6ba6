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
