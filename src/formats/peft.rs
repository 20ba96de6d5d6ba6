//! Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor keys are `base_model.model.<module path>.lora_A.weight` with shape `[r, in]` and
//! `...lora_B.weight` with shape `[out, r]`; the forward pass adds
//! `scale * B (A x)` with `scale = lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA).

use crate::error::{Error, Result};
use crate::formats::safetensors::{self, OwnedTensor, SafeTensors};
use crate::fsutil;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The adapter weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The adapter config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The prefix PEFT puts before a module path.
const KEY_PREFIX: &str = "base_model.model.";

/// The fields of a LoRA adapter_config.json that the engine uses.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f32,
    /// Dropout probability on the adapter input during training.
    pub lora_dropout: f32,
    /// Module names adapted (e.g. "q_proj").
    pub target_modules: Vec<String>,
    /// rsLoRA scaling (alpha / sqrt(r)).
    pub use_rslora: bool,
    /// The base model the adapter was trained on.
    pub base_model_name_or_path: String,
}

impl AdapterConfig {
    /// The factor multiplying `B A x`.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }

    /// The JSON PEFT writes for this config.
    pub fn to_json(&self) -> Value {
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": shortest_f64(self.lora_alpha),
            "lora_dropout": shortest_f64(self.lora_dropout),
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora
        })
    }

    /// Parses adapter_config.json; `what` names the file in errors.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let bad = |p: String| Error::format(what, p);
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(Error::unsupported(format!(
                    "{what}: peft_type {t:?} (only LORA adapters are supported)"
                )));
            }
        }
        for flag in ["use_dora", "fan_in_fan_out"] {
            if get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::unsupported(format!("{what}: {flag} = true")));
            }
        }
        if get("bias")
            .and_then(Value::as_str)
            .is_some_and(|b| b != "none")
        {
            return Err(Error::unsupported(format!(
                "{what}: bias other than \"none\""
            )));
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if get(pattern)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(Error::unsupported(format!("{what}: a non-empty {pattern}")));
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("\"r\" is missing or not a positive integer".into()))?;
        let lora_alpha = get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("\"lora_alpha\" is missing".into()))?;
        let target_modules = match get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(bad("\"target_modules\" is missing".into())),
        };
        Ok(AdapterConfig {
            r: r as usize,
            lora_alpha: lora_alpha as f32,
            lora_dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            target_modules,
            use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }
}

/// The f64 that prints as `x`'s shortest decimal form, so 0.1f32 is written as 0.1 (as PEFT
/// writes it), not as 0.10000000149011612.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// One adapted module's LoRA factors, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTensors {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// A: (r, in), row-major.
    pub a: Vec<f32>,
    /// B: (out, r), row-major.
    pub b: Vec<f32>,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// Reads an adapter folder: config and every module's A and B, converted to f32.
pub fn read_adapter(dir: &Path) -> Result<(AdapterConfig, Vec<LoraTensors>)> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::invalid(format!(
            "{}: no {CONFIG_FILE} (is this a PEFT adapter folder?)",
            dir.display()
        )));
    }
    let config = AdapterConfig::from_json(
        &fsutil::read_json(&config_path)?,
        &config_path.display().to_string(),
    )?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(Error::invalid(format!(
            "{}: no {WEIGHTS_FILE} (adapters saved as .bin are not supported; re-save with safe_serialization)",
            dir.display()
        )));
    }
    let file = SafeTensors::open(&weights_path)?;
    let what = weights_path.display().to_string();
    // module -> (A, B), each with its shape, as they turn up.
    type Factor = Option<(Vec<f32>, Vec<usize>)>;
    let mut modules: BTreeMap<String, (Factor, Factor)> = BTreeMap::new();
    for info in file.tensors() {
        let Some(rest) = info.name.strip_prefix(KEY_PREFIX) else {
            return Err(Error::format(
                &what,
                format!("unexpected tensor {:?} (not under {KEY_PREFIX})", info.name),
            ));
        };
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 'A')
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 'B')
        } else {
            return Err(Error::unsupported(format!(
                "{what}: tensor {:?} is not a LoRA A or B weight",
                info.name
            )));
        };
        if info.shape.len() != 2 {
            return Err(Error::format(
                &what,
                format!(
                    "{} has shape {:?}, expected 2 dimensions",
                    info.name, info.shape
                ),
            ));
        }
        let values = file.view(info).to_f32(&info.name)?.into_owned();
        let entry = modules.entry(module.to_string()).or_default();
        let slot = if which == 'A' {
            &mut entry.0
        } else {
            &mut entry.1
        };
        *slot = Some((values, info.shape.clone()));
    }
    let mut out = Vec::new();
    for (module, pair) in modules {
        let (Some((a, a_shape)), Some((b, b_shape))) = pair else {
            return Err(Error::format(
                &what,
                format!("{module} has only one of lora_A and lora_B"),
            ));
        };
        if a_shape[0] != config.r || b_shape[1] != config.r {
            return Err(Error::format(
                &what,
                format!(
                    "{module}: lora_A {a_shape:?} and lora_B {b_shape:?} do not have rank r = {}",
                    config.r
                ),
            ));
        }
        out.push(LoraTensors {
            module,
            a,
            b,
            in_features: a_shape[1],
            out_features: b_shape[0],
        });
    }
    if out.is_empty() {
        return Err(Error::format(&what, "holds no LoRA weights"));
    }
    Ok((config, out))
}

/// Writes an adapter into `dir` (an existing folder, e.g. a staged checkpoint): f32 weights and
/// the config, each atomically.
pub fn write_adapter(dir: &Path, config: &AdapterConfig, modules: &[LoraTensors]) -> Result<()> {
    let mut tensors = Vec::with_capacity(modules.len() * 2);
    for m in modules {
        tensors.push(OwnedTensor::from_f32(
            format!("{KEY_PREFIX}{}.lora_A.weight", m.module),
            vec![config.r, m.in_features],
            &m.a,
        )?);
        tensors.push(OwnedTensor::from_f32(
            format!("{KEY_PREFIX}{}.lora_B.weight", m.module),
            vec![m.out_features, config.r],
            &m.b,
        )?);
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::write_file(&dir.join(WEIGHTS_FILE), &tensors, &metadata)?;
    fsutil::write_json(&dir.join(CONFIG_FILE), &config.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_round_trip() {
        let dir = std::env::temp_dir().join(format!("sun-peft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = AdapterConfig {
            r: 2,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: vec!["q_proj".into()],
            use_rslora: false,
            base_model_name_or_path: "m".into(),
        };
        let m = LoraTensors {
            module: "model.layers.0.self_attn.q_proj".into(),
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            b: vec![0.5; 8],
            in_features: 3,
            out_features: 4,
        };
        write_adapter(&dir, &config, std::slice::from_ref(&m)).unwrap();
        let (c, mods) = read_adapter(&dir).unwrap();
        assert_eq!(c, config);
        assert_eq!(mods, vec![m]);
        assert_eq!(c.scale(), 8.0);
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        assert!(text.contains("\"lora_dropout\": 0.1,"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_other_adapter_kinds() {
        let v = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": true});
        assert!(AdapterConfig::from_json(&v, "c.json")
            .unwrap_err()
            .to_string()
            .contains("use_dora"));
        let v = json!({"peft_type": "PREFIX_TUNING"});
        assert!(AdapterConfig::from_json(&v, "c.json").is_err());
    }
}
