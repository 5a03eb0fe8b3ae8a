//! Imports glassllm converted to a Hugging Face directory (`cargo xtask glassllm-to-hf`) and
//! checks kiln's reference interpreter against glassllm's own logits and greedy continuations
//! (tests/fixtures/glassllm/reference.json, from tests/oracle/make_glassllm_refs.py).
//!
//! The directory is `$KILN_GLASSLLM_HF`, else `${KILN_CACHE:-~/.cache/kiln}/models/glassllm-en-hf`;
//! the test skips with a printed reason when it is missing. The converter's own tests (with the
//! conversion run in a scratch directory) are in xtask/tests/glassllm.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Backend, Logits, SessionOptions, WeightSource};
use kiln_ir::{DType, Dim, ParamId};
use serde_json::Value;

/// Largest allowed |kiln − glassllm| over the last-position logits (fp16 weights, f32 math).
const LOGIT_TOL: f32 = 2e-3;

fn converted_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("KILN_GLASSLLM_HF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = match std::env::var_os("KILN_CACHE") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln"),
            };
            cache.join("models/glassllm-en-hf")
        }
    };
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        if std::env::var("KILN_REQUIRE_MODELS").as_deref() == Ok("1") {
            panic!("no converted glassllm at {} (run `cargo xtask fetch-models`)", dir.display());
        }
        eprintln!(
            "skipping: no converted glassllm at {} (make it with `cargo xtask glassllm-to-hf --npz \
             .../glassllm/weights/en.npz --tokenizer .../en.tokenizer.json --out {0}`)",
            dir.display()
        );
        None
    }
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glassllm/reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

struct W(kiln_frontend::Weights);

impl WeightSource for W {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.bytes(p)
    }
}

#[test]
fn glassllm_hf_imports_and_matches_glassllm() {
    let Some(dir) = converted_dir() else { return };
    let m = kiln_frontend::import(&dir).unwrap();
    assert!(m.chat_template.is_none());
    serde_json::from_str::<Value>(&m.tokenizer_json).unwrap();

    // Tied embeddings: no separate output matrix; fp16 matrices stay mapped, norms become f32.
    let names: Vec<&str> = m.module.params.iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"token_embd.weight") && !names.contains(&"output.weight"));
    assert_eq!(names.len(), 2 + 9 * 4);
    for p in &m.module.params {
        let want = if p.name.ends_with("norm.weight") { DType::F32 } else { DType::F16 };
        assert_eq!(p.ty.dtype, want, "{}", p.name);
    }
    let module = Arc::new(kiln_ir::verify(m.module).unwrap());
    let out = module.output.unwrap();
    assert_eq!(module.value_type(out).shape, vec![Dim::Seq, Dim::Fixed(1024)]);

    let weights: Arc<dyn WeightSource> = Arc::new(W(m.weights));
    let opts = SessionOptions { max_context: 128, threads: 0, ..Default::default() };
    let r = reference();
    let mut worst = 0.0f32;
    for case in r["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let want: Vec<f32> =
            case["last_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let mut s = ReferenceBackend::new().prepare(module.clone(), weights.clone(), &opts).unwrap();
        let mut logits = s.forward(&prompt, Logits::Last).unwrap();
        assert_eq!(logits.len(), want.len());
        let diff = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        worst = worst.max(diff);
        assert!(diff <= LOGIT_TOL, "{:?}: max |logit diff| {diff} > {LOGIT_TOL}", case["prompt"]);

        let want_greedy = ids(&case["greedy"]);
        let mut greedy = Vec::new();
        for _ in 0..want_greedy.len() {
            let next = logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
                .0 as u32;
            greedy.push(next);
            logits = s.forward(&[next], Logits::Last).unwrap();
        }
        assert_eq!(greedy, want_greedy, "greedy continuation of {:?}", case["prompt"]);
    }
    eprintln!("glassllm vs kiln reference interpreter: max |logit diff| = {worst:e}");
}
