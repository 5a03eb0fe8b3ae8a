//! Single-thread prefill attention throughput of the CPU backend's tiled path (llama.cpp's
//! order for calls of 64+ rows), SmolLM2's shape by default (9 heads over 3 KV heads of 64)
//! and Qwen2.5-Coder-1.5B's (12 over 2, head 128): a 512-token prompt attending causally.
//! `cargo run --release -p kiln-cpu --example attention`.

use std::time::Instant;

use kiln_backends::reference::{AttnNumerics, KvCache};
use kiln_cpu::{CpuBackend, CpuKernels};
use kiln_ir::{AttentionAttrs, DType};

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let kernels = CpuKernels::new(CpuBackend::with_isa(kiln_cpu::Isa::detect()).isa());
    for (name, heads, kv_heads, hd) in [("smollm2", 9u64, 3u64, 64u64), ("qwen-1.5b", 12, 2, 128)] {
        let tokens = 512usize;
        let width = (kv_heads * hd) as usize;
        let mut s = 0x1234_5678u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            half::f16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_f32()
        };
        let mut cache = KvCache::new(width, tokens);
        let k: Vec<f32> = (0..tokens * width).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..tokens * width).map(|_| rnd()).collect();
        cache.append(&k, &v);
        let q: Vec<f32> = (0..tokens * (heads * hd) as usize).map(|_| rnd()).collect();
        let attrs = AttentionAttrs {
            cache: 0,
            heads,
            kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: 0,
            sink: 0,
            softcap: 0.0,
            kv_dtype: DType::F32,
        };
        use kiln_backends::reference::Kernels;
        let run = || kernels.attend(&q, 0, &cache, &attrs, AttnNumerics::GgmlTiled);
        pool.install(run);
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(pool.install(run));
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        // Causal: about T²/2 (query, key) pairs per head, each HD multiply-adds for the score
        // and HD for the value.
        let macs = (tokens * tokens / 2) as f64 * heads as f64 * 2.0 * hd as f64;
        println!("{name:10} pp{tokens}: {:8.2} ms  {:6.2} GMAC/s", secs * 1e3, macs / secs / 1e9);
    }
}
