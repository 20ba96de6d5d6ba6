//! [`GradientReducer`]: summing values across the ranks of a data-parallel run, whatever carries
//! them (NCCL between GPUs, or threads in one process for the tests), and
//! [`InProcessGroup`], the in-process carrier.
//!
//! Every rank calls the same reductions in the same order with buffers of the same lengths;
//! each call returns once every rank's values are summed into every rank's buffer.

use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};

/// Sums buffers element-wise across the ranks of a group, in place.
pub trait GradientReducer {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Sums `values` (on the host) across the ranks.
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()>;

    /// Sums `values` (on the host, a few numbers such as a loss sum) across the ranks.
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()>;

    /// Sums every buffer of `buffers` (on `device`) across the ranks, in place. The default
    /// goes through the host with [`GradientReducer::sum_f32`]; NCCL sums on the devices.
    #[cfg(feature = "cuda")]
    fn sum_device_f32(
        &mut self,
        device: &crate::backend::cuda::CudaDevice,
        buffers: &mut [&mut crate::backend::cuda::GpuBuffer<f32>],
    ) -> Result<()> {
        let mut host = Vec::new();
        for buffer in buffers.iter() {
            host.extend(buffer.to_host(device, "a gradient to all-reduce")?);
        }
        self.sum_f32(&mut host)?;
        let mut offset = 0;
        for buffer in buffers.iter_mut() {
            let len = buffer.len();
            buffer.range_from_host(0, &host[offset..offset + len], "an all-reduced gradient")?;
            offset += len;
        }
        Ok(())
    }
}

/// What the ranks of an [`InProcessGroup`] share: each rank's contribution to the reduction
/// in flight, and the barrier that separates writing them from reading the sum.
#[derive(Debug)]
struct Shared {
    contributions: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// A rank of a group whose ranks are threads of one process: the reference carrier that the
/// data-parallel trainer is tested with, and a model of what NCCL does between processes.
/// Sums are taken in rank order in f64, so every rank gets the same bits.
#[derive(Debug)]
pub struct InProcessGroup {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl InProcessGroup {
    /// One member per rank of a group of `world_size`; hand member `r` to the thread of rank `r`.
    pub fn new(world_size: usize) -> Result<Vec<InProcessGroup>> {
        if world_size == 0 {
            return Err(Error::invalid("a group needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            contributions: Mutex::new(vec![Vec::new(); world_size]),
            barrier: Barrier::new(world_size),
        });
        Ok((0..world_size)
            .map(|rank| InProcessGroup {
                rank,
                world_size,
                shared: Arc::clone(&shared),
            })
            .collect())
    }

    /// The sum over ranks of every rank's `values`, as f64 in rank order.
    fn sum(&self, values: Vec<f64>) -> Result<Vec<f64>> {
        let poisoned = || Error::invalid("a rank of the in-process group panicked");
        let len = values.len();
        self.shared.contributions.lock().map_err(|_| poisoned())?[self.rank] = values;
        // Every rank has written its contribution ...
        self.shared.barrier.wait();
        let sum = {
            let all = self.shared.contributions.lock().map_err(|_| poisoned())?;
            if let Some(other) = all.iter().position(|c| c.len() != len) {
                return Err(Error::invalid(format!(
                    "rank {} reduces {len} values but rank {other} reduces {}",
                    self.rank,
                    all[other].len()
                )));
            }
            let mut sum = vec![0.0f64; len];
            for contribution in all.iter() {
                sum.iter_mut().zip(contribution).for_each(|(s, c)| *s += c);
            }
            sum
        };
        // ... and every rank has read the sum before anyone writes the next contribution.
        self.shared.barrier.wait();
        Ok(sum)
    }
}

impl GradientReducer for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        let sum = self.sum(values.iter().map(|&v| f64::from(v)).collect())?;
        values.iter_mut().zip(sum).for_each(|(v, s)| *v = s as f32);
        Ok(())
    }

    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let sum = self.sum(values.to_vec())?;
        values.copy_from_slice(&sum);
        Ok(())
    }
}

/// NCCL between the GPUs of the ranks: device buffers are summed on the devices as one group
/// of all-reduces; host values go through a device buffer.
#[cfg(feature = "cuda")]
impl GradientReducer for crate::backend::cuda::Nccl<'_> {
    fn rank(&self) -> usize {
        crate::backend::cuda::Nccl::rank(self)
    }

    fn world_size(&self) -> usize {
        crate::backend::cuda::Nccl::world_size(self)
    }

    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        use crate::backend::cuda::GpuBuffer;
        let device = self.device();
        let mut buffer = GpuBuffer::from_host(device, "values to all-reduce", values)?;
        self.all_reduce_sum_f32(&mut buffer)?;
        values.copy_from_slice(&buffer.to_host(device, "all-reduced values")?);
        Ok(())
    }

    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        use crate::backend::cuda::GpuBuffer;
        let device = self.device();
        let mut buffer = GpuBuffer::from_host(device, "values to all-reduce", values)?;
        self.all_reduce_sum_f64(&mut buffer)?;
        values.copy_from_slice(&buffer.to_host(device, "all-reduced values")?);
        Ok(())
    }

    /// `device` must be the communicator's own GPU (the buffers live there).
    fn sum_device_f32(
        &mut self,
        _device: &crate::backend::cuda::CudaDevice,
        buffers: &mut [&mut crate::backend::cuda::GpuBuffer<f32>],
    ) -> Result<()> {
        self.all_reduce_sum_f32_many(buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_ranks_get_the_same_sum() {
        let group = InProcessGroup::new(3).unwrap();
        let results: Vec<(Vec<f32>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|mut member| {
                    s.spawn(move || {
                        let r = member.rank() as f32;
                        let mut a = vec![r, 10.0 * r, 0.5];
                        let mut results = Vec::new();
                        // Several rounds in a row: a fast rank must not overwrite a slow one's.
                        for round in 0..20 {
                            a[2] = round as f32 + r;
                            member.sum_f32(&mut a).unwrap();
                            results.push(a[2]);
                            a = vec![r, 10.0 * r, 0.5];
                        }
                        member.sum_f32(&mut a).unwrap();
                        let mut b = vec![f64::from(r) * 0.25];
                        member.sum_f64(&mut b).unwrap();
                        assert_eq!(
                            results,
                            (0..20).map(|i| 3.0 * i as f32 + 3.0).collect::<Vec<_>>()
                        );
                        (a, b)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in results {
            assert_eq!(a, vec![3.0, 30.0, 1.5]);
            assert_eq!(b, vec![0.75]);
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error_and_an_empty_group_is_refused() {
        let group = InProcessGroup::new(2).unwrap();
        let errors: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|mut member| {
                    s.spawn(move || {
                        let mut v = vec![1.0f32; 2 + member.rank()];
                        member.sum_f32(&mut v).is_err()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errors, vec![true, true]);
        assert!(InProcessGroup::new(0).is_err());
    }
}
