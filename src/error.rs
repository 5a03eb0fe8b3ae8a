//! Errors of the command-line tool: every lower crate's errors, plus recipe and
//! fetch problems. Printed without backtraces; each maps to an exit code.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KilnError {
    /// A recipe, model registry entry or command-line input is wrong.
    #[error("{}: {msg}", file.display())]
    BadInput { file: PathBuf, msg: String },
    /// Something asked for that kiln does not have (yet).
    #[error("{0}")]
    Unsupported(String),
    /// Fetching a model package failed.
    #[error("fetch {model}: {msg}")]
    Fetch { model: String, msg: String },
    #[error("{}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Frontend(#[from] kiln_frontend::FrontendError),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    #[error(transparent)]
    Pass(#[from] kiln_passes::PassError),
    #[error(transparent)]
    Backend(#[from] kiln_backends::BackendError),
    #[error("{0}")]
    Ir(#[from] kiln_ir::IrError),
}

impl KilnError {
    pub fn bad(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        KilnError::BadInput { file: file.into(), msg: msg.into() }
    }
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KilnError::Io { file: file.into(), source }
    }
    /// Process exit code: 1 for bad input and unsupported requests, 3 for internal errors.
    pub fn exit_code(&self) -> i32 {
        let internal = matches!(
            self,
            KilnError::Frontend(kiln_frontend::FrontendError::Internal(_))
                | KilnError::Backend(kiln_backends::BackendError::Internal { .. })
                | KilnError::Pass(kiln_passes::PassError::Broken { .. })
        );
        if internal { 3 } else { 1 }
    }
}

pub type KilnResult<T> = Result<T, KilnError>;
