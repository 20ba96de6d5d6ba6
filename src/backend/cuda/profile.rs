//! Opt-in GPU time of named regions of a pass (`SUN_PROFILE=1`): where a training step or a
//! decode step spends its time, without a profiler on the machine.
//!
//! A [`Span`] records a CUDA event on its device's stream when it is made and another when it
//! is dropped; [`report`] waits for them and sums the time between each pair by name. Spans
//! nest, and each name's total is inclusive (a "layer backward" span contains its linears'
//! spans). Events cost the host about a microsecond each and order nothing on the GPU, so the
//! spans barely change what they measure; regions of a few microseconds still read high.
//!
//! A [`HostSpan`] times a region on the host clock instead (an upload, a launch call, a wait),
//! for where the host, not the GPU, sets the pace.
//!
//! Off (the default), a span is a no-op. Spans are skipped while a CUDA graph is being
//! recorded ([`recording`]): an event recorded into a capture is not a timing point.

use super::device::CudaDevice;
use super::driver::OrDevice;
use crate::error::Result;
use cust::event::{Event, EventFlags};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The environment variable that turns the spans on.
pub const PROFILE_VARIABLE: &str = "SUN_PROFILE";

/// Whether `SUN_PROFILE` is set to anything but empty or `0` (read once).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var(PROFILE_VARIABLE).is_ok_and(|value| !value.is_empty() && value != "0")
    })
}

/// A recorded pair of events: the span's name and its start and end on one device's stream.
struct Mark {
    name: &'static str,
    start: Event,
    end: Event,
}

thread_local! {
    /// The spans closed on this thread since the last [`report`].
    static MARKS: RefCell<Vec<Mark>> = const { RefCell::new(Vec::new()) };
    /// Spans that could not record their events (a driver error) since the last report.
    static LOST: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread is recording a CUDA graph.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    /// Host time of the [`HostSpan`]s closed since the last report: name -> (count, ms).
    static HOST: RefCell<BTreeMap<&'static str, (usize, f64)>> = const { RefCell::new(BTreeMap::new()) };
}

/// A named region of host time (what the host spends around the GPU work: uploads, launches,
/// waits), from its creation to its drop; a no-op unless [`enabled`].
pub struct HostSpan {
    open: Option<(&'static str, std::time::Instant)>,
}

/// Opens a host span named `name`.
pub fn host_span(name: &'static str) -> HostSpan {
    HostSpan {
        open: enabled().then(|| (name, std::time::Instant::now())),
    }
}

impl Drop for HostSpan {
    fn drop(&mut self) {
        if let Some((name, start)) = self.open.take() {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            HOST.with(|host| {
                let mut host = host.borrow_mut();
                let entry = host.entry(name).or_default();
                entry.0 += 1;
                entry.1 += ms;
            });
        }
    }
}

/// Runs `record` with the spans off: what a CUDA graph capture calls around its recording.
pub(crate) fn recording<T>(record: impl FnOnce() -> T) -> T {
    let was = RECORDING.with(|r| r.replace(true));
    let value = record();
    RECORDING.with(|r| r.set(was));
    value
}

/// A named region of GPU work on one device: from its creation to its drop.
pub struct Span<'d> {
    open: Option<(&'d CudaDevice, &'static str, Event)>,
}

/// Opens a span named `name` on `device` (a no-op unless [`enabled`]).
pub fn span<'d>(device: &'d CudaDevice, name: &'static str) -> Span<'d> {
    if !enabled() || RECORDING.with(Cell::get) {
        return Span { open: None };
    }
    match record_event(device) {
        Ok(start) => Span {
            open: Some((device, name, start)),
        },
        Err(_) => {
            LOST.with(|lost| lost.set(lost.get() + 1));
            Span { open: None }
        }
    }
}

/// A new event recorded now on `device`'s stream.
fn record_event(device: &CudaDevice) -> Result<Event> {
    device.bind()?;
    let event = Event::new(EventFlags::DEFAULT).or_device(|| "creating a profiling event")?;
    event
        .record(device.stream())
        .or_device(|| "recording a profiling event")?;
    Ok(event)
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let Some((device, name, start)) = self.open.take() else {
            return;
        };
        match record_event(device) {
            Ok(end) => MARKS.with(|marks| marks.borrow_mut().push(Mark { name, start, end })),
            Err(_) => LOST.with(|lost| lost.set(lost.get() + 1)),
        }
    }
}

/// One name's spans since the last report.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanTotal {
    /// The spans' name.
    pub name: &'static str,
    /// How many spans of that name closed.
    pub count: usize,
    /// Their summed GPU time in milliseconds.
    pub ms: f64,
}

/// The spans closed on this thread since the last call, summed by name, longest first; waits
/// for their events. Also returns how many spans were lost to driver errors (their time is
/// missing from the totals). Host spans are cleared with them.
pub fn report() -> Result<(Vec<SpanTotal>, usize)> {
    let marks = MARKS.with(|marks| std::mem::take(&mut *marks.borrow_mut()));
    let lost = LOST.with(|lost| lost.replace(0));
    HOST.with(|host| host.borrow_mut().clear());
    let mut totals: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    for mark in &marks {
        mark.end
            .synchronize()
            .or_device(|| format!("waiting for the work of span {:?}", mark.name))?;
        let ms = mark
            .end
            .elapsed_time_f32(&mark.start)
            .or_device(|| format!("reading the time of span {:?}", mark.name))?;
        let entry = totals.entry(mark.name).or_default();
        entry.0 += 1;
        entry.1 += f64::from(ms);
    }
    let mut totals: Vec<SpanTotal> = totals
        .into_iter()
        .map(|(name, (count, ms))| SpanTotal { name, count, ms })
        .collect();
    totals.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok((totals, lost))
}

/// [`report`] as a table on stderr, each name's time per call of `per` (a step, a token) and
/// its share of `wall_ms` (that many calls' wall time); nothing when the spans are off.
pub fn print_report(per: &str, calls: usize, wall_ms: f64) -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    let host = HOST.with(|host| host.borrow().clone());
    let (totals, lost) = report()?;
    let calls = calls.max(1) as f64;
    eprintln!("GPU time by span ({PROFILE_VARIABLE}=1; inclusive, nested spans counted in each), per {per}:");
    eprintln!("{:<34} {:>9} {:>11} {:>8}", "span", "count", "ms", "% wall");
    for t in &totals {
        eprintln!(
            "{:<34} {:>9.1} {:>11.3} {:>7.1}%",
            t.name,
            t.count as f64 / calls,
            t.ms / calls,
            100.0 * t.ms / wall_ms.max(f64::MIN_POSITIVE)
        );
    }
    for (name, (count, ms)) in &host {
        eprintln!(
            "{:<34} {:>9.1} {:>11.3} {:>7.1}%  (host time)",
            name,
            *count as f64 / calls,
            ms / calls,
            100.0 * ms / wall_ms.max(f64::MIN_POSITIVE)
        );
    }
    eprintln!("{:<34} {:>9} {:>11.3}", "wall", "", wall_ms / calls);
    if lost > 0 {
        eprintln!("{lost} span(s) lost to driver errors: their time is missing above");
    }
    Ok(())
}
