//! kiln backends: the backend trait, quantized block math and the reference CPU interpreter.
//!
//! Backends only ever see a [`kiln_ir::VerifiedModule`].

pub use kiln_quant as quant;
pub mod reference;

use std::sync::Arc;

use kiln_ir::{Op, ParamId, VerifiedModule};
use thiserror::Error;

/// Read access to the bytes of every parameter of a module (mmapped or owned).
/// `bytes(p)` holds exactly `module.param(p).ty.storage_bytes()` bytes in the param's dtype.
pub trait WeightSource: Send + Sync {
    fn bytes(&self, p: ParamId) -> &[u8];
}

#[derive(Debug, Error)]
pub enum BackendError {
    /// The module uses something this backend cannot run.
    #[error("backend `{backend}` does not support {what}")]
    Unsupported { backend: &'static str, what: String },
    /// A backend recipes may name but this build of kiln does not have yet.
    #[error("backend `{name}` ({what}) is not available yet in this version of kiln")]
    NotAvailable { name: &'static str, what: &'static str },
    /// A backend name nobody knows.
    #[error("unknown backend `{name}` (known: {known})")]
    UnknownBackend { name: String, known: String },
    /// Input given at run time is out of range (too many tokens, bad token id, ...).
    #[error("{0}")]
    BadInput(String),
    /// A bug inside kiln.
    #[error("internal error in backend `{backend}`: {msg}")]
    Internal { backend: &'static str, msg: String },
}

/// How a backend rounds intermediate values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Numerics {
    /// kiln's definition: f32 activations and KV cache, exact dequantized weights.
    #[default]
    Exact,
    /// llama.cpp's CPU numerics, for token-for-token comparison with it: activations
    /// rounded to the weight type's 8-bit/f16 dot type before each matmul, and an
    /// f16 KV cache read by flash attention with an f16 value accumulator.
    Ggml,
}

/// Options for preparing a session.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Maximum number of positions the KV cache holds.
    pub max_context: usize,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    pub numerics: Numerics,
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row: `[vocab]`.
    Last,
    /// Every token's row: `[T * vocab]`.
    All,
}

/// A compiler/executor target. Narrow on purpose: a backend says what it
/// supports and turns a verified module plus weights into a running session.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether this backend can execute `op` (with its attributes and operand dtypes as given).
    fn supports(&self, module: &VerifiedModule, op: &Op) -> bool;
    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError>;
}

/// A loaded model with its KV cache.
pub trait Session: Send {
    /// Runs the graph on `tokens` at positions `pos()..pos()+tokens.len()`, appending to the KV cache.
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, BackendError>;
    /// Number of positions in the KV cache.
    fn pos(&self) -> usize;
    /// Drops cached positions at and after `pos` (rollback, e.g. for speculative decoding).
    fn truncate(&mut self, pos: usize);
    fn vocab_size(&self) -> usize;
}

/// First op in `module` that `backend` cannot run, as a message naming the op.
pub fn first_unsupported(backend: &dyn Backend, module: &VerifiedModule) -> Option<String> {
    module
        .insts
        .iter()
        .enumerate()
        .find_map(|(i, inst)| (!backend.supports(module, &inst.op)).then(|| format!("op `{}` (%{i})", inst.op.name())))
}

/// Backends recipes can name, and whether this build of kiln has them.
pub const BACKEND_NAMES: &[(&str, &str)] = &[
    ("reference", "the reference CPU interpreter"),
    ("cpu", "the compiled CPU backend for laptops"),
    ("wgpu", "WGSL kernels through wgpu (phones)"),
    ("metal", "Metal Shading Language (Apple)"),
    ("ptx", "CUDA via PTX"),
    ("fixed", "integer-only C library for microcontrollers (watches)"),
];

/// The backend called `name`, or an error saying it is unknown or not available yet.
pub fn backend_by_name(name: &str) -> Result<Box<dyn Backend>, BackendError> {
    match name {
        "reference" => Ok(Box::new(reference::ReferenceBackend::new())),
        _ => match BACKEND_NAMES.iter().find(|(n, _)| *n == name) {
            Some((n, what)) => Err(BackendError::NotAvailable { name: n, what }),
            None => Err(BackendError::UnknownBackend {
                name: name.to_string(),
                known: BACKEND_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            }),
        },
    }
}
