//! Single-thread matvec (decode) throughput of the CPU backend's kernels per layout, for a
//! matrix that fits in L2, a feed-forward down projection (and its gate: the same size, short
//! rows) and one that streams from memory, and matmul (prefill) throughput for 64 token rows
//! (`KILN_MATVEC_ROWS`) on the first two:
//! `cargo run --release -p kiln-cpu --example matvec`. `KILN_MATVEC_ONLY=Q5_0` picks one
//! layout, `KILN_MATVEC_ISA=avx2` an instruction set below the best one, `KILN_MATVEC_REPS`
//! the prefill repetitions (5), `KILN_MATVEC_DECODE_SCALE` multiplies the decode ones (for a
//! profiler), `KILN_MATVEC_THREADS` runs on that many threads instead of one (the memory-fed
//! regime of a model's decode), `KILN_MATVEC_FLUSH=1` evicts the caches before each decode
//! repetition (weights read from memory, as in a model, not from L3).

use std::time::Instant;

use kiln_backends::reference::{Kernels, Weight};
use kiln_cpu::{CpuKernels, Isa};
use kiln_ir::DType;

fn main() {
    let flush = std::env::var("KILN_MATVEC_FLUSH").is_ok_and(|v| v == "1");
    let evict: Vec<u8> = (0..if flush { 96usize << 20 } else { 0 }).map(|i| i as u8).collect();
    let threads = std::env::var("KILN_MATVEC_THREADS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let isa = match std::env::var("KILN_MATVEC_ISA").as_deref() {
        Ok("avx2") => Isa::Avx2,
        Ok("scalar") => Isa::Scalar,
        _ => Isa::detect(),
    };
    let plain = CpuKernels::new(kiln_cpu::CpuBackend::with_isa(isa).isa());
    println!("isa: {}", plain.isa.name());
    let prefill_rows: usize = std::env::var("KILN_MATVEC_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(64);
    let only = std::env::var("KILN_MATVEC_ONLY").ok();
    // Every quantized layout.
    for dtype in
        DType::ALL.iter().copied().filter(|d| d.is_quantized() && only.as_deref().is_none_or(|o| format!("{d:?}") == o))
    {
        for (n, kk) in [(1536usize, 576usize), (1536, 8960), (8960, 1536), (32768, 2048)] {
            let kk = if dtype.block_elems() == 256 { kk.next_multiple_of(256) } else { kk };
            let rb = dtype.row_bytes(kk as u64).unwrap() as usize;
            let mut bytes = vec![0u8; n * rb];
            let mut s = 0x1234_5678_9abc_def0u64;
            for b in bytes.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
            // Sane f16 scales where the layouts keep them (random bits would be NaN/Inf at times).
            let bb = dtype.block_bytes() as usize;
            let h = half::f16::from_f32(0.01).to_le_bytes();
            for blk in bytes.chunks_mut(bb) {
                match dtype {
                    DType::Q6K => blk[208..210].copy_from_slice(&h),
                    DType::Q3K => blk[108..110].copy_from_slice(&h),
                    DType::KQ2 => {}
                    DType::Q2K => {
                        blk[80..82].copy_from_slice(&h);
                        blk[82..84].copy_from_slice(&h);
                    }
                    DType::Q4K | DType::Q5K | DType::Q4_1 | DType::Q5_1 => {
                        blk[0..2].copy_from_slice(&h);
                        blk[2..4].copy_from_slice(&h);
                    }
                    _ => blk[0..2].copy_from_slice(&h),
                }
            }
            let x: Vec<f32> = (0..kk).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w = Weight { bytes: &bytes, dtype, n, k: kk };
            // The session's packed form where the backend would pack this layout (VNNI CPUs).
            let mut k = plain.clone();
            #[cfg(target_arch = "x86_64")]
            if k.isa == Isa::Avx512Vnni {
                k.packed = Some(std::sync::Arc::new(kiln_cpu::PackedWeights::of_matrix(&w))).filter(|p| !p.is_empty());
            }
            let reps = (200_000_000 / (n * kk)).max(10)
                * std::env::var("KILN_MATVEC_DECODE_SCALE").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
            let t = pool.install(|| {
                let _ = k.matmul(&x, 1, w, None, 0, 1).unwrap();
                // The fastest repetition: other work on the machine only slows some down.
                (0..reps)
                    .map(|_| {
                        // Reads only: dirty lines written back would tax the timed reads.
                        std::hint::black_box(evict.iter().step_by(64).fold(0u8, |a, &b| a ^ b));
                        let t0 = Instant::now();
                        std::hint::black_box(k.matmul(&x, 1, w, None, 0, 1).unwrap());
                        t0.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            });
            println!(
                "{:>5} {n:>6}x{kk:<5} {:>8.1} us  {:>6.2} Gweights/s  {:>6.2} GB/s",
                format!("{dtype:?}"),
                t * 1e6,
                (n * kk) as f64 / t / 1e9,
                (n * rb) as f64 / t / 1e9
            );
            if n > 2048 {
                continue;
            }
            let rows = prefill_rows;
            let xs: Vec<f32> = (0..rows * kk).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let reps: usize = std::env::var("KILN_MATVEC_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
            let t = pool.install(|| {
                (0..reps)
                    .map(|_| {
                        let t0 = Instant::now();
                        std::hint::black_box(k.matmul(&xs, rows, w, None, 0, rows).unwrap());
                        t0.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            });
            println!(
                "{:>5} {n:>6}x{kk:<5} x {rows} tokens {:>8.1} us  {:>6.2} GMAC/s",
                format!("{dtype:?}"),
                t * 1e6,
                (rows * n * kk) as f64 / t / 1e9
            );
        }
    }
}
