//! Measuring the GPU's approximate reciprocal (`ptx/rcp.cu`) over every f32 mantissa, the
//! table the CPU quantizer uses to reproduce bitsandbytes' fast-math `1/absmax` exactly.

use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use crate::error::Result;
use cust::launch;

/// Bytes of the packed table: 2^23 mantissas, two bits each.
pub const RCP_TABLE_BYTES: usize = (1 << 23) / 4;

/// Runs `rcp_approx_table` and returns the packed table (see `ptx/rcp.cu` for the encoding).
pub fn measure_rcp_approx(device: &CudaDevice) -> Result<Vec<u8>> {
    let out = GpuBuffer::<u8>::zeroed(device, "reciprocal table", RCP_TABLE_BYTES)?;
    let kernel = device.function("rcp", "rcp_approx_table")?;
    let stream = device.stream();
    let (ptr, n) = (out.device_ptr(), RCP_TABLE_BYTES as i32);
    let grid = (RCP_TABLE_BYTES as u32).div_ceil(256);
    // SAFETY: `out` holds RCP_TABLE_BYTES bytes and the kernel writes byte i < n_bytes only.
    unsafe { launch!(kernel<<<grid, 256, 0, stream>>>(ptr, n)) }
        .or_device(|| "launching rcp_approx_table".to_string())?;
    out.to_host(device, "reciprocal table")
}
