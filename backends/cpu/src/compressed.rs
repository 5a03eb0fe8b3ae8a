//! Fused compressed (DeepSeek-V4) attention: for each query row, one pass that scores
//! the Lightning Indexer over the visible compressed rows, keeps the top k, and attends
//! over the raw window ∪ the chosen compressed rows ∪ the sink with an online softmax
//! (blocks of keys, a running maximum, no score row over all keys). Prefill: tiles of
//! query rows in parallel, each block of raw keys read once for every row and head of a
//! tile; decode: the indexer's rows and the raw keys split over the threads, the parts'
//! softmax states merged. AVX2 dots, exp and updates where detected, the same loops in
//! scalar code elsewhere.
//!
//! The cache, its compressors, visibility, RoPE and the top-k rule are the reference's
//! ([`CompressedView`]); only the sums differ: f32 here (the reference sums in f64), so
//! results agree to rounding, and the indexer's choice can differ where two rows' scores
//! tie to rounding.

use kiln_backends::reference::{self, CompressedView};
use rayon::prelude::*;

use crate::kernels::Isa;

/// Keys scored per block of the online softmax.
const BLOCK: usize = 64;
/// Compressed rows per parallel task of the indexer.
const INDEX_TASK: usize = 1024;

/// `a · b` over `a.len()` values.
#[inline]
fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2 and FMA.
        return unsafe { x86::dot(a, b) };
    }
    let _ = isa;
    reference::dot(a, b)
}

/// The largest of `s`.
#[inline]
fn max(isa: Isa, s: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::max(s) };
    }
    let _ = isa;
    s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `s[j] = (q · keys[j])·scale`.
#[inline]
fn scores(isa: Isa, q: &[f32], scale: f32, keys: &[&[f32]], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::scores(q, scale, keys, s) };
    }
    for (sj, k) in s.iter_mut().zip(keys) {
        *sj = dot(isa, q, k) * scale;
    }
}

/// The indexer's scores of the `di`-wide key rows `keys`: `Σ_h w[h]·(max(q_h·k, 0)·dscale)`.
#[inline]
fn index_scores(isa: Isa, qi: &[f32], wh: &[f32], dscale: f32, keys: &[f32], di: usize, out: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::index_scores(qi, wh, dscale, keys, di, out) };
    }
    for k in keys.chunks_exact(di) {
        out.push(qi.chunks_exact(di).zip(wh).map(|(qh, w)| w * (dot(isa, qh, k).max(0.0) * dscale)).sum());
    }
}

/// `acc = acc·c + Σ_j w[j]·rows[j]`.
#[inline]
fn scale_add(isa: Isa, acc: &mut [f32], c: f32, w: &[f32], rows: &[&[f32]]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && rows.iter().all(|r| r.len() >= acc.len()) {
        // SAFETY: as in `dot`; every row is at least as long as `acc`.
        return unsafe { x86::scale_add(acc, c, w, rows) };
    }
    let _ = isa;
    if c != 1.0 {
        acc.iter_mut().for_each(|a| *a *= c);
    }
    for (wj, r) in w.iter().zip(rows) {
        acc.iter_mut().zip(r.iter()).for_each(|(a, v)| *a += wj * v);
    }
}

/// `s[j] = exp(s[j] − m)` (every `s[j] ≤ m`); returns their sum.
#[inline]
fn exp_sub(isa: Isa, s: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `dot`.
        return unsafe { x86::exp_sub(s, m) };
    }
    let _ = isa;
    s.iter_mut()
        .map(|v| {
            *v = (*v - m).exp();
            *v
        })
        .sum()
}

/// Running state of one head's online softmax: maximum logit, sum of weights, weighted
/// sum of values. Starts with the sink (a logit with no value).
struct Online {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

impl Online {
    fn new(sink: f32, hd: usize) -> Self {
        Online { m: sink, l: 1.0, acc: vec![0.0; hd] }
    }

    /// Adds a block of keys (= values: K and V are one head) for query `q`.
    fn block(&mut self, isa: Isa, q: &[f32], scale: f32, keys: &[&[f32]]) {
        let mut s = [0f32; BLOCK];
        let s = &mut s[..keys.len()];
        scores(isa, q, scale, keys, s);
        let bm = max(isa, s);
        let c = if bm > self.m {
            let c = (self.m - bm).exp();
            self.m = bm;
            self.l *= c;
            c
        } else {
            1.0
        };
        self.l += exp_sub(isa, s, self.m);
        scale_add(isa, &mut self.acc, c, s, keys);
    }

    /// A state with no logit yet (a part of a split key range).
    fn empty(hd: usize) -> Self {
        Online { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0.0; hd] }
    }

    /// Folds in the state of another part of the keys.
    fn merge(&mut self, o: Online) {
        if o.l == 0.0 {
            return;
        }
        let m = self.m.max(o.m);
        let (a, b) = ((self.m - m).exp(), (o.m - m).exp());
        self.l = self.l * a + o.l * b;
        self.acc.iter_mut().zip(&o.acc).for_each(|(x, y)| *x = *x * a + y * b);
        self.m = m;
    }

    fn finish(self, out: &mut [f32]) {
        let inv = 1.0 / self.l;
        out.iter_mut().zip(&self.acc).for_each(|(o, a)| *o = a * inv);
    }
}

/// The indexer's choice for the query at position `p`: the top k of the visible rows.
fn select(isa: Isa, v: &CompressedView<'_>, keys: &[f32], iq: &[f32], iw: &[f32], p: usize) -> Vec<u32> {
    let di = v.attrs.index_dim as usize;
    let visible = v.visible(p).min(keys.len() / di.max(1));
    if visible <= v.attrs.topk as usize {
        return (0..visible as u32).collect();
    }
    let (qi, wh, dscale) = v.index_query(iq, iw, p);
    let scored: Vec<(f32, u32)> = keys[..visible * di]
        .par_chunks(INDEX_TASK * di)
        .enumerate()
        .flat_map_iter(|(b, block)| {
            let mut s = Vec::with_capacity(INDEX_TASK);
            index_scores(isa, &qi, &wh, dscale, block, di, &mut s);
            s.into_iter().enumerate().map(move |(j, s)| (s, (b * INDEX_TASK + j) as u32))
        })
        .collect();
    v.top_k(scored)
}

/// One query row's work: its rotated query (all heads), the raw rows it sees (row
/// numbers of the view's `raw`) and the compressed rows (chosen by the indexer, or all
/// visible ones).
struct Job<'a> {
    p: usize,
    q: Vec<f32>,
    raw: std::ops::Range<usize>,
    comp: Vec<&'a [f32]>,
}

/// Query rows per prefill tile: each block of raw keys is read once for all of them.
const TILE: usize = 8;
/// Fewest raw keys per parallel split of a decode step.
const SPLIT: usize = 1024;

/// Online-softmax states `st[r·h + head]` of the rows `jobs` over their raw rows in
/// `keys` (row numbers of `raw`, clipped to each row's range) and, with `comp`, their
/// compressed rows: key blocks outermost, so each block is read once for every row and head.
fn sweep(
    isa: Isa,
    v: &CompressedView<'_>,
    jobs: &[Job<'_>],
    keys: std::ops::Range<usize>,
    comp: bool,
    st: &mut [Online],
) {
    let (h, hd, scale) = (v.attrs.heads as usize, v.attrs.head_dim as usize, v.attrs.scale);
    let mut refs: [&[f32]; BLOCK] = [&[]; BLOCK];
    for k0 in keys.clone().step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(keys.end);
        for (j, r) in refs.iter_mut().zip(k0..k1) {
            *j = &v.raw[r * hd..(r + 1) * hd];
        }
        for (job, st) in jobs.iter().zip(st.chunks_mut(h)) {
            let (a, b) = (k0.max(job.raw.start), k1.min(job.raw.end));
            if a >= b {
                continue;
            }
            for (qh, s) in job.q.chunks_exact(hd).zip(st.iter_mut()) {
                s.block(isa, qh, scale, &refs[a - k0..b - k0]);
            }
        }
    }
    if comp {
        for (job, st) in jobs.iter().zip(st.chunks_mut(h)) {
            for keys in job.comp.chunks(BLOCK) {
                for (qh, s) in job.q.chunks_exact(hd).zip(st.iter_mut()) {
                    s.block(isa, qh, scale, keys);
                }
            }
        }
    }
}

/// Attention of query rows `q` (`[rows, heads·head_dim]`, not rotated; row t at position
/// `first_pos + t`) over the slot `v`; `idx_q`/`idx_w`: the indexer's inputs per row.
///
/// Prefill: tiles of [`TILE`] rows in parallel, each sweeping the raw keys once. Decode
/// (one row): the raw keys split in parallel parts (flash-decoding), the compressed rows
/// one more part, the parts' softmax states merged.
pub(crate) fn attend(
    isa: Isa,
    v: &CompressedView<'_>,
    q: &[f32],
    first_pos: usize,
    idx_q: Option<&[f32]>,
    idx_w: Option<&[f32]>,
    sink: &[f32],
) -> Vec<f32> {
    let a = v.attrs;
    let (h, hd) = (a.heads as usize, a.head_dim as usize);
    let (nh, di) = (a.index_heads as usize, a.index_dim as usize);
    let mut out = vec![0f32; q.len()];
    if h == 0 || hd == 0 {
        return out;
    }
    let job = |t: usize| {
        let p = first_pos + t;
        let comp: Vec<&[f32]> = match (v.index_keys, idx_q, idx_w) {
            (Some(keys), Some(iq), Some(iw)) => select(isa, v, keys, &iq[t * nh * di..], &iw[t * nh..], p)
                .into_iter()
                .map(|w| &v.comp[w as usize * hd..(w as usize + 1) * hd])
                .collect(),
            _ => v.comp[..v.visible(p) * hd].chunks_exact(hd).collect(),
        };
        let mut qr = q[t * h * hd..(t + 1) * h * hd].to_vec();
        v.rope(&mut qr, hd, p, 1.0);
        Job { p, q: qr, raw: v.raw_range(p), comp }
    };
    let finish = |job: &Job<'_>, st: Vec<Online>, o: &mut [f32]| {
        for (s, oh) in st.into_iter().zip(o.chunks_mut(hd)) {
            s.finish(oh);
        }
        v.rope(o, hd, job.p, -1.0);
    };
    let fresh = || (0..h).map(|head| Online::new(sink[head], hd)).collect::<Vec<_>>();
    if out.len() == h * hd {
        let job = job(0);
        let n = job.raw.len();
        let parts = (n / SPLIT).clamp(1, 4 * rayon::current_num_threads().max(1));
        let per = n.div_ceil(parts).max(1);
        let states: Vec<Vec<Online>> = (0..=parts)
            .into_par_iter()
            .map(|i| {
                let jobs = std::slice::from_ref(&job);
                if i == parts {
                    // The sink and the compressed rows.
                    let mut st = fresh();
                    sweep(isa, v, jobs, 0..0, true, &mut st);
                    return st;
                }
                let lo = job.raw.start + i * per;
                let mut st: Vec<Online> = (0..h).map(|_| Online::empty(hd)).collect();
                sweep(isa, v, jobs, lo..(lo + per).min(job.raw.end), false, &mut st);
                st
            })
            .collect();
        let mut states = states.into_iter().rev();
        let mut st = states.next().unwrap_or_else(fresh);
        for part in states {
            st.iter_mut().zip(part).for_each(|(s, p)| s.merge(p));
        }
        finish(&job, st, &mut out);
        return out;
    }
    out.par_chunks_mut(TILE * h * hd).enumerate().for_each(|(ti, o)| {
        let jobs: Vec<Job<'_>> = (0..o.len() / (h * hd)).map(|r| job(ti * TILE + r)).collect();
        let mut st: Vec<Online> = jobs.iter().flat_map(|_| fresh()).collect();
        let lo = jobs.iter().map(|j| j.raw.start).min().unwrap_or(0);
        let hi = jobs.iter().map(|j| j.raw.end).max().unwrap_or(0);
        sweep(isa, v, &jobs, lo..hi, true, &mut st);
        let mut st = st.into_iter();
        for (job, o) in jobs.iter().zip(o.chunks_mut(h * hd)) {
            finish(job, st.by_ref().take(h).collect(), o);
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `a · b` over `a.len()` values (`b` at least as long).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / 16 * 16;
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < full {
            // SAFETY: i + 16 ≤ n ≤ both lengths.
            unsafe {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), s0);
                s1 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), _mm256_loadu_ps(b.as_ptr().add(i + 8)), s1);
            }
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        for j in full..n {
            s += a[j] * b[j];
        }
        s
    }

    /// `s[j] = (q · keys[j])·scale`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores(q: &[f32], scale: f32, keys: &[&[f32]], s: &mut [f32]) {
        for (sj, k) in s.iter_mut().zip(keys) {
            *sj = dot(q, k) * scale;
        }
    }

    /// The indexer's scores of the `di`-wide rows of `keys`, pushed onto `out`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn index_scores(qi: &[f32], wh: &[f32], dscale: f32, keys: &[f32], di: usize, out: &mut Vec<f32>) {
        for k in keys.chunks_exact(di) {
            let mut s = 0f32;
            for (qh, w) in qi.chunks_exact(di).zip(wh) {
                s += w * (dot(qh, k).max(0.0) * dscale);
            }
            out.push(s);
        }
    }

    /// `exp(x)` per lane (Cephes' single-precision polynomial, within 2 ulp; inputs
    /// below −87 give 0-ish, as the softmax needs).
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), _mm256_set1_ps(-87.0));
        let fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), 0x08);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// `s[j] = exp(s[j] − m)`; returns their sum.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sub(s: &mut [f32], m: f32) -> f32 {
        let n = s.len();
        let full = n / 8 * 8;
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 ≤ n.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(i)), mv));
                _mm256_storeu_ps(s.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
            }
            i += 8;
        }
        let mut total = hsum(sum);
        for v in &mut s[full..] {
            *v = (*v - m).exp();
            total += *v;
        }
        total
    }

    /// Lanes `i..i + 8·G` of `acc = acc·c + Σ_j w[j]·rows[j]`: `G` accumulators in
    /// registers, so the keys' updates run as `G` independent chains.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale_add_group<const G: usize>(acc: &mut [f32], i: usize, c: __m256, w: &[f32], rows: &[&[f32]]) {
        assert!(i + 8 * G <= acc.len() && rows.iter().all(|r| r.len() >= i + 8 * G));
        // SAFETY: every access is below i + 8·G, checked above for `acc` and each row.
        unsafe {
            let mut a: [__m256; G] =
                std::array::from_fn(|g| _mm256_mul_ps(_mm256_loadu_ps(acc.as_ptr().add(i + 8 * g)), c));
            for (wj, r) in w.iter().zip(rows) {
                let b = _mm256_set1_ps(*wj);
                let p = r.as_ptr().add(i);
                for (g, x) in a.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(b, _mm256_loadu_ps(p.add(8 * g)), *x);
                }
            }
            for (g, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(i + 8 * g), *x);
            }
        }
    }

    /// `acc = acc·c + Σ_j w[j]·rows[j]` (every row at least as long as `acc`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scale_add(acc: &mut [f32], c: f32, w: &[f32], rows: &[&[f32]]) {
        let n = acc.len();
        let cv = _mm256_set1_ps(c);
        let mut i = 0;
        while i + 64 <= n {
            scale_add_group::<8>(acc, i, cv, w, rows);
            i += 64;
        }
        if i + 32 <= n {
            scale_add_group::<4>(acc, i, cv, w, rows);
            i += 32;
        }
        while i + 8 <= n {
            scale_add_group::<1>(acc, i, cv, w, rows);
            i += 8;
        }
        for j in i..n {
            let mut x = acc[j] * c;
            for (wj, r) in w.iter().zip(rows) {
                x += wj * r[j];
            }
            acc[j] = x;
        }
    }

    /// The largest of `s` (−∞ when empty).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn max(s: &[f32]) -> f32 {
        let (full, tail) = s.as_chunks::<8>();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in full {
            // SAFETY: `c` is 8 values.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_movehdup_ps(h));
        tail.iter().fold(_mm_cvtss_f32(h), |a, b| a.max(*b))
    }
}

#[cfg(test)]
mod tests {
    use kiln_ir::{CompressedAttentionAttrs, RotaryAttrs};

    use super::*;

    fn random(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The fused kernel against the reference's definition on one random slot of `positions`
    /// raw rows: the split decode path (window over 1024 keys), prefill tiles with a ragged
    /// last tile, indexer top-k that drops rows, and HCA-like rows without an indexer.
    fn case(isa: Isa, window: u64, indexer: bool, rows: usize) {
        let (h, hd, nh, di, ratio, positions) = (3usize, 32usize, 2usize, 16usize, 4usize, 3000usize);
        let attrs = CompressedAttentionAttrs {
            cache: 0,
            heads: h as u64,
            head_dim: hd as u64,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
            ratio: ratio as u64,
            topk: if indexer { 64 } else { 0 },
            index_heads: if indexer { nh as u64 } else { 0 },
            index_dim: if indexer { di as u64 } else { 0 },
            eps: 1e-6,
            rope: RotaryAttrs {
                rot_dims: 8,
                theta: 10000.0,
                yarn_factor: 1.0,
                yarn_orig_ctx: 0,
                yarn_beta_fast: 32.0,
                yarn_beta_slow: 1.0,
            },
        };
        let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        let mut seed = 7u64;
        let raw_pos = 200;
        let raw = random((positions - raw_pos) * hd, &mut seed);
        let comp = random(positions / ratio * hd, &mut seed);
        let keys = random(positions / ratio * di, &mut seed);
        let v = CompressedView {
            attrs: &attrs,
            inv: &inv,
            raw: &raw,
            raw_pos,
            comp: &comp,
            index_keys: indexer.then_some(&keys[..]),
        };
        let q = random(rows * h * hd, &mut seed);
        let iq = random(rows * nh * di, &mut seed);
        let iw = random(rows * nh, &mut seed);
        let sink = random(h, &mut seed);
        let first = positions - rows;
        let (iq, iw) = if indexer { (Some(&iq[..]), Some(&iw[..])) } else { (None, None) };
        let want = v.attend(&q, first, iq, iw, &sink);
        let got = attend(isa, &v, &q, first, iq, iw, &sink);
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{isa:?} window {window} indexer {indexer} rows {rows}: max |Δ| {d}");
    }

    #[test]
    fn fused_kernel_matches_the_reference() {
        for isa in [Isa::detect(), Isa::Scalar] {
            for (window, indexer) in [(128, true), (128, false), (4096, false), (2500, true)] {
                for rows in [1, 11] {
                    case(isa, window, indexer, rows);
                }
            }
        }
    }
}
