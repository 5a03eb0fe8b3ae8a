//! kiln IR: a small, data-only graph IR with a textual form and a verifier.

pub mod types;

pub use types::{DType, Dim, TensorType};
