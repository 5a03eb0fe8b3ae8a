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

fn shared(path: &std::path::Path, options: Value, measure: Option<&kiln_passes::Measure<'_>>) -> (Model, Value) {
    common::after_pass(path, "kv_share", options, measure)
}

fn writers(m: &Model) -> usize {
    m.module.insts.iter().filter(|i| matches!(i.op, Op::Attention { k: Some(_), .. })).count()
}

#[test]
fn groups_of_two_halve_the_cache_and_run_on_every_cpu_backend() {
    let Some(p) = common::smollm2() else { return };
    let (m, details) = shared(&p, json!({"group": 2}), None);
    assert_eq!(writers(&m), 15);
    assert_eq!(details["kv_elements_per_token_before"], json!(30 * 2 * 3 * 64));
    assert_eq!(details["kv_elements_per_token_after"], json!(15 * 2 * 3 * 64));
    // The readers' K/V projections are gone; the writers' stay.
    assert!(m.module.param_by_name("blk.1.attn_k.weight").is_none());
    assert!(m.module.param_by_name("blk.1.attn_v.weight").is_none());
    assert!(m.module.param_by_name("blk.2.attn_k.weight").is_some());
    // An explicit plan naming the same pairs gives the same module.
    let explicit: BTreeMap<String, usize> = (0..15).map(|g| ((2 * g + 1).to_string(), 2 * g)).collect();
    let (e, _) = shared(&p, json!({"share": explicit}), None);
    assert_eq!(kiln_ir::print(&e.module), kiln_ir::print(&m.module));
    // The CPU backend runs shared slots exactly as the reference does.
    let prompt = m.tokenizer.encode("The capital of France is", true).unwrap();
    let run = |model: &Model| {
        let mut s = model.session_with(prompt.len() + 4, 2, Numerics::Ggml).unwrap();
        s.forward(&prompt, Logits::All).unwrap()
    };
    let mut on_cpu = shared(&p, json!({"group": 2}), None).0;
    on_cpu.backend = "cpu".into();
    let (a, b) = (run(&m), run(&on_cpu));
    assert!(a.iter().map(|v| v.to_bits()).eq(b.iter().map(|v| v.to_bits())), "cpu differs from the reference");
    let plain = Model::load(&p).unwrap();
    assert_ne!(run(&plain), a, "sharing changes the model");
}

#[test]
fn a_budget_plan_stays_within_its_budget() {
    let Some(dir) = common::model("glassllm-en-hf") else { return };
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/text/calib-excerpt.txt")).unwrap();
    let imported = kiln_frontend::import(&dir).unwrap();
    let measure = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| -> Result<f64, String> {
        let model = Model::from_parts(&dir, m.clone(), w.clone(), imported.tokenizer_json.as_bytes(), None)
            .map_err(|e| e.to_string())?;
        Ok(kiln_runtime::ppl::perplexity(&model, &text, 64, 2, 2, &mut |_, _, _| {}).map_err(|e| e.to_string())?.ppl)
    };
    let base = shared(&dir, json!({"share": {}}), None).0;
    let n = writers(&base);
    assert!(n >= 2);
    for budget in [0.0, 0.02, 10.0] {
        let (m, d) = shared(&dir, json!({"max_ppl_increase": budget}), Some(&measure));
        let (before, after) =
            (d["calibration_ppl_before"].as_f64().unwrap(), d["calibration_ppl_after"].as_f64().unwrap());
        assert!(after <= before * (1.0 + budget) + 1e-9, "budget {budget}: {before} -> {after}");
        let shares = d["share"].as_object().unwrap().len();
        assert_eq!(writers(&m) + shares, n);
        if budget >= 10.0 {
            assert_eq!(writers(&m), 1, "an unlimited budget shares every layer's cache");
        }
    }
    // Without calibration text a budget cannot be planned, and says so.
    let imported = kiln_frontend::import(&dir).unwrap();
    let (mut m, mut w) = (imported.module, imported.weights);
    let err = kiln_passes::run_pipeline(
        &mut m,
        &mut w,
        &[("kv_share".into(), json!({"max_ppl_increase": "3%"}))],
        "laptop",
        None,
        &common::root(),
        None,
        &mut |_| {},
    )
    .expect_err("needs calibration")
    .to_string();
    assert!(err.contains("calibration"), "{err}");
}
