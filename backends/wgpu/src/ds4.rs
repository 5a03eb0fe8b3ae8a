//! WGSL twins of DeepSeek-V4's kernels (`kiln_ptx::kernels_ds4`): the same names,
//! arguments and grids, so the shared launch sequence (`kiln_ptx::PtxSession`'s DS4 ops)
//! drives them unchanged. The math is the PTX kernels' (f32; the same order of the sums
//! that feed top-k decisions: the router's scores and the indexer's scores are sequential
//! per-thread sums as there, and ties go to the lower index). Where the PTX kernels use
//! warp shuffles (the indexer's top-k, the compressed attention) these use workgroup
//! memory: the attention runs 128 keys per tile with an online softmax, as `attention`.
//!
//! WGSL has no infinity literal: the marks the PTX kernels write as −∞ (a picked expert,
//! a knocked-out indexer row) are −f32::MAX here, below any finite score.

use kiln_ir::Scoring;
use kiln_ptx::kernels_ds4 as k4;

use crate::kernels::{Arg, BLOCK, Kernel, REDUCE};

const ELEM: &str = "let i = wg.x * 128u + tid;\nif i >= p.n {\n    return;\n}\n";
const NEG_MAX: &str = "-3.4028235e38";

fn sigmoid() -> &'static str {
    "fn sigmoid(x: f32) -> f32 {\n    return 1.0 / (1.0 + exp(-x));\n}\n"
}

/// `(cos, sin)` of pair `q` at position `pos` from a table of `half` pairs per position.
const COS_SIN: &str = "
fn cos_sin(pos: u32, half: u32, q: u32) -> vec2<f32> {
    let ti = p.table_off + 2u * (pos * half + q);
    return vec2<f32>(b_table[ti], b_table[ti + 1u]);
}
";

/// `repeat`: `y[t, r·cols + c] = x[t, c]`. Arguments `x, y, n, cols, times`.
pub fn repeat() -> Kernel {
    Kernel::new(
        "ds4_repeat",
        &[("x", Arg::In), ("y", Arg::Out), ("n", Arg::U32), ("cols", Arg::U32), ("times", Arg::U32)],
        "",
        format!("{ELEM}let t = i / (p.cols * p.times);\nb_y[p.y_off + i] = b_x[p.x_off + t * p.cols + i % p.cols];\n"),
    )
}

/// `hc_coeffs` for `n` streams, one thread per token. Arguments `f, base, scale, y, t,
/// iters, eps`; grid `ceil(T / 128)`.
pub fn hc_coeffs(n: u64, pre_only: bool) -> Kernel {
    let n = n as u32;
    let cols = if pre_only { n } else { (2 + n) * n };
    let mut body = format!(
        "let row = wg.x * 128u + tid;
if row >= p.t {{
    return;
}}
let fb = p.f_off + row * {cols}u;
let yb = p.y_off + row * {cols}u;
let bb = p.base_off;
let s0 = b_scale[p.scale_off];
for (var j = 0u; j < N; j = j + 1u) {{
    let z = b_f[fb + j] * s0 + b_base[bb + j];
    b_y[yb + j] = sigmoid(z) + p.eps;
}}
"
    );
    if !pre_only {
        body += "let s1 = b_scale[p.scale_off + 1u];
let s2 = b_scale[p.scale_off + 2u];
for (var j = N; j < 2u * N; j = j + 1u) {
    let z = b_f[fb + j] * s1 + b_base[bb + j];
    b_y[yb + j] = sigmoid(z) * 2.0;
}
var c: array<f32, NN>;
for (var j = 0u; j < NN; j = j + 1u) {
    c[j] = b_f[fb + 2u * N + j] * s2 + b_base[bb + 2u * N + j];
}
for (var r = 0u; r < N; r = r + 1u) {
    var m = c[r * N];
    for (var j = 1u; j < N; j = j + 1u) {
        m = max(m, c[r * N + j]);
    }
    var s = 0.0;
    for (var j = 0u; j < N; j = j + 1u) {
        c[r * N + j] = exp(c[r * N + j] - m);
        s = s + c[r * N + j];
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < N; j = j + 1u) {
        c[r * N + j] = c[r * N + j] * inv + p.eps;
    }
}
for (var it = 0u; it < max(p.iters, 1u); it = it + 1u) {
    if it > 0u {
        for (var r = 0u; r < N; r = r + 1u) {
            var s = c[r * N];
            for (var j = 1u; j < N; j = j + 1u) {
                s = s + c[r * N + j];
            }
            s = s + p.eps;
            for (var j = 0u; j < N; j = j + 1u) {
                c[r * N + j] = c[r * N + j] / s;
            }
        }
    }
    for (var j = 0u; j < N; j = j + 1u) {
        var s = c[j];
        for (var i = 1u; i < N; i = i + 1u) {
            s = s + c[i * N + j];
        }
        s = s + p.eps;
        for (var i = 0u; i < N; i = i + 1u) {
            c[i * N + j] = c[i * N + j] / s;
        }
    }
}
for (var j = 0u; j < NN; j = j + 1u) {
    b_y[yb + 2u * N + j] = c[j];
}
";
    }
    Kernel::new(
        k4::hc_coeffs_name(n as u64, pre_only),
        &[
            ("f", Arg::In),
            ("base", Arg::In),
            ("scale", Arg::In),
            ("y", Arg::Out),
            ("t", Arg::U32),
            ("iters", Arg::U32),
            ("eps", Arg::F32),
        ],
        format!("const N: u32 = {n}u;\nconst NN: u32 = {}u;\n{}", n * n, sigmoid()),
        body,
    )
}

/// `hc_pre`: `y[t, i] = Σ_j c[t, j]·x[t, j·d + i]`. Arguments `x, c, y, n, d, streams, cw`.
pub fn hc_pre() -> Kernel {
    Kernel::new(
        "hc_pre",
        &[
            ("x", Arg::In),
            ("c", Arg::In),
            ("y", Arg::Out),
            ("n", Arg::U32),
            ("d", Arg::U32),
            ("streams", Arg::U32),
            ("cw", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let t = i / p.d;
let xrow = p.x_off + t * p.streams * p.d + i % p.d;
let crow = p.c_off + t * p.cw;
var acc = 0.0;
for (var j = 0u; j < p.streams; j = j + 1u) {{
    acc = acc + b_c[crow + j] * b_x[xrow + j * p.d];
}}
b_y[p.y_off + i] = acc;
"
        ),
    )
}

/// `hc_post`: `out[t, k, i] = post[k]·y[t, i] + Σ_j C[j, k]·x[t, j, i]`. Arguments
/// `x, y, c, out, n, d, streams`.
pub fn hc_post() -> Kernel {
    Kernel::new(
        "hc_post",
        &[
            ("x", Arg::In),
            ("y", Arg::In),
            ("c", Arg::In),
            ("out", Arg::Out),
            ("n", Arg::U32),
            ("d", Arg::U32),
            ("streams", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let s = p.streams;
let sd = s * p.d;
let t = i / sd;
let r = i % sd;
let k = r / p.d;
let ii = r % p.d;
let crow = p.c_off + t * (s + 2u) * s;
var acc = b_c[crow + s + k] * b_y[p.y_off + t * p.d + ii];
let cb = crow + 2u * s + k;
let xb = p.x_off + t * sd + ii;
for (var j = 0u; j < s; j = j + 1u) {{
    acc = acc + b_c[cb + j * s] * b_x[xb + j * p.d];
}}
b_out[p.out_off + i] = acc;
"
        ),
    )
}

/// `moe_route`, one thread per token. Arguments `logits, ids, bias, table, sel, y, t, e,
/// k, scale`; grid `ceil(T / 128)`.
pub fn moe_route(scoring: Scoring, hash: bool, bias: bool) -> Kernel {
    let score = match scoring {
        Scoring::Sigmoid => "let s = sigmoid(z);",
        Scoring::SqrtSoftplus => "let s = sqrt(select(log(1.0 + exp(z)), z, z > 20.0));",
        Scoring::Softmax => "let s = exp(z - mx);\n    sum = sum + s;",
    };
    let add_bias = if bias { " + b_bias[p.bias_off + j]" } else { "" };
    let mut body = format!(
        "let row = wg.x * 128u + tid;
if row >= p.t {{
    return;
}}
let lb = p.logits_off + row * p.e;
let yb = p.y_off + row * p.e;
let sb = p.sel_off + row * p.e;
var mx = {NEG_MAX};
"
    );
    if scoring == Scoring::Softmax {
        body += "for (var j = 0u; j < p.e; j = j + 1u) {\n    mx = max(mx, b_logits[lb + j]);\n}\n";
    }
    body += &format!(
        "var sum = 0.0;
for (var j = 0u; j < p.e; j = j + 1u) {{
    let z = b_logits[lb + j];
    {score}
    b_y[yb + j] = s;
    b_sel[sb + j] = s{add_bias};
}}
"
    );
    if scoring == Scoring::Softmax {
        body += &format!(
            "let inv = 1.0 / sum;
for (var j = 0u; j < p.e; j = j + 1u) {{
    let v = b_y[yb + j] * inv;
    b_y[yb + j] = v;
    b_sel[sb + j] = v{add_bias};
}}
"
        );
    }
    if hash {
        body += "for (var j = 0u; j < p.e; j = j + 1u) {
    b_sel[sb + j] = 0.0;
}
let tb = p.table_off + b_ids[p.ids_off + row] * p.k;
for (var j = 0u; j < p.k; j = j + 1u) {
    let ex = min(u32(round(b_table[tb + j])), p.e - 1u);
    b_sel[sb + ex] = b_sel[sb + ex] + 1.0;
}
";
    } else {
        body += "for (var r = 0u; r < p.k; r = r + 1u) {
    var best = PICKED;
    var bi = 0u;
    for (var j = 0u; j < p.e; j = j + 1u) {
        let v = b_sel[sb + j];
        if v > best {
            best = v;
            bi = j;
        }
    }
    b_sel[sb + bi] = PICKED;
}
";
    }
    let count = if hash { "b_sel[sb + j]" } else { "select(0.0, 1.0, b_sel[sb + j] == PICKED)" };
    body += &format!(
        "var total = 0.0;
for (var j = 0u; j < p.e; j = j + 1u) {{
    total = fma({count}, b_y[yb + j], total);
}}
total = total + 1e-20;
for (var j = 0u; j < p.e; j = j + 1u) {{
    b_y[yb + j] = b_y[yb + j] / total * p.scale * {count};
}}
"
    );
    Kernel::new(
        k4::moe_route_name(scoring, hash, bias),
        &[
            ("logits", Arg::In),
            ("ids", if hash { Arg::Words } else { Arg::Unused }),
            ("bias", if bias { Arg::In } else { Arg::Unused }),
            ("table", if hash { Arg::In } else { Arg::Unused }),
            ("sel", Arg::Out),
            ("y", Arg::Out),
            ("t", Arg::U32),
            ("e", Arg::U32),
            ("k", Arg::U32),
            ("scale", Arg::F32),
        ],
        format!("const PICKED: f32 = {NEG_MAX};\n{}", sigmoid()),
        body,
    )
}

/// The experts' row lists from the routing weights, one workgroup. Arguments
/// `w, seg, idx, at, t, e`; grid 1.
pub fn moe_plan() -> Kernel {
    Kernel::new(
        "moe_plan",
        &[
            ("w", Arg::In),
            ("seg", Arg::OutWords),
            ("idx", Arg::OutWords),
            ("at", Arg::OutWords),
            ("t", Arg::U32),
            ("e", Arg::U32),
        ],
        "",
        "for (var ex = tid; ex < p.e; ex = ex + 128u) {
    var cnt = 0u;
    for (var r = 0u; r < p.t; r = r + 1u) {
        if b_w[p.w_off + r * p.e + ex] != 0.0 {
            cnt = cnt + 1u;
        }
    }
    b_seg[p.seg_off + 2u * ex + 1u] = cnt;
}
storageBarrier();
workgroupBarrier();
if tid == 0u {
    var run = 0u;
    for (var ex = 0u; ex < p.e; ex = ex + 1u) {
        let c = b_seg[p.seg_off + 2u * ex + 1u];
        b_seg[p.seg_off + 2u * ex] = run;
        run = run + c;
    }
    b_seg[p.seg_off + 2u * p.e] = run;
}
storageBarrier();
workgroupBarrier();
for (var ex = tid; ex < p.e; ex = ex + 128u) {
    var slot = b_seg[p.seg_off + 2u * ex];
    for (var r = 0u; r < p.t; r = r + 1u) {
        let wi = r * p.e + ex;
        if b_w[p.w_off + wi] != 0.0 {
            b_idx[p.idx_off + slot] = r;
            b_at[p.at_off + wi] = slot;
            slot = slot + 1u;
        }
    }
}
",
    )
}

/// Gathers the experts' rows: `xs[r] = x[idx[r]]` for `r < seg[2E]`. Arguments
/// `x, idx, seg, xs, n, d, e`.
pub fn moe_gather() -> Kernel {
    Kernel::new(
        "moe_gather",
        &[
            ("x", Arg::In),
            ("idx", Arg::Words),
            ("seg", Arg::Words),
            ("xs", Arg::Out),
            ("n", Arg::U32),
            ("d", Arg::U32),
            ("e", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let r = i / p.d;
if r < b_seg[p.seg_off + 2u * p.e] {{
    b_xs[p.xs_off + i] = b_x[p.x_off + b_idx[p.idx_off + r] * p.d + i % p.d];
}}
"
        ),
    )
}

/// DeepSeek-V4's clamped SwiGLU. Arguments `g, u, h, n, limit`.
pub fn moe_swiglu() -> Kernel {
    Kernel::new(
        "moe_swiglu",
        &[("g", Arg::In), ("u", Arg::In), ("h", Arg::Out), ("n", Arg::U32), ("limit", Arg::F32)],
        sigmoid(),
        format!(
            "{ELEM}let g = min(b_g[p.g_off + i], p.limit);
let u = min(max(b_u[p.u_off + i], -p.limit), p.limit);
b_h[p.h_off + i] = g * sigmoid(g) * u;
"
        ),
    )
}

/// `out[t] = Σ_{e: w[t,e] ≠ 0} w[t,e]·ys[at[t,e]]` in expert order, plus `sh[t]` when
/// `add_shared` ≠ 0 (`sh` may be null otherwise; PTX: `shared`, a WGSL keyword). Arguments
/// `w, at, ys, sh, out, n, d, e, cap, add_shared`.
pub fn moe_combine() -> Kernel {
    Kernel::new(
        "moe_combine",
        &[
            ("w", Arg::In),
            ("at", Arg::Words),
            ("ys", Arg::In),
            ("sh", Arg::InOpt),
            ("out", Arg::Out),
            ("n", Arg::U32),
            ("d", Arg::U32),
            ("e", Arg::U32),
            ("cap", Arg::U32),
            ("add_shared", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let t = i / p.d;
let c = i % p.d;
var acc = 0.0;
for (var ex = 0u; ex < p.e; ex = ex + 1u) {{
    let wi = t * p.e + ex;
    let wv = b_w[p.w_off + wi];
    if wv != 0.0 {{
        let r = min(b_at[p.at_off + wi], p.cap - 1u);
        acc = acc + wv * b_ys[p.ys_off + r * p.d + c];
    }}
}}
if p.add_shared != 0u {{
    acc = acc + b_sh[p.sh_off + i];
}}
b_out[p.out_off + i] = acc;
"
        ),
    )
}

/// Copies a block of columns. Arguments `src, dst, n, w, ss, soff, ds, doff`.
pub fn copy_cols() -> Kernel {
    Kernel::new(
        "ds4_copy_cols",
        &[
            ("src", Arg::In),
            ("dst", Arg::Out),
            ("n", Arg::U32),
            ("w", Arg::U32),
            ("ss", Arg::U32),
            ("soff", Arg::U32),
            ("ds", Arg::U32),
            ("doff", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let t = i / p.w;
let c = i % p.w;
b_dst[p.dst_off + t * p.ds + p.doff + c] = b_src[p.src_off + t * p.ss + p.soff + c];
"
        ),
    )
}

/// Interleaved-pair RoPE of the last `rd` channels of each head at position `step + t`,
/// into ring row `(step + t) mod ring` (row `t` when `ring` is 0). Arguments
/// `src, dst, table, step, n, width, head, rd, ring`.
pub fn ca_rope() -> Kernel {
    Kernel::new(
        "ca_rope",
        &[
            ("src", Arg::In),
            ("dst", Arg::Out),
            ("table", Arg::In),
            ("step", Arg::Words),
            ("n", Arg::U32),
            ("width", Arg::U32),
            ("head", Arg::U32),
            ("rd", Arg::U32),
            ("ring", Arg::U32),
        ],
        COS_SIN,
        format!(
            "{ELEM}let t = i / p.width;
let c = i % p.width;
let pos = b_step[p.step_off] + t;
let cc = c % p.head;
let lead = p.head - p.rd;
var v = b_src[p.src_off + i];
if cc >= lead {{
    let r = cc - lead;
    let odd = (r & 1u) != 0u;
    let cs = cos_sin(pos, p.rd >> 1u, r >> 1u);
    let ia = i - (r & 1u);
    let a = b_src[p.src_off + ia];
    let b = b_src[p.src_off + ia + 1u];
    // even: a·c − b·s ; odd: b·c + a·s
    v = select(a * cs.x - b * cs.y, b * cs.x + a * cs.y, odd);
}}
let row = select(t, pos % max(p.ring, 1u), p.ring != 0u);
b_dst[p.dst_off + row * p.width + c] = v;
"
        ),
    )
}

/// Stores this call's rows into a ring by position. Arguments `src, ring, step, n, width, rows`.
pub fn ca_store() -> Kernel {
    Kernel::new(
        "ca_store",
        &[
            ("src", Arg::In),
            ("ring", Arg::Out),
            ("step", Arg::Words),
            ("n", Arg::U32),
            ("width", Arg::U32),
            ("rows", Arg::U32),
        ],
        "",
        format!(
            "{ELEM}let t = i / p.width;
let r = (b_step[p.step_off] + t) % p.rows;
b_ring[p.ring_off + r * p.width + i % p.width] = b_src[p.src_off + i];
"
        ),
    )
}

/// Channels per thread over `MAX_CA_DIM` channels.
const CH: u32 = (k4::MAX_CA_DIM as u32).div_ceil(BLOCK);

/// Closes the compressor windows that end in this call, one workgroup per window.
/// Arguments `kv, gate, ape, norm, entries, table, step, t, ratio, dim, width, rows, eps,
/// rd`; grid `t / ratio + 1`.
pub fn ca_compress() -> Kernel {
    Kernel::new(
        "ca_compress",
        &[
            ("kv", Arg::In),
            ("gate", Arg::In),
            ("ape", Arg::In),
            ("norm", Arg::In),
            ("entries", Arg::Out),
            ("table", Arg::In),
            ("step", Arg::Words),
            ("t", Arg::U32),
            ("ratio", Arg::U32),
            ("dim", Arg::U32),
            ("width", Arg::U32),
            ("rows", Arg::U32),
            ("eps", Arg::F32),
            ("rd", Arg::U32),
        ],
        format!("const CH: u32 = {CH}u;\nvar<workgroup> rowv: array<f32, {}>;\n{REDUCE}{COS_SIN}", k4::MAX_CA_DIM),
        format!(
            "let pos = b_step[p.step_off];
let w = pos / p.ratio + wg.x;
let start = w * p.ratio;
// Window w closes in this call iff its end (exclusive) <= pos + t.
if start + p.ratio > pos + p.t {{
    return;
}}
let overlap = p.width == 2u * p.dim;
let has_prev = overlap && w > 0u;
let own = select(0u, p.dim, overlap);
let pstart = start - p.ratio;
var pooled: array<f32, CH>;
var ss = 0.0;
for (var ci = 0u; ci < CH; ci = ci + 1u) {{
    let c = tid + ci * 128u;
    let cc = min(c, p.dim - 1u);
    let oc = own + cc;
    var mx = {NEG_MAX};
    for (var j = 0u; j < p.ratio; j = j + 1u) {{
        if has_prev {{
            let r = (pstart + j) % p.rows;
            mx = max(mx, b_gate[p.gate_off + r * p.width + cc] + b_ape[p.ape_off + j * p.width + cc]);
        }}
        let r = (start + j) % p.rows;
        mx = max(mx, b_gate[p.gate_off + r * p.width + oc] + b_ape[p.ape_off + j * p.width + oc]);
    }}
    var sum = 0.0;
    var acc = 0.0;
    for (var j = 0u; j < p.ratio; j = j + 1u) {{
        if has_prev {{
            let r = (pstart + j) % p.rows;
            let e = exp(b_gate[p.gate_off + r * p.width + cc] + b_ape[p.ape_off + j * p.width + cc] - mx);
            sum = sum + e;
            acc = fma(e, b_kv[p.kv_off + r * p.width + cc], acc);
        }}
        let r = (start + j) % p.rows;
        let e = exp(b_gate[p.gate_off + r * p.width + oc] + b_ape[p.ape_off + j * p.width + oc] - mx);
        sum = sum + e;
        acc = fma(e, b_kv[p.kv_off + r * p.width + oc], acc);
    }}
    let v = select(0.0, acc / sum, c < p.dim);
    ss = fma(v, v, ss);
    pooled[ci] = v;
}}
let total = block_sum(ss, tid);
let inv = 1.0 / sqrt(total / f32(p.dim) + p.eps);
for (var ci = 0u; ci < CH; ci = ci + 1u) {{
    let c = tid + ci * 128u;
    if c < p.dim {{
        pooled[ci] = pooled[ci] * inv * b_norm[p.norm_off + c];
        rowv[c] = pooled[ci];
    }}
}}
workgroupBarrier();
let lead = p.dim - p.rd;
for (var ci = 0u; ci < CH; ci = ci + 1u) {{
    let c = tid + ci * 128u;
    if c < p.dim {{
        var v = pooled[ci];
        if c >= lead {{
            let k = c - lead;
            let cs = cos_sin(start, p.rd >> 1u, k >> 1u);
            let other = rowv[c ^ 1u];
            // even (a = v, b = other): a·c − b·s ; odd (b = v, a = other): b·c + a·s
            v = select(v * cs.x - other * cs.y, v * cs.x + other * cs.y, (k & 1u) != 0u);
        }}
        b_entries[p.entries_off + w * p.dim + c] = v;
    }}
}}
"
        ),
    )
}

/// The Lightning Indexer's scores of the visible compressed rows, one thread per (query,
/// row). Arguments `q, iw, keys, scores, step, heads, dim, ratio, cap, wscale, dscale`;
/// grid `[ceil(cap / 128), T]`.
pub fn ca_index_scores() -> Kernel {
    Kernel::new(
        "ca_index_scores",
        &[
            ("q", Arg::In),
            ("iw", Arg::In),
            ("keys", Arg::In),
            ("scores", Arg::Out),
            ("step", Arg::Words),
            ("heads", Arg::U32),
            ("dim", Arg::U32),
            ("ratio", Arg::U32),
            ("cap", Arg::U32),
            ("wscale", Arg::F32),
            ("dscale", Arg::F32),
        ],
        "",
        "let tq = wg.y;
let visible = min((b_step[p.step_off] + tq + 1u) / p.ratio, p.cap);
let w = wg.x * 128u + tid;
if w >= visible {
    return;
}
let kb = p.keys_off + w * p.dim;
let qb = p.q_off + tq * p.heads * p.dim;
let wb = p.iw_off + tq * p.heads;
var s = 0.0;
for (var h = 0u; h < p.heads; h = h + 1u) {
    var d = 0.0;
    let qh = qb + h * p.dim;
    for (var c = 0u; c < p.dim; c = c + 1u) {
        d = fma(b_q[qh + c], b_keys[kb + c], d);
    }
    d = max(d, 0.0) * p.dscale;
    s = fma(b_iw[wb + h] * p.wscale, d, s);
}
b_scores[p.scores_off + tq * p.cap + w] = s;
",
    )
}

/// The indexer's top-k per query, one workgroup per query: `k` rounds of a workgroup
/// argmax (ties to the earlier row), each winner's score then knocked out; every visible
/// row when there are at most `k`. Arguments `scores, sel, step, ratio, cap, k`; grid `T`.
pub fn ca_index_topk() -> Kernel {
    Kernel::new(
        "ca_index_topk",
        &[
            ("scores", Arg::Out),
            ("sel", Arg::OutWords),
            ("step", Arg::Words),
            ("ratio", Arg::U32),
            ("cap", Arg::U32),
            ("k", Arg::U32),
        ],
        format!(
            "const NONE: u32 = 4294967295u;
const KNOCKED: f32 = {NEG_MAX};
var<workgroup> rv: array<f32, 128>;
var<workgroup> ri: array<u32, 128>;

// Whether (v, i) beats (bv, bi): a larger score, then the smaller row; a missing
// candidate (NONE) never wins and any real one beats it.
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {{
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}}
"
        ),
        "let tq = wg.x;
let visible = min((b_step[p.step_off] + tq + 1u) / p.ratio, p.cap);
let sb = p.scores_off + tq * p.cap;
let selb = p.sel_off + tq * p.k;
if visible <= p.k {
    for (var w = tid; w < visible; w = w + 128u) {
        b_sel[selb + w] = w;
    }
    return;
}
for (var j = 0u; j < p.k; j = j + 1u) {
    var bv = KNOCKED;
    var bi = NONE;
    // Rows in increasing order: a strictly larger score wins.
    for (var w = tid; w < visible; w = w + 128u) {
        let v = b_scores[sb + w];
        if v > bv || bi == NONE {
            bv = v;
            bi = w;
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    workgroupBarrier();
    for (var s = 64u; s > 0u; s = s >> 1u) {
        if tid < s && beats(rv[tid + s], ri[tid + s], rv[tid], ri[tid]) {
            rv[tid] = rv[tid + s];
            ri[tid] = ri[tid + s];
        }
        workgroupBarrier();
    }
    let best = ri[0];
    if tid == 0u {
        b_sel[selb + j] = best;
        b_scores[sb + min(best, visible - 1u)] = KNOCKED;
    }
    // The knocked-out score must be seen by every thread in the next round.
    storageBarrier();
    workgroupBarrier();
}
",
    )
}

/// The fused compressed attention, one workgroup per (head, query): the raw window (a
/// ring of `ring` rows) then the compressed rows (`sel`'s first `min(k, visible)` when
/// `k` > 0, else every visible one), 128 keys per tile with an online softmax, merged with
/// the sink logit; the query is rotated on load and the output de-rotated. Arguments
/// `q, raw, comp, sel, sink, table, y, step, heads, scale, window, ring, ratio, k, cap,
/// rd`; grid `[heads, T]`.
pub fn ca_attend(head_dim: u32) -> Kernel {
    assert!(head_dim.is_multiple_of(32) && head_dim <= k4::MAX_CA_DIM as u32);
    let dpt = head_dim.div_ceil(BLOCK);
    Kernel::new(
        k4::ca_attend_name(head_dim),
        &[
            ("q", Arg::In),
            ("raw", Arg::In),
            ("comp", Arg::In),
            ("sel", Arg::Words),
            ("sink", Arg::In),
            ("table", Arg::In),
            ("y", Arg::Out),
            ("step", Arg::Words),
            ("heads", Arg::U32),
            ("scale", Arg::F32),
            ("window", Arg::U32),
            ("ring", Arg::U32),
            ("ratio", Arg::U32),
            ("k", Arg::U32),
            ("cap", Arg::U32),
            ("rd", Arg::U32),
        ],
        format!(
            "const HD: u32 = {head_dim}u;
const DPT: u32 = {dpt}u;
const NEG_BIG: f32 = -1.0e30;
var<workgroup> qv: array<f32, {head_dim}>;
var<workgroup> outs: array<f32, {head_dim}>;
var<workgroup> probs: array<f32, 128>;
var<workgroup> krow: array<u32, 128>;
{REDUCE}{COS_SIN}"
        ),
        "let h = wg.x;
let tq = wg.y;
let pos = b_step[p.step_off] + tq;
let p1 = pos + 1u;
// Raw keys: positions lo..=pos; then the compressed rows.
let lo = select(0u, p1 - p.window, p1 > p.window);
let nraw = p1 - lo;
let vis = select(0u, min(p1 / max(p.ratio, 1u), p.cap), p.ratio != 0u);
let ncomp = select(vis, min(vis, p.k), p.k != 0u);
let nkeys = nraw + ncomp;
let lead = HD - p.rd;
let half = p.rd >> 1u;
let ring1 = max(p.ring, 1u);
let k1 = max(p.k, 1u);
let qb = p.q_off + (tq * p.heads + h) * HD;
for (var c = tid; c < HD; c = c + 128u) {
    let mine = b_q[qb + c];
    var v = mine;
    if c >= lead {
        let r = c - lead;
        let cs = cos_sin(pos, half, r >> 1u);
        let other = b_q[qb + (c ^ 1u)];
        // even: mine·c − other·s ; odd: mine·c + other·s
        v = select(mine * cs.x - other * cs.y, mine * cs.x + other * cs.y, (r & 1u) != 0u);
    }
    qv[c] = v;
}
workgroupBarrier();
var m = NEG_BIG;
var l = 0.0;
var acc: array<f32, DPT>;
for (var j0 = 0u; j0 < nkeys; j0 = j0 + 128u) {
    let j = j0 + tid;
    var s = NEG_BIG;
    // A raw key's ring row, or a compressed row | 0x80000000.
    var row = 0u;
    if j < nkeys {
        var dot = 0.0;
        if j < nraw {
            row = (lo + j) % ring1;
            let kb = p.raw_off + row * HD;
            for (var d = 0u; d < HD; d = d + 1u) {
                dot = fma(qv[d], b_raw[kb + d], dot);
            }
        } else {
            let ci = j - nraw;
            let chosen = b_sel[p.sel_off + tq * k1 + min(ci, k1 - 1u)];
            let cr = min(select(ci, chosen, p.k != 0u), p.cap - 1u);
            row = cr | 0x80000000u;
            let kb = p.comp_off + cr * HD;
            for (var d = 0u; d < HD; d = d + 1u) {
                dot = fma(qv[d], b_comp[kb + d], dot);
            }
        }
        s = dot * p.scale;
    }
    krow[tid] = row;
    let m_new = max(m, block_max(s, tid));
    let corr = exp(m - m_new);
    let e = select(0.0, exp(s - m_new), j < nkeys);
    probs[tid] = e;
    l = l * corr + block_sum(e, tid);
    let tile = min(128u, nkeys - j0);
    for (var r = 0u; r < DPT; r = r + 1u) {
        let d = tid + r * 128u;
        if d < HD {
            var o = acc[r] * corr;
            for (var jj = 0u; jj < tile; jj = jj + 1u) {
                let kr = krow[jj];
                var v = 0.0;
                if kr >= 0x80000000u {
                    v = b_comp[p.comp_off + (kr & 0x7fffffffu) * HD + d];
                } else {
                    v = b_raw[p.raw_off + kr * HD + d];
                }
                o = fma(probs[jj], v, o);
            }
            acc[r] = o;
        }
    }
    m = m_new;
    workgroupBarrier();
}
// The sink's logit joins the softmax's denominator.
let sk = b_sink[p.sink_off + h];
let big = max(sk, m);
let fw = exp(m - big);
let inv = 1.0 / fma(l, fw, exp(sk - big));
for (var r = 0u; r < DPT; r = r + 1u) {
    let d = tid + r * 128u;
    if d < HD {
        outs[d] = acc[r] * fw * inv;
    }
}
workgroupBarrier();
// De-rotate at pos: even (a = o, b = other): a·c + b·s ; odd (b = o, a = other): b·c − a·s.
let yb = p.y_off + (tq * p.heads + h) * HD;
for (var c = tid; c < HD; c = c + 128u) {
    var v = outs[c];
    if c >= lead {
        let r = c - lead;
        let cs = cos_sin(pos, half, r >> 1u);
        let other = outs[c ^ 1u];
        v = select(v * cs.x + other * cs.y, v * cs.x - other * cs.y, (r & 1u) != 0u);
    }
    b_y[yb + c] = v;
}
",
    )
}

/// The WGSL kernel of a variant of the shared plan ([`k4::Ds4Kernel`]).
pub fn build(k: k4::Ds4Kernel) -> Kernel {
    use k4::Ds4Kernel as K;
    match k {
        K::Repeat => repeat(),
        K::HcCoeffs { streams, pre_only } => hc_coeffs(streams, pre_only),
        K::HcPre => hc_pre(),
        K::HcPost => hc_post(),
        K::MoeRoute { scoring, hash, bias } => moe_route(scoring, hash, bias),
        K::MoePlan => moe_plan(),
        K::MoeGather => moe_gather(),
        K::MoeSwiglu => moe_swiglu(),
        K::MoeCombine => moe_combine(),
        K::CopyCols => copy_cols(),
        K::CaRope => ca_rope(),
        K::CaStore => ca_store(),
        K::CaCompress => ca_compress(),
        K::CaIndexScores => ca_index_scores(),
        K::CaIndexTopk => ca_index_topk(),
        K::CaAttend(hd) => ca_attend(hd),
    }
}

/// Every DS4 kernel variant (the naga validation and MSL tests); the stacked-experts
/// matmuls are with the other matmuls in `lower::all_kernels`.
pub fn all() -> Vec<Kernel> {
    k4::variants().into_iter().map(build).collect()
}
