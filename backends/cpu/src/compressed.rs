//! Fused compressed (DeepSeek-V4) attention: for each query row, one pass that scores
//! the Lightning Indexer over the visible compressed rows, keeps the top k, and attends
//! over the raw window ∪ the chosen compressed rows ∪ the sink with an online softmax
//! (blocks of keys, a running maximum, no score row over all keys). Rows in parallel,
//! and within a row the indexer's key blocks and the heads; AVX2 dots and updates where
//! detected, the same loops in scalar code elsewhere.
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
    if isa == Isa::Avx2 {
        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2 and FMA.
        return unsafe { x86::dot(a, b) };
    }
    let _ = isa;
    reference::dot(a, b)
}

/// `acc = acc·c + Σ_j w[j]·rows[j]`.
#[inline]
fn scale_add(isa: Isa, acc: &mut [f32], c: f32, w: &[f32], rows: &[&[f32]]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && rows.iter().all(|r| r.len() >= acc.len()) {
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
    if isa == Isa::Avx2 {
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
        for (sj, k) in s.iter_mut().zip(keys) {
            *sj = dot(isa, q, k) * scale;
        }
        let bm = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
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
            let (qi, wh) = (&qi, &wh);
            block.chunks_exact(di).enumerate().map(move |(j, k)| {
                let s: f32 = qi.chunks_exact(di).zip(wh).map(|(qh, w)| w * (dot(isa, qh, k).max(0.0) * dscale)).sum();
                (s, (b * INDEX_TASK + j) as u32)
            })
        })
        .collect();
    v.top_k(scored)
}

/// Attention of query rows `q` (`[rows, heads·head_dim]`, not rotated; row t at position
/// `first_pos + t`) over the slot `v`; `idx_q`/`idx_w`: the indexer's inputs per row.
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
    out.par_chunks_mut(h * hd).enumerate().for_each(|(t, o)| {
        let p = first_pos + t;
        let chosen = match (v.index_keys, idx_q, idx_w) {
            (Some(keys), Some(iq), Some(iw)) => Some(select(isa, v, keys, &iq[t * nh * di..], &iw[t * nh..], p)),
            _ => None,
        };
        let raw: Vec<&[f32]> = v.raw_rows(p).chunks_exact(hd).collect();
        let comp: Vec<&[f32]> = match &chosen {
            Some(c) => c.iter().map(|&w| &v.comp[w as usize * hd..(w as usize + 1) * hd]).collect(),
            None => v.comp[..v.visible(p) * hd].chunks_exact(hd).collect(),
        };
        let mut qr = q[t * h * hd..(t + 1) * h * hd].to_vec();
        v.rope(&mut qr, hd, p, 1.0);
        o.par_chunks_mut(hd).zip(qr.par_chunks(hd)).enumerate().for_each(|(head, (oh, qh))| {
            let mut st = Online::new(sink[head], hd);
            for keys in raw.chunks(BLOCK).chain(comp.chunks(BLOCK)) {
                st.block(isa, qh, a.scale, keys);
            }
            st.finish(oh);
        });
        v.rope(o, hd, p, -1.0);
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

    /// `acc = acc·c + Σ_j w[j]·rows[j]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scale_add(acc: &mut [f32], c: f32, w: &[f32], rows: &[&[f32]]) {
        let n = acc.len();
        let full = n / 8 * 8;
        let cv = _mm256_set1_ps(c);
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 ≤ n, and the caller checked every row is at least n long.
            unsafe {
                let mut x = _mm256_mul_ps(_mm256_loadu_ps(acc.as_ptr().add(i)), cv);
                for (wj, r) in w.iter().zip(rows) {
                    x = _mm256_fmadd_ps(_mm256_set1_ps(*wj), _mm256_loadu_ps(r.as_ptr().add(i)), x);
                }
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), x);
            }
            i += 8;
        }
        for j in full..n {
            let mut x = acc[j] * c;
            for (wj, r) in w.iter().zip(rows) {
                x += wj * r[j];
            }
            acc[j] = x;
        }
    }
}
