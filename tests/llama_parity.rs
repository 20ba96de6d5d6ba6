//! The CPU decoder against transformers on the tiny models of tests/fixtures/tiny_llama
//! (made by make_fixture.py there): logits, KV-cache decoding, greedy generation, perplexity.

use serde_json::Value;
use std::path::{Path, PathBuf};
use sun_assistant::eval::perplexity;
use sun_assistant::formats::safetensors::SafeTensors;
use sun_assistant::model::{Llama, LoadOptions};
use sun_assistant::sampling::{generate, Sampler, SamplingParams, StopReason};

const MODELS: [&str; 2] = ["untied", "tied_llama3"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny_llama")
        .join(name)
}

fn load(name: &str) -> Llama {
    Llama::load(
        &fixture(name),
        &LoadOptions {
            quiet: true,
            quantize: false,
        },
    )
    .expect("fixture model loads")
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn reference_logits(name: &str) -> Vec<f32> {
    let file = SafeTensors::open(&fixture(name).join("reference.safetensors")).unwrap();
    file.tensor("logits")
        .unwrap()
        .to_f32("logits")
        .unwrap()
        .into_owned()
}

/// ||got - want|| / ||want||, failing on NaN.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let model = load(name);
        let tokens = ids(&reference(name)["tokens"]);
        let mut cache = model.new_cache(64);
        let logits = model.forward(&tokens, &mut cache, false).unwrap();
        let err = relative_error(&logits, &reference_logits(name));
        eprintln!("{name}: relative error of the logits {err:.2e}");
        assert!(err <= 1e-4, "{name}: relative error {err}");
        assert_eq!(cache.len(), tokens.len());
    }
}

#[test]
fn kv_cache_decoding_matches_the_full_pass() {
    for name in MODELS {
        let model = load(name);
        let tokens = ids(&reference(name)["tokens"]);
        let vocab = model.config.vocab_size;
        let full = model
            .forward(&tokens, &mut model.new_cache(tokens.len()), false)
            .unwrap();
        // prefill 10, a chunk of 7, then one token at a time
        let mut cache = model.new_cache(tokens.len());
        let mut pieces = model.forward(&tokens[..10], &mut cache, false).unwrap();
        pieces.extend(model.forward(&tokens[10..17], &mut cache, false).unwrap());
        for &t in &tokens[17..] {
            pieces.extend(model.forward(&[t], &mut cache, false).unwrap());
        }
        let err = relative_error(&pieces, &full);
        assert!(err <= 1e-6, "{name}: incremental vs full {err}");
        assert!(relative_error(&pieces, &reference_logits(name)) <= 1e-4);
        // last_only returns the last row
        let mut cache = model.new_cache(tokens.len());
        let last = model.forward(&tokens, &mut cache, true).unwrap();
        assert_eq!(last.len(), vocab);
        assert!(relative_error(&last, &full[full.len() - vocab..]) <= 1e-6);
        // the cache is full now
        let err = model
            .forward(&[1], &mut cache, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit the context"), "{err}");
        assert_eq!(
            cache.len(),
            tokens.len(),
            "a refused forward leaves the cache alone"
        );
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let prompt = ids(&r["greedy"]["prompt"]);
        let want = ids(&r["greedy"]["continuation"]);
        let max_new = r["greedy"]["max_new_tokens"].as_u64().unwrap() as usize;
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut streamed = Vec::new();
        let mut cache = model.new_cache(64);
        let out = generate(
            &model,
            &mut cache,
            &prompt,
            max_new,
            &[],
            &mut sampler,
            |id| {
                streamed.push(id);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out.tokens, want, "{name}");
        assert_eq!(streamed, want);
        assert_eq!(out.stop, StopReason::MaxNewTokens);
        assert_eq!(cache.len(), prompt.len() + want.len() - 1);

        // transformers stops on (and returns) the eos id; ours stops without returning it
        let eos = r["greedy_eos"]["eos_token_id"].as_u64().unwrap() as u32;
        let stopped = ids(&r["greedy_eos"]["continuation"]);
        let mut cache = model.new_cache(64);
        let out = generate(
            &model,
            &mut cache,
            &prompt,
            max_new,
            &[999, eos],
            &mut sampler,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(out.stop, StopReason::Eos(eos));
        assert_eq!(out.tokens, stopped[..stopped.len() - 1]);

        // a context that fills up mid-way
        let mut cache = model.new_cache(prompt.len() + 3);
        let out = generate(
            &model,
            &mut cache,
            &prompt,
            max_new,
            &[],
            &mut sampler,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(out.stop, StopReason::ContextFull);
        assert_eq!(out.tokens, want[..4]);
    }
}

#[test]
fn generation_refuses_a_prompt_longer_than_the_context() {
    let model = load("untied");
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut cache = model.new_cache(4);
    let err = generate(
        &model,
        &mut cache,
        &[5; 5],
        3,
        &[],
        &mut sampler,
        |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the prompt has 5 tokens") && err.contains("room for 4"),
        "{err}"
    );
    let err = model
        .forward(&[3, 256], &mut cache, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token id 256"), "{err}");
}

#[test]
fn perplexity_matches_transformers() {
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let want = &r["perplexity"];
        let ctx = want["ctx"].as_u64().unwrap() as usize;
        let stride = want["stride"].as_u64().unwrap() as usize;
        let mut calls = Vec::new();
        let got = perplexity(&model, &ids(&r["tokens"]), ctx, stride, |done, total| {
            calls.push((done, total))
        })
        .unwrap();
        let want_nll = want["mean_nll"].as_f64().unwrap();
        eprintln!(
            "{name}: mean NLL {} (transformers {want_nll})",
            got.mean_nll
        );
        assert_eq!(got.tokens as u64, want["tokens"].as_u64().unwrap());
        assert!(
            (got.mean_nll - want_nll).abs() <= 1e-5 * want_nll,
            "{name}: {} vs {want_nll}",
            got.mean_nll
        );
        assert!((got.perplexity / want["perplexity"].as_f64().unwrap() - 1.0).abs() < 1e-4);
        assert_eq!(calls.last(), Some(&(4, 4)));
    }
}

/// A scratch copy of a fixture folder with an edited config.json; `tag` keeps the copies of
/// tests running in parallel apart.
fn copy_with_config(name: &str, tag: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sun-llama-{name}-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture(name).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn loading_names_the_tensor_at_fault() {
    let dir = copy_with_config("untied", "ffn", |c| c["intermediate_size"] = 150.into());
    let err = Llama::load(
        &dir,
        &LoadOptions {
            quiet: true,
            quantize: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[156, 64]")
            && err.contains("expected [150, 64]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = copy_with_config("untied", "layers", |c| c["num_hidden_layers"] = 3.into());
    let err = Llama::load(
        &dir,
        &LoadOptions {
            quiet: true,
            quantize: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"model.layers.2.input_layernorm.weight\" is missing"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each fixture rewritten as two bf16 shards with an index, as large checkpoints come; the
/// reference is transformers on the same model with every weight rounded to bf16.
#[test]
fn loads_sharded_bf16_weights() {
    use std::collections::BTreeMap;
    use sun_assistant::formats::safetensors::{write_file, OwnedTensor};
    use sun_assistant::tensor::{f32_to_bytes, DType};

    for name in MODELS {
        let dir = copy_with_config(name, "bf16", |_| {});
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let source = SafeTensors::open(&fixture(name).join("model.safetensors")).unwrap();
        let shard_name = |i: usize| format!("model-{:05}-of-00002.safetensors", i + 1);
        let mut shards: [Vec<OwnedTensor>; 2] = [Vec::new(), Vec::new()];
        let mut weight_map = serde_json::Map::new();
        for (i, info) in source.tensors().iter().enumerate() {
            let values = source.view(info).to_f32(&info.name).unwrap();
            let bytes = f32_to_bytes(&values, DType::BF16);
            let tensor = OwnedTensor::new(&info.name, DType::BF16, info.shape.clone(), bytes);
            shards[i % 2].push(tensor.unwrap());
            weight_map.insert(info.name.clone(), shard_name(i % 2).into());
        }
        for (i, shard) in shards.iter().enumerate() {
            write_file(&dir.join(shard_name(i)), shard, &BTreeMap::new()).unwrap();
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

        let model = Llama::load(
            &dir,
            &LoadOptions {
                quiet: true,
                quantize: false,
            },
        )
        .unwrap();
        let tokens = ids(&reference(name)["tokens"]);
        let logits = model
            .forward(&tokens, &mut model.new_cache(64), false)
            .unwrap();
        let file = SafeTensors::open(&fixture(name).join("reference.safetensors")).unwrap();
        let want = file.tensor("logits_bf16_weights").unwrap();
        let want = want.to_f32("logits_bf16_weights").unwrap();
        let err = relative_error(&logits[logits.len() - want.len()..], &want);
        eprintln!("{name}: bf16 weights: relative error of the logits {err:.2e}");
        assert!(err <= 1e-4, "{name}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
