//! Quantizing and dequantizing whole safetensors files and Hugging Face model folders, the work
//! behind `sun quantize` and `sun dequantize`.
//!
//! A folder keeps its shard layout: each shard is rewritten under its own name, the shard index
//! is rewritten to match, config.json gains (or loses) `quantization_config`, and every other file
//! (tokenizer, generation config, ...) is copied. Output is staged and renamed into place only
//! when complete.

use crate::error::{Error, Result};
use crate::formats::bnb;
use crate::formats::safetensors::{self, ModelWeights, OwnedTensor, SafeTensors, INDEX_FILE};
use crate::fsutil::{self, StagedDir};
use crate::progress::Progress;
use crate::quant::{dequantize_4bit, quantize_4bit, QuantType};
use crate::tensor::DType;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;

/// How to quantize.
#[derive(Clone, Copy, Debug)]
pub struct QuantizeOptions {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block (a power of two, 64 to 4096).
    pub blocksize: usize,
    /// Quantize the absmax values too (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
}

/// What a conversion did, for the one-line summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Tensors quantized or dequantized.
    pub converted: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
}

impl Summary {
    /// "N tensors, copied M: X MB -> Y MB in Ts", for the one-line report.
    pub fn describe(&self, elapsed: std::time::Duration) -> String {
        format!(
            "{} tensors, copied {}: {:.1} MB -> {:.1} MB in {:.1}s",
            self.converted,
            self.copied,
            self.bytes_in as f64 / 1e6,
            self.bytes_out as f64 / 1e6,
            elapsed.as_secs_f64()
        )
    }
}

/// The linear weights of a LLaMA-family decoder layer, the ones QLoRA keeps in 4 bits
/// (`model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`).
pub fn is_decoder_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, module)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && matches!(
            module,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
        )
}

/// Quantizes `input` (a model folder or one `.safetensors` file) into `output`.
pub fn quantize_path(
    input: &Path,
    output: &Path,
    opts: QuantizeOptions,
    quiet: bool,
) -> Result<Summary> {
    let weights = ModelWeights::open(input)?;
    if let Some(name) = bnb::quantized_weights(&weights).first() {
        return Err(Error::invalid(format!(
            "{}: {name} is already 4-bit; dequantize first",
            input.display()
        )));
    }
    if input.is_dir() {
        let config = read_config(input)?;
        if config.get("quantization_config").is_some() {
            return Err(Error::invalid(format!(
                "{}: config.json already has a quantization_config; dequantize it first",
                input.display()
            )));
        }
        let select = |name: &str, _: DType| is_decoder_linear(name);
        let compute_dtype = config
            .get("torch_dtype")
            .or_else(|| config.get("dtype"))
            .and_then(Value::as_str)
            .and_then(DType::from_torch_name)
            .filter(|d| d.is_float())
            .unwrap_or(DType::BF16);
        let mut config = config;
        config["quantization_config"] =
            bnb::quantization_config(opts.quant_type, opts.double_quant, compute_dtype);
        convert_folder(
            input,
            output,
            &weights,
            &config,
            quiet,
            "quantizing",
            |shard, p| quantize_shard(shard, &select, opts, p),
        )
    } else {
        let select = |_: &str, dtype: DType| dtype.is_float();
        convert_file(input, output, &weights, quiet, "quantizing", |shard, p| {
            quantize_shard(shard, &select, opts, p)
        })
    }
}

/// Dequantizes every 4-bit weight of `input` (folder or file) into `output`, to `dtype` or, when
/// `None`, to the dtype each weight's quant state records.
pub fn dequantize_path(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    quiet: bool,
) -> Result<Summary> {
    let weights = ModelWeights::open(input)?;
    if bnb::quantized_weights(&weights).is_empty() {
        return Err(Error::invalid(format!(
            "{}: holds no bitsandbytes 4-bit weights",
            input.display()
        )));
    }
    if input.is_dir() {
        let mut config = read_config(input)?;
        if let Some(map) = config.as_object_mut() {
            map.remove("quantization_config");
        }
        convert_folder(
            input,
            output,
            &weights,
            &config,
            quiet,
            "dequantizing",
            |shard, p| dequantize_shard(shard, &weights, dtype, p),
        )
    } else {
        convert_file(
            input,
            output,
            &weights,
            quiet,
            "dequantizing",
            |shard, p| dequantize_shard(shard, &weights, dtype, p),
        )
    }
}

/// Reads `dir/config.json`, with an error saying what the folder lacks.
pub(crate) fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::invalid(format!(
            "{}: no config.json (is this a Hugging Face model folder?)",
            dir.display()
        )));
    }
    fsutil::read_json(&path)
}

/// Total elements of the tensors a shard conversion will touch, for the progress line.
fn total_bytes(weights: &ModelWeights) -> u64 {
    weights
        .shards()
        .iter()
        .flat_map(|s| s.tensors())
        .map(|t| (t.end - t.begin) as u64)
        .sum()
}

fn convert_file(
    input: &Path,
    output: &Path,
    weights: &ModelWeights,
    quiet: bool,
    label: &str,
    mut convert: impl FnMut(&SafeTensors, &mut Progress) -> Result<(Vec<OwnedTensor>, Summary)>,
) -> Result<Summary> {
    if output.is_dir() {
        return Err(Error::invalid(format!(
            "{}: is a folder; a single-file input needs an output file",
            output.display()
        )));
    }
    if output.exists() {
        return Err(Error::invalid(format!(
            "{}: output already exists; remove it or choose another --out",
            output.display()
        )));
    }
    let mut progress = Progress::new(
        format!("{label} {}", input.display()),
        total_bytes(weights),
        quiet,
    );
    let shard = &weights.shards()[0];
    let (tensors, summary) = convert(shard, &mut progress)?;
    progress.finish();
    safetensors::write_file(output, &tensors, shard.metadata())?;
    Ok(summary)
}

/// Rewrites the model folder `input` into `output` shard by shard: `convert` turns each shard's
/// tensors into the output's, the shard index is rewritten to match, `config` becomes the
/// config.json, and every other file is copied. Staged, then renamed into place.
pub(crate) fn convert_folder(
    input: &Path,
    output: &Path,
    weights: &ModelWeights,
    config: &Value,
    quiet: bool,
    label: &str,
    mut convert: impl FnMut(&SafeTensors, &mut Progress) -> Result<(Vec<OwnedTensor>, Summary)>,
) -> Result<Summary> {
    let staged = StagedDir::new(output)?;
    let mut progress = Progress::new(
        format!("{label} {}", input.display()),
        total_bytes(weights),
        quiet,
    );
    let mut total = Summary::default();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    let sharded = weights.shards().len() > 1 || !input.join("model.safetensors").is_file();
    for shard in weights.shards() {
        let (tensors, summary) = convert(shard, &mut progress)?;
        let file_name = shard
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.safetensors")
            .to_string();
        for t in &tensors {
            weight_map.insert(t.name.clone(), json!(file_name));
            total_size += t.bytes.len() as u64;
        }
        safetensors::write_file(&staged.path(&file_name), &tensors, shard.metadata())?;
        total.converted += summary.converted;
        total.copied += summary.copied;
        total.bytes_in += summary.bytes_in;
        total.bytes_out += summary.bytes_out;
    }
    progress.finish();
    if sharded {
        let index = json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
        fsutil::write_json(&staged.path(INDEX_FILE), &index)?;
    }
    fsutil::write_json(&staged.path("config.json"), config)?;
    copy_other_files(input, &staged)?;
    staged.commit()?;
    Ok(total)
}

/// Copies every plain file of `input` that is not weights, the shard index or config.json.
fn copy_other_files(input: &Path, staged: &StagedDir) -> Result<()> {
    let entries = std::fs::read_dir(input).map_err(|e| Error::io(input, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(input, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name == "config.json"
        {
            continue;
        }
        std::fs::copy(&path, staged.path(&name)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn quantize_shard(
    shard: &SafeTensors,
    select: &dyn Fn(&str, DType) -> bool,
    opts: QuantizeOptions,
    progress: &mut Progress,
) -> Result<(Vec<OwnedTensor>, Summary)> {
    let mut out = Vec::new();
    let mut summary = Summary::default();
    for info in shard.tensors() {
        let view = shard.view(info);
        summary.bytes_in += view.bytes.len() as u64;
        if select(&info.name, info.dtype) && view.numel() > 0 {
            let q = quantize_4bit(view, opts.quant_type, opts.blocksize, opts.double_quant)
                .map_err(|e| {
                    Error::invalid(format!(
                        "{}: tensor {}: {e}",
                        shard.path().display(),
                        info.name
                    ))
                })?;
            let group = bnb::to_tensors(&info.name, &q)?;
            summary.bytes_out += group.iter().map(|t| t.bytes.len() as u64).sum::<u64>();
            summary.converted += 1;
            out.extend(group);
        } else {
            summary.bytes_out += view.bytes.len() as u64;
            summary.copied += 1;
            out.push(OwnedTensor::new(
                info.name.clone(),
                info.dtype,
                info.shape.clone(),
                view.bytes.to_vec(),
            )?);
        }
        progress.advance(view.bytes.len() as u64);
    }
    Ok((out, summary))
}

fn dequantize_shard(
    shard: &SafeTensors,
    weights: &ModelWeights,
    dtype: Option<DType>,
    progress: &mut Progress,
) -> Result<(Vec<OwnedTensor>, Summary)> {
    let mut out = Vec::new();
    let mut summary = Summary::default();
    let quantized: HashSet<String> = bnb::quantized_weights(weights).into_iter().collect();
    for info in shard.tensors() {
        let size = (info.end - info.begin) as u64;
        summary.bytes_in += size;
        progress.advance(size);
        if bnb::is_companion(&info.name, |n| weights.contains(n)) {
            continue;
        }
        if quantized.contains(&info.name) {
            let (packed, state) = bnb::read_quantized(weights, &info.name)?;
            let target = dtype.unwrap_or(state.dtype);
            let bytes = dequantize_4bit(packed, &state, target)?;
            summary.bytes_out += bytes.len() as u64;
            summary.converted += 1;
            out.push(OwnedTensor::new(
                info.name.clone(),
                target,
                state.shape.clone(),
                bytes,
            )?);
        } else {
            summary.bytes_out += size;
            summary.copied += 1;
            out.push(OwnedTensor::new(
                info.name.clone(),
                info.dtype,
                info.shape.clone(),
                shard.view(info).bytes.to_vec(),
            )?);
        }
    }
    Ok((out, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_linears_are_recognised() {
        assert!(is_decoder_linear("model.layers.0.self_attn.q_proj.weight"));
        assert!(is_decoder_linear("model.layers.31.mlp.down_proj.weight"));
        assert!(!is_decoder_linear("model.layers.0.input_layernorm.weight"));
        assert!(!is_decoder_linear("lm_head.weight"));
        assert!(!is_decoder_linear("model.embed_tokens.weight"));
        assert!(!is_decoder_linear("model.layers.x.mlp.up_proj.weight"));
    }
}
