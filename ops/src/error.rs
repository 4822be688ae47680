//! The `ops` crate's error type: one variant per way loading or running the model can fail.

use std::path::PathBuf;

/// Everything that can go wrong in `caravan-ops`, with enough structure to say what and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint itself: its config, its files, or a layout over it.
    #[error(transparent)]
    Checkpoint(#[from] caravan_checkpoint::Error),
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("missing weight {name} in checkpoint {dir}")]
    MissingWeight { name: String, dir: PathBuf },
    #[error("weight {name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("weight {name} has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    /// Something this build or machine does not do (yet), said plainly.
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("collective {op} failed: {reason}")]
    Collective { op: &'static str, reason: String },
    #[error("collective {op} timed out after {timeout_ms} ms waiting for rank {peer}")]
    CollectiveTimeout {
        op: &'static str,
        peer: usize,
        timeout_ms: u128,
    },
    #[error("cannot read the memory of {device}: {reason}")]
    DeviceMemory { device: String, reason: String },
    #[error("cannot start {threads} compute threads: {reason}")]
    Threads { threads: usize, reason: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
