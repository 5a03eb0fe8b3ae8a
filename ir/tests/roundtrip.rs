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
