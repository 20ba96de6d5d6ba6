//! [`ManagedBuffer`]: unified (managed) memory that the driver pages between host and GPU, for
//! state that may leave the card under memory pressure (the paged optimizer).
//!
//! Over-subscribing managed memory can hang the GPU, so an allocation larger than the free
//! memory the card reports is refused before the driver is asked.

use super::buffer::byte_len;
use super::device::CudaDevice;
use super::driver::OrDevice;
use crate::error::{Error, Result};
use cust::memory::{DeviceCopy, DevicePointer, MemoryAdvise, UnifiedBuffer};

/// `len` elements of `T` in managed memory (`cuMemAllocManaged`), zero-initialised.
pub struct ManagedBuffer<T: DeviceCopy> {
    inner: UnifiedBuffer<T>,
}

impl<T: DeviceCopy + bytemuck::Zeroable> ManagedBuffer<T> {
    /// Allocates `len` zeroed elements, refusing more bytes than the GPU reports free.
    pub fn new(device: &CudaDevice, what: &str, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid(format!(
                "{what}: a managed buffer needs elements"
            )));
        }
        let bytes = byte_len::<T>(what, len)?;
        let (free, total) = device.memory_info()?;
        check_managed_request(what, bytes, free, total)?;
        let inner = UnifiedBuffer::new(&T::zeroed(), len)
            .or_device(|| format!("allocating {bytes} bytes of managed memory for {what}"))?;
        Ok(ManagedBuffer { inner })
    }
}

impl<T: DeviceCopy> ManagedBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when the buffer holds no elements (never, as built by [`ManagedBuffer::new`]).
    pub fn is_empty(&self) -> bool {
        self.inner.len() == 0
    }

    /// The buffer's address for kernel arguments (managed memory is addressable on the GPU).
    pub(crate) fn device_ptr(&mut self) -> DevicePointer<T> {
        DevicePointer::from_raw(self.inner.as_unified_ptr().as_raw() as u64)
    }

    /// Queues a migration of the whole buffer to the GPU's memory.
    pub fn prefetch_to_device(&self, device: &CudaDevice) -> Result<()> {
        self.inner
            .prefetch_to_device(device.stream(), device.raw_device())
            .or_device(|| "prefetching managed memory to the GPU")
    }

    /// Queues a migration of the whole buffer to host memory (frees its room on the GPU).
    pub fn prefetch_to_host(&self, device: &CudaDevice) -> Result<()> {
        self.inner
            .prefetch_to_host(device.stream())
            .or_device(|| "prefetching managed memory to the host")
    }

    /// The contents, readable on the host once queued GPU work has finished (this waits).
    pub fn host_slice(&self, device: &CudaDevice) -> Result<&[T]> {
        device.synchronize()?;
        Ok(self.inner.as_slice())
    }

    /// The contents, writable on the host once queued GPU work has finished (this waits).
    pub fn host_slice_mut(&mut self, device: &CudaDevice) -> Result<&mut [T]> {
        device.synchronize()?;
        Ok(self.inner.as_mut_slice())
    }
}

/// Refuses a managed allocation of `bytes` when the card has fewer bytes free.
pub(crate) fn check_managed_request(
    what: &str,
    bytes: usize,
    free: usize,
    total: usize,
) -> Result<()> {
    if bytes > free {
        return Err(Error::Device(format!(
            "refusing to allocate {bytes} bytes of managed memory for {what}: the GPU reports only \
             {free} of {total} bytes free, and over-subscribing managed memory can hang the GPU"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_requests_beyond_free_memory_are_refused() {
        assert!(check_managed_request("m", 1024, 1024, 4096).is_ok());
        let msg = check_managed_request("adam state", 1025, 1024, 4096)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("1025 bytes"), "{msg}");
        assert!(msg.contains("only 1024 of 4096 bytes free"), "{msg}");
    }
}
