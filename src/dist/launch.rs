//! `--nproc N`: one machine's data-parallel run started from one command. The launcher runs N
//! copies of its own command line (without `--nproc`), rank r with `RANK=r`, `LOCAL_RANK=r`,
//! `WORLD_SIZE=N` in its environment (as torchrun sets them) and `--rendezvous FILE`, relays
//! their stderr (the other ranks' lines prefixed `[rank r]`), and waits for all of them. When
//! one fails, the rest are killed and the launcher fails with that rank's last message.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// `args` without the option `flag` and its value (`--flag N` or `--flag=N`).
pub fn without_option(args: &[OsString], flag: &str) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if text == flag {
            skip_value = true;
        } else if !text.starts_with(&format!("{flag}=")) {
            out.push(arg.clone());
        }
    }
    out
}

/// A started rank: its process and the thread relaying its stderr.
struct Rank {
    child: Child,
    relay: Option<JoinHandle<()>>,
    last_line: Arc<Mutex<String>>,
}

/// Runs ranks 0..`nproc` of `program` with `args` and the rendezvous file `rendezvous` (removed
/// first if an earlier run left it), and waits for all of them.
pub fn launch(program: &Path, args: &[OsString], nproc: usize, rendezvous: &Path) -> Result<()> {
    if nproc == 0 {
        return Err(Error::invalid("--nproc: 0 must be at least 1"));
    }
    if rendezvous.exists() {
        std::fs::remove_file(rendezvous).map_err(|e| Error::io(rendezvous, e))?;
    }
    let mut ranks: Vec<Rank> = Vec::with_capacity(nproc);
    for r in 0..nproc {
        let spawned = Command::new(program)
            .args(args)
            .arg("--rendezvous")
            .arg(rendezvous)
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                stop_all(&mut ranks);
                return Err(Error::io(program, e));
            }
        };
        let last_line = Arc::new(Mutex::new(String::new()));
        let relay = child.stderr.take().map(|stderr| {
            let last_line = Arc::clone(&last_line);
            std::thread::spawn(move || relay(stderr, r, &last_line))
        });
        ranks.push(Rank {
            child,
            relay,
            last_line,
        });
    }
    let failure = wait_all(&mut ranks)?;
    stop_all(&mut ranks);
    match failure {
        None => Ok(()),
        Some((r, status)) => {
            let line = ranks[r]
                .last_line
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            let message = line.strip_prefix("error: ").unwrap_or(&line);
            Err(Error::invalid(format!(
                "rank {r} of {nproc} failed ({status}){}; the other ranks were stopped",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            )))
        }
    }
}

/// Waits until every rank has exited successfully, or one has failed: its rank and status.
fn wait_all(ranks: &mut [Rank]) -> Result<Option<(usize, ExitStatus)>> {
    let mut done = vec![false; ranks.len()];
    while done.iter().any(|d| !d) {
        for (r, rank) in ranks.iter_mut().enumerate() {
            if done[r] {
                continue;
            }
            match rank.child.try_wait() {
                Ok(Some(status)) if status.success() => done[r] = true,
                Ok(Some(status)) => return Ok(Some((r, status))),
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::invalid(format!("waiting for rank {r}: {e}")));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(None)
}

/// Kills every rank still running (each by its own process id), reaps them all and lets their
/// relays finish.
fn stop_all(ranks: &mut [Rank]) {
    for rank in ranks.iter_mut() {
        if let Ok(None) = rank.child.try_wait() {
            // An error here means it exited meanwhile.
            let _ = rank.child.kill();
        }
        let _ = rank.child.wait();
        if let Some(relay) = rank.relay.take() {
            let _ = relay.join();
        }
    }
}

/// Copies rank `r`'s stderr to ours (rank 0's as is, so its progress line redraws; the
/// others' line by line behind `[rank r]`) and keeps its last non-empty line.
fn relay(mut stderr: impl Read, r: usize, last_line: &Mutex<String>) {
    let mut buffer = [0u8; 8192];
    let mut pending = Vec::new();
    let mut out = std::io::stderr();
    loop {
        let n = match stderr.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        if r == 0 {
            let _ = out.write_all(chunk);
        }
        pending.extend_from_slice(chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim()
                .to_string();
            if text.is_empty() {
                continue;
            }
            if r != 0 {
                let _ = writeln!(out, "[rank {r}] {text}");
            }
            if let Ok(mut last) = last_line.lock() {
                *last = text;
            }
        }
    }
    let text = String::from_utf8_lossy(&pending).trim().to_string();
    if !text.is_empty() {
        if r != 0 {
            let _ = writeln!(out, "[rank {r}] {text}");
        }
        if let Ok(mut last) = last_line.lock() {
            *last = text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn removes_the_option_and_its_value_in_both_spellings() {
        let args = os(&[
            "train",
            "--nproc",
            "2",
            "--out",
            "o",
            "--nproc=3",
            "--nprocs",
            "x",
        ]);
        assert_eq!(
            without_option(&args, "--nproc"),
            os(&["train", "--out", "o", "--nprocs", "x"])
        );
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_names_its_message() {
        let dir = std::env::temp_dir().join(format!("sun-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Rank 1 fails at once; rank 0 would run for a minute unless killed.
        let script = "if [ \"$RANK\" = 1 ]; then echo \"error: rank $RANK of $WORLD_SIZE broke ($1 $2)\" >&2; exit 3; fi; exec sleep 60";
        let start = std::time::Instant::now();
        let msg = launch(
            Path::new("/bin/sh"),
            &os(&["-c", script, "sh"]),
            2,
            &dir.join("rendezvous"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rank 0 was not stopped"
        );
        assert!(msg.contains("rank 1 of 2 failed"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains(": rank 1 of 2 broke (--rendezvous "), "{msg}");
        let ok = launch(
            Path::new("/bin/sh"),
            &os(&["-c", "exit 0", "sh"]),
            3,
            &dir.join("r"),
        );
        assert!(ok.is_ok());
        assert!(launch(Path::new("/bin/sh"), &[], 0, &dir.join("r")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
