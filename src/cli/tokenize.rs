//! `sun tokenize`: text lines to ids, or ids back to text, through a `tokenizer.json`.

use crate::cli::Args;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

const HELP: &str = "\
sun tokenize: encode lines of stdin to token ids, or decode ids back to text

Usage: sun tokenize --tokenizer PATH [--no-special] [--decode] < input

Each input line gives one output line: space-separated ids (with --decode: ids in, text out).

Options:
  --tokenizer PATH   a tokenizer.json, or a folder holding one (tokenizer_config.json beside
                     it is read too)                                            [required]
  --no-special       encode: do not add the post-processor's BOS/EOS;
                     decode: leave special tokens out of the text               [off]
  --decode           read ids, write text                                       [off]
  -h, --help         this text
";

/// Runs `sun tokenize`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let path: PathBuf = args.required("--tokenizer")?;
    let no_special = args.flag("--no-special");
    let decode = args.flag("--decode");
    args.finish()?;
    let tokenizer = Tokenizer::from_file(&path)?;
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let write_err = |e| Error::io("<stdout>", e);
    for (number, line) in stdin.lines().enumerate() {
        let line = line.map_err(|e| {
            Error::invalid(format!(
                "stdin line {}: {e} (input must be UTF-8 text)",
                number + 1
            ))
        })?;
        if decode {
            let ids = parse_ids(&line).map_err(|bad| {
                Error::invalid(format!(
                    "stdin line {}: {bad:?} is not a token id (expected space-separated ids)",
                    number + 1
                ))
            })?;
            writeln!(out, "{}", tokenizer.decode(&ids, no_special)).map_err(write_err)?;
        } else {
            let ids = tokenizer.encode(&line, !no_special);
            let text: Vec<String> = ids.iter().map(u32::to_string).collect();
            writeln!(out, "{}", text.join(" ")).map_err(write_err)?;
        }
    }
    out.flush().map_err(write_err)
}

/// The ids of a line of space-separated numbers, or the first word that is not one.
fn parse_ids(line: &str) -> std::result::Result<Vec<u32>, String> {
    line.split_whitespace()
        .map(|word| word.parse::<u32>().map_err(|_| word.to_owned()))
        .collect()
}
