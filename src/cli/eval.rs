//! `sun eval`: perplexity on a text file, and MMLU accuracy.

use crate::cli::generate::context_len;
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::device::ComputeDevice;
use crate::error::{Error, Result};
use crate::eval::perplexity;
use crate::mmlu::{load_questions, score};
use crate::progress::Progress;
use serde_json::json;
use std::path::PathBuf;

const HELP: &str = "\
sun eval: evaluate a model (and optional adapter)

Usage:
  sun eval perplexity --model DIR --text FILE [--ctx 512] [--stride 512] [--max-tokens N] [--json]
  sun eval mmlu --model DIR --data FILE [--shots 0] [--limit N] [--json]

perplexity: sliding windows of --ctx tokens every --stride tokens over the tokenized file;
  each token is scored once, with as much context as its window gives. --max-tokens keeps
  only the first N tokens.
mmlu: multiple-choice questions (JSONL: question, answer_a..answer_d, correct_answer, topic;
  or question, choices, answer, subject), scored as qlora.py does: the answer is the argmax of
  the logits of the ' A', ' B', ' C', ' D' tokens after 'Answer:'. --shots N puts N solved
  questions of the same subject first; --limit N scores only the first N questions.
";

/// Runs `sun eval`.
pub fn run(mut args: Args) -> Result<()> {
    let sub = args.subcommand()?;
    if args.help(&format!("{HELP}\nOptions:\n{MODEL_FLAGS_HELP}")) || sub.is_none() {
        if sub.is_none() {
            print!("{HELP}");
        }
        return Ok(());
    }
    match sub.as_deref() {
        Some("perplexity") => run_perplexity(args),
        Some("mmlu") => run_mmlu(args),
        Some(other) => Err(Error::invalid(format!(
            "sun eval: unknown evaluation {other:?}; use perplexity or mmlu"
        ))),
        None => unreachable!("handled above"),
    }
}

fn run_perplexity(mut args: Args) -> Result<()> {
    let margs = ModelArgs::parse(&mut args)?;
    let text_path: PathBuf = args.required("--text")?;
    let ctx: usize = args.opt_or("--ctx", 512)?;
    let stride: usize = args.opt_or("--stride", 512)?;
    let max_tokens: Option<usize> = args.opt("--max-tokens")?;
    let as_json = args.flag("--json");
    args.finish()?;
    let text = std::fs::read_to_string(&text_path).map_err(|e| Error::io(&text_path, e))?;
    let tok = margs.tokenizer()?;
    let mut ids = tok.encode(&text, true);
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        return Err(Error::invalid(format!(
            "{}: fewer than 2 tokens to score",
            text_path.display()
        )));
    }
    let device = margs.compute_device()?;
    let model = margs.load()?;
    context_len(Some(ctx), model.config.max_position_embeddings)?;
    let windows = ids.len().saturating_sub(1).div_ceil(stride).max(1) as u64;
    let mut progress = Progress::new("perplexity", windows, margs.quiet);
    let on_window = |_, _| progress.advance(1);
    let p = match &device {
        ComputeDevice::Cpu => perplexity(&model, &ids, ctx, stride, on_window)?,
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let mut gpu_model = gpu.model(model)?;
            let mut decoder = crate::model::gpu::GpuDecoder::new(&mut gpu_model, ctx)?;
            crate::eval::perplexity_with(&mut decoder, &ids, ctx, stride, on_window)?
        }
    };
    progress.finish();
    if as_json {
        println!(
            "{}",
            json!({"perplexity": p.perplexity, "mean_nll": p.mean_nll, "tokens": p.tokens, "ctx": ctx, "stride": stride})
        );
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.4} over {} tokens, ctx {ctx}, stride {stride})",
            p.perplexity, p.mean_nll, p.tokens
        );
    }
    Ok(())
}

fn run_mmlu(mut args: Args) -> Result<()> {
    let margs = ModelArgs::parse(&mut args)?;
    let data: PathBuf = args.required("--data")?;
    let shots: usize = args.opt_or("--shots", 0)?;
    let limit: Option<usize> = args.opt("--limit")?;
    let as_json = args.flag("--json");
    args.finish()?;
    let questions = load_questions(&data)?;
    let tok = margs.tokenizer()?;
    let device = margs.compute_device()?;
    let model = margs.load()?;
    let report = match &device {
        ComputeDevice::Cpu => score(&model, &tok, &questions, shots, limit, margs.quiet)?,
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let ctx = context_len(None, model.config.max_position_embeddings)?;
            let mut gpu_model = gpu.model(model)?;
            let mut decoder = crate::model::gpu::GpuDecoder::new(&mut gpu_model, ctx)?;
            crate::mmlu::score_with(&mut decoder, &tok, &questions, shots, limit, margs.quiet)?
        }
    };
    if as_json {
        let subjects: serde_json::Map<String, serde_json::Value> = report
            .subjects
            .iter()
            .map(|(s, (c, n))| {
                (
                    s.clone(),
                    json!({"correct": c, "total": n, "accuracy": *c as f64 / *n as f64}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({"accuracy": report.accuracy(), "mean_subject_accuracy": report.mean_subject_accuracy(), "questions": report.total(), "subjects": subjects})
        );
    } else {
        for (subject, (correct, total)) in &report.subjects {
            println!(
                "{subject:40} {correct:5}/{total:<5} {:.3}",
                *correct as f64 / *total as f64
            );
        }
        println!(
            "accuracy {:.4} over {} questions; mean of {} subjects {:.4}",
            report.accuracy(),
            report.total(),
            report.subjects.len(),
            report.mean_subject_accuracy()
        );
    }
    Ok(())
}
