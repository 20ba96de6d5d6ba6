//! Reusable device buffers for the activations of a pass.
//!
//! Allocating and freeing device memory synchronises with the GPU (the driver's free waits for
//! queued work, and a zeroing allocation runs a synchronous memset), so a pass that allocated
//! each activation would stall the queue hundreds of times per layer. A [`Workspace`] keeps
//! freed buffers by length and hands them out again: a [`Scratch`] buffer goes back to its pool
//! when dropped. Buffers come back with stale contents; the passes write every element before
//! reading it, or zero the buffer with a kernel where they accumulate.
//!
//! One buffer is not pooled: the decode attention's arrival counters
//! ([`Workspace::decode_arrivals`]), which must stay zero between launches.

use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use cust::memory::DeviceCopy;
use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

/// Free buffers of one element type, by length.
pub(crate) struct Pool<T: DeviceCopy> {
    free: RefCell<HashMap<usize, Vec<GpuBuffer<T>>>>,
}

impl<T: DeviceCopy + bytemuck::Zeroable> Pool<T> {
    fn new() -> Self {
        Pool {
            free: RefCell::new(HashMap::new()),
        }
    }

    /// A buffer of `len` elements with unspecified contents: a freed one when there is one,
    /// else a new allocation. `what` names it in allocation errors.
    pub(crate) fn take(
        &self,
        device: &CudaDevice,
        what: &str,
        len: usize,
    ) -> Result<Scratch<'_, T>> {
        let reused = self.free.borrow_mut().get_mut(&len).and_then(Vec::pop);
        let buffer = match reused {
            Some(buffer) => buffer,
            None => GpuBuffer::zeroed(device, what, len)?,
        };
        Ok(Scratch {
            buffer: Some(buffer),
            pool: self,
        })
    }

    fn clear(&self) {
        self.free.borrow_mut().clear();
    }
}

/// A pooled device buffer; returns to its pool when dropped.
pub(crate) struct Scratch<'p, T: DeviceCopy> {
    buffer: Option<GpuBuffer<T>>,
    pool: &'p Pool<T>,
}

impl<T: DeviceCopy> Deref for Scratch<'_, T> {
    type Target = GpuBuffer<T>;

    fn deref(&self) -> &GpuBuffer<T> {
        self.buffer
            .as_ref()
            .expect("a scratch buffer holds its buffer until dropped")
    }
}

impl<T: DeviceCopy> DerefMut for Scratch<'_, T> {
    fn deref_mut(&mut self) -> &mut GpuBuffer<T> {
        self.buffer
            .as_mut()
            .expect("a scratch buffer holds its buffer until dropped")
    }
}

impl<T: DeviceCopy> Drop for Scratch<'_, T> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool
                .free
                .borrow_mut()
                .entry(buffer.len())
                .or_default()
                .push(buffer);
        }
    }
}

/// The pools of a model's passes: bf16 activations, f32 residual streams, dropout masks.
pub(crate) struct Workspace {
    pub(crate) bf16: Pool<u16>,
    pub(crate) f32: Pool<f32>,
    pub(crate) u8: Pool<u8>,
    /// The row count of the last pass: a pass of another length frees the pools first, so
    /// that sequences of many lengths do not pile up buffers of every size.
    rows: RefCell<usize>,
    /// How many times the pools (or the arrival counters) were freed: a recorded decode graph
    /// that used their buffers stays valid while this is unchanged.
    generation: std::cell::Cell<u64>,
    /// The decode attention's arrival counters (one u32 a query head), zeroed when made; every
    /// launch of `attention_decode` leaves them zero. Kept across passes (not pooled).
    decode_arrivals: RefCell<Option<GpuBuffer<u32>>>,
}

impl Workspace {
    pub(crate) fn new() -> Self {
        Workspace {
            bf16: Pool::new(),
            f32: Pool::new(),
            u8: Pool::new(),
            rows: RefCell::new(0),
            generation: std::cell::Cell::new(0),
            decode_arrivals: RefCell::new(None),
        }
    }

    /// Starts a pass over `rows` tokens: keeps the pools when the last pass had as many rows,
    /// else frees them. Call it only while no [`Scratch`] buffer is alive.
    pub(crate) fn begin(&self, rows: usize) {
        let mut last = self.rows.borrow_mut();
        if *last != rows {
            self.bf16.clear();
            self.f32.clear();
            self.u8.clear();
            *last = rows;
            self.generation.set(self.generation.get() + 1);
        }
    }

    /// Changes each time the pools are freed (see [`Workspace::begin`]) or the arrival
    /// counters are remade.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// The arrival counters of `backend::cuda::attention::attention_decode` for `heads` query
    /// heads: zero, as every launch leaves them, so the decode steps of every layer share them
    /// (their launches are ordered on the workspace's stream). Made zeroed on first use, and
    /// remade (freeing the old ones, a new generation) for another head count.
    pub(crate) fn decode_arrivals(
        &self,
        device: &CudaDevice,
        heads: usize,
    ) -> Result<RefMut<'_, GpuBuffer<u32>>> {
        let mut slot = self.decode_arrivals.borrow_mut();
        let counters = match slot.take() {
            Some(counters) if counters.len() == heads => counters,
            old => {
                if old.is_some() {
                    self.generation.set(self.generation.get() + 1);
                }
                GpuBuffer::zeroed(device, "decode attention arrival counters", heads)?
            }
        };
        Ok(RefMut::map(slot, |slot| slot.insert(counters)))
    }
}
