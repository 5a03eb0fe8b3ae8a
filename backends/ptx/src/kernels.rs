//! The kernels, each a function that builds one [`Kernel`]. Shapes are kernel
//! arguments; what changes the code (weight dtype, bias, activation, RoPE
//! layout) is in the kernel's name, so a module holds one kernel per variant
//! the model uses.
//!
//! Conventions: activations are f32 `[T, cols]` row-major; blocks are 128
//! threads (4 warps) unless noted; branches are uniform over a block and
//! per-thread bounds are predicates.

use kiln_ir::{Activation, DType, RopeLayout, SteerMode};

use crate::formats;
use crate::ptx::{BinOp, Cmp, Kb, Kernel, Mem, ParamTy, Reg, Special, Ty, UnOp};

/// Byte offset of the first position of a forward call in the `step` buffer
/// (a u32 the session writes before each launch sequence, so a captured
/// sequence replays at any position).
pub const STEP_POS: i32 = 0;

/// Threads per block of most kernels.
pub const BLOCK: u32 = 128;
/// Tokens a matmul warp multiplies per pass over its row's weights.
pub const MATMUL_TOKENS: u32 = 8;
/// Output rows per matmul block (one per warp).
pub const MATMUL_ROWS: u32 = BLOCK / 32;

/// The matmul grid: blocks of [`MATMUL_ROWS`] rows × tiles of [`MATMUL_TOKENS`] tokens.
pub fn matmul_grid(rows: u32, t: u32) -> [u32; 3] {
    [rows.div_ceil(MATMUL_ROWS), t.div_ceil(MATMUL_TOKENS).max(1), 1]
}

/// Parameters of every matmul kernel (CUDA-core and tensor-core).
const MATMUL_PARAMS: &[(&str, ParamTy)] = &[
    ("w", ParamTy::Ptr),
    ("x", ParamTy::Ptr),
    ("xr", ParamTy::Ptr),
    ("y", ParamTy::Ptr),
    ("bias", ParamTy::Ptr),
    ("tables", ParamTy::Ptr),
    ("rows", ParamTy::U32),
    ("k", ParamTy::U32),
    ("t", ParamTy::U32),
    ("row_bytes", ParamTy::U32),
];

pub fn matmul_name(dtype: DType, bias: bool, ragged: bool) -> String {
    format!("matmul_{}{}{}", dtype.name(), if bias { "_bias" } else { "" }, if ragged { "_ragged" } else { "" })
}

/// `y[t, r] = Σ_k w[r, k] · x[t, k] (+ bias[r])` with `w` decoded from its
/// packed layout in registers (fused dequantization), one warp per output row,
/// [`MATMUL_TOKENS`] tokens per pass over the row.
///
/// Grid: [`matmul_grid`], a block per 4 rows and tile of tokens. Arguments: `w, x, xr (block-rotated x for
/// kq2, else x), y, bias, tables, rows, k, t, row_bytes`. `k` must be a
/// multiple of 8, except for the `ragged` variant of unquantized weights,
/// which clamps and masks the last group of each row.
pub fn matmul(dtype: DType, bias: bool) -> Kernel {
    matmul_variant(dtype, bias, false)
}

/// [`matmul`], or its `ragged` variant for unquantized rows of any length.
pub fn matmul_variant(dtype: DType, bias: bool, ragged: bool) -> Kernel {
    matmul_impl(dtype, bias, ragged, false)
}

pub fn matmul_experts_name(dtype: DType, ragged: bool) -> String {
    format!("{}_experts", matmul_name(dtype, false, ragged))
}

/// The grid of [`matmul_experts`]: [`matmul_grid`] for the most rows one expert can get,
/// times the experts.
pub fn matmul_experts_grid(rows: u32, max_t: u32, experts: u32) -> [u32; 3] {
    let [a, b, _] = matmul_grid(rows, max_t);
    [a, b, experts]
}

/// [`matmul_variant`] (no bias) over stacked experts, one launch for all of them: expert
/// `e = ctaid.z` multiplies its `[rows, k]` matrix at `w + e·expert_bytes` with its
/// gathered rows `seg[2e] .. seg[2e] + seg[2e+1]` of `x` (and `xr`) into the same rows of
/// `y`; blocks past an expert's row count exit at once. Arguments: the matmul's (its `t`
/// unused), then `seg, expert_bytes`.
pub fn matmul_experts(dtype: DType, ragged: bool) -> Kernel {
    matmul_impl(dtype, false, ragged, true)
}

fn matmul_impl(dtype: DType, bias: bool, ragged: bool, experts: bool) -> Kernel {
    assert!(!ragged || dtype.block_elems() == 1, "ragged rows are for unquantized weights");
    let mut params = MATMUL_PARAMS.to_vec();
    if experts {
        params.extend([("seg", ParamTy::Ptr), ("expert_bytes", ParamTy::U32)]);
    }
    let name = if experts { matmul_experts_name(dtype, ragged) } else { matmul_name(dtype, bias, ragged) };
    let mut kb = Kb::new(name, &params, BLOCK);
    let mut w = kb.param(0);
    let mut x = kb.param(1);
    let mut xr = kb.param(2);
    let mut y = kb.param(3);
    let bias_p = kb.param(4);
    let tables = kb.param(5);
    let rows = kb.param(6);
    let k = kb.param(7);
    let mut t = kb.param(8);
    let row_bytes = kb.param(9);
    let exit = experts.then(|| kb.label());
    if let Some(exit) = exit {
        let seg = kb.param(10);
        let eb = kb.param(11);
        let e = kb.special(Special::CtaidZ);
        let si = kb.mul(Ty::U32, e, 2u32);
        let sa = kb.index(seg, si, 4);
        let first = kb.ld(Mem::U32, sa, 0);
        t = kb.ld(Mem::U32, sa, 4);
        let woff = kb.mul_wide(e, eb);
        w = kb.add(Ty::U64, w, woff);
        let xo = kb.mul(Ty::U32, first, k);
        x = kb.index(x, xo, 4);
        xr = kb.index(xr, xo, 4);
        let yo = kb.mul(Ty::U32, first, rows);
        y = kb.index(y, yo, 4);
        // This block's tokens start past the expert's rows: nothing to do (uniform).
        let tile = kb.special(Special::CtaidY);
        let t0 = kb.mul(Ty::U32, tile, MATMUL_TOKENS);
        let idle = kb.setp(Cmp::Ge, t0, t);
        kb.bra(exit, Some((idle, false)));
    }

    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let cta = kb.special(Special::CtaidX);
    let row = kb.mad(Ty::U32, cta, MATMUL_ROWS, warp);
    let row_ok = kb.setp(Cmp::Lt, row, rows);
    let last_row = kb.sub(Ty::U32, rows, 1);
    let row_c = kb.bin(BinOp::Min, Ty::U32, row, last_row);
    let roff = kb.mul_wide(row_c, row_bytes);
    let wrow = kb.add(Ty::U64, w, roff);
    let k7 = kb.add(Ty::U32, k, 7u32);
    let groups = kb.shr(Ty::U32, if ragged { k7 } else { k }, 3);
    let last_k = kb.sub(Ty::U32, k, 1u32);
    let last_g = kb.sub(Ty::U32, groups, 1);
    let last_t = kb.sub(Ty::U32, t, 1);
    let rotated = formats::needs_rotated_x(dtype);
    let bias_v = bias.then(|| {
        let a = kb.index(bias_p, row_c, 4);
        kb.ld(Mem::F32, a, 0)
    });

    // This block's tile of tokens: t0 .. t0 + MATMUL_TOKENS (grid.y).
    let tile = kb.special(Special::CtaidY);
    let t0 = kb.mul(Ty::U32, tile, MATMUL_TOKENS);
    let pass = |kb: &mut Kb, t0: Reg| {
        let acc: Vec<Reg> = (0..MATMUL_TOKENS).map(|_| kb.imm(Ty::F32, 0.0f32)).collect();
        // Row addresses of the tile's tokens (clamped to the last token).
        let xrows: Vec<(Reg, Option<Reg>)> = (0..MATMUL_TOKENS)
            .map(|j| {
                let tj = kb.add(Ty::U32, t0, j);
                let tj = kb.bin(BinOp::Min, Ty::U32, tj, last_t);
                let off = kb.mul(Ty::U32, tj, k);
                let a = kb.index(x, off, 4);
                let ar = rotated.then(|| kb.index(xr, off, 4));
                (a, ar)
            })
            .collect();
        kb.for_range(0u32, groups, 32u32, |kb, gb| {
            let g = kb.add(Ty::U32, gb, lane);
            let g_ok = kb.setp(Cmp::Lt, g, groups);
            let g_c = kb.bin(BinOp::Min, Ty::U32, g, last_g);
            if ragged {
                // Element indices clamped to the row, masked past its end.
                let e0 = kb.shl(Ty::U32, g_c, 3);
                let es: Vec<(Reg, Reg)> = (0..8u32)
                    .map(|i| {
                        let e = kb.add(Ty::U32, e0, i);
                        let ok = kb.setp(Cmp::Lt, e, k);
                        let ok = kb.bin(BinOp::And, Ty::Pred, ok, g_ok);
                        let e = kb.bin(BinOp::Min, Ty::U32, e, last_k);
                        (e, ok)
                    })
                    .collect();
                let wv: Vec<Reg> = es
                    .iter()
                    .map(|&(e, ok)| {
                        let wi = formats::load_plain(kb, dtype, wrow, e);
                        kb.selp(Ty::F32, wi, 0.0f32, ok)
                    })
                    .collect();
                for (j, &(xa, _)) in xrows.iter().enumerate() {
                    for (&(e, _), &wi) in es.iter().zip(&wv) {
                        let a = kb.index(xa, e, 4);
                        let xv = kb.ld(Mem::F32, a, 0);
                        kb.fma_to(acc[j], wi, xv);
                    }
                }
                return;
            }
            let grp = formats::decode8(kb, dtype, wrow, g_c, tables);
            // Lanes past the row's end contribute zero.
            let wv: Vec<Reg> = grp.w.iter().map(|&wi| kb.selp(Ty::F32, wi, 0.0f32, g_ok)).collect();
            for (j, &(xa, xra)) in xrows.iter().enumerate() {
                // Tokens past `t` are skipped (a branch uniform over the block).
                let skip = (j > 0).then(|| {
                    let l = kb.label();
                    let tj = kb.add(Ty::U32, t0, j as u32);
                    let past = kb.setp(Cmp::Ge, tj, t);
                    kb.bra(l, Some((past, false)));
                    l
                });
                let base = match (xra, grp.rotated) {
                    (Some(xra), Some(rot)) => kb.selp(Ty::U64, xra, xa, rot),
                    _ => xa,
                };
                // Rows of x are k·4 bytes with k a multiple of 8: the group's 8
                // floats are 32-byte aligned, two vector loads.
                let a = kb.index(base, g_c, 32);
                let lo = kb.ld_v4(a, 0);
                let hi = kb.ld_v4(a, 16);
                for (i, &wi) in wv.iter().enumerate() {
                    let xv = if i < 4 { lo[i] } else { hi[i - 4] };
                    kb.fma_to(acc[j], wi, xv);
                }
                if let Some(l) = skip {
                    kb.place(l);
                }
            }
        });
        let is_lane0 = kb.setp(Cmp::Eq, lane, 0u32);
        let store_ok = kb.bin(BinOp::And, Ty::Pred, is_lane0, row_ok);
        for (j, &a) in acc.iter().enumerate() {
            let s = kb.warp_sum(a);
            let s = match bias_v {
                Some(b) => kb.add(Ty::F32, s, b),
                None => s,
            };
            let tj = kb.add(Ty::U32, t0, j as u32);
            let t_ok = kb.setp(Cmp::Lt, tj, t);
            let ok = kb.bin(BinOp::And, Ty::Pred, store_ok, t_ok);
            let idx = kb.mad(Ty::U32, tj, rows, row_c);
            let ya = kb.index(y, idx, 4);
            kb.guarded(ok, false, |kb| kb.st(Mem::F32, ya, 0, s));
        }
    };
    pass(&mut kb, t0);
    if let Some(exit) = exit {
        kb.place(exit);
    }
    kb.finish()
}

/// Index of this thread's element in a 1-D launch of [`BLOCK`]-thread blocks,
/// and whether it is below `n`.
fn elem_index(kb: &mut Kb, n: Reg) -> (Reg, Reg) {
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let i = kb.mad(Ty::U32, cta, BLOCK, tid);
    let ok = kb.setp(Cmp::Lt, i, n);
    (i, ok)
}

/// Elementwise binary ops: `add`, `mul`. Arguments `a, b, y, n`. Grid `ceil(n / 128)`.
pub fn binary(op: BinOp) -> Kernel {
    let name = match op {
        BinOp::Add => "add",
        BinOp::Mul => "mul",
        _ => panic!("binary kernel for {op:?}"),
    };
    let mut kb =
        Kb::new(name, &[("a", ParamTy::Ptr), ("b", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32)], BLOCK);
    let (a, b, y, n) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let (i, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let aa = kb.index(a, i, 4);
        let ba = kb.index(b, i, 4);
        let ya = kb.index(y, i, 4);
        let av = kb.ld(Mem::F32, aa, 0);
        let bv = kb.ld(Mem::F32, ba, 0);
        let r = kb.bin(op, Ty::F32, av, bv);
        kb.st(Mem::F32, ya, 0, r);
    });
    kb.finish()
}

/// `y = x · s`. Arguments `x, y, n, s`.
pub fn scale() -> Kernel {
    let mut kb =
        Kb::new("scale", &[("x", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32), ("s", ParamTy::F32)], BLOCK);
    let (x, y, n, s) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let (i, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let xa = kb.index(x, i, 4);
        let ya = kb.index(y, i, 4);
        let v = kb.ld(Mem::F32, xa, 0);
        let r = kb.mul(Ty::F32, v, s);
        kb.st(Mem::F32, ya, 0, r);
    });
    kb.finish()
}

/// The activation of `v`.
fn activation(kb: &mut Kb, kind: Activation, v: Reg) -> Reg {
    match kind {
        // x / (1 + e^-x)
        Activation::Silu => {
            let nx = kb.un(UnOp::Neg, Ty::F32, v);
            let e = kb.exp(nx);
            let den = kb.add(Ty::F32, e, 1.0f32);
            kb.bin(BinOp::Div, Ty::F32, v, den)
        }
        // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        Activation::GeluTanh => {
            let x2 = kb.mul(Ty::F32, v, v);
            let inner = kb.fma(x2, 0.044715f32, 1.0f32);
            let inner = kb.mul(Ty::F32, inner, v);
            let inner = kb.mul(Ty::F32, inner, 0.797_884_6_f32);
            let th = kb.tanh(inner);
            let one = kb.add(Ty::F32, th, 1.0f32);
            let hx = kb.mul(Ty::F32, v, 0.5f32);
            kb.mul(Ty::F32, hx, one)
        }
    }
}

pub fn act_name(kind: Activation) -> String {
    format!("act_{}", kind.name())
}

/// `y = act(x)`. Arguments `x, y, n`.
pub fn act(kind: Activation) -> Kernel {
    let mut kb = Kb::new(act_name(kind), &[("x", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32)], BLOCK);
    let (x, y, n) = (kb.param(0), kb.param(1), kb.param(2));
    let (i, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let xa = kb.index(x, i, 4);
        let ya = kb.index(y, i, 4);
        let v = kb.ld(Mem::F32, xa, 0);
        let r = activation(kb, kind, v);
        kb.st(Mem::F32, ya, 0, r);
    });
    kb.finish()
}

pub fn glu_name(kind: Activation) -> String {
    format!("glu_{}", kind.name())
}

/// `y = act(gate) · up`. Arguments `gate, up, y, n`.
pub fn glu(kind: Activation) -> Kernel {
    let mut kb = Kb::new(
        glu_name(kind),
        &[("gate", ParamTy::Ptr), ("up", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32)],
        BLOCK,
    );
    let (g, u, y, n) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let (i, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let ga = kb.index(g, i, 4);
        let ua = kb.index(u, i, 4);
        let ya = kb.index(y, i, 4);
        let gv = kb.ld(Mem::F32, ga, 0);
        let uv = kb.ld(Mem::F32, ua, 0);
        let a = activation(kb, kind, gv);
        let r = kb.mul(Ty::F32, a, uv);
        kb.st(Mem::F32, ya, 0, r);
    });
    kb.finish()
}

/// Sum of `v` over the block: every thread gets it. Uses 4 floats of shared
/// memory at `smem + off`.
pub(crate) fn block_sum(kb: &mut Kb, v: Reg, smem: Reg, off: u32) -> Reg {
    let s = kb.warp_sum(v);
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let first = kb.setp(Cmp::Eq, lane, 0u32);
    let slot = kb.mad(Ty::U32, warp, 4u32, smem);
    kb.guarded(first, false, |kb| kb.st_shared(slot, off as i32, s));
    kb.bar();
    let mut total = kb.ld_shared(smem, off as i32);
    for w in 1..BLOCK / 32 {
        let p = kb.ld_shared(smem, (off + 4 * w) as i32);
        total = kb.add(Ty::F32, total, p);
    }
    kb.bar();
    total
}

/// Maximum of `v` over the block (4 floats of shared memory at `smem + off`).
fn block_max(kb: &mut Kb, v: Reg, smem: Reg, off: u32) -> Reg {
    let s = kb.warp_max(v);
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let first = kb.setp(Cmp::Eq, lane, 0u32);
    let slot = kb.mad(Ty::U32, warp, 4u32, smem);
    kb.guarded(first, false, |kb| kb.st_shared(slot, off as i32, s));
    kb.bar();
    let mut total = kb.ld_shared(smem, off as i32);
    for w in 1..BLOCK / 32 {
        let p = kb.ld_shared(smem, (off + 4 * w) as i32);
        total = kb.bin(BinOp::Max, Ty::F32, total, p);
    }
    kb.bar();
    total
}

pub fn rms_norm_name(weight: bool) -> String {
    format!("rms_norm{}", if weight { "_w" } else { "" })
}

/// RMS normalization of groups of `n` elements: one block per group.
/// Arguments `x, w, y, n, eps`; grid `T · groups`. `y = x / √(mean(x²) + eps) · w`.
pub fn rms_norm(weight: bool) -> Kernel {
    let mut kb = Kb::new(
        rms_norm_name(weight),
        &[("x", ParamTy::Ptr), ("w", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32), ("eps", ParamTy::F32)],
        BLOCK,
    );
    let (x, w, y, n, eps) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let smem_off = kb.shared(16);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let base = kb.mul(Ty::U32, cta, n);
    let xrow = kb.index(x, base, 4);
    let yrow = kb.index(y, base, 4);
    let ss = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(xrow, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            kb.fma_to(ss, v, v);
        });
    });
    let total = block_sum(&mut kb, ss, smem, smem_off);
    let nf = kb.cvt(Ty::F32, n);
    let mean = kb.bin(BinOp::Div, Ty::F32, total, nf);
    let me = kb.add(Ty::F32, mean, eps);
    let sq = kb.un(UnOp::Sqrt, Ty::F32, me);
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, sq);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(xrow, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            let mut r = kb.mul(Ty::F32, v, inv);
            if weight {
                let wa = kb.index(w, i, 4);
                let wv = kb.ld(Mem::F32, wa, 0);
                r = kb.mul(Ty::F32, r, wv);
            }
            let ya = kb.index(yrow, i, 4);
            kb.st(Mem::F32, ya, 0, r);
        });
    });
    kb.finish()
}

pub fn steer_name(mode: SteerMode) -> String {
    format!("steer_{}", mode.name())
}

/// Steering along `d`: one block per row. Arguments `x, d, y, n, s`; grid `T`.
/// `y = x + (s·d)` (add) or `y = x − (s·(d·x))·d` (project). The reference's
/// strength 0 is the identity; here `s = 0` gives `x + 0` and `x − 0·d`, equal
/// to `x` up to the sign of zero.
pub fn steer(mode: SteerMode) -> Kernel {
    let mut kb = Kb::new(
        steer_name(mode),
        &[("x", ParamTy::Ptr), ("d", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32), ("s", ParamTy::F32)],
        BLOCK,
    );
    let (x, d, y, n, s) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let base = kb.mul(Ty::U32, cta, n);
    let xrow = kb.index(x, base, 4);
    let yrow = kb.index(y, base, 4);
    // The per-row coefficient of d: s (add) or −s·(d·x) (project).
    let coef = match mode {
        SteerMode::Add => s,
        SteerMode::Project => {
            let smem_off = kb.shared(16);
            let smem = kb.shared_base();
            let acc = kb.imm(Ty::F32, 0.0f32);
            kb.for_range(0u32, n, BLOCK, |kb, i0| {
                let i = kb.add(Ty::U32, i0, tid);
                let ok = kb.setp(Cmp::Lt, i, n);
                kb.guarded(ok, false, |kb| {
                    let xa = kb.index(xrow, i, 4);
                    let da = kb.index(d, i, 4);
                    let xv = kb.ld(Mem::F32, xa, 0);
                    let dv = kb.ld(Mem::F32, da, 0);
                    kb.fma_to(acc, xv, dv);
                });
            });
            let dot = block_sum(&mut kb, acc, smem, smem_off);
            let c = kb.mul(Ty::F32, dot, s);
            kb.un(UnOp::Neg, Ty::F32, c)
        }
    };
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let xa = kb.index(xrow, i, 4);
            let da = kb.index(d, i, 4);
            let xv = kb.ld(Mem::F32, xa, 0);
            let dv = kb.ld(Mem::F32, da, 0);
            let step = kb.mul(Ty::F32, coef, dv);
            let r = kb.add(Ty::F32, xv, step);
            let ya = kb.index(yrow, i, 4);
            kb.st(Mem::F32, ya, 0, r);
        });
    });
    kb.finish()
}

/// Row softmax: one block per row. Arguments `x, y, n`; grid `T`.
pub fn softmax() -> Kernel {
    let mut kb = Kb::new("softmax", &[("x", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32)], BLOCK);
    let (x, y, n) = (kb.param(0), kb.param(1), kb.param(2));
    let smem_off = kb.shared(16);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let base = kb.mul(Ty::U32, cta, n);
    let xrow = kb.index(x, base, 4);
    let yrow = kb.index(y, base, 4);
    let m = kb.imm(Ty::F32, f32::NEG_INFINITY);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(xrow, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            kb.bin_to(BinOp::Max, m, m, v);
        });
    });
    let mx = block_max(&mut kb, m, smem, smem_off);
    // A row of -inf gives zeros, like the reference.
    let finite = kb.setp(Cmp::Gt, mx, f32::NEG_INFINITY);
    let mx = kb.selp(Ty::F32, mx, 0.0f32, finite);
    let s = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(xrow, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            let d = kb.sub(Ty::F32, v, mx);
            let e = kb.exp(d);
            let ya = kb.index(yrow, i, 4);
            kb.st(Mem::F32, ya, 0, e);
            kb.bin_to(BinOp::Add, s, s, e);
        });
    });
    let total = block_sum(&mut kb, s, smem, smem_off);
    let pos = kb.setp(Cmp::Gt, total, 0.0f32);
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, total);
    let inv = kb.selp(Ty::F32, inv, 0.0f32, pos);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let ya = kb.index(yrow, i, 4);
            let v = kb.ld(Mem::F32, ya, 0);
            let r = kb.mul(Ty::F32, v, inv);
            kb.st(Mem::F32, ya, 0, r);
        });
    });
    kb.finish()
}

pub fn rope_name(layout: RopeLayout) -> String {
    format!("rope_{}", layout.name())
}

/// Rotary embedding, one block per (token, head). Arguments `x, y, cs, step,
/// cols, head_dim, rot`; `cs` is the host-computed table of `(cos, sin)` per
/// (position, pair), `rot/2` pairs per position (the reference's angles, so
/// the rotation is bit-identical). Grid `(T, heads)`.
pub fn rope(layout: RopeLayout) -> Kernel {
    use ParamTy::*;
    let mut kb = Kb::new(
        rope_name(layout),
        &[("x", Ptr), ("y", Ptr), ("cs", Ptr), ("step", Ptr), ("cols", U32), ("head_dim", U32), ("rot", U32)],
        BLOCK,
    );
    let (x, y, cs, step, cols, hd, rot) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let pos = kb.ld(Mem::U32, step, STEP_POS);
    let t = kb.special(Special::CtaidX);
    let h = kb.special(Special::CtaidY);
    let tid = kb.tid();
    let half = kb.shr(Ty::U32, rot, 1);
    let p = kb.add(Ty::U32, pos, t);
    let cs_row = kb.mul(Ty::U32, p, half);
    let rowoff = kb.mul(Ty::U32, t, cols);
    let headoff = kb.mad(Ty::U32, h, hd, rowoff);
    let xh = kb.index(x, headoff, 4);
    let yh = kb.index(y, headoff, 4);
    kb.for_range(0u32, hd, BLOCK, |kb, d0| {
        let d = kb.add(Ty::U32, d0, tid);
        let in_head = kb.setp(Cmp::Lt, d, hd);
        let rotates = kb.setp(Cmp::Lt, d, rot);
        // Pair index i, whether d is the pair's first element, and its partner.
        let (i, first, partner) = match layout {
            RopeLayout::Interleaved => {
                let i = kb.shr(Ty::U32, d, 1);
                let odd = kb.and(Ty::U32, d, 1);
                let first = kb.setp(Cmp::Eq, odd, 0u32);
                let partner = kb.bin(BinOp::Xor, Ty::U32, d, 1u32);
                (i, first, partner)
            }
            RopeLayout::Neox => {
                let first = kb.setp(Cmp::Lt, d, half);
                let dm = kb.sub(Ty::U32, d, half);
                let i = kb.selp(Ty::U32, d, dm, first);
                let dp = kb.add(Ty::U32, d, half);
                let partner = kb.selp(Ty::U32, dp, dm, first);
                (i, first, partner)
            }
        };
        let do_rot = kb.bin(BinOp::And, Ty::Pred, in_head, rotates);
        let copy = kb.setp(Cmp::Ge, d, rot);
        let do_copy = kb.bin(BinOp::And, Ty::Pred, in_head, copy);
        let xa = kb.index(xh, d, 4);
        let ya = kb.index(yh, d, 4);
        kb.guarded(do_copy, false, |kb| {
            let v = kb.ld(Mem::F32, xa, 0);
            kb.st(Mem::F32, ya, 0, v);
        });
        kb.guarded(do_rot, false, |kb| {
            let v = kb.ld(Mem::F32, xa, 0);
            let pa = kb.index(xh, partner, 4);
            let pv = kb.ld(Mem::F32, pa, 0);
            let ci = kb.add(Ty::U32, cs_row, i);
            let ca = kb.index(cs, ci, 8);
            let c = kb.ld(Mem::F32, ca, 0);
            let s = kb.ld(Mem::F32, ca, 4);
            let x0 = kb.selp(Ty::F32, v, pv, first);
            let x1 = kb.selp(Ty::F32, pv, v, first);
            // first: fma(x0, c, -(x1·s)); second: fma(x0, s, x1·c) — the reference's order.
            let x1s = kb.mul(Ty::F32, x1, s);
            let nx1s = kb.un(UnOp::Neg, Ty::F32, x1s);
            let x1c = kb.mul(Ty::F32, x1, c);
            let m = kb.selp(Ty::F32, c, s, first);
            let add = kb.selp(Ty::F32, nx1s, x1c, first);
            let r = kb.fma(x0, m, add);
            kb.st(Mem::F32, ya, 0, r);
        });
    });
    kb.finish()
}

/// The row of a KV-cache slot that holds position `j`: `j` while `j < rows`, after that
/// `sink + (j − sink) mod (rows − sink)` (a slot of windowed attention keeps its sinks and a
/// ring; a slot that holds the whole context never wraps; `kiln_fixed::program::Slot::row` is the same map).
fn ring_row(kb: &mut Kb, j: Reg, rows: Reg, sink: Reg) -> Reg {
    let inside = kb.setp(Cmp::Lt, j, rows);
    let t = kb.sub(Ty::U32, j, sink);
    let ring = kb.sub(Ty::U32, rows, sink);
    let ring = kb.bin(BinOp::Max, Ty::U32, ring, 1u32);
    let m = kb.bin(BinOp::Rem, Ty::U32, t, ring);
    let r = kb.add(Ty::U32, m, sink);
    kb.selp(Ty::U32, j, r, inside)
}

/// The arguments of `kv_append` and `kv_append_q*`.
const KV_APPEND_PARAMS: [(&str, ParamTy); 9] = [
    ("k", ParamTy::Ptr),
    ("v", ParamTy::Ptr),
    ("kc", ParamTy::Ptr),
    ("vc", ParamTy::Ptr),
    ("step", ParamTy::Ptr),
    ("n", ParamTy::U32),
    ("width", ParamTy::U32),
    ("rows", ParamTy::U32),
    ("sink", ParamTy::U32),
];

/// Appends `T` new rows of k and v (f32) to a slot at the step's position. Arguments
/// `k, v, kc, vc, step, n (= T·width), width, rows, sink` (the slot's ring, [`ring_row`]);
/// grid `ceil(n / 128)`.
pub fn kv_append() -> Kernel {
    let mut kb = Kb::new("kv_append", &KV_APPEND_PARAMS, BLOCK);
    let (k, v, kc, vc, step, n, width) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (rows, sink) = (kb.param(7), kb.param(8));
    let pos = kb.ld(Mem::U32, step, STEP_POS);
    let (i, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let r = kb.bin(BinOp::Div, Ty::U32, i, width);
        let rw = kb.mul(Ty::U32, r, width);
        let col = kb.sub(Ty::U32, i, rw);
        let prow = kb.add(Ty::U32, pos, r);
        let row = ring_row(kb, prow, rows, sink);
        let j = kb.mad(Ty::U32, row, width, col);
        let ka = kb.index(k, i, 4);
        let va = kb.index(v, i, 4);
        let kca = kb.index(kc, j, 4);
        let vca = kb.index(vc, j, 4);
        let kv = kb.ld(Mem::F32, ka, 0);
        let vv = kb.ld(Mem::F32, va, 0);
        kb.st(Mem::F32, kca, 0, kv);
        kb.st(Mem::F32, vca, 0, vv);
    });
    kb.finish()
}

/// Floats of one attention partial result: `m`, `l`, then `head_dim` values.
pub fn attn_record(head_dim: u32) -> u32 {
    head_dim + 2
}

/// A "minus infinity" that keeps `exp(a − b)` finite arithmetic (no inf − inf).
const NEG_BIG: f32 = -1.0e30;

pub fn attention_name(head_dim: u32, softcap: bool) -> String {
    format!("attn_hd{head_dim}{}", if softcap { "_softcap" } else { "" })
}

/// Flash-decoding attention, first phase: one block per (head, query token,
/// key split); each of its 4 warps walks every 4th key of the split with an
/// online softmax (lane `l` holds dims `l, l+32, …`), the warps are merged in
/// shared memory and the block writes `(m, l, o[head_dim])` for its split.
///
/// Arguments `q, kc, vc, part, step, heads, group (heads per kv head), width
/// (kv_heads·head_dim), scale, window, sink, softcap, splits, rows, ring_sink` (the
/// slot's ring, [`ring_row`]); each query cuts its
/// own keys into `splits` equal chunks. Grid `(heads, T, splits)`. Query `t` sits at position `pos + t`
/// and sees keys `0 .. min(sink, lo)` and `lo ..= pos + t` (`lo` from the sliding window).
pub fn attention(head_dim: u32, softcap: bool) -> Kernel {
    use ParamTy::*;
    let hd = head_dim;
    let per_lane = hd.div_ceil(32);
    let warps = BLOCK / 32;
    let mut kb = Kb::new(
        attention_name(hd, softcap),
        &[
            ("q", Ptr),
            ("kc", Ptr),
            ("vc", Ptr),
            ("part", Ptr),
            ("step", Ptr),
            ("heads", U32),
            ("group", U32),
            ("width", U32),
            ("scale", F32),
            ("window", U32),
            ("sink", U32),
            ("softcap", F32),
            ("splits", U32),
            ("rows", U32),
            ("ring_sink", U32),
        ],
        BLOCK,
    );
    let q = kb.param(0);
    let kc = kb.param(1);
    let vc = kb.param(2);
    let part = kb.param(3);
    let step = kb.param(4);
    let heads = kb.param(5);
    let group = kb.param(6);
    let width = kb.param(7);
    let scale = kb.param(8);
    let window = kb.param(9);
    let sink = kb.param(10);
    let cap = kb.param(11);
    let splits = kb.param(12);
    let (rows, ring_sink) = (kb.param(13), kb.param(14));
    let rec = attn_record(hd);
    let smem_off = kb.shared(4 * warps * rec);
    let smem = kb.shared_base();

    let h = kb.special(Special::CtaidX);
    let t = kb.special(Special::CtaidY);
    let z = kb.special(Special::CtaidZ);
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let pos = kb.ld(Mem::U32, step, STEP_POS);
    let p = kb.add(Ty::U32, pos, t);
    let hi = kb.add(Ty::U32, p, 1u32);
    // lo = window > 0 && hi > window ? hi - window : 0
    let has_w = kb.setp(Cmp::Gt, window, 0u32);
    let past = kb.setp(Cmp::Gt, hi, window);
    let cut = kb.bin(BinOp::And, Ty::Pred, has_w, past);
    let hw = kb.sub(Ty::U32, hi, window);
    let lo = kb.selp(Ty::U32, hw, 0u32, cut);
    // Key index j < n: the sinks before the window (j < s), then the window from lo
    // (position j + lo − s).
    let s_n = kb.bin(BinOp::Min, Ty::U32, sink, lo);
    let off = kb.sub(Ty::U32, lo, s_n);
    let n = kb.sub(Ty::U32, hi, off);
    // This query's n keys in `splits` chunks; the block takes chunk z.
    let keys = kb.add(Ty::U32, n, splits);
    let keys = kb.sub(Ty::U32, keys, 1u32);
    let chunk = kb.bin(BinOp::Div, Ty::U32, keys, splits);
    let start = kb.mul(Ty::U32, z, chunk);
    let start = kb.bin(BinOp::Min, Ty::U32, start, n);
    let end = kb.add(Ty::U32, start, chunk);
    let end = kb.bin(BinOp::Min, Ty::U32, end, n);
    let kvh = kb.bin(BinOp::Div, Ty::U32, h, group);
    let kv_off = kb.mul(Ty::U32, kvh, hd);
    // q row of this head.
    let qoff = kb.mad(Ty::U32, t, heads, h);
    let qoff = kb.mul(Ty::U32, qoff, hd);
    let qa = kb.index(q, qoff, 4);
    let mut qv = Vec::new();
    let mut dim_ok = Vec::new();
    for i in 0..per_lane {
        let d = kb.add(Ty::U32, lane, 32 * i);
        let ok = kb.setp(Cmp::Lt, d, hd);
        let dc = kb.bin(BinOp::Min, Ty::U32, d, hd - 1);
        let a = kb.index(qa, dc, 4);
        let v = kb.ld(Mem::F32, a, 0);
        let v = kb.selp(Ty::F32, v, 0.0f32, ok);
        qv.push(v);
        dim_ok.push((ok, dc));
    }
    let m = kb.imm(Ty::F32, NEG_BIG);
    let l = kb.imm(Ty::F32, 0.0f32);
    let acc: Vec<Reg> = (0..per_lane).map(|_| kb.imm(Ty::F32, 0.0f32)).collect();
    let last_key = kb.sub(Ty::U32, n, 1u32);
    kb.for_range(start, end, warps, |kb, j0| {
        let j = kb.add(Ty::U32, j0, warp);
        let valid = kb.setp(Cmp::Lt, j, end);
        let jc = kb.bin(BinOp::Min, Ty::U32, j, last_key);
        let in_window = kb.setp(Cmp::Ge, jc, s_n);
        let shift = kb.selp(Ty::U32, off, 0u32, in_window);
        let jc = kb.add(Ty::U32, jc, shift);
        let jc = ring_row(kb, jc, rows, ring_sink);
        let row = kb.mad(Ty::U32, jc, width, kv_off);
        let ka = kb.index(kc, row, 4);
        let va = kb.index(vc, row, 4);
        let part_dot = kb.imm(Ty::F32, 0.0f32);
        for i in 0..per_lane as usize {
            let a = kb.index(ka, dim_ok[i].1, 4);
            let kv = kb.ld(Mem::F32, a, 0);
            kb.fma_to(part_dot, qv[i], kv);
        }
        let dot = kb.warp_sum(part_dot);
        let mut s = kb.mul(Ty::F32, dot, scale);
        if softcap {
            let r = kb.bin(BinOp::Div, Ty::F32, s, cap);
            let th = kb.tanh(r);
            s = kb.mul(Ty::F32, th, cap);
        }
        let s = kb.selp(Ty::F32, s, NEG_BIG, valid);
        let m_new = kb.bin(BinOp::Max, Ty::F32, m, s);
        let dm = kb.sub(Ty::F32, m, m_new);
        let corr = kb.exp(dm);
        let ds = kb.sub(Ty::F32, s, m_new);
        let e = kb.exp(ds);
        let wgt = kb.selp(Ty::F32, e, 0.0f32, valid);
        let l2 = kb.mul(Ty::F32, l, corr);
        kb.bin_to(BinOp::Add, l, l2, wgt);
        for i in 0..per_lane as usize {
            let a = kb.index(va, dim_ok[i].1, 4);
            let vv = kb.ld(Mem::F32, a, 0);
            let sc = kb.mul(Ty::F32, acc[i], corr);
            kb.push(crate::ptx::Inst::Fma { d: acc[i], a: wgt.into(), b: vv.into(), c: sc.into() });
        }
        kb.mov_to(m, m_new);
    });
    // Each warp's (m, l, acc) into shared memory: record per warp.
    let wbase = kb.mul(Ty::U32, warp, 4 * rec);
    let wbase = kb.add(Ty::U32, wbase, smem);
    let lane0 = kb.setp(Cmp::Eq, lane, 0u32);
    kb.guarded(lane0, false, |kb| {
        kb.st_shared(wbase, smem_off as i32, m);
        kb.st_shared(wbase, smem_off as i32 + 4, l);
    });
    for i in 0..per_lane as usize {
        let (ok, _) = dim_ok[i];
        let d = kb.add(Ty::U32, lane, 32 * i as u32);
        let a = kb.mad(Ty::U32, d, 4u32, wbase);
        kb.guarded(ok, false, |kb| kb.st_shared(a, smem_off as i32 + 8, acc[i]));
    }
    kb.bar();
    // Merge the warps: every thread computes M and L, threads own output dims.
    let ms: Vec<Reg> = (0..warps).map(|w| kb.ld_shared(smem, (smem_off + 4 * w * rec) as i32)).collect();
    let ls: Vec<Reg> = (0..warps).map(|w| kb.ld_shared(smem, (smem_off + 4 * w * rec + 4) as i32)).collect();
    let mut mm = ms[0];
    for &mw in &ms[1..] {
        mm = kb.bin(BinOp::Max, Ty::F32, mm, mw);
    }
    let fs: Vec<Reg> = ms
        .iter()
        .map(|&mw| {
            let d = kb.sub(Ty::F32, mw, mm);
            kb.exp(d)
        })
        .collect();
    let ll = kb.imm(Ty::F32, 0.0f32);
    for (lw, fw) in ls.iter().zip(&fs) {
        kb.fma_to(ll, *lw, *fw);
    }
    // part[((t·heads + h)·splits + z)·rec + ...]
    let rid = kb.mad(Ty::U32, t, heads, h);
    let rid = kb.mad(Ty::U32, rid, splits, z);
    let roff = kb.mul(Ty::U32, rid, rec);
    let pa = kb.index(part, roff, 4);
    let t0 = kb.setp(Cmp::Eq, tid, 0u32);
    kb.guarded(t0, false, |kb| {
        kb.st(Mem::F32, pa, 0, mm);
        kb.st(Mem::F32, pa, 4, ll);
    });
    for r in 0..hd.div_ceil(BLOCK) {
        let d = kb.add(Ty::U32, tid, r * BLOCK);
        let ok = kb.setp(Cmp::Lt, d, hd);
        let dc = kb.bin(BinOp::Min, Ty::U32, d, hd - 1);
        let o = kb.imm(Ty::F32, 0.0f32);
        for (w, fw) in fs.iter().enumerate() {
            let a = kb.mad(Ty::U32, dc, 4u32, smem);
            let v = kb.ld_shared(a, (smem_off + 4 * w as u32 * rec + 8) as i32);
            kb.fma_to(o, v, *fw);
        }
        let oa = kb.index(pa, dc, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, oa, 8, o));
    }
    kb.finish()
}

/// Flash-decoding, second phase: merges the splits of each (token, head).
/// Arguments `part, out, heads, head_dim, splits`; grid `(heads, T)`.
pub fn attn_combine() -> Kernel {
    use ParamTy::*;
    let mut kb = Kb::new(
        "attn_combine",
        &[("part", Ptr), ("out", Ptr), ("heads", U32), ("head_dim", U32), ("splits", U32)],
        BLOCK,
    );
    let (part, out, heads, hd, splits) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4));
    let h = kb.special(Special::CtaidX);
    let t = kb.special(Special::CtaidY);
    let tid = kb.tid();
    let rec = kb.add(Ty::U32, hd, 2u32);
    let rid = kb.mad(Ty::U32, t, heads, h);
    let first = kb.mul(Ty::U32, rid, splits);
    let base = kb.mul(Ty::U32, first, rec);
    let pbase = kb.index(part, base, 4);
    // M over splits.
    let mm = kb.imm(Ty::F32, NEG_BIG);
    kb.for_range(0u32, splits, 1u32, |kb, z| {
        let o = kb.mul(Ty::U32, z, rec);
        let a = kb.index(pbase, o, 4);
        let mz = kb.ld(Mem::F32, a, 0);
        kb.bin_to(BinOp::Max, mm, mm, mz);
    });
    let ll = kb.imm(Ty::F32, 0.0f32);
    kb.for_range(0u32, splits, 1u32, |kb, z| {
        let o = kb.mul(Ty::U32, z, rec);
        let a = kb.index(pbase, o, 4);
        let mz = kb.ld(Mem::F32, a, 0);
        let lz = kb.ld(Mem::F32, a, 4);
        let d = kb.sub(Ty::F32, mz, mm);
        let f = kb.exp(d);
        kb.fma_to(ll, lz, f);
    });
    let pos = kb.setp(Cmp::Gt, ll, 0.0f32);
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, ll);
    let inv = kb.selp(Ty::F32, inv, 0.0f32, pos);
    let ooff = kb.mul(Ty::U32, rid, hd);
    let orow = kb.index(out, ooff, 4);
    kb.for_range(0u32, hd, BLOCK, |kb, d0| {
        let d = kb.add(Ty::U32, d0, tid);
        let ok = kb.setp(Cmp::Lt, d, hd);
        let hd1 = kb.sub(Ty::U32, hd, 1u32);
        let dc = kb.bin(BinOp::Min, Ty::U32, d, hd1);
        let o = kb.imm(Ty::F32, 0.0f32);
        kb.for_range(0u32, splits, 1u32, |kb, z| {
            let zo = kb.mul(Ty::U32, z, rec);
            let a = kb.index(pbase, zo, 4);
            let mz = kb.ld(Mem::F32, a, 0);
            let dd = kb.sub(Ty::F32, mz, mm);
            let f = kb.exp(dd);
            let va = kb.index(a, dc, 4);
            let v = kb.ld(Mem::F32, va, 8);
            kb.fma_to(o, v, f);
        });
        let r = kb.mul(Ty::F32, o, inv);
        let oa = kb.index(orow, dc, 4);
        kb.guarded(ok, false, |kb| kb.st(Mem::F32, oa, 0, r));
    });
    kb.finish()
}

/// Index and value of the maximum of each row (greedy decoding on the device).
/// Arguments `x, out (u32 index per row), n`; grid `T`. Ties pick the lowest index.
pub fn argmax() -> Kernel {
    let mut kb = Kb::new("argmax", &[("x", ParamTy::Ptr), ("out", ParamTy::Ptr), ("n", ParamTy::U32)], BLOCK);
    let (x, out, n) = (kb.param(0), kb.param(1), kb.param(2));
    let smem_off = kb.shared(8 * BLOCK / 32);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let cta = kb.special(Special::CtaidX);
    let base = kb.mul(Ty::U32, cta, n);
    let xrow = kb.index(x, base, 4);
    let best = kb.imm(Ty::F32, f32::NEG_INFINITY);
    let bi = kb.imm(Ty::U32, u32::MAX);
    kb.for_range(0u32, n, BLOCK, |kb, i0| {
        let i = kb.add(Ty::U32, i0, tid);
        let ok = kb.setp(Cmp::Lt, i, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(xrow, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            let better = kb.setp(Cmp::Gt, v, best);
            kb.push(crate::ptx::Inst::Selp { d: best, a: v.into(), b: best.into(), p: better });
            kb.push(crate::ptx::Inst::Selp { d: bi, a: i.into(), b: bi.into(), p: better });
        });
    });
    // Warp reduce (value, index), lowest index on ties.
    for sh in [16u32, 8, 4, 2, 1] {
        let ov = kb.shfl(crate::ptx::Shfl::Bfly, best, sh);
        let oi = kb.shfl(crate::ptx::Shfl::Bfly, bi, sh);
        let gt = kb.setp(Cmp::Gt, ov, best);
        let eq = kb.setp(Cmp::Eq, ov, best);
        let lower = kb.setp(Cmp::Lt, oi, bi);
        let tie = kb.bin(BinOp::And, Ty::Pred, eq, lower);
        let take = kb.bin(BinOp::Or, Ty::Pred, gt, tie);
        kb.push(crate::ptx::Inst::Selp { d: best, a: ov.into(), b: best.into(), p: take });
        kb.push(crate::ptx::Inst::Selp { d: bi, a: oi.into(), b: bi.into(), p: take });
    }
    let first = kb.setp(Cmp::Eq, lane, 0u32);
    let slot = kb.mad(Ty::U32, warp, 8u32, smem);
    kb.guarded(first, false, |kb| {
        kb.st_shared(slot, smem_off as i32, best);
        kb.push(crate::ptx::Inst::St {
            space: crate::ptx::Space::Shared,
            mem: Mem::U32,
            addr: slot,
            off: smem_off as i32 + 4,
            v: bi.into(),
        });
    });
    kb.bar();
    let t0 = kb.setp(Cmp::Eq, tid, 0u32);
    let fb = kb.ld_shared(smem, smem_off as i32);
    let fi = kb.reg(Ty::U32);
    kb.push(crate::ptx::Inst::Ld {
        space: crate::ptx::Space::Shared,
        mem: Mem::U32,
        d: fi,
        addr: smem,
        off: smem_off as i32 + 4,
    });
    for w in 1..BLOCK / 32 {
        let o = (smem_off + 8 * w) as i32;
        let v = kb.ld_shared(smem, o);
        let i = kb.reg(Ty::U32);
        kb.push(crate::ptx::Inst::Ld { space: crate::ptx::Space::Shared, mem: Mem::U32, d: i, addr: smem, off: o + 4 });
        let gt = kb.setp(Cmp::Gt, v, fb);
        let eq = kb.setp(Cmp::Eq, v, fb);
        let lower = kb.setp(Cmp::Lt, i, fi);
        let tie = kb.bin(BinOp::And, Ty::Pred, eq, lower);
        let take = kb.bin(BinOp::Or, Ty::Pred, gt, tie);
        kb.push(crate::ptx::Inst::Selp { d: fb, a: v.into(), b: fb.into(), p: take });
        kb.push(crate::ptx::Inst::Selp { d: fi, a: i.into(), b: fi.into(), p: take });
    }
    let oa = kb.index(out, cta, 4);
    kb.guarded(t0, false, |kb| kb.st(Mem::U32, oa, 0, fi));
    kb.finish()
}

/// Weight rows, tokens and row elements one tensor-core matmul block handles per step.
pub const MMA_BM: u32 = 64;
pub const MMA_BN: u32 = 64;
pub const MMA_BK: u32 = 32;
/// Bytes per row of the shared tiles: `MMA_BK` f16 plus 8 of padding (no bank conflicts).
const MMA_STRIDE: u32 = (MMA_BK + 8) * 2;

pub fn matmul_mma_name(dtype: DType, bias: bool) -> String {
    format!("matmul_mma_{}{}", dtype.name(), if bias { "_bias" } else { "" })
}

/// Whether prefill matmuls with weights of `dtype` and rows of `k` run on tensor
/// cores: every layout whose weights are a function of their own block (kq2's
/// rotated blocks pair with rotated activations instead), `k` a multiple of 32.
pub fn mma_eligible(dtype: DType, k: u64) -> bool {
    formats::supported(dtype) && !formats::needs_rotated_x(dtype) && k.is_multiple_of(MMA_BK as u64)
}

/// The tensor-core matmul grid: blocks of `MMA_BM` rows × `MMA_BN` tokens.
pub fn matmul_mma_grid(rows: u32, t: u32) -> [u32; 3] {
    [rows.div_ceil(MMA_BM), t.div_ceil(MMA_BN).max(1), 1]
}

/// Prefill matmul on tensor cores: `y[t, r] = Σ_k w[r, k] · x[t, k] (+ bias[r])`
/// with weights decoded from their packed layout into f16 tiles in shared
/// memory (the same fused decoders as [`matmul`]), activations rounded to f16,
/// `mma.sync.m16n8k16` products accumulated in f32. A block of 4 warps computes
/// 64 rows × 64 tokens (each warp 32 × 32: 2 × 4 tiles of 16 × 8), walking `k`
/// in steps of 32. Arguments as [`matmul`] (`xr` unused); grid [`matmul_mma_grid`].
pub fn matmul_mma(dtype: DType, bias: bool) -> Kernel {
    assert!(!formats::needs_rotated_x(dtype), "kq2 prefill uses the CUDA-core matmul");
    let mut kb = Kb::new(matmul_mma_name(dtype, bias), MATMUL_PARAMS, BLOCK);
    let w = kb.param(0);
    let x = kb.param(1);
    let y = kb.param(3);
    let bias_p = kb.param(4);
    let tables = kb.param(5);
    let rows = kb.param(6);
    let k = kb.param(7);
    let t = kb.param(8);
    let row_bytes = kb.param(9);
    let a_off = kb.shared(MMA_BM * MMA_STRIDE);
    let b_off = kb.shared(MMA_BN * MMA_STRIDE);
    let smem = kb.shared_base();

    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let bm = kb.special(Special::CtaidX);
    let bn = kb.special(Special::CtaidY);
    let m0 = kb.mul(Ty::U32, bm, MMA_BM);
    let n0 = kb.mul(Ty::U32, bn, MMA_BN);
    let last_row = kb.sub(Ty::U32, rows, 1u32);
    let last_t = kb.sub(Ty::U32, t, 1u32);

    // Decode duty: groups tid and tid + 128 of the 64 × 4 groups of a step.
    let duties: Vec<(Reg, Reg, Reg)> = (0..2u32)
        .map(|j| {
            let gi = kb.add(Ty::U32, tid, j * BLOCK);
            let row_l = kb.shr(Ty::U32, gi, 2);
            let gk = kb.and(Ty::U32, gi, 3);
            let row = kb.add(Ty::U32, m0, row_l);
            let row = kb.bin(BinOp::Min, Ty::U32, row, last_row);
            let roff = kb.mul_wide(row, row_bytes);
            let wrow = kb.add(Ty::U64, w, roff);
            // Shared address of the group: row_l · stride + gk · 16 bytes.
            let sa = kb.mad(Ty::U32, row_l, MMA_STRIDE, smem);
            let sa = kb.mad(Ty::U32, gk, 16u32, sa);
            (wrow, gk, sa)
        })
        .collect();
    // Activation duty: 4 vectors of 4 floats of the 64 tokens × 32 elements.
    let xduties: Vec<(Reg, Reg)> = (0..4u32)
        .map(|j| {
            let vi = kb.add(Ty::U32, tid, j * BLOCK);
            let tok_l = kb.shr(Ty::U32, vi, 3);
            let part = kb.and(Ty::U32, vi, 7);
            let tok = kb.add(Ty::U32, n0, tok_l);
            let tok = kb.bin(BinOp::Min, Ty::U32, tok, last_t);
            let off = kb.mul(Ty::U32, tok, k);
            let off = kb.mad(Ty::U32, part, 4u32, off);
            let xa = kb.index(x, off, 4);
            let sa = kb.mad(Ty::U32, tok_l, MMA_STRIDE, smem);
            let sa = kb.mad(Ty::U32, part, 8u32, sa);
            (xa, sa)
        })
        .collect();
    // Fragment bases of this lane: rows (or tokens) 32·wm + g, byte 4q of the k step.
    let g = kb.shr(Ty::U32, lane, 2);
    let q = kb.and(Ty::U32, lane, 3);
    let wm = kb.and(Ty::U32, warp, 1);
    let wn = kb.shr(Ty::U32, warp, 1);
    let frag_base = |kb: &mut Kb, wsel: Reg| {
        let r = kb.mad(Ty::U32, wsel, 32u32, g);
        let a = kb.mad(Ty::U32, r, MMA_STRIDE, smem);
        kb.mad(Ty::U32, q, 4u32, a)
    };
    let a_base = frag_base(&mut kb, wm);
    let b_base = frag_base(&mut kb, wn);
    let acc: Vec<[Reg; 4]> = (0..8).map(|_| std::array::from_fn(|_| kb.imm(Ty::F32, 0.0f32))).collect();

    kb.for_range(0u32, k, MMA_BK, |kb, k0| {
        let g0 = kb.shr(Ty::U32, k0, 3);
        for &(wrow, gk, sa) in &duties {
            let gg = kb.add(Ty::U32, g0, gk);
            let grp = formats::decode8(kb, dtype, wrow, gg, tables);
            for j in 0..4 {
                let p = kb.pack_f16x2(grp.w[2 * j + 1], grp.w[2 * j]);
                kb.st_shared_u32(sa, (a_off + 4 * j as u32) as i32, p);
            }
        }
        let k0b = kb.shl(Ty::U32, k0, 2);
        let k0b = kb.cvt(Ty::U64, k0b);
        for &(xa, sa) in &xduties {
            let a = kb.add(Ty::U64, xa, k0b);
            let v = kb.ld_v4(a, 0);
            let p0 = kb.pack_f16x2(v[1], v[0]);
            let p1 = kb.pack_f16x2(v[3], v[2]);
            kb.st_shared_u32(sa, b_off as i32, p0);
            kb.st_shared_u32(sa, b_off as i32 + 4, p1);
        }
        kb.bar();
        for ks in 0..MMA_BK / 16 {
            let kbyte = (ks * 32) as i32;
            let afr: Vec<[Reg; 4]> = (0..2u32)
                .map(|mt| {
                    let o = (a_off + mt * 16 * MMA_STRIDE) as i32 + kbyte;
                    let s8 = (8 * MMA_STRIDE) as i32;
                    [
                        kb.ld_shared_u32(a_base, o),
                        kb.ld_shared_u32(a_base, o + s8),
                        kb.ld_shared_u32(a_base, o + 16),
                        kb.ld_shared_u32(a_base, o + s8 + 16),
                    ]
                })
                .collect();
            for nt in 0..4u32 {
                let o = (b_off + nt * 8 * MMA_STRIDE) as i32 + kbyte;
                let bfr = [kb.ld_shared_u32(b_base, o), kb.ld_shared_u32(b_base, o + 16)];
                for (mt, a) in afr.iter().enumerate() {
                    kb.mma_to(acc[mt * 4 + nt as usize], *a, bfr);
                }
            }
        }
        kb.bar();
    });

    // Epilogue: c0, c1 at (row g, tokens 2q, 2q+1); c2, c3 at row g + 8.
    let row_w = kb.mad(Ty::U32, wm, 32u32, m0);
    let row_w = kb.add(Ty::U32, row_w, g);
    let tok_w = kb.mad(Ty::U32, wn, 32u32, n0);
    let q2 = kb.shl(Ty::U32, q, 1);
    let tok_w = kb.add(Ty::U32, tok_w, q2);
    for mt in 0..2u32 {
        for half in 0..2u32 {
            let r = kb.add(Ty::U32, row_w, mt * 16 + half * 8);
            let r_ok = kb.setp(Cmp::Lt, r, rows);
            let rc = kb.bin(BinOp::Min, Ty::U32, r, last_row);
            let bv = bias.then(|| {
                let a = kb.index(bias_p, rc, 4);
                kb.ld(Mem::F32, a, 0)
            });
            for nt in 0..4u32 {
                for c in 0..2u32 {
                    let tok = kb.add(Ty::U32, tok_w, nt * 8 + c);
                    let t_ok = kb.setp(Cmp::Lt, tok, t);
                    let ok = kb.bin(BinOp::And, Ty::Pred, r_ok, t_ok);
                    let mut v = acc[(mt * 4 + nt) as usize][(half * 2 + c) as usize];
                    if let Some(b) = bv {
                        v = kb.add(Ty::F32, v, b);
                    }
                    let idx = kb.mad(Ty::U32, tok, rows, rc);
                    let ya = kb.index(y, idx, 4);
                    kb.guarded(ok, false, |kb| kb.st(Mem::F32, ya, 0, v));
                }
            }
        }
    }
    kb.finish()
}

/// The `k` largest values of one row, in (value descending, index ascending)
/// order: `k` rounds, each a block-wide maximum over the elements that come
/// after the previous pick in that order (NaN never qualifies). Arguments `x, out
/// (k pairs of u32 index and f32 bits; index u32::MAX when fewer are finite), n,
/// k`; grid 1.
pub fn top_k() -> Kernel {
    use ParamTy::*;
    let mut kb = Kb::new("top_k", &[("x", Ptr), ("out", Ptr), ("n", U32), ("k", U32)], BLOCK);
    let (x, out, n, k) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let warps = BLOCK / 32;
    let red_off = kb.shared(8 * warps);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let lane = kb.and(Ty::U32, tid, 31);
    let warp = kb.shr(Ty::U32, tid, 5);
    let pv = kb.imm(Ty::F32, f32::INFINITY);
    let pi = kb.imm(Ty::U32, 0u32);
    kb.for_range(0u32, k, 1u32, |kb, r| {
        let first = kb.setp(Cmp::Eq, r, 0u32);
        let best = kb.imm(Ty::F32, f32::NEG_INFINITY);
        let bi = kb.imm(Ty::U32, u32::MAX);
        kb.for_range(0u32, n, BLOCK, |kb, i0| {
            let i = kb.add(Ty::U32, i0, tid);
            let in_row = kb.setp(Cmp::Lt, i, n);
            let ic = kb.sub(Ty::U32, n, 1u32);
            let ic = kb.bin(BinOp::Min, Ty::U32, i, ic);
            let a = kb.index(x, ic, 4);
            let v = kb.ld(Mem::F32, a, 0);
            // After the previous pick: first round, or v < pv, or (v == pv and i > pi).
            let lt = kb.setp(Cmp::Lt, v, pv);
            let eq = kb.setp(Cmp::Eq, v, pv);
            let gi = kb.setp(Cmp::Gt, i, pi);
            let tie = kb.bin(BinOp::And, Ty::Pred, eq, gi);
            let after = kb.bin(BinOp::Or, Ty::Pred, lt, tie);
            let after = kb.bin(BinOp::Or, Ty::Pred, after, first);
            let not_nan = kb.setp(Cmp::Eq, v, v);
            let ok = kb.bin(BinOp::And, Ty::Pred, after, not_nan);
            let ok = kb.bin(BinOp::And, Ty::Pred, ok, in_row);
            // Better than this thread's best: greater, or equal with a lower index.
            let gt = kb.setp(Cmp::Gt, v, best);
            let eqb = kb.setp(Cmp::Eq, v, best);
            let lower = kb.setp(Cmp::Lt, i, bi);
            let tieb = kb.bin(BinOp::And, Ty::Pred, eqb, lower);
            let better = kb.bin(BinOp::Or, Ty::Pred, gt, tieb);
            let take = kb.bin(BinOp::And, Ty::Pred, better, ok);
            kb.push(crate::ptx::Inst::Selp { d: best, a: v.into(), b: best.into(), p: take });
            kb.push(crate::ptx::Inst::Selp { d: bi, a: i.into(), b: bi.into(), p: take });
        });
        // Warp, then block reduction of (value, index), lowest index on ties.
        let merge = |kb: &mut Kb, ov: Reg, oi: Reg| {
            let gt = kb.setp(Cmp::Gt, ov, best);
            let eq = kb.setp(Cmp::Eq, ov, best);
            let lower = kb.setp(Cmp::Lt, oi, bi);
            let tie = kb.bin(BinOp::And, Ty::Pred, eq, lower);
            let take = kb.bin(BinOp::Or, Ty::Pred, gt, tie);
            kb.push(crate::ptx::Inst::Selp { d: best, a: ov.into(), b: best.into(), p: take });
            kb.push(crate::ptx::Inst::Selp { d: bi, a: oi.into(), b: bi.into(), p: take });
        };
        for sh in [16u32, 8, 4, 2, 1] {
            let ov = kb.shfl(crate::ptx::Shfl::Bfly, best, sh);
            let oi = kb.shfl(crate::ptx::Shfl::Bfly, bi, sh);
            merge(kb, ov, oi);
        }
        let lane0 = kb.setp(Cmp::Eq, lane, 0u32);
        let slot = kb.mad(Ty::U32, warp, 8u32, smem);
        kb.guarded(lane0, false, |kb| {
            kb.st_shared(slot, red_off as i32, best);
            kb.st_shared_u32(slot, red_off as i32 + 4, bi);
        });
        kb.bar();
        for w in 0..warps {
            let o = (red_off + 8 * w) as i32;
            let ov = kb.ld_shared(smem, o);
            let oi = kb.ld_shared_u32(smem, o + 4);
            merge(kb, ov, oi);
        }
        // Every thread now holds the block's pick; thread 0 writes it.
        let t0 = kb.setp(Cmp::Eq, tid, 0u32);
        let oa = kb.index(out, r, 8);
        let bits = kb.bits(Ty::U32, best);
        kb.guarded(t0, false, |kb| {
            kb.st(Mem::U32, oa, 0, bi);
            kb.st(Mem::U32, oa, 4, bits);
        });
        kb.mov_to(pv, best);
        kb.mov_to(pi, bi);
        kb.bar();
    });
    kb.finish()
}

pub fn kv_append_q_name(dtype: DType) -> String {
    format!("kv_append_{}", dtype.name())
}

pub fn kv_dequant_name(dtype: DType) -> String {
    format!("kv_dequant_{}", dtype.name())
}

/// `H/8` on 64 values (the reference KV cache's rotation, `kiln_quant::kq2::fwht64` then
/// `× 0.125`: the same butterflies in the same order, so the values are bit-identical).
fn rotate64_regs(kb: &mut Kb, v: &mut [Reg]) {
    let mut h = 1;
    while h < 64 {
        for i in (0..64).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = kb.add(Ty::F32, a, b);
                v[j + h] = kb.sub(Ty::F32, a, b);
            }
        }
        h *= 2;
    }
    for x in v.iter_mut() {
        *x = kb.mul(Ty::F32, *x, 0.125f32);
    }
}

/// `1/d`, or 0 where `d` is 0 (ggml's `id`).
fn inverse_or_zero(kb: &mut Kb, d: Reg) -> Reg {
    let zero = kb.setp(Cmp::Eq, d, 0.0f32);
    let inv = kb.bin(BinOp::Div, Ty::F32, 1.0f32, d);
    kb.selp(Ty::F32, 0.0f32, inv, zero)
}

/// Stores `d` as an f16 (round to nearest even) at `addr + off`.
fn st_f16(kb: &mut Kb, addr: Reg, off: i32, d: Reg) {
    let zero = kb.imm(Ty::F32, 0.0f32);
    let packed = kb.pack_f16x2(zero, d);
    kb.st(Mem::U16, addr, off, packed);
}

/// Quantizes 32 values into one ggml block at `addr + off`, exactly as
/// `kiln_quant::quantize_row` does (`q8_0`: `round(x/d)`, `d = amax/127`; `q4_0`:
/// `trunc(x/d + 8.5)` clamped, `d = max/-8` of the value with the largest magnitude;
/// `f8_e4m3`: each value rounded to FP8, 32 bytes).
fn quantize_block(kb: &mut Kb, dtype: DType, x: &[Reg], addr: Reg, off: i32) {
    match dtype {
        DType::Q8_0 => {
            let mut amax = kb.imm(Ty::F32, 0.0f32);
            for &v in x {
                let a = kb.un(UnOp::Abs, Ty::F32, v);
                amax = kb.bin(BinOp::Max, Ty::F32, amax, a);
            }
            let d = kb.bin(BinOp::Div, Ty::F32, amax, 127.0f32);
            let id = inverse_or_zero(kb, d);
            st_f16(kb, addr, off, d);
            for (i, &v) in x.iter().enumerate() {
                // Round half away from zero (Rust's `round`, C's `roundf`).
                let y = kb.mul(Ty::F32, v, id);
                let t = kb.cvt(Ty::S32, y);
                let tf = kb.cvt(Ty::F32, t);
                let fr = kb.sub(Ty::F32, y, tf);
                let afr = kb.un(UnOp::Abs, Ty::F32, fr);
                let big = kb.setp(Cmp::Ge, afr, 0.5f32);
                let neg = kb.setp(Cmp::Lt, y, 0.0f32);
                let step = kb.selp(Ty::S32, -1i32, 1i32, neg);
                let step = kb.selp(Ty::S32, step, 0i32, big);
                let q = kb.add(Ty::S32, t, step);
                let q = kb.bits(Ty::U32, q);
                kb.st(Mem::U8, addr, off + 2 + i as i32, q);
            }
        }
        DType::Q4_0 => {
            let mut amax = kb.imm(Ty::F32, 0.0f32);
            let mut max = kb.imm(Ty::F32, 0.0f32);
            for &v in x {
                let a = kb.un(UnOp::Abs, Ty::F32, v);
                let gt = kb.setp(Cmp::Lt, amax, a);
                amax = kb.selp(Ty::F32, a, amax, gt);
                max = kb.selp(Ty::F32, v, max, gt);
            }
            let d = kb.bin(BinOp::Div, Ty::F32, max, -8.0f32);
            let id = inverse_or_zero(kb, d);
            st_f16(kb, addr, off, d);
            let quant = |kb: &mut Kb, v: Reg| {
                let y = kb.mul(Ty::F32, v, id);
                let y = kb.add(Ty::F32, y, 8.5f32);
                let t = kb.cvt(Ty::S32, y);
                let t = kb.bin(BinOp::Max, Ty::S32, t, 0i32);
                let t = kb.bin(BinOp::Min, Ty::S32, t, 15i32);
                kb.bits(Ty::U32, t)
            };
            for j in 0..16 {
                let q0 = quant(kb, x[j]);
                let q1 = quant(kb, x[j + 16]);
                let hi = kb.shl(Ty::U32, q1, 4u32);
                let byte = kb.bin(BinOp::Or, Ty::U32, q0, hi);
                kb.st(Mem::U8, addr, off + 2 + j as i32, byte);
            }
        }
        DType::F8E4M3 => {
            // Four codes per little-endian word.
            for (w, four) in x.chunks(4).enumerate() {
                let mut word = crate::formats::f32_to_f8e4m3(kb, four[0]);
                for (i, &v) in four.iter().enumerate().skip(1) {
                    let c = crate::formats::f32_to_f8e4m3(kb, v);
                    let c = kb.shl(Ty::U32, c, 8 * i as u32);
                    word = kb.bin(BinOp::Or, Ty::U32, word, c);
                }
                kb.st(Mem::U32, addr, off + 4 * w as i32, word);
            }
        }
        other => panic!("no quantized KV cache of type {other}"),
    }
}

/// Bytes of 32 consecutive values of a quantized KV-cache row: one ggml block (`q8_0`,
/// `q4_0`) or 32 FP8 bytes.
pub fn kv_block_bytes(dtype: DType) -> u32 {
    dtype.row_bytes(32).unwrap_or(0) as u32
}

/// The 32 values of the ggml block (or FP8 bytes) at `addr + off`.
fn dequantize_block(kb: &mut Kb, dtype: DType, addr: Reg, off: i32) -> Vec<Reg> {
    if dtype == DType::F8E4M3 {
        let mut out = Vec::with_capacity(32);
        for w in 0..8 {
            let word = kb.ld(Mem::U32, addr, off + 4 * w);
            for i in 0..4 {
                let b = if i == 0 { word } else { kb.shr(Ty::U32, word, 8 * i as u32) };
                let b = kb.and(Ty::U32, b, 0xffu32);
                out.push(crate::formats::f8e4m3_to_f32(kb, b));
            }
        }
        return out;
    }
    let dh = kb.ld(Mem::B16, addr, off);
    let d = kb.f16_to_f32(dh);
    match dtype {
        DType::Q8_0 => (0..32)
            .map(|i| {
                let q = kb.ld(Mem::S8, addr, off + 2 + i);
                let qf = kb.cvt(Ty::F32, q);
                kb.mul(Ty::F32, qf, d)
            })
            .collect(),
        DType::Q4_0 => {
            let mut out = vec![d; 32];
            for j in 0..16 {
                let b = kb.ld(Mem::U8, addr, off + 2 + j as i32);
                let lo = kb.and(Ty::U32, b, 15);
                let hi = kb.shr(Ty::U32, b, 4u32);
                for (slot, q) in [(j, lo), (j + 16, hi)] {
                    let qs = kb.bits(Ty::S32, q);
                    let qs = kb.sub(Ty::S32, qs, 8i32);
                    let qf = kb.cvt(Ty::F32, qs);
                    out[slot] = kb.mul(Ty::F32, qf, d);
                }
            }
            out
        }
        other => panic!("no quantized KV cache of type {other}"),
    }
}

/// Appends `T` new rows of k and v to a quantized KV-cache slot at the step's position:
/// one thread per 64 values (a row is `width / 64` of them), rotated by `H/8` and stored as
/// two ggml blocks, bit for bit what the reference cache stores. Arguments `k, v, kc, vc,
/// step, n (= T·width/64), width, rows, sink` (the slot's ring); grid `ceil(n / 128)`.
pub fn kv_append_q(dtype: DType) -> Kernel {
    let mut kb = Kb::new(kv_append_q_name(dtype), &KV_APPEND_PARAMS, BLOCK);
    let (k, v, kc, vc, step, n, width) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let (rows, sink) = (kb.param(7), kb.param(8));
    let bb = kv_block_bytes(dtype);
    let pos = kb.ld(Mem::U32, step, STEP_POS);
    let (c, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let cpr = kb.shr(Ty::U32, width, 6u32);
        let r = kb.bin(BinOp::Div, Ty::U32, c, cpr);
        let rc = kb.mul(Ty::U32, r, cpr);
        let j = kb.sub(Ty::U32, c, rc);
        let src = kb.mul(Ty::U32, r, width);
        let src = kb.mad(Ty::U32, j, 64u32, src);
        let blocks = kb.shr(Ty::U32, width, 5u32);
        let row_bytes = kb.mul(Ty::U32, blocks, bb);
        let prow = kb.add(Ty::U32, pos, r);
        let prow = ring_row(kb, prow, rows, sink);
        let dst = kb.mul(Ty::U32, prow, row_bytes);
        let dst = kb.mad(Ty::U32, j, 2 * bb, dst);
        for (x, cache) in [(k, kc), (v, vc)] {
            let a = kb.index(x, src, 4);
            let mut vals: Vec<Reg> = (0..64).map(|i| kb.ld(Mem::F32, a, 4 * i)).collect();
            rotate64_regs(kb, &mut vals);
            let out = kb.index(cache, dst, 1);
            quantize_block(kb, dtype, &vals[..32], out, 0);
            quantize_block(kb, dtype, &vals[32..], out, bb as i32);
        }
    });
    kb.finish()
}

/// Dequantizes a quantized KV-cache slot's rows `0 .. pos + t` into f32 scratch rows (rotated
/// back), for the attention kernel: one thread per 64 values; threads past the rows in use
/// return, so the grid (`ceil(max_context·width/64 / 128)`) does not depend on the position
/// and a recorded decode step replays. Arguments `kc, vc, kf, vf, step, t, width, rows`
/// (the slot's rows: a ring's are dequantized row for row, in ring order).
pub fn kv_dequant(dtype: DType) -> Kernel {
    use ParamTy::*;
    let mut kb = Kb::new(
        kv_dequant_name(dtype),
        &[("kc", Ptr), ("vc", Ptr), ("kf", Ptr), ("vf", Ptr), ("step", Ptr), ("t", U32), ("width", U32), ("rows", U32)],
        BLOCK,
    );
    let (kc, vc, kf, vf, step, t, width) =
        (kb.param(0), kb.param(1), kb.param(2), kb.param(3), kb.param(4), kb.param(5), kb.param(6));
    let slot_rows = kb.param(7);
    let bb = kv_block_bytes(dtype);
    let pos = kb.ld(Mem::U32, step, STEP_POS);
    // The slot's rows in use (a ring holds at most `rows`), row for row into the scratch.
    let rows = kb.add(Ty::U32, pos, t);
    let rows = kb.bin(BinOp::Min, Ty::U32, rows, slot_rows);
    let cpr = kb.shr(Ty::U32, width, 6u32);
    let n = kb.mul(Ty::U32, rows, cpr);
    let (c, ok) = elem_index(&mut kb, n);
    kb.guarded(ok, false, |kb| {
        let r = kb.bin(BinOp::Div, Ty::U32, c, cpr);
        let rc = kb.mul(Ty::U32, r, cpr);
        let j = kb.sub(Ty::U32, c, rc);
        let blocks = kb.shr(Ty::U32, width, 5u32);
        let row_bytes = kb.mul(Ty::U32, blocks, bb);
        let src = kb.mul(Ty::U32, r, row_bytes);
        let src = kb.mad(Ty::U32, j, 2 * bb, src);
        let dst = kb.mul(Ty::U32, r, width);
        let dst = kb.mad(Ty::U32, j, 64u32, dst);
        for (cache, f) in [(kc, kf), (vc, vf)] {
            let a = kb.index(cache, src, 1);
            let mut vals = dequantize_block(kb, dtype, a, 0);
            vals.extend(dequantize_block(kb, dtype, a, bb as i32));
            rotate64_regs(kb, &mut vals);
            let o = kb.index(f, dst, 4);
            for (i, &x) in vals.iter().enumerate() {
                kb.st(Mem::F32, o, 4 * i as i32, x);
            }
        }
    });
    kb.finish()
}

#[cfg(test)]
mod fp8_tests {
    use super::*;
    use crate::emu::{Arg, EmuMemory, launch};

    /// `x → code, value(code)` for each input, through the kernels' FP8 helpers.
    fn convert(xs: &[f32]) -> (Vec<u8>, Vec<f32>) {
        use ParamTy::*;
        let mut kb = Kb::new("fp8_round_trip", &[("x", Ptr), ("codes", Ptr), ("back", Ptr), ("n", U32)], BLOCK);
        let (x, codes, back, n) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
        let (i, ok) = elem_index(&mut kb, n);
        kb.guarded(ok, false, |kb| {
            let a = kb.index(x, i, 4);
            let v = kb.ld(Mem::F32, a, 0);
            let c = crate::formats::f32_to_f8e4m3(kb, v);
            let ca = kb.index(codes, i, 4);
            kb.st(Mem::U32, ca, 0, c);
            let f = crate::formats::f8e4m3_to_f32(kb, c);
            let ba = kb.index(back, i, 4);
            kb.st(Mem::F32, ba, 0, f);
        });
        let k = kb.finish();
        let mut mem = EmuMemory::new();
        let bytes: Vec<u8> = xs.iter().flat_map(|v| v.to_le_bytes()).collect();
        let xa = mem.alloc(bytes.len());
        mem.write(xa, &bytes).unwrap();
        let (ca, ba) = (mem.alloc(bytes.len()), mem.alloc(bytes.len()));
        let grid = [(xs.len() as u32).div_ceil(BLOCK), 1, 1];
        launch(&mut mem, &k, grid, &[Arg::Ptr(xa), Arg::Ptr(ca), Arg::Ptr(ba), Arg::U32(xs.len() as u32)]).unwrap();
        let mut out = vec![0u8; bytes.len()];
        mem.read(ca, &mut out).unwrap();
        let codes = out.chunks_exact(4).map(|c| c[0]).collect();
        mem.read(ba, &mut out).unwrap();
        (codes, out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }

    #[test]
    fn fp8_conversion_matches_kiln_quant_bit_for_bit() {
        use kiln_quant::{f8e4m3_to_f32, f32_to_f8e4m3_bits};
        // Every code's value, the midpoints between neighbours and one ulp either side,
        // out-of-range values, infinities, NaN, subnormal f32s and random bit patterns.
        let mut xs = vec![0.0f32, -0.0, 1e-40, -1e-40, 448.0, 449.0, 464.0, 1e30, f32::INFINITY, f32::NEG_INFINITY];
        xs.push(f32::NAN);
        let vals: Vec<f32> = (0..=0x7eu8).map(f8e4m3_to_f32).collect();
        for w in vals.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            for v in [w[0], mid] {
                xs.extend([v, -v, f32::from_bits(v.to_bits() + 1), f32::from_bits(v.to_bits().saturating_sub(1))]);
            }
        }
        let mut s = 0x9e37_79b9u32;
        for _ in 0..4000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push(f32::from_bits(s & 0xc3ff_ffff));
        }
        let (codes, back) = convert(&xs);
        for ((x, c), b) in xs.iter().zip(&codes).zip(&back) {
            let want = f32_to_f8e4m3_bits(*x);
            assert_eq!(*c, want, "{x:e}");
            let wv = f8e4m3_to_f32(want);
            assert!(b.to_bits() == wv.to_bits() || (b.is_nan() && wv.is_nan()), "{want:#04x}: {b} vs {wv}");
        }
    }
}
