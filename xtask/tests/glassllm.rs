//! End-to-end check of `cargo xtask glassllm-to-hf` with glassllm itself as the oracle:
//! the converted tokenizer.json must tokenize like glassllm, and kiln must import the
//! converted directory and reproduce glassllm's logits and greedy continuations
//! (tests/fixtures/glassllm/reference.json, made by tests/oracle/make_glassllm_refs.py).
//!
//! Needs the unpacked glassllm 0.1.0 wheel at `${KILN_CACHE:-~/.cache/kiln}/pkgs/glassllm-0.1.0/`;
//! skips with a printed reason when it is absent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Backend, Logits, SessionOptions, WeightSource};
use kiln_ir::ParamId;
use serde_json::Value;
use xtask::glassllm;

/// Largest allowed |kiln − glassllm| over the last-position logits (fp16 weights, f32 math).
const LOGIT_TOL: f32 = 2e-3;

fn cache() -> PathBuf {
    match std::env::var_os("KILN_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln"),
    }
}

/// (npz, tokenizer) of glassllm's English model, or None with a printed reason.
fn glassllm_files() -> Option<(PathBuf, PathBuf)> {
    // Where `cargo xtask fetch-models` (kiln fetch glassllm-en glassllm-en-tokenizer) puts them.
    let m = cache().join("models");
    let (npz, tok) = (m.join("glassllm-en.npz"), m.join("glassllm-en.tokenizer.json"));
    if npz.is_file() && tok.is_file() {
        return Some((npz, tok));
    }
    let msg = format!("glassllm is not fetched into {} (run `cargo xtask fetch-models`)", m.display());
    if std::env::var("KILN_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glassllm/reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kiln-xtask-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&p).ok();
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

#[test]
fn conversion_is_deterministic_and_tokenizes_like_glassllm() {
    let Some((npz, tok)) = glassllm_files() else {
        return;
    };
    let a = glassllm::convert_files(&npz, &tok).unwrap();
    let b = glassllm::convert_files(&npz, &tok).unwrap();
    assert_eq!(a, b, "two conversions differ");
    let names: Vec<&str> = a.keys().copied().collect();
    assert_eq!(
        names,
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    );

    let dir = Scratch::new("tok");
    let out = dir.0.join("glassllm-en");
    glassllm::convert(&npz, &tok, &out).unwrap();

    // The weights: 2 + 9 per layer, tied embeddings (no lm_head), fp16 as stored.
    let st = kiln_frontend::safetensors::SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    assert_eq!(st.len(), 2 + 9 * 4);
    assert!(!st.contains("lm_head.weight"));
    let q = st.info("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![128, 128]);
    let gate = st.info("model.layers.3.mlp.gate_proj.weight").unwrap();
    assert_eq!(gate.shape, vec![341, 128]);

    // The tokenizer, loaded from the file as Hugging Face's loader does.
    let t = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(t.get_vocab_size(true), 1024);
    let r = reference();
    for case in r["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let enc = t.encode(prompt, true).unwrap();
        assert_eq!(enc.get_ids(), ids(&case["ids"]).as_slice(), "ids of {prompt:?}");
        let text = t.decode(&ids(&case["greedy"]), true).unwrap();
        assert_eq!(text, case["greedy_text"].as_str().unwrap(), "decoding the continuation of {prompt:?}");
    }
    // Like glassllm, nothing is added around the text and specials are not matched in it.
    let enc = t.encode("<bos>hello", true).unwrap();
    assert_eq!(enc.get_ids(), t.encode("<bos>hello", false).unwrap().get_ids());
    assert!(!enc.get_ids().contains(&glassllm::BOS_ID));

    // kiln's private section is left out: the tokenizers loader rejects unknown keys when
    // reading a file (it does not skip their values).
    let doc: Value = serde_json::from_slice(&a["tokenizer.json"]).unwrap();
    assert!(doc.get("kiln").is_none());
}

struct W(kiln_frontend::Weights);

impl WeightSource for W {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.bytes(p)
    }
}

#[test]
fn kiln_reproduces_glassllm_logits_and_greedy_text() {
    let Some((npz, tok)) = glassllm_files() else {
        return;
    };
    let dir = Scratch::new("e2e");
    let out = dir.0.join("glassllm-en");
    glassllm::convert(&npz, &tok, &out).unwrap();
    let m = kiln_frontend::import(&out).unwrap();
    assert_eq!(m.module.name, "glassllm-en");
    assert!(m.chat_template.is_none());
    let module = Arc::new(kiln_ir::verify(m.module).unwrap());
    let weights: Arc<dyn WeightSource> = Arc::new(W(m.weights));
    let opts = SessionOptions { max_context: 128, threads: 0, ..Default::default() };
    let backend = ReferenceBackend::new();
    let r = reference();
    let mut worst = 0.0f32;
    for case in r["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let want: Vec<f32> =
            case["last_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let mut s = backend.prepare(module.clone(), weights.clone(), &opts).unwrap();
        let got = s.forward(&prompt, Logits::Last).unwrap();
        assert_eq!(got.len(), want.len());
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        worst = worst.max(diff);
        assert!(diff <= LOGIT_TOL, "{:?}: max |logit diff| {diff} > {LOGIT_TOL}", case["prompt"]);

        let mut greedy = Vec::new();
        let mut logits = got;
        for _ in 0..ids(&case["greedy"]).len() {
            let next = logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
                .0 as u32;
            greedy.push(next);
            logits = s.forward(&[next], Logits::Last).unwrap();
        }
        assert_eq!(greedy, ids(&case["greedy"]), "greedy continuation of {:?}", case["prompt"]);
    }
    eprintln!("glassllm vs kiln reference interpreter: max |logit diff| = {worst:e}");
}
