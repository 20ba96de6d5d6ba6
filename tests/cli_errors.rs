//! Bad input through the `sun` binary: one clear `error:` line, a non-zero exit, and no output
//! left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn sun(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sun"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A scratch folder unique to this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sun-cli-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data_len, 1);
    v
}

/// Asserts a failure with exactly one stderr line that starts with "error:" and holds `want`.
fn assert_one_error(result: (bool, String, String), want: &str) {
    let (ok, _, stderr) = result;
    assert!(!ok, "expected failure, stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(want),
        "{:?} lacks {want:?}",
        lines[0]
    );
}

#[test]
fn malformed_safetensors_files_fail_cleanly() {
    let dir = scratch("safetensors");
    let good = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", safetensors_bytes(good, 8), "run past"),
        (
            "overlap",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            "overlap",
        ),
        (
            "header_too_long",
            {
                let mut v = safetensors_bytes(good, 16);
                v[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
                v
            },
            "header length",
        ),
        (
            "unknown_dtype",
            safetensors_bytes(
                r#"{"w":{"dtype":"Q7","shape":[4],"data_offsets":[0,16]}}"#,
                16,
            ),
            "unknown dtype",
        ),
        (
            "bad_json",
            safetensors_bytes(r#"{"w":{"dtype":"F32","#, 16),
            "not valid JSON",
        ),
    ];
    for (name, bytes, want) in cases {
        let input = dir.join(format!("{name}.safetensors"));
        std::fs::write(&input, bytes).unwrap();
        let output = dir.join(format!("{name}.out.safetensors"));
        assert_one_error(
            sun(&[
                "quantize",
                input.to_str().unwrap(),
                "--out",
                output.to_str().unwrap(),
                "--quiet",
            ]),
            want,
        );
        assert_one_error(sun(&["inspect", input.to_str().unwrap()]), want);
        assert!(!output.exists(), "{name}: output left behind");
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains(".out") && !n.contains(".tmp")),
        "stray files: {names:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantize_round_trip_through_the_binary() {
    let dir = scratch("roundtrip");
    let q = dir.join("q");
    let d = dir.join("d");
    let model = fixture("tiny_llama/untied");
    assert!(
        sun(&[
            "quantize",
            model.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--quiet"
        ])
        .0
    );
    let (ok, listing, _) = sun(&["inspect", q.to_str().unwrap()]);
    assert!(
        ok && listing.contains("nf4") && listing.contains("14 4-bit"),
        "{listing}"
    );
    assert!(
        sun(&[
            "dequantize",
            q.to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
            "--quiet"
        ])
        .0
    );
    let (ok, listing, _) = sun(&["inspect", d.to_str().unwrap(), "--json"]);
    assert!(ok && listing.contains("\"quantized\":0"), "{listing}");
    // The output exists now: a second run must refuse rather than overwrite.
    assert_one_error(
        sun(&[
            "quantize",
            model.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--quiet",
        ]),
        "already exists",
    );
    assert_one_error(
        sun(&[
            "quantize",
            model.to_str().unwrap(),
            "--out",
            dir.join("x").to_str().unwrap(),
            "--blocksize",
            "48",
        ]),
        "--blocksize",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_commands_name_what_is_wrong() {
    let dir = scratch("model");
    // A folder without config.json.
    assert_one_error(
        sun(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hi",
        ]),
        "tokenizer.json",
    );
    // An unknown architecture.
    let model = dir.join("m");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        fixture("tiny_llama/untied/model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("lora_grad/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixture("tiny_llama/untied/config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        config.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    assert_one_error(
        sun(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--no-quant",
        ]),
        "GPTNeoXForCausalLM",
    );
    // A prompt longer than the context.
    std::fs::write(model.join("config.json"), &config).unwrap();
    let long = "a b c d e f g h ".repeat(40);
    assert_one_error(
        sun(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            &long,
            "--ctx",
            "64",
            "--no-quant",
            "--quiet",
        ]),
        "context",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn layer_split_flags_are_checked() {
    let dir = scratch("split");
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture("tiny_llama/untied").join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(
        fixture("lora_grad/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let model = dir.to_str().unwrap();
    let base = ["generate", "--model", model, "--prompt", "hi", "--quiet"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        sun(&args)
    };
    assert_one_error(
        with(&["--devices", "0,x"]),
        "--devices: expected GPU ordinals",
    );
    assert_one_error(with(&["--devices", "1,1"]), "GPU 1 is named twice");
    assert_one_error(
        with(&["--devices", "0,1", "--device-map", "everywhere"]),
        "--device-map: expected auto",
    );
    assert_one_error(
        with(&["--devices", "0,1", "--device", "cpu"]),
        "--devices names GPUs but the model runs on the CPU",
    );
    assert_one_error(
        with(&["--devices", "0,1", "--no-quant"]),
        "--devices names GPUs but the model runs on the CPU",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
