//! [`Ranks`]: which process of a data-parallel run this is, from the flags (`--rank`,
//! `--world-size`, `--local-rank`) or, as torchrun sets them, the environment (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`). Flags win over the environment.

use crate::error::{Error, Result};

/// A process's place in a data-parallel run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranks {
    /// 0-based rank among all processes; rank 0 writes the logs, checkpoints and adapter.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes of this machine: the ordinal of the GPU it takes.
    pub local_rank: usize,
}

/// The flags that place a process, each `None` when not given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RankFlags {
    /// `--rank`.
    pub rank: Option<usize>,
    /// `--world-size`.
    pub world_size: Option<usize>,
    /// `--local-rank`.
    pub local_rank: Option<usize>,
}

impl Ranks {
    /// The ranks from `flags`, else from the environment as `env` reads it (pass
    /// `|name| std::env::var(name).ok()`). `None` for a single-process run: no world size
    /// anywhere, or a world of one. The local rank defaults to the rank.
    pub fn resolve(
        flags: RankFlags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Ranks>> {
        let from_env = |name: &str, flag: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(text) if text.trim().is_empty() => Ok(None),
                Some(text) => text.trim().parse().map(Some).map_err(|_| {
                    Error::invalid(format!(
                        "the environment variable {name}={text:?} is not a whole number \
                         (or pass {flag})"
                    ))
                }),
            }
        };
        let world_size = match flags.world_size {
            Some(n) => Some(n),
            None => from_env("WORLD_SIZE", "--world-size")?,
        };
        let rank = match flags.rank {
            Some(r) => Some(r),
            None => from_env("RANK", "--rank")?,
        };
        let Some(world_size) = world_size else {
            if flags.rank.is_some() || flags.local_rank.is_some() {
                return Err(Error::invalid(
                    "--rank and --local-rank need --world-size (or WORLD_SIZE)",
                ));
            }
            return Ok(None);
        };
        if world_size == 0 {
            return Err(Error::invalid("--world-size: 0 must be at least 1"));
        }
        let rank = rank.ok_or_else(|| {
            Error::invalid(format!(
                "a world of {world_size} processes needs --rank (or RANK) for this one"
            ))
        })?;
        if rank >= world_size {
            return Err(Error::invalid(format!(
                "--rank {rank} is not below --world-size {world_size} (ranks count from 0)"
            )));
        }
        let local_rank = match flags.local_rank {
            Some(l) => l,
            None => from_env("LOCAL_RANK", "--local-rank")?.unwrap_or(rank),
        };
        if world_size == 1 {
            return Ok(None);
        }
        Ok(Some(Ranks {
            rank,
            world_size,
            local_rank,
        }))
    }

    /// True for the process that writes logs, checkpoints and the adapter.
    pub fn is_lead(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn flags(
        rank: Option<usize>,
        world_size: Option<usize>,
        local_rank: Option<usize>,
    ) -> RankFlags {
        RankFlags {
            rank,
            world_size,
            local_rank,
        }
    }

    #[test]
    fn no_world_size_is_a_single_process_run() {
        assert_eq!(
            Ranks::resolve(RankFlags::default(), env(&[])).unwrap(),
            None
        );
        assert_eq!(
            Ranks::resolve(flags(Some(0), Some(1), None), env(&[])).unwrap(),
            None
        );
    }

    #[test]
    fn flags_win_over_the_environment_and_local_rank_defaults_to_rank() {
        let torchrun = env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]);
        let want = Ranks {
            rank: 3,
            world_size: 4,
            local_rank: 1,
        };
        assert_eq!(
            Ranks::resolve(RankFlags::default(), &torchrun).unwrap(),
            Some(want)
        );
        let flagged = Ranks::resolve(flags(Some(2), None, None), &torchrun)
            .unwrap()
            .unwrap();
        assert_eq!(
            (flagged.rank, flagged.world_size, flagged.local_rank),
            (2, 4, 1)
        );
        let plain = Ranks::resolve(flags(Some(1), Some(2), None), env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(plain.local_rank, 1);
        assert!(!plain.is_lead());
    }

    #[test]
    fn bad_ranks_are_errors_naming_the_flag() {
        let err = |f: RankFlags, e: &'static [(&'static str, &'static str)]| {
            Ranks::resolve(f, env(e)).unwrap_err().to_string()
        };
        let msg = err(flags(Some(2), Some(2), None), &[]);
        assert!(
            msg.contains("--rank 2 is not below --world-size 2"),
            "{msg}"
        );
        let msg = err(flags(None, Some(0), None), &[]);
        assert!(msg.contains("--world-size"), "{msg}");
        let msg = err(flags(None, Some(2), None), &[]);
        assert!(msg.contains("needs --rank"), "{msg}");
        let msg = err(flags(Some(1), None, None), &[]);
        assert!(msg.contains("need --world-size"), "{msg}");
        let msg = err(
            RankFlags::default(),
            &[("WORLD_SIZE", "two"), ("RANK", "0")],
        );
        assert!(msg.contains("WORLD_SIZE=\"two\""), "{msg}");
    }
}
