//! `sun bench <workload>`: timed micro-benchmarks of the engine's hot paths.

use super::bench_model::{bench_generate, bench_train};
use super::Args;
use crate::error::{Error, Result};
use crate::quant::{dequantize_4bit, quantize_4bit, QuantType};
use crate::rng::Rng;
use crate::tensor::{f32_to_bytes, DType, TensorView};
use std::time::Instant;

const HELP: &str = "\
sun bench: time the engine's hot paths

Usage: sun bench <workload> [options]

Workloads:
  quant      NF4 quantize with double quant, then dequantize to bf16 (CPU, all cores)
  generate   prefill a random prompt and decode greedily on a random-weight model
  train      QLoRA optimizer steps (NF4 base, LoRA on all seven linears) on random sequences
  kernels    every GPU kernel at a model's shapes against its bound (needs the cuda feature;
             sun bench kernels --help for its options: --shape (default 7b), --tokens (default
             4096), --lora-r, --no-double-quant, --json)

Options for generate and train:
  --shape S          smol (SmolLM2-135M), 1b (LLaMA-3.2-1B), 7b (LLaMA-7B) or a config.json
                     (default smol)
  --json             print one JSON object instead of text
generate:  --prompt-tokens N (default 128), --new-tokens N (default 64), --no-quant (f32 weights),
           --lora-r R (an unmerged adapter on all seven linears; default 0: none),
           --device cpu|cuda|auto (default cpu); on the GPU the line says whether decode
           steps used programmatic dependent launch (on from compute capability 9.0 unless
           SUN_NO_PDL=1)
train:     --seq-len N (default 256), --batch N (default 2), --steps N (default 2; the median
           step is reported), --lora-r R (default 64), --lora-dropout P (default 0.1),
           --no-gradient-checkpointing, --checkpoints host|gpu (where the layer inputs wait
           for the backward; default host: pinned memory), --tape-budget GIB (per GPU, keep
           the last layers' tapes that fit and skip their recompute; default 0: none),
           --no-paged-optimizer (AdamW
           moments in device memory), --device cpu|cuda|auto (default cpu), --nproc N (default 1: data parallel
           over NCCL, N ranks on GPUs 0..N-1 with --batch each, the tokens/s of all reported;
           needs --device cuda and libnccl.so.2)

Options for quant:
  --elements N      values to quantize (default 16777216)
  --blocksize B     4-bit blocksize, a power of two in 64..=4096 (default 64)
  --dtype D         input dtype: bf16 or f32 (default bf16)
  --runs R          timed runs after one warm-up; the median is reported (default 5)
  --json            print one JSON object instead of text
";

/// Values in a 7B model's linear layers: the figure the throughput is extrapolated to.
const SEVEN_B_LINEAR_VALUES: f64 = 6.5e9;

/// Runs `sun bench`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let workload = args.positional("workload (see sun bench --help)")?;
    match workload.to_str() {
        Some("quant") => bench_quant(args),
        Some("generate") => bench_generate(args),
        Some("train") => bench_train(args),
        Some("kernels") => super::bench_kernels::run(args),
        _ => Err(Error::invalid(format!(
            "unknown workload {workload:?}; see sun bench --help"
        ))),
    }
}

/// Median of the times of `runs` calls of `f` after one untimed warm-up, in seconds.
fn median_seconds(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn bench_quant(mut args: Args) -> Result<()> {
    let elements: usize = args.opt_or("--elements", 1 << 24)?;
    let blocksize: usize = args.opt_or("--blocksize", 64)?;
    let dtype_name: String = args.opt_or("--dtype", "bf16".to_string())?;
    let runs: usize = args.opt_or("--runs", 5)?;
    let json = args.flag("--json");
    args.finish()?;
    let dtype = match dtype_name.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => {
            return Err(Error::invalid(format!(
                "--dtype: {other:?} is not bf16 or f32"
            )))
        }
    };
    if elements == 0 || runs == 0 {
        return Err(Error::invalid("--elements and --runs must be positive"));
    }
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let values: Vec<f32> = (0..elements).map(|_| rng.normal() * 0.02).collect();
    let bytes = f32_to_bytes(&values, dtype);
    drop(values);
    let shape = [elements];
    let view = TensorView {
        dtype,
        shape: &shape,
        bytes: &bytes,
    };
    let mut quantized = quantize_4bit(view, QuantType::Nf4, blocksize, true)?;
    let quant_s = median_seconds(runs, || {
        quantized = quantize_4bit(view, QuantType::Nf4, blocksize, true)?;
        Ok(())
    })?;
    let dequant_s = median_seconds(runs, || {
        dequantize_4bit(&quantized.packed, &quantized.state, DType::BF16).map(drop)
    })?;
    let threads = rayon::current_num_threads();
    let quant_rate = elements as f64 / quant_s;
    let dequant_rate = elements as f64 / dequant_s;
    if json {
        let report = serde_json::json!({
            "workload": "quant",
            "elements": elements,
            "blocksize": blocksize,
            "input_dtype": dtype.name(),
            "threads": threads,
            "runs": runs,
            "quantize_seconds": quant_s,
            "quantize_elements_per_second": quant_rate,
            "quantize_7b_seconds": SEVEN_B_LINEAR_VALUES / quant_rate,
            "dequantize_bf16_seconds": dequant_s,
            "dequantize_elements_per_second": dequant_rate,
            "dequantize_7b_seconds": SEVEN_B_LINEAR_VALUES / dequant_rate,
        });
        println!("{report}");
    } else {
        println!(
            "quant: {elements} {} values, NF4 blocksize {blocksize}, {threads} threads, median of {runs}",
            dtype.name()
        );
        println!(
            "  quantize + double quant: {:>8.1} M values/s  ({:.3} s; 6.5e9 values: {:.1} s)",
            quant_rate / 1e6,
            quant_s,
            SEVEN_B_LINEAR_VALUES / quant_rate
        );
        println!(
            "  dequantize to bf16:      {:>8.1} M values/s  ({:.3} s; 6.5e9 values: {:.1} s)",
            dequant_rate / 1e6,
            dequant_s,
            SEVEN_B_LINEAR_VALUES / dequant_rate
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::new(list.iter().map(|s| s.into()).collect())
    }

    #[test]
    fn quant_workload_runs_and_bad_input_is_refused() {
        assert!(run(args(&[
            "quant",
            "--elements",
            "4099",
            "--runs",
            "1",
            "--json"
        ]))
        .is_ok());
        assert!(run(args(&[
            "quant",
            "--elements",
            "300",
            "--dtype",
            "f32",
            "--runs",
            "1"
        ]))
        .is_ok());
        assert!(run(args(&["gemm"])).is_err());
        assert!(run(args(&["quant", "--blocksize", "96"])).is_err());
        assert!(run(args(&["quant", "--dtype", "f16"])).is_err());
        assert!(run(args(&["quant", "--elements", "0"])).is_err());
        assert!(run(args(&["quant", "--bogus"])).is_err());
    }
}
