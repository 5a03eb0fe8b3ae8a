//! Quantizing throughput of kq2 on one thread: `cargo run --release -p kiln-quant --example kq2_speed [ROWS]`.
//! Rows of 1536 pseudo-Gaussian weights with a skewed importance, like a real matrix's.
use std::time::Instant;

use kiln_quant::kq2::{kq2_row_bytes, quantize_kq2};

fn main() {
    let rows: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let n = 1536;
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let data: Vec<f32> = (0..rows * n).map(|_| (0..4).map(|_| rnd()).sum::<f32>() - 2.0).collect();
    let imp: Vec<f32> = (0..n).map(|_| (rnd() * 4.0).exp()).collect();
    let mut out = vec![0u8; kq2_row_bytes(n).unwrap()];
    // FNV-1a over every output byte: a change that must not alter the codes keeps it.
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let t = Instant::now();
    for r in 0..rows {
        quantize_kq2(&data[r * n..(r + 1) * n], Some(&imp), &mut out).unwrap();
        for b in &out {
            sum = (sum ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    let dt = t.elapsed().as_secs_f64();
    println!("{rows}×{n}: {:.3} s, {:.3} Mweights/s, codes {sum:016x}", dt, (rows * n) as f64 / dt / 1e6);
}
