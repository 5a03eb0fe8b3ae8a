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
///
/// A slot may be a ring ([`KvCache::with_ring`], planned by `crate::ring`): it then holds
/// `rows` rows, the first `sink` positions and after them a ring, and position `j` lives
/// in row [`KvCache::row`]`(j)`; `k`/`v` are indexed by row.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Floats per position: `kv_heads · head_dim`.
    pub width: usize,
    /// Most positions the slot will hold (the session's context).
    max_positions: usize,
    /// Rows the slot keeps (`max_positions`, or its sinks and ring).
    rows: usize,
    sink: usize,
    /// Positions appended so far.
    pos: usize,
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
        KvCache {
            width,
            max_positions,
            rows: max_positions,
            sink: 0,
            pos: 0,
            k: Vec::new(),
            v: Vec::new(),
            dtype,
            kq: Vec::new(),
            vq: Vec::new(),
        }
    }

    /// The same slot kept as `sink` rows and a ring after them, `rows` in all.
    pub fn with_ring(mut self, rows: usize, sink: usize) -> Self {
        if rows < self.max_positions && sink < rows {
            (self.rows, self.sink) = (rows, sink);
        }
        self
    }

    /// The row that holds position `j` (`j` itself unless the slot is a ring that wrapped).
    pub fn row(&self, j: usize) -> usize {
        crate::ring::row(j, self.rows, self.sink)
    }

    /// Rows stored (at most the ring's).
    fn stored(&self) -> usize {
        self.pos.min(self.rows)
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

    /// Positions appended (a ring holds only the last of them besides its sinks).
    pub fn len(&self) -> usize {
        self.pos
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
        let w = self.width.max(1);
        let n = k.len() / w;
        // Rows past the stored ones grow the buffers; a ring that wrapped overwrites.
        let grow = (self.pos + n).min(self.rows) - self.stored();
        let rows: Vec<usize> = (self.pos..self.pos + n).map(|j| self.row(j)).collect();
        if self.is_quantized() {
            let (rb, dtype, max) = (self.row_bytes(), self.dtype, self.rows);
            for (buf, new) in [(&mut self.kq, k), (&mut self.vq, v)] {
                reserve_doubling(buf, grow * rb, max * rb);
                buf.resize(buf.len() + grow * rb, 0);
                let mut tmp = vec![0.0f32; w];
                for (row, &r) in new.chunks(w).zip(&rows) {
                    tmp.copy_from_slice(row);
                    rotate64(&mut tmp);
                    // Rows are whole blocks (the verifier checks head_dim), so this cannot fail.
                    let _ = crate::quant::quantize_row(dtype, &tmp, &mut buf[r * rb..(r + 1) * rb]);
                }
            }
        } else {
            for (buf, new) in [(&mut self.k, k), (&mut self.v, v)] {
                reserve_doubling(buf, grow * w, self.rows * w);
                buf.resize(buf.len() + grow * w, 0.0);
                for (row, &r) in new.chunks(w).zip(&rows) {
                    buf[r * w..(r + 1) * w].copy_from_slice(row);
                }
            }
        }
        self.pos += n;
    }

    /// Keeps only the first `pos` positions. A ring that wrapped keeps its rows (the next
    /// appends overwrite them); the session bounds how far back it may roll.
    pub fn truncate(&mut self, pos: usize) {
        if pos >= self.pos {
            return;
        }
        self.pos = pos;
        let (rb, keep) = (self.row_bytes(), self.stored());
        self.kq.truncate(keep * rb);
        self.vq.truncate(keep * rb);
        self.k.truncate(keep * self.width);
        self.v.truncate(keep * self.width);
    }

    /// An f32 slot with this slot's values (a block-typed slot's dequantized;
    /// `f16`: rounded to f16 as well, the values llama.cpp-numerics attention reads).
    pub fn dequantized(&self, f16: bool) -> KvCache {
        let mut out = KvCache::new(self.width, self.max_positions);
        (out.rows, out.sink, out.pos) = (self.rows, self.sink, self.pos);
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

/// Query rows per call from which llama.cpp's CPU flash attention takes its tiled path
/// (`GGML_FA_TILE_Q`), and the keys per tile there (`GGML_FA_TILE_KV`).
pub const FA_TILE_Q: usize = 64;
pub const FA_TILE_KV: usize = 64;

/// How attention is computed: kiln's definition, or one of llama.cpp's two CPU flash
/// attention paths (`Numerics::Ggml`), chosen as llama.cpp chooses by the number of token
/// rows of the call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AttnNumerics {
    /// f32 scores, a max-subtracted softmax with an f64 sum, then `Σ a_j·v_j`.
    Exact,
    /// llama.cpp's one-query flash attention (calls of fewer than [`FA_TILE_Q`] rows): q
    /// rounded to f16, ggml's f16 dot order, an online softmax key by key with libm's
    /// `expf`, the value accumulator rounded to f16 after every step.
    GgmlRows,
    /// llama.cpp's tiled flash attention (calls of [`FA_TILE_Q`] rows or more): per tile of
    /// [`FA_TILE_KV`] positions, f32 scores (each one fused multiply-add chain over the head
    /// dimension), the tile's maximum, ggml's vector `expf` and an f64 sum by groups of eight
    /// (its AVX2 `ggml_vec_soft_max_f32`), an f32 value accumulator (one fused chain per tile).
    GgmlTiled,
}

impl AttnNumerics {
    /// The attention numerics of `numerics` in a call over `batch` token rows.
    pub fn of(numerics: crate::Numerics, batch: usize) -> AttnNumerics {
        match numerics {
            crate::Numerics::Exact => AttnNumerics::Exact,
            crate::Numerics::Ggml if batch >= FA_TILE_Q => AttnNumerics::GgmlTiled,
            crate::Numerics::Ggml => AttnNumerics::GgmlRows,
        }
    }

    /// Whether the cache is read as llama.cpp reads it (f16 values).
    pub fn is_ggml(self) -> bool {
        self != AttnNumerics::Exact
    }
}

/// Attention of query rows `q` (`[rows][heads · head_dim]`, row `t` at
/// position `first_pos + t`) over `cache`, which must already hold every
/// position up to the last query's. Returns `[rows][heads · head_dim]`.
///
/// Parallel over (token, head) pairs.
pub fn attend(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs, mode: AttnNumerics) -> Vec<f32> {
    if cache.is_quantized() {
        return attend(q, first_pos, &cache.dequantized(mode.is_ggml()), attrs, mode);
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
        // Rows of the keys, in key order.
        let keys = || sinks.clone().chain(window.clone()).map(|j| cache.row(j));
        match mode {
            AttnNumerics::GgmlRows => return flash_f16(qh, keys(), cache, kv_off, attrs, o),
            AttnNumerics::GgmlTiled => {
                return flash_tiled(qh, sinks.clone().chain(window.clone()), cache, kv_off, attrs, o);
            }
            AttnNumerics::Exact => {}
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

/// The f64 sum of a tile's probabilities as ggml's AVX2 `ggml_vec_soft_max_f32` adds them:
/// per group of eight `((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7))` in f32, the groups
/// added in f64 in order.
fn tile_sum(p: &[f32; FA_TILE_KV]) -> f64 {
    p.as_chunks::<8>()
        .0
        .iter()
        .fold(0f64, |sum, v| sum + f64::from(((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))))
}

/// The score scale and softcap as llama.cpp's tiled path applies them (see [`tiled_score`]).
pub fn tiled_scale(attrs: &AttentionAttrs) -> (f32, f32) {
    if attrs.softcap > 0.0 { (attrs.scale / attrs.softcap, attrs.softcap) } else { (attrs.scale, 0.0) }
}

/// A score of the tiled path from its dot product, with [`tiled_scale`]'s `(scale, softcap)`:
/// `dot·scale`, or with a softcap `c`, `c·tanh(dot·(scale/c))`.
#[inline(always)]
pub fn tiled_score(dot: f32, (scale, softcap): (f32, f32)) -> f32 {
    let v = dot * scale;
    if softcap > 0.0 { softcap * v.tanh() } else { v }
}

/// One tile of [`AttnNumerics::GgmlTiled`] for one query row: `s` the tile's scores
/// ([`tiled_score`], `−∞` where the query sees no key), `m` and `sum` the row's running
/// maximum and sum, `acc` its value accumulator. With `M' = max(m, max_j s_j)`: when
/// `M' > m`, `acc` and `sum` scale by `e^(m−M')` (libm `expf`); then `p_j = ggml_v_expf(s_j −
/// M')` and `sum = f32(sum + tile_sum(p))`. Returns the `p_j` that weigh the tile's values
/// (`None` when no score is finite: the tile adds nothing). The tile maximum is taken
/// sixteen lanes at a time (exact in any order).
#[inline(always)]
pub fn tiled_softmax(s: &[f32; FA_TILE_KV], m: &mut f32, sum: &mut f32, acc: &mut [f32]) -> Option<[f32; FA_TILE_KV]> {
    let mut lanes = [f32::NEG_INFINITY; 16];
    for c in s.as_chunks::<16>().0 {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let tile_max = lanes.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if tile_max == f32::NEG_INFINITY {
        return None;
    }
    let m_new = m.max(tile_max);
    if m_new > *m {
        let ms = (*m - m_new).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
        *sum *= ms;
    }
    *m = m_new;
    let mut p = [0f32; FA_TILE_KV];
    for (pj, &v) in p.iter_mut().zip(s) {
        *pj = super::kernels::ggml_v_expf(v - m_new);
    }
    *sum = (f64::from(*sum) + tile_sum(&p)) as f32;
    Some(p)
}

/// llama.cpp's tiled CPU flash attention ([`AttnNumerics::GgmlTiled`]) for one (query,
/// head) over the positions `keys` (ascending) of an f16-valued cache. The keys go by tiles
/// of [`FA_TILE_KV`] positions (`position / 64`, as llama.cpp tiles a cache's cells); per
/// tile holding a key of this query:
///
/// ```text
/// s_j   = fma chain over d of q_d·k_jd, times scale     (−∞ for the tile's other positions)
/// M'    = max(M, max_j s_j);  if M' > M: acc *= e^(M−M') and S *= e^(M−M')   (libm expf)
/// p_j   = ggml_v_expf(s_j − M');  S = f32(S + tile_sum(p))
/// acc_d = fma chain over the tile's j of p_j·v_jd
/// ```
///
/// then `out = acc · (1/S)`. The value chain runs over every cached position of the tile,
/// those of other queries (probability zero) included, as llama.cpp's tile product does.
fn flash_tiled(
    qh: &[f32],
    keys: impl Iterator<Item = usize>,
    cache: &KvCache,
    kv_off: usize,
    attrs: &AttentionAttrs,
    o: &mut [f32],
) {
    let hd = o.len();
    let width = cache.width;
    let scale = tiled_scale(attrs);
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; hd];
    let mut keys = keys.peekable();
    while let Some(&first) = keys.peek() {
        let tile = first / FA_TILE_KV;
        let mut s = [f32::NEG_INFINITY; FA_TILE_KV];
        while let Some(j) = keys.next_if(|j| j / FA_TILE_KV == tile) {
            let r = cache.row(j);
            let kj = &cache.k[r * width + kv_off..r * width + kv_off + hd];
            let dot = qh.iter().zip(kj).fold(0f32, |a, (&q, &k)| k.mul_add(q, a));
            s[j % FA_TILE_KV] = tiled_score(dot, scale);
        }
        let Some(p) = tiled_softmax(&s, &mut m, &mut s_sum, &mut acc) else { continue };
        // Every cached position of the tile, as llama.cpp's tile product takes them (the
        // others' probabilities are zero: they add ±0).
        for (jt, &pj) in p.iter().enumerate().take(cache.len().saturating_sub(tile * FA_TILE_KV)) {
            let r = cache.row(tile * FA_TILE_KV + jt);
            let vj = &cache.v[r * width + kv_off..r * width + kv_off + hd];
            for (a, &v) in acc.iter_mut().zip(vj) {
                *a = v.mul_add(pj, *a);
            }
        }
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (od, a) in o.iter_mut().zip(&acc) {
        *od = a * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A ring slot (sinks + window + chunk − 1 rows) attends exactly as a slot that keeps
    /// every position, through chunks, wraps and a rollback of a chunk, for every storage
    /// type and both numerics.
    #[test]
    fn a_ring_slot_attends_like_a_full_one() {
        let (heads, kv_heads, hd, window, sink, chunk) = (4usize, 2usize, 64usize, 6u64, 2u64, 5usize);
        let width = kv_heads * hd;
        let attrs = AttentionAttrs {
            cache: 0,
            heads: heads as u64,
            kv_heads: kv_heads as u64,
            head_dim: hd as u64,
            scale: 0.2,
            window,
            sink,
            softcap: 0.0,
            kv_dtype: DType::F32,
        };
        let rows = (sink + window) as usize + chunk - 1;
        for dtype in [DType::F32, DType::Q8_0, DType::F8E4M3] {
            for mode in [AttnNumerics::Exact, AttnNumerics::GgmlRows, AttnNumerics::GgmlTiled] {
                let mut full = KvCache::with_dtype(width, 100, dtype);
                let mut ring = KvCache::with_dtype(width, 100, dtype).with_ring(rows, sink as usize);
                // Chunks of up to `chunk` tokens; after the fifth a rollback of `chunk`.
                let mut pos = 0;
                for (step, t) in [5usize, 3, 5, 1, 4, 2, 5, 5, 1, 3].into_iter().enumerate() {
                    let (k, v, q) = (
                        rand(t * width, 3 * step as u64),
                        rand(t * width, 91 + step as u64),
                        rand(t * heads * hd, 7 + step as u64),
                    );
                    full.append(&k, &v);
                    ring.append(&k, &v);
                    let a = attend(&q, pos, &full, &attrs, mode);
                    let b = attend(&q, pos, &ring, &attrs, mode);
                    assert!(
                        a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits())),
                        "{dtype} {mode:?} step {step}"
                    );
                    pos += t;
                    if step == 4 {
                        pos -= chunk;
                        full.truncate(pos);
                        ring.truncate(pos);
                    }
                }
                assert!(pos > 2 * rows, "the ring must wrap");
                assert_eq!(ring.len(), full.len());
                assert!(ring.bytes() < full.bytes() / 2, "{dtype}: {} vs {}", ring.bytes(), full.bytes());
            }
        }
    }
}
