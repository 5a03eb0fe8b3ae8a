//! kiln runtime: loads a model (GGUF, Hugging Face directory or kiln build),
//! tokenizes, generates text, measures perplexity and speed.

pub mod artifact;
pub mod backends;
pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod error;
pub mod generate;
pub mod grammar;
pub mod model;
pub mod ppl;
pub mod quality;
pub mod sampling;
pub mod speculative;
pub mod steer;
pub mod tokenizer;

pub use error::{RuntimeError, RuntimeResult};
pub use model::Model;
