//! llama.cpp tensor names to Hugging Face names, and undoing the Q/K row permutation that
//! llama.cpp's `convert_hf_to_gguf.py` applies for its RoPE layout.

use super::LlamaParams;

/// What a GGUF tensor becomes in the Hugging Face checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HfTensor {
    /// The Hugging Face name.
    pub name: String,
    /// The torch shape the config implies.
    pub shape: Vec<usize>,
    /// `Some(n_head)` when rows were interleaved per head for RoPE and must be un-permuted.
    pub unpermute_heads: Option<usize>,
}

/// Maps GGUF tensor `name` to its Hugging Face name, expected shape and un-permutation, or
/// `None` for a name that is not part of a llama checkpoint.
pub(crate) fn hf_tensor(name: &str, p: &LlamaParams) -> Option<HfTensor> {
    let (h, ffn, q_rows, kv_rows) = (
        p.hidden_size,
        p.intermediate_size,
        p.num_attention_heads * p.head_dim,
        p.num_key_value_heads * p.head_dim,
    );
    let plain = |hf: &str, shape: Vec<usize>| {
        Some(HfTensor {
            name: hf.to_string(),
            shape,
            unpermute_heads: None,
        })
    };
    match name {
        "token_embd.weight" => return plain("model.embed_tokens.weight", vec![p.vocab_size, h]),
        "output_norm.weight" => return plain("model.norm.weight", vec![h]),
        "output.weight" => return plain("lm_head.weight", vec![p.vocab_size, h]),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < p.num_hidden_layers)?;
    let (part, kind) = rest.rsplit_once('.')?;
    let is_bias = match kind {
        "weight" => false,
        "bias" => true,
        _ => return None,
    };
    let (hf, out_rows, in_cols, heads) = match part {
        "attn_q" => ("self_attn.q_proj", q_rows, h, Some(p.num_attention_heads)),
        "attn_k" => ("self_attn.k_proj", kv_rows, h, Some(p.num_key_value_heads)),
        "attn_v" => ("self_attn.v_proj", kv_rows, h, None),
        "attn_output" => ("self_attn.o_proj", h, q_rows, None),
        "ffn_gate" => ("mlp.gate_proj", ffn, h, None),
        "ffn_up" => ("mlp.up_proj", ffn, h, None),
        "ffn_down" => ("mlp.down_proj", h, ffn, None),
        "attn_norm" if !is_bias => {
            return plain(
                &format!("model.layers.{layer}.input_layernorm.weight"),
                vec![h],
            )
        }
        "ffn_norm" if !is_bias => {
            return plain(
                &format!("model.layers.{layer}.post_attention_layernorm.weight"),
                vec![h],
            )
        }
        _ => return None,
    };
    let shape = if is_bias {
        vec![out_rows]
    } else {
        vec![out_rows, in_cols]
    };
    Some(HfTensor {
        name: format!("model.layers.{layer}.{hf}.{kind}"),
        shape,
        unpermute_heads: heads,
    })
}

/// Undoes convert_hf_to_gguf.py's `permute(w, n_head)`, which, within each head of `2 * d`
/// rows, moved row `t * d + i` (`t` in 0..2, `i` in 0..d) to row `2 * i + t`. `values` holds
/// `rows` rows of `cols` (cols = 1 for a bias); `rows` must be a multiple of `2 * n_head`.
pub(crate) fn unpermute_rope_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Vec<f32> {
    assert!(n_head > 0 && rows % (2 * n_head) == 0 && values.len() == rows * cols);
    let d = rows / n_head / 2;
    let mut out = vec![0f32; values.len()];
    for head in 0..n_head {
        let base = head * 2 * d;
        for t in 0..2 {
            for i in 0..d {
                let (hf_row, gguf_row) = (base + t * d + i, base + 2 * i + t);
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&values[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_matches_a_hand_computed_case() {
        // 2 heads of 4 rows (d = 2), 1 column. HF rows 0..8 hold their own index; llama.cpp's
        // permute interleaves each head's halves: head 0 [0,1 | 2,3] -> [0,2,1,3], head 1
        // [4,5 | 6,7] -> [4,6,5,7].
        let gguf = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        let hf = unpermute_rope_rows(&gguf, 8, 1, 2);
        assert_eq!(hf, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // Rows move whole: 1 head of 4 rows, 2 columns.
        let gguf = [10.0, 11.0, 30.0, 31.0, 20.0, 21.0, 40.0, 41.0];
        let hf = unpermute_rope_rows(&gguf, 4, 2, 1);
        assert_eq!(hf, [10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 40.0, 41.0]);
    }

    #[test]
    fn names_map_to_hugging_face() {
        let p = LlamaParams {
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            ..LlamaParams::default()
        };
        let k = hf_tensor("blk.1.attn_k.weight", &p).unwrap();
        assert_eq!(k.name, "model.layers.1.self_attn.k_proj.weight");
        assert_eq!((k.shape, k.unpermute_heads), (vec![4, 8], Some(1)));
        let q = hf_tensor("blk.0.attn_q.bias", &p).unwrap();
        assert_eq!((q.shape, q.unpermute_heads), (vec![8], Some(2)));
        let down = hf_tensor("blk.0.ffn_down.weight", &p).unwrap();
        assert_eq!(
            (down.name.as_str(), down.shape),
            ("model.layers.0.mlp.down_proj.weight", vec![8, 12])
        );
        assert_eq!(
            hf_tensor("blk.0.ffn_norm.weight", &p).unwrap().name,
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_tensor("output.weight", &p).unwrap().name,
            "lm_head.weight"
        );
        assert_eq!(
            hf_tensor("blk.2.attn_q.weight", &p),
            None,
            "layer out of range"
        );
        assert_eq!(hf_tensor("rope_freqs.weight", &p), None);
        assert_eq!(hf_tensor("blk.x.attn_q.weight", &p), None);
    }
}
