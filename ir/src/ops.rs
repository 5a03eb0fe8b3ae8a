//! The op set: a few composable ops able to express decoder-only transformers,
//! their generic (name, positional, keyword) form used by the printer and parser,
//! and their type rules.

use crate::entities::{ParamId, ValueId};
use crate::types::{DType, Dim, TensorType};

pub use crate::ops_sparse::{
    CompressAttrs, CompressedAttentionAttrs, CompressorOperands, ExpertParams, IndexTopkAttrs, IndexerOperands,
    MoeRouteAttrs, RotaryAttrs, Scoring, SparseAttentionAttrs,
};

/// RoPE pair layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Rotate element pairs (2i, 2i+1) — GGUF llama after its Q/K permutation.
    Interleaved,
    /// Rotate (i, i + rot/2) — "rotate_half", Hugging Face / GPT-NeoX style.
    Neox,
}

impl RopeLayout {
    pub fn name(self) -> &'static str {
        match self {
            RopeLayout::Interleaved => "interleaved",
            RopeLayout::Neox => "neox",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "interleaved" => Some(RopeLayout::Interleaved),
            "neox" => Some(RopeLayout::Neox),
            _ => None,
        }
    }
}

/// Elementwise activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_tanh",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "silu" => Some(Activation::Silu),
            "gelu_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}

/// Attributes of an attention op.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionAttrs {
    /// KV-cache slot this op writes (when it has k and v) or reads (when it shares another's).
    pub cache: u32,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Multiplier applied to q·k before the softmax.
    pub scale: f32,
    /// Sliding window in tokens (a key at position j is visible from i when i - j < window); 0 = unlimited.
    pub window: u64,
    /// Attention sinks (StreamingLLM): with a window, the first `sink` positions stay visible
    /// to every later query as well; 0 = none. Meaningless without a window (the verifier
    /// refuses it there).
    pub sink: u64,
    /// Logit soft-cap (tanh(x/cap)·cap); 0 = off.
    pub softcap: f32,
    /// How the slot stores K and V: `f32` (the default), ggml's `q8_0` / `q4_0`
    /// blocks of 32 along each position's row (a quantized KV cache), or `f8_e4m3`
    /// (one FP8 byte per value, no scale). Readers of a shared slot name the writer's type.
    pub kv_dtype: DType,
}

impl AttentionAttrs {
    /// The cached positions a query at position `p` attends to, in order: the sinks that
    /// lie before the window (`0 .. min(sink, lo)`), then the window `lo ..= p` (all of
    /// `0 ..= p` without a window); `len` bounds both (the positions cached).
    pub fn key_ranges(&self, p: usize, len: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let hi = (p + 1).min(len);
        let lo = if self.window > 0 { (p + 1).saturating_sub(self.window as usize) } else { 0 };
        let sinks = (self.sink as usize).min(lo).min(hi);
        (0..sinks, lo.min(hi)..hi)
    }
}

/// The types a KV-cache slot can hold.
pub const KV_DTYPES: &[DType] = &[DType::F32, DType::Q8_0, DType::Q4_0, DType::F8E4M3];

/// How a steering op moves the residual stream along its direction `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SteerMode {
    /// `y = x + s·d` (a control vector, as llama.cpp's `--control-vector`).
    Add,
    /// `y = x − s·d·(d·x)`: with a unit `d` and `s = 1`, the component along `d` is removed.
    Project,
}

impl SteerMode {
    pub fn name(self) -> &'static str {
        match self {
            SteerMode::Add => "add",
            SteerMode::Project => "project",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "add" => Some(SteerMode::Add),
            "project" => Some(SteerMode::Project),
            _ => None,
        }
    }
}

/// Attributes of a steering op.
#[derive(Clone, Debug, PartialEq)]
pub struct SteerAttrs {
    pub mode: SteerMode,
    /// The strength `s` the build was compiled with; a session may override it by `name`.
    pub strength: f32,
    /// The steering's name (`[a-z0-9_]+`), which run-time strength overrides refer to.
    pub name: String,
}

/// Whether `s` is a valid steering name: a lowercase letter, then up to 63 of `[a-z0-9_]`.
pub fn is_steer_name(s: &str) -> bool {
    s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Attributes of a RoPE op.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeAttrs {
    pub head_dim: u64,
    /// Number of leading dims of each head that rotate (≤ head_dim, even).
    pub rot_dims: u64,
    pub theta: f32,
    /// Linear position scaling: angle = pos · freq_scale · theta^(-2i/rot).
    pub freq_scale: f32,
    pub layout: RopeLayout,
}

/// One instruction's operation. Values flow as f32 activations `[T, N]`
/// (T = tokens of this forward call) unless noted.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Graph input: token ids `i32[T]`.
    Tokens,
    /// Gather rows of `table` `[V, D]` at token ids: `[T, D]`.
    Embed {
        table: ParamId,
        ids: ValueId,
    },
    /// RMS normalization over groups of `group` elements (0 = the whole row), times `weight`.
    RmsNorm {
        x: ValueId,
        weight: Option<ParamId>,
        eps: f32,
        group: u64,
    },
    /// Layer normalization over the row.
    LayerNorm {
        x: ValueId,
        weight: Option<ParamId>,
        bias: Option<ParamId>,
        eps: f32,
    },
    /// `x · wᵀ (+ bias)`, w `[out, in]` in any float or quantized dtype.
    MatMul {
        x: ValueId,
        w: ParamId,
        bias: Option<ParamId>,
    },
    Add {
        a: ValueId,
        b: ValueId,
    },
    Mul {
        a: ValueId,
        b: ValueId,
    },
    Scale {
        x: ValueId,
        s: f32,
    },
    Act {
        x: ValueId,
        kind: Activation,
    },
    /// `act(gate) * up`: SwiGLU with silu, GeGLU with gelu_tanh.
    Glu {
        gate: ValueId,
        up: ValueId,
        kind: Activation,
    },
    /// Rotary position embedding per head, at positions pos..pos+T.
    Rope {
        x: ValueId,
        attrs: RopeAttrs,
    },
    /// Softmax over the last dimension.
    Softmax {
        x: ValueId,
    },
    /// Causal grouped-query attention over the KV cache. With `k`/`v` the op
    /// appends them to its cache slot first; without, it reads a slot written
    /// by an earlier attention op (cross-layer KV sharing).
    Attention {
        q: ValueId,
        k: Option<ValueId>,
        v: Option<ValueId>,
        attrs: AttentionAttrs,
    },
    /// Activation steering of each row of `x` along the direction `dir` (`f32[N]`).
    Steer {
        x: ValueId,
        dir: ParamId,
        attrs: SteerAttrs,
    },
    /// Tiles each row `times` times: `[T, N] → [T, times·N]` (the `n` hyper-connection
    /// streams made from one embedding row).
    Repeat {
        x: ValueId,
        times: u64,
    },
    /// Mixing coefficients of a manifold-constrained hyper-connection (mHC) over `n =
    /// streams` streams. `f` holds the raw mixes (`fn · rms(streams)`, computed by ordinary
    /// ops). With `f: [T, (2+n)·n]`, `base: f32[(2+n)·n]`, `scale: f32[3]`, `e = eps`:
    ///
    /// ```text
    /// pre  = σ(f[0:n]·scale[0] + base[0:n]) + e
    /// post = 2·σ(f[n:2n]·scale[1] + base[n:2n])
    /// C    = softmax_row(f[2n:]·scale[2] + base[2n:] as n×n row-major) + e
    /// C    = C / (colsum(C) + e); then iters−1 times: C = C / (rowsum + e); C = C / (colsum + e)
    /// out  = pre ∥ post ∥ C (row-major)
    /// ```
    ///
    /// With `f: [T, n]`, `base: f32[n]`, `scale: f32[1]` (the final collapse before the
    /// output norm) only `pre` is computed. Every step in f32.
    HcCoeffs {
        f: ValueId,
        base: ParamId,
        scale: ParamId,
        streams: u64,
        iters: u64,
        eps: f32,
    },
    /// Collapses `n = streams` streams `x: [T, n·D]` into the block input
    /// `Σ_j c[j]·x[j]: [T, D]`, with `c` an [`Op::HcCoeffs`] result (its first `n` columns).
    HcPre {
        x: ValueId,
        c: ValueId,
        streams: u64,
    },
    /// Writes a block's output `y: [T, D]` back into the streams `x: [T, n·D]`:
    /// `x'[k] = post[k]·y + Σ_j C[j, k]·x[j]` with `post`, `C` from `c: [T, (2+n)·n]`
    /// ([`Op::HcCoeffs`]; note C is used transposed).
    HcPost {
        x: ValueId,
        y: ValueId,
        c: ValueId,
        streams: u64,
    },
    /// A mixture-of-experts router: per row, `s = score(logits)` (`logits: [T, E]`); the
    /// chosen experts are `table[id]` when a hash `table` (`f32[V, k]` of exact expert
    /// numbers; `ids` the token ids) is given, else the `top_k` largest of `s + bias`
    /// (`bias: f32[E]` only for the choice; ties to the lower expert); their weights are
    /// `s[e] / (Σ_chosen s + 1e-20) · scale`. Result: `[T, E]`, zero for experts not chosen.
    MoeRoute {
        logits: ValueId,
        ids: Option<ValueId>,
        bias: Option<ParamId>,
        table: Option<ParamId>,
        attrs: MoeRouteAttrs,
    },
    /// Routed SwiGLU experts plus an optional shared expert:
    /// `Σ_{e: w[e] ≠ 0} w[e]·expert_e(x) + shared(x)` with `w: [T, E]` from [`Op::MoeRoute`],
    /// stacked `gate`, `up`: `[E, I, D]`, `down`: `[E, D, I]` (any float or quantized dtype),
    /// `expert(x) = down · (silu(min(gate·x, L)) · clamp(up·x, −L, L))`, `L = limit`
    /// (0 = no clamp); the shared expert is 2-D `[I', D]`, `[I', D]`, `[D, I']` with the same clamp.
    Moe {
        x: ValueId,
        w: ValueId,
        gate: ParamId,
        up: ParamId,
        down: ParamId,
        shared: Option<ExpertParams>,
        limit: f32,
    },
    /// Block-diagonal matmul: `x: [T, G·K]` split in `G = groups` chunks, chunk g times
    /// rows `g·R..(g+1)·R` of `w: [G·R, K]`, concatenated: `[T, G·R]`.
    GroupedMatMul {
        x: ValueId,
        w: ParamId,
        groups: u64,
    },
    /// DeepSeek-V4 attention over one shared K=V head, with its own cache slot. `q:
    /// [T, heads·head_dim]` and `kv: [T, head_dim]` arrive normalised but *not* rotated;
    /// the op applies its RoPE ([`RotaryAttrs`]) at each token's position. Keys are the raw
    /// rows within `window` plus, with `ratio > 0`, compressed rows: every `ratio` tokens
    /// close window w, whose row is `rope(rms(Σ_slots softmax_slots(gate + ape) · kv, norm),
    /// w·ratio)` (softmax per channel over the window's slots; with overlapping
    /// projections `[Ca | Cb]` the slots are Ca of window w−1 and Cb of window w). Row w
    /// is visible from p iff `w < (p+1) / ratio`; with an indexer only the `topk` visible
    /// rows of largest `Σ_h w_h/√nI · ReLU(rope(q_h)·k_t)/√dI` (ties to the earlier row) over
    /// its own compressed keys. Logits `scale·q·k`; a per-head `sink` logit joins each
    /// softmax and is dropped; V = K; the output is de-rotated at the query position.
    /// Result `[T, heads·head_dim]`.
    CompressedAttention {
        q: ValueId,
        kv: ValueId,
        sink: ParamId,
        comp: Option<CompressorOperands>,
        indexer: Option<IndexerOperands>,
        attrs: CompressedAttentionAttrs,
    },
    /// One compressor stream of a compressed-attention slot, unfused (what
    /// `compressed_attention` does with `comp_*` / `idx_*`): absorbs this call's projections
    /// `kv`, `gate` (`f32[T, dim]` or `f32[T, 2·dim]` for overlapping windows); every `ratio`
    /// tokens close a window, whose row `rope(rms(Σ_slots softmax_slots(gate + ape) · kv,
    /// norm), w·ratio)` joins stream `index` (the indexer's keys) or the attention's
    /// compressed rows of slot `cache`. Result `[T, dim]`: row t is the row the window
    /// closing at token t produced, zero at tokens that close none.
    Compress {
        kv: ValueId,
        gate: ValueId,
        ape: ParamId,
        norm: ParamId,
        attrs: CompressAttrs,
    },
    /// The Lightning Indexer, unfused: for each query, the `topk` compressed rows (visible
    /// from its position: `w < (p+1) / ratio`) of largest `Σ_h w_h/√heads · ReLU(rope(q_h)
    /// · k_w)/√dim` over the keys stream `keys` wrote (ties to the earlier row). Result
    /// `i32[T, topk]`: the chosen row numbers ascending, padded with −1.
    IndexTopk {
        q: ValueId,
        w: ValueId,
        keys: ValueId,
        attrs: IndexTopkAttrs,
    },
    /// DeepSeek-V4 attention, unfused: appends `kv` to the raw window of slot `cache` and
    /// attends (as `compressed_attention`) over the raw rows within `window`, the compressed
    /// rows of the stream `comp` wrote (those `select` names, or every visible one), and the
    /// per-head `sink` logit. Result `[T, heads·head_dim]`.
    SparseAttention {
        q: ValueId,
        kv: ValueId,
        sink: ParamId,
        comp: Option<ValueId>,
        select: Option<ValueId>,
        attrs: SparseAttentionAttrs,
    },
}

/// A literal or reference in the generic form of an op.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Value(ValueId),
    Param(ParamId),
    Int(u64),
    Float(f32),
    Ident(String),
}

/// Generic form of an op: `name pos0, pos1, key=val, ...`.
#[derive(Clone, Debug, PartialEq)]
pub struct OpForm {
    pub name: &'static str,
    pub pos: Vec<Arg>,
    pub kw: Vec<(&'static str, Arg)>,
}

/// Every op name, for diagnostics.
pub const OP_NAMES: &[&str] = &[
    "tokens",
    "embed",
    "rms_norm",
    "layer_norm",
    "matmul",
    "add",
    "mul",
    "scale",
    "act",
    "glu",
    "rope",
    "softmax",
    "attention",
    "steer",
    "repeat",
    "hc_coeffs",
    "hc_pre",
    "hc_post",
    "moe_route",
    "moe",
    "grouped_matmul",
    "compressed_attention",
    "compress",
    "index_topk",
    "sparse_attention",
];

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Tokens => "tokens",
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::MatMul { .. } => "matmul",
            Op::Add { .. } => "add",
            Op::Mul { .. } => "mul",
            Op::Scale { .. } => "scale",
            Op::Act { .. } => "act",
            Op::Glu { .. } => "glu",
            Op::Rope { .. } => "rope",
            Op::Softmax { .. } => "softmax",
            Op::Attention { .. } => "attention",
            Op::Steer { .. } => "steer",
            Op::Repeat { .. } => "repeat",
            Op::HcCoeffs { .. } => "hc_coeffs",
            Op::HcPre { .. } => "hc_pre",
            Op::HcPost { .. } => "hc_post",
            Op::MoeRoute { .. } => "moe_route",
            Op::Moe { .. } => "moe",
            Op::GroupedMatMul { .. } => "grouped_matmul",
            Op::CompressedAttention { .. } => "compressed_attention",
            Op::Compress { .. } => "compress",
            Op::IndexTopk { .. } => "index_topk",
            Op::SparseAttention { .. } => "sparse_attention",
        }
    }

    /// Value operands, in order.
    pub fn values(&self) -> Vec<ValueId> {
        match self {
            Op::Tokens => vec![],
            Op::Embed { ids, .. } => vec![*ids],
            Op::RmsNorm { x, .. }
            | Op::LayerNorm { x, .. }
            | Op::MatMul { x, .. }
            | Op::Scale { x, .. }
            | Op::Act { x, .. }
            | Op::Rope { x, .. }
            | Op::Steer { x, .. }
            | Op::Softmax { x } => vec![*x],
            Op::Add { a, b } | Op::Mul { a, b } => vec![*a, *b],
            Op::Glu { gate, up, .. } => vec![*gate, *up],
            Op::Attention { q, k, v, .. } => {
                let mut out = vec![*q];
                out.extend(k.iter().copied());
                out.extend(v.iter().copied());
                out
            }
            Op::Repeat { x, .. } | Op::GroupedMatMul { x, .. } => vec![*x],
            Op::HcCoeffs { f, .. } => vec![*f],
            Op::HcPre { x, c, .. } => vec![*x, *c],
            Op::HcPost { x, y, c, .. } => vec![*x, *y, *c],
            Op::MoeRoute { logits, ids, .. } => std::iter::once(*logits).chain(ids.iter().copied()).collect(),
            Op::Moe { x, w, .. } => vec![*x, *w],
            Op::CompressedAttention { q, kv, comp, indexer, .. } => {
                let mut out = vec![*q, *kv];
                if let Some(c) = comp {
                    out.extend([c.kv, c.gate]);
                }
                if let Some(ix) = indexer {
                    out.extend([ix.q, ix.w, ix.keys.kv, ix.keys.gate]);
                }
                out
            }
            Op::Compress { kv, gate, .. } => vec![*kv, *gate],
            Op::IndexTopk { q, w, keys, .. } => vec![*q, *w, *keys],
            Op::SparseAttention { q, kv, comp, select, .. } => {
                [*q, *kv].into_iter().chain(comp.iter().copied()).chain(select.iter().copied()).collect()
            }
        }
    }

    /// Parameter operands, in order.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            Op::Embed { table, .. } => vec![*table],
            Op::RmsNorm { weight, .. } => weight.iter().copied().collect(),
            Op::LayerNorm { weight, bias, .. } => weight.iter().chain(bias.iter()).copied().collect(),
            Op::MatMul { w, bias, .. } => std::iter::once(*w).chain(bias.iter().copied()).collect(),
            Op::Steer { dir, .. } => vec![*dir],
            Op::HcCoeffs { base, scale, .. } => vec![*base, *scale],
            Op::MoeRoute { bias, table, .. } => bias.iter().chain(table.iter()).copied().collect(),
            Op::Moe { gate, up, down, shared, .. } => {
                let mut out = vec![*gate, *up, *down];
                if let Some(s) = shared {
                    out.extend([s.gate, s.up, s.down]);
                }
                out
            }
            Op::GroupedMatMul { w, .. } => vec![*w],
            Op::CompressedAttention { sink, comp, indexer, .. } => {
                let mut out = vec![*sink];
                if let Some(c) = comp {
                    out.extend([c.ape, c.norm]);
                }
                if let Some(ix) = indexer {
                    out.extend([ix.keys.ape, ix.keys.norm]);
                }
                out
            }
            Op::Compress { ape, norm, .. } => vec![*ape, *norm],
            Op::SparseAttention { sink, .. } => vec![*sink],
            _ => vec![],
        }
    }

    /// Rewrites every parameter operand through `f` (used by passes that drop or reorder params).
    pub fn map_params(&mut self, mut f: impl FnMut(ParamId) -> ParamId) {
        match self {
            Op::Embed { table, .. } => *table = f(*table),
            Op::RmsNorm { weight: Some(w), .. } => *w = f(*w),
            Op::LayerNorm { weight, bias, .. } => {
                for p in weight.iter_mut().chain(bias.iter_mut()) {
                    *p = f(*p);
                }
            }
            Op::MatMul { w, bias, .. } => {
                *w = f(*w);
                if let Some(b) = bias {
                    *b = f(*b);
                }
            }
            Op::Steer { dir, .. } => *dir = f(*dir),
            Op::HcCoeffs { base, scale, .. } => {
                *base = f(*base);
                *scale = f(*scale);
            }
            Op::MoeRoute { bias, table, .. } => {
                for p in bias.iter_mut().chain(table.iter_mut()) {
                    *p = f(*p);
                }
            }
            Op::Moe { gate, up, down, shared, .. } => {
                for p in [gate, up, down] {
                    *p = f(*p);
                }
                if let Some(s) = shared {
                    for p in [&mut s.gate, &mut s.up, &mut s.down] {
                        *p = f(*p);
                    }
                }
            }
            Op::GroupedMatMul { w, .. } => *w = f(*w),
            Op::CompressedAttention { sink, comp, indexer, .. } => {
                *sink = f(*sink);
                for c in comp.iter_mut().chain(indexer.iter_mut().map(|ix| &mut ix.keys)) {
                    c.ape = f(c.ape);
                    c.norm = f(c.norm);
                }
            }
            Op::Compress { ape, norm, .. } => {
                *ape = f(*ape);
                *norm = f(*norm);
            }
            Op::SparseAttention { sink, .. } => *sink = f(*sink),
            _ => {}
        }
    }

    /// Rewrites every value operand through `f` (used by passes that splice graphs).
    pub fn map_values(&mut self, mut f: impl FnMut(ValueId) -> ValueId) {
        match self {
            Op::Tokens => {}
            Op::Embed { ids, .. } => *ids = f(*ids),
            Op::RmsNorm { x, .. }
            | Op::LayerNorm { x, .. }
            | Op::MatMul { x, .. }
            | Op::Scale { x, .. }
            | Op::Act { x, .. }
            | Op::Rope { x, .. }
            | Op::Steer { x, .. }
            | Op::Softmax { x } => *x = f(*x),
            Op::Add { a, b } | Op::Mul { a, b } => {
                *a = f(*a);
                *b = f(*b);
            }
            Op::Glu { gate, up, .. } => {
                *gate = f(*gate);
                *up = f(*up);
            }
            Op::Attention { q, k, v, .. } => {
                *q = f(*q);
                if let Some(k) = k {
                    *k = f(*k);
                }
                if let Some(v) = v {
                    *v = f(*v);
                }
            }
            Op::Repeat { x, .. } | Op::GroupedMatMul { x, .. } | Op::HcCoeffs { f: x, .. } => *x = f(*x),
            Op::HcPre { x, c, .. } => {
                *x = f(*x);
                *c = f(*c);
            }
            Op::HcPost { x, y, c, .. } => {
                for v in [x, y, c] {
                    *v = f(*v);
                }
            }
            Op::MoeRoute { logits, ids, .. } => {
                *logits = f(*logits);
                if let Some(ids) = ids {
                    *ids = f(*ids);
                }
            }
            Op::Moe { x, w, .. } => {
                *x = f(*x);
                *w = f(*w);
            }
            Op::CompressedAttention { q, kv, comp, indexer, .. } => {
                *q = f(*q);
                *kv = f(*kv);
                if let Some(c) = comp {
                    c.kv = f(c.kv);
                    c.gate = f(c.gate);
                }
                if let Some(ix) = indexer {
                    for v in [&mut ix.q, &mut ix.w, &mut ix.keys.kv, &mut ix.keys.gate] {
                        *v = f(*v);
                    }
                }
            }
            Op::Compress { kv, gate, .. } => {
                *kv = f(*kv);
                *gate = f(*gate);
            }
            Op::IndexTopk { q, w, keys, .. } => {
                for v in [q, w, keys] {
                    *v = f(*v);
                }
            }
            Op::SparseAttention { q, kv, comp, select, .. } => {
                *q = f(*q);
                *kv = f(*kv);
                for v in comp.iter_mut().chain(select.iter_mut()) {
                    *v = f(*v);
                }
            }
        }
    }

    /// The generic form used by the textual IR.
    pub fn to_form(&self) -> OpForm {
        use Arg::*;
        let (pos, kw): (Vec<Arg>, Vec<(&'static str, Arg)>) = match self {
            Op::Tokens => (vec![], vec![]),
            Op::Embed { table, ids } => (vec![Param(*table), Value(*ids)], vec![]),
            Op::RmsNorm { x, weight, eps, group } => {
                let mut kw = vec![];
                if let Some(w) = weight {
                    kw.push(("weight", Param(*w)));
                }
                kw.push(("eps", Float(*eps)));
                if *group != 0 {
                    kw.push(("group", Int(*group)));
                }
                (vec![Value(*x)], kw)
            }
            Op::LayerNorm { x, weight, bias, eps } => {
                let mut kw = vec![];
                if let Some(w) = weight {
                    kw.push(("weight", Param(*w)));
                }
                if let Some(b) = bias {
                    kw.push(("bias", Param(*b)));
                }
                kw.push(("eps", Float(*eps)));
                (vec![Value(*x)], kw)
            }
            Op::MatMul { x, w, bias } => {
                let kw = bias.iter().map(|b| ("bias", Param(*b))).collect();
                (vec![Value(*x), Param(*w)], kw)
            }
            Op::Add { a, b } | Op::Mul { a, b } => (vec![Value(*a), Value(*b)], vec![]),
            Op::Scale { x, s } => (vec![Value(*x)], vec![("s", Float(*s))]),
            Op::Act { x, kind } => (vec![Value(*x)], vec![("kind", Ident(kind.name().into()))]),
            Op::Glu { gate, up, kind } => (vec![Value(*gate), Value(*up)], vec![("kind", Ident(kind.name().into()))]),
            Op::Rope { x, attrs } => (
                vec![Value(*x)],
                vec![
                    ("head_dim", Int(attrs.head_dim)),
                    ("rot_dims", Int(attrs.rot_dims)),
                    ("theta", Float(attrs.theta)),
                    ("freq_scale", Float(attrs.freq_scale)),
                    ("layout", Ident(attrs.layout.name().into())),
                ],
            ),
            Op::Softmax { x } => (vec![Value(*x)], vec![]),
            Op::Attention { q, k, v, attrs } => {
                let mut kw = vec![];
                if let Some(k) = k {
                    kw.push(("k", Value(*k)));
                }
                if let Some(v) = v {
                    kw.push(("v", Value(*v)));
                }
                kw.push(("cache", Int(attrs.cache as u64)));
                kw.push(("heads", Int(attrs.heads)));
                kw.push(("kv_heads", Int(attrs.kv_heads)));
                kw.push(("head_dim", Int(attrs.head_dim)));
                kw.push(("scale", Float(attrs.scale)));
                if attrs.window != 0 {
                    kw.push(("window", Int(attrs.window)));
                }
                if attrs.sink != 0 {
                    kw.push(("sink", Int(attrs.sink)));
                }
                if attrs.softcap != 0.0 {
                    kw.push(("softcap", Float(attrs.softcap)));
                }
                if attrs.kv_dtype != DType::F32 {
                    kw.push(("kv", Ident(attrs.kv_dtype.name().into())));
                }
                (vec![Value(*q)], kw)
            }
            Op::Steer { x, dir, attrs } => (
                vec![Value(*x), Param(*dir)],
                vec![
                    ("mode", Ident(attrs.mode.name().into())),
                    ("strength", Float(attrs.strength)),
                    ("name", Ident(attrs.name.clone())),
                ],
            ),
            Op::Repeat { x, times } => (vec![Value(*x)], vec![("times", Int(*times))]),
            Op::HcCoeffs { f, base, scale, streams, iters, eps } => (
                vec![Value(*f)],
                vec![
                    ("base", Param(*base)),
                    ("scale", Param(*scale)),
                    ("streams", Int(*streams)),
                    ("iters", Int(*iters)),
                    ("eps", Float(*eps)),
                ],
            ),
            Op::HcPre { x, c, streams } => (vec![Value(*x), Value(*c)], vec![("streams", Int(*streams))]),
            Op::HcPost { x, y, c, streams } => {
                (vec![Value(*x), Value(*y), Value(*c)], vec![("streams", Int(*streams))])
            }
            Op::MoeRoute { logits, ids, bias, table, attrs } => {
                let mut kw = vec![];
                if let Some(ids) = ids {
                    kw.push(("ids", Value(*ids)));
                }
                if let Some(b) = bias {
                    kw.push(("bias", Param(*b)));
                }
                if let Some(t) = table {
                    kw.push(("table", Param(*t)));
                }
                kw.push(("scoring", Ident(attrs.scoring.name().into())));
                kw.push(("top_k", Int(attrs.top_k)));
                kw.push(("scale", Float(attrs.scale)));
                (vec![Value(*logits)], kw)
            }
            Op::Moe { x, w, gate, up, down, shared, limit } => {
                let mut kw = vec![("gate", Param(*gate)), ("up", Param(*up)), ("down", Param(*down))];
                if let Some(s) = shared {
                    kw.extend([
                        ("shared_gate", Param(s.gate)),
                        ("shared_up", Param(s.up)),
                        ("shared_down", Param(s.down)),
                    ]);
                }
                if *limit != 0.0 {
                    kw.push(("limit", Float(*limit)));
                }
                (vec![Value(*x), Value(*w)], kw)
            }
            Op::GroupedMatMul { x, w, groups } => (vec![Value(*x), Param(*w)], vec![("groups", Int(*groups))]),
            Op::CompressedAttention { q, kv, sink, comp, indexer, attrs } => {
                let mut kw = vec![("sink", Param(*sink))];
                let mut stream = |pre: [&'static str; 4], c: &CompressorOperands| {
                    kw.extend([
                        (pre[0], Value(c.kv)),
                        (pre[1], Value(c.gate)),
                        (pre[2], Param(c.ape)),
                        (pre[3], Param(c.norm)),
                    ]);
                };
                if let Some(c) = comp {
                    stream(["comp_kv", "comp_gate", "comp_ape", "comp_norm"], c);
                }
                if let Some(ix) = indexer {
                    stream(["idx_kv", "idx_gate", "idx_ape", "idx_norm"], &ix.keys);
                    kw.extend([("idx_q", Value(ix.q)), ("idx_w", Value(ix.w))]);
                }
                let a = attrs;
                kw.extend(head_kw(a.cache, a.heads, a.head_dim, a.scale, a.window));
                if a.ratio != 0 {
                    kw.push(("ratio", Int(a.ratio)));
                }
                if a.topk != 0 {
                    kw.extend([
                        ("topk", Int(a.topk)),
                        ("index_heads", Int(a.index_heads)),
                        ("index_dim", Int(a.index_dim)),
                    ]);
                }
                kw.push(("eps", Float(a.eps)));
                kw.extend(rotary_kw(&a.rope));
                (vec![Value(*q), Value(*kv)], kw)
            }
            Op::Compress { kv, gate, ape, norm, attrs: a } => {
                let mut kw = vec![("ape", Param(*ape)), ("norm", Param(*norm)), ("cache", Int(a.cache as u64))];
                if a.index {
                    kw.push(("index", Int(1)));
                }
                kw.extend([("ratio", Int(a.ratio)), ("eps", Float(a.eps))]);
                kw.extend(rotary_kw(&a.rope));
                (vec![Value(*kv), Value(*gate)], kw)
            }
            Op::IndexTopk { q, w, keys, attrs } => (
                vec![Value(*q), Value(*w)],
                vec![("keys", Value(*keys)), ("topk", Int(attrs.topk)), ("heads", Int(attrs.heads))],
            ),
            Op::SparseAttention { q, kv, sink, comp, select, attrs: a } => {
                let mut kw = vec![("sink", Param(*sink))];
                if let Some(c) = comp {
                    kw.push(("comp", Value(*c)));
                }
                if let Some(s) = select {
                    kw.push(("select", Value(*s)));
                }
                kw.extend(head_kw(a.cache, a.heads, a.head_dim, a.scale, a.window));
                kw.extend(rotary_kw(&a.rope));
                (vec![Value(*q), Value(*kv)], kw)
            }
        };
        OpForm { name: self.name(), pos, kw }
    }

    /// Builds an op from its generic form; the error says what is wrong.
    pub fn from_form(name: &str, pos: Vec<Arg>, kw: Vec<(String, Arg)>) -> Result<Op, String> {
        let mut a = FormReader { name, pos: pos.into_iter().collect(), kw, next: 0 };
        let op = match name {
            "tokens" => Op::Tokens,
            "embed" => Op::Embed { table: a.param()?, ids: a.value()? },
            "rms_norm" => Op::RmsNorm {
                x: a.value()?,
                weight: a.opt_param("weight")?,
                eps: a.float("eps")?,
                group: a.opt_int("group")?.unwrap_or(0),
            },
            "layer_norm" => Op::LayerNorm {
                x: a.value()?,
                weight: a.opt_param("weight")?,
                bias: a.opt_param("bias")?,
                eps: a.float("eps")?,
            },
            "matmul" => Op::MatMul { x: a.value()?, w: a.param()?, bias: a.opt_param("bias")? },
            "add" => Op::Add { a: a.value()?, b: a.value()? },
            "mul" => Op::Mul { a: a.value()?, b: a.value()? },
            "scale" => Op::Scale { x: a.value()?, s: a.float("s")? },
            "act" => Op::Act { x: a.value()?, kind: a.activation()? },
            "glu" => Op::Glu { gate: a.value()?, up: a.value()?, kind: a.activation()? },
            "rope" => {
                let x = a.value()?;
                let head_dim = a.int("head_dim")?;
                let rot_dims = a.int("rot_dims")?;
                let theta = a.float("theta")?;
                let freq_scale = a.float("freq_scale")?;
                let layout_name = a.ident("layout")?;
                let layout = RopeLayout::from_name(&layout_name)
                    .ok_or_else(|| format!("unknown rope layout `{layout_name}` (interleaved|neox)"))?;
                Op::Rope { x, attrs: RopeAttrs { head_dim, rot_dims, theta, freq_scale, layout } }
            }
            "softmax" => Op::Softmax { x: a.value()? },
            "attention" => {
                let q = a.value()?;
                let k = a.opt_value("k")?;
                let v = a.opt_value("v")?;
                let cache = a.int("cache")?;
                let cache = u32::try_from(cache).map_err(|_| format!("cache slot {cache} too large"))?;
                Op::Attention {
                    q,
                    k,
                    v,
                    attrs: AttentionAttrs {
                        cache,
                        heads: a.int("heads")?,
                        kv_heads: a.int("kv_heads")?,
                        head_dim: a.int("head_dim")?,
                        scale: a.float("scale")?,
                        window: a.opt_int("window")?.unwrap_or(0),
                        sink: a.opt_int("sink")?.unwrap_or(0),
                        softcap: a.opt_float("softcap")?.unwrap_or(0.0),
                        kv_dtype: match a.opt_ident("kv")? {
                            None => DType::F32,
                            Some(n) => DType::from_name(&n)
                                .filter(|d| KV_DTYPES.contains(d))
                                .ok_or_else(|| format!("unknown KV-cache type `{n}` (f32|q8_0|q4_0|f8_e4m3)"))?,
                        },
                    },
                }
            }
            "steer" => {
                let x = a.value()?;
                let dir = a.param()?;
                let mode_name = a.ident("mode")?;
                let mode = SteerMode::from_name(&mode_name)
                    .ok_or_else(|| format!("unknown steer mode `{mode_name}` (add|project)"))?;
                Op::Steer { x, dir, attrs: SteerAttrs { mode, strength: a.float("strength")?, name: a.ident("name")? } }
            }
            "repeat" => Op::Repeat { x: a.value()?, times: a.int("times")? },
            "hc_coeffs" => Op::HcCoeffs {
                f: a.value()?,
                base: a.req_param("base")?,
                scale: a.req_param("scale")?,
                streams: a.int("streams")?,
                iters: a.int("iters")?,
                eps: a.float("eps")?,
            },
            "hc_pre" => Op::HcPre { x: a.value()?, c: a.value()?, streams: a.int("streams")? },
            "hc_post" => Op::HcPost { x: a.value()?, y: a.value()?, c: a.value()?, streams: a.int("streams")? },
            "moe_route" => {
                let logits = a.value()?;
                let ids = a.opt_value("ids")?;
                let bias = a.opt_param("bias")?;
                let table = a.opt_param("table")?;
                let sc = a.ident("scoring")?;
                let scoring = Scoring::from_name(&sc)
                    .ok_or_else(|| format!("unknown scoring `{sc}` (sqrtsoftplus|sigmoid|softmax)"))?;
                let attrs = MoeRouteAttrs { scoring, top_k: a.int("top_k")?, scale: a.float("scale")? };
                Op::MoeRoute { logits, ids, bias, table, attrs }
            }
            "moe" => {
                let (x, w) = (a.value()?, a.value()?);
                let (gate, up, down) = (a.req_param("gate")?, a.req_param("up")?, a.req_param("down")?);
                let shared = match (a.opt_param("shared_gate")?, a.opt_param("shared_up")?, a.opt_param("shared_down")?)
                {
                    (Some(gate), Some(up), Some(down)) => Some(ExpertParams { gate, up, down }),
                    (None, None, None) => None,
                    _ => return Err("`moe` needs all of shared_gate, shared_up, shared_down, or none".into()),
                };
                Op::Moe { x, w, gate, up, down, shared, limit: a.opt_float("limit")?.unwrap_or(0.0) }
            }
            "grouped_matmul" => Op::GroupedMatMul { x: a.value()?, w: a.param()?, groups: a.int("groups")? },
            "compressed_attention" => {
                let (q, kv) = (a.value()?, a.value()?);
                let sink = a.req_param("sink")?;
                let comp = a.compressor(["comp_kv", "comp_gate", "comp_ape", "comp_norm"])?;
                let keys = a.compressor(["idx_kv", "idx_gate", "idx_ape", "idx_norm"])?;
                let (iq, iw) = (a.opt_value("idx_q")?, a.opt_value("idx_w")?);
                let indexer = match (keys, iq, iw) {
                    (Some(keys), Some(q), Some(w)) => Some(IndexerOperands { q, w, keys }),
                    (None, None, None) => None,
                    _ => return Err("`compressed_attention` needs all idx_* operands, or none".into()),
                };
                let cache = a.int("cache")?;
                let cache = u32::try_from(cache).map_err(|_| format!("cache slot {cache} too large"))?;
                let (heads, head_dim, scale, window) =
                    (a.int("heads")?, a.int("head_dim")?, a.float("scale")?, a.int("window")?);
                let ratio = a.opt_int("ratio")?.unwrap_or(0);
                let topk = a.opt_int("topk")?.unwrap_or(0);
                let index_heads = a.opt_int("index_heads")?.unwrap_or(0);
                let index_dim = a.opt_int("index_dim")?.unwrap_or(0);
                let eps = a.float("eps")?;
                let rope = a.rotary()?;
                let attrs = CompressedAttentionAttrs {
                    cache,
                    heads,
                    head_dim,
                    scale,
                    window,
                    ratio,
                    topk,
                    index_heads,
                    index_dim,
                    eps,
                    rope,
                };
                Op::CompressedAttention { q, kv, sink, comp, indexer, attrs }
            }
            "compress" => {
                let (kv, gate) = (a.value()?, a.value()?);
                let (ape, norm) = (a.req_param("ape")?, a.req_param("norm")?);
                let cache = a.int("cache")?;
                let cache = u32::try_from(cache).map_err(|_| format!("cache slot {cache} too large"))?;
                let index = match a.opt_int("index")?.unwrap_or(0) {
                    0 => false,
                    1 => true,
                    n => return Err(format!("compress index={n}: 1 for the indexer's keys, else leave it out")),
                };
                let (ratio, eps) = (a.int("ratio")?, a.float("eps")?);
                Op::Compress {
                    kv,
                    gate,
                    ape,
                    norm,
                    attrs: CompressAttrs { cache, index, ratio, eps, rope: a.rotary()? },
                }
            }
            "index_topk" => {
                let (q, w) = (a.value()?, a.value()?);
                let keys = a.opt_value("keys")?.ok_or("`index_topk` needs keys=%v")?;
                Op::IndexTopk { q, w, keys, attrs: IndexTopkAttrs { topk: a.int("topk")?, heads: a.int("heads")? } }
            }
            "sparse_attention" => {
                let (q, kv) = (a.value()?, a.value()?);
                let sink = a.req_param("sink")?;
                let (comp, select) = (a.opt_value("comp")?, a.opt_value("select")?);
                let cache = a.int("cache")?;
                let cache = u32::try_from(cache).map_err(|_| format!("cache slot {cache} too large"))?;
                let attrs = SparseAttentionAttrs {
                    cache,
                    heads: a.int("heads")?,
                    head_dim: a.int("head_dim")?,
                    scale: a.float("scale")?,
                    window: a.int("window")?,
                    rope: a.rotary()?,
                };
                Op::SparseAttention { q, kv, sink, comp, select, attrs }
            }
            other => return Err(format!("unknown op `{other}`; known ops: {}", OP_NAMES.join(", "))),
        };
        a.finish()?;
        Ok(op)
    }
}

/// The slot and head keywords of a DeepSeek-V4 attention op.
fn head_kw(cache: u32, heads: u64, head_dim: u64, scale: f32, window: u64) -> [(&'static str, Arg); 5] {
    [
        ("cache", Arg::Int(u64::from(cache))),
        ("heads", Arg::Int(heads)),
        ("head_dim", Arg::Int(head_dim)),
        ("scale", Arg::Float(scale)),
        ("window", Arg::Int(window)),
    ]
}

/// The keywords of a rotary table (YaRN's only when it is on).
fn rotary_kw(r: &RotaryAttrs) -> Vec<(&'static str, Arg)> {
    let mut kw = vec![("rot_dims", Arg::Int(r.rot_dims)), ("theta", Arg::Float(r.theta))];
    if r.yarn_factor != 1.0 {
        kw.extend([
            ("yarn_factor", Arg::Float(r.yarn_factor)),
            ("yarn_orig_ctx", Arg::Int(r.yarn_orig_ctx)),
            ("yarn_beta_fast", Arg::Float(r.yarn_beta_fast)),
            ("yarn_beta_slow", Arg::Float(r.yarn_beta_slow)),
        ]);
    }
    kw
}

struct FormReader<'a> {
    name: &'a str,
    pos: Vec<Arg>,
    kw: Vec<(String, Arg)>,
    next: usize,
}

impl FormReader<'_> {
    fn positional(&mut self, what: &str) -> Result<Arg, String> {
        let arg = self
            .pos
            .get(self.next)
            .cloned()
            .ok_or_else(|| format!("`{}` expects a {what} as operand {}", self.name, self.next + 1))?;
        self.next += 1;
        Ok(arg)
    }
    fn value(&mut self) -> Result<ValueId, String> {
        match self.positional("value (%N)")? {
            Arg::Value(v) => Ok(v),
            other => Err(format!("`{}` operand {}: expected a value, found {other:?}", self.name, self.next)),
        }
    }
    fn param(&mut self) -> Result<ParamId, String> {
        match self.positional("parameter (@name)")? {
            Arg::Param(p) => Ok(p),
            other => Err(format!("`{}` operand {}: expected a parameter, found {other:?}", self.name, self.next)),
        }
    }
    fn take_kw(&mut self, key: &str) -> Option<Arg> {
        let i = self.kw.iter().position(|(k, _)| k == key)?;
        Some(self.kw.remove(i).1)
    }
    fn opt_param(&mut self, key: &str) -> Result<Option<ParamId>, String> {
        match self.take_kw(key) {
            None => Ok(None),
            Some(Arg::Param(p)) => Ok(Some(p)),
            Some(other) => Err(format!("`{}`: `{key}` must be a parameter, found {other:?}", self.name)),
        }
    }
    fn req_param(&mut self, key: &str) -> Result<ParamId, String> {
        self.opt_param(key)?.ok_or_else(|| format!("`{}` needs `{key}=`", self.name))
    }
    fn compressor(&mut self, keys: [&str; 4]) -> Result<Option<CompressorOperands>, String> {
        let kv = self.opt_value(keys[0])?;
        let gate = self.opt_value(keys[1])?;
        let ape = self.opt_param(keys[2])?;
        let norm = self.opt_param(keys[3])?;
        match (kv, gate, ape, norm) {
            (Some(kv), Some(gate), Some(ape), Some(norm)) => Ok(Some(CompressorOperands { kv, gate, ape, norm })),
            (None, None, None, None) => Ok(None),
            _ => Err(format!("`{}` needs all of {}, or none", self.name, keys.join(", "))),
        }
    }
    /// The rotary keywords of a DeepSeek-V4 op ([`rotary_kw`]).
    fn rotary(&mut self) -> Result<RotaryAttrs, String> {
        Ok(RotaryAttrs {
            rot_dims: self.int("rot_dims")?,
            theta: self.float("theta")?,
            yarn_factor: self.opt_float("yarn_factor")?.unwrap_or(1.0),
            yarn_orig_ctx: self.opt_int("yarn_orig_ctx")?.unwrap_or(0),
            yarn_beta_fast: self.opt_float("yarn_beta_fast")?.unwrap_or(0.0),
            yarn_beta_slow: self.opt_float("yarn_beta_slow")?.unwrap_or(0.0),
        })
    }

    fn opt_value(&mut self, key: &str) -> Result<Option<ValueId>, String> {
        match self.take_kw(key) {
            None => Ok(None),
            Some(Arg::Value(v)) => Ok(Some(v)),
            Some(other) => Err(format!("`{}`: `{key}` must be a value, found {other:?}", self.name)),
        }
    }
    fn opt_int(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.take_kw(key) {
            None => Ok(None),
            Some(Arg::Int(n)) => Ok(Some(n)),
            Some(other) => Err(format!("`{}`: `{key}` must be an integer, found {other:?}", self.name)),
        }
    }
    fn int(&mut self, key: &str) -> Result<u64, String> {
        self.opt_int(key)?.ok_or_else(|| format!("`{}` needs `{key}=`", self.name))
    }
    fn opt_float(&mut self, key: &str) -> Result<Option<f32>, String> {
        match self.take_kw(key) {
            None => Ok(None),
            Some(Arg::Float(x)) => Ok(Some(x)),
            Some(Arg::Int(n)) => Ok(Some(n as f32)),
            Some(other) => Err(format!("`{}`: `{key}` must be a number, found {other:?}", self.name)),
        }
    }
    fn float(&mut self, key: &str) -> Result<f32, String> {
        self.opt_float(key)?.ok_or_else(|| format!("`{}` needs `{key}=`", self.name))
    }
    fn opt_ident(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.take_kw(key) {
            None => Ok(None),
            Some(Arg::Ident(s)) => Ok(Some(s)),
            Some(other) => Err(format!("`{}`: `{key}` must be a name, found {other:?}", self.name)),
        }
    }
    fn ident(&mut self, key: &str) -> Result<String, String> {
        match self.take_kw(key) {
            Some(Arg::Ident(s)) => Ok(s),
            Some(other) => Err(format!("`{}`: `{key}` must be a name, found {other:?}", self.name)),
            None => Err(format!("`{}` needs `{key}=`", self.name)),
        }
    }
    fn activation(&mut self) -> Result<Activation, String> {
        let s = self.ident("kind")?;
        Activation::from_name(&s).ok_or_else(|| format!("unknown activation `{s}` (silu|gelu_tanh)"))
    }
    fn finish(self) -> Result<(), String> {
        if self.next < self.pos.len() {
            return Err(format!("`{}` takes {} operand(s), found {}", self.name, self.next, self.pos.len()));
        }
        if let Some((k, _)) = self.kw.first() {
            return Err(format!("`{}` has no attribute `{k}`", self.name));
        }
        Ok(())
    }
}

/// What type inference needs to know about operands.
pub trait TypeEnv {
    fn value_type(&self, v: ValueId) -> Option<&TensorType>;
    fn param_type(&self, p: ParamId) -> Option<&TensorType>;
    fn param_name(&self, p: ParamId) -> String;
}

pub(crate) fn act_row(ty: &TensorType, what: &str) -> Result<u64, String> {
    match (ty.dtype, ty.shape.as_slice()) {
        (DType::F32, [Dim::Seq, Dim::Fixed(n)]) => Ok(*n),
        _ => Err(format!("{what} must be f32[T, N], found {ty}")),
    }
}

fn vector_param(env: &dyn TypeEnv, p: ParamId, n: u64, what: &str) -> Result<(), String> {
    let ty = env.param_type(p).ok_or_else(|| format!("{what}: undefined parameter"))?;
    if ty.dtype != DType::F32 || ty.shape != [Dim::Fixed(n)] {
        return Err(format!("{what} @{} must be f32[{n}], found {ty}", env.param_name(p)));
    }
    Ok(())
}

impl Op {
    /// Infers the result type from operand types, or says why the op is ill-typed.
    pub fn infer(&self, env: &dyn TypeEnv) -> Result<TensorType, String> {
        let vt = |v: ValueId| env.value_type(v).ok_or_else(|| format!("{v} used before it is defined"));
        let pt = |p: ParamId| env.param_type(p).ok_or_else(|| format!("undefined parameter #{}", p.0));
        let act = |n: u64| TensorType::new(DType::F32, vec![Dim::Seq, Dim::Fixed(n)]);
        match self {
            Op::Tokens => Ok(TensorType::new(DType::I32, vec![Dim::Seq])),
            Op::Embed { table, ids } => {
                let ids_t = vt(*ids)?;
                if ids_t.dtype != DType::I32 || ids_t.shape != [Dim::Seq] {
                    return Err(format!("embed ids must be i32[T], found {ids_t}"));
                }
                let t = pt(*table)?;
                match t.fixed_dims().as_deref() {
                    Some([_, d]) => Ok(act(*d)),
                    _ => Err(format!("embedding table @{} must be 2-D, found {t}", env.param_name(*table))),
                }
            }
            Op::RmsNorm { x, weight, group, .. } => {
                let n = act_row(vt(*x)?, "rms_norm input")?;
                let g = if *group == 0 { n } else { *group };
                if n % g != 0 {
                    return Err(format!("rms_norm group {g} does not divide row length {n}"));
                }
                if let Some(w) = weight {
                    vector_param(env, *w, g, "rms_norm weight")?;
                }
                Ok(act(n))
            }
            Op::LayerNorm { x, weight, bias, .. } => {
                let n = act_row(vt(*x)?, "layer_norm input")?;
                for p in weight.iter().chain(bias.iter()) {
                    vector_param(env, *p, n, "layer_norm weight/bias")?;
                }
                Ok(act(n))
            }
            Op::MatMul { x, w, bias } => {
                let n_in = act_row(vt(*x)?, "matmul input")?;
                let wt = pt(*w)?;
                let Some([out, k]) = wt.fixed_dims().as_deref().and_then(|d| <[u64; 2]>::try_from(d).ok()) else {
                    return Err(format!("matmul weight @{} must be 2-D [out, in], found {wt}", env.param_name(*w)));
                };
                if k != n_in {
                    return Err(format!(
                        "matmul weight @{} is {wt} but the input rows have {n_in} elements",
                        env.param_name(*w)
                    ));
                }
                if wt.dtype == DType::I32 {
                    return Err(format!("matmul weight @{} must be a float or quantized type", env.param_name(*w)));
                }
                if k % wt.dtype.block_elems() != 0 {
                    return Err(format!(
                        "matmul weight @{}: row length {k} is not a multiple of the {} block size {}",
                        env.param_name(*w),
                        wt.dtype,
                        wt.dtype.block_elems()
                    ));
                }
                if let Some(b) = bias {
                    vector_param(env, *b, out, "matmul bias")?;
                }
                Ok(act(out))
            }
            Op::Add { a, b } | Op::Mul { a, b } => {
                let (ta, tb) = (vt(*a)?, vt(*b)?);
                act_row(ta, "elementwise operand")?;
                if ta != tb {
                    return Err(format!("operand types differ: {ta} vs {tb}"));
                }
                Ok(ta.clone())
            }
            Op::Scale { x, .. } | Op::Act { x, .. } | Op::Softmax { x } => {
                let n = act_row(vt(*x)?, "operand")?;
                Ok(act(n))
            }
            Op::Glu { gate, up, .. } => {
                let (tg, tu) = (vt(*gate)?, vt(*up)?);
                act_row(tg, "glu gate")?;
                if tg != tu {
                    return Err(format!("glu gate and up differ: {tg} vs {tu}"));
                }
                Ok(tg.clone())
            }
            Op::Rope { x, attrs } => {
                let n = act_row(vt(*x)?, "rope input")?;
                if attrs.head_dim == 0 || n % attrs.head_dim != 0 {
                    return Err(format!("rope head_dim {} does not divide row length {n}", attrs.head_dim));
                }
                if attrs.rot_dims == 0 || attrs.rot_dims > attrs.head_dim || attrs.rot_dims % 2 != 0 {
                    return Err(format!("rope rot_dims {} must be even and in 1..={}", attrs.rot_dims, attrs.head_dim));
                }
                if !(attrs.theta > 0.0 && attrs.theta.is_finite()) {
                    return Err(format!("rope theta {} must be positive", attrs.theta));
                }
                Ok(act(n))
            }
            Op::Attention { q, k, v, attrs } => {
                let nq = act_row(vt(*q)?, "attention q")?;
                let AttentionAttrs { heads, kv_heads, head_dim, .. } = *attrs;
                if heads == 0 || kv_heads == 0 || head_dim == 0 || heads % kv_heads != 0 {
                    return Err(format!(
                        "attention heads {heads} must be a nonzero multiple of kv_heads {kv_heads} (head_dim {head_dim})"
                    ));
                }
                if nq != heads * head_dim {
                    return Err(format!(
                        "attention q has {nq} columns, expected heads×head_dim = {}",
                        heads * head_dim
                    ));
                }
                if attrs.sink != 0 && attrs.window == 0 {
                    return Err(format!("attention sink {} needs a sliding window", attrs.sink));
                }
                if !KV_DTYPES.contains(&attrs.kv_dtype) {
                    return Err(format!(
                        "attention KV-cache type {} is not one of f32, q8_0, q4_0, f8_e4m3",
                        attrs.kv_dtype
                    ));
                }
                if attrs.head_dim % attrs.kv_dtype.block_elems() != 0 {
                    return Err(format!(
                        "attention head_dim {head_dim} is not a multiple of the {} block size {}",
                        attrs.kv_dtype,
                        attrs.kv_dtype.block_elems()
                    ));
                }
                match (k, v) {
                    (Some(k), Some(v)) => {
                        for (name, t) in [("k", vt(*k)?), ("v", vt(*v)?)] {
                            let n = act_row(t, "attention k/v")?;
                            if n != kv_heads * head_dim {
                                return Err(format!(
                                    "attention {name} has {n} columns, expected kv_heads×head_dim = {}",
                                    kv_heads * head_dim
                                ));
                            }
                        }
                    }
                    (None, None) => {}
                    _ => return Err("attention needs both k and v, or neither (shared cache)".into()),
                }
                Ok(act(nq))
            }
            Op::Steer { x, dir, attrs } => {
                let n = act_row(vt(*x)?, "steer input")?;
                vector_param(env, *dir, n, "steer direction")?;
                if !attrs.strength.is_finite() {
                    return Err(format!("steer strength {} must be finite", attrs.strength));
                }
                if !is_steer_name(&attrs.name) {
                    return Err(format!(
                        "steer name `{}` must be a lowercase letter then up to 63 of [a-z0-9_]",
                        attrs.name
                    ));
                }
                Ok(act(n))
            }
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
            | Op::SparseAttention { .. } => self.infer_sparse(env),
        }
    }
}
