//! The LLaMA decoder on the CPU oracle: weights from a Hugging Face folder, and a forward pass
//! over a chunk of tokens that extends a [`KvCache`].
//!
//! One layer, as transformers' `LlamaDecoderLayer` computes it:
//! `h = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))` with `n1 = rmsnorm(x)`, then
//! `out = h + down(silu(gate(n2)) * up(n2))` with `n2 = rmsnorm(h)`.

use crate::backend::cpu::{
    add_in_place, attention_forward, embedding_forward, rmsnorm_forward, rope_cos_sin,
    rope_forward, swiglu_forward,
};
use crate::error::{Error, Result};
use crate::formats::bnb;
use crate::formats::safetensors::ModelWeights;
use crate::model::config::LlamaConfig;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use crate::progress::Progress;
use std::path::Path;
use std::sync::Arc;

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// No progress line on stderr.
    pub quiet: bool,
    /// Hold the decoder's linear weights in NF4 (blocksize 64, double quant), as QLoRA does.
    /// A bitsandbytes 4-bit folder stays 4-bit regardless; without it, it is dequantized.
    pub quantize: bool,
}

/// The weights of one decoder layer.
pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: Vec<f32>,          // (C)
    pub(crate) q_proj: Linear,                     // (H * D, C)
    pub(crate) k_proj: Linear,                     // (KV * D, C)
    pub(crate) v_proj: Linear,                     // (KV * D, C)
    pub(crate) o_proj: Linear,                     // (C, H * D)
    pub(crate) post_attention_layernorm: Vec<f32>, // (C)
    pub(crate) gate_proj: Linear,                  // (F, C)
    pub(crate) up_proj: Linear,                    // (F, C)
    pub(crate) down_proj: Linear,                  // (C, F)
}

impl DecoderLayer {
    /// The seven linears in q, k, v, o, gate, up, down order (the order adapters, dropout
    /// masks and device placements follow).
    pub(crate) fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// A LLaMA-family decoder with f32 weights in memory.
pub struct Llama {
    /// The hyper-parameters it was built from.
    pub config: LlamaConfig,
    pub(crate) embed_tokens: Arc<[f32]>, // (V, C)
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Vec<f32>,     // (C)
    pub(crate) lm_head: Linear,    // (V, C)
    pub(crate) inv_freq: Vec<f32>, // (D/2)
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("lm_head", &self.lm_head)
            .finish_non_exhaustive()
    }
}

/// Reads tensors of the expected shape as f32; errors name the model, tensor and shapes.
struct WeightReader<'a> {
    weights: &'a ModelWeights,
    what: String,
    quantize: bool,
}

impl WeightReader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Arc<[f32]>> {
        if !self.weights.contains(name) {
            return Err(Error::format(
                &self.what,
                format!("tensor {name:?} is missing (expected shape {shape:?})"),
            ));
        }
        let view = self.weights.tensor(name)?;
        if view.shape != shape {
            return Err(Error::format(
                &self.what,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    view.shape
                ),
            ));
        }
        let values = view
            .to_f32(name)
            .map_err(|e| Error::format(&self.what, e.to_string()))?;
        Ok(Arc::from(&*values))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.tensor(name, &[len])?.to_vec())
    }

    /// A linear layer kept in f32 whatever `quantize` says (lm_head: QLoRA quantizes the
    /// decoder's linears only).
    fn dense_linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        let weight = self.tensor(name, &[out_features, in_features])?;
        Linear::dense(name, out_features, in_features, weight)
    }

    /// A decoder linear layer: 4-bit when the file stores it so or `quantize` is on.
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        if bnb::weight_is_quantized(self.weights, name) {
            let (packed, state) = bnb::read_quantized(self.weights, name)?;
            let layer =
                Linear::quantized(name, out_features, in_features, packed.to_vec(), &state)?;
            return if self.quantize {
                Ok(layer)
            } else {
                Linear::dense(
                    name,
                    out_features,
                    in_features,
                    Arc::from(&*layer.weight_f32()),
                )
            };
        }
        let weight = self.tensor(name, &[out_features, in_features])?;
        if self.quantize {
            let dtype = self.weights.tensor(name)?.dtype;
            Linear::nf4_from_dense(name, out_features, in_features, &weight, dtype)
        } else {
            Linear::dense(name, out_features, in_features, weight)
        }
    }
}

impl Llama {
    /// Loads `dir/config.json` and the safetensors weights of `dir` (single or sharded).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Llama> {
        let config = LlamaConfig::load(&dir.join("config.json"))?;
        let weights = ModelWeights::open(dir)?;
        Self::from_weights(config, &weights, &dir.display().to_string(), opts)
    }

    /// Builds the model from opened weights, checking every tensor's presence and shape;
    /// `what` names the model in errors. Float tensors of any width become f32.
    pub fn from_weights(
        config: LlamaConfig,
        weights: &ModelWeights,
        what: &str,
        opts: &LoadOptions,
    ) -> Result<Llama> {
        let reader = WeightReader {
            weights,
            what: what.to_string(),
            quantize: opts.quantize,
        };
        let c = &config;
        let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
        let embed_tokens = reader.tensor("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let mut progress = Progress::new(
            format!("loading {what}"),
            c.num_hidden_layers as u64,
            opts.quiet,
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let name = |part: &str| format!("model.layers.{i}.{part}.weight");
            layers.push(DecoderLayer {
                input_layernorm: reader.vector(&name("input_layernorm"), hidden)?,
                q_proj: reader.linear(&name("self_attn.q_proj"), c.q_dim(), hidden)?,
                k_proj: reader.linear(&name("self_attn.k_proj"), c.kv_dim(), hidden)?,
                v_proj: reader.linear(&name("self_attn.v_proj"), c.kv_dim(), hidden)?,
                o_proj: reader.linear(&name("self_attn.o_proj"), hidden, c.q_dim())?,
                post_attention_layernorm: reader
                    .vector(&name("post_attention_layernorm"), hidden)?,
                gate_proj: reader.linear(&name("mlp.gate_proj"), ffn, hidden)?,
                up_proj: reader.linear(&name("mlp.up_proj"), ffn, hidden)?,
                down_proj: reader.linear(&name("mlp.down_proj"), hidden, ffn)?,
            });
            progress.advance(1);
        }
        progress.finish();
        let norm = reader.vector("model.norm.weight", hidden)?;
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            Linear::dense(
                "lm_head (tied to model.embed_tokens)",
                c.vocab_size,
                hidden,
                embed_tokens.clone(),
            )?
        } else {
            reader.dense_linear("lm_head.weight", c.vocab_size, hidden)?
        };
        Ok(Llama {
            inv_freq: config.rope_inv_freq(),
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// An empty KV cache for up to `max_len` positions (the caller picks it, usually at most
    /// `config.max_position_embeddings`).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.config.num_hidden_layers, self.config.kv_dim(), max_len)
    }

    /// Runs `tokens` (a prompt chunk or one new token) at positions `cache.len()..`, appends
    /// their keys and values to `cache`, and returns the logits, (T, V), or only the last
    /// row, (1, V), when `last_only`.
    ///
    /// Fails, leaving the cache untouched, when `tokens` is empty, an id is outside the
    /// vocabulary, the tokens do not fit the cache, or the cache was made for another model.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::invalid("forward: no tokens to run"));
        }
        if cache.shape() != (c.num_hidden_layers, c.kv_dim()) {
            return Err(Error::invalid(format!(
                "the KV cache holds {:?} (layers, values per position) but the model needs {:?}",
                cache.shape(),
                (c.num_hidden_layers, c.kv_dim())
            )));
        }
        if tokens.len() > cache.remaining() {
            return Err(Error::invalid(format!(
                "{} new tokens do not fit the context: {} of its {} positions are used",
                tokens.len(),
                cache.len(),
                cache.max_len()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the model's vocabulary of {} (wrong tokenizer?)",
                c.vocab_size
            )));
        }

        let (t, pos0) = (tokens.len(), cache.len());
        let (hidden, head_dim, eps) = (c.hidden_size, c.head_dim, c.rms_norm_eps);
        let kv_dim = c.kv_dim();
        let mut a = Activations::new(c, t);
        embedding_forward(&mut a.x, &self.embed_tokens, tokens);
        rope_cos_sin(&mut a.cos, &mut a.sin, &self.inv_freq, pos0);
        let new_rows = pos0 * kv_dim..(pos0 + t) * kv_dim;
        let seen = (pos0 + t) * kv_dim;

        for (l, layer) in self.layers.iter().enumerate() {
            // attention block
            rmsnorm_forward(&mut a.normed, &a.x, &layer.input_layernorm, eps);
            layer.q_proj.forward(&a.normed, &mut a.q);
            rope_forward(&mut a.q, &a.cos, &a.sin, head_dim);
            let (keys, values) = cache.layer_mut(l); // (max_len, KV * D) each
            layer.k_proj.forward(&a.normed, &mut keys[new_rows.clone()]);
            rope_forward(&mut keys[new_rows.clone()], &a.cos, &a.sin, head_dim);
            layer
                .v_proj
                .forward(&a.normed, &mut values[new_rows.clone()]);
            attention_forward(
                &mut a.attn,
                &a.q,
                &keys[..seen],
                &values[..seen],
                pos0,
                c.num_attention_heads,
                c.num_key_value_heads,
                head_dim,
            );
            layer.o_proj.forward(&a.attn, &mut a.proj);
            add_in_place(&mut a.x, &a.proj);

            // MLP block
            rmsnorm_forward(&mut a.normed, &a.x, &layer.post_attention_layernorm, eps);
            layer.gate_proj.forward(&a.normed, &mut a.gate);
            layer.up_proj.forward(&a.normed, &mut a.up);
            swiglu_forward(&mut a.hidden, &a.gate, &a.up);
            layer.down_proj.forward(&a.hidden, &mut a.proj);
            add_in_place(&mut a.x, &a.proj);
        }
        cache.advance(t);

        let rows = if last_only {
            &a.x[(t - 1) * hidden..]
        } else {
            &a.x[..]
        }; // (T or 1, C)
        let normed = &mut a.normed[..rows.len()];
        rmsnorm_forward(normed, rows, &self.norm, eps);
        let mut logits = vec![0f32; rows.len() / hidden * c.vocab_size]; // (T or 1, V)
        self.lm_head.forward(normed, &mut logits);
        Ok(logits)
    }
}

/// The buffers of one forward call over T tokens, reused by every layer.
struct Activations {
    x: Vec<f32>,      // (T, C) the residual stream
    normed: Vec<f32>, // (T, C)
    q: Vec<f32>,      // (T, H * D)
    attn: Vec<f32>,   // (T, H * D)
    proj: Vec<f32>,   // (T, C) output of o_proj, then of down_proj
    gate: Vec<f32>,   // (T, F)
    up: Vec<f32>,     // (T, F)
    hidden: Vec<f32>, // (T, F)
    cos: Vec<f32>,    // (T, D/2)
    sin: Vec<f32>,    // (T, D/2)
}

impl Activations {
    fn new(c: &LlamaConfig, t: usize) -> Self {
        let zeros = |width: usize| vec![0f32; t * width];
        Activations {
            x: zeros(c.hidden_size),
            normed: zeros(c.hidden_size),
            q: zeros(c.q_dim()),
            attn: zeros(c.q_dim()),
            proj: zeros(c.hidden_size),
            gate: zeros(c.intermediate_size),
            up: zeros(c.intermediate_size),
            hidden: zeros(c.intermediate_size),
            cos: zeros(c.head_dim / 2),
            sin: zeros(c.head_dim / 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::RopeScaling;
    use rayon::prelude::*;
    use std::time::Instant;

    /// Random weights in [-scale, scale), filled in parallel from a hash of the index.
    fn random(len: usize, seed: u64, scale: f32) -> Arc<[f32]> {
        let mut v = vec![0f32; len];
        v.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, x) in chunk.iter_mut().enumerate() {
                    let mut h = ((c << 16) + i) as u64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
                    h = (h ^ (h >> 33)).wrapping_mul(0xff51afd7ed558ccd);
                    h ^= h >> 29;
                    *x = ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
                }
            });
        v.into()
    }

    /// A model in the shape of SmolLM2-135M (tied embeddings) with random dense f32 weights.
    fn smollm2_shaped() -> Llama {
        let config = LlamaConfig {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
        };
        let (c, f) = (config.hidden_size, config.intermediate_size);
        let mut seed = 0;
        let mut linear = |out: usize, inp: usize| {
            seed += 1;
            let w = random(out * inp, seed, 1.0 / (inp as f32).sqrt());
            Linear::dense("random", out, inp, w).unwrap()
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: vec![1.0; c],
                q_proj: linear(config.q_dim(), c),
                k_proj: linear(config.kv_dim(), c),
                v_proj: linear(config.kv_dim(), c),
                o_proj: linear(c, config.q_dim()),
                post_attention_layernorm: vec![1.0; c],
                gate_proj: linear(f, c),
                up_proj: linear(f, c),
                down_proj: linear(c, f),
            })
            .collect();
        let embed_tokens = random(config.vocab_size * c, 999, 1.0);
        Llama {
            lm_head: Linear::dense("lm_head", config.vocab_size, c, embed_tokens.clone()).unwrap(),
            inv_freq: config.rope_inv_freq(),
            embed_tokens,
            layers,
            norm: vec![1.0; c],
            config,
        }
    }

    /// Decode speed on the CPU; run with
    /// `cargo test --release --lib decode_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: builds a 135M-parameter model"]
    fn decode_speed_smollm2_shape() {
        let model = smollm2_shaped();
        let mut cache = model.new_cache(512);
        let prompt: Vec<u32> = (0..64).map(|i| (i * 769 + 11) % 49152).collect();
        let start = Instant::now();
        let mut logits = model.forward(&prompt, &mut cache, true).unwrap();
        let prefill = start.elapsed().as_secs_f64();
        let steps = 64;
        let start = Instant::now();
        for _ in 0..steps {
            let next = crate::sampling::argmax(&logits);
            logits = model.forward(&[next], &mut cache, true).unwrap();
        }
        let decode = start.elapsed().as_secs_f64();
        assert!(logits.iter().all(|x| x.is_finite()));
        eprintln!(
            "SmolLM2-135M shape, dense f32, {} threads: prefill {:.1} tokens/s, decode {:.1} tokens/s",
            rayon::current_num_threads(),
            prompt.len() as f64 / prefill,
            steps as f64 / decode
        );
    }
}
