//! [`CudaDevice`]: the driver context on one GPU (0 unless a data-parallel rank asks for
//! another), one stream, and every kernel module loaded once.

use super::buffer::GpuBuffer;
use super::driver::{device_error, OrDevice};
use super::ptx;
use crate::error::{Error, Result};
use cust::context::{Context, ContextHandle, CurrentContext};
use cust::device::{Device, DeviceAttribute};
use cust::function::Function;
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use cust::sys::{cuDeviceGetAttribute, cuInit, cudaError_enum, CUcontext, CUdevice_attribute};
use std::cell::{Cell, RefCell};

/// The GPU: a CUDA context on one device, the stream every kernel runs on, and the PTX modules
/// built from `ptx/*.cu`, loaded (JIT-compiled by the driver) once here.
///
/// Kernels are queued on the stream and run asynchronously; [`CudaDevice::synchronize`] waits
/// for them and reports any failure. Use a device from the thread that created it. Several
/// devices may be open on one thread (a layer split): every launch, allocation and memory query
/// first makes this device's context the thread's current one ([`CudaDevice::bind`]).
pub struct CudaDevice {
    // Fields drop in order: the scratch, modules and stream before the context that owns them.
    /// The bf16 scratch a 4-bit weight is dequantized into before the sm90 GEMM (grow-only;
    /// [`CudaDevice::with_dequant_scratch`]).
    dequant_scratch: RefCell<Option<GpuBuffer<u16>>>,
    /// Whether launches through [`super::pdl::step_kernel`] use programmatic dependent launch
    /// now ([`CudaDevice::with_programmatic_launches`]).
    programmatic_launches: Cell<bool>,
    modules: Vec<(&'static str, Module)>,
    stream: Stream,
    device: Device,
    name: String,
    sm_count: u32,
    compute_capability: (u32, u32),
    /// Shared memory of one SM, and what one CTA may opt in to (bytes).
    shared_per_sm: usize,
    shared_per_block_optin: usize,
    context: Context,
}

impl CudaDevice {
    /// Initialises the driver, takes GPU 0 and loads every kernel module.
    ///
    /// Fails with [`Error::Device`] when there is no driver, no GPU, or the driver rejects the
    /// PTX (a driver older than the nvcc that built it), so callers can fall back to the CPU.
    pub fn new() -> Result<Self> {
        Self::open(0)
    }

    /// As [`CudaDevice::new`], on GPU `ordinal` (a data-parallel rank's `LOCAL_RANK`); an
    /// error when there are not that many GPUs visible.
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(Error::Device(format!(
                "GPU {ordinal} was asked for but {count} GPU(s) are visible (the GPU of a rank is \
                 its local rank: check --local-rank / LOCAL_RANK and CUDA_VISIBLE_DEVICES)"
            )));
        }
        let device = Device::get_device(ordinal as u32)
            .or_device(|| format!("opening CUDA device {ordinal}"))?;
        Self::open_initialised(device)
    }

    /// Initialises the driver and counts the visible GPUs; an error when there is no driver or
    /// no GPU.
    pub fn count() -> Result<usize> {
        // SAFETY: cuInit takes a flags word (must be 0) and has no other preconditions; it may
        // be called any number of times.
        let init = unsafe { cuInit(0) };
        if init != cudaError_enum::CUDA_SUCCESS {
            let hint = match init {
                cudaError_enum::CUDA_ERROR_STUB_LIBRARY => {
                    "the libcuda.so.1 found is a stub, not the NVIDIA driver"
                }
                cudaError_enum::CUDA_ERROR_NO_DEVICE => "no CUDA-capable GPU is visible",
                _ => "is the NVIDIA driver installed and a GPU visible?",
            };
            return Err(Error::Device(format!(
                "initialising the CUDA driver failed ({init:?}): {hint}"
            )));
        }
        let count = Device::num_devices().or_device(|| "counting CUDA devices")?;
        if count == 0 {
            return Err(Error::Device("no CUDA-capable GPU found".into()));
        }
        Ok(count as usize)
    }

    /// The context, stream and modules on `device`, once the driver is initialised.
    fn open_initialised(device: Device) -> Result<Self> {
        let name = device.name().or_device(|| "reading the GPU's name")?;
        let attribute = |attr: DeviceAttribute, what: &str| -> Result<u32> {
            let value = device
                .get_attribute(attr)
                .or_device(|| format!("reading the GPU's {what}"))?;
            u32::try_from(value)
                .map_err(|_| Error::Device(format!("the GPU reports {what} = {value}")))
        };
        let sm_count = attribute(DeviceAttribute::MultiprocessorCount, "SM count")?;
        let compute_capability = (
            attribute(
                DeviceAttribute::ComputeCapabilityMajor,
                "compute capability",
            )?,
            attribute(
                DeviceAttribute::ComputeCapabilityMinor,
                "compute capability",
            )?,
        );
        if compute_capability.0 < 8 {
            return Err(Error::unsupported(format!(
                "GPU {name} has compute capability {}.{}; the kernels need 8.0 (Ampere) or newer",
                compute_capability.0, compute_capability.1
            )));
        }
        let shared_per_sm = shared_attribute(
            &device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "shared memory per SM",
        )?;
        let shared_per_block_optin = shared_attribute(
            &device,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "opt-in shared memory per block",
        )?;
        let context = Context::new(device).or_device(|| format!("creating a context on {name}"))?;
        // A blocking stream: it synchronises with the legacy default stream that cust's
        // synchronous copies use.
        let stream = Stream::new(StreamFlags::DEFAULT, None)
            .or_device(|| format!("creating a stream on {name}"))?;
        let mut modules = Vec::with_capacity(ptx::ALL.len());
        for &(module_name, text, arch) in ptx::ALL {
            // An arch-specific module (sm_90a's wgmma) is rejected by the driver on any other
            // GPU: it is left out there, and its callers ask `has_module` first.
            if !module_runs_on(arch, compute_capability) {
                continue;
            }
            let loaded = Module::from_ptx(text, &[]).or_device(|| {
                format!(
                    "loading kernel module {module_name} (PTX for {arch}; the driver must be at \
                     least as new as the nvcc that built it)"
                )
            });
            match loaded {
                Ok(module) => modules.push((module_name, module)),
                // An arch-specific module, or a PDL twin (`_pdl`), only speeds up what a
                // portable one already does: without it the callers take the portable kernels,
                // so the GPU stays usable.
                Err(e) if arch.ends_with('a') || module_name.ends_with("_pdl") => {
                    eprintln!("warning: {e}; its kernels are not used on this GPU");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(CudaDevice {
            dequant_scratch: RefCell::new(None),
            programmatic_launches: Cell::new(false),
            modules,
            stream,
            device,
            name,
            sm_count,
            compute_capability,
            shared_per_sm,
            shared_per_block_optin,
            context,
        })
    }

    /// The GPU's name, e.g. "NVIDIA H200".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Compute capability as (major, minor), e.g. (9, 0).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// (free, total) bytes of device memory, as the driver reports them (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cust::memory::mem_get_info().or_device(|| "querying free GPU memory (cuMemGetInfo)")
    }

    /// Makes this device's context the calling thread's current one, so the driver calls that
    /// follow (allocations, copies, launches) act on this GPU. A thread-local switch, cheap
    /// enough to do before every launch.
    pub fn bind(&self) -> Result<()> {
        CurrentContext::set_current(&self.context)
            .or_device(|| format!("making {}'s context current", self.name))
    }

    /// The driver's handle of this device's context (what a buffer frees itself in).
    pub(crate) fn raw_context(&self) -> CUcontext {
        self.context.get_inner()
    }

    /// Waits for every queued kernel and copy; a kernel that failed is reported here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .or_device(|| "waiting for the GPU (a kernel queued earlier failed)")
    }

    /// The stream kernels are queued on.
    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Shared memory a CTA may use on this GPU when its kernel opts in (the driver's
    /// `MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`): 227 KiB on an H100/H200, 99 KiB on sm_86/sm_89.
    pub(crate) fn shared_per_block_optin(&self) -> usize {
        self.shared_per_block_optin
    }

    /// Shared memory of one SM, shared by its resident CTAs (the driver's
    /// `MAX_SHARED_MEMORY_PER_MULTIPROCESSOR`): 228 KiB on an H100/H200, 164 KiB on an A100.
    pub(crate) fn shared_per_sm(&self) -> usize {
        self.shared_per_sm
    }

    /// The driver's handle of the device.
    pub(crate) fn raw_device(&self) -> &Device {
        &self.device
    }

    /// Whether kernel module `module` (the file name of `ptx/<module>.cu`) was loaded: every
    /// module built for `compute_80` is; one built for an arch-specific target such as
    /// `compute_90a` (`matmul_sm90`) only on a GPU of exactly that compute capability.
    pub fn has_module(&self, module: &str) -> bool {
        self.modules.iter().any(|(name, _)| *name == module)
    }

    /// Runs `work` with the launches of [`super::pdl::step_kernel`]'s kernels made with
    /// programmatic dependent launch when `on` (where their `_pdl` modules are loaded), then
    /// restores the previous setting: for the span of a decode step's launches.
    pub(crate) fn with_programmatic_launches<R>(&self, on: bool, work: impl FnOnce() -> R) -> R {
        let before = self.programmatic_launches.replace(on);
        let result = work();
        self.programmatic_launches.set(before);
        result
    }

    /// Whether [`CudaDevice::with_programmatic_launches`] has them on now.
    pub(crate) fn programmatic_launches(&self) -> bool {
        self.programmatic_launches.get()
    }

    /// Runs `work` with the device's bf16 dequantization scratch, grown to at least `len`
    /// elements first (it never shrinks: one buffer of the largest weight dequantized so far, 90
    /// MB for a 7B model's 11008 x 4096). Kernels queued on the scratch are ordered by the one
    /// stream, so each use may overwrite the last. Growing waits for queued work before the old
    /// buffer is freed, so it must not happen while a stream is being captured into a graph.
    pub(crate) fn with_dequant_scratch<R>(
        &self,
        len: usize,
        work: impl FnOnce(&mut GpuBuffer<u16>) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self.dequant_scratch.try_borrow_mut().map_err(|_| {
            Error::Device("the dequantization scratch is already in use on this thread".into())
        })?;
        if slot.as_ref().map_or(true, |buffer| buffer.len() < len) {
            if slot.is_some() {
                self.synchronize()?; // kernels queued on the old buffer finish first
                *slot = None;
            }
            *slot = Some(GpuBuffer::zeroed(
                self,
                "dequantization scratch (bf16)",
                len,
            )?);
        }
        match slot.as_mut() {
            Some(buffer) => work(buffer),
            None => Err(Error::Device(
                "the dequantization scratch was not allocated".into(),
            )),
        }
    }

    /// Kernel `kernel` of module `module` (the file name of `ptx/<module>.cu`), with this
    /// device's context made current for its launch.
    pub(crate) fn function(&self, module: &str, kernel: &str) -> Result<Function<'_>> {
        self.bind()?;
        let (_, loaded) = self
            .modules
            .iter()
            .find(|(name, _)| *name == module)
            .ok_or_else(|| Error::Device(format!("no kernel module named {module}")))?;
        loaded
            .get_function(kernel)
            .map_err(|e| device_error(format!("finding kernel {kernel} in module {module}"), e))
    }
}

/// Whether PTX built for `arch` (`compute_80`, `compute_90a`, ...) runs on a GPU of compute
/// capability `(major, minor)`: plain targets on that capability and newer, arch-specific ones
/// (an `a` suffix) on exactly that capability. An unreadable target runs nowhere.
fn module_runs_on(arch: &str, (major, minor): (u32, u32)) -> bool {
    let Some(version) = arch.strip_prefix("compute_") else {
        return false;
    };
    let (digits, arch_specific) = match version.strip_suffix('a') {
        Some(digits) => (digits, true),
        None => (version, false),
    };
    let Ok(number) = digits.parse::<u32>() else {
        return false;
    };
    let target = (number / 10, number % 10);
    if arch_specific {
        (major, minor) == target
    } else {
        (major, minor) >= target
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("sm_count", &self.sm_count)
            .field("compute_capability", &self.compute_capability)
            .finish_non_exhaustive()
    }
}

/// A byte count the driver reports for `device` (read once, when the device opens).
fn shared_attribute(device: &Device, attribute: CUdevice_attribute, what: &str) -> Result<usize> {
    let mut value = 0i32;
    // SAFETY: `value` is a valid i32 for the driver to write, and the handle is a device the
    // driver returned.
    let result = unsafe { cuDeviceGetAttribute(&mut value, attribute, device.as_raw()) };
    if result != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "reading the GPU's {what}: CUDA driver error {result:?}"
        )));
    }
    usize::try_from(value)
        .map_err(|_| Error::Device(format!("the GPU reports {value} bytes of {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver (CI, or the stub library) this must be an error, never a panic.
    #[test]
    fn new_errors_or_reports_a_real_gpu() {
        match CudaDevice::new() {
            Ok(device) => {
                assert!(device.sm_count() > 0);
                let (free, total) = device.memory_info().unwrap();
                assert!(free <= total && total > 0);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("device: "), "{msg}");
                eprintln!("skipped: no GPU ({msg})");
            }
        }
    }

    #[test]
    fn every_ptx_module_is_embedded_for_its_target() {
        assert!(ptx::ALL.iter().any(|(name, _, _)| *name == "nf4"));
        let sm90 = ptx::ALL.iter().find(|(name, _, _)| *name == "matmul_sm90");
        assert_eq!(sm90.map(|(_, _, arch)| *arch), Some("compute_90a"));
        for (name, text, arch) in ptx::ALL {
            let target = format!(".target sm_{}", arch.trim_start_matches("compute_"));
            assert!(
                text.lines().any(|l| l.trim() == target),
                "module {name} is not {arch} PTX"
            );
        }
    }

    #[test]
    fn arch_specific_modules_run_only_on_their_own_gpu() {
        assert!(module_runs_on("compute_80", (8, 0)));
        assert!(module_runs_on("compute_80", (8, 6)));
        assert!(module_runs_on("compute_80", (9, 0)));
        assert!(module_runs_on("compute_80", (10, 0)));
        assert!(!module_runs_on("compute_90", (8, 9)));
        assert!(module_runs_on("compute_90a", (9, 0)));
        assert!(!module_runs_on("compute_90a", (8, 0)));
        assert!(!module_runs_on("compute_90a", (8, 9)));
        assert!(!module_runs_on("compute_90a", (10, 0)));
        assert!(!module_runs_on("compute_90a", (12, 0)));
        assert!(!module_runs_on("sm_90a", (9, 0)));
        assert!(!module_runs_on("compute_x", (9, 0)));
    }
}
