//! Elementwise checks: `cuda::elementwise` (residual add, f32 -> bf16, transpose, dropout and
//! its backward, masks drawn from per-sequence keys, row gather and scatter, fills and copies) against plain host loops on the same
//! bf16-rounded inputs. Results that the GPU must reproduce exactly (moves and copies) have a
//! bound of 0; arithmetic ones the bf16 or f32 bound.

use super::harness::{bf16_to_f32, relative_error, Row, SplitMix64, BF16_BOUND, F32_BOUND};
use crate::backend::cpu::embedding_forward;
use crate::backend::cuda::elementwise::{
    copy_f32, copy_into_at, dropout_mask_from_keys, embedding_rows, gather_rows, masked_add,
    residual_add, scatter_rows, to_bf16, zero_bf16, zero_f32, RowIndex, TokenIds,
};
use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use crate::rng::dropout_keeps;
use half::bf16;

/// (rows, cols): odd shapes (partial transpose tiles), one row, and a large matrix.
const SHAPES: [(usize, usize); 3] = [(1, 77), (37, 101), (512, 1536)];

fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// 0 when equal, else 1: for results that must match exactly.
fn exact(a: &[f32], b: &[f32]) -> f64 {
    if a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()) {
        0.0
    } else {
        1.0
    }
}

/// Every elementwise kernel on every shape.
pub(super) fn checks(gpu: &CudaDevice, rng: &mut SplitMix64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(r, c) in &SHAPES {
        let n = r * c;
        let label = format!("{r}x{c}");
        let (x_bits, x) = rng.bf16s(n, -2.0, 2.0);
        let (y_bits, y) = rng.bf16s(n, -2.0, 2.0);
        let x_gpu = GpuBuffer::from_host(gpu, "x", &x_bits)?;
        let y_gpu = GpuBuffer::from_host(gpu, "y", &y_bits)?;
        let base = rng.f32s(n, -3.0, 3.0);

        // residual add: f32 += bf16, with the bf16 copy of the sum
        let mut acc = GpuBuffer::from_host(gpu, "residual", &base)?;
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "residual bf16", n)?;
        residual_add(gpu, &mut acc, &x_gpu, Some(&mut out))?;
        let want: Vec<f32> = base.iter().zip(&x).map(|(a, b)| a + b).collect();
        let want_b: Vec<f32> = want.iter().map(|&v| round_bf16(v)).collect();
        rows.push(Row::new(
            "residual add f32",
            &label,
            relative_error(&acc.to_host(gpu, "residual")?, &want),
            F32_BOUND,
        ));
        rows.push(Row::new(
            "residual add bf16 copy (exact)",
            &label,
            exact(&bf16_to_f32(&out.to_host(gpu, "residual bf16")?), &want_b),
            0.0,
        ));

        // f32 -> bf16 and the f32 copy
        let f = GpuBuffer::from_host(gpu, "f32 values", &base)?;
        to_bf16(gpu, &f, &mut out)?;
        let want_b: Vec<f32> = base.iter().map(|&v| round_bf16(v)).collect();
        rows.push(Row::new(
            "f32 -> bf16 (exact)",
            &label,
            exact(&bf16_to_f32(&out.to_host(gpu, "bf16")?), &want_b),
            0.0,
        ));
        let mut copy = GpuBuffer::<f32>::zeroed(gpu, "f32 copy", n)?;
        copy_f32(gpu, &f, &mut copy)?;
        rows.push(Row::new(
            "f32 copy (exact)",
            &label,
            exact(&copy.to_host(gpu, "f32 copy")?, &base),
            0.0,
        ));

        // the dropout's backward, p = 0.1
        let p = 0.1f32;
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<u8> = (0..n)
            .map(|_| u8::from(rng.uniform(0.0, 1.0) >= p))
            .collect();
        let mask_gpu = GpuBuffer::from_host(gpu, "mask", &mask)?;
        let mut dx = GpuBuffer::from_host(gpu, "dx", &x_bits)?;
        masked_add(gpu, &mut dx, &y_gpu, &mask_gpu, keep)?;
        let want_m: Vec<f32> = x
            .iter()
            .zip(&y)
            .zip(&mask)
            .map(|((&a, &b), &m)| if m == 1 { a + b * keep } else { a })
            .collect();
        rows.push(Row::new(
            "masked add bf16",
            &label,
            relative_error(&bf16_to_f32(&dx.to_host(gpu, "dx")?), &want_m),
            BF16_BOUND,
        ));

        // gather every other row (reversed), scatter it back into zeros
        let picked: Vec<usize> = (0..r).rev().step_by(2).collect();
        let index = RowIndex::upload(gpu, &picked, r)?;
        let mut gathered = GpuBuffer::<u16>::zeroed(gpu, "gathered", picked.len() * c)?;
        gather_rows(gpu, &x_gpu, &index, c, &mut gathered)?;
        let want_g: Vec<f32> = picked
            .iter()
            .flat_map(|&i| x[i * c..(i + 1) * c].iter().copied())
            .collect();
        rows.push(Row::new(
            "gather rows (exact)",
            &label,
            exact(&bf16_to_f32(&gathered.to_host(gpu, "gathered")?), &want_g),
            0.0,
        ));
        let mut scattered = GpuBuffer::from_host(gpu, "scattered", &y_bits)?;
        zero_bf16(gpu, &mut scattered)?;
        scatter_rows(gpu, &gathered, &index, c, &mut scattered)?;
        let mut want_s = vec![0.0f32; n];
        for &i in &picked {
            want_s[i * c..(i + 1) * c].copy_from_slice(&x[i * c..(i + 1) * c]);
        }
        rows.push(Row::new(
            "zero + scatter rows (exact)",
            &label,
            exact(&bf16_to_f32(&scattered.to_host(gpu, "scattered")?), &want_s),
            0.0,
        ));

        // embedding rows: the CPU's embedding_forward over ids that repeat and skip rows
        let table = rng.f32s(n, -1.0, 1.0);
        let ids: Vec<u32> = (0..2 * r + 1).map(|i| ((i * 7 + 3) % r) as u32).collect();
        let table_gpu = GpuBuffer::from_host(gpu, "embedding table", &table)?;
        let ids_gpu = TokenIds::upload(gpu, &ids, r)?;
        let mut embedded = GpuBuffer::<f32>::zeroed(gpu, "embeddings", ids.len() * c)?;
        embedding_rows(gpu, &table_gpu, &ids_gpu, c, &mut embedded)?;
        let mut want_e = vec![0.0f32; ids.len() * c];
        embedding_forward(&mut want_e, &table, &ids);
        rows.push(Row::new(
            "embedding rows (exact)",
            &label,
            exact(&embedded.to_host(gpu, "embeddings")?, &want_e),
            0.0,
        ));

        // copy into a larger buffer at an offset; zero an f32 buffer
        let mut big =
            GpuBuffer::from_host(gpu, "cache", &[y_bits.clone(), y_bits.clone()].concat())?;
        copy_into_at(gpu, &x_gpu, &mut big, n / 2)?;
        let mut want_c = [y.clone(), y.clone()].concat();
        want_c[n / 2..n / 2 + n].copy_from_slice(&x);
        rows.push(Row::new(
            "copy at offset (exact)",
            &label,
            exact(&bf16_to_f32(&big.to_host(gpu, "cache")?), &want_c),
            0.0,
        ));
        zero_f32(gpu, &mut acc)?;
        rows.push(Row::new(
            "zero f32 (exact)",
            &label,
            exact(&acc.to_host(gpu, "zeroed")?, &vec![0.0; n]),
            0.0,
        ));
    }
    // Bad indices and out-of-range copies are refused before any launch.
    let refused = [
        RowIndex::upload(gpu, &[0, 3], 3).is_err(),
        RowIndex::upload(gpu, &[1, 1], 3).is_err(),
        {
            let src = GpuBuffer::<u16>::zeroed(gpu, "src", 4)?;
            let mut dst = GpuBuffer::<u16>::zeroed(gpu, "dst", 6)?;
            copy_into_at(gpu, &src, &mut dst, 3).is_err()
        },
    ];
    rows.push(Row::new(
        "bad rows / copy refused",
        "-",
        if refused.iter().all(|&r| r) { 0.0 } else { 1.0 },
        0.0,
    ));
    // Runs of an odd length (16-byte groups shared by two runs, the last run partial), of a
    // multiple of 16 (every group one 16-byte store) and of a multiple of 8 but not 16 at p = 0.5.
    rows.push(dropout_keys_check(
        gpu,
        rng,
        37 * 101,
        3 * 37 * 101 - 5,
        0.1,
    )?);
    rows.push(dropout_keys_check(gpu, rng, 64 * 48, 3 * 64 * 48, 0.1)?);
    rows.push(dropout_keys_check(gpu, rng, 8 * 125, 3 * 8 * 125 - 3, 0.5)?);
    // Runs that start off a quad boundary (per_key odd): every element hashes its own quad.
    rows.push(dropout_keys_check(
        gpu,
        rng,
        5 * 7 * 11,
        3 * 5 * 7 * 11 - 2,
        0.05,
    )?);
    rows.push(dropout_keys_check(
        gpu,
        rng,
        4 * 33 + 2,
        3 * (4 * 33 + 2),
        1.0,
    )?);
    Ok(rows)
}

/// Dropout masks of `n` elements in runs of `per_key` (three sequences keyed separately) with
/// drop probability `p` against `rng::dropout_keeps` element by element: exact.
fn dropout_keys_check(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    per_key: usize,
    n: usize,
    p: f32,
) -> Result<Row> {
    // Two keys of another layer come first, as in a model's key table.
    let keys: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
    let keys_gpu = GpuBuffer::from_host(gpu, "dropout keys", &keys)?;
    let mut mask = GpuBuffer::<u8>::zeroed(gpu, "dropout mask", n)?;
    dropout_mask_from_keys(gpu, &mut mask, &keys_gpu, 2, per_key, p)?;
    let got = mask.to_host(gpu, "dropout mask")?;
    let same = got.iter().enumerate().all(|(i, &m)| {
        let keep = dropout_keeps(keys[2 + i / per_key], (i % per_key) as u64, p);
        m == u8::from(keep)
    });
    Ok(Row::new(
        "dropout mask from keys (exact)",
        &format!("{n} in runs of {per_key}, p {p}"),
        if same { 0.0 } else { 1.0 },
        0.0,
    ))
}
