//! The common differential test body on the fixed-point backend, twice:
//!
//! 1. With every weight matrix first rounded to what the lowering stores (int8 per row):
//!    the reference interpreter then computes in f32 on exactly the weights the integer
//!    build has, so the difference is the integer arithmetic alone (16-bit activation
//!    mantissas, integer rsqrt, exp, sigmoid, RoPE tables) — a tight budget.
//! 2. With the cases' own weights: the whole fixed-point build against the float model,
//!    int8 rounding included — the budget a user sees.
//!
//! Cases with ops fixed-point builds do not have are refused by name, never run wrong.

use std::sync::Arc;

use kiln_backends::conformance::{Case, cases, run_cases};
use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Backend, Logits, SessionOptions, WeightSource};
use kiln_fixed::FixedBackend;
use kiln_ir::{DType, Module, Op, ParamId, verify};

/// Integer arithmetic alone (case 1): max |Δ| / max |logit|.
const ARITH_BUDGET: f32 = 1e-3;
/// One op with int8 weights (case 2): each weight rounds by up to 1/254 of its row's
/// largest, about 0.6% of a dot product.
const OP_BUDGET: f32 = 1.5e-2;
/// Whole random multi-layer models and sharp attention (case 2), where rounding compounds
/// or a softmax over large scores amplifies it.
const MODEL_BUDGET: f32 = 1e-1;
/// An 8-bit KV cache (`q8_0` slots): the reference rounds K/V to ggml blocks of 32 after a
/// Hadamard rotation, the fixed-point build to 8-bit mantissas per position and head; the
/// two roundings differ by about 1% of a value, which the cases' sharp softmax (scores in
/// the tens) amplifies. On glassllm the 8-bit cache costs +0.06% perplexity.
const KV8_ARITH_BUDGET: f32 = 6e-2;
const KV8_MODEL_BUDGET: f32 = 2e-1;
/// A 4-bit KV cache (`q4_0` slots) is not compared with the reference's: see
/// [`four_bit_kv_cache_is_as_close_to_the_float_model_as_the_reference_q4_0_cache`].
const KV4_RATIO_BUDGET: f32 = 1.5;

/// `c` with every matrix the lowering requantizes replaced by its int8-per-row rounding, in
/// f32 (Q4_0 matrices the lowering keeps exactly stay as they are).
fn with_int8_weights(mut c: Case) -> Case {
    let mut mats: Vec<ParamId> = c
        .module
        .insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Embed { table, .. } => Some(*table),
            Op::MatMul { w, .. } => Some(*w),
            _ => None,
        })
        .collect();
    mats.sort();
    mats.dedup();
    for p in mats {
        let ty = c.module.params[p.index()].ty.clone();
        let dims = ty.fixed_dims().unwrap();
        let cols = dims[1] as usize;
        if ty.dtype == DType::Q4_0 && cols.is_multiple_of(32) {
            continue; // kept exactly (packed 4-bit groups)
        }
        let row_bytes = ty.dtype.row_bytes(cols as u64).unwrap() as usize;
        let mut out = Vec::new();
        for row in c.weights[p.index()].chunks(row_bytes) {
            let mut w = vec![0f32; cols];
            kiln_quant::dequantize_row(ty.dtype, row, &mut w).unwrap();
            let amax = w.iter().fold(0f64, |m, x| m.max((*x as f64).abs()));
            let scale = amax / 127.0;
            for x in &w {
                let q = if scale > 0.0 { ((*x as f64) / scale).round().clamp(-127.0, 127.0) } else { 0.0 };
                out.extend_from_slice(&((q * scale) as f32).to_le_bytes());
            }
        }
        c.module.params[p.index()].ty.dtype = DType::F32;
        c.weights[p.index()] = out;
    }
    c
}

fn check(cases: Vec<Case>, budget: impl Fn(&str) -> f32) {
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|c| !c.name.contains("q4_0 KV cache"))
        .map(|mut c| {
            c.budget = c.budget.max(budget(&c.name));
            c
        })
        .collect();
    let outcomes = run_cases(&FixedBackend, cases);
    let mut report = String::new();
    let (mut failed, mut ran) = (0, 0);
    for o in &outcomes {
        let line = match &o.result {
            Ok(e) => {
                ran += 1;
                let ok = *e <= o.budget;
                failed += !ok as usize;
                format!("{:<70} rel err {e:.2e} (budget {:.0e}){}", o.name, o.budget, if ok { "" } else { "  OVER" })
            }
            Err(e) if e.starts_with("unsupported") => {
                // FP8 is a float format: integer-only builds keep q8_0/q4_0 caches instead;
                // attention sinks wait for windowed (ring) fixed-point caches.
                let expected =
                    ["layer_norm", "softmax", "steer", "f8_e4m3", "attention sinks"].iter().any(|w| e.contains(w));
                failed += !expected as usize;
                format!("{:<70} {e}{}", o.name, if expected { "" } else { "  UNEXPECTED" })
            }
            Err(e) => {
                failed += 1;
                format!("{:<70} ERROR {e}", o.name)
            }
        };
        report += &line;
        report.push('\n');
    }
    println!("{report}");
    assert!(ran > 40, "only {ran} cases ran:\n{report}");
    assert_eq!(failed, 0, "\n{report}");
}

#[test]
fn integer_arithmetic_matches_the_reference_on_the_same_weights() {
    check(cases().into_iter().map(with_int8_weights).collect(), |name| {
        if name.contains("q8_0 KV cache") { KV8_ARITH_BUDGET } else { ARITH_BUDGET }
    });
}

#[test]
fn fixed_point_build_tracks_the_float_model() {
    check(cases(), |name| {
        if name.contains("q8_0 KV cache") {
            KV8_MODEL_BUDGET
        } else if name.contains("llama") || name.contains("attention") {
            MODEL_BUDGET
        } else {
            OP_BUDGET
        }
    });
}

struct Weights(Vec<Vec<u8>>);

impl WeightSource for Weights {
    fn bytes(&self, p: ParamId) -> &[u8] {
        &self.0[p.index()]
    }
}

/// Every logit of the case's calls on `backend`.
fn logits(backend: &dyn Backend, module: &Module, weights: &[Vec<u8>], calls: &[(Vec<u32>, Logits)]) -> Vec<f32> {
    let module = Arc::new(verify(module.clone()).unwrap());
    let opts = SessionOptions { max_context: 128, threads: 2, ..Default::default() };
    let mut s = backend.prepare(module, Arc::new(Weights(weights.to_vec())), &opts).unwrap();
    calls.iter().flat_map(|(t, mode)| s.forward(t, *mode).unwrap()).collect()
}

/// A 4-bit KV cache rounds K and V by more than the case's sharp softmax (scores in the
/// tens) tolerates: the reference's own q4_0 cache moves its logits by about 60% of their
/// range from the float model. The fixed-point build rounds differently (4-bit mantissas
/// with a power-of-two shift per 32 channels, no rotation), so its 4-bit result is not
/// compared with the reference's; instead its distance from the float model (f32 cache)
/// must stay within 1.5× the reference q4_0 cache's own. (On glassllm the 4-bit cache
/// costs −0.36% perplexity, mean KL 0.042: see `tests/fixed.rs`.)
#[test]
fn four_bit_kv_cache_is_as_close_to_the_float_model_as_the_reference_q4_0_cache() {
    let rel = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / b.iter().fold(0f32, |m, v| m.max(v.abs()))
    };
    let mut seen = 0;
    for c in cases().into_iter().filter(|c| c.name.contains("q4_0 KV cache")) {
        let mut float = c.module.clone();
        for i in &mut float.insts {
            if let Op::Attention { attrs, .. } = &mut i.op {
                attrs.kv_dtype = DType::F32;
            }
        }
        let want = logits(&ReferenceBackend, &float, &c.weights, &c.calls);
        let reference4 = rel(&logits(&ReferenceBackend, &c.module, &c.weights, &c.calls), &want);
        let fixed4 = rel(&logits(&FixedBackend, &c.module, &c.weights, &c.calls), &want);
        let fixed16 = rel(&logits(&FixedBackend, &float, &c.weights, &c.calls), &want);
        println!(
            "{}: from the float model: reference q4_0 {reference4:.3}, fixed 4-bit {fixed4:.3}, fixed 16-bit {fixed16:.3}",
            c.name
        );
        assert!(reference4 > 0.05, "the case no longer exercises 4-bit rounding ({reference4})");
        assert!(fixed4 <= KV4_RATIO_BUDGET * reference4, "{}: {fixed4} vs the reference's {reference4}", c.name);
        seen += 1;
    }
    assert!(seen > 0);
}
