//! Blockwise 4-bit quantization (NF4, FP4) and double quantization, bit-exact with
//! bitsandbytes 0.50.2 on CUDA (`quantize_4bit` / `dequantize_4bit`).
//!
//! A tensor is cut into blocks of `blocksize` consecutive elements (the last one may be
//! short). Each block stores its absolute maximum (f32) and one 4-bit code per element, two
//! codes a byte with the **first element in the high nibble**. With double quantization the
//! absmax values are themselves quantized: their mean (`offset`) is subtracted and the rest is
//! quantized blockwise (256 a block) with the signed 8-bit dynamic code.
//!
//! # Arithmetic, as the CUDA build of bitsandbytes does it
//!
//! bitsandbytes compiles its kernels with `--use_fast_math`, so:
//! - every f32 value too small to be normal (a subnormal) is flushed to zero, on input and on
//!   every product (`x * (1/absmax)`, `code * absmax`);
//! - the block maximum uses `fmaxf` starting from `-FLT_MAX`, so NaN elements are ignored,
//!   and a short last block also sees the zero padding;
//! - an element is normalised by multiplying with `1/absmax`, and the GPU computes that
//!   reciprocal with the approximate `rcp.approx.ftz.f32` instruction, one ulp off the correctly
//!   rounded value for 13% of mantissas. `ftz::recip` reproduces it from a table of all 2^23
//!   mantissas measured on an H200 (`rcp_approx.bin`, made by `sun selftest --write-rcp-table`);
//!   without it, values within an ulp of an FP4 decision threshold (common with bf16 input)
//!   would get a neighbouring code.
//!
//! The mean of double quantization is computed in the exact summation order of PyTorch's CUDA
//! reduction kernel (see `torch_mean`), which is what makes `offset` bit-identical.
//!
//! # NaN and infinity
//!
//! Nothing panics; the result is what bitsandbytes' arithmetic gives:
//! - NaN elements do not enter the absmax; they get code 0 (NF4: dequantizes to `-absmax`;
//!   FP4: to `+0.0`).
//! - A block of only NaN has absmax `-f32::MAX`: NF4 codes dequantize to `+f32::MAX`, FP4 to
//!   `-0.0`.
//! - An infinite element makes the absmax infinite; `1/inf = 0` turns the block's finite
//!   elements into `0 * inf = NaN` on dequantization, and the infinite ones into `±inf` (NF4)
//!   or NaN.
//! - A block whose absmax exceeds 2^126 (about 8.5e37) has a subnormal reciprocal, flushed to
//!   zero: every element is coded as zero (NF4 `0b0111`, FP4 `0b0000`) and dequantizes to
//!   `±0.0`.
//! - An all-zero block has absmax 0; `0 * (1/0) = NaN` gives code 0 (NF4: `-1.0 * 0 = -0.0`;
//!   FP4: `+0.0`).
//! - With double quantization a non-finite absmax spreads NaN into its nested block, and a
//!   nested block whose scale exceeds 2^126 is flushed the same way: its absmax values all
//!   come back as `offset`.

mod blockwise;
mod codes;
mod double;
mod dynamic8;
mod ftz;
mod state;
mod torch_mean;

pub use blockwise::{
    dequantize_4bit, dequantize_4bit_f32, dequantize_range_f32, quantize_4bit, quantize_4bit_f32,
};
pub use codes::{code_table, dynamic_code_signed, encode_4bit};
pub use state::{check_blocksize, Absmax, DoubleQuant, QuantState, QuantType, Quantized4};
pub use torch_mean::torch_cuda_mean;

/// The blocksize bitsandbytes uses for the nested quantization of absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;
