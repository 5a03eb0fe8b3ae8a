//! Text generation: prompt (optionally through the chat template) → prefill →
//! decode loop with sampling, streaming text as it is produced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kiln_backends::{Logits, Session};
use serde::Serialize;

use crate::chat::ChatMessage;
use crate::error::{RuntimeError, RuntimeResult};
use crate::model::Model;
use crate::sampling::{Sampler, SamplerConfig};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Wrap the prompt as a user message in the model's chat template.
    pub chat: bool,
    /// Stop at an end-of-generation token.
    pub stop_at_eos: bool,
    /// Only produce text this grammar accepts (a JSON schema, e.g. a function call
    /// against a tool list); generation stops when the value is complete.
    pub grammar: Option<std::sync::Arc<crate::grammar::Grammar>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            sampler: SamplerConfig::greedy(),
            chat: false,
            stop_at_eos: true,
            grammar: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutput {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: &'static str,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}

/// Set by SIGINT once [`stop_on_interrupt`] is installed: the decode loop then stops
/// after the current token with the stop reason `"interrupted"`.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a SIGINT asked generation to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Makes Ctrl-C (SIGINT) end generation cleanly: the first one stops the decode loop
/// after the current token (the caller gets the text so far, stop reason
/// `"interrupted"`); a second one exits at once with status 130. A no-op off Linux.
pub fn stop_on_interrupt() {
    #[cfg(target_os = "linux")]
    {
        extern "C" fn on_sigint(_: libc::c_int) {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(130) };
            }
        }
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    }
}

/// The token ids a prompt becomes (chat template applied when asked).
pub fn prompt_tokens(model: &Model, prompt: &str, chat: bool) -> RuntimeResult<Vec<u32>> {
    if chat {
        let tmpl = model
            .chat
            .as_ref()
            .ok_or_else(|| RuntimeError::Invalid(format!("{} has no chat template", model.path.display())))?;
        let text = tmpl.render(&[ChatMessage::new("user", prompt)], true)?;
        // The template writes BOS itself where the model wants it.
        Ok(model.tokenizer.encode(&text, false)?)
    } else {
        Ok(model.tokenizer.encode(prompt, true)?)
    }
}

/// Generates from `prompt`, calling `on_text` with each new piece of text.
pub fn generate(
    model: &Model,
    session: &mut dyn Session,
    prompt: &str,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> RuntimeResult<GenerateOutput> {
    let ids = prompt_tokens(model, prompt, opts.chat)?;
    generate_from_tokens(model, session, &ids, opts, on_text)
}

pub fn generate_from_tokens(
    model: &Model,
    session: &mut dyn Session,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> RuntimeResult<GenerateOutput> {
    if prompt_ids.is_empty() {
        return Err(RuntimeError::Invalid("the prompt is empty".into()));
    }
    if let Some(g) = &opts.grammar {
        return generate_constrained(model, session, prompt_ids, opts, g, on_text);
    }
    let mut sampler = Sampler::new(opts.sampler)?;
    let mut stream = crate::tokenizer::TokenStream::with_context(&model.tokenizer, prompt_ids);
    // Plain greedy decoding asks the backend for the argmax only (a GPU then
    // copies back one id per token instead of the whole logits row).
    // Top-k sampling without a repetition penalty needs only the k best logits: the
    // others are -inf to the sampler, which then draws exactly as from the full row.
    let plain_greedy = opts.sampler.temperature == 0.0 && opts.sampler.repetition_penalty == 1.0;
    let top_k_only = opts.sampler.temperature > 0.0 && opts.sampler.top_k > 0 && opts.sampler.repetition_penalty == 1.0;
    let vocab = session.vocab_size();
    let mut sparse = Vec::new();
    let mut step = |session: &mut dyn Session, ids: &[u32], history: &[u32]| -> RuntimeResult<u32> {
        if plain_greedy {
            Ok(session.forward_argmax(ids)?)
        } else if top_k_only {
            let best = session.forward_top_k(ids, opts.sampler.top_k)?;
            sparse.clear();
            sparse.resize(vocab, f32::NEG_INFINITY);
            for (id, v) in best {
                if let Some(slot) = sparse.get_mut(id as usize) {
                    *slot = v;
                }
            }
            Ok(sampler.sample(&sparse, history)?)
        } else {
            let logits = session.forward(ids, Logits::Last)?;
            Ok(sampler.sample(&logits, history)?)
        }
    };
    let t0 = Instant::now();
    let mut next = step(session, prompt_ids, prompt_ids)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut out = vec![];
    let mut text = String::new();
    let mut stop_reason = "length";
    let t1 = Instant::now();
    for i in 0..opts.max_tokens {
        if interrupted() {
            stop_reason = "interrupted";
            break;
        }
        let tok = next;
        if opts.stop_at_eos && model.tokenizer.is_eos(tok) {
            stop_reason = "eos";
            break;
        }
        out.push(tok);
        history.push(tok);
        let piece = stream.push(tok)?;
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        if i + 1 == opts.max_tokens {
            break;
        }
        next = step(session, &[tok], &history)?;
    }
    finish(stream, on_text, text, prompt_ids, out, stop_reason, prefill, t1)
}

/// Generation under a grammar: every step reads the logits row, takes the most likely
/// token (greedy) or samples among the best `top_k` (40 when unset) whose text keeps the
/// output a prefix of a value the grammar accepts, and stops once the value is complete
/// and nothing can follow (stop reason `"complete"`), at an end-of-sequence token the
/// grammar allows, or at `max_tokens` (`"length"`, the value unfinished).
fn generate_constrained(
    model: &Model,
    session: &mut dyn Session,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    g: &crate::grammar::Grammar,
    on_text: &mut dyn FnMut(&str),
) -> RuntimeResult<GenerateOutput> {
    let texts = crate::grammar::token_texts(&model.tokenizer)?;
    let eos: Vec<u32> = if opts.stop_at_eos { model.tokenizer.eos_ids().to_vec() } else { vec![] };
    let mut sampler = Sampler::new(opts.sampler)?;
    let greedy = opts.sampler.temperature == 0.0;
    let want = if greedy {
        1
    } else if opts.sampler.top_k > 0 {
        opts.sampler.top_k
    } else {
        40
    };
    let mut m = g.start();
    let t0 = Instant::now();
    let mut logits = session.forward(prompt_ids, Logits::Last)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut history = prompt_ids.to_vec();
    let (mut out, mut text, mut stop_reason) = (vec![], String::new(), "length");
    let t1 = Instant::now();
    let mut masked = vec![f32::NEG_INFINITY; logits.len()];
    for i in 0..opts.max_tokens {
        if interrupted() {
            stop_reason = "interrupted";
            break;
        }
        let cands = crate::grammar::viable(&m, &logits, &texts, &eos, want);
        let pick = if greedy || cands.len() <= 1 {
            0
        } else {
            masked.fill(f32::NEG_INFINITY);
            for (id, _) in &cands {
                masked[*id as usize] = logits[*id as usize];
            }
            let id = sampler.sample(&masked, &history)?;
            cands.iter().position(|(c, _)| *c == id).unwrap_or(0)
        };
        let Some((tok, next)) = cands.into_iter().nth(pick) else {
            return Err(RuntimeError::Invalid(format!(
                "no token of the vocabulary continues the grammar after {text:?} (the tokenizer cannot spell what the schema needs)"
            )));
        };
        let Some(next) = next else {
            stop_reason = "eos";
            break;
        };
        m = next;
        out.push(tok);
        history.push(tok);
        let piece = texts[tok as usize].as_deref().unwrap_or("");
        on_text(piece);
        text.push_str(piece);
        if m.is_complete() && !m.can_continue() {
            stop_reason = "complete";
            break;
        }
        if i + 1 < opts.max_tokens {
            logits = session.forward(&[tok], Logits::Last)?;
        }
    }
    Ok(output(prompt_ids, out, text, stop_reason, prefill, t1))
}

/// The output of a generation whose decode loop started at `t1`.
fn output(
    prompt_ids: &[u32],
    out: Vec<u32>,
    text: String,
    stop_reason: &'static str,
    prefill: f64,
    t1: Instant,
) -> GenerateOutput {
    let decode = t1.elapsed().as_secs_f64();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    GenerateOutput {
        prompt_tokens: prompt_ids.to_vec(),
        decode_tokens_per_second: rate(out.len(), decode),
        tokens: out,
        text,
        stop_reason,
        prefill_seconds: prefill,
        decode_seconds: decode,
        prefill_tokens_per_second: rate(prompt_ids.len(), prefill),
    }
}

/// Ends a generation: flushes the text the stream held back, times the decode
/// loop (started at `t1`) and builds the output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    mut stream: crate::tokenizer::TokenStream<'_>,
    on_text: &mut dyn FnMut(&str),
    mut text: String,
    prompt_ids: &[u32],
    out: Vec<u32>,
    stop_reason: &'static str,
    prefill: f64,
    t1: Instant,
) -> RuntimeResult<GenerateOutput> {
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(output(prompt_ids, out, text, stop_reason, prefill, t1))
}
