//! The compiled CPU backend on real models: its logits equal the reference
//! interpreter's in llama.cpp numerics bit for bit (the prompt's every row,
//! then 32 greedy steps), so its greedy text is the reference's. (Its match
//! with llama.cpp itself is in `oracle_llama_cpp.rs`.)

mod common;

use std::path::Path;

use kiln_backends::{Logits, Numerics, argmax};
use kiln_runtime::Model;

const PROMPTS: &[&str] =
    &["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"];

fn check(path: &Path, prompts: &[&str]) {
    let mut cpu_model = Model::load(path).unwrap();
    cpu_model.backend = "cpu".into();
    let ref_model = Model::load(path).unwrap();
    for text in prompts {
        let prompt = ref_model.tokenizer.encode(text, true).unwrap();
        let mut want = ref_model.session_with(prompt.len() + 40, 2, Numerics::Ggml).unwrap();
        let mut got = cpu_model.session_with(prompt.len() + 40, 2, Numerics::Ggml).unwrap();
        let w = want.forward(&prompt, Logits::All).unwrap();
        let g = got.forward(&prompt, Logits::All).unwrap();
        assert!(w.iter().map(|v| v.to_bits()).eq(g.iter().map(|v| v.to_bits())), "{text:?}: prompt logits differ");
        let v = want.vocab_size();
        let mut tok = argmax(&w[w.len() - v..]);
        for step in 0..32 {
            let w = want.forward(&[tok], Logits::Last).unwrap();
            let g = got.forward(&[tok], Logits::Last).unwrap();
            assert!(
                w.iter().map(|v| v.to_bits()).eq(g.iter().map(|v| v.to_bits())),
                "{text:?}: logits differ at greedy step {step}"
            );
            tok = argmax(&w);
        }
    }
}

#[test]
fn smollm2_on_the_cpu_backend_equals_the_reference_bit_for_bit() {
    let Some(m) = common::smollm2() else { return };
    check(&m, PROMPTS);
}

#[test]
fn qwen2_on_the_cpu_backend_equals_the_reference_bit_for_bit() {
    let Some(m) = common::qwen05() else { return };
    // One prompt: the reference's own llama.cpp numerics are slow on a 0.5B model.
    check(&m, &PROMPTS[1..2]);
}
