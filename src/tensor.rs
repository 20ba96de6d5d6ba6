//! Hand-written tensor storage: an element type, a shape, and where the bytes are.
//!
//! Weights are read as [`TensorView`]s borrowed from a memory-mapped file (zero copy) and turned
//! into f32 only where a computation needs it. Everything is little-endian, as safetensors and
//! GGUF are.

use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// Element types, named as safetensors names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer (also packed 4-bit codes).
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE double precision.
    F64,
    /// 8-bit float, 4 exponent bits.
    F8E4M3,
    /// 8-bit float, 5 exponent bits.
    F8E5M2,
}

impl DType {
    /// Every dtype, for lookups by name.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::I64,
        DType::U64,
        DType::F64,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// The safetensors name ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// True for the float types this engine computes with (f32, f16, bf16, f64).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    /// The PyTorch name used in Hugging Face configs and bitsandbytes quant states.
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            DType::F32 => Some("float32"),
            DType::F16 => Some("float16"),
            DType::BF16 => Some("bfloat16"),
            DType::F64 => Some("float64"),
            DType::U8 => Some("uint8"),
            DType::I8 => Some("int8"),
            _ => None,
        }
    }

    /// Parses a PyTorch dtype name ("bfloat16", "torch.float16", "float", "half").
    pub fn from_torch_name(name: &str) -> Option<DType> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            "float64" | "double" => Some(DType::F64),
            "uint8" => Some(DType::U8),
            "int8" => Some(DType::I8),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A borrowed tensor: dtype, shape and its little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// Exactly `numel * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// The elements as f32, converted from any float dtype (zero copy for aligned f32).
    /// `what` names the tensor in the error for a non-float dtype.
    pub fn to_f32(&self, what: &str) -> Result<Cow<'a, [f32]>> {
        if self.dtype == DType::F32 {
            if let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(self.bytes) {
                return Ok(Cow::Borrowed(s));
            }
        }
        let mut out = vec![0f32; self.numel()];
        bytes_to_f32(self.dtype, self.bytes, &mut out).map_err(|_| {
            Error::invalid(format!("{what}: dtype {} is not a float type", self.dtype))
        })?;
        Ok(Cow::Owned(out))
    }
}

/// Converts little-endian float bytes of `dtype` into `out` (one f32 per element), in parallel.
/// Fails when `dtype` is not a float type; panics if lengths disagree (a caller bug).
pub fn bytes_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    const CHUNK: usize = 1 << 14;
    let size = dtype.size();
    assert_eq!(
        bytes.len(),
        out.len() * size,
        "bytes_to_f32: length mismatch"
    );
    let convert: fn(&[u8]) -> f32 = match dtype {
        DType::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => |b| f16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::BF16 => |b| bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F64 => |b| f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
        other => return Err(Error::invalid(format!("dtype {other} is not a float type"))),
    };
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(o, b)| {
            for (x, e) in o.iter_mut().zip(b.chunks_exact(size)) {
                *x = convert(e);
            }
        });
    Ok(())
}

/// Encodes f32 values as little-endian bytes of a float `dtype` (round to nearest even),
/// in parallel. Panics on a non-float dtype (a caller bug).
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    const CHUNK: usize = 1 << 14;
    let size = dtype.size();
    let mut out = vec![0u8; values.len() * size];
    out.par_chunks_mut(CHUNK * size)
        .zip(values.par_chunks(CHUNK))
        .for_each(|(o, v)| {
            for (e, &x) in o.chunks_exact_mut(size).zip(v) {
                match dtype {
                    DType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                    DType::F16 => e.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
                    DType::BF16 => e.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    DType::F64 => e.copy_from_slice(&(x as f64).to_le_bytes()),
                    other => panic!("f32_to_bytes: {other} is not a float dtype"),
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("F31"), None);
        assert_eq!(DType::from_torch_name("torch.bfloat16"), Some(DType::BF16));
    }

    #[test]
    fn float_conversions_agree_with_half() {
        let xs = [0.0f32, -1.5, 3.25, 65504.0, 1e-8, -0.0, 0.1];
        for d in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let bytes = f32_to_bytes(&xs, d);
            let mut back = vec![0f32; xs.len()];
            bytes_to_f32(d, &bytes, &mut back).unwrap();
            for (&x, &y) in xs.iter().zip(&back) {
                let expect = match d {
                    DType::F16 => f16::from_f32(x).to_f32(),
                    DType::BF16 => bf16::from_f32(x).to_f32(),
                    _ => x,
                };
                assert_eq!(expect.to_bits(), y.to_bits(), "{d} {x}");
            }
        }
    }
}
