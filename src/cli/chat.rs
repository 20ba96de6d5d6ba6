//! `sun chat`: a multi-turn conversation in the terminal.

use crate::chat::{ChatFormat, Message};
use crate::cli::generate::{chat_format, context_len, sampling_params};
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::device::ComputeDevice;
use crate::error::{Error, Result};
use crate::sampling::{generate_with, CachedDecoder, CpuDecoder, Sampler};
use crate::tokenizer::{DecodeStream, Tokenizer};
use std::io::{BufRead, Write};

const HELP: &str = "\
sun chat: talk with a model (and optional adapter) in the terminal

Usage: sun chat --model DIR [options]

Type a message and press Enter; an empty line or end of input (Ctrl-D) quits, /reset starts
over. The conversation is rendered with the model's chat template; the KV cache is reused
across turns. --device applies: with a GPU (cuda, or auto when one initialises) the model runs
there, as in `sun generate`.

Options:
  --system TEXT              system message
  --chat-format NAME         force a template: chatml, llama3, llama2, guanaco
  --max-new-tokens N         most tokens per answer [default: 512]
  --temperature T            0 is greedy [default: 0]
  --top-p P                  nucleus sampling threshold [default: 1.0]
  --top-k K                  keep the K most likely tokens, 0 = off [default: 0]
  --seed S                   random seed for sampling [default: 0]
  --ctx N                    context length [default: the model's, at most 4096]
";

/// Runs `sun chat`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(&format!("{HELP}{MODEL_FLAGS_HELP}")) {
        return Ok(());
    }
    let margs = ModelArgs::parse(&mut args)?;
    let system: Option<String> = args.opt("--system")?;
    let forced_format: Option<String> = args.opt("--chat-format")?;
    let max_new_tokens: usize = args.opt_or("--max-new-tokens", 512)?;
    let params = sampling_params(&mut args)?;
    let ctx: Option<usize> = args.opt("--ctx")?;
    args.finish()?;

    let tok = margs.tokenizer()?;
    let device = margs.compute_device()?;
    let model = margs.load()?;
    let chat = Conversation {
        tok: &tok,
        format: chat_format(forced_format, &tok)?,
        system,
        max_new_tokens,
        sampler: Sampler::new(params)?,
    };
    let ctx = context_len(ctx, model.config.max_position_embeddings)?;
    match &device {
        ComputeDevice::Cpu => {
            let mut cache = model.new_cache(ctx);
            chat.run(&mut CpuDecoder {
                model: &model,
                cache: &mut cache,
            })
        }
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let mut gpu_model = gpu.model(model)?;
            chat.run(&mut crate::model::gpu::GpuDecoder::for_generation(
                &mut gpu_model,
                ctx,
            )?)
        }
    }
}

/// A decoder whose cache can be cut back to a prefix, so that a turn runs only the part of
/// the conversation the cache does not hold yet.
trait Rewind: CachedDecoder {
    /// Keeps at most the first `keep` positions; returns how many are kept.
    fn rewind(&mut self, keep: usize) -> usize;
}

impl Rewind for CpuDecoder<'_> {
    fn rewind(&mut self, keep: usize) -> usize {
        self.cache.truncate(keep);
        self.cache.len()
    }
}

#[cfg(feature = "cuda")]
impl Rewind for crate::model::gpu::GpuDecoder<'_, '_> {
    fn rewind(&mut self, keep: usize) -> usize {
        self.truncate(keep);
        self.positions()
    }
}

/// The terminal conversation's settings and sampler.
struct Conversation<'t> {
    tok: &'t Tokenizer,
    format: ChatFormat,
    system: Option<String>,
    max_new_tokens: usize,
    sampler: Sampler,
}

impl Conversation<'_> {
    /// Reads turns from stdin and answers each on stdout until an empty line or end of input.
    fn run<D: Rewind>(mut self, decoder: &mut D) -> Result<()> {
        let tok = self.tok;
        let fresh = || {
            self.system
                .iter()
                .map(|s| Message::new("system", s))
                .collect::<Vec<_>>()
        };
        let mut messages = fresh();
        let mut in_cache: Vec<u32> = Vec::new(); // the ids the KV cache holds, in order
        let stdin = std::io::stdin();
        let io_err = |e| Error::io("<terminal>", e);
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line).map_err(io_err)? == 0 || line.trim().is_empty() {
                return Ok(());
            }
            if line.trim() == "/reset" {
                messages = fresh();
                decoder.clear();
                in_cache.clear();
                continue;
            }
            messages.push(Message::new("user", line.trim_end_matches(['\n', '\r'])));
            let ids = tok.encode(&self.format.render_text(&messages, true)?, false);
            // Reuse the cache for the part of the conversation it already holds.
            let shared = in_cache
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ids.len() - 1);
            let shared = decoder.rewind(shared);
            if ids.len() - shared > decoder.capacity() - decoder.positions() {
                return Err(Error::invalid(format!(
                    "the conversation ({} tokens) no longer fits the context of {}; /reset or \
                     raise --ctx",
                    ids.len(),
                    decoder.capacity()
                )));
            }
            let mut stream = DecodeStream::new(tok, true);
            let mut stdout = std::io::stdout();
            let gen = generate_with(
                decoder,
                &ids[shared..],
                self.max_new_tokens,
                &tok.eos_ids(),
                &mut self.sampler,
                |id| {
                    stdout
                        .write_all(stream.push(id).as_bytes())
                        .and_then(|_| stdout.flush())
                        .map_err(|e| Error::io("<stdout>", e))
                },
            )?;
            println!();
            let reply = tok.decode(&gen.tokens, true);
            messages.push(Message::new("assistant", reply.trim()));
            in_cache = ids
                .iter()
                .chain(&gen.tokens)
                .copied()
                .take(decoder.positions())
                .collect();
        }
    }
}
