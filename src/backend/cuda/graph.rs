//! CUDA graphs: a sequence of kernel launches recorded once from the device's stream (stream
//! capture) and replayed with one launch, so a decode step of ~1,000 small kernels costs the
//! host one call instead of ~1,000.
//!
//! What is recorded is fixed: every kernel, its grid and its arguments, buffer addresses
//! included. A replay therefore reads and writes the same buffers; what changes from one replay
//! to the next must live in device memory that the kernels read (a decode step's position) and
//! be written before the launch. Only launches may be recorded: a copy from the host, an
//! allocation or a synchronisation during capture fails the capture (the driver reports it as
//! an error here).

use super::device::CudaDevice;
use super::driver::check;
use crate::error::{Error, Result};
use cust::sys::{
    cuGraphDestroy, cuGraphExecDestroy, cuGraphInstantiateWithFlags, cuGraphLaunch,
    cuStreamBeginCapture_v2, cuStreamEndCapture, CUgraph, CUgraphExec, CUstreamCaptureMode_enum,
};

/// An instantiated graph of kernel launches, replayed on the stream of the device it was
/// captured on.
pub struct GpuGraph {
    graph: CUgraph,
    exec: CUgraphExec,
}

impl std::fmt::Debug for GpuGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuGraph")
    }
}

impl GpuGraph {
    /// Records what `record` queues on `device`'s stream (launches only) and instantiates it;
    /// the launches are recorded, not run. Returns `record`'s result with the graph. The stream
    /// is back to normal afterwards, also when `record` or the capture fails.
    pub fn capture<T>(
        device: &CudaDevice,
        record: impl FnOnce() -> Result<T>,
    ) -> Result<(T, GpuGraph)> {
        device.bind()?;
        let stream = device.stream().as_inner();
        // SAFETY: `stream` is the device's live stream; thread-local capture mode makes calls
        // on this thread that are unsafe during capture fail instead of corrupting it.
        check(
            unsafe {
                cuStreamBeginCapture_v2(
                    stream,
                    CUstreamCaptureMode_enum::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            },
            "beginning a CUDA graph capture",
        )?;
        let recorded = super::profile::recording(record);
        let mut graph: CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above on the same stream; `graph` receives the
        // recorded graph (null when the capture was invalidated).
        let ended = unsafe { cuStreamEndCapture(stream, &mut graph) };
        let value = match (recorded, check(ended, "ending a CUDA graph capture")) {
            (Ok(value), Ok(())) if !graph.is_null() => value,
            (recorded, ended) => {
                if !graph.is_null() {
                    // SAFETY: `graph` came from cuStreamEndCapture and is destroyed once.
                    unsafe { cuGraphDestroy(graph) };
                }
                recorded?;
                ended?;
                return Err(Error::Device(
                    "a CUDA graph capture recorded nothing".into(),
                ));
            }
        };
        let mut exec: CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` is a valid graph; `exec` receives its executable form.
        let instantiated = unsafe { cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = check(instantiated, "instantiating a CUDA graph") {
            // SAFETY: `graph` is valid and destroyed once.
            unsafe { cuGraphDestroy(graph) };
            return Err(e);
        }
        Ok((value, GpuGraph { graph, exec }))
    }

    /// Queues one replay of the graph on `device`'s stream (the device it was captured on).
    pub fn launch(&self, device: &CudaDevice) -> Result<()> {
        device.bind()?;
        // SAFETY: `exec` is a live executable graph of this device's context; the stream is the
        // device's.
        check(
            unsafe { cuGraphLaunch(self.exec, device.stream().as_inner()) },
            "launching a CUDA graph",
        )
    }
}

impl Drop for GpuGraph {
    fn drop(&mut self) {
        // SAFETY: both handles are live and owned by this value; each is destroyed once.
        unsafe {
            cuGraphExecDestroy(self.exec);
            cuGraphDestroy(self.graph);
        }
    }
}
