//! The WGSL kernels. Each kernel has the name, arguments and grid of the PTX kernel
//! of the same name (`kiln_ptx::kernels`), so the one launch sequence
//! (`kiln_ptx::PtxSession`) drives both backends; only the kernel bodies differ.
//!
//! A kernel is its signature plus a body; [`Kernel::source`] prints the module: a
//! `Params` uniform with one field per argument (a pointer argument becomes
//! `<name>_off`, its offset in 4-byte words inside the buffer it points into), one
//! storage binding per buffer the body reads or writes (`b_<name>`), and the entry
//! point `main` over 128-thread workgroups with `wg` (workgroup id), `nwg` and `tid`
//! (local index) in scope.
//!
//! Conventions follow the PTX kernels: activations are f32 `[T, cols]` row-major;
//! 128 threads per workgroup; a matmul workgroup is 4 rows × 32 lanes.

use kiln_ir::{Activation, DType, RopeLayout, SteerMode};
use kiln_ptx::kernels as ptxk;

use crate::formats;

/// Threads per workgroup (every kernel).
pub const BLOCK: u32 = 128;

/// What a kernel argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A buffer of f32 the kernel reads.
    In,
    /// A buffer of f32 the kernel reads when a launch argument says so, else a null
    /// pointer (bound to a placeholder).
    InOpt,
    /// A buffer of f32 the kernel reads four at a time (`array<vec4<f32>>`; its offset is
    /// still in 4-byte words and must be a multiple of 4).
    In4,
    /// A buffer of f32 the kernel writes (and may read).
    Out,
    /// A buffer of u32 words the kernel reads (packed weights, the step buffer).
    Words,
    /// A buffer of u32 words the kernel writes (ids, bit patterns).
    OutWords,
    /// A pointer argument the kernel ignores (no binding; its offset is still passed).
    Unused,
    U32,
    F32,
}

impl Arg {
    pub fn is_buffer(self) -> bool {
        matches!(self, Arg::In | Arg::InOpt | Arg::In4 | Arg::Out | Arg::Words | Arg::OutWords)
    }
    pub fn is_pointer(self) -> bool {
        self.is_buffer() || self == Arg::Unused
    }
}

/// One WGSL kernel: its launch signature and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: String,
    pub args: Vec<(&'static str, Arg)>,
    /// Module-scope declarations after the bindings (helpers, workgroup memory).
    pub decls: String,
    /// The body of `main`.
    pub body: String,
}

impl Kernel {
    pub(crate) fn new(
        name: impl Into<String>,
        args: &[(&'static str, Arg)],
        decls: impl Into<String>,
        body: impl Into<String>,
    ) -> Self {
        Kernel { name: name.into(), args: args.to_vec(), decls: decls.into(), body: body.into() }
    }

    /// Binding of argument `i` (the uniform is binding 0).
    pub fn binding(i: usize) -> u32 {
        i as u32 + 1
    }

    /// The WGSL module of this kernel.
    pub fn source(&self) -> String {
        let mut s = format!("// kiln kernel `{}`\n\nstruct Params {{\n", self.name);
        for (name, a) in &self.args {
            match a {
                a if a.is_pointer() => s += &format!("    {name}_off: u32,\n"),
                Arg::U32 => s += &format!("    {name}: u32,\n"),
                _ => s += &format!("    {name}: f32,\n"),
            }
        }
        s += "}\n\n@group(0) @binding(0) var<uniform> p: Params;\n";
        for (i, (name, a)) in self.args.iter().enumerate() {
            let decl = match a {
                Arg::In | Arg::InOpt | Arg::In4 => "var<storage, read> ",
                Arg::Out => "var<storage, read_write> ",
                Arg::Words => "var<storage, read> ",
                Arg::OutWords => "var<storage, read_write> ",
                _ => continue,
            };
            let ty = match a {
                Arg::Words | Arg::OutWords => "u32",
                Arg::In4 => "vec4<f32>",
                _ => "f32",
            };
            s += &format!("@group(0) @binding({}) {decl}b_{name}: array<{ty}>;\n", Self::binding(i));
        }
        if !self.decls.is_empty() {
            s += "\n";
            s += self.decls.trim_end();
            s += "\n";
        }
        s += &format!(
            "\n@compute @workgroup_size({BLOCK})\nfn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{\n"
        );
        for line in self.body.trim_end().lines() {
            if line.is_empty() {
                s += "\n";
            } else {
                s += "    ";
                s += line;
                s += "\n";
            }
        }
        s += "}\n";
        s
    }
}

/// Sum and max of one value per thread over the workgroup (every thread gets the result).
/// Call from uniform control flow.
pub(crate) const REDUCE: &str = "
var<workgroup> red: array<f32, 128>;

fn block_sum(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = 64u; s > 0u; s = s >> 1u) {
        if tid < s {
            red[tid] = red[tid] + red[tid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn block_max(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = 64u; s > 0u; s = s >> 1u) {
        if tid < s {
            red[tid] = max(red[tid], red[tid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
";

/// Index `i` of a 1-D launch and the early exit past `n`.
const ELEM: &str = "let i = wg.x * 128u + tid;\nif i >= p.n {\n    return;\n}\n";

fn elementwise(name: impl Into<String>, args: &[(&'static str, Arg)], decls: &str, expr: &str) -> Kernel {
    Kernel::new(name, args, decls, format!("{ELEM}{expr}\n"))
}

/// `add`, `mul`: `y = a ∘ b`. Arguments `a, b, y, n`.
pub fn binary(mul: bool) -> Kernel {
    let (name, op) = if mul { ("mul", "*") } else { ("add", "+") };
    elementwise(
        name,
        &[("a", Arg::In), ("b", Arg::In), ("y", Arg::Out), ("n", Arg::U32)],
        "",
        &format!("b_y[p.y_off + i] = b_a[p.a_off + i] {op} b_b[p.b_off + i];"),
    )
}

/// `y = x · s`. Arguments `x, y, n, s`.
pub fn scale() -> Kernel {
    elementwise(
        "scale",
        &[("x", Arg::In), ("y", Arg::Out), ("n", Arg::U32), ("s", Arg::F32)],
        "",
        "b_y[p.y_off + i] = b_x[p.x_off + i] * p.s;",
    )
}

fn act_fn(kind: Activation) -> &'static str {
    match kind {
        Activation::Silu => "fn act(v: f32) -> f32 {\n    return v / (1.0 + exp(-v));\n}\n",
        Activation::GeluTanh => {
            "fn act(v: f32) -> f32 {\n    let inner = fma(v * v, 0.044715, 1.0) * v * 0.7978846;\n    return v * 0.5 * (tanh(inner) + 1.0);\n}\n"
        }
    }
}

/// `y = act(x)`. Arguments `x, y, n`.
pub fn act(kind: Activation) -> Kernel {
    elementwise(
        ptxk::act_name(kind),
        &[("x", Arg::In), ("y", Arg::Out), ("n", Arg::U32)],
        act_fn(kind),
        "b_y[p.y_off + i] = act(b_x[p.x_off + i]);",
    )
}

/// `y = act(gate) · up`. Arguments `gate, up, y, n`.
pub fn glu(kind: Activation) -> Kernel {
    elementwise(
        ptxk::glu_name(kind),
        &[("gate", Arg::In), ("up", Arg::In), ("y", Arg::Out), ("n", Arg::U32)],
        act_fn(kind),
        "b_y[p.y_off + i] = act(b_gate[p.gate_off + i]) * b_up[p.up_off + i];",
    )
}

/// RMS normalization of groups of `n`: one workgroup per group. Arguments `x, w, y, n, eps`.
pub fn rms_norm(weight: bool) -> Kernel {
    let scale = if weight { " * b_w[p.w_off + i]" } else { "" };
    Kernel::new(
        ptxk::rms_norm_name(weight),
        &[
            ("x", Arg::In),
            ("w", if weight { Arg::In } else { Arg::Unused }),
            ("y", Arg::Out),
            ("n", Arg::U32),
            ("eps", Arg::F32),
        ],
        REDUCE,
        format!(
            "let xb = p.x_off + wg.x * p.n;
let yb = p.y_off + wg.x * p.n;
var ss = 0.0;
for (var i = tid; i < p.n; i = i + 128u) {{
    let v = b_x[xb + i];
    ss = fma(v, v, ss);
}}
let total = block_sum(ss, tid);
let inv = 1.0 / sqrt(total / f32(p.n) + p.eps);
for (var i = tid; i < p.n; i = i + 128u) {{
    b_y[yb + i] = b_x[xb + i] * inv{scale};
}}
"
        ),
    )
}

/// Steering along `d`, one workgroup per row. Arguments `x, d, y, n, s`.
pub fn steer(mode: SteerMode) -> Kernel {
    let coef = match mode {
        SteerMode::Add => "let coef = p.s;\n",
        SteerMode::Project => {
            "var acc = 0.0;
for (var i = tid; i < p.n; i = i + 128u) {
    acc = fma(b_x[xb + i], b_d[p.d_off + i], acc);
}
let coef = -(block_sum(acc, tid) * p.s);
"
        }
    };
    Kernel::new(
        ptxk::steer_name(mode),
        &[("x", Arg::In), ("d", Arg::In), ("y", Arg::Out), ("n", Arg::U32), ("s", Arg::F32)],
        if mode == SteerMode::Project { REDUCE } else { "" },
        format!(
            "let xb = p.x_off + wg.x * p.n;
let yb = p.y_off + wg.x * p.n;
{coef}for (var i = tid; i < p.n; i = i + 128u) {{
    b_y[yb + i] = b_x[xb + i] + coef * b_d[p.d_off + i];
}}
"
        ),
    )
}

/// Row softmax, one workgroup per row. Arguments `x, y, n`.
pub fn softmax() -> Kernel {
    Kernel::new(
        "softmax",
        &[("x", Arg::In), ("y", Arg::Out), ("n", Arg::U32)],
        REDUCE,
        "let xb = p.x_off + wg.x * p.n;
let yb = p.y_off + wg.x * p.n;
var m = -3.4028235e38;
for (var i = tid; i < p.n; i = i + 128u) {
    m = max(m, b_x[xb + i]);
}
var mx = block_max(m, tid);
if mx <= -3.4028235e38 {
    mx = 0.0;
}
var s = 0.0;
for (var i = tid; i < p.n; i = i + 128u) {
    let e = exp(b_x[xb + i] - mx);
    b_y[yb + i] = e;
    s = s + e;
}
let total = block_sum(s, tid);
let inv = select(0.0, 1.0 / total, total > 0.0);
for (var i = tid; i < p.n; i = i + 128u) {
    b_y[yb + i] = b_y[yb + i] * inv;
}
",
    )
}

/// Rotary embedding, one workgroup per (token, head). Arguments `x, y, cs, step, cols,
/// head_dim, rot`; `cs` holds the host's `(cos, sin)` per (position, pair).
pub fn rope(layout: RopeLayout) -> Kernel {
    let pair = match layout {
        RopeLayout::Interleaved => "let i = d >> 1u;\nlet first = (d & 1u) == 0u;\nlet partner = d ^ 1u;\n",
        RopeLayout::Neox => {
            "let first = d < half;\nlet i = select(d - half, d, first);\nlet partner = select(d - half, d + half, first);\n"
        }
    };
    let pair: String = pair.lines().map(|l| format!("    {l}\n")).collect();
    Kernel::new(
        ptxk::rope_name(layout),
        &[
            ("x", Arg::In),
            ("y", Arg::Out),
            ("cs", Arg::In),
            ("step", Arg::Words),
            ("cols", Arg::U32),
            ("head_dim", Arg::U32),
            ("rot", Arg::U32),
        ],
        "",
        format!(
            "let t = wg.x;
let h = wg.y;
let pos = b_step[p.step_off] + t;
let half = p.rot >> 1u;
let csb = p.cs_off + 2u * pos * half;
let xh = p.x_off + t * p.cols + h * p.head_dim;
let yh = p.y_off + t * p.cols + h * p.head_dim;
for (var d = tid; d < p.head_dim; d = d + 128u) {{
    if d >= p.rot {{
        b_y[yh + d] = b_x[xh + d];
        continue;
    }}
{pair}    let v = b_x[xh + d];
    let pv = b_x[xh + partner];
    let c = b_cs[csb + 2u * i];
    let s = b_cs[csb + 2u * i + 1u];
    let x0 = select(pv, v, first);
    let x1 = select(v, pv, first);
    // first: fma(x0, c, -(x1 s)); second: fma(x0, s, x1 c), the reference's order.
    b_y[yh + d] = select(fma(x0, s, x1 * c), fma(x0, c, -(x1 * s)), first);
}}
"
        ),
    )
}

/// Copies `T` new rows of k and v into a KV-cache slot at the step's position.
/// Arguments `k, v, kc, vc, step, n (= T·width), width`.
/// The row of a KV-cache slot that holds position `j` (`kiln_ptx::kernels`' `ring_row`:
/// `j` while `j < rows`, then the sinks' ring).
pub(crate) const RING_ROW: &str = "
fn ring_row(j: u32, rows: u32, sink: u32) -> u32 {
    if j < rows {
        return j;
    }
    return sink + (j - sink) % max(rows - sink, 1u);
}
";

pub fn kv_append() -> Kernel {
    elementwise(
        "kv_append",
        &[
            ("k", Arg::In),
            ("v", Arg::In),
            ("kc", Arg::Out),
            ("vc", Arg::Out),
            ("step", Arg::Words),
            ("n", Arg::U32),
            ("width", Arg::U32),
            ("rows", Arg::U32),
            ("sink", Arg::U32),
        ],
        RING_ROW,
        "let r = i / p.width;
let j = ring_row(b_step[p.step_off] + r, p.rows, p.sink) * p.width + (i - r * p.width);
b_kc[p.kc_off + j] = b_k[p.k_off + i];
b_vc[p.vc_off + j] = b_v[p.v_off + i];",
    )
}

/// Flash-decoding attention, first phase: one workgroup per (head, query token, key
/// split) writes `(m, l, o[head_dim])` for its split. Keys go 128 at a time: a thread
/// scores one key against the query (held in workgroup memory), the workgroup takes the
/// tile's max and sum, and each thread folds the tile's values into the output dims it
/// owns. Arguments and grid as `kiln_ptx::kernels::attention`.
pub fn attention(head_dim: u32, softcap: bool) -> Kernel {
    let dpt = head_dim.div_ceil(BLOCK);
    let cap = if softcap { "        s = tanh(s / p.softcap) * p.softcap;\n" } else { "" };
    Kernel::new(
        ptxk::attention_name(head_dim, softcap),
        &[
            ("q", Arg::In),
            ("kc", Arg::In),
            ("vc", Arg::In),
            ("part", Arg::Out),
            ("step", Arg::Words),
            ("heads", Arg::U32),
            ("group", Arg::U32),
            ("width", Arg::U32),
            ("scale", Arg::F32),
            ("window", Arg::U32),
            ("sink", Arg::U32),
            ("softcap", Arg::F32),
            ("splits", Arg::U32),
            ("rows", Arg::U32),
            ("ring_sink", Arg::U32),
        ],
        format!(
            "const HD: u32 = {head_dim}u;
const DPT: u32 = {dpt}u;
const NEG_BIG: f32 = -1.0e30;
var<workgroup> qv: array<f32, {head_dim}>;
var<workgroup> probs: array<f32, 128>;
{REDUCE}{RING_ROW}"
        ),
        format!(
            "let h = wg.x;
let t = wg.y;
let z = wg.z;
let hi = b_step[p.step_off] + t + 1u;
var lo = 0u;
if p.window > 0u && hi > p.window {{
    lo = hi - p.window;
}}
// Key index j < n: the sinks before the window (j < s), then the window from lo.
let s_n = min(p.sink, lo);
let off = lo - s_n;
let n = hi - off;
let chunk = (n + p.splits - 1u) / p.splits;
let start = min(z * chunk, n);
let end = min(start + chunk, n);
let kv_off = (h / p.group) * HD;
let qb = p.q_off + (t * p.heads + h) * HD;
for (var d = tid; d < HD; d = d + 128u) {{
    qv[d] = b_q[qb + d];
}}
workgroupBarrier();
var m = NEG_BIG;
var l = 0.0;
var acc: array<f32, DPT>;
for (var j0 = start; j0 < end; j0 = j0 + 128u) {{
    let j = j0 + tid;
    var s = NEG_BIG;
    if j < end {{
        let kb = p.kc_off + ring_row(select(j, j + off, j >= s_n), p.rows, p.ring_sink) * p.width + kv_off;
        var dot = 0.0;
        for (var d = 0u; d < HD; d = d + 1u) {{
            dot = fma(qv[d], b_kc[kb + d], dot);
        }}
        s = dot * p.scale;
{cap}    }}
    let m_new = max(m, block_max(s, tid));
    let corr = exp(m - m_new);
    let e = select(0.0, exp(s - m_new), j < end);
    probs[tid] = e;
    l = l * corr + block_sum(e, tid);
    let tile = min(128u, end - j0);
    for (var r = 0u; r < DPT; r = r + 1u) {{
        let d = tid + r * 128u;
        if d < HD {{
            var o = acc[r] * corr;
            for (var jj = 0u; jj < tile; jj = jj + 1u) {{
                let jr = j0 + jj;
                let row = ring_row(select(jr, jr + off, jr >= s_n), p.rows, p.ring_sink);
                o = fma(probs[jj], b_vc[p.vc_off + row * p.width + kv_off + d], o);
            }}
            acc[r] = o;
        }}
    }}
    m = m_new;
    workgroupBarrier();
}}
let rb = p.part_off + ((t * p.heads + h) * p.splits + z) * (HD + 2u);
if tid == 0u {{
    b_part[rb] = m;
    b_part[rb + 1u] = l;
}}
for (var r = 0u; r < DPT; r = r + 1u) {{
    let d = tid + r * 128u;
    if d < HD {{
        b_part[rb + 2u + d] = acc[r];
    }}
}}
"
        ),
    )
}

/// Flash-decoding, second phase: merges the splits of each (head, token).
/// Arguments `part, out, heads, head_dim, splits`; grid `(heads, T)`.
pub fn attn_combine() -> Kernel {
    Kernel::new(
        "attn_combine",
        &[("part", Arg::In), ("out", Arg::Out), ("heads", Arg::U32), ("head_dim", Arg::U32), ("splits", Arg::U32)],
        "",
        "let rid = wg.y * p.heads + wg.x;
let rec = p.head_dim + 2u;
let pb = p.part_off + rid * p.splits * rec;
var mm = -1.0e30;
for (var z = 0u; z < p.splits; z = z + 1u) {
    mm = max(mm, b_part[pb + z * rec]);
}
var ll = 0.0;
for (var z = 0u; z < p.splits; z = z + 1u) {
    ll = fma(b_part[pb + z * rec + 1u], exp(b_part[pb + z * rec] - mm), ll);
}
let inv = select(0.0, 1.0 / ll, ll > 0.0);
let ob = p.out_off + rid * p.head_dim;
for (var d = tid; d < p.head_dim; d = d + 128u) {
    var o = 0.0;
    for (var z = 0u; z < p.splits; z = z + 1u) {
        o = fma(b_part[pb + z * rec + 2u + d], exp(b_part[pb + z * rec] - mm), o);
    }
    b_out[ob + d] = o * inv;
}
",
    )
}

/// (value, index) reduction over the workgroup: greater value wins, the lower index on ties.
const ARGREDUCE: &str = "
var<workgroup> rv: array<f32, 128>;
var<workgroup> ri: array<u32, 128>;

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

fn block_arg(v: f32, i: u32, tid: u32) {
    rv[tid] = v;
    ri[tid] = i;
    workgroupBarrier();
    for (var s = 64u; s > 0u; s = s >> 1u) {
        if tid < s && better(rv[tid + s], ri[tid + s], rv[tid], ri[tid]) {
            rv[tid] = rv[tid + s];
            ri[tid] = ri[tid + s];
        }
        workgroupBarrier();
    }
}
";

/// Index of each row's maximum (lowest on ties). Arguments `x, out (u32 per row), n`; grid `T`.
pub fn argmax() -> Kernel {
    Kernel::new(
        "argmax",
        &[("x", Arg::In), ("out", Arg::OutWords), ("n", Arg::U32)],
        ARGREDUCE,
        "let xb = p.x_off + wg.x * p.n;
var bv = -3.4028235e38;
var bi = 4294967295u;
for (var i = tid; i < p.n; i = i + 128u) {
    let v = b_x[xb + i];
    if better(v, i, bv, bi) || bi == 4294967295u && v == v {
        bv = v;
        bi = i;
    }
}
block_arg(bv, bi, tid);
if tid == 0u {
    b_out[p.out_off + wg.x] = ri[0];
}
",
    )
}

/// The `k` largest logits of one row as (id, value) pairs, by value descending then id
/// ascending, NaN skipped; `u32::MAX` ids past the last. Arguments `x, out, n, k`; grid 1.
pub fn top_k() -> Kernel {
    Kernel::new(
        "top_k",
        &[("x", Arg::In), ("out", Arg::OutWords), ("n", Arg::U32), ("k", Arg::U32)],
        ARGREDUCE,
        "var pv = 0.0;
var pi = 0u;
for (var r = 0u; r < p.k; r = r + 1u) {
    var bv = -3.4028235e38;
    var bi = 4294967295u;
    for (var i = tid; i < p.n; i = i + 128u) {
        let v = b_x[p.x_off + i];
        // After the previous pick (smaller, or equal with a greater id), not NaN.
        let after = r == 0u || v < pv || (v == pv && i > pi);
        if after && v == v && (better(v, i, bv, bi) || bi == 4294967295u) {
            bv = v;
            bi = i;
        }
    }
    block_arg(bv, bi, tid);
    let best_i = ri[0];
    let best_v = rv[0];
    if tid == 0u {
        b_out[p.out_off + 2u * r] = best_i;
        b_out[p.out_off + 2u * r + 1u] = bitcast<u32>(best_v);
    }
    pv = best_v;
    pi = best_i;
    workgroupBarrier();
}
",
    )
}

/// Tokens a matmul workgroup multiplies per pass over its rows' weights.
pub const MATMUL_TOKENS: u32 = ptxk::MATMUL_TOKENS;

/// `y[t, r] = Σ_k w[r, k] · x[t, k] (+ bias[r])` with `w` decoded from its packed layout
/// (fused dequantization, [`formats`]): a workgroup holds 4 rows, 32 lanes per row; lane
/// `l` takes groups of 8 weights `l, l + 32, …`, decodes each once and multiplies it with
/// up to [`MATMUL_TOKENS`] tokens (accumulators in registers, the token loop unrolled).
/// Arguments and grid as `kiln_ptx::kernels::matmul`.
pub fn matmul(dtype: DType, bias: bool, ragged: bool) -> Kernel {
    matmul_variant(dtype, bias, ragged, false)
}

/// Suffix of the matmul variant that gives each thread a whole row.
pub const ROW_PER_THREAD: &str = "_r1";

/// [`matmul`], or with `row_per_thread` its variant for CPU adapters (lavapipe): a thread
/// per output row, 128 rows per workgroup and no workgroup barriers (a barrier is a
/// coroutine switch per SIMD group there). Grid `(ceil(rows / 128), ceil(t / 8))`; the
/// device picks the variant and the grid.
pub fn matmul_variant(dtype: DType, bias: bool, ragged: bool, row_per_thread: bool) -> Kernel {
    matmul_impl(dtype, bias, ragged, row_per_thread, false)
}

/// [`matmul_variant`] (no bias) over stacked experts, as `kiln_ptx::kernels::matmul_experts`:
/// expert `e = wg.z` multiplies its `[rows, k]` matrix at `w + e·expert_bytes` with its
/// gathered rows `seg[2e] .. seg[2e] + seg[2e+1]` of `x` (and `xr`) into the same rows of
/// `y`; workgroups past an expert's row count exit at once. Arguments: the matmul's (its
/// `t` unused), then `seg, expert_bytes`.
pub fn matmul_experts(dtype: DType, ragged: bool, row_per_thread: bool) -> Kernel {
    matmul_impl(dtype, false, ragged, row_per_thread, true)
}

fn matmul_impl(dtype: DType, bias: bool, ragged: bool, row_per_thread: bool, experts: bool) -> Kernel {
    let base = if experts { ptxk::matmul_experts_name(dtype, ragged) } else { ptxk::matmul_name(dtype, bias, ragged) };
    let name = format!("{base}{}", if row_per_thread { ROW_PER_THREAD } else { "" });
    // The operands' bases: the launch's, or the expert's (weights at `e·expert_bytes`,
    // rows from `seg[2e]`, `seg[2e+1]` of them); an expert's idle tiles exit at once.
    let prelude = if experts {
        "let ex = wg.z;
let first = b_seg[p.seg_off + 2u * ex];
let tt = b_seg[p.seg_off + 2u * ex + 1u];
if wg.y * TOK >= tt {
    return;
}
let w_base = 4u * p.w_off + ex * p.expert_bytes;
let x_base = p.x_off + first * p.k;
let xr_base = p.xr_off + first * p.k;
let y_base = p.y_off + first * p.rows;
"
    } else {
        ""
    };
    // The bases as the body reads them (a plain matmul's print as they always have).
    let (w_base, x_base, y_base, tt) =
        if experts { ("w_base", "x_base", "y_base", "tt") } else { ("4u * p.w_off", "p.x_off", "p.y_off", "p.t") };
    let xbase = |buf: &str| if experts { format!("{buf}_base") } else { format!("p.{buf}_off") };
    let tk = MATMUL_TOKENS;
    let rotated = kiln_ptx::formats::needs_rotated_x(dtype) && !ragged;
    let add_bias = if bias { " + b_bias[p.bias_off + row]" } else { "" };
    let accs: String = (0..tk).map(|j| format!("var a{j} = 0.0;\n")).collect();
    let stores: String = (0..tk).map(|j| format!("part[{j}u * 128u + tid] = a{j};\n")).collect();
    let (x_arg, inner) = if ragged {
        // Unquantized rows of any length: element by element, clamped and masked.
        let mut inner = String::from(
            "    var wv: array<f32, 8>;
    for (var i = 0u; i < 8u; i = i + 1u) {
        let e = g * 8u + i;
        wv[i] = select(0.0, load1(wrow, min(e, p.k - 1u)), e < p.k);
    }
",
        );
        for j in 0..tk {
            let guard = if j == 0 { String::new() } else { format!("if nt > {j}u ") };
            inner += &format!(
                "    {guard}{{
        let xb = {x_base} + (t0 + {j}u) * p.k;
        for (var i = 0u; i < 8u; i = i + 1u) {{
            let e = g * 8u + i;
            a{j} = fma(wv[i], select(0.0, b_x[xb + min(e, p.k - 1u)], e < p.k), a{j});
        }}
    }}
"
            );
        }
        (Arg::In, inner)
    } else {
        // Rows of k (a multiple of 8) floats: a group is two aligned vec4s. kq2 groups read
        // `x` or its block rotation `xr` (same layout), as their block is stored.
        let tokens = |buf: &str, indent: &str| {
            let mut s = format!("{indent}let xg = ({} >> 2u) + (t0 * p.k >> 2u) + 2u * g;\n", xbase(buf));
            for j in 0..tk {
                let guard = if j == 0 { String::new() } else { format!("if nt > {j}u ") };
                s += &format!(
                    "{indent}{guard}{{
{indent}    let xb = xg + {j}u * (p.k >> 2u);
{indent}    a{j} = a{j} + dot(w0, b_{buf}[xb]) + dot(w1, b_{buf}[xb + 1u]);
{indent}}}
"
                );
            }
            s
        };
        let mut inner = String::from(
            "    let wv = dec8(wrow, g);
    let w0 = vec4<f32>(wv[0], wv[1], wv[2], wv[3]);
    let w1 = vec4<f32>(wv[4], wv[5], wv[6], wv[7]);
",
        );
        if rotated {
            inner += &format!(
                "    if kq2_rotated(wrow, g) {{\n{}    }} else {{\n{}    }}\n",
                tokens("xr", "        "),
                tokens("x", "        ")
            );
        } else {
            inner += &tokens("x", "    ");
        }
        (Arg::In4, inner)
    };
    let groups = if ragged { "(p.k + 7u) >> 3u" } else { "p.k >> 3u" };
    let (decls, body) = if row_per_thread {
        let outs: String = (0..tk)
            .map(|j| {
                let guard = if j == 0 { String::new() } else { format!("if nt > {j}u ") };
                format!("{guard}{{\n    b_y[{y_base} + (t0 + {j}u) * p.rows + row] = a{j}{add_bias};\n}}\n")
            })
            .collect();
        (
            format!("const TOK: u32 = {tk}u;\n{}", formats::decoder(dtype, ragged)),
            format!(
                "{prelude}let row = wg.x * 128u + tid;
if row >= p.rows {{
    return;
}}
let wrow = {w_base} + row * p.row_bytes;
let t0 = wg.y * TOK;
let nt = min(TOK, {tt} - t0);
let groups = {groups};
{accs}for (var g = 0u; g < groups; g = g + 1u) {{
{inner}}}
{outs}"
            ),
        )
    } else {
        (
            format!(
                "const TOK: u32 = {tk}u;\nvar<workgroup> part: array<f32, {}>;\n{}",
                tk * BLOCK,
                formats::decoder(dtype, ragged)
            ),
            format!(
                "{prelude}let lane = tid & 31u;
let row = wg.x * 4u + (tid >> 5u);
let wrow = {w_base} + min(row, p.rows - 1u) * p.row_bytes;
let t0 = wg.y * TOK;
let nt = min(TOK, {tt} - t0);
let groups = {groups};
{accs}for (var g = lane; g < groups; g = g + 32u) {{
{inner}}}
{stores}workgroupBarrier();
for (var s = 16u; s > 0u; s = s >> 1u) {{
    if lane < s {{
        for (var j = 0u; j < nt; j = j + 1u) {{
            part[j * 128u + tid] = part[j * 128u + tid] + part[j * 128u + tid + s];
        }}
    }}
    workgroupBarrier();
}}
if lane == 0u && row < p.rows {{
    for (var j = 0u; j < nt; j = j + 1u) {{
        b_y[{y_base} + (t0 + j) * p.rows + row] = part[j * 128u + tid]{add_bias};
    }}
}}
"
            ),
        )
    };
    Kernel::new(
        name,
        &[
            ("w", Arg::Words),
            ("x", x_arg),
            ("xr", if rotated { Arg::In4 } else { Arg::Unused }),
            ("y", Arg::Out),
            ("bias", if bias { Arg::In } else { Arg::Unused }),
            ("tables", if rotated { Arg::Words } else { Arg::Unused }),
            ("rows", Arg::U32),
            ("k", Arg::U32),
            ("t", Arg::U32),
            ("row_bytes", Arg::U32),
        ]
        .into_iter()
        .chain(experts.then_some([("seg", Arg::Words), ("expert_bytes", Arg::U32)]).into_iter().flatten())
        .collect::<Vec<_>>(),
        decls,
        body,
    )
}

/// kq2's block rotation of activations, bit-identical to `kiln_ptx::formats_k::rotate_host`:
/// each 64-chunk `b` of `x` becomes `H·(S ⊙ b)/8` in `y` (the radix-2 butterfly, stages
/// 1, 2, … 32). Arguments `x, y, n` (`n` elements, a multiple of 64); a thread per
/// element, so a workgroup rotates two chunks; grid `ceil(n / 128)`, as
/// `kiln_ptx::formats_k::rotate_kernel`.
pub fn kq2_rotate() -> Kernel {
    let signs = kiln_quant::kq2::KQ2_RHT_SIGNS;
    Kernel::new(
        kiln_ptx::lower::KQ2_ROTATE,
        &[("x", Arg::In), ("y", Arg::Out), ("n", Arg::U32)],
        "var<workgroup> bfly: array<f32, 128>;\n",
        format!(
            "let i = wg.x * 128u + tid;
// The second chunk of the last workgroup may lie past n: its threads carry 0.
var v = 0.0;
if i < p.n {{
    v = b_x[p.x_off + i];
}}
let lane = tid & 31u;
let mask = select({lo}u, {hi}u, (tid & 32u) != 0u);
if ((mask >> lane) & 1u) != 0u {{
    v = -v;
}}
for (var h = 1u; h < 64u; h = h << 1u) {{
    bfly[tid] = v;
    workgroupBarrier();
    let o = bfly[tid ^ h];
    workgroupBarrier();
    // v[j], v[j + h] <- v[j] + v[j + h], v[j] - v[j + h].
    v = select(v + o, o - v, (tid & h) != 0u);
}}
if i < p.n {{
    b_y[p.y_off + i] = v * 0.125;
}}
",
            lo = signs as u32,
            hi = (signs >> 32) as u32
        ),
    )
}
