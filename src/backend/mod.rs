//! Compute backends: the operations the decoder is made of.
//!
//! [`cpu`] is the oracle: plain f32 loops over slices, parallel over rows and heads with rayon,
//! written to be read. Every faster backend is checked against it. [`cpu_backward`] holds the
//! backward of each of its ops, [`gemm`] the dense matrix product they share,
//! and [`gemv_4bit`] the decoding product with a 4-bit weight. With the
//! `cuda` feature, `cuda` holds the GPU runtime and kernel launches.

pub mod cpu;
pub mod cpu_backward;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod gemv_4bit;
