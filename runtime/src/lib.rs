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

/// Tunes the C allocator for a process that runs models, once at start-up, before
/// other threads exist. A forward pass allocates and frees activation buffers of many
/// MiB per op; by default glibc serves those with fresh `mmap`s (and trims freed heap
/// back to the system), so every op pays page faults and the kernel's zeroing of the
/// pages — a tenth of prefill time on Qwen2.5-Coder-1.5B. Raising both thresholds
/// keeps freed buffers in the heap for the next op. Does nothing off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets two of glibc's allocation thresholds; both values are
    // within its accepted range (mmap threshold at most 32 MiB on 64-bit).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
