//! Blockwise 4-bit quantization and dequantization (`kQuantizeBlockwise` with `NF4`/`FP4` and
//! `kDequantizeBlockwise` of bitsandbytes), parallel over groups of blocks with rayon.

use super::codes::{dequant_lut, encode_fp4, encode_nf4};
use super::ftz;
use super::state::{check_blocksize, check_float_dtype, Absmax, QuantState, QuantType, Quantized4};
use super::DoubleQuant;
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType, TensorView};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements handed to one rayon task (rounded to whole blocks).
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// An input element type: converted to f32 exactly, as the kernel's `(float)vals[j]`.
pub(crate) trait Element: Copy + Send + Sync {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// The absmax of one block as the kernel computes it: `fmaxf` over `|x|` (NaN ignored,
/// subnormals flushed to 0) starting from `-FLT_MAX`; a short block also sees its zero padding.
#[inline]
pub(crate) fn block_absmax<T: Element>(block: &[T], short: bool) -> f32 {
    const LANES: usize = 8;
    let start = if short { 0.0 } else { -f32::MAX };
    let mut lanes = [start; LANES];
    let chunks = block.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            let a = ftz::flush(x.to_f32()).abs();
            *m = if a > *m { a } else { *m };
        }
    }
    for &x in rest {
        let a = ftz::flush(x.to_f32()).abs();
        lanes[0] = if a > lanes[0] { a } else { lanes[0] };
    }
    lanes.iter().fold(start, |m, &a| if a > m { a } else { m })
}

/// Quantizes one block into `out` (`ceil(len / 2)` bytes); returns its absmax.
#[inline]
fn quantize_block<T: Element, E: Fn(f32) -> u8>(
    block: &[T],
    out: &mut [u8],
    short: bool,
    encode: &E,
) -> f32 {
    let absmax = block_absmax(block, short);
    let inv = ftz::recip(absmax);
    let normalise = |x: T| ftz::flush(x.to_f32()) * inv;
    let pairs = block.chunks_exact(2);
    let odd = pairs.remainder().first().copied();
    for (pair, byte) in pairs.zip(out.iter_mut()) {
        *byte = (encode(normalise(pair[0])) << 4) | encode(normalise(pair[1]));
    }
    if let (Some(last), Some(byte)) = (odd, out.last_mut()) {
        // The kernel also encodes the zero padding that shares the last byte.
        *byte = (encode(normalise(last)) << 4) | encode(0.0 * inv);
    }
    absmax
}

/// Quantizes all blocks of `x` in parallel into `packed` and `absmax`.
fn quantize_blocks<T: Element, E: Fn(f32) -> u8 + Sync>(
    x: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    encode: E,
) {
    let blocks_per_task = (ELEMENTS_PER_TASK / blocksize).max(1);
    x.par_chunks(blocksize * blocks_per_task)
        .zip(packed.par_chunks_mut(blocksize / 2 * blocks_per_task))
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .for_each(|((xs, ps), ams)| {
            for ((block, out), am) in xs
                .chunks(blocksize)
                .zip(ps.chunks_mut(blocksize / 2))
                .zip(ams.iter_mut())
            {
                *am = quantize_block(block, out, block.len() < blocksize, &encode);
            }
        });
}

/// Quantizes a slice of any element type; parameters already checked.
fn quantize_elements<T: Element>(
    x: &[T],
    shape: &[usize],
    dtype: DType,
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Quantized4 {
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    match quant_type {
        QuantType::Nf4 => quantize_blocks(x, blocksize, &mut packed, &mut absmax, encode_nf4),
        QuantType::Fp4 => quantize_blocks(x, blocksize, &mut packed, &mut absmax, encode_fp4),
    }
    let absmax = if double_quant {
        Absmax::Double(DoubleQuant::quantize(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Quantized4 {
        packed,
        state: QuantState {
            quant_type,
            blocksize,
            shape: shape.to_vec(),
            dtype,
            absmax,
        },
    }
}

/// Checks the parameters shared by both quantize entry points; returns the element count.
fn check_quantize_args(
    shape: &[usize],
    dtype: DType,
    blocksize: usize,
    available: usize,
) -> Result<usize> {
    check_blocksize(blocksize, "blocksize")?;
    check_float_dtype(dtype, "quantize")?;
    let numel = checked_numel(shape)
        .ok_or_else(|| Error::invalid(format!("quantize: shape {shape:?} overflows")))?;
    if numel != available {
        return Err(Error::invalid(format!(
            "quantize: shape {shape:?} needs {numel} elements, the input has {available}"
        )));
    }
    if numel == 0 {
        return Err(Error::invalid(format!(
            "quantize: shape {shape:?} has no elements"
        )));
    }
    Ok(numel)
}

/// Quantizes a float tensor (F32, F16 or BF16, any shape) to 4 bits in blocks of
/// `blocksize` (a power of two in 64..=4096), optionally double-quantizing the absmax values.
/// Bit-identical to `bitsandbytes.functional.quantize_4bit` on CUDA (see the module docs of
/// [`crate::quant`] for the arithmetic and NaN/Inf).
pub fn quantize_4bit(
    x: TensorView,
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4> {
    check_float_dtype(x.dtype, "quantize")?;
    if x.bytes.len() % x.dtype.size() != 0 {
        return Err(Error::invalid(format!(
            "quantize: {} bytes are not a whole number of {} elements",
            x.bytes.len(),
            x.dtype
        )));
    }
    check_quantize_args(x.shape, x.dtype, blocksize, x.numel())?;
    let (shape, dtype) = (x.shape, x.dtype);
    let quantize = |elements: &[_]| {
        quantize_elements::<f32>(elements, shape, dtype, quant_type, blocksize, double_quant)
    };
    // Zero-copy when the bytes are aligned for their type; otherwise one converted copy.
    let aligned = match dtype {
        DType::F32 => bytemuck::try_cast_slice::<u8, f32>(x.bytes)
            .ok()
            .map(quantize),
        DType::BF16 => bytemuck::try_cast_slice::<u8, bf16>(x.bytes)
            .ok()
            .map(|s| quantize_elements(s, shape, dtype, quant_type, blocksize, double_quant)),
        DType::F16 => bytemuck::try_cast_slice::<u8, f16>(x.bytes)
            .ok()
            .map(|s| quantize_elements(s, shape, dtype, quant_type, blocksize, double_quant)),
        _ => None,
    };
    match aligned {
        Some(q) => Ok(q),
        None => Ok(quantize(&x.to_f32("quantize input")?)),
    }
}

/// Quantizes f32 values of a tensor of `shape` whose original dtype was `dtype` (recorded in
/// the state; the values are used as given). Same parameters and result as [`quantize_4bit`].
pub fn quantize_4bit_f32(
    x: &[f32],
    shape: &[usize],
    dtype: DType,
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4> {
    check_quantize_args(shape, dtype, blocksize, x.len())?;
    Ok(quantize_elements(
        x,
        shape,
        dtype,
        quant_type,
        blocksize,
        double_quant,
    ))
}

/// The 16 values of a block: `code * absmax` under flush-to-zero, as the kernel multiplies.
#[inline]
fn scaled_table(lut: &[f32; 16], absmax: f32) -> [f32; 16] {
    lut.map(|c| ftz::mul(c, absmax))
}

/// Dequantizes whole blocks: `out` holds the elements of `packed` (two a byte, high nibble
/// first) in blocks of `blocksize`, block `k` scaled by `absmax[k]`.
fn dequantize_blocks<O: Send>(
    packed: &[u8],
    absmax: &[f32],
    lut: &[f32; 16],
    blocksize: usize,
    out: &mut [O],
    convert: impl Fn(f32) -> O + Sync,
) {
    let blocks_per_task = (ELEMENTS_PER_TASK / blocksize).max(1);
    out.par_chunks_mut(blocksize * blocks_per_task)
        .zip(packed.par_chunks(blocksize / 2 * blocks_per_task))
        .zip(absmax.par_chunks(blocks_per_task))
        .for_each(|((os, ps), ams)| {
            for ((block, bytes), &am) in os
                .chunks_mut(blocksize)
                .zip(ps.chunks(blocksize / 2))
                .zip(ams)
            {
                dequantize_block(bytes, &scaled_table(lut, am), block, &convert);
            }
        });
}

/// One block: element `2j` from the high nibble of byte `j`, `2j + 1` from the low nibble.
#[inline]
fn dequantize_block<O>(bytes: &[u8], table: &[f32; 16], out: &mut [O], convert: impl Fn(f32) -> O) {
    let pairs = out.chunks_exact_mut(2);
    for (pair, &b) in pairs.zip(bytes) {
        pair[0] = convert(table[usize::from(b >> 4)]);
        pair[1] = convert(table[usize::from(b & 0x0f)]);
    }
    let half = out.len() / 2;
    if out.len() % 2 == 1 {
        if let (Some(last), Some(&b)) = (out.last_mut(), bytes.get(half)) {
            *last = convert(table[usize::from(b >> 4)]);
        }
    }
}

/// The validated per-block f32 scales of `state` for `packed`.
fn checked_scales(packed: &[u8], state: &QuantState) -> Result<Vec<f32>> {
    state.validate(packed.len())?;
    Ok(state.absmax_f32())
}

/// Dequantizes to f32 into `out` (`state.numel()` values), as `dequantize_4bit` computes
/// before rounding to the output dtype.
pub fn dequantize_4bit_f32(packed: &[u8], state: &QuantState, out: &mut [f32]) -> Result<()> {
    let scales = checked_scales(packed, state)?;
    if out.len() != state.numel() {
        return Err(Error::invalid(format!(
            "dequantize: output holds {} values, the tensor has {}",
            out.len(),
            state.numel()
        )));
    }
    let lut = dequant_lut(state.quant_type);
    dequantize_blocks(packed, &scales, lut, state.blocksize, out, |v| v);
    Ok(())
}

/// Dequantizes to `dtype` (F32, F16 or BF16; round to nearest even from f32), returning the
/// little-endian bytes. Bit-identical to `bitsandbytes.functional.dequantize_4bit` on CUDA
/// with that output dtype.
pub fn dequantize_4bit(packed: &[u8], state: &QuantState, dtype: DType) -> Result<Vec<u8>> {
    check_float_dtype(dtype, "dequantize output")?;
    let scales = checked_scales(packed, state)?;
    let lut = dequant_lut(state.quant_type);
    let numel = state.numel();
    let mut bytes = vec![0u8; numel * dtype.size()];
    match dtype {
        DType::BF16 => {
            let out: &mut [[u8; 2]] = bytemuck::cast_slice_mut(&mut bytes);
            dequantize_blocks(packed, &scales, lut, state.blocksize, out, |v| {
                bf16::from_f32(v).to_le_bytes()
            });
        }
        DType::F16 => {
            let out: &mut [[u8; 2]] = bytemuck::cast_slice_mut(&mut bytes);
            dequantize_blocks(packed, &scales, lut, state.blocksize, out, |v| {
                f16::from_f32(v).to_le_bytes()
            });
        }
        _ => {
            let out: &mut [[u8; 4]] = bytemuck::cast_slice_mut(&mut bytes);
            dequantize_blocks(packed, &scales, lut, state.blocksize, out, f32::to_le_bytes);
        }
    }
    Ok(bytes)
}

/// Dequantizes one block-aligned range of elements [start, start+len) into out: the
/// primitive the CPU matmul uses to dequantize on the fly. `absmax` holds the f32 scale of
/// every block of the tensor (see [`QuantState::absmax_f32`]) and `packed` all its codes.
///
/// # Panics
///
/// If `start` is not a multiple of `blocksize`, `blocksize` is odd or zero, or the range
/// reaches past `packed` or past the blocks `absmax` covers: the caller validates the state
/// once ([`QuantState::validate`]) and slices within it.
pub fn dequantize_range_f32(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    assert!(
        blocksize >= 2 && blocksize % 2 == 0 && start % blocksize == 0,
        "dequantize_range_f32: start {start} is not aligned to blocksize {blocksize}"
    );
    let end = start + out.len();
    assert!(
        end.div_ceil(2) <= packed.len() && end.div_ceil(blocksize) <= absmax.len(),
        "dequantize_range_f32: range {start}..{end} lies outside the tensor"
    );
    let lut = dequant_lut(quant_type);
    let bytes = &packed[start / 2..end.div_ceil(2)];
    let scales = &absmax[start / blocksize..];
    for ((block, codes), &am) in out
        .chunks_mut(blocksize)
        .zip(bytes.chunks(blocksize / 2))
        .zip(scales)
    {
        dequantize_block(codes, &scaled_table(lut, am), block, |v| v);
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use crate::quant::code_table;
    use crate::tensor::f32_to_bytes;

    /// A small deterministic generator (xorshift) of values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Half the widest gap between neighbouring values of the code table.
    fn half_widest_gap(q: QuantType) -> f32 {
        let mut code = *code_table(q);
        code.sort_by(f32::total_cmp);
        code.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
    }

    /// The literal `dQuantizeNF4` tree, the reference for the branch-free encoder.
    fn nf4_tree(x: f32) -> u8 {
        if x > 0.03979014977812767 {
            if x > 0.3893125355243683 {
                if x > 0.6427869200706482 {
                    if x > 0.8614784181118011 {
                        15
                    } else {
                        14
                    }
                } else if x > 0.5016634166240692 {
                    13
                } else {
                    12
                }
            } else if x > 0.2035212516784668 {
                if x > 0.2920137718319893 {
                    11
                } else {
                    10
                }
            } else if x > 0.1202552504837513 {
                9
            } else {
                8
            }
        } else if x > -0.33967943489551544 {
            if x > -0.13791173323988914 {
                if x > -0.045525018125772476 {
                    7
                } else {
                    6
                }
            } else if x > -0.23460740596055984 {
                5
            } else {
                4
            }
        } else if x > -0.6106329262256622 {
            if x > -0.4599952697753906 {
                3
            } else {
                2
            }
        } else if x > -0.8480964004993439 {
            1
        } else {
            0
        }
    }

    /// The literal `dQuantizeFP4` tree (without flush-to-zero).
    fn fp4_tree(x: f32) -> u8 {
        let sign = if x < 0.0 { 0b1000 } else { 0 };
        let x = x.abs();
        let code = if x > 0.29166667 {
            if x > 0.583333 {
                if x > 0.8333333 {
                    0b0011
                } else {
                    0b0010
                }
            } else if x > 0.4166667 {
                0b101
            } else {
                0b100
            }
        } else if x > 0.0859375 {
            if x > 0.20833333 {
                0b0111
            } else {
                0b0110
            }
        } else if x > 0.00260417 {
            0b0001
        } else {
            0
        };
        code + sign
    }

    #[test]
    fn encoders_agree_with_the_cuda_trees() {
        let mut x = -1.2f32;
        while x < 1.2 {
            assert_eq!(encode_nf4(x), nf4_tree(x), "nf4 {x}");
            assert_eq!(encode_fp4(x), fp4_tree(x), "fp4 {x}");
            x += 1.0e-5;
        }
        // Every threshold and its neighbours.
        for t in [
            0.03979014977812767f32,
            -0.8480964004993439,
            0.8614784181118011,
            0.00260417,
            0.8333333,
        ] {
            for v in [
                t,
                t.next_up(),
                t.next_down(),
                -t,
                (-t).next_up(),
                (-t).next_down(),
            ] {
                assert_eq!(encode_nf4(v), nf4_tree(v), "nf4 {v}");
                assert_eq!(encode_fp4(v), fp4_tree(v), "fp4 {v}");
            }
        }
        assert_eq!(encode_nf4(f32::NAN), nf4_tree(f32::NAN));
        assert_eq!(encode_fp4(f32::NAN), fp4_tree(f32::NAN));
    }

    #[test]
    fn round_trip_error_is_within_half_a_gap() {
        for q in [QuantType::Nf4, QuantType::Fp4] {
            for (n, bs) in [
                (64usize, 64usize),
                (63, 64),
                (1000, 128),
                (5000, 4096),
                (4097, 2048),
            ] {
                let x = values(n, n as u64 * 31 + bs as u64);
                let qz = quantize_4bit_f32(&x, &[n], DType::F32, q, bs, false).unwrap();
                let mut back = vec![0f32; n];
                dequantize_4bit_f32(&qz.packed, &qz.state, &mut back).unwrap();
                let scales = qz.state.absmax_f32();
                let bound = half_widest_gap(q);
                for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                    let limit = bound * scales[i / bs] * (1.0 + 1e-6);
                    assert!(
                        (a - b).abs() <= limit,
                        "{q} n {n} bs {bs} [{i}]: {a} -> {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn odd_sizes_pad_the_last_byte_like_bitsandbytes() {
        // 3 elements: the padding zero of the second byte is encoded as code(0) = 0b0111 (NF4).
        let q = quantize_4bit_f32(
            &[1.0, -1.0, 0.5],
            &[3],
            DType::F32,
            QuantType::Nf4,
            64,
            false,
        )
        .unwrap();
        assert_eq!(q.packed, vec![0xf0, 0xc7]);
        // An all-zero block: 0 * (1 / 0) is NaN, code 0 everywhere (padding included).
        let z = quantize_4bit_f32(&[0.0; 3], &[3], DType::F32, QuantType::Nf4, 64, false).unwrap();
        assert_eq!(z.packed, vec![0x00, 0x00]);
        assert_eq!(z.state.absmax, Absmax::Plain(vec![0.0]));
        let mut back = [1f32; 3];
        dequantize_4bit_f32(&z.packed, &z.state, &mut back).unwrap();
        assert!(back.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
    }

    #[test]
    fn nan_and_inf_follow_the_kernel_arithmetic() {
        let mut x = vec![0.5f32; 64];
        x[3] = f32::NAN;
        let q = quantize_4bit_f32(&x, &[64], DType::F32, QuantType::Nf4, 64, false).unwrap();
        assert_eq!(q.state.absmax, Absmax::Plain(vec![0.5]));
        assert_eq!(q.packed[1], 0xf0, "NaN gets code 0");
        let nan_block = quantize_4bit_f32(
            &[f32::NAN; 64],
            &[64],
            DType::F32,
            QuantType::Nf4,
            64,
            false,
        )
        .unwrap();
        assert_eq!(nan_block.state.absmax, Absmax::Plain(vec![-f32::MAX]));
        let mut back = vec![0f32; 64];
        dequantize_4bit_f32(&nan_block.packed, &nan_block.state, &mut back).unwrap();
        assert!(back.iter().all(|&v| v == f32::MAX));
        x[3] = f32::INFINITY;
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let q = quantize_4bit_f32(&x, &[64], DType::F32, qt, 64, dq).unwrap();
                dequantize_4bit_f32(&q.packed, &q.state, &mut back).unwrap();
                assert!(
                    back[0].is_nan(),
                    "{qt} {dq}: finite elements of an infinite block"
                );
            }
        }
    }

    #[test]
    fn subnormals_are_flushed_like_the_fast_math_build() {
        let tiny = f32::MIN_POSITIVE / 4.0;
        let mut x = vec![2.0 * f32::MIN_POSITIVE; 64];
        x[0] = tiny;
        x[1] = -tiny;
        let q = quantize_4bit_f32(&x, &[64], DType::F32, QuantType::Fp4, 64, false).unwrap();
        // Both tiny values are zero to the kernel: code 0 and no sign bit.
        assert_eq!(q.packed[0], 0x00);
        assert_eq!(q.packed[1], 0x33);
    }

    #[test]
    fn bad_parameters_are_errors() {
        let x = values(128, 1);
        let f = |shape: &[usize], dtype, bs| {
            quantize_4bit_f32(&x, shape, dtype, QuantType::Nf4, bs, false).is_err()
        };
        assert!(f(&[128], DType::F32, 32));
        assert!(f(&[128], DType::F32, 100));
        assert!(f(&[128], DType::F32, 8192));
        assert!(f(&[128], DType::I8, 64));
        assert!(f(&[127], DType::F32, 64));
        assert!(f(&[usize::MAX, 2], DType::F32, 64));
        assert!(quantize_4bit_f32(&[], &[0], DType::F32, QuantType::Nf4, 64, false).is_err());
        let bytes = f32_to_bytes(&x, DType::F32);
        let view = TensorView {
            dtype: DType::F32,
            shape: &[128],
            bytes: &bytes[..511],
        };
        assert!(quantize_4bit(view, QuantType::Nf4, 64, false).is_err());
        let q = quantize_4bit_f32(&x, &[128], DType::F32, QuantType::Nf4, 64, true).unwrap();
        assert!(dequantize_4bit(&q.packed[1..], &q.state, DType::F32).is_err());
        assert!(dequantize_4bit(&q.packed, &q.state, DType::I32).is_err());
        let mut short = vec![0f32; 127];
        assert!(dequantize_4bit_f32(&q.packed, &q.state, &mut short).is_err());
    }

    #[test]
    fn typed_inputs_and_outputs_agree_with_the_f32_path() {
        let x = values(1000, 7);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let bytes = f32_to_bytes(&x, dtype);
            // Misaligned copy too, to take the converting path.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let mut as_f32 = vec![0f32; x.len()];
            crate::tensor::bytes_to_f32(dtype, &bytes, &mut as_f32).unwrap();
            let reference =
                quantize_4bit_f32(&as_f32, &[10, 100], dtype, QuantType::Nf4, 64, true).unwrap();
            for b in [&bytes[..], &shifted[1..]] {
                let view = TensorView {
                    dtype,
                    shape: &[10, 100],
                    bytes: b,
                };
                assert_eq!(
                    quantize_4bit(view, QuantType::Nf4, 64, true).unwrap(),
                    reference
                );
            }
            let mut f = vec![0f32; x.len()];
            dequantize_4bit_f32(&reference.packed, &reference.state, &mut f).unwrap();
            let typed = dequantize_4bit(&reference.packed, &reference.state, dtype).unwrap();
            assert_eq!(typed, f32_to_bytes(&f, dtype));
        }
    }

    #[test]
    fn ranges_match_the_whole_tensor() {
        let n = 64 * 10 + 7;
        let x = values(n, 3);
        let q = quantize_4bit_f32(&x, &[n], DType::F32, QuantType::Fp4, 64, true).unwrap();
        let mut whole = vec![0f32; n];
        dequantize_4bit_f32(&q.packed, &q.state, &mut whole).unwrap();
        let scales = q.state.absmax_f32();
        for (start, len) in [(0, n), (128, 64), (192, 200), (640, 7), (576, 71)] {
            let mut part = vec![0f32; len];
            dequantize_range_f32(&q.packed, &scales, QuantType::Fp4, 64, start, &mut part);
            let expect = &whole[start..start + len];
            assert!(part
                .iter()
                .zip(expect)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
