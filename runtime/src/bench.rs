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
    /// Whether an untimed prefill and decode step ran first.
    pub warmup: bool,
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
///
/// With `warmup`, as llama-bench does by default, one untimed prefill of `pp` tokens and one
/// untimed decode step come first: the first calls of a session pay for faulting in the
/// weights' pages and growing its buffers, which a steady run does not.
pub fn bench(
    model: &Model,
    pp: usize,
    tg: usize,
    reps: usize,
    threads: usize,
    warmup: bool,
) -> RuntimeResult<BenchReport> {
    let vocab = model.vocab_size().max(1) as u64;
    let mut rng = Rng::new(1234);
    let mut session = model.session(pp + tg + 1, threads)?;
    let (mut pp_s, mut tg_s) = (0f64, 0f64);
    let reps = reps.max(1);
    if warmup {
        let tokens: Vec<u32> = (0..pp.max(1)).map(|_| (rng.next_u64() % vocab) as u32).collect();
        session.forward(&tokens, Logits::Last)?;
        if tg > 0 {
            session.forward(&tokens[..1], Logits::Last)?;
        }
    }
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
        warmup,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes,
    })
}

/// Decode speed and KV-cache size at one context length ([`bench_contexts`]).
#[derive(Clone, Debug, Serialize)]
pub struct ContextPoint {
    /// Tokens in the cache when the decode steps start.
    pub context: usize,
    /// Seconds of chunked prefill that brought the cache from the previous point here.
    pub prefill_seconds: f64,
    /// Decode step times in milliseconds: the best and the median of `steps`.
    pub decode_ms_best: f64,
    pub decode_ms_median: f64,
    /// What the session reports its KV cache holds at `context` tokens (before decoding).
    pub kv_cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ContextReport {
    pub backend: String,
    pub threads: usize,
    pub chunk: usize,
    pub steps: usize,
    pub points: Vec<ContextPoint>,
    pub peak_rss_bytes: Option<u64>,
    pub weight_bytes: u64,
}

/// Decode time per token at growing contexts: one session filled by chunked prefill
/// (`chunk` random tokens per call) up to each of `contexts` (ascending), then one untimed
/// and `steps` timed single-token decode steps, after which filling goes on from there.
pub fn bench_contexts(
    model: &Model,
    contexts: &[usize],
    chunk: usize,
    steps: usize,
    threads: usize,
) -> RuntimeResult<ContextReport> {
    let vocab = model.vocab_size().max(1) as u64;
    let mut rng = Rng::new(1234);
    let mut sorted = contexts.to_vec();
    sorted.sort_unstable();
    let steps = steps.max(1);
    let max = sorted.last().copied().unwrap_or(0) + steps + 1;
    let mut session = model.session(max, threads)?;
    let mut points = Vec::new();
    for &context in &sorted {
        let t = Instant::now();
        while session.pos() < context {
            let n = chunk.max(1).min(context - session.pos());
            let tokens: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
            session.forward(&tokens, Logits::Last)?;
        }
        let prefill_seconds = t.elapsed().as_secs_f64();
        let kv_cache_bytes = session.kv_cache_bytes().map(|b| b as u64);
        // One untimed step first (the first call after a prefill pays for growing buffers).
        session.forward(&[(rng.next_u64() % vocab) as u32], Logits::Last)?;
        let mut times: Vec<f64> = (0..steps)
            .map(|_| {
                let tok = (rng.next_u64() % vocab) as u32;
                let t = Instant::now();
                session.forward(&[tok], Logits::Last).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        points.push(ContextPoint {
            context,
            prefill_seconds,
            decode_ms_best: times[0],
            decode_ms_median: times[times.len() / 2],
            kv_cache_bytes,
        });
    }
    Ok(ContextReport {
        backend: model.backend.clone(),
        threads,
        chunk,
        steps,
        points,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes: model.module.params.iter().filter_map(|p| p.ty.storage_bytes()).sum(),
    })
}
