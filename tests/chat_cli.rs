//! `sun chat` through the binary: each turn's answer is what `sun generate --chat` gives for the
//! conversation so far (greedy), with the KV cache reused across turns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny model with the fixture tokenizer beside it (no chat template: Guanaco format).
fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat_cli_model");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (from, name) in [
        ("tiny_llama/untied", "config.json"),
        ("tiny_llama/untied", "model.safetensors"),
        ("lora_grad", "tokenizer.json"),
        ("lora_grad", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixtures().join(from).join(name), dir.join(name)).unwrap();
    }
    dir
}

#[test]
fn first_turn_equals_generate_and_later_turns_run() {
    let model = model_dir();
    let sun = env!("CARGO_BIN_EXE_sun");
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--quiet",
    ];
    let generate = Command::new(sun)
        .arg("generate")
        .args(common)
        .args(["--chat", "--prompt", "Hello there"])
        .output()
        .unwrap();
    assert!(
        generate.status.success(),
        "{}",
        String::from_utf8_lossy(&generate.stderr)
    );
    let want = String::from_utf8(generate.stdout).unwrap();

    let mut chat = Command::new(sun)
        .arg("chat")
        .args(common)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nAnd then?\n/reset\nHello there\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(&want),
        "chat's first answer {stdout:?} differs from generate's {want:?}"
    );
    // After /reset the same first message gets the same answer again.
    assert!(
        stdout.ends_with(&want),
        "after /reset: {stdout:?} vs {want:?}"
    );
    assert!(
        stdout.len() > 2 * want.len(),
        "three answers expected: {stdout:?}"
    );
}
