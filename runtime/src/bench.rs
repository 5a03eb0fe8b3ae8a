//! Speed measurement in the style of llama-bench: prefill of `pp` tokens and
//! decode of `tg` tokens, tokens per second, plus peak resident memory.

use std::time::Instant;

use kiln_backends::Logits;
use serde::Serialize;

use crate::error::RuntimeResult;
use crate::model::Model;
use crate::sampling::Rng;

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub threads: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub repetitions: usize,
    pub peak_rss_bytes: Option<u64>,
    pub weight_bytes: u64,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `reps` repetitions of prefill (`pp` random tokens) and decode (`tg` tokens, one at a time).
pub fn bench(model: &Model, pp: usize, tg: usize, reps: usize, threads: usize) -> RuntimeResult<BenchReport> {
    let vocab = model.vocab_size().max(1) as u64;
    let mut rng = Rng::new(1234);
    let mut session = model.session(pp + tg + 1, threads)?;
    let (mut pp_s, mut tg_s) = (0f64, 0f64);
    let reps = reps.max(1);
    for _ in 0..reps {
        let tokens: Vec<u32> = (0..pp.max(1)).map(|_| (rng.next_u64() % vocab) as u32).collect();
        session.truncate(0);
        let t = Instant::now();
        session.forward(&tokens, Logits::Last)?;
        pp_s += t.elapsed().as_secs_f64();
        session.truncate(0);
        session.forward(&tokens[..1], Logits::Last)?;
        let t = Instant::now();
        for _ in 0..tg {
            let tok = (rng.next_u64() % vocab) as u32;
            session.forward(&[tok], Logits::Last)?;
        }
        tg_s += t.elapsed().as_secs_f64();
    }
    let weight_bytes = model.module.params.iter().filter_map(|p| p.ty.storage_bytes()).sum();
    Ok(BenchReport {
        backend: model.backend.clone(),
        threads,
        prefill_tokens: pp,
        decode_tokens: tg,
        prefill_tokens_per_second: (pp * reps) as f64 / pp_s.max(1e-9),
        decode_tokens_per_second: (tg * reps) as f64 / tg_s.max(1e-9),
        repetitions: reps,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes,
    })
}
