//! Errors of the runtime: bad input (naming the file), errors passed up from the
//! importers, backends and tokenizer, and internal bugs.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A build or input file is malformed, tampered with or inconsistent.
    #[error("{}: {msg}", file.display())]
    BadInput { file: PathBuf, msg: String },
    #[error("{}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
    /// A request that cannot be served (context too long, unknown backend, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Frontend(#[from] kiln_frontend::FrontendError),
    #[error(transparent)]
    Backend(#[from] kiln_backends::BackendError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
}

impl RuntimeError {
    pub fn bad(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        RuntimeError::BadInput { file: file.into(), msg: msg.into() }
    }
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io { file: file.into(), source }
    }
}

pub type RuntimeResult<T> = Result<T, RuntimeError>;
