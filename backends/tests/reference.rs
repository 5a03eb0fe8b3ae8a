//! Tests of the reference interpreter: hand-checked cases per op, KV-cache
//! consistency (one forward vs token by token vs chunks, truncate), shared KV
//! slots, and input errors.

use std::sync::Arc;
use std::time::Instant;

use kiln_backends::quant::{dequantize_row, quantize_row};
use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Backend, BackendError, Logits, Session, SessionOptions, WeightSource};
use kiln_ir::*;

// ---------------------------------------------------------------- helpers

/// Owned weights, one byte vector per parameter.
struct Weights(Vec<Vec<u8>>);

impl WeightSource for Weights {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.get(p.index()).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Builds a module and its weights together.
struct Builder {
    m: Module,
    bytes: Vec<Vec<u8>>,
}

impl Builder {
    fn new() -> Self {
        Builder { m: Module::new("test"), bytes: vec![] }
    }

    /// Declares a parameter and stores `values` quantized to `dtype`.
    fn param(&mut self, name: &str, dtype: DType, shape: &[u64], values: &[f32]) -> ParamId {
        let ty = TensorType::fixed(dtype, shape);
        let p = self.m.add_param(name, ty.clone()).unwrap();
        let last = *shape.last().unwrap() as usize;
        let mut bytes = vec![0u8; ty.storage_bytes().unwrap() as usize];
        let rb = bytes.len() / (values.len() / last);
        for (src, dst) in values.chunks(last).zip(bytes.chunks_mut(rb)) {
            quantize_row(dtype, src, dst).unwrap();
        }
        self.bytes.push(bytes);
        p
    }

    fn push(&mut self, op: Op) -> ValueId {
        self.m.push(op).unwrap()
    }

    /// An f32 embedding table with these rows, looked up at the token ids.
    fn input(&mut self, name: &str, ids: ValueId, rows: &[Vec<f32>]) -> ValueId {
        let d = rows[0].len() as u64;
        let flat: Vec<f32> = rows.concat();
        let t = self.param(name, DType::F32, &[rows.len() as u64, d], &flat);
        self.push(Op::Embed { table: t, ids })
    }

    fn session(mut self, out: ValueId, max_context: usize) -> Box<dyn Session> {
        self.m.output = Some(out);
        let module = Arc::new(verify(self.m).unwrap());
        let weights: Arc<dyn WeightSource> = Arc::new(Weights(self.bytes));
        let options = SessionOptions { max_context, threads: 2, ..Default::default() };
        ReferenceBackend.prepare(module, weights, &options).unwrap()
    }
}

fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs();
        assert!(err <= tol * (1.0 + w.abs()), "element {i}: got {g}, want {w} (all: {got:?} vs {want:?})");
    }
}

/// Relative closeness of two logit vectors (max abs diff over max abs value).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

// ---------------------------------------------------------------- per-op cases

#[test]
fn backend_name_and_support() {
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let x = b.input("x", ids, &[vec![1.0, 2.0]]);
    b.m.output = Some(x);
    let module = verify(b.m).unwrap();
    assert_eq!(ReferenceBackend.name(), "reference");
    assert!(module.insts.iter().all(|i| ReferenceBackend.supports(&module, &i.op)));
    assert_eq!(kiln_backends::first_unsupported(&ReferenceBackend, &module), None);
}

#[test]
fn embed_dequantizes_rows_of_any_dtype() {
    let mut rng = Rng(7);
    let rows = rng.vec(3 * 64, 1.0);
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_1, DType::Q5_0] {
        let mut b = Builder::new();
        let ids = b.push(Op::Tokens);
        let t = b.param("t", dtype, &[3, 64], &rows);
        let row_bytes = b.bytes[0].len() / 3;
        let table = b.bytes[0].clone();
        let x = b.push(Op::Embed { table: t, ids });
        let mut s = b.session(x, 16);
        let got = s.forward(&[2, 0], Logits::All).unwrap();
        let mut want = vec![0.0f32; 128];
        dequantize_row(dtype, &table[2 * row_bytes..3 * row_bytes], &mut want[..64]).unwrap();
        dequantize_row(dtype, &table[..row_bytes], &mut want[64..]).unwrap();
        assert_eq!(got, want, "{dtype}");
    }
}

#[test]
fn rms_norm_known_numbers() {
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let x = b.input("x", ids, &[vec![1.0, 2.0, 3.0, 4.0]]);
    let w = b.param("w", DType::F32, &[4], &[1.0, 1.0, 2.0, 0.5]);
    let wg = b.param("wg", DType::F32, &[2], &[1.0, 3.0]);
    let n = b.push(Op::RmsNorm { x, weight: Some(w), eps: 0.0, group: 0 });
    let g = b.push(Op::RmsNorm { x, weight: Some(wg), eps: 0.5, group: 2 });
    let plain = b.push(Op::RmsNorm { x, weight: None, eps: 0.0, group: 0 });
    let a = b.push(Op::Add { a: n, b: g });
    let out = b.push(Op::Add { a, b: plain });
    let mut s = b.session(out, 4);
    let got = s.forward(&[0], Logits::All).unwrap();
    let r = 1.0 / 7.5f64.sqrt(); // mean of squares 30/4
    let g1 = 1.0 / (2.5f64 + 0.5).sqrt(); // (1+4)/2 + eps
    let g2 = 1.0 / (12.5f64 + 0.5).sqrt(); // (9+16)/2 + eps
    let want = [
        1.0 * r * 1.0 + 1.0 * g1 + 1.0 * r,
        2.0 * r * 1.0 + 2.0 * g1 * 3.0 + 2.0 * r,
        3.0 * r * 2.0 + 3.0 * g2 + 3.0 * r,
        4.0 * r * 0.5 + 4.0 * g2 * 3.0 + 4.0 * r,
    ];
    assert_close(&got, &want, 1e-6);
}

#[test]
fn layer_norm_known_numbers() {
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let x = b.input("x", ids, &[vec![1.0, 2.0, 3.0, 4.0]]);
    let w = b.param("w", DType::F32, &[4], &[1.0, 2.0, 1.0, 1.0]);
    let bias = b.param("b", DType::F32, &[4], &[0.0, 0.0, 10.0, 0.0]);
    let out = b.push(Op::LayerNorm { x, weight: Some(w), bias: Some(bias), eps: 0.0 });
    let mut s = b.session(out, 4);
    let got = s.forward(&[0], Logits::All).unwrap();
    let sd = 1.25f64.sqrt(); // mean 2.5, variance (2.25+0.25+0.25+2.25)/4
    let want = [-1.5 / sd, 2.0 * -0.5 / sd, 0.5 / sd + 10.0, 1.5 / sd];
    assert_close(&got, &want, 1e-6);
}

/// Builds one op from two inputs.
type BuildOp = Box<dyn Fn(&mut Builder, ValueId, ValueId) -> ValueId>;
/// The expected value of one element from the two inputs' elements.
type Expected = Box<dyn Fn(f64, f64) -> f64>;

#[test]
fn elementwise_ops_known_numbers() {
    let xs = vec![-2.0f32, -0.5, 0.0, 1.5];
    let ys = vec![3.0f32, 0.25, -1.0, 2.0];
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
    let cases: Vec<(&str, BuildOp, Expected)> = vec![
        ("add", Box::new(|b, x, y| b.push(Op::Add { a: x, b: y })), Box::new(|x, y| x + y)),
        ("mul", Box::new(|b, x, y| b.push(Op::Mul { a: x, b: y })), Box::new(|x, y| x * y)),
        ("scale", Box::new(|b, x, _| b.push(Op::Scale { x, s: -0.75 })), Box::new(|x, _| -0.75 * x)),
        ("silu", Box::new(|b, x, _| b.push(Op::Act { x, kind: Activation::Silu })), Box::new(move |x, _| silu(x))),
        ("gelu", Box::new(|b, x, _| b.push(Op::Act { x, kind: Activation::GeluTanh })), Box::new(move |x, _| gelu(x))),
        (
            "swiglu",
            Box::new(|b, x, y| b.push(Op::Glu { gate: x, up: y, kind: Activation::Silu })),
            Box::new(move |x, y| silu(x) * y),
        ),
        (
            "geglu",
            Box::new(|b, x, y| b.push(Op::Glu { gate: x, up: y, kind: Activation::GeluTanh })),
            Box::new(move |x, y| gelu(x) * y),
        ),
    ];
    for (name, build, f) in cases {
        let mut b = Builder::new();
        let ids = b.push(Op::Tokens);
        let x = b.input("x", ids, std::slice::from_ref(&xs));
        let y = b.input("y", ids, std::slice::from_ref(&ys));
        let out = build(&mut b, x, y);
        let mut s = b.session(out, 4);
        let got = s.forward(&[0], Logits::All).unwrap();
        let want: Vec<f64> = xs.iter().zip(&ys).map(|(&x, &y)| f(x.into(), y.into())).collect();
        println!("{name}");
        assert_close(&got, &want, 1e-6);
    }
}

#[test]
fn softmax_known_numbers() {
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let x = b.input("x", ids, &[vec![1.0, 2.0, 3.0], vec![1000.0, 1000.0, -1000.0]]);
    let out = b.push(Op::Softmax { x });
    let mut s = b.session(out, 4);
    let got = s.forward(&[0, 1], Logits::All).unwrap();
    let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
    let want = [1f64.exp() / z, 2f64.exp() / z, 3f64.exp() / z, 0.5, 0.5, 0.0];
    assert_close(&got, &want, 1e-6);
}

#[test]
fn matmul_with_bias_and_quantized_weights() {
    let mut rng = Rng(3);
    let (n, k) = (5usize, 64usize);
    let xs: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(k, 1.0)).collect();
    let wv = rng.vec(n * k, 0.5);
    let bias = rng.vec(n, 1.0);
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_1] {
        let mut b = Builder::new();
        let ids = b.push(Op::Tokens);
        let x = b.input("x", ids, &xs);
        let w = b.param("w", dtype, &[n as u64, k as u64], &wv);
        let wbytes = b.bytes[1].clone();
        let bp = b.param("b", DType::F32, &[n as u64], &bias);
        let out = b.push(Op::MatMul { x, w, bias: Some(bp) });
        let mut s = b.session(out, 8);
        // Several tokens at once (dequantize-per-row path) ...
        let all = s.forward(&[0, 1, 2], Logits::All).unwrap();
        // ... and one at a time (dot_row path): bit-identical.
        s.truncate(0);
        let mut one = vec![];
        for t in 0..3 {
            one.extend(s.forward(&[t], Logits::Last).unwrap());
        }
        assert_eq!(all, one, "{dtype}");
        let rb = wbytes.len() / n;
        let mut want = vec![];
        for x in &xs {
            for o in 0..n {
                let mut row = vec![0.0f32; k];
                dequantize_row(dtype, &wbytes[o * rb..(o + 1) * rb], &mut row).unwrap();
                let d: f64 = row.iter().zip(x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                want.push(d + f64::from(bias[o]));
            }
        }
        assert_close(&all, &want, 1e-5);
    }
}

#[test]
fn matmul_large_blocks_match_naive() {
    // Enough rows and tokens for several parallel tasks and a ragged last block.
    let mut rng = Rng(11);
    let (n, k, t) = (203usize, 96usize, 7usize);
    let xs: Vec<Vec<f32>> = (0..t).map(|_| rng.vec(k, 1.0)).collect();
    let wv = rng.vec(n * k, 1.0);
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let x = b.input("x", ids, &xs);
    let w = b.param("w", DType::F32, &[n as u64, k as u64], &wv);
    let out = b.push(Op::MatMul { x, w, bias: None });
    let mut s = b.session(out, 16);
    let tokens: Vec<u32> = (0..t as u32).collect();
    let got = s.forward(&tokens, Logits::All).unwrap();
    let mut want = vec![];
    for x in &xs {
        for o in 0..n {
            want.push(wv[o * k..(o + 1) * k].iter().zip(x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum());
        }
    }
    assert_close(&got, &want, 1e-5);
    let last = s.forward(&[3], Logits::Last).unwrap();
    assert_eq!(last, got[3 * n..4 * n]);
}

/// RoPE reference in f64: pair i turns by p·fs·theta^(−2i/rot).
fn rope_ref(x: &[f32], p: usize, hd: usize, rot: usize, theta: f64, fs: f64, neox: bool) -> Vec<f64> {
    let mut y: Vec<f64> = x.iter().map(|&v| v.into()).collect();
    for head in y.chunks_mut(hd) {
        for i in 0..rot / 2 {
            let a = p as f64 * fs * theta.powf(-2.0 * i as f64 / rot as f64);
            let (i0, i1) = if neox { (i, i + rot / 2) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[i0], head[i1]);
            head[i0] = x0 * a.cos() - x1 * a.sin();
            head[i1] = x0 * a.sin() + x1 * a.cos();
        }
    }
    y
}

#[test]
fn rope_known_angles_both_layouts() {
    // theta = 100, rot = 4: pair 0 turns by p·fs radians, pair 1 by 0.1·p·fs.
    let row = vec![1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.25, 2.0];
    for (layout, neox) in [(RopeLayout::Interleaved, false), (RopeLayout::Neox, true)] {
        for (rot, fs) in [(4u64, 1.0f32), (4, 0.5), (2, 1.0)] {
            let mut b = Builder::new();
            let ids = b.push(Op::Tokens);
            let x = b.input("x", ids, std::slice::from_ref(&row));
            let attrs = RopeAttrs { head_dim: 4, rot_dims: rot, theta: 100.0, freq_scale: fs, layout };
            let out = b.push(Op::Rope { x, attrs });
            let mut s = b.session(out, 8);
            let got = s.forward(&[0, 0, 0], Logits::All).unwrap();
            for p in 0..3 {
                let want = rope_ref(&row, p, 4, rot as usize, 100.0, fs.into(), neox);
                assert_close(&got[p * 8..(p + 1) * 8], &want, 1e-6);
            }
            // Position 2 by hand for the full rotation, interleaved: (1,2) by 2 rad, (3,4) by 0.2 rad.
            if rot == 4 && fs == 1.0 && !neox {
                let (c, s2) = (2f64.cos(), 2f64.sin());
                let (c2, s3) = (0.2f64.cos(), 0.2f64.sin());
                let want = [c - 2.0 * s2, s2 + 2.0 * c, 3.0 * c2 - 4.0 * s3, 3.0 * s3 + 4.0 * c2];
                assert_close(&got[16..20], &want, 1e-6);
            }
            // The second decode call continues at position 3.
            let next = s.forward(&[0], Logits::All).unwrap();
            assert_close(&next, &rope_ref(&row, 3, 4, rot as usize, 100.0, fs.into(), neox), 1e-6);
        }
    }
}

// ---------------------------------------------------------------- attention

/// Naive attention in f64 over rows q[t], k[j], v[j] (t at position t).
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f64,
    window: usize,
    softcap: f64,
) -> Vec<f64> {
    let mut out = vec![];
    for (p, qt) in q.iter().enumerate() {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let qh = &qt[h * hd..(h + 1) * hd];
            let js: Vec<usize> = (0..=p).filter(|&j| window == 0 || p - j < window).collect();
            let mut s: Vec<f64> = js
                .iter()
                .map(|&j| {
                    let kj = &k[j][kvh * hd..(kvh + 1) * hd];
                    let d: f64 = qh.iter().zip(kj).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    let d = d * scale;
                    if softcap > 0.0 { softcap * (d / softcap).tanh() } else { d }
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            s.iter_mut().for_each(|x| *x = (*x - m).exp());
            let z: f64 = s.iter().sum();
            for d in 0..hd {
                out.push(js.iter().zip(&s).map(|(&j, a)| a / z * f64::from(v[j][kvh * hd + d])).sum());
            }
        }
    }
    out
}

struct AttnCase {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    t: usize,
    scale: f32,
    window: u64,
    softcap: f32,
}

fn run_attention_case(c: &AttnCase, seed: u64) {
    let mut rng = Rng(seed);
    let q: Vec<Vec<f32>> = (0..c.t).map(|_| rng.vec(c.heads * c.hd, 2.0)).collect();
    let k: Vec<Vec<f32>> = (0..c.t).map(|_| rng.vec(c.kv_heads * c.hd, 2.0)).collect();
    let v: Vec<Vec<f32>> = (0..c.t).map(|_| rng.vec(c.kv_heads * c.hd, 1.0)).collect();
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let qv = b.input("q", ids, &q);
    let kv = b.input("k", ids, &k);
    let vv = b.input("v", ids, &v);
    let attrs = AttentionAttrs {
        cache: 0,
        heads: c.heads as u64,
        kv_heads: c.kv_heads as u64,
        head_dim: c.hd as u64,
        scale: c.scale,
        window: c.window,
        sink: 0,
        softcap: c.softcap,
        kv_dtype: kiln_ir::DType::F32,
    };
    let out = b.push(Op::Attention { q: qv, k: Some(kv), v: Some(vv), attrs });
    let mut s = b.session(out, 64);
    let tokens: Vec<u32> = (0..c.t as u32).collect();
    let got = s.forward(&tokens, Logits::All).unwrap();
    let want =
        attention_ref(&q, &k, &v, c.heads, c.kv_heads, c.hd, c.scale.into(), c.window as usize, c.softcap.into());
    assert_close(&got, &want, 1e-5);
    // Token by token through the cache gives the same rows.
    s.truncate(0);
    let mut one = vec![];
    for &tok in &tokens {
        one.extend(s.forward(&[tok], Logits::All).unwrap());
    }
    assert_eq!(got, one);
}

#[test]
fn attention_one_head_is_softmax_weighted_values() {
    // Two tokens; q is the same row for both (q table: two equal rows).
    // Keys k_0 = [0, 0], k_1 = [ln 3, 0]; q = [1, 0], scale 1:
    // token 1 weights e^0 : e^(ln 3) = 1 : 3 -> out = v_0/4 + 3 v_1/4.
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let q = b.input("q", ids, &[vec![1.0, 0.0], vec![1.0, 0.0]]);
    let k = b.input("k", ids, &[vec![0.0, 0.0], vec![3f32.ln(), 0.0]]);
    let v = b.input("v", ids, &[vec![4.0, 8.0], vec![0.0, -4.0]]);
    let attrs = AttentionAttrs {
        cache: 0,
        heads: 1,
        kv_heads: 1,
        head_dim: 2,
        scale: 1.0,
        window: 0,
        sink: 0,
        softcap: 0.0,
        kv_dtype: kiln_ir::DType::F32,
    };
    let out = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs });
    let mut s = b.session(out, 8);
    let got = s.forward(&[0, 1], Logits::All).unwrap();
    assert_close(&got, &[4.0, 8.0, 1.0, -1.0], 1e-6);
}

#[test]
fn attention_gqa_head_mapping() {
    run_attention_case(&AttnCase { heads: 4, kv_heads: 2, hd: 8, t: 5, scale: 0.35, window: 0, softcap: 0.0 }, 21);
    run_attention_case(&AttnCase { heads: 6, kv_heads: 1, hd: 4, t: 3, scale: 0.5, window: 0, softcap: 0.0 }, 22);
    // Explicit mapping check: with kv_heads 2 and heads 4, heads 0 and 1 read
    // kv head 0, heads 2 and 3 read kv head 1. Values of kv head 1 are 10x those of kv head 0.
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let q = b.input("q", ids, &[vec![0.0; 4]]);
    let k = b.input("k", ids, &[vec![0.0; 2]]);
    let v = b.input("v", ids, &[vec![1.0, 10.0]]);
    let attrs = AttentionAttrs {
        cache: 0,
        heads: 4,
        kv_heads: 2,
        head_dim: 1,
        scale: 1.0,
        window: 0,
        sink: 0,
        softcap: 0.0,
        kv_dtype: kiln_ir::DType::F32,
    };
    let out = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs });
    let mut s = b.session(out, 8);
    assert_eq!(s.forward(&[0], Logits::All).unwrap(), vec![1.0, 1.0, 10.0, 10.0]);
}

#[test]
fn attention_sliding_window_masks_old_positions() {
    run_attention_case(&AttnCase { heads: 2, kv_heads: 2, hd: 8, t: 9, scale: 0.3, window: 3, softcap: 0.0 }, 31);
    // Hand-checked: window 2, values v_j = j; with all scores equal, position 3
    // averages v_2 and v_3 -> 2.5 (unmasked it would be 1.5).
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let q = b.input("q", ids, &[vec![0.0], vec![0.0], vec![0.0], vec![0.0]]);
    let k = b.input("k", ids, &[vec![0.0], vec![0.0], vec![0.0], vec![0.0]]);
    let v = b.input("v", ids, &[vec![0.0], vec![1.0], vec![2.0], vec![3.0]]);
    let attrs = AttentionAttrs {
        cache: 0,
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        window: 2,
        sink: 0,
        softcap: 0.0,
        kv_dtype: kiln_ir::DType::F32,
    };
    let out = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs });
    let mut s = b.session(out, 8);
    let got = s.forward(&[0, 1, 2, 3], Logits::All).unwrap();
    assert_eq!(got, vec![0.0, 0.5, 1.5, 2.5]);
}

#[test]
fn attention_softcap() {
    run_attention_case(&AttnCase { heads: 2, kv_heads: 1, hd: 8, t: 6, scale: 1.0, window: 0, softcap: 2.0 }, 41);
    // Hand-checked: scores 0 and 100 capped at 1: cap·tanh(100) ≈ 1, so the
    // weights are 1 : e (not 1 : e^100).
    let mut b = Builder::new();
    let ids = b.push(Op::Tokens);
    let q = b.input("q", ids, &[vec![1.0], vec![1.0]]);
    let k = b.input("k", ids, &[vec![0.0], vec![100.0]]);
    let v = b.input("v", ids, &[vec![0.0], vec![1.0]]);
    let attrs = AttentionAttrs {
        cache: 0,
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        window: 0,
        sink: 0,
        softcap: 1.0,
        kv_dtype: kiln_ir::DType::F32,
    };
    let out = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs });
    let mut s = b.session(out, 8);
    let got = s.forward(&[0, 1], Logits::All).unwrap();
    let e = std::f64::consts::E;
    assert_close(&got, &[0.0, e / (1.0 + e)], 1e-6);
}

#[test]
fn shared_kv_slot_reads_the_writers_cache() {
    let (heads, kv_heads, hd, t) = (2usize, 1usize, 4usize, 4usize);
    let mut rng = Rng(51);
    let q0: Vec<Vec<f32>> = (0..t).map(|_| rng.vec(heads * hd, 1.0)).collect();
    let q1: Vec<Vec<f32>> = (0..t).map(|_| rng.vec(heads * hd, 1.0)).collect();
    let k: Vec<Vec<f32>> = (0..t).map(|_| rng.vec(kv_heads * hd, 1.0)).collect();
    let v: Vec<Vec<f32>> = (0..t).map(|_| rng.vec(kv_heads * hd, 1.0)).collect();
    let attrs = AttentionAttrs {
        cache: 3,
        heads: heads as u64,
        kv_heads: kv_heads as u64,
        head_dim: hd as u64,
        scale: 0.5,
        window: 0,
        sink: 0,
        softcap: 0.0,
        kv_dtype: kiln_ir::DType::F32,
    };
    let want0 = attention_ref(&q0, &k, &v, heads, kv_heads, hd, 0.5, 0, 0.0);
    let want1 = attention_ref(&q1, &k, &v, heads, kv_heads, hd, 0.5, 0, 0.0);
    // Two graphs: output = the reader alone (the writer's own result is dead,
    // but its cache append must still happen), and output = writer + reader.
    for sum in [false, true] {
        let mut b = Builder::new();
        let ids = b.push(Op::Tokens);
        let qa = b.input("q0", ids, &q0);
        let qb = b.input("q1", ids, &q1);
        let kv = b.input("k", ids, &k);
        let vv = b.input("v", ids, &v);
        let w = b.push(Op::Attention { q: qa, k: Some(kv), v: Some(vv), attrs: attrs.clone() });
        let r = b.push(Op::Attention { q: qb, k: None, v: None, attrs: attrs.clone() });
        let out = if sum { b.push(Op::Add { a: w, b: r }) } else { r };
        let mut s = b.session(out, 16);
        // Prompt in two chunks, so the second chunk reads positions cached by the first call.
        let mut got = s.forward(&[0, 1], Logits::All).unwrap();
        got.extend(s.forward(&[2, 3], Logits::All).unwrap());
        let want: Vec<f64> = if sum { want0.iter().zip(&want1).map(|(a, b)| a + b).collect() } else { want1.clone() };
        assert_close(&got, &want, 1e-5);
    }
}

// ---------------------------------------------------------------- whole models

/// The common differential body's tiny Llama, with the reference tests' dtypes.
fn tiny_llama(layers: usize, seed: u64) -> (Module, Vec<Vec<u8>>) {
    kiln_backends::conformance::tiny_llama_module(
        layers as u32,
        seed,
        [DType::Q4_0, DType::Q4_0, DType::F16, DType::F32, DType::Q4_1, DType::Q4_1, DType::BF16],
    )
}

fn tiny_session(layers: usize, max_context: usize) -> Box<dyn Session> {
    let (m, bytes) = tiny_llama(layers, 99);
    let options = SessionOptions { max_context, threads: 2, ..Default::default() };
    ReferenceBackend.prepare(Arc::new(verify(m).unwrap()), Arc::new(Weights(bytes)), &options).unwrap()
}

const PROMPT: [u32; 12] = [1, 17, 42, 99, 5, 0, 63, 63, 8, 21, 77, 30];

#[test]
fn one_forward_equals_token_by_token_and_chunks() {
    let mut s = tiny_session(2, 64);
    assert_eq!(s.vocab_size(), 100);
    let all = s.forward(&PROMPT, Logits::All).unwrap();
    assert_eq!(all.len(), PROMPT.len() * 100);
    assert_eq!(s.pos(), PROMPT.len());
    assert!(all.iter().all(|v| v.is_finite()));

    let mut step = tiny_session(2, 64);
    for (t, &tok) in PROMPT.iter().enumerate() {
        let row = step.forward(&[tok], Logits::Last).unwrap();
        let want = &all[t * 100..(t + 1) * 100];
        assert!(rel_diff(&row, want) <= 1e-4, "token {t}: rel diff {}", rel_diff(&row, want));
    }
    assert_eq!(step.pos(), PROMPT.len());

    for split in [1, 5, 11] {
        let mut chunks = tiny_session(2, 64);
        let a = chunks.forward(&PROMPT[..split], Logits::All).unwrap();
        let b = chunks.forward(&PROMPT[split..], Logits::All).unwrap();
        let joined: Vec<f32> = a.into_iter().chain(b).collect();
        assert!(rel_diff(&joined, &all) <= 1e-4, "split {split}: rel diff {}", rel_diff(&joined, &all));
    }

    // Logits::Last is the last row of Logits::All.
    let mut last = tiny_session(2, 64);
    let row = last.forward(&PROMPT, Logits::Last).unwrap();
    assert_eq!(row.len(), 100);
    assert!(rel_diff(&row, &all[all.len() - 100..]) <= 1e-4);
}

#[test]
fn truncate_then_rerun_is_identical() {
    let mut s = tiny_session(3, 64);
    let first = s.forward(&PROMPT, Logits::All).unwrap();
    let cont = s.forward(&[4, 5, 6], Logits::All).unwrap();
    // Roll back the continuation and run it again.
    s.truncate(PROMPT.len());
    assert_eq!(s.pos(), PROMPT.len());
    assert_eq!(s.forward(&[4, 5, 6], Logits::All).unwrap(), cont);
    // Roll back into the prompt, replace its tail with other tokens, then restore it.
    s.truncate(7);
    assert_eq!(s.pos(), 7);
    let other = s.forward(&[9, 9], Logits::All).unwrap();
    assert_ne!(other, first[7 * 100..9 * 100]);
    s.truncate(7);
    let tail = s.forward(&PROMPT[7..], Logits::All).unwrap();
    assert_eq!(tail, first[7 * 100..]);
    // Truncating past the end is a no-op.
    s.truncate(1000);
    assert_eq!(s.pos(), PROMPT.len());
    s.truncate(0);
    assert_eq!(s.forward(&PROMPT, Logits::All).unwrap(), first);
}

#[test]
fn errors_on_overflow_empty_input_and_bad_ids() {
    let mut s = tiny_session(1, 8);
    let err = s.forward(&[], Logits::Last).unwrap_err();
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
    let err = s.forward(&[1; 9], Logits::Last).unwrap_err();
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
    assert!(err.to_string().contains("context"), "{err}");
    let err = s.forward(&[1, 100], Logits::Last).unwrap_err();
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
    assert!(err.to_string().contains("100"), "{err}");
    let err = s.forward(&[u32::MAX], Logits::Last).unwrap_err();
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
    // Nothing moved: the session still works and fills to exactly max_context.
    assert_eq!(s.pos(), 0);
    s.forward(&[1, 2, 3, 4, 5], Logits::Last).unwrap();
    let err = s.forward(&[1, 2, 3, 4], Logits::Last).unwrap_err();
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
    assert_eq!(s.pos(), 5);
    s.forward(&[6, 7, 8], Logits::Last).unwrap();
    assert_eq!(s.pos(), 8);
    assert!(s.forward(&[1], Logits::Last).is_err());
}

#[test]
fn prepare_rejects_wrong_weight_sizes() {
    let (m, mut bytes) = tiny_llama(1, 5);
    bytes[3].pop();
    let options = SessionOptions { max_context: 8, threads: 1, ..Default::default() };
    let Err(err) = ReferenceBackend.prepare(Arc::new(verify(m).unwrap()), Arc::new(Weights(bytes)), &options) else {
        panic!("a short weight buffer was accepted");
    };
    assert!(matches!(err, BackendError::BadInput(_)), "{err}");
}

/// SmolLM2-135M-shaped model (30 layers, d 576, 9/3 heads, ff 1536, vocab
/// 49152) with random Q4_1 weights: prints prefill and decode speed.
/// Run with `cargo test --release -p kiln-backends --test reference -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_smollm2_shaped() {
    let (d, h, kvh, hd, ff, vocab, layers) = (576u64, 9u64, 3u64, 64u64, 1536u64, 49152u64, 30usize);
    let mut rng = Rng(1);
    let mut b = Builder::new();
    let mut p = |b: &mut Builder, n: &str, dt: DType, s: &[u64], scale: f32| {
        let n_el = s.iter().product::<u64>() as usize;
        let vals = if scale == 0.0 { vec![1.0; n_el] } else { rng.vec(n_el, scale) };
        b.param(n, dt, s, &vals)
    };
    let emb = p(&mut b, "token_embd.weight", DType::Q4_1, &[vocab, d], 0.1);
    let tok = b.push(Op::Tokens);
    let mut x = b.push(Op::Embed { table: emb, ids: tok });
    for l in 0..layers {
        let name = |n: &str| format!("blk.{l}.{n}.weight");
        let an = p(&mut b, &name("attn_norm"), DType::F32, &[d], 0.0);
        let wq = p(&mut b, &name("attn_q"), DType::Q4_1, &[h * hd, d], 0.05);
        let wk = p(&mut b, &name("attn_k"), DType::Q4_1, &[kvh * hd, d], 0.05);
        let wv = p(&mut b, &name("attn_v"), DType::Q4_1, &[kvh * hd, d], 0.05);
        let wo = p(&mut b, &name("attn_output"), DType::Q4_1, &[d, h * hd], 0.05);
        let fnrm = p(&mut b, &name("ffn_norm"), DType::F32, &[d], 0.0);
        let wg = p(&mut b, &name("ffn_gate"), DType::Q4_1, &[ff, d], 0.05);
        let wu = p(&mut b, &name("ffn_up"), DType::Q4_1, &[ff, d], 0.05);
        let wd = p(&mut b, &name("ffn_down"), DType::Q4_1, &[d, ff], 0.05);
        let n = b.push(Op::RmsNorm { x, weight: Some(an), eps: 1e-5, group: 0 });
        let q = b.push(Op::MatMul { x: n, w: wq, bias: None });
        let k = b.push(Op::MatMul { x: n, w: wk, bias: None });
        let v = b.push(Op::MatMul { x: n, w: wv, bias: None });
        let rope = RopeAttrs { head_dim: hd, rot_dims: hd, theta: 100000.0, freq_scale: 1.0, layout: RopeLayout::Neox };
        let q = b.push(Op::Rope { x: q, attrs: rope.clone() });
        let k = b.push(Op::Rope { x: k, attrs: rope });
        let attrs = AttentionAttrs {
            cache: l as u32,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 0.125,
            window: 0,
            sink: 0,
            softcap: 0.0,
            kv_dtype: kiln_ir::DType::F32,
        };
        let a = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs });
        let o = b.push(Op::MatMul { x: a, w: wo, bias: None });
        x = b.push(Op::Add { a: x, b: o });
        let n = b.push(Op::RmsNorm { x, weight: Some(fnrm), eps: 1e-5, group: 0 });
        let g = b.push(Op::MatMul { x: n, w: wg, bias: None });
        let u = b.push(Op::MatMul { x: n, w: wu, bias: None });
        let y = b.push(Op::Glu { gate: g, up: u, kind: Activation::Silu });
        let y = b.push(Op::MatMul { x: y, w: wd, bias: None });
        x = b.push(Op::Add { a: x, b: y });
    }
    let on = p(&mut b, "output_norm.weight", DType::F32, &[d], 0.0);
    let x = b.push(Op::RmsNorm { x, weight: Some(on), eps: 1e-5, group: 0 });
    let logits = b.push(Op::MatMul { x, w: emb, bias: None });
    b.m.output = Some(logits);
    let options = SessionOptions { max_context: 2048, threads: 0, ..Default::default() };
    let mut s = ReferenceBackend.prepare(Arc::new(verify(b.m).unwrap()), Arc::new(Weights(b.bytes)), &options).unwrap();
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 49152).collect();
    let t0 = Instant::now();
    let last = s.forward(&prompt, Logits::Last).unwrap();
    let prefill = t0.elapsed().as_secs_f64();
    assert_eq!(last.len(), 49152);
    let n = 32;
    let t0 = Instant::now();
    for i in 0..n {
        s.forward(&[i * 13], Logits::Last).unwrap();
    }
    let decode = t0.elapsed().as_secs_f64();
    println!(
        "prefill 512 tokens: {prefill:.2} s ({:.1} tok/s); decode: {:.1} tok/s",
        512.0 / prefill,
        f64::from(n) / decode
    );
}
