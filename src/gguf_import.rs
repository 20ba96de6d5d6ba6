//! GGUF (llama architecture) to a Hugging Face model folder: `config.json`,
//! `generation_config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
//!
//! It mirrors what transformers' own GGUF loader produces (modeling_gguf_pytorch_utils.py,
//! integrations/gguf): tensors dequantized to f32, renamed from llama.cpp's names, shapes
//! reversed to torch order, and the Q/K rows that llama.cpp's converter interleaved for its
//! RoPE put back in Hugging Face order. The folder is written atomically: it appears whole or
//! not at all.

mod config;
mod sentencepiece;
mod tensors;
mod tokenizer_files;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::{self, OwnedTensor};
use crate::fsutil::{self, StagedDir};
use crate::progress::Progress;
use crate::tensor::{f32_to_bytes, DType};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The hyperparameters of a llama GGUF, in Hugging Face terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LlamaParams {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// `rope_scaling` for config.json, if the file states one.
    pub rope_scaling: Option<serde_json::Value>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Unknown token id.
    pub unk_token_id: Option<u32>,
    /// True when the file has no `output` tensor: lm_head shares the embedding.
    pub tie_word_embeddings: bool,
    /// True when the attention projections carry biases.
    pub attention_bias: bool,
}

/// How to import.
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    /// Dtype of the written weights: BF16 (default) or F32.
    pub dtype: DType,
    /// No progress line on stderr.
    pub quiet: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: DType::BF16,
            quiet: false,
        }
    }
}

/// What an import did.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// The model's hyperparameters.
    pub params: LlamaParams,
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub parameters: usize,
    /// GGUF tensors left out because a Hugging Face llama has no place for them
    /// (e.g. `rope_freqs.weight`).
    pub skipped: Vec<String>,
    /// `(ggml type name, tensor count)` in the source file.
    pub source_types: Vec<(String, usize)>,
}

/// Imports the llama GGUF at `gguf_path` into a new Hugging Face folder `out_dir`.
pub fn import_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    options: ImportOptions,
) -> Result<ImportSummary> {
    if !matches!(options.dtype, DType::BF16 | DType::F32) {
        return Err(Error::invalid(format!(
            "--dtype {}: choose bf16 or f32",
            options.dtype.torch_name().unwrap_or(options.dtype.name())
        )));
    }
    let gguf = GgufFile::open(gguf_path)?;
    let params = config::read_params(&gguf)?;
    // Build the tokenizer first: an unsupported vocabulary fails before the long part.
    let tok = tokenizer_files::tokenizer_files(&gguf, &params)?;
    let staged = StagedDir::new(out_dir)?;

    let mut progress = Progress::new("import", gguf.tensors().len() as u64, options.quiet);
    let mut written = Vec::with_capacity(gguf.tensors().len());
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for info in gguf.tensors() {
        let Some(target) = tensors::hf_tensor(&info.name, &params) else {
            if info.name == "rope_freqs.weight" {
                skipped.push(info.name.clone());
                progress.advance(1);
                continue;
            }
            return Err(Error::unsupported(format!(
                "{}: tensor {:?} has no place in a Hugging Face llama checkpoint",
                gguf.what(),
                info.name
            )));
        };
        if info.shape() != target.shape {
            return Err(Error::format(
                gguf.what(),
                format!(
                    "tensor {:?} has shape {:?} but the metadata implies {:?} for {}",
                    info.name,
                    info.shape(),
                    target.shape,
                    target.name
                ),
            ));
        }
        let mut values = gguf.tensor_f32(info)?;
        if let Some(heads) = target.unpermute_heads {
            let rows = target.shape[0];
            let cols = target.shape.get(1).copied().unwrap_or(1);
            values = tensors::unpermute_rope_rows(&values, rows, cols, heads);
        }
        let bytes = f32_to_bytes(&values, options.dtype);
        seen.insert(target.name.clone());
        written.push(OwnedTensor::new(
            target.name,
            options.dtype,
            target.shape,
            bytes,
        )?);
        progress.advance(1);
    }
    check_complete(&gguf, &params, &seen)?;
    progress.finish();

    let parameters = written
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::write_file(&staged.path("model.safetensors"), &written, &meta)?;
    fsutil::write_json(
        &staged.path("config.json"),
        &config::config_json(&params, options.dtype),
    )?;
    fsutil::write_json(
        &staged.path("generation_config.json"),
        &config::generation_config_json(&params),
    )?;
    fsutil::write_json(&staged.path("tokenizer.json"), &tok.tokenizer)?;
    fsutil::write_json(&staged.path("tokenizer_config.json"), &tok.config)?;
    staged.commit()?;

    let mut source_types: BTreeMap<String, usize> = BTreeMap::new();
    for info in gguf.tensors() {
        *source_types
            .entry(info.ggml_type.name().to_string())
            .or_default() += 1;
    }
    Ok(ImportSummary {
        params,
        tensors: written.len(),
        parameters,
        skipped,
        source_types: source_types.into_iter().collect(),
    })
}

/// Fails when a tensor every llama layer needs is missing.
fn check_complete(gguf: &GgufFile, p: &LlamaParams, seen: &HashSet<String>) -> Result<()> {
    let mut needed = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
    ];
    if !p.tie_word_embeddings {
        needed.push("lm_head.weight".into());
    }
    for layer in 0..p.num_hidden_layers {
        for part in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            needed.push(format!("model.layers.{layer}.{part}.weight"));
        }
    }
    match needed.iter().find(|n| !seen.contains(*n)) {
        None => Ok(()),
        Some(missing) => Err(Error::format(
            gguf.what(),
            format!("no tensor for {missing} (incomplete llama checkpoint)"),
        )),
    }
}
