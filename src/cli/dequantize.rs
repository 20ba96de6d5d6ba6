//! `sun dequantize`: 4-bit weights back to plain floats.

use crate::cli::Args;
use crate::error::{Error, Result};
use crate::quantize_model::dequantize_path;
use crate::tensor::DType;

const HELP: &str = "\
sun dequantize: turn a bitsandbytes 4-bit file or model folder back into plain floats

Usage: sun dequantize IN --out OUT [options]

Options:
  --out PATH                 output folder or file (must not exist)
  --dtype bf16|f16|f32       output dtype [default: the dtype recorded in each quant state]
  --quiet                    no progress on stderr
  -h, --help                 this text
";

/// Parses a user-facing float dtype name.
pub fn parse_float_dtype(flag: &str, name: &str) -> Result<DType> {
    match name {
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        other => Err(Error::invalid(format!(
            "{flag}: {other:?} is not bf16, f16 or f32"
        ))),
    }
}

/// Runs `sun dequantize`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let out: std::path::PathBuf = args.required("--out")?;
    let dtype = args
        .opt::<String>("--dtype")?
        .map(|d| parse_float_dtype("--dtype", &d))
        .transpose()?;
    let quiet = args.flag("--quiet");
    let input = args.positional("input path (IN)")?;
    args.finish()?;
    let start = std::time::Instant::now();
    let s = dequantize_path(&input, &out, dtype, quiet)?;
    if !quiet {
        eprintln!(
            "dequantized {}, wrote {}",
            s.describe(start.elapsed()),
            out.display()
        );
    }
    Ok(())
}
