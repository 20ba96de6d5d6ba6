//! File formats. Each module reads and writes bytes and knows nothing of models.

pub mod bnb;
pub mod gguf;
pub mod peft;
pub mod safetensors;
