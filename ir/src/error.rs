//! Errors of the IR crate: text parse errors (with line and column) and verifier errors.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum IrError {
    /// The textual IR could not be parsed.
    #[error("{line}:{col}: {msg}")]
    Parse { line: usize, col: usize, msg: String },
    /// The module is well-formed text but breaks an invariant.
    #[error("verifier: {at}: {msg}")]
    Verify { at: String, msg: String },
    /// Building a module through the builder API went wrong (a bug in the caller).
    #[error("builder: {0}")]
    Build(String),
}

pub type IrResult<T> = Result<T, IrError>;
