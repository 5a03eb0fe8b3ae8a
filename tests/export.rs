//! `kiln export --gguf`: an exact copy equals its source (tensors, metadata, logits), from a GGUF,
//! a registry id and a build alike; a q8_0 export keeps kiln's perplexity and llama.cpp loads it
//! with the same perplexity; bad input fails cleanly and leaves no file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use kiln_backends::Logits;
use kiln_frontend::gguf::GgufFile;
use kiln_runtime::Model;
use serde_json::Value;

/// The key kiln adds to every file it exports.
const EXPORTED_BY: &str = "kiln.exported_by";
const PPL_TEXT: &str = "tests/fixtures/text/ppl-excerpt.txt";
/// Perplexity window: 8 chunks of 128 tokens (504 scored tokens). Two chunks score only
/// 126 tokens, where kiln's f32 activations and llama.cpp's 8-bit ones differ by ~2% on
/// SmolLM2; over 8 chunks they agree within 0.2%.
const PPL_CTX: usize = 128;
const PPL_CHUNKS: usize = 8;

fn assert_clean_error(o: &Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("error: "), "error line: {err}");
    for s in must_contain {
        assert!(err.contains(s), "stderr should contain {s:?}: {err}");
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Runs `kiln export MODEL --gguf OUT EXTRA... --json` and returns the report.
fn export_json(model: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["export", model, "--gguf", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "kiln {args:?} failed: {}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("JSON report");
    v["report"].clone()
}

/// Tensors (name, type, dims, data) and metadata equal, apart from kiln's own note.
fn assert_same_gguf(a: &GgufFile, b: &GgufFile) {
    let meta = |f: &GgufFile| {
        let mut m = f.metadata().clone();
        m.remove(EXPORTED_BY);
        m
    };
    assert_eq!(meta(a), meta(b), "metadata");
    assert_eq!(a.tensors().len(), b.tensors().len());
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!((&x.name, x.dtype, &x.dims), (&y.name, y.dtype, &y.dims));
        assert!(a.tensor_data(x) == b.tensor_data(y), "tensor {} data differs", x.name);
    }
}

fn logits(path: &Path, prompt: &str) -> Vec<f32> {
    let m = Model::load(path).unwrap();
    let ids = m.tokenizer.encode(prompt, true).unwrap();
    let mut s = m.session(ids.len() + 1, 0).unwrap();
    s.forward(&ids, Logits::All).unwrap()
}

fn kiln_ppl(path: &Path) -> f64 {
    let m = Model::load(path).unwrap();
    let text = std::fs::read_to_string(root().join(PPL_TEXT)).unwrap();
    let r = kiln_runtime::ppl::perplexity(&m, &text, PPL_CTX, PPL_CHUNKS, 0, &mut |_, _, _| {}).unwrap();
    assert_eq!(r.chunks, PPL_CHUNKS);
    r.ppl
}

#[test]
fn exact_export_equals_the_source() {
    let Some(src) = smollm2() else { return };
    let dir = tempdir("export-exact");
    let out = dir.join("copy.gguf");
    let r = export_json(src.to_str().unwrap(), &out, &[]);
    assert_eq!(r["converted"], 0);
    assert_eq!(r["changed"], 0);
    assert_eq!(r["tensors"], 272);
    assert_eq!(r["file_type"], 3, "general.file_type kept: MOSTLY_Q4_1");
    let a = GgufFile::open(&src).unwrap();
    let b = GgufFile::open(&out).unwrap();
    assert_same_gguf(&a, &b);
    assert_eq!(b.get_str(EXPORTED_BY).unwrap(), format!("kiln {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(r["file_bytes"].as_u64(), Some(b.len()));
    let tensor_bytes: u64 = a.tensors().iter().map(|t| t.nbytes).sum();
    let params: u64 = a.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(r["tensor_bytes"].as_u64(), Some(tensor_bytes));
    assert_eq!(r["params"].as_u64(), Some(params));
    let bpw = r["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - tensor_bytes as f64 * 8.0 / params as f64).abs() < 1e-9);

    // The same model by registry id, and from a build of it: byte-identical files.
    let by_id = dir.join("by-id.gguf");
    export_json("smollm2-135m-instruct", &by_id, &[]);
    assert!(std::fs::read(&by_id).unwrap() == std::fs::read(&out).unwrap(), "export by registry id differs");
    let recipe = dir.join("t.yaml");
    write(
        &recipe,
        b"name: t\nmodel: smollm2-135m-instruct\ndevices:\n  laptop: { backend: reference, passes: [dce] }\n",
    );
    let builds = dir.join("build");
    let c = run(&[
        "compile",
        "--recipe",
        recipe.to_str().unwrap(),
        "--device",
        "laptop",
        "--out",
        builds.to_str().unwrap(),
    ]);
    assert!(c.status.success(), "compile: {}", stderr(&c));
    let from_build = dir.join("from-build.gguf");
    let r = export_json(builds.join("t/laptop").to_str().unwrap(), &from_build, &[]);
    assert_eq!(r["metadata_from"].as_str(), Some(src.to_str().unwrap()));
    assert!(std::fs::read(&from_build).unwrap() == std::fs::read(&out).unwrap(), "export of the build differs");

    // kiln runs the copy with the very same logits.
    let prompt = "The capital of France is";
    assert_eq!(logits(&out, prompt), logits(&src, prompt));
}

/// `$KILN_LLAMA_CPP_BIN` (llama.cpp's bin directory or its llama-perplexity), else the oracle build in the cache.
fn llama_perplexity_bin() -> Option<PathBuf> {
    let p = match std::env::var_os("KILN_LLAMA_CPP_BIN").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => cache_dir().join("llama.cpp/build/bin"),
    };
    let bin = if p.is_dir() { p.join("llama-perplexity") } else { p };
    bin.is_file().then_some(bin)
}

fn llama_cpp_ppl(bin: &Path, model: &Path) -> f64 {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
    let text = root().join(PPL_TEXT);
    let o = std::process::Command::new(bin)
        .args(["-m", model.to_str().unwrap(), "-f", text.to_str().unwrap()])
        .args(["-c", &PPL_CTX.to_string(), "--chunks", &PPL_CHUNKS.to_string(), "-t", &threads])
        .output()
        .expect("llama-perplexity runs");
    let log = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "llama-perplexity failed on {}:\n{log}", model.display());
    let line = log.lines().find_map(|l| l.split("Final estimate: PPL = ").nth(1)).unwrap_or_else(|| {
        panic!("no final estimate in llama-perplexity's output:\n{log}");
    });
    line.split_whitespace().next().and_then(|x| x.parse().ok()).expect("a number")
}

#[test]
fn q8_0_export_keeps_perplexity_and_loads_in_llama_cpp() {
    let Some(src) = smollm2() else { return };
    let dir = tempdir("export-q8");
    let out = dir.join("q8_0.gguf");
    let r = export_json(src.to_str().unwrap(), &out, &["--type", "q8_0"]);
    // 210 q4_1 matmul weights converted; token_embd was q8_0 already; 61 norms stay f32.
    assert_eq!(r["converted"], 210);
    assert_eq!(r["per_type"]["q8_0"]["tensors"], 211);
    assert_eq!(r["per_type"]["f32"]["tensors"], 61);
    assert_eq!(r["file_type"], 7, "general.file_type = MOSTLY_Q8_0");
    assert!(r["fallbacks"].as_array().unwrap().is_empty());
    let bpw = r["bits_per_weight"].as_f64().unwrap();
    assert!((8.4..8.6).contains(&bpw), "bits per weight {bpw}");
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_u64("general.file_type").unwrap(), 7);
    assert_eq!(f.get_str("general.quantized_by").unwrap(), format!("kiln {}", env!("CARGO_PKG_VERSION")));
    let source = GgufFile::open(&src).unwrap();
    for t in f.tensors() {
        let want = if t.dims.len() == 2 { kiln_ir::DType::Q8_0 } else { kiln_ir::DType::F32 };
        assert_eq!(t.dtype, want, "{}", t.name);
        assert_eq!(t.dims, source.tensor(&t.name).unwrap().dims, "{}", t.name);
    }

    let ppl_src = kiln_ppl(&src);
    let ppl_q8 = kiln_ppl(&out);
    let rel = (ppl_q8 - ppl_src).abs() / ppl_src;
    eprintln!("kiln perplexity: source {ppl_src:.4}, q8_0 export {ppl_q8:.4} ({:+.3}%)", rel * 100.0);
    assert!(rel < 0.01, "q8_0 export perplexity {ppl_q8:.4} vs source {ppl_src:.4}");

    let Some(bin) = llama_perplexity_bin() else {
        eprintln!(
            "SKIPPED (llama.cpp part): llama-perplexity not found (set KILN_LLAMA_CPP_BIN or run tests/oracle/build_llama_cpp.sh)"
        );
        return;
    };
    let llama = llama_cpp_ppl(&bin, &out);
    let rel = (llama - ppl_q8).abs() / ppl_q8;
    eprintln!("q8_0 export: llama.cpp perplexity {llama:.4} vs kiln {ppl_q8:.4} ({:.3}%)", rel * 100.0);
    assert!(rel < 0.01, "llama.cpp perplexity {llama:.4} of the export differs from kiln's {ppl_q8:.4}");
}

#[test]
fn bad_export_input_fails_cleanly_and_leaves_no_file() {
    let dir = tempdir("export-bad");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("x.gguf");
    let out_s = out.to_str().unwrap();

    // An unknown type is refused before anything is read.
    let o = run(&["export", "no-such-model.gguf", "--gguf", out_s, "--type", "q9_9"]);
    assert_clean_error(&o, &["--type", "unknown weight type `q9_9`", "q8_0"]);
    let o = run(&["export", "no-such-model.gguf", "--gguf", out_s, "--rule", "attn_v"]);
    assert_clean_error(&o, &["--rule", "PATTERN=TYPE"]);
    assert!(entries(&out_dir).is_empty());

    if let Some(hf) = model("glassllm-en-hf") {
        let o = run(&["export", hf.to_str().unwrap(), "--gguf", out_s]);
        assert_clean_error(&o, &[hf.to_str().unwrap(), "unsupported: export of a Hugging Face source needs"]);
        assert!(entries(&out_dir).is_empty());
    }

    let Some(src) = smollm2() else { return };
    let src = src.to_str().unwrap();
    // Missing directory, a file where the directory should be, a directory as the output.
    let missing = dir.join("no-such-dir").join("x.gguf");
    assert_clean_error(&run(&["export", src, "--gguf", missing.to_str().unwrap()]), &["no-such-dir", "cannot write"]);
    assert!(!dir.join("no-such-dir").exists());
    let file = dir.join("a-file");
    write(&file, b"not a directory");
    let under_file = file.join("x.gguf");
    assert_clean_error(&run(&["export", src, "--gguf", under_file.to_str().unwrap()]), &["not a directory"]);
    assert_clean_error(&run(&["export", src, "--gguf", out_dir.to_str().unwrap()]), &["it is a directory"]);
    // A rule that matches nothing is a mistake, not a no-op.
    let o = run(&["export", src, "--gguf", out_s, "--rule", "attn_qq=q8_0"]);
    assert_clean_error(&o, &["--rule", "attn_qq=q8_0", "matches no matmul weight"]);
    assert!(entries(&out_dir).is_empty());

    // A read-only directory (root can write anyway: then this case is skipped).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("read-only");
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::File::create(ro.join("probe")).is_ok() {
            let _ = std::fs::remove_file(ro.join("probe"));
            eprintln!("SKIPPED (read-only directory case): this user can write to a 0555 directory");
        } else {
            let o = run(&["export", src, "--gguf", ro.join("x.gguf").to_str().unwrap()]);
            assert_clean_error(&o, &[ro.join("x.gguf").to_str().unwrap(), "denied"]);
            assert!(entries(&ro).is_empty());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
