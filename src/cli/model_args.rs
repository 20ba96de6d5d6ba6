//! The flags every model-running command shares (`--model`, `--adapter`, `--no-quant`,
//! `--quiet`), and loading the model and tokenizer they name.

use crate::cli::Args;
use crate::device::{ComputeDevice, DeviceChoice, GpuChoice};
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
  --device auto|cpu|cuda     where to compute: cuda is the GPU; auto the GPU when one
                             initialises, else the CPU [default: auto]
  --devices LIST             GPUs to split the decoder layers over, e.g. 0,1 or all (for a
                             model too big for one GPU) [default: GPU 0 alone]
  --device-map auto|sequential
                             with --devices: auto gives each GPU a contiguous share of the
                             layers in proportion to its free memory; sequential fills the
                             first GPU before the next [default: auto]
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
    /// Which GPUs, for a layer split.
    pub gpus: GpuChoice,
}

impl ModelArgs {
    /// Takes the shared flags out of `args`.
    pub fn parse(args: &mut Args) -> Result<Self> {
        let model = args.required("--model")?;
        let adapter = args.opt("--adapter")?;
        let no_quant = args.flag("--no-quant");
        let quiet = args.flag("--quiet");
        let device: DeviceChoice = args.opt_or("--device", "auto".to_string())?.parse()?;
        let devices = args
            .opt::<String>("--devices")?
            .map(|list| list.parse())
            .transpose()?;
        let map = args.opt_or("--device-map", "auto".to_string())?.parse()?;
        Ok(ModelArgs {
            model,
            adapter,
            no_quant,
            quiet,
            device,
            gpus: GpuChoice { devices, map },
        })
    }

    /// `--device` as the model can use it: the GPU path runs NF4 base weights only, so with
    /// `--no-quant` `auto` is the CPU and `cuda` an error.
    pub fn device_choice(&self) -> Result<DeviceChoice> {
        match (self.no_quant, self.device) {
            (true, DeviceChoice::Cuda) => Err(Error::unsupported(
                "--no-quant runs on the CPU: the GPU path needs the NF4 base weights (drop \
                 --no-quant, or use --device cpu)",
            )),
            (true, _) => Ok(DeviceChoice::Cpu),
            (false, choice) => Ok(choice),
        }
    }

    /// Resolves `--device` (see [`ModelArgs::device_choice`]); names the GPU on stderr when it
    /// is one. The GPU's context is current on the calling thread: call this on the thread
    /// that will run the model.
    pub fn compute_device(&self) -> Result<ComputeDevice> {
        let device = crate::device::resolve_gpus(self.device_choice()?, &self.gpus)?;
        if !self.quiet && !matches!(device, ComputeDevice::Cpu) {
            eprintln!("device: {}", device.describe());
        }
        Ok(device)
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
