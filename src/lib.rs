//! Sun-Assistant: a from-scratch QLoRA engine for LLaMA-family models.
//!
//! The crate, from the bottom up (arrows point down: nothing knows what is above it):
//!
//! - [`error`]: the one error type; messages name the file, tensor or flag at fault.
//! - [`fsutil`]: atomic writes of files and folders; [`progress`]: progress lines on stderr.
//! - [`tensor`]: dtypes, shapes and borrowed views of little-endian bytes.
//! - [`rng`]: the seedable generator behind initialisation, dropout, shuffling and sampling.
//! - [`quant`]: NF4/FP4 blockwise quantization and double quantization, bit-exact with
//!   bitsandbytes.
//! - [`formats`]: safetensors (memory-mapped), the Hugging Face bitsandbytes 4-bit layout, GGUF,
//!   PEFT adapters.
//! - [`quantize_model`]: quantizing and dequantizing whole files and model folders.
//! - [`tokenizer`]: BPE from `tokenizer.json`, byte-level and SentencePiece-style;
//!   [`chat`]: chat templates.
//! - [`backend`]: the decoder's operations; [`backend::cpu`] is the f32 oracle.
//! - [`model`]: the LLaMA decoder: config, weights, linear layers, LoRA, KV cache, forward and
//!   training passes; with `cuda`, the same passes on the GPU (`model::gpu`).
//! - [`sampling`]: greedy, temperature, top-k and top-p sampling, and the generation loop.
//! - [`data`]: instruction datasets; [`optim`]: AdamW, schedules, clipping; [`train`]: the loop;
//!   [`dist`]: data-parallel runs (ranks, rendezvous, launching, gradient sums across ranks).
//! - [`eval`]: sliding-window perplexity and multiple-choice scoring; [`mmlu`]: MMLU.
//! - [`merge`]: folding an adapter into its base model.
//! - [`device`]: `--device auto|cpu|cuda`, shared by every command; [`dynlib`]: opening shared
//!   libraries at run time (the CUDA driver, NCCL), so the binary starts without them.
//! - [`gguf_import`]: GGUF files (llama.cpp) to Hugging Face folders.
//! - [`serve`]: an OpenAI-compatible HTTP API and a chat page over the generation loop.
//! - [`cli`]: one module per `sun` command: flags in, library call, output out.

#![warn(missing_docs)]

pub mod backend;
pub mod chat;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod dynlib;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fsutil;
pub mod gguf_import;
pub mod merge;
pub mod mmlu;
pub mod model;
pub mod optim;
pub mod progress;
pub mod quant;
pub mod quantize_model;
pub mod rng;
pub mod sampling;
pub mod serve;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
