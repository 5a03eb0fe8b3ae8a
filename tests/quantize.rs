//! The `quantize` pass through `kiln compile`: rules and a bits-per-weight
//! budget, calibration feeding importance weights, and the quality report every
//! quantized build carries in its manifest.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Writes a recipe for `model` (absolute path) with the given laptop passes and
/// calibration/quality sections pointing at the repository's text fixtures.
fn recipe(dir: &Path, name: &str, model: &Path, passes: &str, ctx: usize, chunks: usize) -> PathBuf {
    let texts = root().join("tests/fixtures/text");
    let text = format!(
        "name: {name}\nmodel: {model}\ndevices:\n  laptop:\n    backend: reference\n    passes: {passes}\n\
         calibration: {{ text: {calib}, ctx: {ctx}, chunks: {chunks} }}\n\
         quality: {{ text: {ppl}, ctx: {ctx}, chunks: {chunks} }}\n",
        model = model.display(),
        calib = texts.join("calib-excerpt.txt").display(),
        ppl = texts.join("ppl-excerpt.txt").display(),
    );
    let p = dir.join(format!("{name}.yaml"));
    write(&p, text.as_bytes());
    p
}

fn compile(recipe: &Path, out: &Path) -> Value {
    compile_with(recipe, out, &[])
}

/// [`compile`] with extra environment variables.
fn compile_with(recipe: &Path, out: &Path, env: &[(&str, &Path)]) -> Value {
    let o = kiln()
        .env("KILN_CACHE", cache_dir())
        .envs(env.iter().copied())
        .args(["compile", "--recipe", recipe.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()])
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["builds"][0]["manifest"].clone()
}

fn quantize_report(manifest: &Value) -> &Value {
    manifest["passes"].as_array().unwrap().iter().find(|p| p["pass"] == "quantize").expect("a quantize report")
}

#[test]
fn rules_quantize_and_the_manifest_carries_the_quality_report() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("quantize-rules");
    let passes = "[dce, { quantize: { default: q8_0, rules: { attn_v: q4_0, ffn_down: keep } } }]";
    let r = recipe(&dir, "glass-q8", &model, passes, 64, 4);
    let m = compile(&r, &dir.join("out"));
    let rep = quantize_report(&m);
    let tensors = rep["details"]["tensors"].as_array().unwrap();
    assert!(!tensors.is_empty());
    for t in tensors {
        let name = t["tensor"].as_str().unwrap();
        assert!(!name.contains("ffn_down"), "{name} was to be kept");
        let want = if name.contains("attn_v") { "q4_0" } else { "q8_0" };
        assert_eq!(t["format"], want, "{name}");
        assert_eq!(t["weighted"], true, "{name}: calibration gives every matmul weight an importance");
    }
    assert!(rep["details"]["bits_per_weight"].as_f64().unwrap() < 16.0);
    assert_eq!(m["calibration"]["ctx"], 64);
    let q = &m["quality"];
    let (ppl, src) = (q["ppl"].as_f64().unwrap(), q["ppl_source"].as_f64().unwrap());
    assert!(ppl.is_finite() && src.is_finite() && ppl > 1.0);
    assert!((ppl / src - 1.0).abs() < 0.05, "q8_0/q4_0 glassllm: ppl {ppl} vs source {src}");
    assert!(q["kl_mean"].as_f64().unwrap() < 0.05 && q["kl_mean"].as_f64().unwrap() >= 0.0);
    assert!(q["top1_agreement"].as_f64().unwrap() > 0.8);
    // The build runs.
    let build = dir.join("out/glass-q8/laptop");
    let o = run(&["run", build.to_str().unwrap(), "--prompt", "The", "-n", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn smollm2_meets_a_bits_per_weight_budget() {
    let Some(model) = smollm2() else { return };
    let dir = tempdir("quantize-budget");
    // None of these reproduces the Q4_1 source exactly, so every upgrade lowers the error.
    let passes = "[dce, { quantize: { target_bpw: 5.5, candidates: [q4_0, q5_0, q8_0] } }]";
    let r = recipe(&dir, "smol-5bpw", &model, passes, 128, 2);
    let m = compile(&r, &dir.join("out"));
    let rep = quantize_report(&m);
    let bpw = rep["details"]["bits_per_weight"].as_f64().unwrap();
    assert!(bpw <= 5.5 && bpw > 5.3, "achieved {bpw} bits per weight for a 5.5 budget");
    let formats = rep["details"]["formats"].as_object().unwrap();
    assert!(formats.len() >= 2, "a budget between formats mixes them: {formats:?}");
    assert!(formats.keys().all(|f| ["q4_0", "q5_0", "q8_0"].contains(&f.as_str())), "{formats:?}");
    let q = &m["quality"];
    assert!(q["kl_mean"].as_f64().unwrap() > 0.0 && q["ppl_ratio_minus_1"].as_f64().unwrap() < 0.3, "{q}");
}

/// `sensitivity: measured`: each group (kind × third of the layers) is measured on the
/// calibration text, the report carries every measurement, and the budget still holds.
#[test]
fn measured_sensitivity_is_reported_and_meets_the_budget() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("quantize-sensitivity");
    let passes = "[dce, { quantize: { target_bpw: 7.5, sensitivity: measured, candidates: [q4_0, q5_0, q8_0] } }]";
    let r = recipe(&dir, "glass-sens", &model, passes, 64, 2);
    let m = compile(&r, &dir.join("out"));
    let rep = quantize_report(&m);
    let bpw = rep["details"]["bits_per_weight"].as_f64().unwrap();
    assert!(bpw <= 7.5 && bpw > 7.0, "achieved {bpw} bits per weight for a 7.5 budget");
    let sens = &rep["details"]["sensitivity"];
    let base = sens["base_ppl"].as_f64().unwrap();
    let groups = sens["groups"].as_object().unwrap();
    // glassllm: 4 layers → thirds 0..2 of 7 kinds, plus the embedding table.
    assert!(
        groups.len() >= 15 && groups.contains_key("ffn_down@0") && groups.contains_key("token_embd.weight"),
        "{sens}"
    );
    let rises: Vec<f64> = groups.values().map(|g| g["log_ppl_rise"].as_f64().unwrap()).collect();
    assert!(groups.values().all(|g| g["ppl"].as_f64().unwrap() > 0.0) && base > 1.0, "{sens}");
    assert!(rises.iter().any(|r| *r > 1e-3), "quantizing a group to q4_0 must move the perplexity: {sens}");
    // Without a calibration text there is nothing to measure: a clear error, no build.
    let r = dir.join("nocal.yaml");
    write(
        &r,
        format!(
            "name: nocal\nmodel: {}\ndevices:\n  laptop:\n    backend: reference\n    passes: {passes}\n",
            model.display()
        )
        .as_bytes(),
    );
    let out = dir.join("out2");
    let o = run(&["compile", "--recipe", r.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("needs the recipe's `calibration`"), "{}", stderr(&o));
    assert!(!out.join("nocal/laptop").exists());
}

/// The compile driver's memo: a second build of the same recipe reuses every quantized
/// tensor, error sample and measured perplexity of the first and writes the same bytes; a
/// build with the memo off writes them too.
#[test]
fn memoized_quantization_gives_the_same_build() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("quantize-memo");
    let memo = dir.join("memo");
    let passes =
        "[dce, { quantize: { target_bpw: 6.0, sensitivity: measured, candidates: [kq2, q3_k, q4_0, q5_0, q8_0] } }]";
    let r = recipe(&dir, "glass-memo", &model, passes, 64, 2);
    let build = |out: &str, memo_env: (&str, &Path)| compile_with(&r, &dir.join(out), &[memo_env]);
    let cold = build("cold", ("KILN_MEMO_DIR", &memo));
    let warm = build("warm", ("KILN_MEMO_DIR", &memo));
    let off = build("off", ("KILN_MEMO", Path::new("off")));
    let (c, w, o) =
        (&quantize_report(&cold)["details"], &quantize_report(&warm)["details"], &quantize_report(&off)["details"]);
    assert_eq!(c["memo"]["hits"], 0, "{}", c["memo"]);
    assert!(c["memo"]["misses"].as_u64().unwrap() > 0, "{}", c["memo"]);
    assert_eq!(w["memo"]["misses"], 0, "{}", w["memo"]);
    assert_eq!(w["memo"]["hits"], c["memo"]["misses"], "every result the first build stored is reused");
    assert_eq!(o["memo"], serde_json::json!({"hits": 0, "misses": 0}));
    // Same measurements, same choices, same bytes.
    assert_eq!(c["sensitivity"], w["sensitivity"]);
    assert_eq!(c["sensitivity"], o["sensitivity"]);
    let weights = |m: &Value| {
        m["files"].as_array().unwrap().iter().find(|f| f["path"] == "weights.bin").expect("weights.bin")["sha256"]
            .clone()
    };
    assert!(weights(&cold).is_string(), "{}", cold["files"]);
    assert_eq!(weights(&cold), weights(&warm));
    assert_eq!(weights(&cold), weights(&off));
}

#[test]
fn bad_quantize_options_fail_before_work() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("quantize-bad");
    for (passes, msg) in [
        ("[{ quantize: { default: q9_9 } }]", "unknown format"),
        ("[{ quantize: {} }]", "needs"),
        ("[{ quantize: { target_bpw: 0.5, candidates: [q8_0] } }]", "below the smallest build"),
    ] {
        let r = recipe(&dir, "bad", &model, passes, 64, 1);
        let out = dir.join("out");
        let o =
            run(&["compile", "--recipe", r.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()]);
        assert!(!o.status.success(), "{passes} should fail");
        assert!(stderr(&o).contains(msg), "{passes}: {}", stderr(&o));
        assert!(!out.join("bad/laptop").exists(), "{passes}: no build is left behind");
    }
}

#[test]
fn kq2_builds_run() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("quantize-kq2");
    let r = recipe(&dir, "glass-kq2", &model, "[dce, { quantize: { default: kq2 } }]", 64, 2);
    let m = compile(&r, &dir.join("out"));
    let rep = quantize_report(&m);
    // Rows of 128 take kq2 (rows of 341 cannot and fall back).
    let formats = rep["details"]["formats"].as_object().unwrap();
    assert!(formats.contains_key("kq2"), "{formats:?}");
    let q = &m["quality"];
    assert!(q["ppl"].as_f64().unwrap().is_finite() && q["kl_mean"].as_f64().unwrap() > 0.0, "{q}");
    let build = dir.join("out/glass-kq2/laptop");
    let o = run(&["run", build.to_str().unwrap(), "--prompt", "The", "-n", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
