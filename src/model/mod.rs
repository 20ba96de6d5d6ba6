//! The LLaMA-family decoder: its configuration, weights, linear layers, LoRA adapters, KV cache,
//! forward pass and training pass.

pub mod adapters;
pub mod config;
pub mod device_map;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod random;
pub mod tape_budget;
pub mod train_model;
pub mod train_pass;

pub use config::{LlamaConfig, RopeScaling};
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use llama::{Llama, LoadOptions};
pub use train_model::TrainModel;
