//! `kv_share`: cross-layer KV-cache sharing (Cross-Layer Attention / MLKV on a
//! pretrained model). A layer that shares stops computing K and V and attends
//! over an earlier layer's cache slot; its K/V projections become dead and are
//! removed, and the KV cache shrinks by its share.
//!
//! ```yaml
//! - kv_share: { max_ppl_increase: 3% }   # chosen from calibration perplexity (needs `calibration`)
//! - kv_share: { max_ppl_increase: 3%, min_similarity: 0.5, candidates: 12 }
//! - kv_share: { min_similarity: 0.9 }    # chosen from K/V similarity alone
//! - kv_share: { group: 2 }               # fixed: layers 0-1 read 0's slot, 2-3 read 2's, ...
//! - kv_share: { share: { 5: 4, 6: 4 } }  # explicit: layer → the layer whose cache it reads
//! ```
//!
//! With the recipe's calibration text the pass first compares the layers' K/V on
//! it (`PassCtx::calibration.capture`): for every pair of layers, the cosine
//! similarity of their K rows and of their V rows at the same token, averaged over
//! the text. A merge is scored by the mean of the two.
//!
//! With a budget the pass searches greedily: it measures the perplexity cost of
//! each single merge (layer l reads the slot layer l − 1 reads or writes) —
//! only for the layers most alike to the one before them when `candidates` or
//! `min_similarity` narrow the search — then adds merges from the cheapest while
//! the combined increase stays within the budget, measuring every combination it
//! keeps (`PassCtx::calibration.measure`: perplexity on the calibration text).
//! With `min_similarity` alone it merges every layer at least that alike to its
//! group's writer, and measures the perplexity before and after.
//!
//! The report gives, per layer, its K and V similarity to the layer before and its
//! measured single-merge cost, the similarity of every shared pair, and how well
//! similarity ranks the measured costs (Spearman's ρ).

use std::collections::BTreeMap;

use kiln_frontend::Weights;
use kiln_ir::{Module, Op, ValueId};
use serde_json::{Value, json};

use crate::{Pass, PassCtx, PassError, PassReport, dce};

pub struct KvShare;

const NAME: &str = "kv_share";

fn bad(msg: impl Into<String>) -> PassError {
    PassError::BadOptions { pass: NAME, msg: msg.into() }
}

#[derive(Clone, Debug, PartialEq)]
enum Plan {
    /// Merges by measured perplexity within `budget`; candidate merges may be
    /// pre-filtered by K/V similarity (`min_similarity`) and limited to the
    /// `candidates` most similar layers.
    Budget {
        budget: f64,
        min_similarity: Option<f64>,
        candidates: Option<usize>,
    },
    /// Merges every layer whose K/V is at least this alike to its group's writer.
    Similarity(f64),
    Group(usize),
    Explicit(BTreeMap<usize, usize>),
}

fn parse_fraction(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s.trim_end().ends_with('%') => {
            s.trim_end().trim_end_matches('%').trim().parse::<f64>().ok().map(|p| p / 100.0)
        }
        _ => None,
    }
}

fn parse(options: &Value) -> Result<Plan, PassError> {
    let o = options.as_object().ok_or_else(|| {
        bad("expects a map: { max_ppl_increase [, min_similarity, candidates] | min_similarity | group | share }")
    })?;
    for k in o.keys() {
        if !["max_ppl_increase", "min_similarity", "candidates", "group", "share"].contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown option `{k}` (max_ppl_increase, min_similarity, candidates, group, share)"
            )));
        }
    }
    let min_similarity = match o.get("min_similarity") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(x) if (-1.0..=1.0).contains(&x) => Some(x),
            _ => return Err(bad(format!("min_similarity {v}: a cosine similarity in [-1, 1]"))),
        },
    };
    let candidates = match o.get("candidates") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(c) if c >= 1 => Some(c as usize),
            _ => return Err(bad(format!("candidates {v}: a layer count of at least 1"))),
        },
    };
    let chosen: Vec<&str> = ["max_ppl_increase", "group", "share"].into_iter().filter(|k| o.contains_key(*k)).collect();
    match chosen.as_slice() {
        [] => match min_similarity {
            Some(x) if candidates.is_none() => Ok(Plan::Similarity(x)),
            Some(_) => Err(bad("candidates limits a max_ppl_increase search; it needs max_ppl_increase")),
            None => Err(bad("give one of `max_ppl_increase`, `min_similarity`, `group`, `share`")),
        },
        ["max_ppl_increase"] => {
            let v = &o["max_ppl_increase"];
            let budget = parse_fraction(v)
                .filter(|x| (0.0..=10.0).contains(x))
                .ok_or_else(|| bad(format!("max_ppl_increase {v}: a fraction (0.03) or a percentage (\"3%\")")))?;
            Ok(Plan::Budget { budget, min_similarity, candidates })
        }
        [one] if min_similarity.is_some() || candidates.is_some() => {
            Err(bad(format!("`{one}` takes no min_similarity or candidates: those shape a max_ppl_increase search")))
        }
        ["group"] => match o["group"].as_u64() {
            Some(g) if g >= 2 => Ok(Plan::Group(g as usize)),
            _ => Err(bad(format!("group {}: a layer count of at least 2", o["group"]))),
        },
        ["share"] => {
            let m = o["share"].as_object().ok_or_else(|| bad("share: a map `reader: source` of layer indices"))?;
            let mut out = BTreeMap::new();
            for (r, s) in m {
                let r: usize = r.parse().map_err(|_| bad(format!("share: `{r}` is not a layer index")))?;
                let s = s.as_u64().ok_or_else(|| bad(format!("share: {s} is not a layer index")))? as usize;
                if s >= r {
                    return Err(bad(format!("share: layer {r} can only read an earlier layer's cache, not {s}")));
                }
                out.insert(r, s);
            }
            Ok(Plan::Explicit(out))
        }
        _ => Err(bad("give only one of `max_ppl_increase`, `group`, `share`")),
    }
}

/// How alike the layers' K/V are on the calibration text, for every pair of
/// layers `s < l`:
/// - `k`, `v`: the cosine similarity of their K rows (and V rows) at the same
///   token, averaged over every token. K is compared after RoPE, as the cache
///   holds it (both layers rotate by the same position).
/// - `out`: what a merge does to the reader: the cosine similarity between layer
///   `l`'s attention output over its own K/V and over `s`'s, per query head,
///   averaged over a sample of at most [`QUERIES`] query tokens per chunk. This is
///   the score merges are ranked and filtered by: raw K/V cosines of a pretrained
///   model's layers are near zero (each layer has its own basis), so only what
///   the reader's queries make of the other cache predicts the cost.
#[derive(Clone, Debug, PartialEq)]
struct Similarity {
    /// `k[l][s]`, `v[l][s]`, `out[l][s]` for `s < l` (NaN where the shapes differ).
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    out: Vec<Vec<f64>>,
    tokens: usize,
}

/// Query tokens sampled per chunk for the attention-output similarity.
const QUERIES: usize = 64;

/// One attention layer as the similarity sees it.
struct Layer {
    q: ValueId,
    k: ValueId,
    v: ValueId,
    attrs: kiln_ir::AttentionAttrs,
}

/// Causal attention of query row `q` (`heads × head_dim`) at position `t` over the
/// keys `k`/`v` (`rows × kv_heads·head_dim`), as the attention op computes it
/// (scale, soft-cap, window and sinks), into `out`.
fn attend(q: &[f32], k: &[f32], v: &[f32], t: usize, rows: usize, a: &kiln_ir::AttentionAttrs, out: &mut [f32]) {
    let (hd, kvw) = (a.head_dim as usize, (a.kv_heads * a.head_dim) as usize);
    let group = (a.heads / a.kv_heads.max(1)).max(1) as usize;
    let (sinks, window) = a.key_ranges(t, rows);
    let keys: Vec<usize> = sinks.chain(window).collect();
    let mut w = vec![0.0f32; keys.len()];
    for h in 0..a.heads as usize {
        let (qh, g) = (&q[h * hd..(h + 1) * hd], h / group);
        let mut max = f32::NEG_INFINITY;
        for (wi, &j) in w.iter_mut().zip(&keys) {
            let kj = &k[j * kvw + g * hd..j * kvw + (g + 1) * hd];
            let mut x = a.scale * qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
            if a.softcap != 0.0 {
                x = (x / a.softcap).tanh() * a.softcap;
            }
            *wi = x;
            max = max.max(x);
        }
        let mut sum = 0.0;
        w.iter_mut().for_each(|x| {
            *x = (*x - max).exp();
            sum += *x;
        });
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (&wi, &j) in w.iter().zip(&keys) {
            let vj = &v[j * kvw + g * hd..j * kvw + (g + 1) * hd];
            oh.iter_mut().zip(vj).for_each(|(o, x)| *o += wi / sum * x);
        }
    }
}

/// Cosine similarity of two rows (0 when either is zero).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        d += x * y;
        na += x * x;
        nb += y * y;
    }
    if na > 0.0 && nb > 0.0 { d / (na * nb).sqrt() } else { 0.0 }
}

impl Similarity {
    /// The score a merge of `reader` onto `source`'s cache is judged by.
    fn of(&self, source: usize, reader: usize) -> f64 {
        self.out[reader][source]
    }

    fn measure(m: &Module, w: &Weights, capture: &crate::Capture<'_>) -> Result<Similarity, PassError> {
        use rayon::prelude::*;
        let layers: Vec<Layer> = writers(m)
            .into_iter()
            .filter_map(|i| match &m.insts[i].op {
                Op::Attention { q, k: Some(k), v: Some(v), attrs } => {
                    Some(Layer { q: *q, k: *k, v: *v, attrs: attrs.clone() })
                }
                _ => None,
            })
            .collect();
        let n = layers.len();
        let values: Vec<ValueId> = layers.iter().flat_map(|l| [l.q, l.k, l.v]).collect();
        // Sums over tokens (K/V) and over sampled query heads (outputs), and their counts.
        let mut sum = [vec![vec![0.0f64; n]; n], vec![vec![0.0f64; n]; n], vec![vec![0.0f64; n]; n]];
        let (mut tokens, mut queries) = (0usize, 0usize);
        let pairs: Vec<(usize, usize)> = (1..n).flat_map(|l| (0..l).map(move |s| (l, s))).collect();
        let mut visit = |rows: usize, per: &[&[f32]]| {
            if rows == 0 || per.len() != 3 * n {
                return;
            }
            let (q, k, v) = (|l: usize| per[3 * l], |l: usize| per[3 * l + 1], |l: usize| per[3 * l + 2]);
            let sampled: Vec<usize> = (0..rows).step_by(rows.div_ceil(QUERIES)).collect();
            // Each layer's own attention output at the sampled queries.
            let own: Vec<Vec<f32>> = (0..n)
                .into_par_iter()
                .map(|l| {
                    let (a, qw) = (&layers[l].attrs, q(l).len() / rows);
                    let mut o = vec![0.0f32; sampled.len() * qw];
                    for (i, &t) in sampled.iter().enumerate() {
                        attend(&q(l)[t * qw..(t + 1) * qw], k(l), v(l), t, rows, a, &mut o[i * qw..(i + 1) * qw]);
                    }
                    o
                })
                .collect();
            let scored: Vec<[f64; 3]> = pairs
                .par_iter()
                .map(|&(l, s)| {
                    let (kw, ks) = (k(l).len() / rows, k(s).len() / rows);
                    if kw != ks || v(l).len() != v(s).len() {
                        return [f64::NAN; 3];
                    }
                    let mut acc = [0.0f64; 3];
                    for t in 0..rows {
                        acc[0] += cosine(&k(l)[t * kw..(t + 1) * kw], &k(s)[t * kw..(t + 1) * kw]);
                        acc[1] += cosine(&v(l)[t * kw..(t + 1) * kw], &v(s)[t * kw..(t + 1) * kw]);
                    }
                    let (a, qw) = (&layers[l].attrs, q(l).len() / rows);
                    let hd = a.head_dim as usize;
                    let mut o = vec![0.0f32; qw];
                    for (i, &t) in sampled.iter().enumerate() {
                        attend(&q(l)[t * qw..(t + 1) * qw], k(s), v(s), t, rows, a, &mut o);
                        let mine = &own[l][i * qw..(i + 1) * qw];
                        acc[2] += o.chunks_exact(hd).zip(mine.chunks_exact(hd)).map(|(x, y)| cosine(x, y)).sum::<f64>();
                    }
                    acc
                })
                .collect();
            for (&(l, s), acc) in pairs.iter().zip(&scored) {
                for (which, x) in acc.iter().enumerate() {
                    sum[which][l][s] += x;
                }
            }
            tokens += rows;
            let heads = layers.first().map_or(1, |l| l.attrs.heads as usize);
            queries += sampled.len() * heads;
        };
        capture(m, w, &values, &mut visit).map_err(|msg| PassError::Input { pass: NAME, msg })?;
        if tokens == 0 {
            return Err(PassError::Input {
                pass: NAME,
                msg: "the calibration text gave no tokens to compare K/V on".into(),
            });
        }
        let mean = |a: Vec<Vec<f64>>, count: usize| -> Vec<Vec<f64>> {
            a.into_iter().map(|r| r.into_iter().map(|x| x / count as f64).collect()).collect()
        };
        let [k, v, out] = sum;
        Ok(Similarity { k: mean(k, tokens), v: mean(v, tokens), out: mean(out, queries), tokens })
    }
}

/// Spearman's rank correlation of two equally long samples (`None` under 3).
fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len();
    if n < 3 || b.len() != n {
        return None;
    }
    let rank = |x: &[f64]| {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; n];
        let mut i = 0;
        while i < n {
            let mut j = i;
            while j + 1 < n && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let mean = (n - 1) as f64 / 2.0;
    let (mut c, mut va, mut vb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        c += (ra[i] - mean) * (rb[i] - mean);
        va += (ra[i] - mean).powi(2);
        vb += (rb[i] - mean).powi(2);
    }
    (va > 0.0 && vb > 0.0).then(|| c / (va * vb).sqrt())
}

/// The attention ops that write a KV slot, in order: one per layer.
fn writers(m: &Module) -> Vec<usize> {
    m.insts
        .iter()
        .enumerate()
        .filter(|(_, i)| matches!(i.op, Op::Attention { k: Some(_), .. }))
        .map(|(i, _)| i)
        .collect()
}

/// KV-cache elements per token: K and V of every slot written.
pub fn kv_elements_per_token(m: &Module) -> u64 {
    m.insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Attention { k: Some(_), attrs, .. } => Some(2 * attrs.kv_heads * attrs.head_dim),
            _ => None,
        })
        .sum()
}

/// Makes each `reader` layer's attention read its source layer's slot (layers
/// numbered by their attention ops), then removes what became dead.
fn apply(m: &mut Module, w: &mut Weights, share: &BTreeMap<usize, usize>) -> Result<(), PassError> {
    let ws = writers(m);
    let slot = |l: usize| match &m.insts[ws[l]].op {
        Op::Attention { attrs, .. } => (attrs.cache, attrs.kv_heads, attrs.head_dim),
        _ => unreachable!("writers() returns attention ops"),
    };
    let mut edits = Vec::new();
    for (&r, &s) in share {
        if r >= ws.len() {
            return Err(bad(format!("layer {r} does not exist (the model has {} attention layers)", ws.len())));
        }
        if share.contains_key(&s) {
            return Err(bad(format!("layer {r} reads layer {s}, which itself reads another layer: name the writer")));
        }
        let (src, (rk, rd)) = (slot(s), (slot(r).1, slot(r).2));
        if (src.1, src.2) != (rk, rd) {
            return Err(PassError::Unsupported {
                pass: NAME,
                msg: format!("layer {r} ({rk} KV heads × {rd}) cannot read layer {s}'s cache ({} × {})", src.1, src.2),
            });
        }
        edits.push((ws[r], src.0));
    }
    for (i, cache) in edits {
        if let Op::Attention { k, v, attrs, .. } = &mut m.insts[i].op {
            *k = None;
            *v = None;
            attrs.cache = cache;
        }
    }
    let null = Value::Null;
    let ctx = PassCtx {
        options: &null,
        device: "",
        base_dir: std::path::Path::new("."),
        calibration: crate::Calibration::default(),
        memo: None,
    };
    dce::DeadCode.run(m, w, &ctx)?;
    Ok(())
}

/// `share` extended by `reader` reading what `reader − 1` reads (or writes).
fn with_merge(share: &BTreeMap<usize, usize>, reader: usize) -> BTreeMap<usize, usize> {
    let mut s = share.clone();
    let src = share.get(&(reader - 1)).copied().unwrap_or(reader - 1);
    s.insert(reader, src);
    // Layers that read `reader` now read its source.
    for v in s.values_mut() {
        if *v == reader {
            *v = src;
        }
    }
    s
}

impl Pass for KvShare {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "share KV caches across adjacent layers (by a perplexity budget, fixed groups, or explicitly)"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        parse(options).map(|_| ())
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        let plan = parse(ctx.options)?;
        let n = writers(m).len();
        if n < 2 {
            return Err(PassError::Unsupported {
                pass: NAME,
                msg: format!("{n} attention layer(s): nothing to share"),
            });
        }
        let before = kv_elements_per_token(m);
        let mut details = serde_json::Map::new();
        let needs_similarity = matches!(
            plan,
            Plan::Similarity(_)
                | Plan::Budget { min_similarity: Some(_), .. }
                | Plan::Budget { candidates: Some(_), .. }
        );
        // K/V similarity on the calibration text: chooses merges when the plan asks, and is
        // reported whenever the calibration text is there.
        let sim = match ctx.calibration.capture {
            Some(capture) => Some(Similarity::measure(m, w, capture)?),
            None if needs_similarity => {
                return Err(bad(
                    "min_similarity and candidates need the recipe's `calibration` text to compare K/V on",
                ));
            }
            None => None,
        };
        let eval = |share: &BTreeMap<usize, usize>| -> Result<f64, PassError> {
            let measure = ctx.calibration.measure.ok_or_else(|| {
                bad("max_ppl_increase needs the recipe's `calibration` text to measure perplexity on")
            })?;
            let (mut mm, mut ww) = (m.clone(), w.clone());
            apply(&mut mm, &mut ww, share)?;
            measure(&mm, &ww).map_err(|msg| PassError::Input { pass: NAME, msg })
        };
        let mut single_cost: BTreeMap<usize, f64> = BTreeMap::new();
        let share = match plan {
            Plan::Explicit(s) => s,
            Plan::Group(g) => (0..n).filter(|l| l % g != 0).map(|l| (l, l - l % g)).collect(),
            Plan::Similarity(threshold) => {
                let sim = sim.as_ref().ok_or_else(|| bad("min_similarity needs the calibration text"))?;
                let mut share = BTreeMap::new();
                for l in 1..n {
                    let trial = with_merge(&share, l);
                    if sim.of(trial[&l], l) >= threshold {
                        share = trial;
                    }
                }
                details.insert("min_similarity".into(), json!(threshold));
                if ctx.calibration.measure.is_some() {
                    details.insert("calibration_ppl_before".into(), json!(eval(&BTreeMap::new())?));
                    details.insert("calibration_ppl_after".into(), json!(eval(&share)?));
                }
                share
            }
            Plan::Budget { budget, min_similarity, candidates } => {
                let base = eval(&BTreeMap::new())?;
                // Candidate merges (layer l reads what l − 1 reads): the most alike first,
                // those under `min_similarity` dropped, at most `candidates` of them measured.
                let mut cands: Vec<usize> = (1..n).collect();
                if let Some(sim) = &sim {
                    cands.sort_by(|&a, &b| sim.of(b - 1, b).total_cmp(&sim.of(a - 1, a)));
                    if let Some(min) = min_similarity {
                        cands.retain(|&l| sim.of(l - 1, l) >= min);
                    }
                }
                cands.truncate(candidates.unwrap_or(n));
                let mut single: Vec<(f64, usize)> = Vec::new();
                for &l in &cands {
                    if let Ok(p) = eval(&with_merge(&BTreeMap::new(), l)) {
                        single.push((p / base - 1.0, l));
                        single_cost.insert(l, p / base - 1.0);
                    }
                }
                single.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (mut share, mut ppl, mut evals) = (BTreeMap::new(), base, 1 + cands.len());
                for &(cost, l) in &single {
                    if cost > budget {
                        break;
                    }
                    let trial = with_merge(&share, l);
                    // A chained merge reads a writer further back: it must still be alike.
                    if let (Some(sim), Some(min)) = (&sim, min_similarity)
                        && sim.of(trial[&l], l) < min
                    {
                        continue;
                    }
                    let p = eval(&trial)?;
                    evals += 1;
                    if p / base - 1.0 <= budget {
                        share = trial;
                        ppl = p;
                    }
                }
                details.insert("calibration_ppl_before".into(), json!(base));
                details.insert("calibration_ppl_after".into(), json!(ppl));
                details.insert("budget".into(), json!(budget));
                details.insert("evaluations".into(), json!(evals));
                if let Some(min) = min_similarity {
                    details.insert("min_similarity".into(), json!(min));
                }
                details.insert(
                    "single_merge_cost".into(),
                    json!(single.iter().map(|(c, l)| json!({"layer": l, "ppl_increase": c})).collect::<Vec<_>>()),
                );
                share
            }
        };
        apply(m, w, &share)?;
        let after = kv_elements_per_token(m);
        details
            .insert("share".into(), json!(share.iter().map(|(r, s)| (r.to_string(), *s)).collect::<BTreeMap<_, _>>()));
        details.insert("kv_elements_per_token_before".into(), json!(before));
        details.insert("kv_elements_per_token_after".into(), json!(after));
        let mut sim_note = String::new();
        if let Some(sim) = &sim {
            let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
            // Each layer against the one before it, with its measured single-merge cost.
            let layers: Vec<Value> = (1..n)
                .map(|l| {
                    json!({"layer": l, "k_cos": finite(sim.k[l][l - 1]), "v_cos": finite(sim.v[l][l - 1]),
                           "attn_out_cos": finite(sim.out[l][l - 1]), "ppl_increase": single_cost.get(&l)})
                })
                .collect();
            let shared: Vec<Value> = share
                .iter()
                .map(|(&r, &s)| {
                    json!({"reader": r, "source": s, "k_cos": finite(sim.k[r][s]), "v_cos": finite(sim.v[r][s]),
                           "attn_out_cos": finite(sim.out[r][s])})
                })
                .collect();
            let (x, y): (Vec<f64>, Vec<f64>) = single_cost.iter().map(|(&l, &c)| (sim.of(l - 1, l), c)).unzip();
            let rho = spearman(&x, &y);
            details.insert(
                "similarity".into(),
                json!({"tokens": sim.tokens, "adjacent": layers, "shared": shared,
                       "spearman_similarity_vs_cost": rho}),
            );
            if !share.is_empty() {
                let mean = share.iter().map(|(&r, &s)| sim.of(s, r)).sum::<f64>() / share.len() as f64;
                sim_note = format!(", readers' attention output vs their own: mean cosine {mean:.3}");
            }
            if let Some(rho) = rho {
                sim_note += &format!(" (similarity vs measured cost: Spearman {rho:+.2})");
            }
        }
        let ppl_note = match (details.get("calibration_ppl_before"), details.get("calibration_ppl_after")) {
            (Some(a), Some(b)) => {
                format!(", calibration ppl {:.3} → {:.3}", a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0))
            }
            _ => String::new(),
        };
        Ok(PassReport {
            pass: NAME.into(),
            summary: format!(
                "{} of {n} layers read another layer's KV cache; KV per token {before} → {after} elements ({:.0}%){ppl_note}{sim_note}",
                share.len(),
                after as f64 * 100.0 / before.max(1) as f64
            ),
            details: Value::Object(details),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let budget = |b, min_similarity, candidates| Plan::Budget { budget: b, min_similarity, candidates };
        assert_eq!(parse(&json!({"max_ppl_increase": "3%"})).unwrap(), budget(0.03, None, None));
        assert_eq!(parse(&json!({"max_ppl_increase": 0.05})).unwrap(), budget(0.05, None, None));
        assert_eq!(
            parse(&json!({"max_ppl_increase": "3%", "min_similarity": 0.5, "candidates": 4})).unwrap(),
            budget(0.03, Some(0.5), Some(4))
        );
        assert_eq!(parse(&json!({"min_similarity": 0.9})).unwrap(), Plan::Similarity(0.9));
        assert_eq!(parse(&json!({"group": 2})).unwrap(), Plan::Group(2));
        assert_eq!(parse(&json!({"share": {"3": 2}})).unwrap(), Plan::Explicit([(3, 2)].into_iter().collect()));
        for b in [
            json!({"group": 1}),
            json!({"share": {"2": 3}}),
            json!({"max_ppl_increase": "x"}),
            json!({"group": 2, "share": {}}),
            json!({"other": 1}),
            json!({"min_similarity": 2.0}),
            json!({"candidates": 3}),
            json!({"min_similarity": 0.9, "candidates": 3}),
            json!({"group": 2, "min_similarity": 0.9}),
            json!({"max_ppl_increase": "3%", "candidates": 0}),
        ] {
            assert!(parse(&b).is_err(), "{b}");
        }
    }

    /// Two attention layers whose captured Q/K/V the test makes up: a layer that
    /// reads an identical cache agrees with itself (every cosine 1), one whose V is
    /// negated disagrees exactly (V and output cosines −1, K still 1).
    #[test]
    fn similarity_of_made_up_layers() {
        let m = kiln_ir::parse(
            "kiln-ir 1\nmodule \"t\"\nparam @emb : f32[10, 16]\n%0 = tokens : i32[T]\n%1 = embed @emb, %0 : f32[T, 16]\n\
             %2 = attention %1, k=%1, v=%1, cache=0, heads=2, kv_heads=1, head_dim=8, scale=0.35 : f32[T, 16]\n\
             %3 = attention %2, k=%2, v=%2, cache=1, heads=2, kv_heads=1, head_dim=8, scale=0.35 : f32[T, 16]\noutput %3\n",
        )
        .unwrap();
        let rows = 7;
        let data = |seed: u32, width: usize| -> Vec<f32> {
            (0..rows * width)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (q, k, v) = (data(1, 16), data(2, 8), data(3, 8));
        for negate in [false, true] {
            let v1: Vec<f32> = v.iter().map(|x| if negate { -x } else { *x }).collect();
            let capture = |_: &Module, _: &Weights, values: &[ValueId], visit: &mut dyn FnMut(usize, &[&[f32]])| {
                assert_eq!(values.len(), 6);
                visit(rows, &[&q, &k, &v, &q, &k, &v1]);
                Ok(())
            };
            let sim = Similarity::measure(&m, &Weights::default(), &capture).unwrap();
            assert_eq!(sim.tokens, rows);
            let want = if negate { -1.0 } else { 1.0 };
            assert!((sim.k[1][0] - 1.0).abs() < 1e-9, "{sim:?}");
            assert!((sim.v[1][0] - want).abs() < 1e-9, "{sim:?}");
            assert!((sim.of(0, 1) - want).abs() < 1e-6, "{sim:?}");
        }
    }

    #[test]
    fn spearman_ranks() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 40.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        let r = spearman(&[1.0, 2.0, 2.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!(r > 0.9 && r < 1.0, "{r}");
    }

    #[test]
    fn merges_chain_to_the_writer() {
        let s = with_merge(&BTreeMap::new(), 3);
        assert_eq!(s, [(3, 2)].into_iter().collect());
        let s = with_merge(&s, 4); // 4 reads what 3 reads: 2
        assert_eq!(s, [(3, 2), (4, 2)].into_iter().collect());
        let s = with_merge(&s, 2); // 2 now reads 1; its readers follow
        assert_eq!(s, [(2, 1), (3, 1), (4, 1)].into_iter().collect());
    }
}
