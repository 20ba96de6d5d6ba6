//! The model hyperparameters a llama GGUF states, and the `config.json` and
//! `generation_config.json` Hugging Face expects for them.

use super::LlamaParams;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, MetaValue};
use crate::tensor::DType;
use serde_json::{json, Map, Value};

/// The `general.architecture` this importer understands.
pub(crate) const ARCHITECTURE: &str = "llama";

/// Reads the llama hyperparameters from `gguf`'s metadata, checking they are usable.
pub(crate) fn read_params(gguf: &GgufFile) -> Result<LlamaParams> {
    let bad = |problem: String| Error::format(gguf.what(), problem);
    let arch = gguf
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| bad("no string general.architecture".into()))?;
    if arch != ARCHITECTURE {
        return Err(Error::unsupported(format!(
            "{}: architecture {arch:?}; only \"{ARCHITECTURE}\" GGUF files can be imported",
            gguf.what()
        )));
    }
    let key = |k: &str| format!("{ARCHITECTURE}.{k}");
    let count = |k: &str| -> Result<Option<usize>> {
        match gguf.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| bad(format!("{} is {v:?}, not a positive integer", key(k)))),
        }
    };
    let required = |k: &str| count(k)?.ok_or_else(|| bad(format!("missing {}", key(k))));
    let float = |k: &str| -> Result<Option<f64>> {
        match gguf.get(&key(k)) {
            None => Ok(None),
            Some(v) => shortest_float(v)
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(Some)
                .ok_or_else(|| bad(format!("{} is {v:?}, not a positive number", key(k)))),
        }
    };

    let hidden_size = required("embedding_length")?;
    let num_attention_heads = required("attention.head_count")?;
    let num_key_value_heads = count("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    let head_dim = match count("attention.key_length")? {
        Some(d) => d,
        None => count("rope.dimension_count")?.unwrap_or(hidden_size / num_attention_heads),
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(format!(
            "head dimension {head_dim} is not a positive even number"
        )));
    }
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(bad(format!(
            "{num_attention_heads} attention heads are not a multiple of {num_key_value_heads} KV heads"
        )));
    }
    let vocab_size = match count("vocab_size")? {
        Some(v) => v,
        None => gguf
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(|a| a.len())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("neither {} nor a token list", key("vocab_size"))))?,
    };
    let token_id = |k: &str| -> Result<Option<u32>> {
        match gguf.get(&format!("tokenizer.ggml.{k}")) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .filter(|&id| (id as usize) < vocab_size)
                .map(Some)
                .ok_or_else(|| bad(format!("tokenizer.ggml.{k} {v:?} is not a token id"))),
        }
    };
    Ok(LlamaParams {
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_hidden_layers: required("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: required("context_length")?,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            bad(format!(
                "missing {}",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?,
        rope_theta: float("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling: rope_scaling(gguf)?,
        bos_token_id: token_id("bos_token_id")?,
        eos_token_id: token_id("eos_token_id")?,
        pad_token_id: token_id("padding_token_id")?,
        unk_token_id: token_id("unknown_token_id")?,
        tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
        attention_bias: gguf.tensor_info("blk.0.attn_q.bias").is_some(),
    })
}

/// A float as the file's author most likely wrote it: an f32 becomes the shortest decimal
/// that rounds to it (1e-5, not 9.999999747378752e-06).
fn shortest_float(v: &MetaValue) -> Option<f64> {
    match *v {
        MetaValue::F32(x) => x.to_string().parse().ok(),
        MetaValue::F64(x) => Some(x),
        _ => None,
    }
}

/// `rope_scaling` from `llama.rope.scaling.*`, or `None` when absent or "none".
fn rope_scaling(gguf: &GgufFile) -> Result<Option<Value>> {
    let key = |k: &str| format!("{ARCHITECTURE}.rope.scaling.{k}");
    let Some(kind) = gguf.get(&key("type")) else {
        return Ok(None);
    };
    let kind = kind
        .as_str()
        .ok_or_else(|| Error::format(gguf.what(), format!("{} is not a string", key("type"))))?;
    if kind == "none" {
        return Ok(None);
    }
    let mut out = Map::new();
    out.insert("rope_type".into(), json!(kind));
    if let Some(f) = gguf.get(&key("factor")).and_then(shortest_float) {
        out.insert("factor".into(), json!(f));
    }
    if let Some(n) = gguf
        .get(&key("original_context_length"))
        .and_then(MetaValue::as_u64)
    {
        out.insert("original_max_position_embeddings".into(), json!(n));
    }
    Ok(Some(Value::Object(out)))
}

/// `config.json` for a `LlamaForCausalLM` with weights stored in `dtype`.
pub(crate) fn config_json(p: &LlamaParams, dtype: DType) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": p.rope_scaling,
        "attention_bias": p.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "bos_token_id": p.bos_token_id,
        "eos_token_id": p.eos_token_id,
        "pad_token_id": p.pad_token_id,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
    })
}

/// `generation_config.json`: the special token ids, nothing else.
pub(crate) fn generation_config_json(p: &LlamaParams) -> Value {
    let mut out = Map::new();
    for (k, v) in [
        ("bos_token_id", p.bos_token_id),
        ("eos_token_id", p.eos_token_id),
        ("pad_token_id", p.pad_token_id),
    ] {
        if let Some(id) = v {
            out.insert(k.into(), json!(id));
        }
    }
    Value::Object(out)
}
