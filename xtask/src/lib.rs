//! kiln's cargo-xtask helper as a library: the subcommands that tests also call.

pub mod bench_attention;
pub mod bench_cpu;
pub mod bench_cranelift;
pub mod bench_kv;
pub mod bench_quant;
pub mod bench_spec;
pub mod bench_steer;
pub mod bench_watch;
pub mod glassllm;
