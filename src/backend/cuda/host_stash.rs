//! [`HostStash`]: f32 device buffers parked in page-locked (pinned) host memory while the GPU
//! does not need them, copied out and back on a copy stream of their own, so that the copies
//! run while the compute stream's kernels do.
//!
//! A checkpointed training pass keeps each layer's input until the backward reaches that
//! layer; parked here (`--checkpoints host`) they take host memory instead of GPU memory.
//!
//! # Ordering
//!
//! Two streams of one context: the device's compute stream `S` (every kernel) and the stash's
//! copy stream `C` (only the stash's copies). Neither waits for the other except through the
//! events below (`cuStreamWaitEvent`: the waiting stream's later work starts once the work
//! the event's record captured is done; the host is never blocked). Both are blocking streams,
//! so a synchronous copy of the legacy default stream (an upload of embeddings, a stage
//! crossing) waits for the work queued on either before it and is waited for by the work
//! queued on either after it.
//!
//! Parking `src` in slot `i` ([`HostStash::download`], then [`HostStash::release_source`]):
//! 1. `ready` is recorded on `S`: it covers every kernel queued so far, among them those that
//!    wrote `src`. `C` waits for it, copies `src` into host slot `i` and records
//!    `downloaded[i]`. `S` is not held up: kernels queued after this (the layer's forward,
//!    which only reads `src`) run while the copy does.
//! 2. `release_source(i)` makes `S` wait for `downloaded[i]`: every kernel queued on `S` after
//!    it runs once the copy has read `src`, so `src` may return to the pool it came from. Its
//!    next user writes it from `S` (after the wait) or from the legacy stream (after `C`'s
//!    queued work, as `C` is a blocking stream).
//!
//! Fetching slot `i` back into `dst` ([`HostStash::upload`], then [`HostStash::await_upload`]):
//! 3. `ready` is recorded on `S` again: it covers the kernels that used `dst`'s memory before
//!    the caller took it from its pool. `C` waits for it, copies host slot `i` into `dst` and
//!    records `uploaded[i]`. The kernels queued on `S` meanwhile (the next layer's backward)
//!    run while the copy does.
//! 4. `await_upload(i)` makes `S` wait for `uploaded[i]`: the kernels queued after it read the
//!    fetched values.
//!
//! Host slot `i` is written by step 1's copy and read by step 3's, and written again by the
//! next pass's step 1: all on `C`, which runs them in queue order, so a download never
//! overwrites a slot before the upload queued ahead of it has read it. The host itself never
//! reads or writes a slot. A wait uses the state the event's latest record captured when the
//! wait is queued (the driver's rule), so `ready` serves every copy, and each of
//! `downloaded[i]` and `uploaded[i]` is waited for before the slot's next call records it again
//! ([`SlotState`] refuses calls out of this order). Host memory is freed (a slot that grows,
//! the stash's drop) only after `C` is drained, so no queued copy still uses it.
//! [`HostStash::join`] makes `S` wait for everything queued on `C`: a pass that stops between
//! steps 1 and 2 or 3 and 4 (an error) calls it before it queues anything else.

use super::device::CudaDevice;
use super::driver::{check, in_context, OrDevice};
use super::GpuBuffer;
use crate::error::{Error, Result};
use cust::stream::{Stream, StreamFlags};
use cust::sys::{
    cuEventCreate, cuEventDestroy_v2, cuEventRecord, cuMemAllocHost_v2, cuMemFreeHost,
    cuMemcpyDtoHAsync_v2, cuMemcpyHtoDAsync_v2, cuStreamWaitEvent, CUcontext, CUevent,
    CUevent_flags, CUstream,
};
use std::cell::Cell;
use std::ffi::c_void;

/// Host slots of f32 values on one GPU, each holding one device buffer's contents at a time,
/// with a copy stream that moves them out and back (see the module docs for the order of the
/// calls and why it is safe).
pub struct HostStash<'d> {
    // Fields drop in order: the slots' host memory (after `Drop` drained the copy stream), the
    // events, then the stream.
    slots: Vec<Slot>,
    /// Recorded on the compute stream just before a copy is queued; the copy waits for it.
    ready: StreamEvent,
    /// Recorded on the copy stream by [`HostStash::join`].
    drained: StreamEvent,
    copy_stream: Stream,
    device: &'d CudaDevice,
}

/// One parked buffer: its host memory, where its copies stand, and their events.
struct Slot {
    host: PinnedBuffer,
    state: Cell<SlotState>,
    /// Recorded on the copy stream after the copy to the host.
    downloaded: StreamEvent,
    /// Recorded on the copy stream after the copy back to the device.
    uploaded: StreamEvent,
}

impl<'d> HostStash<'d> {
    /// An empty stash on `device`, with its copy stream.
    pub fn new(device: &'d CudaDevice) -> Result<Self> {
        device.bind()?;
        // A blocking stream, as the compute stream is (see the module docs).
        let copy_stream = Stream::new(StreamFlags::DEFAULT, None)
            .or_device(|| format!("creating a copy stream on {}", device.name()))?;
        Ok(HostStash {
            slots: Vec::new(),
            ready: StreamEvent::new(device)?,
            drained: StreamEvent::new(device)?,
            copy_stream,
            device,
        })
    }

    /// Makes slots `0..count` hold at least `len` values each, allocating pinned host memory
    /// where they do not (a slot that grows gets a quarter more than asked, so that passes of
    /// slowly growing lengths do not reallocate each time). Call it between passes: a slot that
    /// grows loses what it held.
    pub fn reserve(&mut self, count: usize, len: usize) -> Result<()> {
        let grows = |slot: &Slot| slot.host.capacity < len;
        if self.slots.len() >= count && !self.slots[..count].iter().any(grows) {
            return Ok(());
        }
        self.device.bind()?;
        // Host memory about to be freed may still be read or written by queued copies.
        self.copy_stream
            .synchronize()
            .or_device(|| "waiting for the checkpoint copies (a copy queued earlier failed)")?;
        for slot in self.slots.iter_mut().take(count) {
            if grows(slot) {
                let capacity = len.max(slot.host.capacity + slot.host.capacity / 4);
                slot.host = PinnedBuffer::new(self.device, capacity)?;
                slot.state.set(SlotState::Empty);
            }
        }
        while self.slots.len() < count {
            self.slots.push(Slot {
                host: PinnedBuffer::new(self.device, len)?,
                state: Cell::new(SlotState::Empty),
                downloaded: StreamEvent::new(self.device)?,
                uploaded: StreamEvent::new(self.device)?,
            });
        }
        Ok(())
    }

    /// Bytes of pinned host memory the slots hold.
    pub fn host_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| slot.host.capacity * std::mem::size_of::<f32>())
            .sum()
    }

    /// Queues the copy of `src` into slot `slot`, to start once the kernels queued so far on the
    /// device's stream are done (step 1 of the module docs). `src` must stay alive and unwritten
    /// until [`HostStash::release_source`] for this slot.
    pub fn download(&self, slot: usize, src: &GpuBuffer<f32>) -> Result<()> {
        let len = src.len();
        let (s, next) = self.next_state(slot, SlotCall::Download { len })?;
        if len > s.host.capacity {
            return Err(Error::invalid(format!(
                "host stash slot {slot} holds {} values; a buffer of {len} does not fit (reserve \
                 first)",
                s.host.capacity
            )));
        }
        let copy = self.copy_after_compute()?;
        // SAFETY: the host slot is pinned memory of at least `len` f32 that lives until the copy
        // stream is drained (reserve and drop drain it before freeing); `src` is a live device
        // allocation of `len` f32 that the caller keeps alive and unwritten until the compute
        // stream has waited for `downloaded` (release_source). The copy is ordered after the
        // kernels that wrote `src` by the `ready` event the copy stream waits for.
        let queued = unsafe {
            cuMemcpyDtoHAsync_v2(
                s.host.ptr.cast::<c_void>(),
                src.device_ptr().as_raw(),
                len * std::mem::size_of::<f32>(),
                copy,
            )
        };
        check(queued, "queueing a checkpoint's copy to pinned host memory")?;
        s.downloaded.record(copy)?;
        s.state.set(next);
        Ok(())
    }

    /// Makes the device's stream wait for slot `slot`'s copy to the host: the buffer it copied
    /// may be reused by anything queued after this (step 2).
    pub fn release_source(&self, slot: usize) -> Result<()> {
        let (s, next) = self.next_state(slot, SlotCall::ReleaseSource)?;
        self.device.bind()?;
        wait(self.device.stream().as_inner(), &s.downloaded)?;
        s.state.set(next);
        Ok(())
    }

    /// Queues the copy of slot `slot` back into `dst` (as long as the buffer it came from), to
    /// start once the kernels queued so far on the device's stream are done (step 3); `dst`
    /// must not be used before [`HostStash::await_upload`] for this slot.
    pub fn upload(&self, slot: usize, dst: &mut GpuBuffer<f32>) -> Result<()> {
        let len = dst.len();
        let (s, next) = self.next_state(slot, SlotCall::Upload { len })?;
        let copy = self.copy_after_compute()?;
        // SAFETY: the host slot holds `len` f32 (its state says so: the download of `len`
        // values was queued ahead of this on the same stream) and lives until the copy stream
        // is drained; `dst` is a live device allocation of `len` f32, borrowed mutably here,
        // whose earlier users on the compute stream are covered by `ready`, and which the
        // caller does not use before the compute stream waits for `uploaded`.
        let queued = unsafe {
            cuMemcpyHtoDAsync_v2(
                dst.device_ptr().as_raw(),
                s.host.ptr.cast::<c_void>().cast_const(),
                len * std::mem::size_of::<f32>(),
                copy,
            )
        };
        check(queued, "queueing a checkpoint's copy back to the GPU")?;
        s.uploaded.record(copy)?;
        s.state.set(next);
        Ok(())
    }

    /// Makes the device's stream wait for slot `slot`'s copy back to the GPU: kernels queued
    /// after this read the fetched values (step 4). The slot is empty afterwards.
    pub fn await_upload(&self, slot: usize) -> Result<()> {
        let (s, next) = self.next_state(slot, SlotCall::AwaitUpload)?;
        self.device.bind()?;
        wait(self.device.stream().as_inner(), &s.uploaded)?;
        s.state.set(next);
        Ok(())
    }

    /// Makes the device's stream wait for every copy queued so far, and empties every slot: what
    /// a pass calls when it ends, so that one stopped half-way leaves no copy unordered with the
    /// work that follows.
    pub fn join(&self) -> Result<()> {
        self.device.bind()?;
        self.drained.record(self.copy_stream.as_inner())?;
        wait(self.device.stream().as_inner(), &self.drained)?;
        for slot in &self.slots {
            slot.state.set(SlotState::Empty);
        }
        Ok(())
    }

    /// Slot `slot` and the state `call` leaves it in; an error when there is no such slot or
    /// the call is out of order.
    fn next_state(&self, slot: usize, call: SlotCall) -> Result<(&Slot, SlotState)> {
        let s = self.slots.get(slot).ok_or_else(|| {
            Error::invalid(format!(
                "host stash slot {slot} does not exist ({} reserved)",
                self.slots.len()
            ))
        })?;
        let next = s
            .state
            .get()
            .after(call)
            .map_err(|problem| Error::invalid(format!("host stash slot {slot}: {problem}")))?;
        Ok((s, next))
    }

    /// Records `ready` on the device's stream and makes the copy stream wait for it; returns the
    /// copy stream, for the copy to queue.
    fn copy_after_compute(&self) -> Result<CUstream> {
        self.device.bind()?;
        let copy = self.copy_stream.as_inner();
        self.ready.record(self.device.stream().as_inner())?;
        wait(copy, &self.ready)?;
        Ok(copy)
    }
}

impl Drop for HostStash<'_> {
    fn drop(&mut self) {
        // SAFETY: the device (and so its context) outlives the stash ('d).
        unsafe {
            in_context(self.device.raw_context(), || {
                // The slots' host memory is freed after this, when the fields drop: no queued
                // copy may still use it. A failure here means the context is broken and runs
                // nothing more.
                let _ = self.copy_stream.synchronize();
            })
        };
    }
}

impl std::fmt::Debug for HostStash<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStash")
            .field("slots", &self.slots.len())
            .field("host_bytes", &self.host_bytes())
            .finish_non_exhaustive()
    }
}

/// Makes `stream` wait for the work `event`'s latest record captured.
fn wait(stream: CUstream, event: &StreamEvent) -> Result<()> {
    // SAFETY: both handles are live and of the same context (the stash's device's).
    let code = unsafe { cuStreamWaitEvent(stream, event.event, 0) };
    check(code, "making a stream wait for a checkpoint copy's event")
}

/// A CUDA event for ordering streams (timing disabled), destroyed in its context.
struct StreamEvent {
    event: CUevent,
    context: CUcontext,
}

impl StreamEvent {
    fn new(device: &CudaDevice) -> Result<Self> {
        device.bind()?;
        let mut event: CUevent = std::ptr::null_mut();
        // SAFETY: `event` receives a new event of the current context (the device's).
        let code =
            unsafe { cuEventCreate(&mut event, CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) };
        check(code, "creating a checkpoint copy's event")?;
        Ok(StreamEvent {
            event,
            context: device.raw_context(),
        })
    }

    /// Records the event at the current end of `stream` (a stream of the event's context).
    fn record(&self, stream: CUstream) -> Result<()> {
        // SAFETY: the event is live; `stream` is a live stream of the same context.
        let code = unsafe { cuEventRecord(self.event, stream) };
        check(code, "recording a checkpoint copy's event")
    }
}

impl Drop for StreamEvent {
    fn drop(&mut self) {
        // SAFETY: the event is live and destroyed once, here, in its own context, which outlives
        // it (a stash lives no longer than its device). An event still pending is released by
        // the driver once it completes.
        unsafe {
            in_context(self.context, || {
                cuEventDestroy_v2(self.event);
            })
        };
    }
}

/// `capacity` f32 of page-locked host memory (`cuMemAllocHost`), freed in its context on drop.
struct PinnedBuffer {
    ptr: *mut f32,
    capacity: usize,
    context: CUcontext,
}

impl PinnedBuffer {
    fn new(device: &CudaDevice, capacity: usize) -> Result<Self> {
        let bytes = capacity
            .checked_mul(std::mem::size_of::<f32>())
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a host stash slot of {capacity} values cannot be allocated"
                ))
            })?;
        device.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` receives `bytes` of page-locked memory of the current context (the
        // device's), or stays null on failure.
        let code = unsafe { cuMemAllocHost_v2(&mut ptr, bytes) };
        check(code, "").map_err(|_| {
            Error::Device(format!(
                "allocating {bytes} bytes of pinned host memory for the layer checkpoints failed \
                 ({code:?}); use --checkpoints gpu, or a smaller batch"
            ))
        })?;
        Ok(PinnedBuffer {
            ptr: ptr.cast::<f32>(),
            capacity,
            context: device.raw_context(),
        })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAllocHost in `context`, which outlives it, and is freed
        // once, here; its owner drained every copy that used it first.
        unsafe {
            in_context(self.context, || {
                cuMemFreeHost(self.ptr.cast::<c_void>());
            })
        };
    }
}

/// What a slot holds, as the calls on it have left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// Nothing: never written, fetched back already, or emptied by a join.
    Empty,
    /// A copy of `len` values to the host is queued; its source may not be reused yet.
    Downloading { len: usize },
    /// `len` values parked on the host; the buffer they came from may be reused.
    Parked { len: usize },
    /// Their copy back to a device buffer is queued; the device's stream has not waited for it.
    Uploading { len: usize },
}

/// The calls that move a slot's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotCall {
    Download { len: usize },
    ReleaseSource,
    Upload { len: usize },
    AwaitUpload,
}

impl SlotState {
    /// The state after `call`, or why `call` is out of order: every event is waited for before
    /// the slot records it again, and a slot is fetched back into a buffer of its own length.
    fn after(self, call: SlotCall) -> std::result::Result<SlotState, String> {
        use SlotState::{Downloading, Empty, Parked, Uploading};
        match (self, call) {
            (Empty | Parked { .. }, SlotCall::Download { len }) => Ok(Downloading { len }),
            (Downloading { len }, SlotCall::ReleaseSource) => Ok(Parked { len }),
            (Parked { len }, SlotCall::Upload { len: dst }) if dst == len => Ok(Uploading { len }),
            (Parked { len }, SlotCall::Upload { len: dst }) => Err(format!(
                "it holds {len} values, not the {dst} of the buffer to fetch them into"
            )),
            (Uploading { .. }, SlotCall::AwaitUpload) => Ok(Empty),
            (state, call) => Err(format!("{call:?} cannot follow {state:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_goes_out_and_back_in_order() {
        let len = 12;
        let mut state = SlotState::Empty;
        for call in [
            SlotCall::Download { len },
            SlotCall::ReleaseSource,
            SlotCall::Upload { len },
            SlotCall::AwaitUpload,
        ] {
            state = state.after(call).unwrap();
        }
        assert_eq!(state, SlotState::Empty);
        // A parked slot may be overwritten by the next download (its copy queues behind).
        let parked = SlotState::Parked { len };
        assert_eq!(
            parked.after(SlotCall::Download { len: 5 }),
            Ok(SlotState::Downloading { len: 5 })
        );
    }

    #[test]
    fn calls_out_of_order_are_refused() {
        let len = 8;
        let downloading = SlotState::Downloading { len };
        let uploading = SlotState::Uploading { len };
        // The source is not released yet: no second download, no upload.
        assert!(downloading.after(SlotCall::Download { len }).is_err());
        assert!(downloading.after(SlotCall::Upload { len }).is_err());
        // Nothing parked: nothing to fetch or wait for.
        assert!(SlotState::Empty.after(SlotCall::Upload { len }).is_err());
        assert!(SlotState::Empty.after(SlotCall::AwaitUpload).is_err());
        assert!(SlotState::Empty.after(SlotCall::ReleaseSource).is_err());
        // The fetch is not waited for yet: no download over it, no second fetch.
        assert!(uploading.after(SlotCall::Download { len }).is_err());
        assert!(uploading.after(SlotCall::Upload { len }).is_err());
        // A fetch into a buffer of another length.
        let msg = SlotState::Parked { len }
            .after(SlotCall::Upload { len: len + 1 })
            .unwrap_err();
        assert!(msg.contains("8 values") && msg.contains("9"), "{msg}");
    }

    /// On a GPU: values parked and fetched back come back bit for bit, also with kernels of the
    /// compute stream writing the source right after its release (the wait must order them).
    #[test]
    fn values_come_back_exactly_on_a_gpu() {
        let Ok(device) = CudaDevice::new() else {
            eprintln!("skipped: no GPU");
            return;
        };
        let values: Vec<f32> = (0..1 << 20).map(|i| (i as f32).sin() * 1e3).collect();
        let mut src = GpuBuffer::from_host(&device, "stash source", &values).unwrap();
        let mut stash = HostStash::new(&device).unwrap();
        stash.reserve(2, values.len()).unwrap();
        stash.download(1, &src).unwrap();
        stash.release_source(1).unwrap();
        crate::backend::cuda::elementwise::zero_f32(&device, &mut src).unwrap();
        let mut dst = GpuBuffer::<f32>::zeroed(&device, "stash destination", values.len()).unwrap();
        stash.upload(1, &mut dst).unwrap();
        stash.await_upload(1).unwrap();
        assert_eq!(dst.to_host(&device, "fetched").unwrap(), values);
        assert!(stash.await_upload(1).is_err(), "fetched once");
        stash.join().unwrap();
    }
}
