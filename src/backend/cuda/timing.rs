//! Timing queued GPU work with CUDA events: warm-up runs, then the median of timed runs.

use super::device::CudaDevice;
use super::driver::OrDevice;
use super::graph::GpuGraph;
use crate::error::{Error, Result};
use cust::event::{Event, EventFlags};

/// Median time in milliseconds of `op(i)` (which queues GPU work on the device's stream), over
/// `runs` timed calls after `warmup` untimed ones. `i` counts all calls, so `op` can rotate
/// through several copies of its inputs to keep them out of the L2 cache.
pub fn median_ms(
    device: &CudaDevice,
    warmup: usize,
    runs: usize,
    op: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    median_ms_per_launch(device, warmup, runs, 1, op)
}

/// Like [`median_ms`], but each timed run queues `batch` calls of `op` between one pair of
/// events and counts a `batch`-th of the time: for kernels of a few microseconds, whose single
/// launch would otherwise be timed together with the host's launch latency.
pub fn median_ms_per_launch(
    device: &CudaDevice,
    warmup: usize,
    runs: usize,
    batch: usize,
    mut op: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    warm_up(device, warmup, runs, batch, &mut op)?;
    let start = Event::new(EventFlags::DEFAULT).or_device(|| "creating a timing event")?;
    let stop = Event::new(EventFlags::DEFAULT).or_device(|| "creating a timing event")?;
    let mut times = Vec::with_capacity(runs);
    for run in 0..runs {
        start
            .record(device.stream())
            .or_device(|| "recording a timing event")?;
        for b in 0..batch {
            op(warmup + run * batch + b)?;
        }
        stop.record(device.stream())
            .or_device(|| "recording a timing event")?;
        stop.synchronize()
            .or_device(|| "waiting for timed GPU work (a kernel failed)")?;
        let ms = stop
            .elapsed_time_f32(&start)
            .or_device(|| "reading a timing event")?;
        times.push(f64::from(ms) / batch as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Like [`median_ms_per_launch`], but the `batch` calls are recorded once into a CUDA graph
/// (after the warm-up calls, so lazily made buffers exist) and each timed run replays it: the
/// time is the GPU's alone, with no host launch latency between the kernels of a run. The
/// recorded calls are `op(warmup)` .. `op(warmup + batch - 1)`; every run replays those same
/// ones. Fails where `op` does anything but launch kernels (the capture rejects it).
pub fn median_ms_per_replay(
    device: &CudaDevice,
    warmup: usize,
    runs: usize,
    batch: usize,
    mut op: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    warm_up(device, warmup, runs, batch, &mut op)?;
    let ((), graph) = GpuGraph::capture(device, || (0..batch).try_for_each(|b| op(warmup + b)))?;
    // The one warm-up replay uploads the graph to the device.
    median_ms_per_launch(device, 1, runs, 1, |_| graph.launch(device)).map(|ms| ms / batch as f64)
}

/// Checks that a timing has at least one run of at least one launch, then makes the `warmup`
/// untimed calls `op(0)` .. `op(warmup - 1)` and waits for them.
fn warm_up(
    device: &CudaDevice,
    warmup: usize,
    runs: usize,
    batch: usize,
    op: &mut impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    if runs == 0 || batch == 0 {
        return Err(Error::invalid(
            "timing needs at least one run of at least one launch",
        ));
    }
    for i in 0..warmup {
        op(i)?;
    }
    device.synchronize()
}
