//! The LLaMA-family decoder: its configuration, weights, linear layers, KV cache and forward
//! pass.

pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod llama;

pub use config::{LlamaConfig, RopeScaling};
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use llama::{Llama, LoadOptions};
