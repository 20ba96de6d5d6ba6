//! Data-parallel flags of `sun train` and `sun bench train` through the binary, without a GPU:
//! argument errors, and `--nproc` starting its ranks and forwarding the first failure (on a
//! machine with no GPU or no cuda build every rank fails, and the launcher must say which and
//! why, leaving nothing behind).

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{fixtures, model_dir, scratch};

/// `sun train` on the tiny model with `extra` flags, in an environment without torchrun's
/// variables.
fn train(root: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sun"))
        .arg("train")
        .arg("--model")
        .arg(model_dir(root))
        .arg("--dataset")
        .arg(fixtures().join("lora_grad/dataset.json"))
        .arg("--out")
        .arg(root.join("out"))
        .args(["--lora-r", "4", "--max-steps", "1", "--quiet"])
        .args(extra)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LOCAL_RANK")
        .output()
        .expect("sun runs")
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_rank_flags_are_refused_before_any_work() {
    let root = scratch("dp_cli_flags");
    let cases: [(&[&str], &str); 6] = [
        (&["--nproc", "0"], "--nproc: 0 must be at least 1"),
        (
            &["--rank", "2", "--world-size", "2"],
            "--rank 2 is not below --world-size 2",
        ),
        (&["--world-size", "0"], "--world-size: 0 must be at least 1"),
        (
            &["--nproc", "2", "--rank", "0"],
            "--nproc starts the ranks itself",
        ),
        (&["--rank", "1", "--world-size", "2"], "needs --rendezvous"),
        (
            &["--world-size", "2", "--rendezvous", "tcp://host"],
            "expected tcp://HOST:PORT",
        ),
    ];
    for (flags, want) in cases {
        let msg = failure(&train(&root, flags));
        assert!(msg.contains(want), "{flags:?}: {msg}");
        assert!(!root.join("out").exists(), "{flags:?} started work: {msg}");
    }
    let msg = failure(
        &Command::new(env!("CARGO_BIN_EXE_sun"))
            .args(["bench", "train", "--nproc", "0"])
            .output()
            .unwrap(),
    );
    assert!(msg.contains("--nproc: 0 must be at least 1"), "{msg}");
}

/// Data parallel on the CPU is refused by every rank; the launcher reports a rank's reason,
/// and no rank got far enough to write anything but the (removed) rendezvous file.
#[test]
fn nproc_forwards_a_failing_ranks_message() {
    let root = scratch("dp_cli_nproc");
    let msg = failure(&train(&root, &["--nproc", "2", "--device", "cpu"]));
    assert!(msg.contains("of 2 failed (exit status: 1)"), "{msg}");
    assert!(
        msg.contains("data-parallel training runs on GPUs over NCCL"),
        "{msg}"
    );
    assert!(msg.contains("the other ranks were stopped"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(root.join("out")).unwrap().collect();
    assert!(left.is_empty(), "left in --out: {left:?}");
}
