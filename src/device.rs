//! `--device auto|cpu|cuda`: the flag every computing command takes, and its resolution to the
//! CPU or initialised GPUs (one, or several with `--devices` for a layer split).

use crate::error::{Error, Result};
use crate::model::device_map::{DeviceList, DeviceMap};
use std::fmt;
use std::str::FromStr;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU when this binary has CUDA and one initialises, else the CPU.
    Auto,
    /// The CPU backend (the reference).
    Cpu,
    /// The CUDA backend; an error when it is unavailable.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(Error::invalid(format!(
                "--device: expected auto, cpu or cuda, got {s:?}"
            ))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// The GPUs a model runs on: `--devices` (default: the first GPU) and `--device-map`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuChoice {
    /// The GPUs named; `None` is GPU 0 alone.
    pub devices: Option<DeviceList>,
    /// How the layers are spread over several.
    pub map: DeviceMap,
}

impl Default for GpuChoice {
    fn default() -> Self {
        GpuChoice {
            devices: None,
            map: DeviceMap::Auto,
        }
    }
}

/// Initialised GPUs, in the order the model's layers are placed on them, and how to place
/// them.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct GpuSet {
    devices: Vec<crate::backend::cuda::CudaDevice>,
    map: DeviceMap,
}

#[cfg(feature = "cuda")]
impl GpuSet {
    /// The first GPU (the only one unless the layers are split).
    pub fn primary(&self) -> &crate::backend::cuda::CudaDevice {
        &self.devices[0]
    }

    /// How many GPUs there are.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Never true: a set holds at least one GPU.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// `host` uploaded to these GPUs: on the one, or split by the device map.
    pub fn model(&self, host: crate::model::Llama) -> Result<crate::model::gpu::GpuLlama<'_>> {
        match self.devices.as_slice() {
            [one] => crate::model::gpu::GpuLlama::new(one, host),
            many => {
                let refs: Vec<_> = many.iter().collect();
                crate::model::gpu::GpuLlama::split(&refs, self.map, host)
            }
        }
    }
}

/// Where computation runs, once resolved.
#[derive(Debug)]
pub enum ComputeDevice {
    /// The CPU backend.
    Cpu,
    /// Initialised GPUs.
    #[cfg(feature = "cuda")]
    Cuda(GpuSet),
}

impl ComputeDevice {
    /// "cpu", "cuda (<GPU name>)", or for a layer split "cuda (<n> GPUs: <names>; device map
    /// <map>)".
    pub fn describe(&self) -> String {
        match self {
            ComputeDevice::Cpu => "cpu".to_string(),
            #[cfg(feature = "cuda")]
            ComputeDevice::Cuda(gpus) => match gpus.devices.as_slice() {
                [one] => format!("cuda ({})", one.name()),
                many => format!(
                    "cuda ({} GPUs: {}; device map {})",
                    many.len(),
                    many.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
                    gpus.map
                ),
            },
        }
    }
}

/// True when this binary was built with the `cuda` feature.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// Resolves `choice`: `Cpu` is the CPU; `Cuda` initialises the GPU or fails saying why; `Auto`
/// tries the GPU (when compiled in) and falls back to the CPU with one note on stderr.
///
/// A `cuda` build starts without the NVIDIA driver: `libcuda.so.1` is loaded here, on the first
/// try, so a machine without it gets the CPU under `Auto` and, under `Cuda`, an error beginning
/// "no NVIDIA driver (libcuda.so.1) found".
pub fn resolve(choice: DeviceChoice) -> Result<ComputeDevice> {
    resolve_gpus(choice, &GpuChoice::default())
}

/// As [`resolve`], the GPU side opening the GPUs `gpus` names (for a layer split). `--devices`
/// naming several GPUs with `--device cpu` is an error.
pub fn resolve_gpus(choice: DeviceChoice, gpus: &GpuChoice) -> Result<ComputeDevice> {
    if choice == DeviceChoice::Cpu && gpus.devices.is_some() {
        return Err(Error::invalid(
            "--devices names GPUs but the model runs on the CPU (--device cpu, or --no-quant): \
             drop one of them",
        ));
    }
    let open_cuda = || open_gpus(gpus);
    match choice {
        DeviceChoice::Cpu => Ok(ComputeDevice::Cpu),
        DeviceChoice::Cuda => open_cuda().map_err(|e| match e {
            Error::Device(reason) => Error::Device(format!(
                "{reason}; use --device cpu (or auto) to run on the CPU"
            )),
            other => other,
        }),
        DeviceChoice::Auto => match open_cuda() {
            Ok(device) => Ok(device),
            Err(e) => {
                if CUDA_COMPILED {
                    eprintln!("note: no usable GPU ({e}); running on the CPU");
                }
                Ok(ComputeDevice::Cpu)
            }
        },
    }
}

/// Loads the driver library (the binary does not need it to start), then initialises GPU
/// `ordinal` (a data-parallel rank takes the GPU of its local rank).
#[cfg(feature = "cuda")]
pub fn open_gpu(ordinal: usize) -> Result<ComputeDevice> {
    crate::backend::cuda::driver_api::require_driver().map_err(Error::Device)?;
    let device = crate::backend::cuda::CudaDevice::open(ordinal)?;
    Ok(ComputeDevice::Cuda(GpuSet {
        devices: vec![device],
        map: DeviceMap::Auto,
    }))
}

/// As [`open_gpu`], every GPU `gpus` names (GPU 0 when it names none).
#[cfg(feature = "cuda")]
fn open_gpus(gpus: &GpuChoice) -> Result<ComputeDevice> {
    use crate::backend::cuda::CudaDevice;
    let Some(list) = &gpus.devices else {
        return open_gpu(0);
    };
    crate::backend::cuda::driver_api::require_driver().map_err(Error::Device)?;
    let ordinals = list.resolve(CudaDevice::count()?)?;
    let devices = ordinals
        .into_iter()
        .map(CudaDevice::open)
        .collect::<Result<Vec<_>>>()?;
    Ok(ComputeDevice::Cuda(GpuSet {
        devices,
        map: gpus.map,
    }))
}

/// Without the `cuda` feature there is no GPU to open: an error saying how to build one.
#[cfg(not(feature = "cuda"))]
pub fn open_gpu(_ordinal: usize) -> Result<ComputeDevice> {
    Err(Error::unsupported(
        "this binary was built without CUDA; rebuild with `cargo build --release --features \
         cuda` (needs the CUDA toolkit's nvcc) or use --device cpu",
    ))
}

#[cfg(not(feature = "cuda"))]
fn open_gpus(_gpus: &GpuChoice) -> Result<ComputeDevice> {
    open_gpu(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_choices_and_rejects_others() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda);
        let msg = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert_eq!(msg, "--device: expected auto, cpu or cuda, got \"tpu\"");
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(choice.to_string().parse::<DeviceChoice>().unwrap(), choice);
        }
    }

    #[test]
    fn gpu_lists_are_refused_on_the_cpu() {
        let split = GpuChoice {
            devices: Some(DeviceList::Ordinals(vec![0, 1])),
            map: DeviceMap::Auto,
        };
        let msg = resolve_gpus(DeviceChoice::Cpu, &split)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--devices names GPUs"), "{msg}");
        assert!(resolve_gpus(DeviceChoice::Cpu, &GpuChoice::default()).is_ok());
        // Without a usable GPU, auto still falls back to the CPU whatever the list.
        assert!(resolve_gpus(DeviceChoice::Auto, &split).is_ok());
    }

    #[test]
    fn cpu_always_resolves_and_auto_never_fails() {
        assert!(matches!(
            resolve(DeviceChoice::Cpu).unwrap(),
            ComputeDevice::Cpu
        ));
        // With no GPU (or no CUDA in the build) auto falls back to the CPU.
        assert!(resolve(DeviceChoice::Auto).is_ok());
    }

    /// On a machine without the NVIDIA driver (CI, the development machine) `--device cuda`
    /// names what is missing; with a driver or the link stub on the library path it is another
    /// device error, or a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_says_so() {
        let loaded = crate::dynlib::DynLib::open("libcuda.so.1").is_ok();
        match resolve(DeviceChoice::Cuda) {
            Err(e) if !loaded => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("device: no NVIDIA driver (libcuda.so.1) found: "),
                    "{msg}"
                );
                assert!(
                    msg.ends_with("use --device cpu (or auto) to run on the CPU"),
                    "{msg}"
                );
            }
            Err(e) => assert!(e.to_string().starts_with("device: "), "{e}"),
            Ok(device) => eprintln!("skipped: a GPU is present ({})", device.describe()),
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let msg = resolve(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(msg.contains("built without CUDA"), "{msg}");
    }
}
