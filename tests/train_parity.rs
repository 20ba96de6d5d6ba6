//! The LoRA training pass against PyTorch + PEFT on the tiny models of tests/fixtures
//! (references made by tests/fixtures/lora_grad/make_fixture.py): logits with an adapter,
//! gradients with and without checkpointing, finite differences, dropout replay, and adapters
//! written by our code read back by us and by PEFT.

use serde_json::Value;
use std::path::{Path, PathBuf};
use sun_assistant::formats::peft::{read_adapter, write_adapter, AdapterConfig};
use sun_assistant::formats::safetensors::SafeTensors;
use sun_assistant::model::lora::TARGET_MODULES;
use sun_assistant::model::train_pass::{CheckpointPlace, PassOptions};
use sun_assistant::model::{Llama, LoadOptions};
use sun_assistant::rng::Rng;

const CONFIGS: [&str; 2] = ["plain", "rslora"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lora_fixture(name: &str) -> PathBuf {
    fixtures().join("lora_grad").join(name)
}

fn load(dir: &Path) -> Llama {
    load_as(dir, false)
}

/// Loads a fixture model, its linear weights dense or in NF4.
fn load_as(dir: &Path, quantize: bool) -> Llama {
    Llama::load(
        dir,
        &LoadOptions {
            quiet: true,
            quantize,
        },
    )
    .expect("fixture model loads")
}

/// The untied tiny model with the PEFT adapter of `config` attached.
fn model_with_adapter(config: &str) -> Llama {
    let mut model = load(&fixtures().join("tiny_llama/untied"));
    model
        .attach_adapter(&lora_fixture(config))
        .expect("PEFT's adapter loads");
    model
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tensor(file: &SafeTensors, name: &str) -> Vec<f32> {
    file.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .to_f32(name)
        .unwrap()
        .into_owned()
}

/// (ids, labels) of each reference sequence.
fn sequences(reference: &Value) -> Vec<(Vec<u32>, Vec<i64>)> {
    reference["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["ids"].as_array().unwrap();
            let labels = s["labels"].as_array().unwrap();
            (
                ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                labels.iter().map(|v| v.as_i64().unwrap()).collect(),
            )
        })
        .collect()
}

/// ||got - want|| / ||want||, failing on NaN.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite values");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(ids.len());
    model.forward(ids, &mut cache, false).unwrap()
}

/// Every adapter's (module path, grad_a, grad_b), in model order.
fn gradients(model: &Llama) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    model
        .adapters()
        .into_iter()
        .map(|(m, l)| (m, l.grad_a.clone(), l.grad_b.clone()))
        .collect()
}

/// Runs train_sequence over every sequence with the trainer's scale, 1 / (all scored tokens),
/// and returns the summed NLL and the token count.
fn train_pass(model: &mut Llama, seqs: &[(Vec<u32>, Vec<i64>)], opts: PassOptions) -> (f64, usize) {
    let scored: usize = seqs
        .iter()
        .map(|(_, l)| l[1..].iter().filter(|&&x| x != -100).count())
        .sum();
    let mut rng = Rng::new(3);
    let (mut nll, mut tokens) = (0.0, 0);
    for (ids, labels) in seqs {
        let loss = model
            .train_sequence(ids, labels, 1.0 / scored as f32, opts, &mut rng)
            .unwrap();
        nll += loss.nll;
        tokens += loss.tokens;
    }
    (nll, tokens)
}

#[test]
fn logits_with_a_peft_adapter_match_peft() {
    for config in CONFIGS {
        let model = model_with_adapter(config);
        assert_eq!(model.adapters().len(), 2 * TARGET_MODULES.len());
        let reference = read_json(&lora_fixture(config).join("reference.json"));
        let file = SafeTensors::open(&lora_fixture(config).join("reference.safetensors")).unwrap();
        let scale = reference["scale"].as_f64().unwrap() as f32;
        assert_eq!(model.adapters()[0].1.scale, scale, "{config}: scale");
        for (i, (ids, _)) in sequences(&reference).iter().enumerate() {
            let err = relative_error(&logits(&model, ids), &tensor(&file, &format!("logits_{i}")));
            eprintln!("{config}: sequence {i}: relative error of the logits {err:.2e}");
            assert!(err <= 1e-4, "{config}: sequence {i}: relative error {err}");
        }
    }
}

#[test]
fn gradients_match_pytorch_with_and_without_checkpointing() {
    for config in CONFIGS {
        let reference = read_json(&lora_fixture(config).join("reference.json"));
        let file = SafeTensors::open(&lora_fixture(config).join("reference.safetensors")).unwrap();
        let seqs = sequences(&reference);
        let mut runs = Vec::new();
        for checkpointing in [false, true] {
            let mut model = model_with_adapter(config);
            let opts = PassOptions {
                lora_dropout: 0.0,
                gradient_checkpointing: checkpointing,
                checkpoints: CheckpointPlace::Host,
                tape_budget: 0,
            };
            let (nll, tokens) = train_pass(&mut model, &seqs, opts);
            assert_eq!(tokens as u64, reference["scored_tokens"].as_u64().unwrap());
            let want_nll = reference["summed_nll"].as_f64().unwrap();
            assert!(
                (nll - want_nll).abs() <= 1e-4 * want_nll,
                "{config}: summed NLL {nll} vs PyTorch's {want_nll}"
            );
            let (mut diff, mut norm) = (0.0f64, 0.0f64);
            for (module, grad_a, grad_b) in gradients(&model) {
                for (factor, got) in [("lora_A", grad_a), ("lora_B", grad_b)] {
                    let want = tensor(
                        &file,
                        &format!("grad.base_model.model.{module}.{factor}.weight"),
                    );
                    let err = relative_error(&got, &want);
                    assert!(
                        err <= 1e-4,
                        "{config}: {module}.{factor}: relative error {err} (checkpointing {checkpointing})"
                    );
                    diff += got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>();
                    norm += want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
                }
            }
            let overall = (diff / norm).sqrt();
            eprintln!(
                "{config}: checkpointing {checkpointing}: overall relative error of the gradients {overall:.2e}"
            );
            assert!(
                overall <= 1e-4,
                "{config}: overall relative error {overall}"
            );
            runs.push(gradients(&model));
        }
        assert_eq!(
            runs[0], runs[1],
            "{config}: checkpointing changed the gradients"
        );
    }
}

/// A fresh rank-2 adapter on every module of the finite-difference model (dense or NF4), with
/// B set to random nonzero values so that every factor gets a gradient.
fn fd_model_with_adapters(seed: u64, quantize: bool) -> Llama {
    let mut model = load_as(&lora_fixture("fd_model"), quantize);
    let config = AdapterConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        base_model_name_or_path: String::new(),
    };
    let mut rng = Rng::new(seed);
    model.attach_new_lora(&config, &mut rng).unwrap();
    for lora in model.adapters_mut() {
        lora.b.iter_mut().for_each(|b| *b = rng.normal() * 0.5);
    }
    model
}

/// A sequence over the 32-token vocabulary: a masked prefix of 3, one masked token inside.
fn fd_sequence() -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 13 + 5) % 32).collect();
    let mut labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    for i in [0, 1, 2, 7] {
        labels[i] = -100;
    }
    (ids, labels)
}

/// The finite-difference step and tolerance (see `gradients_match_finite_differences`).
const FD_STEP: f32 = 3e-3;
const FD_ABS: f64 = 5e-4;
const FD_REL: f64 = 1e-3;

/// Which factor entry to perturb: (adapter index, B instead of A, entry).
fn probes(model: &Llama) -> Vec<(usize, bool, usize)> {
    let mut out = Vec::new();
    for (i, (_, l)) in model.adapters().iter().enumerate() {
        for (k, is_b) in [(0, false), (1, true)] {
            let len = if is_b { l.b.len() } else { l.a.len() };
            out.push((i, is_b, (i * 7 + k * 5 + 3) % len));
        }
    }
    out
}

fn perturb(model: &mut Llama, (i, is_b, e): (usize, bool, usize), by: f32) {
    let mut adapters = model.adapters_mut();
    let lora = &mut adapters[i];
    if is_b {
        lora.b[e] += by;
    } else {
        lora.a[e] += by;
    }
}

/// Central differences of the summed loss against the analytic gradient of one A and one B
/// entry of every module. The activations are f32, so the summed loss (about 25) carries a
/// rounding noise near 1e-6; over 2h = 6e-3 that is about 2e-4 in the quotient, and the O(h²)
/// truncation adds about 1e-4 of a gradient's size (measured: worst 1.6e-4 absolute on
/// gradients of 0.04 to 0.2, 6e-4 on one of 5.2; h = 1e-2 truncates worse, h = 1e-3 is
/// noisier). The test asks for |analytic - numeric| <= 5e-4 + 1e-3 |numeric|.
#[test]
fn gradients_match_finite_differences() {
    for quantize in [false, true] {
        finite_differences(quantize);
    }
}

/// The check of [`gradients_match_finite_differences`] on the dense or the NF4 model (where the
/// input gradient flows through the dequantized weight).
fn finite_differences(quantize: bool) {
    let mut model = fd_model_with_adapters(17, quantize);
    let (ids, labels) = fd_sequence();
    let opts = PassOptions {
        lora_dropout: 0.0,
        gradient_checkpointing: true,
        checkpoints: CheckpointPlace::Host,
        tape_budget: 0,
    };
    let loss = model
        .train_sequence(&ids, &labels, 1.0, opts, &mut Rng::new(0))
        .unwrap();
    assert_eq!(loss.tokens, 8);
    let base = model.sequence_loss(&ids, &labels).unwrap();
    assert_eq!(base, loss, "sequence_loss and train_sequence disagree");
    let h = FD_STEP;
    let mut worst = 0.0f64;
    for probe in probes(&model) {
        let analytic = {
            let (_, l) = &model.adapters()[probe.0];
            if probe.1 {
                l.grad_b[probe.2]
            } else {
                l.grad_a[probe.2]
            }
        } as f64;
        perturb(&mut model, probe, h);
        let plus = model.sequence_loss(&ids, &labels).unwrap().nll;
        perturb(&mut model, probe, -2.0 * h);
        let minus = model.sequence_loss(&ids, &labels).unwrap().nll;
        perturb(&mut model, probe, h);
        let numeric = (plus - minus) / (2.0 * h as f64);
        let err = (analytic - numeric).abs();
        worst = worst.max(err / (FD_ABS + FD_REL * numeric.abs()));
        assert!(
            err <= FD_ABS + FD_REL * numeric.abs(),
            "NF4 {quantize}: adapter {} {} [{}]: analytic {analytic} vs numeric {numeric}",
            model.adapters()[probe.0].0,
            if probe.1 { "B" } else { "A" },
            probe.2
        );
    }
    eprintln!("finite differences, NF4 {quantize}: worst error / tolerance {worst:.3}");
}

/// With dropout the loss depends on the masks; the same generator state gives the same masks
/// (dropout draws do not depend on the values), so the finite differences run through
/// train_sequence from a clone of the generator. Checkpointing on and off must then agree bit
/// for bit: the replayed layers draw the very masks of the first forward pass.
#[test]
fn dropout_masks_replay_under_checkpointing() {
    let (ids, labels) = fd_sequence();
    let rng = Rng::new(99);
    let mut runs = Vec::new();
    for checkpointing in [false, true] {
        let mut model = fd_model_with_adapters(17, false);
        let opts = PassOptions {
            lora_dropout: 0.5,
            gradient_checkpointing: checkpointing,
            checkpoints: CheckpointPlace::Host,
            tape_budget: 0,
        };
        let mut r = rng.clone();
        let loss = model
            .train_sequence(&ids, &labels, 1.0, opts, &mut r)
            .unwrap();
        runs.push((loss, gradients(&model), r));
    }
    assert_eq!(runs[0], runs[1], "checkpointing changed the dropout pass");

    // Dropout really acts: without it the gradients differ.
    let mut plain = fd_model_with_adapters(17, false);
    let no_dropout = PassOptions {
        lora_dropout: 0.0,
        gradient_checkpointing: true,
        checkpoints: CheckpointPlace::Host,
        tape_budget: 0,
    };
    plain
        .train_sequence(&ids, &labels, 1.0, no_dropout, &mut rng.clone())
        .unwrap();
    assert_ne!(gradients(&plain), runs[0].1);

    // And the masked backward is the gradient of the masked loss.
    let opts = PassOptions {
        lora_dropout: 0.5,
        gradient_checkpointing: true,
        checkpoints: CheckpointPlace::Host,
        tape_budget: 0,
    };
    let mut model = fd_model_with_adapters(17, false);
    model
        .train_sequence(&ids, &labels, 1.0, opts, &mut rng.clone())
        .unwrap();
    let grads = gradients(&model);
    let masked_loss = |model: &mut Llama| {
        let loss = model
            .train_sequence(&ids, &labels, 1.0, opts, &mut rng.clone())
            .unwrap();
        loss.nll
    };
    // A smaller step than FD_STEP: the masked model (p = 0.5, kept inputs doubled) is more
    // curved, and at 3e-3 the central difference's h^2 truncation error reaches ~7e-3 on some
    // probes (it shrinks 100x from 1e-2 to 1e-3, as truncation does).
    let h = FD_STEP / 3.0;
    for probe in probes(&model) {
        let analytic = if probe.1 {
            grads[probe.0].2[probe.2]
        } else {
            grads[probe.0].1[probe.2]
        } as f64;
        perturb(&mut model, probe, h);
        let plus = masked_loss(&mut model);
        perturb(&mut model, probe, -2.0 * h);
        let minus = masked_loss(&mut model);
        perturb(&mut model, probe, h);
        let numeric = (plus - minus) / (2.0 * h as f64);
        assert!(
            (analytic - numeric).abs() <= FD_ABS + FD_REL * numeric.abs(),
            "dropout: adapter {} {} [{}]: analytic {analytic} vs numeric {numeric}",
            grads[probe.0].0,
            if probe.1 { "B" } else { "A" },
            probe.2
        );
    }
}

/// A scratch folder under the target directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn written_adapter_round_trips() {
    for config in CONFIGS {
        let model = model_with_adapter(config);
        let dir = scratch(&format!("train_parity_round_trip_{config}"));
        let (adapter_config, _) = read_adapter(&lora_fixture(config)).unwrap();
        write_adapter(&dir, &adapter_config, &model.adapter_tensors()).unwrap();
        let mut again = load(&fixtures().join("tiny_llama/untied"));
        assert_eq!(again.attach_adapter(&dir).unwrap(), adapter_config);
        let reference = read_json(&lora_fixture(config).join("reference.json"));
        for (ids, _) in sequences(&reference) {
            assert_eq!(logits(&again, &ids), logits(&model, &ids), "{config}");
        }
    }
}

/// An adapter written by `sun train` (3 steps on the untied model, dataset.json), loaded by
/// PEFT's `PeftModel.from_pretrained`: PEFT's logits (peft_logits.safetensors, written by
/// `make_fixture.py --peft-check`) equal ours.
#[test]
fn our_trained_adapter_matches_peft_logits() {
    let dir = lora_fixture("ours");
    let mut model = load(&fixtures().join("tiny_llama/untied"));
    model.attach_adapter(&dir).unwrap();
    let ids: Vec<u32> = read_json(&lora_fixture("peft_check.json"))["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let file = SafeTensors::open(&dir.join("peft_logits.safetensors")).unwrap();
    let err = relative_error(&logits(&model, &ids), &tensor(&file, "logits"));
    eprintln!("our adapter in PEFT: relative error of the logits {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");
    // The adapter has moved: B is no longer zero, so PEFT applied something.
    assert!(model
        .adapters()
        .iter()
        .all(|(_, l)| l.b.iter().any(|&b| b != 0.0)));
}
