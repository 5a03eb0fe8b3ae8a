//! kiln backends: the backend trait, quantized block math and the reference CPU interpreter.
//!
//! Backends only ever see a [`kiln_ir::VerifiedModule`].

pub use kiln_quant as quant;
pub mod conformance;
pub mod reference;
pub mod ring;

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
    /// The backend's files of the build being run ([`Backend::emit`]), when there is a build.
    pub files: Vec<BuildFile>,
    /// Run-time strengths of the module's steering ops, by steering name (the
    /// compiled strength otherwise). Names no op carries are refused by [`check_steer`].
    pub steer: std::collections::BTreeMap<String, f32>,
}

/// The checks a GPU backend makes before preparing a session: kiln's exact numerics are
/// asked for (the GPU kernels do not emulate llama.cpp's rounding), and every op of
/// `module` is one `backend` runs.
pub fn check_gpu_prepare(
    backend: &dyn Backend,
    module: &VerifiedModule,
    options: &SessionOptions,
) -> Result<(), BackendError> {
    if options.numerics != Numerics::Exact {
        return Err(BackendError::Unsupported {
            backend: backend.name(),
            what: "llama.cpp-compatible numerics (`Numerics::Ggml`); it computes kiln's exact numerics".into(),
        });
    }
    match first_unsupported(backend, module) {
        Some(what) => Err(BackendError::Unsupported { backend: backend.name(), what }),
        None => Ok(()),
    }
}

/// Checks run-time steering strengths against the steering ops of `module`.
pub fn check_steer(
    module: &VerifiedModule,
    steer: &std::collections::BTreeMap<String, f32>,
) -> Result<(), BackendError> {
    let names: std::collections::BTreeSet<&str> = module
        .insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Steer { attrs, .. } => Some(attrs.name.as_str()),
            _ => None,
        })
        .collect();
    for (name, s) in steer {
        if !names.contains(name.as_str()) {
            let have = if names.is_empty() {
                "none".to_string()
            } else {
                names.iter().copied().collect::<Vec<_>>().join(", ")
            };
            return Err(BackendError::BadInput(format!("no steering named `{name}` in this build (it has: {have})")));
        }
        if !s.is_finite() {
            return Err(BackendError::BadInput(format!("steering `{name}`: strength {s} is not finite")));
        }
    }
    Ok(())
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
    /// What about `op` this backend lacks, when `supports` says no and there is more to say
    /// than the op's name (an attribute, a dtype); shown in the error.
    fn unsupported_detail(&self, _module: &VerifiedModule, _op: &Op) -> Option<String> {
        None
    }
    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError>;
    /// Files the backend generates for `module` at compile time (kernel
    /// sources), stored in the build beside the IR and handed back to
    /// [`Backend::prepare`] in [`SessionOptions::files`]. Deterministic. Backends that
    /// compile the weights into their files (the fixed-point C library) read `weights`.
    fn emit(&self, _module: &VerifiedModule, _weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
        Ok(Vec::new())
    }
}

/// A file a backend adds to a build: a name (no directories) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildFile {
    pub name: String,
    pub bytes: Vec<u8>,
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
    /// Bytes the KV cache holds now (what later tokens attend over), where the backend
    /// counts them.
    fn kv_cache_bytes(&self) -> Option<usize> {
        None
    }
    /// Runs `tokens` like [`Session::forward`] and returns the id of the largest
    /// logit of the last token (lowest id on ties): greedy decoding without
    /// copying the logits back, where the backend can.
    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, BackendError> {
        let logits = self.forward(tokens, Logits::Last)?;
        Ok(argmax(&logits))
    }
    /// Runs `tokens` like [`Session::forward`] and returns the `k` largest logits of the
    /// last token as `(id, logit)`, ordered by logit descending then id ascending, NaN
    /// skipped (fewer when fewer are finite): top-k sampling without copying the whole
    /// row back, where the backend can.
    fn forward_top_k(&mut self, tokens: &[u32], k: usize) -> Result<Vec<(u32, f32)>, BackendError> {
        let logits = self.forward(tokens, Logits::Last)?;
        Ok(top_k(&logits, k))
    }
}

/// The `k` largest values of `v` as `(index, value)`, by value descending then index
/// ascending, NaN skipped.
pub fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut c: Vec<(u32, f32)> =
        v.iter().enumerate().filter(|(_, x)| !x.is_nan()).map(|(i, x)| (i as u32, *x)).collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < c.len() && k > 0 {
        c.select_nth_unstable_by(k - 1, order);
        c.truncate(k);
    }
    c.sort_by(order);
    c.truncate(k);
    c
}

/// Checks that every parameter's bytes are exactly its storage size (before a
/// session reads any of them).
pub fn check_weight_sizes(module: &VerifiedModule, weights: &dyn WeightSource) -> Result<(), BackendError> {
    for (i, p) in module.params.iter().enumerate() {
        let want = p.ty.storage_bytes().and_then(|n| usize::try_from(n).ok());
        let got = weights.bytes(ParamId(i as u32)).len();
        if want != Some(got) {
            return Err(BackendError::BadInput(format!(
                "weights for @{} ({}) hold {got} bytes, expected {}",
                p.name,
                p.ty,
                want.map_or_else(|| "a representable size".to_string(), |n| n.to_string())
            )));
        }
    }
    Ok(())
}

/// Checks a forward call's input before a session changes anything: at least one
/// token, room in the context, ids inside the (smallest) embedding table.
pub fn check_forward_input(
    tokens: &[u32],
    pos: usize,
    max_context: usize,
    embed_rows: Option<usize>,
) -> Result<(), BackendError> {
    if tokens.is_empty() {
        return Err(BackendError::BadInput("forward needs at least one token".into()));
    }
    if pos.checked_add(tokens.len()).is_none_or(|e| e > max_context) {
        return Err(BackendError::BadInput(format!(
            "{pos} cached positions + {} new tokens exceed the context of {max_context} positions",
            tokens.len()
        )));
    }
    if let Some(rows) = embed_rows
        && let Some((i, &id)) = tokens.iter().enumerate().find(|(_, id)| **id as usize >= rows)
    {
        return Err(BackendError::BadInput(format!(
            "token {i} has id {id}, outside the embedding table of {rows} rows"
        )));
    }
    Ok(())
}

/// Index of the largest value (the first on ties; 0 for an empty slice).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// First op in `module` that `backend` cannot run, as a message naming the op.
pub fn first_unsupported(backend: &dyn Backend, module: &VerifiedModule) -> Option<String> {
    module.insts.iter().enumerate().find_map(|(i, inst)| {
        (!backend.supports(module, &inst.op)).then(|| match backend.unsupported_detail(module, &inst.op) {
            Some(why) => format!("op `{}` (%{i}): {why}", inst.op.name()),
            None => format!("op `{}` (%{i})", inst.op.name()),
        })
    })
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
