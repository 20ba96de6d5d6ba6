//! Sun-Assistant: a from-scratch QLoRA engine for LLaMA-family models.
//!
//! The crate, from the bottom up (arrows point down: nothing knows what is above it):
//!
//! - [`error`]: the one error type; messages name the file, tensor or flag at fault.
//! - [`fsutil`]: atomic writes of files and folders.
//! - [`tensor`]: dtypes, shapes and borrowed views of little-endian bytes.
//! - [`quant`]: NF4/FP4 blockwise quantization and double quantization, bit-exact with
//!   bitsandbytes.
//! - [`formats`]: safetensors (memory-mapped), the Hugging Face bitsandbytes 4-bit layout, GGUF.
//! - [`tokenizer`]: BPE from `tokenizer.json`, byte-level and SentencePiece-style.
//! - [`backend`]: the decoder's operations; [`backend::cpu`] is the f32 oracle.
//! - [`model`]: the LLaMA decoder: config, weights, linear layers, KV cache, forward pass.
//! - [`sampling`]: greedy, temperature, top-k and top-p sampling, and the generation loop.
//! - [`eval`]: sliding-window perplexity and multiple-choice scoring.
//! - [`cli`]: one module per `sun` command: flags in, library call, output out.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod error;
pub mod eval;
pub mod formats;
pub mod fsutil;
pub mod model;
pub mod progress;
pub mod quant;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
