//! [`GpuBuffer`]: a typed, owned allocation in device memory.
//!
//! A buffer remembers the context it was allocated in and frees itself there, whichever
//! device's context is current when it drops (a layer split keeps several GPUs' buffers on one
//! thread).
//!
//! bf16 data lives in `GpuBuffer<u16>` (the raw bits): cust's `DeviceCopy` covers half 1.x, not
//! the half 2 this crate uses; `half::bf16::to_bits`/`from_bits` convert.

use super::device::CudaDevice;
use super::driver::{out_of_memory, OrDevice};
use crate::error::{Error, Result};
use cust::error::CudaError;
use cust::memory::{CopyDestination, DeviceBuffer, DeviceCopy, DevicePointer};
use cust::sys::{cuCtxGetCurrent, cuCtxSetCurrent, CUcontext};
use std::mem::ManuallyDrop;
use std::ops::Range;

/// `len` elements of `T` in device memory, freed on drop (in the context it came from).
pub struct GpuBuffer<T: DeviceCopy> {
    inner: ManuallyDrop<DeviceBuffer<T>>,
    /// The context of the device the memory is on.
    context: CUcontext,
}

impl<T: DeviceCopy> Drop for GpuBuffer<T> {
    fn drop(&mut self) {
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: cuCtxGetCurrent writes one context handle (or null) into `current`; the
        // switch makes `self.context`, a context that outlives its buffers (a `CudaDevice`
        // outlives everything allocated on it), current for the free, and the caller's context
        // is restored after it. `inner` is dropped exactly once, here, and never used again.
        unsafe {
            let switch = cuCtxGetCurrent(&mut current) == cust::sys::cudaError_enum::CUDA_SUCCESS
                && current != self.context;
            if switch {
                cuCtxSetCurrent(self.context);
            }
            ManuallyDrop::drop(&mut self.inner);
            if switch {
                cuCtxSetCurrent(current);
            }
        }
    }
}

impl<T: DeviceCopy + bytemuck::Zeroable> GpuBuffer<T> {
    /// Allocates `data.len()` elements and copies `data` in. `what` names the buffer in errors.
    pub fn from_host(device: &CudaDevice, what: &str, data: &[T]) -> Result<Self> {
        let mut buffer = Self::allocate(device, what, data.len())?;
        buffer
            .inner
            .copy_from(data)
            .or_device(|| format!("copying {what} to the GPU"))?;
        Ok(buffer)
    }

    /// Allocates `len` zeroed elements.
    pub fn zeroed(device: &CudaDevice, what: &str, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(what, len)?;
        device.bind()?;
        match DeviceBuffer::zeroed(len) {
            Ok(inner) => Ok(GpuBuffer::wrap(device, inner)),
            Err(e) => Err(allocation_error(device, what, bytes, e)),
        }
    }

    /// Copies the buffer back to the host, after waiting for queued kernels.
    pub fn to_host(&self, device: &CudaDevice, what: &str) -> Result<Vec<T>> {
        device.bind()?;
        device.synchronize()?;
        let mut host = vec![T::zeroed(); self.len()];
        self.inner
            .copy_to(&mut host[..])
            .or_device(|| format!("copying {what} from the GPU"))?;
        Ok(host)
    }

    /// Copies the elements in `range` back to the host, after waiting for queued kernels.
    pub fn range_to_host(
        &self,
        device: &CudaDevice,
        range: Range<usize>,
        what: &str,
    ) -> Result<Vec<T>> {
        self.check_range(range.start, range.len(), what)?;
        device.bind()?;
        device.synchronize()?;
        let mut host = vec![T::zeroed(); range.len()];
        self.inner
            .index(range)
            .copy_to(&mut host[..])
            .or_device(|| format!("copying {what} from the GPU"))?;
        Ok(host)
    }

    /// Overwrites the `data.len()` elements at `offset` with `data` (ordered after the work
    /// queued on the device's stream, which is a blocking stream).
    pub fn range_from_host(&mut self, offset: usize, data: &[T], what: &str) -> Result<()> {
        self.check_range(offset, data.len(), what)?;
        self.inner
            .index(offset..offset + data.len())
            .copy_from(data)
            .or_device(|| format!("copying {what} to the GPU"))
    }

    fn check_range(&self, offset: usize, len: usize, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "{what}: elements {offset}..{offset}+{len} are outside the buffer of {}",
                self.len()
            ))),
        }
    }

    fn allocate(device: &CudaDevice, what: &str, len: usize) -> Result<Self> {
        let bytes = byte_len::<T>(what, len)?;
        device.bind()?;
        // SAFETY: the contents are uninitialised only until the caller's copy_from, which
        // overwrites every element before the buffer is used (and on failure the buffer is
        // dropped unread).
        match unsafe { DeviceBuffer::uninitialized(len) } {
            Ok(inner) => Ok(GpuBuffer::wrap(device, inner)),
            Err(e) => Err(allocation_error(device, what, bytes, e)),
        }
    }
}

impl<T: DeviceCopy> GpuBuffer<T> {
    fn wrap(device: &CudaDevice, inner: DeviceBuffer<T>) -> Self {
        GpuBuffer {
            inner: ManuallyDrop::new(inner),
            context: device.raw_context(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.inner.len() == 0
    }

    /// The device address, for kernel arguments.
    pub(crate) fn device_ptr(&self) -> DevicePointer<T> {
        self.inner.as_device_ptr()
    }
}

impl<T: DeviceCopy> std::fmt::Debug for GpuBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuBuffer<{}>({})",
            std::any::type_name::<T>(),
            self.len()
        )
    }
}

/// `len * size_of::<T>()`, or an error naming the buffer when that overflows.
pub(crate) fn byte_len<T>(what: &str, len: usize) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| Error::invalid(format!("{what}: {len} elements do not fit in memory")))
}

/// Out-of-memory errors say how much was asked for and how much is free.
fn allocation_error(device: &CudaDevice, what: &str, bytes: usize, e: CudaError) -> Error {
    if e == CudaError::OutOfMemory {
        match device.memory_info() {
            Ok((free, total)) => out_of_memory(what, bytes, free, total),
            Err(_) => out_of_memory(what, bytes, 0, 0),
        }
    } else {
        super::driver::device_error(format!("allocating {bytes} bytes for {what}"), e)
    }
}
