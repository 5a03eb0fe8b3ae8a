//! The `sliding_window` pass (issue 9's long-context mode for dense models) on SmolLM2:
//! attention over the last `window` tokens plus `sink` first ones costs little perplexity
//! at a context four times the window, the sinks are what keeps it small (StreamingLLM's
//! finding, measured here), the CPU backend equals the reference in llama.cpp numerics, and
//! the pass reports the perplexity it measured before and after.

mod common;

use kiln_backends::{Logits, Numerics};
use kiln_runtime::Model;
use serde_json::json;

fn ppl(m: &Model, text: &str) -> f64 {
    kiln_runtime::ppl::perplexity(m, text, 512, 1, 2, &mut |_, _, _| {}).unwrap().ppl
}

#[test]
fn smollm2_with_window_and_sinks_stays_close_and_the_sinks_matter() {
    let Some(p) = common::smollm2() else { return };
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/text/ppl-excerpt.txt")).unwrap();
    let mut dense = Model::load(&p).unwrap();
    dense.backend = "cpu".into();
    let base = ppl(&dense, &text);
    let calib = std::fs::read_to_string(common::root().join("tests/fixtures/text/calib-excerpt.txt")).unwrap();
    let tokenizer = kiln_frontend::import(&p).unwrap().tokenizer_json;
    let measure = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| -> Result<f64, String> {
        let mut model =
            Model::from_parts(&p, m.clone(), w.clone(), tokenizer.as_bytes(), None).map_err(|e| e.to_string())?;
        model.backend = "cpu".into();
        Ok(kiln_runtime::ppl::perplexity(&model, &calib, 512, 1, 2, &mut |_, _, _| {}).map_err(|e| e.to_string())?.ppl)
    };
    let (mut with_sinks, d) = common::after_pass(
        &p,
        "sliding_window",
        json!({"window": 128, "sink": 4}),
        kiln_passes::Calibration { measure: Some(&measure), ..Default::default() },
    );
    assert_eq!((d["window"].as_u64(), d["sink"].as_u64(), d["attention_ops"].as_u64()), (Some(128), Some(4), Some(30)));
    let (before, after) = (d["calibration_ppl_before"].as_f64().unwrap(), d["calibration_ppl_after"].as_f64().unwrap());
    assert!(after > before, "a window of 128 at ctx 512 must cost something: {before} -> {after}");
    let (mut no_sinks, _) =
        common::after_pass(&p, "sliding_window", json!({"window": 128, "sink": 0}), Default::default());
    with_sinks.backend = "cpu".into();
    no_sinks.backend = "cpu".into();
    let (a, b) = (ppl(&with_sinks, &text), ppl(&no_sinks, &text));
    eprintln!("ppl at ctx 512: dense {base:.4}, window 128 + 4 sinks {a:.4}, window 128 alone {b:.4}");
    assert!(a / base - 1.0 < 0.25, "window + sinks: ppl {a} vs dense {base}");
    assert!(a < b, "the sinks must help: {a} with, {b} without");

    // The windowed slots are rings of 4 + 128 + 127 rows (the session runs 128 tokens at a
    // time): after 600 tokens the cache holds 259 rows per slot, the dense one 600.
    let long = with_sinks.tokenizer.encode(&text, true).unwrap()[..600].to_vec();
    let bytes = |model: &Model| {
        let mut s = model.session(700, 2).unwrap();
        s.forward(&long, Logits::Last).unwrap();
        s.kv_cache_bytes().unwrap()
    };
    let (ring, full) = (bytes(&with_sinks), bytes(&dense));
    assert_eq!(ring * 600, full * 259, "ring {ring} B, dense {full} B");

    // The CPU backend runs it as the reference does, bit for bit in llama.cpp numerics.
    let prompt = with_sinks.tokenizer.encode(&text[..1000], true).unwrap();
    let run = |model: &Model| {
        let mut s = model.session_with(prompt.len() + 2, 2, Numerics::Ggml).unwrap();
        let mut out = s.forward(&prompt, Logits::Last).unwrap();
        out.extend(s.forward(&[kiln_backends::argmax(&out)], Logits::Last).unwrap());
        out
    };
    let cpu = run(&with_sinks);
    with_sinks.backend = "reference".into();
    let reference = run(&with_sinks);
    assert!(prompt.len() > 200, "the prompt ({} tokens) must be longer than the window", prompt.len());
    assert!(
        cpu.iter().map(|v| v.to_bits()).eq(reference.iter().map(|v| v.to_bits())),
        "cpu differs from the reference"
    );
}
