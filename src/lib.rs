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
//! - [`gguf_import`]: a llama GGUF to a Hugging Face model folder.
//! - [`tokenizer`]: BPE from `tokenizer.json`, byte-level and SentencePiece-style.
//! - [`cli`]: one module per `sun` command: flags in, library call, output out.

#![warn(missing_docs)]

pub mod cli;
pub mod error;
pub mod formats;
pub mod fsutil;
pub mod gguf_import;
pub mod progress;
pub mod quant;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
