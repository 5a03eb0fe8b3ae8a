//! DeepSeek-V4 kernels: hyper-connections (`repeat`, `hc_coeffs`, `hc_pre`, `hc_post`),
//! routing and expert dispatch (`moe_route`, `moe_plan`, `moe_gather`, `moe_swiglu`,
//! `moe_combine`; the expert matmuls are [`crate::kernels::matmul_experts`]), column copies
//! for `grouped_matmul`, and the fused compressed attention (`ca_rope`, `ca_store`,
//! `ca_compress`, `ca_index_scores`, `ca_index_topk`, `ca_attend`).
//!
//! The semantics are the reference interpreter's (`kiln_backends::reference::sparse`);
//! sums are f32 here (f64 there), `exp` is `ex2.approx`. Positions come from the
//! session's `step` buffer, so a recorded decode sequence replays at any position. The
//! compressed-attention state lives in rings indexed by position (rotated raw K=V rows,
//! the compressors' projections), plus the compressed rows indexed by window: nothing in
//! it depends on the order of calls, so a rollback needs only that the rings still hold
//! the positions the next call reads.

use kiln_ir::{Op, Scoring, VerifiedModule};

use crate::kernels::{BLOCK, STEP_POS};
use crate::ptx::{BinOp, Cmp, Kb, Kernel, Mem, ParamTy, Reg, Shfl, Special, Ty, UnOp};

/// Largest `hc_mult` the `hc_coeffs` kernel holds in registers.
pub const MAX_HC_STREAMS: u64 = 8;
/// Largest head dimension of the compressed attention and compressor kernels.
pub const MAX_CA_DIM: u64 = 512;
/// A picked expert's mark in the routing scratch.
const PICKED: f32 = f32::NEG_INFINITY;
const NEG_BIG: f32 = -1.0e30;

fn p(name: &str) -> (&str, ParamTy) {
    (name, ParamTy::Ptr)
}
fn u(name: &str) -> (&str, ParamTy) {
    (name, ParamTy::U32)
}
fn f(name: &str) -> (&str, ParamTy) {
    (name, ParamTy::F32)
}

/// Thread index of a 1-D launch, clamped below `n` (for loads), and whether it is below `n`.
fn elem(kb: &mut Kb, n: Reg) -> (Reg, Reg) {
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let i = kb.mad(Ty::U32, cta, BLOCK, tid);
    let ok = kb.setp(Cmp::Lt, i, n);
    let last = kb.sub(Ty::U32, n, 1u32);
    let ic = kb.bin(BinOp::Min, Ty::U32, i, last);
    (ic, ok)
}

fn ld_f(kb: &mut Kb, base: Reg, idx: Reg) -> Reg {
    let a = kb.index(base, idx, 4);
    kb.ld(Mem::F32, a, 0)
}

fn ld_u(kb: &mut Kb, base: Reg, idx: Reg) -> Reg {
    let a = kb.index(base, idx, 4);
    kb.ld(Mem::U32, a, 0)
}

fn st_f(kb: &mut Kb, base: Reg, idx: Reg, v: Reg, ok: Reg) {
    let a = kb.index(base, idx, 4);
    kb.guarded(ok, false, |kb| kb.st(Mem::F32, a, 0, v));
}

fn sigmoid(kb: &mut Kb, x: Reg) -> Reg {
    let nx = kb.un(UnOp::Neg, Ty::F32, x);
    let e = kb.exp(nx);
    let d = kb.add(Ty::F32, e, 1.0f32);
    kb.bin(BinOp::Div, Ty::F32, 1.0f32, d)
}

fn step_pos(kb: &mut Kb, step: Reg) -> Reg {
    kb.ld(Mem::U32, step, STEP_POS)
}

/// `repeat`: `y[t, r·cols + c] = x[t, c]`. Arguments `x, y, n (= T·times·cols), cols, times`.
pub fn repeat() -> Kernel {
    let mut kb = Kb::new("ds4_repeat", &[p("x"), p("y"), u("n"), u("cols"), u("times")], BLOCK);
    let (x, y, n, cols, times) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let (i, ok) = elem(&mut kb, n);
    let wide = kb.mul(Ty::U32, cols, times);
    let t = kb.bin(BinOp::Div, Ty::U32, i, wide);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, cols);
    let src = kb.mad(Ty::U32, t, cols, c);
    let v = ld_f(&mut kb, x, src);
    st_f(&mut kb, y, i, v, ok);
    kb.finish()
}

pub fn hc_coeffs_name(n: u64, pre_only: bool) -> String {
    format!("hc_coeffs_n{n}{}", if pre_only { "_pre" } else { "" })
}

/// `hc_coeffs` for `n` streams, one thread per token, the n×n Sinkhorn matrix in
/// registers. Arguments `f, base, scale, y, t, iters, eps`; grid `ceil(T / 128)`. Rows of
/// `f` and `y` are `(2+n)·n` wide (`n` for the pre-only variant).
pub fn hc_coeffs(n: u64, pre_only: bool) -> Kernel {
    let n = n as usize;
    let cols = if pre_only { n } else { (2 + n) * n };
    let mut kb = Kb::new(
        hc_coeffs_name(n as u64, pre_only),
        &[p("f"), p("base"), p("scale"), p("y"), u("t"), u("iters"), f("eps")],
        BLOCK,
    );
    let (fp, base, scale, y, t, iters, eps) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (row, ok) = elem(&mut kb, t);
    let off = kb.mul(Ty::U32, row, cols as u32);
    let frow = kb.index(fp, off, 4);
    let yrow = kb.index(y, off, 4);
    let sc: Vec<Reg> = (0..if pre_only { 1 } else { 3 }).map(|i| kb.ld(Mem::F32, scale, 4 * i)).collect();
    let raw = |kb: &mut Kb, j: usize, s: Reg| {
        let fv = kb.ld(Mem::F32, frow, 4 * j as i32);
        let b = kb.ld(Mem::F32, base, 4 * j as i32);
        let m = kb.mul(Ty::F32, fv, s);
        kb.add(Ty::F32, m, b)
    };
    for j in 0..n {
        let z = raw(&mut kb, j, sc[0]);
        let s = sigmoid(&mut kb, z);
        let v = kb.add(Ty::F32, s, eps);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, yrow, 4 * j as i32, v));
    }
    if !pre_only {
        for j in n..2 * n {
            let z = raw(&mut kb, j, sc[1]);
            let s = sigmoid(&mut kb, z);
            let v = kb.mul(Ty::F32, s, 2.0f32);
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, yrow, 4 * j as i32, v));
        }
        let mut c: Vec<Reg> = (0..n * n).map(|j| raw(&mut kb, 2 * n + j, sc[2])).collect();
        for r in 0..n {
            let mut m = c[r * n];
            for j in 1..n {
                m = kb.bin(BinOp::Max, Ty::F32, m, c[r * n + j]);
            }
            let mut s = kb.imm(Ty::F32, 0.0f32);
            for j in 0..n {
                let d = kb.sub(Ty::F32, c[r * n + j], m);
                c[r * n + j] = kb.exp(d);
                s = kb.add(Ty::F32, s, c[r * n + j]);
            }
            let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, s);
            for j in 0..n {
                let v = kb.mul(Ty::F32, c[r * n + j], inv);
                c[r * n + j] = kb.add(Ty::F32, v, eps);
            }
        }
        // Loop-carried registers: copy into fixed ones so the iteration loop can update them.
        let c: Vec<Reg> = c
            .into_iter()
            .map(|v| {
                let r = kb.reg(Ty::F32);
                kb.mov_to(r, v);
                r
            })
            .collect();
        let cols_norm = |kb: &mut Kb| {
            for j in 0..n {
                let mut s = c[j];
                for i in 1..n {
                    s = kb.add(Ty::F32, s, c[i * n + j]);
                }
                let s = kb.add(Ty::F32, s, eps);
                for i in 0..n {
                    kb.bin_to(BinOp::Div, c[i * n + j], c[i * n + j], s);
                }
            }
        };
        cols_norm(&mut kb);
        kb.for_range(1u32, iters, 1u32, |kb, _| {
            for r in 0..n {
                let mut s = c[r * n];
                for j in 1..n {
                    s = kb.add(Ty::F32, s, c[r * n + j]);
                }
                let s = kb.add(Ty::F32, s, eps);
                for j in 0..n {
                    kb.bin_to(BinOp::Div, c[r * n + j], c[r * n + j], s);
                }
            }
            cols_norm(kb);
        });
        for (j, &v) in c.iter().enumerate() {
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, yrow, 4 * (2 * n + j) as i32, v));
        }
    }
    kb.finish()
}

/// `hc_pre`: `y[t, i] = Σ_j c[t, j]·x[t, j·d + i]`. Arguments `x, c, y, n (= T·d), d, streams, cw`.
pub fn hc_pre() -> Kernel {
    let mut kb = Kb::new("hc_pre", &[p("x"), p("c"), p("y"), u("n"), u("d"), u("streams"), u("cw")], BLOCK);
    let (x, c, y, n, d, s, cw) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (e, ok) = elem(&mut kb, n);
    let t = kb.bin(BinOp::Div, Ty::U32, e, d);
    let i = kb.bin(BinOp::Rem, Ty::U32, e, d);
    let acc = kb.imm(Ty::F32, 0.0f32);
    let crow = kb.mul(Ty::U32, t, cw);
    let sd = kb.mul(Ty::U32, s, d);
    let xrow = kb.mad(Ty::U32, t, sd, i);
    kb.for_range(0u32, s, 1u32, |kb, j| {
        let ci = kb.add(Ty::U32, crow, j);
        let w = ld_f(kb, c, ci);
        let xi = kb.mad(Ty::U32, j, d, xrow);
        let v = ld_f(kb, x, xi);
        let m = kb.mul(Ty::F32, w, v);
        kb.bin_to(BinOp::Add, acc, acc, m);
    });
    st_f(&mut kb, y, e, acc, ok);
    kb.finish()
}

/// `hc_post`: `out[t, k, i] = post[k]·y[t, i] + Σ_j C[j, k]·x[t, j, i]`. Arguments
/// `x, y, c, out, n (= T·streams·d), d, streams`.
pub fn hc_post() -> Kernel {
    let mut kb = Kb::new("hc_post", &[p("x"), p("y"), p("c"), p("out"), u("n"), u("d"), u("streams")], BLOCK);
    let (x, y, c, out, n, d, s) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (e, ok) = elem(&mut kb, n);
    let sd = kb.mul(Ty::U32, s, d);
    let t = kb.bin(BinOp::Div, Ty::U32, e, sd);
    let r = kb.bin(BinOp::Rem, Ty::U32, e, sd);
    let k = kb.bin(BinOp::Div, Ty::U32, r, d);
    let i = kb.bin(BinOp::Rem, Ty::U32, r, d);
    let s2 = kb.add(Ty::U32, s, 2u32);
    let cw = kb.mul(Ty::U32, s2, s);
    let crow = kb.mul(Ty::U32, t, cw);
    let pi = kb.add(Ty::U32, crow, s);
    let pi = kb.add(Ty::U32, pi, k);
    let post = ld_f(&mut kb, c, pi);
    let yi = kb.mad(Ty::U32, t, d, i);
    let yv = ld_f(&mut kb, y, yi);
    let acc = kb.mul(Ty::F32, post, yv);
    // comb[j, k] at crow + 2n + j·n + k.
    let cb = kb.mad(Ty::U32, s, 2u32, crow);
    let cb = kb.add(Ty::U32, cb, k);
    let xb = kb.mad(Ty::U32, t, sd, i);
    kb.for_range(0u32, s, 1u32, |kb, j| {
        let ci = kb.mad(Ty::U32, j, s, cb);
        let w = ld_f(kb, c, ci);
        let xi = kb.mad(Ty::U32, j, d, xb);
        let v = ld_f(kb, x, xi);
        let m = kb.mul(Ty::F32, w, v);
        kb.bin_to(BinOp::Add, acc, acc, m);
    });
    st_f(&mut kb, out, e, acc, ok);
    kb.finish()
}

pub fn moe_route_name(scoring: Scoring, hash: bool, bias: bool) -> String {
    let s = match scoring {
        Scoring::SqrtSoftplus => "sqrtsoftplus",
        Scoring::Sigmoid => "sigmoid",
        Scoring::Softmax => "softmax",
    };
    format!("moe_route_{s}{}{}", if hash { "_hash" } else { "" }, if bias { "_bias" } else { "" })
}

/// `moe_route`, one thread per token (a scan over the experts `k` times). Arguments
/// `logits, ids (u32 token ids), bias, table (f32 [V, k] expert numbers), sel (scratch
/// [T, E]), y, t, e, k, scale`; grid `ceil(T / 128)`.
pub fn moe_route(scoring: Scoring, hash: bool, bias: bool) -> Kernel {
    let mut kb = Kb::new(
        moe_route_name(scoring, hash, bias),
        &[p("logits"), p("ids"), p("bias"), p("table"), p("sel"), p("y"), u("t"), u("e"), u("k"), f("scale")],
        BLOCK,
    );
    let (logits, ids, bias_p, table, sel, y) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5));
    let (t, e, k, scale) = (kb.param(6), kb.param(7), kb.param(8), kb.param(9));
    let (row, ok) = elem(&mut kb, t);
    let off = kb.mul(Ty::U32, row, e);
    let lrow = kb.index(logits, off, 4);
    let yrow = kb.index(y, off, 4);
    let srow = kb.index(sel, off, 4);
    // Scores into y.
    let mx = kb.imm(Ty::F32, f32::NEG_INFINITY);
    if scoring == Scoring::Softmax {
        kb.for_range(0u32, e, 1u32, |kb, j| {
            let z = ld_f(kb, lrow, j);
            kb.bin_to(BinOp::Max, mx, mx, z);
        });
    }
    let sum = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, e, 1u32, |kb, j| {
        let z = ld_f(kb, lrow, j);
        let s = match scoring {
            Scoring::Sigmoid => sigmoid(kb, z),
            Scoring::SqrtSoftplus => {
                // softplus(z) = z above 20, else ln(1 + e^z) (= log2(1 + e^z) · ln 2).
                let ez = kb.exp(z);
                let one = kb.add(Ty::F32, ez, 1.0f32);
                let l2 = kb.un(UnOp::Lg2, Ty::F32, one);
                let sp = kb.mul(Ty::F32, l2, std::f32::consts::LN_2);
                let big = kb.setp(Cmp::Gt, z, 20.0f32);
                let sp = kb.selp(Ty::F32, z, sp, big);
                kb.un(UnOp::Sqrt, Ty::F32, sp)
            }
            Scoring::Softmax => {
                let d = kb.sub(Ty::F32, z, mx);
                let v = kb.exp(d);
                kb.bin_to(BinOp::Add, sum, sum, v);
                v
            }
        };
        let ya = kb.index(yrow, j, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, ya, 0, s));
        // The selection value (score + bias).
        let v = if bias {
            let b = ld_f(kb, bias_p, j);
            kb.add(Ty::F32, s, b)
        } else {
            s
        };
        let sa = kb.index(srow, j, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, sa, 0, v));
    });
    if scoring == Scoring::Softmax {
        let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, sum);
        kb.for_range(0u32, e, 1u32, |kb, j| {
            let ya = kb.index(yrow, j, 4);
            let v = kb.ld(Mem::F32, ya, 0);
            let v = kb.mul(Ty::F32, v, inv);
            let sv = if bias {
                let b = ld_f(kb, bias_p, j);
                kb.add(Ty::F32, v, b)
            } else {
                v
            };
            let sa = kb.index(srow, j, 4);
            kb.guarded(ok, false, |kb| {
                kb.st(Mem::F32, ya, 0, v);
                kb.st(Mem::F32, sa, 0, sv);
            });
        });
    }
    // Mark the chosen experts: the top-k's with PICKED; a hash row's count each expert
    // (a table row may name one twice, which counts twice, as in the reference).
    let last_e = kb.sub(Ty::U32, e, 1u32);
    if hash {
        kb.for_range(0u32, e, 1u32, |kb, j| {
            let sa = kb.index(srow, j, 4);
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, sa, 0, 0.0f32));
        });
        let id = ld_u(&mut kb, ids, row);
        let tb = kb.mul(Ty::U32, id, k);
        kb.for_range(0u32, k, 1u32, |kb, j| {
            let ti = kb.add(Ty::U32, tb, j);
            let ex = ld_f(kb, table, ti);
            let ex = kb.cvt_rni(Ty::U32, ex);
            let ex = kb.bin(BinOp::Min, Ty::U32, ex, last_e);
            let sa = kb.index(srow, ex, 4);
            let c = kb.ld(Mem::F32, sa, 0);
            let c = kb.add(Ty::F32, c, 1.0f32);
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, sa, 0, c));
        });
    } else {
        kb.for_range(0u32, k, 1u32, |kb, _| {
            let best = kb.imm(Ty::F32, PICKED);
            let bi = kb.imm(Ty::U32, 0u32);
            kb.for_range(0u32, e, 1u32, |kb, j| {
                let v = ld_f(kb, srow, j);
                let gt = kb.setp(Cmp::Gt, v, best);
                let nb = kb.selp(Ty::F32, v, best, gt);
                kb.mov_to(best, nb);
                let ni = kb.selp(Ty::U32, j, bi, gt);
                kb.mov_to(bi, ni);
            });
            let sa = kb.index(srow, bi, 4);
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, sa, 0, PICKED));
        });
    }
    // How many times expert j was chosen.
    let count = |kb: &mut Kb, j: Reg| {
        let sv = ld_f(kb, srow, j);
        if hash {
            sv
        } else {
            let picked = kb.setp(Cmp::Eq, sv, PICKED);
            kb.selp(Ty::F32, 1.0f32, 0.0f32, picked)
        }
    };
    // Weights of the chosen: s / (Σ s + 1e-20) · scale (once per choice).
    let total = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, e, 1u32, |kb, j| {
        let c = count(kb, j);
        let s = ld_f(kb, yrow, j);
        kb.fma_to(total, c, s);
    });
    let total = kb.add(Ty::F32, total, 1e-20f32);
    kb.for_range(0u32, e, 1u32, |kb, j| {
        let c = count(kb, j);
        let ya = kb.index(yrow, j, 4);
        let s = kb.ld(Mem::F32, ya, 0);
        let w = kb.bin(BinOp::Div, Ty::F32, s, total);
        let w = kb.mul(Ty::F32, w, scale);
        let w = kb.mul(Ty::F32, w, c);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, ya, 0, w));
    });
    kb.finish()
}

/// The experts' row lists from dense routing weights `w [T, E]`, one block: `seg[2e]` the
/// first gathered row of expert e, `seg[2e+1]` its row count, `seg[2E]` the total;
/// `idx[r]` the token of gathered row r; `at[t·E + e]` the gathered row of (t, e).
/// Arguments `w, seg, idx, at, t, e`; grid 1.
pub fn moe_plan() -> Kernel {
    let mut kb = Kb::new("moe_plan", &[p("w"), p("seg"), p("idx"), p("at"), u("t"), u("e")], BLOCK);
    let (w, seg, idx, at, t, e) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5));
    let tid = kb.tid();
    let last_e = kb.sub(Ty::U32, e, 1u32);
    kb.for_range(0u32, e, BLOCK, |kb, e0| {
        let ex = kb.add(Ty::U32, e0, tid);
        let ok = kb.setp(Cmp::Lt, ex, e);
        let ec = kb.bin(BinOp::Min, Ty::U32, ex, last_e);
        let cnt = kb.imm(Ty::U32, 0u32);
        kb.for_range(0u32, t, 1u32, |kb, r| {
            let wi = kb.mad(Ty::U32, r, e, ec);
            let v = ld_f(kb, w, wi);
            let nz = kb.setp(Cmp::Ne, v, 0.0f32);
            let c1 = kb.add(Ty::U32, cnt, 1u32);
            let nc = kb.selp(Ty::U32, c1, cnt, nz);
            kb.mov_to(cnt, nc);
        });
        let si = kb.mad(Ty::U32, ec, 2u32, 1u32);
        let sa = kb.index(seg, si, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::U32, sa, 0, cnt));
    });
    kb.bar();
    let first = kb.setp(Cmp::Eq, tid, 0u32);
    let run = kb.imm(Ty::U32, 0u32);
    kb.for_range(0u32, e, 1u32, |kb, ex| {
        let ci = kb.mad(Ty::U32, ex, 2u32, 1u32);
        let c = ld_u(kb, seg, ci);
        let oi = kb.mul(Ty::U32, ex, 2u32);
        let oa = kb.index(seg, oi, 4);
        kb.guarded(first, false, |kb| kb.st(Mem::U32, oa, 0, run));
        kb.bin_to(BinOp::Add, run, run, c);
    });
    let e2 = kb.mul(Ty::U32, e, 2u32);
    let ta = kb.index(seg, e2, 4);
    kb.guarded(first, false, |kb| kb.st(Mem::U32, ta, 0, run));
    kb.bar();
    kb.for_range(0u32, e, BLOCK, |kb, e0| {
        let ex = kb.add(Ty::U32, e0, tid);
        let ok = kb.setp(Cmp::Lt, ex, e);
        let ec = kb.bin(BinOp::Min, Ty::U32, ex, last_e);
        let oi = kb.mul(Ty::U32, ec, 2u32);
        let slot = ld_u(kb, seg, oi);
        kb.for_range(0u32, t, 1u32, |kb, r| {
            let wi = kb.mad(Ty::U32, r, e, ec);
            let v = ld_f(kb, w, wi);
            let nz = kb.setp(Cmp::Ne, v, 0.0f32);
            let nz = kb.bin(BinOp::And, Ty::Pred, nz, ok);
            let ia = kb.index(idx, slot, 4);
            let aa = kb.index(at, wi, 4);
            kb.guarded(nz, false, |kb| {
                kb.st(Mem::U32, ia, 0, r);
                kb.st(Mem::U32, aa, 0, slot);
            });
            let s1 = kb.add(Ty::U32, slot, 1u32);
            let ns = kb.selp(Ty::U32, s1, slot, nz);
            kb.mov_to(slot, ns);
        });
    });
    kb.finish()
}

/// Gathers the experts' rows: `xs[r] = x[idx[r]]` for `r < seg[2E]`. Arguments
/// `x, idx, seg, xs, n (= cap·d), d, e`.
pub fn moe_gather() -> Kernel {
    let mut kb = Kb::new("moe_gather", &[p("x"), p("idx"), p("seg"), p("xs"), u("n"), u("d"), u("e")], BLOCK);
    let (x, idx, seg, xs, n, d, e) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (i, ok) = elem(&mut kb, n);
    let e2 = kb.mul(Ty::U32, e, 2u32);
    let total = ld_u(&mut kb, seg, e2);
    let r = kb.bin(BinOp::Div, Ty::U32, i, d);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, d);
    let live = kb.setp(Cmp::Lt, r, total);
    let ok = kb.bin(BinOp::And, Ty::Pred, ok, live);
    let src = ld_u(&mut kb, idx, r);
    let si = kb.mad(Ty::U32, src, d, c);
    let sa = kb.index(x, si, 4);
    let da = kb.index(xs, i, 4);
    kb.guarded(ok, false, |kb| {
        let v = kb.ld(Mem::F32, sa, 0);
        kb.st(Mem::F32, da, 0, v);
    });
    kb.finish()
}

/// DeepSeek-V4's clamped SwiGLU: `h = silu(min(g, L)) · clamp(u, −L, L)` (`L = +∞`: no
/// clamp). Arguments `g, u, h, n, limit`.
pub fn moe_swiglu() -> Kernel {
    let mut kb = Kb::new("moe_swiglu", &[p("g"), p("u"), p("h"), u("n"), f("limit")], BLOCK);
    let (g, up, h, n, l) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let (i, ok) = elem(&mut kb, n);
    let gv = ld_f(&mut kb, g, i);
    let uv = ld_f(&mut kb, up, i);
    let gv = kb.bin(BinOp::Min, Ty::F32, gv, l);
    let nl = kb.un(UnOp::Neg, Ty::F32, l);
    let uv = kb.bin(BinOp::Max, Ty::F32, uv, nl);
    let uv = kb.bin(BinOp::Min, Ty::F32, uv, l);
    let s = sigmoid(&mut kb, gv);
    let a = kb.mul(Ty::F32, gv, s);
    let r = kb.mul(Ty::F32, a, uv);
    st_f(&mut kb, h, i, r, ok);
    kb.finish()
}

/// `out[t] = Σ_{e: w[t,e] ≠ 0} w[t,e]·ys[at[t,e]]` in expert order, plus `sh[t]` when
/// `shared` ≠ 0. Arguments `w, at, ys, sh, out, n (= T·d), d, e, cap, shared`.
pub fn moe_combine() -> Kernel {
    let mut kb = Kb::new(
        "moe_combine",
        &[p("w"), p("at"), p("ys"), p("sh"), p("out"), u("n"), u("d"), u("e"), u("cap"), u("shared")],
        BLOCK,
    );
    let (w, at, ys, sh, out) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let (n, d, e, cap, shared) = (kb.param(5), kb.param(6), kb.param(7), kb.param(8), kb.param(9));
    let (i, ok) = elem(&mut kb, n);
    let t = kb.bin(BinOp::Div, Ty::U32, i, d);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, d);
    let wrow = kb.mul(Ty::U32, t, e);
    let last = kb.sub(Ty::U32, cap, 1u32);
    let acc = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, e, 1u32, |kb, ex| {
        let wi = kb.add(Ty::U32, wrow, ex);
        let wv = ld_f(kb, w, wi);
        let nz = kb.setp(Cmp::Ne, wv, 0.0f32);
        let r = ld_u(kb, at, wi);
        let r = kb.bin(BinOp::Min, Ty::U32, r, last);
        let yi = kb.mad(Ty::U32, r, d, c);
        let yv = ld_f(kb, ys, yi);
        let m = kb.mul(Ty::F32, wv, yv);
        let s = kb.add(Ty::F32, acc, m);
        let na = kb.selp(Ty::F32, s, acc, nz);
        kb.mov_to(acc, na);
    });
    let has = kb.setp(Cmp::Ne, shared, 0u32);
    let sha = kb.index(sh, i, 4);
    kb.guarded(has, false, |kb| {
        let v = kb.ld(Mem::F32, sha, 0);
        kb.bin_to(BinOp::Add, acc, acc, v);
    });
    st_f(&mut kb, out, i, acc, ok);
    kb.finish()
}

/// Copies a block of columns: `dst[t·ds + doff + c] = src[t·ss + soff + c]` for `c < w`.
/// Arguments `src, dst, n (= T·w), w, ss, soff, ds, doff`.
pub fn copy_cols() -> Kernel {
    let mut kb =
        Kb::new("ds4_copy_cols", &[p("src"), p("dst"), u("n"), u("w"), u("ss"), u("soff"), u("ds"), u("doff")], BLOCK);
    let (src, dst, n, w) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let (ss, soff, ds, doff) = (kb.param(4), kb.param(5), kb.param(6), kb.param(7));
    let (i, ok) = elem(&mut kb, n);
    let t = kb.bin(BinOp::Div, Ty::U32, i, w);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, w);
    let si = kb.mad(Ty::U32, t, ss, soff);
    let si = kb.add(Ty::U32, si, c);
    let di = kb.mad(Ty::U32, t, ds, doff);
    let di = kb.add(Ty::U32, di, c);
    let v = ld_f(&mut kb, src, si);
    st_f(&mut kb, dst, di, v, ok);
    kb.finish()
}

/// `(cos, sin)` of pair `q` at position `pos` from a table of `rd/2` pairs per position.
fn cos_sin(kb: &mut Kb, table: Reg, pos: Reg, half: Reg, q: Reg) -> (Reg, Reg) {
    let ti = kb.mad(Ty::U32, pos, half, q);
    let a = kb.index(table, ti, 8);
    (kb.ld(Mem::F32, a, 0), kb.ld(Mem::F32, a, 4))
}

/// Interleaved-pair RoPE of the last `rd` channels of each `head`-wide head, at position
/// `step + t`: `dst` row `(step + t) mod ring` (or `t` when `ring` is 0). Arguments
/// `src, dst, table, step, n (= T·width), width, head, rd, ring`.
pub fn ca_rope() -> Kernel {
    let mut kb = Kb::new(
        "ca_rope",
        &[p("src"), p("dst"), p("table"), p("step"), u("n"), u("width"), u("head"), u("rd"), u("ring")],
        BLOCK,
    );
    let (src, dst, table, step) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let (n, width, head, rd, ring) = (kb.param(4), kb.param(5), kb.param(6), kb.param(7), kb.param(8));
    let (i, ok) = elem(&mut kb, n);
    let pos0 = step_pos(&mut kb, step);
    let t = kb.bin(BinOp::Div, Ty::U32, i, width);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, width);
    let pos = kb.add(Ty::U32, pos0, t);
    let cc = kb.bin(BinOp::Rem, Ty::U32, c, head);
    let lead = kb.sub(Ty::U32, head, rd);
    let rot = kb.setp(Cmp::Ge, cc, lead);
    let r = kb.sub(Ty::U32, cc, lead);
    let r = kb.selp(Ty::U32, r, 0u32, rot);
    let odd = kb.and(Ty::U32, r, 1u32);
    let q = kb.shr(Ty::U32, r, 1u32);
    let half = kb.shr(Ty::U32, rd, 1u32);
    let (cs, sn) = cos_sin(&mut kb, table, pos, half, q);
    // The pair (a, b) holding this channel.
    let ia = kb.sub(Ty::U32, i, odd);
    let a = ld_f(&mut kb, src, ia);
    let ib = kb.add(Ty::U32, ia, 1u32);
    let ib = kb.selp(Ty::U32, ib, ia, rot);
    let b = ld_f(&mut kb, src, ib);
    // even: a·c − b·s ; odd: b·c + a·s
    let ac = kb.mul(Ty::F32, a, cs);
    let bs = kb.mul(Ty::F32, b, sn);
    let ev = kb.sub(Ty::F32, ac, bs);
    let bc = kb.mul(Ty::F32, b, cs);
    let as_ = kb.mul(Ty::F32, a, sn);
    let ov = kb.add(Ty::F32, bc, as_);
    let is_odd = kb.setp(Cmp::Ne, odd, 0u32);
    let rv = kb.selp(Ty::F32, ov, ev, is_odd);
    let own = ld_f(&mut kb, src, i);
    let v = kb.selp(Ty::F32, rv, own, rot);
    let has_ring = kb.setp(Cmp::Ne, ring, 0u32);
    let ring1 = kb.bin(BinOp::Max, Ty::U32, ring, 1u32);
    let rr = kb.bin(BinOp::Rem, Ty::U32, pos, ring1);
    let row = kb.selp(Ty::U32, rr, t, has_ring);
    let di = kb.mad(Ty::U32, row, width, c);
    st_f(&mut kb, dst, di, v, ok);
    kb.finish()
}

/// Stores this call's rows into a ring by position: `ring[(step + t) mod rows] = src[t]`.
/// Arguments `src, ring, step, n (= T·width), width, rows`.
pub fn ca_store() -> Kernel {
    let mut kb = Kb::new("ca_store", &[p("src"), p("ring"), p("step"), u("n"), u("width"), u("rows")], BLOCK);
    let (src, ring, step, n, width, rows) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5));
    let (i, ok) = elem(&mut kb, n);
    let pos0 = step_pos(&mut kb, step);
    let t = kb.bin(BinOp::Div, Ty::U32, i, width);
    let c = kb.bin(BinOp::Rem, Ty::U32, i, width);
    let pos = kb.add(Ty::U32, pos0, t);
    let r = kb.bin(BinOp::Rem, Ty::U32, pos, rows);
    let di = kb.mad(Ty::U32, r, width, c);
    let v = ld_f(&mut kb, src, i);
    st_f(&mut kb, ring, di, v, ok);
    kb.finish()
}

/// Channels per thread of a [`BLOCK`]-thread kernel over `MAX_CA_DIM` channels.
const CH: u32 = (MAX_CA_DIM as u32).div_ceil(BLOCK);

/// Closes the compressor windows that end in this call, one block per window: per channel
/// a softmax over the window's slots (the previous window's first half too when `width =
/// 2·dim`) of `gate + ape`, the weighted sum of `kv`, then RMSNorm with `norm` and RoPE at
/// the window's first position; row w of `entries`. Arguments `kv, gate (rings of `rows`
/// positions, `width` wide), ape, norm, entries, table, step, t, ratio, dim, width, rows,
/// eps, rd`; grid `t / ratio + 1`.
pub fn ca_compress() -> Kernel {
    let mut kb = Kb::new(
        "ca_compress",
        &[
            p("kv"),
            p("gate"),
            p("ape"),
            p("norm"),
            p("entries"),
            p("table"),
            p("step"),
            u("t"),
            u("ratio"),
            u("dim"),
            u("width"),
            u("rows"),
            f("eps"),
            u("rd"),
        ],
        BLOCK,
    );
    let (kv, gate, ape, norm, entries, table, step) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (t, ratio, dim, width, rows, eps, rd) =
        (kb.param(7), kb.param(8), kb.param(9), kb.param(10), kb.param(11), kb.param(12), kb.param(13));
    let red = kb.shared(16);
    let row_off = kb.shared(4 * MAX_CA_DIM as u32);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let pos = step_pos(&mut kb, step);
    let cta = kb.special(Special::CtaidX);
    let w0 = kb.bin(BinOp::Div, Ty::U32, pos, ratio);
    let w = kb.add(Ty::U32, w0, cta);
    let w1 = kb.add(Ty::U32, w, 1u32);
    let end = kb.mul(Ty::U32, w1, ratio);
    let stop = kb.add(Ty::U32, pos, t);
    // Window w closes in this call iff its end (exclusive) ≤ pos + t.
    let exit = kb.label();
    let not_here = kb.setp(Cmp::Gt, end, stop);
    kb.bra(exit, Some((not_here, false)));
    let two = kb.mul(Ty::U32, dim, 2u32);
    let overlap = kb.setp(Cmp::Eq, width, two);
    let w_pos = kb.setp(Cmp::Gt, w, 0u32);
    let has_prev = kb.bin(BinOp::And, Ty::Pred, overlap, w_pos);
    let own = kb.selp(Ty::U32, dim, 0u32, overlap);
    let start = kb.mul(Ty::U32, w, ratio);
    let pstart = kb.sub(Ty::U32, start, ratio);
    let last_c = kb.sub(Ty::U32, dim, 1u32);
    let ss = kb.imm(Ty::F32, 0.0f32);
    let mut pooled = Vec::new();
    for ci in 0..CH {
        let c = kb.add(Ty::U32, tid, ci * BLOCK);
        let c_ok = kb.setp(Cmp::Lt, c, dim);
        let cc = kb.bin(BinOp::Min, Ty::U32, c, last_c);
        let oc = kb.add(Ty::U32, own, cc);
        // The slot j of the previous window (column cc) and of this window (column oc).
        let slot = |kb: &mut Kb, j: Reg, prev: bool| -> (Reg, Reg) {
            let base = if prev { pstart } else { start };
            let col = if prev { cc } else { oc };
            let pj = kb.add(Ty::U32, base, j);
            let r = kb.bin(BinOp::Rem, Ty::U32, pj, rows);
            let ri = kb.mad(Ty::U32, r, width, col);
            let g = ld_f(kb, gate, ri);
            let ai = kb.mad(Ty::U32, j, width, col);
            let a = ld_f(kb, ape, ai);
            let g = kb.add(Ty::F32, g, a);
            let v = ld_f(kb, kv, ri);
            (g, v)
        };
        let mx = kb.imm(Ty::F32, f32::NEG_INFINITY);
        kb.for_range(0u32, ratio, 1u32, |kb, j| {
            let (gp, _) = slot(kb, j, true);
            let gp = kb.selp(Ty::F32, gp, f32::NEG_INFINITY, has_prev);
            kb.bin_to(BinOp::Max, mx, mx, gp);
            let (g, _) = slot(kb, j, false);
            kb.bin_to(BinOp::Max, mx, mx, g);
        });
        let sum = kb.imm(Ty::F32, 0.0f32);
        let acc = kb.imm(Ty::F32, 0.0f32);
        kb.for_range(0u32, ratio, 1u32, |kb, j| {
            for prev in [true, false] {
                let (g, v) = slot(kb, j, prev);
                let d = kb.sub(Ty::F32, g, mx);
                let e = kb.exp(d);
                let e = if prev { kb.selp(Ty::F32, e, 0.0f32, has_prev) } else { e };
                kb.bin_to(BinOp::Add, sum, sum, e);
                kb.fma_to(acc, e, v);
            }
        });
        let v = kb.bin(BinOp::Div, Ty::F32, acc, sum);
        let v = kb.selp(Ty::F32, v, 0.0f32, c_ok);
        kb.fma_to(ss, v, v);
        pooled.push((c, cc, c_ok, v));
    }
    let total = crate::kernels::block_sum(&mut kb, ss, smem, red);
    let dimf = kb.cvt(Ty::F32, dim);
    let mean = kb.bin(BinOp::Div, Ty::F32, total, dimf);
    let me = kb.add(Ty::F32, mean, eps);
    let sq = kb.un(UnOp::Sqrt, Ty::F32, me);
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, sq);
    let mut normed = Vec::new();
    for &(c, cc, c_ok, v) in &pooled {
        let nw = ld_f(&mut kb, norm, cc);
        let r = kb.mul(Ty::F32, v, inv);
        let r = kb.mul(Ty::F32, r, nw);
        let sa = kb.mad(Ty::U32, cc, 4u32, smem);
        kb.guarded(c_ok, false, |kb| kb.st_shared(sa, row_off as i32, r));
        normed.push((c, cc, c_ok, r));
    }
    kb.bar();
    let lead = kb.sub(Ty::U32, dim, rd);
    let half = kb.shr(Ty::U32, rd, 1u32);
    for &(_, cc, c_ok, r) in &normed {
        let rot = kb.setp(Cmp::Ge, cc, lead);
        let k = kb.sub(Ty::U32, cc, lead);
        let k = kb.selp(Ty::U32, k, 0u32, rot);
        let odd = kb.and(Ty::U32, k, 1u32);
        let q = kb.shr(Ty::U32, k, 1u32);
        let (cs, sn) = cos_sin(&mut kb, table, start, half, q);
        let partner = kb.bin(BinOp::Xor, Ty::U32, cc, 1u32);
        let partner = kb.selp(Ty::U32, partner, cc, rot);
        let pa = kb.mad(Ty::U32, partner, 4u32, smem);
        let other = kb.ld_shared(pa, row_off as i32);
        // even (a = r, b = other): a·c − b·s ; odd (b = r, a = other): b·c + a·s
        let is_odd = kb.setp(Cmp::Ne, odd, 0u32);
        let rc = kb.mul(Ty::F32, r, cs);
        let os = kb.mul(Ty::F32, other, sn);
        let nos = kb.un(UnOp::Neg, Ty::F32, os);
        let sgn = kb.selp(Ty::F32, os, nos, is_odd);
        let rv = kb.add(Ty::F32, rc, sgn);
        let v = kb.selp(Ty::F32, rv, r, rot);
        let ei = kb.mad(Ty::U32, w, dim, cc);
        st_f(&mut kb, entries, ei, v, c_ok);
    }
    kb.place(exit);
    kb.finish()
}

/// The Lightning Indexer's scores of the visible compressed rows, one thread per (query,
/// row): `Σ_h (iw[h]·wscale)·(max(q_h·k_w, 0)·dscale)` with `q` already rotated. Arguments
/// `q ([T, heads·dim]), iw ([T, heads]), keys ([cap, dim]), scores ([T, cap]), step, heads,
/// dim, ratio, cap, wscale, dscale`; grid `[ceil(cap / 128), T]`.
pub fn ca_index_scores() -> Kernel {
    let mut kb = Kb::new(
        "ca_index_scores",
        &[
            p("q"),
            p("iw"),
            p("keys"),
            p("scores"),
            p("step"),
            u("heads"),
            u("dim"),
            u("ratio"),
            u("cap"),
            f("wscale"),
            f("dscale"),
        ],
        BLOCK,
    );
    let (q, iw, keys, scores, step) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let (heads, dim, ratio, cap, wscale, dscale) =
        (kb.param(5), kb.param(6), kb.param(7), kb.param(8), kb.param(9), kb.param(10));
    let pos0 = step_pos(&mut kb, step);
    let tq = kb.special(Special::CtaidY);
    let cta = kb.special(Special::CtaidX);
    let tid = kb.tid();
    let p1 = kb.add(Ty::U32, pos0, tq);
    let p1 = kb.add(Ty::U32, p1, 1u32);
    let visible = kb.bin(BinOp::Div, Ty::U32, p1, ratio);
    let visible = kb.bin(BinOp::Min, Ty::U32, visible, cap);
    let first = kb.mul(Ty::U32, cta, BLOCK);
    let exit = kb.label();
    let none = kb.setp(Cmp::Ge, first, visible);
    kb.bra(exit, Some((none, false)));
    let w = kb.add(Ty::U32, first, tid);
    let ok = kb.setp(Cmp::Lt, w, visible);
    let last = kb.sub(Ty::U32, visible, 1u32);
    let wc = kb.bin(BinOp::Min, Ty::U32, w, last);
    let kbase = kb.mul(Ty::U32, wc, dim);
    let hd = kb.mul(Ty::U32, heads, dim);
    let qbase = kb.mul(Ty::U32, tq, hd);
    let wbase = kb.mul(Ty::U32, tq, heads);
    let s = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, heads, 1u32, |kb, h| {
        let d = kb.imm(Ty::F32, 0.0f32);
        let qh = kb.mad(Ty::U32, h, dim, qbase);
        kb.for_range(0u32, dim, 1u32, |kb, c| {
            let qi = kb.add(Ty::U32, qh, c);
            let qv = ld_f(kb, q, qi);
            let ki = kb.add(Ty::U32, kbase, c);
            let kv = ld_f(kb, keys, ki);
            kb.fma_to(d, qv, kv);
        });
        let d = kb.bin(BinOp::Max, Ty::F32, d, 0.0f32);
        let d = kb.mul(Ty::F32, d, dscale);
        let wi = kb.add(Ty::U32, wbase, h);
        let wv = ld_f(kb, iw, wi);
        let wv = kb.mul(Ty::F32, wv, wscale);
        kb.fma_to(s, wv, d);
    });
    let si = kb.mad(Ty::U32, tq, cap, wc);
    st_f(&mut kb, scores, si, s, ok);
    kb.place(exit);
    kb.finish()
}

/// The indexer's top-k per query, one block per query: `k` rounds of a block argmax over
/// the visible rows' scores (ties to the earlier row), each winner's score then knocked
/// out; every visible row when there are at most `k`. `sel[t, j]` (u32) for `j < min(k,
/// visible)`. Arguments `scores ([T, cap]), sel ([T, k]), step, ratio, cap, k`; grid `T`.
pub fn ca_index_topk() -> Kernel {
    let mut kb = Kb::new("ca_index_topk", &[p("scores"), p("sel"), p("step"), u("ratio"), u("cap"), u("k")], BLOCK);
    let (scores, sel, step, ratio, cap, k) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5));
    let red_v = kb.shared(16);
    let red_i = kb.shared(16);
    let smem = kb.shared_base();
    let pos0 = step_pos(&mut kb, step);
    let tq = kb.special(Special::CtaidX);
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31u32);
    let warp = kb.shr(Ty::U32, tid, 5u32);
    let p1 = kb.add(Ty::U32, pos0, tq);
    let p1 = kb.add(Ty::U32, p1, 1u32);
    let visible = kb.bin(BinOp::Div, Ty::U32, p1, ratio);
    let visible = kb.bin(BinOp::Min, Ty::U32, visible, cap);
    let srow_i = kb.mul(Ty::U32, tq, cap);
    let srow = kb.index(scores, srow_i, 4);
    let sel_i = kb.mul(Ty::U32, tq, k);
    let selrow = kb.index(sel, sel_i, 4);
    let (all, exit) = (kb.label(), kb.label());
    let few = kb.setp(Cmp::Le, visible, k);
    kb.bra(all, Some((few, false)));
    kb.for_range(0u32, k, 1u32, |kb, j| {
        let bv = kb.imm(Ty::F32, f32::NEG_INFINITY);
        let bi = kb.imm(Ty::U32, u32::MAX);
        kb.for_range(0u32, visible, BLOCK, |kb, w0| {
            let w = kb.add(Ty::U32, w0, tid);
            let ok = kb.setp(Cmp::Lt, w, visible);
            let a = kb.index(srow, w, 4);
            let v = kb.imm(Ty::F32, f32::NEG_INFINITY);
            kb.guarded(ok, false, |kb| {
                let l = kb.ld(Mem::F32, a, 0);
                kb.mov_to(v, l);
            });
            // Rows are scanned in increasing order: a strictly larger score wins.
            let gt = kb.setp(Cmp::Gt, v, bv);
            let gt = kb.bin(BinOp::And, Ty::Pred, gt, ok);
            let none = kb.setp(Cmp::Eq, bi, u32::MAX);
            let first = kb.bin(BinOp::And, Ty::Pred, none, ok);
            let take = kb.bin(BinOp::Or, Ty::Pred, gt, first);
            let nv = kb.selp(Ty::F32, v, bv, take);
            kb.mov_to(bv, nv);
            let ni = kb.selp(Ty::U32, w, bi, take);
            kb.mov_to(bi, ni);
        });
        // Warp then block reduction of (score, row): larger score, then smaller row.
        let better = |kb: &mut Kb, v: Reg, i: Reg, ov: Reg, oi: Reg| {
            let gt = kb.setp(Cmp::Gt, ov, v);
            let eq = kb.setp(Cmp::Eq, ov, v);
            let lo = kb.setp(Cmp::Lt, oi, i);
            let tie = kb.bin(BinOp::And, Ty::Pred, eq, lo);
            // A missing candidate (u32::MAX) never wins; any real one beats it.
            let real = kb.setp(Cmp::Ne, oi, u32::MAX);
            let mine_missing = kb.setp(Cmp::Eq, i, u32::MAX);
            let wins = kb.bin(BinOp::Or, Ty::Pred, gt, tie);
            let wins = kb.bin(BinOp::Or, Ty::Pred, wins, mine_missing);
            let take = kb.bin(BinOp::And, Ty::Pred, wins, real);
            let nv = kb.selp(Ty::F32, ov, v, take);
            let ni = kb.selp(Ty::U32, oi, i, take);
            (nv, ni)
        };
        let (mut v, mut i) = (bv, bi);
        for sh in [16u32, 8, 4, 2, 1] {
            let ov = kb.shfl(Shfl::Bfly, v, sh);
            let oi = kb.shfl(Shfl::Bfly, i, sh);
            (v, i) = better(kb, v, i, ov, oi);
        }
        let first_lane = kb.setp(Cmp::Eq, lane, 0u32);
        let slot = kb.mad(Ty::U32, warp, 4u32, smem);
        kb.guarded(first_lane, false, |kb| {
            kb.st_shared(slot, red_v as i32, v);
            kb.st_shared_u32(slot, red_i as i32, i);
        });
        kb.bar();
        let mut v = kb.ld_shared(smem, red_v as i32);
        let mut i = kb.ld_shared_u32(smem, red_i as i32);
        for wi in 1..BLOCK / 32 {
            let ov = kb.ld_shared(smem, (red_v + 4 * wi) as i32);
            let oi = kb.ld_shared_u32(smem, (red_i + 4 * wi) as i32);
            (v, i) = better(kb, v, i, ov, oi);
        }
        kb.bar();
        let t0 = kb.setp(Cmp::Eq, tid, 0u32);
        let sa = kb.index(selrow, j, 4);
        let last_v = kb.sub(Ty::U32, visible, 1u32);
        let ic = kb.bin(BinOp::Min, Ty::U32, i, last_v);
        let ka = kb.index(srow, ic, 4);
        kb.guarded(t0, false, |kb| {
            kb.st(Mem::U32, sa, 0, i);
            kb.st(Mem::F32, ka, 0, f32::NEG_INFINITY);
        });
        // The knocked-out score must be seen by every thread in the next round.
        kb.bar();
    });
    kb.bra(exit, None);
    kb.place(all);
    kb.for_range(0u32, visible, BLOCK, |kb, w0| {
        let w = kb.add(Ty::U32, w0, tid);
        let ok = kb.setp(Cmp::Lt, w, visible);
        let sa = kb.index(selrow, w, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::U32, sa, 0, w));
    });
    kb.place(exit);
    kb.finish()
}

pub fn ca_attend_name(head_dim: u32) -> String {
    format!("ca_attend_{head_dim}")
}

/// The fused compressed attention, one block per (head, query): a warp per key in turn
/// over the raw window (ring of `ring` rows) and the compressed rows (`sel`'s first
/// `min(k, visible)` when `k` > 0, else every visible one), an online softmax per warp,
/// merged with the sink logit; the query is rotated on load and the output de-rotated.
/// Arguments `q, raw, comp, sel, sink, table, y, step, heads, scale, window, ring, ratio,
/// k, cap, rd`; grid `[heads, T]`.
pub fn ca_attend(head_dim: u32) -> Kernel {
    assert!(head_dim.is_multiple_of(32) && head_dim <= MAX_CA_DIM as u32);
    let per_lane = (head_dim / 32) as usize;
    let mut kb = Kb::new(
        ca_attend_name(head_dim),
        &[
            p("q"),
            p("raw"),
            p("comp"),
            p("sel"),
            p("sink"),
            p("table"),
            p("y"),
            p("step"),
            u("heads"),
            f("scale"),
            u("window"),
            u("ring"),
            u("ratio"),
            u("k"),
            u("cap"),
            u("rd"),
        ],
        BLOCK,
    );
    let (q, raw, comp, sel, sink, table, y, step) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6), kb.param(7));
    let (heads, scale, window, ring, ratio, k, cap, rd) =
        (kb.param(8), kb.param(9), kb.param(10), kb.param(11), kb.param(12), kb.param(13), kb.param(14), kb.param(15));
    let warps = BLOCK / 32;
    let stats = kb.shared(8 * warps);
    let accs = kb.shared(4 * warps * head_dim);
    let outs = kb.shared(4 * head_dim);
    let smem = kb.shared_base();
    let h = kb.special(Special::CtaidX);
    let tq = kb.special(Special::CtaidY);
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31u32);
    let warp = kb.shr(Ty::U32, tid, 5u32);
    let pos0 = step_pos(&mut kb, step);
    let p = kb.add(Ty::U32, pos0, tq);
    let p1 = kb.add(Ty::U32, p, 1u32);
    // Raw keys: positions lo..=p.
    let has_lo = kb.setp(Cmp::Gt, p1, window);
    let lo = kb.sub(Ty::U32, p1, window);
    let lo = kb.selp(Ty::U32, lo, 0u32, has_lo);
    let nraw = kb.sub(Ty::U32, p1, lo);
    // Compressed keys.
    let r1 = kb.bin(BinOp::Max, Ty::U32, ratio, 1u32);
    let vis = kb.bin(BinOp::Div, Ty::U32, p1, r1);
    let vis = kb.bin(BinOp::Min, Ty::U32, vis, cap);
    let has_comp = kb.setp(Cmp::Ne, ratio, 0u32);
    let vis = kb.selp(Ty::U32, vis, 0u32, has_comp);
    let has_k = kb.setp(Cmp::Ne, k, 0u32);
    let kv_ = kb.bin(BinOp::Min, Ty::U32, vis, k);
    let ncomp = kb.selp(Ty::U32, kv_, vis, has_k);
    let nkeys = kb.add(Ty::U32, nraw, ncomp);
    let hd = head_dim;
    let lead = kb.sub(Ty::U32, hd, rd);
    let half = kb.shr(Ty::U32, rd, 1u32);
    // The query, rotated to p, in registers: lane holds channels lane + 32·i.
    let qrow = kb.mad(Ty::U32, tq, heads, h);
    let qrow = kb.mul(Ty::U32, qrow, hd);
    let rot_pair = |kb: &mut Kb, c: Reg, pos: Reg| -> (Reg, Reg, Reg, Reg) {
        let rot = kb.setp(Cmp::Ge, c, lead);
        let r = kb.sub(Ty::U32, c, lead);
        let r = kb.selp(Ty::U32, r, 0u32, rot);
        let odd = kb.and(Ty::U32, r, 1u32);
        let is_odd = kb.setp(Cmp::Ne, odd, 0u32);
        let qq = kb.shr(Ty::U32, r, 1u32);
        let (cs, sn) = cos_sin(kb, table, pos, half, qq);
        (rot, is_odd, cs, sn)
    };
    let mut qv = Vec::with_capacity(per_lane);
    for i in 0..per_lane {
        let c = kb.add(Ty::U32, lane, 32 * i as u32);
        let qi = kb.add(Ty::U32, qrow, c);
        let mine = ld_f(&mut kb, q, qi);
        let other = kb.shfl(Shfl::Bfly, mine, 1u32);
        let (rot, is_odd, cs, sn) = rot_pair(&mut kb, c, p);
        // even: mine·c − other·s ; odd: mine·c + other·s
        let mc = kb.mul(Ty::F32, mine, cs);
        let os = kb.mul(Ty::F32, other, sn);
        let nos = kb.un(UnOp::Neg, Ty::F32, os);
        let sgn = kb.selp(Ty::F32, os, nos, is_odd);
        let r = kb.add(Ty::F32, mc, sgn);
        qv.push(kb.selp(Ty::F32, r, mine, rot));
    }
    let m = kb.imm(Ty::F32, NEG_BIG);
    let l = kb.imm(Ty::F32, 0.0f32);
    let acc: Vec<Reg> = (0..per_lane).map(|_| kb.imm(Ty::F32, 0.0f32)).collect();
    let ring1 = kb.bin(BinOp::Max, Ty::U32, ring, 1u32);
    let k1 = kb.bin(BinOp::Max, Ty::U32, k, 1u32);
    let last_k = kb.sub(Ty::U32, k1, 1u32);
    let last_cap = kb.sub(Ty::U32, cap, 1u32);
    let selrow = kb.mul(Ty::U32, tq, k1);
    kb.for_range(0u32, nkeys, warps, |kb, j0| {
        let j = kb.add(Ty::U32, j0, warp);
        let valid = kb.setp(Cmp::Lt, j, nkeys);
        let is_raw = kb.setp(Cmp::Lt, j, nraw);
        let rp = kb.add(Ty::U32, lo, j);
        let rr = kb.bin(BinOp::Rem, Ty::U32, rp, ring1);
        let rrow = kb.mul(Ty::U32, rr, hd);
        let rbase = kb.index(raw, rrow, 4);
        let ci = kb.sub(Ty::U32, j, nraw);
        let ci = kb.selp(Ty::U32, 0u32, ci, is_raw);
        let si = kb.bin(BinOp::Min, Ty::U32, ci, last_k);
        let si = kb.add(Ty::U32, selrow, si);
        let chosen = ld_u(kb, sel, si);
        let crow = kb.selp(Ty::U32, chosen, ci, has_k);
        let crow = kb.bin(BinOp::Min, Ty::U32, crow, last_cap);
        let crow = kb.mul(Ty::U32, crow, hd);
        let cbase = kb.index(comp, crow, 4);
        let base = kb.selp(Ty::U64, rbase, cbase, is_raw);
        let kvals: Vec<Reg> = (0..per_lane)
            .map(|i| {
                let c = kb.add(Ty::U32, lane, 32 * i as u32);
                ld_f(kb, base, c)
            })
            .collect();
        let d = kb.imm(Ty::F32, 0.0f32);
        for (&qq, &kk) in qv.iter().zip(&kvals) {
            kb.fma_to(d, qq, kk);
        }
        let d = kb.warp_sum(d);
        let logit = kb.mul(Ty::F32, d, scale);
        let mx = kb.bin(BinOp::Max, Ty::F32, m, logit);
        let mn = kb.selp(Ty::F32, mx, m, valid);
        let dm = kb.sub(Ty::F32, m, mn);
        let corr = kb.exp(dm);
        let dl = kb.sub(Ty::F32, logit, mn);
        let pe = kb.exp(dl);
        let pe = kb.selp(Ty::F32, pe, 0.0f32, valid);
        let lc = kb.mul(Ty::F32, l, corr);
        kb.bin_to(BinOp::Add, l, lc, pe);
        for (&a, &kk) in acc.iter().zip(&kvals) {
            let ac = kb.mul(Ty::F32, a, corr);
            kb.fma_to(ac, pe, kk);
            kb.mov_to(a, ac);
        }
        kb.mov_to(m, mn);
    });
    // Per-warp state to shared memory, then every thread merges channels.
    let first_lane = kb.setp(Cmp::Eq, lane, 0u32);
    let sa = kb.mad(Ty::U32, warp, 8u32, smem);
    kb.guarded(first_lane, false, |kb| {
        kb.st_shared(sa, stats as i32, m);
        kb.st_shared(sa, stats as i32 + 4, l);
    });
    let wrow = kb.mul(Ty::U32, warp, 4 * hd);
    for (i, &a) in acc.iter().enumerate() {
        let c = kb.add(Ty::U32, lane, 32 * i as u32);
        let ad = kb.mad(Ty::U32, c, 4u32, wrow);
        let ad = kb.add(Ty::U32, ad, smem);
        kb.st_shared(ad, accs as i32, a);
    }
    kb.bar();
    let sk = ld_f(&mut kb, sink, h);
    let mut big = sk;
    let ms: Vec<(Reg, Reg)> = (0..warps)
        .map(|w| {
            let mw = kb.ld_shared(smem, (stats + 8 * w) as i32);
            let lw = kb.ld_shared(smem, (stats + 8 * w + 4) as i32);
            (mw, lw)
        })
        .collect();
    for &(mw, _) in &ms {
        big = kb.bin(BinOp::Max, Ty::F32, big, mw);
    }
    let ds = kb.sub(Ty::F32, sk, big);
    let mut total = kb.exp(ds);
    let mut facs = Vec::new();
    for &(mw, lw) in &ms {
        let dd = kb.sub(Ty::F32, mw, big);
        let fw = kb.exp(dd);
        total = kb.fma(lw, fw, total);
        facs.push(fw);
    }
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, total);
    let per_thread = hd.div_ceil(BLOCK);
    let mut outv = Vec::new();
    for i in 0..per_thread {
        let c = kb.add(Ty::U32, tid, i * BLOCK);
        let c_ok = kb.setp(Cmp::Lt, c, hd);
        let cc = kb.bin(BinOp::Min, Ty::U32, c, hd - 1);
        let o = kb.imm(Ty::F32, 0.0f32);
        for (w, &fw) in facs.iter().enumerate() {
            let ad = kb.mad(Ty::U32, cc, 4u32, smem);
            let a = kb.ld_shared(ad, (accs + 4 * w as u32 * hd) as i32);
            kb.fma_to(o, a, fw);
        }
        let o = kb.mul(Ty::F32, o, inv);
        let oa = kb.mad(Ty::U32, cc, 4u32, smem);
        kb.guarded(c_ok, false, |kb| kb.st_shared(oa, outs as i32, o));
        outv.push((cc, c_ok, o));
    }
    kb.bar();
    // De-rotate at p: even (a = o, b = other): a·c + b·s ; odd (b = o, a = other): b·c − a·s.
    let yrow = kb.mad(Ty::U32, tq, heads, h);
    let yrow = kb.mul(Ty::U32, yrow, hd);
    for &(cc, c_ok, o) in &outv {
        let (rot, is_odd, cs, sn) = rot_pair(&mut kb, cc, p);
        let partner = kb.bin(BinOp::Xor, Ty::U32, cc, 1u32);
        let partner = kb.selp(Ty::U32, partner, cc, rot);
        let pa = kb.mad(Ty::U32, partner, 4u32, smem);
        let other = kb.ld_shared(pa, outs as i32);
        let oc = kb.mul(Ty::F32, o, cs);
        let os = kb.mul(Ty::F32, other, sn);
        let nos = kb.un(UnOp::Neg, Ty::F32, os);
        let sgn = kb.selp(Ty::F32, nos, os, is_odd);
        let r = kb.add(Ty::F32, oc, sgn);
        let v = kb.selp(Ty::F32, r, o, rot);
        let yi = kb.add(Ty::U32, yrow, cc);
        st_f(&mut kb, y, yi, v, c_ok);
    }
    kb.finish()
}

/// A DeepSeek-V4 kernel variant by what it computes (not a matmul: those are the matmul
/// kernels' own variants). The PTX and WGSL backends share the plan of which variants an op
/// launches ([`for_op`], [`variants`]) and each builds its own source for one ([`build`] here,
/// `kiln_wgpu::ds4::build` in WGSL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ds4Kernel {
    Repeat,
    HcCoeffs { streams: u64, pre_only: bool },
    HcPre,
    HcPost,
    MoeRoute { scoring: Scoring, hash: bool, bias: bool },
    MoePlan,
    MoeGather,
    MoeSwiglu,
    MoeCombine,
    CopyCols,
    CaRope,
    CaStore,
    CaCompress,
    CaIndexScores,
    CaIndexTopk,
    CaAttend(u32),
}

/// The DeepSeek-V4 kernels `op` of `module` launches besides matmuls (none for other ops).
pub fn for_op(module: &VerifiedModule, op: &Op) -> Vec<Ds4Kernel> {
    use Ds4Kernel as K;
    match op {
        Op::Repeat { .. } => vec![K::Repeat],
        Op::HcCoeffs { f, streams, .. } => {
            vec![K::HcCoeffs { streams: *streams, pre_only: module.value_type(*f).last_fixed() == Some(*streams) }]
        }
        Op::HcPre { .. } => vec![K::HcPre],
        Op::HcPost { .. } => vec![K::HcPost],
        Op::MoeRoute { ids, bias, table, attrs, .. } => {
            let hash = table.is_some() && ids.is_some();
            vec![K::MoeRoute { scoring: attrs.scoring, hash, bias: bias.is_some() && !hash }]
        }
        Op::Moe { .. } => vec![K::MoePlan, K::MoeGather, K::MoeSwiglu, K::MoeCombine],
        Op::GroupedMatMul { .. } => vec![K::CopyCols],
        Op::CompressedAttention { comp, indexer, attrs, .. } => {
            let mut ks = vec![K::CaRope];
            if attrs.ratio > 0 && (comp.is_some() || indexer.is_some()) {
                ks.extend([K::CaStore, K::CaCompress]);
            }
            if attrs.ratio > 0 && indexer.is_some() {
                ks.extend([K::CaIndexScores, K::CaIndexTopk]);
            }
            ks.push(K::CaAttend(attrs.head_dim as u32));
            ks
        }
        _ => vec![],
    }
}

/// Every DS4 kernel variant (the ptxas check; naga and MSL for the WGSL twins).
pub fn variants() -> Vec<Ds4Kernel> {
    use Ds4Kernel as K;
    let mut ks = vec![K::Repeat, K::HcPre, K::HcPost];
    for streams in [4, MAX_HC_STREAMS] {
        ks.push(K::HcCoeffs { streams, pre_only: false });
        ks.push(K::HcCoeffs { streams, pre_only: true });
    }
    for scoring in [Scoring::SqrtSoftplus, Scoring::Sigmoid, Scoring::Softmax] {
        for (hash, bias) in [(false, false), (false, true), (true, false)] {
            ks.push(K::MoeRoute { scoring, hash, bias });
        }
    }
    ks.extend([K::MoePlan, K::MoeGather, K::MoeSwiglu, K::MoeCombine, K::CopyCols]);
    ks.extend([K::CaRope, K::CaStore, K::CaCompress, K::CaIndexScores, K::CaIndexTopk]);
    ks.extend([64, 128, 512].map(K::CaAttend));
    ks
}

/// The PTX kernel of a variant.
pub fn build(k: Ds4Kernel) -> Kernel {
    use Ds4Kernel as K;
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

/// Every DS4 kernel variant (for the ptxas check).
pub fn all() -> Vec<Kernel> {
    variants().into_iter().map(build).collect()
}
