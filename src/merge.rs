//! Merging a LoRA adapter into its base model: `W' = W + scale · B A` for every adapted linear
//! layer, written as a plain Hugging Face folder (no quantization) that any tool loads.
//!
//! The base weight W is what the adapter was trained against: the NF4 round trip of the original
//! weight (blocksize 64, double quant, as training quantizes it), or the weight as stored with
//! `dense`. A bitsandbytes 4-bit folder is dequantized.

use crate::error::{Error, Result};
use crate::formats::bnb;
use crate::formats::peft::read_adapter;
use crate::formats::safetensors::{ModelWeights, OwnedTensor, SafeTensors};
use crate::model::lora::LoraPair;
use crate::progress::Progress;
use crate::quant::{dequantize_4bit_f32, quantize_4bit_f32, QuantType};
use crate::quantize_model::{convert_folder, is_decoder_linear, read_config, Summary};
use crate::tensor::{f32_to_bytes, DType};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Merges `adapter` into the model folder `model` and writes the result to `out` in `dtype`.
/// With `dense`, the adapter is added to the stored weights instead of their NF4 round trip.
/// Returns how many weights were merged.
pub fn merge(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: DType,
    dense: bool,
    quiet: bool,
) -> Result<usize> {
    let mut config = read_config(model)?;
    let weights = ModelWeights::open(model)?;
    let (adapter_config, modules) = read_adapter(adapter)?;
    let mut deltas: HashMap<String, LoraPair> = HashMap::new();
    for m in modules {
        let name = format!("{}.weight", m.module);
        if !weights.contains(&name) {
            return Err(Error::invalid(format!(
                "{}: adapts {}, which {} does not have (made for another model?)",
                adapter.display(),
                m.module,
                model.display()
            )));
        }
        let pair = LoraPair::from_factors(
            m.a,
            m.b,
            m.in_features,
            m.out_features,
            adapter_config.r,
            adapter_config.scale(),
        );
        deltas.insert(name, pair);
    }
    if let Some(map) = config.as_object_mut() {
        map.remove("quantization_config");
        map.insert("torch_dtype".into(), serde_json::json!(dtype.torch_name()));
    }
    let quantized: HashSet<String> = bnb::quantized_weights(&weights).into_iter().collect();
    let summary = convert_folder(
        model,
        out,
        &weights,
        &config,
        quiet,
        "merging",
        |shard, progress| merge_shard(shard, &weights, &quantized, &deltas, dtype, dense, progress),
    )?;
    Ok(summary.converted)
}

/// One shard: every float tensor in `dtype`, adapted weights with their update added.
fn merge_shard(
    shard: &SafeTensors,
    weights: &ModelWeights,
    quantized: &HashSet<String>,
    deltas: &HashMap<String, LoraPair>,
    dtype: DType,
    dense: bool,
    progress: &mut Progress,
) -> Result<(Vec<OwnedTensor>, Summary)> {
    let mut out = Vec::new();
    let mut summary = Summary::default();
    for info in shard.tensors() {
        let size = (info.end - info.begin) as u64;
        progress.advance(size);
        summary.bytes_in += size;
        if bnb::is_companion(&info.name, |n| weights.contains(n)) {
            continue;
        }
        let (mut values, shape) = if quantized.contains(&info.name) {
            let (packed, state) = bnb::read_quantized(weights, &info.name)?;
            let mut v = vec![0.0f32; state.numel()];
            dequantize_4bit_f32(packed, &state, &mut v)?;
            (v, state.shape.clone())
        } else if info.dtype.is_float() {
            let v = shard.view(info).to_f32(&info.name)?.into_owned();
            if !dense && is_decoder_linear(&info.name) {
                // The weight as QLoRA trained against it.
                let q = quantize_4bit_f32(&v, &info.shape, info.dtype, QuantType::Nf4, 64, true)?;
                let mut round = vec![0.0f32; v.len()];
                dequantize_4bit_f32(&q.packed, &q.state, &mut round)?;
                (round, info.shape.clone())
            } else {
                (v, info.shape.clone())
            }
        } else {
            out.push(OwnedTensor::new(
                info.name.clone(),
                info.dtype,
                info.shape.clone(),
                shard.view(info).bytes.to_vec(),
            )?);
            summary.copied += 1;
            continue;
        };
        if let Some(pair) = deltas.get(&info.name) {
            if shape != [pair.out_features, pair.in_features] {
                return Err(Error::invalid(format!(
                    "{} is {shape:?} but the adapter expects [{}, {}]",
                    info.name, pair.out_features, pair.in_features
                )));
            }
            for (w, d) in values.iter_mut().zip(pair.delta_weight()) {
                *w += d;
            }
            summary.converted += 1;
        } else {
            summary.copied += 1;
        }
        let bytes = f32_to_bytes(&values, dtype);
        summary.bytes_out += bytes.len() as u64;
        out.push(OwnedTensor::new(info.name.clone(), dtype, shape, bytes)?);
    }
    Ok((out, summary))
}
