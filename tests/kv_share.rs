//! The `kv_share` pass (issue 10, cross-layer KV sharing) on real models: fixed
//! groups and explicit plans rewrite the attention ops to read an earlier
//! layer's slot and drop the dead K/V projections; the shared model runs on the
//! reference and CPU backends alike (bit-equal in llama.cpp numerics); a budget
//! plan keeps the measured perplexity within its budget.

mod common;

use std::collections::BTreeMap;

use kiln_backends::{Logits, Numerics};
use kiln_ir::Op;
use kiln_runtime::Model;
use serde_json::{Value, json};

fn shared(path: &std::path::Path, options: Value, calibration: kiln_passes::Calibration<'_>) -> (Model, Value) {
    common::after_pass(path, "kv_share", options, calibration)
}

/// The calibration text of the budget tests, in chunks of 64 tokens.
const CTX: usize = 64;
const CHUNKS: usize = 2;

fn adjacent_of(d: &Value) -> Vec<Value> {
    d["similarity"]["adjacent"].as_array().unwrap().clone()
}

fn calib_text() -> String {
    std::fs::read_to_string(common::root().join("tests/fixtures/text/calib-excerpt.txt")).unwrap()
}

fn writers(m: &Model) -> usize {
    m.module.insts.iter().filter(|i| matches!(i.op, Op::Attention { k: Some(_), .. })).count()
}

#[test]
fn groups_of_two_halve_the_cache_and_run_on_every_cpu_backend() {
    let Some(p) = common::smollm2() else { return };
    let (m, details) = shared(&p, json!({"group": 2}), Default::default());
    assert_eq!(writers(&m), 15);
    assert_eq!(details["kv_elements_per_token_before"], json!(30 * 2 * 3 * 64));
    assert_eq!(details["kv_elements_per_token_after"], json!(15 * 2 * 3 * 64));
    // The readers' K/V projections are gone; the writers' stay.
    assert!(m.module.param_by_name("blk.1.attn_k.weight").is_none());
    assert!(m.module.param_by_name("blk.1.attn_v.weight").is_none());
    assert!(m.module.param_by_name("blk.2.attn_k.weight").is_some());
    // An explicit plan naming the same pairs gives the same module.
    let explicit: BTreeMap<String, usize> = (0..15).map(|g| ((2 * g + 1).to_string(), 2 * g)).collect();
    let (e, _) = shared(&p, json!({"share": explicit}), Default::default());
    assert_eq!(kiln_ir::print(&e.module), kiln_ir::print(&m.module));
    // The CPU backend runs shared slots exactly as the reference does.
    let prompt = m.tokenizer.encode("The capital of France is", true).unwrap();
    let run = |model: &Model| {
        let mut s = model.session_with(prompt.len() + 4, 2, Numerics::Ggml).unwrap();
        s.forward(&prompt, Logits::All).unwrap()
    };
    let mut on_cpu = shared(&p, json!({"group": 2}), Default::default()).0;
    on_cpu.backend = "cpu".into();
    let (a, b) = (run(&m), run(&on_cpu));
    assert!(a.iter().map(|v| v.to_bits()).eq(b.iter().map(|v| v.to_bits())), "cpu differs from the reference");
    let plain = Model::load(&p).unwrap();
    assert_ne!(run(&plain), a, "sharing changes the model");
}

#[test]
fn a_budget_plan_stays_within_its_budget() {
    let Some(dir) = common::model("glassllm-en-hf") else { return };
    let text = calib_text();
    let imported = kiln_frontend::import(&dir).unwrap();
    let model_of = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| {
        Model::from_parts(&dir, m.clone(), w.clone(), imported.tokenizer_json.as_bytes(), None)
            .map_err(|e| e.to_string())
    };
    let measure = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| -> Result<f64, String> {
        let model = model_of(m, w)?;
        Ok(kiln_runtime::ppl::perplexity(&model, &text, CTX, CHUNKS, 2, &mut |_, _, _| {})
            .map_err(|e| e.to_string())?
            .ppl)
    };
    let capture = |m: &kiln_ir::Module,
                   w: &kiln_frontend::Weights,
                   values: &[kiln_ir::ValueId],
                   visit: &mut dyn FnMut(usize, &[&[f32]])|
     -> Result<(), String> {
        kiln_runtime::calibrate::capture_values(&model_of(m, w)?, &text, CTX, CHUNKS, 2, values, visit)
            .map_err(|e| e.to_string())
    };
    let calibration = kiln_passes::Calibration { measure: Some(&measure), capture: Some(&capture), importance: None };
    let base = shared(&dir, json!({"share": {}}), Default::default()).0;
    let n = writers(&base);
    assert!(n >= 3);
    for budget in [0.0, 0.02, 10.0] {
        let (m, d) = shared(&dir, json!({"max_ppl_increase": budget}), calibration);
        let (before, after) =
            (d["calibration_ppl_before"].as_f64().unwrap(), d["calibration_ppl_after"].as_f64().unwrap());
        assert!(after <= before * (1.0 + budget) + 1e-9, "budget {budget}: {before} -> {after}");
        let shares = d["share"].as_object().unwrap().len();
        assert_eq!(writers(&m) + shares, n);
        if budget >= 10.0 {
            assert_eq!(writers(&m), 1, "an unlimited budget shares every layer's cache");
        }
        // Every candidate was measured, and the similarity report covers each layer.
        assert_eq!(d["single_merge_cost"].as_array().unwrap().len(), n - 1);
        assert_eq!(d["similarity"]["adjacent"].as_array().unwrap().len(), n - 1);
        assert_eq!(d["similarity"]["shared"].as_array().unwrap().len(), shares);
        assert!(d["similarity"]["spearman_similarity_vs_cost"].is_number());
    }

    // The reported similarity is the mean per-token cosine of the two layers' K
    // (and V) rows, recomputed here straight from the captured values.
    let (_, d) = shared(&dir, json!({"group": 2}), calibration);
    let kv: Vec<(kiln_ir::ValueId, kiln_ir::ValueId)> = base
        .module
        .insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Attention { k: Some(k), v: Some(v), .. } => Some((*k, *v)),
            _ => None,
        })
        .collect();
    let values = [kv[0].0, kv[1].0, kv[0].1, kv[1].1];
    let (mut sums, mut rows) = ([0.0f64; 2], 0usize);
    kiln_runtime::calibrate::capture_values(&base, &text, CTX, CHUNKS, 2, &values, &mut |r, per| {
        rows += r;
        for (which, sum) in sums.iter_mut().enumerate() {
            let (a, b) = (per[2 * which], per[2 * which + 1]);
            let w = a.len() / r;
            for t in 0..r {
                let (x, y) = (&a[t * w..(t + 1) * w], &b[t * w..(t + 1) * w]);
                let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
                let norm = |z: &[f32]| z.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
                *sum += dot / (norm(x) * norm(y));
            }
        }
    })
    .unwrap();
    assert_eq!(rows, CTX * CHUNKS);
    let layer1 = &d["similarity"]["adjacent"][0];
    assert_eq!(layer1["layer"], json!(1));
    for (key, sum) in [("k_cos", sums[0]), ("v_cos", sums[1])] {
        let got = layer1[key].as_f64().unwrap();
        assert!((got - sum / rows as f64).abs() < 1e-9, "{key}: {got} vs {}", sum / rows as f64);
        assert!((-1.0..=1.0).contains(&got));
    }

    // A layer reading its own cache would agree with itself: the attention-output
    // similarity is a real cosine, in range, and not trivially 1.
    for a in adjacent_of(&d) {
        let x = a["attn_out_cos"].as_f64().unwrap();
        assert!((-1.0..1.0).contains(&x), "{a}");
    }

    // `candidates` measures only the layers most alike to the one before them.
    let (_, d) = shared(&dir, json!({"max_ppl_increase": 10.0, "candidates": 2}), calibration);
    let adjacent = d["similarity"]["adjacent"].as_array().unwrap();
    let score = |l: u64| adjacent[l as usize - 1]["attn_out_cos"].as_f64().unwrap();
    let measured: Vec<u64> =
        d["single_merge_cost"].as_array().unwrap().iter().map(|c| c["layer"].as_u64().unwrap()).collect();
    assert_eq!(measured.len(), 2);
    let lowest_measured = measured.iter().map(|&l| score(l)).fold(f64::INFINITY, f64::min);
    for l in 1..n as u64 {
        if !measured.contains(&l) {
            assert!(score(l) <= lowest_measured, "layer {l} is more alike than a measured one");
        }
    }

    // `min_similarity` alone merges exactly the layers alike enough to their group's writer.
    let mut scores: Vec<f64> = (1..n as u64).map(score).collect();
    scores.sort_by(f64::total_cmp);
    let threshold = scores[scores.len() / 2];
    let (m, d) = shared(&dir, json!({"min_similarity": threshold}), calibration);
    for pair in d["similarity"]["shared"].as_array().unwrap() {
        let s = pair["attn_out_cos"].as_f64().unwrap();
        assert!(s >= threshold, "{pair} is under {threshold}");
    }
    assert!(writers(&m) < n, "the median layer's similarity admits at least one merge");
    assert!(d["calibration_ppl_after"].as_f64().unwrap() >= 0.0);

    // Without calibration text a budget cannot be planned, and says so.
    let imported = kiln_frontend::import(&dir).unwrap();
    let (mut m, mut w) = (imported.module, imported.weights);
    let err = kiln_passes::run_pipeline(
        &mut m,
        &mut w,
        &[("kv_share".into(), json!({"max_ppl_increase": "3%"}))],
        &kiln_passes::PipelineCtx {
            device: "laptop",
            base_dir: &common::root(),
            calibration: kiln_passes::Calibration::default(),
            memo: None,
        },
        &mut |_| {},
    )
    .expect_err("needs calibration")
    .to_string();
    assert!(err.contains("calibration"), "{err}");
}
