//! The `kiln` command-line tool as a library: recipes, the model registry and
//! fetching, and the compile pipeline. `main.rs` is only argument parsing.

pub mod compile;
pub mod error;
pub mod models;
pub mod progress;
pub mod recipe;

pub use error::{KilnError, KilnResult};
