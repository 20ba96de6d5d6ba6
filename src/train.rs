//! The training loop: batches, gradient accumulation, clipping, AdamW, evaluation, logging,
//! checkpoints and exact resume.
//!
//! A step takes `batch_size x grad_accum` sequences, runs each through
//! [`TrainModel::train_sequence`] (the CPU oracle or the GPU) with the gradient scaled by one over the scored tokens of the
//! whole step (so the loss is the mean over every target token of the accumulated batch, not a
//! mean of per-micro-batch means), clips the global gradient norm and applies AdamW.
//!
//! Data parallel: with a [`GradientReducer`] ([`Trainer::join_group`]) a step's global batch is
//! `batch_size x grad_accum x world_size` sequences, taken in the data order a one-process run
//! with `grad_accum x world_size` takes them; rank r trains micro-batches `[r*A, (r+1)*A)` of it
//! (A = `grad_accum`), skipping the other ranks' dropout draws so every sequence gets the masks
//! the one-process run gives it, and the gradients (and the loss for the log) are summed across
//! ranks before every rank takes the same optimizer step. Only rank 0 evaluates and writes the
//! log, checkpoints and the adapter. Nothing stored depends on the world size (the cursor
//! counts global sequences), so a checkpoint resumes under any world size.
//!
//! A checkpoint (`OUT/checkpoint-N/`) holds the adapter in PEFT's format plus what an exact
//! resume needs: optimizer moments (`optimizer.safetensors`), and `trainer_state.json` with the
//! step, the data cursor and the dropout generator's state. The data order is a function of the
//! seed and the epoch, so it is recomputed rather than stored.

use crate::data::TokenizedExample;
use crate::dist::GradientReducer;
use crate::error::{Error, Result};
use crate::formats::peft::{write_adapter, AdapterConfig};
use crate::formats::safetensors::{self, OwnedTensor, SafeTensors};
use crate::fsutil::{self, StagedDir};
use crate::model::train_model::TrainModel;
use crate::model::train_pass::{LossSum, PassOptions};
use crate::optim::{warmup_steps, AdamWConfig, OptimizerStep, Schedule};
use crate::rng::Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything that defines a training run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Peak learning rate.
    pub learning_rate: f32,
    /// Schedule of the learning rate.
    pub schedule: Schedule,
    /// Fraction of steps spent warming up.
    pub warmup_ratio: f32,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Keep the AdamW moments in managed memory that the driver may page to the host
    /// (`--optim paged_adamw_32bit`; only a GPU run distinguishes it).
    pub paged_optimizer: bool,
    /// Global gradient-norm limit (0 disables).
    pub max_grad_norm: f32,
    /// Seed of the data order and the dropout masks.
    pub seed: u64,
    /// Sort sequences of similar length together (within large random groups).
    pub group_by_length: bool,
    /// Log every N steps.
    pub logging_steps: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_steps: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub save_steps: u64,
    /// Adapter dropout and checkpointing.
    pub pass: PassOptions,
    /// No progress line.
    pub quiet: bool,
}

/// The resumable part of a run's state.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch of the next sequence.
    pub epoch: u64,
    /// Position of the next sequence in the epoch's order.
    pub cursor: usize,
    /// The dropout generator.
    pub rng: Rng,
}

/// The order sequences are visited in during `epoch`: a seeded shuffle, optionally grouped by
/// length (Hugging Face's LengthGroupedSampler: random megabatches of 50 batches, each sorted
/// longest first).
pub fn epoch_order(
    lengths: &[usize],
    seed: u64,
    epoch: u64,
    batch: usize,
    group_by_length: bool,
) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    if group_by_length {
        for mega in order.chunks_mut((batch * 50).max(1)) {
            mega.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
        }
    }
    order
}

/// The trainer: model, data, optimizer state and where it writes.
pub struct Trainer<'a> {
    /// The model with adapters attached, on the CPU or a GPU.
    pub model: Box<dyn TrainModel + 'a>,
    /// The adapter's config, written with every checkpoint.
    pub adapter_config: AdapterConfig,
    train: &'a [TokenizedExample],
    eval: &'a [TokenizedExample],
    opts: TrainOptions,
    out: PathBuf,
    /// Resumable state.
    pub state: TrainerState,
    /// The data order of one epoch: (epoch, order), recomputed when the epoch changes.
    order: (Option<u64>, Vec<usize>),
    /// Sums across the ranks of a data-parallel run; `None` for one process.
    reducer: Option<Box<dyn GradientReducer + 'a>>,
}

impl<'a> Trainer<'a> {
    /// A trainer at step 0. `out` must exist.
    pub fn new(
        model: Box<dyn TrainModel + 'a>,
        adapter_config: AdapterConfig,
        train: &'a [TokenizedExample],
        eval: &'a [TokenizedExample],
        opts: TrainOptions,
        out: &Path,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::invalid(
                "the training set is empty after tokenization",
            ));
        }
        check_sequences(model.llama(), "training", train)?;
        check_sequences(model.llama(), "evaluation", eval)?;
        let n = model.llama().adapters().len();
        if n == 0 {
            return Err(Error::invalid(
                "no LoRA adapters are attached (check --target-modules)",
            ));
        }
        let state = TrainerState {
            step: 0,
            epoch: 0,
            cursor: 0,
            rng: Rng::new(opts.seed.wrapping_add(1)),
        };
        Ok(Trainer {
            model,
            adapter_config,
            train,
            eval,
            opts,
            out: out.to_path_buf(),
            state,
            order: (None, Vec::new()),
            reducer: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel run whose sums `reducer` takes (see the
    /// module docs). Every rank must be built with the same options, data and seed.
    pub fn join_group(&mut self, reducer: Box<dyn GradientReducer + 'a>) {
        self.reducer = Some(reducer);
    }

    /// (rank, world size): (0, 1) for one process.
    fn rank_and_world(&self) -> (usize, usize) {
        self.reducer
            .as_ref()
            .map_or((0, 1), |r| (r.rank(), r.world_size()))
    }

    /// True for the process that evaluates and writes: rank 0, or the only one.
    pub fn is_lead(&self) -> bool {
        self.rank_and_world().0 == 0
    }

    /// The next `count` sequences in data order, advancing the cursor across epochs.
    fn next_batch(&mut self, count: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if self.state.cursor >= self.train.len() {
                self.state.epoch += 1;
                self.state.cursor = 0;
            }
            let cursor = self.state.cursor;
            out.push(self.order()[cursor]);
            self.state.cursor += 1;
        }
        out
    }

    /// The order of the current epoch, computed once per epoch.
    fn order(&mut self) -> &[usize] {
        if self.order.0 != Some(self.state.epoch) {
            let lengths: Vec<usize> = self.train.iter().map(|e| e.input_ids.len()).collect();
            let order = epoch_order(
                &lengths,
                self.opts.seed,
                self.state.epoch,
                self.opts.batch_size,
                self.opts.group_by_length,
            );
            self.order = (Some(self.state.epoch), order);
        }
        &self.order.1
    }

    /// One optimizer step. Returns the step's mean loss per target token, the gradient norm
    /// before clipping, the learning rate and the tokens processed (by every rank together).
    pub fn step(&mut self) -> Result<(f64, f32, f32, usize)> {
        let (total, tokens) = self.accumulate()?;
        self.apply(total, tokens)
    }

    /// The gradients of the step's global batch, summed across ranks: this rank's share of
    /// the micro-batches forward and backward, the other ranks' dropout draws skipped, then
    /// the sums. Returns the loss over the global batch and its tokens.
    fn accumulate(&mut self) -> Result<(LossSum, usize)> {
        let (rank, world) = self.rank_and_world();
        let per_rank = self.opts.batch_size * self.opts.grad_accum;
        let batch = self.next_batch(per_rank * world);
        let target_tokens: usize = batch.iter().map(|&i| self.train[i].target_tokens()).sum();
        let tokens: usize = batch.iter().map(|&i| self.train[i].input_ids.len()).sum();
        let scale = 1.0 / target_tokens.max(1) as f32;
        let pass = self.opts.pass;
        self.model
            .skip_dropout_draws(rank * per_rank, pass, &mut self.state.rng);
        let mut total = LossSum::default();
        for micro_batch in
            batch[rank * per_rank..(rank + 1) * per_rank].chunks(self.opts.batch_size)
        {
            let sequences: Vec<(&[u32], &[i64])> = micro_batch
                .iter()
                .map(|&i| (&self.train[i].input_ids[..], &self.train[i].labels[..]))
                .collect();
            let loss = self
                .model
                .train_batch(&sequences, scale, pass, &mut self.state.rng)?;
            total.nll += loss.nll;
            total.tokens += loss.tokens;
        }
        self.model
            .skip_dropout_draws((world - 1 - rank) * per_rank, pass, &mut self.state.rng);
        if let Some(reducer) = self.reducer.as_mut() {
            self.model.reduce_gradients(reducer.as_mut())?;
            let mut sums = [total.nll, total.tokens as f64];
            reducer.sum_f64(&mut sums)?;
            total = LossSum {
                nll: sums[0],
                tokens: sums[1] as usize,
            };
        }
        Ok((total, tokens))
    }

    /// The optimizer step on the accumulated gradients (see [`Trainer::step`]).
    fn apply(&mut self, total: LossSum, tokens: usize) -> Result<(f64, f32, f32, usize)> {
        let step = self.state.step + 1;
        let loss = total.nll / total.tokens.max(1) as f64;
        if !loss.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss} at step {step}; stopping (the last checkpoint in {} is intact)",
                self.out.display()
            )));
        }
        let warmup = warmup_steps(self.opts.warmup_ratio, self.opts.max_steps);
        let lr = self.opts.learning_rate
            * self
                .opts
                .schedule
                .factor(self.state.step, self.opts.max_steps, warmup);
        let grad_norm = self.model.optimizer_step(&OptimizerStep {
            adamw: self.opts.adamw,
            lr,
            step,
            max_grad_norm: self.opts.max_grad_norm,
            paged: self.opts.paged_optimizer,
        })?;
        self.state.step = step;
        Ok((loss, grad_norm, lr, tokens))
    }

    /// Mean loss per target token over the evaluation set.
    pub fn evaluate(&mut self) -> Result<f64> {
        let mut total = LossSum::default();
        for ex in self.eval {
            let l = self.model.sequence_loss(&ex.input_ids, &ex.labels)?;
            total.nll += l.nll;
            total.tokens += l.tokens;
        }
        Ok(total.nll / total.tokens.max(1) as f64)
    }

    /// Writes `OUT/checkpoint-N` (staged, then renamed into place).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.model.sync_host()?;
        let path = self.out.join(format!("checkpoint-{}", self.state.step));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        let staged = StagedDir::new(&path)?;
        let llama = self.model.llama();
        write_adapter(
            &staged.path(""),
            &self.adapter_config,
            &llama.adapter_tensors(),
        )?;
        let mut tensors = Vec::new();
        for (module, pair) in llama.adapters() {
            for (factor, m) in ["lora_A", "lora_B"].iter().zip(&pair.moments) {
                tensors.push(OwnedTensor::from_f32(
                    format!("{module}.{factor}.exp_avg"),
                    vec![m.m.len()],
                    &m.m,
                )?);
                tensors.push(OwnedTensor::from_f32(
                    format!("{module}.{factor}.exp_avg_sq"),
                    vec![m.v.len()],
                    &m.v,
                )?);
            }
        }
        safetensors::write_file(
            &staged.path("optimizer.safetensors"),
            &tensors,
            &BTreeMap::new(),
        )?;
        let s = &self.state;
        let rng: Vec<String> = s.rng.state().iter().map(|w| w.to_string()).collect();
        // world_size is for the reader: resuming ignores it (the cursor counts global sequences).
        let state = json!({"global_step": s.step, "epoch": s.epoch, "cursor": s.cursor, "rng_state": rng,
            "max_steps": self.opts.max_steps, "seed": self.opts.seed, "world_size": self.rank_and_world().1});
        fsutil::write_json(&staged.path("trainer_state.json"), &state)?;
        staged.commit()?;
        Ok(path)
    }

    /// Restores adapters, optimizer moments and trainer state from a checkpoint folder.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.model.attach_adapter(dir)?;
        let state_path = dir.join("trainer_state.json");
        let v = fsutil::read_json(&state_path)?;
        let bad =
            |f: &str| Error::format(state_path.display(), format!("missing or malformed {f:?}"));
        let num = |f: &str| v.get(f).and_then(Value::as_u64).ok_or_else(|| bad(f));
        let words: Vec<u64> = v
            .get("rng_state")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().and_then(|s| s.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        let words: [u64; 4] = words.try_into().map_err(|_| bad("rng_state"))?;
        if num("seed")? != self.opts.seed {
            return Err(Error::invalid(format!(
                "{}: was trained with --seed {}; resume with the same seed",
                dir.display(),
                num("seed")?
            )));
        }
        let opt = SafeTensors::open(&dir.join("optimizer.safetensors"))?;
        let modules: Vec<String> = self
            .model
            .llama()
            .adapters()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        for (module, pair) in modules.iter().zip(self.model.adapters_mut()?) {
            let lens = [pair.a.len(), pair.b.len()];
            for ((factor, m), len) in ["lora_A", "lora_B"].iter().zip(&mut pair.moments).zip(lens) {
                let moment = |suffix: &str| -> Result<Vec<f32>> {
                    let name = format!("{module}.{factor}.{suffix}");
                    let values = opt.tensor(&name)?.to_f32(&name)?.into_owned();
                    if values.len() != len {
                        return Err(Error::format(
                            dir.join("optimizer.safetensors").display(),
                            format!(
                                "{name} holds {} values; the adapter has {len}",
                                values.len()
                            ),
                        ));
                    }
                    Ok(values)
                };
                m.m = moment("exp_avg")?;
                m.v = moment("exp_avg_sq")?;
            }
        }
        self.state = TrainerState {
            step: num("global_step")?,
            epoch: num("epoch")?,
            cursor: num("cursor")? as usize,
            rng: Rng::from_state(words),
        };
        Ok(())
    }

    /// Runs to `max_steps`, logging to `OUT/log.jsonl` and stderr, evaluating and saving on
    /// schedule, and writing the final adapter into OUT. In a data-parallel run only rank 0
    /// evaluates, logs and writes; the other ranks only train.
    pub fn run(&mut self) -> Result<()> {
        let lead = self.is_lead();
        let quiet = self.opts.quiet || !lead;
        let log_path = self.out.join("log.jsonl");
        let mut log = if lead {
            trim_log(&log_path, self.state.step)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| Error::io(&log_path, e))?;
            Some(file)
        } else {
            None
        };
        let mut write_log = |record: Value| -> Result<()> {
            match log.as_mut() {
                Some(file) => writeln!(file, "{record}").map_err(|e| Error::io(&log_path, e)),
                None => Ok(()),
            }
        };
        let evaluates = lead && !self.eval.is_empty();
        let start = Instant::now();
        let first_step = self.state.step;
        let (mut window_loss, mut window_steps, mut tokens_total) = (0.0f64, 0u64, 0usize);
        let mut train_secs = 0.0f64; // time in optimizer steps, without evaluation and saving
        if first_step == 0 && evaluates {
            // The starting point, so the log shows what training changed.
            let eval_loss = self.evaluate()?;
            write_log(
                json!({"step": 0, "eval_loss": eval_loss, "elapsed": start.elapsed().as_secs_f64()}),
            )?;
            if !quiet {
                eprintln!("step 0: eval loss {eval_loss:.4}");
            }
        }
        while self.state.step < self.opts.max_steps {
            let step_start = Instant::now();
            let (loss, grad_norm, lr, tokens) = self.step()?;
            train_secs += step_start.elapsed().as_secs_f64();
            tokens_total += tokens;
            window_loss += loss;
            window_steps += 1;
            let step = self.state.step;
            let elapsed = start.elapsed().as_secs_f64();
            let tps = tokens_total as f64 / train_secs.max(1e-9);
            if lead && (step % self.opts.logging_steps.max(1) == 0 || step == self.opts.max_steps) {
                let mean = window_loss / window_steps as f64;
                let mut rec = json!({"step": step, "loss": mean, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_total, "tokens_per_second": tps, "elapsed": elapsed});
                // GPU memory in use on the card (total - free), when training on one.
                let gpu_memory = self.model.device_memory_in_use()?;
                if let Some(bytes) = gpu_memory {
                    rec["gpu_memory_bytes"] = json!(bytes);
                }
                write_log(rec)?;
                (window_loss, window_steps) = (0.0, 0);
                if !quiet {
                    let eta =
                        elapsed / (step - first_step) as f64 * (self.opts.max_steps - step) as f64;
                    let memory = gpu_memory
                        .map(|b| format!(" GPU memory {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                        .unwrap_or_default();
                    eprintln!("step {step}/{} loss {mean:.4} lr {lr:.3e} grad_norm {grad_norm:.3} {tps:.0} tokens/s{memory} ETA {eta:.0}s", self.opts.max_steps);
                }
            }
            let at_end = step == self.opts.max_steps;
            if evaluates
                && ((self.opts.eval_steps > 0 && step % self.opts.eval_steps == 0) || at_end)
            {
                let eval_loss = self.evaluate()?;
                write_log(
                    json!({"step": step, "eval_loss": eval_loss, "elapsed": start.elapsed().as_secs_f64()}),
                )?;
                if !quiet {
                    eprintln!("step {step}: eval loss {eval_loss:.4}");
                }
            }
            if lead && ((self.opts.save_steps > 0 && step % self.opts.save_steps == 0) || at_end) {
                let path = self.save_checkpoint()?;
                if !quiet {
                    eprintln!("saved {}", path.display());
                }
            }
        }
        if !lead {
            return Ok(());
        }
        self.model.sync_host()?;
        write_adapter(
            &self.out,
            &self.adapter_config,
            &self.model.llama().adapter_tensors(),
        )
    }
}

/// Checks every sequence before the first step, so that a bad one stops the run at once
/// rather than at whichever step draws it.
fn check_sequences(
    model: &crate::model::Llama,
    set: &str,
    examples: &[TokenizedExample],
) -> Result<()> {
    let max = model.config.max_position_embeddings;
    for (i, ex) in examples.iter().enumerate() {
        if ex.input_ids.len() > max {
            return Err(Error::invalid(format!(
                "{set} sequence {i} has {} tokens but the model holds {max} positions; lower --source-max-len and --target-max-len",
                ex.input_ids.len()
            )));
        }
        model
            .check_sequence(&ex.input_ids, &ex.labels)
            .map_err(|e| Error::invalid(format!("{set} sequence {i}: {e}")))?;
    }
    Ok(())
}

/// Drops log records past `step` (left by a run that died after its last checkpoint).
fn trim_log(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    fsutil::write_atomic(path, |w| {
        for l in kept {
            writeln!(w, "{l}").map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    })
}

/// The checkpoint with the highest step in `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::IGNORE_INDEX;
    use crate::dist::InProcessGroup;
    use crate::model::lora::TARGET_MODULES;
    use crate::model::train_pass::CheckpointPlace;
    use crate::model::{Llama, LlamaConfig};

    const DROPOUT: f32 = 0.1;

    fn adapter_config() -> AdapterConfig {
        AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: DROPOUT,
            target_modules: TARGET_MODULES.iter().map(|m| m.to_string()).collect(),
            use_rslora: false,
            base_model_name_or_path: "tiny".into(),
        }
    }

    /// A tiny random model with adapters whose B is not zero, so A gets gradients at once.
    fn tiny_model() -> Llama {
        let config = LlamaConfig::from_json(
            &json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 64}),
            "the tiny test model",
        )
        .unwrap();
        let mut model = Llama::random(config, false, 7).unwrap();
        let mut rng = Rng::new(42);
        model.attach_new_lora(&adapter_config(), &mut rng).unwrap();
        for pair in model.adapters_mut() {
            pair.b.iter_mut().for_each(|b| *b = rng.normal() * 0.1);
        }
        model
    }

    /// Sequences of 5 to 16 tokens whose first two labels are not scored.
    fn examples(n: usize) -> Vec<TokenizedExample> {
        let mut rng = Rng::new(3);
        (0..n)
            .map(|i| {
                let ids: Vec<u32> = (0..5 + (i * 7) % 12)
                    .map(|_| rng.below(50) as u32)
                    .collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(p, &id)| if p < 2 { IGNORE_INDEX } else { i64::from(id) })
                    .collect();
                TokenizedExample {
                    input_ids: ids,
                    labels,
                }
            })
            .collect()
    }

    fn options(grad_accum: usize, out: &Path) -> (TrainOptions, PathBuf) {
        let opts = TrainOptions {
            batch_size: 2,
            grad_accum,
            max_steps: 3,
            learning_rate: 1e-2,
            schedule: Schedule::Constant,
            warmup_ratio: 0.0,
            adamw: AdamWConfig::default(),
            paged_optimizer: false,
            max_grad_norm: 0.3,
            seed: 5,
            group_by_length: false,
            logging_steps: 1,
            eval_steps: 2,
            save_steps: 2,
            pass: PassOptions {
                lora_dropout: DROPOUT,
                gradient_checkpointing: true,
                checkpoints: CheckpointPlace::Host,
                tape_budget: 0,
            },
            quiet: true,
        };
        (opts, out.to_path_buf())
    }

    /// Each adapter's (grad_a, grad_b, a, b), flattened.
    fn snapshot(trainer: &mut Trainer) -> [Vec<f32>; 4] {
        let mut out: [Vec<f32>; 4] = Default::default();
        for pair in trainer.model.adapters_mut().unwrap() {
            out[0].extend_from_slice(&pair.grad_a);
            out[1].extend_from_slice(&pair.grad_b);
            out[2].extend_from_slice(&pair.a);
            out[3].extend_from_slice(&pair.b);
        }
        out
    }

    fn relative_error(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len());
        let diff: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| f64::from(g - w).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
        assert!(norm > 0.0, "a reference of zeros proves nothing");
        let err = (diff / norm).sqrt();
        assert!(!err.is_nan());
        err
    }

    /// Per step: (loss, grad norm, tokens, [grad_a, grad_b, a, b] before the optimizer step),
    /// then the adapters after the last step.
    type Trace = (Vec<(f64, f32, usize, [Vec<f32>; 4])>, [Vec<f32>; 4]);

    /// Runs three steps of `trainer`, recording what [`Trace`] holds.
    fn trace(trainer: &mut Trainer) -> Trace {
        let mut steps = Vec::new();
        for _ in 0..3 {
            let (total, tokens) = trainer.accumulate().unwrap();
            let before = snapshot(trainer);
            let (loss, norm, _, tokens_out) = trainer.apply(total, tokens).unwrap();
            steps.push((loss, norm, tokens_out, before));
        }
        let after = snapshot(trainer);
        (steps, after)
    }

    /// Two ranks with grad_accum 2 each, dropout on, against one process with grad_accum 4: the
    /// same loss, tokens and summed gradients at every step, and the same adapters after.
    #[test]
    fn two_ranks_step_as_one_process_with_their_global_batch() {
        let train = examples(11); // not a multiple of the global batch: epochs wrap mid-step
        let dir = std::env::temp_dir().join(format!("sun-dp-trainer-{}", std::process::id()));
        let (one_opts, out) = options(4, &dir);
        let mut one = Trainer::new(
            Box::new(tiny_model()),
            adapter_config(),
            &train,
            &[],
            one_opts,
            &out,
        )
        .unwrap();
        let reference = trace(&mut one);
        let group = InProcessGroup::new(2).unwrap();
        let ranks: Vec<Trace> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|member| {
                    let train = &train;
                    let out = out.clone();
                    s.spawn(move || {
                        let (opts, _) = options(2, &out);
                        let model = Box::new(tiny_model());
                        let mut trainer =
                            Trainer::new(model, adapter_config(), train, &[], opts, &out).unwrap();
                        trainer.join_group(Box::new(member));
                        trace(&mut trainer)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (steps, after)) in ranks.iter().enumerate() {
            for (i, (got, want)) in steps.iter().zip(&reference.0).enumerate() {
                let what = format!("rank {rank} step {}", i + 1);
                assert!(
                    (got.0 - want.0).abs() <= 1e-6 * want.0.abs(),
                    "{what}: loss {} vs {}",
                    got.0,
                    want.0
                );
                assert!(
                    (got.1 - want.1).abs() <= 1e-5 * want.1,
                    "{what}: norm {} vs {}",
                    got.1,
                    want.1
                );
                assert_eq!(got.2, want.2, "{what}: tokens");
                for (k, name) in ["grad_a", "grad_b", "a", "b"].iter().enumerate() {
                    let err = relative_error(&got.3[k], &want.3[k]);
                    assert!(err < 1e-5, "{what}: {name} relative error {err:e}");
                }
            }
            for (k, name) in ["a", "b"].iter().enumerate() {
                let err = relative_error(&after[k + 2], &reference.1[k + 2]);
                assert!(
                    err < 1e-5,
                    "rank {rank}: final {name} relative error {err:e}"
                );
            }
        }
        // The ranks hold the same adapters to the bit: they took the same steps on the same sums.
        assert_eq!(ranks[0].1, ranks[1].1);
    }

    /// Taking the other rank's sequences without skipping its dropout draws would give other
    /// masks: the test above would catch a trainer that forgot to skip.
    #[test]
    fn skipping_draws_matters_with_dropout() {
        let model = tiny_model();
        let pass = PassOptions {
            lora_dropout: DROPOUT,
            gradient_checkpointing: false,
            checkpoints: CheckpointPlace::Host,
            tape_budget: 0,
        };
        let mut skipped = Rng::new(1);
        model.skip_dropout_draws(3, pass, &mut skipped);
        let mut drawn = Rng::new(1);
        for _ in 0..3 * 2 * 7 {
            drawn.next_u64();
        }
        assert_eq!(skipped, drawn, "3 sequences x 2 layers x 7 adapters");
        let mut none = Rng::new(1);
        let no_dropout = PassOptions {
            lora_dropout: 0.0,
            ..pass
        };
        model.skip_dropout_draws(3, no_dropout, &mut none);
        assert_eq!(none, Rng::new(1));
    }

    /// With `run`, rank 0 alone evaluates and writes the log, checkpoints and adapter, and its
    /// log matches the one-process run's.
    #[test]
    fn only_rank_zero_writes_and_its_log_matches_one_process() {
        let train = examples(9);
        let eval = examples(3);
        let base = std::env::temp_dir().join(format!("sun-dp-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dirs: Vec<PathBuf> = ["one", "rank0", "rank1"]
            .iter()
            .map(|d| base.join(d))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        let (opts, _) = options(4, &dirs[0]);
        let mut one = Trainer::new(
            Box::new(tiny_model()),
            adapter_config(),
            &train,
            &eval,
            opts,
            &dirs[0],
        )
        .unwrap();
        one.run().unwrap();
        let group = InProcessGroup::new(2).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .zip(&dirs[1..])
                .map(|(member, out)| {
                    let (train, eval) = (&train, &eval);
                    s.spawn(move || {
                        let (opts, _) = options(2, out);
                        let model = Box::new(tiny_model());
                        let mut trainer =
                            Trainer::new(model, adapter_config(), train, eval, opts, out).unwrap();
                        trainer.join_group(Box::new(member));
                        trainer.run().unwrap();
                    })
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
        });
        assert_eq!(
            std::fs::read_dir(&dirs[2]).unwrap().count(),
            0,
            "rank 1 wrote something"
        );
        let losses = |dir: &Path| -> Vec<(u64, f64)> {
            std::fs::read_to_string(dir.join("log.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .map(|v| {
                    let loss = v.get("loss").or_else(|| v.get("eval_loss")).unwrap();
                    (v["step"].as_u64().unwrap(), loss.as_f64().unwrap())
                })
                .collect()
        };
        let (got, want) = (losses(&dirs[1]), losses(&dirs[0]));
        assert_eq!(got.len(), want.len());
        assert!(want.len() >= 5, "train and eval records: {want:?}");
        for ((gs, gl), (ws, wl)) in got.iter().zip(&want) {
            assert_eq!(gs, ws);
            assert!(
                (gl - wl).abs() <= 1e-5 * wl.abs(),
                "step {ws}: {gl} vs {wl}"
            );
        }
        for name in ["checkpoint-2", "checkpoint-3", "adapter_model.safetensors"] {
            assert!(dirs[1].join(name).exists(), "{name}");
        }
        let state = fsutil::read_json(&dirs[1].join("checkpoint-2/trainer_state.json")).unwrap();
        assert_eq!(state["world_size"], 2);
        let one_state =
            fsutil::read_json(&dirs[0].join("checkpoint-2/trainer_state.json")).unwrap();
        for field in ["global_step", "epoch", "cursor", "rng_state"] {
            assert_eq!(state[field], one_state[field], "{field}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let lengths: Vec<usize> = (0..300).map(|i| (i * 37) % 101).collect();
        let a = epoch_order(&lengths, 1, 0, 2, false);
        assert_eq!(a, epoch_order(&lengths, 1, 0, 2, false));
        assert_ne!(a, epoch_order(&lengths, 1, 1, 2, false));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..300).collect::<Vec<_>>());
        let g = epoch_order(&lengths, 1, 0, 2, true);
        assert!(g[..100].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }
}
