//! The model workloads of `sun bench`: generation and training on random weights in a real
//! shape (speed does not depend on the values).

use crate::cli::dist_args::DistArgs;
use crate::cli::Args;
use crate::device::{ComputeDevice, DeviceChoice};
use crate::dist::GradientReducer;
use crate::error::{Error, Result};
use crate::formats::peft::AdapterConfig;
use crate::model::device_map::{checkpoint_bytes, host_checkpoint_bytes};
use crate::model::lora::TARGET_MODULES;
use crate::model::random::shape_config;
use crate::model::tape_budget::budget_bytes;
use crate::model::train_pass::{CheckpointPlace, PassOptions};
use crate::model::{Llama, LlamaConfig, TrainModel};
use crate::optim::{AdamWConfig, OptimizerStep};
use crate::rng::Rng;
use crate::sampling::{generate_with, CpuDecoder, Sampler, SamplingParams};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// `--shape smol|1b|7b` or a config.json path.
fn parse_shape(args: &mut Args) -> Result<(String, LlamaConfig)> {
    let shape: String = args.opt_or("--shape", "smol".to_string())?;
    let config = if shape.ends_with(".json") {
        LlamaConfig::load(Path::new(&shape))?
    } else {
        shape_config(&shape)?
    };
    Ok((shape, config))
}

/// The process's peak resident memory in bytes (Linux `VmHWM`), if known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// `sun bench generate`: prefill a random prompt, then decode greedily, on the CPU or the GPU,
/// optionally with an unmerged LoRA adapter on all seven linears.
pub fn bench_generate(mut args: Args) -> Result<()> {
    let (shape, config) = parse_shape(&mut args)?;
    let prompt_tokens: usize = args.opt_or("--prompt-tokens", 128)?;
    let new_tokens: usize = args.opt_or("--new-tokens", 64)?;
    let lora_r: usize = args.opt_or("--lora-r", 0)?;
    let quantize = !args.flag("--no-quant");
    let device: DeviceChoice = args.opt_or("--device", "cpu".to_string())?.parse()?;
    let json = args.flag("--json");
    args.finish()?;
    if prompt_tokens == 0 || new_tokens == 0 {
        return Err(Error::invalid(
            "--prompt-tokens and --new-tokens must be positive",
        ));
    }
    let device = crate::device::resolve(device)?;
    let vocab = config.vocab_size;
    let mut model = Llama::random(config, quantize, 1)?;
    let mut rng = Rng::new(2);
    if lora_r > 0 {
        let lora = AdapterConfig {
            r: lora_r,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            base_model_name_or_path: shape.clone(),
        };
        model.attach_new_lora(&lora, &mut rng)?;
    }
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|_| rng.below(vocab) as u32)
        .collect();
    let max_len = prompt_tokens + new_tokens;
    let mut first = None;
    let mut sampler = Sampler::new(SamplingParams::greedy())?;
    let on_token = |_| {
        first.get_or_insert_with(Instant::now);
        Ok(())
    };
    // Each arm stops the clock as generation ends: the model and its cache are freed when the
    // arm's scope closes, and that (a synchronising free per buffer) is not decoding.
    // `pdl`: whether decode steps used programmatic dependent launch (GPU only), or why not;
    // `tiled`: the device bytes of the layers' tiled decode copies (GPU only).
    let (device_name, start, end, gen, pdl, tiled) = match &device {
        ComputeDevice::Cpu => {
            let mut cache = model.new_cache(max_len);
            let mut decoder = CpuDecoder {
                model: &model,
                cache: &mut cache,
            };
            let start = Instant::now();
            let gen = generate_with(
                &mut decoder,
                &prompt,
                new_tokens,
                &[],
                &mut sampler,
                on_token,
            )?;
            (
                format!("CPU ({} threads)", rayon::current_num_threads()),
                start,
                Instant::now(),
                gen,
                None::<std::result::Result<(), String>>,
                None::<usize>,
            )
        }
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let mut gpu_model = gpu.model(model)?;
            let pdl = gpu_model.pdl_status();
            let tiled = gpu_model.prepare_tiled_decode()?;
            let mut decoder =
                crate::model::gpu::GpuDecoder::for_generation(&mut gpu_model, max_len)?;
            let start = Instant::now();
            let gen = generate_with(
                &mut decoder,
                &prompt,
                new_tokens,
                &[],
                &mut sampler,
                on_token,
            )?;
            let end = Instant::now();
            let name = format!("cuda ({})", gpu.primary().name());
            (name, start, end, gen, Some(pdl), Some(tiled))
        }
    };
    let prefill_s = first
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(0.0);
    let decode_s = end.duration_since(start).as_secs_f64() - prefill_s;
    // The first new token comes out of the prefill; the rest are decode steps.
    let decode_tps = gen.tokens.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
    #[cfg(feature = "cuda")]
    crate::backend::cuda::profile::print_report(
        "token (prefill included)",
        gen.tokens.len(),
        1e3 * end.duration_since(start).as_secs_f64(),
    )?;
    let prefill_tps = prompt_tokens as f64 / prefill_s.max(1e-9);
    let report = json!({"workload": "generate", "device": device_name, "shape": shape, "nf4": quantize,
        "lora_r": lora_r, "prompt_tokens": prompt_tokens, "new_tokens": gen.tokens.len(),
        "prefill_tokens_per_second": prefill_tps, "decode_tokens_per_second": decode_tps,
        "peak_rss_bytes": peak_rss(), "threads": rayon::current_num_threads(),
        "pdl": pdl.as_ref().map(|p| p.is_ok()),
        "pdl_off_reason": pdl.as_ref().and_then(|p| p.as_ref().err()),
        "tiled_decode_bytes": tiled});
    if json {
        println!("{report}");
    } else {
        let adapter = if lora_r > 0 {
            format!(", LoRA r={lora_r} unmerged")
        } else {
            String::new()
        };
        let pdl = match &pdl {
            None => String::new(),
            Some(Ok(())) => ", PDL on".to_string(),
            Some(Err(reason)) => format!(", PDL off: {reason}"),
        };
        // The tiled copies cost about the 4-bit weights' size again in device memory.
        let pdl = match tiled {
            Some(bytes) => format!(
                "{pdl}, tiled decode copy {:.0} MiB",
                bytes as f64 / (1u64 << 20) as f64
            ),
            None => pdl,
        };
        println!(
            "generate, {shape} shape{}{adapter}, {device_name}{pdl}: prefill {prompt_tokens} tokens at {prefill_tps:.1} tokens/s, decode {} tokens at {decode_tps:.1} tokens/s",
            if quantize { ", NF4" } else { ", f32" },
            gen.tokens.len()
        );
    }
    Ok(())
}

/// `sun bench train`: QLoRA optimizer steps on random sequences, on the CPU or the GPU; with
/// `--nproc N` (or ranks started by the user) data-parallel over NCCL, each rank training
/// `--batch` sequences a step and rank 0 reporting the tokens/s of all of them.
pub fn bench_train(mut args: Args) -> Result<()> {
    let (shape, config) = parse_shape(&mut args)?;
    let seq_len: usize = args.opt_or("--seq-len", 256)?;
    let batch: usize = args.opt_or("--batch", 2)?;
    let steps: usize = args.opt_or("--steps", 2)?;
    let r: usize = args.opt_or("--lora-r", 64)?;
    let dropout: f32 = args.opt_or("--lora-dropout", 0.1)?;
    let checkpointing = !args.flag("--no-gradient-checkpointing");
    let checkpoints: CheckpointPlace = args.opt_or("--checkpoints", CheckpointPlace::Host)?;
    let tape_budget = budget_bytes(args.opt_or("--tape-budget", 0.0f64)?)?;
    let adamw_in_device_memory = args.flag("--no-paged-optimizer");
    let device: DeviceChoice = args.opt_or("--device", "cpu".to_string())?.parse()?;
    let json = args.flag("--json");
    let dist = DistArgs::parse(&mut args)?;
    args.finish()?;
    if seq_len < 2 || batch == 0 || steps == 0 || r == 0 {
        return Err(Error::invalid(
            "--seq-len must be at least 2 and --batch, --steps, --lora-r positive",
        ));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::invalid(format!(
            "--lora-dropout: {dropout} must be in [0, 1)"
        )));
    }
    if dist.launches() {
        let file =
            std::env::temp_dir().join(format!("sun-bench-rendezvous-{}", std::process::id()));
        return dist.launch(&file);
    }
    let group = dist.group()?;
    let (lead, world) = group
        .as_ref()
        .map_or((true, 1), |g| (g.ranks.is_lead(), g.ranks.world_size));
    let device = match &group {
        None => crate::device::resolve(device)?,
        Some(_) if device == DeviceChoice::Cpu => {
            return Err(Error::unsupported(
                "a data-parallel bench runs on GPUs over NCCL: add --device cuda",
            ))
        }
        Some(g) => crate::device::open_gpu(g.ranks.local_rank)?,
    };
    #[cfg(feature = "cuda")]
    let mut reducer: Option<Box<dyn GradientReducer + '_>> = match (&group, &device) {
        (Some(g), ComputeDevice::Cuda(gpus)) => Some(Box::new(crate::dist::join_gpu_group(
            gpus.primary(),
            g,
            false,
        )?)),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let mut reducer: Option<Box<dyn GradientReducer>> = None;
    let vocab = config.vocab_size;
    let build_start = Instant::now();
    let mut llama = Llama::random(config, true, 1)?;
    let lora = AdapterConfig {
        r,
        lora_alpha: 16.0,
        lora_dropout: dropout,
        target_modules: TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        base_model_name_or_path: shape.clone(),
    };
    let mut rng = Rng::new(3);
    llama.attach_new_lora(&lora, &mut rng)?;
    let mut model: Box<dyn TrainModel + '_> = match &device {
        ComputeDevice::Cpu => Box::new(llama),
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpus) => Box::new(gpus.model(llama)?),
    };
    let build_s = build_start.elapsed().as_secs_f64();
    let opts = PassOptions {
        lora_dropout: dropout,
        gradient_checkpointing: checkpointing,
        checkpoints,
        tape_budget,
    };
    let mut step_times = Vec::new();
    for step in 1..=steps {
        let sequences: Vec<Vec<u32>> = (0..batch)
            .map(|_| (0..seq_len).map(|_| rng.below(vocab) as u32).collect())
            .collect();
        let start = Instant::now();
        let scale = 1.0 / (world * batch * (seq_len - 1)) as f32;
        let labels: Vec<Vec<i64>> = sequences
            .iter()
            .map(|ids| ids.iter().map(|&i| i64::from(i)).collect())
            .collect();
        let batch_refs: Vec<(&[u32], &[i64])> = sequences
            .iter()
            .zip(&labels)
            .map(|(ids, labels)| (&ids[..], &labels[..]))
            .collect();
        model.train_batch(&batch_refs, scale, opts, &mut rng)?;
        if let Some(reducer) = reducer.as_mut() {
            model.reduce_gradients(reducer.as_mut())?;
        }
        model.optimizer_step(&OptimizerStep {
            adamw: AdamWConfig::default(),
            lr: 2e-4,
            step: step as u64,
            max_grad_norm: 0.3,
            paged: !adamw_in_device_memory,
        })?;
        step_times.push(start.elapsed().as_secs_f64());
        #[cfg(feature = "cuda")]
        if step == 1 && steps > 1 {
            // The first step's spans hold the warm-up (allocations, JIT): left out.
            crate::backend::cuda::profile::report()?;
        }
    }
    #[cfg(feature = "cuda")]
    if lead {
        let profiled = &step_times[usize::from(steps > 1)..];
        let wall_ms = 1e3 * profiled.iter().sum::<f64>();
        crate::backend::cuda::profile::print_report("step", profiled.len(), wall_ms)?;
    }
    let gpu_memory = model.device_memory_in_use()?;
    // The layers whose recompute the tape budget skipped (checkpointing on a GPU).
    let tapes = model.tapes_kept().filter(|_| checkpointing);
    // What the layer inputs take where they wait for the backward, on a GPU holding every layer
    // (the CPU keeps everything in host memory): the inputs of the layers that kept no tape.
    let on_gpu = checkpointing && gpu_memory.is_some();
    let (checkpoints_on_gpu, checkpoints_on_host) = if on_gpu {
        let c = &model.llama().config;
        let (rows, layers) = (batch * seq_len, c.num_hidden_layers);
        let taped = tapes.map_or(0, |t| t.layers);
        let recomputed = layers - taped.min(layers);
        // `host_checkpoint_bytes` parks every layer's input but the model's last one; with
        // tapes kept, the last layer is among them, so every recomputed layer's input is parked.
        let parked_as_layers = recomputed + usize::from(taped > 0);
        (
            checkpoint_bytes(c.hidden_size, rows, recomputed, checkpoints),
            host_checkpoint_bytes(c.hidden_size, rows, parked_as_layers, checkpoints),
        )
    } else {
        (0, 0)
    };
    let first_step_s = step_times[0];
    step_times.sort_by(f64::total_cmp);
    let step_s = step_times[step_times.len() / 2];
    // Every rank trains `batch` sequences a step: the run's throughput is all of theirs.
    let tps = (world * batch * seq_len) as f64 / step_s;
    if !lead {
        return Ok(());
    }
    let report = json!({"workload": "train", "device": model.device_name(), "shape": shape, "seq_len": seq_len,
        "batch": batch, "world_size": world, "lora_r": r, "lora_dropout": dropout, "gradient_checkpointing": checkpointing, "checkpoints": checkpoints.to_string(),
        "steps": steps, "paged_optimizer": !adamw_in_device_memory, "first_step_seconds": first_step_s, "median_step_seconds": step_s,
        "tokens_per_second": tps, "gpu_memory_in_use_bytes": gpu_memory,
        "checkpoint_bytes_on_gpu": checkpoints_on_gpu, "checkpoint_bytes_on_host": checkpoints_on_host,
        "tape_budget_bytes": tape_budget, "tape_layers": tapes.map(|t| t.layers), "tape_bytes": tapes.map(|t| t.bytes), "build_seconds": build_s,
        "peak_rss_bytes": peak_rss(), "threads": rayon::current_num_threads()});
    if json {
        println!("{report}");
    } else {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let memory = gpu_memory
            .map(|b| format!(", GPU memory in use {:.2} GiB", gib(b as u64)))
            .unwrap_or_default();
        let kept = if on_gpu {
            format!(
                ", checkpoints {checkpoints} ({:.2} GiB on the GPU, {:.2} GiB pinned on the host)",
                gib(checkpoints_on_gpu as u64),
                gib(checkpoints_on_host as u64)
            )
        } else {
            String::new()
        };
        let taped = tapes
            .map(|t| {
                format!(
                    ", tapes kept for {} of {} layers ({:.2} GiB of a {:.2} GiB budget per GPU)",
                    t.layers,
                    model.llama().config.num_hidden_layers,
                    gib(t.bytes as u64),
                    gib(tape_budget as u64)
                )
            })
            .unwrap_or_default();
        println!(
            "train, {shape} shape, NF4 + LoRA r={r} (dropout {dropout}), {}{}: batch {batch} x {seq_len}{}, median step {step_s:.3}s over {steps} (first {first_step_s:.3}s), {tps:.1} tokens/s{memory}{kept}{taped}, peak RSS {:.2} GiB",
            model.device_name(),
            if world > 1 { format!(" x {world} ranks") } else { String::new() },
            if world > 1 { " per rank" } else { "" },
            gib(peak_rss().unwrap_or(0))
        );
    }
    Ok(())
}
