//! The wgpu backend through the CLI: a recipe's `phone` device compiles to a build that
//! carries one WGSL file per kernel (listed and hashed in the manifest, each valid for
//! naga, snapshot-tested for a small model), and the build runs on the machine's wgpu
//! adapter (Mesa's lavapipe in CI) token for token like the reference interpreter.
//!
//! Without an adapter the run checks are skipped with a message, unless
//! `KILN_REQUIRE_WGPU=1` (set by `cargo xtask test`).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn have_adapter() -> bool {
    match kiln_wgpu::device::open_device() {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var("KILN_REQUIRE_WGPU").as_deref() != Ok("1"), "KILN_REQUIRE_WGPU=1 but {e}");
            eprintln!("SKIPPED (no wgpu adapter): {e}");
            false
        }
    }
}

fn compile(model: &Path, dir: &Path) -> PathBuf {
    let text = format!(
        "name: phone-test\nmodel: {}\ndevices:\n  phone:\n    backend: wgpu\n    passes: [dce]\n",
        model.display()
    );
    let recipe = dir.join("phone.yaml");
    write(&recipe, text.as_bytes());
    let out = dir.join("out");
    let o = kiln()
        .args(["compile", "--recipe", recipe.to_str().unwrap(), "--device", "phone", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    out.join("phone-test").join("phone")
}

fn greedy(model: &Path, backend: &str, prompt: &str, n: usize) -> Vec<u64> {
    let o = kiln()
        .args(["run", model.to_str().unwrap(), "--backend", backend, "-p", prompt, "-n", &n.to_string(), "--json"])
        .args(["--ignore-eos"])
        .output()
        .unwrap();
    assert!(o.status.success(), "run on {backend} failed: {}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["output"]["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[test]
fn glassllm_phone_build_carries_valid_wgsl_and_runs_like_the_reference() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("wgpu-glass");
    let build = compile(&model, &dir);

    let manifest: Value = serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["backend"], "wgpu");
    let files: Vec<String> =
        manifest["backend_files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert!(
        files.iter().any(|f| f.starts_with("matmul_")) && files.iter().any(|f| f.starts_with("attn_hd")),
        "{files:?}"
    );

    // Every file validates with naga; together they are the snapshot (KILN_BLESS=1 rewrites it).
    let mut all = String::new();
    for f in &files {
        let src = std::fs::read_to_string(build.join(f)).unwrap();
        kiln_wgpu::lower::validate(f, &src).unwrap();
        all += &format!("// ==== {f}\n{src}");
    }
    let snap = root().join("tests/fixtures/wgsl/glassllm-en.wgsl");
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::write(&snap, &all).unwrap();
    } else {
        let want = std::fs::read_to_string(&snap).expect("snapshot (create with KILN_BLESS=1)");
        assert!(all == want, "glassllm's WGSL changed; if intended, rerun with KILN_BLESS=1");
    }

    if !have_adapter() {
        return;
    }
    let want = greedy(&build, "reference", "Once upon a time", 24);
    let got = greedy(&build, "wgpu", "Once upon a time", 24);
    assert_eq!(got, want, "the wgpu build's greedy tokens differ from the reference interpreter's");

    // A kernel file that is valid WGSL but does not match its kernel's bindings (the
    // manifest re-hashed to match, as a hand-edited build would be) is refused cleanly.
    let victim = files.iter().find(|f| f.starts_with("rms_norm")).expect("an rms_norm kernel").clone();
    let bad = "@group(0) @binding(1) var<storage, read_write> b: array<f32>;\n\
               @compute @workgroup_size(1) fn main() { b[0] = 1.0; }\n";
    let saved = std::fs::read(build.join(&victim)).unwrap();
    let saved_manifest = std::fs::read(build.join("manifest.json")).unwrap();
    std::fs::write(build.join(&victim), bad).unwrap();
    let mut m: Value = serde_json::from_slice(&saved_manifest).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["path"] == victim.as_str() {
            use sha2::Digest;
            f["sha256"] = Value::from(format!("{:x}", sha2::Sha256::digest(bad.as_bytes())));
            f["bytes"] = Value::from(bad.len());
        }
    }
    std::fs::write(build.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let o = kiln().args(["run", build.to_str().unwrap(), "-p", "x", "-n", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&victim) && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    std::fs::write(build.join(&victim), saved).unwrap();
    std::fs::write(build.join("manifest.json"), saved_manifest).unwrap();

    // A build whose kernel file was tampered with is refused before anything runs.
    std::fs::write(build.join(&files[0]), "fn main() {}").unwrap();
    let o = kiln().args(["run", build.to_str().unwrap(), "-p", "x", "-n", "1"]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&files[0]), "{}", stderr(&o));
}

/// SmolLM2-135M (Q4_1 GGUF): the phone build's greedy 32-token continuations of three
/// prompts equal the reference interpreter's.
#[test]
fn smollm2_phone_build_generates_like_the_reference() {
    let Some(model) = smollm2() else { return };
    if !have_adapter() {
        return;
    }
    let dir = tempdir("wgpu-smollm2");
    let build = compile(&model, &dir);
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"] {
        let want = greedy(&build, "reference", prompt, 32);
        let got = greedy(&build, "wgpu", prompt, 32);
        assert_eq!(got, want, "prompt {prompt:?}: the wgpu build's greedy tokens differ from the reference's");
    }
}
