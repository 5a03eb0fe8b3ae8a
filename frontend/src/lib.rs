//! kiln importers: read GGUF files and Hugging Face directories and lower them to kiln IR.

pub mod arch;
pub mod control_vector;
pub mod decoder;
pub mod error;
pub mod gguf;
pub mod gguf_import;
pub mod gguf_write;
pub mod hf;
pub mod import;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

pub use error::{FrontendError, FrontendResult};
pub use import::{ImportedModel, import};
pub use weights::{SourceTensor, TensorBytes, Weights};
