//! kiln passes: rewrites of the IR (and of the weights it owns), one file per pass,
//! registered in [`registry::PASSES`] under the name recipes use.
//!
//! Every pass reports what it did; the driver verifies the module after each one.

pub mod dce;
pub mod fuse_sparse_attention;
pub mod kv_quant;
pub mod kv_share;
pub mod quantize;
pub mod registry;
pub mod sliding_window;
pub mod steer;

use std::collections::BTreeMap;

use kiln_frontend::Weights;
use kiln_ir::{Module, ValueId};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

pub use registry::{PASSES, by_name, run_pipeline};

#[derive(Debug, Error)]
pub enum PassError {
    /// The recipe gave the pass options it does not accept.
    #[error("pass `{pass}`: bad options: {msg}")]
    BadOptions { pass: &'static str, msg: String },
    /// No pass with that name.
    #[error("unknown pass `{name}` (known: {known})")]
    Unknown { name: String, known: String },
    /// A file the options name is missing or malformed (the message names it).
    #[error("pass `{pass}`: {msg}")]
    Input { pass: &'static str, msg: String },
    /// The pass cannot handle this module.
    #[error("pass `{pass}`: unsupported: {msg}")]
    Unsupported { pass: &'static str, msg: String },
    /// The pass produced a module that fails verification: a bug in the pass.
    #[error("pass `{pass}` produced invalid IR: {err}")]
    Broken { pass: String, err: kiln_ir::IrError },
}

/// The options check of a pass that takes none: `null` or `{}`.
pub(crate) fn no_options(pass: &'static str, options: &Value) -> Result<(), PassError> {
    if !options.is_null() && options.as_object().is_none_or(|o| !o.is_empty()) {
        return Err(PassError::BadOptions { pass, msg: "takes no options".into() });
    }
    Ok(())
}

/// What a pass is given besides the module and its weights.
pub struct PassCtx<'a> {
    /// The pass's options from the recipe (`{}` when none).
    pub options: &'a Value,
    /// The device being built.
    pub device: &'a str,
    /// Where relative paths in options point from (the recipe's directory).
    pub base_dir: &'a std::path::Path,
    /// What the compile driver knows of the recipe's calibration text.
    pub calibration: Calibration<'a>,
    /// Where the results of expensive deterministic work may be kept between builds
    /// (absent: everything is computed).
    pub memo: Option<&'a dyn Memo>,
}

/// What a pipeline's passes are given besides their options (see [`PassCtx`]).
#[derive(Clone, Copy)]
pub struct PipelineCtx<'a> {
    pub device: &'a str,
    pub base_dir: &'a std::path::Path,
    pub calibration: Calibration<'a>,
    pub memo: Option<&'a dyn Memo>,
}

/// A store for the results of deterministic, expensive work inside passes (a
/// tensor quantized to a format, its measured error), keyed by a hash of
/// everything the result depends on. The compile driver keeps one on disk, so that
/// builds of one model with other budgets or candidates reuse what they share. A
/// pass must produce the same bytes with or without it; a value the store lost or
/// mangled is simply recomputed.
pub trait Memo: Sync {
    /// The value stored under `key`, if any.
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>>;
    /// Stores `value` under `key` (best effort: a store that cannot write drops it).
    fn put(&self, key: &[u8; 32], value: &[u8]);
}

/// What the compile driver measured, or can measure, on the recipe's calibration
/// text. Every field is absent when the recipe has no calibration text; passes that
/// need one say so by name.
#[derive(Clone, Copy, Default)]
pub struct Calibration<'a> {
    /// Per-input-channel activation statistics (when a pass can use them).
    pub importance: Option<&'a Importance>,
    /// Perplexity of a candidate module (passes that choose by measured quality).
    pub measure: Option<&'a Measure<'a>>,
    /// Activations of chosen values of a candidate module (passes that choose by
    /// what the model computes, e.g. how alike two layers' K/V are).
    pub capture: Option<&'a Capture<'a>>,
}

/// A perplexity oracle: `measure(module, weights)`.
pub type Measure<'a> = dyn Fn(&Module, &Weights) -> Result<f64, String> + Sync + 'a;

/// An activation oracle: `capture(module, weights, values, visit)` runs the
/// calibration text through the reference runtime chunk by chunk and calls
/// `visit(rows, per_value)` once per chunk, `per_value[i]` being the `rows × width`
/// row-major copy of `values[i]` (every token of the chunk).
pub type Capture<'a> =
    dyn Fn(&Module, &Weights, &[ValueId], &mut dyn FnMut(usize, &[&[f32]])) -> Result<(), String> + Sync + 'a;

/// Calibration data for passes: per weight name, the mean squared activation
/// of each input channel (an importance matrix, like llama.cpp's imatrix).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Importance(pub BTreeMap<String, Vec<f32>>);

impl Importance {
    pub fn get(&self, weight: &str) -> Option<&[f32]> {
        self.0.get(weight).map(Vec::as_slice)
    }
}

/// What a pass did, for the build manifest and the console.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PassReport {
    pub pass: String,
    /// One line a human reads.
    pub summary: String,
    /// Machine-readable details (counts, bytes, bits per weight, ...).
    pub details: Value,
}

/// One rewrite of the IR.
pub trait Pass: Sync {
    /// The name recipes use.
    fn name(&self) -> &'static str;
    /// One line saying what it does.
    fn summary(&self) -> &'static str;
    /// Checks the recipe's options without touching a module, so a bad recipe
    /// fails before any work (import, calibration) is done.
    fn check_options(&self, options: &Value) -> Result<(), PassError>;
    fn run(&self, module: &mut Module, weights: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError>;
}
