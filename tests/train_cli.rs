//! `sun train` end to end through the binary on the tiny untied model of
//! tests/fixtures/tiny_llama with the byte-level tokenizer and the 20-row alpaca dataset of
//! tests/fixtures/lora_grad: the loss falls, a resumed run repeats the uninterrupted one
//! exactly, and bad input fails cleanly.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use sun_assistant::formats::peft::{write_adapter, AdapterConfig, LoraTensors};
use sun_assistant::formats::safetensors::{self, OwnedTensor, SafeTensors};

mod common;

use common::{fixtures, model_dir, scratch};

fn dataset() -> PathBuf {
    fixtures().join("lora_grad/dataset.json")
}

/// Runs `sun train` with small settings plus `extra`.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sun"));
    cmd.arg("train")
        .arg("--model")
        .arg(model)
        .arg("--dataset")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--learning-rate",
            "0.003",
            "--logging-steps",
            "1",
            "--seed",
            "7",
            "--quiet",
        ])
        .args(extra);
    cmd.output().expect("sun runs")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "sun train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The records of log.jsonl that carry `key`, as (step, value).
fn records(out: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?)))
        .collect()
}

/// Ten steps lower both the logged training loss (a different batch each step, so compared
/// over three-step windows) and the loss over the whole training set (evaluated after every
/// step through --eval-dataset; it falls at every step).
#[test]
fn training_lowers_the_loss() {
    let root = scratch("train_cli_loss");
    let model = model_dir(&root);
    let out = root.join("out");
    let data = dataset().display().to_string();
    let run = train(
        &model,
        &dataset(),
        &out,
        &[
            "--max-steps",
            "10",
            "--eval-dataset",
            &data,
            "--eval-steps",
            "1",
        ],
    );
    assert_ok(&run);
    let train_loss = records(&out, "loss");
    assert_eq!(train_loss.len(), 10);
    let window = |r: &[(u64, f64)]| r.iter().map(|(_, l)| l).sum::<f64>() / r.len() as f64;
    let (first, last) = (window(&train_loss[..3]), window(&train_loss[7..]));
    let eval = records(&out, "eval_loss");
    assert_eq!(
        eval.len(),
        11,
        "one evaluation before training, then one per step"
    );
    assert_eq!(eval[0].0, 0);
    let (eval_first, eval_last) = (eval[0].1, eval[10].1);
    assert!(
        eval.windows(2).all(|w| w[1].1 < w[0].1),
        "the whole-set loss did not fall at every step: {eval:?}"
    );
    eprintln!(
        "training loss: steps 1-3 {first:.4}, steps 8-10 {last:.4}; \
         whole-set loss after step 1 {eval_first:.4}, after step 10 {eval_last:.4}"
    );
    assert!(
        last < first - 0.5,
        "training loss went from {first} to {last}"
    );
    assert!(
        eval_last < eval_first - 0.5,
        "whole-set loss went from {eval_first} to {eval_last}"
    );
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    assert!(out.join("checkpoint-10/trainer_state.json").is_file());
}

/// A run to step 6 saving every 3 steps, against a run to step 3 resumed to step 6: the same
/// losses for steps 4..6 and byte-identical adapters (dropout on, so the generator's state
/// is restored too).
#[test]
fn resume_repeats_the_uninterrupted_run_exactly() {
    let root = scratch("train_cli_resume");
    let model = model_dir(&root);
    let (whole, parts) = (root.join("whole"), root.join("parts"));
    let steps = |n: &'static str| {
        [
            "--save-steps",
            "3",
            "--lora-dropout",
            "0.1",
            "--max-steps",
            n,
        ]
    };
    assert_ok(&train(&model, &dataset(), &whole, &steps("6")));
    assert_ok(&train(&model, &dataset(), &parts, &steps("3")));
    let resume = [&steps("6")[..], &["--resume"]].concat();
    assert_ok(&train(&model, &dataset(), &parts, &resume));
    let (a, b) = (records(&whole, "loss"), records(&parts, "loss"));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "losses of the resumed run differ");
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "checkpoint-6/adapter_model.safetensors",
        "checkpoint-6/optimizer.safetensors",
        "checkpoint-6/trainer_state.json",
    ] {
        assert_eq!(
            std::fs::read(whole.join(file)).unwrap(),
            std::fs::read(parts.join(file)).unwrap(),
            "{file} differs after resuming"
        );
    }
}

/// Runs a failing `sun train`, checks for one `error:` line naming `expect`, and that `out`
/// was left without files.
fn assert_fails_cleanly(model: &Path, data: &Path, out: &Path, extra: &[&str], expect: &str) {
    let run = train(model, data, out, &[&["--max-steps", "2"], extra].concat());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "succeeded on bad input: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(expect),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(out)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let root = scratch("train_cli_bad");
    let model = model_dir(&root);
    let write = |name: &str, text: &str| {
        let p = root.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let empty = write("empty.json", "[]");
    assert_fails_cleanly(&model, &empty, &root.join("o1"), &[], "empty");
    let missing = write(
        "missing.json",
        r#"[{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye."}]"#,
    );
    assert_fails_cleanly(
        &model,
        &missing,
        &root.join("o2"),
        &[],
        "row 1: missing field \"output\"",
    );
    let unknown = write(
        "unknown.jsonl",
        "{\"question\": \"a\", \"answer\": \"b\"}\n",
    );
    assert_fails_cleanly(
        &model,
        &unknown,
        &root.join("o3"),
        &[],
        "cannot tell the dataset format",
    );

    // A row longer than the model's 128 positions fails before the first step, not when drawn.
    let long_output = "Blue. ".repeat(60);
    let long = write(
        "long.json",
        &format!(
            r#"[{{"instruction": "Name a color.", "output": "Blue."}}, {{"instruction": "Name a color.", "output": "{long_output}"}}]"#
        ),
    );
    assert_fails_cleanly(
        &model,
        &long,
        &root.join("o5"),
        &[],
        "but the model holds 128 positions; lower --source-max-len",
    );

    // An adapter for a model of width 16 (the finite-difference model) on this width-64 one.
    let adapter = root.join("other_adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let config = AdapterConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        use_rslora: false,
        base_model_name_or_path: String::new(),
    };
    let q = LoraTensors {
        module: "model.layers.0.self_attn.q_proj".into(),
        a: vec![0.1; 2 * 16],
        b: vec![0.1; 16 * 2],
        in_features: 16,
        out_features: 16,
    };
    write_adapter(&adapter, &config, &[q]).unwrap();
    let adapter_arg = adapter.display().to_string();
    assert_fails_cleanly(
        &model,
        &dataset(),
        &root.join("o4"),
        &["--adapter", &adapter_arg],
        "model.layers.0.self_attn.q_proj",
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let root = scratch("train_cli_nan");
    let model = model_dir(&root);
    let out = root.join("out");
    assert_ok(&train(
        &model,
        &dataset(),
        &out,
        &["--max-steps", "2", "--save-steps", "2"],
    ));
    let checkpoint = out.join("checkpoint-2");
    let files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = files(&checkpoint);

    // The same model with a NaN in its final norm: every logit, so the loss, becomes NaN.
    let weights = SafeTensors::open(&model.join("model.safetensors")).unwrap();
    let tensors: Vec<OwnedTensor> = weights
        .tensors()
        .iter()
        .map(|info| {
            let view = weights.view(info);
            let mut bytes = view.bytes.to_vec();
            if info.name == "model.norm.weight" {
                bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            OwnedTensor::new(info.name.clone(), info.dtype, info.shape.clone(), bytes).unwrap()
        })
        .collect();
    safetensors::write_file(
        &model.join("model.safetensors"),
        &tensors,
        weights.metadata(),
    )
    .unwrap();

    let run = train(
        &model,
        &dataset(),
        &out,
        &["--max-steps", "4", "--save-steps", "1", "--resume"],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "succeeded with a NaN loss: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("NaN at step 3"), "{stderr}");
    assert!(
        !out.join("checkpoint-3").exists(),
        "a checkpoint was written after the bad step"
    );
    assert_eq!(
        files(&checkpoint),
        before,
        "the last good checkpoint changed"
    );
}

#[test]
fn training_from_an_adapter_keeps_its_rank_and_alpha() {
    let root = scratch("train_cli_from_adapter");
    let model = model_dir(&root);
    // An adapter of rank 2 (alpha 3) on the q projections; the run below asks for r=4, alpha 8
    // on the command line, and the adapter's own settings must win.
    let start = root.join("start");
    std::fs::create_dir_all(&start).unwrap();
    let config = AdapterConfig {
        r: 2,
        lora_alpha: 3.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        use_rslora: false,
        base_model_name_or_path: String::new(),
    };
    let modules: Vec<LoraTensors> = (0..2)
        .map(|l| LoraTensors {
            module: format!("model.layers.{l}.self_attn.q_proj"),
            a: vec![0.01; 2 * 64],
            b: vec![0.02; 64 * 2],
            in_features: 64,
            out_features: 64,
        })
        .collect();
    write_adapter(&start, &config, &modules).unwrap();
    let out = root.join("out");
    let from = start.display().to_string();
    assert_ok(&train(
        &model,
        &dataset(),
        &out,
        &["--max-steps", "1", "--adapter", &from],
    ));
    let written: Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(written["r"], 2);
    assert_eq!(written["lora_alpha"].as_f64(), Some(3.0));
    assert_eq!(written["target_modules"], serde_json::json!(["q_proj"]));
    let (loaded, trained) = sun_assistant::formats::peft::read_adapter(&out).unwrap();
    assert_eq!((loaded.r, trained.len()), (2, 2));
    assert!(
        trained.iter().any(|m| m.b.iter().any(|&b| b != 0.02)),
        "training moved the adapter"
    );
}
