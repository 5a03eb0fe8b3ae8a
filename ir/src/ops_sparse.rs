//! Attributes and type rules of the hyper-connection (`repeat`, `hc_coeffs`, `hc_pre`,
//! `hc_post`), mixture-of-experts (`moe_route`, `moe`), `grouped_matmul` and
//! `compressed_attention` ops (DeepSeek-V4); the ops themselves are variants of
//! [`Op`], documented there.

use crate::entities::{ParamId, ValueId};
use crate::ops::{Op, TypeEnv, act_row};
use crate::types::{DType, Dim, TensorType};

/// How a router turns logits into expert scores ([`Op::MoeRoute`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scoring {
    /// `sqrt(softplus(z))` (DeepSeek-V4; softplus is `z` above 20, as torch's).
    SqrtSoftplus,
    /// `sigmoid(z)`.
    Sigmoid,
    /// Softmax over the experts of the row.
    Softmax,
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::SqrtSoftplus => "sqrtsoftplus",
            Scoring::Sigmoid => "sigmoid",
            Scoring::Softmax => "softmax",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "sqrtsoftplus" => Some(Scoring::SqrtSoftplus),
            "sigmoid" => Some(Scoring::Sigmoid),
            "softmax" => Some(Scoring::Softmax),
            _ => None,
        }
    }
}

/// Attributes of a router ([`Op::MoeRoute`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeRouteAttrs {
    pub scoring: Scoring,
    /// Experts per token.
    pub top_k: u64,
    /// Routed scaling factor: the normalised weights are multiplied by it.
    pub scale: f32,
}

/// Rotary table of a [`Op::CompressedAttention`]: interleaved pairs on the *last*
/// `rot_dims` channels of each head, `inv_freq[i] = theta^(-2i/rot_dims)` (computed in
/// f32), optionally YaRN-scaled: with `yarn_factor > 1`, correction range
/// `low = max(floor(d(beta_fast)), 0)`, `high = min(ceil(d(beta_slow)), rot_dims − 1)` where
/// `d(b) = rot_dims · ln(yarn_orig_ctx / (2π b)) / (2 ln theta)` (`high += 0.001` when equal),
/// `ramp_i = clamp((i − low) / (high − low), 0, 1)` and
/// `inv_freq_i = inv_freq_i / yarn_factor · ramp_i + inv_freq_i · (1 − ramp_i)`; no magnitude
/// scaling (transformers' DeepSeek-V4 forces `attention_factor = 1`). Angle = `pos · inv_freq_i`
/// in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct RotaryAttrs {
    pub rot_dims: u64,
    pub theta: f32,
    /// 1 = plain RoPE.
    pub yarn_factor: f32,
    pub yarn_orig_ctx: u64,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
}

/// Attributes of a [`Op::CompressedAttention`].
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedAttentionAttrs {
    /// Cache slot the op owns (a slot kind of its own: raw window, compressed rows,
    /// compressor state, indexer keys); no other op may read or write it.
    pub cache: u32,
    pub heads: u64,
    pub head_dim: u64,
    /// Multiplier of q·k.
    pub scale: f32,
    /// Raw sliding window: a key at position j is visible from p iff `p − window < j ≤ p`.
    pub window: u64,
    /// Tokens pooled into one compressed row; 0 = no compressed stream.
    pub ratio: u64,
    /// Compressed rows kept per query by the indexer; 0 = no indexer (every visible row).
    pub topk: u64,
    pub index_heads: u64,
    pub index_dim: u64,
    /// Epsilon of the compressors' RMSNorm.
    pub eps: f32,
    pub rope: RotaryAttrs,
}

/// The operands of one compressor stream of a [`Op::CompressedAttention`]: this call's
/// projections `kv`, `gate` (`f32[T, c]` or `f32[T, 2c]` for overlapping windows), the
/// per-slot gate bias `ape` (`f32[ratio, width]`) and the RMSNorm weight `norm` (`f32[c]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressorOperands {
    pub kv: ValueId,
    pub gate: ValueId,
    pub ape: ParamId,
    pub norm: ParamId,
}

/// The Lightning Indexer of a [`Op::CompressedAttention`]: queries `q`
/// (`f32[T, index_heads·index_dim]`, before RoPE), per-head weights `w`
/// (`f32[T, index_heads]`) and its own key compressor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IndexerOperands {
    pub q: ValueId,
    pub w: ValueId,
    pub keys: CompressorOperands,
}

/// Attributes of a [`Op::Compress`].
#[derive(Clone, Debug, PartialEq)]
pub struct CompressAttrs {
    /// The compressed-attention slot whose stream the op writes.
    pub cache: u32,
    /// Which stream: the indexer's keys (true) or the attention's compressed rows (false).
    pub index: bool,
    /// Tokens pooled into one row.
    pub ratio: u64,
    /// Epsilon of the RMSNorm.
    pub eps: f32,
    pub rope: RotaryAttrs,
}

/// Attributes of a [`Op::IndexTopk`].
#[derive(Clone, Debug, PartialEq)]
pub struct IndexTopkAttrs {
    /// Compressed rows kept per query.
    pub topk: u64,
    /// Indexer heads (`q` holds `heads × dim`, `dim` the keys' width).
    pub heads: u64,
}

/// Attributes of a [`Op::SparseAttention`].
#[derive(Clone, Debug, PartialEq)]
pub struct SparseAttentionAttrs {
    /// The compressed-attention slot: raw window here, compressed streams from the ops
    /// named by `comp` / `select`.
    pub cache: u32,
    pub heads: u64,
    pub head_dim: u64,
    pub scale: f32,
    pub window: u64,
    pub rope: RotaryAttrs,
}

/// Checks a rotary table for heads of `dim` channels (`what` names the op).
fn check_rope(r: &RotaryAttrs, dim: u64, what: &str) -> Result<(), String> {
    if r.rot_dims == 0 || r.rot_dims > dim || !r.rot_dims.is_multiple_of(2) {
        return Err(format!("{what} rot_dims {} must be even and in 1..={dim}", r.rot_dims));
    }
    if !(r.theta > 1.0 && r.theta.is_finite()) {
        return Err(format!("{what} theta {} must be above 1", r.theta));
    }
    if r.yarn_factor != 1.0
        && !(r.yarn_factor > 1.0
            && r.yarn_factor.is_finite()
            && r.yarn_orig_ctx > 0
            && r.yarn_beta_fast > 0.0
            && r.yarn_beta_slow > 0.0)
    {
        return Err(format!("{what} YaRN needs yarn_factor > 1, yarn_orig_ctx and positive betas"));
    }
    Ok(())
}

/// The three matrices of one SwiGLU expert ([`Op::Moe`]'s shared expert).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertParams {
    pub gate: ParamId,
    pub up: ParamId,
    pub down: ParamId,
}

impl Op {
    /// Type rules of the hyper-connection, mixture-of-experts and compressed-attention ops.
    pub(crate) fn infer_sparse(&self, env: &dyn TypeEnv) -> Result<TensorType, String> {
        let vt = |v: ValueId| env.value_type(v).ok_or_else(|| format!("{v} used before it is defined"));
        let pt = |p: ParamId| env.param_type(p).ok_or_else(|| format!("undefined parameter #{}", p.0));
        let act = |n: u64| TensorType::new(DType::F32, vec![Dim::Seq, Dim::Fixed(n)]);
        let row = |v: ValueId, what: &str| -> Result<u64, String> { act_row(vt(v)?, what) };
        let f32_param = |p: ParamId, dims: &[u64], what: &str| -> Result<(), String> {
            let t = pt(p)?;
            if t.dtype != DType::F32 || t.fixed_dims().as_deref() != Some(dims) {
                return Err(format!("{what} @{} must be f32{dims:?}, found {t}", env.param_name(p)));
            }
            Ok(())
        };
        let matrix = |p: ParamId, dims: &[u64], what: &str| -> Result<(), String> {
            let t = pt(p)?;
            if !t.dtype.is_float() || t.fixed_dims().as_deref() != Some(dims) {
                return Err(format!("{what} @{} must be a float or quantized {dims:?}, found {t}", env.param_name(p)));
            }
            Ok(())
        };
        match self {
            Op::Repeat { x, times } => {
                let n = row(*x, "repeat input")?;
                if *times == 0 || *times > 4096 {
                    return Err(format!("repeat times {times} must be in 1..=4096"));
                }
                Ok(act(n * times))
            }
            Op::HcCoeffs { f, base, scale, streams: n, iters, eps } => {
                let w = row(*f, "hc_coeffs input")?;
                if *n == 0 || *n > 64 {
                    return Err(format!("hc_coeffs streams {n} must be in 1..=64"));
                }
                let full = (2 + n) * n;
                let scales = if w == full {
                    3
                } else if w == *n {
                    1
                } else {
                    return Err(format!("hc_coeffs input has {w} columns, expected (2+n)·n = {full} or n = {n}"));
                };
                if *iters == 0 || *iters > 1000 {
                    return Err(format!("hc_coeffs iters {iters} must be in 1..=1000"));
                }
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(format!("hc_coeffs eps {eps} must be finite and non-negative"));
                }
                f32_param(*base, &[w], "hc_coeffs base")?;
                f32_param(*scale, &[scales], "hc_coeffs scale")?;
                Ok(act(w))
            }
            Op::HcPre { x, c, streams: n } => {
                let w = row(*x, "hc_pre streams")?;
                let cw = row(*c, "hc_pre coefficients")?;
                if *n == 0 || *n > 64 || w % n != 0 || (cw != *n && cw != (2 + n) * n) {
                    return Err(format!("hc_pre: {w} stream columns and {cw} coefficients do not fit {n} streams"));
                }
                Ok(act(w / n))
            }
            Op::HcPost { x, y, c, streams: n } => {
                let w = row(*x, "hc_post streams")?;
                let d = row(*y, "hc_post block output")?;
                let cw = row(*c, "hc_post coefficients")?;
                if *n == 0 || *n > 64 || Some(w) != n.checked_mul(d) || cw != (2 + n) * n {
                    return Err(format!(
                        "hc_post: {w} stream columns, a block output of {d} and {cw} coefficients do not fit {n} streams"
                    ));
                }
                Ok(act(w))
            }
            Op::MoeRoute { logits, ids, bias, table, attrs } => {
                let e = row(*logits, "moe_route logits")?;
                if attrs.top_k == 0 || attrs.top_k > e {
                    return Err(format!("moe_route top_k {} must be in 1..={e}", attrs.top_k));
                }
                if !attrs.scale.is_finite() {
                    return Err(format!("moe_route scale {} must be finite", attrs.scale));
                }
                if let Some(b) = bias {
                    f32_param(*b, &[e], "moe_route bias")?;
                }
                match (table, ids) {
                    (Some(t), Some(ids)) => {
                        let it = vt(*ids)?;
                        if it.dtype != DType::I32 || it.shape != [Dim::Seq] {
                            return Err(format!("moe_route ids must be i32[T], found {it}"));
                        }
                        let tt = pt(*t)?;
                        match tt.fixed_dims().as_deref() {
                            Some([_, k]) if tt.dtype == DType::F32 && *k == attrs.top_k => {}
                            _ => {
                                return Err(format!(
                                    "moe_route table @{} must be f32[V, {}], found {tt}",
                                    env.param_name(*t),
                                    attrs.top_k
                                ));
                            }
                        }
                        if bias.is_some() {
                            return Err("moe_route: a hash table and a selection bias exclude each other".into());
                        }
                    }
                    (None, None) => {}
                    _ => return Err("moe_route needs both `ids` and `table`, or neither".into()),
                }
                Ok(act(e))
            }
            Op::Moe { x, w, gate, up, down, shared, limit } => {
                let d = row(*x, "moe input")?;
                let e = row(*w, "moe weights")?;
                let gt = pt(*gate)?;
                let i = match gt.fixed_dims().as_deref() {
                    Some([ee, i, dd]) if *ee == e && *dd == d => *i,
                    _ => {
                        return Err(format!("moe gate @{} must be [{e}, I, {d}], found {gt}", env.param_name(*gate)));
                    }
                };
                matrix(*gate, &[e, i, d], "moe gate")?;
                matrix(*up, &[e, i, d], "moe up")?;
                matrix(*down, &[e, d, i], "moe down")?;
                if let Some(s) = shared {
                    let st = pt(s.gate)?;
                    let si = match st.fixed_dims().as_deref() {
                        Some([si, dd]) if *dd == d => *si,
                        _ => {
                            return Err(format!(
                                "moe shared gate @{} must be [I, {d}], found {st}",
                                env.param_name(s.gate)
                            ));
                        }
                    };
                    matrix(s.gate, &[si, d], "moe shared gate")?;
                    matrix(s.up, &[si, d], "moe shared up")?;
                    matrix(s.down, &[d, si], "moe shared down")?;
                }
                if !(limit.is_finite() && *limit >= 0.0) {
                    return Err(format!("moe limit {limit} must be finite and non-negative"));
                }
                Ok(act(d))
            }
            Op::GroupedMatMul { x, w, groups } => {
                let n = row(*x, "grouped_matmul input")?;
                let wt = pt(*w)?;
                let g = *groups;
                match wt.fixed_dims().as_deref() {
                    Some([out, k]) if g > 0 && out % g == 0 && Some(n) == g.checked_mul(*k) && wt.dtype.is_float() => {
                        if k % wt.dtype.block_elems() != 0 {
                            return Err(format!(
                                "grouped_matmul weight @{}: rows of {k} do not fit {} blocks",
                                env.param_name(*w),
                                wt.dtype
                            ));
                        }
                        Ok(act(*out))
                    }
                    _ => Err(format!(
                        "grouped_matmul weight @{} ({wt}) does not fit {g} groups of an input of {n}",
                        env.param_name(*w)
                    )),
                }
            }
            Op::CompressedAttention { q, kv, sink, comp, indexer, attrs: a } => {
                let (h, hd) = (a.heads, a.head_dim);
                if h == 0 || hd == 0 || h > 4096 || hd > 4096 {
                    return Err(format!("compressed_attention heads {h} / head_dim {hd} out of range"));
                }
                if row(*q, "compressed_attention q")? != h * hd {
                    return Err(format!("compressed_attention q must have heads×head_dim = {} columns", h * hd));
                }
                if row(*kv, "compressed_attention kv")? != hd {
                    return Err(format!("compressed_attention kv must have head_dim = {hd} columns"));
                }
                f32_param(*sink, &[h], "compressed_attention sink")?;
                let r = &a.rope;
                check_rope(r, hd, "compressed_attention")?;
                if a.window == 0 || !a.scale.is_finite() || !(a.eps.is_finite() && a.eps >= 0.0) {
                    return Err("compressed_attention needs window ≥ 1, a finite scale and eps".into());
                }
                if a.ratio > 1 << 16 {
                    return Err(format!("compressed_attention ratio {} is too large", a.ratio));
                }
                let stream = |c: &CompressorOperands, dim: u64, what: &str| -> Result<(), String> {
                    let w = row(c.kv, what)?;
                    if (w != dim && w != 2 * dim) || row(c.gate, what)? != w {
                        return Err(format!("{what}: kv and gate must both have {dim} or {} columns", 2 * dim));
                    }
                    f32_param(c.ape, &[a.ratio, w], &format!("{what} ape"))?;
                    f32_param(c.norm, &[dim], &format!("{what} norm"))
                };
                match comp {
                    Some(c) if a.ratio > 0 => stream(c, hd, "compressed_attention compressor")?,
                    None if a.ratio == 0 => {}
                    _ => {
                        return Err(
                            "compressed_attention: a compressor needs ratio > 0, and ratio > 0 a compressor".into()
                        );
                    }
                }
                match indexer {
                    Some(ix) if a.topk > 0 && comp.is_some() => {
                        let (nh, di) = (a.index_heads, a.index_dim);
                        if nh == 0 || di == 0 || nh > 4096 || di > 4096 {
                            return Err(format!("compressed_attention index_heads {nh} / index_dim {di} out of range"));
                        }
                        if row(ix.q, "compressed_attention idx_q")? != nh * di
                            || row(ix.w, "compressed_attention idx_w")? != nh
                        {
                            return Err(format!(
                                "compressed_attention idx_q must have {} and idx_w {nh} columns",
                                nh * di
                            ));
                        }
                        if r.rot_dims > di {
                            return Err(format!("compressed_attention rot_dims {} exceeds index_dim {di}", r.rot_dims));
                        }
                        stream(&ix.keys, di, "compressed_attention indexer")?;
                    }
                    None if a.topk == 0 => {}
                    _ => {
                        return Err(
                            "compressed_attention: an indexer needs a compressor and topk > 0, and topk > 0 an indexer"
                                .into(),
                        );
                    }
                }
                Ok(act(h * hd))
            }
            Op::Compress { kv, gate, ape, norm, attrs: a } => {
                let nt = pt(*norm)?;
                let dim = match nt.fixed_dims().as_deref() {
                    Some([d]) if nt.dtype == DType::F32 && *d > 0 && *d <= 4096 => *d,
                    _ => return Err(format!("compress norm @{} must be f32[dim], found {nt}", env.param_name(*norm))),
                };
                let w = row(*kv, "compress kv")?;
                if (w != dim && w != 2 * dim) || row(*gate, "compress gate")? != w {
                    return Err(format!("compress: kv and gate must both have {dim} or {} columns", 2 * dim));
                }
                if a.ratio == 0 || a.ratio > 1 << 16 {
                    return Err(format!("compress ratio {} must be in 1..=65536", a.ratio));
                }
                if !(a.eps.is_finite() && a.eps >= 0.0) {
                    return Err(format!("compress eps {} must be finite and non-negative", a.eps));
                }
                f32_param(*ape, &[a.ratio, w], "compress ape")?;
                check_rope(&a.rope, dim, "compress")?;
                Ok(act(dim))
            }
            Op::IndexTopk { q, w, keys, attrs: a } => {
                let di = row(*keys, "index_topk keys")?;
                let nh = a.heads;
                if nh == 0 || nh > 4096 {
                    return Err(format!("index_topk heads {nh} out of range"));
                }
                if row(*q, "index_topk q")? != nh * di || row(*w, "index_topk w")? != nh {
                    return Err(format!("index_topk q must have heads×dim = {} and w {nh} columns", nh * di));
                }
                if a.topk == 0 || a.topk > 1 << 20 {
                    return Err(format!("index_topk topk {} must be in 1..=1048576", a.topk));
                }
                Ok(TensorType::new(DType::I32, vec![Dim::Seq, Dim::Fixed(a.topk)]))
            }
            Op::SparseAttention { q, kv, sink, comp, select, attrs: a } => {
                let (h, hd) = (a.heads, a.head_dim);
                if h == 0 || hd == 0 || h > 4096 || hd > 4096 {
                    return Err(format!("sparse_attention heads {h} / head_dim {hd} out of range"));
                }
                if row(*q, "sparse_attention q")? != h * hd || row(*kv, "sparse_attention kv")? != hd {
                    return Err(format!(
                        "sparse_attention q must have heads×head_dim = {} and kv head_dim = {hd} columns",
                        h * hd
                    ));
                }
                f32_param(*sink, &[h], "sparse_attention sink")?;
                check_rope(&a.rope, hd, "sparse_attention")?;
                if a.window == 0 || !a.scale.is_finite() {
                    return Err("sparse_attention needs window ≥ 1 and a finite scale".into());
                }
                if let Some(c) = comp
                    && row(*c, "sparse_attention comp")? != hd
                {
                    return Err(format!("sparse_attention comp must have head_dim = {hd} columns"));
                }
                match (comp, select) {
                    (_, None) => {}
                    (Some(_), Some(s)) => {
                        let st = vt(*s)?;
                        if st.dtype != DType::I32 || st.shape.len() != 2 || st.shape[0] != Dim::Seq {
                            return Err(format!("sparse_attention select must be i32[T, topk], found {st}"));
                        }
                    }
                    (None, Some(_)) => return Err("sparse_attention: a selection needs a compressed stream".into()),
                }
                Ok(act(h * hd))
            }
            _ => Err(format!("`{}` has no sparse type rule", self.name())),
        }
    }
}
