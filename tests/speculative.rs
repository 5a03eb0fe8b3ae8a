//! Prompt-lookup self-speculative decoding is lossless: the same tokens as
//! plain greedy decoding, with drafts accepted on copy-heavy text, over one KV
//! cache (reference interpreter on SmolLM2; the PTX kernels in the emulator on
//! glassllm).

mod common;

use common::*;
use kiln_runtime::Model;
use kiln_runtime::generate::{GenerateOptions, generate_from_tokens, prompt_tokens};
use kiln_runtime::speculative::{SpeculativeOptions, generate_speculative};

const PROMPT: &str = "Copy the list exactly.\nList: apples, pears, plums, cherries, grapes, lemons, limes, figs.\nCopy: apples, pears, plums,";

fn both(model: &Model, n: usize) -> (Vec<u32>, Vec<u32>, kiln_runtime::speculative::SpeculativeStats) {
    let ids = prompt_tokens(model, PROMPT, false).unwrap();
    let ctx = ids.len() + n + 1;
    let opts = GenerateOptions { max_tokens: n, stop_at_eos: false, ..Default::default() };
    let mut s = model.session(ctx, 2).unwrap();
    let plain = generate_from_tokens(model, s.as_mut(), &ids, &opts, &mut |_| {}).unwrap();
    let mut s = model.session(ctx, 2).unwrap();
    let (spec, stats) =
        generate_speculative(model, s.as_mut(), &ids, &opts, &SpeculativeOptions::default(), &mut |_| {}).unwrap();
    // The cache holds the prompt and the emitted tokens (the last one too when it was
    // an accepted draft): nothing rejected stays.
    assert!((ids.len() + n - 1..=ids.len() + n).contains(&s.pos()), "pos {} after {n} tokens", s.pos());
    (plain.tokens, spec.tokens, stats)
}

#[test]
fn smollm2_speculative_equals_greedy_and_accepts_drafts() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let (plain, spec, stats) = both(&model, 40);
    assert_eq!(spec, plain);
    assert!(stats.accepted > 0, "{stats:?}");
    assert!(stats.forward_calls < 39, "speculation saved no forward call: {stats:?}");
    eprintln!("{stats:?}: {:.2} tokens per forward call", stats.tokens_per_call(spec.len()));
}

#[test]
fn ptx_emulator_speculative_equals_reference_greedy() {
    let Some(path) = model("glassllm-en-hf") else { return };
    let mut model = Model::load(&path).unwrap();
    let (plain, _, _) = both(&model, 12);
    // SAFETY of the env var: this test binary sets it for the PTX emulator only.
    unsafe { std::env::set_var("KILN_PTX_DEVICE", "emulator") };
    model.backend = "ptx".into();
    let (ptx_plain, ptx_spec, stats) = both(&model, 12);
    assert_eq!(ptx_plain, plain);
    assert_eq!(ptx_spec, plain, "{stats:?}");
}

#[test]
fn sampling_is_refused() {
    let Some(path) = model("glassllm-en-hf") else { return };
    let model = Model::load(&path).unwrap();
    let ids = prompt_tokens(&model, "hi", false).unwrap();
    let mut opts = GenerateOptions::default();
    opts.sampler.temperature = 0.7;
    let mut s = model.session(64, 1).unwrap();
    let err =
        generate_speculative(&model, s.as_mut(), &ids, &opts, &SpeculativeOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("greedy"), "{err}");
}

/// The 20 prompts of `tests/fixtures/text/spec-prompts.json` (code and prose), shared with
/// `cargo xtask bench spec`.
fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/text/spec-prompts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    ["code", "prose"]
        .iter()
        .flat_map(|k| v[k].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn twenty_prompts_token_for_token() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let ps = prompts();
    assert_eq!(ps.len(), 20);
    let opts = GenerateOptions { max_tokens: 24, stop_at_eos: false, ..Default::default() };
    let (mut drafted, mut accepted) = (0, 0);
    for p in &ps {
        let ids = prompt_tokens(&model, p, false).unwrap();
        let ctx = ids.len() + 25;
        let mut s = model.session(ctx, 2).unwrap();
        let plain = generate_from_tokens(&model, s.as_mut(), &ids, &opts, &mut |_| {}).unwrap();
        let mut s = model.session(ctx, 2).unwrap();
        let (spec, stats) =
            generate_speculative(&model, s.as_mut(), &ids, &opts, &SpeculativeOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(spec.tokens, plain.tokens, "prompt {p:?}: {stats:?}");
        drafted += stats.drafted;
        accepted += stats.accepted;
    }
    assert!(accepted > 0 && drafted > accepted, "drafted {drafted}, accepted {accepted}");
}
