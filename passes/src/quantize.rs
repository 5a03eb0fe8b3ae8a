//! `quantize`: stores matmul weights and embedding tables in quantized formats,
//! by tensor-name rules or to a bits-per-weight budget, using the calibration's
//! importance matrix to weight rounding errors.
//!
//! Options (recipe YAML):
//! ```yaml
//! - quantize:
//!     default: q4_k              # format of every matmul weight / embedding table
//!     rules:                     # name pattern → format; later rules win; `keep` leaves a tensor as stored
//!       attn_v: q6_k
//!       ffn_down: q4_k
//!       token_embd: q8_0
//!     target_bpw: 4.5            # optional: choose formats per tensor to meet this budget
//!     candidates: [kq2, q2_k, q3_k, iq4_nl, q4_k, q5_k, q6_k, q8_0]   # formats target_bpw may choose from (this list is the default)
//!     sensitivity: measured      # optional: weigh errors by their measured effect on calibration perplexity
//! ```
//! Patterns match a substring of the tensor name, or a glob with `*`. Format
//! names are kiln dtype names (`q4_k`, `q8_0`, …) or the short aliases `q2`…`q8`.
//!
//! A tensor already stored in the format it is given keeps its stored bytes:
//! requantizing it (dequantize, then round again, as llama.cpp's
//! `--allow-requantize` does) could only add error, so the budget sees that
//! format at zero error and the report marks the tensor `unchanged`.
//!
//! Rows whose length is not a multiple of a format's block fall back to the
//! nearest format that fits, as llama.cpp does (Q2_K/Q3_K → Q4_0, Q4_K → Q5_0,
//! Q5_K → Q5_1, Q6_K → Q8_0); the report lists every fallback.
//!
//! With `target_bpw`, every candidate format of every tensor is tried on a
//! sample of its rows and its importance-weighted squared error measured
//! (`Σ_j imp_j (w_ij − q_ij)²`, the expected squared error of the output when
//! the input channels have mean squares `imp`); all tensors start at their
//! cheapest format and the upgrade with the largest error reduction per extra
//! bit is taken while the budget allows. Bits per weight count every
//! parameter's bytes (norms and embeddings included), as llama.cpp does.
//!
//! `sensitivity: measured` (with `target_bpw` and the recipe's calibration text)
//! replaces the assumption that equal weighted errors cost equally: the tensors
//! are grouped by kind and third of the layer stack (`attn_v@0`, `ffn_down@2`,
//! `token_embd.weight`, …), each group alone is quantized to its smallest format
//! and the calibration perplexity measured, and each group's errors are scaled by
//! its measured rise in log perplexity per unit of error. One perplexity run per
//! group (about 22 for a Llama), so it is opt-in; the report lists every group's
//! measurement.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_frontend::{TensorBytes, Weights};
use kiln_ir::{DType, Module, Op, ParamId};
use rayon::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Importance, Memo, Pass, PassCtx, PassError, PassReport};

pub struct Quantize;

const NAME: &str = "quantize";

fn bad(msg: impl Into<String>) -> PassError {
    PassError::BadOptions { pass: NAME, msg: msg.into() }
}

/// A rule's target: a format, or keep the tensor as stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Keep,
    To(DType),
}

fn parse_format(s: &str) -> Result<Target, PassError> {
    let name = match s {
        "keep" => return Ok(Target::Keep),
        "q2" => "q2_k",
        "q3" => "q3_k",
        "q4" => "q4_k",
        "q5" => "q5_k",
        "q6" => "q6_k",
        "q8" => "q8_0",
        other => other,
    };
    DType::from_name(name)
        .filter(|d| *d != DType::I32)
        .map(Target::To)
        .ok_or_else(|| bad(format!("unknown format `{s}` (use a dtype name such as q4_k or q8_0, q2…q8, or keep)")))
}

/// `pattern` matches `name` as a substring, or as a glob when it has `*`.
fn matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else { return false };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

struct Options {
    default: Option<Target>,
    rules: Vec<(String, Target)>,
    target_bpw: Option<f64>,
    candidates: Vec<DType>,
    /// `target_bpw` weighs each tensor's error by its group's measured effect on the
    /// calibration perplexity (`sensitivity: measured`) instead of taking it as is.
    measured: bool,
}

fn parse_options(v: &Value) -> Result<Options, PassError> {
    let obj = match v {
        Value::Null => return Err(bad("needs `default: FORMAT` or `target_bpw: N`")),
        Value::Object(o) => o,
        _ => return Err(bad("options must be a mapping")),
    };
    for k in obj.keys() {
        if !["default", "rules", "target_bpw", "candidates", "sensitivity"].contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown option `{k}` (known: default, rules, target_bpw, candidates, sensitivity)"
            )));
        }
    }
    let default = obj
        .get("default")
        .map(|d| d.as_str().ok_or_else(|| bad("`default` must be a format name")).and_then(parse_format))
        .transpose()?;
    let mut rules = vec![];
    match obj.get("rules") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (p, f) in m {
                let f = f.as_str().ok_or_else(|| bad(format!("rule `{p}`: the format must be a string")))?;
                rules.push((p.clone(), parse_format(f)?));
            }
        }
        Some(Value::Array(list)) => {
            for r in list {
                let (p, f) = match r.as_object().map(|o| (o.get("match"), o.get("type"))) {
                    Some((Some(Value::String(p)), Some(Value::String(f)))) => (p, f),
                    _ => return Err(bad("each rule in a list must be `{match: PATTERN, type: FORMAT}`")),
                };
                rules.push((p.clone(), parse_format(f)?));
            }
        }
        Some(_) => return Err(bad("`rules` must map patterns to formats")),
    }
    let target_bpw = obj
        .get("target_bpw")
        .map(|t| {
            t.as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| bad("`target_bpw` must be a positive number"))
        })
        .transpose()?;
    let candidates = match obj.get("candidates") {
        None => vec![DType::KQ2, DType::Q2K, DType::Q3K, DType::IQ4NL, DType::Q4K, DType::Q5K, DType::Q6K, DType::Q8_0],
        Some(Value::Array(list)) => list
            .iter()
            .map(|c| match c.as_str().map(parse_format) {
                Some(Ok(Target::To(d))) => Ok(d),
                _ => Err(bad(format!("candidate {c} is not a format"))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`candidates` must be a list of formats")),
    };
    if default.is_none() && target_bpw.is_none() && rules.is_empty() {
        return Err(bad("needs `default`, `rules` or `target_bpw`"));
    }
    let measured = match obj.get("sensitivity").map(|v| v.as_str()) {
        None | Some(Some("weights")) => false,
        Some(Some("measured")) => true,
        Some(_) => return Err(bad("`sensitivity` must be `weights` or `measured`")),
    };
    if measured && target_bpw.is_none() {
        return Err(bad("`sensitivity: measured` only applies with `target_bpw`"));
    }
    Ok(Options { default, rules, target_bpw, candidates, measured })
}

/// The format llama.cpp falls back to when a row does not fill `d`'s blocks.
fn fallback(d: DType) -> DType {
    match d {
        DType::Q2K | DType::Q3K => DType::Q4_0,
        // kiln's own 64-blocks fall back as llama.cpp's IQ2 types do.
        DType::KQ2 => DType::IQ4NL,
        DType::Q4K => DType::Q5_0,
        DType::Q5K => DType::Q5_1,
        DType::Q6K => DType::Q8_0,
        other => other,
    }
}

/// `d`, or its fallback, for rows of `k` elements (`None` if neither fits).
fn fit(d: DType, k: u64) -> Option<DType> {
    [d, fallback(d), DType::Q8_0, DType::F16].into_iter().find(|t| k.is_multiple_of(t.block_elems()))
}

/// A weight the pass may quantize: its rows, row length and stored dtype.
#[derive(Clone)]
struct Candidate {
    param: ParamId,
    name: String,
    rows: u64,
    k: u64,
    dtype: DType,
}

/// Parameters used as matmul weights (plain, grouped, or stacked experts `[E, rows, k]`) or embedding tables.
fn quantizable(m: &Module) -> Vec<Candidate> {
    let mut used = BTreeSet::new();
    for inst in &m.insts {
        match &inst.op {
            Op::MatMul { w, .. } => {
                used.insert(*w);
            }
            Op::Embed { table, .. } => {
                used.insert(*table);
            }
            Op::GroupedMatMul { w, .. } => {
                used.insert(*w);
            }
            // Stacked experts `[E, rows, k]` quantize as `E·rows` rows of `k`.
            Op::Moe { gate, up, down, shared, .. } => {
                used.extend([*gate, *up, *down]);
                if let Some(s) = shared {
                    used.extend([s.gate, s.up, s.down]);
                }
            }
            _ => {}
        }
    }
    used.into_iter()
        .filter_map(|p| {
            let param = m.param(p);
            let (rows, k) = match param.ty.fixed_dims()?.as_slice() {
                [rows, k] => (*rows, *k),
                [e, rows, k] => (e * rows, *k),
                _ => return None,
            };
            Some(Candidate { param: p, name: param.name.clone(), rows, k, dtype: param.ty.dtype })
        })
        .collect()
}

/// The tensor's rows as f32.
fn to_f32(c: &Candidate, bytes: &[u8]) -> Result<Vec<f32>, PassError> {
    let k = c.k as usize;
    let mut out = vec![0f32; c.rows as usize * k];
    let row_bytes = bytes.len() / (c.rows as usize).max(1);
    out.par_chunks_mut(k.max(1)).zip(bytes.par_chunks(row_bytes.max(1))).try_for_each(|(o, r)| {
        kiln_quant::dequantize_row(c.dtype, r, o)
            .map_err(|e| PassError::Unsupported { pass: NAME, msg: format!("{}: {e}", c.name) })
    })?;
    Ok(out)
}

/// Whether `c` (stored bytes `src`) is already stored in `d`, so quantizing it to `d`
/// keeps its bytes.
fn unchanged(c: &Candidate, src: &[u8], d: DType) -> bool {
    c.dtype == d && d.row_bytes(c.k).is_some_and(|b| (b * c.rows) as usize == src.len())
}

/// Quantizes rows of `k` values to `d`, weighting errors by `imp` when given.
fn quantize_rows(name: &str, d: DType, data: &[f32], k: usize, imp: Option<&[f32]>) -> Result<Vec<u8>, PassError> {
    let row_bytes = d.row_bytes(k as u64).unwrap_or(0) as usize;
    let rows = data.len() / k.max(1);
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes.max(1)).zip(data.par_chunks(k.max(1))).try_for_each(|(o, r)| {
        kiln_quant::quantize_row_weighted(d, r, imp, o)
            .map_err(|e| PassError::Unsupported { pass: NAME, msg: format!("{name}: {} ({e})", d.name()) })
    })?;
    Ok(out)
}

/// Quantizing and error sampling through the driver's memo (when there is one),
/// keyed by everything the result depends on: the tensor's stored bytes and dtype,
/// its shape, the format and the importance. Counts what the memo saved.
struct Cached<'a> {
    memo: Option<&'a dyn Memo>,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

impl<'a> Cached<'a> {
    fn new(memo: Option<&'a dyn Memo>) -> Self {
        Cached { memo, hits: AtomicUsize::new(0), misses: AtomicUsize::new(0) }
    }

    fn key(what: &str, c: &Candidate, src: &[u8], d: DType, imp: Option<&[f32]>) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in ["kiln.quantize.v1", what, c.dtype.name(), d.name()] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(c.rows.to_le_bytes());
        h.update(c.k.to_le_bytes());
        match imp {
            Some(w) => {
                h.update([1]);
                for v in w {
                    h.update(v.to_le_bytes());
                }
            }
            None => h.update([0]),
        }
        h.update(src);
        h.finalize().into()
    }

    /// The stored value of `key` when it has `len` bytes.
    fn lookup(&self, key: &[u8; 32], len: usize) -> Option<Vec<u8>> {
        let v = self.memo?.get(key).filter(|v| v.len() == len)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(v)
    }

    fn store(&self, key: &[u8; 32], value: &[u8]) {
        if let Some(m) = self.memo {
            m.put(key, value);
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `c` (stored bytes `src`) quantized to `d`: its stored bytes when it is stored in `d`.
    fn quantize(&self, c: &Candidate, src: &[u8], d: DType, imp: Option<&[f32]>) -> Result<Vec<u8>, PassError> {
        let len = (d.row_bytes(c.k).unwrap_or(0) * c.rows) as usize;
        if unchanged(c, src, d) {
            return Ok(src.to_vec());
        }
        let key = self.memo.map(|_| Self::key("rows", c, src, d, imp));
        if let Some(v) = key.as_ref().and_then(|k| self.lookup(k, len)) {
            return Ok(v);
        }
        let out = quantize_rows(&c.name, d, &to_f32(c, src)?, c.k as usize, imp)?;
        if let Some(k) = &key {
            self.store(k, &out);
        }
        Ok(out)
    }

    /// [`weighted_error`] of `c` in `d` on its sample of `max_rows` rows; `data` is
    /// `c` as f32, converted from `src` when first needed.
    fn error(
        &self,
        c: &Candidate,
        src: &[u8],
        data: &mut Option<Vec<f32>>,
        d: DType,
        imp: Option<&[f32]>,
        max_rows: usize,
    ) -> Result<f64, PassError> {
        if unchanged(c, src, d) {
            return Ok(0.0);
        }
        let key = self.memo.map(|_| Self::key(&format!("error/{max_rows}"), c, src, d, imp));
        if let Some(v) = key.as_ref().and_then(|k| self.lookup(k, 8)) {
            return Ok(f64::from_le_bytes(v.try_into().unwrap_or_default()));
        }
        if data.is_none() {
            *data = Some(to_f32(c, src)?);
        }
        let err = weighted_error(c, data.as_deref().unwrap_or_default(), d, imp, max_rows)?;
        if let Some(k) = &key {
            self.store(k, &err.to_le_bytes());
        }
        Ok(err)
    }

    fn report(&self) -> Value {
        json!({"hits": self.hits.load(Ordering::Relaxed), "misses": self.misses.load(Ordering::Relaxed)})
    }
}

/// Σ_j imp_j (w_ij − q_ij)² over a sample of at most `max_rows` rows (scaled to
/// all rows), and the format's bytes for the whole tensor.
fn weighted_error(
    c: &Candidate,
    data: &[f32],
    d: DType,
    imp: Option<&[f32]>,
    max_rows: usize,
) -> Result<f64, PassError> {
    let k = c.k as usize;
    let rows = c.rows as usize;
    let step = rows.div_ceil(max_rows).max(1);
    let sample: Vec<usize> = (0..rows).step_by(step).collect();
    let row_bytes = d.row_bytes(c.k).unwrap_or(0) as usize;
    let err: f64 = sample
        .par_iter()
        .map(|&r| -> Result<f64, PassError> {
            let src = &data[r * k..(r + 1) * k];
            let mut q = vec![0u8; row_bytes];
            kiln_quant::quantize_row_weighted(d, src, imp, &mut q)
                .map_err(|e| PassError::Unsupported { pass: NAME, msg: format!("{}: {} ({e})", c.name, d.name()) })?;
            let mut back = vec![0f32; k];
            kiln_quant::dequantize_row(d, &q, &mut back)
                .map_err(|e| PassError::Unsupported { pass: NAME, msg: format!("{}: {e}", c.name) })?;
            Ok(src
                .iter()
                .zip(&back)
                .enumerate()
                .map(|(j, (a, b))| {
                    let e = f64::from(a - b);
                    imp.map_or(1.0, |w| f64::from(w[j])) * e * e
                })
                .sum())
        })
        .sum::<Result<f64, PassError>>()?;
    Ok(err * rows as f64 / sample.len().max(1) as f64)
}

/// Per tensor: its feasible candidate formats sorted by size, each with its bytes
/// and its importance-weighted error (measured on a sample of rows).
type FormatOptions = Vec<Vec<(DType, u64, f64)>>;

fn format_options(
    cands: &[Candidate],
    w: &Weights,
    imps: &[Option<Vec<f32>>],
    opts: &Options,
    cached: &Cached<'_>,
) -> Result<FormatOptions, PassError> {
    let mut options: FormatOptions = vec![];
    for (c, imp) in cands.iter().zip(imps) {
        // One tensor's f32 copy at a time keeps peak memory near the largest tensor.
        let mut data = None;
        let mut fmts: BTreeMap<u64, (DType, f64)> = BTreeMap::new();
        for &f in &opts.candidates {
            let Some(f) = fit(f, c.k) else { continue };
            let bytes = f.row_bytes(c.k).unwrap_or(0) * c.rows;
            if fmts.values().any(|(g, _)| *g == f) {
                continue;
            }
            let err = cached.error(c, w.bytes(c.param), &mut data, f, imp.as_deref(), 256)?;
            // Of two formats of one size keep the better.
            if fmts.get(&bytes).is_none_or(|(_, e)| err < *e) {
                fmts.insert(bytes, (f, err));
            }
        }
        if fmts.is_empty() {
            return Err(PassError::Unsupported {
                pass: NAME,
                msg: format!("{}: no candidate format fits rows of {}", c.name, c.k),
            });
        }
        options.push(fmts.into_iter().map(|(b, (f, e))| (f, b, e)).collect());
    }
    Ok(options)
}

/// Per-tensor formats that meet `target_bpw`: every tensor starts at its smallest
/// format, then the affordable upgrade with the largest error drop per byte is taken
/// until none fits the budget.
fn assign_by_budget(
    options: &FormatOptions,
    fixed_bytes: u64,
    total_params: u64,
    target: f64,
) -> Result<Vec<DType>, PassError> {
    let budget = (target * total_params as f64 / 8.0).floor() as u64;
    let mut choice = vec![0usize; options.len()];
    let mut used: u64 = fixed_bytes + options.iter().map(|o| o[0].1).sum::<u64>();
    if used > budget {
        return Err(PassError::Unsupported {
            pass: NAME,
            msg: format!(
                "target_bpw {target} is below the smallest build the candidates allow ({:.3} bits per weight)",
                used as f64 * 8.0 / total_params as f64
            ),
        });
    }
    loop {
        // The affordable upgrade (to any larger format) with the best error drop per byte.
        let mut best: Option<(f64, usize, usize)> = None;
        for (t, o) in options.iter().enumerate() {
            let (_, b0, e0) = o[choice[t]];
            for (j, &(_, b1, e1)) in o.iter().enumerate().skip(choice[t] + 1) {
                let extra = b1 - b0;
                if used + extra > budget || e1 >= e0 {
                    continue;
                }
                let gain = (e0 - e1) / extra as f64;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, t, j));
                }
            }
        }
        let Some((_, t, j)) = best else { break };
        used += options[t][j].1 - options[t][choice[t]].1;
        choice[t] = j;
    }
    Ok(choice.iter().zip(options).map(|(&c, o)| o[c].0).collect())
}

/// The sensitivity group of a tensor: its kind and third of the layer stack for block
/// tensors (`attn_v@0` for `blk.3.attn_v.weight` of 30 layers), else its own name.
fn sensitivity_group(name: &str, layers: usize) -> String {
    if let Some((n, kind)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.'))
        && let Ok(n) = n.parse::<usize>()
    {
        return format!("{}@{}", kind.trim_end_matches(".weight"), 3 * n / layers.max(1));
    }
    name.to_string()
}

/// Measured sensitivity (`sensitivity: measured`): per group of tensors (same kind,
/// same third of the layers), the calibration perplexity with only that group at its
/// smallest candidate format; the group's gain is the rise in log perplexity per unit
/// of its weighted error, and every error of its tensors is scaled by it, so that the
/// budget goes where the output, not the weights, suffers most. Returns the probe bytes
/// (reused when a tensor keeps its smallest format) and a report per group.
fn measure_sensitivity(
    m: &Module,
    w: &Weights,
    cands: &[Candidate],
    imps: &[Option<Vec<f32>>],
    options: &mut FormatOptions,
    measure: &crate::Measure<'_>,
    cached: &Cached<'_>,
) -> Result<(Vec<Option<TensorBytes>>, Value), PassError> {
    let fail = |e: String| PassError::Unsupported { pass: NAME, msg: format!("measuring sensitivity: {e}") };
    let layers = cands
        .iter()
        .filter_map(|c| c.name.strip_prefix("blk.")?.split_once('.')?.0.parse::<usize>().ok())
        .max()
        .map_or(1, |n| n + 1);
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in cands.iter().enumerate() {
        groups.entry(sensitivity_group(&c.name, layers)).or_default().push(i);
    }
    let base = measure(m, w).map_err(fail)?;
    let mut probes: Vec<Option<TensorBytes>> = vec![None; cands.len()];
    let mut report = serde_json::Map::new();
    for (g, members) in &groups {
        let (mut m2, mut w2) = (m.clone(), w.clone());
        let mut err = 0.0;
        for &i in members {
            let (c, (probe, _, e)) = (&cands[i], options[i][0]);
            let bytes = TensorBytes::owned(cached.quantize(c, w.bytes(c.param), probe, imps[i].as_deref())?);
            w2.tensors[c.param.index()] = bytes.clone();
            m2.params[c.param.index()].ty.dtype = probe;
            probes[i] = Some(bytes);
            err += e;
        }
        let ppl = measure(&m2, &w2).map_err(fail)?;
        // A group whose damage the calibration text cannot see still costs a little.
        let rise = (ppl.ln() - base.ln()).max(1e-4);
        let gain = if err > 0.0 { rise / err } else { 0.0 };
        for &i in members {
            for o in &mut options[i] {
                o.2 *= gain;
            }
        }
        report.insert(g.clone(), json!({"tensors": members.len(), "ppl": ppl, "log_ppl_rise": rise}));
    }
    Ok((probes, json!({"base_ppl": base, "groups": report})))
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "store matmul weights and embeddings in quantized formats (rules or a bits-per-weight budget, importance-weighted)"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        parse_options(options).map(|_| ())
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        let opts = parse_options(ctx.options)?;
        let cands = quantizable(m);
        let importance = |c: &Candidate| -> Option<Vec<f32>> {
            ctx.calibration
                .importance
                .and_then(|i: &Importance| i.get(&c.name))
                .filter(|v| v.len() as u64 == c.k)
                .map(<[f32]>::to_vec)
        };
        // The format each tensor gets from default + rules.
        let by_rule: Vec<Target> = cands
            .iter()
            .map(|c| {
                let mut t = opts.default.unwrap_or(Target::Keep);
                for (p, f) in &opts.rules {
                    if matches(p, &c.name) {
                        t = *f;
                    }
                }
                t
            })
            .collect();
        let total_params: u64 = m.params.iter().filter_map(|p| p.ty.fixed_elems()).sum();
        let imps: Vec<Option<Vec<f32>>> = cands.iter().map(importance).collect();

        let mut formats: Vec<Target> = by_rule.clone();
        let cached = Cached::new(ctx.memo);
        // Tensors already quantized while measuring sensitivity: (format, bytes).
        let mut probe_bytes: BTreeMap<usize, (DType, TensorBytes)> = BTreeMap::new();
        let mut sensitivity = Value::Null;
        if let Some(target) = opts.target_bpw {
            // Tensors a rule pins (explicitly, not by default) keep the rule's format;
            // the rest are chosen for the budget.
            let pinned: Vec<bool> = cands.iter().map(|c| opts.rules.iter().any(|(p, _)| matches(p, &c.name))).collect();
            let free: Vec<usize> = (0..cands.len()).filter(|&i| !pinned[i]).collect();
            let pinned_bytes: u64 = (0..cands.len())
                .filter(|&i| pinned[i])
                .map(|i| match by_rule[i] {
                    Target::Keep => w.bytes(cands[i].param).len() as u64,
                    Target::To(d) => {
                        fit(d, cands[i].k).and_then(|d| d.row_bytes(cands[i].k)).unwrap_or(0) * cands[i].rows
                    }
                })
                .sum();
            let fixed_bytes = pinned_bytes
                + (0..m.params.len())
                    .map(|i| ParamId(i as u32))
                    .filter(|p| !cands.iter().any(|c| c.param == *p))
                    .map(|p| w.bytes(p).len() as u64)
                    .sum::<u64>();
            let free_cands: Vec<Candidate> = free.iter().map(|&i| cands[i].clone()).collect();
            let free_imps: Vec<Option<Vec<f32>>> = free.iter().map(|&i| imps[i].clone()).collect();
            let mut options = format_options(&free_cands, w, &free_imps, &opts, &cached)?;
            if opts.measured {
                let measure = ctx.calibration.measure.ok_or_else(|| {
                    bad("`sensitivity: measured` needs the recipe's `calibration` text to measure perplexity on")
                })?;
                let (probes, report) =
                    measure_sensitivity(m, w, &free_cands, &free_imps, &mut options, measure, &cached)?;
                for (fi, (&i, p)) in free.iter().zip(probes).enumerate() {
                    if let Some(p) = p {
                        probe_bytes.insert(i, (options[fi][0].0, p));
                    }
                }
                sensitivity = report;
            }
            let chosen = assign_by_budget(&options, fixed_bytes, total_params, target)?;
            for (&i, d) in free.iter().zip(chosen) {
                formats[i] = Target::To(d);
            }
        }

        let mut per_tensor = vec![];
        let mut fallbacks = vec![];
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut kept = 0;
        for (i, c) in cands.iter().enumerate() {
            let Target::To(want) = formats[i] else { continue };
            let Some(d) = fit(want, c.k) else {
                return Err(PassError::Unsupported {
                    pass: NAME,
                    msg: format!("{}: no format fits rows of {}", c.name, c.k),
                });
            };
            if d != want {
                fallbacks.push(json!({"tensor": c.name, "wanted": want.name(), "used": d.name(), "row": c.k}));
            }
            let same = unchanged(c, w.bytes(c.param), d);
            kept += usize::from(same);
            // A tensor in its own format stays where it is (a mapped file's pages, not a copy).
            let probe = probe_bytes.remove(&i);
            if !same {
                w.tensors[c.param.index()] = match probe {
                    Some((p, bytes)) if p == d => bytes,
                    _ => TensorBytes::owned(cached.quantize(c, w.bytes(c.param), d, imps[i].as_deref())?),
                };
            }
            m.params[c.param.index()].ty.dtype = d;
            *counts.entry(d.name()).or_default() += 1;
            per_tensor
                .push(json!({"tensor": c.name, "format": d.name(), "weighted": imps[i].is_some(), "unchanged": same}));
        }
        let total_bytes = w.total_bytes();
        let bpw = total_bytes as f64 * 8.0 / total_params.max(1) as f64;
        let weighted = imps.iter().filter(|i| i.is_some()).count();
        let summary = format!(
            "{} tensors quantized ({}), {bpw:.3} bits per weight over all {total_params} parameters{}{}{}",
            per_tensor.len(),
            counts.iter().map(|(k, v)| format!("{v}× {k}")).collect::<Vec<_>>().join(", "),
            if kept > 0 { format!(", {kept} already in their format and unchanged") } else { String::new() },
            if weighted > 0 { format!(", {weighted} importance-weighted") } else { String::new() },
            if fallbacks.is_empty() { String::new() } else { format!(", {} row-length fallbacks", fallbacks.len()) },
        );
        Ok(PassReport {
            pass: NAME.into(),
            summary,
            details: json!({
                "bits_per_weight": bpw,
                "total_bytes": total_bytes,
                "total_params": total_params,
                "target_bpw": opts.target_bpw,
                "tensors": per_tensor,
                "fallbacks": fallbacks,
                "formats": counts,
                "unchanged": kept,
                "sensitivity": sensitivity,
                "memo": cached.report(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_formats() {
        assert!(matches("attn_v", "blk.3.attn_v.weight"));
        assert!(matches("blk.*.ffn_down.*", "blk.12.ffn_down.weight"));
        assert!(!matches("blk.*.ffn_down", "blk.12.ffn_up.weight"));
        assert_eq!(parse_format("q4").unwrap(), Target::To(DType::Q4K));
        assert_eq!(parse_format("q8_0").unwrap(), Target::To(DType::Q8_0));
        assert_eq!(parse_format("keep").unwrap(), Target::Keep);
        assert!(parse_format("q9").is_err());
        assert_eq!(fit(DType::Q4K, 576), Some(DType::Q5_0));
        assert_eq!(fit(DType::Q4K, 512), Some(DType::Q4K));
        assert_eq!(fit(DType::Q6K, 64), Some(DType::Q8_0));
    }

    #[test]
    fn options_are_checked() {
        assert!(parse_options(&json!({"default": "q4_k", "rules": {"attn_v": "q6_k"}})).is_ok());
        assert!(parse_options(&json!({"target_bpw": 2.5})).is_ok());
        assert!(parse_options(&json!({"rules": [{"match": "x", "type": "q8_0"}]})).is_ok());
        assert!(parse_options(&json!({"target_bpw": 2.5, "sensitivity": "measured"})).unwrap().measured);
        for bad in [
            json!(null),
            json!({}),
            json!({"default": "q9"}),
            json!({"target_bpw": -1}),
            json!({"defualt": "q4_k"}),
            json!({"target_bpw": 2.5, "sensitivity": "loud"}),
            json!({"default": "q4_k", "sensitivity": "measured"}),
        ] {
            assert!(parse_options(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tensor_in_its_own_format_keeps_its_bytes() {
        // Two rows of 64 in q4_0, from a ramp; given q4_0 again it keeps its bytes and
        // costs no error, while q8_0 re-rounds it.
        let (k, rows) = (64usize, 2u64);
        let data: Vec<f32> = (0..k * rows as usize).map(|i| (i as f32 * 0.37).sin()).collect();
        let src = quantize_rows("t", DType::Q4_0, &data, k, None).unwrap();
        let c = Candidate { param: ParamId(0), name: "t".into(), rows, k: k as u64, dtype: DType::Q4_0 };
        let cached = Cached::new(None);
        let imp = vec![1.0f32; k];
        assert_eq!(cached.quantize(&c, &src, DType::Q4_0, Some(&imp)).unwrap(), src);
        assert_eq!(cached.error(&c, &src, &mut None, DType::Q4_0, Some(&imp), 256).unwrap(), 0.0);
        assert!(cached.error(&c, &src, &mut None, DType::Q4_1, Some(&imp), 256).unwrap() > 0.0);
        assert_ne!(cached.quantize(&c, &src, DType::Q8_0, None).unwrap().len(), src.len());
        // Bytes that are not a whole tensor of the format are requantized, not trusted.
        assert!(!unchanged(&c, &src[..src.len() - 1], DType::Q4_0));
    }

    #[test]
    fn sensitivity_groups_are_kind_and_third_of_the_layers() {
        assert_eq!(sensitivity_group("blk.0.attn_v.weight", 30), "attn_v@0");
        assert_eq!(sensitivity_group("blk.15.ffn_down.weight", 30), "ffn_down@1");
        assert_eq!(sensitivity_group("blk.29.attn_q.weight", 30), "attn_q@2");
        assert_eq!(sensitivity_group("token_embd.weight", 30), "token_embd.weight");
        assert_eq!(sensitivity_group("output.weight", 30), "output.weight");
    }
}
