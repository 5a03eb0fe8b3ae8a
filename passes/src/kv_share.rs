//! `kv_share`: cross-layer KV-cache sharing (Cross-Layer Attention / MLKV on a
//! pretrained model). A layer that shares stops computing K and V and attends
//! over an earlier layer's cache slot; its K/V projections become dead and are
//! removed, and the KV cache shrinks by its share.
//!
//! ```yaml
//! - kv_share: { max_ppl_increase: 3% }   # chosen from calibration perplexity (needs `calibration`)
//! - kv_share: { group: 2 }               # fixed: layers 0-1 read 0's slot, 2-3 read 2's, ...
//! - kv_share: { share: { 5: 4, 6: 4 } }  # explicit: layer → the layer whose cache it reads
//! ```
//!
//! With a budget the pass searches greedily: it measures the perplexity cost of
//! each single merge (layer l reads the slot layer l − 1 reads or writes), then
//! adds merges from the cheapest while the combined increase stays within the
//! budget, measuring every combination it keeps (`PassCtx::measure`: perplexity
//! on the recipe's calibration text, supplied by the compile driver).

use std::collections::BTreeMap;

use kiln_frontend::Weights;
use kiln_ir::{Module, Op};
use serde_json::{Value, json};

use crate::{Pass, PassCtx, PassError, PassReport, dce};

pub struct KvShare;

const NAME: &str = "kv_share";

fn bad(msg: impl Into<String>) -> PassError {
    PassError::BadOptions { pass: NAME, msg: msg.into() }
}

#[derive(Clone, Debug, PartialEq)]
enum Plan {
    Budget(f64),
    Group(usize),
    Explicit(BTreeMap<usize, usize>),
}

fn parse(options: &Value) -> Result<Plan, PassError> {
    let o = options.as_object().ok_or_else(|| bad("expects a map: { max_ppl_increase | group | share }"))?;
    if o.len() != 1 {
        return Err(bad("give exactly one of `max_ppl_increase`, `group`, `share`"));
    }
    let (k, v) = o.iter().next().ok_or_else(|| bad("empty options"))?;
    match k.as_str() {
        "max_ppl_increase" => {
            let x = match v {
                Value::Number(n) => n.as_f64().unwrap_or(-1.0),
                Value::String(s) if s.trim_end().ends_with('%') => {
                    s.trim_end().trim_end_matches('%').trim().parse::<f64>().map(|p| p / 100.0).unwrap_or(-1.0)
                }
                _ => -1.0,
            };
            if !(0.0..=10.0).contains(&x) {
                return Err(bad(format!("max_ppl_increase {v}: a fraction (0.03) or a percentage (\"3%\")")));
            }
            Ok(Plan::Budget(x))
        }
        "group" => match v.as_u64() {
            Some(g) if g >= 2 => Ok(Plan::Group(g as usize)),
            _ => Err(bad(format!("group {v}: a layer count of at least 2"))),
        },
        "share" => {
            let m = v.as_object().ok_or_else(|| bad("share: a map `reader: source` of layer indices"))?;
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
        other => Err(bad(format!("unknown option `{other}` (max_ppl_increase, group, share)"))),
    }
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
    let ctx =
        PassCtx { options: &null, device: "", importance: None, base_dir: std::path::Path::new("."), measure: None };
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
        let share = match plan {
            Plan::Explicit(s) => s,
            Plan::Group(g) => (0..n).filter(|l| l % g != 0).map(|l| (l, l - l % g)).collect(),
            Plan::Budget(budget) => {
                let measure = ctx.measure.ok_or_else(|| {
                    bad("max_ppl_increase needs the recipe's `calibration` text to measure perplexity on")
                })?;
                let eval = |share: &BTreeMap<usize, usize>| -> Result<f64, PassError> {
                    let (mut mm, mut ww) = (m.clone(), w.clone());
                    apply(&mut mm, &mut ww, share)?;
                    measure(&mm, &ww).map_err(|msg| PassError::Input { pass: NAME, msg })
                };
                let base = eval(&BTreeMap::new())?;
                let mut single: Vec<(f64, usize)> = Vec::new();
                for l in 1..n {
                    if let Ok(p) = eval(&with_merge(&BTreeMap::new(), l)) {
                        single.push((p / base - 1.0, l));
                    }
                }
                single.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (mut share, mut ppl, mut evals) = (BTreeMap::new(), base, n);
                for &(cost, l) in &single {
                    if cost > budget {
                        break;
                    }
                    let trial = with_merge(&share, l);
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
        let ppl_note = match (details.get("calibration_ppl_before"), details.get("calibration_ppl_after")) {
            (Some(a), Some(b)) => {
                format!(", calibration ppl {:.3} → {:.3}", a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0))
            }
            _ => String::new(),
        };
        Ok(PassReport {
            pass: NAME.into(),
            summary: format!(
                "{} of {n} layers read another layer's KV cache; KV per token {before} → {after} elements ({:.0}%){ppl_note}",
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
        assert_eq!(parse(&json!({"max_ppl_increase": "3%"})).unwrap(), Plan::Budget(0.03));
        assert_eq!(parse(&json!({"max_ppl_increase": 0.05})).unwrap(), Plan::Budget(0.05));
        assert_eq!(parse(&json!({"group": 2})).unwrap(), Plan::Group(2));
        assert_eq!(parse(&json!({"share": {"3": 2}})).unwrap(), Plan::Explicit([(3, 2)].into_iter().collect()));
        for b in [
            json!({"group": 1}),
            json!({"share": {"2": 3}}),
            json!({"max_ppl_increase": "x"}),
            json!({"group": 2, "share": {}}),
            json!({"other": 1}),
        ] {
            assert!(parse(&b).is_err(), "{b}");
        }
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
