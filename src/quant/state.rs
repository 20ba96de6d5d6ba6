//! The quantization state: what is needed besides the packed codes to get the values back.

use super::{double, NESTED_BLOCKSIZE};
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType};

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of a normal distribution, the QLoRA default.
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantType {
    /// The bitsandbytes name: "nf4" or "fp4".
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses a bitsandbytes name ("nf4", "fp4").
    pub fn from_name(name: &str) -> Option<QuantType> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Double-quantized absmax values ("compress_statistics" in bitsandbytes).
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code (of [`super::dynamic_code_signed`]) per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 scale per `nested_blocksize` codes.
    pub nested_absmax: Vec<f32>,
    /// The mean of the absmax values, subtracted before the nested quantization.
    pub offset: f32,
    /// Codes per nested block (256 in bitsandbytes).
    pub nested_blocksize: usize,
}

/// The per-block scales, plain or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// 8-bit codes with their own scales and offset.
    Double(DoubleQuant),
}

/// Everything besides the packed codes that dequantization needs (bitsandbytes' `QuantState`).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per block: a power of two in 64..=4096.
    pub blocksize: usize,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Original dtype (F32, F16 or BF16); dequantization's default output type.
    pub dtype: DType,
    /// The per-block scales.
    pub absmax: Absmax,
}

/// A quantized tensor: packed codes (two a byte, first element in the high nibble) and state.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized4 {
    /// `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// Scales, shape and types.
    pub state: QuantState,
}

/// Fails unless `blocksize` is a power of two in 64..=4096; `what` names it in the error.
pub fn check_blocksize(blocksize: usize, what: &str) -> Result<()> {
    if blocksize.is_power_of_two() && (64..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {blocksize} is not supported: use a power of two from 64 to 4096"
        )))
    }
}

/// Fails unless `dtype` is one bitsandbytes quantizes (F32, F16, BF16).
pub(crate) fn check_float_dtype(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::invalid(format!(
            "{what}: dtype {other} cannot be 4-bit quantized; use F32, F16 or BF16"
        ))),
    }
}

impl QuantState {
    /// Number of elements of the original tensor (0 if the shape overflows; `validate`
    /// rejects such a shape).
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(0)
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize.max(1))
    }

    /// The per-block scales as f32: the plain values, or the double-quantized ones
    /// dequantized as bitsandbytes does (`code[q] * nested_absmax + offset`).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(values) => values.clone(),
            Absmax::Double(dq) => double::dequantize_absmax(dq),
        }
    }

    /// Checks that the state is consistent with itself and with `packed_len` bytes of codes.
    pub fn validate(&self, packed_len: usize) -> Result<()> {
        check_blocksize(self.blocksize, "blocksize")?;
        check_float_dtype(self.dtype, "quant state")?;
        let numel = checked_numel(&self.shape).ok_or_else(|| {
            Error::invalid(format!("quant state: shape {:?} overflows", self.shape))
        })?;
        if numel == 0 {
            return Err(Error::invalid(format!(
                "quant state: shape {:?} has no elements",
                self.shape
            )));
        }
        if packed_len != numel.div_ceil(2) {
            return Err(Error::invalid(format!(
                "quant state: {packed_len} packed bytes do not hold shape {:?} ({} bytes expected)",
                self.shape,
                numel.div_ceil(2)
            )));
        }
        let blocks = numel.div_ceil(self.blocksize);
        match &self.absmax {
            Absmax::Plain(values) if values.len() != blocks => Err(Error::invalid(format!(
                "quant state: {} absmax values for {blocks} blocks",
                values.len()
            ))),
            Absmax::Plain(_) => Ok(()),
            Absmax::Double(dq) => {
                check_blocksize(dq.nested_blocksize, "nested blocksize")?;
                if dq.codes.len() != blocks {
                    return Err(Error::invalid(format!(
                        "quant state: {} nested absmax codes for {blocks} blocks",
                        dq.codes.len()
                    )));
                }
                let nested = blocks.div_ceil(dq.nested_blocksize);
                if dq.nested_absmax.len() != nested {
                    return Err(Error::invalid(format!(
                        "quant state: {} nested absmax values for {nested} nested blocks",
                        dq.nested_absmax.len()
                    )));
                }
                Ok(())
            }
        }
    }
}

impl DoubleQuant {
    /// Double-quantizes `absmax` as bitsandbytes does (nested blocksize 256).
    pub fn quantize(absmax: &[f32]) -> DoubleQuant {
        double::quantize_absmax(absmax, NESTED_BLOCKSIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(absmax: Absmax) -> QuantState {
        QuantState {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            shape: vec![3, 100],
            dtype: DType::BF16,
            absmax,
        }
    }

    #[test]
    fn names_round_trip() {
        for q in [QuantType::Nf4, QuantType::Fp4] {
            assert_eq!(QuantType::from_name(q.name()), Some(q));
        }
        assert_eq!(QuantType::from_name("int4"), None);
    }

    #[test]
    fn blocksizes() {
        for ok in [64, 128, 256, 512, 1024, 2048, 4096] {
            assert!(check_blocksize(ok, "b").is_ok());
        }
        for bad in [0, 1, 32, 63, 96, 8192] {
            assert!(check_blocksize(bad, "b").is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_catches_inconsistencies() {
        let good = state(Absmax::Plain(vec![1.0; 5]));
        assert!(good.validate(150).is_ok());
        assert!(good.validate(149).is_err());
        assert!(state(Absmax::Plain(vec![1.0; 4])).validate(150).is_err());
        let mut bad_dtype = good.clone();
        bad_dtype.dtype = DType::I32;
        assert!(bad_dtype.validate(150).is_err());
        let mut bad_block = good.clone();
        bad_block.blocksize = 100;
        assert!(bad_block.validate(150).is_err());
        let mut overflow = good.clone();
        overflow.shape = vec![usize::MAX, 3];
        assert!(overflow.validate(150).is_err());
        assert_eq!(overflow.numel(), 0);
        let dq = DoubleQuant {
            codes: vec![0; 5],
            nested_absmax: vec![1.0],
            offset: 0.0,
            nested_blocksize: 256,
        };
        assert!(state(Absmax::Double(dq.clone())).validate(150).is_ok());
        let mut short = dq.clone();
        short.codes.pop();
        assert!(state(Absmax::Double(short)).validate(150).is_err());
        let mut nested = dq;
        nested.nested_absmax.push(1.0);
        assert!(state(Absmax::Double(nested)).validate(150).is_err());
    }
}
