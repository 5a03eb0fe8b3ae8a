//! Hyper-connections, mixtures of experts and compressed (DeepSeek-V4) attention: the
//! definition of `repeat`, `hc_coeffs`, `hc_pre`, `hc_post`, `moe_route`, `moe`,
//! `grouped_matmul` and `compressed_attention` (see their doc comments in `kiln_ir::ops`).
//!
//! Everything is f32 with the order of operations of the numpy specification
//! (`tests/oracle/deepseek_v4_numpy.py`); long sums accumulate in f64.
//!
//! A compressed-attention slot ([`CompressedCache`]) holds the last `window − 1` rotated
//! K=V rows, the compressed rows made so far, each compressor's open window (the
//! projections of the < `ratio` tokens since the last closed window) and, for
//! overlapping compressors, the first half of the last closed window; with an indexer,
//! the same for its key stream. It also keeps the state at the start of the last forward
//! call and that call's inputs, so a rollback into the last call replays them exactly.

use kiln_ir::{CompressedAttentionAttrs, MoeRouteAttrs, RotaryAttrs, Scoring};
use rayon::prelude::*;

use super::matmul::Weight;
use super::session::{Kernels, MatJob};
use crate::quant::QuantError;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// torch's softplus (beta 1, threshold 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn dot64(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>() as f32
}

/// Max-subtracted softmax in place (entries of −∞ get weight 0).
fn softmax_in_place(row: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

fn rms(x: &[f32], w: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len().max(1) as f64;
    let r = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
    match w {
        Some(w) => x.iter().zip(w).map(|(v, w)| v * r * w).collect(),
        None => x.iter().map(|v| v * r).collect(),
    }
}

/// `[T, N] → [T, times·N]`.
pub(crate) fn repeat(x: &[f32], cols: usize, times: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() * times);
    for row in x.chunks(cols.max(1)) {
        for _ in 0..times {
            out.extend_from_slice(row);
        }
    }
    out
}

/// The `hc_coeffs` op on rows of `f` (`cols` wide).
pub(crate) fn hc_coeffs(
    f: &[f32],
    cols: usize,
    base: &[f32],
    scale: &[f32],
    n: usize,
    iters: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(f.len());
    for row in f.chunks(cols.max(1)) {
        for j in 0..n {
            out.push(sigmoid(row[j] * scale[0] + base[j]) + eps);
        }
        if cols == n {
            continue;
        }
        for j in n..2 * n {
            out.push(2.0 * sigmoid(row[j] * scale[1] + base[j]));
        }
        let mut c: Vec<f32> = (2 * n..cols).map(|j| row[j] * scale[2] + base[j]).collect();
        for r in c.chunks_mut(n) {
            softmax_in_place(r);
            r.iter_mut().for_each(|v| *v += eps);
        }
        let cols_norm = |c: &mut [f32]| {
            for j in 0..n {
                let s: f32 = (0..n).map(|i| c[i * n + j]).sum::<f32>() + eps;
                (0..n).for_each(|i| c[i * n + j] /= s);
            }
        };
        let rows_norm = |c: &mut [f32]| {
            for r in c.chunks_mut(n) {
                let s: f32 = r.iter().sum::<f32>() + eps;
                r.iter_mut().for_each(|v| *v /= s);
            }
        };
        cols_norm(&mut c);
        for _ in 1..iters {
            rows_norm(&mut c);
            cols_norm(&mut c);
        }
        out.extend_from_slice(&c);
    }
    out
}

/// `Σ_j c[j]·x[j]` per row: `x` is `[T, n·d]`, `c` `[T, cw]` (pre in its first n columns).
pub(crate) fn hc_pre(x: &[f32], c: &[f32], cw: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / n.max(1)];
    for ((o, xr), cr) in out.chunks_mut(d.max(1)).zip(x.chunks(n * d).filter(|_| d > 0)).zip(c.chunks(cw.max(1))) {
        for (j, s) in xr.chunks(d).enumerate() {
            let w = cr[j];
            o.iter_mut().zip(s).for_each(|(o, v)| *o += w * v);
        }
    }
    out
}

/// `x'[k] = post[k]·y + Σ_j C[j, k]·x[j]` per row.
pub(crate) fn hc_post(x: &[f32], y: &[f32], c: &[f32], n: usize, d: usize) -> Vec<f32> {
    let cw = (2 + n) * n;
    let mut out = vec![0f32; x.len()];
    for (((o, xr), yr), cr) in out.chunks_mut(n * d).zip(x.chunks(n * d)).zip(y.chunks(d)).zip(c.chunks(cw)) {
        let (post, comb) = (&cr[n..2 * n], &cr[2 * n..]);
        for (k, ok) in o.chunks_mut(d).enumerate() {
            for (i, v) in ok.iter_mut().enumerate() {
                let mut acc = post[k] * yr[i];
                for j in 0..n {
                    acc += comb[j * n + k] * xr[j * d + i];
                }
                *v = acc;
            }
        }
    }
    out
}

/// The `moe_route` op: dense `[T, E]` expert weights. `table` holds `k` expert numbers per
/// token id (checked to be in range when the session was prepared).
pub(crate) fn moe_route(
    logits: &[f32],
    e: usize,
    ids: Option<&[u32]>,
    bias: Option<&[f32]>,
    table: Option<&[f32]>,
    attrs: &MoeRouteAttrs,
) -> Vec<f32> {
    let k = attrs.top_k as usize;
    let mut out = vec![0f32; logits.len()];
    for (t, (row, o)) in logits.chunks(e).zip(out.chunks_mut(e)).enumerate() {
        let s: Vec<f32> = match attrs.scoring {
            Scoring::SqrtSoftplus => row.iter().map(|z| softplus(*z).sqrt()).collect(),
            Scoring::Sigmoid => row.iter().map(|z| sigmoid(*z)).collect(),
            Scoring::Softmax => {
                let mut r = row.to_vec();
                softmax_in_place(&mut r);
                r
            }
        };
        let chosen: Vec<usize> = match (table, ids) {
            (Some(tb), Some(ids)) => {
                let id = ids[t] as usize;
                tb[id * k..(id + 1) * k].iter().map(|v| *v as usize).collect()
            }
            _ => {
                let sel: Vec<f32> = match bias {
                    Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
                    None => s.clone(),
                };
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| sel[b].total_cmp(&sel[a]).then(a.cmp(&b)));
                order.truncate(k);
                order
            }
        };
        let total: f32 = chosen.iter().map(|&j| s[j]).sum::<f32>() + 1e-20;
        for &j in &chosen {
            o[j] += s[j] / total * attrs.scale;
        }
    }
    out
}

/// SwiGLU of an expert's gate and up projections (with DeepSeek-V4's clamp when `limit > 0`).
fn swiglu(g: &[f32], u: &[f32], limit: f32) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| if limit > 0.0 { silu(g.min(limit)) * u.clamp(-limit, limit) } else { silu(g) * u })
        .collect()
}

/// Stacked expert matrices `[E, n, k]` of one kind (`all.n` = rows of one expert).
#[derive(Clone, Copy)]
pub(crate) struct Stacked<'a> {
    pub all: Weight<'a>,
    pub experts: usize,
}

impl<'a> Stacked<'a> {
    fn expert(&self, e: usize) -> Weight<'a> {
        let per = self.all.bytes.len() / self.experts.max(1);
        Weight { bytes: &self.all.bytes[e * per..(e + 1) * per], ..self.all }
    }
}

/// The `moe` op: each expert runs on the rows that chose it (gathered), its output
/// weighted and summed per row in expert order, then the shared expert added. The experts
/// are dispatched together ([`Kernels::matmuls`]): every chosen expert's gate and up
/// projections (and the shared expert's) in one batch, then every down projection in one,
/// so a backend runs each batch as one parallel region rather than three small matmuls
/// per expert in turn. The sums are the same, in the same order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe(
    kernel: &dyn Kernels,
    x: &[f32],
    d: usize,
    w: &[f32],
    gate: Stacked<'_>,
    up: Stacked<'_>,
    down: Stacked<'_>,
    shared: Option<[Weight<'_>; 3]>,
    limit: f32,
) -> Result<Vec<f32>, QuantError> {
    let e = gate.experts;
    let rows = x.len() / d.max(1);
    // The chosen experts, each with its rows gathered.
    let chosen: Vec<(usize, Vec<usize>, Vec<f32>)> = (0..e)
        .filter_map(|ex| {
            let picked: Vec<usize> = (0..rows).filter(|&t| w[t * e + ex] != 0.0).collect();
            (!picked.is_empty()).then(|| {
                let xs = picked.iter().flat_map(|&t| x[t * d..(t + 1) * d].iter().copied()).collect();
                (ex, picked, xs)
            })
        })
        .collect();
    // Gate and up projections of every chosen expert, then the shared expert's.
    let mut jobs: Vec<MatJob<'_>> = vec![];
    for (ex, picked, xs) in &chosen {
        jobs.push(MatJob::whole(xs, picked.len(), gate.expert(*ex)));
        jobs.push(MatJob::whole(xs, picked.len(), up.expert(*ex)));
    }
    if let Some([g, u, _]) = shared {
        jobs.push(MatJob::whole(x, rows, g));
        jobs.push(MatJob::whole(x, rows, u));
    }
    let gu = kernel.matmuls(&jobs)?;
    let hidden: Vec<Vec<f32>> = gu.chunks(2).map(|p| swiglu(&p[0], &p[1], limit)).collect();
    // Every down projection.
    let mut jobs: Vec<MatJob<'_>> = chosen
        .iter()
        .zip(&hidden)
        .map(|((ex, picked, _), h)| MatJob::whole(h, picked.len(), down.expert(*ex)))
        .collect();
    if let Some([_, _, dn]) = shared {
        jobs.push(MatJob::whole(&hidden[chosen.len()], rows, dn));
    }
    let ys = kernel.matmuls(&jobs)?;
    let mut out = vec![0f32; x.len()];
    for ((ex, picked, _), y) in chosen.iter().zip(&ys) {
        for (yr, &t) in y.chunks(d).zip(picked) {
            let wt = w[t * e + ex];
            out[t * d..(t + 1) * d].iter_mut().zip(yr).for_each(|(o, v)| *o += wt * v);
        }
    }
    if shared.is_some() {
        out.iter_mut().zip(&ys[chosen.len()]).for_each(|(o, v)| *o += v);
    }
    Ok(out)
}

/// The `grouped_matmul` op: chunk g of each row of `x` times weight rows `g·R..(g+1)·R`.
pub(crate) fn grouped_matmul(
    kernel: &dyn Kernels,
    x: &[f32],
    rows: usize,
    w: Weight<'_>,
    groups: usize,
) -> Result<Vec<f32>, QuantError> {
    let (r, k) = (w.n / groups.max(1), w.k);
    let rb = w.row_bytes();
    let mut out = vec![0f32; rows * w.n];
    for g in 0..groups {
        let xs: Vec<f32> =
            (0..rows).flat_map(|t| x[t * groups * k + g * k..t * groups * k + (g + 1) * k].iter().copied()).collect();
        let wg = Weight { bytes: &w.bytes[g * r * rb..(g + 1) * r * rb], n: r, ..w };
        let y = kernel.matmul(&xs, rows, wg, None, 0, rows)?;
        for t in 0..rows {
            out[t * w.n + g * r..t * w.n + (g + 1) * r].copy_from_slice(&y[t * r..(t + 1) * r]);
        }
    }
    Ok(out)
}

/// RoPE frequencies of a [`RotaryAttrs`] (see its doc comment), f32 like transformers.
pub fn inv_freq(r: &RotaryAttrs) -> Vec<f32> {
    let rd = r.rot_dims as usize;
    let pos_freqs: Vec<f32> = (0..rd / 2).map(|i| r.theta.powf((2 * i) as f32 / rd as f32)).collect();
    let extra: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
    if r.yarn_factor == 1.0 {
        return extra;
    }
    let (base, factor, ompe) = (f64::from(r.theta), r.yarn_factor, r.yarn_orig_ctx as f64);
    let corr = |b: f64| rd as f64 * (ompe / (b * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let low = corr(f64::from(r.yarn_beta_fast)).floor().max(0.0);
    let mut high = corr(f64::from(r.yarn_beta_slow)).ceil().min(rd as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    (0..rd / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            let inter = 1.0 / (factor * pos_freqs[i]);
            inter * ramp + extra[i] * (1.0 - ramp)
        })
        .collect()
}

/// Rotates interleaved pairs of the last `2·inv.len()` channels of each `hd`-wide head of
/// `x` at position `pos` (`sign` −1: the inverse rotation).
fn rope_heads(x: &mut [f32], hd: usize, inv: &[f32], pos: usize, sign: f32) {
    let rd = 2 * inv.len();
    let cs: Vec<(f32, f32)> = inv
        .iter()
        .map(|f| {
            let a = pos as f32 * f;
            ((f64::from(a).cos()) as f32, sign * (f64::from(a).sin()) as f32)
        })
        .collect();
    for head in x.chunks_mut(hd) {
        let tail = &mut head[hd - rd..];
        for (pair, (c, s)) in tail.chunks_mut(2).zip(&cs) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = b * c + a * s;
        }
    }
}

/// Channel `off + c` of `r` rows of `stride` values.
fn column(rows: &[f32], r: usize, stride: usize, off: usize, c: usize) -> impl Iterator<Item = f32> + '_ {
    (0..r).map(move |j| rows[j * stride + off + c])
}

/// One compressor stream: pools `ratio` consecutive tokens into one row of `dim`.
#[derive(Clone, Debug, Default)]
struct Compressor {
    ratio: usize,
    dim: usize,
    overlap: bool,
    /// Projections of the open window (`< ratio` rows of `width`).
    buf_kv: Vec<f32>,
    buf_gate: Vec<f32>,
    /// Overlapping: the Ca half of the last closed window and its gate (+ ape), `ratio × dim`.
    prev: Option<(Vec<f32>, Vec<f32>)>,
    /// Compressed rows `[n, dim]`, normalised and rotated.
    entries: Vec<f32>,
    /// Its parameters: per-slot gate bias `[ratio, width]`, norm weight `[dim]`, norm epsilon.
    ape: Vec<f32>,
    norm: Vec<f32>,
    eps: f32,
}

impl Compressor {
    fn width(&self) -> usize {
        if self.overlap { 2 * self.dim } else { self.dim }
    }

    fn rows(&self) -> usize {
        self.entries.len() / self.dim.max(1)
    }

    fn bytes(&self) -> usize {
        4 * (self.buf_kv.len()
            + self.buf_gate.len()
            + self.entries.len()
            + self.prev.as_ref().map_or(0, |(a, b)| a.len() + b.len()))
    }

    /// Absorbs this call's projections; closes (and appends the rows of) every full window.
    fn absorb(&mut self, kv: &[f32], gate: &[f32], inv: &[f32]) {
        let (r, d, w) = (self.ratio, self.dim, self.width());
        self.buf_kv.extend_from_slice(kv);
        self.buf_gate.extend_from_slice(gate);
        let closed = self.buf_kv.len() / (r * w);
        for i in 0..closed {
            let wkv = &self.buf_kv[i * r * w..(i + 1) * r * w];
            let wg: Vec<f32> =
                self.buf_gate[i * r * w..(i + 1) * r * w].iter().zip(&self.ape).map(|(g, a)| g + a).collect();
            // The window's own slots: all `w` columns (HCA), or the second half Cb (CSA).
            let own = if self.overlap { d } else { 0 };
            let prev = self.prev.take();
            let pooled: Vec<f32> = (0..d)
                .map(|c| {
                    // Per channel: softmax over the slots' gates, then the weighted sum of their kv.
                    let (mut gates, mut kvs): (Vec<f32>, Vec<f32>) =
                        (Vec::with_capacity(2 * r), Vec::with_capacity(2 * r));
                    if let Some((pk, pg)) = &prev {
                        gates.extend(column(pg, r, d, 0, c));
                        kvs.extend(column(pk, r, d, 0, c));
                    }
                    gates.extend(column(&wg, r, w, own, c));
                    kvs.extend(column(wkv, r, w, own, c));
                    softmax_in_place(&mut gates);
                    gates.iter().zip(&kvs).map(|(p, v)| f64::from(*p) * f64::from(*v)).sum::<f64>() as f32
                })
                .collect();
            if self.overlap {
                // Ca (first half) and its gate, for the next window.
                let ca: Vec<f32> = (0..r).flat_map(|j| wkv[j * w..j * w + d].iter().copied()).collect();
                let ga: Vec<f32> = (0..r).flat_map(|j| wg[j * w..j * w + d].iter().copied()).collect();
                self.prev = Some((ca, ga));
            }
            let mut row = rms(&pooled, Some(&self.norm), self.eps);
            let n0 = self.rows();
            rope_heads(&mut row, d, inv, n0 * r, 1.0);
            self.entries.extend_from_slice(&row);
        }
        self.buf_kv.drain(..closed * r * w);
        self.buf_gate.drain(..closed * r * w);
    }
}

/// What a [`Compressor`] needs to return to an earlier state: its compressed rows only
/// grow, so their count, plus the small open-window state.
#[derive(Clone, Debug, Default)]
struct CompressorMark {
    rows: usize,
    buf_kv: Vec<f32>,
    buf_gate: Vec<f32>,
    prev: Option<(Vec<f32>, Vec<f32>)>,
}

impl Compressor {
    fn mark(&self) -> CompressorMark {
        CompressorMark {
            rows: self.rows(),
            buf_kv: self.buf_kv.clone(),
            buf_gate: self.buf_gate.clone(),
            prev: self.prev.clone(),
        }
    }

    fn restore(&mut self, m: &CompressorMark) {
        self.entries.truncate(m.rows * self.dim);
        self.buf_kv.clone_from(&m.buf_kv);
        self.buf_gate.clone_from(&m.buf_gate);
        self.prev.clone_from(&m.prev);
    }

    fn clear(&mut self) {
        self.restore(&CompressorMark::default());
    }
}

/// The state at the start of the last forward call. Nothing is trimmed from the raw rows
/// or the compressed rows during a call (the raw window is trimmed when the next call
/// starts), so this costs O(window), not O(context): a count of raw rows, and each
/// compressor's [`CompressorMark`].
#[derive(Clone, Debug, Default)]
struct Mark {
    raw_rows: usize,
    comp: Option<CompressorMark>,
    index: Option<CompressorMark>,
}

/// This call's inputs to the cache (what a rollback replays).
#[derive(Clone, Debug, Default)]
struct CallInputs {
    tokens: usize,
    kv: Vec<f32>,
    comp: Option<(Vec<f32>, Vec<f32>)>,
    index: Option<(Vec<f32>, Vec<f32>)>,
}

/// A compressed-attention cache slot (see the module comment).
#[derive(Clone, Debug)]
pub struct CompressedCache {
    attrs: CompressedAttentionAttrs,
    inv: Vec<f32>,
    /// Rotated K=V rows from position `raw_pos` on: the window kept before the last
    /// forward call (≤ `window − 1` rows) followed by that call's rows.
    raw: Vec<f32>,
    raw_pos: usize,
    comp: Option<Compressor>,
    index: Option<Compressor>,
    /// The state at the start of the last forward call, its position, and that call's inputs.
    base: Mark,
    base_pos: usize,
    last: CallInputs,
    /// Positions the state covers.
    pos: usize,
    /// Set after a rollback past the last call (the state is then unknown).
    lost: bool,
    /// The forward call the state was last begun for ([`CompressedCache::begin_call`]), and
    /// whether that call's update is still open (begun, not yet ended by its raw rows).
    call: Option<u64>,
    open: bool,
}

/// A compressor stream's parameters when a slot is made: per-slot gate bias, norm weight,
/// and the projections' width (`dim`, or `2·dim` for overlapping windows).
pub(crate) struct StreamInit {
    pub ape: Vec<f32>,
    pub norm: Vec<f32>,
    pub width: usize,
}

/// What one forward call's attention reads from a compressed slot (after
/// [`CompressedCache::append`]): the attributes, the rotated raw rows and compressed rows,
/// the indexer's keys, and the shared per-query steps (visibility, RoPE, the indexer's
/// query). The reference's [`CompressedCache::attend`] and the compiled backends' fused
/// kernels are both written over it.
#[derive(Clone, Copy, Debug)]
pub struct CompressedView<'a> {
    pub attrs: &'a CompressedAttentionAttrs,
    /// RoPE inverse frequencies of the rotated (last) channels.
    pub inv: &'a [f32],
    /// Rotated raw K=V rows `[n, head_dim]`; row 0 is at position `raw_pos`.
    pub raw: &'a [f32],
    pub raw_pos: usize,
    /// Compressed rows `[n, head_dim]` (row w pools positions `w·ratio..(w+1)·ratio`).
    pub comp: &'a [f32],
    /// The indexer's compressed keys `[n, index_dim]`, when the op has an indexer.
    pub index_keys: Option<&'a [f32]>,
}

impl CompressedView<'_> {
    /// The raw rows visible from position `p` (`p − window < j ≤ p`), as row numbers of `raw`.
    pub fn raw_range(&self, p: usize) -> std::ops::Range<usize> {
        let lo = (p + 1).saturating_sub(self.attrs.window as usize).max(self.raw_pos);
        lo - self.raw_pos..p + 1 - self.raw_pos
    }

    /// The raw rows visible from position `p`, as one slice.
    pub fn raw_rows(&self, p: usize) -> &[f32] {
        let (hd, r) = (self.attrs.head_dim as usize, self.raw_range(p));
        &self.raw[r.start * hd..r.end * hd]
    }

    /// How many compressed rows position `p` sees (those whose tokens all precede it).
    pub fn visible(&self, p: usize) -> usize {
        let hd = self.attrs.head_dim as usize;
        (p + 1).checked_div(self.attrs.ratio as usize).unwrap_or(0).min(self.comp.len() / hd.max(1))
    }

    /// Rotates each `hd`-wide head of `x` to position `p` (`sign` −1: back).
    pub fn rope(&self, x: &mut [f32], hd: usize, p: usize, sign: f32) {
        rope_heads(x, hd, self.inv, p, sign);
    }

    /// The indexer's query at position `p` from its projection row `iq` (rotated), its
    /// per-head weights from `iw` times `1/√heads`, and the dot scale `1/√dim`: the score
    /// of compressed row w is `Σ_h w_h · (max(q_h · k_w, 0) · dscale)`.
    pub fn index_query(&self, iq: &[f32], iw: &[f32], p: usize) -> (Vec<f32>, Vec<f32>, f32) {
        let (nh, di) = (self.attrs.index_heads as usize, self.attrs.index_dim as usize);
        let mut qi = iq[..nh * di].to_vec();
        self.rope(&mut qi, di, p, 1.0);
        let wscale = 1.0 / (nh as f32).sqrt();
        (qi, iw[..nh].iter().map(|w| w * wscale).collect(), 1.0 / (di as f32).sqrt())
    }

    /// The `topk` rows of largest score among `scored` (score, row), ties to the earlier
    /// row, in row order.
    pub fn top_k(&self, mut scored: Vec<(f32, u32)>) -> Vec<u32> {
        let k = self.attrs.topk as usize;
        let order = |x: &(f32, u32), y: &(f32, u32)| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1));
        if k > 0 && k < scored.len() {
            scored.select_nth_unstable_by(k - 1, order);
            scored.truncate(k);
        }
        let mut chosen: Vec<u32> = scored.into_iter().map(|(_, w)| w).collect();
        chosen.sort_unstable();
        chosen
    }

    /// The compressed rows the indexer chooses for the query at position `p` from its
    /// projections `iq` (`index_heads × index_dim`) and head weights `iw`: the
    /// [`CompressedView::top_k`] of the visible rows by `Σ_h w_h · (max(q_h · k_w, 0) ·
    /// dscale)` over the index keys (every visible row without an indexer).
    pub fn select(&self, iq: Option<&[f32]>, iw: Option<&[f32]>, p: usize) -> Vec<u32> {
        let a = self.attrs;
        let visible = self.visible(p);
        let (Some(keys), Some(iq), Some(iw)) = (self.index_keys, iq, iw) else {
            return (0..visible as u32).collect();
        };
        let di = a.index_dim as usize;
        let (qi, wh, dscale) = self.index_query(iq, iw, p);
        let scored = (0..visible)
            .filter(|&w| (w + 1) * di <= keys.len())
            .map(|w| {
                let k = &keys[w * di..(w + 1) * di];
                let s: f64 = qi
                    .chunks(di)
                    .zip(&wh)
                    .map(|(qh, w)| f64::from(*w) * f64::from(dot64(qh, k).max(0.0) * dscale))
                    .sum();
                (s as f32, w as u32)
            })
            .collect();
        self.top_k(scored)
    }

    /// Attention of query rows `q` (`[rows, heads·head_dim]`, not rotated; row t at position
    /// `first_pos + t`) over these rows; `idx_q`, `idx_w`: the indexer's query projections
    /// and head weights per row. The definition: f64 sums, a full softmax.
    pub fn attend(
        &self,
        q: &[f32],
        first_pos: usize,
        idx_q: Option<&[f32]>,
        idx_w: Option<&[f32]>,
        sink: &[f32],
    ) -> Vec<f32> {
        let (nh, di) = (self.attrs.index_heads as usize, self.attrs.index_dim as usize);
        self.attend_chosen(q, first_pos, sink, |t, p| {
            let iq = idx_q.map(|x| &x[t * nh * di..]);
            let iw = idx_w.map(|x| &x[t * nh..]);
            self.select(iq, iw, p).into_iter().map(|w| w as usize).collect()
        })
    }

    /// [`CompressedView::attend`] over the compressed rows `chosen(t, p)` of each query row
    /// (`t`: row of `q`, `p`: its position).
    pub fn attend_chosen(
        &self,
        q: &[f32],
        first_pos: usize,
        sink: &[f32],
        chosen: impl Fn(usize, usize) -> Vec<usize> + Sync,
    ) -> Vec<f32> {
        let v = *self;
        let a = v.attrs;
        let (h, hd) = (a.heads as usize, a.head_dim as usize);
        let rows = q.len() / (h * hd).max(1);
        let per_row: Vec<Vec<f32>> = (0..rows)
            .into_par_iter()
            .map(|t| {
                let p = first_pos + t;
                let comp_rows = chosen(t, p);
                let all: Vec<&[f32]> = v
                    .raw_rows(p)
                    .chunks(hd)
                    .chain(
                        comp_rows
                            .iter()
                            .filter(|&&w| (w + 1) * hd <= v.comp.len())
                            .map(|&w| &v.comp[w * hd..(w + 1) * hd]),
                    )
                    .collect();
                let mut qr = q[t * h * hd..(t + 1) * h * hd].to_vec();
                v.rope(&mut qr, hd, p, 1.0);
                let mut o = vec![0f32; h * hd];
                for (head, (qh, oh)) in qr.chunks(hd).zip(o.chunks_mut(hd)).enumerate() {
                    let mut logits: Vec<f32> = all.iter().map(|k| dot64(qh, k) * a.scale).collect();
                    logits.push(sink[head]);
                    softmax_in_place(&mut logits);
                    let mut acc = vec![0f64; hd];
                    for (pr, k) in logits.iter().zip(&all) {
                        acc.iter_mut().zip(k.iter()).for_each(|(s, v)| *s += f64::from(*pr) * f64::from(*v));
                    }
                    oh.iter_mut().zip(&acc).for_each(|(o, v)| *o = *v as f32);
                }
                v.rope(&mut o, hd, p, -1.0);
                o
            })
            .collect();
        per_row.concat()
    }
}

impl CompressedCache {
    pub(crate) fn new(attrs: &CompressedAttentionAttrs, comp: Option<StreamInit>, index: Option<StreamInit>) -> Self {
        let mk = |dim: u64, init: Option<StreamInit>| {
            init.map(|s| Compressor {
                ratio: attrs.ratio as usize,
                dim: dim as usize,
                overlap: s.width == 2 * dim as usize,
                ape: s.ape,
                norm: s.norm,
                eps: attrs.eps,
                ..Default::default()
            })
        };
        CompressedCache {
            attrs: attrs.clone(),
            inv: inv_freq(&attrs.rope),
            raw: vec![],
            raw_pos: 0,
            comp: mk(attrs.head_dim, comp),
            index: mk(attrs.index_dim, index),
            base: Mark::default(),
            base_pos: 0,
            last: CallInputs::default(),
            pos: 0,
            lost: false,
            call: None,
            open: false,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Whether a rollback went further back than the slot can restore.
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Raw rows the slot keeps for later calls: the last `window − 1`.
    fn kept_rows(&self) -> usize {
        let hd = self.attrs.head_dim as usize;
        (self.raw.len() / hd.max(1)).min((self.attrs.window as usize).saturating_sub(1))
    }

    /// Bytes the slot holds for later calls (raw window, compressed rows, open windows),
    /// not counting the last call's rows beyond the window (dropped when the next call
    /// starts) or what is kept for rollback.
    pub fn bytes(&self) -> usize {
        let streams = [&self.comp, &self.index];
        4 * self.kept_rows() * self.attrs.head_dim as usize
            + streams.iter().filter_map(|c| c.as_ref()).map(Compressor::bytes).sum::<usize>()
    }

    /// Compressed rows `[n, dim]` of the attention stream and of the indexer's keys.
    pub fn compressed_rows(&self) -> (Option<&[f32]>, Option<&[f32]>) {
        (self.comp.as_ref().map(|c| c.entries.as_slice()), self.index.as_ref().map(|c| c.entries.as_slice()))
    }

    /// What attention reads (valid after [`CompressedCache::append`] for the call's queries).
    pub fn view(&self) -> CompressedView<'_> {
        CompressedView {
            attrs: &self.attrs,
            inv: &self.inv,
            raw: &self.raw,
            raw_pos: self.raw_pos,
            comp: self.comp.as_ref().map_or(&[][..], |c| c.entries.as_slice()),
            index_keys: self.index.as_ref().map(|c| c.entries.as_slice()),
        }
    }

    fn mark(&self) -> Mark {
        let hd = self.attrs.head_dim as usize;
        Mark {
            raw_rows: self.raw.len() / hd.max(1),
            comp: self.comp.as_ref().map(Compressor::mark),
            index: self.index.as_ref().map(Compressor::mark),
        }
    }

    fn restore(&mut self, m: &Mark) {
        self.raw.truncate(m.raw_rows * self.attrs.head_dim as usize);
        for (c, m) in [(&mut self.comp, &m.comp), (&mut self.index, &m.index)] {
            if let (Some(c), Some(m)) = (c.as_mut(), m) {
                c.restore(m);
            }
        }
    }

    /// Drops positions at and after `pos`: exact when `pos` lies within the last forward
    /// call (its inputs are replayed onto the state saved before it) or is 0; otherwise
    /// the slot is marked lost and the next forward call fails.
    pub fn truncate(&mut self, pos: usize) {
        if pos >= self.pos {
            return;
        }
        if pos == 0 {
            self.raw.clear();
            self.comp.iter_mut().chain(self.index.iter_mut()).for_each(Compressor::clear);
            self.base = self.mark();
            (self.pos, self.base_pos, self.raw_pos, self.lost) = (0, 0, 0, false);
            self.last = CallInputs::default();
            return;
        }
        if pos < self.base_pos || self.lost {
            self.lost = true;
            self.pos = pos;
            return;
        }
        let n = pos - self.base_pos;
        let hd = self.attrs.head_dim as usize;
        let cut = |x: &Option<(Vec<f32>, Vec<f32>)>, c: &Option<Compressor>| {
            x.as_ref().zip(c.as_ref()).map(|((k, g), c)| (k[..n * c.width()].to_vec(), g[..n * c.width()].to_vec()))
        };
        let inputs = CallInputs {
            tokens: n,
            kv: self.last.kv[..n * hd].to_vec(),
            comp: cut(&self.last.comp, &self.comp),
            index: cut(&self.last.index, &self.index),
        };
        let base = std::mem::take(&mut self.base);
        self.restore(&base);
        self.base = base;
        self.pos = self.base_pos;
        self.absorb(&inputs);
    }

    /// Appends one call's rows to the state: the raw rows (rotated) after the kept window,
    /// each compressor's projections.
    fn absorb(&mut self, inputs: &CallInputs) {
        let hd = self.attrs.head_dim as usize;
        for (t, row) in inputs.kv.chunks(hd).enumerate() {
            let at = self.raw.len();
            self.raw.extend_from_slice(row);
            rope_heads(&mut self.raw[at..], hd, &self.inv, self.pos + t, 1.0);
        }
        if let (Some(c), Some((k, g))) = (self.comp.as_mut(), &inputs.comp) {
            c.absorb(k, g, &self.inv);
        }
        if let (Some(c), Some((k, g))) = (self.index.as_mut(), &inputs.index) {
            c.absorb(k, g, &self.inv);
        }
        self.pos += inputs.tokens;
    }

    /// Starts forward call `call` (the session's count; a second begin of the same call does
    /// nothing, so the unfused ops of one slot can each begin it): drops the raw rows that
    /// left the window and remembers the state before the call (for rollback).
    pub(crate) fn begin_call(&mut self, call: u64) -> Result<(), String> {
        if self.call == Some(call) {
            return Ok(());
        }
        if self.lost {
            return Err("the compressed-attention cache was rolled back past the last forward call, \
                        which it cannot restore; truncate to 0 and run the text again"
                .into());
        }
        let hd = self.attrs.head_dim as usize;
        let drop = self.raw.len() / hd.max(1) - self.kept_rows();
        self.raw.drain(..drop * hd);
        self.raw_pos += drop;
        self.base = self.mark();
        self.base_pos = self.pos;
        self.last = CallInputs::default();
        (self.call, self.open) = (Some(call), true);
        Ok(())
    }

    /// Undoes an update a failed forward call left open (the state before the call).
    pub(crate) fn abort_call(&mut self) {
        if self.open {
            let base = std::mem::take(&mut self.base);
            self.restore(&base);
            self.base = base;
            (self.pos, self.open, self.call) = (self.base_pos, false, None);
            self.last = CallInputs::default();
        }
    }

    /// One forward call's cache update (`compressed_attention`): absorbs the call's `kv`
    /// rows (`[T, head_dim]`, not rotated) and compressor projections.
    pub(crate) fn append(
        &mut self,
        call: u64,
        kv: &[f32],
        comp: Option<(&[f32], &[f32])>,
        index: Option<(&[f32], &[f32])>,
    ) -> Result<(), String> {
        self.begin_call(call)?;
        let hd = self.attrs.head_dim as usize;
        let own = |x: Option<(&[f32], &[f32])>| x.map(|(k, g)| (k.to_vec(), g.to_vec()));
        let inputs = CallInputs { tokens: kv.len() / hd, kv: kv.to_vec(), comp: own(comp), index: own(index) };
        self.absorb(&inputs);
        self.last = inputs;
        self.open = false;
        Ok(())
    }

    /// The `compress` op's share of a call: absorbs one stream's projections (`index`: the
    /// indexer's keys) and returns `[T, dim]` with, at each token that closes a window,
    /// the row it closed (zeros elsewhere). Runs before the call's [`Self::append_raw`].
    pub(crate) fn append_stream(
        &mut self,
        call: u64,
        index: bool,
        kv: &[f32],
        gate: &[f32],
    ) -> Result<Vec<f32>, String> {
        self.begin_call(call)?;
        let pos = self.pos;
        let (inv, stream, last) = if index {
            (&self.inv, self.index.as_mut(), &mut self.last.index)
        } else {
            (&self.inv, self.comp.as_mut(), &mut self.last.comp)
        };
        let c = stream.ok_or("the slot has no such compressor stream")?;
        let (ratio, dim) = (c.ratio, c.dim);
        let tokens = kv.len() / c.width().max(1);
        let before = c.rows();
        c.absorb(kv, gate, inv);
        let mut out = vec![0f32; tokens * dim];
        for w in before..c.rows() {
            let t = (w + 1) * ratio - 1 - pos;
            out[t * dim..(t + 1) * dim].copy_from_slice(&c.entries[w * dim..(w + 1) * dim]);
        }
        *last = Some((kv.to_vec(), gate.to_vec()));
        Ok(out)
    }

    /// The `sparse_attention` op's share of a call: appends its raw `kv` rows (`[T,
    /// head_dim]`, not rotated) and ends the call's update.
    pub(crate) fn append_raw(&mut self, call: u64, kv: &[f32]) -> Result<(), String> {
        self.begin_call(call)?;
        let hd = self.attrs.head_dim as usize;
        let tokens = kv.len() / hd.max(1);
        for (t, row) in kv.chunks(hd).enumerate() {
            let at = self.raw.len();
            self.raw.extend_from_slice(row);
            rope_heads(&mut self.raw[at..], hd, &self.inv, self.pos + t, 1.0);
        }
        self.pos += tokens;
        (self.last.tokens, self.last.kv) = (tokens, kv.to_vec());
        self.open = false;
        Ok(())
    }

    /// Attention of query rows `q` (`[rows, heads·head_dim]`, not rotated; row t at position
    /// `first_pos + t`) after [`CompressedCache::append`]: [`CompressedView::attend`].
    pub fn attend(
        &self,
        q: &[f32],
        first_pos: usize,
        idx_q: Option<&[f32]>,
        idx_w: Option<&[f32]>,
        sink: &[f32],
    ) -> Vec<f32> {
        self.view().attend(q, first_pos, idx_q, idx_w, sink)
    }
}

#[cfg(test)]
mod tests {
    use kiln_ir::DType;

    use super::*;
    use crate::Numerics;
    use crate::reference::session::ReferenceKernels;

    /// Runs each batch of matmuls last job first: the dispatch must not depend on the order.
    struct Reversed(ReferenceKernels);

    impl Kernels for Reversed {
        fn matmul(
            &self,
            x: &[f32],
            rows: usize,
            w: Weight<'_>,
            bias: Option<&[f32]>,
            first: usize,
            total: usize,
        ) -> Result<Vec<f32>, QuantError> {
            self.0.matmul(x, rows, w, bias, first, total)
        }

        fn matmuls(&self, jobs: &[MatJob<'_>]) -> Result<Vec<Vec<f32>>, QuantError> {
            let mut out: Vec<Vec<f32>> = jobs.iter().rev().map(|j| j.run(&self.0)).collect::<Result<_, _>>()?;
            out.reverse();
            Ok(out)
        }
    }

    fn floats(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// The batched expert dispatch gives the bits of running each chosen expert in turn
    /// (gate, up, SwiGLU, down; weighted sums in expert order; the shared expert last),
    /// whichever order a backend runs a batch in; rows choosing no expert get only the
    /// shared one.
    #[test]
    fn batched_dispatch_equals_experts_in_turn_bit_for_bit() {
        let (e, d, inter, rows, limit) = (4usize, 8usize, 6usize, 5usize, 3.0f32);
        let (g, u, dn) = (floats(e * inter * d, 1), floats(e * inter * d, 2), floats(e * d * inter, 3));
        let (sg, su, sd) = (floats(inter * d, 4), floats(inter * d, 5), floats(d * inter, 6));
        let x = floats(rows * d, 7);
        // Row t chooses experts t % 4 and (t + 1) % 4, except row 3 (none); expert 2 is
        // chosen only by rows 1 and 2.
        let mut w = vec![0f32; rows * e];
        for t in [0usize, 1, 2, 4] {
            w[t * e + t % e] = 0.6;
            w[t * e + (t + 1) % e] = 0.4;
        }
        // Leaked so that the weight views can be made by one closure (a test's few KiB).
        let leak = |v: &[f32]| -> &'static [u8] { Vec::leak(bytes(v)) };
        let (gb, ub, db) = (leak(&g), leak(&u), leak(&dn));
        let (sgb, sub, sdb) = (leak(&sg), leak(&su), leak(&sd));
        fn mat(b: &[u8], n: usize, k: usize) -> Weight<'_> {
            Weight { bytes: b, dtype: DType::F32, n, k }
        }
        let stacked = |b: &'static [u8], n: usize, k: usize| Stacked { all: mat(b, n, k), experts: e };
        let shared_ws = [mat(sgb, inter, d), mat(sub, inter, d), mat(sdb, d, inter)];
        let shared = Some(shared_ws);
        let kernel = ReferenceKernels(Numerics::Exact);
        let run = |k: &dyn Kernels| {
            moe(k, &x, d, &w, stacked(gb, inter, d), stacked(ub, inter, d), stacked(db, d, inter), shared, limit)
                .expect("moe")
        };
        let (got, reversed) = (run(&kernel), run(&Reversed(kernel)));
        // Each expert in turn, as written before the batched dispatch.
        let expert = |xs: &[f32], r: usize, ws: [Weight<'_>; 3]| {
            let gg = kernel.matmul(xs, r, ws[0], None, 0, r).expect("gate");
            let uu = kernel.matmul(xs, r, ws[1], None, 0, r).expect("up");
            kernel.matmul(&swiglu(&gg, &uu, limit), r, ws[2], None, 0, r).expect("down")
        };
        let mut want = vec![0f32; rows * d];
        for ex in 0..e {
            let picked: Vec<usize> = (0..rows).filter(|&t| w[t * e + ex] != 0.0).collect();
            if picked.is_empty() {
                continue;
            }
            let xs: Vec<f32> = picked.iter().flat_map(|&t| x[t * d..(t + 1) * d].to_vec()).collect();
            let ws =
                [stacked(gb, inter, d).expert(ex), stacked(ub, inter, d).expert(ex), stacked(db, d, inter).expert(ex)];
            for (yr, &t) in expert(&xs, picked.len(), ws).chunks(d).zip(&picked) {
                want[t * d..(t + 1) * d].iter_mut().zip(yr).for_each(|(o, v)| *o += w[t * e + ex] * v);
            }
        }
        let sh = expert(&x, rows, shared_ws);
        want.iter_mut().zip(&sh).for_each(|(o, v)| *o += v);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(bits(&reversed), bits(&want));
    }
}
