//! Turning CUDA driver results into [`Error::Device`] messages that say what was being done.

use crate::error::{Error, Result};
use cust::error::{CudaError, CudaResult};
use cust::function::Function;
use cust::sys::{
    cuCtxGetCurrent, cuCtxSetCurrent, cuFuncSetAttribute, cudaError_enum, CUcontext,
    CUfunction_attribute, CUresult, CUshared_carveout,
};

/// Context for a failed driver call: `result.or_device(|| "what was being done")`.
pub(crate) trait OrDevice<T> {
    /// Maps a driver error to [`Error::Device`], naming the action that failed.
    fn or_device<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> OrDevice<T> for CudaResult<T> {
    fn or_device<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| device_error(what().into(), e))
    }
}

/// `what` failed with driver error `e`.
///
/// Uses the error's name (`Debug`), not its `Display`: cust's `Display` asks the driver for the
/// text and fails when the driver itself is what is missing.
pub(crate) fn device_error(what: String, e: CudaError) -> Error {
    Error::Device(format!("{what}: CUDA driver error {e:?}"))
}

/// A raw driver result as this crate's error, naming what was being done.
pub(crate) fn check(code: CUresult, what: &str) -> Result<()> {
    if code == cudaError_enum::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("{what}: CUDA driver error {code:?}")))
    }
}

/// Runs `f` with `context` current on the calling thread, then makes the caller's context
/// current again: for releasing a resource in the context it came from, whichever device's
/// context is current when it drops.
///
/// # Safety
/// `context` must be alive (not destroyed).
pub(crate) unsafe fn in_context<T>(context: CUcontext, f: impl FnOnce() -> T) -> T {
    let mut current: CUcontext = std::ptr::null_mut();
    // SAFETY: cuCtxGetCurrent writes one context handle (or null) into `current`.
    let switch = unsafe { cuCtxGetCurrent(&mut current) } == cudaError_enum::CUDA_SUCCESS
        && current != context;
    if switch {
        // SAFETY: the caller guarantees `context` is alive.
        unsafe { cuCtxSetCurrent(context) };
    }
    let value = f();
    if switch {
        // SAFETY: `current` was the thread's current context a moment ago and is restored as it
        // was (f releases resources; it destroys no context).
        unsafe { cuCtxSetCurrent(current) };
    }
    value
}

/// The message for an allocation the card could not satisfy.
pub(crate) fn out_of_memory(what: &str, bytes: usize, free: usize, total: usize) -> Error {
    Error::Device(format!(
        "out of GPU memory: {what} asked for {bytes} bytes ({}), but only {free} of {total} bytes \
         ({} of {}) are free; use a smaller batch or model, or free the GPU",
        human_bytes(bytes),
        human_bytes(free),
        human_bytes(total)
    ))
}

/// `1536` -> `"1.5 KiB"`.
pub(crate) fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Sets `kernel`'s limit on dynamic shared memory per CTA; the driver refuses more than the GPU
/// has.
pub(crate) fn set_dynamic_shared_limit(kernel: &Function<'_>, bytes: usize) -> cudaError_enum {
    let Ok(bytes) = i32::try_from(bytes) else {
        return cudaError_enum::CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: the handle belongs to a module the device keeps loaded for as long as `kernel`
    // borrows it; the call only changes that function's launch limit, and launches already
    // queued keep the shared memory they were given.
    unsafe {
        cuFuncSetAttribute(
            kernel.to_raw(),
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes,
        )
    }
}

/// Asks the driver to give `kernel`'s launches the largest shared-memory carveout of the unified
/// L1/shared array, so that as many CTAs an SM as their shared memory allows fit. Best effort: a
/// refusal leaves the driver's default (the launches still run, perhaps fewer CTAs an SM).
pub(crate) fn set_max_shared_carveout(kernel: &Function<'_>) {
    // SAFETY: as in set_dynamic_shared_limit: a live function handle; only a launch preference
    // of that function changes.
    let _ = unsafe {
        cuFuncSetAttribute(
            kernel.to_raw(),
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            CUshared_carveout::CU_SHAREDMEM_CARVEOUT_MAX_SHARED as i32,
        )
    };
}

/// Raises `kernel`'s dynamic shared-memory limit to `bytes` (past the 48 KB default), with the
/// largest shared-memory carveout (kernels that fit several CTAs an SM only with it), and returns
/// `bytes` as the launch's shared-memory argument; an error naming `name` when the GPU refuses.
pub(crate) fn raise_shared_limit(kernel: &Function<'_>, name: &str, bytes: usize) -> Result<u32> {
    set_max_shared_carveout(kernel);
    let status = set_dynamic_shared_limit(kernel, bytes);
    if status != cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Device(format!(
            "{name} needs {bytes} bytes of shared memory per CTA; the GPU refused ({status:?})"
        )));
    }
    u32::try_from(bytes)
        .map_err(|_| Error::invalid(format!("{name}: {bytes} bytes of shared memory overflow")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn driver_errors_name_the_action_and_the_error() {
        let r: CudaResult<()> = Err(CudaError::InvalidValue);
        let msg = r
            .or_device(|| "launching dequant4")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "device: launching dequant4: CUDA driver error InvalidValue"
        );
    }

    #[test]
    fn out_of_memory_says_asked_and_free() {
        let msg = out_of_memory("weights", 2048, 1024, 4096).to_string();
        assert!(msg.contains("asked for 2048 bytes"), "{msg}");
        assert!(msg.contains("only 1024 of 4096 bytes"), "{msg}");
    }
}
