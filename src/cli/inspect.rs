//! `sun inspect`: what a safetensors file or model folder holds.

use crate::cli::Args;
use crate::error::Result;
use crate::formats::bnb;
use crate::formats::safetensors::ModelWeights;
use crate::quant::Absmax;
use crate::tensor::checked_numel;
use serde_json::json;
use std::collections::HashSet;

const HELP: &str = "\
sun inspect: list the tensors of a safetensors file or model folder

Usage: sun inspect PATH [--json]

Prints one line per tensor (name, dtype, shape, bytes); a bitsandbytes 4-bit weight is one line
with its quantization (type, blocksize, double quant, original dtype and shape) and bits per
parameter. A summary line ends the list.

Options:
  --json       one JSON object instead of the table
  -h, --help   this text
";

/// One row of the listing.
struct Row {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: u64,
    params: u64,
    quant: Option<String>,
}

/// Runs `sun inspect`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let as_json = args.flag("--json");
    let path = args.positional("PATH")?;
    args.finish()?;
    let weights = ModelWeights::open(&path)?;
    let quantized: HashSet<String> = bnb::quantized_weights(&weights).into_iter().collect();
    let mut rows = Vec::new();
    for shard in weights.shards() {
        for info in shard.tensors() {
            if bnb::is_companion(&info.name, |n| weights.contains(n)) {
                continue;
            }
            if quantized.contains(&info.name) {
                let (_, state) = bnb::read_quantized(&weights, &info.name)?;
                let bytes = bnb::stored_bytes(&weights, &info.name);
                let params = state.numel() as u64;
                let dq = match &state.absmax {
                    Absmax::Plain(_) => "no double quant".to_string(),
                    Absmax::Double(d) => {
                        format!("double quant (nested blocksize {})", d.nested_blocksize)
                    }
                };
                rows.push(Row {
                    name: info.name.clone(),
                    dtype: state.quant_type.name().to_string(),
                    shape: state.shape.clone(),
                    bytes,
                    params,
                    quant: Some(format!(
                        "blocksize {}, {dq}, from {}, {:.3} bits/param",
                        state.blocksize,
                        state.dtype,
                        bytes as f64 * 8.0 / params.max(1) as f64
                    )),
                });
            } else {
                let params = checked_numel(&info.shape).unwrap_or(0) as u64;
                rows.push(Row {
                    name: info.name.clone(),
                    dtype: info.dtype.to_string(),
                    shape: info.shape.clone(),
                    bytes: (info.end - info.begin) as u64,
                    params,
                    quant: None,
                });
            }
        }
    }
    let total_bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    let total_params: u64 = rows.iter().map(|r| r.params).sum();
    let bits = total_bytes as f64 * 8.0 / total_params.max(1) as f64;
    if as_json {
        let tensors: Vec<_> = rows
            .iter()
            .map(|r| json!({"name": r.name, "dtype": r.dtype, "shape": r.shape, "bytes": r.bytes, "params": r.params, "quantization": r.quant}))
            .collect();
        let out = json!({"path": path.display().to_string(), "tensors": tensors, "quantized": quantized.len(),
            "params": total_params, "bytes": total_bytes, "bits_per_param": bits});
        println!("{out}");
        return Ok(());
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:width$}  {:5}  {:>20}  {:>12}  quantization",
        "name", "dtype", "shape", "bytes"
    );
    for r in &rows {
        let shape = format!("{:?}", r.shape);
        println!(
            "{:width$}  {:5}  {:>20}  {:>12}  {}",
            r.name,
            r.dtype,
            shape,
            r.bytes,
            r.quant.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} tensors ({} 4-bit), {} parameters, {} bytes, {:.3} bits/param",
        rows.len(),
        quantized.len(),
        total_params,
        total_bytes,
        bits
    );
    Ok(())
}
