//! End-to-end tests of `sun import-gguf` against transformers' own GGUF loader: a tiny llama
//! GGUF made by tests/fixtures/gguf/make_fixtures.py (expected tensors, config and tokenizer
//! saved there from transformers), and the real SmolLM2 file when SUN_SMOLLM2_GGUF names it.

use half::bf16;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use sun_assistant::formats::safetensors::SafeTensors;
use sun_assistant::gguf_import::{import_gguf, ImportOptions};
use sun_assistant::tensor::DType;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sun-gguf-import-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().to_f32(name).unwrap().into_owned()
}

#[test]
fn tiny_llama_matches_transformers() {
    let tmp = TempDir::new("tiny");
    let out = tmp.0.join("model");
    let options = ImportOptions {
        dtype: DType::F32,
        quiet: true,
    };
    let summary = import_gguf(&fixture("tiny_llama.gguf"), &out, options).unwrap();
    assert_eq!(summary.tensors, 21);

    // Tensors: bit-exact with transformers' f32 state_dict (Q/K un-permuted).
    let ours = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    let want = SafeTensors::open(&fixture("tiny_llama_expected.safetensors")).unwrap();
    let mut names: Vec<&str> = ours.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut want_names: Vec<&str> = want.tensors().iter().map(|t| t.name.as_str()).collect();
    names.sort();
    want_names.sort();
    assert_eq!(names, want_names);
    for name in names {
        assert_eq!(ours.info(name).unwrap().dtype, DType::F32);
        assert_eq!(
            ours.info(name).unwrap().shape,
            want.info(name).unwrap().shape,
            "{name}"
        );
        let (a, b) = (f32s(&ours, name), f32s(&want, name));
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs from transformers");
    }

    // Config: every field transformers derives.
    let cfg = read_json(&out.join("config.json"));
    let want_cfg = read_json(&fixture("tiny_llama_expected_config.json"));
    for (k, v) in want_cfg.as_object().unwrap() {
        if k == "rms_norm_eps" {
            // transformers keeps the f32 value (9.99999997e-07); we write the decimal 1e-06.
            let (a, b) = (cfg[k].as_f64().unwrap(), v.as_f64().unwrap());
            assert!(
                (a - b).abs() < 1e-12 * b.abs().max(1.0) && a == 1e-6,
                "{k}: {a} vs {b}"
            );
        } else {
            assert_eq!(&cfg[k], v, "config {k}");
        }
    }
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["rope_scaling"]["rope_type"], "linear");
    assert_eq!(cfg["rope_scaling"]["factor"], 2.0);

    // Tokenizer: the same tokenizer.json transformers builds from the file.
    let tok = read_json(&out.join("tokenizer.json"));
    let want_tok = read_json(&fixture("tiny_llama_expected_tokenizer.json"));
    for k in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "model",
    ] {
        assert_eq!(tok[k], want_tok[k], "tokenizer.json {k}");
    }
    let tok_cfg = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tok_cfg["bos_token"], "<|im_start|>");
    assert_eq!(tok_cfg["eos_token"], "<|im_end|>");
    assert_eq!(tok_cfg["pad_token"], "<|endoftext|>");
    assert_eq!(tok_cfg["add_bos_token"], true);
    assert_eq!(tok_cfg["model_max_length"], 128);
    assert!(tok_cfg["chat_template"]
        .as_str()
        .unwrap()
        .starts_with("{% for m in messages %}"));
    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], 2);
}

#[test]
fn bf16_import_rounds_the_f32_values() {
    let tmp = TempDir::new("bf16");
    let out = tmp.0.join("model");
    import_gguf(
        &fixture("tiny_llama.gguf"),
        &out,
        ImportOptions {
            dtype: DType::BF16,
            quiet: true,
        },
    )
    .unwrap();
    let ours = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    let want = SafeTensors::open(&fixture("tiny_llama_expected.safetensors")).unwrap();
    for info in want.tensors() {
        let got = ours.tensor(&info.name).unwrap();
        assert_eq!(got.dtype, DType::BF16);
        let got = got.to_f32(&info.name).unwrap();
        for (g, w) in got.iter().zip(f32s(&want, &info.name)) {
            assert_eq!(
                g.to_bits(),
                bf16::from_f32(w).to_f32().to_bits(),
                "{}",
                info.name
            );
        }
    }
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
}

#[test]
fn cli_imports_and_refuses_bad_input() {
    let tmp = TempDir::new("cli");
    let out = tmp.0.join("model");
    let sun = env!("CARGO_BIN_EXE_sun");
    let run = |args: &[&str]| Command::new(sun).args(args).output().unwrap();

    let help = run(&["import-gguf", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("[default: bf16]"));

    let gguf = fixture("tiny_llama.gguf");
    let ok = run(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let line = String::from_utf8_lossy(&ok.stdout);
    assert!(
        line.contains("21 tensors") && line.contains("bfloat16"),
        "{line}"
    );

    let again = run(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success(), "must not overwrite");

    let bad_dtype = run(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        "x",
        "--dtype",
        "f16",
    ]);
    assert!(String::from_utf8_lossy(&bad_dtype.stderr).contains("choose bf16 or f32"));

    // A truncated file: one clear error naming it, and no output folder.
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = tmp.0.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out2 = tmp.0.join("model2");
    let bad = run(&[
        "import-gguf",
        cut.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out2.exists());
}

#[test]
fn smollm2_matches_transformers() {
    let Some(path) = std::env::var_os("SUN_SMOLLM2_GGUF") else {
        eprintln!("note: SUN_SMOLLM2_GGUF is not set; skipping the SmolLM2 import test");
        return;
    };
    let tmp = TempDir::new("smollm2");
    let out = tmp.0.join("model");
    let options = ImportOptions {
        dtype: DType::F32,
        quiet: true,
    };
    let summary = import_gguf(Path::new(&path), &out, options).unwrap();
    assert_eq!(summary.tensors, 272);

    let cfg = read_json(&out.join("config.json"));
    for (k, v) in [
        ("num_hidden_layers", 30),
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("vocab_size", 49152),
        ("head_dim", 64),
    ] {
        assert_eq!(cfg[k], v, "{k}");
    }
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["tie_word_embeddings"], true);
    let tok = read_json(&out.join("tokenizer.json"));
    assert_eq!(tok["pre_tokenizer"]["pretokenizers"][0]["type"], "Digits");
    assert_eq!(tok["added_tokens"].as_array().unwrap().len(), 17);

    // Values recorded from transformers' GGUF load (make_fixtures.py): bit-exact.
    let ours = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    let expected = read_json(&fixture("smollm2_expected.json"));
    for (name, want) in expected.as_object().unwrap() {
        let info = ours.info(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        let values = f32s(&ours, name);
        let indices = want["indices"].as_array().unwrap();
        for (i, w) in indices.iter().zip(want["values"].as_array().unwrap()) {
            let got = values[i.as_u64().unwrap() as usize];
            assert_eq!(got, w.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        let sum: f64 = values.iter().map(|&x| x as f64).sum();
        let want_sum = want["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
            "{name}: sum {sum} vs {want_sum}"
        );
    }
}
