//! The layer split (`GpuLlama::split`, `--devices`) against the same model on one GPU: a
//! random NF4 model of four layers with LoRA adapters, its layers placed 0 | 1, 2 | 3 over
//! three stages (GPUs 0, 1, 0 when two GPUs are visible, else three stages on GPU 0, which still
//! crosses every stage boundary through the host). Prompt and decode logits, the evaluation
//! loss, a padded training batch with dropout and checkpointing (loss, dropout draws, LoRA
//! gradients) and one optimizer step (the updated factors). Then the split's pass with a tape
//! budget of one layer per stage (layers 0, 2 and 3 keep their tapes, layer 1 is recomputed)
//! against its pass without, bit for bit.
//!
//! The split runs the same kernels on the same rows, so it should agree with one GPU to the
//! last bit; the bound (1e-6) leaves room only for a kernel whose floating-point sums depend on
//! the order its atomics land in.

use super::harness::{relative_error, Row, SplitMix64};
use super::model::{build, gradients, random_sequence, tiny_config, zero_grads, LORA_RANK};
use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::model::gpu::{GpuKvCache, GpuLlama};
use crate::model::tape_budget::{layer_tape_bytes, TapeForm};
use crate::model::train_pass::{CheckpointPlace, PassOptions};
use crate::model::TrainModel;
use crate::optim::{AdamWConfig, OptimizerStep};
use crate::rng::Rng;

const SPLIT_BOUND: f64 = 1e-6;
const LAYERS: usize = 4;
const PLACEMENT: [usize; LAYERS] = [0, 1, 1, 2];

/// The split's rows.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let second = if CudaDevice::count()? >= 2 {
        Some(CudaDevice::open(1)?)
    } else {
        None
    };
    let other = second.as_ref().unwrap_or(gpu);
    let label = format!(
        "{LAYERS}L {PLACEMENT:?} on {}",
        if second.is_some() {
            "GPUs 0,1,0"
        } else {
            "GPU 0 x3"
        }
    );
    let mut config = tiny_config()?;
    config.num_hidden_layers = LAYERS;
    let seed = rng.next_u64();
    let mut one = GpuLlama::new(gpu, build(&config, seed)?)?;
    let mut split = GpuLlama::with_placement(
        &[gpu, other, gpu],
        PLACEMENT.to_vec(),
        build(&config, seed)?,
    )?;
    let t = 80;
    let (ids, labels) = random_sequence(rng, config.vocab_size, t);
    let mut rows = Vec::new();
    let row = |rows: &mut Vec<Row>, check: &str, got: &[f32], want: &[f32]| {
        rows.push(Row::new(
            check,
            &label,
            relative_error(got, want),
            SPLIT_BOUND,
        ));
    };

    // Logits: the prompt, then four decode steps through the split KV cache.
    let (mut cache_one, mut cache_split) = (
        GpuKvCache::new(&one, t + 4)?,
        GpuKvCache::new(&split, t + 4)?,
    );
    let want = one.forward(&ids, &mut cache_one, false)?;
    let got = split.forward(&ids, &mut cache_split, false)?;
    row(&mut rows, "split prompt logits", &got, &want);
    let (mut want_steps, mut got_steps) = (Vec::new(), Vec::new());
    for &token in &ids[..4] {
        want_steps.extend(one.forward(&[token], &mut cache_one, true)?);
        got_steps.extend(split.forward(&[token], &mut cache_split, true)?);
    }
    row(&mut rows, "split decode logits", &got_steps, &want_steps);

    let want = one.sequence_loss(&ids, &labels)?;
    let got = split.sequence_loss(&ids, &labels)?;
    row(
        &mut rows,
        "split eval loss",
        &[got.nll as f32],
        &[want.nll as f32],
    );

    // A padded batch of two sequences with dropout and checkpointing.
    let batch: Vec<(&[u32], &[i64])> = [t, t / 2]
        .iter()
        .map(|&n| (&ids[..n], &labels[..n]))
        .collect();
    let opts = PassOptions {
        lora_dropout: 0.1,
        gradient_checkpointing: true,
        checkpoints: CheckpointPlace::Host,
        tape_budget: 0,
    };
    zero_grads(&mut one)?;
    zero_grads(&mut split)?;
    let (mut rng_one, mut rng_split) = (Rng::new(5), Rng::new(5));
    let want = one.train_batch(&batch, 0.01, opts, &mut rng_one)?;
    let got = split.train_batch(&batch, 0.01, opts, &mut rng_split)?;
    row(
        &mut rows,
        "split train loss",
        &[got.nll as f32],
        &[want.nll as f32],
    );
    let draws = if rng_one.state() == rng_split.state() {
        0.0
    } else {
        1.0
    };
    rows.push(Row::new("split dropout draws (exact)", &label, draws, 0.0));
    let (want_a, want_b) = gradients(&one.adapters_mut()?);
    let (got_a, got_b) = gradients(&split.adapters_mut()?);
    row(&mut rows, "split LoRA grad A", &got_a, &want_a);
    row(&mut rows, "split LoRA grad B", &got_b, &want_b);

    // One paged optimizer step on those gradients (they moved back to the devices).
    let opt = OptimizerStep {
        adamw: AdamWConfig::default(),
        lr: 1e-3,
        step: 1,
        max_grad_norm: 1.0,
        paged: true,
    };
    let want_norm = one.optimizer_step(&opt)?;
    let got_norm = split.optimizer_step(&opt)?;
    row(&mut rows, "split grad norm", &[got_norm], &[want_norm]);
    one.sync_host()?;
    split.sync_host()?;
    let factors = |model: &GpuLlama<'_>| -> Vec<f32> {
        model
            .host()
            .adapters()
            .iter()
            .flat_map(|(_, p)| p.a.iter().chain(&p.b).copied())
            .collect()
    };
    row(
        &mut rows,
        "split optimizer factors",
        &factors(&split),
        &factors(&one),
    );

    // Each stage spends its own tape budget on its own last layers: one layer's tape each.
    let one_layer = layer_tape_bytes(&config, batch.len() * t, &[LORA_RANK; 7], TapeForm::Whole);
    let mut passes = Vec::new();
    for tape_budget in [0, one_layer] {
        zero_grads(&mut split)?;
        let opts = PassOptions {
            tape_budget,
            ..opts
        };
        let loss = split.train_batch(&batch, 0.01, opts, &mut Rng::new(5))?;
        let kept = TrainModel::tapes_kept(&split).map_or(0, |t| t.layers);
        let (a, b) = gradients(&split.adapters_mut()?);
        passes.push(((loss.nll.to_bits(), a, b), kept));
    }
    let (taped, kept) = &passes[1];
    rows.push(Row::new(
        "split tapes per stage = ckpt (exact)",
        &format!("{label}, {kept} of {LAYERS} tapes kept"),
        if *taped == passes[0].0 && *kept == 3 {
            0.0
        } else {
            1.0
        },
        0.0,
    ));
    Ok(rows)
}
