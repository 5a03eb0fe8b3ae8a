//! Quality of a transformed model against its source on held-out text, as
//! llama.cpp's `llama-perplexity --kl-divergence` measures it: both models score
//! the same chunks (second half of each, llama-perplexity's chunking), and the
//! report gives both perplexities, the mean and 99th-percentile KL divergence
//! `KL(source ‖ candidate)` per token, and how often their top-1 tokens agree.

use kiln_backends::Logits;
use serde::Serialize;

use crate::error::{RuntimeError, RuntimeResult};
use crate::model::Model;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QualityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Perplexity of the source model and of the candidate.
    pub ppl_source: f64,
    pub ppl: f64,
    /// `ppl / ppl_source − 1`.
    pub ppl_ratio_minus_1: f64,
    /// Mean and 99th percentile of the per-token KL divergence, in nats.
    pub kl_mean: f64,
    pub kl_p99: f64,
    /// Fraction of scored tokens whose argmax agrees.
    pub top1_agreement: f64,
    /// sha256 of the text.
    pub text_sha256: String,
}

/// `log_softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&l| l as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Scores `text` with `source` and `candidate` (same tokenizer and vocabulary)
/// in chunks of `ctx` tokens, at most `max_chunks` of them (0 = all).
pub fn compare(
    source: &Model,
    candidate: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    on_chunk: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<QualityReport> {
    let vocab = source.vocab_size();
    if candidate.vocab_size() != vocab {
        return Err(RuntimeError::Invalid(format!(
            "the models' vocabularies differ ({vocab} vs {})",
            candidate.vocab_size()
        )));
    }
    let text_chunks = crate::ppl::Chunks::of(source, text, ctx, max_chunks, "the quality text")?;
    let (tokens, chunks) = (&text_chunks.tokens, text_chunks.count);
    let mut s_ref = source.session(ctx, threads)?;
    let mut s_new = candidate.session(ctx, threads)?;
    let first = ctx / 2;
    let (mut nll_ref, mut nll_new, mut agree) = (0f64, 0f64, 0usize);
    let mut kls = vec![];
    for c in 0..chunks {
        let batch = text_chunks.batch(source, c);
        s_ref.truncate(0);
        s_new.truncate(0);
        let a = s_ref.forward(&batch, Logits::All)?;
        let b = s_new.forward(&batch, Logits::All)?;
        if a.len() != ctx * vocab || b.len() != ctx * vocab {
            return Err(RuntimeError::Invalid("a backend returned logits of the wrong size".into()));
        }
        for j in first..ctx - 1 {
            let (ra, rb) = (&a[j * vocab..(j + 1) * vocab], &b[j * vocab..(j + 1) * vocab]);
            let (la, lb) = (log_softmax(ra), log_softmax(rb));
            let target = tokens[c * ctx + j + 1] as usize;
            nll_ref -= la[target];
            nll_new -= lb[target];
            kls.push(la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum::<f64>().max(0.0));
            agree += usize::from(argmax(ra) == argmax(rb));
        }
        on_chunk(c + 1, chunks);
    }
    let n = kls.len();
    let kl_mean = kls.iter().sum::<f64>() / n as f64;
    kls.sort_by(f64::total_cmp);
    let kl_p99 = kls[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    let (ppl_source, ppl) = ((nll_ref / n as f64).exp(), (nll_new / n as f64).exp());
    Ok(QualityReport {
        ctx,
        chunks,
        tokens_scored: n,
        ppl_source,
        ppl,
        ppl_ratio_minus_1: ppl / ppl_source - 1.0,
        kl_mean,
        kl_p99,
        top1_agreement: agree as f64 / n as f64,
        text_sha256: crate::artifact::sha256_hex(text.as_bytes()),
    })
}
