//! The crate-wide error type: every failure names the file and, where there is one, the tensor.

use std::path::{Path, PathBuf};

/// Every error udelta-gpu reports. Messages name the file and the tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint file that is not valid safetensors, or not usable as given.
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A problem with one tensor of a checkpoint.
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor {
        /// The checkpoint file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A `.udelta` file that is corrupted, truncated or of an unknown version.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The `.udelta` file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A parameter out of range, rejected before any work is done.
    #[error("invalid parameter: {0}")]
    Param(String),
    /// A GPU (wgpu) failure: no adapter, device lost, out of memory, ...
    #[error("GPU engine: {0}")]
    Gpu(String),
    /// The run was interrupted (SIGINT/SIGTERM); outputs were removed.
    #[error("interrupted")]
    Interrupted,
    /// A failure not tied to one input file (a parameter, the GPU device) that stopped a run
    /// before `path` was written: the message names the output that does not exist.
    #[error("{}: not written: {source}", path.display())]
    NotWritten {
        /// The output that was not produced.
        path: PathBuf,
        /// Why.
        source: Box<Error>,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    /// A whole-checkpoint problem in `path`.
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    /// A problem with `tensor` in `path`.
    pub fn tensor(path: impl AsRef<Path>, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
    /// Names `output` in errors that do not name a file yet (parameters, GPU, interruption),
    /// saying it was not written; errors that already name their file are returned as they are.
    pub fn for_output(self, output: impl AsRef<Path>) -> Self {
        match self {
            Error::Param(_) | Error::Gpu(_) | Error::Interrupted => Error::NotWritten {
                path: output.as_ref().to_path_buf(),
                source: Box::new(self),
            },
            other => other,
        }
    }
    /// A corrupted or unreadable `.udelta` file.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
