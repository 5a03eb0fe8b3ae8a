//! Attention over the KV cache in llama.cpp's two CPU flash-attention numerics (the
//! reference's `AttnNumerics::GgmlRows` and `GgmlTiled` definitions, bit for bit):
//!
//! - calls of fewer than 64 token rows: one (query, head) at a time with an f16 value
//!   accumulator, parallel over (token, head) pairs, AVX2 for the dot products and the
//!   accumulator updates ([`crate::x86::flash_f16`]);
//! - longer calls (prefill): by tiles of 64 key positions, as llama.cpp's tiled path. The
//!   work goes by (KV head, block of 16 tokens): each tile's keys are transposed once and
//!   serve every query row of the block and of the heads sharing the KV head; a row's 64
//!   scores are 64 independent fused multiply-add chains over the head dimension (one
//!   vector lane each), the probabilities ggml's vector `expf`, the value accumulator one
//!   fused chain per tile. The head dimension is a compile-time constant (64, 128 or 256),
//!   so a row's accumulator stays in registers.

use kiln_backends::reference::{self, AttnNumerics, FA_TILE_KV, KvCache, tiled_scale, tiled_score, tiled_softmax};
use kiln_ir::AttentionAttrs;
use rayon::prelude::*;

use crate::kernels::Isa;

/// Attention of query rows `q` (row `t` at position `first_pos + t`) over `cache`.
pub(crate) fn attend(
    isa: Isa,
    q: &[f32],
    first_pos: usize,
    cache: &KvCache,
    attrs: &AttentionAttrs,
    mode: AttnNumerics,
) -> Vec<f32> {
    if cache.is_quantized() {
        return attend(isa, q, first_pos, &cache.dequantized(mode.is_ggml()), attrs, mode);
    }
    let heads = attrs.heads as usize;
    let hd = attrs.head_dim as usize;
    if !isa.avx2() || heads == 0 {
        return reference::attend(q, first_pos, cache, attrs, mode);
    }
    match mode {
        AttnNumerics::GgmlRows if hd > 0 && hd.is_multiple_of(8) => attend_rows(q, first_pos, cache, attrs),
        AttnNumerics::GgmlTiled => match hd {
            64 => tiled::<64>(isa, q, first_pos, cache, attrs),
            128 => tiled::<128>(isa, q, first_pos, cache, attrs),
            256 => tiled::<256>(isa, q, first_pos, cache, attrs),
            _ => reference::attend(q, first_pos, cache, attrs, mode),
        },
        _ => reference::attend(q, first_pos, cache, attrs, mode),
    }
}

#[cfg(target_arch = "x86_64")]
fn attend_rows(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs) -> Vec<f32> {
    let heads = attrs.heads as usize;
    let hd = attrs.head_dim as usize;
    let group = (attrs.heads / attrs.kv_heads.max(1)).max(1) as usize;
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |scratch, (idx, o)| {
            let (t, h) = (idx / heads, idx % heads);
            let p = first_pos + t;
            let (sinks, window) = attrs.key_ranges(p, cache.len());
            let qh = &q[idx * hd..(idx + 1) * hd];
            // SAFETY: only called with `Isa::Avx2`, detected at run time.
            let rows = sinks.chain(window).map(|j| cache.row(j));
            unsafe { crate::x86::flash_f16(qh, cache, rows, (h / group) * hd, attrs, o, scratch) };
        },
    );
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn attend_rows(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs) -> Vec<f32> {
    reference::attend(q, first_pos, cache, attrs, AttnNumerics::GgmlRows)
}

/// Tokens per task of the tiled path.
const BLOCK: usize = 16;

/// The tiled path for head dimension `HD`: tasks of (KV head, block of [`BLOCK`] tokens).
fn tiled<const HD: usize>(isa: Isa, q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs) -> Vec<f32> {
    let heads = attrs.heads as usize;
    let kv_heads = (attrs.kv_heads as usize).max(1);
    let group = (heads / kv_heads).max(1);
    let tokens = q.len() / (heads * HD);
    let blocks = tokens.div_ceil(BLOCK);
    // Each task's rows: its block's tokens × the group's heads, `[token][head][HD]`.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..kv_heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (g, b) = (task / blocks, task % blocks);
            let t0 = b * BLOCK;
            let t1 = (t0 + BLOCK).min(tokens);
            let mut out = vec![0f32; (t1 - t0) * group * HD];
            let task = Task { q, first_pos, cache, attrs, g, group, toks: t0..t1 };
            #[cfg(target_arch = "x86_64")]
            {
                if isa == Isa::Avx512Vnni {
                    // SAFETY: `Isa::Avx512Vnni` is detected with AVX512F (and AVX2, FMA).
                    unsafe { task_avx512::<HD>(&task, &mut out) };
                } else {
                    // SAFETY: the caller checked `isa.avx2()` (AVX2 and FMA, detected).
                    unsafe { task_avx2::<HD>(&task, &mut out) };
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = isa;
                tiled_task::<HD>(&task, &mut out);
            }
            (g, t0, out)
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (g, t0, part) in parts {
        for (i, row) in part.chunks_exact(HD).enumerate() {
            let (t, hh) = (t0 + i / group, i % group);
            let h = g * group + hh;
            out[(t * heads + h) * HD..(t * heads + h + 1) * HD].copy_from_slice(row);
        }
    }
    out
}

/// One task of the tiled path: KV head `g` (its `group` query heads) for tokens `toks`.
struct Task<'a> {
    q: &'a [f32],
    first_pos: usize,
    cache: &'a KvCache,
    attrs: &'a AttentionAttrs,
    g: usize,
    group: usize,
    toks: std::ops::Range<usize>,
}

/// [`tiled_task`] compiled for AVX-512 (16-lane chains).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn task_avx512<const HD: usize>(task: &Task<'_>, out: &mut [f32]) {
    tiled_task::<HD>(task, out)
}

/// [`tiled_task`] compiled for AVX2 and FMA (8-lane chains).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<const HD: usize>(task: &Task<'_>, out: &mut [f32]) {
    tiled_task::<HD>(task, out)
}

/// One query row's running state: maximum, sum and value accumulator.
struct RowState<const HD: usize> {
    m: f32,
    s: f32,
    acc: [f32; HD],
}

/// The rows of KV head `g`'s heads for tokens `toks`, written to `out` as
/// `[token][head of the group][HD]`.
#[inline(always)]
fn tiled_task<const HD: usize>(task: &Task<'_>, out: &mut [f32]) {
    const KV: usize = FA_TILE_KV;
    // Rows per group: their value accumulators (`R·HD` floats) stay in registers.
    const R: usize = 2;
    let Task { q, first_pos, cache, attrs, g, group, ref toks } = *task;
    let heads = group * (attrs.kv_heads as usize).max(1);
    let width = cache.width;
    let kv_off = g * HD;
    let scale = tiled_scale(attrs);
    let n_rows = toks.len() * group;
    let mut state: Vec<RowState<HD>> =
        (0..n_rows).map(|_| RowState { m: f32::NEG_INFINITY, s: 0.0, acc: [0.0; HD] }).collect();
    // Each token's allowed positions: sinks, then the window.
    let ranges: Vec<_> = toks.clone().map(|t| attrs.key_ranges(first_pos + t, cache.len())).collect();
    let last = ranges.iter().map(|(s, w)| w.end.max(s.end)).max().unwrap_or(0);
    let mut kt = vec![[0f32; KV]; HD];
    let mut active: Vec<(usize, usize, usize, [[u32; 2]; 2])> = Vec::new();
    for tile in 0..last.div_ceil(KV) {
        let (lo, hi) = (tile * KV, ((tile + 1) * KV).min(cache.len()));
        let needed = ranges.iter().any(|(s, w)| s.start.max(lo) < s.end.min(hi) || w.start.max(lo) < w.end.min(hi));
        if !needed {
            continue;
        }
        // The tile's keys transposed: `kt[d][j]`, zero past the cache's end; the offsets of
        // its value rows.
        let mut vrow = [0usize; KV];
        for (jt, j) in (lo..lo + KV).enumerate() {
            if j < hi {
                let r = cache.row(j);
                vrow[jt] = r * width + kv_off;
                let kj = &cache.k[r * width + kv_off..r * width + kv_off + HD];
                for (d, &k) in kj.iter().enumerate() {
                    kt[d][jt] = k;
                }
            } else {
                kt.iter_mut().for_each(|c| c[jt] = 0.0);
            }
        }
        let kt: &[[f32; KV]; HD] = kt.as_slice().try_into().expect("HD rows");
        // The rows (token, head of the group) with a key in this tile, with the tile's
        // allowed positions (sinks, window) as two ranges of tile indices.
        active.clear();
        for (ti, (sinks, window)) in ranges.iter().enumerate() {
            let within = |r: &std::ops::Range<usize>| -> [u32; 2] {
                let (a, b) = (r.start.max(lo), r.end.min(lo + KV));
                if a >= b { [0, 0] } else { [(a - lo) as u32, (b - lo) as u32] }
            };
            let allowed = [within(sinks), within(window)];
            if allowed.iter().any(|[a, b]| a < b) {
                active.extend((0..group).map(|hh| (ti * group + hh, toks.start + ti, g * group + hh, allowed)));
            }
        }
        // `R` rows at a time share each load of the tile's keys and values (a last group of
        // fewer rows is padded with copies of its last row's query, their probabilities zero
        // and their results dropped).
        let n_keys = hi - lo;
        for chunk in active.chunks(R) {
            let rows: [(usize, usize, usize, [[u32; 2]; 2]); R] =
                std::array::from_fn(|r| chunk[r.min(chunk.len() - 1)]);
            let qs: [&[f32; HD]; R] = std::array::from_fn(|r| {
                let (_, t, h, _) = rows[r];
                q[(t * heads + h) * HD..(t * heads + h + 1) * HD].try_into().expect("HD values")
            });
            let s = scores::<HD, R>(qs, kt);
            let mut p = [[0f32; KV]; R];
            let mut acc = [[0f32; HD]; R];
            for r in 0..chunk.len() {
                let (at, _, _, [[a0, b0], [a1, b1]]) = rows[r];
                let st = &mut state[at];
                let mut sr = s[r];
                for (jt, v) in (0u32..).zip(sr.iter_mut()) {
                    let allowed = (a0 <= jt && jt < b0) || (a1 <= jt && jt < b1);
                    *v = if allowed { tiled_score(*v, scale) } else { f32::NEG_INFINITY };
                }
                // (No finite score: the row takes nothing from this tile, its `p` stays zero.)
                if let Some(pr) = tiled_softmax(&sr, &mut st.m, &mut st.s, &mut st.acc) {
                    p[r] = pr;
                }
                acc[r] = st.acc;
            }
            // The value chains of the `R` rows, key by key.
            for jt in 0..n_keys {
                let vj: &[f32; HD] = cache.v[vrow[jt]..vrow[jt] + HD].try_into().expect("HD values");
                for r in 0..R {
                    let pj = p[r][jt];
                    for (a, &v) in acc[r].iter_mut().zip(vj) {
                        *a = v.mul_add(pj, *a);
                    }
                }
            }
            for (r, &(at, ..)) in rows.iter().enumerate().take(chunk.len()) {
                state[at].acc = acc[r];
            }
        }
    }
    for (st, o) in state.iter().zip(out.chunks_exact_mut(HD)) {
        let inv = if st.s == 0.0 { 0.0 } else { 1.0 / st.s };
        for (od, a) in o.iter_mut().zip(&st.acc) {
            *od = a * inv;
        }
    }
}

/// The 64 scores of `R` query rows against a transposed tile: lane `j` of row `r` is the
/// fused chain `Σ_d q_d·k_jd` over `d` in order, from zero (the rows share each load of the
/// keys).
#[inline(always)]
fn scores<const HD: usize, const R: usize>(q: [&[f32; HD]; R], kt: &[[f32; FA_TILE_KV]; HD]) -> [[f32; FA_TILE_KV]; R] {
    let mut s = [[0f32; FA_TILE_KV]; R];
    for (d, kd) in kt.iter().enumerate() {
        for r in 0..R {
            let qd = q[r][d];
            for (sj, &k) in s[r].iter_mut().zip(kd) {
                *sj = k.mul_add(qd, *sj);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use kiln_ir::DType;

    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn f16(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect()
    }

    /// The tiled path (prompt calls of 64 rows or more) equals the reference's
    /// `GgmlTiled` definition bit for bit, and so does the row path its `GgmlRows`: head
    /// dimensions 64/128/256, grouped queries, a second call continuing the first, windows
    /// with sinks, a softcap.
    #[test]
    fn attention_equals_the_reference_bit_for_bit() {
        let isa = Isa::detect();
        if !isa.avx2() {
            return;
        }
        for (hd, heads, kv_heads, window, sink, softcap) in [
            (64usize, 9u64, 3u64, 0u64, 0u64, 0.0f32),
            (128, 4, 2, 0, 0, 0.0),
            (64, 2, 2, 40, 4, 0.0),
            (256, 2, 1, 0, 0, 30.0),
        ] {
            let attrs = AttentionAttrs {
                cache: 0,
                heads,
                kv_heads,
                head_dim: hd as u64,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                sink,
                softcap,
                kv_dtype: DType::F32,
            };
            let width = kv_heads as usize * hd;
            let mut cache = KvCache::new(width, 400);
            let mut pos = 0;
            for (step, t) in [70usize, 130, 3].into_iter().enumerate() {
                let seed = 10 * step as u64 + hd as u64;
                cache.append(&f16(rand(t * width, seed)), &f16(rand(t * width, seed + 1)));
                let q = rand(t * heads as usize * hd, seed + 2);
                let mode = AttnNumerics::of(kiln_backends::Numerics::Ggml, t);
                let want = reference::attend(&q, pos, &cache, &attrs, mode);
                let got = attend(isa, &q, pos, &cache, &attrs, mode);
                assert!(
                    want.iter().map(|x| x.to_bits()).eq(got.iter().map(|x| x.to_bits())),
                    "hd {hd} heads {heads}/{kv_heads} window {window} step {step} ({mode:?})"
                );
                pos += t;
            }
        }
    }
}
