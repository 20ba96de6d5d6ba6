//! `sun quantize`: NF4/FP4 quantization into the Hugging Face bitsandbytes 4-bit layout.

use crate::cli::Args;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::quantize_model::{quantize_path, QuantizeOptions};

const HELP: &str = "\
sun quantize: quantize weights to 4 bits in the Hugging Face bitsandbytes layout

Usage: sun quantize IN --out OUT [options]

IN is a model folder (config.json + model.safetensors or shards): the decoder layers' linear
weights (q,k,v,o,gate,up,down) are quantized and OUT is a folder that transformers +
bitsandbytes load as a 4-bit model. IN may also be one .safetensors file: every floating-point
tensor in it is quantized and OUT is one .safetensors file.

Options:
  --out PATH                 output folder or file (must not exist)
  --quant-type nf4|fp4       4-bit data type [default: nf4]
  --blocksize N              elements per absmax block, a power of two 64..4096 [default: 64]
  --double-quant             quantize the absmax values too [default: on]
  --no-double-quant          keep absmax values in f32
  --quiet                    no progress on stderr
  -h, --help                 this text
";

/// Runs `sun quantize`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let out: std::path::PathBuf = args.required("--out")?;
    let quant_name: String = args.opt_or("--quant-type", "nf4".to_string())?;
    let quant_type = QuantType::from_name(&quant_name)
        .ok_or_else(|| Error::invalid(format!("--quant-type: {quant_name:?} is not nf4 or fp4")))?;
    let blocksize: usize = args.opt_or("--blocksize", 64)?;
    let on = args.flag("--double-quant");
    let off = args.flag("--no-double-quant");
    if on && off {
        return Err(Error::invalid(
            "--double-quant and --no-double-quant contradict each other",
        ));
    }
    let quiet = args.flag("--quiet");
    let input = args.positional("input path (IN)")?;
    args.finish()?;
    if !(64..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::invalid(format!(
            "--blocksize: {blocksize} is not a power of two from 64 to 4096"
        )));
    }
    let opts = QuantizeOptions {
        quant_type,
        blocksize,
        double_quant: !off,
    };
    let start = std::time::Instant::now();
    let s = quantize_path(&input, &out, opts, quiet)?;
    if !quiet {
        eprintln!(
            "quantized {}, wrote {}",
            s.describe(start.elapsed()),
            out.display()
        );
    }
    Ok(())
}
