//! `fuse_sparse_attention`: DeepSeek-V4's attention from its unfused form to one op.
//!
//! The importer lowers each DeepSeek-V4 attention as transformers' modules compute it:
//! `compress` ops (the compressed rows, and for CSA the Lightning Indexer's keys), an
//! `index_topk` (the indexer's top-k choice of compressed rows per query) and a
//! `sparse_attention` over the raw window, the chosen rows and the sink. This pass
//! recognises that pattern — a `sparse_attention` whose `comp` / `select` operands come
//! from `compress` / `index_topk` ops no other op reads — and replaces it with one
//! `compressed_attention`, which every backend with a DeepSeek-V4 path runs as one fused
//! kernel (the CPU backend: indexer scores, top-k and one online softmax over window ∪
//! chosen rows ∪ sink per query row, no score row over all keys). The unfused ops become
//! dead and are removed. Semantics are unchanged: the reference interpreter gives the
//! unfused and the fused form bit for bit the same logits.
//!
//! ```yaml
//! - fuse_sparse_attention
//! ```

use std::collections::BTreeMap;

use kiln_frontend::Weights;
use kiln_ir::analysis::{SparseGroup, sparse_groups};
use kiln_ir::{Module, Op};
use serde_json::{Value, json};

use crate::{Pass, PassCtx, PassError, PassReport, dce};

pub struct FuseSparseAttention;

const NAME: &str = "fuse_sparse_attention";

/// How many ops read each value of `m`.
fn readers(m: &Module) -> Vec<usize> {
    let mut n = vec![0; m.insts.len()];
    for inst in &m.insts {
        for v in inst.op.values() {
            n[v.index()] += 1;
        }
    }
    if let Some(out) = m.output {
        n[out.index()] += 1;
    }
    n
}

/// What kind of DeepSeek-V4 attention a group is, for the report.
fn kind(g: &SparseGroup) -> &'static str {
    match (g.comp, g.topk) {
        (None, _) => "sliding window",
        (Some(_), None) => "heavily compressed (HCA)",
        (Some(_), Some(_)) => "compressed sparse (CSA)",
    }
}

impl Pass for FuseSparseAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "fuse DeepSeek-V4's compressors, Lightning Indexer top-k and sparse attention into one compressed_attention op"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        crate::no_options(NAME, options)
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        self.check_options(ctx.options)?;
        let before = m.insts.len();
        let reads = readers(m);
        let mut fused: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut kept = Vec::new();
        for g in sparse_groups(m) {
            // The group's inner values must feed only the group, or fusing would drop them.
            let inner = [g.comp, g.topk, g.keys];
            let private = inner.iter().flatten().all(|&i| reads[i] == 1);
            match g.fused(m) {
                Some(op) if private => {
                    m.insts[g.attention].op = op;
                    *fused.entry(kind(&g)).or_default() += 1;
                }
                _ => kept.push(g.attention),
            }
        }
        let total: usize = fused.values().sum();
        if total > 0 {
            let null = Value::Null;
            let dce_ctx = PassCtx { options: &null, ..*ctx };
            dce::DeadCode.run(m, w, &dce_ctx)?;
        }
        let removed = before - m.insts.len();
        let left = m.insts.iter().filter(|i| matches!(i.op, Op::SparseAttention { .. })).count();
        let by_kind: Vec<String> = fused.iter().map(|(k, n)| format!("{n} {k}")).collect();
        Ok(PassReport {
            pass: NAME.into(),
            summary: if total == 0 {
                format!("no unfused DeepSeek-V4 attention to fuse ({left} left as is)")
            } else {
                format!(
                    "{total} attention(s) fused into compressed_attention ({}); {removed} ops removed{}",
                    by_kind.join(", "),
                    if left > 0 {
                        format!("; {left} left unfused (their inner values have other readers)")
                    } else {
                        String::new()
                    }
                )
            },
            details: json!({
                "fused": total,
                "by_kind": fused,
                "ops_removed": removed,
                "left_unfused": left,
                "left_unfused_at": kept.iter().map(|i| format!("%{i}")).collect::<Vec<_>>(),
            }),
        })
    }
}
