//! `sun merge`: fold a LoRA adapter into its base model.

use crate::cli::dequantize::parse_float_dtype;
use crate::cli::Args;
use crate::error::Result;
use crate::merge::merge;
use std::path::PathBuf;

const HELP: &str = "\
sun merge: add a LoRA adapter's update (scale x B x A) into the base weights

Usage: sun merge --model DIR --adapter DIR --out DIR [options]

The adapted weights are the base's NF4 round trip (what QLoRA trained against) plus the update;
the result is a plain Hugging Face folder any tool loads. A bitsandbytes 4-bit base is
dequantized first.

Options:
  --model DIR                base model folder
  --adapter DIR              PEFT LoRA adapter folder
  --out DIR                  output folder (must not exist)
  --dtype bf16|f16|f32       output dtype [default: bf16]
  --no-quant                 add the update to the stored weights instead of their NF4 round trip
  --quiet                    no progress on stderr
  -h, --help                 this text
";

/// Runs `sun merge`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let model: PathBuf = args.required("--model")?;
    let adapter: PathBuf = args.required("--adapter")?;
    let out: PathBuf = args.required("--out")?;
    let dtype = parse_float_dtype("--dtype", &args.opt_or("--dtype", "bf16".to_string())?)?;
    let dense = args.flag("--no-quant");
    let quiet = args.flag("--quiet");
    args.finish()?;
    let n = merge(&model, &adapter, &out, dtype, dense, quiet)?;
    if !quiet {
        eprintln!("merged {n} adapted weights into {}", out.display());
    }
    Ok(())
}
