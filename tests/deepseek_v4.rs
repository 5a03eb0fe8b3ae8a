//! DeepSeek-V4 (issue 9): kiln imports the tiny Hugging Face fixture
//! (`tests/fixtures/deepseek-v4/tiny`) and the reference interpreter reproduces
//! transformers' logits stored in `refs.safetensors` — full prefill, cached prefill then
//! one-token decode, and chunked prefill — within 1e-4; the compressed KV rows and
//! indexer keys match too — for the importer's unfused form (`compress`, `index_topk`,
//! `sparse_attention`) and after the `fuse_sparse_attention` pass (`compressed_attention`),
//! which give bit-identical logits. Also: the new ops' text form round-trips and verifies,
//! other backends refuse them by name, and bad checkpoints give errors that name the file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backends::reference::{ReferenceBackend, ReferenceSession};
use kiln_backends::{Backend, Logits, Session, SessionOptions, WeightSource};
use kiln_frontend::Weights;
use kiln_frontend::safetensors::SafetensorsFile;
use kiln_ir::{Module, Op, ParamId, VerifiedModule};

const TOL: f64 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek-v4")
}

struct W(Weights);

impl WeightSource for W {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.bytes(p)
    }
}

struct Refs(SafetensorsFile);

impl Refs {
    fn open() -> Refs {
        Refs(SafetensorsFile::open(&fixture().join("refs.safetensors")).unwrap())
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let b = self.0.raw_bytes(name).unwrap_or_else(|| panic!("refs has no {name}"));
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    fn ints(&self, name: &str) -> Vec<usize> {
        let b = self.0.raw_bytes(name).unwrap_or_else(|| panic!("refs has no {name}"));
        b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect()
    }
}

/// The fixture as the importer lowers it: DeepSeek-V4's attention unfused.
fn import() -> (Arc<VerifiedModule>, Arc<dyn WeightSource>) {
    let (module, weights) = kiln_frontend::hf::import_dir_graph(&fixture().join("tiny")).unwrap();
    (Arc::new(kiln_ir::verify(module).unwrap()), Arc::new(W(weights)))
}

/// The fixture after the `fuse_sparse_attention` pass, and the pass's report details.
fn fused() -> (Arc<VerifiedModule>, Arc<dyn WeightSource>, serde_json::Value) {
    let (mut m, mut w) = kiln_frontend::hf::import_dir_graph(&fixture().join("tiny")).unwrap();
    let reports = kiln_passes::run_pipeline(
        &mut m,
        &mut w,
        &[("fuse_sparse_attention".into(), serde_json::Value::Null)],
        &kiln_passes::PipelineCtx {
            device: "laptop",
            base_dir: &fixture(),
            calibration: kiln_passes::Calibration::default(),
            memo: None,
        },
        &mut |_| {},
    )
    .unwrap();
    (Arc::new(kiln_ir::verify(m).unwrap()), Arc::new(W(w)), reports[0].details.clone())
}

/// Both forms, named.
fn forms() -> Vec<(&'static str, Arc<VerifiedModule>, Arc<dyn WeightSource>)> {
    let (m, w) = import();
    let (f, fw, _) = fused();
    vec![("unfused", m, w), ("fused", f, fw)]
}

fn session(m: &Arc<VerifiedModule>, w: &Arc<dyn WeightSource>) -> ReferenceSession {
    let opts = SessionOptions { max_context: 256, threads: 2, ..Default::default() };
    ReferenceBackend::new().prepare_session(m.clone(), w.clone(), &opts).unwrap()
}

fn toks(ids: &[usize]) -> Vec<u32> {
    ids.iter().map(|&t| t as u32).collect()
}

/// max |a − b| and the mean KL(softmax(b) ‖ softmax(a)) over rows of `vocab`.
fn compare(a: &[f32], b: &[f32], vocab: usize) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs()).fold(0.0, f64::max);
    let logp = |r: &[f32]| {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = r.iter().map(|v| (f64::from(*v) - m).exp()).sum::<f64>().ln() + m;
        r.iter().map(move |v| f64::from(*v) - z).collect::<Vec<_>>()
    };
    let rows = a.len() / vocab;
    let kl: f64 = a
        .chunks(vocab)
        .zip(b.chunks(vocab))
        .map(|(x, y)| {
            let (lx, ly) = (logp(x), logp(y));
            ly.iter().zip(&lx).map(|(q, p)| q.exp() * (q - p)).sum::<f64>()
        })
        .sum();
    (max, kl / rows as f64)
}

fn check_within(what: &str, got: &[f32], want: &[f32], vocab: usize, tol: f64, max_kl: f64) -> f64 {
    let (max, kl) = compare(got, want, vocab);
    println!("{what:44} max|Δ| {max:.2e}  mean KL {kl:.2e}");
    assert!(max <= tol, "{what}: max |Δ| {max:.3e} exceeds {tol}");
    assert!(kl < max_kl, "{what}: mean KL {kl:.3e}");
    max
}

/// Every case of `refs.safetensors` — one call over the whole sequence, a cached prefill
/// then one token per call, chunked prefill — on fresh sessions from `new`, each within
/// `tol` (max |Δ|) and `max_kl` (mean KL); returns the worst max |Δ|.
fn reproduce(backend: &str, new: &dyn Fn() -> Box<dyn Session>, tol: f64, max_kl: f64) -> f64 {
    let refs = Refs::open();
    let vocab = 256;
    let mut worst = 0f64;
    let mut check = |what: String, got: &[f32], want: &str| {
        let what = format!("{backend}: {what}");
        worst = worst.max(check_within(&what, got, &refs.f32s(want), vocab, tol, max_kl));
    };
    for seq in ["seq0", "seq1"] {
        let tokens = toks(&refs.ints(&format!("{seq}.tokens")));
        let p = refs.ints(&format!("{seq}.prefill_len"))[0];
        let full = new().forward(&tokens, Logits::All).unwrap();
        check(format!("{seq} full prefill ({})", tokens.len()), &full, &format!("{seq}.full_logits"));
        let mut s = new();
        let pre = s.forward(&tokens[..p], Logits::All).unwrap();
        check(format!("{seq} cached prefill [..{p}]"), &pre, &format!("{seq}.prefill_logits"));
        let mut dec = Vec::new();
        for t in &tokens[p..] {
            dec.extend(s.forward(&[*t], Logits::Last).unwrap());
        }
        check(format!("{seq} decode ({} steps)", tokens.len() - p), &dec, &format!("{seq}.decode_logits"));
        let chunks = format!("{seq}.chunks");
        if refs.has(&chunks) {
            let sizes = refs.ints(&chunks);
            let mut s = new();
            let (mut out, mut at) = (Vec::new(), 0);
            for n in &sizes {
                out.extend(s.forward(&tokens[at..at + n], Logits::All).unwrap());
                at += n;
            }
            check(format!("{seq} chunked {sizes:?}"), &out, &format!("{seq}.chunked_logits"));
        }
    }
    worst
}

#[test]
fn reference_reproduces_transformers_logits() {
    let refs = Refs::open();
    for (form, m, w) in forms() {
        let worst = reproduce(&format!("reference, {form}"), &|| Box::new(session(&m, &w)), TOL, 1e-8);
        // The compressed rows and indexer keys after 128 tokens.
        let mut s = session(&m, &w);
        s.forward(&toks(&refs.ints("seq0.tokens")), Logits::Last).unwrap();
        for l in 1..=4u32 {
            let c = s.compressed_cache(l).unwrap();
            let (rows, keys) = c.compressed_rows();
            let want = refs.f32s(&format!("seq0.layer{l}.compressed_kv"));
            let d = rows.unwrap().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert_eq!(rows.unwrap().len(), want.len(), "layer {l} compressed rows");
            assert!(d <= 1e-4, "layer {l} compressed rows differ by {d}");
            let name = format!("seq0.layer{l}.indexer_kv");
            if refs.has(&name) {
                let want = refs.f32s(&name);
                let keys = keys.unwrap();
                assert_eq!(keys.len(), want.len());
                let d = keys.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d <= 1e-4, "layer {l} indexer keys differ by {d}");
            }
        }
        println!("{form}: worst max|Δ| against transformers: {worst:.2e} (tolerance {TOL})");
    }
}

#[test]
fn fusion_pass_keeps_the_logits_bit_for_bit() {
    let (m, w) = import();
    let (f, fw, details) = fused();
    // Six attentions: two sliding-window, two CSA (with the indexer), two HCA.
    assert_eq!(details["fused"], 6, "{details}");
    assert_eq!(details["by_kind"]["compressed sparse (CSA)"], 2, "{details}");
    assert_eq!(details["by_kind"]["heavily compressed (HCA)"], 2, "{details}");
    assert_eq!(details["by_kind"]["sliding window"], 2, "{details}");
    assert_eq!(details["left_unfused"], 0);
    let count = |m: &Module, name: &str| m.insts.iter().filter(|i| i.op.name() == name).count();
    assert_eq!((count(&m, "sparse_attention"), count(&m, "compress"), count(&m, "index_topk")), (6, 6, 2));
    assert_eq!((count(&f, "compressed_attention"), count(&f, "compress"), count(&f, "sparse_attention")), (6, 0, 0));
    // The fused graph is exactly what the unfused ops compute, step by step.
    let refs = Refs::open();
    let tokens = toks(&refs.ints("seq1.tokens"));
    let (mut a, mut b) = (session(&m, &w), session(&f, &fw));
    assert_eq!(a.forward(&tokens[..50], Logits::All).unwrap(), b.forward(&tokens[..50], Logits::All).unwrap());
    for t in &tokens[50..70] {
        assert_eq!(a.forward(&[*t], Logits::Last).unwrap(), b.forward(&[*t], Logits::Last).unwrap());
    }
    // Fusing a fused module finds nothing to do.
    let (mut again, mut aw) = (f.module().clone(), Weights::default());
    let r = kiln_passes::by_name("fuse_sparse_attention")
        .unwrap()
        .run(
            &mut again,
            &mut aw,
            &kiln_passes::PassCtx {
                options: &serde_json::Value::Null,
                device: "",
                base_dir: Path::new("."),
                calibration: Default::default(),
                memo: None,
            },
        )
        .unwrap();
    assert_eq!(r.details["fused"], 0);
    // A checkpoint run as it is gets the fused form.
    let loaded = kiln_runtime::Model::load(&fixture().join("tiny")).unwrap();
    assert_eq!(count(&loaded.module, "compressed_attention"), 6);
}

/// The unfused form on the CPU backend (each op its own step, the reference's sparse
/// attention) against the fused kernel's timing: the pass's point, measured here only
/// for agreement — `cargo xtask bench attention` times them.
#[test]
fn cpu_backend_runs_the_unfused_form_too() {
    let (m, w) = import();
    let cpu = kiln_cpu::CpuBackend::with_isa(kiln_cpu::Isa::detect());
    assert!(kiln_backends::first_unsupported(&cpu, &m).is_none());
    let opts = SessionOptions { max_context: 256, threads: 2, ..Default::default() };
    let new = || cpu.prepare(m.clone(), w.clone(), &opts).unwrap();
    reproduce("cpu, unfused", &new, CPU_TOL, 1e-8);
}

#[test]
fn kv_cache_memory_is_window_plus_compressed_rows() {
    let (m, w) = import();
    let refs = Refs::open();
    let tokens = toks(&refs.ints("seq0.tokens"));
    let mut s = session(&m, &w);
    // Past the raw window and on a multiple of every ratio, so no compressor holds an
    // open window: what remains is the constant window plus compressed rows.
    s.forward(&tokens[..64], Logits::Last).unwrap();
    let at64 = s.kv_cache_bytes();
    s.forward(&tokens[64..128], Logits::Last).unwrap();
    let at128 = s.kv_cache_bytes();
    let per_token = (at128 - at64) as f64 / 64.0;
    println!("KV cache: {at64} B at 64 tokens, {at128} B at 128 tokens: {per_token} B per token (f32)");
    // README: 2·(64 + 32) + 2·16 = 224 B per token; the raw windows 6·15·64·4 = 23,040 B.
    assert_eq!(per_token, 224.0);
    // Plus, per CSA layer, the first half of the last closed window and its gate, for the
    // overlap with the next one: 4·(64 + 32)·2·4 = 3,072 B.
    let raw = 6 * 15 * 64 * 4;
    assert_eq!(at128 - raw, 128 * 224 + 2 * 3072, "raw windows, compressed rows and CSA overlap state");
}

#[test]
fn rollback_within_the_last_call_is_exact() {
    for (_, m, w) in forms() {
        rollback_case(&m, &w);
    }
}

fn rollback_case(m: &Arc<VerifiedModule>, w: &Arc<dyn WeightSource>) {
    let new = || Box::new(session(m, w)) as Box<dyn Session>;
    rollback_checks(&new, true);
}

/// Rollback into the last call is exact on a session that `new` makes: a longer call rolled
/// back into itself (a window of every ratio closes again) and the same tokens again, other
/// tokens in between, and back to 0 from anywhere (a fresh session's logits). With
/// `refuses_beyond`, a rollback further back than the last call is refused with a clear
/// message, not wrong logits (the device sessions' rings hold a whole chunk, the fixture's
/// whole context, so they have no such case here).
fn rollback_checks(new: &dyn Fn() -> Box<dyn Session>, refuses_beyond: bool) {
    let refs = Refs::open();
    let tokens = toks(&refs.ints("seq0.tokens"));
    let mut a = new();
    a.forward(&tokens[..40], Logits::Last).unwrap();
    let want = a.forward(&tokens[40..45], Logits::All).unwrap();
    let mut b = new();
    b.forward(&tokens[..30], Logits::Last).unwrap();
    b.forward(&tokens[30..50], Logits::Last).unwrap();
    b.truncate(40);
    assert_eq!(b.pos(), 40);
    let got = b.forward(&tokens[40..45], Logits::All).unwrap();
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(got, want, "max diff {d}");
    // Different tokens after a rollback overwrite what the caches held.
    let mut c = new();
    c.forward(&tokens[..40], Logits::Last).unwrap();
    c.forward(&tokens[60..70], Logits::Last).unwrap();
    c.truncate(40);
    assert_eq!(c.forward(&tokens[40..45], Logits::All).unwrap(), want);
    if refuses_beyond {
        b.truncate(20);
        let e = b.forward(&tokens[20..21], Logits::Last).unwrap_err().to_string();
        assert!(e.contains("rolled back"), "{e}");
    }
    b.truncate(0);
    assert_eq!(b.forward(&tokens[..40], Logits::Last).unwrap(), new().forward(&tokens[..40], Logits::Last).unwrap());
}

#[test]
fn new_ops_round_trip_and_verify() {
    let ops = ["repeat", "hc_coeffs", "hc_pre", "hc_post", "moe_route", "moe", "grouped_matmul"];
    for (form, m, _) in forms() {
        let module: &Module = &m;
        let text = kiln_ir::print(module);
        let own: &[&str] =
            if form == "fused" { &["compressed_attention"] } else { &["compress", "index_topk", "sparse_attention"] };
        for op in ops.iter().chain(own) {
            assert!(text.contains(&format!(" = {op} ")), "the printed {form} module has no `{op}`");
        }
        let back = kiln_ir::parse(&text).unwrap();
        assert_eq!(&back, module);
        assert_eq!(kiln_ir::print(&back), text);
        kiln_ir::verify(back).unwrap();
    }
    // The unfused ops' rules: a compressor must feed its slot's attention, an indexer reads
    // index keys, a slot's streams share the attention's rotary table.
    let (m, _) = import();
    let text = kiln_ir::print(&m);
    let unfused_err = |from: &str, to: &str| {
        assert!(text.contains(from), "{from}");
        let bad = text.replacen(from, to, 1);
        kiln_ir::verify(kiln_ir::parse(&bad).unwrap()).unwrap_err().to_string()
    };
    let e = unfused_err(", index=1,", ",");
    assert!(e.contains("compressed-row stream is already written"), "{e}");
    let mut bad: Module = m.module().clone();
    let g = kiln_ir::analysis::sparse_groups(&bad).into_iter().find(|g| g.topk.is_some()).unwrap();
    if let Op::IndexTopk { keys, .. } = &mut bad.insts[g.topk.unwrap()].op {
        *keys = kiln_ir::ValueId(g.comp.unwrap() as u32);
    }
    let e = kiln_ir::verify(bad).unwrap_err().to_string();
    // (The fixture's compressed rows are wider than its index keys: the type rule says so first.)
    assert!(e.contains("= index_topk") && e.contains("heads×dim"), "{e}");
    let e = unfused_err("ratio=4", "ratio=8");
    assert!(e.contains("ape"), "{e}");
    let (f, _, _) = fused();
    let module: &Module = &f;
    let text = kiln_ir::print(module);
    // Type rules: a wrong ratio for the compressor's gate bias, and a shared slot.
    let bad = text.replacen("ratio=4", "ratio=8", 1);
    let e = kiln_ir::verify(kiln_ir::parse(&bad).unwrap()).unwrap_err().to_string();
    assert!(e.contains("ape"), "{e}");
    let bad = text.replacen("cache=1,", "cache=0,", 1);
    let e = kiln_ir::verify(kiln_ir::parse(&bad).unwrap()).unwrap_err().to_string();
    assert!(e.contains("slot 0 is already written"), "{e}");
    let bad = text.replacen("scoring=sqrtsoftplus", "scoring=relu", 1);
    let e = kiln_ir::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown scoring `relu`"), "{e}");
}

#[test]
fn other_backends_refuse_the_new_ops_by_name() {
    let (m, _) = import();
    let (f, _, _) = fused();
    // The fixed-point backend refuses DeepSeek-V4's ops by name.
    let fixed = kiln_fixed::FixedBackend::new();
    let what = kiln_backends::first_unsupported(&fixed, &m).expect("fixed accepts");
    assert!(what.starts_with("op `repeat`"), "fixed: {what}");
    for inst in m.insts.iter().chain(&f.insts) {
        if matches!(
            inst.op,
            Op::CompressedAttention { .. }
                | Op::Compress { .. }
                | Op::IndexTopk { .. }
                | Op::SparseAttention { .. }
                | Op::Moe { .. }
                | Op::MoeRoute { .. }
                | Op::HcCoeffs { .. }
        ) {
            assert!(!fixed.supports(&m, &inst.op), "fixed: {}", inst.op.name());
        }
    }
    // The PTX backend, and wgpu and Metal with its launch sequence and WGSL twins of its
    // kernels, run the fused form and refuse only the unfused attention ops.
    let backends: Vec<Box<dyn Backend>> = vec![
        Box::new(kiln_ptx::PtxBackend { target: kiln_ptx::Target::Emulator }),
        Box::new(kiln_wgpu::WgpuBackend::new()),
        Box::new(kiln_metal::MetalBackend::new()),
    ];
    for b in &backends {
        let name = b.name();
        assert!(kiln_backends::first_unsupported(b.as_ref(), &f).is_none(), "{name}");
        let what = kiln_backends::first_unsupported(b.as_ref(), &m).expect("accepts the unfused form");
        assert!(
            ["compress", "index_topk", "sparse_attention"].iter().any(|op| what.starts_with(&format!("op `{op}`"))),
            "{name}: {what}"
        );
        for inst in &m.insts {
            let unfused = matches!(inst.op, Op::Compress { .. } | Op::IndexTopk { .. } | Op::SparseAttention { .. });
            assert_eq!(b.supports(&m, &inst.op), !unfused, "{name}: {}", inst.op.name());
        }
    }
}

fn copy_fixture(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-dsv4-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join("tiny").join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn bad_checkpoints_give_errors_naming_the_file() {
    let d = copy_fixture("scoring");
    edit_config(&d, |v| v["scoring_func"] = "tanh".into());
    let e = kiln_frontend::hf::import_dir_graph(&d).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("unsupported") && e.contains("scoring_func `tanh`"), "{e}");

    edit_config(&d, |v| {
        v["scoring_func"] = "sqrtsoftplus".into();
        v["layer_types"][2] = "linear_attention".into();
    });
    let e = kiln_frontend::hf::import_dir_graph(&d).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("linear_attention"), "{e}");

    std::fs::remove_dir_all(&d).ok();

    // A checkpoint without one tensor: the error names the file and the tensor.
    let d = copy_fixture("missing");
    let st = SafetensorsFile::open(&d.join("model.safetensors")).unwrap();
    let keep: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| *n != "model.layers.3.attn.indexer.wq_b.weight")
        .map(str::to_string)
        .collect();
    let infos: Vec<_> =
        keep.iter().map(|n| (st.info(n).unwrap().dtype.name(), st.info(n).unwrap().shape.clone())).collect();
    let tensors: Vec<_> = keep
        .iter()
        .zip(&infos)
        .map(|(n, (dtype, shape))| kiln_frontend::safetensors::WriteTensor {
            name: n,
            dtype,
            shape,
            data: st.raw_bytes(n).unwrap(),
        })
        .collect();
    let bytes = kiln_frontend::safetensors::write(&tensors, &Default::default());
    drop(st);
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    let e = kiln_frontend::hf::import_dir_graph(&d).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("missing tensor blk.3.attn_idx_q.weight"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn kiln_ir_dump_prints_the_imported_graph() {
    let dir = fixture().join("tiny");
    let out = common::run(&["ir", "dump", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert!(text.contains("meta arch = \"deepseek_v4\""), "{text}");
    // The importer's form: unfused (the fusion is a pass).
    assert_eq!(text.matches(" = sparse_attention ").count(), 6);
    assert_eq!(text.matches(" = compress ").count(), 6);
    assert_eq!(text.matches(" = index_topk ").count(), 2);
    kiln_ir::verify(kiln_ir::parse(&text).unwrap()).unwrap();
}

/// The CPU backend's budget against transformers: its fused compressed-attention kernel
/// sums in f32 (the reference in f64) and its matmuls take llama.cpp's rounding.
const CPU_TOL: f64 = 1e-4;

#[test]
fn cpu_backend_reproduces_transformers_logits() {
    // The CPU backend runs the graph walk of the reference with its own kernels: SIMD
    // matmuls, the fused compressed attention (indexer top-k, window ∪ chosen rows ∪ sink,
    // online softmax), the reference's cache and compressors. Both instruction-set paths.
    let (m, w, _) = fused();
    for isa in [kiln_cpu::Isa::detect(), kiln_cpu::Isa::Scalar] {
        let cpu = kiln_cpu::CpuBackend::with_isa(isa);
        assert!(kiln_backends::first_unsupported(&cpu, &m).is_none());
        let opts = SessionOptions { max_context: 256, threads: 2, ..Default::default() };
        let new = || cpu.prepare(m.clone(), w.clone(), &opts).unwrap();
        let worst = reproduce(&format!("cpu ({})", isa.name()), &new, CPU_TOL, 1e-8);
        println!("cpu ({}): worst max|Δ| against transformers: {worst:.2e} (tolerance {CPU_TOL})", isa.name());
    }
}

/// The fixture quantized by the `quantize` pass with `options`, and its seq1 logits.
fn quantized(options: serde_json::Value) -> (Module, Vec<f32>) {
    let (mut m, mut w) = kiln_frontend::hf::import_dir_graph(&fixture().join("tiny")).unwrap();
    kiln_passes::run_pipeline(
        &mut m,
        &mut w,
        &[("quantize".into(), options)],
        &kiln_passes::PipelineCtx {
            device: "laptop",
            base_dir: &fixture(),
            calibration: kiln_passes::Calibration::default(),
            memo: None,
        },
        &mut |_| {},
    )
    .unwrap();
    let vm = Arc::new(kiln_ir::verify(m.clone()).unwrap());
    let w: Arc<dyn WeightSource> = Arc::new(W(w));
    let tokens = toks(&Refs::open().ints("seq1.tokens"));
    let logits = session(&vm, &w).forward(&tokens, Logits::All).unwrap();
    (m, logits)
}

#[test]
fn quantize_pass_sees_experts_and_grouped_projections() {
    // Stacked experts, shared experts and the grouped output projection are ordinary params
    // the quantize pass rewrites (as E·I rows for stacked experts); the reference runs them.
    let want = Refs::open().f32s("seq1.full_logits");
    let rules = serde_json::json!({"rules": {"_exps": "q8_0", "_shexp": "q8_0", "attn_output_a": "q8_0"}});
    let (m, got) = quantized(rules);
    for name in [
        "blk.3.ffn_gate_exps.weight",
        "blk.3.ffn_down_exps.weight",
        "blk.0.attn_output_a.weight",
        "blk.5.ffn_up_shexp.weight",
    ] {
        let p = m.param_by_name(name).unwrap();
        assert_eq!(m.param(p).ty.dtype, kiln_ir::DType::Q8_0, "{name}");
    }
    assert_eq!(m.param(m.param_by_name("blk.3.ffn_gate_inp.weight").unwrap()).ty.dtype, kiln_ir::DType::F32);
    let (max, kl) = compare(&got, &want, 256);
    println!("q8_0 experts + grouped projection, seq1 full prefill: max|Δ| {max:.2e}  mean KL {kl:.2e}");
    // This random model is sensitive: q8_0 on any one matrix kind (even an ordinary matmul
    // such as attn_q_b) flips some router or indexer top-k choices and moves a few logits by
    // up to ~0.9, at a mean KL of 1e-4..1e-3. So the budget here only catches gross errors.
    assert!(kl < 1e-2, "q8_0 experts: mean KL {kl}");
    // Everything in q8_0, routers, hyper-connection mixes and indexer included: the tiny
    // random model's discrete choices (router top-k, indexer top-k) flip on some tokens.
    let (_, all) = quantized(serde_json::json!({"default": "q8_0"}));
    let (max, kl) = compare(&all, &want, 256);
    println!("q8_0 everywhere, seq1 full prefill: max|Δ| {max:.2e}  mean KL {kl:.2e}");
    assert!(kl < 1e-2, "q8_0 everywhere: mean KL {kl}");
}

#[test]
fn official_tensor_names_import_to_the_same_module() {
    // The official checkpoints spell tensors without `model.` and with upstream names
    // (`embed.weight`, `hc_head_fn`); the fixture has Hugging Face's spelling.
    let d = copy_fixture("official");
    let st = SafetensorsFile::open(&d.join("model.safetensors")).unwrap();
    let official = |n: &str| {
        let n = n.strip_prefix("model.").unwrap_or(n);
        match n {
            "embed_tokens.weight" => "embed.weight".to_string(),
            "hc_head.hc_fn" => "hc_head_fn".into(),
            "hc_head.hc_base" => "hc_head_base".into(),
            "hc_head.hc_scale" => "hc_head_scale".into(),
            _ => n.to_string(),
        }
    };
    let names: Vec<(String, String)> = st.names().into_iter().map(|n| (n.to_string(), official(n))).collect();
    assert!(names.iter().any(|(a, b)| a == "model.embed_tokens.weight" && b == "embed.weight"));
    let infos: Vec<_> =
        names.iter().map(|(n, _)| (st.info(n).unwrap().dtype.name(), st.info(n).unwrap().shape.clone())).collect();
    let tensors: Vec<_> = names
        .iter()
        .zip(&infos)
        .map(|((n, o), (dtype, shape))| kiln_frontend::safetensors::WriteTensor {
            name: o,
            dtype,
            shape,
            data: st.raw_bytes(n).unwrap(),
        })
        .collect();
    let bytes = kiln_frontend::safetensors::write(&tensors, &Default::default());
    drop(st);
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    let (m1, w1) = kiln_frontend::hf::import_dir_graph(&d).unwrap();
    let (m0, w0) = kiln_frontend::hf::import_dir_graph(&fixture().join("tiny")).unwrap();
    assert_eq!(kiln_ir::print(&m1).replace(&format!("{:?}", m1.name), &format!("{:?}", m0.name)), kiln_ir::print(&m0));
    for i in 0..m0.params.len() {
        let p = ParamId(i as u32);
        assert_eq!(w1.bytes(p), w0.bytes(p), "@{}", m0.param(p).name);
    }
    std::fs::remove_dir_all(&d).ok();
}

/// DeepSeek-V4's precision split as a recipe (`recipes/deepseek-v4-tiny-2bit-experts.yaml`):
/// routed experts in kq2 (the fixture's 32-wide down projections fall back to iq4_nl, which
/// kq2's 64-value blocks do not divide), everything else q8_0; the build runs on the CPU
/// backend and its manifest carries the quality report against the source.
#[test]
fn two_bit_experts_recipe_builds_and_reports_its_quality() {
    let dir = common::tempdir("dsv4-2bit");
    let recipe = common::root().join("recipes/deepseek-v4-tiny-2bit-experts.yaml");
    let out = dir.join("out");
    let o = common::run(&[
        "compile",
        "--recipe",
        recipe.to_str().unwrap(),
        "--device",
        "laptop",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let build = out.join("deepseek-v4-tiny-2bit-experts/laptop");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    let quant = manifest["passes"].as_array().unwrap().iter().find(|p| p["pass"] == "quantize").unwrap();
    let formats: std::collections::BTreeMap<String, String> = quant["details"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tensor"].as_str().unwrap().to_string(), t["format"].as_str().unwrap().to_string()))
        .collect();
    let layers = 6;
    for l in 0..layers {
        for kind in ["ffn_gate_exps", "ffn_up_exps"] {
            assert_eq!(formats[&format!("blk.{l}.{kind}.weight")], "kq2", "blk.{l}.{kind}");
        }
        assert_eq!(formats[&format!("blk.{l}.ffn_down_exps.weight")], "iq4_nl", "blk.{l}.ffn_down_exps");
        assert_eq!(formats[&format!("blk.{l}.ffn_gate_shexp.weight")], "q8_0");
    }
    assert!(formats.values().filter(|f| *f == "kq2").count() == 2 * layers);
    let q = &manifest["quality"];
    let (kl, top1) = (q["kl_mean"].as_f64().unwrap(), q["top1_agreement"].as_f64().unwrap());
    eprintln!("2-bit experts on the tiny random model: mean KL {kl:.4}, top-1 agreement {top1:.3}");
    // A random model's router and indexer top-k flip easily (see above): the bounds catch
    // a broken build (chance agreement is 1/256), not a quality target.
    assert!(kl.is_finite() && kl < 0.5, "{q}");
    assert!(top1 > 0.3, "{q}");
    let run = common::run(&["run", build.to_str().unwrap(), "-p", "Once upon", "-n", "4"]);
    assert!(run.status.success(), "{}", common::stderr(&run));
}

/// The PTX backend's budget against transformers (the emulator runs the same kernels as
/// the GPU): f32 sums throughout (the reference sums long dots in f64), `ex2.approx` in
/// every softmax, sigmoid and SiLU.
const PTX_TOL: f64 = 1e-4;

fn ptx_options() -> SessionOptions {
    SessionOptions { max_context: 256, threads: 2, ..Default::default() }
}

/// The fused form on the PTX backend, on kiln's SIMT emulator: hyper-connections, routing,
/// the experts through the stacked-experts matmul over gathered rows, the grouped output
/// projection and the compressed attention with its device cache (rings by position,
/// compressed rows by window), prefill, decode (a recorded launch sequence replayed each
/// step) and chunked prefill.
#[test]
fn ptx_backend_reproduces_transformers_logits() {
    let (m, w, _) = fused();
    let ptx = kiln_ptx::PtxBackend { target: kiln_ptx::Target::Emulator };
    assert!(kiln_backends::first_unsupported(&ptx, &m).is_none());
    let new = || ptx.prepare(m.clone(), w.clone(), &ptx_options()).unwrap();
    let worst = reproduce("ptx (emulator)", &new, PTX_TOL, 1e-8);
    println!("ptx (emulator): worst max|Δ| against transformers: {worst:.2e} (tolerance {PTX_TOL})");
}

/// Rolling the PTX session back within its rings is exact (it recomputes the windows that
/// close again), also with other tokens in between, and a restart at 0 is a fresh session.
/// (A rollback of more than a chunk, which the rings may no longer hold, is refused by the
/// session's `RollbackGuard`; the fixture's chunk is the whole context.)
#[test]
fn ptx_rollback_is_exact_within_a_chunk() {
    let (m, w, _) = fused();
    let ptx = kiln_ptx::PtxBackend { target: kiln_ptx::Target::Emulator };
    rollback_checks(&|| ptx.prepare(m.clone(), w.clone(), &ptx_options()).unwrap(), false);
}

/// The same cases on a real NVIDIA GPU through the CUDA driver (feature `cuda`): prefill,
/// decode through a CUDA graph, chunked prefill. Without a driver it skips with a printed
/// reason, or fails under `KILN_REQUIRE_GPU=1`.
#[cfg(feature = "cuda")]
#[test]
fn ptx_backend_on_the_gpu_reproduces_transformers_logits() {
    if !kiln_ptx::cuda::driver_present() {
        let msg = "no CUDA driver on this machine: the DeepSeek-V4 GPU test did not run";
        if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let (m, w, _) = fused();
    let ptx = kiln_ptx::PtxBackend { target: kiln_ptx::Target::Cuda };
    let new = || ptx.prepare(m.clone(), w.clone(), &ptx_options()).unwrap();
    let worst = reproduce("ptx (cuda)", &new, PTX_TOL, 1e-8);
    println!("ptx (cuda): worst max|Δ| against transformers: {worst:.2e} (tolerance {PTX_TOL})");
}

/// The wgpu backend's budget against transformers: f32 sums as on PTX (in other orders
/// where no top-k decision depends on them: attention, RMSNorm), the adapter's `exp`.
const WGPU_TOL: f64 = 1e-4;

/// Whether wgpu finds an adapter (Mesa's lavapipe in CI); without one the wgpu tests skip
/// with a message, or fail under `KILN_REQUIRE_WGPU=1`.
fn have_wgpu_adapter() -> bool {
    match kiln_wgpu::device::open_device() {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var("KILN_REQUIRE_WGPU").as_deref() != Ok("1"), "KILN_REQUIRE_WGPU=1 but {e}");
            eprintln!("SKIPPED (no wgpu adapter): {e}");
            false
        }
    }
}

/// The fused form on the wgpu backend (the PTX launch sequence with the WGSL kernels; on
/// lavapipe in CI): prefill, decode one token per call (a recorded launch sequence
/// replayed each step), chunked prefill, against transformers' logits.
#[test]
fn wgpu_backend_reproduces_transformers_logits() {
    if !have_wgpu_adapter() {
        return;
    }
    let (m, w, _) = fused();
    let wgpu = kiln_wgpu::WgpuBackend::new();
    assert!(kiln_backends::first_unsupported(&wgpu, &m).is_none());
    let new = || wgpu.prepare(m.clone(), w.clone(), &ptx_options()).unwrap();
    let worst = reproduce("wgpu", &new, WGPU_TOL, 1e-8);
    println!("wgpu: worst max|Δ| against transformers: {worst:.2e} (tolerance {WGPU_TOL})");
}

/// Rolling a wgpu session back within the last call is exact, as on PTX (the same device
/// cache by position).
#[test]
fn wgpu_rollback_is_exact_within_a_chunk() {
    if !have_wgpu_adapter() {
        return;
    }
    let (m, w, _) = fused();
    let wgpu = kiln_wgpu::WgpuBackend::new();
    rollback_checks(&|| wgpu.prepare(m.clone(), w.clone(), &ptx_options()).unwrap(), false);
}
