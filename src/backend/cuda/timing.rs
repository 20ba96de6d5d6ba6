//! Timing queued GPU work with CUDA events: warm-up runs, then the median of timed runs.

use super::device::CudaDevice;
use super::driver::OrDevice;
use crate::error::{Error, Result};
use cust::event::{Event, EventFlags};

/// Median time in milliseconds of `op(i)` (which queues GPU work on the device's stream), over
/// `runs` timed calls after `warmup` untimed ones. `i` counts all calls, so `op` can rotate
/// through several copies of its inputs to keep them out of the L2 cache.
pub fn median_ms(
    device: &CudaDevice,
    warmup: usize,
    runs: usize,
    mut op: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    if runs == 0 {
        return Err(Error::invalid("timing needs at least one run"));
    }
    for i in 0..warmup {
        op(i)?;
    }
    device.synchronize()?;
    let start = Event::new(EventFlags::DEFAULT).or_device(|| "creating a timing event")?;
    let stop = Event::new(EventFlags::DEFAULT).or_device(|| "creating a timing event")?;
    let mut times = Vec::with_capacity(runs);
    for i in warmup..warmup + runs {
        start
            .record(device.stream())
            .or_device(|| "recording a timing event")?;
        op(i)?;
        stop.record(device.stream())
            .or_device(|| "recording a timing event")?;
        stop.synchronize()
            .or_device(|| "waiting for timed GPU work (a kernel failed)")?;
        let ms = stop
            .elapsed_time_f32(&start)
            .or_device(|| "reading a timing event")?;
        times.push(f64::from(ms));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
