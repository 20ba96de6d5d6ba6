//! The `sun` commands: one module each. A command parses its flags, calls the library and prints
//! results on stdout; progress and logs go to stderr.

pub mod bench;
pub mod bench_kernels;
pub mod bench_model;
pub mod chat;
pub mod dequantize;
pub mod dist_args;
pub mod eval;
pub mod generate;
pub mod import_gguf;
pub mod inspect;
pub mod merge;
pub mod model_args;
pub mod quantize;
pub mod selftest;
pub mod serve;
pub mod tokenize;
pub mod train;

use crate::error::{Error, Result};
use std::ffi::OsString;

const HELP: &str = "\
sun: QLoRA fine-tuning for LLaMA-family models

Usage: sun <command> [options]   (sun <command> --help for each)

Commands:
  inspect      list the tensors, dtypes, shapes and quantization of a file or model folder
  quantize     quantize weights to NF4/FP4 in the Hugging Face bitsandbytes layout
  dequantize   turn a 4-bit file or folder back into plain floats
  train        QLoRA fine-tuning on an instruction dataset
  generate     continue a prompt or answer it as a chat, streaming tokens
  chat         a multi-turn conversation in the terminal
  serve        an OpenAI-compatible HTTP API and a chat page
  eval         perplexity on a text file, MMLU accuracy
  merge        fold a LoRA adapter into its base model
  bench        time the engine's hot paths (quant, generate, train, kernels)
  tokenize     encode text lines to token ids (or decode ids) with a tokenizer.json
  selftest     check the GPU kernels against the CPU reference (--device cuda)
  import-gguf  convert a llama.cpp GGUF file into a Hugging Face model folder
";

/// Runs `sun` with the arguments after the program name.
pub fn run(args: Vec<OsString>) -> Result<()> {
    let Some(command) = args.first().and_then(|a| a.to_str()).map(str::to_owned) else {
        print!("{HELP}");
        return Ok(());
    };
    let rest = Args::new(args[1..].to_vec());
    match command.as_str() {
        "inspect" => inspect::run(rest),
        "quantize" => quantize::run(rest),
        "dequantize" => dequantize::run(rest),
        "generate" => generate::run(rest),
        "chat" => chat::run(rest),
        "serve" => serve::run(rest),
        "eval" => eval::run(rest),
        "train" => train::run(rest),
        "merge" => merge::run(rest),
        "bench" => bench::run(rest),
        "selftest" => selftest::run(rest),
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            Ok(())
        }
        "tokenize" => tokenize::run(rest),
        "-V" | "--version" => {
            println!("sun {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "import-gguf" => import_gguf::run(rest),
        other => Err(Error::invalid(format!(
            "unknown command {other:?}; run `sun --help` for the list"
        ))),
    }
}

/// Flag parsing shared by every command: pico-args plus `--help`, typed values with errors that
/// name the flag, and a check that nothing unknown was passed.
#[derive(Debug)]
pub struct Args {
    inner: pico_args::Arguments,
}

impl Args {
    /// Wraps the arguments after the command name.
    pub fn new(args: Vec<OsString>) -> Self {
        Args {
            inner: pico_args::Arguments::from_vec(args),
        }
    }

    /// True (and prints `help`) when `--help` or `-h` was given.
    pub fn help(&mut self, help: &str) -> bool {
        let asked = self.inner.contains(["-h", "--help"]);
        if asked {
            print!("{help}");
        }
        asked
    }

    /// True if the switch `name` was given.
    pub fn flag(&mut self, name: &'static str) -> bool {
        self.inner.contains(name)
    }

    /// The value of option `name`, parsed, if given.
    pub fn opt<T: std::str::FromStr>(&mut self, name: &'static str) -> Result<Option<T>> {
        let raw: Option<String> = self
            .inner
            .opt_value_from_str(name)
            .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        raw.map(|s| {
            s.parse::<T>()
                .map_err(|_| Error::invalid(format!("{name}: cannot parse {s:?}")))
        })
        .transpose()
    }

    /// The value of option `name`, or `default`.
    pub fn opt_or<T: std::str::FromStr>(&mut self, name: &'static str, default: T) -> Result<T> {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    /// The value of a required option `name`.
    pub fn required<T: std::str::FromStr>(&mut self, name: &'static str) -> Result<T> {
        self.opt(name)?
            .ok_or_else(|| Error::invalid(format!("missing required option {name}")))
    }

    /// The next positional argument, required; `what` names it in the error.
    pub fn positional(&mut self, what: &str) -> Result<std::path::PathBuf> {
        self.inner
            .opt_free_from_os_str(|s| {
                Ok::<_, std::convert::Infallible>(std::path::PathBuf::from(s))
            })
            .map_err(|e| Error::invalid(format!("{what}: {e}")))?
            .ok_or_else(|| Error::invalid(format!("missing {what}")))
    }

    /// The next free argument as a word (a subcommand), if any.
    pub fn subcommand(&mut self) -> Result<Option<String>> {
        self.inner
            .subcommand()
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// Fails on anything left unparsed (an unknown flag or an extra argument).
    pub fn finish(self) -> Result<()> {
        let rest = self.inner.finish();
        if rest.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = rest
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            Err(Error::invalid(format!(
                "unexpected argument(s): {}; see --help",
                list.join(" ")
            )))
        }
    }
}
