//! Data-parallel training: one process per GPU, each running its share of every step's
//! sequences, with the adapters' gradients summed across processes before the optimizer step
//! (which every process then takes alike, so the adapters stay identical).
//!
//! - [`ranks`]: which process this is (`--rank`/`--world-size`/`--local-rank` or torchrun's
//!   `RANK`/`WORLD_SIZE`/`LOCAL_RANK`);
//! - [`rendezvous`]: rank 0 hands the group's id to the others (a file or `tcp://HOST:PORT`);
//! - [`launch`]: `--nproc N`, one command starting N ranks on this machine;
//! - [`reduce`]: [`GradientReducer`], the sums across ranks: NCCL between GPUs, or threads of
//!   one process ([`InProcessGroup`], what the trainer is tested with).

pub mod launch;
pub mod ranks;
pub mod reduce;
pub mod rendezvous;

pub use ranks::{RankFlags, Ranks};
pub use reduce::{GradientReducer, InProcessGroup};
pub use rendezvous::Rendezvous;

use std::time::Duration;

/// What a process of a data-parallel run needs to join its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSetup {
    /// This process's place.
    pub ranks: Ranks,
    /// Where the ranks meet.
    pub rendezvous: Rendezvous,
    /// How long to wait for the other ranks at the rendezvous.
    pub timeout: Duration,
}

/// Joins the NCCL group of `setup` on `device` (the GPU of this rank): rank 0 makes the id,
/// the rendezvous hands it out, every rank initialises its communicator. Rank 0 names the NCCL
/// version on stderr unless `quiet`.
#[cfg(feature = "cuda")]
pub fn join_gpu_group<'d>(
    device: &'d crate::backend::cuda::CudaDevice,
    setup: &GroupSetup,
    quiet: bool,
) -> crate::Result<crate::backend::cuda::Nccl<'d>> {
    use crate::backend::cuda::{nccl_unique_id, nccl_version, Nccl};
    let Ranks {
        rank, world_size, ..
    } = setup.ranks;
    let id = setup
        .rendezvous
        .share(rank, world_size, nccl_unique_id, setup.timeout)?;
    let nccl = Nccl::init(device, rank, world_size, id)?;
    if rank == 0 && !quiet {
        eprintln!(
            "data parallel: {world_size} ranks over NCCL {}",
            nccl_version()?
        );
    }
    Ok(nccl)
}
