//! Dequantization of ggml blocks to f32, exactly as ggml-quants.c's `dequantize_row_*` do.
//!
//! Block layouts (little-endian, `d`/`m` are f16):
//! - Q4_0 (32 elements, 18 bytes): `d`, 16 bytes of nibbles; element `j < 16` is the low nibble
//!   of byte `j`, element `j + 16` its high nibble; `y = (q - 8) * d`.
//! - Q4_1 (32 elements, 20 bytes): `d`, `m`, 16 bytes of nibbles as Q4_0; `y = q * d + m`.
//! - Q8_0 (32 elements, 34 bytes): `d`, 32 `i8`; `y = q * d`.

use super::GgmlType;
use crate::error::{Error, Result};
use crate::tensor::{bytes_to_f32, DType};
use half::f16;
use rayon::prelude::*;

/// Blocks handed to one rayon task.
const BLOCKS_PER_TASK: usize = 4096;

/// True for the types [`dequantize`] implements.
pub fn can_dequantize(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q8_0
    )
}

/// Dequantizes `bytes` of type `ty` into `out` (one f32 per element). `what` names the tensor
/// in errors. Fails when the type is not implemented or the byte count does not match
/// `out.len()` elements of `ty`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32], what: &str) -> Result<()> {
    if ty.bytes_for(out.len()) != Some(bytes.len()) {
        return Err(Error::invalid(format!(
            "{what}: {} bytes of {ty} do not hold {} elements",
            bytes.len(),
            out.len()
        )));
    }
    match ty {
        GgmlType::F32 => plain(DType::F32, bytes, out),
        GgmlType::F16 => plain(DType::F16, bytes, out),
        GgmlType::BF16 => plain(DType::BF16, bytes, out),
        GgmlType::Q4_0 => blocks(ty, bytes, out, q4_0_block),
        GgmlType::Q4_1 => blocks(ty, bytes, out, q4_1_block),
        GgmlType::Q8_0 => blocks(ty, bytes, out, q8_0_block),
        other => {
            return Err(Error::unsupported(format!(
                "{what}: dequantizing ggml type {other} is not implemented \
                 (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"
            )))
        }
    }
    Ok(())
}

fn plain(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    bytes_to_f32(dtype, bytes, out).expect("F32, F16 and BF16 are float dtypes");
}

/// Runs `block_fn` over every block, in parallel. Lengths were checked by the caller.
fn blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32], block_fn: fn(&[u8], &mut [f32])) {
    let (elems, size) = (ty.block_size(), ty.block_bytes());
    out.par_chunks_mut(elems * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(size * BLOCKS_PER_TASK))
        .for_each(|(o, b)| {
            for (ob, bb) in o.chunks_exact_mut(elems).zip(b.chunks_exact(size)) {
                block_fn(bb, ob);
            }
        });
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One Q4_0 block: 18 bytes -> 32 values.
fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// One Q4_1 block: 20 bytes -> 32 values.
fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// One Q8_0 block: 34 bytes -> 32 values.
fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (x, &q) in y.iter_mut().zip(&b[2..34]) {
        *x = q as i8 as f32 * d;
    }
}
