//! Errors of the importers: bad input (naming the file), unsupported features, internal bugs.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FrontendError {
    /// The checkpoint is malformed or inconsistent.
    #[error("{}: {msg}", file.display())]
    BadInput { file: PathBuf, msg: String },
    /// The checkpoint is valid but uses something kiln does not support.
    #[error("{}: unsupported: {msg}", file.display())]
    Unsupported { file: PathBuf, msg: String },
    #[error("{}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
    /// A malformed or unsupported GGUF file (the message names the file).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A bug in kiln.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FrontendError {
    pub fn bad(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FrontendError::BadInput { file: file.into(), msg: msg.into() }
    }
    pub fn unsupported(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FrontendError::Unsupported { file: file.into(), msg: msg.into() }
    }
}

pub type FrontendResult<T> = Result<T, FrontendError>;
