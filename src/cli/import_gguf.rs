//! `sun import-gguf`: a llama.cpp GGUF file to a Hugging Face model folder.

use super::Args;
use crate::error::{Error, Result};
use crate::gguf_import::{import_gguf, ImportOptions};
use crate::tensor::DType;

const HELP: &str = "\
sun import-gguf: turn a llama-architecture GGUF file into a Hugging Face model folder

Usage: sun import-gguf FILE.gguf --out DIR [options]

Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json into DIR (which must not exist or be empty). Quantized tensors
(Q4_0, Q4_1, Q8_0) are dequantized; Q/K rows are put back in Hugging Face order.

Options:
  --out DIR        output folder (required)
  --dtype TYPE     weight dtype: bf16 or f32 [default: bf16]
  --quiet          no progress on stderr
  -h, --help       this help
";

/// Runs `sun import-gguf`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let out: std::path::PathBuf = args.required("--out")?;
    let dtype: String = args.opt_or("--dtype", "bf16".to_string())?;
    let dtype = match dtype.as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f32" | "float32" => DType::F32,
        _ => {
            return Err(Error::invalid(format!(
                "--dtype {dtype:?}: choose bf16 or f32"
            )))
        }
    };
    let quiet = args.flag("--quiet");
    let input = args.positional("the GGUF file (sun import-gguf FILE.gguf --out DIR)")?;
    args.finish()?;

    let start = std::time::Instant::now();
    let summary = import_gguf(&input, &out, ImportOptions { dtype, quiet })?;
    if !summary.skipped.is_empty() && !quiet {
        eprintln!("note: left out {}", summary.skipped.join(", "));
    }
    let types: Vec<String> = (summary.source_types.iter())
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    let p = &summary.params;
    println!(
        "{}: {} tensors ({:.1}M parameters, from {}) -> {} as {}; {} layers, hidden {}, vocab {}; {:.1}s",
        input.display(),
        summary.tensors,
        summary.parameters as f64 / 1e6,
        types.join(", "),
        out.display(),
        dtype.torch_name().unwrap_or(dtype.name()),
        p.num_hidden_layers,
        p.hidden_size,
        p.vocab_size,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
