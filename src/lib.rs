//! The `kiln` command-line tool as a library: recipes, the model registry and
//! fetching, and the compile pipeline. `main.rs` is only argument parsing.

// Errors carry every lower crate's error by value; they travel once, on the cold path of a CLI.
#![allow(clippy::result_large_err)]

pub mod compile;
pub mod error;
pub mod export;
pub mod memo;
pub mod models;
pub mod progress;
pub mod recipe;

pub use error::{KilnError, KilnResult};
