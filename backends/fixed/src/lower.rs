//! Lowering a verified module to a fixed-point [`Program`]: the one place where
//! floats become integers.
//!
//! - Weight matrices (any float or quantized dtype) are dequantized and requantized to
//!   int8 per output row (symmetric, `scale = max|w| / 127`); the row scale becomes an
//!   integer multiplier and shift (`mult · 2^-shift`, `mult` in `[2^14, 2^15)`), as in
//!   CMSIS-NN's requantization.
//! - Norm weights and biases become Q16 `i32`; scalar factors become multiplier + shift.
//! - RoPE becomes a `[max_context][rot/2][cos, sin]` Q14 table.
//! - Activations are not calibrated: each vector is scaled to 16-bit mantissas by its own
//!   power-of-two shift at run time (block floating point), so no statistics are needed
//!   and nothing saturates on unusual text.
//! - Every value gets a range of one static arena, reused once the value is dead.

use std::collections::HashMap;

use kiln_backends::WeightSource;
use kiln_ir::{Activation, DType, Op, ParamId, RopeLayout, ValueId, VerifiedModule};

use crate::int;
use crate::program::*;

/// Longest context a fixed-point build may have (attention sums stay within 64 bits).
pub const MAX_CONTEXT_LIMIT: usize = 8192;

/// Why an op cannot be lowered, or `None`.
pub fn unsupported(module: &VerifiedModule, op: &Op) -> Option<String> {
    match op {
        Op::Tokens | Op::Embed { .. } | Op::Add { .. } | Op::Mul { .. } | Op::Act { .. } | Op::Glu { .. } => None,
        Op::RmsNorm { .. } | Op::Scale { .. } | Op::Rope { .. } => None,
        Op::MatMul { w, .. } if module.param(*w).ty.dtype == DType::I32 => Some("integer weight tensors".into()),
        Op::MatMul { .. } => None,
        Op::Attention { attrs, .. } if !matches!(attrs.kv_dtype, DType::F32 | DType::Q8_0 | DType::Q4_0) => {
            Some(format!(
                "a `{}` KV cache (fixed-point builds keep 16-bit caches, 8-bit ones for `q8_0`, 4-bit ones for `q4_0`)",
                attrs.kv_dtype.name()
            ))
        }
        Op::Attention { attrs, .. }
            if attrs.kv_dtype == DType::Q4_0
                && !(attrs.head_dim as usize).is_multiple_of(crate::program::KV4_GROUP) =>
        {
            Some(format!(
                "a `q4_0` KV cache with head_dim {} (4-bit caches need a multiple of {})",
                attrs.head_dim,
                crate::program::KV4_GROUP
            ))
        }
        Op::Attention { .. } => None,
        Op::LayerNorm { .. } | Op::Softmax { .. } | Op::Steer { .. } => Some(format!("op `{}`", op.name())),
        Op::Repeat { .. }
        | Op::HcCoeffs { .. }
        | Op::HcPre { .. }
        | Op::HcPost { .. }
        | Op::MoeRoute { .. }
        | Op::Moe { .. }
        | Op::GroupedMatMul { .. }
        | Op::CompressedAttention { .. }
        | Op::Compress { .. }
        | Op::IndexTopk { .. }
        | Op::SparseAttention { .. } => Some(format!("op `{}`", op.name())),
    }
}

fn dim(module: &VerifiedModule, v: ValueId) -> Result<usize, String> {
    module.value_type(v).last_fixed().map(|n| n as usize).ok_or_else(|| format!("value %{} has no fixed width", v.0))
}

fn param_f32(module: &VerifiedModule, weights: &dyn WeightSource, p: ParamId) -> Result<Vec<f32>, String> {
    let ty = &module.param(p).ty;
    let n = ty.fixed_elems().ok_or("a parameter without a fixed shape")? as usize;
    let mut out = vec![0f32; n];
    let bytes = weights.bytes(p);
    let cols = ty.last_fixed().unwrap_or(n as u64) as usize;
    let row_bytes = ty.dtype.row_bytes(cols as u64).ok_or("bad row length")? as usize;
    for (r, dst) in out.chunks_mut(cols.max(1)).enumerate() {
        let src = bytes.get(r * row_bytes..(r + 1) * row_bytes).ok_or("weights shorter than their type")?;
        kiln_quant::dequantize_row(ty.dtype, src, dst).map_err(|e| format!("@{}: {e}", module.param(p).name))?;
    }
    Ok(out)
}

fn ident(name: &str) -> String {
    let mut s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

struct Lowering<'a> {
    module: &'a VerifiedModule,
    weights: &'a dyn WeightSource,
    consts: Vec<Const>,
    rows: HashMap<ParamId, Rows>,
    vecs: HashMap<ParamId, ConstId>,
    ropes: Vec<(String, ConstId)>,
    max_context: usize,
}

impl Lowering<'_> {
    fn push(&mut self, name: String, data: Data) -> ConstId {
        self.consts.push(Const { name, data });
        ConstId(self.consts.len() - 1)
    }

    /// int8 rows with per-row multiplier and shift (shared by every op that reads `p`).
    fn rows(&mut self, p: ParamId) -> Result<Rows, String> {
        if let Some(r) = self.rows.get(&p) {
            return Ok(*r);
        }
        let ty = &self.module.param(p).ty;
        let dims = ty.fixed_dims().ok_or("a weight without a fixed shape")?;
        let [rows, cols] = dims[..] else { return Err(format!("@{}: not a matrix", self.module.param(p).name)) };
        let (rows, cols) = (rows as usize, cols as usize);
        let base = ident(&self.module.param(p).name);
        if ty.dtype == DType::Q4_0 && cols.is_multiple_of(32) {
            let r = self.rows_q4(p, rows, cols, &base)?;
            self.rows.insert(p, r);
            return Ok(r);
        }
        let w = param_f32(self.module, self.weights, p)?;
        let mut q = vec![0i8; rows * cols];
        let (mut mult, mut shift) = (vec![0i32; rows], vec![0i32; rows]);
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f64, |m, x| m.max((*x as f64).abs()));
            if amax == 0.0 || !amax.is_finite() {
                continue;
            }
            let scale = amax / 127.0;
            for (d, x) in q[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                *d = ((*x as f64) / scale).round().clamp(-127.0, 127.0) as i8;
            }
            (mult[r], shift[r]) = int::quant_mult(scale);
        }
        let r = Rows {
            format: RowFormat::I8,
            w: self.push(format!("w_{base}"), Data::I8(q)),
            mult: self.push(format!("m_{base}"), Data::I32(mult)),
            shift: self.push(format!("s_{base}"), Data::I32(shift)),
            rows,
            cols,
        };
        self.rows.insert(p, r);
        Ok(r)
    }

    /// A Q4_0 matrix kept exactly: its 4-bit values repacked, each block's f16 scale a
    /// signed 16-bit multiplier under one shift per row.
    fn rows_q4(&mut self, p: ParamId, rows: usize, cols: usize, base: &str) -> Result<Rows, String> {
        let bytes = self.weights.bytes(p);
        let groups = cols / 32;
        if bytes.len() != rows * groups * 18 {
            return Err(format!("@{}: weights shorter than their type", self.module.param(p).name));
        }
        let mut packed = vec![0u8; rows * groups * 16];
        let mut mult = vec![0i16; rows * groups];
        let mut shift = vec![0i32; rows];
        for r in 0..rows {
            let blocks = &bytes[r * groups * 18..(r + 1) * groups * 18];
            let d: Vec<f64> = blocks.chunks(18).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()).collect();
            let dmax = d.iter().fold(0f64, |m, x| m.max(x.abs()));
            if dmax > 0.0 && dmax.is_finite() {
                shift[r] = int::quant_mult(dmax).1;
            }
            for (g, b) in blocks.chunks(18).enumerate() {
                let m = (d[g] * 2f64.powi(shift[r])).round().clamp(-32767.0, 32767.0);
                mult[r * groups + g] = if m.is_finite() { m as i16 } else { 0 };
                let q = |j: usize| if j < 16 { b[2 + j] & 15 } else { b[2 + j - 16] >> 4 };
                for k in 0..16 {
                    packed[(r * groups + g) * 16 + k] = q(2 * k) | (q(2 * k + 1) << 4);
                }
            }
        }
        Ok(Rows {
            format: RowFormat::Q4,
            w: self.push(format!("w_{base}"), Data::U8(packed)),
            mult: self.push(format!("m_{base}"), Data::I16(mult)),
            shift: self.push(format!("s_{base}"), Data::I32(shift)),
            rows,
            cols,
        })
    }

    /// A vector parameter in Q16.
    fn vec_q16(&mut self, p: ParamId) -> Result<ConstId, String> {
        if let Some(c) = self.vecs.get(&p) {
            return Ok(*c);
        }
        let v = param_f32(self.module, self.weights, p)?;
        let q = v.iter().map(|x| int::sat32(((*x as f64) * 65536.0).round() as i64)).collect();
        let c = self.push(format!("v_{}", ident(&self.module.param(p).name)), Data::I32(q));
        self.vecs.insert(p, c);
        Ok(c)
    }

    fn rope_table(&mut self, a: &kiln_ir::RopeAttrs) -> ConstId {
        let key = format!("{}:{}:{}:{}", a.rot_dims, a.theta, a.freq_scale, a.head_dim);
        if let Some((_, c)) = self.ropes.iter().find(|(k, _)| *k == key) {
            return *c;
        }
        let half = (a.rot_dims / 2) as usize;
        let mut t = Vec::with_capacity(self.max_context * half * 2);
        for p in 0..self.max_context {
            for i in 0..half {
                let freq = (a.theta as f64).powf(-2.0 * i as f64 / a.rot_dims as f64);
                let angle = p as f64 * a.freq_scale as f64 * freq;
                t.push((angle.cos() * 16384.0).round() as i16);
                t.push((angle.sin() * 16384.0).round() as i16);
            }
        }
        let c = self.push(format!("rope{}", self.ropes.len()), Data::I16(t));
        self.ropes.push((key, c));
        c
    }
}

/// First-fit allocation of value buffers in one arena, freed after their last use.
struct Arena {
    live: Vec<(usize, usize, usize)>, // (off, len, value)
    size: usize,
}

impl Arena {
    fn alloc(&mut self, len: usize, v: usize) -> Buf {
        self.live.sort();
        let mut off = 0;
        for &(o, l, _) in &self.live {
            if o >= off + len {
                break;
            }
            off = off.max(o + l);
        }
        self.live.push((off, len, v));
        self.size = self.size.max(off + len);
        Buf { off, len }
    }
    fn free_dead(&mut self, last_use: &[usize], now: usize) {
        self.live.retain(|&(_, _, v)| last_use[v] >= now);
    }
}

/// Lowers `module` for a context of `max_context` positions.
pub fn lower(module: &VerifiedModule, weights: &dyn WeightSource, max_context: usize) -> Result<Program, String> {
    if max_context == 0 || max_context > MAX_CONTEXT_LIMIT {
        return Err(format!("a context of {max_context} positions (fixed-point builds hold 1..={MAX_CONTEXT_LIMIT})"));
    }
    for inst in &module.insts {
        if let Some(what) = unsupported(module, &inst.op) {
            return Err(what);
        }
    }
    let output = module.output.ok_or("the module has no output")?;
    let n = module.insts.len();
    // A value lives until its last reader (its own instruction when nothing reads it); the
    // logits until the end.
    let mut last_use: Vec<usize> =
        kiln_ir::analysis::last_uses(module).iter().enumerate().map(|(i, l)| l.unwrap_or(i)).collect();
    last_use[output.index()] = usize::MAX;

    let mut lw = Lowering {
        module,
        weights,
        consts: vec![],
        rows: HashMap::new(),
        vecs: HashMap::new(),
        ropes: vec![],
        max_context,
    };
    let exp2 = lw.push("exp2_q30".into(), Data::I32(int::exp2_table()));
    let mut arena = Arena { live: vec![], size: 0 };
    let mut bufs: Vec<Option<Buf>> = vec![None; n];
    let mut steps = vec![];
    let mut slots: Vec<Option<Slot>> = vec![];
    let mut scratch16 = 0usize;
    let mut scores = 0usize;
    let rings = kiln_backends::ring::plan(module, max_context, 1);
    let mut vocab_rows = 0usize;
    let mut scratch_groups = 0usize;
    let buf =
        |bufs: &Vec<Option<Buf>>, v: ValueId| bufs[v.index()].ok_or_else(|| format!("value %{} is not a vector", v.0));
    let kind = |a: Activation| match a {
        Activation::Silu => ActKind::Silu,
        Activation::GeluTanh => ActKind::GeluTanh,
    };
    for (i, inst) in module.insts.iter().enumerate() {
        arena.free_dead(&last_use, i);
        if matches!(inst.op, Op::Tokens) {
            continue;
        }
        let out = arena.alloc(dim(module, ValueId(i as u32))?, i);
        bufs[i] = Some(out);
        let step = match &inst.op {
            Op::Tokens => unreachable!(),
            Op::Embed { table, ids } => {
                if !matches!(module.insts[ids.index()].op, Op::Tokens) {
                    return Err("an embedding of something other than the input tokens".into());
                }
                let table = lw.rows(*table)?;
                vocab_rows = table.rows;
                Step::Embed { table, out }
            }
            Op::RmsNorm { x, weight, eps, group } => {
                let xb = buf(&bufs, *x)?;
                let group = if *group == 0 { xb.len } else { *group as usize };
                let gamma = match weight {
                    Some(p) => Some(lw.vec_q16(*p)?),
                    None => None,
                };
                let eps_q = ((*eps as f64) * 4294967296.0).round() as u64;
                Step::RmsNorm { x: xb, out, group, gamma, eps_q }
            }
            Op::MatMul { x, w, bias } => {
                let xb = buf(&bufs, *x)?;
                scratch16 = scratch16.max(xb.len);
                let bias = match bias {
                    Some(p) => Some(lw.vec_q16(*p)?),
                    None => None,
                };
                let w = lw.rows(*w)?;
                if w.format == RowFormat::Q4 {
                    scratch_groups = scratch_groups.max(w.cols / 32);
                }
                Step::MatMul { x: xb, out, w, bias }
            }
            Op::Add { a, b } => Step::Add { a: buf(&bufs, *a)?, b: buf(&bufs, *b)?, out },
            Op::Mul { a, b } => Step::Mul { a: buf(&bufs, *a)?, b: buf(&bufs, *b)?, out },
            Op::Scale { x, s } => {
                let (mult, shift) = int::quant_mult(*s as f64);
                Step::Scale { x: buf(&bufs, *x)?, out, mult, shift }
            }
            Op::Act { x, kind: k } => Step::Act { x: buf(&bufs, *x)?, out, kind: kind(*k) },
            Op::Glu { gate, up, kind: k } => {
                Step::Glu { gate: buf(&bufs, *gate)?, up: buf(&bufs, *up)?, out, kind: kind(*k) }
            }
            Op::Rope { x, attrs } => Step::Rope {
                x: buf(&bufs, *x)?,
                out,
                table: lw.rope_table(attrs),
                head_dim: attrs.head_dim as usize,
                rot: attrs.rot_dims as usize,
                neox: attrs.layout == RopeLayout::Neox,
            },
            Op::Attention { q, k, v, attrs } => {
                let slot = attrs.cache as usize;
                if slots.len() <= slot {
                    slots.resize(slot + 1, None);
                }
                let (kvh, hd) = (attrs.kv_heads as usize, attrs.head_dim as usize);
                let bits = match attrs.kv_dtype {
                    DType::Q8_0 => 8,
                    DType::Q4_0 => 4,
                    _ => 16,
                };
                // Slots only windowed attention reads are rings of sinks + window rows
                // (`kiln_backends::ring`, one token per step).
                let (rows, sink) = rings.slots.get(&attrs.cache).copied().unwrap_or((max_context, 0));
                if k.is_some() {
                    slots[slot] = Some(Slot { kv_heads: kvh, head_dim: hd, bits, rows, sink });
                }
                scores = scores.max(rows);
                scratch16 = scratch16.max(hd);
                let kv = match (k, v) {
                    (Some(k), Some(v)) => Some((buf(&bufs, *k)?, buf(&bufs, *v)?)),
                    _ => None,
                };
                let (mult, shift) = int::quant_mult(attrs.scale as f64);
                let softcap = (attrs.softcap > 0.0)
                    .then(|| [int::quant_mult(2.0 / attrs.softcap as f64), int::quant_mult(attrs.softcap as f64)]);
                Step::Attention {
                    q: buf(&bufs, *q)?,
                    kv,
                    out,
                    slot,
                    heads: attrs.heads as usize,
                    kv_heads: kvh,
                    head_dim: hd,
                    mult,
                    shift,
                    window: attrs.window as usize,
                    sink: attrs.sink as usize,
                    softcap,
                }
            }
            Op::LayerNorm { .. } | Op::Softmax { .. } | Op::Steer { .. } => unreachable!("refused above"),
            Op::Repeat { .. }
            | Op::HcCoeffs { .. }
            | Op::HcPre { .. }
            | Op::HcPost { .. }
            | Op::MoeRoute { .. }
            | Op::Moe { .. }
            | Op::GroupedMatMul { .. }
            | Op::CompressedAttention { .. }
            | Op::Compress { .. }
            | Op::IndexTopk { .. }
            | Op::SparseAttention { .. } => unreachable!("refused above"),
        };
        steps.push(step);
    }
    let logits = buf(&bufs, output)?;
    let slots =
        slots.into_iter().map(|s| s.unwrap_or(Slot { kv_heads: 0, head_dim: 0, bits: 16, rows: 0, sink: 0 })).collect();
    Ok(Program {
        name: module.name.clone(),
        max_context,
        vocab: logits.len,
        vocab_rows,
        consts: lw.consts,
        exp2,
        steps,
        arena: arena.size,
        scratch16,
        scratch_groups,
        scores,
        slots,
        logits,
    })
}
