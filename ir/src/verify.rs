//! The verifier: checks types, shapes, quantized layouts and KV-cache references.
//! Backends accept only a [`VerifiedModule`], which only [`verify`] can make.

use std::collections::HashMap;
use std::ops::Deref;

use crate::entities::ValueId;
use crate::error::{IrError, IrResult};
use crate::module::{Env, Module};
use crate::ops::Op;
use crate::types::{DType, Dim};

/// A module that passed the verifier. Read-only; `into_inner` gives the module back for passes.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedModule {
    module: Module,
}

impl VerifiedModule {
    pub fn into_inner(self) -> Module {
        self.module
    }
    pub fn module(&self) -> &Module {
        &self.module
    }
}

impl Deref for VerifiedModule {
    type Target = Module;
    fn deref(&self) -> &Module {
        &self.module
    }
}

/// What the unfused DeepSeek-V4 ops of one slot have written so far.
struct SparseSlot {
    /// The first op that named the slot.
    first: ValueId,
    comp: Option<ValueId>,
    keys: Option<ValueId>,
    attention: Option<ValueId>,
}

impl SparseSlot {
    fn new(first: ValueId) -> Self {
        SparseSlot { first, comp: None, keys: None, attention: None }
    }
}

fn fail<T>(at: impl Into<String>, msg: impl Into<String>) -> IrResult<T> {
    Err(IrError::Verify { at: at.into(), msg: msg.into() })
}

/// Checks every invariant of a module.
pub fn verify(module: Module) -> IrResult<VerifiedModule> {
    check(&module)?;
    Ok(VerifiedModule { module })
}

/// Checks without taking ownership.
pub fn check(m: &Module) -> IrResult<()> {
    let mut names = HashMap::new();
    for p in &m.params {
        let at = format!("param @{}", p.name);
        if names.insert(p.name.as_str(), ()).is_some() {
            return fail(at, "declared twice");
        }
        let Some(dims) = p.ty.fixed_dims() else {
            return fail(at, "parameters must have fixed shapes");
        };
        if dims.is_empty() || dims.contains(&0) {
            return fail(at, format!("empty shape {}", p.ty));
        }
        if p.ty.dtype == DType::I32 {
            return fail(at, "i32 parameters are not supported");
        }
        if p.ty.storage_bytes().is_none() {
            return fail(
                at,
                format!(
                    "{}: last dimension {} is not a multiple of the {} block size {}",
                    p.ty,
                    dims[dims.len() - 1],
                    p.ty.dtype,
                    p.ty.dtype.block_elems()
                ),
            );
        }
    }

    let mut tokens_seen = false;
    // cache slot -> (writer value, kv_heads, head_dim)
    let mut caches: HashMap<u32, (ValueId, u64, u64, crate::types::DType)> = HashMap::new();
    // cache slots of compressed-attention ops (a slot kind of their own) -> writer
    let mut compressed: HashMap<u32, ValueId> = HashMap::new();
    // slots of the unfused DeepSeek-V4 ops (`compress`, `sparse_attention`)
    let mut sparse: HashMap<u32, SparseSlot> = HashMap::new();
    let kind = |index: bool| if index { "index-key" } else { "compressed-row" };
    for (i, inst) in m.insts.iter().enumerate() {
        let at = format!("%{i} = {}", inst.op.name());
        let env = Env { module: m, limit: i };
        for v in inst.op.values() {
            if v.index() >= i {
                return fail(at, format!("{v} is used before it is defined"));
            }
        }
        for p in inst.op.params() {
            if p.index() >= m.params.len() {
                return fail(at, format!("parameter #{} is not declared", p.0));
            }
        }
        let ty = inst.op.infer(&env).or_else(|msg| fail(&at, msg))?;
        if ty != inst.ty {
            return fail(at, format!("declared type {} but the operands give {ty}", inst.ty));
        }
        match &inst.op {
            Op::Tokens => {
                if tokens_seen {
                    return fail(at, "the graph has more than one `tokens` input");
                }
                tokens_seen = true;
            }
            Op::CompressedAttention { attrs, .. } => {
                let slot = attrs.cache;
                if let Some(w) = compressed
                    .get(&slot)
                    .or_else(|| caches.get(&slot).map(|c| &c.0))
                    .or_else(|| sparse.get(&slot).map(|s| &s.first))
                {
                    return fail(at, format!("KV-cache slot {slot} is already written by {w}"));
                }
                compressed.insert(slot, ValueId(i as u32));
            }
            Op::Compress { attrs, .. } => {
                let slot = attrs.cache;
                if let Some(w) = compressed.get(&slot).or_else(|| caches.get(&slot).map(|c| &c.0)) {
                    return fail(at, format!("KV-cache slot {slot} is already written by {w}"));
                }
                let s = sparse.entry(slot).or_insert(SparseSlot::new(ValueId(i as u32)));
                let stream = if attrs.index { &mut s.keys } else { &mut s.comp };
                if let Some(w) = stream {
                    return fail(at, format!("slot {slot}'s {} stream is already written by {w}", kind(attrs.index)));
                }
                if s.attention.is_some() {
                    return fail(at, format!("slot {slot}'s sparse_attention comes before this compressor"));
                }
                *stream = Some(ValueId(i as u32));
            }
            Op::IndexTopk { keys, .. } => match &m.insts[keys.index()].op {
                Op::Compress { attrs, .. } if attrs.index => {}
                _ => return fail(at, format!("keys {keys} must be made by a `compress` with index=1")),
            },
            Op::SparseAttention { attrs, .. } => {
                let slot = attrs.cache;
                if let Some(w) = compressed.get(&slot).or_else(|| caches.get(&slot).map(|c| &c.0)) {
                    return fail(at, format!("KV-cache slot {slot} is already written by {w}"));
                }
                let Some(g) = crate::analysis::SparseGroup::of(m, i) else {
                    return fail(at, "comp must be made by a `compress` and select by an `index_topk` over index keys");
                };
                let s = sparse.entry(slot).or_insert(SparseSlot::new(ValueId(i as u32)));
                if let Some(w) = s.attention {
                    return fail(at, format!("slot {slot} is already attended by {w}"));
                }
                s.attention = Some(ValueId(i as u32));
                // The streams it reads are the slot's, with the attention's rotary table and one ratio and eps.
                let mut ratio_eps = None;
                for (op_at, stream, index) in [(g.comp, s.comp, false), (g.keys, s.keys, true)] {
                    let Some(j) = op_at else { continue };
                    let Op::Compress { attrs: c, .. } = &m.insts[j].op else { continue };
                    if stream != Some(ValueId(j as u32)) {
                        return fail(
                            at,
                            format!("reads the {} stream %{j} of slot {}, not of slot {slot}", kind(index), c.cache),
                        );
                    }
                    if c.rope != attrs.rope {
                        return fail(
                            at,
                            format!("the {} stream %{j} rotates with another table than the attention", kind(index)),
                        );
                    }
                    if ratio_eps.is_some_and(|re| re != (c.ratio, c.eps.to_bits())) {
                        return fail(at, "the compressed rows and the index keys need one ratio and one eps");
                    }
                    ratio_eps = Some((c.ratio, c.eps.to_bits()));
                }
                if (s.comp.is_some() && g.comp.is_none()) || (s.keys.is_some() && g.keys.is_none()) {
                    return fail(at, format!("slot {slot} has a compressor stream this attention does not read"));
                }
            }
            Op::Attention { k, attrs, .. } => {
                if let Some(w) = compressed.get(&attrs.cache).or_else(|| sparse.get(&attrs.cache).map(|s| &s.first)) {
                    return fail(
                        at,
                        format!(
                            "KV-cache slot {} belongs to the compressed attention {w}; no other op may use it",
                            attrs.cache
                        ),
                    );
                }
                if k.is_some() {
                    if let Some((w, _, _, _)) = caches.get(&attrs.cache) {
                        return fail(at, format!("KV-cache slot {} is already written by {w}", attrs.cache));
                    }
                    caches.insert(attrs.cache, (ValueId(i as u32), attrs.kv_heads, attrs.head_dim, attrs.kv_dtype));
                } else {
                    match caches.get(&attrs.cache) {
                        None => {
                            return fail(
                                at,
                                format!("reads KV-cache slot {} but no earlier attention writes it", attrs.cache),
                            );
                        }
                        Some((w, _, _, dt)) if *dt != attrs.kv_dtype => {
                            return fail(
                                at,
                                format!(
                                    "reads KV-cache slot {} written by {w} as {dt} values, but names {}",
                                    attrs.cache, attrs.kv_dtype
                                ),
                            );
                        }
                        Some((w, kvh, hd, _)) if (*kvh, *hd) != (attrs.kv_heads, attrs.head_dim) => {
                            return fail(
                                at,
                                format!(
                                    "shares KV-cache slot {} written by {w} with kv_heads {kvh}, head_dim {hd}, \
                                     but reads it as kv_heads {}, head_dim {}",
                                    attrs.cache, attrs.kv_heads, attrs.head_dim
                                ),
                            );
                        }
                        Some(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    for (slot, s) in &sparse {
        if s.attention.is_none() {
            return fail(format!("{} = compress", s.first), format!("slot {slot} has no sparse_attention to read it"));
        }
    }
    let Some(out) = m.output else {
        return fail("module", "no `output`");
    };
    if out.index() >= m.insts.len() {
        return fail("output", format!("{out} is not defined"));
    }
    let ty = &m.insts[out.index()].ty;
    if ty.dtype != DType::F32 || ty.shape.len() != 2 || ty.shape[0] != Dim::Seq {
        return fail("output", format!("logits must be f32[T, vocab], found {ty}"));
    }
    Ok(())
}
