//! `sun train`: QLoRA fine-tuning.

use crate::chat::ChatFormat;
use crate::cli::dist_args::{DistArgs, DIST_FLAGS_HELP};
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::data::{
    load_examples, tokenize_example, DatasetFormat, TokenizeOptions, TokenizedExample,
};
use crate::device::{ComputeDevice, DeviceChoice};
use crate::error::{Error, Result};
use crate::formats::peft::AdapterConfig;
use crate::fsutil;
use crate::model::lora::TARGET_MODULES;
use crate::model::tape_budget::budget_bytes;
use crate::model::train_pass::{CheckpointPlace, PassOptions};
use crate::model::TrainModel;
use crate::optim::{AdamWConfig, Schedule};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::train::{latest_checkpoint, TrainOptions, Trainer};
use rayon::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

const HELP: &str = "\
sun train: QLoRA fine-tuning: NF4 base weights, LoRA adapters, AdamW

Usage: sun train --model DIR --dataset FILE --out DIR [options]

With several GPUs (data parallel) the global batch of a step is
batch-size x grad-accum x the number of processes; rank 0 writes everything.

Data:
  --dataset FILE             JSON or JSONL rows: alpaca, self-instruct, input-output, oasst,
                             hh-rlhf or chat (detected from the fields, and printed)
  --dataset-format NAME      force the format (alpaca, self-instruct, input-output, oasst,
                             hh-rlhf, chat)
  --chat-format NAME         template for chat rows [default: the tokenizer's]
  --eval-dataset FILE        held-out rows for eval loss
  --eval-split F             hold out this fraction of --dataset instead [default: 0]
  --source-max-len N         most prompt tokens, BOS included [default: 1024]
  --target-max-len N         most answer tokens, EOS included [default: 256]
  --train-on-source          put the loss on the prompt tokens too
  --group-by-length          batch sequences of similar length together
LoRA:
  --lora-r N                 rank [default: 64]
  --lora-alpha A             scale numerator [default: 16]
  --lora-dropout P           dropout on the adapter input [default: 0.1]
  --use-rslora               scale alpha/sqrt(r) instead of alpha/r
  --target-modules LIST      comma-separated [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
  --adapter DIR              start from this PEFT adapter instead of a fresh one (its r,
                             alpha and target modules are kept)
Optimization:
  --batch-size N             sequences per micro-batch [default: 1]
  --grad-accum N             micro-batches per step [default: 16]
  --max-steps N              optimizer steps [default: 10000]
  --learning-rate LR         [default: 0.0002]
  --lr-scheduler-type NAME   constant, constant_with_warmup, linear, cosine [default: constant]
  --warmup-ratio F           warmup fraction (not used by constant) [default: 0.03]
  --weight-decay W           decoupled weight decay [default: 0]
  --adam-beta1 B             [default: 0.9]
  --adam-beta2 B             [default: 0.999]
  --adam-epsilon E           [default: 1e-8]
  --max-grad-norm N          global gradient-norm clip, 0 = off [default: 0.3]
  --optim NAME               paged_adamw_32bit (moments in managed memory the driver pages to the
                             host under memory pressure) or adamw_32bit (plain device memory);
                             the same on the CPU [default: paged_adamw_32bit]
  --no-gradient-checkpointing  keep every activation instead of recomputing each layer
  --checkpoints WHERE        where a GPU run keeps each layer's input for its backward: host
                             (pinned memory, copied out and back on a second stream while the
                             layers compute) or gpu [default: host]
  --tape-budget GIB          with checkpointing, GPU memory (per GPU) spent keeping the last
                             layers' activations from the forward so that their recompute is
                             skipped; the same result, bit for bit [default: 0]
  --seed S                   data order, LoRA init and dropout [default: 42]
Output:
  --out DIR                  checkpoints (checkpoint-N/), log.jsonl and the final adapter
  --logging-steps N          [default: 10]
  --eval-steps N             [default: 187]
  --save-steps N             [default: 250]
  --resume                   continue from the latest checkpoint in --out
  --resume-from DIR          continue from this checkpoint
";

fn positive<T: PartialOrd + Default + std::fmt::Display + Copy>(flag: &str, v: T) -> Result<T> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(Error::invalid(format!("{flag}: {v} must be positive")))
    }
}

fn fraction(flag: &str, v: f32, allow_one: bool) -> Result<f32> {
    if v >= 0.0 && (v < 1.0 || (allow_one && v == 1.0)) {
        Ok(v)
    } else {
        Err(Error::invalid(format!("{flag}: {v} must be in [0, 1)")))
    }
}

/// Tokenizes examples in parallel and drops those with no target token left.
fn tokenize_all(
    tok: &Tokenizer,
    examples: &[crate::data::Example],
    opts: TokenizeOptions,
    what: &str,
    quiet: bool,
) -> Vec<TokenizedExample> {
    let all: Vec<TokenizedExample> = examples
        .par_iter()
        .map(|e| tokenize_example(tok, e, opts))
        .collect();
    let n = all.len();
    let kept: Vec<TokenizedExample> = all.into_iter().filter(|e| e.target_tokens() > 0).collect();
    if kept.len() < n && !quiet {
        eprintln!(
            "{what}: dropped {} rows with no target token left after truncation",
            n - kept.len()
        );
    }
    kept
}

/// Runs `sun train`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(&format!(
        "{HELP}Model:\n{MODEL_FLAGS_HELP}{DIST_FLAGS_HELP}"
    )) {
        return Ok(());
    }
    let mut margs = ModelArgs::parse(&mut args)?;
    let dist = DistArgs::parse(&mut args)?;
    let dataset: PathBuf = args.required("--dataset")?;
    let out: PathBuf = args.required("--out")?;
    let format = args
        .opt::<String>("--dataset-format")?
        .map(|f| DatasetFormat::from_name(&f))
        .transpose()?;
    let forced_chat: Option<String> = args.opt("--chat-format")?;
    let eval_dataset: Option<PathBuf> = args.opt("--eval-dataset")?;
    let eval_split = fraction("--eval-split", args.opt_or("--eval-split", 0.0)?, false)?;
    let tok_opts = TokenizeOptions {
        source_max_len: positive(
            "--source-max-len",
            args.opt_or("--source-max-len", 1024usize)?,
        )?,
        target_max_len: positive(
            "--target-max-len",
            args.opt_or("--target-max-len", 256usize)?,
        )?,
        train_on_source: args.flag("--train-on-source"),
    };
    let group_by_length = args.flag("--group-by-length");
    let r = positive("--lora-r", args.opt_or("--lora-r", 64usize)?)?;
    let alpha = positive("--lora-alpha", args.opt_or("--lora-alpha", 16.0f32)?)?;
    let dropout = fraction(
        "--lora-dropout",
        args.opt_or("--lora-dropout", 0.1f32)?,
        false,
    )?;
    let use_rslora = args.flag("--use-rslora");
    let targets: String = args.opt_or("--target-modules", TARGET_MODULES.join(","))?;
    let target_modules: Vec<String> = targets
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let schedule =
        Schedule::from_name(&args.opt_or("--lr-scheduler-type", "constant".to_string())?)?;
    let optim: String = args.opt_or("--optim", "paged_adamw_32bit".to_string())?;
    let paged_optimizer = match optim.as_str() {
        "paged_adamw_32bit" => true,
        "adamw_32bit" => false,
        _ => {
            return Err(Error::invalid(format!(
                "--optim: {optim:?} is not paged_adamw_32bit or adamw_32bit"
            )))
        }
    };
    let mut opts = TrainOptions {
        batch_size: positive("--batch-size", args.opt_or("--batch-size", 1usize)?)?,
        grad_accum: positive("--grad-accum", args.opt_or("--grad-accum", 16usize)?)?,
        max_steps: positive("--max-steps", args.opt_or("--max-steps", 10_000u64)?)?,
        learning_rate: positive("--learning-rate", args.opt_or("--learning-rate", 2e-4f32)?)?,
        schedule,
        warmup_ratio: fraction(
            "--warmup-ratio",
            args.opt_or("--warmup-ratio", 0.03f32)?,
            true,
        )?,
        adamw: AdamWConfig {
            beta1: fraction("--adam-beta1", args.opt_or("--adam-beta1", 0.9f32)?, false)?,
            beta2: fraction(
                "--adam-beta2",
                args.opt_or("--adam-beta2", 0.999f32)?,
                false,
            )?,
            eps: positive("--adam-epsilon", args.opt_or("--adam-epsilon", 1e-8f32)?)?,
            weight_decay: fraction(
                "--weight-decay",
                args.opt_or("--weight-decay", 0.0f32)?,
                true,
            )?,
        },
        paged_optimizer,
        max_grad_norm: args.opt_or("--max-grad-norm", 0.3f32)?,
        seed: args.opt_or("--seed", 42u64)?,
        group_by_length,
        logging_steps: positive("--logging-steps", args.opt_or("--logging-steps", 10u64)?)?,
        eval_steps: args.opt_or("--eval-steps", 187u64)?,
        save_steps: args.opt_or("--save-steps", 250u64)?,
        pass: PassOptions {
            lora_dropout: dropout,
            gradient_checkpointing: !args.flag("--no-gradient-checkpointing"),
            checkpoints: args.opt_or("--checkpoints", CheckpointPlace::Host)?,
            tape_budget: budget_bytes(args.opt_or("--tape-budget", 0.0f64)?)?,
        },
        quiet: margs.quiet,
    };
    let resume_latest = args.flag("--resume");
    let resume_from: Option<PathBuf> = args.opt("--resume-from")?;
    args.finish()?;
    if margs.gpus.devices.is_some() && (dist.launches() || dist.group()?.is_some()) {
        return Err(Error::unsupported(
            "--devices splits one model's layers over GPUs; data parallel (--nproc, \
             --world-size) runs one GPU per rank: use one or the other",
        ));
    }

    if dist.launches() {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        return dist.launch(&out.join(".rendezvous"));
    }
    let group = dist.group()?;
    let lead = group.as_ref().map_or(true, |g| g.ranks.is_lead());
    if !lead {
        // Rank 0 speaks for the run.
        margs.quiet = true;
        opts.quiet = true;
    }

    let resume = match (resume_from, resume_latest) {
        (Some(p), _) => Some(p),
        (None, true) => Some(latest_checkpoint(&out).ok_or_else(|| {
            Error::invalid(format!(
                "--resume: no checkpoint-N folder in {}",
                out.display()
            ))
        })?),
        (None, false) => {
            if latest_checkpoint(&out).is_some() {
                return Err(Error::invalid(format!(
                    "{} already holds checkpoints; pass --resume or choose another --out",
                    out.display()
                )));
            }
            None
        }
    };

    let tok = margs.tokenizer()?;
    let chat = match forced_chat {
        Some(name) => ChatFormat::from_name(&name)?,
        None => ChatFormat::from_template(tok.chat_template()).unwrap_or(ChatFormat::Guanaco),
    };
    let (detected, examples) = load_examples(&dataset, format, &chat)?;
    if !margs.quiet {
        eprintln!(
            "{}: {} rows, format {}",
            dataset.display(),
            examples.len(),
            detected.name()
        );
    }
    let mut train = tokenize_all(
        &tok,
        &examples,
        tok_opts,
        &dataset.display().to_string(),
        margs.quiet,
    );
    let eval = match &eval_dataset {
        Some(path) => {
            let (_, rows) = load_examples(path, format, &chat)?;
            tokenize_all(
                &tok,
                &rows,
                tok_opts,
                &path.display().to_string(),
                margs.quiet,
            )
        }
        None if eval_split > 0.0 => {
            let mut order: Vec<usize> = (0..train.len()).collect();
            Rng::new(opts.seed).shuffle(&mut order);
            let n_eval = ((train.len() as f64 * eval_split as f64).ceil() as usize)
                .min(train.len().saturating_sub(1));
            let mut held: Vec<usize> = order[..n_eval].to_vec();
            held.sort_unstable();
            let eval: Vec<TokenizedExample> = held.iter().map(|&i| train[i].clone()).collect();
            let mut keep = vec![true; train.len()];
            held.iter().for_each(|&i| keep[i] = false);
            let mut k = keep.iter();
            train.retain(|_| *k.next().expect("one flag per row"));
            eval
        }
        None => Vec::new(),
    };
    if train.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no usable training rows",
            dataset.display()
        )));
    }
    if !margs.quiet {
        let tokens: usize = train.iter().map(|e| e.input_ids.len()).sum();
        eprintln!(
            "train: {} sequences ({tokens} tokens); eval: {} sequences",
            train.len(),
            eval.len()
        );
    }

    let device = match &group {
        None => margs.compute_device()?,
        Some(g) => {
            if margs.device_choice()? == DeviceChoice::Cpu {
                return Err(Error::unsupported(
                    "data-parallel training runs on GPUs over NCCL: use --device cuda (or auto), \
                     or train in one process",
                ));
            }
            let device = crate::device::open_gpu(g.ranks.local_rank)?;
            if !margs.quiet {
                eprintln!("device: {}", device.describe());
            }
            device
        }
    };
    // Every rank joins before the (slow) model load, so the rendezvous waits only for start-up.
    #[cfg(feature = "cuda")]
    let nccl = match (&group, &device) {
        (Some(g), ComputeDevice::Cuda(gpus)) => {
            Some(crate::dist::join_gpu_group(gpus.primary(), g, margs.quiet)?)
        }
        _ => None,
    };
    let mut model = margs.load()?;
    let adapter_config = match &margs.adapter {
        // Starting from an adapter: its rank, alpha and targets are the ones being trained, so
        // they are what every checkpoint's adapter_config.json must say.
        Some(dir) => {
            let path = dir.join(crate::formats::peft::CONFIG_FILE);
            let loaded =
                AdapterConfig::from_json(&fsutil::read_json(&path)?, &path.display().to_string())?;
            AdapterConfig {
                lora_dropout: dropout,
                base_model_name_or_path: absolute(&margs.model),
                ..loaded
            }
        }
        None => {
            let fresh = AdapterConfig {
                r,
                lora_alpha: alpha,
                lora_dropout: dropout,
                target_modules,
                use_rslora,
                base_model_name_or_path: absolute(&margs.model),
            };
            model.attach_new_lora(&fresh, &mut Rng::new(opts.seed))?;
            fresh
        }
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let model: Box<dyn TrainModel + '_> = match &device {
        ComputeDevice::Cpu => Box::new(model),
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpus) => Box::new(gpus.model(model)?),
    };
    let mut trainer = Trainer::new(model, adapter_config, &train, &eval, opts.clone(), &out)?;
    #[cfg(feature = "cuda")]
    if let Some(nccl) = nccl {
        trainer.join_group(Box::new(nccl));
    }
    if let Some(dir) = &resume {
        trainer.load_checkpoint(dir)?;
        if !margs.quiet {
            eprintln!(
                "resumed from {} at step {}",
                dir.display(),
                trainer.state.step
            );
        }
    }
    if lead {
        let world_size = group.as_ref().map_or(1, |g| g.ranks.world_size);
        fsutil::write_json(
            &out.join("train_args.json"),
            &json!({"model": absolute(&margs.model), "dataset": absolute(&dataset), "format": detected.name(),
                "max_steps": opts.max_steps, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
                "world_size": world_size, "learning_rate": opts.learning_rate, "seed": opts.seed,
                "lora_r": r, "lora_alpha": alpha, "device": trainer.model.device_name()}),
        )?;
    }
    trainer.run()?;
    if !margs.quiet {
        eprintln!("wrote the adapter to {}", out.display());
    }
    Ok(())
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
