//! kiln against llama.cpp as an independent oracle, on real models: greedy
//! continuations token for token, run with llama.cpp-compatible numerics (8-bit
//! activation rounding in ggml's summation order, f16 flash-attention KV cache);
//! where the two first differ, llama.cpp's token must be kiln's second choice within
//! 0.05 logits (issue 3's rule). Perplexity, with kiln's exact f32 numerics, within 0.5%.
//! Reference numbers: `tests/fixtures/oracle/*.json`, made by `tests/oracle/make_llama_refs.py`.

mod common;

use std::path::Path;

use kiln_backends::{Logits, Numerics};
use kiln_runtime::Model;
use serde_json::Value;

/// A near-tie: the swapped tokens are within this many logits (issue 3's budget).
const MAX_TIE_GAP: f32 = 0.05;

fn oracle(name: &str) -> Value {
    let p = common::root().join("tests/fixtures/oracle").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    // The fixture stores id lists as JSON arrays or as their string form.
    let v = match v {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        other => other.clone(),
    };
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// llama.cpp's second choice and its gap to the first, per step.
fn top2_steps(v: &Value) -> Vec<(u32, f32)> {
    let v = match v {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        other => other.clone(),
    };
    v.as_array()
        .unwrap()
        .iter()
        .map(|step| {
            let first = step[0][1].as_f64().unwrap() as f32;
            (step[1][0].as_u64().unwrap() as u32, first - step[1][1].as_f64().unwrap() as f32)
        })
        .collect()
}

fn top2(logits: &[f32]) -> ((u32, f32), (u32, f32)) {
    let (mut a, mut b) = ((0u32, f32::NEG_INFINITY), (0u32, f32::NEG_INFINITY));
    for (i, &l) in logits.iter().enumerate() {
        if l > a.1 {
            b = a;
            a = (i as u32, l);
        } else if l > b.1 {
            b = (i as u32, l);
        }
    }
    (a, b)
}

/// Greedy continuations of the stored prompts, token for token. With
/// llama.cpp-compatible numerics kiln reproduces the logits of llama.cpp b11434's x86 AVX2
/// build bit for bit on SmolLM2 (Q4_1/Q8_0) and Qwen2.5 (Q5_0/Q8_0/Q4_K/Q6_K), so the tokens
/// agree; should a rounding differ, issue 3's rule still holds the first difference to a
/// near-tie in kiln's own logits. With `exact_prefill` the prompt's logits (the top two, as
/// llama.cpp prints them: six decimals) must be llama.cpp's for every prompt, the long one
/// too (past llama.cpp's tiled flash attention and tiled K-quant matmul thresholds).
///
/// Known difference, so not held exact: decode steps once llama.cpp's padded KV length
/// reaches 512 cells (its split-KV flash attention).
fn check_greedy(model_path: &Path, name: &str, exact_prefill: bool) {
    check_greedy_on(model_path, name, "reference", exact_prefill);
}

/// [`check_greedy`] on the named backend (the compiled CPU backend computes in
/// the same numerics, so it must reproduce llama.cpp's tokens the same way).
fn check_greedy_on(model_path: &Path, name: &str, backend: &str, exact_prefill: bool) {
    let mut model = Model::load(model_path).unwrap();
    model.backend = backend.to_string();
    let o = oracle(name);
    for p in o["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let want_prompt = ids(&p["prompt_ids"]);
        if backend == "reference" && want_prompt.len() >= kiln_backends::reference::FA_TILE_Q {
            // The long prompt on the compiled CPU backend only (its attention and matmuls equal
            // the reference's bit for bit, `kiln-cpu`'s tests): the interpreter would take
            // minutes over it.
            continue;
        }
        let got_prompt = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(got_prompt, want_prompt, "{name}: tokenization of {text:?}");
        let want = ids(&p["generated_ids"]);
        let mut session = model.session_with(want_prompt.len() + want.len() + 1, 0, Numerics::Ggml).unwrap();
        let mut logits = session.forward(&want_prompt, Logits::Last).unwrap();
        if exact_prefill {
            let ((t1, l1), (t2, l2)) = top2(&logits);
            let want = &p["top2_per_step"][0];
            let got = format!("[[{t1}, {l1:.6}], [{t2}, {l2:.6}]]");
            let want = format!(
                "[[{}, {:.6}], [{}, {:.6}]]",
                want[0][0],
                want[0][1].as_f64().unwrap(),
                want[1][0],
                want[1][1].as_f64().unwrap()
            );
            assert_eq!(got, want, "{name} ({backend}): prompt logits of {} tokens", want_prompt.len());
        }
        let mut matched = 0;
        let llama_top2 = top2_steps(&p["top2_per_step"]);
        for (step, &llama_tok) in want.iter().enumerate() {
            let ((t1, l1), (t2, l2)) = top2(&logits);
            if t1 != llama_tok {
                // The first difference must be a near-tie: llama.cpp's token is kiln's
                // second choice within MAX_TIE_GAP.
                let (llama_second, llama_gap) = llama_top2[step];
                assert!(
                    t2 == llama_tok && l1 - l2 < MAX_TIE_GAP,
                    "{name} {text:?} step {step}: kiln chose {t1} ({l1}; second {t2} at {l2}), llama.cpp chose \
                     {llama_tok} (its second {llama_second} {llama_gap} behind): not a near-tie"
                );
                eprintln!(
                    "{name} {text:?}: near-tie at step {step} (kiln gap {:.4}, llama.cpp gap {llama_gap:.4}); sequences diverge here",
                    l1 - l2
                );
                break;
            }
            matched += 1;
            logits = session.forward(&[t1], Logits::Last).unwrap();
        }
        eprintln!("{name} ({backend}) {text:?}: {matched}/{} tokens equal to llama.cpp's", want.len());
    }
}

/// Compares kiln's running perplexity after `chunks` chunks with llama-perplexity's.
fn check_ppl(model_path: &Path, name: &str, chunks: usize) {
    let model = Model::load(model_path).unwrap();
    let o = oracle(name);
    let ppl = &o["ppl"];
    let file = common::root().join(ppl["file"].as_str().unwrap());
    let text = std::fs::read_to_string(&file).unwrap();
    let ctx = ppl["ctx"].as_u64().unwrap() as usize;
    let r = kiln_runtime::ppl::perplexity(&model, &text, ctx, chunks, 0, &mut |_, _, _| {}).unwrap();
    assert_eq!(r.chunks, chunks);
    let want = ppl["running_ppl"][chunks - 1].as_f64().unwrap();
    let rel = (r.ppl - want).abs() / want;
    eprintln!("{name}: kiln ppl {:.4} vs llama.cpp {want:.4} over {chunks} chunks ({:.3}%)", r.ppl, rel * 100.0);
    assert!(rel < 0.005, "{name}: perplexity {:.4} differs from llama.cpp's {want:.4} by {:.3}%", r.ppl, rel * 100.0);
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    let Some(m) = common::smollm2() else { return };
    check_greedy(&m, "smollm2", true);
}

#[test]
fn smollm2_greedy_on_the_cpu_backend_matches_llama_cpp() {
    let Some(m) = common::smollm2() else { return };
    check_greedy_on(&m, "smollm2", "cpu", true);
}

#[test]
fn smollm2_perplexity_matches_llama_cpp() {
    let Some(m) = common::smollm2() else { return };
    let chunks = oracle("smollm2")["ppl"]["chunks"].as_u64().unwrap() as usize;
    check_ppl(&m, "smollm2", chunks);
}

#[test]
fn qwen2_greedy_matches_llama_cpp() {
    let Some(m) = common::qwen05() else { return };
    check_greedy(&m, "qwen2.5-coder-0.5b", true);
}

#[test]
fn qwen2_greedy_on_the_cpu_backend_matches_llama_cpp() {
    let Some(m) = common::qwen05() else { return };
    check_greedy_on(&m, "qwen2.5-coder-0.5b", "cpu", true);
}

#[test]
fn qwen2_perplexity_matches_llama_cpp() {
    let Some(m) = common::qwen05() else { return };
    // The first 4 of 9 chunks keep the test's run time reasonable on 2 cores;
    // llama-perplexity's running value after 4 chunks is stored.
    check_ppl(&m, "qwen2.5-coder-0.5b", 4);
}

#[test]
fn gemma3_perplexity_matches_llama_cpp() {
    // Gemma 3: GeGLU, sqrt(d) embedding scale, q/k norms, post norms, 5:1 sliding-window layers.
    let Some(m) = common::model("gemma3-270m-q4_k_m.gguf") else { return };
    check_ppl(&m, "gemma3-270m", 3);
}

/// The f32 activations of `tests/oracle/make_matmul_refs.py` (row `t`, element `i`).
fn matmul_activation(i: usize, t: usize) -> f32 {
    let v = (((i * 7919 + t * 104_729) % 2001) as f32 - 1000.0) / 250.0;
    if i.is_multiple_of(37) { v * 8.0 } else { v }
}

/// kiln's llama.cpp-numerics dot definitions against ggml's own CPU kernels, matmul by
/// matmul: each stored output of `tests/fixtures/oracle/matmul.json` (ggml's result, as
/// llama.cpp runs the matmul: Q4_0 and IQ4_NL weights repacked, Q4_1 and Q8_0 not; the
/// K-quants through `vec_dot` below 8 token rows and the tiled kernels from 8) is recomputed
/// with `kiln_quant::ggml_dot` and must hash the same, bit for bit. The files are the
/// registry's SmolLM2 and Qwen2.5-Coder-0.5B and kiln's own exports of SmolLM2 (Q4_0,
/// IQ4_NL, and Q2_K/Q3_K/Q5_K/Q6_K down projections), remade here and checked by hash first.
#[test]
fn matmuls_equal_ggml_bit_for_bit() {
    use kiln_backends::quant::ggml_dot;
    use sha2::Digest;
    let (Some(src), Some(_)) = (common::smollm2(), common::qwen05()) else { return };
    let o = oracle("matmul");
    let dir = common::tempdir("oracle-matmul");
    let mut files = std::collections::BTreeMap::new();
    for (key, f) in o["files"].as_object().unwrap() {
        let path = match f.get("export") {
            Some(args) => {
                let out = dir.join(format!("{key}.gguf"));
                let mut cmd = vec!["export", src.to_str().unwrap(), "--gguf", out.to_str().unwrap()];
                cmd.extend(args.as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
                let r = common::run(&cmd);
                assert!(r.status.success(), "kiln {cmd:?}: {}", common::stderr(&r));
                out
            }
            None => common::model(f["file"].as_str().unwrap()).unwrap(),
        };
        let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&path).unwrap()));
        assert_eq!(
            sha,
            f["sha256"].as_str().unwrap(),
            "{key}: the file changed (for kiln's exports: its quantizer or writer); remake the fixture with \
             tests/oracle/make_matmul_refs.py (tests/oracle/README.md)"
        );
        files.insert(key.clone(), kiln_frontend::gguf::GgufFile::open(&path).unwrap());
    }
    let cases = o["cases"].as_array().unwrap();
    for c in cases {
        let f = &files[c["file"].as_str().unwrap()];
        let name = c["tensor"].as_str().unwrap();
        let info = f.tensor(name).unwrap();
        let dtype = info.dtype;
        let (k, n) = (info.dims[0] as usize, info.dims[1] as usize);
        let data = f.tensor_data(info);
        let rb = data.len() / n;
        let tokens = c["tokens"].as_u64().unwrap() as usize;
        let mut y = Vec::with_capacity(tokens * n * 4);
        for t in 0..tokens {
            let x: Vec<f32> = (0..k).map(|i| matmul_activation(i, t)).collect();
            let a = ggml_dot::quantize_for(dtype, &x).unwrap();
            let group = ggml_dot::RowGroup::of(t, tokens);
            for o in 0..n {
                y.extend_from_slice(&ggml_dot::dot(dtype, &data[o * rb..(o + 1) * rb], &a, group).to_le_bytes());
            }
        }
        let got = format!("{:x}", sha2::Sha256::digest(&y));
        assert_eq!(got, c["sha256"].as_str().unwrap(), "{} {name} ({dtype}) with {tokens} token rows", c["file"]);
    }
    eprintln!("{} matmuls equal ggml's bit for bit", cases.len());
}
