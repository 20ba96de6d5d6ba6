//! `sun selftest`: runs every GPU kernel on fresh random inputs, compares each result with the
//! CPU oracle (the `quant` module), prints a table and fails on any mismatch or NaN.

use super::Args;
use crate::device::{ComputeDevice, DeviceChoice};
use crate::error::{Error, Result};

const HELP: &str = "\
sun selftest: check the GPU kernels against the CPU reference

Usage: sun selftest [--device cuda] [--seed N]

Every kernel runs on several shapes (odd ones included) with fresh random inputs; each result is
compared with the CPU oracle as ||gpu - cpu|| / ||cpu|| against a bound (1e-5 for f32 output,
1e-2 for bf16 output). Prints one table row per check on stdout and exits non-zero if any check
fails or produces NaN.

Options:
  --device <auto|cuda>  the device to test [default: cuda]
  --seed <N>            seed of the random inputs [default: fresh each run; printed]
  --write-rcp-table F   measure the GPU's approximate reciprocal on every f32 mantissa into F
                        (how src/quant/rcp_approx.bin was made) and stop
  -h, --help            this text
";

/// Runs `sun selftest`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let choice: DeviceChoice = args.opt_or("--device", "cuda".to_string())?.parse()?;
    let seed: Option<u64> = args.opt("--seed")?;
    let rcp_table: Option<std::path::PathBuf> = args.opt("--write-rcp-table")?;
    args.finish()?;
    let device = crate::device::resolve(choice)?;
    match rcp_table {
        Some(path) => write_rcp_table(device, &path),
        None => check(device, seed),
    }
}

#[cfg(feature = "cuda")]
fn write_rcp_table(device: ComputeDevice, path: &std::path::Path) -> Result<()> {
    match device {
        ComputeDevice::Cpu => Err(nothing_to_compare()),
        ComputeDevice::Cuda(gpu) => {
            let table = crate::backend::cuda::measure_rcp_approx(&gpu)?;
            crate::fsutil::write_atomic(path, |w| {
                w.write_all(&table).map_err(|e| Error::io(path, e))
            })
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn write_rcp_table(_device: ComputeDevice, _path: &std::path::Path) -> Result<()> {
    Err(nothing_to_compare())
}

fn nothing_to_compare() -> Error {
    Error::invalid(
        "selftest compares the GPU kernels with the CPU reference; with --device cpu (or no \
         usable GPU) there is nothing to compare (`cargo test` checks the CPU code)",
    )
}

#[cfg(feature = "cuda")]
fn check(device: ComputeDevice, seed: Option<u64>) -> Result<()> {
    match device {
        ComputeDevice::Cpu => Err(nothing_to_compare()),
        ComputeDevice::Cuda(gpu) => gpu_checks::run(&gpu, seed),
    }
}

#[cfg(not(feature = "cuda"))]
fn check(_device: ComputeDevice, _seed: Option<u64>) -> Result<()> {
    Err(nothing_to_compare())
}

#[cfg(feature = "cuda")]
mod gpu_checks {
    //! The checks themselves: only in binaries built with the `cuda` feature.

    use crate::backend::cuda::{
        median_ms, CudaDevice, Gpu4bit, GpuBuffer, Host4bit, HostAbsmax, ManagedBuffer,
    };
    use crate::error::{Error, Result};
    use crate::quant::{
        code_table, dequantize_4bit_f32, dynamic_code_signed, Absmax, DoubleQuant, QuantState,
        QuantType,
    };
    use crate::tensor::DType;
    use half::bf16;
    use rayon::prelude::*;

    const F32_BOUND: f64 = 1e-5;
    const BF16_BOUND: f64 = 1e-2;
    /// bitsandbytes' nested blocksize for double quantization.
    const NESTED_BLOCKSIZE: usize = 256;
    /// (rows, cols, blocksize): single block, partial blocks and odd widths (scalar GEMV path),
    /// rows that straddle blocks, a larger blocksize, and the LLaMA-7B shapes.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 64, 64),
        (3, 100, 64),
        (5, 33, 64),
        (7, 96, 128),
        (4096, 4096, 64),
        (11008, 4096, 64),
        (4096, 11008, 64),
    ];

    /// Shapes with at least this many elements are also timed (NF4 only: FP4 runs the same code).
    const TIMED_MIN_ELEMENTS: usize = 1 << 24;
    /// Timed inputs are rotated through copies totalling at least this many bytes, well over the
    /// H200's 60 MB L2, so each run reads its weight from HBM.
    const ROTATION_BYTES: usize = 150 << 20;
    const WARMUP_RUNS: usize = 5;
    const TIMED_RUNS: usize = 50;

    struct Timing {
        kernel: String,
        shape: String,
        median_ms: f64,
        /// Bytes the kernel must move at least once (weights, scales, input, output).
        bytes: usize,
    }

    struct Row {
        check: String,
        shape: String,
        error: f64,
        bound: f64,
    }

    impl Row {
        fn passed(&self) -> bool {
            self.error.is_finite() && self.error <= self.bound
        }
    }

    pub(super) fn run(gpu: &CudaDevice, seed: Option<u64>) -> Result<()> {
        let seed = seed.unwrap_or_else(fresh_seed);
        let (free, total) = gpu.memory_info()?;
        let (major, minor) = gpu.compute_capability();
        eprintln!(
            "selftest on {} (sm_{major}{minor}, {} SMs, {} of {} MiB free), seed {seed} \
             (rerun with --seed {seed})",
            gpu.name(),
            gpu.sm_count(),
            free >> 20,
            total >> 20
        );
        let mut rng = SplitMix64(seed);
        let (mut rows, mut timings) = (Vec::new(), Vec::new());
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            for double_quant in [false, true] {
                for &shape in &SHAPES {
                    let (checked, timed) =
                        check_4bit(gpu, &mut rng, quant_type, double_quant, shape)?;
                    rows.extend(checked);
                    timings.extend(timed);
                }
            }
        }
        rows.extend(check_managed(gpu)?);
        print_table(&rows);
        print_timings(&timings);
        let failed = rows.iter().filter(|r| !r.passed()).count();
        if failed > 0 {
            return Err(Error::Device(format!(
                "selftest: {failed} of {} checks failed (seed {seed})",
                rows.len()
            )));
        }
        println!("all {} checks passed", rows.len());
        Ok(())
    }

    /// Random 4-bit tensor of `rows x cols` (random codes and scales, never zero scales),
    /// dequantized and multiplied by a random x on the GPU and by the CPU oracle.
    fn check_4bit(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        quant_type: QuantType,
        double_quant: bool,
        (rows, cols, blocksize): (usize, usize, usize),
    ) -> Result<(Vec<Row>, Vec<Timing>)> {
        let numel = rows * cols;
        let blocks = numel.div_ceil(blocksize);
        let (name, timed) = match quant_type {
            QuantType::Nf4 => ("nf4", numel >= TIMED_MIN_ELEMENTS),
            QuantType::Fp4 => ("fp4", false),
        };
        let kind = format!("{name}{}", if double_quant { "+dq" } else { "" });
        let table: &[f32; 16] = code_table(quant_type)[..]
            .try_into()
            .map_err(|_| Error::invalid("quant::code_table has not 16 entries"))?;
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
        let x_bits: Vec<u16> = (0..cols)
            .map(|_| bf16::from_f32(rng.uniform(-1.0, 1.0)).to_bits())
            .collect();

        // CPU oracle: dequantize, then y = W x in f64.
        let mut reference = vec![0.0f32; numel];
        dequantize_4bit_f32(&packed, &state, &mut reference)?;
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

        let dynamic_map: &[f32; 256] = dynamic_code_signed()[..]
            .try_into()
            .map_err(|_| Error::invalid("quant::dynamic_code_signed has not 256 entries"))?;
        let host_absmax = match &state.absmax {
            Absmax::Plain(values) => HostAbsmax::Plain(values),
            Absmax::Double(dq) => HostAbsmax::Double {
                codes: &dq.codes,
                dynamic_map,
                nested: &dq.nested_absmax,
                offset: dq.offset,
                nested_blocksize: dq.nested_blocksize,
            },
        };
        let host = Host4bit {
            packed: &packed,
            code_table: table,
            absmax: host_absmax,
            numel,
            blocksize,
        };
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
        Ok((checks, timings))
    }

    /// Median times of dequantize-to-bf16 and the GEMV on copies of `host` rotated so that
    /// every run reads its weight from HBM, not L2.
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
        let dequant_ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
            weights[i % copies].dequantize_bf16(gpu, &mut out)
        })?;
        drop(out);
        let x = GpuBuffer::<u16>::from_host(gpu, "timed x", &vec![0x3F80; cols])?; // 1.0
        let mut y = GpuBuffer::<u16>::zeroed(gpu, "timed y", rows)?;
        let gemv_ms = median_ms(gpu, WARMUP_RUNS, TIMED_RUNS, |i| {
            weights[i % copies].gemv_bf16(gpu, (rows, cols), &x, &mut y)
        })?;
        Ok(vec![
            Timing {
                kernel: format!("dequant4 {kind} -> bf16"),
                shape: shape.to_string(),
                median_ms: dequant_ms,
                bytes: weight_bytes + 2 * host.numel,
            },
            Timing {
                kernel: format!("gemv4 {kind} bf16"),
                shape: shape.to_string(),
                median_ms: gemv_ms,
                bytes: weight_bytes + 2 * cols + 2 * rows,
            },
        ])
    }

    /// Managed memory: a request beyond the free memory is refused (checked before the driver
    /// is asked, so nothing is allocated), and a 64 MiB buffer survives a round trip
    /// host -> GPU -> host. Rows report 0 for success and 1 for failure against a bound of 0.
    fn check_managed(gpu: &CudaDevice) -> Result<Vec<Row>> {
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

    /// A seed that differs between runs: the clock mixed with the process id.
    fn fresh_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 32)
    }

    /// ||a - b||_2 / ||b||_2 in f64; NaN when either side has a NaN or `b` is all zeros.
    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        if a.len() != b.len() {
            return f64::NAN;
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let d = f64::from(x) - f64::from(y);
            diff += d * d;
            norm += f64::from(y) * f64::from(y);
        }
        if norm == 0.0 || !norm.is_finite() {
            return f64::NAN;
        }
        (diff / norm).sqrt()
    }

    /// SplitMix64: a small, well-mixed generator for test inputs (not for anything secret).
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [lo, hi).
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * unit
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| (self.next_u64() >> 56) as u8).collect()
        }
    }

    fn bf16_to_f32(bits: &[u16]) -> Vec<f32> {
        bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
    }

    fn print_table(rows: &[Row]) {
        println!(
            "{:<30} {:<22} {:>10} {:>8}  result",
            "check", "shape", "rel err", "bound"
        );
        for row in rows {
            println!(
                "{:<30} {:<22} {:>10.3e} {:>8.0e}  {}",
                row.check,
                row.shape,
                row.error,
                row.bound,
                if row.passed() { "pass" } else { "FAIL" }
            );
        }
    }

    fn print_timings(timings: &[Timing]) {
        if timings.is_empty() {
            return;
        }
        println!();
        println!(
            "{:<30} {:<22} {:>10} {:>10} {:>9}",
            format!("timed (median of {TIMED_RUNS})"),
            "shape",
            "ms",
            "MB moved",
            "GB/s"
        );
        for t in timings {
            println!(
                "{:<30} {:<22} {:>10.4} {:>10.1} {:>9.0}",
                t.kernel,
                t.shape,
                t.median_ms,
                t.bytes as f64 / 1e6,
                t.bytes as f64 / (t.median_ms * 1e6)
            );
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn relative_error_is_the_l2_ratio_and_nan_never_passes() {
            let reference = [3.0f32, 4.0];
            assert_eq!(relative_error(&reference, &reference), 0.0);
            // ||(0.3, 0.4)|| / ||(3, 4)|| = 0.5 / 5
            let err = relative_error(&[3.3, 4.4], &reference);
            assert!((err - 0.1).abs() < 1e-6, "{err}");
            assert!(relative_error(&[f32::NAN, 4.0], &reference).is_nan());
            assert!(relative_error(&[0.0, 0.0], &[0.0, 0.0]).is_nan());
            assert!(relative_error(&[1.0], &reference).is_nan());
        }

        #[test]
        fn splitmix_matches_the_published_sequence() {
            // SplitMix64 seeded with 1234567, as Vigna's splitmix64.c computes it.
            let mut rng = SplitMix64(1234567);
            assert_eq!(rng.next_u64(), 6457827717110365317);
            assert_eq!(rng.next_u64(), 3203168211198807973);
        }

        #[test]
        fn uniform_stays_in_range_and_varies() {
            let mut rng = SplitMix64(7);
            let values: Vec<f32> = (0..1000).map(|_| rng.uniform(-1.0, 1.0)).collect();
            assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
            assert!(values.iter().any(|&v| v < -0.9) && values.iter().any(|&v| v > 0.9));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_has_nothing_to_selftest() {
        let args = Args::new(vec!["--device".into(), "cpu".into()]);
        let msg = run(args).unwrap_err().to_string();
        assert!(msg.contains("nothing to compare"), "{msg}");
    }
}
