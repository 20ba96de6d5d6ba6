//! The flags every model-running command shares (`--model`, `--adapter`, `--no-quant`,
//! `--quiet`), and loading the model and tokenizer they name.

use crate::cli::Args;
use crate::device::{ComputeDevice, DeviceChoice};
use crate::error::{Error, Result};
use crate::model::{Llama, LoadOptions};
use crate::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Help lines for the shared flags.
pub const MODEL_FLAGS_HELP: &str = "\
  --model DIR                Hugging Face model folder (config.json, safetensors, tokenizer.json)
  --adapter DIR              PEFT LoRA adapter folder to apply (unmerged)
  --no-quant                 keep the linear weights in f32 instead of NF4 (blocksize 64,
                             double quant)
  --device auto|cpu|cuda     where to compute: train, generate and eval run on the GPU with
                             cuda, or with auto when one initialises; chat runs on the CPU
                             [default: auto]
  --quiet                    no progress on stderr
";

/// Parsed shared flags.
#[derive(Clone, Debug)]
pub struct ModelArgs {
    /// The model folder.
    pub model: PathBuf,
    /// An adapter folder.
    pub adapter: Option<PathBuf>,
    /// Keep linear weights dense.
    pub no_quant: bool,
    /// No progress output.
    pub quiet: bool,
    /// Where to compute.
    pub device: DeviceChoice,
}

impl ModelArgs {
    /// Takes the shared flags out of `args`.
    pub fn parse(args: &mut Args) -> Result<Self> {
        let model = args.required("--model")?;
        let adapter = args.opt("--adapter")?;
        let no_quant = args.flag("--no-quant");
        let quiet = args.flag("--quiet");
        let device: DeviceChoice = args.opt_or("--device", "auto".to_string())?.parse()?;
        Ok(ModelArgs {
            model,
            adapter,
            no_quant,
            quiet,
            device,
        })
    }

    /// Resolves `--device` for a command that runs on the GPU too; names the GPU on stderr
    /// when it is one.
    pub fn compute_device(&self) -> Result<ComputeDevice> {
        if self.no_quant && self.device != DeviceChoice::Cpu {
            // The GPU path runs 4-bit base weights only.
            if self.device == DeviceChoice::Cuda {
                return Err(Error::unsupported(
                    "--no-quant runs on the CPU: the GPU path needs the NF4 base weights (drop \
                     --no-quant, or use --device cpu)",
                ));
            }
            return Ok(ComputeDevice::Cpu);
        }
        let device = crate::device::resolve(self.device)?;
        if !self.quiet && !matches!(device, ComputeDevice::Cpu) {
            eprintln!("device: {}", device.describe());
        }
        Ok(device)
    }

    /// Fails on `--device cuda` for a command that runs on the CPU only (`auto` is the CPU).
    pub fn require_cpu(&self, command: &str) -> Result<()> {
        if self.device == DeviceChoice::Cuda {
            return Err(Error::unsupported(format!(
                "--device cuda: {command} runs on the CPU; use --device cpu or auto"
            )));
        }
        Ok(())
    }

    /// Loads the tokenizer of the model folder.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.model.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::invalid(format!(
                "{}: no tokenizer.json in the model folder",
                self.model.display()
            )));
        }
        Tokenizer::from_file(&path)
    }

    /// Loads the model (NF4 unless `--no-quant`) with the adapter, if any.
    pub fn load(&self) -> Result<Llama> {
        let opts = LoadOptions {
            quiet: self.quiet,
            quantize: !self.no_quant,
        };
        let mut model = Llama::load(&self.model, &opts)?;
        if let Some(dir) = &self.adapter {
            model.attach_adapter(dir)?;
        }
        Ok(model)
    }
}
