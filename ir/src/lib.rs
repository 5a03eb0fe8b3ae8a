//! kiln IR: a small, data-only graph IR with a textual form and a verifier.
//!
//! No I/O, no backend knowledge, no math kernels live here.

pub mod analysis;
pub mod entities;
pub mod error;
pub mod module;
pub mod ops;
pub mod ops_sparse;
pub mod parser;
pub mod printer;
pub mod types;
pub mod verify;

pub use entities::{ParamId, ValueId};
pub use error::{IrError, IrResult};
pub use module::{Inst, Meta, Module, Param};
pub use ops::{
    Activation, Arg, AttentionAttrs, CompressAttrs, CompressedAttentionAttrs, CompressorOperands, ExpertParams,
    IndexTopkAttrs, IndexerOperands, KV_DTYPES, MoeRouteAttrs, Op, RopeAttrs, RopeLayout, RotaryAttrs, Scoring,
    SparseAttentionAttrs, SteerAttrs, SteerMode, is_steer_name,
};
pub use parser::parse;
pub use printer::print;
pub use types::{DType, Dim, TensorType};
pub use verify::{VerifiedModule, check, verify};
