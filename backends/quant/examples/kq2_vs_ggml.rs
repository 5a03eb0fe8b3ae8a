//! Compares kq2 with llama.cpp's 2- and 3-bit formats on real weight rows.
//!
//! The data comes from `tests/oracle/kq2_compare.py`, which dumps rows of a
//! GGUF model and their importance (an imatrix's mean squared activations) and
//! runs llama.cpp's own quantizers on them (`tests/oracle/ggml_quant_err.c`):
//!
//! ```text
//! WORK/manifest.txt          NAME ROWS COLS TYPE=BPW ...   (one tensor a line)
//! WORK/NAME.f32              ROWS*COLS f32 LE: the rows
//! WORK/NAME.imp.f32          COLS f32 LE: the importance of each column
//! WORK/NAME.TYPE.f32         ROWS*COLS f32 LE: ggml's TYPE, quantized with the importance and dequantized
//! ```
//!
//! For every tensor this quantizes the same rows with kq2 (with the importance,
//! and without for reference) and prints the importance-weighted relative RMSE
//! `sqrt(Σ imp_j (w - w')² / Σ imp_j w²)` over all the rows, per format, as a
//! markdown table; the last column is kq2's RMSE relative to IQ2_XS's
//! (negative: kq2 is better).
//!
//! ```text
//! cargo run --release -p kiln-quant --example kq2_vs_ggml -- /tmp/kq2cmp [--rows N]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_quant::kq2::{dequantize_kq2, kq2_row_bytes, quantize_kq2};

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.as_chunks::<4>().0.iter().map(|b| f32::from_le_bytes(*b)).collect()
}

/// Σ imp (w - q)² and Σ imp w² over rows of `cols`.
fn weighted(w: &[f32], q: &[f32], imp: &[f32], cols: usize) -> (f64, f64) {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (wr, qr) in w.chunks(cols).zip(q.chunks(cols)) {
        for j in 0..cols {
            let d = f64::from(imp[j]);
            num += d * f64::from(wr[j] - qr[j]).powi(2);
            den += d * f64::from(wr[j]).powi(2);
        }
    }
    (num, den)
}

/// Quantizes and dequantizes every row with kq2 on all available threads.
fn kq2_round_trip(w: &[f32], imp: Option<&[f32]>, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows = w.len() / cols;
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (wc, oc) in w.chunks(per * cols).zip(out.chunks_mut(per * cols)) {
            s.spawn(move || {
                let mut q = vec![0u8; kq2_row_bytes(cols).expect("rows are a multiple of 64")];
                for (wr, or) in wc.chunks(cols).zip(oc.chunks_mut(cols)) {
                    quantize_kq2(wr, imp, &mut q).expect("lengths");
                    dequantize_kq2(&q, or).expect("lengths");
                }
            });
        }
    });
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let work = PathBuf::from(args.next().unwrap_or_else(|| "/tmp/kq2cmp".into()));
    let mut max_rows = usize::MAX;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => max_rows = args.next().and_then(|v| v.parse().ok()).expect("--rows N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let manifest =
        std::fs::read_to_string(work.join("manifest.txt")).expect("manifest.txt: run tests/oracle/kq2_compare.py");
    let kq2_bpw = 8.0 * kq2_row_bytes(64).unwrap() as f64 / 64.0;
    let types = ["iq2_xxs", "iq2_xs", "iq2_s", "q2_K", "q3_K"];

    let mut header = format!("| {:<24} | {:>9} | {:>12} | {:>12} |", "tensor", "rows×cols", "kq2", "kq2 no-imp");
    let mut bpws = format!("| {:<24} | {:>9} | {:>12.4} | {:>12.4} |", "bits per weight", "", kq2_bpw, kq2_bpw);
    for t in types {
        header += &format!(" {t:>8} |");
    }
    // kq2's RMSE relative to IQ2_XS's: negative is better.
    header += " kq2 vs iq2_xs |";
    let mut bpw_seen = [0.0f64; 5];
    let mut lines = Vec::new();
    let mut sums = [0.0f64; 7];
    let mut count = 0usize;
    let mut secs = 0.0f64;
    let mut weights = 0usize;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let name = f.next().unwrap();
        let rows: usize = f.next().unwrap().parse().unwrap();
        let cols: usize = f.next().unwrap().parse().unwrap();
        for kv in f {
            let (t, b) = kv.split_once('=').unwrap();
            if let Some(i) = types.iter().position(|x| *x == t) {
                bpw_seen[i] = b.parse().unwrap();
            }
        }
        let take = rows.min(max_rows);
        let w = read_f32(&work.join(format!("{name}.f32")));
        let w = &w[..take * cols];
        let imp = read_f32(&work.join(format!("{name}.imp.f32")));
        let t0 = Instant::now();
        let q = kq2_round_trip(w, Some(&imp), cols);
        secs += t0.elapsed().as_secs_f64();
        weights += w.len();
        let q0 = kq2_round_trip(w, None, cols);
        let rel = |q: &[f32]| {
            let (n, d) = weighted(w, q, &imp, cols);
            (n / d).sqrt()
        };
        let mut errs = vec![rel(&q), rel(&q0)];
        for t in types {
            let path = work.join(format!("{name}.{t}.f32"));
            errs.push(if path.exists() { rel(&read_f32(&path)[..take * cols]) } else { f64::NAN });
        }
        let mut s = format!("| {:<24} | {:>9} |", name.trim_end_matches(".weight"), format!("{take}×{cols}"));
        for e in &errs {
            s += &format!(" {e:>8.4} |");
        }
        s += &format!(" {:>+12.1}% |", 100.0 * (errs[0] / errs[3] - 1.0));
        for (acc, e) in sums.iter_mut().zip(&errs) {
            *acc += e;
        }
        count += 1;
        lines.push(s);
        eprintln!("{name}: done");
    }
    for b in bpw_seen {
        bpws += &format!(" {b:>8.4} |");
    }
    bpws += " |";
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches('|').count() - 1));
    println!("{bpws}");
    for l in lines {
        println!("{l}");
    }
    let mean: Vec<f64> = sums.iter().map(|s| s / count as f64).collect();
    let mut s = format!("| {:<24} | {:>9} |", "mean", "");
    for e in &mean {
        s += &format!(" {e:>8.4} |");
    }
    s += &format!(" {:>+12.1}% |", 100.0 * (mean[0] / mean[3] - 1.0));
    println!("{s}");
    println!(
        "\nkq2 quantization: {:.2} µs per weight on {} threads",
        secs * 1e6 / weights as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}
