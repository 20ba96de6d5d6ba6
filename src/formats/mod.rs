//! File formats. Each module reads and writes bytes and knows nothing of models.

pub mod gguf;
pub mod safetensors;
