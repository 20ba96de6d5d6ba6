//! The data-parallel flags of `sun train` and `sun bench train`: `--nproc` (start the ranks
//! here), or `--rank`/`--world-size`/`--local-rank` (or torchrun's environment) with
//! `--rendezvous` for a process started by the user.

use crate::cli::Args;
use crate::dist::launch::{launch, without_option};
use crate::dist::{GroupSetup, RankFlags, Ranks, Rendezvous};
use crate::error::{Error, Result};
use std::path::Path;
use std::time::Duration;

/// Help lines for the data-parallel flags.
pub const DIST_FLAGS_HELP: &str = "\
Data parallel (one process per GPU, gradients summed over NCCL; needs a cuda build, GPUs and
libnccl.so.2, see the README):
  --nproc N                  start N processes here, rank r on GPU r, and wait for them [default: 1]
  --rank R                   this process's rank [default: $RANK]
  --world-size N             number of processes [default: $WORLD_SIZE, else 1]
  --local-rank N             this process's GPU [default: $LOCAL_RANK, else the rank]
  --rendezvous WHERE         where ranks meet: a file every rank sees, or tcp://HOST:PORT of
                             rank 0 (it listens on PORT)
  --rendezvous-timeout SECS  longest wait for the other ranks [default: 300]
";

/// Parsed data-parallel flags.
#[derive(Clone, Debug)]
pub struct DistArgs {
    /// `--nproc`.
    pub nproc: usize,
    /// `--rank`, `--world-size`, `--local-rank`.
    pub flags: RankFlags,
    /// `--rendezvous`.
    pub rendezvous: Option<Rendezvous>,
    /// `--rendezvous-timeout`.
    pub timeout: Duration,
}

impl DistArgs {
    /// Takes the data-parallel flags out of `args`.
    pub fn parse(args: &mut Args) -> Result<Self> {
        let nproc: usize = args.opt_or("--nproc", 1)?;
        let flags = RankFlags {
            rank: args.opt("--rank")?,
            world_size: args.opt("--world-size")?,
            local_rank: args.opt("--local-rank")?,
        };
        let rendezvous = args
            .opt::<String>("--rendezvous")?
            .map(|r| Rendezvous::parse(&r))
            .transpose()?;
        let seconds: u64 = args.opt_or("--rendezvous-timeout", 300)?;
        if nproc == 0 {
            return Err(Error::invalid("--nproc: 0 must be at least 1"));
        }
        if nproc > 1 && (flags != RankFlags::default() || rendezvous.is_some()) {
            return Err(Error::invalid(
                "--nproc starts the ranks itself: drop --rank, --world-size, --local-rank and \
                 --rendezvous (or drop --nproc and start each rank yourself)",
            ));
        }
        if seconds == 0 {
            return Err(Error::invalid("--rendezvous-timeout: 0 must be positive"));
        }
        Ok(DistArgs {
            nproc,
            flags,
            rendezvous,
            timeout: Duration::from_secs(seconds),
        })
    }

    /// True when this process is to start `--nproc` ranks rather than run.
    pub fn launches(&self) -> bool {
        self.nproc > 1
    }

    /// Starts `--nproc` copies of this process's command line (without `--nproc`) meeting at
    /// `rendezvous_file`, and waits for them.
    pub fn launch(&self, rendezvous_file: &Path) -> Result<()> {
        let program = std::env::current_exe()
            .map_err(|e| Error::invalid(format!("finding this program to start the ranks: {e}")))?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        launch(
            &program,
            &without_option(&args, "--nproc"),
            self.nproc,
            rendezvous_file,
        )
    }

    /// This process's group: `None` for a one-process run, else its ranks (from the flags or
    /// the environment) and where to meet the others.
    pub fn group(&self) -> Result<Option<GroupSetup>> {
        let Some(ranks) = Ranks::resolve(self.flags, |name| std::env::var(name).ok())? else {
            return Ok(None);
        };
        let rendezvous = self.rendezvous.clone().ok_or_else(|| {
            Error::invalid(format!(
                "rank {} of {}: a data-parallel process needs --rendezvous FILE or \
                 tcp://HOST:PORT (or start all ranks with --nproc)",
                ranks.rank, ranks.world_size
            ))
        })?;
        Ok(Some(GroupSetup {
            ranks,
            rendezvous,
            timeout: self.timeout,
        }))
    }
}
