//! Compute backends: the operations the decoder is made of.
//!
//! [`cpu`] is the oracle: plain f32 loops over slices, parallel over rows and heads with rayon,
//! written to be read. Every faster backend is checked against it.

pub mod cpu;
