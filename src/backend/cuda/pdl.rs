//! Programmatic dependent launch (PDL, compute capability 9.0 and newer) for the kernels of a
//! decode step: each is launched with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`
//! (`cuLaunchKernelEx`), so the GPU may start it while the kernel before it drains; it runs its
//! prologue (a GEMV's first weight loads) and waits (`griddepcontrol.wait`) only before it
//! touches what earlier kernels write. Stream capture records these programmatic edges into the
//! decode step's CUDA graph.
//!
//! The kernels that wait are built twice: `ptx/<module>.cu` for `compute_80` as ever, and
//! `ptx/<module>_pdl.cu` (the same source with `SUN_PDL` set, `ptx/pdl.cuh`) for `compute_90`,
//! loaded only on such GPUs. A launch wrapper asks [`step_kernel`] for its kernel: while
//! [`CudaDevice::with_programmatic_launches`] is on and the `_pdl` twin is loaded, it gets the
//! twin's function and launches it with the attribute ([`launch_step!`]); otherwise today's
//! function and an ordinary launch. Every kernel of the `_pdl` twins that a wrapper takes this
//! way calls `pdl_wait()` first: a kernel launched with the attribute that never waits could
//! read stale data.
//!
//! `SUN_NO_PDL=1` (any value) turns it off; [`unavailable`] says why a GPU cannot use it.

use super::device::CudaDevice;
use super::driver::{check, OrDevice};
use super::driver_api::{
    cuLaunchKernelEx, CUlaunchAttribute, CUlaunchAttributeValue, CUlaunchConfig,
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
};
use crate::error::Result;
use cust::function::{BlockSize, Function, GridSize};
use std::ffi::c_void;

/// The environment variable that turns PDL off (`SUN_NO_PDL=1`).
pub const NO_PDL_VARIABLE: &str = "SUN_NO_PDL";

/// The kernel modules with a `_pdl` twin (`ptx/<module>_pdl.cu`): those of a decode step.
const TWINNED_MODULES: [&str; 7] = [
    "attention",
    "decode",
    "elementwise",
    "gemv",
    "gemv4_tiled",
    "nf4",
    "norm",
];

/// The module name of `module`'s PDL twin.
fn twin_name(module: &str) -> String {
    format!("{module}_pdl")
}

/// Whether the environment leaves PDL on (no `SUN_NO_PDL`): the default of a model's decode.
pub fn allowed_by_environment() -> bool {
    std::env::var_os(NO_PDL_VARIABLE).is_none()
}

/// Why `device` cannot launch a decode step's kernels with PDL, in words; `None` when it can
/// (compute capability 9.0 or newer and every `_pdl` module loaded).
pub fn unavailable(device: &CudaDevice) -> Option<String> {
    let (major, minor) = device.compute_capability();
    if major < 9 {
        return Some(format!(
            "compute capability {major}.{minor} (programmatic dependent launch needs 9.0 or newer)"
        ));
    }
    let missing: Vec<String> = TWINNED_MODULES
        .iter()
        .map(|m| twin_name(m))
        .filter(|twin| !device.has_module(twin))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the kernel modules {} did not load (see the warnings above)",
            missing.join(", ")
        )
    })
}

/// A kernel of a decode step, ready to launch: the `_pdl` twin's function with the attribute,
/// or the ordinary module's without.
pub(crate) struct StepKernel<'d> {
    device: &'d CudaDevice,
    function: Function<'d>,
    name: &'d str,
    programmatic: bool,
}

/// Kernel `name` of `module` for a launch on `device`: from `module`'s `_pdl` twin, launched
/// with PDL, while the device's programmatic launches are on and the twin is loaded; else from
/// `module`, launched as usual. `module` must be one of the twinned modules and `name` a kernel
/// that calls `pdl_wait()` before touching what earlier kernels write.
pub(crate) fn step_kernel<'d>(
    device: &'d CudaDevice,
    module: &str,
    name: &'d str,
) -> Result<StepKernel<'d>> {
    debug_assert!(
        TWINNED_MODULES.contains(&module),
        "{module} has no _pdl twin"
    );
    if device.programmatic_launches() {
        let twin = twin_name(module);
        if device.has_module(&twin) {
            return Ok(StepKernel {
                device,
                function: device.function(&twin, name)?,
                name,
                programmatic: true,
            });
        }
    }
    Ok(StepKernel {
        device,
        function: device.function(module, name)?,
        name,
        programmatic: false,
    })
}

impl StepKernel<'_> {
    /// Queues the kernel on the device's stream over `grid` x `block` with `shared` bytes of
    /// dynamic shared memory; `what` names the launch in an error. Use [`launch_step!`], which
    /// builds `params` as cust's `launch!` does.
    ///
    /// # Safety
    /// `params` holds one pointer per kernel parameter, in order, each to a value of the
    /// parameter's type and layout, alive for the call; the grid, block and shared memory are
    /// what the kernel expects, and the buffers it reaches are valid for what it does with them
    /// (the same contract as cust's `launch!`).
    pub(crate) unsafe fn launch(
        &self,
        grid: impl Into<GridSize>,
        block: impl Into<BlockSize>,
        shared: u32,
        params: &[*mut c_void],
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let stream = self.device.stream();
        if !self.programmatic {
            // SAFETY: the caller's contract is cust's launch contract.
            return unsafe { stream.launch(&self.function, grid, block, shared, params) }
                .or_device(what);
        }
        let (grid, block): (GridSize, BlockSize) = (grid.into(), block.into());
        let mut attribute = CUlaunchAttribute {
            id: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: CUlaunchAttributeValue {
                programmatic_stream_serialization_allowed: 1,
                pad: [0; 60],
            },
        };
        let config = CUlaunchConfig {
            gridDimX: grid.x,
            gridDimY: grid.y,
            gridDimZ: grid.z,
            blockDimX: block.x,
            blockDimY: block.y,
            blockDimZ: block.z,
            sharedMemBytes: shared,
            hStream: stream.as_inner(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: `config` has cuda.h's layout (driver_api's layout test) and points at one
        // attribute that lives until the call returns; the function belongs to this device's
        // context, made current by `device.function`; the parameters are the caller's (see
        // above), and `extra` is null as cust's launch passes it.
        let code = unsafe {
            cuLaunchKernelEx(
                &config,
                self.function.to_raw(),
                params.as_ptr() as *mut *mut c_void,
                std::ptr::null_mut(),
            )
        };
        check(
            code,
            &format!("{} (with PDL, kernel {})", what(), self.name),
        )
    }
}

/// Launches a [`StepKernel`] with its arguments as cust's `launch!` does:
/// `launch_step!(kernel<<<grid, block, shared>>>(a, b, ...), || "what".to_string())`, with
/// `shared` one token (a literal or a name). Every argument must be `DeviceCopy`. Unsafe: see
/// [`StepKernel::launch`].
macro_rules! launch_step {
    ($kernel:ident <<<$grid:expr, $block:expr, $shared:tt>>>($($arg:expr),* $(,)?), $what:expr) => {{
        fn assert_device_copy<T: cust::memory::DeviceCopy>(_: &T) {}
        $(assert_device_copy(&$arg);)*
        $kernel.launch(
            $grid,
            $block,
            $shared,
            &[$(&$arg as *const _ as *mut ::std::ffi::c_void),*],
            $what,
        )
    }};
}
pub(crate) use launch_step;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_twinned_module_has_its_pdl_twin_built_for_compute_90() {
        for module in TWINNED_MODULES {
            let ordinary = super::super::ptx::ALL
                .iter()
                .find(|(name, _, _)| *name == module);
            assert_eq!(ordinary.map(|m| m.2), Some("compute_80"), "{module}");
            let twin = twin_name(module);
            let built = super::super::ptx::ALL
                .iter()
                .find(|(name, _, _)| *name == twin);
            let Some((_, text, arch)) = built else {
                panic!("no module {twin}");
            };
            assert_eq!(*arch, "compute_90", "{twin}");
            assert!(text.contains("griddepcontrol.wait"), "{twin}");
            let (_, plain, _) = ordinary.expect("checked above");
            assert!(!plain.contains("griddepcontrol"), "{module}");
        }
    }

    /// Every kernel a launch wrapper takes through `step_kernel` waits in its twin.
    #[test]
    fn the_step_kernels_wait_in_their_twins() {
        let kernels = [
            ("elementwise", "f32_to_bf16"),
            ("decode", "rmsnorm_lora_a_bf16"),
            ("nf4", "gemv4_mma_fused_plain_bf16"),
            ("nf4", "gemv4_mma_fused_double_bf16"),
            ("attention", "attention_decode_fused_d64"),
            ("attention", "attention_decode_fused_d128"),
            ("attention", "attention_decode_fused_step_d64"),
            ("attention", "attention_decode_fused_step_d128"),
            ("gemv", "gemv_bf16_aligned_m1"),
            ("gemv", "gemv_bf16_any_m8"),
            ("norm", "rmsnorm_forward_bf16"),
        ];
        for (module, kernel) in kernels {
            let twin = twin_name(module);
            let (_, text, _) = super::super::ptx::ALL
                .iter()
                .find(|(name, _, _)| *name == twin)
                .expect("the twin is built (test above)");
            let body = entry_body(text, kernel).unwrap_or_else(|| panic!("{twin}: no {kernel}"));
            let wait = body.find("griddepcontrol.wait").unwrap_or_else(|| {
                panic!("{twin}: {kernel} never waits");
            });
            // No global store before the wait, and no global load but of what nothing in a
            // step writes: the fused GEMV's weights (packed codes ld.global.cs, f32 scales, code
            // table and dynamic map, u8 scale codes ld.global.nc); decode attention's angle
            // tables (ld.global.nc.f32) and its step position (ld.global.u64, copied in before
            // the step is queued). Activations are bf16 (u16, v4) loads. (Decode attention's
            // cp.async copies of cache rows that earlier steps wrote are not ld.global: see
            // ptx/attention.cu for why they may go before the wait.)
            let before = &body[..wait];
            assert!(
                !before.contains("st.global"),
                "{twin}: {kernel} stores before its wait"
            );
            let allowed: &[&str] = match module {
                "nf4" => &[".cs.v4.u32", ".nc.f32", ".nc.u8"],
                "attention" => &[".nc.f32", ".u64"],
                _ => &[],
            };
            for load in before.split("ld.global").skip(1) {
                assert!(
                    allowed.iter().any(|kind| load.starts_with(kind)),
                    "{twin}: {kernel} loads ld.global{load:.20} before its wait"
                );
            }
        }
    }

    /// The PTX text of `.entry kernel(` up to its closing brace at the start of a line.
    fn entry_body<'t>(ptx: &'t str, kernel: &str) -> Option<&'t str> {
        let start = ptx.find(&format!(".entry {kernel}("))?;
        let rest = &ptx[start..];
        let end = rest.find("\n}")?;
        Some(&rest[..end])
    }
}
