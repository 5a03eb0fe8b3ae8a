//! Read-only analyses of a module's graph that passes and tools share.

use crate::entities::ValueId;
use crate::module::Module;
use crate::ops::{CompressedAttentionAttrs, CompressorOperands, IndexerOperands, Op};

/// The residual stream of a decoder: the value after the embedding (and its
/// scaling, if any), then every residual `add` that continues it, in order. A
/// `steer` op applied to the stream stands in for the value it steers.
pub fn residual_stream(m: &Module) -> Result<Vec<ValueId>, String> {
    let mut r = m
        .insts
        .iter()
        .position(|i| matches!(i.op, Op::Embed { .. }))
        .map(|i| ValueId(i as u32))
        .ok_or("the module has no embedding, so it has no residual stream")?;
    let users = |v: ValueId| m.insts.iter().enumerate().filter(move |(_, i)| i.op.values().contains(&v));
    // An embedding scale (Gemma) whose only user is the stream's start.
    let embed_users: Vec<_> = users(r).collect();
    if let [(i, inst)] = embed_users.as_slice()
        && matches!(inst.op, Op::Scale { .. })
    {
        r = ValueId(*i as u32);
    }
    let mut stream = vec![r];
    loop {
        let next = users(r).find_map(|(i, inst)| match inst.op {
            Op::Add { a, b } if a == r || b == r => Some((i, true)),
            Op::Steer { x, .. } if x == r => Some((i, false)),
            _ => None,
        });
        let Some((i, is_add)) = next else { break };
        r = ValueId(i as u32);
        if is_add {
            stream.push(r);
        } else if let Some(last) = stream.last_mut() {
            *last = r;
        }
    }
    Ok(stream)
}

/// The output of every transformer layer (the residual stream after the layer's
/// last residual `add`), for a decoder with `n_layers` in its metadata whose
/// layers all add to the stream the same number of times.
pub fn layer_outputs(m: &Module) -> Result<Vec<ValueId>, String> {
    let n_layers = m
        .meta_int("n_layers")
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or("the module's metadata has no positive `n_layers`")?;
    let stream = residual_stream(m)?;
    let adds = &stream[1..];
    if adds.is_empty() || adds.len() % n_layers != 0 {
        return Err(format!(
            "the residual stream has {} adds, which do not split evenly into {n_layers} layers",
            adds.len()
        ));
    }
    let per_layer = adds.len() / n_layers;
    Ok(adds.chunks(per_layer).map(|c| c[per_layer - 1]).collect())
}

/// For each value, the index of the last instruction that reads it (`None`: never read).
/// Backends that reuse activation buffers free a value's buffer after that instruction.
pub fn last_uses(m: &Module) -> Vec<Option<usize>> {
    let mut last = vec![None; m.insts.len()];
    for (i, inst) in m.insts.iter().enumerate() {
        for v in inst.op.values() {
            if let Some(slot) = last.get_mut(v.index()) {
                *slot = Some(i);
            }
        }
    }
    last
}

/// The unfused ops of one DeepSeek-V4 attention (one compressed slot), by instruction:
/// the `sparse_attention`, the `compress` its `comp` names, and the `index_topk` its
/// `select` names with that op's `compress` of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseGroup {
    pub attention: usize,
    pub comp: Option<usize>,
    pub topk: Option<usize>,
    pub keys: Option<usize>,
}

impl SparseGroup {
    /// The group of the `sparse_attention` at instruction `i`; `None` when `i` is not one,
    /// or its `comp` / `select` operands are not made by the ops they must be.
    pub fn of(m: &Module, i: usize) -> Option<SparseGroup> {
        let Op::SparseAttention { comp, select, .. } = &m.insts.get(i)?.op else { return None };
        let op = |v: ValueId| m.insts.get(v.index()).map(|x| &x.op);
        let comp = match comp {
            Some(c) => match op(*c)? {
                Op::Compress { attrs, .. } if !attrs.index => Some(c.index()),
                _ => return None,
            },
            None => None,
        };
        let (topk, keys) = match select {
            Some(s) => match op(*s)? {
                Op::IndexTopk { keys, .. } => match op(*keys)? {
                    Op::Compress { attrs, .. } if attrs.index => (Some(s.index()), Some(keys.index())),
                    _ => return None,
                },
                _ => return None,
            },
            None => (None, None),
        };
        Some(SparseGroup { attention: i, comp, topk, keys })
    }

    /// The `compressed_attention` that does in one op what the group does.
    pub fn fused(&self, m: &Module) -> Option<Op> {
        let Op::SparseAttention { q, kv, sink, attrs: a, .. } = &m.insts.get(self.attention)?.op else { return None };
        let stream = |i: Option<usize>| match i.map(|i| &m.insts[i].op) {
            Some(Op::Compress { kv, gate, ape, norm, attrs }) => {
                Some((CompressorOperands { kv: *kv, gate: *gate, ape: *ape, norm: *norm }, attrs, i?))
            }
            _ => None,
        };
        let comp = stream(self.comp);
        let keys = stream(self.keys);
        let indexer = match (self.topk.map(|i| &m.insts[i].op), &keys) {
            (Some(Op::IndexTopk { q, w, attrs, .. }), Some((k, _, ki))) => {
                Some((IndexerOperands { q: *q, w: *w, keys: *k }, attrs.topk, attrs.heads, *ki))
            }
            _ => None,
        };
        let attrs = CompressedAttentionAttrs {
            cache: a.cache,
            heads: a.heads,
            head_dim: a.head_dim,
            scale: a.scale,
            window: a.window,
            ratio: comp.as_ref().map_or(0, |c| c.1.ratio),
            topk: indexer.as_ref().map_or(0, |ix| ix.1),
            index_heads: indexer.as_ref().map_or(0, |ix| ix.2),
            index_dim: indexer.as_ref().and_then(|ix| m.insts[ix.3].ty.last_fixed()).unwrap_or(0),
            eps: comp.as_ref().map_or(0.0, |c| c.1.eps),
            rope: a.rope.clone(),
        };
        Some(Op::CompressedAttention {
            q: *q,
            kv: *kv,
            sink: *sink,
            comp: comp.map(|c| c.0),
            indexer: indexer.map(|ix| ix.0),
            attrs,
        })
    }
}

/// Every unfused DeepSeek-V4 attention of `m`, in order.
pub fn sparse_groups(m: &Module) -> Vec<SparseGroup> {
    (0..m.insts.len()).filter_map(|i| SparseGroup::of(m, i)).collect()
}
