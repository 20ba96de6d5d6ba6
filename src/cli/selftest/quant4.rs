//! The 4-bit checks: dequantize (to f32 and bf16) and the batch-1 GEMV, NF4 and FP4, plain and
//! double-quantized scales, against `quant::dequantize_4bit_f32`; and the managed-memory probes.

use super::harness::{
    bf16_to_f32, relative_error, Row, SplitMix64, Timing, BF16_BOUND, F32_BOUND, ROTATION_BYTES,
    TIMED_RUNS, WARMUP_RUNS,
};
use crate::backend::cuda::gemv_tiled::{tiled_gemv_fits, Tiled4bit, TILED_VARIANTS};
use crate::backend::cuda::{
    median_ms_per_launch, CudaDevice, Gpu4bit, GpuBuffer, Host4bit, HostAbsmax, ManagedBuffer,
};
use crate::error::Result;
use crate::quant::{
    code_table, dequantize_4bit_f32, dynamic_code_signed, Absmax, DoubleQuant, QuantState,
    QuantType,
};
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

/// bitsandbytes' nested blocksize for double quantization.
const NESTED_BLOCKSIZE: usize = 256;
/// (rows, cols, blocksize): single block, partial blocks and odd widths (scalar GEMV path),
/// rows that straddle blocks, a larger blocksize, SmolLM2's width (a half-empty last tile of the
/// tiled GEMV, rows not a multiple of its 8-row units), and the LLaMA-7B shapes.
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 64, 64),
    (3, 100, 64),
    (5, 33, 64),
    (7, 96, 128),
    (13, 576, 64),
    (44, 192, 128),
    (4096, 4096, 64),
    (11008, 4096, 64),
    (4096, 11008, 64),
];

/// Shapes with at least this many elements are also timed (NF4 only: FP4 runs the same code).
const TIMED_MIN_ELEMENTS: usize = 1 << 24;

/// Every 4-bit check (and, with `timed`, the timings of the large NF4 shapes).
pub(super) fn checks(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    timed: bool,
) -> Result<(Vec<Row>, Vec<Timing>)> {
    let (mut rows, mut timings) = (Vec::new(), Vec::new());
    for quant_type in [QuantType::Nf4, QuantType::Fp4] {
        for double_quant in [false, true] {
            for &shape in &SHAPES {
                let (checked, time) = check_4bit(gpu, rng, quant_type, double_quant, shape, timed)?;
                rows.extend(checked);
                timings.extend(time);
            }
        }
    }
    Ok((rows, timings))
}
/// Random 4-bit tensor of `rows x cols` (random codes and scales, never zero scales),
/// dequantized and multiplied by a random x on the GPU and by the CPU oracle.
fn check_4bit(
    gpu: &CudaDevice,
    rng: &mut SplitMix64,
    quant_type: QuantType,
    double_quant: bool,
    (rows, cols, blocksize): (usize, usize, usize),
    timing_wanted: bool,
) -> Result<(Vec<Row>, Vec<Timing>)> {
    let numel = rows * cols;
    let (name, timed) = match quant_type {
        QuantType::Nf4 => ("nf4", timing_wanted && numel >= TIMED_MIN_ELEMENTS),
        QuantType::Fp4 => ("fp4", false),
    };
    let kind = format!("{name}{}", if double_quant { "+dq" } else { "" });
    let random = Random4bit::new(rng, quant_type, double_quant, (rows, cols, blocksize));
    let x_bits: Vec<u16> = (0..cols)
        .map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0)).to_bits())
        .collect();

    // CPU oracle: dequantize, then y = W x in f64.
    let reference = random.dequantize()?;
    let x: Vec<f32> = x_bits
        .iter()
        .map(|&b| bf16::from_bits(b).to_f32())
        .collect();
    let y_reference: Vec<f32> = reference
        .par_chunks(cols)
        .map(|w| {
            w.iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>() as f32
        })
        .collect();

    let host = random.host();
    let weight = Gpu4bit::upload(gpu, "selftest weight", &host)?;

    let mut out_f32 = GpuBuffer::<f32>::zeroed(gpu, "dequantize output", numel)?;
    weight.dequantize_f32(gpu, &mut out_f32)?;
    let got_f32 = out_f32.to_host(gpu, "dequantize output")?;
    drop(out_f32);

    let mut out_bf16 = GpuBuffer::<u16>::zeroed(gpu, "dequantize output", numel)?;
    weight.dequantize_bf16(gpu, &mut out_bf16)?;
    let got_bf16 = bf16_to_f32(&out_bf16.to_host(gpu, "dequantize output")?);
    drop(out_bf16);

    let x_gpu = GpuBuffer::from_host(gpu, "gemv x", &x_bits)?;
    let mut y_gpu = GpuBuffer::<u16>::zeroed(gpu, "gemv y", rows)?;
    weight.gemv_bf16(gpu, (rows, cols), &x_gpu, &mut y_gpu)?;
    let got_y = bf16_to_f32(&y_gpu.to_host(gpu, "gemv y")?);

    let shape = format!("{rows}x{cols} b{blocksize}");
    let tiled = check_tiled(
        gpu,
        &weight,
        (rows, cols),
        &x_gpu,
        &y_reference,
        &kind,
        &shape,
    )?;
    let timings = if timed {
        time_4bit(gpu, &host, (rows, cols), &kind, &shape)?
    } else {
        Vec::new()
    };
    let checks = vec![
        Row {
            check: format!("dequant4 {kind} -> f32"),
            shape: shape.clone(),
            error: relative_error(&got_f32, &reference),
            bound: F32_BOUND,
        },
        Row {
            check: format!("dequant4 {kind} -> bf16"),
            shape: shape.clone(),
            error: relative_error(&got_bf16, &reference),
            bound: BF16_BOUND,
        },
        Row {
            check: format!("gemv4 {kind} bf16"),
            shape,
            error: relative_error(&got_y, &y_reference),
            bound: BF16_BOUND,
        },
    ];
    Ok((checks.into_iter().chain(tiled).collect(), timings))
}

/// Products under this many weights skip the tiled GEMV's check: like the tensor-core GEMV it
/// rounds the code table to bf16, which on one row of a few dozen terms with cancellation is a
/// large relative error (`Gpu4bit::prepare_tiled_gemv` skips products under 2^16 weights).
const TILED_CHECK_MIN_ELEMENTS: usize = 4096;

/// The tiled GEMV (every build) of `weight` against the CPU product, where the shape tiles.
fn check_tiled(
    gpu: &CudaDevice,
    weight: &Gpu4bit,
    (rows, cols): (usize, usize),
    x: &GpuBuffer<u16>,
    y_reference: &[f32],
    kind: &str,
    shape: &str,
) -> Result<Vec<Row>> {
    if rows * cols < TILED_CHECK_MIN_ELEMENTS || !tiled_gemv_fits(weight, (rows, cols)) {
        return Ok(Vec::new());
    }
    let tiled = Tiled4bit::pack(gpu, weight, (rows, cols))?;
    let mut checks = Vec::new();
    for variant in TILED_VARIANTS.into_iter().filter(|v| v.takes(cols)) {
        let mut y = GpuBuffer::<u16>::zeroed(gpu, "tiled gemv y", rows)?;
        tiled.gemv_bf16_with(gpu, variant, x, &mut y)?;
        let got = bf16_to_f32(&y.to_host(gpu, "tiled gemv y")?);
        checks.push(Row {
            check: format!("{} {kind}", variant.name.trim_end_matches("_bf16")),
            shape: shape.to_string(),
            error: relative_error(&got, y_reference),
            bound: BF16_BOUND,
        });
    }
    Ok(checks)
}

/// Median times of dequantize-to-bf16 and the GEMV on copies of `host` rotated so that
/// every run reads its weight from HBM, not L2.
/// Launches per timed run of the 4-bit kernels (each a few microseconds).
const LAUNCHES_PER_RUN: usize = 20;

fn time_4bit(
    gpu: &CudaDevice,
    host: &Host4bit<'_>,
    (rows, cols): (usize, usize),
    kind: &str,
    shape: &str,
) -> Result<Vec<Timing>> {
    let scale_bytes = match host.absmax {
        HostAbsmax::Plain(absmax) => 4 * absmax.len(),
        HostAbsmax::Double { codes, nested, .. } => codes.len() + 4 * nested.len() + 4 * 256,
    };
    let weight_bytes = host.packed.len() + scale_bytes + 4 * 16;
    let copies = ROTATION_BYTES.div_ceil(weight_bytes).clamp(1, 16);
    let weights = (0..copies)
        .map(|_| Gpu4bit::upload(gpu, "timed weight", host))
        .collect::<Result<Vec<_>>>()?;
    let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed dequantize output", host.numel)?;
    // Several launches per timed run: one launch alone would include the host's launch latency.
    let dequant_ms = median_ms_per_launch(gpu, WARMUP_RUNS, TIMED_RUNS, LAUNCHES_PER_RUN, |i| {
        weights[i % copies].dequantize_bf16(gpu, &mut out)
    })?;
    drop(out);
    let x = GpuBuffer::<u16>::from_host(gpu, "timed x", &vec![0x3F80; cols])?; // 1.0
    let mut y = GpuBuffer::<u16>::zeroed(gpu, "timed y", rows)?;
    let gemv_ms = median_ms_per_launch(gpu, WARMUP_RUNS, TIMED_RUNS, LAUNCHES_PER_RUN, |i| {
        weights[i % copies].gemv_bf16(gpu, (rows, cols), &x, &mut y)
    })?;
    Ok(vec![
        Timing {
            kernel: format!("dequant4 {kind} -> bf16"),
            shape: shape.to_string(),
            median_ms: dequant_ms,
            bytes: weight_bytes + 2 * host.numel,
            flops: 0.0,
        },
        Timing {
            kernel: format!("gemv4 {kind} bf16"),
            shape: shape.to_string(),
            median_ms: gemv_ms,
            bytes: weight_bytes + 2 * cols + 2 * rows,
            flops: 0.0,
        },
    ])
}

/// Managed memory: a request beyond the free memory is refused (checked before the driver
/// is asked, so nothing is allocated), and a 64 MiB buffer survives a round trip
/// host -> GPU -> host. Rows report 0 for success and 1 for failure against a bound of 0.
pub(super) fn check_managed(gpu: &CudaDevice) -> Result<Vec<Row>> {
    let (free, _) = gpu.memory_info()?;
    let refused = ManagedBuffer::<u8>::new(gpu, "oversized probe", free.saturating_add(1));
    let refusal = Row {
        check: "managed: refuses > free".into(),
        shape: format!("{} B", free.saturating_add(1)),
        error: if refused.is_err() { 0.0 } else { 1.0 },
        bound: 0.0,
    };
    drop(refused);

    let len = 16 << 20; // u32 elements: 64 MiB
    let mut buffer = ManagedBuffer::<u32>::new(gpu, "round-trip probe", len)?;
    for (i, v) in buffer.host_slice_mut(gpu)?.iter_mut().enumerate() {
        *v = (i as u32).wrapping_mul(2_654_435_761);
    }
    buffer.prefetch_to_device(gpu)?;
    buffer.prefetch_to_host(gpu)?;
    let intact = buffer
        .host_slice(gpu)?
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as u32).wrapping_mul(2_654_435_761));
    let round_trip = Row {
        check: "managed: prefetch round trip".into(),
        shape: "64 MiB".into(),
        error: if intact { 0.0 } else { 1.0 },
        bound: 0.0,
    };
    Ok(vec![refusal, round_trip])
}

/// A random 4-bit tensor (random codes, never-zero random scales) with its quantization state.
pub(super) struct Random4bit {
    packed: Vec<u8>,
    state: QuantState,
}

impl Random4bit {
    /// A `rows x cols` tensor of `quant_type` with plain or double-quantized scales.
    pub(super) fn new(
        rng: &mut SplitMix64,
        quant_type: QuantType,
        double_quant: bool,
        (rows, cols, blocksize): (usize, usize, usize),
    ) -> Self {
        let numel = rows * cols;
        let blocks = numel.div_ceil(blocksize);
        let packed = rng.bytes(numel.div_ceil(2));
        let absmax = if double_quant {
            Absmax::Double(DoubleQuant {
                codes: rng.bytes(blocks),
                nested_absmax: (0..blocks.div_ceil(NESTED_BLOCKSIZE))
                    .map(|_| rng.uniform(0.01, 0.5))
                    .collect(),
                offset: rng.uniform(0.1, 1.0),
                nested_blocksize: NESTED_BLOCKSIZE,
            })
        } else {
            Absmax::Plain((0..blocks).map(|_| rng.uniform(0.05, 2.0)).collect())
        };
        let state = QuantState {
            quant_type,
            blocksize,
            shape: vec![rows, cols],
            dtype: DType::BF16,
            absmax,
        };
        Random4bit { packed, state }
    }

    /// The CPU oracle's f32 values (`quant::dequantize_4bit_f32`).
    pub(super) fn dequantize(&self) -> Result<Vec<f32>> {
        let mut values = vec![0.0f32; self.state.shape.iter().product()];
        dequantize_4bit_f32(&self.packed, &self.state, &mut values)?;
        Ok(values)
    }

    /// The tensor as the GPU upload takes it.
    pub(super) fn host(&self) -> Host4bit<'_> {
        let absmax = match &self.state.absmax {
            Absmax::Plain(values) => HostAbsmax::Plain(values),
            Absmax::Double(dq) => HostAbsmax::Double {
                codes: &dq.codes,
                dynamic_map: dynamic_code_signed(),
                nested: &dq.nested_absmax,
                offset: dq.offset,
                nested_blocksize: dq.nested_blocksize,
            },
        };
        Host4bit {
            packed: &self.packed,
            code_table: code_table(self.state.quant_type),
            absmax,
            numel: self.state.shape.iter().product(),
            blocksize: self.state.blocksize,
        }
    }
}
