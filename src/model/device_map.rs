//! Placing a model's decoder layers on several GPUs (`--devices 0,1 --device-map auto`), what
//! QLoRA gets from accelerate's `device_map="auto"`: each GPU holds a contiguous run of layers,
//! activations (and, in training, their gradients) cross from one GPU to the next at the run
//! boundaries, and the final norm and lm_head sit with the last layer.
//!
//! The plan is made from byte counts alone (what each layer and the head occupy on a GPU, what
//! each GPU may hold), so it is computed, and tested, without a GPU.

use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::model::train_pass::CheckpointPlace;
use std::fmt;
use std::str::FromStr;

/// The share of a GPU's free memory the layers may take; the rest is left for activations, the
/// workspace pools and the KV cache.
pub const WEIGHT_SHARE_PERCENT: usize = 90;

/// How layers are spread over the GPUs named by `--devices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceMap {
    /// Every GPU gets a share of the layers in proportion to its free memory (accelerate's
    /// "balanced", which `device_map="auto"` uses when there are several GPUs).
    Auto,
    /// The first GPU is filled up to its budget, then the next, and so on (accelerate's
    /// "sequential"): a model that fits one GPU stays on it.
    Sequential,
}

impl FromStr for DeviceMap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "balanced" => Ok(DeviceMap::Auto),
            "sequential" => Ok(DeviceMap::Sequential),
            _ => Err(Error::invalid(format!(
                "--device-map: expected auto (or balanced) or sequential, got {s:?}"
            ))),
        }
    }
}

impl fmt::Display for DeviceMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceMap::Auto => "auto",
            DeviceMap::Sequential => "sequential",
        })
    }
}

/// The GPUs `--devices` names: `all` of the visible ones, or a list of ordinals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceList {
    /// Every visible GPU.
    All,
    /// These GPUs, in this order (layers are placed in it), each once.
    Ordinals(Vec<usize>),
}

impl FromStr for DeviceList {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(DeviceList::All);
        }
        let mut ordinals = Vec::new();
        for part in s.split(',') {
            let ordinal: usize = part.trim().parse().map_err(|_| {
                Error::invalid(format!(
                    "--devices: expected GPU ordinals separated by commas (e.g. 0,1) or all, \
                     got {s:?}"
                ))
            })?;
            if ordinals.contains(&ordinal) {
                return Err(Error::invalid(format!(
                    "--devices: GPU {ordinal} is named twice in {s:?}"
                )));
            }
            ordinals.push(ordinal);
        }
        Ok(DeviceList::Ordinals(ordinals))
    }
}

impl DeviceList {
    /// The ordinals, given `visible` GPUs; an error naming the first one that does not exist.
    pub fn resolve(&self, visible: usize) -> Result<Vec<usize>> {
        let ordinals = match self {
            DeviceList::All => (0..visible).collect(),
            DeviceList::Ordinals(list) => list.clone(),
        };
        if ordinals.is_empty() {
            return Err(Error::Device("--devices: no GPU is visible".into()));
        }
        if let Some(&missing) = ordinals.iter().find(|&&o| o >= visible) {
            return Err(Error::Device(format!(
                "--devices names GPU {missing} but {visible} GPU(s) are visible (check \
                 CUDA_VISIBLE_DEVICES)"
            )));
        }
        Ok(ordinals)
    }
}

/// Bytes a 4-bit linear and its adapter occupy on a GPU: the packed codes, the block scales
/// (f32 on the device), and per adapter value an f32 master, an f32 gradient, a bf16 copy and
/// two f32 AdamW moments (18 bytes).
fn linear_bytes(linear: &Linear) -> usize {
    let weights = linear.in_features() * linear.out_features();
    let blocksize = linear
        .quantized_parts()
        .map(|(_, _, _, blocksize)| blocksize)
        .unwrap_or(64)
        .max(1);
    let base = weights / 2 + weights.div_ceil(blocksize) * 4;
    let adapter = linear
        .lora
        .as_ref()
        .map_or(0, |pair| (pair.a.len() + pair.b.len()) * 18);
    base + adapter
}

/// Bytes each decoder layer of `model` occupies on a GPU (weights, norms, adapter state).
pub fn layer_bytes(model: &Llama) -> Vec<usize> {
    model
        .layers
        .iter()
        .map(|layer: &DecoderLayer| {
            let norms = (layer.input_layernorm.len() + layer.post_attention_layernorm.len()) * 4;
            norms + layer.linears().into_iter().map(linear_bytes).sum::<usize>()
        })
        .collect()
}

/// Bytes of the bf16 scratch each GPU holding layers keeps for dequantizing a 4-bit weight
/// before the Hopper GEMM: the largest linear of the model, 2 bytes an element (90 MB for a 7B
/// model's 11008 x 4096). Counted on every GPU, whatever its kind: an estimate that errs on the
/// side of room.
pub fn dequant_scratch_bytes(model: &Llama) -> usize {
    model
        .layers
        .iter()
        .flat_map(|layer: &DecoderLayer| layer.linears())
        .map(|linear| linear.in_features() * linear.out_features() * 2)
        .max()
        .unwrap_or(0)
}

/// Bytes the final norm and the bf16 lm_head occupy on a GPU.
pub fn head_bytes(model: &Llama) -> usize {
    let c = &model.config;
    c.vocab_size * c.hidden_size * 2 + c.hidden_size * 4
}

/// Bytes of layer checkpoints (each layer's f32 input, kept for its recompute) that a
/// checkpointed training pass over `rows` tokens holds at most at once on a GPU holding
/// `layers` decoder layers of width `hidden`: all of them with [`CheckpointPlace::Gpu`]; with
/// [`CheckpointPlace::Host`] at most two, the input in use and the next one on its way back (the
/// rest wait in pinned host memory, [`host_checkpoint_bytes`]).
pub fn checkpoint_bytes(
    hidden: usize,
    rows: usize,
    layers: usize,
    place: CheckpointPlace,
) -> usize {
    let on_gpu = match place {
        CheckpointPlace::Gpu => layers,
        CheckpointPlace::Host => layers.min(2),
    };
    on_gpu * rows * hidden * std::mem::size_of::<f32>()
}

/// Bytes of pinned host memory the checkpoints of [`checkpoint_bytes`] take with
/// [`CheckpointPlace::Host`] for a model of `layers` layers: every layer's input but the last
/// one's, which stays on the GPU (none with [`CheckpointPlace::Gpu`]).
pub fn host_checkpoint_bytes(
    hidden: usize,
    rows: usize,
    layers: usize,
    place: CheckpointPlace,
) -> usize {
    match place {
        CheckpointPlace::Gpu => 0,
        CheckpointPlace::Host => {
            layers.saturating_sub(1) * rows * hidden * std::mem::size_of::<f32>()
        }
    }
}

/// Which GPU (an index into `budgets`) each of the layers of `layer_bytes` goes to, the head
/// going with the last layer. `budgets` are the bytes each GPU may hold. Every GPU gets a
/// contiguous run of layers, in order. Fails, naming the GPU and the bytes, when the model does
/// not fit.
pub fn place_layers(
    layer_bytes: &[usize],
    head_bytes: usize,
    budgets: &[usize],
    map: DeviceMap,
) -> Result<Vec<usize>> {
    if budgets.is_empty() {
        return Err(Error::invalid("a device map needs at least one GPU"));
    }
    let placement = match map {
        DeviceMap::Auto => balanced(layer_bytes, head_bytes, budgets),
        DeviceMap::Sequential => sequential(layer_bytes, head_bytes, budgets),
    };
    check_fits(layer_bytes, head_bytes, budgets, &placement)?;
    Ok(placement)
}

/// Layers cut where the running byte count crosses each GPU's share of the total (shares in
/// proportion to the budgets); a layer goes to the GPU its midpoint falls in.
fn balanced(layer_bytes: &[usize], head_bytes: usize, budgets: &[usize]) -> Vec<usize> {
    let total = (layer_bytes.iter().sum::<usize>() + head_bytes) as f64;
    let budget_sum = budgets.iter().sum::<usize>().max(1) as f64;
    // The running total at which GPU d's share ends.
    let mut ends = Vec::with_capacity(budgets.len());
    let mut running = 0.0;
    for &b in budgets {
        running += b as f64 / budget_sum * total;
        ends.push(running);
    }
    let mut placement = Vec::with_capacity(layer_bytes.len());
    let (mut before, mut gpu) = (0.0, 0);
    for &bytes in layer_bytes {
        let mid = before + bytes as f64 / 2.0;
        while gpu + 1 < budgets.len() && mid > ends[gpu] {
            gpu += 1;
        }
        placement.push(gpu);
        before += bytes as f64;
    }
    placement
}

/// Each GPU filled to its budget before the next; the head needs room on the last layer's GPU.
fn sequential(layer_bytes: &[usize], head_bytes: usize, budgets: &[usize]) -> Vec<usize> {
    let mut placement = Vec::with_capacity(layer_bytes.len());
    let (mut gpu, mut used) = (0, 0usize);
    for (i, &bytes) in layer_bytes.iter().enumerate() {
        let last = i + 1 == layer_bytes.len();
        let need = bytes + if last { head_bytes } else { 0 };
        while gpu + 1 < budgets.len() && used + need > budgets[gpu] {
            gpu += 1;
            used = 0;
        }
        placement.push(gpu);
        used += bytes;
    }
    placement
}

fn check_fits(
    layer_bytes: &[usize],
    head_bytes: usize,
    budgets: &[usize],
    placement: &[usize],
) -> Result<()> {
    let mut load = vec![0usize; budgets.len()];
    for (&gpu, &bytes) in placement.iter().zip(layer_bytes) {
        load[gpu] += bytes;
    }
    load[placement.last().copied().unwrap_or(0)] += head_bytes;
    for (gpu, (&need, &budget)) in load.iter().zip(budgets).enumerate() {
        if need > budget {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            return Err(Error::Device(format!(
                "the model does not fit the GPUs given: GPU #{gpu} of the list would hold \
                 {:.2} GiB of weights and adapters but may take {:.2} GiB ({WEIGHT_SHARE_PERCENT}% \
                 of its free memory); name more GPUs with --devices, free memory on them, or \
                 try --device-map auto",
                gib(need),
                gib(budget)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_lists_and_maps() {
        assert_eq!("all".parse::<DeviceList>().unwrap(), DeviceList::All);
        assert_eq!(
            "0, 1".parse::<DeviceList>().unwrap(),
            DeviceList::Ordinals(vec![0, 1])
        );
        assert!("0,0"
            .parse::<DeviceList>()
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!("0;1".parse::<DeviceList>().is_err());
        assert_eq!("AUTO".parse::<DeviceMap>().unwrap(), DeviceMap::Auto);
        assert_eq!("balanced".parse::<DeviceMap>().unwrap(), DeviceMap::Auto);
        assert_eq!(
            "sequential".parse::<DeviceMap>().unwrap(),
            DeviceMap::Sequential
        );
        assert!("everywhere".parse::<DeviceMap>().is_err());
    }

    #[test]
    fn resolving_a_list_checks_the_ordinals() {
        assert_eq!(DeviceList::All.resolve(2).unwrap(), [0, 1]);
        assert_eq!(DeviceList::Ordinals(vec![1, 0]).resolve(2).unwrap(), [1, 0]);
        let msg = DeviceList::Ordinals(vec![0, 2])
            .resolve(2)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("GPU 2") && msg.contains("2 GPU(s)"), "{msg}");
        assert!(DeviceList::All.resolve(0).is_err());
    }

    #[test]
    fn auto_splits_in_proportion_to_the_budgets() {
        // 32 equal layers, a head of one layer's size, two equal GPUs: the cut lands where the
        // first GPU's half of the 33 units ends, 16.5 units in: layers 0..16 (midpoints up to
        // 15.5) on GPU 0, the rest and the head on GPU 1.
        let layers = vec![100; 32];
        let placement = place_layers(&layers, 100, &[10_000, 10_000], DeviceMap::Auto).unwrap();
        let on_first = placement.iter().filter(|&&g| g == 0).count();
        assert_eq!(on_first, 17);
        assert!(
            placement.windows(2).all(|w| w[0] <= w[1]),
            "contiguous runs"
        );
        // A GPU with three times the room takes about three quarters.
        let placement = place_layers(&layers, 0, &[30_000, 10_000], DeviceMap::Auto).unwrap();
        assert_eq!(placement.iter().filter(|&&g| g == 0).count(), 24);
        // One GPU takes everything.
        let placement = place_layers(&layers, 100, &[10_000], DeviceMap::Auto).unwrap();
        assert!(placement.iter().all(|&g| g == 0));
    }

    #[test]
    fn sequential_fills_the_first_gpu_first() {
        let layers = vec![100; 10];
        // Everything fits the first GPU: the second stays empty.
        let placement = place_layers(&layers, 50, &[2_000, 2_000], DeviceMap::Sequential).unwrap();
        assert!(placement.iter().all(|&g| g == 0));
        // Room for 6 layers on the first GPU; the head goes with the last layer.
        let placement = place_layers(&layers, 50, &[600, 2_000], DeviceMap::Sequential).unwrap();
        assert_eq!(placement, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn a_model_too_big_for_the_gpus_is_refused_with_the_numbers() {
        let layers = vec![1 << 30; 4];
        for map in [DeviceMap::Auto, DeviceMap::Sequential] {
            let msg = place_layers(&layers, 0, &[1 << 30, 1 << 30], map)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("does not fit") && msg.contains("GiB"), "{msg}");
        }
    }

    #[test]
    fn checkpoints_on_the_host_leave_two_inputs_on_the_gpu() {
        // The 7B shape: hidden 4096, 32 layers; 2 x 2048 and 16 x 512 tokens a pass.
        let (hidden, layers) = (4096, 32);
        let mib = |b: usize| b / (1 << 20);
        assert_eq!(
            mib(checkpoint_bytes(hidden, 4096, layers, CheckpointPlace::Gpu)),
            2048
        );
        assert_eq!(
            mib(checkpoint_bytes(hidden, 8192, layers, CheckpointPlace::Gpu)),
            4096
        );
        assert_eq!(
            mib(checkpoint_bytes(
                hidden,
                4096,
                layers,
                CheckpointPlace::Host
            )),
            128
        );
        assert_eq!(
            mib(checkpoint_bytes(
                hidden,
                8192,
                layers,
                CheckpointPlace::Host
            )),
            256
        );
        assert_eq!(
            mib(host_checkpoint_bytes(
                hidden,
                4096,
                layers,
                CheckpointPlace::Host
            )),
            31 * 64
        );
        assert_eq!(
            host_checkpoint_bytes(hidden, 4096, layers, CheckpointPlace::Gpu),
            0
        );
        // A GPU of a split holding one layer keeps only that layer's input.
        assert_eq!(
            checkpoint_bytes(hidden, 4096, 1, CheckpointPlace::Host),
            checkpoint_bytes(hidden, 4096, 1, CheckpointPlace::Gpu)
        );
        assert_eq!(checkpoint_bytes(hidden, 4096, 0, CheckpointPlace::Host), 0);
    }

    #[test]
    fn byte_counts_follow_the_model() {
        use crate::formats::peft::AdapterConfig;
        use crate::model::LlamaConfig;
        let config = LlamaConfig::from_json(
            &serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 64}),
            "the test model",
        )
        .unwrap();
        let mut model = Llama::random(config, true, 7).unwrap();
        let (c, hidden, kv) = (&model.config, 64, 2 * 16);
        let bytes = layer_bytes(&model);
        assert_eq!(bytes.len(), 2);
        // q, k, v, o, gate, up, down at 4 bits, blocksize 64 (f32 scales on the GPU), norms f32.
        let weights = hidden * (2 * hidden + 2 * kv) + 3 * hidden * 128;
        let base = weights / 2 + weights / 64 * 4 + 2 * hidden * 4;
        assert_eq!(bytes, [base, base]);
        assert_eq!(head_bytes(&model), c.vocab_size * hidden * 2 + hidden * 4);
        // The largest linear is gate/up/down (64 x 128), as bf16.
        assert_eq!(dequant_scratch_bytes(&model), hidden * 128 * 2);
        // An r = 4 adapter on q and v adds 18 bytes per factor value.
        let adapter = AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            base_model_name_or_path: "test".into(),
        };
        model
            .attach_new_lora(&adapter, &mut crate::rng::Rng::new(1))
            .unwrap();
        let lora = 4 * (hidden + hidden) + 4 * (hidden + kv);
        assert_eq!(layer_bytes(&model), [base + lora * 18, base + lora * 18]);
    }
}
