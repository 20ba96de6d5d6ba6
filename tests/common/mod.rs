//! Helpers shared by the integration tests that drive `sun train` through the binary.

use std::path::{Path, PathBuf};

/// The fixtures folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A scratch folder under the target directory, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model folder: the untied tiny model with the fixture tokenizer beside it.
pub fn model_dir(root: &Path) -> PathBuf {
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, name) in [
        (fixtures().join("tiny_llama/untied"), "config.json"),
        (fixtures().join("tiny_llama/untied"), "model.safetensors"),
        (fixtures().join("lora_grad"), "tokenizer.json"),
        (fixtures().join("lora_grad"), "tokenizer_config.json"),
    ] {
        std::fs::copy(from.join(name), dir.join(name)).unwrap();
    }
    dir
}
