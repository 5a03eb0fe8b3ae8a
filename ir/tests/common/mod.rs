//! Shared test helper: a tiny two-layer llama-style module built through the builder API.

use kiln_ir::*;

pub fn tiny_llama(layers: usize) -> Module {
    let (d, h, kvh, hd, ff, vocab) = (64u64, 4u64, 2u64, 16u64, 128u64, 100u64);
    let mut m = Module::new("tiny");
    m.set_meta("arch", Meta::Str("llama".into()));
    m.set_meta("context_length", Meta::Int(256));
    m.set_meta("rope.theta", Meta::Float(10000.0));
    let emb = m.add_param("token_embd.weight", TensorType::fixed(DType::Q8_0, &[vocab, d])).unwrap();
    let tok = m.push(Op::Tokens).unwrap();
    let mut x = m.push(Op::Embed { table: emb, ids: tok }).unwrap();
    for l in 0..layers {
        let p = |m: &mut Module, n: &str, dt: DType, s: &[u64]| {
            m.add_param(format!("blk.{l}.{n}.weight"), TensorType::fixed(dt, s)).unwrap()
        };
        let an = p(&mut m, "attn_norm", DType::F32, &[d]);
        let wq = p(&mut m, "attn_q", DType::Q4_0, &[h * hd, d]);
        let wk = p(&mut m, "attn_k", DType::Q4_0, &[kvh * hd, d]);
        let wv = p(&mut m, "attn_v", DType::F16, &[kvh * hd, d]);
        let wo = p(&mut m, "attn_output", DType::F32, &[d, h * hd]);
        let fnrm = p(&mut m, "ffn_norm", DType::F32, &[d]);
        let wg = p(&mut m, "ffn_gate", DType::Q4_1, &[ff, d]);
        let wu = p(&mut m, "ffn_up", DType::Q4_1, &[ff, d]);
        let wd = p(&mut m, "ffn_down", DType::BF16, &[d, ff]);
        let n = m.push(Op::RmsNorm { x, weight: Some(an), eps: 1e-5, group: 0 }).unwrap();
        let q = m.push(Op::MatMul { x: n, w: wq, bias: None }).unwrap();
        let k = m.push(Op::MatMul { x: n, w: wk, bias: None }).unwrap();
        let v = m.push(Op::MatMul { x: n, w: wv, bias: None }).unwrap();
        let rope = RopeAttrs { head_dim: hd, rot_dims: hd, theta: 10000.0, freq_scale: 1.0, layout: RopeLayout::Neox };
        let q = m.push(Op::Rope { x: q, attrs: rope.clone() }).unwrap();
        let k = m.push(Op::Rope { x: k, attrs: rope }).unwrap();
        let attrs = AttentionAttrs {
            cache: l as u32,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 0.25,
            window: if l % 2 == 1 { 32 } else { 0 },
            sink: 0,
            softcap: 0.0,
            kv_dtype: DType::F32,
        };
        let a = m.push(Op::Attention { q, k: Some(k), v: Some(v), attrs }).unwrap();
        let o = m.push(Op::MatMul { x: a, w: wo, bias: None }).unwrap();
        x = m.push(Op::Add { a: x, b: o }).unwrap();
        let n = m.push(Op::RmsNorm { x, weight: Some(fnrm), eps: 1e-5, group: 0 }).unwrap();
        let g = m.push(Op::MatMul { x: n, w: wg, bias: None }).unwrap();
        let u = m.push(Op::MatMul { x: n, w: wu, bias: None }).unwrap();
        let y = m.push(Op::Glu { gate: g, up: u, kind: Activation::Silu }).unwrap();
        let y = m.push(Op::MatMul { x: y, w: wd, bias: None }).unwrap();
        x = m.push(Op::Add { a: x, b: y }).unwrap();
    }
    let on = m.add_param("output_norm.weight", TensorType::fixed(DType::F32, &[d])).unwrap();
    let x = m.push(Op::RmsNorm { x, weight: Some(on), eps: 1e-5, group: 0 }).unwrap();
    let logits = m.push(Op::MatMul { x, w: emb, bias: None }).unwrap();
    m.output = Some(logits);
    m
}
