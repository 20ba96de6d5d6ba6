//! Writing files and folders so that a failure never leaves a half-written result behind:
//! everything goes to a temporary sibling first and is renamed into place at the end.

use crate::error::{Error, Result};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temporary sibling of `path` used while it is being written.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `path` atomically: `fill` writes into a buffered temporary file, which is synced
/// and renamed over `path` only if `fill` succeeds. On failure the temporary file is removed.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let tmp = temp_sibling(path);
    let result = (|| {
        let file = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A folder being built in a temporary sibling; [`StagedDir::commit`] renames it into place.
/// Dropped without commit, it removes the temporary folder.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts building `target`. Fails if `target` exists and is not an empty folder, so that no
    /// earlier result is ever overwritten by accident.
    pub fn new(target: &Path) -> Result<Self> {
        if target.exists() {
            let empty = fs::read_dir(target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(Error::invalid(format!(
                    "{}: output already exists; remove it or choose another --out",
                    target.display()
                )));
            }
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let temp = temp_sibling(target);
        if temp.exists() {
            fs::remove_dir_all(&temp).map_err(|e| Error::io(&temp, e))?;
        }
        fs::create_dir(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            temp,
            committed: false,
        })
    }

    /// The path of `name` inside the folder being built.
    pub fn path(&self, name: &str) -> PathBuf {
        self.temp.join(name)
    }

    /// Moves the finished folder into place.
    pub fn commit(mut self) -> Result<()> {
        if self.target.exists() {
            fs::remove_dir(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.temp);
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads and parses a JSON file, naming it in the error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(path.display(), format!("invalid JSON: {e}")))
}

/// Writes a JSON value, pretty-printed, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(|e| Error::io(path, e.into()))?;
        w.write_all(b"\n").map_err(|e| Error::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("sun-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.bin");
        let r = write_atomic(&path, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::invalid("boom"))
        });
        assert!(r.is_err());
        assert!(!path.exists());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "temporary file left behind"
        );
        write_atomic(&path, |w| {
            w.write_all(b"whole").map_err(|e| Error::io(&path, e))
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"whole");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn staged_dir_is_all_or_nothing() {
        let base = std::env::temp_dir().join(format!("sun-staged-{}", std::process::id()));
        let target = base.join("model");
        {
            let staged = StagedDir::new(&target).unwrap();
            fs::write(staged.path("a.txt"), b"x").unwrap();
        }
        assert!(!target.exists());
        let staged = StagedDir::new(&target).unwrap();
        fs::write(staged.path("a.txt"), b"x").unwrap();
        staged.commit().unwrap();
        assert!(target.join("a.txt").exists());
        assert!(StagedDir::new(&target).is_err(), "must refuse to overwrite");
        fs::remove_dir_all(&base).unwrap();
    }
}
