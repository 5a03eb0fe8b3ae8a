//! The differential test body every backend runs: small modules that cover
//! each op (every weight dtype for matmul, both RoPE layouts, GQA, sliding
//! windows, soft-cap, shared KV slots) and a tiny Llama, executed by the
//! backend under test and by the reference interpreter, compared within a
//! per-case error budget. A backend's test file calls [`check_backend`].
//!
//! The comparison is relative to the largest reference value of the output
//! (`max |got − want| / max |want|`), over every forward call of a case:
//! prefill with all logits, then decode steps with the last row only.

use std::sync::Arc;

use kiln_ir::{
    Activation, AttentionAttrs, DType, Meta, Module, Op, ParamId, RopeAttrs, RopeLayout, SteerAttrs, SteerMode,
    TensorType, ValueId, verify,
};

use crate::quant::quantize_row;
use crate::reference::ReferenceBackend;
use crate::{Backend, Logits, Numerics, SessionOptions, WeightSource};

/// Owned weights, one byte vector per parameter.
pub struct OwnedWeights(pub Vec<Vec<u8>>);

impl WeightSource for OwnedWeights {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.get(p.index()).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// Builds a module and its weights together.
pub struct ModuleBuilder {
    pub m: Module,
    pub bytes: Vec<Vec<u8>>,
    pub rng: Rng,
}

impl ModuleBuilder {
    pub fn new(name: &str, seed: u64) -> Self {
        ModuleBuilder { m: Module::new(name), bytes: vec![], rng: Rng(seed) }
    }

    /// Declares a parameter holding `values` quantized to `dtype`.
    pub fn param_values(&mut self, name: &str, dtype: DType, shape: &[u64], values: &[f32]) -> ParamId {
        let ty = TensorType::fixed(dtype, shape);
        let p = self.m.add_param(name, ty.clone()).expect("unique parameter name");
        let last = *shape.last().expect("a shape") as usize;
        let mut bytes = vec![0u8; ty.storage_bytes().expect("sized") as usize];
        let rb = bytes.len() / (values.len() / last);
        for (src, dst) in values.chunks(last).zip(bytes.chunks_mut(rb)) {
            quantize_row(dtype, src, dst).expect("quantizable");
        }
        self.bytes.push(bytes);
        p
    }

    /// A parameter of random values in `[-scale, scale)` (all ones when `scale` is 0).
    pub fn param(&mut self, name: &str, dtype: DType, shape: &[u64], scale: f32) -> ParamId {
        let n = shape.iter().product::<u64>() as usize;
        let v = if scale == 0.0 { vec![1.0; n] } else { self.rng.vec(n, scale) };
        self.param_values(name, dtype, shape, &v)
    }

    pub fn push(&mut self, op: Op) -> ValueId {
        self.m.push(op).expect("well-formed op")
    }

    /// Token ids looked up in a random f32 table of `vocab × d`.
    pub fn input(&mut self, vocab: u64, d: u64) -> ValueId {
        let t = self.param("input.weight", DType::F32, &[vocab, d], 1.0);
        let ids = self.push(Op::Tokens);
        self.push(Op::Embed { table: t, ids })
    }
}

/// One differential case: a module, its weights, the forward calls and the budget.
pub struct Case {
    pub name: String,
    pub module: Module,
    pub weights: Vec<Vec<u8>>,
    /// Forward calls in order: tokens and whether all logits are asked for.
    pub calls: Vec<(Vec<u32>, Logits)>,
    /// Largest allowed relative error.
    pub budget: f32,
    /// A capability a backend may lack: if it says it does not support the
    /// module, the case is skipped (reported), not failed.
    pub optional: bool,
    /// After its calls, roll back one position (replayed as the reference does) and then
    /// 25, which a session keeping windowed slots as rings must refuse.
    pub rollback: bool,
}

const VOCAB: u64 = 37;

fn calls() -> Vec<(Vec<u32>, Logits)> {
    vec![
        (vec![3, 1, 4, 1, 5, 9, 2], Logits::All),
        (vec![6], Logits::Last),
        (vec![5], Logits::Last),
        (vec![3, 5], Logits::All),
    ]
}

fn case(name: impl Into<String>, mut b: ModuleBuilder, out: ValueId, budget: f32) -> Case {
    b.m.output = Some(out);
    Case { name: name.into(), module: b.m, weights: b.bytes, calls: calls(), budget, optional: false, rollback: false }
}

/// Every float weight dtype kiln has, with a row length its blocks divide.
fn matmul_dtypes() -> Vec<(DType, u64)> {
    DType::floats().map(|d| (d, if d.block_elems() >= 64 { d.block_elems().max(256) } else { 96 })).collect()
}

/// The cases of the common differential test body.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    // matmul: every dtype, with and without bias; the output is a second matmul to a
    // vocabulary-sized row so logits stay the module's output.
    for (dt, k) in matmul_dtypes() {
        for bias in [false, true] {
            let mut b = ModuleBuilder::new("matmul", 11 + k);
            let x = b.input(VOCAB, k);
            let w = b.param("w.weight", dt, &[VOCAB, k], 0.5);
            let bias = bias.then(|| b.param("w.bias", DType::F32, &[VOCAB], 0.5));
            let y = b.push(Op::MatMul { x, w, bias });
            out.push(case(format!("matmul {dt}{}", if bias.is_some() { " + bias" } else { "" }), b, y, 2e-5));
        }
    }
    // Prefill of 40 tokens: a backend may use f16 tensor cores there (activations and
    // weights rounded to f16, f32 sums), hence the looser budget.
    for dt in [DType::F16, DType::Q4_1, DType::Q8_0, DType::Q4K, DType::Q6K, DType::KQ2] {
        let k = if dt.block_elems() >= 64 { 256 } else { 96 };
        let mut b = ModuleBuilder::new("matmul-prefill", 23);
        let x = b.input(VOCAB, k);
        let w = b.param("w.weight", dt, &[VOCAB, k], 0.5);
        let bias = b.param("w.bias", DType::F32, &[VOCAB], 0.5);
        let y = b.push(Op::MatMul { x, w, bias: Some(bias) });
        let mut c = case(format!("matmul {dt} prefill 40 tokens"), b, y, 3e-3);
        c.calls = vec![((0..40).map(|i| (i * 7 + 1) % VOCAB as u32).collect(), Logits::All), (vec![2], Logits::Last)];
        out.push(c);
    }
    // Q4_K with whole groups of eight rows (the CPU backend repacks those for its lane
    // kernels), two super-blocks per row; then to vocabulary-sized logits. Decode, and a
    // prefill whose token rows split into four-row `gemm` groups and a `gemv` rest.
    {
        let mut b = ModuleBuilder::new("matmul-q4k-rows8", 29);
        let x = b.input(VOCAB, 512);
        let w = b.param("h.weight", DType::Q4K, &[64, 512], 0.5);
        let h = b.push(Op::MatMul { x, w, bias: None });
        let o = b.param("o.weight", DType::F32, &[VOCAB, 64], 0.3);
        let y = b.push(Op::MatMul { x: h, w: o, bias: None });
        let mut c = case("matmul q4_K 64×512 (rows in groups of 8)", b, y, 3e-3);
        c.calls.push(((0..23).map(|i| (i * 5 + 3) % VOCAB as u32).collect(), Logits::All));
        out.push(c);
    }
    // Unquantized rows whose length is not a multiple of 8 (e.g. glassllm's 341-wide FFN).
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let mut b = ModuleBuilder::new("matmul-ragged", 3);
        let x = b.input(VOCAB, 45);
        let w = b.param("w.weight", dt, &[VOCAB, 45], 0.5);
        let y = b.push(Op::MatMul { x, w, bias: None });
        out.push(case(format!("matmul {dt} k=45"), b, y, 2e-5));
    }
    // Row-wise ops.
    let d = 64;
    type Mk = fn(&mut ModuleBuilder, ValueId) -> ValueId;
    let unary: Vec<(&str, Mk, f32)> = vec![
        (
            "rms_norm",
            |b, x| {
                let w = b.param("n.weight", DType::F32, &[64], 1.0);
                b.push(Op::RmsNorm { x, weight: Some(w), eps: 1e-5, group: 0 })
            },
            1e-5,
        ),
        ("rms_norm per group, no weight", |b, x| b.push(Op::RmsNorm { x, weight: None, eps: 1e-6, group: 16 }), 1e-5),
        (
            "rms_norm per group",
            |b, x| {
                let w = b.param("n.weight", DType::F32, &[16], 1.0);
                b.push(Op::RmsNorm { x, weight: Some(w), eps: 1e-6, group: 16 })
            },
            1e-5,
        ),
        ("scale", |b, x| b.push(Op::Scale { x, s: -0.7 }), 1e-6),
        (
            "steer add",
            |b, x| {
                let dir = b.param("steer.dir", DType::F32, &[64], 0.2);
                let attrs = SteerAttrs { mode: SteerMode::Add, strength: -4.0, name: "t".into() };
                b.push(Op::Steer { x, dir, attrs })
            },
            1e-6,
        ),
        (
            "steer at strength 0 (the identity, exactly)",
            |b, x| {
                let dir = b.param("steer.dir", DType::F32, &[64], 0.2);
                let attrs = SteerAttrs { mode: SteerMode::Project, strength: 0.0, name: "t".into() };
                b.push(Op::Steer { x, dir, attrs })
            },
            0.0,
        ),
        (
            "steer project",
            |b, x| {
                let dir = b.param("steer.dir", DType::F32, &[64], 0.2);
                let attrs = SteerAttrs { mode: SteerMode::Project, strength: 0.8, name: "t".into() };
                b.push(Op::Steer { x, dir, attrs })
            },
            1e-5,
        ),
        ("act silu", |b, x| b.push(Op::Act { x, kind: Activation::Silu }), 1e-5),
        ("act gelu_tanh", |b, x| b.push(Op::Act { x, kind: Activation::GeluTanh }), 1e-5),
        ("softmax", |b, x| b.push(Op::Softmax { x }), 1e-5),
        (
            "add",
            |b, x| {
                let y = b.push(Op::Scale { x, s: 0.5 });
                b.push(Op::Add { a: x, b: y })
            },
            1e-6,
        ),
        (
            "mul",
            |b, x| {
                let y = b.push(Op::Act { x, kind: Activation::Silu });
                b.push(Op::Mul { a: x, b: y })
            },
            1e-5,
        ),
        (
            "glu silu",
            |b, x| {
                let y = b.push(Op::Scale { x, s: 1.5 });
                b.push(Op::Glu { gate: x, up: y, kind: Activation::Silu })
            },
            1e-5,
        ),
        (
            "glu gelu_tanh",
            |b, x| {
                let y = b.push(Op::Scale { x, s: 1.5 });
                b.push(Op::Glu { gate: x, up: y, kind: Activation::GeluTanh })
            },
            1e-5,
        ),
    ];
    for (name, mk, budget) in unary {
        let mut b = ModuleBuilder::new("rowwise", 5);
        let x = b.input(VOCAB, d);
        let x = b.push(Op::Scale { x, s: 3.0 });
        let y = mk(&mut b, x);
        out.push(case(name, b, y, budget));
    }
    // RoPE: both layouts, full and partial rotary, scaled positions.
    for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
        for (rot, fs) in [(32u64, 1.0f32), (16, 0.25)] {
            let mut b = ModuleBuilder::new("rope", 6);
            let x = b.input(VOCAB, 128);
            let attrs = RopeAttrs { head_dim: 32, rot_dims: rot, theta: 10000.0, freq_scale: fs, layout };
            let y = b.push(Op::Rope { x, attrs });
            out.push(case(format!("rope {} rot {rot} freq_scale {fs}", layout.name()), b, y, 1e-6));
        }
    }
    // Attention: GQA, head sizes, window, attention sinks, soft-cap, a slot shared by a second op.
    for (hd, heads, kv_heads, window, sink, softcap, share) in [
        (64u64, 4u64, 2u64, 0u64, 0u64, 0f32, false),
        (32, 2, 2, 3, 0, 0.0, false),
        (32, 4, 2, 3, 2, 0.0, true),
        (128, 4, 1, 0, 0, 20.0, false),
        (64, 4, 2, 0, 0, 0.0, true),
    ] {
        let mut b = ModuleBuilder::new("attention", 7 + hd);
        let q = b.input(VOCAB, heads * hd);
        let wk = b.param("k.weight", DType::F32, &[kv_heads * hd, heads * hd], 0.3);
        let wv = b.param("v.weight", DType::F32, &[kv_heads * hd, heads * hd], 0.3);
        let k = b.push(Op::MatMul { x: q, w: wk, bias: None });
        let v = b.push(Op::MatMul { x: q, w: wv, bias: None });
        let attrs = AttentionAttrs {
            cache: 0,
            heads,
            kv_heads,
            head_dim: hd,
            scale: 0.3,
            window,
            sink,
            softcap,
            kv_dtype: kiln_ir::DType::F32,
        };
        let mut y = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs: attrs.clone() });
        if share {
            let q2 = b.push(Op::Scale { x: y, s: 2.0 });
            y = b.push(Op::Attention { q: q2, k: None, v: None, attrs });
        }
        let sinks = if sink > 0 { format!(" sink {sink}") } else { String::new() };
        let name = format!(
            "attention hd {hd} heads {heads}/{kv_heads} window {window}{sinks} softcap {softcap} shared {share}"
        );
        let mut c = case(name, b, y, 2e-5);
        if sink > 0 {
            // Past a ring of window + sinks + a chunk: a backend that keeps windowed slots as
            // rings wraps them here, then takes three tokens in one call.
            c.calls.extend((0..30).map(|i| (vec![(i * 7 + 2) % VOCAB as u32], Logits::Last)));
            c.calls.push((vec![4, 9, 1], Logits::All));
            c.rollback = true;
        }
        out.push(c);
    }
    // Quantized KV caches (ggml blocks or FP8 bytes along each position's row): an optional capability.
    for kv_dtype in [DType::Q8_0, DType::Q4_0, DType::F8E4M3] {
        let (hd, heads, kv_heads) = (64u64, 4u64, 2u64);
        let mut b = ModuleBuilder::new("attention kv", 40);
        let q = b.input(VOCAB, heads * hd);
        let wk = b.param("k.weight", DType::F32, &[kv_heads * hd, heads * hd], 0.3);
        let wv = b.param("v.weight", DType::F32, &[kv_heads * hd, heads * hd], 0.3);
        let k = b.push(Op::MatMul { x: q, w: wk, bias: None });
        let v = b.push(Op::MatMul { x: q, w: wv, bias: None });
        let attrs = AttentionAttrs {
            cache: 0,
            heads,
            kv_heads,
            head_dim: hd,
            scale: 0.3,
            window: 0,
            sink: 0,
            softcap: 0.0,
            kv_dtype,
        };
        let y = b.push(Op::Attention { q, k: Some(k), v: Some(v), attrs: attrs.clone() });
        let q2 = b.push(Op::Scale { x: y, s: 2.0 });
        let y = b.push(Op::Attention { q: q2, k: None, v: None, attrs });
        let mut c = case(format!("attention, {kv_dtype} KV cache, shared"), b, y, 2e-5);
        c.optional = true;
        out.push(c);
    }
    out.push(tiny_llama());
    out.push(tiny_llama_with(
        "tiny llama long prefill",
        [DType::Q4_0, DType::Q4_1, DType::F16, DType::F32, DType::Q5_0, DType::Q8_0, DType::BF16],
    ));
    // kiln's 2-bit format where matmuls share inputs (q/k/v, gate/up), legacy blocks elsewhere.
    out.push(tiny_llama_with(
        "tiny llama kq2",
        [DType::KQ2, DType::KQ2, DType::KQ2, DType::Q4_0, DType::KQ2, DType::KQ2, DType::Q8_0],
    ));
    out
}

/// A two-layer Llama with mixed weight dtypes, tied embeddings, a sliding-window layer.
fn tiny_llama() -> Case {
    tiny_llama_with(
        "tiny llama",
        [DType::Q4_0, DType::Q4_1, DType::F16, DType::F32, DType::Q5_0, DType::Q8_0, DType::BF16],
    )
}

/// The tiny Llama with weight dtypes for q, k, v, o, gate, up, down.
fn tiny_llama_with(name: &str, dts: [DType; 7]) -> Case {
    let (module, weights) = tiny_llama_module(2, 99, dts);
    let mut c =
        Case { name: name.into(), module, weights, calls: calls(), budget: 1e-4, optional: false, rollback: false };
    if name.ends_with("long prefill") {
        c.budget = 1e-2;
        c.calls = vec![((0..70).map(|i| (i * 37 + 5) % 100).collect(), Logits::All), (vec![7], Logits::Last)];
        return c;
    }
    c.calls = vec![
        ((0..12).map(|i| (i * 37 + 5) % 100).collect(), Logits::All),
        (vec![7], Logits::Last),
        (vec![99], Logits::Last),
        ((0..9).map(|i| (i * 11 + 3) % 100).collect(), Logits::Last),
    ];
    c
}

/// A tiny Llama (d 64, 4 heads over 2 KV heads, FFN 128, vocabulary 100, Q8_0 tied
/// embeddings, a sliding window of 5 on odd layers) with random weights: dtypes for
/// q, k, v, o, gate, up, down.
pub fn tiny_llama_module(layers: u32, seed: u64, dts: [DType; 7]) -> (Module, Vec<Vec<u8>>) {
    let (d, h, kvh, hd, ff, vocab) = (64u64, 4u64, 2u64, 16u64, 128u64, 100u64);
    let mut b = ModuleBuilder::new("tiny-llama", seed);
    b.m.set_meta("arch", Meta::Str("llama".into()));
    let emb = b.param("token_embd.weight", DType::Q8_0, &[vocab, d], 1.0);
    let tok = b.push(Op::Tokens);
    let mut x = b.push(Op::Embed { table: emb, ids: tok });
    for l in 0..layers {
        let name = |n: &str| format!("blk.{l}.{n}.weight");
        let an = b.param(&name("attn_norm"), DType::F32, &[d], 0.0);
        let wq = b.param(&name("attn_q"), dts[0], &[h * hd, d], 0.3);
        let wk = b.param(&name("attn_k"), dts[1], &[kvh * hd, d], 0.3);
        let wv = b.param(&name("attn_v"), dts[2], &[kvh * hd, d], 0.3);
        let wo = b.param(&name("attn_output"), dts[3], &[d, h * hd], 0.2);
        let fnrm = b.param(&name("ffn_norm"), DType::F32, &[d], 0.0);
        let wg = b.param(&name("ffn_gate"), dts[4], &[ff, d], 0.3);
        let wu = b.param(&name("ffn_up"), dts[5], &[ff, d], 0.3);
        let wd = b.param(&name("ffn_down"), dts[6], &[d, ff], 0.2);
        let n = b.push(Op::RmsNorm { x, weight: Some(an), eps: 1e-5, group: 0 });
        let q = b.push(Op::MatMul { x: n, w: wq, bias: None });
        let k = b.push(Op::MatMul { x: n, w: wk, bias: None });
        let v = b.push(Op::MatMul { x: n, w: wv, bias: None });
        let rope = RopeAttrs { head_dim: hd, rot_dims: hd, theta: 10000.0, freq_scale: 1.0, layout: RopeLayout::Neox };
        let q = b.push(Op::Rope { x: q, attrs: rope.clone() });
        let k = b.push(Op::Rope { x: k, attrs: rope });
        let attrs = AttentionAttrs {
            cache: l,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 0.25,
            window: if l % 2 == 1 { 5 } else { 0 },
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
    let on = b.param("output_norm.weight", DType::F32, &[d], 0.0);
    let x = b.push(Op::RmsNorm { x, weight: Some(on), eps: 1e-5, group: 0 });
    let logits = b.push(Op::MatMul { x, w: emb, bias: None });
    b.m.output = Some(logits);
    (b.m, b.bytes)
}

/// `max |a − b| / max |b|`.
pub fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0.0f32, |m, (x, y)| m.max(if x.is_nan() { f32::INFINITY } else { (x - y).abs() })) / scale
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// Worst relative error over the case's calls (or the error that stopped it).
    pub result: Result<f32, String>,
    pub budget: f32,
    pub optional: bool,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        matches!(self.result, Ok(e) if e <= self.budget) || self.skipped()
    }

    /// An optional case the backend does not support.
    pub fn skipped(&self) -> bool {
        self.optional && matches!(&self.result, Err(e) if e.starts_with("unsupported"))
    }
}

/// Runs every case of [`cases`] (that `backend` supports) on `backend` and on the
/// reference interpreter. Returns one outcome per case; a case whose op the
/// backend does not support is reported as an error naming it.
pub fn run_cases(backend: &dyn Backend, cases: Vec<Case>) -> Vec<Outcome> {
    run_cases_in(backend, cases, Numerics::Exact)
}

/// [`run_cases`] with both sessions in `numerics` (a backend that computes in
/// llama.cpp's numerics is held to the reference in the same numerics).
pub fn run_cases_in(backend: &dyn Backend, cases: Vec<Case>, numerics: Numerics) -> Vec<Outcome> {
    cases
        .into_iter()
        .map(|c| {
            let result = run_case(backend, &c, numerics);
            Outcome { name: c.name, result, budget: c.budget, optional: c.optional }
        })
        .collect()
}

fn run_case(backend: &dyn Backend, c: &Case, numerics: Numerics) -> Result<f32, String> {
    let module = Arc::new(verify(c.module.clone()).map_err(|e| format!("verify: {e}"))?);
    if let Some(what) = crate::first_unsupported(backend, &module) {
        return Err(format!("unsupported: {what}"));
    }
    let weights: Arc<dyn WeightSource> = Arc::new(OwnedWeights(c.weights.clone()));
    let opts = SessionOptions { max_context: 128, threads: 2, numerics, ..Default::default() };
    let mut want = ReferenceBackend.prepare(module.clone(), weights.clone(), &opts).map_err(|e| e.to_string())?;
    let mut got = backend.prepare(module, weights, &opts).map_err(|e| e.to_string())?;
    let mut worst = 0f32;
    for (tokens, mode) in &c.calls {
        let w = want.forward(tokens, *mode).map_err(|e| e.to_string())?;
        let g = got.forward(tokens, *mode).map_err(|e| e.to_string())?;
        if g.len() != w.len() {
            return Err(format!("{} outputs, the reference gives {}", g.len(), w.len()));
        }
        worst = worst.max(rel_diff(&g, &w));
    }
    // Windowed slots may be rings (`crate::ring`): a rollback of one position replays as
    // the reference does; one of 25 (past any ring's slack) is refused by both until the
    // session restarts at 0.
    if c.rollback {
        let pos = want.pos();
        want.truncate(pos - 1);
        got.truncate(pos - 1);
        let w = want.forward(&[5, 6], Logits::All).map_err(|e| e.to_string())?;
        let g = got.forward(&[5, 6], Logits::All).map_err(|e| format!("after a rollback of 1: {e}"))?;
        worst = worst.max(rel_diff(&g, &w));
        let pos = want.pos();
        want.truncate(pos - 25);
        got.truncate(pos - 25);
        for (who, s) in [("the reference", &mut want), ("the backend", &mut got)] {
            match s.forward(&[3], Logits::Last) {
                Err(e) if e.to_string().contains("rolled back") => {}
                other => return Err(format!("{who} did not refuse a rollback past its ring: {other:?}")),
            }
            s.truncate(0);
        }
    }
    // Greedy on the device agrees with the host argmax of the same logits.
    let tokens = [1u32, 2];
    let w = want.forward(&tokens, Logits::Last).map_err(|e| e.to_string())?;
    let g = got.forward_argmax(&tokens).map_err(|e| e.to_string())?;
    let wi = crate::argmax(&w);
    if g != wi && (w[g as usize] - w[wi as usize]).abs() > c.budget * w[wi as usize].abs().max(1.0) {
        return Err(format!("argmax {g}, the reference's {wi}"));
    }
    // Top-k on the device agrees with the reference's logits.
    let w = want.forward(&[3], Logits::Last).map_err(|e| e.to_string())?;
    let g = got.forward_top_k(&[3], 5).map_err(|e| e.to_string())?;
    let wk = crate::top_k(&w, 5);
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    if g.len() != wk.len() {
        return Err(format!("top-k gave {} pairs, the reference {}", g.len(), wk.len()));
    }
    for ((gi, gv), (wi, wv)) in g.iter().zip(&wk) {
        // Same ids, or ids swapped inside a near-tie; values within budget.
        let near = (w[*gi as usize] - wv).abs() <= c.budget * scale;
        if (gi != wi && !near) || (gv - wv).abs() > c.budget * scale {
            return Err(format!("top-k ({gi}, {gv}) where the reference has ({wi}, {wv})"));
        }
    }
    worst = worst.max(g.iter().zip(&wk).fold(0f32, |m, (a, b)| m.max((a.1 - b.1).abs() / scale)));
    // Rollback then replay gives the same result.
    let p = got.pos();
    got.truncate(p - 1);
    want.truncate(p - 1);
    let w = want.forward(&[tokens[1]], Logits::Last).map_err(|e| e.to_string())?;
    let g = got.forward(&[tokens[1]], Logits::Last).map_err(|e| e.to_string())?;
    worst = worst.max(rel_diff(&g, &w));
    Ok(worst)
}

/// Runs the common differential body on `backend` and panics with a table of
/// every case over budget.
pub fn check_backend(backend: &dyn Backend) {
    check_backend_in(backend, Numerics::Exact);
}

/// [`check_backend`] with both sessions in `numerics`.
pub fn check_backend_in(backend: &dyn Backend, numerics: Numerics) {
    let outcomes = run_cases_in(backend, cases(), numerics);
    let mut report = String::new();
    for o in &outcomes {
        let line = match &o.result {
            Ok(e) => format!(
                "{:<70} rel err {e:.2e} (budget {:.0e}){}",
                o.name,
                o.budget,
                if o.passed() { "" } else { "  FAIL" }
            ),
            Err(e) if o.skipped() => format!("{:<70} skipped: {e}", o.name),
            Err(e) => format!("{:<70} FAIL: {e}", o.name),
        };
        report.push_str(&line);
        report.push('\n');
    }
    eprintln!("differential test of backend `{}`:\n{report}", backend.name());
    assert!(
        outcomes.iter().all(Outcome::passed),
        "backend `{}` failed the differential test:\n{report}",
        backend.name()
    );
}
