//! `sun generate`: continue a prompt, or answer it as a chat, streaming tokens to stdout.

use crate::chat::{ChatFormat, Message};
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::device::ComputeDevice;
use crate::error::{Error, Result};
use crate::sampling::{generate_with, CpuDecoder, Sampler, SamplingParams};
use crate::tokenizer::{DecodeStream, Tokenizer};
use std::io::Write;
use std::time::Instant;

const HELP: &str = "\
sun generate: continue a prompt (or answer it as a chat) with a model and optional adapter

Usage: sun generate --model DIR --prompt TEXT [options]

Options:
  --prompt TEXT              the prompt
  --chat                     wrap the prompt in the model's chat template (ChatML, LLaMA-2/3,
                             or Guanaco's '### Human: ... ### Assistant:' when it has none)
  --system TEXT              system message for --chat
  --chat-format NAME         force a template: chatml, llama3, llama2, guanaco
  --max-new-tokens N         most tokens to generate [default: 256]
  --temperature T            0 is greedy [default: 0]
  --top-p P                  nucleus sampling threshold [default: 1.0]
  --top-k K                  keep the K most likely tokens, 0 = off [default: 0]
  --seed S                   random seed for sampling [default: 0]
  --ctx N                    context length [default: the model's, at most 4096]
";

/// Sampling flags shared by `generate` and `chat`.
pub(crate) fn sampling_params(args: &mut Args) -> Result<SamplingParams> {
    let temperature: f32 = args.opt_or("--temperature", 0.0)?;
    let top_p: f32 = args.opt_or("--top-p", 1.0)?;
    let top_k: usize = args.opt_or("--top-k", 0)?;
    let seed: u64 = args.opt_or("--seed", 0)?;
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "--temperature: {temperature} must be a finite number >= 0"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::invalid(format!(
            "--top-p: {top_p} must be in (0, 1]"
        )));
    }
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    })
}

/// The chat format: forced by `--chat-format`, else recognised from the tokenizer's template.
pub(crate) fn chat_format(forced: Option<String>, tok: &Tokenizer) -> Result<ChatFormat> {
    match forced {
        Some(name) => ChatFormat::from_name(&name),
        None => ChatFormat::from_template(tok.chat_template()),
    }
}

/// The context length: `--ctx`, else the model's, capped at 4096.
pub(crate) fn context_len(flag: Option<usize>, model_max: usize) -> Result<usize> {
    match flag {
        Some(0) => Err(Error::invalid("--ctx must be positive")),
        Some(n) if n > model_max => Err(Error::invalid(format!(
            "--ctx {n} exceeds the model's {model_max} positions"
        ))),
        Some(n) => Ok(n),
        None => Ok(model_max.min(4096)),
    }
}

/// Runs `sun generate`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(&format!("{HELP}{MODEL_FLAGS_HELP}")) {
        return Ok(());
    }
    let margs = ModelArgs::parse(&mut args)?;
    let prompt: String = args.required("--prompt")?;
    let chat = args.flag("--chat");
    let system: Option<String> = args.opt("--system")?;
    let forced_format: Option<String> = args.opt("--chat-format")?;
    let max_new_tokens: usize = args.opt_or("--max-new-tokens", 256)?;
    let params = sampling_params(&mut args)?;
    let ctx: Option<usize> = args.opt("--ctx")?;
    args.finish()?;

    let tok = margs.tokenizer()?;
    let ids = if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::new("system", &s));
        }
        messages.push(Message::new("user", &prompt));
        let text = chat_format(forced_format, &tok)?.render_text(&messages, true)?;
        tok.encode(&text, false)
    } else {
        tok.encode(&prompt, true)
    };
    let device = margs.compute_device()?;
    let model = margs.load()?;
    let ctx = context_len(ctx, model.config.max_position_embeddings)?;
    let mut sampler = Sampler::new(params)?;
    let mut stream = DecodeStream::new(&tok, true);
    let stdout = std::io::stdout();
    let start = Instant::now();
    let mut first_token_at = None;
    let on_token = |id| {
        first_token_at.get_or_insert_with(Instant::now);
        let mut out = stdout.lock();
        out.write_all(stream.push(id).as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| Error::io("<stdout>", e))
    };
    let eos = tok.eos_ids();
    let gen = match &device {
        ComputeDevice::Cpu => {
            let mut cache = model.new_cache(ctx);
            let mut decoder = CpuDecoder {
                model: &model,
                cache: &mut cache,
            };
            generate_with(
                &mut decoder,
                &ids,
                max_new_tokens,
                &eos,
                &mut sampler,
                on_token,
            )?
        }
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let mut gpu_model = gpu.model(model)?;
            let mut decoder = crate::model::gpu::GpuDecoder::for_generation(&mut gpu_model, ctx)?;
            generate_with(
                &mut decoder,
                &ids,
                max_new_tokens,
                &eos,
                &mut sampler,
                on_token,
            )?
        }
    };
    println!();
    if !margs.quiet {
        let prefill = first_token_at
            .map(|t| t.duration_since(start).as_secs_f64())
            .unwrap_or(0.0);
        let decode = start.elapsed().as_secs_f64() - prefill;
        eprintln!(
            "{} prompt tokens in {:.2}s ({:.1} tokens/s), {} new tokens at {:.1} tokens/s, stop: {:?}",
            ids.len(),
            prefill,
            ids.len() as f64 / prefill.max(1e-9),
            gen.tokens.len(),
            gen.tokens.len().saturating_sub(1) as f64 / decode.max(1e-9),
            gen.stop
        );
    }
    Ok(())
}
