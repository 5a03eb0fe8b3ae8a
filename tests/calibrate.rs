//! `kiln calibrate`: importance matrices checked against llama.cpp's
//! `llama-imatrix` (reference in tests/fixtures/oracle/smollm2-imatrix.json, made
//! by tests/oracle/make_imatrix_ref.py), the cache, the file format, and the
//! statistics' internal consistency on the tiny glassllm model.

mod common;

use std::path::Path;

use kiln_runtime::Model;
use kiln_runtime::calibrate::{Imatrix, calibrate, calibrate_cached};
use serde_json::Value;

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn smollm2_importance_matrix_matches_llama_imatrix() {
    let Some(m) = common::smollm2() else { return };
    let cache = common::tempdir("calib-cache");
    let out = cache.join("smollm2.imatrix.safetensors");
    let text = common::root().join("tests/fixtures/text/calib-excerpt.txt");
    let run = || {
        let o = common::kiln()
            .env("KILN_CACHE", &*cache)
            .args(["calibrate", m.to_str().unwrap(), "-f", text.to_str().unwrap(), "--ctx", "128", "--chunks", "2"])
            .args(["-o", out.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        serde_json::from_str::<Value>(&common::stdout(&o)).unwrap()
    };
    let first = run();
    assert_eq!(first["summary"]["cached"], false);
    assert_eq!(first["summary"]["tokens"], 256);
    let bytes = std::fs::read(&out).unwrap();

    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/oracle/smollm2-imatrix.json")).unwrap(),
    )
    .unwrap();
    let im = Imatrix::open(&out).unwrap();
    let mut rel_totals = vec![];
    for (name, want) in reference["weights"].as_object().unwrap() {
        let got = im.entries.get(name).unwrap_or_else(|| panic!("kiln has no statistics for {name}"));
        assert_eq!(got.rows as f64, want["count"].as_f64().unwrap(), "{name}: token count");
        let total: f64 = got.sum_sq.iter().sum();
        let want_total = want["total"].as_f64().unwrap();
        rel_totals.push((total - want_total).abs() / want_total);
        if let Some(v) = want.get("in_sum2") {
            let v: Vec<f64> = v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let err = rel_l2(&got.sum_sq, &v);
            // Layer 0's q input (RMSNorm of embeddings) has no accumulated rounding at all.
            let budget = if name == "blk.0.attn_q.weight" { 1e-4 } else { 0.05 };
            assert!(err < budget, "{name}: per-channel Σx² differs from llama-imatrix by {err:.4} (rel. L2)");
        }
    }
    rel_totals.sort_by(f64::total_cmp);
    let (median, max) = (rel_totals[rel_totals.len() / 2], rel_totals[rel_totals.len() - 1]);
    eprintln!("Σx² totals vs llama-imatrix: median {median:.2e}, max {max:.2e}");
    assert!(median < 0.005 && max < 0.03, "totals differ: median {median}, max {max}");

    // Same model, text and chunking: served from the cache, byte-identical.
    let second = run();
    assert_eq!(second["summary"]["cached"], true);
    assert_eq!(second["summary"]["path"], first["summary"]["path"]);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

fn glassllm() -> Option<Model> {
    let dir = common::model("glassllm-en-hf")?;
    Some(Model::load(&dir).unwrap())
}

#[test]
fn statistics_are_consistent_and_round_trip() {
    let Some(model) = glassllm() else { return };
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/text/calib-excerpt.txt")).unwrap();
    let im = calibrate(&model, &text, 32, 3, 1, &mut |_, _| {}).unwrap();
    assert_eq!(im.chunks, 3);
    let layers = model.module.meta_int("n_layers").unwrap_or(0);
    assert!(layers > 0);
    for l in 0..layers {
        let e = |w: &str| im.entries.get(&format!("blk.{l}.{w}.weight")).unwrap_or_else(|| panic!("blk.{l}.{w}"));
        // q, k and v see the same input; so do gate and up.
        assert_eq!(e("attn_q"), e("attn_k"));
        assert_eq!(e("attn_q"), e("attn_v"));
        assert_eq!(e("ffn_gate"), e("ffn_up"));
        for w in ["attn_q", "attn_output", "ffn_gate", "ffn_down"] {
            assert_eq!(e(w).rows, 96, "{w}: every token of 3 chunks of 32");
            assert!(e(w).sum_sq.iter().all(|s| s.is_finite() && *s >= 0.0));
            assert!(e(w).sum_sq.iter().any(|s| *s > 0.0));
        }
    }
    let imp = im.importance("blk.0.ffn_down.weight").unwrap();
    assert!(imp.iter().all(|v| *v >= 0.0));

    let dir = common::tempdir("calib-roundtrip");
    let p = dir.join("im.safetensors");
    std::fs::write(&p, im.to_bytes()).unwrap();
    let back = Imatrix::open(&p).unwrap();
    assert_eq!(back.to_bytes(), im.to_bytes());
    assert_eq!(back.entries.keys().collect::<Vec<_>>(), im.entries.keys().collect::<Vec<_>>());

    // A different text is a different cache entry; the same one is a hit.
    let cache = dir.join("cache");
    let (_, a) = calibrate_cached(&model, &text, 32, 3, 1, &cache, &mut |_, _| {}).unwrap();
    let (_, b) = calibrate_cached(&model, &text, 32, 3, 1, &cache, &mut |_, _| {}).unwrap();
    let (_, c) = calibrate_cached(&model, &text[1..], 32, 3, 1, &cache, &mut |_, _| {}).unwrap();
    assert!(!a.cached && b.cached && !c.cached);
    assert_eq!(a.path, b.path);
    assert_ne!(a.path, c.path);
}

#[test]
fn bad_importance_files_and_texts_are_refused() {
    let dir = common::tempdir("calib-bad");
    let p = dir.join("broken.safetensors");
    common::write(&p, b"\x10\0\0\0\0\0\0\0{\"a\":1}");
    let e = Imatrix::open(&p).unwrap_err().to_string();
    assert!(e.contains("broken.safetensors"), "{e}");
    let p2 = dir.join("other.safetensors");
    std::fs::write(&p2, kiln_frontend::safetensors::write(&[], &Default::default())).unwrap();
    let e = Imatrix::open(&p2).unwrap_err().to_string();
    assert!(e.contains("other.safetensors") && e.contains("not a kiln importance matrix"), "{e}");

    let Some(model) = glassllm() else { return };
    let e = calibrate(&model, "too short", 32, 0, 1, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("fewer than one chunk"), "{e}");
    let o = common::run(&["calibrate", "no-such-model.gguf", "-f", Path::new("x").to_str().unwrap()]);
    assert!(!o.status.success());
}
