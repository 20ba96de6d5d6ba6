//! Attaching LoRA adapters to a loaded decoder: fresh ones for training, or a PEFT adapter
//! folder for generation, evaluation, merging or as a starting point.

use crate::error::{Error, Result};
use crate::formats::peft::{read_adapter, AdapterConfig, LoraTensors};
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::model::lora::{LoraPair, TARGET_MODULES};
use crate::rng::Rng;
use std::path::Path;

/// The linear layer of `layer` named by a PEFT module name ("q_proj", ...), with its module
/// path's middle part ("self_attn" or "mlp").
fn module_mut<'a>(
    layer: &'a mut DecoderLayer,
    name: &str,
) -> Option<(&'static str, &'a mut Linear)> {
    Some(match name {
        "q_proj" => ("self_attn", &mut layer.q_proj),
        "k_proj" => ("self_attn", &mut layer.k_proj),
        "v_proj" => ("self_attn", &mut layer.v_proj),
        "o_proj" => ("self_attn", &mut layer.o_proj),
        "gate_proj" => ("mlp", &mut layer.gate_proj),
        "up_proj" => ("mlp", &mut layer.up_proj),
        "down_proj" => ("mlp", &mut layer.down_proj),
        _ => return None,
    })
}

impl Llama {
    /// Attaches fresh adapters (PEFT's initialisation, drawn from `rng` in layer then
    /// q,k,v,o,gate,up,down order) to the modules `config.target_modules` names.
    pub fn attach_new_lora(&mut self, config: &AdapterConfig, rng: &mut Rng) -> Result<()> {
        for m in &config.target_modules {
            if !TARGET_MODULES.contains(&m.as_str()) {
                return Err(Error::invalid(format!(
                    "--target-modules: {m:?} is not one of {}",
                    TARGET_MODULES.join(", ")
                )));
            }
        }
        let scale = config.scale();
        for layer in &mut self.layers {
            for name in TARGET_MODULES {
                if !config.target_modules.iter().any(|m| m == name) {
                    continue;
                }
                let (_, lin) = module_mut(layer, name).expect("a listed module");
                lin.lora = Some(LoraPair::init(
                    lin.in_features(),
                    lin.out_features(),
                    config.r,
                    scale,
                    rng,
                ));
            }
        }
        Ok(())
    }

    /// Loads a PEFT adapter folder onto the model. Fails, naming the module, when the adapter
    /// was made for another model shape.
    pub fn attach_adapter(&mut self, dir: &Path) -> Result<AdapterConfig> {
        let (config, modules) = read_adapter(dir)?;
        let scale = config.scale();
        let what = dir.display().to_string();
        for m in modules {
            let bad = |p: String| {
                Error::invalid(format!(
                    "{what}: adapter module {}: {p} (made for another model?)",
                    m.module
                ))
            };
            let rest = m
                .module
                .strip_prefix("model.layers.")
                .ok_or_else(|| bad("not a decoder layer module".into()))?;
            let (index, path) = rest
                .split_once('.')
                .ok_or_else(|| bad("malformed module path".into()))?;
            let index: usize = index
                .parse()
                .map_err(|_| bad("malformed layer index".into()))?;
            let n_layers = self.layers.len();
            let layer = self
                .layers
                .get_mut(index)
                .ok_or_else(|| bad(format!("the model has only {n_layers} layers")))?;
            let name = path.rsplit('.').next().unwrap_or(path);
            let (middle, lin) = module_mut(layer, name)
                .ok_or_else(|| bad("not an adaptable linear layer".into()))?;
            if path != format!("{middle}.{name}") {
                return Err(bad("unexpected module path".into()));
            }
            if (m.in_features, m.out_features) != (lin.in_features(), lin.out_features()) {
                return Err(bad(format!(
                    "shape ({} -> {}) differs from the model's ({} -> {})",
                    m.in_features,
                    m.out_features,
                    lin.in_features(),
                    lin.out_features()
                )));
            }
            lin.lora = Some(LoraPair::from_factors(
                m.a,
                m.b,
                m.in_features,
                m.out_features,
                config.r,
                scale,
            ));
        }
        Ok(config)
    }

    /// Every attached adapter with its PEFT module path, in layer then q..down order.
    pub fn adapters(&self) -> Vec<(String, &LoraPair)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let mods = [
                ("self_attn.q_proj", &layer.q_proj),
                ("self_attn.k_proj", &layer.k_proj),
                ("self_attn.v_proj", &layer.v_proj),
                ("self_attn.o_proj", &layer.o_proj),
                ("mlp.gate_proj", &layer.gate_proj),
                ("mlp.up_proj", &layer.up_proj),
                ("mlp.down_proj", &layer.down_proj),
            ];
            for (path, lin) in mods {
                if let Some(l) = &lin.lora {
                    out.push((format!("model.layers.{i}.{path}"), l));
                }
            }
        }
        out
    }

    /// Mutable access to every attached adapter, in the order of [`Llama::adapters`].
    pub fn adapters_mut(&mut self) -> Vec<&mut LoraPair> {
        self.layers
            .iter_mut()
            .flat_map(|layer| {
                [
                    &mut layer.q_proj,
                    &mut layer.k_proj,
                    &mut layer.v_proj,
                    &mut layer.o_proj,
                    &mut layer.gate_proj,
                    &mut layer.up_proj,
                    &mut layer.down_proj,
                ]
            })
            .filter_map(|lin| lin.lora.as_mut())
            .collect()
    }

    /// The adapters as PEFT tensors, for writing.
    pub fn adapter_tensors(&self) -> Vec<LoraTensors> {
        self.adapters()
            .into_iter()
            .map(|(module, l)| LoraTensors {
                module,
                a: l.a.clone(),
                b: l.b.clone(),
                in_features: l.in_features,
                out_features: l.out_features,
            })
            .collect()
    }
}
