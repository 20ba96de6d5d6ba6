//! `sun selftest`: runs every GPU kernel on fresh random inputs, compares each result with the
//! CPU oracle (the `quant` module, the CPU backend, the optimizer), prints a table and fails on
//! any mismatch or NaN, then times the hot kernels.
//!
//! One file per kernel family, each exposing `checks(...) -> Result<Vec<Row>>` (and `timings`
//! where it times something); this file holds the command, the shared harness (rows, timings,
//! relative error, random inputs) and the tables.

use super::Args;
use crate::device::{ComputeDevice, DeviceChoice};
use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
mod adamw;
#[cfg(feature = "cuda")]
mod adamw_multi;
#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod decode;
#[cfg(feature = "cuda")]
mod decode_attention;
#[cfg(feature = "cuda")]
mod elementwise;
#[cfg(feature = "cuda")]
mod gemm_sm90;
#[cfg(feature = "cuda")]
mod gemv;
#[cfg(feature = "cuda")]
mod lora;
#[cfg(feature = "cuda")]
mod matmul;
#[cfg(feature = "cuda")]
mod model;
#[cfg(feature = "cuda")]
mod norm;
#[cfg(feature = "cuda")]
mod quant4;
#[cfg(feature = "cuda")]
mod rope;
#[cfg(feature = "cuda")]
mod split;
#[cfg(feature = "cuda")]
mod swiglu;
#[cfg(feature = "cuda")]
mod xent;

const HELP: &str = "\
sun selftest: check the GPU kernels against the CPU reference

Usage: sun selftest [--device cuda] [--seed N] [--no-timings]

Every kernel runs on several shapes (odd ones included) with fresh random inputs; each result is
compared with the CPU oracle as ||gpu - cpu|| / ||cpu|| against a bound (1e-5 for f32 output,
1e-2 for bf16 output). Prints one table row per check on stdout and exits non-zero if any check
fails or produces NaN. Then times the hot kernels (4-bit dequantize and GEMV, the matmuls and
attention at LLaMA-7B shapes). The model family runs the GPU model path (logits, decode,
losses, LoRA gradients with and without dropout) against the CPU model on random NF4 models;
the split family runs a model with its layers split over GPUs (two when visible) against the
same model on one.

Options:
  --device <auto|cuda>  the device to test [default: cuda]
  --seed <N>            seed of the random inputs [default: fresh each run; printed]
  --no-timings          checks only, no timings [default: timings on]
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
    let timed = !args.flag("--no-timings");
    let rcp_table: Option<std::path::PathBuf> = args.opt("--write-rcp-table")?;
    args.finish()?;
    let device = crate::device::resolve(choice)?;
    match rcp_table {
        Some(path) => write_rcp_table(device, &path),
        None => check(device, seed, timed),
    }
}

#[cfg(feature = "cuda")]
fn write_rcp_table(device: ComputeDevice, path: &std::path::Path) -> Result<()> {
    match device {
        ComputeDevice::Cpu => Err(nothing_to_compare()),
        ComputeDevice::Cuda(gpu) => {
            let table = crate::backend::cuda::measure_rcp_approx(gpu.primary())?;
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
fn check(device: ComputeDevice, seed: Option<u64>, timed: bool) -> Result<()> {
    match device {
        ComputeDevice::Cpu => Err(nothing_to_compare()),
        ComputeDevice::Cuda(gpu) => harness::run(gpu.primary(), seed, timed),
    }
}

#[cfg(not(feature = "cuda"))]
fn check(_device: ComputeDevice, _seed: Option<u64>, _timed: bool) -> Result<()> {
    Err(nothing_to_compare())
}

#[cfg(feature = "cuda")]
pub(in crate::cli) mod harness {
    //! The shared pieces of every check (and of `sun bench kernels`, which times with the same
    //! rotation and run counts): only in binaries built with the `cuda` feature.

    use crate::backend::cuda::CudaDevice;
    use crate::error::{Error, Result};
    use half::bf16;

    /// Bound on the relative error of f32 results.
    pub(in crate::cli) const F32_BOUND: f64 = 1e-5;
    /// Bound on the relative error of bf16 results.
    pub(in crate::cli) const BF16_BOUND: f64 = 1e-2;
    /// Timed inputs are rotated through copies totalling at least this many bytes, well over the
    /// H200's 60 MB L2, so each run reads its operands from HBM.
    pub(in crate::cli) const ROTATION_BYTES: usize = 150 << 20;
    pub(in crate::cli) const WARMUP_RUNS: usize = 5;
    pub(in crate::cli) const TIMED_RUNS: usize = 50;

    /// One timed kernel: its median time and the work it must do at least.
    pub(in crate::cli) struct Timing {
        pub(in crate::cli) kernel: String,
        pub(in crate::cli) shape: String,
        pub(in crate::cli) median_ms: f64,
        /// Bytes the kernel must move at least once (weights, scales, input, output).
        pub(in crate::cli) bytes: usize,
        /// Floating-point operations (2 per multiply-add); 0 for memory-bound kernels, which
        /// are reported in GB/s instead.
        pub(in crate::cli) flops: f64,
    }

    /// One check: a kernel's relative error against the CPU oracle, and its bound.
    pub(in crate::cli) struct Row {
        pub(in crate::cli) check: String,
        pub(in crate::cli) shape: String,
        pub(in crate::cli) error: f64,
        pub(in crate::cli) bound: f64,
    }

    impl Row {
        pub(in crate::cli) fn new(
            check: impl Into<String>,
            shape: &str,
            error: f64,
            bound: f64,
        ) -> Self {
            Row {
                check: check.into(),
                shape: shape.to_string(),
                error,
                bound,
            }
        }

        fn passed(&self) -> bool {
            self.error.is_finite() && self.error <= self.bound
        }
    }

    pub(in crate::cli) fn run(gpu: &CudaDevice, seed: Option<u64>, timed: bool) -> Result<()> {
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
        let mut rows = Vec::new();
        let mut timings = Vec::new();
        // A family that errors (a failed launch, a kernel fault) becomes a failed row, and the
        // others still run and report: one run on the GPU machine shows everything.
        let mut family = |name: &str, result: Result<(Vec<Row>, Vec<Timing>)>| match result {
            Ok((checked, timed)) => {
                eprintln!("{name}: {} checks", checked.len());
                rows.extend(checked);
                timings.extend(timed);
            }
            Err(e) => {
                eprintln!("{name}: error: {e}");
                rows.push(Row::new(
                    format!("{name}: error (see stderr)"),
                    "-",
                    f64::NAN,
                    0.0,
                ));
            }
        };
        let checks_only = |result: Result<Vec<Row>>| result.map(|rows| (rows, Vec::new()));
        family("4-bit", super::quant4::checks(gpu, &mut rng, timed));
        family("managed", checks_only(super::quant4::check_managed(gpu)));
        family("rmsnorm", checks_only(super::norm::checks(gpu, &mut rng)));
        family("rope", checks_only(super::rope::checks(gpu, &mut rng)));
        family("swiglu", checks_only(super::swiglu::checks(gpu, &mut rng)));
        family("adamw", checks_only(super::adamw::checks(gpu, &mut rng)));
        family(
            "adamw multi-tensor",
            checks_only(super::adamw_multi::checks(gpu, &mut rng)),
        );
        family("xent", checks_only(super::xent::checks(gpu, &mut rng)));
        family("matmul", checks_only(super::matmul::checks(gpu, &mut rng)));
        family(
            "matmul sm90",
            checks_only(super::matmul::sm90_checks(gpu, &mut rng)),
        );
        family(
            "gemm sm90",
            checks_only(super::gemm_sm90::checks(gpu, &mut rng)),
        );
        family("gemv", checks_only(super::gemv::checks(gpu, &mut rng)));
        family("lora", checks_only(super::lora::checks(gpu, &mut rng)));
        family("decode", checks_only(super::decode::checks(gpu, &mut rng)));
        family(
            "attention",
            checks_only(super::attention::checks(gpu, &mut rng)),
        );
        family(
            "decode attention",
            checks_only(super::decode_attention::checks(gpu, &mut rng)),
        );
        family(
            "elementwise",
            checks_only(super::elementwise::checks(gpu, &mut rng)),
        );
        family("model", checks_only(super::model::checks(gpu, &mut rng)));
        family("split", checks_only(super::split::checks(gpu, &mut rng)));
        if timed {
            let no_rows = |result: Result<Vec<Timing>>| result.map(|t| (Vec::new(), t));
            family(
                "matmul timings",
                no_rows(super::matmul::timings(gpu, &mut rng)),
            );
            family(
                "attention timings",
                no_rows(super::attention::timings(gpu, &mut rng)),
            );
        }
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

    /// A seed that differs between runs: the clock mixed with the process id.
    fn fresh_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 32)
    }

    /// ||a - b||_2 / ||b||_2 in f64; NaN when either side has a NaN or `b` is all zeros.
    pub(in crate::cli) fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        if a.len() != b.len() {
            return f64::NAN;
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let d = f64::from(x) - f64::from(y);
            diff += d * d;
            norm += f64::from(y) * f64::from(y);
        }
        if !norm.is_finite() {
            return f64::NAN;
        }
        if norm == 0.0 {
            // An exactly zero reference (e.g. attention gradients of a one-token sequence, where
            // the softmax is constant): the absolute error; NaN still propagates.
            return diff.sqrt();
        }
        (diff / norm).sqrt()
    }

    /// SplitMix64: a small, well-mixed generator for test inputs (not for anything secret).
    pub(in crate::cli) struct SplitMix64(pub(in crate::cli) u64);

    impl SplitMix64 {
        pub(in crate::cli) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [lo, hi).
        pub(in crate::cli) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * unit
        }

        pub(in crate::cli) fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| (self.next_u64() >> 56) as u8).collect()
        }

        /// `len` uniform values in [lo, hi) as f32.
        pub(in crate::cli) fn f32s(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..len).map(|_| self.uniform(lo, hi)).collect()
        }

        /// `len` uniform values in [lo, hi) rounded to bf16: (bits for the GPU, the same values
        /// as f32 for the CPU oracle).
        pub(in crate::cli) fn bf16s(
            &mut self,
            len: usize,
            lo: f32,
            hi: f32,
        ) -> (Vec<u16>, Vec<f32>) {
            let bits: Vec<u16> = (0..len)
                .map(|_| bf16::from_f32(self.uniform(lo, hi)).to_bits())
                .collect();
            let values = bf16_to_f32(&bits);
            (bits, values)
        }

        /// Uniform in `0..n` (n > 0).
        pub(in crate::cli) fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub(in crate::cli) fn bf16_to_f32(bits: &[u16]) -> Vec<f32> {
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
        let (memory, compute): (Vec<&Timing>, Vec<&Timing>) =
            timings.iter().partition(|t| t.flops == 0.0);
        if !memory.is_empty() {
            println!();
            println!(
                "{:<30} {:<22} {:>10} {:>10} {:>9}",
                format!("timed (median of {TIMED_RUNS})"),
                "shape",
                "ms",
                "MB moved",
                "GB/s"
            );
            for t in memory {
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
        if !compute.is_empty() {
            println!();
            println!(
                "{:<30} {:<22} {:>10} {:>10} {:>9}",
                format!("timed (median of {TIMED_RUNS})"),
                "shape",
                "ms",
                "GFLOP",
                "TFLOP/s"
            );
            for t in compute {
                println!(
                    "{:<30} {:<22} {:>10.4} {:>10.1} {:>9.1}",
                    t.kernel,
                    t.shape,
                    t.median_ms,
                    t.flops / 1e9,
                    t.flops / (t.median_ms * 1e9)
                );
            }
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
            assert_eq!(relative_error(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
            assert_eq!(relative_error(&[0.0, 0.5], &[0.0, 0.0]), 0.5);
            assert!(relative_error(&[f32::NAN, 0.0], &[0.0, 0.0]).is_nan());
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
