//! Random-weight models in a real shape, for benchmarks: speed does not depend on the values,
//! so a LLaMA-7B-shaped model can be timed without its weights.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::linear::Linear;
use crate::model::llama::{DecoderLayer, Llama};
use crate::rng::Rng;
use crate::tensor::DType;
use rayon::prelude::*;
use serde_json::json;
use std::sync::Arc;

/// The config.json of a named shape: `smol` (SmolLM2-135M), `1b` (LLaMA-3.2-1B) or `7b`
/// (LLaMA-7B).
pub fn shape_config(name: &str) -> Result<LlamaConfig> {
    let (hidden, ffn, layers, heads, kv_heads, vocab, theta, tied) = match name {
        "smol" => (576, 1536, 30, 9, 3, 49152, 100_000.0, true),
        "1b" => (2048, 8192, 16, 32, 8, 128_256, 500_000.0, true),
        "7b" => (4096, 11008, 32, 32, 32, 32000, 10_000.0, false),
        other => {
            return Err(Error::invalid(format!(
                "--shape: {other:?} is not smol, 1b, 7b or a config.json"
            )))
        }
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "rope_theta": theta, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2
    });
    LlamaConfig::from_json(&config, &format!("the {name} shape"))
}

/// Gaussian values of standard deviation `std`.
fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    // Chunks of 2^20 values, each from its own generator seeded by `rng`, filled on all cores
    // (a 7B shape draws 6.7e9 values).
    const CHUNK: usize = 1 << 20;
    let seeds: Vec<u64> = (0..n.div_ceil(CHUNK)).map(|_| rng.next_u64()).collect();
    let mut values = vec![0.0f32; n];
    values
        .par_chunks_mut(CHUNK)
        .zip(seeds)
        .for_each(|(chunk, seed)| {
            let mut rng = Rng::new(seed);
            chunk.iter_mut().for_each(|v| *v = rng.normal() * std);
        });
    values
}

impl Llama {
    /// A model of `config`'s shape with random weights (std 0.02, norms 1), its decoder linears
    /// in NF4 when `quantize`.
    pub fn random(config: LlamaConfig, quantize: bool, seed: u64) -> Result<Llama> {
        let mut rng = Rng::new(seed);
        let c = &config;
        let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
        let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let w = normal(&mut rng, out * inp, 0.02);
            if quantize {
                Linear::nf4_from_dense(name, out, inp, &w, DType::BF16)
            } else {
                Linear::dense(name, out, inp, Arc::from(w))
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let name = |m: &str| format!("model.layers.{i}.{m}");
            layers.push(DecoderLayer {
                input_layernorm: vec![1.0; hidden],
                q_proj: linear(&name("self_attn.q_proj"), c.q_dim(), hidden)?,
                k_proj: linear(&name("self_attn.k_proj"), c.kv_dim(), hidden)?,
                v_proj: linear(&name("self_attn.v_proj"), c.kv_dim(), hidden)?,
                o_proj: linear(&name("self_attn.o_proj"), hidden, c.q_dim())?,
                post_attention_layernorm: vec![1.0; hidden],
                gate_proj: linear(&name("mlp.gate_proj"), ffn, hidden)?,
                up_proj: linear(&name("mlp.up_proj"), ffn, hidden)?,
                down_proj: linear(&name("mlp.down_proj"), hidden, ffn)?,
            });
        }
        let embed_tokens: Arc<[f32]> = Arc::from(normal(&mut rng, c.vocab_size * hidden, 0.02));
        let lm_head = if c.tie_word_embeddings {
            Linear::dense("lm_head", c.vocab_size, hidden, embed_tokens.clone())?
        } else {
            Linear::dense(
                "lm_head",
                c.vocab_size,
                hidden,
                Arc::from(normal(&mut rng, c.vocab_size * hidden, 0.02)),
            )?
        };
        Ok(Llama {
            inv_freq: config.rope_inv_freq(),
            embed_tokens,
            layers,
            norm: vec![1.0; hidden],
            lm_head,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_have_their_sizes() {
        let smol = shape_config("smol").unwrap();
        assert_eq!(
            (
                smol.hidden_size,
                smol.num_hidden_layers,
                smol.num_key_value_heads,
                smol.head_dim
            ),
            (576, 30, 3, 64)
        );
        assert_eq!(shape_config("7b").unwrap().intermediate_size, 11008);
        assert!(shape_config("13b").is_err());
    }
}
