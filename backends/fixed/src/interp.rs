//! The integer interpreter: runs a [`Program`] one token at a time. It is the
//! definition the emitted C library (`c/kiln_ops.c` + the generated step list) must
//! reproduce bit for bit, on the host and on a Cortex-M.

use rayon::prelude::*;

use crate::int::{self, exp_neg, quantize16, rshr, sat32, shift_round};
use crate::program::*;

/// Errors of a forward step (the C library returns the same cases as negative codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    Context { max: usize },
    Token { id: u32, vocab: usize },
}

struct Cache {
    k: Vec<i16>,
    v: Vec<i16>,
    ks: Vec<u8>,
    vs: Vec<u8>,
}

/// The state of a running program: arena, scratch and KV cache.
pub struct Machine {
    program: Program,
    arena: Vec<i32>,
    scratch: Vec<i16>,
    scores: Vec<i32>,
    caches: Vec<Cache>,
    pos: usize,
}

fn u8s(d: &Data) -> &[u8] {
    match d {
        Data::U8(v) => v,
        _ => unreachable!("the lowering types every constant"),
    }
}
fn i8s(d: &Data) -> &[i8] {
    match d {
        Data::I8(v) => v,
        _ => unreachable!("the lowering types every constant"),
    }
}
fn i16s(d: &Data) -> &[i16] {
    match d {
        Data::I16(v) => v,
        _ => unreachable!("the lowering types every constant"),
    }
}
fn i32s(d: &Data) -> &[i32] {
    match d {
        Data::I32(v) => v,
        _ => unreachable!("the lowering types every constant"),
    }
}

impl Machine {
    pub fn new(program: Program) -> Machine {
        let caches = program
            .slots
            .iter()
            .map(|s| {
                let n = s.rows * s.kv_heads;
                let g = n * s.groups();
                Cache { k: vec![0; n * s.head_dim], v: vec![0; n * s.head_dim], ks: vec![0; g], vs: vec![0; g] }
            })
            .collect();
        Machine {
            arena: vec![0; program.arena],
            scratch: vec![0; program.scratch16],
            scores: vec![0; program.scores],
            caches,
            pos: 0,
            program,
        }
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Forgets positions at and after `pos` (a ring slot cannot give back rows it has
    /// overwritten: `FixedSession` refuses rollbacks of more than one position then).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Runs one token at the next position; returns its Q16 logits.
    pub fn step(&mut self, token: u32) -> Result<&[i32], StepError> {
        let p = &self.program;
        if self.pos >= p.max_context {
            return Err(StepError::Context { max: p.max_context });
        }
        if token as usize >= p.vocab_rows {
            return Err(StepError::Token { id: token, vocab: p.vocab_rows });
        }
        let pos = self.pos;
        let exp2 = i32s(p.data(p.exp2));
        for step in &p.steps {
            run_step(
                p,
                step,
                token as usize,
                pos,
                exp2,
                &mut self.arena,
                &mut self.scratch,
                &mut self.scores,
                &mut self.caches,
            );
        }
        self.pos += 1;
        let l = p.logits;
        Ok(&self.arena[l.off..l.off + l.len])
    }
}

/// `out = in` as a copy of the arena range (inputs and outputs never overlap).
fn split(arena: &mut [i32], a: Buf, out: Buf) -> (&[i32], &mut [i32]) {
    debug_assert!(a.off + a.len <= out.off || out.off + out.len <= a.off);
    if a.off < out.off {
        let (lo, hi) = arena.split_at_mut(out.off);
        (&lo[a.off..a.off + a.len], &mut hi[..out.len])
    } else {
        let (lo, hi) = arena.split_at_mut(a.off);
        (&hi[..a.len], &mut lo[out.off..out.off + out.len])
    }
}

// Index loops on purpose: each step reads like its C twin in `c/kiln_ops.c`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn run_step(
    p: &Program,
    step: &Step,
    token: usize,
    pos: usize,
    exp2: &[i32],
    arena: &mut [i32],
    scratch: &mut [i16],
    scores: &mut [i32],
    caches: &mut [Cache],
) {
    match step {
        Step::Embed { table, out } if table.format == RowFormat::Q4 => {
            let groups = table.cols / 32;
            let w = &u8s(p.data(table.w))[token * groups * 16..(token + 1) * groups * 16];
            let mult = &i16s(p.data(table.mult))[token * groups..(token + 1) * groups];
            let s = i32s(p.data(table.shift))[token];
            let y = &mut arena[out.off..out.off + out.len];
            for (i, d) in y.iter_mut().enumerate() {
                let b = w[i / 2];
                let q = if i % 2 == 0 { b & 15 } else { b >> 4 } as i64 - 8;
                *d = sat32(shift_round(q * mult[i / 32] as i64, s - 16));
            }
        }
        Step::Embed { table, out } => {
            let w = &i8s(p.data(table.w))[token * table.cols..(token + 1) * table.cols];
            let (m, s) = (i32s(p.data(table.mult))[token] as i64, i32s(p.data(table.shift))[token]);
            for (d, x) in arena[out.off..out.off + out.len].iter_mut().zip(w) {
                *d = sat32(shift_round(*x as i64 * m, s - 16));
            }
        }
        Step::RmsNorm { x, out, group, gamma, eps_q } => {
            let gamma = gamma.map(|g| i32s(p.data(g)));
            let (xs, ys) = split(arena, *x, *out);
            for (gi, (xg, yg)) in xs.chunks(*group).zip(ys.chunks_mut(*group)).enumerate() {
                let g = gamma.map(|g| &g[gi * group % g.len()..]);
                rms_norm(xg, yg, g, *eps_q);
            }
        }
        Step::MatMul { x, out, w, bias } => {
            let (xs, ys) = split(arena, *x, *out);
            let sh = quantize16(xs, &mut scratch[..x.len]) as i32;
            let m: &[i16] = &scratch[..x.len];
            let bias = bias.map(|b| i32s(p.data(b)));
            // Rows are independent and integer sums exact: any split over threads gives the
            // same bits (large matrices only; small ones are not worth a fork).
            let par = w.rows * w.cols >= 1 << 16;
            if w.format == RowFormat::Q4 {
                let (wq, gm, shift) = (u8s(p.data(w.w)), i16s(p.data(w.mult)), i32s(p.data(w.shift)));
                let groups = w.cols / 32;
                let row = |(r, y): (usize, &mut i32)| {
                    let mut acc = 0i64;
                    for g in 0..groups {
                        let bytes = &wq[(r * groups + g) * 16..(r * groups + g + 1) * 16];
                        let mut dot = 0i32;
                        for (k, b) in bytes.iter().enumerate() {
                            dot += m[g * 32 + 2 * k] as i32 * ((b & 15) as i32 - 8);
                            dot += m[g * 32 + 2 * k + 1] as i32 * ((b >> 4) as i32 - 8);
                        }
                        acc += gm[r * groups + g] as i64 * dot as i64;
                    }
                    let v = shift_round(acc, shift[r] - sh) + bias.map_or(0, |b| b[r] as i64);
                    *y = sat32(v);
                };
                if par {
                    ys.par_iter_mut().enumerate().for_each(row);
                } else {
                    ys.iter_mut().enumerate().for_each(row);
                }
                return;
            }
            let wq = i8s(p.data(w.w));
            let (mult, shift) = (i32s(p.data(w.mult)), i32s(p.data(w.shift)));
            let row = |(r, y): (usize, &mut i32)| {
                let wr = &wq[r * w.cols..(r + 1) * w.cols];
                // i32 partial sums of 256 products (each below 2^22) are exact.
                let mut acc = 0i64;
                for (mc, wc) in m.chunks(256).zip(wr.chunks(256)) {
                    acc += mc.iter().zip(wc).map(|(a, b)| *a as i32 * *b as i32).sum::<i32>() as i64;
                }
                let v = shift_round(acc * mult[r] as i64, shift[r] - sh) + bias.map_or(0, |b| b[r] as i64);
                *y = sat32(v);
            };
            if par {
                ys.par_iter_mut().enumerate().for_each(row);
            } else {
                ys.iter_mut().enumerate().for_each(row);
            }
        }
        Step::Add { a, b, out } | Step::Mul { a, b, out } => {
            let mul = matches!(step, Step::Mul { .. });
            for i in 0..out.len {
                let (u, v) = (arena[a.off + i] as i64, arena[b.off + i] as i64);
                arena[out.off + i] = sat32(if mul { rshr(u * v, 16) } else { u + v });
            }
        }
        Step::Scale { x, out, mult, shift } => {
            for i in 0..out.len {
                arena[out.off + i] = sat32(shift_round(arena[x.off + i] as i64 * *mult as i64, *shift));
            }
        }
        Step::Act { x, out, kind } => {
            for i in 0..out.len {
                arena[out.off + i] = act(*kind, arena[x.off + i], exp2);
            }
        }
        Step::Glu { gate, up, out, kind } => {
            for i in 0..out.len {
                let g = act(*kind, arena[gate.off + i], exp2) as i64;
                arena[out.off + i] = sat32(rshr(g * arena[up.off + i] as i64, 16));
            }
        }
        Step::Rope { x, out, table, head_dim, rot, neox } => {
            let half = rot / 2;
            let cs = &i16s(p.data(*table))[pos * half * 2..(pos + 1) * half * 2];
            let (xs, ys) = split(arena, *x, *out);
            ys.copy_from_slice(xs);
            for head in ys.chunks_mut(*head_dim) {
                for i in 0..half {
                    let (i0, i1) = if *neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (c, s) = (cs[2 * i] as i64, cs[2 * i + 1] as i64);
                    let (x0, x1) = (head[i0] as i64, head[i1] as i64);
                    head[i0] = sat32(rshr(x0 * c - x1 * s, 14));
                    head[i1] = sat32(rshr(x0 * s + x1 * c, 14));
                }
            }
        }
        Step::Attention { q, kv, out, slot, heads, kv_heads, head_dim, mult, shift, window, sink, softcap } => {
            let hd = *head_dim;
            let c = &mut caches[*slot];
            let sl = p.slots[*slot];
            let (gs, ng) = (sl.group(), sl.groups());
            let wr = sl.row(pos);
            if let Some((k, v)) = kv {
                let quantize = match sl.bits {
                    8 => int::quantize8,
                    4 => int::quantize4,
                    _ => quantize16,
                };
                for h in 0..*kv_heads {
                    let at = (wr * kv_heads + h) * hd;
                    for g in 0..ng {
                        let (e, sh) = (at + g * gs, (wr * kv_heads + h) * ng + g);
                        let ks = &arena[k.off + h * hd + g * gs..k.off + h * hd + (g + 1) * gs];
                        c.ks[sh] = quantize(ks, &mut c.k[e..e + gs]) as u8;
                        let vs = &arena[v.off + h * hd + g * gs..v.off + h * hd + (g + 1) * gs];
                        c.vs[sh] = quantize(vs, &mut c.v[e..e + gs]) as u8;
                    }
                }
            }
            // Keys in order: the sinks before the window, then the window; key `jj` is
            // position `jj` or `jj − s + lo`, held in row `sl.row(position)`.
            let lo = if *window > 0 && pos + 1 > *window { pos + 1 - window } else { 0 };
            let s = (*sink).min(lo);
            let n = pos + 1 - lo + s;
            let row = |jj: usize| sl.row(if jj < s { jj } else { jj - s + lo });
            let group = heads / kv_heads;
            for h in 0..*heads {
                let kvh = h / group;
                let mq = &mut scratch[..hd];
                let shq = quantize16(&arena[q.off + h * hd..q.off + (h + 1) * hd], mq) as i32;
                let mut mx = i32::MIN;
                for jj in 0..n {
                    let j = row(jj);
                    let at = (j * kv_heads + kvh) * hd;
                    let shs = &c.ks[(j * kv_heads + kvh) * ng..(j * kv_heads + kvh + 1) * ng];
                    // Groups with different shifts are aligned to the largest (rounding the others).
                    let shk = shs.iter().copied().max().unwrap_or(0) as i32;
                    let mut dot = 0i64;
                    for ((qg, kg), &s) in mq.chunks(gs).zip(c.k[at..at + hd].chunks(gs)).zip(shs) {
                        let mut d = 0i64;
                        for (a, b) in qg.iter().zip(kg) {
                            d += (*a as i32 * *b as i32) as i64;
                        }
                        dot += shift_round(d, shk - s as i32);
                    }
                    let mut sc = sat32(shift_round(dot * *mult as i64, shift + 16 - shq - shk));
                    if let Some([(m1, s1), (m2, s2)]) = softcap {
                        let z = shift_round(sc as i64 * *m1 as i64, *s1);
                        let t = 2 * int::sigmoid(z, exp2) - 65536;
                        sc = sat32(shift_round(t * *m2 as i64, *s2));
                    }
                    scores[jj] = sc;
                    mx = mx.max(sc);
                }
                let mut total = 0i64;
                for s in &mut scores[..n] {
                    *s = exp_neg(mx as i64 - *s as i64, exp2) as i32;
                    total += *s as i64;
                }
                for d in 0..hd {
                    let mut acc = 0i64;
                    for (jj, &sc) in scores[..n].iter().enumerate() {
                        let j = row(jj);
                        let at = (j * kv_heads + kvh) * hd + d;
                        let vv = (c.v[at] as i64) << c.vs[(j * kv_heads + kvh) * ng + d / gs];
                        acc += sc as i64 * vv;
                    }
                    arena[out.off + h * hd + d] = sat32(int::div_round(acc, total));
                }
            }
        }
    }
}

fn act(kind: ActKind, x: i32, exp2: &[i32]) -> i32 {
    match kind {
        ActKind::Silu => int::silu(x, exp2),
        ActKind::GeluTanh => int::gelu_tanh(x, exp2),
    }
}

/// RMS normalization of one group (see `int.rs` for the steps' rounding).
fn rms_norm(x: &[i32], y: &mut [i32], gamma: Option<&[i32]>, eps_q: u64) {
    let n = x.len() as u64;
    let sh = int::block_shift(x);
    let mut ss = 0u64;
    for v in x {
        let m = rshr(*v as i64, sh);
        ss += (m * m) as u64;
    }
    let mut v = ss / n + (rshr(eps_q.min(i64::MAX as u64) as i64, (2 * sh).min(62)) as u64);
    if v == 0 {
        v = 1;
    }
    let mut z = 62 - int::bitlen(v) as i32;
    if z % 2 != 0 {
        z -= 1;
    }
    let s = int::isqrt(v << z) as u64;
    let inv = ((1u64 << 61) / s) as i64;
    for (i, (d, xv)) in y.iter_mut().zip(x).enumerate() {
        let m = rshr(*xv as i64, sh);
        let t = rshr(m * inv, 30);
        let g = gamma.map(|g| g[i] as i64).unwrap_or(65536);
        *d = sat32(shift_round(t * g, 31 - z / 2));
    }
}
