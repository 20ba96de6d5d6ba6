//! The one error type of the crate.
//!
//! Every message names the thing at fault (a file, a tensor, a flag, a row) and, where there
//! is one, what the user can do about it. Nothing here panics; `main` prints the error on one
//! line and exits non-zero.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in Sun-Assistant.
#[derive(Debug)]
pub enum Error {
    /// An operating-system error while touching `path`.
    Io {
        /// The file or folder being read or written.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file whose bytes do not follow its format (safetensors, GGUF, JSON, ...).
    Format {
        /// The file (or file and tensor) at fault.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A user-supplied value (flag, argument, dataset row, shape) that cannot be used.
    Invalid(String),
    /// A valid input that this engine does not implement.
    Unsupported(String),
    /// A GPU driver or kernel failure.
    Device(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A format error in `what` (usually a file path, possibly with a tensor name).
    pub fn format(what: impl fmt::Display, problem: impl Into<String>) -> Self {
        Error::Format {
            what: what.to_string(),
            problem: problem.into(),
        }
    }

    /// An invalid user input.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// A valid but unsupported input.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {}", path.display(), source),
            Error::Format { what, problem } => write!(f, "{what}: {problem}"),
            Error::Invalid(msg) => f.write_str(msg),
            Error::Unsupported(msg) => write!(f, "unsupported: {msg}"),
            Error::Device(msg) => write!(f, "device: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
