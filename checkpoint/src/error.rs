//! The checkpoint crate's error type: what is wrong with a checkpoint, and where.

use std::path::PathBuf;

/// Everything that can be wrong with a checkpoint folder or a layout over it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("cannot shard this model over {world_size} ranks: {reason}")]
    InvalidParallelism { world_size: usize, reason: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidCheckpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
