//! The optimizer step over many tensors in a handful of launches (kernels `sum_squares_multi`,
//! `sum_partials_f64` and `adamw32_multi` in `ptx/adamw.cu`). A [`TensorTable`] describes a set
//! of tensors to the GPU (per tensor its addresses, its length and where its chunks start);
//! with it, the gradient norm's sum of squares is two launches and the AdamW step of every
//! tensor, with its bf16 copy and its zeroed gradient, is one, whatever the number of tensors.
//!
//! The sum of squares is the same on every run: fixed chunks of 4,096 values, one f64
//! partial sum a chunk, and one CTA that adds the partials in a fixed order (no atomics). The
//! AdamW step does per value the instructions of [`super::adamw::adamw_step`] (same device
//! function, same host constants: bit for bit the same parameters and moments), then what
//! `elementwise::to_bf16` and `elementwise::zero_f32` do.

use super::adamw::{AdamWStep, MomentArena, StepConstants, THREADS};
use super::buffer::GpuBuffer;
use super::device::CudaDevice;
use super::driver::OrDevice;
use super::launch_checks::{check_len, grid_dim, to_i64, MAX_GRID_X};
use crate::error::{Error, Result};
use crate::optim::AdamWConfig;
use cust::launch;

const MODULE: &str = "adamw";
/// Values one CTA covers (`MT_CHUNK` in ptx/adamw.cu).
const CHUNK: usize = 4096;
/// Threads of the one CTA that adds the norm's partial sums (`PARTIAL_THREADS` in
/// ptx/adamw.cu).
const PARTIAL_THREADS: u32 = 1024;
/// 64-bit words of one table entry (`TensorEntry` in ptx/adamw.cu): params, grads, m, v, bf16,
/// n, first chunk, padding.
const ENTRY_WORDS: usize = 8;

/// One tensor of a multi-tensor AdamW step: f32 master values, their gradient (zeroed by the
/// step) and a bf16 copy of the values (rewritten by the step), all of one length.
pub struct StepTensor<'a> {
    /// (n,) f32 parameters, updated in place.
    pub params: &'a mut GpuBuffer<f32>,
    /// (n,) f32 gradients, read and then zeroed.
    pub grads: &'a mut GpuBuffer<f32>,
    /// (n,) bf16 copy of `params`, rewritten after the update.
    pub bf16: &'a mut GpuBuffer<u16>,
}

/// The device addresses of one tensor, as its table entry holds them (0 where the kernel that
/// reads the table does not use the address).
struct Addresses {
    params: u64,
    grads: u64,
    m: u64,
    v: u64,
    bf16: u64,
    n: usize,
}

/// A table on the device and the scratch of the kernels that read it.
struct DeviceTable {
    entries: GpuBuffer<u64>,      // (tensors * ENTRY_WORDS,) TensorEntry
    chunk_tensor: GpuBuffer<i32>, // (chunks,) the tensor of each chunk
    /// The norm's (chunks,) partial sums and their (1,) total; made by the first norm.
    norm_scratch: Option<(GpuBuffer<f64>, GpuBuffer<f64>)>,
    chunks: usize,
}

impl DeviceTable {
    /// Uploads the entries `words` (ENTRY_WORDS per tensor) of tensors of `lengths` (none
    /// empty), with the chunk -> tensor map they imply.
    fn upload(device: &CudaDevice, words: &[u64], lengths: &[usize]) -> Result<Self> {
        let chunk_tensor = chunk_map(lengths)?;
        let chunks = chunk_tensor.len();
        grid_dim(chunks, MAX_GRID_X, "optimizer tensor table")?;
        Ok(DeviceTable {
            entries: GpuBuffer::from_host(device, "optimizer tensor table", words)?,
            chunk_tensor: GpuBuffer::from_host(device, "optimizer chunk map", &chunk_tensor)?,
            norm_scratch: None,
            chunks,
        })
    }
}

/// The tensor of each chunk of [`CHUNK`] values, tensor after tensor (a tensor of n values has
/// ceil(n / CHUNK) chunks).
fn chunk_map(lengths: &[usize]) -> Result<Vec<i32>> {
    let mut map = Vec::new();
    for (t, &n) in lengths.iter().enumerate() {
        let tensor = i32::try_from(t).map_err(|_| {
            Error::invalid(format!(
                "optimizer tensor table: {} tensors are too many",
                lengths.len()
            ))
        })?;
        map.resize(map.len() + n.div_ceil(CHUNK), tensor);
    }
    Ok(map)
}

/// A set of tensors described to the multi-tensor kernels, kept on the device from one call to
/// the next (one table for the norm and one for the AdamW step of each GPU of a model).
///
/// The cache rule: the device table is a function of what it describes, and nothing else: the
/// device, and per tensor its addresses (parameters, gradients, both moments, bf16 copy) and
/// its length, in order. Each call rebuilds that description on the host from the buffers it
/// is given (eight words a tensor, microseconds for a 7B model's 448 tensors) and uploads a new
/// table only when it differs from the one on the device. A table therefore never points at
/// anything but the buffers of the call that launches with it, however the adapters or the
/// moment arena were rebuilt since: there is no version to bump and nothing to invalidate.
#[derive(Default)]
pub struct TensorTable {
    /// What `table` was built from: the device's context, then the entries' words.
    key: Vec<u64>,
    table: Option<DeviceTable>,
}

impl TensorTable {
    /// An empty table; the first call builds it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sum of the squares of all `grads` in f64 (each chunk's partial sum and their total
    /// in a fixed order, so the same on every run). Waits for the GPU.
    pub fn sum_of_squares(
        &mut self,
        device: &CudaDevice,
        grads: &[&GpuBuffer<f32>],
    ) -> Result<f64> {
        let tensors = grads.iter().map(|g| Addresses {
            params: 0,
            grads: g.device_ptr().as_raw(),
            m: 0,
            v: 0,
            bf16: 0,
            n: g.len(),
        });
        let Some(table) = self.prepare(device, tensors)? else {
            return Ok(0.0);
        };
        let grid = grid_dim(table.chunks, MAX_GRID_X, "gradient norm")?;
        let count = to_i64(table.chunks, "gradient norm chunks")?;
        let stream = device.stream();
        let (entries, chunk_tensor) = (table.entries.device_ptr(), table.chunk_tensor.device_ptr());
        let (partials, total) = match &mut table.norm_scratch {
            Some(scratch) => scratch,
            slot => slot.insert((
                GpuBuffer::zeroed(device, "gradient norm partial sums", table.chunks)?,
                GpuBuffer::zeroed(device, "gradient norm", 1)?,
            )),
        };
        let (partials_ptr, total_ptr) = (partials.device_ptr(), total.device_ptr());
        let kernel = device.function(MODULE, "sum_squares_multi")?;
        // SAFETY: the arguments match sum_squares_multi in ptx/adamw.cu. The table describes
        // exactly `grads` (built from them in this call, or equal to that word for word), which
        // are live for the call: entry t's grads address holds n_t f32. chunk_tensor maps each
        // of the `chunks` CTAs to the tensor whose chunk it is, so a CTA reads values
        // [(c - first_chunk) * CHUNK, n_t) at most; partials holds `chunks` f64. The kernel
        // reads no other address of the entries.
        unsafe {
            launch!(kernel<<<grid, THREADS, 0, stream>>>(entries, chunk_tensor, partials_ptr))
        }
        .or_device(|| format!("launching the gradient norm ({} chunks)", table.chunks))?;
        let kernel = device.function(MODULE, "sum_partials_f64")?;
        // SAFETY: the arguments match sum_partials_f64; partials holds `count` f64 and total
        // one; the kernel bounds its index by count.
        unsafe {
            launch!(kernel<<<1, PARTIAL_THREADS, 0, stream>>>(partials_ptr, count, total_ptr))
        }
        .or_device(|| "launching the gradient norm's total".to_string())?;
        let total = total.to_host(device, "gradient norm")?;
        Ok(total[0])
    }

    /// Queues one AdamW step over every tensor (as [`super::adamw::adamw_step`] with gradients
    /// `grads * grad_scale`, tensor after tensor in `moments` from offset 0), then writes each
    /// tensor's bf16 copy and zeroes its gradient: one launch.
    pub fn adamw_step(
        &mut self,
        device: &CudaDevice,
        cfg: &AdamWConfig,
        step: AdamWStep,
        tensors: &mut [StepTensor<'_>],
        moments: &mut MomentArena,
    ) -> Result<()> {
        let k = StepConstants::new(cfg, step)?;
        let mut described = Vec::with_capacity(tensors.len());
        let mut offset = 0;
        for (i, tensor) in tensors.iter_mut().enumerate() {
            let n = tensor.params.len();
            check_len(
                &format!("AdamW tensor {i}'s gradients"),
                tensor.grads.len(),
                n,
            )?;
            check_len(
                &format!("AdamW tensor {i}'s bf16 copy"),
                tensor.bf16.len(),
                n,
            )?;
            let (m, v) = moments.pointers(offset, n)?;
            described.push(Addresses {
                params: tensor.params.device_ptr().as_raw(),
                grads: tensor.grads.device_ptr().as_raw(),
                m: m.as_raw(),
                v: v.as_raw(),
                bf16: tensor.bf16.device_ptr().as_raw(),
                n,
            });
            offset += n; // MomentArena::pointers checked offset + n against the arena
        }
        let Some(table) = self.prepare(device, described.into_iter())? else {
            return Ok(());
        };
        let grid = grid_dim(table.chunks, MAX_GRID_X, "AdamW")?;
        let stream = device.stream();
        let (entries, chunk_tensor) = (table.entries.device_ptr(), table.chunk_tensor.device_ptr());
        let kernel = device.function(MODULE, "adamw32_multi")?;
        // SAFETY: the arguments match adamw32_multi in ptx/adamw.cu. The table describes exactly
        // `tensors` and their ranges of `moments` (built from them in this call, or equal to
        // that word for word), all live and borrowed mutably for the call: entry t's params,
        // grads, m and v hold n_t f32 and its bf16 copy n_t u16 (lengths checked above, moment
        // ranges by MomentArena::pointers; managed memory is addressable from the GPU). The
        // tensors are distinct buffers and the moment ranges follow one another, so no two
        // entries overlap. chunk_tensor keeps each CTA inside its tensor's [0, n_t).
        unsafe {
            launch!(kernel<<<grid, THREADS, 0, stream>>>(
                entries, chunk_tensor, k.beta1, k.beta2, k.eps_scaled, k.step_size,
                k.decay, k.apply_decay, k.grad_scale
            ))
        }
        .or_device(|| format!("launching the AdamW step ({} chunks)", table.chunks))
    }

    /// The device table of `tensors` (empty ones left out), uploaded unless the one on the
    /// device was built from the same description; `None` when there are no values at all.
    fn prepare(
        &mut self,
        device: &CudaDevice,
        tensors: impl Iterator<Item = Addresses>,
    ) -> Result<Option<&mut DeviceTable>> {
        let mut key = vec![device.raw_context() as usize as u64];
        let mut lengths = Vec::new();
        let mut chunks = 0usize;
        for t in tensors.filter(|t| t.n > 0) {
            let entry: [u64; ENTRY_WORDS] = [
                t.params,
                t.grads,
                t.m,
                t.v,
                t.bf16,
                t.n as u64,
                chunks as u64,
                0,
            ];
            key.extend(entry);
            lengths.push(t.n);
            chunks = chunks
                .checked_add(t.n.div_ceil(CHUNK))
                .ok_or_else(|| Error::invalid("optimizer tensor table: too many values"))?;
        }
        if chunks == 0 {
            return Ok(None);
        }
        if self.table.is_none() || key != self.key {
            // Dropping the old table first frees its memory (after the kernels that read it).
            self.table = None;
            self.key.clear();
            self.table = Some(DeviceTable::upload(device, &key[1..], &lengths)?);
            self.key = key;
        }
        Ok(self.table.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_matches_the_kernel_file() {
        let source = include_str!("../../../ptx/adamw.cu");
        assert!(source.contains(&format!("#define MT_CHUNK {CHUNK}\n")));
        assert!(source.contains(&format!("#define PARTIAL_THREADS {PARTIAL_THREADS}\n")));
        assert!(source.contains("static_assert(sizeof(TensorEntry) == 64"));
        assert_eq!(ENTRY_WORDS * 8, 64);
    }

    #[test]
    fn chunks_follow_the_tensors() {
        // 1 value: one chunk; 4096: one; 4097: two; 3 * 4096: three.
        let map = chunk_map(&[1, 4096, 4097, 3 * 4096]).unwrap();
        assert_eq!(map, [0, 1, 2, 2, 3, 3, 3]);
        assert!(chunk_map(&[]).unwrap().is_empty());
    }
}
