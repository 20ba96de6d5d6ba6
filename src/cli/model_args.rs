//! The flags every model-running command shares (`--model`, `--adapter`, `--no-quant`,
//! `--quiet`), and loading the model and tokenizer they name.

use crate::cli::Args;
use crate::device::DeviceChoice;
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
  --device auto|cpu|cuda     where to compute; the CPU for now [default: auto]
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
}

impl ModelArgs {
    /// Takes the shared flags out of `args`.
    pub fn parse(args: &mut Args) -> Result<Self> {
        let model = args.required("--model")?;
        let adapter = args.opt("--adapter")?;
        let no_quant = args.flag("--no-quant");
        let quiet = args.flag("--quiet");
        let device: String = args.opt_or("--device", "auto".to_string())?;
        if device.parse::<DeviceChoice>()? == DeviceChoice::Cuda {
            return Err(Error::unsupported(
                "--device cuda: the model commands run on the CPU backend so far (the GPU runs \
                 `sun selftest`); use --device cpu or auto",
            ));
        }
        Ok(ModelArgs {
            model,
            adapter,
            no_quant,
            quiet,
        })
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
