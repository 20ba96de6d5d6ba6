//! `sun serve`: an OpenAI-compatible API and a chat page for a model and optional adapter.

use crate::cli::generate::{chat_format, context_len};
use crate::cli::model_args::{ModelArgs, MODEL_FLAGS_HELP};
use crate::cli::Args;
use crate::error::Result;
use crate::serve::{ServeLimits, ServedModel, Server};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const HELP: &str = "\
sun serve: an OpenAI-compatible HTTP API and a chat page for a model (and optional adapter)

Usage: sun serve --model DIR [--adapter DIR] [options]

Endpoints: GET / (the chat page), GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (with `stream: true` as server-sent events). Requests are answered one at
a time in arrival order; sampling defaults are `sun generate`'s (temperature 0, top_p 1,
seed 0, 256 new tokens), so the same settings give the same answer. --device applies: with a
GPU (cuda, or auto when one initialises) one worker thread owns it and runs every request
there. Once the model is ready, the address is printed on stdout; a log line per request goes
to stderr.

Options:
  --host ADDR                address to listen on; anything but loopback exposes the model
                             to the network, without authentication [default: 127.0.0.1]
  --port N                   port, 0 for any free one [default: 8080]
  --chat-format NAME         force a template: chatml, llama3, llama2, guanaco
  --ctx N                    context length: prompt and answer together
                             [default: the model's, at most 4096]
  --max-connections N        open connections at most; more are answered 503 [default: 128]
  --max-body-bytes N         largest request body [default: 1048576]
  --max-tokens N             largest max_tokens a request may ask for [default: 1024]
  --read-timeout SECONDS     time a client has to send its whole request [default: 10]
";

/// Runs `sun serve`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(&format!("{HELP}{MODEL_FLAGS_HELP}")) {
        return Ok(());
    }
    let margs = ModelArgs::parse(&mut args)?;
    let host: String = args.opt_or("--host", "127.0.0.1".to_string())?;
    let port: u16 = args.opt_or("--port", 8080)?;
    let forced_format: Option<String> = args.opt("--chat-format")?;
    let ctx: Option<usize> = args.opt("--ctx")?;
    let limits = ServeLimits {
        max_connections: args.opt_or("--max-connections", 128)?,
        max_body_bytes: args.opt_or("--max-body-bytes", 1 << 20)?,
        max_tokens: args.opt_or("--max-tokens", 1024)?,
        read_timeout: Duration::from_secs(args.opt_or("--read-timeout", 10)?),
    };
    args.finish()?;

    let tokenizer = margs.tokenizer()?;
    let format = chat_format(forced_format, &tokenizer)?;
    let device = margs.device_choice()?;
    let model = margs.load()?;
    let context_len = context_len(ctx, model.config.max_position_embeddings)?;
    let server = Server::bind(&host, port, limits, margs.quiet)?;
    let addr = server.local_addr()?;
    let served = ServedModel {
        model,
        device,
        gpus: margs.gpus.clone(),
        tokenizer,
        format,
        context_len,
        name: served_name(&margs.model, margs.adapter.as_deref()),
    };
    server.run(served, || {
        if !addr.ip().is_loopback() {
            eprintln!(
                "sun serve: warning: listening on {addr}, reachable from the network with no \
                 authentication"
            );
        }
        let mut stdout = std::io::stdout();
        // The address is the command's output; a closed stdout does not stop the server.
        let _ = writeln!(stdout, "http://{addr}/").and_then(|_| stdout.flush());
    })
}

/// The model's folder name, with the adapter's after a `+`.
fn served_name(model: &Path, adapter: Option<&Path>) -> String {
    let name = |p: &Path| {
        p.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| p.display().to_string())
    };
    match adapter {
        Some(a) => format!("{}+{}", name(model), name(a)),
        None => name(model),
    }
}
