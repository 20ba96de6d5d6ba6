//! Merging a LoRA adapter into its base model: `W' = W + scale · B A` for every adapted linear
//! layer, written as a plain Hugging Face folder (no quantization) that any tool loads.
//!
//! The base weight W is what the adapter was trained against: the NF4 round trip of the original
//! weight (blocksize 64, double quant, as training quantizes it), or the weight as stored with
//! `dense`. A bitsandbytes 4-bit folder is dequantized.

use crate::error::{Error, Result};
use crate::formats::bnb;
use crate::formats::peft::read_adapter;
use crate::formats::safetensors::{self, ModelWeights, OwnedTensor, INDEX_FILE};
use crate::fsutil::{self, StagedDir};
use crate::model::lora::LoraPair;
use crate::progress::Progress;
use crate::quant::{dequantize_4bit_f32, quantize_4bit_f32, QuantType};
use crate::quantize_model::is_decoder_linear;
use crate::tensor::{f32_to_bytes, DType};
use std::collections::HashMap;
use std::path::Path;

/// Merges `adapter` into `model` and writes the result to `out` in `dtype`. With `dense`, the
/// adapter is added to the stored weights instead of their NF4 round trip.
pub fn merge(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: DType,
    dense: bool,
    quiet: bool,
) -> Result<usize> {
    let weights = ModelWeights::open(model)?;
    let (config, modules) = read_adapter(adapter)?;
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
        deltas.insert(
            name,
            LoraPair::from_factors(
                m.a,
                m.b,
                m.in_features,
                m.out_features,
                config.r,
                config.scale(),
            ),
        );
    }
    let quantized: std::collections::HashSet<String> =
        bnb::quantized_weights(&weights).into_iter().collect();
    let staged = StagedDir::new(out)?;
    let mut progress = Progress::new("merging", weights.names().count() as u64, quiet);
    let mut weight_map = serde_json::Map::new();
    let mut merged = 0;
    for shard in weights.shards() {
        let mut tensors = Vec::new();
        for info in shard.tensors() {
            progress.advance(1);
            if bnb::is_companion(&info.name, |n| weights.contains(n)) {
                continue;
            }
            let (mut values, shape) = if quantized.contains(&info.name) {
                let (packed, state) = bnb::read_quantized(&weights, &info.name)?;
                let mut v = vec![0.0f32; state.numel()];
                dequantize_4bit_f32(packed, &state, &mut v)?;
                (v, state.shape.clone())
            } else if info.dtype.is_float() {
                let v = shard.view(info).to_f32(&info.name)?.into_owned();
                if !dense && is_decoder_linear(&info.name) {
                    let q =
                        quantize_4bit_f32(&v, &info.shape, info.dtype, QuantType::Nf4, 64, true)?;
                    let mut round = vec![0.0f32; v.len()];
                    dequantize_4bit_f32(&q.packed, &q.state, &mut round)?;
                    (round, info.shape.clone())
                } else {
                    (v, info.shape.clone())
                }
            } else {
                tensors.push(OwnedTensor::new(
                    info.name.clone(),
                    info.dtype,
                    info.shape.clone(),
                    shard.view(info).bytes.to_vec(),
                )?);
                continue;
            };
            if let Some(pair) = deltas.get(&info.name) {
                if shape != [pair.out_features, pair.in_features] {
                    return Err(Error::invalid(format!(
                        "{}: {} is {shape:?} but the adapter expects [{}, {}]",
                        adapter.display(),
                        info.name,
                        pair.out_features,
                        pair.in_features
                    )));
                }
                for (w, d) in values.iter_mut().zip(pair.delta_weight()) {
                    *w += d;
                }
                merged += 1;
            }
            tensors.push(OwnedTensor::new(
                info.name.clone(),
                dtype,
                shape,
                f32_to_bytes(&values, dtype),
            )?);
        }
        let file_name = shard
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.safetensors")
            .to_string();
        for t in &tensors {
            weight_map.insert(t.name.clone(), serde_json::json!(file_name));
        }
        safetensors::write_file(&staged.path(&file_name), &tensors, shard.metadata())?;
    }
    progress.finish();
    if weights.shards().len() > 1 {
        fsutil::write_json(
            &staged.path(INDEX_FILE),
            &serde_json::json!({"metadata": {}, "weight_map": weight_map}),
        )?;
    }
    if model.is_dir() {
        let mut cfg = fsutil::read_json(&model.join("config.json"))?;
        if let Some(map) = cfg.as_object_mut() {
            map.remove("quantization_config");
            map.insert("torch_dtype".into(), serde_json::json!(dtype.torch_name()));
        }
        fsutil::write_json(&staged.path("config.json"), &cfg)?;
        for entry in std::fs::read_dir(model).map_err(|e| Error::io(model, e))? {
            let entry = entry.map_err(|e| Error::io(model, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_file()
                && !name.ends_with(".safetensors")
                && name != INDEX_FILE
                && name != "config.json"
            {
                std::fs::copy(entry.path(), staged.path(&name))
                    .map_err(|e| Error::io(entry.path(), e))?;
            }
        }
    }
    staged.commit()?;
    Ok(merged)
}
