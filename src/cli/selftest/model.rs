//! Whole-model checks: the GPU model path (`model::gpu`) against the CPU oracle (`Llama`) on
//! two random-weight models with NF4 linears and LoRA adapters whose B is nonzero: a tiny one
//! (2 layers, hidden 256, 4 query / 2 key-value heads, vocabulary 512) and one in
//! SmolLM2-135M's shape (30 layers, vocabulary 49152).
//!
//! Per model: logits of a whole prompt; logits of decode steps fed the CPU's greedy tokens and
//! how often the two argmaxes agree; the same steps run eagerly, unfused, and with programmatic
//! dependent launch on and off (equal bit for bit; skipped where the GPU has no PDL); the evaluation loss; and training passes (no dropout, and
//! dropout 0.1 with the same host-drawn masks; checkpointing on and off, the checkpoints parked
//! on the host and kept on the GPU, and half the layers keeping their tapes instead of being
//! recomputed, which must all agree bit for bit) comparing the loss, the LoRA
//! gradients and the dropout generator's final state; then the same for a padded
//! batch of three sequences of different lengths against the CPU's sequence-by-sequence
//! passes. Then two optimizer steps on equal
//! gradients (moments paged, then in device memory, clipping active): the grad norm, the
//! factors' updates and both moments.
//!
//! Bounds, for bf16 activations with f32 accumulation against an f32 oracle: logits 2e-2,
//! summed loss 1e-2, LoRA gradients 5e-2 (a gradient passes through every layer's bf16
//! activations twice, forward and backward); the optimizer, fed equal gradients, does the
//! CPU's f32 arithmetic: 1e-5. Greedy agreement is informative: random weights
//! give near-tied logits, so a bf16 rounding can flip an argmax; it must agree on at least
//! three steps in four.

use super::harness::{relative_error, Row, SplitMix64};
use crate::data::IGNORE_INDEX;
use crate::error::Result;
use crate::formats::peft::AdapterConfig;
use crate::model::gpu::{GpuKvCache, GpuLlama, NO_TILED_DECODE_VARIABLE};
use crate::model::lora::TARGET_MODULES;
use crate::model::random::shape_config;
use crate::model::tape_budget::{layer_tape_bytes, plan_tapes, TapeForm};
use crate::model::train_pass::{CheckpointPlace, PassOptions};
use crate::model::{Llama, LlamaConfig, TrainModel};
use crate::optim::{AdamWConfig, OptimizerStep};
use crate::rng::Rng;
use crate::sampling::argmax;
use serde_json::json;

const LOGITS_BOUND: f64 = 2e-2;
const LOSS_BOUND: f64 = 1e-2;
const GRAD_BOUND: f64 = 5e-2;
const OPTIMIZER_BOUND: f64 = 1e-5;
/// Most decode steps whose greedy argmax may differ, as a fraction.
const GREEDY_BOUND: f64 = 0.25;
const DECODE_STEPS: usize = 8;
pub(super) const LORA_RANK: usize = 8;

/// The tiny model's config.
pub(super) fn tiny_config() -> Result<LlamaConfig> {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 320,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "max_position_embeddings": 1024
    });
    LlamaConfig::from_json(&config, "the selftest's tiny model")
}

/// A random NF4 model with LoRA r=8 on all seven linears, B drawn nonzero; the same `seed`
/// builds the same model.
pub(super) fn build(config: &LlamaConfig, seed: u64) -> Result<Llama> {
    let mut model = Llama::random(config.clone(), true, seed)?;
    let lora = AdapterConfig {
        r: LORA_RANK,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        target_modules: TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        base_model_name_or_path: "selftest".into(),
    };
    let mut rng = Rng::new(seed.wrapping_add(1));
    model.attach_new_lora(&lora, &mut rng)?;
    for pair in model.adapters_mut() {
        pair.b.iter_mut().for_each(|b| *b = rng.normal() * 0.02);
    }
    Ok(model)
}

/// `t` random token ids below `vocab` and their labels: a prompt of t / 4 unscored tokens, then
/// the sequence itself.
pub(super) fn random_sequence(
    rng: &mut SplitMix64,
    vocab: usize,
    t: usize,
) -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i < t / 4 {
                IGNORE_INDEX
            } else {
                i64::from(id)
            }
        })
        .collect();
    (ids, labels)
}

/// Every adapter's (grad A, grad B), concatenated in adapter order.
pub(super) fn gradients(pairs: &[&mut crate::model::lora::LoraPair]) -> (Vec<f32>, Vec<f32>) {
    let a = pairs
        .iter()
        .flat_map(|p| p.grad_a.iter().copied())
        .collect();
    let b = pairs
        .iter()
        .flat_map(|p| p.grad_b.iter().copied())
        .collect();
    (a, b)
}

pub(super) fn zero_grads(model: &mut dyn TrainModel) -> Result<()> {
    for pair in model.adapters_mut()? {
        pair.zero_grad();
    }
    Ok(())
}

/// Both models in the tiny shape and the SmolLM2 shape.
pub(super) fn checks(
    gpu: &crate::backend::cuda::CudaDevice,
    rng: &mut SplitMix64,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cases = [
        ("tiny", tiny_config()?, 96usize),
        ("smol", shape_config("smol")?, 64usize),
    ];
    for (name, config, t) in cases {
        let seed = rng.next_u64();
        let mut cpu = build(&config, seed)?;
        let mut gpu_model = GpuLlama::new(gpu, build(&config, seed)?)?;
        // As generation does: the decode steps below read the layers' tiled copies.
        gpu_model.prepare_tiled_decode()?;
        let label = format!("{name} T{t}");
        let (ids, labels) = random_sequence(rng, config.vocab_size, t);
        rows.extend(forward_checks(&cpu, &mut gpu_model, &ids, &label)?);
        rows.extend(train_checks(
            &mut cpu,
            &mut gpu_model,
            &ids,
            &labels,
            &label,
        )?);
        rows.extend(batch_checks(
            &mut cpu,
            &mut gpu_model,
            &ids,
            &labels,
            &label,
        )?);
        rows.extend(optimizer_checks(&mut cpu, &mut gpu_model, &label)?);
    }
    Ok(rows)
}

/// Prompt logits, teacher-forced decode logits and greedy agreement.
fn forward_checks(
    cpu: &Llama,
    gpu_model: &mut GpuLlama<'_>,
    ids: &[u32],
    label: &str,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let max_len = ids.len() + DECODE_STEPS;
    let mut cache = cpu.new_cache(max_len);
    let mut gpu_cache = GpuKvCache::new(gpu_model, max_len)?;
    let want = cpu.forward(ids, &mut cache, false)?;
    let got = gpu_model.forward(ids, &mut gpu_cache, false)?;
    rows.push(Row::new(
        "model prompt logits",
        label,
        relative_error(&got, &want),
        LOGITS_BOUND,
    ));
    let vocab = cpu.config.vocab_size;
    let mut want_last = want[want.len() - vocab..].to_vec();
    let mut got_last = got[got.len() - vocab..].to_vec();
    let (mut want_steps, mut got_steps) = (Vec::new(), Vec::new());
    let (mut disagree, mut fed) = (0usize, Vec::new());
    for _ in 0..DECODE_STEPS {
        let token = argmax(&want_last);
        fed.push(token);
        disagree += usize::from(argmax(&got_last) != token);
        want_last = cpu.forward(&[token], &mut cache, true)?;
        got_last = gpu_model.forward(&[token], &mut gpu_cache, true)?;
        want_steps.extend_from_slice(&want_last);
        got_steps.extend_from_slice(&got_last);
    }
    rows.push(Row::new(
        "model decode logits",
        &format!("{label} +{DECODE_STEPS}"),
        relative_error(&got_steps, &want_steps),
        LOGITS_BOUND,
    ));
    rows.push(Row::new(
        "model greedy argmax differs",
        &format!("{label} {DECODE_STEPS} steps"),
        disagree as f64 / DECODE_STEPS as f64,
        GREEDY_BOUND,
    ));
    // The steps above ran as a CUDA graph from the third on (the first of a kind runs its
    // kernels one by one, the second records them); one by one throughout, the same logits.
    gpu_model.set_decode_graphs(false);
    let mut eager_cache = GpuKvCache::new(gpu_model, max_len)?;
    gpu_model.forward(ids, &mut eager_cache, false)?;
    let mut eager_steps = Vec::new();
    for &token in &fed {
        eager_steps.extend(gpu_model.forward(&[token], &mut eager_cache, true)?);
    }
    gpu_model.set_decode_graphs(true);
    // The same steps through the training forward's kernels instead of the fused decode layer
    // (graphed, as above): the fused GEMV rounds the code table to bf16, so close, not equal.
    gpu_model.set_fused_decode(false);
    let mut unfused_cache = GpuKvCache::new(gpu_model, max_len)?;
    gpu_model.forward(ids, &mut unfused_cache, false)?;
    let mut unfused_steps = Vec::new();
    for &token in &fed {
        unfused_steps.extend(gpu_model.forward(&[token], &mut unfused_cache, true)?);
    }
    gpu_model.set_fused_decode(true);
    rows.push(Row::new(
        "model decode fused layer ~ unfused",
        &format!("{label} +{DECODE_STEPS}"),
        relative_error(&got_steps, &unfused_steps),
        LOGITS_BOUND,
    ));
    rows.push(tiled_check(gpu_model, ids, &got_steps, &fed, label)?);
    let graphed = gpu_cache.graph_steps() == DECODE_STEPS - 1 && eager_cache.graph_steps() == 0;
    rows.push(Row::new(
        "model decode graph = eager (exact)",
        &format!(
            "{label} +{DECODE_STEPS}, {} graphed",
            gpu_cache.graph_steps()
        ),
        if eager_steps == got_steps && graphed {
            0.0
        } else {
            1.0
        },
        0.0,
    ));
    rows.push(pdl_check(gpu_model, ids, &fed, label)?);
    Ok(rows)
}

/// The decode steps `got_steps` (through the layers' tiled copies) against the fused layer on
/// the bitsandbytes layout (the same epilogues; the absmax applied per 64 columns instead of
/// 32: close, not equal). A row that says it was skipped under `SUN_NO_TILED_DECODE`.
fn tiled_check(
    gpu_model: &mut GpuLlama<'_>,
    ids: &[u32],
    got_steps: &[f32],
    fed: &[u32],
    label: &str,
) -> Result<Row> {
    const CHECK: &str = "model decode tiled ~ row-major fused layer";
    if std::env::var_os(NO_TILED_DECODE_VARIABLE).is_some() {
        eprintln!("{CHECK}: skipped: {NO_TILED_DECODE_VARIABLE} is set");
        return Ok(Row::new(CHECK, &format!("{label}: skipped"), 0.0, 0.0));
    }
    let tiled_bytes = gpu_model.tiled_decode_bytes();
    gpu_model.set_tiled_decode(false);
    let mut row_major_cache = GpuKvCache::new(gpu_model, ids.len() + fed.len())?;
    gpu_model.forward(ids, &mut row_major_cache, false)?;
    let mut row_major_steps = Vec::new();
    for &token in fed {
        row_major_steps.extend(gpu_model.forward(&[token], &mut row_major_cache, true)?);
    }
    gpu_model.set_tiled_decode(true);
    Ok(Row::new(
        CHECK,
        &format!(
            "{label} +{}, {:.1} MiB tiled",
            fed.len(),
            tiled_bytes as f64 / (1 << 20) as f64
        ),
        if tiled_bytes == 0 {
            1.0 // no copy was made: the row would compare a path with itself
        } else {
            relative_error(got_steps, &row_major_steps)
        },
        LOGITS_BOUND,
    ))
}

/// The same decode steps with programmatic dependent launch on and off (each run: the first
/// step of its kind eager, the second recorded, the rest replayed) must give the same logits,
/// bit for bit: PDL changes when a kernel starts, never what it reads. A row that says why it
/// was skipped where the GPU cannot use PDL.
fn pdl_check(gpu_model: &mut GpuLlama<'_>, ids: &[u32], fed: &[u32], label: &str) -> Result<Row> {
    const CHECK: &str = "model decode PDL = no PDL (exact)";
    gpu_model.set_pdl(true);
    if let Err(reason) = gpu_model.pdl_status() {
        gpu_model.set_pdl(crate::backend::cuda::pdl::allowed_by_environment());
        eprintln!("{CHECK}: skipped: {reason}");
        return Ok(Row::new(
            CHECK,
            &format!("{label}: skipped: {reason}"),
            0.0,
            0.0,
        ));
    }
    let with_pdl = decode_run(gpu_model, ids, fed, true);
    let without = decode_run(gpu_model, ids, fed, false);
    gpu_model.set_pdl(crate::backend::cuda::pdl::allowed_by_environment());
    let ((with_pdl, graphed_pdl), (without, graphed)) = (with_pdl?, without?);
    let all_graphed = graphed_pdl == fed.len() - 1 && graphed == fed.len() - 1;
    Ok(Row::new(
        CHECK,
        &format!("{label} +{}, 1 eager + {graphed_pdl} graphed", fed.len()),
        if with_pdl == without && all_graphed {
            0.0
        } else {
            1.0
        },
        0.0,
    ))
}

/// The prompt `ids`, then one decode step per token of `fed` through recorded graphs, with PDL
/// on or off: the steps' logits and how many ran as a graph.
fn decode_run(
    gpu_model: &mut GpuLlama<'_>,
    ids: &[u32],
    fed: &[u32],
    pdl: bool,
) -> Result<(Vec<f32>, usize)> {
    gpu_model.set_pdl(pdl);
    gpu_model.set_decode_graphs(true);
    let mut cache = GpuKvCache::new(gpu_model, ids.len() + fed.len())?;
    gpu_model.forward(ids, &mut cache, false)?;
    let mut steps = Vec::new();
    for &token in fed {
        steps.extend(gpu_model.forward(&[token], &mut cache, true)?);
    }
    Ok((steps, cache.graph_steps()))
}

/// Evaluation loss, then training passes without and with dropout and checkpointing.
fn train_checks(
    cpu: &mut Llama,
    gpu_model: &mut GpuLlama<'_>,
    ids: &[u32],
    labels: &[i64],
    label: &str,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let want = cpu.sequence_loss(ids, labels)?;
    let got = GpuLlama::sequence_loss(gpu_model, ids, labels)?;
    rows.push(Row::new(
        "model eval loss",
        label,
        relative_error(&[got.nll as f32], &[want.nll as f32]),
        LOSS_BOUND,
    ));
    let scale = 1.0 / want.tokens.max(1) as f32;
    // Two tape budgets: one that buys half the layers' slim tapes (at least one; fewer whole
    // ones, so the plan is slim: the backward remakes three activations), the other layers
    // recomputed; and one that buys every layer's whole tape.
    let layers = cpu.config.num_hidden_layers;
    let tape = |form| vec![layer_tape_bytes(&cpu.config, ids.len(), &[LORA_RANK; 7], form); layers];
    let (whole, slim) = (tape(TapeForm::Whole), tape(TapeForm::Slim));
    let some = (layers / 2).max(1) * slim[0];
    let one_gpu = vec![0; layers];
    let taped = |budget| plan_tapes(&whole, &slim, &one_gpu, budget).used.layers;
    // The GPU's result of the checkpointed pass with dropout, inputs parked on the host: the
    // passes without checkpointing, with the inputs kept on the GPU and with some layers'
    // tapes kept must equal it bit for bit.
    let mut parked = None;
    let passes = [
        (0.0f32, true, CheckpointPlace::Host, 0),
        (0.1, true, CheckpointPlace::Host, 0),
        (0.1, false, CheckpointPlace::Host, 0),
        (0.1, true, CheckpointPlace::Gpu, 0),
        (0.1, true, CheckpointPlace::Host, some),
        (0.1, true, CheckpointPlace::Gpu, usize::MAX),
    ];
    for (dropout, checkpointing, checkpoints, tape_budget) in passes {
        let opts = PassOptions {
            lora_dropout: dropout,
            gradient_checkpointing: checkpointing,
            checkpoints,
            tape_budget,
        };
        let pass = format!(
            "{label} p{dropout}{}{}",
            match (checkpointing, checkpoints) {
                (false, _) => "",
                (true, CheckpointPlace::Host) => " ckpt",
                (true, CheckpointPlace::Gpu) => " ckpt on GPU",
            },
            if tape_budget > 0 {
                format!(", {} of {layers} tapes", taped(tape_budget))
            } else {
                String::new()
            }
        );
        zero_grads(cpu)?;
        zero_grads(gpu_model)?;
        let (mut cpu_rng, mut gpu_rng) = (Rng::new(7), Rng::new(7));
        let want = cpu.train_sequence(ids, labels, scale, opts, &mut cpu_rng)?;
        let got = TrainModel::train_sequence(gpu_model, ids, labels, scale, opts, &mut gpu_rng)?;
        let kept = TrainModel::tapes_kept(gpu_model).map_or(0, |t| t.layers);
        rows.push(Row::new(
            "model train loss",
            &pass,
            relative_error(&[got.nll as f32], &[want.nll as f32]),
            LOSS_BOUND,
        ));
        rows.push(Row::new(
            "model dropout draws (exact)",
            &pass,
            if cpu_rng.state() == gpu_rng.state() {
                0.0
            } else {
                1.0
            },
            0.0,
        ));
        let (want_a, want_b) = gradients(&cpu.adapters_mut());
        let (got_a, got_b) = gradients(&gpu_model.adapters_mut()?);
        rows.push(Row::new(
            "model LoRA grad A",
            &pass,
            relative_error(&got_a, &want_a),
            GRAD_BOUND,
        ));
        rows.push(Row::new(
            "model LoRA grad B",
            &pass,
            relative_error(&got_b, &want_b),
            GRAD_BOUND,
        ));
        if dropout == 0.0 {
            continue;
        }
        let result = (got.nll.to_bits(), got_a, got_b);
        match (&parked, checkpointing, checkpoints, tape_budget) {
            (None, true, CheckpointPlace::Host, 0) => parked = Some(result),
            // Checkpointing must not change the GPU's gradients at all.
            (Some((_, a, b)), false, _, _) => rows.push(Row::new(
                "model ckpt = no ckpt (exact)",
                label,
                if (a, b) == (&result.1, &result.2) {
                    0.0
                } else {
                    1.0
                },
                0.0,
            )),
            // Nor where the inputs wait: the copies move bits.
            (Some(host), true, CheckpointPlace::Gpu, 0) => rows.push(Row::new(
                "model ckpt on host = ckpt on GPU (exact)",
                label,
                if *host == result { 0.0 } else { 1.0 },
                0.0,
            )),
            // Nor which layers keep their tapes instead of running again, nor whether a tape
            // is slim (the loss and every gradient), the budget buying exactly the layers it
            // was sized for.
            (Some(host), true, _, budget) if budget > 0 => rows.push(Row::new(
                "model tapes = ckpt (exact)",
                &format!("{label} {checkpoints}, {kept} of {layers} tapes kept"),
                if *host == result && kept == taped(budget) {
                    0.0
                } else {
                    1.0
                },
                0.0,
            )),
            _ => {}
        }
    }
    Ok(rows)
}

/// Two optimizer steps, the first with paged moments and the second with moments in device
/// memory, each fed the CPU model's current gradients on both sides.
fn optimizer_checks(
    cpu: &mut Llama,
    gpu_model: &mut GpuLlama<'_>,
    label: &str,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let grads = gradients(&cpu.adapters_mut());
    let factors = |model: &Llama| -> (Vec<f32>, Vec<f32>) {
        let pairs = model.adapters();
        (
            pairs
                .iter()
                .flat_map(|(_, p)| p.a.iter().copied())
                .collect(),
            pairs
                .iter()
                .flat_map(|(_, p)| p.b.iter().copied())
                .collect(),
        )
    };
    let (a0, b0) = factors(cpu);
    for (step, paged) in [(1u64, true), (2, false)] {
        set_gradients(cpu.adapters_mut(), &grads);
        set_gradients(gpu_model.adapters_mut()?, &grads);
        let opt = OptimizerStep {
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            lr: 1e-3,
            step,
            max_grad_norm: 0.5 * crate::optim::global_norm(&[&grads.0, &grads.1]),
            paged,
        };
        let want = TrainModel::optimizer_step(cpu, &opt)?;
        let got = gpu_model.optimizer_step(&opt)?;
        let pass = format!("{label} step {step}{}", if paged { " paged" } else { "" });
        rows.push(Row::new(
            "optimizer grad norm",
            &pass,
            relative_error(&[got], &[want]),
            OPTIMIZER_BOUND,
        ));
    }
    gpu_model.sync_host()?;
    let delta = |(a, b): (Vec<f32>, Vec<f32>)| -> Vec<f32> {
        let a = a.iter().zip(&a0).map(|(p, p0)| p - p0);
        let b = b.iter().zip(&b0).map(|(p, p0)| p - p0);
        a.chain(b).collect()
    };
    let pass = format!("{label} 2 steps");
    rows.push(Row::new(
        "optimizer update p - p0",
        &pass,
        relative_error(&delta(factors(gpu_model.host())), &delta(factors(cpu))),
        OPTIMIZER_BOUND,
    ));
    let moments = |model: &Llama, which: usize| -> Vec<f32> {
        let pairs = model.adapters();
        let states = pairs.iter().flat_map(|(_, p)| p.moments.iter());
        states
            .flat_map(|s| if which == 0 { &s.m } else { &s.v }.iter().copied())
            .collect()
    };
    for (which, name) in ["optimizer first moment", "optimizer second moment"]
        .iter()
        .enumerate()
    {
        rows.push(Row::new(
            *name,
            &pass,
            relative_error(&moments(gpu_model.host(), which), &moments(cpu, which)),
            OPTIMIZER_BOUND,
        ));
    }
    Ok(rows)
}

/// Overwrites every adapter's gradients with `grads` (A's and B's, concatenated in adapter
/// order, as [`gradients`] returns them).
fn set_gradients(pairs: Vec<&mut crate::model::lora::LoraPair>, grads: &(Vec<f32>, Vec<f32>)) {
    let (mut a, mut b) = (&grads.0[..], &grads.1[..]);
    for pair in pairs {
        let (head, rest) = a.split_at(pair.grad_a.len());
        pair.grad_a.copy_from_slice(head);
        a = rest;
        let (head, rest) = b.split_at(pair.grad_b.len());
        pair.grad_b.copy_from_slice(head);
        b = rest;
    }
}

/// A padded batch of three sequences (the full one, one 5 shorter, one half as long; dropout
/// 0.1, checkpointing) on the GPU against the CPU's passes over them one by one.
fn batch_checks(
    cpu: &mut Llama,
    gpu_model: &mut GpuLlama<'_>,
    ids: &[u32],
    labels: &[i64],
    label: &str,
) -> Result<Vec<Row>> {
    let t = ids.len();
    let lengths = [t, t - 5, t / 2];
    let batch: Vec<(&[u32], &[i64])> = lengths.iter().map(|&n| (&ids[..n], &labels[..n])).collect();
    let opts = PassOptions {
        lora_dropout: 0.1,
        gradient_checkpointing: true,
        checkpoints: CheckpointPlace::Host,
        tape_budget: 0,
    };
    zero_grads(cpu)?;
    zero_grads(gpu_model)?;
    let (mut cpu_rng, mut gpu_rng) = (Rng::new(11), Rng::new(11));
    let scale = 1.0 / (3 * t) as f32;
    let want = TrainModel::train_batch(cpu, &batch, scale, opts, &mut cpu_rng)?;
    let got = gpu_model.train_batch(&batch, scale, opts, &mut gpu_rng)?;
    let pass = format!("{label} batch {lengths:?}");
    let (want_a, want_b) = gradients(&cpu.adapters_mut());
    let (got_a, got_b) = gradients(&gpu_model.adapters_mut()?);
    Ok(vec![
        Row::new(
            "model batch loss",
            &pass,
            relative_error(&[got.nll as f32], &[want.nll as f32]),
            LOSS_BOUND,
        ),
        Row::new(
            "model batch scored tokens (exact)",
            &pass,
            if got.tokens == want.tokens { 0.0 } else { 1.0 },
            0.0,
        ),
        Row::new(
            "model batch dropout draws (exact)",
            &pass,
            if cpu_rng.state() == gpu_rng.state() {
                0.0
            } else {
                1.0
            },
            0.0,
        ),
        Row::new(
            "model batch LoRA grad A",
            &pass,
            relative_error(&got_a, &want_a),
            GRAD_BOUND,
        ),
        Row::new(
            "model batch LoRA grad B",
            &pass,
            relative_error(&got_b, &want_b),
            GRAD_BOUND,
        ),
    ])
}
