//! Reusable device buffers for the activations of a pass.
//!
//! Allocating and freeing device memory synchronises with the GPU (the driver's free waits for
//! queued work, and a zeroing allocation runs a synchronous memset), so a pass that allocated
//! each activation would stall the queue hundreds of times per layer. A [`Workspace`] keeps
//! freed buffers by length and hands them out again: a [`Scratch`] buffer goes back to its pool
//! when dropped. Buffers come back with stale contents; the passes write every element before
//! reading it, or zero the buffer with a kernel where they accumulate.

use crate::backend::cuda::{CudaDevice, GpuBuffer};
use crate::error::Result;
use cust::memory::DeviceCopy;
use std::cell::RefCell;
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
    /// How many times the pools were freed: a recorded decode graph that used their buffers
    /// stays valid while this is unchanged.
    generation: std::cell::Cell<u64>,
}

impl Workspace {
    pub(crate) fn new() -> Self {
        Workspace {
            bf16: Pool::new(),
            f32: Pool::new(),
            u8: Pool::new(),
            rows: RefCell::new(0),
            generation: std::cell::Cell::new(0),
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

    /// Changes each time the pools are freed (see [`Workspace::begin`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.get()
    }
}
