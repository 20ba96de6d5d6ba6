//! `sun chat`: a multi-turn conversation in the terminal.

use crate::chat::Message;
use crate::cli::generate::{chat_format, context_len, sampling_params};
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::error::{Error, Result};
use crate::sampling::{generate, Sampler};
use crate::tokenizer::DecodeStream;
use std::io::{BufRead, Write};

const HELP: &str = "\
sun chat: talk with a model (and optional adapter) in the terminal

Usage: sun chat --model DIR [options]

Type a message and press Enter; an empty line or end of input (Ctrl-D) quits, /reset starts
over. The conversation is rendered with the model's chat template; the KV cache is reused
across turns.

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
    margs.require_cpu("sun chat")?;
    let system: Option<String> = args.opt("--system")?;
    let forced_format: Option<String> = args.opt("--chat-format")?;
    let max_new_tokens: usize = args.opt_or("--max-new-tokens", 512)?;
    let params = sampling_params(&mut args)?;
    let ctx: Option<usize> = args.opt("--ctx")?;
    args.finish()?;

    let tok = margs.tokenizer()?;
    let format = chat_format(forced_format, &tok)?;
    let model = margs.load()?;
    let mut cache = model.new_cache(context_len(ctx, model.config.max_position_embeddings)?);
    let mut sampler = Sampler::new(params)?;
    let fresh = || {
        system
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
            cache.clear();
            in_cache.clear();
            continue;
        }
        messages.push(Message::new("user", line.trim_end_matches(['\n', '\r'])));
        let ids = tok.encode(&format.render_text(&messages, true)?, false);
        // Reuse the cache for the part of the conversation it already holds.
        let shared = in_cache
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        cache.truncate(shared);
        if ids.len() - shared > cache.remaining() {
            return Err(Error::invalid(format!(
                "the conversation ({} tokens) no longer fits the context of {}; /reset or raise --ctx",
                ids.len(),
                cache.max_len()
            )));
        }
        let mut stream = DecodeStream::new(&tok, true);
        let mut stdout = std::io::stdout();
        let gen = generate(
            &model,
            &mut cache,
            &ids[shared..],
            max_new_tokens,
            &tok.eos_ids(),
            &mut sampler,
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
            .take(cache.len())
            .collect();
    }
}
