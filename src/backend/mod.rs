//! Compute backends: the CPU reference and, with the `cuda` feature, the GPU.

#[cfg(feature = "cuda")]
pub mod cuda;
