//! Print/parse round trips of the textual IR, including property tests.

mod common;

use kiln_ir::*;
use proptest::prelude::*;

#[test]
fn tiny_model_round_trips_and_verifies() {
    let m = common::tiny_llama(2);
    check(&m).unwrap();
    let text = print(&m);
    let back = parse(&text).unwrap();
    assert_eq!(back, m);
    assert_eq!(print(&back), text);
    verify(back).unwrap();
}

#[test]
fn value_names_are_renumbered_canonically() {
    let text = "kiln-ir 1\nmodule \"x\"\nparam @w : f32[8, 4]\n%tok = tokens : i32[T]\n\
                %e = embed @w, %tok : f32[T, 4]  ; comment\n\noutput %e\n";
    let m = parse(text).unwrap();
    let printed = print(&m);
    assert!(printed.contains("%1 = embed @w, %0 : f32[T, 4]"), "{printed}");
    assert_eq!(print(&parse(&printed).unwrap()), printed);
}

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z][a-z0-9_.]{0,12}", "[ -~]{1,10}", "\\PC{1,6}"]
}

fn arb_meta() -> impl Strategy<Value = Meta> {
    prop_oneof![
        any::<i64>().prop_map(Meta::Int),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Meta::Float),
        "\\PC{0,12}".prop_map(Meta::Str),
        any::<bool>().prop_map(Meta::Bool),
    ]
}

proptest! {
    #[test]
    fn random_modules_round_trip(
        name in arb_name(),
        meta in proptest::collection::btree_map(arb_name(), arb_meta(), 0..6),
        width in 1u64..8,
        ops in proptest::collection::vec((0u8..8, any::<f32>(), 1u64..4), 0..20),
    ) {
        let d = width * 32;
        let mut m = Module::new(name);
        m.meta = meta;
        let emb = m.add_param("emb.weight", TensorType::fixed(DType::Q4_1, &[50, d])).unwrap();
        let nw = m.add_param("n w", TensorType::fixed(DType::F32, &[d])).unwrap();
        let t = m.push(Op::Tokens).unwrap();
        let mut x = m.push(Op::Embed { table: emb, ids: t }).unwrap();
        for (kind, f, g) in ops {
            let f = if f.is_finite() { f } else { 0.5 };
            x = match kind {
                0 => m.push(Op::Scale { x, s: f }).unwrap(),
                1 => m.push(Op::RmsNorm { x, weight: Some(nw), eps: f.abs(), group: 0 }).unwrap(),
                2 => m.push(Op::RmsNorm { x, weight: None, eps: 1e-6, group: 32 / (1 << (g - 1)) }).unwrap(),
                3 => m.push(Op::Act { x, kind: Activation::GeluTanh }).unwrap(),
                4 => m.push(Op::Add { a: x, b: x }).unwrap(),
                6 | 7 => {
                    let mode = if kind == 6 { SteerMode::Add } else { SteerMode::Project };
                    let attrs = SteerAttrs { mode, strength: f, name: format!("s{g}_x") };
                    m.push(Op::Steer { x, dir: nw, attrs }).unwrap()
                }
                _ => m.push(Op::Rope { x, attrs: RopeAttrs { head_dim: 32, rot_dims: 16, theta: f.abs() + 1.0, freq_scale: 1.0, layout: RopeLayout::Interleaved } }).unwrap(),
            };
        }
        let out = m.push(Op::MatMul { x, w: emb, bias: None }).unwrap();
        m.output = Some(out);
        let text = print(&m);
        let back = parse(&text).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(print(&back), text);
        prop_assert!(check(&back).is_ok());
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,200}") {
        let _ = parse(&s);
    }

    #[test]
    fn parser_never_panics_on_mutated_modules(cut in 0usize..2000, junk in "[%@=:,\\[\\]a-z0-9 \n\"]{0,8}") {
        let text = print(&common::tiny_llama(1));
        let cut = cut.min(text.len());
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let mutated = format!("{}{}{}", &text[..cut], junk, &text[cut..]);
        if let Ok(m) = parse(&mutated) { let _ = check(&m); }
    }
}

/// A module using every hyper-connection / MoE / compressed-attention op, with the given attributes.
#[allow(clippy::too_many_arguments)]
fn sparse_module(
    scale: f32,
    eps: f32,
    theta: f32,
    yarn: Option<f32>,
    window: u64,
    topk: u64,
    scoring: Scoring,
    hash: bool,
) -> Module {
    let f = |m: &mut Module, n: &str, s: &[u64]| m.add_param(n, TensorType::fixed(DType::F32, s)).unwrap();
    let mut m = Module::new("sparse");
    let emb = f(&mut m, "emb", &[10, 32]);
    let hc_fn = f(&mut m, "hc_fn", &[8, 64]);
    let (base, sc) = (f(&mut m, "hc_base", &[8]), f(&mut m, "hc_scale", &[3]));
    let (wq, wkv, sink) = (f(&mut m, "wq", &[64, 32]), f(&mut m, "wkv", &[32, 32]), f(&mut m, "sink", &[2]));
    let (ck, cg, cape, cn) =
        (f(&mut m, "ck", &[32, 32]), f(&mut m, "cg", &[32, 32]), f(&mut m, "cape", &[4, 32]), f(&mut m, "cn", &[32]));
    let (ik, ig, iape, inorm) =
        (f(&mut m, "ik", &[32, 32]), f(&mut m, "ig", &[32, 32]), f(&mut m, "iape", &[4, 32]), f(&mut m, "in", &[16]));
    let (iq, iw) = (f(&mut m, "iq", &[32, 32]), f(&mut m, "iw", &[2, 32]));
    let (woa, wob) = (f(&mut m, "woa", &[16, 32]), f(&mut m, "wob", &[32, 16]));
    let router = f(&mut m, "router", &[4, 32]);
    let table = f(&mut m, "table", &[10, 2]);
    let bias = f(&mut m, "bias", &[4]);
    let (eg, eu, ed) = (f(&mut m, "eg", &[4, 8, 32]), f(&mut m, "eu", &[4, 8, 32]), f(&mut m, "ed", &[4, 32, 8]));
    let head = f(&mut m, "head", &[10, 16]);
    let t = m.push(Op::Tokens).unwrap();
    let e = m.push(Op::Embed { table: emb, ids: t }).unwrap();
    let x = m.push(Op::Repeat { x: e, times: 2 }).unwrap();
    let fx = m.push(Op::MatMul { x, w: hc_fn, bias: None }).unwrap();
    let c = m.push(Op::HcCoeffs { f: fx, base, scale: sc, streams: 2, iters: 20, eps }).unwrap();
    let h = m.push(Op::HcPre { x, c, streams: 2 }).unwrap();
    let mm = |m: &mut Module, x, w| m.push(Op::MatMul { x, w, bias: None }).unwrap();
    let (q, kv) = (mm(&mut m, h, wq), mm(&mut m, h, wkv));
    let comp = CompressorOperands { kv: mm(&mut m, h, ck), gate: mm(&mut m, h, cg), ape: cape, norm: cn };
    let keys = CompressorOperands { kv: mm(&mut m, h, ik), gate: mm(&mut m, h, ig), ape: iape, norm: inorm };
    let indexer = (topk > 0).then(|| IndexerOperands { q: mm(&mut m, h, iq), w: mm(&mut m, h, iw), keys });
    let (yarn_factor, yarn_orig_ctx, yarn_beta_fast, yarn_beta_slow) = match yarn {
        Some(y) => (y, 4096, 32.0, 1.0),
        None => (1.0, 0, 0.0, 0.0),
    };
    let attrs = CompressedAttentionAttrs {
        cache: 0,
        heads: 2,
        head_dim: 32,
        scale,
        window,
        ratio: 4,
        topk,
        index_heads: if topk > 0 { 2 } else { 0 },
        index_dim: if topk > 0 { 16 } else { 0 },
        eps,
        rope: RotaryAttrs { rot_dims: 8, theta, yarn_factor, yarn_orig_ctx, yarn_beta_fast, yarn_beta_slow },
    };
    let o = m.push(Op::CompressedAttention { q, kv, sink, comp: Some(comp), indexer, attrs }).unwrap();
    let y = m.push(Op::GroupedMatMul { x: o, w: woa, groups: 2 }).unwrap();
    let y = mm(&mut m, y, wob);
    let x = m.push(Op::HcPost { x, y, c, streams: 2 }).unwrap();
    let h = m.push(Op::HcPre { x, c, streams: 2 }).unwrap();
    let logits = mm(&mut m, h, router);
    let (ids, bias, table) = if hash { (Some(t), None, Some(table)) } else { (None, Some(bias), None) };
    let r =
        m.push(Op::MoeRoute { logits, ids, bias, table, attrs: MoeRouteAttrs { scoring, top_k: 2, scale } }).unwrap();
    let y = m.push(Op::Moe { x: h, w: r, gate: eg, up: eu, down: ed, shared: None, limit: eps }).unwrap();
    let y = m.push(Op::GroupedMatMul { x: y, w: woa, groups: 1 }).unwrap();
    let out = mm(&mut m, y, head);
    m.output = Some(out);
    m
}

proptest! {
    #[test]
    fn sparse_ops_round_trip(
        scale in any::<f32>().prop_filter("finite", |x| x.is_finite()),
        eps in 0f32..1.0,
        theta in 2f32..1e7,
        yarn in proptest::option::of(1.5f32..64.0),
        window in 1u64..300,
        topk in 0u64..9,
        scoring in 0usize..3,
        hash in any::<bool>(),
    ) {
        let scoring = [Scoring::SqrtSoftplus, Scoring::Sigmoid, Scoring::Softmax][scoring];
        let m = sparse_module(scale, eps, theta, yarn, window, topk, scoring, hash);
        let text = print(&m);
        let back = parse(&text).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(print(&back), text);
        prop_assert!(check(&back).is_ok(), "{:?}", check(&back));
    }
}
