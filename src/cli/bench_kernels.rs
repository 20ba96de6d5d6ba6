//! `sun bench kernels`: every GPU kernel of a QLoRA step and of decoding, timed at a model's
//! shapes, each beside the least time its bytes or FLOPs allow on an H200.
//!
//! Per distinct linear of the shape (q/k/v/o/gate/up/down, deduplicated by size): the batch-1
//! 4-bit GEMV, the batch-1 LoRA products through the dense GEMV, the dequantize to bf16, the
//! training matmul forward `X Wᵀ` and its `dY W`, the adapter's training products (z, dz, dB,
//! dA and the input gradient's term, with a dropout mask, and that mask drawn from sequence keys),
//! the sm90 GEMM alone on a bf16 W both ways (`X Wᵀ`, and `dY W` reading W as stored);
//! the lm_head's batch-1 GEMV and the loss head's input gradient `dlogits · W_lm` on the sm90
//! GEMM (W_lm as stored, and transposed for comparison). At the
//! given token count: RMSNorm, RoPE, SwiGLU and causal attention (forward and backward; also at
//! the training shapes 16 x 512 and 2 x 2048), a decode step's fused attention against caches
//! of 160 to 8192 keys, the cross-entropy over the vocabulary, and AdamW
//! over one layer's LoRA parameters. Timing is the
//! selftest's: CUDA events, the median of its run count after its warm-ups, bandwidth-bound
//! inputs rotated through copies larger than the L2 cache, several launches per timed run for
//! kernels of a few microseconds, each run one replay of a CUDA graph of its launches.

use super::Args;
use crate::error::{Error, Result};
use crate::model::random::shape_config;
use crate::model::LlamaConfig;
use std::path::Path;

const HELP: &str = "\
sun bench kernels: time every GPU kernel at a model's shapes, each against its bound

Usage: sun bench kernels [options]

For each distinct linear of the shape (q/k/v/o/gate/up/down): batch-1 4-bit GEMV (and the fused
decode GEMV with the LoRA B product in its epilogue), the batch-1 LoRA products (z = x A^T,
y += s z B^T at --lora-r) through the dense bf16 GEMV, dequantize to bf16, the NF4 training
matmul forward (tokens x in -> out) and its dX product, the LoRA training products at --tokens and
--lora-r with a dropout mask of p = 0.1 (z = drop(x) A^T, dz = s dy B, dB += dy^T z,
dA += dz^T drop(x), dx += drop'(dz A)) and the input's dropout mask drawn from keys (one per
512 rows); the sm90 bf16 GEMM alone on W, forward (X W^T) and dX (dY W, W read as stored); the
lm_head's batch-1 dense GEMV; the loss head's input gradient dlogits W_lm for one chunk of scored
rows (at most --tokens) on the sm90 GEMM, W_lm as stored and transposed; the
decode step's RMSNorm fused with LoRA A of q, k, v; at --tokens: RMSNorm, RoPE, SwiGLU and causal
attention (forward and backward, one sequence), the cross-entropy over the vocabulary, AdamW over
one layer's LoRA parameters; causal attention also at the training shapes 16 x 512 and 2 x 2048
(sequences x tokens, forward and backward); a decode step's attention (RoPE, cache write,
split-key attention in one kernel) against caches of 160 to 8192 keys. Each row: median GPU
time (CUDA events around replays of a CUDA graph of the launches, so no host launch latency),
bytes moved and FLOPs, GB/s, TFLOP/s, the bound
(bytes / 4.3 TB/s or FLOPs / 989 TFLOP/s, whichever is larger: an H200's copy bandwidth and bf16
dense peak) and the fraction of it reached.
Needs a binary built with the `cuda` feature and a GPU.

Options:
  --shape S            smol (SmolLM2-135M), 1b (LLaMA-3.2-1B), 7b (LLaMA-7B) or a config.json
                       (default 7b)
  --tokens N           tokens of the training kernels (default 4096)
  --lora-r R           LoRA rank of the adapter products and the AdamW tensor (default 64)
  --no-double-quant    plain f32 block scales instead of NF4 + double quant (default: double quant,
                       as QLoRA)
  --json               print one JSON object instead of the table
";

/// Runs `sun bench kernels`.
pub fn run(mut args: Args) -> Result<()> {
    if args.help(HELP) {
        return Ok(());
    }
    let shape_name: String = args.opt_or("--shape", "7b".to_string())?;
    let tokens: usize = args.opt_or("--tokens", 4096)?;
    let lora_rank: usize = args.opt_or("--lora-r", 64)?;
    let double_quant = !args.flag("--no-double-quant");
    let json = args.flag("--json");
    args.finish()?;
    if tokens == 0 || lora_rank == 0 {
        return Err(Error::invalid("--tokens and --lora-r must be positive"));
    }
    let config = if shape_name.ends_with(".json") {
        LlamaConfig::load(Path::new(&shape_name))?
    } else {
        shape_config(&shape_name)?
    };
    measure(report::KernelBench {
        shape_name,
        config,
        tokens,
        lora_rank,
        double_quant,
        json,
    })
}

#[cfg(not(feature = "cuda"))]
fn measure(_bench: report::KernelBench) -> Result<()> {
    Err(Error::unsupported(
        "sun bench kernels times the CUDA kernels: this binary was built without the `cuda` \
         feature (cargo build --release --features cuda)",
    ))
}

#[cfg(feature = "cuda")]
fn measure(bench: report::KernelBench) -> Result<()> {
    let gpu = crate::backend::cuda::CudaDevice::new()?;
    let timings = gpu_kernels::time_all(&gpu, &bench)?;
    let rows: Vec<report::Measured> = timings.iter().map(report::Measured::from).collect();
    if bench.json {
        println!("{}", report::report_json(&bench, gpu.name(), &rows));
    } else {
        report::print_table(&bench, gpu.name(), &rows);
    }
    Ok(())
}

/// The bench's plan (which linears, how many LoRA parameters) and its report (rates, bounds,
/// table, JSON): plain computations, used by the GPU path (and its tests) only.
mod report {
    #![cfg_attr(not(feature = "cuda"), allow(dead_code))]

    use crate::model::LlamaConfig;

    /// Copy bandwidth measured on the H200 (device-to-device), bytes per second.
    const BANDWIDTH_BOUND: f64 = 4.3e12;
    /// The H200's dense bf16 tensor-core peak, FLOP per second.
    const COMPUTE_BOUND: f64 = 989e12;

    /// What `sun bench kernels` measures.
    pub(super) struct KernelBench {
        pub(super) shape_name: String,
        pub(super) config: LlamaConfig,
        pub(super) tokens: usize,
        pub(super) lora_rank: usize,
        pub(super) double_quant: bool,
        pub(super) json: bool,
    }

    /// The distinct linears of `config` as (names, out features, in features), in the order
    /// q, k, v, o, gate, up, down; linears of equal size share one entry ("q/k/v/o").
    pub(super) fn distinct_linears(config: &LlamaConfig) -> Vec<(String, usize, usize)> {
        let (c, f) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let all = [
            ("q", q, c),
            ("k", kv, c),
            ("v", kv, c),
            ("o", c, q),
            ("gate", f, c),
            ("up", f, c),
            ("down", c, f),
        ];
        let mut distinct: Vec<(String, usize, usize)> = Vec::new();
        for (name, out, inp) in all {
            match distinct.iter_mut().find(|(_, o, i)| (*o, *i) == (out, inp)) {
                Some((names, _, _)) => {
                    names.push('/');
                    names.push_str(name);
                }
                None => distinct.push((name.to_string(), out, inp)),
            }
        }
        distinct
    }

    /// LoRA parameters of one decoder layer: rank x (in + out) for each of the seven linears.
    pub(super) fn lora_parameters_per_layer(config: &LlamaConfig, rank: usize) -> usize {
        let (c, f) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let sizes = [(q, c), (kv, c), (kv, c), (c, q), (f, c), (f, c), (c, f)];
        sizes.iter().map(|(out, inp)| rank * (out + inp)).sum()
    }

    /// One timed kernel with its rates and bound.
    #[derive(Clone, Debug, PartialEq)]
    pub(super) struct Measured {
        pub(super) kernel: String,
        pub(super) shape: String,
        pub(super) ms: f64,
        pub(super) bytes: f64,
        pub(super) flops: f64,
    }

    impl Measured {
        pub(super) fn gb_per_s(&self) -> f64 {
            self.bytes / (self.ms * 1e6)
        }

        pub(super) fn tflop_per_s(&self) -> f64 {
            self.flops / (self.ms * 1e9)
        }

        /// The least time the kernel's bytes or FLOPs allow, in ms.
        pub(super) fn bound_ms(&self) -> f64 {
            (self.bytes / BANDWIDTH_BOUND).max(self.flops / COMPUTE_BOUND) * 1e3
        }

        /// Bound over measured time: 1 at the bound.
        pub(super) fn fraction_of_bound(&self) -> f64 {
            self.bound_ms() / self.ms
        }

        /// "memory" or "compute": which side sets the bound.
        pub(super) fn bound_by(&self) -> &'static str {
            if self.bytes / BANDWIDTH_BOUND >= self.flops / COMPUTE_BOUND {
                "memory"
            } else {
                "compute"
            }
        }
    }

    #[cfg(feature = "cuda")]
    impl From<&crate::cli::selftest::harness::Timing> for Measured {
        fn from(t: &crate::cli::selftest::harness::Timing) -> Self {
            Measured {
                kernel: t.kernel.clone(),
                shape: t.shape.clone(),
                ms: t.median_ms,
                bytes: t.bytes as f64,
                flops: t.flops,
            }
        }
    }

    fn header(bench: &KernelBench, device: &str) -> String {
        format!(
            "kernels: shape {} (hidden {}, FFN {}, {} heads, {} KV heads of {}, vocab {}), {} tokens, \
             {}, on {device}",
            bench.shape_name,
            bench.config.hidden_size,
            bench.config.intermediate_size,
            bench.config.num_attention_heads,
            bench.config.num_key_value_heads,
            bench.config.head_dim,
            bench.config.vocab_size,
            bench.tokens,
            if bench.double_quant {
                "NF4 + double quant"
            } else {
                "NF4"
            },
        )
    }

    pub(super) fn print_table(bench: &KernelBench, device: &str, rows: &[Measured]) {
        println!("{}", header(bench, device));
        println!(
            "bound: bytes / {:.1} TB/s or FLOPs / {:.0} TFLOP/s, whichever is larger",
            BANDWIDTH_BOUND / 1e12,
            COMPUTE_BOUND / 1e12
        );
        println!(
            "{:<28} {:<24} {:>10} {:>9} {:>9} {:>8} {:>10} {:>8}",
            "kernel", "shape", "us", "MB", "GB/s", "TFLOP/s", "bound us", "of bound"
        );
        for row in rows {
            println!(
                "{:<28} {:<24} {:>10.1} {:>9.1} {:>9.0} {:>8.1} {:>10.1} {:>7.0}%",
                row.kernel,
                row.shape,
                row.ms * 1e3,
                row.bytes / 1e6,
                row.gb_per_s(),
                row.tflop_per_s(),
                row.bound_ms() * 1e3,
                100.0 * row.fraction_of_bound()
            );
        }
    }

    pub(super) fn report_json(
        bench: &KernelBench,
        device: &str,
        rows: &[Measured],
    ) -> serde_json::Value {
        let kernels: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kernel": r.kernel,
                    "shape": r.shape,
                    "ms": r.ms,
                    "bytes": r.bytes,
                    "flops": r.flops,
                    "gb_per_s": r.gb_per_s(),
                    "tflop_per_s": r.tflop_per_s(),
                    "bound_ms": r.bound_ms(),
                    "bound_by": r.bound_by(),
                    "fraction_of_bound": r.fraction_of_bound(),
                })
            })
            .collect();
        serde_json::json!({
            "workload": "kernels",
            "shape": bench.shape_name,
            "hidden_size": bench.config.hidden_size,
            "intermediate_size": bench.config.intermediate_size,
            "heads": bench.config.num_attention_heads,
            "kv_heads": bench.config.num_key_value_heads,
            "head_dim": bench.config.head_dim,
            "vocab_size": bench.config.vocab_size,
            "tokens": bench.tokens,
            "lora_rank": bench.lora_rank,
            "double_quant": bench.double_quant,
            "device": device,
            "bandwidth_bound_bytes_per_s": BANDWIDTH_BOUND,
            "compute_bound_flop_per_s": COMPUTE_BOUND,
            "kernels": kernels,
        })
    }
}

#[cfg(feature = "cuda")]
mod gpu_kernels {
    //! The timed launches; only in binaries built with the `cuda` feature.

    mod decode_attention;
    mod lora_training;

    use super::super::selftest::harness::{
        SplitMix64, Timing, ROTATION_BYTES, TIMED_RUNS, WARMUP_RUNS,
    };
    use super::report::{distinct_linears, lora_parameters_per_layer, KernelBench};
    use crate::backend::cuda::adamw::{adamw_step, AdamWStep, MomentArena};
    use crate::backend::cuda::attention::{attention_backward, attention_forward, AttentionSaved};
    use crate::backend::cuda::decode::{
        fused_gemv_fits, gemv4_rows, rmsnorm_lora_a, FusedProduct, LoraTerm,
    };
    use crate::backend::cuda::decode_tiled::{
        tiled_fused_fits, tiled_rows, z_rows_len, LoraRanks, TiledInput, TiledLora,
    };
    use crate::backend::cuda::gemm_sm90::{
        gemm_nn_bf16_sm90, gemm_nn_sm90_fits, gemm_nt_bf16_sm90, gemm_sm90_fits,
        matmul_nn_4bit_dequant_gemm, matmul_nt_4bit_dequant_gemm,
    };
    use crate::backend::cuda::gemv::gemv_nt_bf16;
    use crate::backend::cuda::gemv_tiled::{Tiled4bit, TILED_VARIANTS};
    use crate::backend::cuda::matmul::{
        matmul_nn_4bit, matmul_nn_4bit_mma_sync, matmul_nn_4bit_sm90, matmul_nt_4bit,
        matmul_nt_4bit_mma_sync, matmul_nt_4bit_sm90, sm90_fits, GemmShape,
    };
    use crate::backend::cuda::norm::{residual_rmsnorm, rmsnorm_backward, rmsnorm_forward};
    use crate::backend::cuda::rope::{rope_backward, rope_forward, rope_qk_into_cache, QkvRows};
    use crate::backend::cuda::swiglu::{swiglu_backward, swiglu_forward};
    use crate::backend::cuda::xent::{cross_entropy_bf16, GpuLabels};
    use crate::backend::cuda::{
        median_ms, median_ms_per_launch, median_ms_per_replay, CudaDevice, Gpu4bit, GpuBuffer,
        Host4bit, HostAbsmax,
    };
    use crate::error::Result;
    use crate::model::gpu::{attention_shape, loss_rows};
    use crate::optim::AdamWConfig;
    use crate::quant::{code_table, dynamic_code_signed, QuantType};
    use cust::memory::DeviceCopy;

    /// The 4-bit blocksize and the double quant's nested blocksize (bitsandbytes' defaults).
    const BLOCKSIZE: usize = 64;
    const NESTED_BLOCKSIZE: usize = 256;
    /// The most copies of an input kept for rotation.
    const MAX_COPIES: usize = 16;
    /// A timed run should last at least this long (ms): shorter kernels get several launches per
    /// run, so the host's launch latency is not timed with them.
    const MIN_RUN_MS: f64 = 0.2;
    /// The most launches per timed run.
    const MAX_LAUNCHES_PER_RUN: usize = 20;
    /// (sequences, tokens each) of the attention rows at QLoRA training shapes (beside the one
    /// sequence of --tokens): the side-by-side's 16 x 512 and 2 x 2048.
    const TRAINING_ATTENTION: [(usize, usize); 2] = [(16, 512), (2, 2048)];

    /// Copies of an input of `bytes` so that rotating through them reads from HBM, not L2.
    fn copies_for(bytes: usize) -> usize {
        ROTATION_BYTES.div_ceil(bytes.max(1)).clamp(1, MAX_COPIES)
    }

    /// Median ms per call of `op(i)`: a probe of three single launches picks how many launches
    /// each timed run holds (enough for MIN_RUN_MS), then the selftest's warm-up and run counts.
    /// A run is one replay of a CUDA graph of its launches, so the figure is GPU time with no
    /// host launch latency in it (a decode step replays its kernels the same way); where `op`
    /// cannot be recorded, the launches are queued one by one and the row says so on stderr.
    fn time(gpu: &CudaDevice, mut op: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        let probe = median_ms(gpu, 1, 3, &mut op)?;
        let launches = if probe > 0.0 {
            ((MIN_RUN_MS / probe).ceil() as usize).clamp(1, MAX_LAUNCHES_PER_RUN)
        } else {
            MAX_LAUNCHES_PER_RUN
        };
        match median_ms_per_replay(gpu, WARMUP_RUNS, TIMED_RUNS, launches, &mut op) {
            Ok(ms) => Ok(ms),
            Err(e) => {
                eprintln!("  (not recordable in a CUDA graph, timed launch by launch: {e})");
                median_ms_per_launch(gpu, WARMUP_RUNS, TIMED_RUNS, launches, op)
            }
        }
    }

    /// `len` random bf16 values in [-1, 1) on the GPU.
    fn random_bf16(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        what: &str,
        len: usize,
    ) -> Result<GpuBuffer<u16>> {
        let (bits, _) = rng.bf16s(len, -1.0, 1.0);
        GpuBuffer::from_host(gpu, what, &bits)
    }

    /// `copies` GPU buffers holding the same host data (distinct memory, for rotation).
    fn uploads<T: DeviceCopy + bytemuck::Zeroable>(
        gpu: &CudaDevice,
        what: &str,
        data: &[T],
        copies: usize,
    ) -> Result<Vec<GpuBuffer<T>>> {
        (0..copies)
            .map(|_| GpuBuffer::from_host(gpu, what, data))
            .collect()
    }

    fn timing(kernel: &str, shape: &str, ms: f64, bytes: usize, flops: f64) -> Timing {
        Timing {
            kernel: kernel.to_string(),
            shape: shape.to_string(),
            median_ms: ms,
            bytes,
            flops,
        }
    }

    /// Every kernel of the bench, in the order of the table.
    pub(super) fn time_all(gpu: &CudaDevice, bench: &KernelBench) -> Result<Vec<Timing>> {
        let mut rng = SplitMix64(0x5eed_6b65_726e_656c);
        let mut timings = Vec::new();
        for (names, out, inp) in distinct_linears(&bench.config) {
            eprintln!("timing the {names} linear ({out} x {inp})");
            timings.extend(linear(gpu, &mut rng, bench, &names, out, inp)?);
            timings.extend(lora_gemvs(gpu, &mut rng, bench, &names, out, inp)?);
            timings.extend(lora_training::rows(gpu, &mut rng, bench, &names, out, inp)?);
        }
        timings.push(lm_head_gemv(gpu, &mut rng, bench)?);
        timings.extend(loss_head_input_gradient(gpu, &mut rng, bench)?);
        timings.push(norm_lora_a(gpu, &mut rng, bench)?);
        eprintln!("timing the per-token kernels at {} tokens", bench.tokens);
        timings.extend(norm_rope_swiglu(gpu, &mut rng, bench)?);
        if matches!(bench.config.head_dim, 64 | 128) {
            timings.extend(attention(gpu, &mut rng, bench, 1, bench.tokens)?);
            eprintln!("timing a decode step's attention");
            timings.extend(decode_attention::rows(gpu, &mut rng, bench)?);
            for (batch, t) in TRAINING_ATTENTION {
                eprintln!("timing attention at the training shape {batch} x {t}");
                timings.extend(attention(gpu, &mut rng, bench, batch, t)?);
            }
        } else {
            eprintln!(
                "attention skipped: the GPU kernels take head_dim 64 or 128, not {}",
                bench.config.head_dim
            );
        }
        timings.push(cross_entropy(gpu, &mut rng, bench)?);
        timings.push(adamw(gpu, &mut rng, bench)?);
        Ok(timings)
    }

    /// A 4-bit product's launcher: `c = alpha * a · W(ᵀ) + beta * c` at a shape.
    type FourBitProduct = fn(
        &CudaDevice,
        &GpuBuffer<u16>,
        &Gpu4bit,
        &mut GpuBuffer<u16>,
        GemmShape,
        f32,
        f32,
    ) -> Result<()>;

    /// A product's kernels by name suffix: the dispatch's (""), dequantize + the sm90 GEMM, the
    /// in-loop sm90 kernel, the mma.sync one.
    type ProductKernels = [(&'static str, FourBitProduct); 4];

    /// Whether the sm90 GEMM of a product's dequantize + GEMM row takes a shape.
    type GemmFits = fn(&CudaDevice, GemmShape) -> bool;

    /// GEMV, dequantize, forward and dX matmul of one `out x in` NF4 weight.
    fn linear(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
        names: &str,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Timing>> {
        let numel = out * inp;
        let blocks = numel.div_ceil(BLOCKSIZE);
        let packed = rng.bytes(numel.div_ceil(2));
        let plain: Vec<f32>;
        let (codes, nested): (Vec<u8>, Vec<f32>);
        let absmax = if bench.double_quant {
            codes = rng.bytes(blocks);
            nested = rng.f32s(blocks.div_ceil(NESTED_BLOCKSIZE), 0.01, 0.5);
            HostAbsmax::Double {
                codes: &codes,
                dynamic_map: dynamic_code_signed(),
                nested: &nested,
                offset: rng.uniform(0.1, 1.0),
                nested_blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            plain = rng.f32s(blocks, 0.05, 2.0);
            HostAbsmax::Plain(&plain)
        };
        let host = Host4bit {
            packed: &packed,
            code_table: code_table(QuantType::Nf4),
            absmax,
            numel,
            blocksize: BLOCKSIZE,
        };
        let scale_bytes = match host.absmax {
            HostAbsmax::Plain(a) => 4 * a.len(),
            HostAbsmax::Double { codes, nested, .. } => codes.len() + 4 * nested.len() + 4 * 256,
        };
        let weight_bytes = packed.len() + scale_bytes + 4 * 16;
        let copies = copies_for(weight_bytes);
        let weights = (0..copies)
            .map(|_| Gpu4bit::upload(gpu, "timed weight", &host))
            .collect::<Result<Vec<_>>>()?;
        let kind = if bench.double_quant { "nf4+dq" } else { "nf4" };
        let shape = format!("{names} {out}x{inp}");
        let mut timings = Vec::new();

        let x = random_bf16(gpu, rng, "timed x", inp)?;
        let mut y = GpuBuffer::<u16>::zeroed(gpu, "timed y", out)?;
        let gemv_bytes = weight_bytes + 2 * (inp + out);
        // The bitsandbytes layout's own GEMV, then, once the tiled copies are made, the
        // dispatch's row (which reads them; bytes are counted in the bitsandbytes layout) and
        // each tiled build.
        for tiled in [false, true] {
            if tiled {
                for weight in &weights {
                    weight.prepare_tiled_gemv(gpu, (out, inp))?;
                }
            }
            let ms = time(gpu, |i| {
                weights[i % copies].gemv_bf16(gpu, (out, inp), &x, &mut y)
            })?;
            let layout = if tiled { "" } else { " row-major" };
            timings.push(timing(
                &format!("gemv {kind}{layout} (batch 1)"),
                &shape,
                ms,
                gemv_bytes,
                2.0 * numel as f64,
            ));
        }
        let tiled: Option<Vec<&Tiled4bit>> = weights.iter().map(|w| w.tiled()).collect();
        if let Some(tiled) = tiled {
            for variant in TILED_VARIANTS.iter().filter(|v| v.takes(inp)) {
                let ms = time(gpu, |i| {
                    tiled[i % copies].gemv_bf16_with(gpu, *variant, &x, &mut y)
                })?;
                timings.push(timing(
                    &format!("gemv {kind} {}", variant.name.trim_start_matches("gemv4_")),
                    &shape,
                    ms,
                    gemv_bytes,
                    2.0 * numel as f64,
                ));
            }
        }

        // The fused decode GEMV of the same weight with its adapter's B product in the
        // epilogue (rank --lora-r), where the shape fits it.
        if fused_gemv_fits(gpu, &weights[0], (out, inp)) {
            let r = bench.lora_rank;
            let (b_bits, _) = rng.bf16s(out * r, -1.0, 1.0);
            let b = GpuBuffer::from_host(gpu, "timed LoRA B", &b_bits)?;
            let z = random_bf16(gpu, rng, "timed z", r)?;
            let lora = LoraTerm {
                b: &b,
                z: &z,
                z_offset: 0,
                rank: r,
                scale: 0.25,
            };
            let ms = time(gpu, |i| {
                let product = FusedProduct {
                    weight: &weights[i % copies],
                    rows: out,
                    lora: Some(lora),
                };
                gemv4_rows(gpu, &[product], &x, &mut [&mut y])
            })?;
            timings.push(timing(
                &format!("gemv {kind} fused + LoRA B (batch 1)"),
                &format!("{shape} r{r}"),
                ms,
                weight_bytes + 2 * (inp + out + out * r + r),
                2.0 * (numel + out * r) as f64,
            ));
            // The same product on the tiled copy (what generation's decode steps read), whose
            // kernel also makes z = A x (the row-major row above takes z made by a launch before
            // it), bytes counted in the bitsandbytes layout as above so that the rows compare;
            // the copy itself reads 4 bytes of scale per 64 weights.
            let tiled: Option<Vec<&Tiled4bit>> = weights.iter().map(|w| w.tiled()).collect();
            if let Some(tiled) = tiled.filter(|t| {
                let ranks = LoraRanks { max: r, total: r };
                tiled_fused_fits(gpu, t[0], ranks, false)
            }) {
                let (a_bits, _) = rng.bf16s(r * inp, -0.1, 0.1);
                let a = GpuBuffer::from_host(gpu, "timed LoRA A", &a_bits)?;
                let lora = Some(TiledLora {
                    a: &a,
                    b: &b,
                    rank: r,
                    scale: 0.25,
                });
                let mut z_rows = GpuBuffer::<f32>::zeroed(gpu, "timed z", z_rows_len(&[lora]))?;
                let ms = time(gpu, |i| {
                    let input = TiledInput {
                        x: &x,
                        norm: None,
                        z_rows: &mut z_rows,
                    };
                    tiled_rows(gpu, tiled[i % copies], &[lora], input, &mut [&mut y])
                })?;
                timings.push(timing(
                    &format!("gemv {kind} tiled fused + LoRA A, B (batch 1)"),
                    &format!("{shape} r{r}"),
                    ms,
                    weight_bytes + 2 * (inp + out + out * r + r * inp),
                    2.0 * (numel + out * r + r * inp) as f64,
                ));
            }
        }

        let mut dense = GpuBuffer::<u16>::zeroed(gpu, "timed dequantize output", numel)?;
        let ms = time(gpu, |i| {
            weights[i % copies].dequantize_bf16(gpu, &mut dense)
        })?;
        timings.push(timing(
            &format!("dequantize {kind} -> bf16"),
            &shape,
            ms,
            weight_bytes + 2 * numel,
            numel as f64,
        ));
        drop(dense);

        // The two products at `bench.tokens` rows: the dispatch's kernel, then, where it takes
        // the sm90 kernel, both kernels by name.
        let t = bench.tokens;
        let products: [(&str, ProductKernels, GemmFits, usize, usize); 2] = [
            (
                "X W^T",
                [
                    ("", matmul_nt_4bit),
                    (" dequant + gemm sm90", matmul_nt_4bit_dequant_gemm),
                    (" sm90 wgmma", matmul_nt_4bit_sm90),
                    (" mma.sync", matmul_nt_4bit_mma_sync),
                ],
                gemm_sm90_fits,
                inp,
                out,
            ),
            (
                "dY W (dX)",
                [
                    ("", matmul_nn_4bit),
                    (" dequant + gemm sm90", matmul_nn_4bit_dequant_gemm),
                    (" sm90 wgmma", matmul_nn_4bit_sm90),
                    (" mma.sync", matmul_nn_4bit_mma_sync),
                ],
                gemm_nn_sm90_fits,
                out,
                inp,
            ),
        ];
        for (product_name, kernels, gemm_fits, k, n) in products {
            let a = random_bf16(gpu, rng, "timed matmul input", t * k)?;
            let mut c = GpuBuffer::<u16>::zeroed(gpu, "timed matmul output", t * n)?;
            let shape = GemmShape { m: t, n, k };
            // Beside the dispatch's row, each Hopper kernel that takes the shape, and then
            // mma.sync (which the dispatch's row already is when neither does).
            let [dispatch, dequant_gemm, in_loop, mma_sync] = kernels;
            let mut variants = vec![dispatch];
            if gemm_fits(gpu, shape) {
                variants.push(dequant_gemm);
            }
            if sm90_fits(gpu, &weights[0], shape) {
                variants.push(in_loop);
            }
            if variants.len() > 1 {
                variants.push(mma_sync);
            }
            for (suffix, product) in &variants {
                let ms = time(gpu, |i| {
                    product(gpu, &a, &weights[i % copies], &mut c, shape, 1.0, 0.0)
                })?;
                timings.push(timing(
                    &format!("matmul {kind} {product_name}{suffix}"),
                    &format!("{names} {t}x{k}->{n}"),
                    ms,
                    weight_bytes + 2 * t * (inp + out),
                    2.0 * t as f64 * numel as f64,
                ));
            }
            // The dispatch's product accumulating into C (beta = 1: the training pass's dX of
            // k, v and up, added to q's, gate's): C read and written once more.
            let ms = time(gpu, |i| {
                dispatch.1(gpu, &a, &weights[i % copies], &mut c, shape, 1.0, 1.0)
            })?;
            timings.push(timing(
                &format!("matmul {kind} {product_name} += (beta 1)"),
                &format!("{names} {t}x{k}->{n}"),
                ms,
                weight_bytes + 2 * t * (k + 2 * n),
                2.0 * t as f64 * numel as f64,
            ));
        }

        // The GEMM alone on a bf16 W (out, in), the copies rotated: what the dequantize + GEMM
        // rows spend after their dequantization; the forward reads W as B (n, k), the input
        // gradient as B (k, n).
        let forward = GemmShape {
            m: t,
            n: out,
            k: inp,
        };
        let input_gradient = GemmShape {
            m: t,
            n: inp,
            k: out,
        };
        let nt_fits = gemm_sm90_fits(gpu, forward);
        let nn_fits = gemm_nn_sm90_fits(gpu, input_gradient);
        if nt_fits || nn_fits {
            let (w_bits, _) = rng.bf16s(numel, -1.0, 1.0);
            let dense_copies = copies_for(2 * numel);
            let dense = uploads(gpu, "timed bf16 W", &w_bits, dense_copies)?;
            let bytes = 2 * numel + 2 * t * (inp + out);
            let flops = 2.0 * t as f64 * numel as f64;
            if nt_fits {
                let a = random_bf16(gpu, rng, "timed matmul input", t * inp)?;
                let mut c = GpuBuffer::<u16>::zeroed(gpu, "timed matmul output", t * out)?;
                let ms = time(gpu, |i| {
                    gemm_nt_bf16_sm90(gpu, &a, &dense[i % dense_copies], &mut c, forward, 1.0, 0.0)
                })?;
                let shape = format!("{names} {t}x{inp}->{out}");
                timings.push(timing("gemm bf16 sm90 X W^T", &shape, ms, bytes, flops));
            }
            if nn_fits {
                let dy = random_bf16(gpu, rng, "timed matmul input", t * out)?;
                let mut dx = GpuBuffer::<u16>::zeroed(gpu, "timed matmul output", t * inp)?;
                let ms = time(gpu, |i| {
                    let w = &dense[i % dense_copies];
                    gemm_nn_bf16_sm90(gpu, &dy, w, &mut dx, input_gradient, 1.0, 0.0)
                })?;
                let shape = format!("{names} {t}x{out}->{inp}");
                timings.push(timing("gemm bf16 sm90 dY W (nn)", &shape, ms, bytes, flops));
            }
        }
        Ok(timings)
    }

    /// A decode step's two adapter products of one `out x in` linear at rank r, through the
    /// dense GEMV: `z (1, r) = x Aᵀ` (A (r, in)) and `y (1, out) += s z Bᵀ` (B (out, r)), the
    /// factors rotated through copies.
    fn lora_gemvs(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
        names: &str,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Timing>> {
        let r = bench.lora_rank;
        let (a_bits, _) = rng.bf16s(r * inp, -1.0, 1.0);
        let (b_bits, _) = rng.bf16s(out * r, -1.0, 1.0);
        let a_copies = copies_for(2 * a_bits.len());
        let b_copies = copies_for(2 * b_bits.len());
        let a = uploads(gpu, "timed LoRA A", &a_bits, a_copies)?;
        let b = uploads(gpu, "timed LoRA B", &b_bits, b_copies)?;
        let x = random_bf16(gpu, rng, "timed x", inp)?;
        let mut z = random_bf16(gpu, rng, "timed z", r)?;
        let mut y = random_bf16(gpu, rng, "timed y", out)?;
        let down = GemmShape { m: 1, n: r, k: inp };
        let ms = time(gpu, |i| {
            gemv_nt_bf16(gpu, &x, &a[i % a_copies], &mut z, down, 1.0, 0.0)
        })?;
        let mut timings = vec![timing(
            "gemv bf16 LoRA z = x A^T (batch 1)",
            &format!("{names} r{r} {inp}->{r}"),
            ms,
            2 * (r * inp + inp + r),
            2.0 * (r * inp) as f64,
        )];
        let up = GemmShape { m: 1, n: out, k: r };
        let ms = time(gpu, |i| {
            gemv_nt_bf16(gpu, &z, &b[i % b_copies], &mut y, up, 0.25, 1.0)
        })?;
        timings.push(timing(
            "gemv bf16 LoRA y += s z B^T (batch 1)",
            &format!("{names} r{r} {r}->{out}"),
            ms,
            2 * (out * r + r + 2 * out),
            2.0 * (out * r) as f64,
        ));
        Ok(timings)
    }

    /// A decode step's input norm fused with the LoRA A products of q, k and v (rank --lora-r
    /// each): one row of the hidden width.
    fn norm_lora_a(gpu: &CudaDevice, rng: &mut SplitMix64, bench: &KernelBench) -> Result<Timing> {
        let (hidden, r) = (bench.config.hidden_size, bench.lora_rank);
        let x = random_bf16(gpu, rng, "timed x", hidden)?;
        let weight = GpuBuffer::from_host(gpu, "timed norm weight", &rng.f32s(hidden, 0.5, 1.5))?;
        let (a_bits, _) = rng.bf16s(r * hidden, -1.0, 1.0);
        let copies = copies_for(3 * 2 * a_bits.len());
        let a = uploads(gpu, "timed LoRA A", &a_bits, 3 * copies)?;
        let mut xhat = GpuBuffer::<u16>::zeroed(gpu, "timed xhat", hidden)?;
        let mut z = GpuBuffer::<u16>::zeroed(gpu, "timed z", 3 * r)?;
        let ms = time(gpu, |i| {
            let j = 3 * (i % copies);
            let factors = [(&a[j], r), (&a[j + 1], r), (&a[j + 2], r)];
            rmsnorm_lora_a(gpu, &x, &weight, 1e-5, &factors, (&mut xhat, &mut z))
        })?;
        Ok(timing(
            "rmsnorm + LoRA A q,k,v (batch 1, fused)",
            &format!("{hidden} r{r} x3"),
            ms,
            2 * (3 * r * hidden + 2 * hidden + 3 * r) + 4 * hidden,
            2.0 * (3 * r * hidden) as f64,
        ))
    }

    /// The lm_head of a decode step through the dense GEMV: `logits (1, V) = h (1, C) Wᵀ`.
    fn lm_head_gemv(gpu: &CudaDevice, rng: &mut SplitMix64, bench: &KernelBench) -> Result<Timing> {
        let (vocab, hidden) = (bench.config.vocab_size, bench.config.hidden_size);
        let (w_bits, _) = rng.bf16s(vocab * hidden, -1.0, 1.0);
        let copies = copies_for(2 * w_bits.len());
        let w = uploads(gpu, "timed lm_head", &w_bits, copies)?;
        drop(w_bits);
        let h = random_bf16(gpu, rng, "timed hidden state", hidden)?;
        let mut logits = GpuBuffer::<u16>::zeroed(gpu, "timed logits", vocab)?;
        let shape = GemmShape {
            m: 1,
            n: vocab,
            k: hidden,
        };
        let ms = time(gpu, |i| {
            gemv_nt_bf16(gpu, &h, &w[i % copies], &mut logits, shape, 1.0, 0.0)
        })?;
        Ok(timing(
            "gemv bf16 lm_head (batch 1)",
            &format!("{hidden}->{vocab}"),
            ms,
            2 * (vocab * hidden + hidden + vocab),
            2.0 * (vocab * hidden) as f64,
        ))
    }

    /// RMSNorm over (T, C), RoPE over the queries (T, H·D), SwiGLU over (T, F); forward and
    /// backward each.
    fn norm_rope_swiglu(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
    ) -> Result<Vec<Timing>> {
        let c = &bench.config;
        let t = bench.tokens;
        let mut timings = Vec::new();

        // RMSNorm (T, C), weights near 1.
        let n = t * c.hidden_size;
        let (x_bits, _) = rng.bf16s(n, -1.0, 1.0);
        let copies = copies_for(4 * n);
        let xs = uploads(gpu, "timed norm x", &x_bits, copies)?;
        let dys = uploads(gpu, "timed norm dy", &x_bits, copies)?;
        let weight =
            GpuBuffer::from_host(gpu, "timed norm weight", &rng.f32s(c.hidden_size, 0.5, 1.5))?;
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed norm out", n)?;
        let shape = format!("{t}x{}", c.hidden_size);
        let eps = c.rms_norm_eps;
        let ms = time(gpu, |i| {
            rmsnorm_forward(gpu, &mut out, &xs[i % copies], &weight, eps)
        })?;
        timings.push(timing(
            "rmsnorm forward",
            &shape,
            ms,
            4 * n + 4 * c.hidden_size,
            4.0 * n as f64,
        ));
        // The attention block's residual add and the MLP's norm in one kernel (f32 residual
        // in and out, bf16 projection, residual copy and norm out).
        let residuals = uploads(gpu, "timed residual", &rng.f32s(n, -1.0, 1.0), copies)?;
        let mut y = GpuBuffer::<f32>::zeroed(gpu, "timed residual out", n)?;
        let mut yb = GpuBuffer::<u16>::zeroed(gpu, "timed residual bf16", n)?;
        let ms = time(gpu, |i| {
            let outputs = (&mut y, &mut yb, &mut out);
            residual_rmsnorm(
                gpu,
                &residuals[i % copies],
                &xs[i % copies],
                &weight,
                eps,
                outputs,
            )
        })?;
        timings.push(timing(
            "residual + rmsnorm forward (fused)",
            &shape,
            ms,
            14 * n + 4 * c.hidden_size,
            6.0 * n as f64,
        ));
        drop((residuals, y, yb));
        let ms = time(gpu, |i| {
            rmsnorm_backward(
                gpu,
                &mut out,
                &dys[i % copies],
                &xs[i % copies],
                &weight,
                eps,
                false,
            )
        })?;
        timings.push(timing(
            "rmsnorm backward",
            &shape,
            ms,
            6 * n + 4 * c.hidden_size,
            8.0 * n as f64,
        ));
        drop((xs, dys, out));

        // RoPE on the queries (T, H·D) in place, angles of the model's theta.
        let (heads, d) = (c.num_attention_heads, c.head_dim);
        let n = t * heads * d;
        let half = d / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for j in 0..half {
                let angle = pos as f64 * f64::from(c.rope_theta).powf(-2.0 * j as f64 / d as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = GpuBuffer::from_host(gpu, "timed rope cos", &cos)?;
        let sin = GpuBuffer::from_host(gpu, "timed rope sin", &sin)?;
        let (q_bits, _) = rng.bf16s(n, -1.0, 1.0);
        let copies = copies_for(2 * n);
        let mut qs = uploads(gpu, "timed rope q", &q_bits, copies)?;
        let shape = format!("{t}x{heads}x{d}");
        let rope_bytes = 4 * n + 8 * t * half;
        let ms = time(gpu, |i| {
            rope_forward(gpu, &mut qs[i % copies], &cos, &sin, d)
        })?;
        timings.push(timing(
            "rope forward (q)",
            &shape,
            ms,
            rope_bytes,
            3.0 * n as f64,
        ));
        let ms = time(gpu, |i| {
            rope_backward(gpu, &mut qs[i % copies], &cos, &sin, d)
        })?;
        timings.push(timing(
            "rope backward (q)",
            &shape,
            ms,
            rope_bytes,
            3.0 * n as f64,
        ));
        // q and k rotated, k and v into a cache of T positions from position 0: one kernel.
        let kv_heads = c.num_key_value_heads;
        let kv_n = t * kv_heads * d;
        let mut k = random_bf16(gpu, rng, "timed rope k", kv_n)?;
        let v = random_bf16(gpu, rng, "timed rope v", kv_n)?;
        let mut keys = GpuBuffer::<u16>::zeroed(gpu, "timed key cache", kv_n)?;
        let mut values = GpuBuffer::<u16>::zeroed(gpu, "timed value cache", kv_n)?;
        let ms = time(gpu, |i| {
            let rows = QkvRows {
                q: &mut qs[i % copies],
                k: &mut k,
                v: &v,
            };
            let caches = (&mut keys, &mut values);
            rope_qk_into_cache(gpu, rows, (&cos, &sin), caches, 0, (heads, kv_heads, d))
        })?;
        timings.push(timing(
            "rope q,k + KV cache write (fused)",
            &format!("{t}x{heads}/{kv_heads}x{d}"),
            ms,
            4 * n + 10 * kv_n + 8 * t * half,
            3.0 * (n + kv_n) as f64,
        ));
        drop((qs, k, v, keys, values));

        // SwiGLU (T, F).
        let n = t * c.intermediate_size;
        let (g_bits, _) = rng.bf16s(n, -3.0, 3.0);
        let (u_bits, _) = rng.bf16s(n, -1.0, 1.0);
        let copies = copies_for(4 * n);
        let gates = uploads(gpu, "timed swiglu gate", &g_bits, copies)?;
        let ups = uploads(gpu, "timed swiglu up", &u_bits, copies)?;
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed swiglu out", n)?;
        let mut dup = GpuBuffer::<u16>::zeroed(gpu, "timed swiglu dup", n)?;
        let shape = format!("{t}x{}", c.intermediate_size);
        let ms = time(gpu, |i| {
            swiglu_forward(gpu, &mut out, &gates[i % copies], &ups[i % copies])
        })?;
        timings.push(timing("swiglu forward", &shape, ms, 6 * n, 6.0 * n as f64));
        // dout: the up values of the next copy (any non-zero bf16 values).
        let ms = time(gpu, |i| {
            let dout = &ups[(i + 1) % copies];
            swiglu_backward(
                gpu,
                &mut out,
                &mut dup,
                dout,
                &gates[i % copies],
                &ups[i % copies],
            )
        })?;
        timings.push(timing(
            "swiglu backward",
            &shape,
            ms,
            10 * n,
            10.0 * n as f64,
        ));
        Ok(timings)
    }

    /// Causal attention over `batch` sequences of `t` tokens: forward and backward.
    fn attention(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
        batch: usize,
        t: usize,
    ) -> Result<Vec<Timing>> {
        let c = &bench.config;
        let shape = attention_shape(c);
        let (q_len, kv_len) = (
            batch * t * shape.heads * shape.head_dim,
            batch * t * shape.kv_heads * shape.head_dim,
        );
        let q = random_bf16(gpu, rng, "timed q", q_len)?;
        let k = random_bf16(gpu, rng, "timed k", kv_len)?;
        let v = random_bf16(gpu, rng, "timed v", kv_len)?;
        let dout = random_bf16(gpu, rng, "timed dout", q_len)?;
        let mut out = GpuBuffer::<u16>::zeroed(gpu, "timed attention out", q_len)?;
        let mut lse = GpuBuffer::<f32>::zeroed(gpu, "timed lse", batch * shape.heads * t)?;
        let forward_ms = time(gpu, |_| {
            attention_forward(gpu, &q, &k, &v, &mut out, &mut lse, 0, batch, shape)
        })?;
        let mut dq = GpuBuffer::<u16>::zeroed(gpu, "timed dq", q_len)?;
        let mut dk = GpuBuffer::<u16>::zeroed(gpu, "timed dk", kv_len)?;
        let mut dv = GpuBuffer::<u16>::zeroed(gpu, "timed dv", kv_len)?;
        let mut delta = GpuBuffer::<f32>::zeroed(gpu, "timed delta", batch * shape.heads * t)?;
        let saved = AttentionSaved {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
        };
        let backward_ms = time(gpu, |_| {
            attention_backward(
                gpu, &saved, &dout, &mut dq, &mut dk, &mut dv, &mut delta, batch, shape,
            )
        })?;
        // Causal: half of each sequence's T x T scores; QK^T and PV each 2 FLOPs per
        // multiply-add.
        let forward_flops =
            4.0 * (batch * t * t) as f64 * (shape.heads * shape.head_dim) as f64 / 2.0;
        let sequences = if batch == 1 {
            String::new()
        } else {
            format!("{batch}x")
        };
        let label = format!(
            "{sequences}T{t} H{} KV{} D{}",
            shape.heads, shape.kv_heads, shape.head_dim
        );
        Ok(vec![
            timing(
                "attention forward",
                &label,
                forward_ms,
                2 * (2 * q_len + 2 * kv_len) + 4 * batch * shape.heads * t,
                forward_flops,
            ),
            timing(
                "attention backward",
                &label,
                backward_ms,
                2 * (3 * q_len + 2 * kv_len)
                    + 2 * (q_len + 2 * kv_len)
                    + 8 * batch * shape.heads * t,
                2.5 * forward_flops,
            ),
        ])
    }

    /// The loss head's input gradient `d(rows) (n, C) = dlogits (n, V) · W_lm (V, C)` for one
    /// chunk of scored rows (as many as the loss head forms at once, at most --tokens) on the
    /// sm90 GEMM: W_lm as stored, B (k, n) (what training runs), and beside it the same product
    /// with W_lm transposed, B (n, k), where each takes the shape.
    fn loss_head_input_gradient(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
    ) -> Result<Vec<Timing>> {
        let (vocab, hidden) = (bench.config.vocab_size, bench.config.hidden_size);
        let rows = loss_rows(vocab).min(bench.tokens);
        let shape = GemmShape {
            m: rows,
            n: hidden,
            k: vocab,
        };
        let mut timings = Vec::new();
        // (row name, B stored (k, n), the GEMM takes the shape)
        let layouts = [
            (
                "gemm bf16 sm90 dlogits W_lm (nn)",
                true,
                gemm_nn_sm90_fits(gpu, shape),
            ),
            (
                "gemm bf16 sm90 dlogits (W_lm^T)^T",
                false,
                gemm_sm90_fits(gpu, shape),
            ),
        ];
        if !layouts.iter().any(|&(_, _, fits)| fits) {
            return Ok(timings);
        }
        let dlogits = random_bf16(gpu, rng, "timed dlogits", rows * vocab)?;
        let (w_bits, _) = rng.bf16s(vocab * hidden, -1.0, 1.0);
        let copies = copies_for(2 * w_bits.len());
        let w = uploads(gpu, "timed lm_head", &w_bits, copies)?; // (V, C), or read as (C, V)
        drop(w_bits);
        let mut drows = GpuBuffer::<u16>::zeroed(gpu, "timed rows gradient", rows * hidden)?;
        let label = format!("{rows}x{vocab}->{hidden}");
        for (name, stored_kn, fits) in layouts {
            if !fits {
                continue;
            }
            let ms = time(gpu, |i| {
                let w = &w[i % copies];
                if stored_kn {
                    gemm_nn_bf16_sm90(gpu, &dlogits, w, &mut drows, shape, 1.0, 0.0)
                } else {
                    gemm_nt_bf16_sm90(gpu, &dlogits, w, &mut drows, shape, 1.0, 0.0)
                }
            })?;
            timings.push(timing(
                name,
                &label,
                ms,
                2 * (rows * vocab + vocab * hidden + rows * hidden),
                2.0 * (rows * vocab * hidden) as f64,
            ));
        }
        Ok(timings)
    }

    /// The fused cross-entropy (loss and gradient in place) over (T, V) bf16 logits.
    fn cross_entropy(
        gpu: &CudaDevice,
        rng: &mut SplitMix64,
        bench: &KernelBench,
    ) -> Result<Timing> {
        let (t, vocab) = (bench.tokens, bench.config.vocab_size);
        let n = t * vocab;
        let (logit_bits, _) = rng.bf16s(n, -4.0, 4.0);
        let copies = copies_for(4 * n);
        let mut logits = uploads(gpu, "timed logits", &logit_bits, copies)?;
        drop(logit_bits);
        let labels: Vec<i64> = (0..t).map(|_| rng.below(vocab) as i64).collect();
        let labels = GpuLabels::upload(gpu, &labels, vocab)?;
        let mut losses = GpuBuffer::<f32>::zeroed(gpu, "timed losses", t)?;
        let scale = 1.0 / t as f32;
        // The gradient overwrites the logits: later runs start from gradients, still finite.
        let ms = time(gpu, |i| {
            cross_entropy_bf16(gpu, &mut logits[i % copies], &labels, scale, &mut losses)
        })?;
        Ok(timing(
            "cross-entropy (fused)",
            &format!("{t}x{vocab}"),
            ms,
            4 * n + 8 * t,
            4.0 * n as f64,
        ))
    }

    /// One AdamW step over one layer's LoRA parameters as a single f32 tensor.
    fn adamw(gpu: &CudaDevice, rng: &mut SplitMix64, bench: &KernelBench) -> Result<Timing> {
        let n = lora_parameters_per_layer(&bench.config, bench.lora_rank);
        let copies = copies_for(16 * n);
        let params_host = rng.f32s(n, -0.02, 0.02);
        let grads_host = rng.f32s(n, -1e-3, 1e-3);
        let m_host = rng.f32s(n, -1e-4, 1e-4);
        let v_host = rng.f32s(n, 1e-9, 1e-7);
        let mut params = uploads(gpu, "timed LoRA parameters", &params_host, copies)?;
        let grads = uploads(gpu, "timed LoRA gradients", &grads_host, copies)?;
        let mut moments = (0..copies)
            .map(|_| {
                let mut arena = MomentArena::new(gpu, n, false)?;
                arena.write(gpu, 0, &m_host, &v_host)?;
                Ok(arena)
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = AdamWConfig::default();
        let step = AdamWStep {
            lr: 1e-4,
            step: 10,
            grad_scale: 1.0,
        };
        let ms = time(gpu, |i| {
            let j = i % copies;
            adamw_step(
                gpu,
                &cfg,
                step,
                &mut params[j],
                &grads[j],
                &mut moments[j],
                0,
            )
        })?;
        Ok(timing(
            "adamw (f32 moments)",
            &format!("{n} (r{} x 7 linears)", bench.lora_rank),
            ms,
            28 * n,
            12.0 * n as f64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::report::*;
    use super::*;

    #[test]
    fn linears_of_the_7b_shape_dedupe_to_three() {
        let config = shape_config("7b").unwrap();
        assert_eq!(
            distinct_linears(&config),
            vec![
                ("q/k/v/o".to_string(), 4096, 4096),
                ("gate/up".to_string(), 11008, 4096),
                ("down".to_string(), 4096, 11008),
            ]
        );
        // smol: 9 heads of 64 = 576, 3 KV heads = 192.
        let smol = shape_config("smol").unwrap();
        assert_eq!(
            distinct_linears(&smol),
            vec![
                ("q/o".to_string(), 576, 576),
                ("k/v".to_string(), 192, 576),
                ("gate/up".to_string(), 1536, 576),
                ("down".to_string(), 576, 1536),
            ]
        );
    }

    #[test]
    fn lora_parameters_count_rank_times_in_plus_out() {
        let config = shape_config("7b").unwrap();
        // 4 x (4096 + 4096) + 3 x (4096 + 11008), times 64.
        assert_eq!(
            lora_parameters_per_layer(&config, 64),
            64 * (4 * 8192 + 3 * 15104)
        );
    }

    #[test]
    fn bound_is_the_larger_of_bytes_and_flops() {
        let memory = Measured {
            kernel: "gemv".into(),
            shape: "-".into(),
            ms: 0.01,
            bytes: 25.4e6,
            flops: 9.0e7,
        };
        // 25.4 MB / 4.3 TB/s = 5.907 us; 2540 GB/s.
        assert!((memory.bound_ms() - 25.4e6 / 4.3e12 * 1e3).abs() < 1e-12);
        assert!((memory.gb_per_s() - 2540.0).abs() < 1e-9);
        assert!((memory.fraction_of_bound() - 0.5907).abs() < 1e-3);
        assert_eq!(memory.bound_by(), "memory");
        let compute = Measured {
            kernel: "matmul".into(),
            shape: "-".into(),
            ms: 2.0,
            bytes: 1.0e8,
            flops: 3.69e11,
        };
        assert_eq!(compute.bound_by(), "compute");
        assert!((compute.bound_ms() - 3.69e11 / 989e12 * 1e3).abs() < 1e-12);
        assert!((compute.tflop_per_s() - 184.5).abs() < 1e-9);
    }

    #[test]
    fn bad_options_are_refused() {
        let args = |list: &[&str]| Args::new(list.iter().map(|s| s.into()).collect());
        assert!(run(args(&["--tokens", "0"])).is_err());
        assert!(run(args(&["--shape", "13b"])).is_err());
        assert!(run(args(&["--bogus"])).is_err());
        assert!(run(args(&["--help"])).is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_the_error_says_how_to_build_it() {
        let args = Args::new(vec!["--shape".into(), "smol".into()]);
        let msg = run(args).unwrap_err().to_string();
        assert!(msg.contains("--features cuda"), "{msg}");
    }
}
