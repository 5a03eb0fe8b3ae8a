//! Perplexity with llama.cpp's chunking (`llama-perplexity`): the text is split
//! into chunks of `ctx` tokens, the first token of each chunk becomes BOS when the
//! model adds one, and only the second half of each chunk is scored.

use kiln_backends::Logits;
use serde::Serialize;

use crate::error::{RuntimeError, RuntimeResult};
use crate::model::Model;

#[derive(Clone, Debug, Serialize)]
pub struct PplReport {
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub ppl: f64,
    /// Running perplexity after each chunk (as llama-perplexity prints).
    pub per_chunk: Vec<f64>,
    /// Mean negative log-likelihood in nats.
    pub nll: f64,
    pub seconds: f64,
}

/// A text cut into llama-perplexity's chunks of `ctx` tokens (shared by
/// perplexity, calibration and the quality report).
pub struct Chunks {
    pub tokens: Vec<u32>,
    pub ctx: usize,
    /// Chunks to use: all whole chunks, or at most the requested number.
    pub count: usize,
}

impl Chunks {
    /// Tokenizes `text` (named `what` in errors) for chunks of `ctx` tokens, at
    /// most `max_chunks` of them (0 = all).
    pub fn of(model: &Model, text: &str, ctx: usize, max_chunks: usize, what: &str) -> RuntimeResult<Chunks> {
        if ctx < 8 {
            return Err(RuntimeError::Invalid(format!("--ctx {ctx} is too small (at least 8)")));
        }
        if ctx > model.context_length() {
            return Err(RuntimeError::Invalid(format!(
                "--ctx {ctx} exceeds the model's context length {}",
                model.context_length()
            )));
        }
        let tokens = model.tokenizer.encode(text, true)?;
        let available = tokens.len() / ctx;
        if available == 0 {
            return Err(RuntimeError::Invalid(format!(
                "{what} has {} tokens, fewer than one chunk of {ctx}",
                tokens.len()
            )));
        }
        let count = if max_chunks == 0 { available } else { max_chunks.min(available) };
        Ok(Chunks { tokens, ctx, count })
    }

    /// Chunk `c`'s tokens, its first replaced by BOS when the model adds one.
    pub fn batch(&self, model: &Model, c: usize) -> Vec<u32> {
        let mut batch = self.tokens[c * self.ctx..(c + 1) * self.ctx].to_vec();
        if model.tokenizer.adds_bos()
            && let Some(bos) = model.tokenizer.bos_id()
        {
            batch[0] = bos;
        }
        batch
    }
}

/// log-softmax of `logits` at `target`, in f64.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

/// Scores `text` in chunks of `ctx` tokens; `max_chunks` limits the count (0 = all).
pub fn perplexity(
    model: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    on_chunk: &mut dyn FnMut(usize, usize, f64),
) -> RuntimeResult<PplReport> {
    let text_chunks = Chunks::of(model, text, ctx, max_chunks, "the text")?;
    let (tokens, chunks) = (&text_chunks.tokens, text_chunks.count);
    let vocab = model.vocab_size();
    let mut session = model.session(ctx, threads)?;
    let first = ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    let mut per_chunk = vec![];
    let t0 = std::time::Instant::now();
    for c in 0..chunks {
        let start = c * ctx;
        let batch = text_chunks.batch(model, c);
        session.truncate(0);
        let logits = session.forward(&batch, Logits::All)?;
        if logits.len() != ctx * vocab {
            return Err(RuntimeError::Invalid(format!(
                "backend returned {} logits, expected {}",
                logits.len(),
                ctx * vocab
            )));
        }
        for j in first..ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            nll -= log_prob(row, tokens[start + j + 1] as usize);
            count += 1;
        }
        let running = (nll / count as f64).exp();
        per_chunk.push(running);
        on_chunk(c + 1, chunks, running);
    }
    Ok(PplReport {
        ctx,
        chunks,
        tokens_scored: count,
        ppl: (nll / count as f64).exp(),
        per_chunk,
        nll: nll / count as f64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
