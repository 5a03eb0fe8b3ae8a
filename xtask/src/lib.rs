//! kiln's cargo-xtask helper as a library: the subcommands that tests also call.

pub mod glassllm;
