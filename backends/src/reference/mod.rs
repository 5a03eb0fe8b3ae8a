//! The reference CPU interpreter: the living definition of every op of the IR.
//!
//! [`ReferenceBackend`] runs a [`VerifiedModule`] op by op in f32, with
//! quantized weights dequantized on the fly by [`crate::quant`]. Clarity
//! comes first, but it is fast enough to run small real models: matmuls are
//! parallel over output rows and attention over (token, head) pairs, on a
//! rayon pool of [`SessionOptions::threads`] threads.
//!
//! The math of each op mirrors ggml's CPU kernels (accumulation precision,
//! operation order, RoPE angle recurrence) so logits stay close to
//! llama.cpp's; see the `kernels`, `attention` and `matmul` modules.
//!
//! - `session`: the interpreter loop, input checks, the KV cache lifetime;
//! - `plan`: prepare-time analysis (rows needed per value, value lifetimes);
//! - `kernels`: row-wise ops (norms, elementwise, activations, softmax, RoPE);
//! - `matmul`: the matmul kernel;
//! - `attention`: the KV cache and causal grouped-query attention;
//! - `sparse`: hyper-connections, mixtures of experts and compressed attention with its cache.

mod attention;
mod kernels;
mod matmul;
mod plan;
mod session;
mod sparse;

use std::sync::Arc;

use kiln_ir::{Op, VerifiedModule};

pub use attention::{AttnNumerics, FA_TILE_KV, FA_TILE_Q, KvCache, attend, tiled_scale, tiled_score, tiled_softmax};
pub use kernels::{dot, rope_angles};
pub use matmul::{Weight, place_tiles};
pub use session::{Captured, ChannelStats, Kernels, MatJob, ReferenceKernels, ReferenceSession};
pub use sparse::{CompressedCache, CompressedView, inv_freq};

use crate::{Backend, BackendError, Session, SessionOptions, WeightSource};

/// The reference interpreter backend (`"reference"`). Supports every op of the IR.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

impl ReferenceBackend {
    pub fn new() -> Self {
        ReferenceBackend
    }

    /// Like [`Backend::prepare`], returning the concrete session type.
    pub fn prepare_session(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<ReferenceSession, BackendError> {
        ReferenceSession::new(module, weights, options)
    }
}

impl Backend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    /// Every op of the IR, with any attributes and operand dtypes the verifier accepts.
    fn supports(&self, _module: &VerifiedModule, _op: &Op) -> bool {
        true
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        Ok(Box::new(self.prepare_session(module, weights, options)?))
    }
}
