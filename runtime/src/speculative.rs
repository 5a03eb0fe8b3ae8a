//! Lossless self-speculative decoding over one KV cache: prompt-lookup drafting.
//!
//! No second model and no second cache. At each step the last few tokens of
//! the text so far (an n-gram, longest first) are looked up earlier in the
//! text; the tokens that followed that earlier occurrence are the draft. The
//! pending token and the draft go through the model in one forward call over
//! the same KV cache; the model's own greedy choice at each position decides
//! how many drafted tokens are accepted, the first disagreement gives the next
//! token for free, and the cache is truncated back to the accepted prefix.
//!
//! The output is the plain greedy output: every emitted token is the argmax of
//! the model's logits at its position, and the backends compute a row of a
//! batched forward call exactly as a single-token call (the reference
//! interpreter bitwise; the PTX backend with the same per-query attention
//! splits for short batches). Copy-heavy text (code edits, quoting,
//! summaries of the prompt, repetition) is where drafts are accepted.

use std::time::Instant;

use kiln_backends::{Logits, Session, argmax};
use serde::Serialize;

use crate::error::{RuntimeError, RuntimeResult};
use crate::generate::{GenerateOptions, GenerateOutput};
use crate::model::Model;

/// Drafting settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpeculativeOptions {
    /// Most drafted tokens per step.
    pub max_draft: usize,
    /// Longest n-gram looked up.
    pub max_ngram: usize,
    /// Shortest n-gram that may propose a draft (single-token matches are mostly noise).
    pub min_ngram: usize,
}

impl Default for SpeculativeOptions {
    fn default() -> Self {
        SpeculativeOptions { max_draft: 8, max_ngram: 4, min_ngram: 2 }
    }
}

/// What speculation did during one generation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpeculativeStats {
    /// Forward calls after the prefill.
    pub forward_calls: usize,
    /// Tokens drafted, and how many of them the model accepted.
    pub drafted: usize,
    pub accepted: usize,
}

impl SpeculativeStats {
    /// Tokens emitted per forward call (1 without speculation).
    pub fn tokens_per_call(&self, emitted: usize) -> f64 {
        if self.forward_calls == 0 { 0.0 } else { emitted as f64 / self.forward_calls as f64 }
    }
}

/// Up to `max` tokens that followed the most recent earlier occurrence of the
/// longest suffix n-gram (`max_ngram` down to `min_ngram`) of `history`.
pub fn draft(history: &[u32], min_ngram: usize, max_ngram: usize, max: usize) -> &[u32] {
    if max == 0 {
        return &[];
    }
    let len = history.len();
    for n in (min_ngram.max(1)..=max_ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &history[len - n..];
        // Most recent occurrence that ends before the suffix starts.
        for start in (0..len - n).rev() {
            if &history[start..start + n] == suffix {
                let from = start + n;
                let to = (from + max).min(len);
                if from < to {
                    return &history[from..to];
                }
            }
        }
    }
    &[]
}

/// Greedy generation with prompt-lookup speculation. Same output as
/// [`crate::generate::generate_from_tokens`] with greedy sampling.
pub fn generate_speculative(
    model: &Model,
    session: &mut dyn Session,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    spec: &SpeculativeOptions,
    on_text: &mut dyn FnMut(&str),
) -> RuntimeResult<(GenerateOutput, SpeculativeStats)> {
    if prompt_ids.is_empty() {
        return Err(RuntimeError::Invalid("the prompt is empty".into()));
    }
    if opts.sampler.temperature != 0.0 || opts.sampler.repetition_penalty != 1.0 {
        return Err(RuntimeError::Invalid(
            "speculative decoding is lossless only for greedy decoding (temperature 0, no repetition penalty)".into(),
        ));
    }
    let mut stats = SpeculativeStats::default();
    let mut stream = crate::tokenizer::TokenStream::with_context(&model.tokenizer, prompt_ids);
    let t0 = Instant::now();
    let mut next = session.forward_argmax(prompt_ids)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut stop_reason = "length";
    let vocab = session.vocab_size();
    let mut budget = spec.max_draft;
    let t1 = Instant::now();
    // Emits `tok`; false when generation stops (end of sequence or length).
    let mut emit =
        |tok: u32, out: &mut Vec<u32>, history: &mut Vec<u32>, stop: &mut &'static str| -> RuntimeResult<bool> {
            if opts.stop_at_eos && model.tokenizer.is_eos(tok) {
                *stop = "eos";
                return Ok(false);
            }
            out.push(tok);
            history.push(tok);
            let piece = stream.push(tok)?;
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
            Ok(out.len() < opts.max_tokens)
        };
    if opts.max_tokens > 0 {
        while emit(next, &mut out, &mut history, &mut stop_reason)? {
            if crate::generate::interrupted() {
                stop_reason = "interrupted";
                break;
            }
            // `next` is emitted but not yet in the cache: feed it with a draft.
            let room = opts.max_tokens - out.len();
            let pos = session.pos();
            // Draft length adapts: after a step that accepted j tokens, at most 2(j + 1).
            let want = budget.min(spec.max_draft).min(room);
            let d: Vec<u32> = draft(&history, spec.min_ngram, spec.max_ngram, want).to_vec();
            stats.forward_calls += 1;
            if d.is_empty() {
                next = session.forward_argmax(&[next])?;
                continue;
            }
            let mut batch = Vec::with_capacity(d.len() + 1);
            batch.push(next);
            batch.extend_from_slice(&d);
            let logits = session.forward(&batch, Logits::All)?;
            stats.drafted += d.len();
            // Row i is the model's choice after batch[..=i].
            let choice = |i: usize| argmax(&logits[i * vocab..(i + 1) * vocab]);
            let mut accepted = 0;
            let mut go_on = true;
            while accepted < d.len() && choice(accepted) == d[accepted] {
                accepted += 1;
                stats.accepted += 1;
                go_on = emit(d[accepted - 1], &mut out, &mut history, &mut stop_reason)?;
                if !go_on {
                    break;
                }
            }
            // Keep the cache of the pending token and the accepted drafts only.
            session.truncate(pos + 1 + accepted);
            budget = 2 * (accepted + 1);
            if !go_on {
                break;
            }
            next = choice(accepted);
        }
    }
    let output = crate::generate::finish(stream, on_text, text, prompt_ids, out, stop_reason, prefill, t1)?;
    Ok((output, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_takes_what_followed_the_latest_longest_match() {
        let h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3];
        // "1 2 3" occurred at 4..7 (most recent) followed by 7 8 5.
        assert_eq!(draft(&h, 1, 3, 2), &[7, 8]);
        assert_eq!(draft(&h, 1, 3, 10), &[7, 8, 5, 1, 2, 3]);
        // No match at all.
        assert!(draft(&[1, 2, 3], 1, 3, 4).is_empty());
        // A shorter n-gram when the longer one is new, unless below the minimum.
        assert_eq!(draft(&[4, 5, 6, 1, 5], 1, 3, 1), &[6]);
        assert!(draft(&[4, 5, 6, 1, 5], 2, 3, 1).is_empty());
        assert!(draft(&h, 1, 3, 0).is_empty());
        assert!(draft(&[], 1, 3, 4).is_empty());
    }
}
