//! Model hyper-parameters from a Hugging Face `config.json`: `LlamaForCausalLM` and
//! `MistralForCausalLM` (the same decoder; Mistral only with sliding-window attention off).
//!
//! Both config styles are read: transformers 4 (`rope_theta` + `rope_scaling`) and
//! transformers 5 (`rope_parameters` holding `rope_type`, `rope_theta` and the scaling keys).
//! Fields that fix the shape of the weights are required; fields transformers gives a harmless
//! default (`rms_norm_eps`, `rope_theta`, `num_key_value_heads`, `head_dim`, ...) take that
//! default. Anything this engine does not implement is one [`Error`] naming the field and file.

use crate::error::{Error, Result};
use crate::fsutil;
use serde_json::{Map, Value};
use std::path::Path;

/// How the RoPE frequencies are rescaled for longer contexts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated (transformers' `_compute_llama3_parameters`).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

/// The hyper-parameters of a LLaMA-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// The architecture named by the file (`LlamaForCausalLM` or `MistralForCausalLM`).
    pub architecture: String,
    /// Width of the residual stream, C.
    pub hidden_size: usize,
    /// Width of the MLP, F.
    pub intermediate_size: usize,
    /// Number of decoder layers, L.
    pub num_hidden_layers: usize,
    /// Number of query heads, H.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention), KV; divides H.
    pub num_key_value_heads: usize,
    /// Width of one head, D.
    pub head_dim: usize,
    /// Number of token ids, V.
    pub vocab_size: usize,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The epsilon inside RMSNorm's square root.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE frequency rescaling.
    pub rope_scaling: RopeScaling,
    /// True when the output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if any.
    pub pad_token_id: Option<u32>,
}

/// The architectures this decoder implements.
const ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "MistralForCausalLM"];

impl LlamaConfig {
    /// Reads `path` (a `config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let json = fsutil::read_json(path)?;
        Self::from_json(&json, &path.display().to_string())
    }

    /// Parses a config; `what` names the file in errors.
    pub fn from_json(json: &Value, what: &str) -> Result<Self> {
        let fields = Fields::new(json, what)?;
        let architecture = fields.architecture()?;

        if architecture == "MistralForCausalLM" {
            // transformers' MistralConfig defaults sliding_window to 4096 when absent.
            match fields.get("sliding_window") {
                Some(Value::Null) => {}
                None => {
                    return Err(fields.error(
                        "sliding_window",
                        "is absent, so transformers uses its default of 4096; sliding-window \
                         attention is not supported (set it to null if the model does not need it)",
                    ))
                }
                Some(v) => {
                    return Err(fields.error(
                        "sliding_window",
                        format!("is {v}; sliding-window attention is not supported"),
                    ))
                }
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if fields.bool_or(flag, false)? {
                return Err(fields.error(
                    flag,
                    "is true; biases in the linear layers are not supported",
                ));
            }
        }
        if let Some(act) = fields.get("hidden_act").filter(|v| !v.is_null()) {
            if act.as_str() != Some("silu") {
                return Err(fields.error(
                    "hidden_act",
                    format!("is {act}; only \"silu\" (SwiGLU) is supported"),
                ));
            }
        }

        let hidden_size = fields.required_size("hidden_size")?;
        let intermediate_size = fields.required_size("intermediate_size")?;
        let num_hidden_layers = fields.required_size("num_hidden_layers")?;
        let num_attention_heads = fields.required_size("num_attention_heads")?;
        let vocab_size = fields.required_size("vocab_size")?;
        let num_key_value_heads = fields
            .size("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(fields.error(
                "num_key_value_heads",
                format!(
                    "is {num_key_value_heads}, which does not divide num_attention_heads \
                     ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = match fields.size("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(fields.error(
                    "head_dim",
                    format!(
                        "is absent and hidden_size ({hidden_size}) is not a multiple of \
                         num_attention_heads ({num_attention_heads})"
                    ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.error("head_dim", format!("is {head_dim}; RoPE needs it even")));
        }
        let max_position_embeddings = fields.size("max_position_embeddings")?.unwrap_or(2048);
        let rms_norm_eps = fields.float("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let (rope_theta, rope_scaling) = fields.rope(max_position_embeddings)?;

        Ok(LlamaConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
            bos_token_id: fields.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: fields.token_ids("eos_token_id")?,
            pad_token_id: fields.token_ids("pad_token_id")?.first().copied(),
        })
    }

    /// Width of all query heads together, H * D.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together, KV * D.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The RoPE inverse frequencies, D/2 of them, with the scaling applied; computed in f32
    /// step by step as transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim as f32;
        let plain = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / dim))
            .collect::<Vec<f32>>();
        match self.rope_scaling {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_context_len = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_context_len / low_freq_factor;
                let high_freq_wavelen = old_context_len / high_freq_factor;
                plain
                    .iter()
                    .map(|&inv_freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
                        if wavelen < high_freq_wavelen {
                            inv_freq
                        } else if wavelen > low_freq_wavelen {
                            inv_freq / factor
                        } else {
                            let smooth = (old_context_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The top-level JSON object of a config, with typed getters whose errors name file and field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    what: &'a str,
}

impl<'a> Fields<'a> {
    fn new(json: &'a Value, what: &'a str) -> Result<Self> {
        let map = json
            .as_object()
            .ok_or_else(|| Error::format(what, "config is not a JSON object"))?;
        Ok(Fields { map, what })
    }

    fn error(&self, field: &str, problem: impl std::fmt::Display) -> Error {
        Error::format(self.what, format!("field \"{field}\" {problem}"))
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field)
    }

    /// `architectures[0]`, or the architecture implied by `model_type` when the list is absent.
    fn architecture(&self) -> Result<String> {
        let named = match self.get("architectures") {
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            Some(other) if !other.is_null() => {
                return Err(self.error("architectures", "is not a list of names"))
            }
            _ => match self.get("model_type").and_then(Value::as_str) {
                Some("llama") => vec!["LlamaForCausalLM"],
                Some("mistral") => vec!["MistralForCausalLM"],
                Some(other) => {
                    return Err(self.error(
                        "model_type",
                        format!(
                            "is {other:?} and \"architectures\" is absent; supported: {}",
                            ARCHITECTURES.join(", ")
                        ),
                    ))
                }
                None => {
                    return Err(self.error(
                        "architectures",
                        "is missing (and so is \"model_type\"); is this a model config?",
                    ))
                }
            },
        };
        match named.iter().find(|a| ARCHITECTURES.contains(a)) {
            Some(a) => Ok(a.to_string()),
            None => Err(self.error(
                "architectures",
                format!("is {named:?}; supported: {}", ARCHITECTURES.join(", ")),
            )),
        }
    }

    /// A positive integer, or `None` when absent or null.
    fn size(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| self.error(field, format!("is {v}, not a positive integer"))),
        }
    }

    fn required_size(&self, field: &str) -> Result<usize> {
        self.size(field)?
            .ok_or_else(|| self.error(field, "is missing (it fixes the shape of the weights)"))
    }

    /// A finite number, or `None` when absent or null.
    fn float(&self, field: &str) -> Result<Option<f64>> {
        float_in(self.map, field).map_err(|p| self.error(field, p))
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(field, format!("is {v}, not true or false"))),
        }
    }

    /// One id, a list of ids, or nothing.
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.error(field, format!("holds {v}, not a token id")))
        };
        match self.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(list)) => list.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// `(rope_theta, scaling)` from `rope_parameters` (transformers 5) or `rope_theta` +
    /// `rope_scaling` (transformers 4), with transformers' precedence and defaults.
    fn rope(&self, max_position_embeddings: usize) -> Result<(f32, RopeScaling)> {
        let (field, params) = match (self.get("rope_scaling"), self.get("rope_parameters")) {
            (Some(Value::Object(p)), _) => ("rope_scaling", Some(p)),
            (_, Some(Value::Object(p))) => ("rope_parameters", Some(p)),
            (Some(v), _) if !v.is_null() => {
                return Err(self.error("rope_scaling", "is not an object"))
            }
            (_, Some(v)) if !v.is_null() => {
                return Err(self.error("rope_parameters", "is not an object"))
            }
            _ => ("rope_parameters", None),
        };
        let empty = Map::new();
        let params = params.unwrap_or(&empty);
        let key_error =
            |key: &str, problem: String| self.error(field, format!("key \"{key}\" {problem}"));
        let param = |key: &str| float_in(params, key).map_err(|p| key_error(key, p));
        let required =
            |key: &str| param(key)?.ok_or_else(|| key_error(key, "is missing".to_string()));

        let theta = match param("rope_theta")? {
            Some(t) => t,
            None => self.float("rope_theta")?.unwrap_or(10000.0),
        };
        if theta <= 0.0 {
            return Err(self.error("rope_theta", format!("is {theta}; it must be positive")));
        }
        if let Some(f) = param("partial_rotary_factor")?.or(self.float("partial_rotary_factor")?) {
            if f != 1.0 {
                return Err(key_error(
                    "partial_rotary_factor",
                    format!("is {f}; only full rotary embeddings are supported"),
                ));
            }
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| key_error("rope_type", format!("is {v}, not a name")))
            })
            .transpose()?
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")? as f32,
            },
            "llama3" => {
                let original = match params.get("original_max_position_embeddings") {
                    None | Some(Value::Null) => max_position_embeddings,
                    Some(v) => v
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            key_error(
                                "original_max_position_embeddings",
                                format!("is {v}, not an integer"),
                            )
                        })?,
                };
                let (low_freq_factor, high_freq_factor) =
                    (required("low_freq_factor")?, required("high_freq_factor")?);
                if high_freq_factor <= low_freq_factor {
                    return Err(key_error(
                        "high_freq_factor",
                        format!(
                            "({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                        ),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: required("factor")? as f32,
                    low_freq_factor: low_freq_factor as f32,
                    high_freq_factor: high_freq_factor as f32,
                    original_max_position_embeddings: original,
                }
            }
            other => {
                return Err(key_error(
                    "rope_type",
                    format!("is {other:?}; supported: default, linear, llama3"),
                ))
            }
        };
        match scaling {
            RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. }
                if factor <= 0.0 =>
            {
                Err(key_error(
                    "factor",
                    format!("is {factor}; it must be positive"),
                ))
            }
            _ => Ok((theta as f32, scaling)),
        }
    }
}

/// A finite number under `key` of `map`, or `None` when absent or null.
fn float_in(map: &Map<String, Value>, key: &str) -> std::result::Result<Option<f64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| format!("is {v}, not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 172,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "eos_token_id": [2, 7],
            "bos_token_id": 1,
            "tie_word_embeddings": true
        })
    }

    fn with(mut v: Value, key: &str, value: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.into(), value);
        v
    }

    fn error_of(v: Value) -> String {
        match LlamaConfig::from_json(&v, "m/config.json") {
            Ok(c) => panic!("accepted {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_a_llama_config_with_defaults() {
        let c = LlamaConfig::from_json(&base(), "m/config.json").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_dim(), 32);
        assert_eq!(c.q_dim(), 64);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.pad_token_id, None);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
        let no_kv = base().as_object().unwrap().clone();
        let mut no_kv = Value::Object(no_kv);
        no_kv.as_object_mut().unwrap().remove("num_key_value_heads");
        let c = LlamaConfig::from_json(&no_kv, "x").unwrap();
        assert_eq!(c.num_key_value_heads, 4);
    }

    #[test]
    fn reads_both_rope_styles() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let v4 = with(base(), "rope_scaling", scaling.clone());
        let mut v5_params = scaling;
        v5_params["rope_theta"] = json!(500000.0);
        let v5 = with(base(), "rope_parameters", v5_params);
        let a = LlamaConfig::from_json(&v4, "x").unwrap();
        let b = LlamaConfig::from_json(&v5, "x").unwrap();
        let want = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        assert_eq!(a.rope_scaling, want);
        assert_eq!(b.rope_scaling, want);
        assert_eq!(a.rope_theta, 10000.0);
        assert_eq!(b.rope_theta, 500000.0);
        let linear = with(
            base(),
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
        );
        assert_eq!(
            LlamaConfig::from_json(&linear, "x").unwrap().rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
    }

    /// Hand-computed: head_dim 16, theta 10000 gives inv_freq 10^(-i/2) (wavelengths 6.28,
    /// 19.87, 62.83, 198.7, ...). With original context 64, low 1, high 4: i = 0 is kept
    /// (6.28 < 16); i >= 3 is divided by 8 (wavelength > 64); i = 1, 2 are interpolated with
    /// smooth = (64 / wavelen - 1) / 3, e.g. i = 1: s = 0.74037, 0.31623 * ((1 - s) / 8 + s).
    #[test]
    fn llama3_frequencies_by_hand() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let c = LlamaConfig::from_json(&with(base(), "rope_scaling", scaling), "x").unwrap();
        let want = [
            1.0,
            2.443846e-1,
            1.304226e-2,
            3.952847e-3,
            1.25e-3,
            3.952847e-4,
            1.25e-4,
            3.952847e-5,
        ];
        let got = c.rope_inv_freq();
        assert_eq!(got.len(), want.len());
        for (i, (&got, want)) in got.iter().zip(want).enumerate() {
            assert!(
                (got - want).abs() <= 2e-6 * want,
                "inv_freq[{i}] = {got}, want {want}"
            );
        }
        let linear = with(
            base(),
            "rope_scaling",
            json!({"type": "linear", "factor": 4.0}),
        );
        let got = LlamaConfig::from_json(&linear, "x")
            .unwrap()
            .rope_inv_freq();
        assert!((got[2] - 0.025).abs() < 1e-8, "{}", got[2]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let mut missing = base();
        missing.as_object_mut().unwrap().remove("intermediate_size");
        let cases = [
            (missing, "\"intermediate_size\" is missing"),
            (
                with(base(), "architectures", json!(["GPT2LMHeadModel"])),
                "supported: LlamaForCausalLM",
            ),
            (
                with(
                    with(base(), "architectures", json!(["MistralForCausalLM"])),
                    "sliding_window",
                    json!(4096),
                ),
                "\"sliding_window\" is 4096",
            ),
            (
                with(base(), "architectures", json!(["MistralForCausalLM"])),
                "\"sliding_window\" is absent",
            ),
            (
                with(base(), "attention_bias", json!(true)),
                "\"attention_bias\" is true",
            ),
            (
                with(base(), "mlp_bias", json!(true)),
                "\"mlp_bias\" is true",
            ),
            (with(base(), "hidden_act", json!("gelu")), "\"hidden_act\""),
            (
                with(base(), "num_key_value_heads", json!(3)),
                "does not divide",
            ),
            (
                with(base(), "hidden_size", json!(-4)),
                "not a positive integer",
            ),
            (
                with(
                    base(),
                    "rope_scaling",
                    json!({"rope_type": "yarn", "factor": 4.0}),
                ),
                "\"rope_type\" is \"yarn\"",
            ),
            (
                with(base(), "rope_scaling", json!({"rope_type": "linear"})),
                "\"factor\" is missing",
            ),
        ];
        for (config, want) in cases {
            let err = error_of(config);
            assert!(
                err.starts_with("m/config.json: ") && err.contains(want),
                "{err:?} lacks {want:?}"
            );
        }
        let mistral = with(
            with(base(), "architectures", json!(["MistralForCausalLM"])),
            "sliding_window",
            Value::Null,
        );
        assert!(LlamaConfig::from_json(&mistral, "x").is_ok());
    }
}
