//! Prepare-time analysis: which token rows each instruction must compute, and when each value dies.
//!
//! A forward call over `T` tokens normally computes every value for all `T`
//! rows. When only the last row of the logits is asked for
//! ([`Logits::Last`]), most of the tail of the graph only needs the last row
//! too: every op except `attention` is row-wise (row `t` of its result depends
//! only on row `t` of its operands), and attention needs *all* rows of `k`/`v`
//! (they go into the KV cache) but only the rows of `q` it is asked for. A
//! backward pass over the graph finds, for every value, whether it is needed
//! for all rows, for the last row only, or not at all.
//!
//! The same pass records each value's last use so the interpreter can free
//! it right after (prefill of 512 tokens × 49 152-entry vocabulary is 100 MB
//! of logits alone).

use kiln_ir::{Op, ValueId, VerifiedModule};

use crate::Logits;

/// How many token rows of a value an execution computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rows {
    /// Not needed: the instruction is skipped (except for the KV-cache
    /// append of an attention op that writes a slot).
    Skip,
    /// Only the last token's row.
    Last,
    /// Every token's row.
    All,
}

/// What one forward call of a given [`Logits`] mode executes.
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    /// Rows computed for each instruction's value.
    pub rows: Vec<Rows>,
    /// `free_after[i]`: values whose last read is instruction `i`.
    pub free_after: Vec<Vec<ValueId>>,
    /// Whether llama.cpp runs instruction `i` on the gathered output rows only (one row for
    /// [`Logits::Last`]): it gathers them after the last attention's output projection, so
    /// the matmuls after it are batches of one there, which decides their summation order
    /// in `Numerics::Ggml` (`kiln_quant::ggml_dot::RowGroup`).
    pub gathered: Vec<bool>,
}

/// Value operands that instruction `op`, executed for `rows`, actually reads,
/// with the rows it reads from each.
pub(crate) fn reads(op: &Op, rows: Rows) -> Vec<(ValueId, Rows)> {
    match op {
        // An attention op writing a cache slot always appends all T rows of
        // k and v, even when its own result is not needed.
        Op::Attention { q, k, v, .. } => {
            let mut out = Vec::with_capacity(3);
            if rows != Rows::Skip {
                out.push((*q, rows));
            }
            out.extend(k.iter().chain(v.iter()).map(|&kv| (kv, Rows::All)));
            out
        }
        // A compressed attention always absorbs every row of what its cache keeps.
        Op::CompressedAttention { q, kv, comp, indexer, .. } => {
            let mut out = vec![(*kv, Rows::All)];
            if let Some(c) = comp {
                out.extend([(c.kv, Rows::All), (c.gate, Rows::All)]);
            }
            if let Some(ix) = indexer {
                out.extend([(ix.keys.kv, Rows::All), (ix.keys.gate, Rows::All)]);
                if rows != Rows::Skip {
                    out.extend([(ix.q, rows), (ix.w, rows)]);
                }
            }
            if rows != Rows::Skip {
                out.push((*q, rows));
            }
            out
        }
        // A compressor absorbs every row; its slot's attention reads what it wrote.
        Op::Compress { kv, gate, .. } => vec![(*kv, Rows::All), (*gate, Rows::All)],
        // The raw rows are appended whole; the streams are read through the slot, so the
        // `comp` operand only orders the ops (its ops always run).
        Op::SparseAttention { q, kv, select, .. } => {
            let mut out = vec![(*kv, Rows::All)];
            if rows != Rows::Skip {
                out.push((*q, rows));
                out.extend(select.iter().map(|&s| (s, rows)));
            }
            out
        }
        Op::IndexTopk { q, w, .. } if rows != Rows::Skip => vec![(*q, rows), (*w, rows)],
        _ if rows == Rows::Skip => vec![],
        _ => op.values().into_iter().map(|v| (v, rows)).collect(),
    }
}

/// Whether instruction `op` runs at all for `rows` (a KV-cache writer always runs).
pub(crate) fn executes(op: &Op, rows: Rows) -> bool {
    rows != Rows::Skip
        || matches!(
            op,
            Op::Attention { k: Some(_), .. }
                | Op::CompressedAttention { .. }
                | Op::Compress { .. }
                | Op::SparseAttention { .. }
        )
}

impl Schedule {
    /// Builds the schedule of `module` for the given logits mode.
    pub fn new(module: &VerifiedModule, logits: Logits) -> Schedule {
        let n = module.insts.len();
        let mut rows = vec![Rows::Skip; n];
        if let Some(r) = module.output.and_then(|out| rows.get_mut(out.index())) {
            *r = match logits {
                Logits::All => Rows::All,
                Logits::Last => Rows::Last,
            };
        }
        // Operands are always defined before their users (verified), so one
        // backward sweep settles every value.
        for i in (0..n).rev() {
            for (v, r) in reads(&module.insts[i].op, rows[i]) {
                if let Some(slot) = rows.get_mut(v.index()) {
                    *slot = (*slot).max(r);
                }
            }
        }
        let mut last_use: Vec<Option<usize>> = vec![None; n];
        for (i, inst) in module.insts.iter().enumerate() {
            for (v, _) in reads(&inst.op, rows[i]) {
                if let Some(slot) = last_use.get_mut(v.index()) {
                    *slot = Some(i);
                }
            }
        }
        let mut free_after = vec![Vec::new(); n];
        for (v, last) in last_use.iter().enumerate() {
            if let Some(i) = last
                && module.output.map(|o| o.index()) != Some(v)
            {
                free_after[*i].push(ValueId(v as u32));
            }
        }
        // The last attention's output projection: the first matmul after it.
        let projection = module
            .insts
            .iter()
            .rposition(|inst| {
                matches!(inst.op, Op::Attention { .. } | Op::CompressedAttention { .. } | Op::SparseAttention { .. })
            })
            .and_then(|a| (a + 1..n).find(|&i| matches!(module.insts[i].op, Op::MatMul { .. })));
        let gathered = (0..n).map(|i| rows[i] == Rows::Last && projection.is_some_and(|p| i > p)).collect();
        Schedule { rows, free_after, gathered }
    }
}
