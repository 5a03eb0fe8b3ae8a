//! The KV cache and causal grouped-query attention.
//!
//! A cache slot holds the keys and values of every cached position, f32,
//! contiguous `[pos][kv_heads · head_dim]`. An attention op with `k`/`v`
//! appends the `T` new rows to its slot, then every query token `t` at
//! position `p` and head `h` attends to the cached positions `j ≤ p` (and
//! `p − j < window` or `j < sink` when `window > 0`) of KV head `h / (heads / kv_heads)`,
//! sinks first ([`AttentionAttrs::key_ranges`]):
//!
//! ```text
//! s_j = scale · (q · k_j)          (softcap > 0: s_j = cap · tanh(s_j / cap))
//! a   = softmax(s)                 (max-subtracted, f64 sum, like ggml)
//! out = Σ_j a_j · v_j
//! ```
//!
//! An attention op without `k`/`v` reads a slot written by an earlier op of
//! the same graph, which has already appended this call's rows.

use kiln_ir::{AttentionAttrs, DType};
use rayon::prelude::*;

use super::kernels::{dot, softmax_row};

/// One KV-cache slot (in `Numerics::Ggml` it holds f16-rounded values). A slot
/// of a quantized type (`q8_0`, `q4_0`: the IR's `kv_dtype`) keeps each
/// position's row as ggml blocks in `kq`/`vq` instead, and attention reads the
/// dequantized values ([`KvCache::dequantized`]). Rows whose width is a
/// multiple of 64 are stored rotated by an orthonormal Walsh–Hadamard transform
/// per 64 values (`H/8`, its own inverse), which spreads outliers across each
/// block before rounding, as llama.cpp rotates quantized K/V caches; reading
/// rotates back, so attention sees the original basis.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Floats per position: `kv_heads · head_dim`.
    pub width: usize,
    /// Most positions the slot will hold (the session's context).
    max_positions: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Storage type: F32 (`k`/`v`) or a block type (`kq`/`vq`).
    dtype: DType,
    kq: Vec<u8>,
    vq: Vec<u8>,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

impl KvCache {
    pub fn new(width: usize, max_positions: usize) -> Self {
        Self::with_dtype(width, max_positions, DType::F32)
    }

    /// A slot storing rows as `dtype` (F32, or a block type whose block divides `width`).
    pub fn with_dtype(width: usize, max_positions: usize, dtype: DType) -> Self {
        KvCache { width, max_positions, k: Vec::new(), v: Vec::new(), dtype, kq: Vec::new(), vq: Vec::new() }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_quantized(&self) -> bool {
        self.dtype != DType::F32
    }

    fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.width as u64).unwrap_or(0) as usize
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        if self.is_quantized() {
            self.kq.len().checked_div(self.row_bytes()).unwrap_or(0)
        } else {
            self.k.len().checked_div(self.width).unwrap_or(0)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the slot holds for K and V.
    pub fn bytes(&self) -> usize {
        if self.is_quantized() { self.kq.len() + self.vq.len() } else { 4 * (self.k.len() + self.v.len()) }
    }

    /// Appends rows of keys and values (`[n][width]` each), quantizing them
    /// for a block-typed slot. Grows by doubling, but never reserves room for
    /// more than `max_positions`.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        if self.is_quantized() {
            let (rb, w, dtype, max) = (self.row_bytes(), self.width.max(1), self.dtype, self.max_positions);
            for (buf, new) in [(&mut self.kq, k), (&mut self.vq, v)] {
                let start = buf.len();
                reserve_doubling(buf, new.len() / w * rb, max * rb);
                buf.resize(buf.len() + new.len() / w * rb, 0);
                let mut tmp = vec![0.0f32; w];
                for (row, dst) in new.chunks(w).zip(buf[start..].chunks_mut(rb)) {
                    tmp.copy_from_slice(row);
                    rotate64(&mut tmp);
                    // Rows are whole blocks (the verifier checks head_dim), so this cannot fail.
                    let _ = crate::quant::quantize_row(dtype, &tmp, dst);
                }
            }
            return;
        }
        for (buf, new) in [(&mut self.k, k), (&mut self.v, v)] {
            reserve_doubling(buf, new.len(), self.max_positions * self.width);
            buf.extend_from_slice(new);
        }
    }

    /// Keeps only the first `pos` positions.
    pub fn truncate(&mut self, pos: usize) {
        let rb = self.row_bytes();
        self.kq.truncate(pos * rb);
        self.vq.truncate(pos * rb);
        self.k.truncate(pos * self.width);
        self.v.truncate(pos * self.width);
    }

    /// An f32 slot with this slot's values (a block-typed slot's dequantized;
    /// `f16`: rounded to f16 as well, the values llama.cpp-numerics attention reads).
    pub fn dequantized(&self, f16: bool) -> KvCache {
        let mut out = KvCache::new(self.width, self.len());
        if !self.is_quantized() {
            out.k.clone_from(&self.k);
            out.v.clone_from(&self.v);
            return out;
        }
        let (rb, w) = (self.row_bytes(), self.width.max(1));
        for (src, dst) in [(&self.kq, &mut out.k), (&self.vq, &mut out.v)] {
            dst.resize(src.len() / rb.max(1) * w, 0.0);
            for (row, d) in src.chunks(rb.max(1)).zip(dst.chunks_mut(w)) {
                let _ = crate::quant::dequantize_row(self.dtype, row, d);
                rotate64(d);
            }
            if f16 {
                dst.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            }
        }
        out
    }
}

/// Makes room for `more` elements in `buf`, doubling its capacity but never
/// reserving past `limit` elements (unless `more` itself needs it).
fn reserve_doubling<T>(buf: &mut Vec<T>, more: usize, limit: usize) {
    let need = buf.len() + more;
    if need > buf.capacity() {
        let cap = (2 * buf.len()).min(limit).max(need);
        buf.reserve_exact(cap - buf.len());
    }
}

/// `H/8` on every 64 values of `row` when its length is a multiple of 64 (an
/// orthonormal Walsh–Hadamard rotation that is its own inverse); else nothing.
fn rotate64(row: &mut [f32]) {
    if !row.len().is_multiple_of(64) {
        return;
    }
    for c in row.chunks_exact_mut(64) {
        let b: &mut [f32; 64] = c.try_into().expect("64 values");
        crate::quant::kq2::fwht64(b);
        b.iter_mut().for_each(|x| *x *= 0.125);
    }
}

/// Attention of query rows `q` (`[rows][heads · head_dim]`, row `t` at
/// position `first_pos + t`) over `cache`, which must already hold every
/// position up to the last query's. Returns `[rows][heads · head_dim]`.
///
/// Parallel over (token, head) pairs.
pub fn attend(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs, ggml: bool) -> Vec<f32> {
    if cache.is_quantized() {
        return attend(q, first_pos, &cache.dequantized(ggml), attrs, ggml);
    }
    let heads = attrs.heads as usize;
    let hd = attrs.head_dim as usize;
    let group = (attrs.heads / attrs.kv_heads.max(1)).max(1) as usize;
    let width = cache.width;
    let mut out = vec![0.0f32; q.len()];
    if hd == 0 || heads == 0 {
        return out;
    }
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (t, h) = (idx / heads, idx % heads);
        let p = first_pos + t;
        let kv_off = (h / group) * hd;
        let qh = &q[idx * hd..(idx + 1) * hd];
        let (sinks, window) = attrs.key_ranges(p, cache.len());
        let keys = || sinks.clone().chain(window.clone());
        if ggml {
            flash_f16(qh, keys(), cache, kv_off, attrs, o);
            return;
        }
        scores.clear();
        for j in keys() {
            let kj = &cache.k[j * width + kv_off..j * width + kv_off + hd];
            let mut s = attrs.scale * dot(qh, kj);
            if attrs.softcap > 0.0 {
                s = attrs.softcap * (s / attrs.softcap).tanh();
            }
            scores.push(s);
        }
        softmax_row(scores);
        for (j, &a) in keys().zip(scores.iter()) {
            let vj = &cache.v[j * width + kv_off..j * width + kv_off + hd];
            for (od, &vd) in o.iter_mut().zip(vj) {
                *od += a * vd;
            }
        }
    });
    out
}

fn to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// An f16 dot product summed in the order of ggml's x86 AVX2 `ggml_vec_dot_f16`:
/// four 8-lane accumulators over steps of 32 with fused multiply-adds, reduced
/// pairwise (0+2, 1+3, then 0+1, then the lanes as `_mm_hadd_ps` adds them), and
/// the leftover elements added one by one in f64. The order matters: in
/// llama.cpp-compatible numerics a last-bit difference in an attention score can
/// flip an f16 rounding of the value accumulator.
fn ggml_dot_f16(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let np = n - n % 32;
    let mut acc = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, al) in a.iter_mut().enumerate() {
                let k = i + j * 8 + l;
                *al = x[k].mul_add(y[k], *al);
            }
        }
    }
    let lanes = |p: [f32; 8], q: [f32; 8]| std::array::from_fn::<f32, 8, _>(|l| p[l] + q[l]);
    let s = lanes(lanes(acc[0], acc[2]), lanes(acc[1], acc[3]));
    let t0: [f32; 4] = std::array::from_fn(|l| s[l] + s[l + 4]);
    let mut sum = ((t0[0] + t0[1]) + (t0[2] + t0[3])) as f64;
    for k in np..n {
        sum += (x[k] * y[k]) as f64;
    }
    sum as f32
}

/// llama.cpp's CPU flash attention over an f16 cache (`Numerics::Ggml`): q rounded
/// to f16, online softmax with the value accumulator kept in f16 (rounded after
/// every scale and multiply-add), normalized at the end.
fn flash_f16(
    qh: &[f32],
    range: impl Iterator<Item = usize>,
    cache: &KvCache,
    kv_off: usize,
    attrs: &AttentionAttrs,
    o: &mut [f32],
) {
    let hd = o.len();
    let width = cache.width;
    let q16: Vec<f32> = qh.iter().map(|&v| to_f16(v)).collect();
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; hd];
    for j in range {
        let kj = &cache.k[j * width + kv_off..j * width + kv_off + hd];
        let mut s = ggml_dot_f16(&q16, kj) * attrs.scale;
        if attrs.softcap > 0.0 {
            s = attrs.softcap * (s / attrs.softcap).tanh();
        }
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            acc.iter_mut().for_each(|a| *a = to_f16(*a * ms));
        } else {
            vs = (s - m).exp();
        }
        let vj = &cache.v[j * width + kv_off..j * width + kv_off + hd];
        for (a, &v) in acc.iter_mut().zip(vj) {
            *a = to_f16(v.mul_add(vs, *a));
        }
        s_sum = s_sum.mul_add(ms, vs);
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (od, a) in o.iter_mut().zip(&acc) {
        *od = a * inv;
    }
}
