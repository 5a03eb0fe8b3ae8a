//! AVX-512 VNNI kernels (`vpdpbusd` on 256-bit vectors, AVX512VL), for CPUs that have
//! it (Intel since Ice Lake, AMD since Zen 4). One instruction does what AVX2 does in
//! three (`maddubs`, `madd`, `add`), and the signed weight types need no sign trick:
//! activations are offset to unsigned (`y + 128`) once per token block, and the offset's
//! share `128·Σw` is taken off once per weight block (the accumulator starts at
//! `−128·Σw`). Each 4-byte lane's sum is the same exact integer as the AVX2 kernels'
//! (no `maddubs` saturation is possible at these magnitudes), and the float steps are the
//! same ones in the same order, so every result is bit for bit the AVX2 kernel's (and
//! so the scalar definition's in `kiln_quant::ggml_dot`).
//!
//! Only called after [`super::Isa::detect`] found `avx512f`, `avx512vl`, `avx512vnni`
//! besides `avx2`, `fma` and `f16c`.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::{Q8KRow, Q8Row};
use kiln_quant::kq2::Kq2Q8Row;

use crate::x86::{self, Legacy, Q4_1, Q5_0, Q5_1, Q8_0};

const QK: usize = 32;

/// [`x86::dot_legacy_tile`] with VNNI: `R` weight rows × `T` token rows.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) fn dot_legacy_tile<const R: usize, const T: usize>(
    kind: Legacy,
    rows: [&[u8]; R],
    xs: [&Q8Row; T],
) -> [[f32; T]; R] {
    match kind {
        Legacy::Q4_1 => tile::<Q4_1, R, T>(rows, xs),
        Legacy::Q5_0 => tile::<Q5_0, R, T>(rows, xs),
        Legacy::Q5_1 => tile::<Q5_1, R, T>(rows, xs),
        Legacy::Q8_0 => tile::<Q8_0, R, T>(rows, xs),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn tile<const K: u8, const R: usize, const T: usize>(rows: [&[u8]; R], xs: [&Q8Row; T]) -> [[f32; T]; R] {
    let signed = matches!(K, Q5_0 | Q8_0);
    let (bytes, nblocks) = x86::legacy_blocks(K, &rows, &xs);
    let wp: [*const u8; R] = rows.map(|r| r.as_ptr());
    let qp: [*const i8; T] = xs.map(|x| x.q.as_ptr());
    let sp: [*const (f32, f32); T] = xs.map(|x| x.scales.as_ptr());
    let offset = _mm256_set1_epi8(-128);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut summs = [[0f32; T]; R];
    for b in 0..nblocks {
        let mut qx = [_mm256_setzero_si256(); T];
        let mut dx = [_mm256_setzero_ps(); T];
        let mut sx = [0f32; T];
        for t in 0..T {
            // SAFETY: block `b` < nblocks of every activation row.
            let (q, (d, s)) = unsafe { (_mm256_loadu_si256(qp[t].add(b * QK).cast()), *sp[t].add(b)) };
            // Signed weights: the activations as unsigned bytes y + 128 (flipping the top bit).
            qx[t] = if signed { _mm256_xor_si256(q, offset) } else { q };
            (dx[t], sx[t]) = (_mm256_set1_ps(d), s);
        }
        for r in 0..R {
            if x86::PREFETCH > 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(b * bytes + x86::PREFETCH).cast());
            }
            // SAFETY: block `b` < nblocks of every weight row.
            let (w, dw, mw) = unsafe { x86::unpack::<K>(wp[r].add(b * bytes)) };
            let dwv = _mm256_set1_ps(dw);
            // The accumulator's start: −128·Σw per lane for the offset activations.
            let start = if signed {
                _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset, w))
            } else {
                _mm256_setzero_si256()
            };
            for t in 0..T {
                // Unsigned weights are the `u` operand; signed ones the `s` operand.
                let p =
                    if signed { _mm256_dpbusd_epi32(start, qx[t], w) } else { _mm256_dpbusd_epi32(start, w, qx[t]) };
                if !signed {
                    summs[r][t] = x86::fma(mw, sx[t], summs[r][t]);
                }
                // d_w·d_x rounded once as a float product, as the scalar definition does.
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dwv, dx[t]), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|t| x86::hsum8(acc[r][t]) + summs[r][t]))
}

/// Token rows' quants as bytes with `flip` xor-ed in: with 0x80, `y + 128` as unsigned
/// bytes (the `vpdpbusd` operand the signed weights meet), once per GEMM call.
fn flipped<'a>(rows: impl Iterator<Item = &'a [i8]>, flip: u8) -> Vec<Vec<u8>> {
    rows.map(|q| q.iter().map(|&v| v as u8 ^ flip).collect()).collect()
}

/// Weight rows per [`q3_k_gemm`] tile.
const Q3K_ROWS: usize = 4;
/// Token rows per [`q3_k_gemm`] tile.
const Q3K_TOKENS: usize = 4;

/// Prefill with Q3_K weights, as [`q6_k_gemm`] does Q6_K: each group of rows unpacked
/// once per call (per 32-element segment the weights −4..3, their magnitudes, and the
/// segment's two scales spread over 16-bit lanes), then per segment and token row the
/// sign moved onto the activations, `maddubs` and one `vpdpwssd`. The integer lanes and
/// float steps are [`x86::dot_q3_k_tile`]'s, so results equal it bit for bit. Returns the
/// rows and token rows done (the caller does the rest).
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI; `rows` holds
/// `nb` rows of `rb` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // tile indices read clearer than zipped iterators
pub(crate) unsafe fn q3_k_gemm<const TILED: bool>(
    rows: &[u8],
    rb: usize,
    nb: usize,
    xs: &[&Q8KRow],
    tile: &mut [f32],
) -> (usize, usize) {
    let nblocks = rb / 110;
    let rfull = nb / Q3K_ROWS * Q3K_ROWS;
    let tfull = xs.len() / Q3K_TOKENS * Q3K_TOKENS;
    if rfull == 0 || tfull == 0 || nblocks == 0 || xs.iter().any(|x| x.d.len() < nblocks || x.q.len() < nblocks * 256) {
        return (0, 0);
    }
    let zero = _mm256_setzero_si256();
    // Per row of the group, super-block and segment: weights, magnitudes, scales; per
    // row and super-block `d`.
    let mut seg = vec![[zero; 3]; Q3K_ROWS * nblocks * 8];
    let mut d3 = vec![0f32; Q3K_ROWS * nblocks];
    for j in (0..rfull).step_by(Q3K_ROWS) {
        for r in 0..Q3K_ROWS {
            let row = &rows[(j + r) * rb..(j + r + 1) * rb];
            for bi in 0..nblocks {
                let blk = &row[bi * 110..bi * 110 + 110];
                let mut sc = [0i8; 16];
                // SAFETY: the 12 scale bytes; 16 bytes out; the 32 bytes of the high-bit mask.
                let hbits = unsafe {
                    _mm_storeu_si128(sc.as_mut_ptr().cast(), x86::q3_k_scales(blk.as_ptr().add(96)));
                    _mm256_loadu_si256(blk.as_ptr().cast())
                };
                for half in 0..2 {
                    // SAFETY: 32 bytes of 2-bit quants inside the block.
                    let q3 = unsafe { _mm256_loadu_si256(blk.as_ptr().add(32 + 32 * half).cast()) };
                    for shift in 0..4 {
                        let w = x86::q3_k_segment(q3, hbits, half, shift);
                        let g = 8 * half + 2 * shift;
                        let (s0, s1) = (i16::from(sc[g]), i16::from(sc[g + 1]));
                        let scales = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                        seg[(r * nblocks + bi) * 8 + half * 4 + shift] = [w, _mm256_sign_epi8(w, w), scales];
                    }
                }
                d3[r * nblocks + bi] =
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([blk[108], blk[109]])))));
            }
        }
        for t0 in (0..tfull).step_by(Q3K_TOKENS) {
            let mut acc = [[_mm256_setzero_ps(); Q3K_TOKENS]; Q3K_ROWS];
            let mut tiled = [[0f32; Q3K_TOKENS]; Q3K_ROWS];
            for bi in 0..nblocks {
                let mut lanes = [[zero; Q3K_TOKENS]; Q3K_ROWS];
                for s8 in 0..8 {
                    let mut y = [zero; Q3K_TOKENS];
                    for (t, y) in y.iter_mut().enumerate() {
                        // SAFETY: 32 quants of super-block `bi` (checked above).
                        *y = unsafe { _mm256_loadu_si256(xs[t0 + t].q.as_ptr().add(bi * 256 + s8 * 32).cast()) };
                    }
                    for r in 0..Q3K_ROWS {
                        let [w, wabs, sc] = seg[(r * nblocks + bi) * 8 + s8];
                        for t in 0..Q3K_TOKENS {
                            let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(y[t], w));
                            lanes[r][t] = _mm256_dpwssd_epi32(lanes[r][t], p, sc);
                        }
                    }
                }
                for r in 0..Q3K_ROWS {
                    let dw = d3[r * nblocks + bi];
                    for t in 0..Q3K_TOKENS {
                        if TILED {
                            tiled[r][t] = x86::tiled_step(tiled[r][t], lanes[r][t], dw, None, xs[t0 + t].d[bi]);
                        } else {
                            let d = _mm256_set1_ps(xs[t0 + t].d[bi] * dw);
                            acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes[r][t]), acc[r][t]);
                        }
                    }
                }
            }
            for r in 0..Q3K_ROWS {
                for t in 0..Q3K_TOKENS {
                    tile[(t0 + t) * nb + j + r] = if TILED { tiled[r][t] } else { x86::hsum8(acc[r][t]) };
                }
            }
        }
    }
    (rfull, tfull)
}

/// `kiln_quant::kq2::quantize_kq2_q8` on 512-bit vectors, bit for bit: per block the
/// original quants and those of its randomized Hadamard rotation (sign flips, the radix-2
/// butterflies level by level, each output the same sum or difference of the same two
/// values, then ×⅛), each quantized to ±127 by its largest magnitude with the same
/// round-half-even arithmetic.
///
/// # Safety
/// The CPU must support AVX512F, AVX512BW and AVX512VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
#[allow(clippy::needless_range_loop)] // lane indices over fixed arrays unroll; closures would not inline
pub(crate) fn quantize_kq2_q8(x: &[f32]) -> Kq2Q8Row {
    let blocks = x.as_chunks::<64>().0;
    let mut d = Vec::with_capacity(blocks.len());
    let mut q = vec![0i8; blocks.len() * 128];
    let sign: [__m512; 4] = std::array::from_fn(|v| {
        let bits = (kiln_quant::kq2::KQ2_RHT_SIGNS >> (16 * v)) as u16;
        _mm512_mask_mov_ps(_mm512_set1_ps(1.0), bits, _mm512_set1_ps(-1.0))
    });
    // Within a vector, level h pairs lane j with lane j ^ h; the upper lane of each pair
    // (bit h set) takes the difference.
    let upper: [u16; 4] = [0xaaaa, 0xcccc, 0xf0f0, 0xff00];
    for (b, qb) in blocks.iter().zip(q.as_chunks_mut::<128>().0) {
        let mut v = [_mm512_setzero_ps(); 4];
        for i in 0..4 {
            // SAFETY: 16 of the block's 64 floats.
            v[i] = unsafe { _mm512_loadu_ps(b.as_ptr().add(16 * i)) };
        }
        let mut r = [_mm512_setzero_ps(); 4];
        for i in 0..4 {
            let mut y = _mm512_mul_ps(v[i], sign[i]);
            for (level, mask) in upper.iter().enumerate() {
                let p = match level {
                    0 => _mm512_permute_ps::<0b10_11_00_01>(y),
                    1 => _mm512_permute_ps::<0b01_00_11_10>(y),
                    2 => _mm512_shuffle_f32x4::<0b10_11_00_01>(y, y),
                    _ => _mm512_shuffle_f32x4::<0b01_00_11_10>(y, y),
                };
                y = _mm512_mask_sub_ps(_mm512_add_ps(y, p), *mask, p, y);
            }
            r[i] = y;
        }
        // Levels 16 and 32: whole vectors.
        for (lo, hi) in [(0, 1), (2, 3), (0, 2), (1, 3)] {
            (r[lo], r[hi]) = (_mm512_add_ps(r[lo], r[hi]), _mm512_sub_ps(r[lo], r[hi]));
        }
        for e in &mut r {
            *e = _mm512_mul_ps(*e, _mm512_set1_ps(0.125));
        }
        let mut ds = [0f32; 2];
        for ((vals, dv), out) in [v, r].iter().zip(&mut ds).zip(qb.as_chunks_mut::<64>().0) {
            *dv = quantize_i8_block(vals, out);
        }
        d.push(ds);
    }
    Kq2Q8Row { d, q }
}

/// `kq2::quantize_i8` for one block of 64 values in four vectors: quants
/// `round_half_even(v·127/amax)` and the scale `amax/127` (0 and zero quants for an
/// all-zero block, NaN and zero quants when a value is not finite).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
#[allow(clippy::needless_range_loop)] // as above
fn quantize_i8_block(v: &[__m512; 4], out: &mut [i8; 64]) -> f32 {
    let mut abs = [_mm512_setzero_ps(); 4];
    let mut finite = 0xffffu16;
    for i in 0..4 {
        abs[i] = _mm512_abs_ps(v[i]);
        finite &= _mm512_cmp_ps_mask::<_CMP_LE_OQ>(abs[i], _mm512_set1_ps(f32::MAX));
    }
    if finite != 0xffff {
        *out = [0; 64];
        return f32::NAN;
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(abs[0], abs[1]), _mm512_max_ps(abs[2], abs[3])));
    if amax == 0.0 {
        *out = [0; 64];
        return 0.0;
    }
    let id = _mm512_set1_ps(127.0 / amax);
    // 1.5·2²³: adding and taking it away leaves the nearest integer, ties to even.
    let magic = _mm512_set1_ps(12582912.0);
    for (i, e) in v.iter().enumerate() {
        let r = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(*e, id), magic), magic);
        // SAFETY: 16 bytes of `out`.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().add(16 * i).cast(), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r))) };
    }
    amax / 127.0
}

/// Token rows per tile of a [`Kq2Panel`] (two 512-bit vectors of 16 lanes).
const KQ2_PANEL_TOKENS: usize = 32;

/// The activations of a whole batch of token rows laid out for [`kq2_gemm`], built once
/// per matmul: per tile of 32 token rows, per block and basis (original, rotated), the 16
/// four-byte groups of the block with the 32 rows' quants side by side (group `g`: 128
/// bytes, rows in order, each quant offset to unsigned `q + 128`), and the 32 rows' scales.
/// A last partial tile is padded with zero rows (scale 0).
pub(crate) struct Kq2Panel {
    tokens: usize,
    pub(crate) nblocks: usize,
    x: Vec<u8>,
    d: Vec<f32>,
}

/// Bytes of one block and basis of a [`Kq2Panel`] tile.
const KQ2_PANEL_BLOCK: usize = 64 * KQ2_PANEL_TOKENS;

impl Kq2Panel {
    /// The panel of `xs` (each holding at least `nblocks` blocks).
    pub(crate) fn build(xs: &[&Kq2Q8Row]) -> Kq2Panel {
        use rayon::prelude::*;
        let nblocks = xs.iter().map(|x| x.d.len().min(x.q.len() / 128)).min().unwrap_or(0);
        let tiles = xs.len().div_ceil(KQ2_PANEL_TOKENS);
        let mut x = vec![0x80u8; tiles * nblocks * 2 * KQ2_PANEL_BLOCK];
        let mut d = vec![0f32; tiles * nblocks * 2 * KQ2_PANEL_TOKENS];
        let tile_bytes = nblocks * 2 * KQ2_PANEL_BLOCK;
        let tile_scales = nblocks * 2 * KQ2_PANEL_TOKENS;
        if tile_bytes > 0 {
            x.par_chunks_mut(tile_bytes).zip(d.par_chunks_mut(tile_scales)).enumerate().for_each(|(tile, (xt, dt))| {
                for (t, row) in xs.iter().skip(tile * KQ2_PANEL_TOKENS).take(KQ2_PANEL_TOKENS).enumerate() {
                    for bw in 0..2 * nblocks {
                        let src = &row.q[64 * bw..64 * bw + 64];
                        let dst = &mut xt[bw * KQ2_PANEL_BLOCK..(bw + 1) * KQ2_PANEL_BLOCK];
                        for (g, quad) in src.as_chunks::<4>().0.iter().enumerate() {
                            let v = u32::from_le_bytes(quad.map(|q| q as u8)) ^ 0x8080_8080;
                            let at = g * 4 * KQ2_PANEL_TOKENS + 4 * t;
                            dst[at..at + 4].copy_from_slice(&v.to_le_bytes());
                        }
                        dt[bw * KQ2_PANEL_TOKENS + t] = row.d[bw / 2][bw % 2];
                    }
                }
            });
        }
        Kq2Panel { tokens: xs.len(), nblocks, x, d }
    }
}

/// One block index of a group of [`KQ2_GEMM_ROWS`] weight rows decoded for [`kq2_gemm`],
/// its entries ordered by basis (the `n0` rows stored unrotated first, whose activations
/// are the original quants, then the rotated ones): per entry the 64 weights `4·c` as
/// signed bytes, the offset `−128·Σw` of unsigned activations, the block scale, the row of
/// the group it belongs to, and whether it adds anything (a zero-scale block, or a padding
/// row past the last, does not).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Kq2Slot {
    w: [[i8; 64]; KQ2_GEMM_ROWS],
    start: [i32; KQ2_GEMM_ROWS],
    s: [f32; KQ2_GEMM_ROWS],
    row: [u8; KQ2_GEMM_ROWS],
    live: [u16; KQ2_GEMM_ROWS],
    n0: u8,
}

/// Weight rows [`kq2_gemm`] decodes at a time (their blocks stay in L2 while every tile of
/// token rows passes).
pub(crate) const KQ2_GEMM_ROWS: usize = 8;

/// Prefill with kq2 weights: `tile[t·nb + j] = row_j · x_t` for the `nb` rows of `rb` bytes
/// in `rows` and every token row of `panel`. Each group of eight rows is decoded once per
/// call, each block's rows sorted by basis ([`Kq2Slot`]); then per tile of 32 token rows
/// and block, each four-byte group of the block's quants (32 token rows across the vector
/// lanes, two loads per basis) meets the broadcast weight group of every row that reads
/// that basis: one load for several `vpdpbusd`, not one each. Each row's block integers
/// are added with one fused multiply-add per half of the token rows as in
/// `kiln_quant::kq2::dot_kq2_q8`, so results equal the AVX2 kernel bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`KQ2_ZMM`]); `rows` holds `nb` rows of `rb` bytes; `tile` holds `panel`'s token rows ×
/// `nb` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
#[allow(clippy::needless_range_loop)] // lane indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn kq2_gemm(rows: &[u8], rb: usize, nb: usize, panel: &Kq2Panel, tile: &mut [f32]) {
    const R: usize = KQ2_GEMM_ROWS;
    let nblocks = (rb / 18).min(panel.nblocks);
    let tables = &*x86::KQ2_TABLES;
    // SAFETY: the CPU features are this function's.
    let dec = unsafe { Kq2Decoder::new() };
    let mut slots = vec![Kq2Slot::EMPTY; nblocks];
    for j0 in (0..nb).step_by(R) {
        let group = R.min(nb - j0);
        let row = |r: usize| rows[(j0 + r) * rb..].as_ptr();
        let at = Kq2Slot::order(&mut slots, group, |r, bi| rows[(j0 + r) * rb + 18 * bi]);
        for r in 0..group {
            let mut b0 = 0;
            while b0 < nblocks {
                let n = (nblocks - b0).min(KQ2_BATCH);
                // SAFETY: the row holds `nblocks` blocks; the CPU features are this function's.
                let batch = unsafe { dec.lookup(row(r).add(18 * b0), n) };
                for k in 0..n {
                    let bi = b0 + k;
                    // SAFETY: as above.
                    let hdr = unsafe { *row(r).add(18 * bi) };
                    let s = tables.scale[usize::from(hdr & 0x7f)];
                    // SAFETY: as above.
                    unsafe { slots[bi].put(usize::from(at[bi][r]), s, || dec.weights(batch, k)) };
                }
                b0 += n;
            }
        }
        // SAFETY: the slots hold `nblocks ≤ panel.nblocks` blocks; the CPU features and
        // `tile` are this function's.
        unsafe { kq2_slots_gemm(&slots, group, panel, tile, nb, j0) };
    }
}

impl Kq2Slot {
    pub(crate) const EMPTY: Kq2Slot = Kq2Slot {
        w: [[0; 64]; KQ2_GEMM_ROWS],
        start: [0; KQ2_GEMM_ROWS],
        s: [0.0; KQ2_GEMM_ROWS],
        row: [0; KQ2_GEMM_ROWS],
        live: [0; KQ2_GEMM_ROWS],
        n0: 0,
    };

    /// Empties `slots` for a group of `group` rows whose block headers are `hdr(row, block)`
    /// and orders each block's entries: the unrotated rows first, in row order, then the
    /// rotated ones and the padding rows past the group. Returns each (block, row)'s entry.
    pub(crate) fn order(
        slots: &mut [Kq2Slot],
        group: usize,
        hdr: impl Fn(usize, usize) -> u8,
    ) -> Vec<[u8; KQ2_GEMM_ROWS]> {
        let mut at = vec![[0u8; KQ2_GEMM_ROWS]; slots.len()];
        for (bi, slot) in slots.iter_mut().enumerate() {
            let unrotated = |r: usize| r < group && hdr(r, bi) & 0x80 != 0;
            let n0 = (0..KQ2_GEMM_ROWS).filter(|&r| unrotated(r)).count();
            let (mut e0, mut e1) = (0, n0);
            *slot = Kq2Slot { n0: n0 as u8, ..Kq2Slot::EMPTY };
            for (r, a) in at[bi].iter_mut().enumerate() {
                let e = if unrotated(r) { &mut e0 } else { &mut e1 };
                *a = *e as u8;
                slot.row[*e] = r as u8;
                *e += 1;
            }
        }
        at
    }

    /// Entry `e`: a block of scale `s` whose weights `weights()` gives as magnitudes `|4·c|`
    /// and a negative-sign mask (not called for a zero-scale block, which adds nothing).
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW.
    #[inline(always)]
    pub(crate) unsafe fn put(&mut self, e: usize, s: f32, weights: impl FnOnce() -> (__m512i, __mmask64)) {
        // SAFETY: the caller's CPU features.
        unsafe {
            self.put_signed(e, s, || {
                let (m, sigma) = weights();
                _mm512_mask_sub_epi8(m, sigma, _mm512_setzero_si512(), m)
            })
        }
    }

    /// [`Self::put`] with the weights `4·c` as signed bytes.
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW.
    #[inline(always)]
    pub(crate) unsafe fn put_signed(&mut self, e: usize, s: f32, weights: impl FnOnce() -> __m512i) {
        self.s[e] = s;
        if s == 0.0 {
            return;
        }
        self.live[e] = 0xffff;
        let w = weights();
        // Σw, from the byte sums of w + 128 over each 8.
        let mut sums = [0u64; 8];
        // SAFETY: 64 bytes each; the caller's CPU features.
        unsafe {
            _mm512_storeu_si512(self.w[e].as_mut_ptr().cast(), w);
            let biased = _mm512_xor_si512(w, _mm512_set1_epi8(-128));
            _mm512_storeu_si512(sums.as_mut_ptr().cast(), _mm512_sad_epu8(biased, _mm512_setzero_si512()));
        }
        self.start[e] = -128 * (sums.iter().sum::<u64>() as i32 - 64 * 128);
    }
}

/// The tile loop of [`kq2_gemm`] for one group of `group` rows decoded into `slots` (one
/// per block): `tile[t·nb + j0 + r]` for each row `r` of the group and every token row of
/// `panel`.
///
/// # Safety
/// The CPU must support AVX512F/BW/VL/VNNI; `slots.len() ≤ panel.nblocks`; `tile` holds
/// `panel`'s token rows × `nb ≥ j0 + group` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub(crate) unsafe fn kq2_slots_gemm(
    slots: &[Kq2Slot],
    group: usize,
    panel: &Kq2Panel,
    tile: &mut [f32],
    nb: usize,
    j0: usize,
) {
    let nblocks = slots.len();
    let tiles = panel.tokens.div_ceil(KQ2_PANEL_TOKENS);
    let stride = panel.nblocks;
    for t in 0..tiles {
        let xt = &panel.x[t * stride * 2 * KQ2_PANEL_BLOCK..];
        let dt = &panel.d[t * stride * 2 * KQ2_PANEL_TOKENS..];
        let count = KQ2_PANEL_TOKENS.min(panel.tokens - t * KQ2_PANEL_TOKENS);
        // Per row of the group its accumulators of the 32 token rows (two vectors).
        let mut accs = [[_mm512_setzero_ps(); 2]; KQ2_GEMM_ROWS];
        for (bi, slot) in slots.iter().enumerate().take(nblocks) {
            // SAFETY: the panel holds `nblocks` blocks per tile; the CPU features are
            // this function's.
            unsafe {
                let (x, d) = (xt.as_ptr(), dt.as_ptr());
                match slot.n0 {
                    0 => kq2_micro::<0>(slot, &mut accs, x, d, bi),
                    1 => kq2_micro::<1>(slot, &mut accs, x, d, bi),
                    2 => kq2_micro::<2>(slot, &mut accs, x, d, bi),
                    3 => kq2_micro::<3>(slot, &mut accs, x, d, bi),
                    4 => kq2_micro::<4>(slot, &mut accs, x, d, bi),
                    5 => kq2_micro::<5>(slot, &mut accs, x, d, bi),
                    6 => kq2_micro::<6>(slot, &mut accs, x, d, bi),
                    7 => kq2_micro::<7>(slot, &mut accs, x, d, bi),
                    _ => kq2_micro::<8>(slot, &mut accs, x, d, bi),
                }
            }
        }
        for r in 0..group {
            let mut out = [0f32; KQ2_PANEL_TOKENS];
            for (h, a) in accs[r].iter().enumerate() {
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), *a) };
            }
            for (u, v) in out.iter().take(count).enumerate() {
                tile[(t * KQ2_PANEL_TOKENS + u) * nb + j0 + r] = *v;
            }
        }
    }
}

/// Block `bi` of a group of rows (`slot`, whose first `N0` entries read the original
/// basis) against one [`Kq2Panel`] tile (`xt`, `dt`: the tile's quants and scales), added
/// to the rows' accumulators `accs` (one per half of the 32 token rows): per entry and
/// half, `start` plus sixteen `vpdpbusd` (its broadcast four-byte weight group against the
/// rows' quants, each quant vector loaded once for every entry of its basis), then
/// `fma(isum, ¼·(s·d), acc)`, skipped (masked) where the entry adds nothing, as the
/// definition skips a zero-scale block.
///
/// # Safety
/// The CPU must support AVX512F/BW/VL/VNNI; `xt` and `dt` hold the tile's blocks up to `bi`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
unsafe fn kq2_micro<const N0: usize>(
    slot: &Kq2Slot,
    accs: &mut [[__m512; 2]; KQ2_GEMM_ROWS],
    xt: *const u8,
    dt: *const f32,
    bi: usize,
) {
    const R: usize = KQ2_GEMM_ROWS;
    // SAFETY: the caller's (reads within the tile; CPU features).
    unsafe {
        let xb = [xt.add(2 * bi * KQ2_PANEL_BLOCK), xt.add((2 * bi + 1) * KQ2_PANEL_BLOCK)];
        let isum: [__m512i; R] = std::array::from_fn(|e| _mm512_set1_epi32(slot.start[e]));
        let mut isum = isum.map(|s| [s; 2]);
        for g in 0..16 {
            // The basis of entries below N0 (the original quants), then the rotated one;
            // a basis no entry reads is not loaded.
            let mut x = [[_mm512_setzero_si512(); 2]; 2];
            for b in 0..2 {
                if (b == 0 && N0 > 0) || (b == 1 && N0 < R) {
                    let p = xb[b].add(g * 4 * KQ2_PANEL_TOKENS);
                    x[b] = [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(64).cast())];
                }
            }
            for e in 0..R {
                let w = _mm512_set1_epi32(slot.w[e].as_ptr().cast::<i32>().add(g).read_unaligned());
                let xe = &x[usize::from(e >= N0)];
                isum[e][0] = _mm512_dpbusd_epi32(isum[e][0], xe[0], w);
                isum[e][1] = _mm512_dpbusd_epi32(isum[e][1], xe[1], w);
            }
        }
        let quarter = _mm512_set1_ps(0.25);
        let d = |b: usize| {
            let p = dt.add((2 * bi + b) * KQ2_PANEL_TOKENS);
            [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
        };
        let d = [d(0), d(1)];
        for e in 0..R {
            let s = _mm512_set1_ps(slot.s[e]);
            let de = &d[usize::from(e >= N0)];
            let acc = &mut accs[usize::from(slot.row[e])];
            for h in 0..2 {
                let f = _mm512_mul_ps(quarter, _mm512_mul_ps(s, de[h]));
                acc[h] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(isum[e][h]), f, acc[h], slot.live[e]);
            }
        }
    }
}

/// Whether this CPU has what [`kq2_gemv`] needs besides the VNNI set: AVX512BW, VBMI,
/// BITALG and GFNI (Ice Lake, Zen 4 and later have them; Cascade Lake does not).
pub(crate) static KQ2_ZMM: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512bitalg")
        && is_x86_feature_detected!("gfni")
});

/// `vgf2p8affineqb` matrix taking a 2-bit magnitude code `c` (bits 0–1 of a byte) to bits
/// 2–3 and dropping the rest (byte `7 − i` of the matrix masks the input bits whose parity
/// is output bit `i`); with the constant 3 a byte becomes `4c + 3 = 2A + 1`.
pub(crate) const KQ2_GF_MAG: i64 = 0x0000_0102_0000_0000;

/// Blocks [`kq2_gemv`] decodes together (72 bytes: two 64-byte loads).
const KQ2_BATCH: usize = 4;

/// Index tables of [`kq2_gemv`]'s batch decoding, built once.
pub(crate) struct Kq2Zmm {
    /// The 512 magnitude vectors as 2-bit codes `(A_j − 1)/2` in bits `2j..2j+2` of a u16.
    pub(crate) codes: [[i16; 32]; 16],
    /// `vpermi2b` indices gathering the batch's group words (word `8k + g`: bytes
    /// `18k + 2 + 2g`, `18k + 3 + 2g`) ...
    words: [u8; 64],
    /// ... and each group's high index bit source (word `8k + g`: byte `18k + 1` twice).
    high: [u8; 64],
    /// Word `8k + g`: bit `g` of each byte (picks group `g`'s bit 8 of the index).
    high_bit: [i16; 32],
    /// Per block `k` of the batch, `vpermi2w` indices laying group `g`'s code three times
    /// and its sign word once in qword `g`.
    mix: [[i16; 32]; KQ2_BATCH],
    /// `vpmultishiftqb` offsets: byte `j` reads bits `2j..` (its code `c_j` in bits 0–1).
    pub(crate) shifts: [u8; 64],
    /// `vpshufbitqmb` selectors: byte `j` of each qword, bit `48 + j` (σ_j) ...
    sigma: [u8; 64],
    /// ... and bit `56 + j` (σ_j ≠ τ).
    flip: [u8; 64],
}

pub(crate) static KQ2_ZMM_TABLES: std::sync::LazyLock<Kq2Zmm> = std::sync::LazyLock::new(|| {
    let abs = kiln_quant::kq2::kq2_abs_codebook();
    let mut codes = [[0i16; 32]; 16];
    for (i, a) in abs.iter().enumerate() {
        let c = a.iter().enumerate().fold(0u16, |c, (j, &k)| c | u16::from((k - 1) / 2) << (2 * j));
        codes[i / 32][i % 32] = c as i16;
    }
    let (mut words, mut high, mut high_bit) = ([0u8; 64], [0u8; 64], [0i16; 32]);
    for w in 0..32 {
        let (k, g) = (w / 8, w % 8);
        words[2 * w] = (18 * k + 2 + 2 * g) as u8;
        words[2 * w + 1] = (18 * k + 3 + 2 * g) as u8;
        high[2 * w] = (18 * k + 1) as u8;
        high[2 * w + 1] = (18 * k + 1) as u8;
        high_bit[w] = 0x0101 << g;
    }
    let mut mix = [[0i16; 32]; KQ2_BATCH];
    for (k, m) in mix.iter_mut().enumerate() {
        for g in 0..8 {
            for u in 0..4 {
                // Words 32.. of a `vpermi2w` are its second source: the sign words.
                m[4 * g + u] = (if u < 3 { 8 * k + g } else { 32 + 8 * k + g }) as i16;
            }
        }
    }
    let (shifts, sigma, flip) = (
        std::array::from_fn(|i| 2 * (i % 8) as u8),
        std::array::from_fn(|i| 48 + (i % 8) as u8),
        std::array::from_fn(|i| 56 + (i % 8) as u8),
    );
    Kq2Zmm { codes, words, high, high_bit, mix, shifts, sigma, flip }
});

/// The 512-bit kq2 decoder's tables in registers (see [`kq2_rows`]): per batch of four
/// blocks [`Self::lookup`], then per block [`Self::weights`].
struct Kq2Decoder {
    t: [__m512i; 16],
    words_ix: __m512i,
    high_ix: __m512i,
    high_bit: __m512i,
    mix: [__m512i; KQ2_BATCH],
    shifts: __m512i,
    sel_sigma: __m512i,
    sel_flip: __m512i,
}

impl Kq2Decoder {
    /// The decoder (plain `inline(always)` functions, like `x86::kq2_decode`, so that they
    /// inline into their AVX-512 callers).
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW/VL/VBMI/BITALG and GFNI ([`KQ2_ZMM`]).
    #[inline(always)]
    unsafe fn new() -> Kq2Decoder {
        let z = &*KQ2_ZMM_TABLES;
        // SAFETY: the caller's CPU features; 64-byte tables.
        unsafe {
            let ld = |p: *const u8| _mm512_loadu_si512(p.cast());
            let mut t = [_mm512_setzero_si512(); 16];
            for (i, v) in t.iter_mut().enumerate() {
                *v = ld(z.codes[i].as_ptr().cast());
            }
            let mut mix = [_mm512_setzero_si512(); KQ2_BATCH];
            for (k, v) in mix.iter_mut().enumerate() {
                *v = ld(z.mix[k].as_ptr().cast());
            }
            Kq2Decoder {
                t,
                words_ix: ld(z.words.as_ptr()),
                high_ix: ld(z.high.as_ptr()),
                high_bit: ld(z.high_bit.as_ptr().cast()),
                mix,
                shifts: ld(z.shifts.as_ptr()),
                sel_sigma: ld(z.sigma.as_ptr()),
                sel_flip: ld(z.flip.as_ptr()),
            }
        }
    }

    /// A batch of `n` (1..=4) blocks at `p`: their magnitude codes and sign words.
    ///
    /// # Safety
    /// As [`Self::new`]; `p` points at `n` blocks.
    #[inline(always)]
    unsafe fn lookup(&self, p: *const u8, n: usize) -> (__m512i, __m512i) {
        // SAFETY: the caller's (masked loads stay within the `n` blocks).
        unsafe {
            let (r0, r1) = if n == KQ2_BATCH {
                (_mm512_loadu_si512(p.cast()), _mm512_maskz_loadu_epi8(0xff, p.add(64).cast()))
            } else {
                (_mm512_maskz_loadu_epi8((1u64 << (18 * n)) - 1, p.cast()), _mm512_setzero_si512())
            };
            let t = &self.t;
            let words = _mm512_permutex2var_epi8(r0, self.words_ix, r1);
            let high = _mm512_test_epi16_mask(_mm512_permutex2var_epi8(r0, self.high_ix, r1), self.high_bit);
            // Bits 0–5 of each index pick within 64 entries, bits 6–8 among the eight such tables.
            let mut r = [_mm512_setzero_si512(); 8];
            for (i, v) in r.iter_mut().enumerate() {
                *v = _mm512_permutex2var_epi16(t[2 * i], words, t[2 * i + 1]);
            }
            let (k6, k7) = (
                _mm512_test_epi16_mask(words, _mm512_set1_epi16(0x40)),
                _mm512_test_epi16_mask(words, _mm512_set1_epi16(0x80)),
            );
            let a = [
                _mm512_mask_blend_epi16(k6, r[0], r[1]),
                _mm512_mask_blend_epi16(k6, r[2], r[3]),
                _mm512_mask_blend_epi16(k6, r[4], r[5]),
                _mm512_mask_blend_epi16(k6, r[6], r[7]),
            ];
            let codes = _mm512_mask_blend_epi16(
                high,
                _mm512_mask_blend_epi16(k7, a[0], a[1]),
                _mm512_mask_blend_epi16(k7, a[2], a[3]),
            );
            // Per group a sign word: low byte σ₀..σ₇ (σ₇ = the parity of the seven stored sign
            // bits and of P(i), itself the parity of the codes' low bits as Σ A / 2 = Σ c + 4),
            // high byte σ_j ≠ τ (τ, the shift bit, is bit 15 of the group word).
            let low = _mm512_and_si512(codes, _mm512_set1_epi16(0x5555));
            // (words & 0x7f00) ^ low
            let both = _mm512_ternarylogic_epi32::<0x78>(low, words, _mm512_set1_epi16(0x7f00));
            let odd = _mm512_slli_epi16::<7>(_mm512_and_si512(_mm512_popcnt_epi16(both), _mm512_set1_epi16(1)));
            // (words >> 8 & 0x7f) | odd
            let sigma = _mm512_ternarylogic_epi32::<0xea>(_mm512_srli_epi16::<8>(words), _mm512_set1_epi16(0x7f), odd);
            let tau = _mm512_and_si512(_mm512_srai_epi16::<15>(words), _mm512_set1_epi16(0xff00u16 as i16));
            // sigma | ((sigma << 8) ^ tau)
            let signs = _mm512_ternarylogic_epi32::<0xf6>(sigma, _mm512_slli_epi16::<8>(sigma), tau);
            (codes, signs)
        }
    }

    /// Block `k` of a looked-up batch: the magnitudes `|4·c|` of its 64 weights as bytes and
    /// their signs σ as a mask (set: negative).
    ///
    /// # Safety
    /// As [`Self::new`].
    #[inline(always)]
    unsafe fn weights(&self, (codes, signs): (__m512i, __m512i), k: usize) -> (__m512i, __mmask64) {
        // SAFETY: the caller's CPU features.
        unsafe {
            // Qword g: group g's code three times, then its sign word.
            let v = _mm512_permutex2var_epi16(codes, self.mix[k], signs);
            // |4·c| = 2A + 1 where σ = τ, else 2A − 1.
            let m = _mm512_gf2p8affine_epi64_epi8::<3>(
                _mm512_multishift_epi64_epi8(self.shifts, v),
                _mm512_set1_epi64(KQ2_GF_MAG),
            );
            let sigma = _mm512_bitshuffle_epi64_mask(v, self.sel_sigma);
            let w = _mm512_mask_sub_epi8(m, _mm512_bitshuffle_epi64_mask(v, self.sel_flip), m, _mm512_set1_epi8(2));
            (w, sigma)
        }
    }
}

/// Weight rows [`kq2_gemv`] works on at once.
const KQ2_GEMV_ROWS: usize = 4;

/// Decode with kq2 weights: `out[j] = row_j · x` for the `nb` rows of `rb` bytes in `rows`.
/// Four blocks at a time are decoded in 512-bit vectors (see [`kq2_rows`]); the float steps
/// are [`x86::dot_kq2_tile`]'s, so results equal it bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`KQ2_ZMM`]); `rows` holds `nb` rows of `rb` bytes and `out` `nb` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn kq2_gemv(rows: &[u8], rb: usize, nb: usize, x: &Kq2Q8Row, out: &mut [f32]) {
    let nblocks = (rb / 18).min(x.d.len()).min(x.q.len() / 128);
    for j in (0..nb).step_by(KQ2_GEMV_ROWS) {
        // A last group of fewer rows repeats its last row (its extra results are dropped).
        let r = std::array::from_fn(|r| rows[(j + r).min(nb - 1) * rb..].as_ptr());
        // SAFETY: each row holds `rb ≥ 18·nblocks` bytes; the CPU features are this function's.
        let v = unsafe { kq2_rows(r, x, nblocks) };
        let n = KQ2_GEMV_ROWS.min(nb - j);
        out[j..j + n].copy_from_slice(&v[..n]);
    }
}

/// The dots of `R` rows (one or two) for [`kq2_gemv`]. Per batch of four blocks of a row:
/// their group words gathered into one vector (`vpermi2b` over two loads); the magnitude
/// codes looked up for all 32 groups at once from the 1 KiB code table held in 16 registers
/// (`vpermi2w` on the index's low six bits, blends on bits 6–8); per group a sign word
/// (the seven stored signs, coordinate 7's sign from their parity and `P(i)` by `vpopcntw`,
/// and which signs differ from the shift bit τ). Per block one `vpermi2w` lays each group's
/// code and sign word over its qword; `vpmultishiftqb` + `vgf2p8affineqb` cut the code into
/// bytes `2A + 1` and `vpshufbitqmb` turns the sign word into byte masks. A weight is
/// `4·c = σ·2A + τ`, so `|4·c| = 2A + σ·τ` is the unsigned `vpdpbusd` operand and σ goes onto
/// the activation: exact integers (|4·c| ≤ 15, |q| ≤ 127) in [`x86::dot_kq2_tile`]'s lanes,
/// then its float steps. About 25 vector instructions per 64 weights (the AVX2 decoder: 8
/// scalar table loads and about 60 more instructions).
///
/// # Safety
/// As [`kq2_gemv`]; each of `row` points at `nblocks` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
#[allow(clippy::needless_range_loop)] // block indices over fixed arrays unroll; closures would not inline
unsafe fn kq2_rows(row: [*const u8; KQ2_GEMV_ROWS], x: &Kq2Q8Row, nblocks: usize) -> [f32; KQ2_GEMV_ROWS] {
    const R: usize = KQ2_GEMV_ROWS;
    let scales = &x86::KQ2_TABLES.scale;
    // SAFETY: the decoder's reads stay within the blocks (masked loads), the activation
    // reads within `x` (nblocks ≤ its blocks); the CPU features are this function's.
    unsafe {
        let dec = Kq2Decoder::new();
        let zero = _mm512_setzero_si512();
        let (q0, d0) = (x.q.as_ptr(), x.d.as_ptr().cast::<f32>());
        // Block `k` of the looked-up batch at `p` (block `bi` of the row): its 16 lane sums
        // against the activations, its float factor, and whether its scale is nonzero.
        let block = |p: *const u8, batch: (__m512i, __m512i), k: usize, bi: usize| {
            let hdr = *p.add(18 * k);
            let s = *scales.get_unchecked(usize::from(hdr & 0x7f));
            let (w, sigma) = dec.weights(batch, k);
            // The block's basis: its activation quants and their scale.
            let at = 2 * bi + usize::from(hdr >> 7 ^ 1);
            let q = _mm512_loadu_si512(q0.add(64 * at).cast());
            let d = _mm512_dpbusd_epi32(zero, w, _mm512_mask_sub_epi8(q, sigma, zero, q));
            // A zero-scale block adds nothing (as in the AVX2 kernel, which skips it).
            (d, 0.25 * (s * *d0.add(at)), s != 0.0)
        };
        // One accumulator for the four rows: lane r of every 128-bit lane holds row r.
        let mut acc = _mm512_setzero_ps();
        let mut step = |p: &[*const u8; R], looked: &[(__m512i, __m512i); R], k: usize, bi: usize| {
            let (d0, f0, l0) = block(p[0], looked[0], k, bi);
            let (d1, f1, l1) = block(p[1], looked[1], k, bi);
            let (d2, f2, l2) = block(p[2], looked[2], k, bi);
            let (d3, f3, l3) = block(p[3], looked[3], k, bi);
            let live = u16::from(l0) | u16::from(l1) << 1 | u16::from(l2) << 2 | u16::from(l3) << 3;
            acc = kq2_step4([d0, d1, d2, d3], [f0, f1, f2, f3], live, acc);
        };
        let mut b0 = 0;
        while b0 < nblocks {
            let n = (nblocks - b0).min(KQ2_BATCH);
            let mut p = [row[0]; R];
            let mut looked = [(zero, zero); R];
            for r in 0..R {
                p[r] = row[r].add(18 * b0);
                _mm_prefetch::<_MM_HINT_T0>(p[r].wrapping_add(x86::PREFETCH).cast());
                _mm_prefetch::<_MM_HINT_T0>(p[r].wrapping_add(x86::PREFETCH + 64).cast());
                looked[r] = dec.lookup(p[r], n);
            }
            if n == KQ2_BATCH {
                for k in 0..KQ2_BATCH {
                    step(&p, &looked, k, b0 + k);
                }
            } else {
                for k in 0..n {
                    step(&p, &looked, k, b0 + k);
                }
            }
            b0 += n;
        }
        let mut out = [0f32; R];
        _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(acc));
        out
    }
}

/// One block of four kq2 rows added to their accumulator (lane `r` of every 128-bit lane
/// holds row `r`): [`kq2_reduce4`], then `fma(isum, f, acc)` for the rows whose bit of
/// `live` is set (a zero-scale block adds nothing, as in the definition).
///
/// # Safety
/// The CPU must support AVX512F.
#[inline(always)]
pub(crate) unsafe fn kq2_step4(d: [__m512i; 4], f: [f32; 4], live: u16, acc: __m512) -> __m512 {
    // SAFETY: the caller's CPU features.
    unsafe {
        // [f0, f1, f2, f3] in every 128-bit lane, by broadcasts and blends: LLVM turns four
        // scalar scale lookups behind a built vector into gathers, slow on Zen 4.
        let fv = _mm512_mask_mov_ps(_mm512_set1_ps(f[0]), 0x2222, _mm512_set1_ps(f[1]));
        let fv = _mm512_mask_mov_ps(fv, 0x4444, _mm512_set1_ps(f[2]));
        let fv = _mm512_mask_mov_ps(fv, 0x8888, _mm512_set1_ps(f[3]));
        _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(kq2_reduce4(d)), fv, acc, live * 0x1111)
    }
}

/// Four kq2 rows' 16 lane sums `d` reduced to one exact integer each, row `r` in lane `r`
/// of every 128-bit lane (a transposing reduction: integers, so the order of the additions
/// does not matter).
///
/// # Safety
/// The CPU must support AVX512F.
#[inline(always)]
unsafe fn kq2_reduce4(d: [__m512i; 4]) -> __m512i {
    // SAFETY: the caller's CPU features.
    unsafe {
        let [d0, d1, d2, d3] = d;
        // Per 128-bit lane m the four rows' sums over its 16 weights.
        let s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(d0, d1), _mm512_unpackhi_epi32(d0, d1));
        let s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d2, d3), _mm512_unpackhi_epi32(d2, d3));
        let isum = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
        // Lane 4m + r holds lane m of row r: the four 128-bit lanes added, each then holding
        // the four rows' block sums.
        let isum = _mm512_add_epi32(isum, _mm512_shuffle_i32x4::<0b01_00_11_10>(isum, isum));
        _mm512_add_epi32(isum, _mm512_shuffle_i32x4::<0b10_11_00_01>(isum, isum))
    }
}

/// Weight rows per [`q6_k_gemm`] tile.
const Q6K_ROWS: usize = 4;
/// Token rows per [`q6_k_gemm`] tile.
const Q6K_TOKENS: usize = 4;

/// Prefill with Q6_K weights: `tile[t·nb + j] = row_j · xs[t]` for the first
/// `nb / Q6K_ROWS · Q6K_ROWS` rows and `xs.len() / Q6K_TOKENS · Q6K_TOKENS` token rows
/// (the caller does the rest); returns those two counts. Each group of rows is unpacked
/// once per call — its 6-bit values as bytes and each segment's two scales spread over
/// 16-bit lanes, a few KiB per row, kept in L1/L2 — and then meets every token row, so
/// the inner loop is a load, `maddubs` and `vpdpwssd` per segment. The `32·Σ` offset of
/// each lane is one more `vpdpwssd` per super-block (the 16-bit block sums times −32·scale,
/// pairs 2l, 2l + 1 in lane l). The integer lanes and float steps are
/// [`x86::dot_q6_k_tile`]'s, so results equal it bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI; `rows` holds
/// `nb` rows of `rb` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // tile indices read clearer than zipped iterators
pub(crate) unsafe fn q6_k_gemm<const TILED: bool>(
    rows: &[u8],
    rb: usize,
    nb: usize,
    xs: &[&Q8KRow],
    tile: &mut [f32],
) -> (usize, usize) {
    let nblocks = rb / 210;
    let rfull = nb / Q6K_ROWS * Q6K_ROWS;
    let tfull = xs.len() / Q6K_TOKENS * Q6K_TOKENS;
    if rfull == 0
        || tfull == 0
        || nblocks == 0
        || xs.iter().any(|x| x.d.len() < nblocks || x.q.len() < nblocks * 256 || x.bsums.len() < nblocks * 16)
    {
        return (0, 0);
    }
    // Per row of the group and super-block: 8 segments of (6-bit values, scales), the
    // −32·scales as 16 i16, and `d`.
    let zero = _mm256_setzero_si256();
    let mut q6 = vec![zero; Q6K_ROWS * nblocks * 8];
    let mut scl = vec![zero; Q6K_ROWS * nblocks * 8];
    let mut offs = vec![zero; Q6K_ROWS * nblocks];
    let mut d6 = vec![0f32; Q6K_ROWS * nblocks];
    // The token rows' block sums as 16-bit lanes, per super-block.
    let bs16: Vec<__m256i> = xs[..tfull]
        .iter()
        .flat_map(|x| x.bsums[..nblocks * 16].chunks_exact(16))
        .map(|b| {
            // SAFETY: 16 i32.
            let (b0, b1) =
                unsafe { (_mm256_loadu_si256(b.as_ptr().cast()), _mm256_loadu_si256(b.as_ptr().add(8).cast())) };
            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(b0, b1))
        })
        .collect();
    for j in (0..rfull).step_by(Q6K_ROWS) {
        for r in 0..Q6K_ROWS {
            let row = &rows[(j + r) * rb..(j + r + 1) * rb];
            for bi in 0..nblocks {
                let blk = &row[bi * 210..bi * 210 + 210];
                let at = (r * nblocks + bi) * 8;
                for half in 0..2 {
                    // SAFETY: inside the 210-byte block.
                    let (ql0, ql1, qh) = unsafe {
                        (
                            _mm256_loadu_si256(blk[half * 64..].as_ptr().cast()),
                            _mm256_loadu_si256(blk[half * 64 + 32..].as_ptr().cast()),
                            _mm256_loadu_si256(blk[128 + half * 32..].as_ptr().cast()),
                        )
                    };
                    for seg in 0..4 {
                        q6[at + half * 4 + seg] = x86::q6_k_segment([ql0, ql1, qh], seg);
                        let s = 192 + half * 8 + seg * 2;
                        scl[at + half * 4 + seg] = _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(blk[s + 1] as i8)),
                            _mm_set1_epi16(i16::from(blk[s] as i8)),
                        );
                    }
                }
                let mut o = [0i16; 16];
                for (i, v) in o.iter_mut().enumerate() {
                    *v = -32 * i16::from(blk[192 + i] as i8);
                }
                // SAFETY: 16 i16; the f16 at 208.
                unsafe {
                    offs[r * nblocks + bi] = _mm256_loadu_si256(o.as_ptr().cast());
                    d6[r * nblocks + bi] =
                        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([
                            blk[208], blk[209],
                        ])))));
                }
            }
        }
        for t0 in (0..tfull).step_by(Q6K_TOKENS) {
            let mut acc = [[_mm256_setzero_ps(); Q6K_TOKENS]; Q6K_ROWS];
            let mut tiled = [[0f32; Q6K_TOKENS]; Q6K_ROWS];
            for bi in 0..nblocks {
                let mut lanes = [[zero; Q6K_TOKENS]; Q6K_ROWS];
                for seg in 0..8 {
                    let mut y = [zero; Q6K_TOKENS];
                    for (t, y) in y.iter_mut().enumerate() {
                        // SAFETY: 32 quants of super-block `bi` (checked above).
                        *y = unsafe { _mm256_loadu_si256(xs[t0 + t].q.as_ptr().add(bi * 256 + seg * 32).cast()) };
                    }
                    for r in 0..Q6K_ROWS {
                        let at = (r * nblocks + bi) * 8 + seg;
                        let (w, sc) = (q6[at], scl[at]);
                        for t in 0..Q6K_TOKENS {
                            lanes[r][t] = _mm256_dpwssd_epi32(lanes[r][t], _mm256_maddubs_epi16(w, y[t]), sc);
                        }
                    }
                }
                for r in 0..Q6K_ROWS {
                    let (off, dw) = (offs[r * nblocks + bi], d6[r * nblocks + bi]);
                    for t in 0..Q6K_TOKENS {
                        let l = _mm256_dpwssd_epi32(lanes[r][t], bs16[(t0 + t) * nblocks + bi], off);
                        if TILED {
                            tiled[r][t] = x86::tiled_step(tiled[r][t], l, dw, None, xs[t0 + t].d[bi]);
                        } else {
                            let d = _mm256_set1_ps(xs[t0 + t].d[bi] * dw);
                            acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(l), acc[r][t]);
                        }
                    }
                }
            }
            for r in 0..Q6K_ROWS {
                for t in 0..Q6K_TOKENS {
                    tile[(t0 + t) * nb + j + r] = if TILED { tiled[r][t] } else { x86::hsum8(acc[r][t]) };
                }
            }
        }
    }
    (rfull, tfull)
}

/// Weight rows per [`legacy_gemm`] tile.
const LEG_ROWS: usize = 4;
/// Token rows per [`legacy_gemm`] tile.
const LEG_TOKENS: usize = 4;

/// One legacy block of a weight row, unpacked for [`legacy_gemm`]: its 32 weights as
/// bytes (signed for the `_0` types, unsigned for the `_1` ones), the accumulator's start
/// (`−128·Σw` per lane for the signed types, else 0), `d` and `m`.
#[derive(Clone, Copy)]
struct LegacyBlock {
    w: __m256i,
    start: __m256i,
    d: f32,
    m: f32,
}

/// Prefill with legacy-block weights: `tile[t·nb + j] = row_j · xs[t]` for the first
/// `nb / LEG_ROWS · LEG_ROWS` rows and `xs.len() / LEG_TOKENS · LEG_TOKENS` token rows
/// (the caller does the rest); returns those two counts. Unlike [`dot_legacy_tile`],
/// which unpacks each weight block again for every group of token rows, each group of
/// rows is unpacked once ([`LegacyBlock`]s, small enough for L1) and then meets every
/// token row; the activations are offset to unsigned once per call. The integer and
/// float steps per output are [`dot_legacy_tile`]'s, so results equal it bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI; `rows` holds
/// `nb` rows of `rb` bytes.
pub(crate) unsafe fn legacy_gemm(
    kind: Legacy,
    rows: &[u8],
    rb: usize,
    nb: usize,
    xs: &[&Q8Row],
    tile: &mut [f32],
) -> (usize, usize) {
    // SAFETY: the caller's.
    unsafe {
        match kind {
            Legacy::Q4_1 => legacy_gemm_k::<Q4_1>(rows, rb, nb, xs, tile),
            Legacy::Q5_0 => legacy_gemm_k::<Q5_0>(rows, rb, nb, xs, tile),
            Legacy::Q5_1 => legacy_gemm_k::<Q5_1>(rows, rb, nb, xs, tile),
            Legacy::Q8_0 => legacy_gemm_k::<Q8_0>(rows, rb, nb, xs, tile),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn legacy_gemm_k<const K: u8>(rows: &[u8], rb: usize, nb: usize, xs: &[&Q8Row], tile: &mut [f32]) -> (usize, usize) {
    let signed = matches!(K, Q5_0 | Q8_0);
    let rfull = nb / LEG_ROWS * LEG_ROWS;
    let tfull = xs.len() / LEG_TOKENS * LEG_TOKENS;
    let row = |j: usize| &rows[j * rb..(j + 1) * rb];
    let all_rows: Vec<&[u8]> = (0..rfull).map(row).collect();
    let (bytes, nblocks) = x86::legacy_blocks(K, &all_rows, xs);
    if rfull == 0 || tfull == 0 || nblocks == 0 {
        return (0, 0);
    }
    // The activations as unsigned bytes y + 128 for the signed weight types.
    let xq = flipped(xs[..tfull].iter().map(|x| &x.q[..nblocks * QK]), if signed { 0x80 } else { 0 });
    let offset = _mm256_set1_epi8(-128);
    let mut blocks = vec![
        LegacyBlock { w: _mm256_setzero_si256(), start: _mm256_setzero_si256(), d: 0.0, m: 0.0 };
        LEG_ROWS * nblocks
    ];
    for j in (0..rfull).step_by(LEG_ROWS) {
        for r in 0..LEG_ROWS {
            let p = row(j + r).as_ptr();
            for (b, blk) in blocks[r * nblocks..(r + 1) * nblocks].iter_mut().enumerate() {
                // SAFETY: block `b` < nblocks of the row.
                let (w, d, m) = unsafe { x86::unpack::<K>(p.add(b * bytes)) };
                let start = if signed {
                    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset, w))
                } else {
                    _mm256_setzero_si256()
                };
                *blk = LegacyBlock { w, start, d, m };
            }
        }
        for t0 in (0..tfull).step_by(LEG_TOKENS) {
            let qp: [*const u8; LEG_TOKENS] = std::array::from_fn(|u| xq[t0 + u].as_ptr());
            let sp: [*const (f32, f32); LEG_TOKENS] = std::array::from_fn(|u| xs[t0 + u].scales.as_ptr());
            let mut acc = [[_mm256_setzero_ps(); LEG_TOKENS]; LEG_ROWS];
            // The `_1` types' `m·s` sums, the tile's tokens as the lanes of one vector per row.
            let mut summs = [_mm_setzero_ps(); LEG_ROWS];
            for b in 0..nblocks {
                // (Plain loops, not `array::map`: closures do not inherit the target features.)
                let mut qx = [_mm256_setzero_si256(); LEG_TOKENS];
                let mut dx = [_mm256_setzero_ps(); LEG_TOKENS];
                let mut sx = [0f32; LEG_TOKENS];
                for t in 0..LEG_TOKENS {
                    // SAFETY: block `b` < nblocks of every activation row.
                    unsafe {
                        qx[t] = _mm256_loadu_si256(qp[t].add(b * QK).cast());
                        let (d, s) = *sp[t].add(b);
                        (dx[t], sx[t]) = (_mm256_set1_ps(d), s);
                    }
                }
                // SAFETY: 4 floats.
                let sxv = unsafe { _mm_loadu_ps(sx.as_ptr()) };
                for r in 0..LEG_ROWS {
                    let blk = &blocks[r * nblocks + b];
                    let dwv = _mm256_set1_ps(blk.d);
                    if !signed {
                        summs[r] = _mm_fmadd_ps(_mm_set1_ps(blk.m), sxv, summs[r]);
                    }
                    for t in 0..LEG_TOKENS {
                        let p = if signed {
                            _mm256_dpbusd_epi32(blk.start, qx[t], blk.w)
                        } else {
                            _mm256_dpbusd_epi32(blk.start, blk.w, qx[t])
                        };
                        acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dwv, dx[t]), _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
            for r in 0..LEG_ROWS {
                let mut sm = [0f32; LEG_TOKENS];
                // SAFETY: 4 floats.
                unsafe { _mm_storeu_ps(sm.as_mut_ptr(), summs[r]) };
                for t in 0..LEG_TOKENS {
                    tile[(t0 + t) * nb + j + r] = x86::hsum8(acc[r][t]) + sm[t];
                }
            }
        }
    }
    (rfull, tfull)
}

/// Q4_K weight rows per [`q4_k_gemm_rows`] tile: one per 32-bit lane.
pub(crate) const Q4K_ROWS: usize = 8;

/// Where [`q4_k_gemm_rows`] reads its eight rows: the stored rows, or their packed form.
#[derive(Clone, Copy)]
pub(crate) enum Q4kSource<'a> {
    Rows([&'a [u8]; Q4K_ROWS]),
    Packed(&'a [u8]),
}

/// One Q4_K super-block of [`Q4K_ROWS`] rows, laid out for lanes = rows: per group g
/// (64 weights) and dword k, the low nibbles (weights 64g + 4k..+4 of each row, sub-block
/// 2g) and the high nibbles (weights 64g + 32 + 4k..+4, sub-block 2g + 1); the rows'
/// eight scales and minimums as i32 lanes; `d` and `dmin` as f32 lanes.
struct Q4kRows {
    lo: [[__m256i; 8]; 4],
    hi: [[__m256i; 8]; 4],
    sc: [__m256i; 8],
    mn: [__m256i; 8],
    dw: __m256,
    dmin: __m256,
}

/// The 8×8 transpose of 32-bit lanes: lane r of output k is lane k of input r.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    let lo32 = |a, b| _mm256_unpacklo_epi32(a, b);
    let hi32 = |a, b| _mm256_unpackhi_epi32(a, b);
    let (t0, t1, t2, t3) = (lo32(r[0], r[1]), hi32(r[0], r[1]), lo32(r[2], r[3]), hi32(r[2], r[3]));
    let (t4, t5, t6, t7) = (lo32(r[4], r[5]), hi32(r[4], r[5]), lo32(r[6], r[7]), hi32(r[6], r[7]));
    let (u0, u1) = (_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2));
    let (u2, u3) = (_mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3));
    let (u4, u5) = (_mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6));
    let (u6, u7) = (_mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7));
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// Super-block `bi` of eight Q4_K rows, laid out by [`Q4kRows`].
///
/// # Safety
/// Every row holds block `bi` (144 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q4_k_rows(rows: &[&[u8]; Q4K_ROWS], bi: usize) -> Q4kRows {
    let blk = |r: usize| &rows[r][bi * 144..bi * 144 + 144];
    let mask = _mm256_set1_epi8(0x0f);
    let mut lo = [[_mm256_setzero_si256(); 8]; 4];
    let mut hi = [[_mm256_setzero_si256(); 8]; 4];
    for g in 0..4 {
        // SAFETY: 32 bytes of each row's quants.
        let q: [__m256i; 8] =
            std::array::from_fn(|r| unsafe { _mm256_loadu_si256(blk(r)[16 + 32 * g..].as_ptr().cast()) });
        let t = transpose8(q);
        for k in 0..8 {
            lo[g][k] = _mm256_and_si256(t[k], mask);
            hi[g][k] = _mm256_and_si256(_mm256_srli_epi16::<4>(t[k]), mask);
        }
    }
    let mut sc = [[0i32; 8]; 8];
    let mut mn = [[0i32; 8]; 8];
    let mut dw = [0f32; 8];
    let mut dmin = [0f32; 8];
    for r in 0..Q4K_ROWS {
        let b = blk(r);
        // SAFETY: the block's first 4 bytes.
        (dw[r], dmin[r]) = unsafe { x86::f16x2(b.as_ptr()) };
        let (s, m) = x86::q4_k_scales_mins(&b[4..16]);
        for j in 0..8 {
            sc[j][r] = ((s >> (8 * j)) & 0xff) as i32;
            mn[j][r] = ((m >> (8 * j)) & 0xff) as i32;
        }
    }
    // SAFETY: 8 lanes each.
    unsafe {
        Q4kRows {
            lo,
            hi,
            sc: sc.map(|v| _mm256_loadu_si256(v.as_ptr().cast())),
            mn: mn.map(|v| _mm256_loadu_si256(v.as_ptr().cast())),
            dw: _mm256_loadu_ps(dw.as_ptr()),
            dmin: _mm256_loadu_ps(dmin.as_ptr()),
        }
    }
}

/// Bytes of one super-block of eight Q4_K rows packed by [`q4_k_pack`].
pub(crate) const Q4K_PACKED: usize = 1184;

/// Packs eight Q4_K rows of `nblocks` super-blocks each into `out` (`nblocks ·
/// Q4K_PACKED` bytes), per super-block in the order the lane kernels read it: for group g
/// and dword k the eight rows' dword k of the group's 32 quant bytes (32 bytes, row r at
/// 4r: the [`transpose8`] of the rows), then the eight 6-bit scales and the eight
/// minimums of each sub-block j as one byte per row (`1024 + 8j + r`, `1088 + 8j + r`),
/// then the rows' `d` and `dmin` as f16 (`1152 + 2r`, `1168 + 2r`). Lossless: every
/// value of the rows is kept, only moved, so kernels on it equal kernels on the rows.
pub(crate) fn q4_k_pack(rows: [&[u8]; Q4K_ROWS], nblocks: usize, out: &mut [u8]) {
    for (bi, c) in out.chunks_exact_mut(Q4K_PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let b = &row[bi * 144..bi * 144 + 144];
            for g in 0..4 {
                for k in 0..8 {
                    let at = (g * 8 + k) * 32 + 4 * r;
                    c[at..at + 4].copy_from_slice(&b[16 + 32 * g + 4 * k..16 + 32 * g + 4 * k + 4]);
                }
            }
            let (sc, mn) = x86::q4_k_scales_mins(&b[4..16]);
            for j in 0..8 {
                c[1024 + 8 * j + r] = (sc >> (8 * j)) as u8;
                c[1088 + 8 * j + r] = (mn >> (8 * j)) as u8;
            }
            c[1152 + 2 * r..1154 + 2 * r].copy_from_slice(&b[0..2]);
            c[1168 + 2 * r..1170 + 2 * r].copy_from_slice(&b[2..4]);
        }
    }
}

/// [`q4_k_rows`] from a packed super-block ([`q4_k_pack`]): loads instead of a transpose.
///
/// # Safety
/// `c` holds [`Q4K_PACKED`] bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q4_k_packed_rows(c: &[u8]) -> Q4kRows {
    let mask = _mm256_set1_epi8(0x0f);
    let p = c.as_ptr();
    let mut lo = [[_mm256_setzero_si256(); 8]; 4];
    let mut hi = [[_mm256_setzero_si256(); 8]; 4];
    let mut sc = [_mm256_setzero_si256(); 8];
    let mut mn = [_mm256_setzero_si256(); 8];
    // SAFETY: every read is inside the packed super-block.
    unsafe {
        for g in 0..4 {
            for k in 0..8 {
                let t = _mm256_loadu_si256(p.add((g * 8 + k) * 32).cast());
                lo[g][k] = _mm256_and_si256(t, mask);
                hi[g][k] = _mm256_and_si256(_mm256_srli_epi16::<4>(t), mask);
            }
        }
        for j in 0..8 {
            sc[j] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(1024 + 8 * j).cast()));
            mn[j] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(1088 + 8 * j).cast()));
        }
        Q4kRows {
            lo,
            hi,
            sc,
            mn,
            dw: _mm256_cvtph_ps(_mm_loadu_si128(p.add(1152).cast())),
            dmin: _mm256_cvtph_ps(_mm_loadu_si128(p.add(1168).cast())),
        }
    }
}

/// Decode with packed Q4_K rows: the dots of eight rows (`nblocks` packed super-blocks in
/// `pk`) with one token row of a batch's `gemv` group, one row per lane: per super-block
/// the exact integer sums `Σ_j sc_j Σ q·q8` and `Σ_j m_j·(bsum pair j)`, each added with
/// one fused multiply-add by `d·d8` / `dmin·d8` — `dot_q4_k`'s `gemv` steps, so each
/// result is the AVX2 kernel's bit for bit. No transpose, no horizontal sums, and the
/// scales come ready as bytes: about a third of the row-at-a-time kernel's work per weight,
/// so decode stays bound by memory.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI; `pk` holds
/// `nblocks` packed super-blocks and `x` at least `nblocks` super-blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn q4_k_packed_gemv(pk: &[u8], nblocks: usize, x: &Q8KRow) -> [f32; Q4K_ROWS] {
    let mask = _mm256_set1_epi8(0x0f);
    let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for bi in 0..nblocks {
        let c = pk[bi * Q4K_PACKED..(bi + 1) * Q4K_PACKED].as_ptr();
        let q = x.q[bi * 256..bi * 256 + 256].as_ptr();
        let bs = &x.bsums[bi * 16..bi * 16 + 16];
        if x86::PREFETCH > 0 {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(x86::PREFETCH).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(x86::PREFETCH + 512).cast());
        }
        let mut isum = _mm256_setzero_si256();
        let mut imin = _mm256_setzero_si256();
        // SAFETY: every read is inside packed super-block `bi` and the token's super-block `bi`.
        unsafe {
            for g in 0..4 {
                let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for k in 0..8 {
                    let t = _mm256_loadu_si256(c.add((g * 8 + k) * 32).cast());
                    let y0 = _mm256_set1_epi32(q.add(64 * g + 4 * k).cast::<i32>().read_unaligned());
                    let y1 = _mm256_set1_epi32(q.add(64 * g + 32 + 4 * k).cast::<i32>().read_unaligned());
                    s0 = _mm256_dpbusd_epi32(s0, _mm256_and_si256(t, mask), y0);
                    s1 = _mm256_dpbusd_epi32(s1, _mm256_and_si256(_mm256_srli_epi16::<4>(t), mask), y1);
                }
                let sc0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(1024 + 16 * g).cast()));
                let sc1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(1024 + 16 * g + 8).cast()));
                isum =
                    _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_mullo_epi32(s0, sc0), _mm256_mullo_epi32(s1, sc1)));
            }
            for j in 0..8 {
                let m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(1088 + 8 * j).cast()));
                imin = _mm256_add_epi32(imin, _mm256_mullo_epi32(m, _mm256_set1_epi32(bs[2 * j] + bs[2 * j + 1])));
            }
            let dx = _mm256_set1_ps(x.d[bi]);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(c.add(1152).cast()));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(c.add(1168).cast()));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), acc);
            acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(dmin, dx), acc_min);
        }
    }
    let mut out = [0f32; Q4K_ROWS];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc, acc_min)) };
    out
}

/// Super-block `bi` of `N` token rows against [`Q4kRows`] `w`, into their accumulators
/// (`acc[t] = [Σ d·d8 terms, Σ dmin·d8 terms]`, one lane per weight row).
///
/// # Safety
/// The CPU must support AVX512VNNI/VL; every token row holds super-block `bi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn q4_k_tokens<const N: usize>(w: &Q4kRows, xs: [&Q8KRow; N], bi: usize, acc: &mut [[__m256; 2]]) {
    let mut q = [std::ptr::null::<i8>(); N];
    for (q, x) in q.iter_mut().zip(&xs) {
        *q = x.q[bi * 256..bi * 256 + 256].as_ptr();
    }
    // (A loop, not `array::map`: closures do not inherit the target features.)
    let mut dx = [_mm256_setzero_ps(); N];
    for (d, x) in dx.iter_mut().zip(&xs) {
        *d = _mm256_set1_ps(x.d[bi]);
    }
    let mut a: [[__m256; 2]; N] = std::array::from_fn(|t| acc[t]);
    for g in 0..4 {
        let mut s0 = [_mm256_setzero_si256(); N];
        let mut s1 = [_mm256_setzero_si256(); N];
        for k in 0..8 {
            let (lo, hi) = (w.lo[g][k], w.hi[g][k]);
            for t in 0..N {
                // SAFETY: 4 quants at 64g + 4k and at 64g + 32 + 4k of the super-block.
                let (y0, y1) = unsafe {
                    (
                        _mm256_set1_epi32(q[t].add(64 * g + 4 * k).cast::<i32>().read_unaligned()),
                        _mm256_set1_epi32(q[t].add(64 * g + 32 + 4 * k).cast::<i32>().read_unaligned()),
                    )
                };
                s0[t] = _mm256_dpbusd_epi32(s0[t], lo, y0);
                s1[t] = _mm256_dpbusd_epi32(s1[t], hi, y1);
            }
        }
        for t in 0..N {
            let bs = &xs[t].bsums[bi * 16 + 4 * g..bi * 16 + 4 * g + 4];
            let s =
                _mm256_add_epi32(_mm256_mullo_epi32(s0[t], w.sc[2 * g]), _mm256_mullo_epi32(s1[t], w.sc[2 * g + 1]));
            let m = _mm256_add_epi32(
                _mm256_mullo_epi32(w.mn[2 * g], _mm256_set1_epi32(bs[0] + bs[1])),
                _mm256_mullo_epi32(w.mn[2 * g + 1], _mm256_set1_epi32(bs[2] + bs[3])),
            );
            a[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(w.dw, dx[t]), a[t][0]);
            a[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(w.dmin, dx[t]), a[t][1]);
        }
    }
    acc[..N].copy_from_slice(&a);
}

/// Dots of eight Q4_K weight rows with every token row of `xs` (all of a batch's `gemm`
/// group), `out[t·nb + j0 + r]` for row r: each output lane-parallel in one 32-bit lane,
/// so the K-dimension sums need no horizontal reductions; per output the float steps are
/// `dot_q4_k`'s `gemm` steps in its order (per sub-block pair g: `acc = fma(Σ_g, d·d8,
/// acc)`, the same for the minimums, then `acc − acc_min`), so each result is the AVX2
/// kernel's bit for bit. Each super-block of the rows is laid out once for all tokens.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI; every row
/// and every token row hold `nblocks` super-blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn q4_k_gemm_rows(
    rows: Q4kSource<'_>,
    xs: &[&Q8KRow],
    nblocks: usize,
    out: &mut [f32],
    nb: usize,
    j0: usize,
) {
    let mut acc = vec![[_mm256_setzero_ps(); 2]; xs.len()];
    for bi in 0..nblocks {
        // SAFETY: the caller's.
        let w = unsafe {
            match rows {
                Q4kSource::Rows(rows) => q4_k_rows(&rows, bi),
                Q4kSource::Packed(pk) => q4_k_packed_rows(&pk[bi * Q4K_PACKED..(bi + 1) * Q4K_PACKED]),
            }
        };
        // Four token rows at a time share each weight register.
        let mut quads = xs.chunks_exact(4).zip(acc.chunks_exact_mut(4));
        for (x4, a4) in &mut quads {
            // SAFETY: the caller's.
            unsafe { q4_k_tokens::<4>(&w, [x4[0], x4[1], x4[2], x4[3]], bi, a4) };
        }
        let done = xs.len() / 4 * 4;
        for (x, a) in xs[done..].iter().zip(acc[done..].chunks_exact_mut(1)) {
            // SAFETY: the caller's.
            unsafe { q4_k_tokens::<1>(&w, [*x], bi, a) };
        }
    }
    for (t, a) in acc.iter().enumerate() {
        let mut v = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), _mm256_sub_ps(a[0], a[1])) };
        out[t * nb + j0..t * nb + j0 + Q4K_ROWS].copy_from_slice(&v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use kiln_quant::ggml_dot::{self, RowGroup};

    use super::*;
    use crate::x86::tests::rng;

    fn available() -> bool {
        crate::Isa::Avx512Vnni.available()
    }

    /// `count` blocks of `bytes` random bytes (every quant pattern), with sane f16 values at
    /// the given offsets of each block (random bits would be NaN or Inf at times).
    fn random_blocks(r: &mut impl FnMut() -> u64, count: usize, bytes: usize, f16s: &[(usize, f32)]) -> Vec<u8> {
        let mut out: Vec<u8> = (0..count * bytes).map(|_| r() as u8).collect();
        for blk in out.chunks_mut(bytes) {
            for &(at, v) in f16s {
                blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        out
    }

    /// `tokens` activation rows of `width` values in [−1, 1] with a spike every `every`
    /// values (so the 8-bit quants reach ±127), quantized by `quantize`.
    pub(crate) fn activations<T>(
        r: &mut impl FnMut() -> u64,
        tokens: usize,
        width: usize,
        (every, spike): (usize, f32),
        quantize: fn(&[f32]) -> T,
    ) -> Vec<T> {
        (0..tokens)
            .map(|t| {
                let x: Vec<f32> = (0..width)
                    .map(|i| if (i + t) % every == 0 { spike } else { ((r() % 20001) as f32 / 10000.0) - 1.0 })
                    .collect();
                quantize(&x)
            })
            .collect()
    }

    /// Checks a GEMM's `tile` (`tokens × nb`) that claims `done` = (rows, token rows): those
    /// outputs equal `want(row, token)` bit for bit, the rest are untouched (NaN).
    fn check_gemm(
        what: &str,
        tile: &[f32],
        nb: usize,
        tokens: usize,
        done: (usize, usize),
        want: impl Fn(usize, usize) -> f32,
    ) {
        for j in 0..nb {
            for t in 0..tokens {
                let g = tile[t * nb + j];
                if j >= done.0 || t >= done.1 {
                    assert!(g.is_nan(), "{what}: row {j} token {t} written");
                    continue;
                }
                let w = want(j, t);
                assert_eq!(g.to_bits(), w.to_bits(), "{what}: row {j} token {t}: {g} vs {w}");
            }
        }
    }

    const LEGACY: [(Legacy, usize); 4] =
        [(Legacy::Q4_1, 20), (Legacy::Q5_0, 22), (Legacy::Q5_1, 24), (Legacy::Q8_0, 34)];

    /// Sane scales of a legacy block (`d`, and `m` for the `_1` types).
    fn legacy_scales(kind: Legacy) -> &'static [(usize, f32)] {
        if matches!(kind, Legacy::Q4_1 | Legacy::Q5_1) { &[(0, 0.0123), (2, -0.0071)] } else { &[(0, 0.0123)] }
    }

    /// Tiles of every legacy layout equal the AVX2 tiles bit for bit, random bytes (every
    /// quant pattern, Q8_0's −128 included) against activations that reach ±127.
    #[test]
    fn legacy_tiles_equal_the_avx2_tiles_bit_for_bit() {
        if !available() {
            return;
        }
        for (kind, bytes) in LEGACY {
            for seed in 0..12u64 {
                let blocks = 1 + seed as usize % 9;
                let mut r = rng(seed + 7);
                let rows = random_blocks(&mut r, 3 * blocks, bytes, legacy_scales(kind));
                let xs = activations(&mut r, 4, blocks * 32, (11, -3.0), ggml_dot::quantize_q8);
                let rs: [&[u8]; 3] = std::array::from_fn(|j| &rows[j * blocks * bytes..(j + 1) * blocks * bytes]);
                let x4 = [&xs[0], &xs[1], &xs[2], &xs[3]];
                // SAFETY: checked above (VNNI implies the AVX2 set).
                let (got, want) = unsafe { (dot_legacy_tile(kind, rs, x4), x86::dot_legacy_tile(kind, rs, x4)) };
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert_eq!(g.to_bits(), w.to_bits(), "{kind:?} {blocks} blocks: {g} vs {w}");
                }
            }
        }
    }

    /// The VNNI legacy GEMM equals the AVX2 tiles bit for bit for every legacy layout,
    /// with row and token counts that leave remainders to the caller (left untouched).
    #[test]
    fn legacy_gemm_equals_the_avx2_tiles_bit_for_bit() {
        if !available() {
            return;
        }
        for (kind, bytes) in LEGACY {
            for seed in 0..6u64 {
                let blocks = 1 + seed as usize % 5;
                let (nb, tokens) = (5 + seed as usize % 4, 4 + seed as usize * 3 % 7);
                let mut r = rng(seed + 17);
                let rows = random_blocks(&mut r, nb * blocks, bytes, legacy_scales(kind));
                let xs = activations(&mut r, tokens, blocks * 32, (11, -3.0), ggml_dot::quantize_q8);
                let xr: Vec<&Q8Row> = xs.iter().collect();
                let mut got = vec![f32::NAN; tokens * nb];
                // SAFETY: checked above; `nb` rows of `blocks` blocks.
                let done = unsafe { legacy_gemm(kind, &rows, blocks * bytes, nb, &xr, &mut got) };
                assert_eq!(done, (nb / 4 * 4, tokens / 4 * 4));
                check_gemm(&format!("{kind:?} seed {seed}"), &got, nb, tokens, done, |j, t| {
                    let row = &rows[j * blocks * bytes..(j + 1) * blocks * bytes];
                    // SAFETY: as above.
                    let v = unsafe { x86::dot_legacy_tile(kind, [row], [xr[t]]) };
                    v[0][0]
                });
            }
        }
    }

    /// A K-quant GEMM and the AVX2 kernel it must equal, in `vec_dot`'s and the tiled order.
    type KGemm = unsafe fn(&[u8], usize, usize, &[&Q8KRow], &mut [f32]) -> (usize, usize);
    type KDot = unsafe fn(&[u8], [&Q8KRow; 1]) -> [f32; 1];

    /// A K-quant GEMM (rows unpacked once per call, `rows_per` at a time) equals the AVX2
    /// kernel bit for bit in both orders, with row and token counts that leave remainders to
    /// the caller (left untouched): random blocks of `bb` bytes, a sane f16 `d` at `d_at`.
    fn check_k_gemm(
        seed0: u64,
        bb: usize,
        d_at: usize,
        rows_per: usize,
        patch: Option<usize>,
        kernels: [(KGemm, KDot); 2],
    ) {
        for seed in 0..6u64 {
            let blocks = 1 + seed as usize % 3;
            let (nb, tokens) = (5 + seed as usize % 4, 4 + seed as usize * 3 % 7);
            let mut r = rng(seed + seed0);
            let mut rows = random_blocks(&mut r, nb * blocks, bb, &[(d_at, 0.0123)]);
            if let Some(at) = patch {
                rows[at] = 0x80;
            }
            let xs = activations(&mut r, tokens, blocks * 256, (13, -4.0), ggml_dot::quantize_q8_k);
            let xr: Vec<&Q8KRow> = xs.iter().collect();
            for (tiled, (gemm, dot)) in kernels.into_iter().enumerate() {
                let mut got = vec![f32::NAN; tokens * nb];
                // SAFETY: checked by the callers; `nb` rows of `blocks` super-blocks, token rows
                // as wide.
                let done = unsafe { gemm(&rows, blocks * bb, nb, &xr, &mut got) };
                assert_eq!(done, (nb / rows_per * rows_per, tokens / 4 * 4));
                check_gemm(&format!("seed {seed} tiled {}", tiled == 1), &got, nb, tokens, done, |j, t| {
                    // SAFETY: as above.
                    let v = unsafe { dot(&rows[j * blocks * bb..(j + 1) * blocks * bb], [xr[t]]) };
                    v[0]
                });
            }
        }
    }

    /// The Q6_K GEMM equals the AVX2 kernel bit for bit (a scale of −128 included).
    #[test]
    fn q6_k_gemm_equals_the_avx2_kernel_bit_for_bit() {
        if !available() {
            return;
        }
        check_k_gemm(
            5,
            210,
            208,
            Q6K_ROWS,
            Some(192),
            [(q6_k_gemm::<false>, x86::dot_q6_k_tile::<1, false>), (q6_k_gemm::<true>, x86::dot_q6_k_tile::<1, true>)],
        );
    }

    /// The Q3_K GEMM equals the AVX2 kernel bit for bit.
    #[test]
    fn q3_k_gemm_equals_the_avx2_kernel_bit_for_bit() {
        if !available() {
            return;
        }
        check_k_gemm(
            23,
            110,
            108,
            Q3K_ROWS,
            None,
            [(q3_k_gemm::<false>, x86::dot_q3_k_tile::<1, false>), (q3_k_gemm::<true>, x86::dot_q3_k_tile::<1, true>)],
        );
    }

    /// The 512-bit kq2 activation quantizer equals `kiln_quant::kq2::quantize_kq2_q8` bit
    /// for bit: random rows with spikes, an all-zero block, a block with a NaN, a tail.
    #[test]
    fn kq2_activation_quantizer_equals_the_definition_bit_for_bit() {
        if !available() || !is_x86_feature_detected!("avx512bw") {
            return;
        }
        let mut r = rng(91);
        for (n, spike) in [(64usize, 3.0f32), (576, -40.0), (1536, 0.5), (200, 7.0)] {
            let mut x: Vec<f32> =
                (0..n).map(|i| if i % 37 == 5 { spike } else { ((r() % 20001) as f32 / 10000.0) - 1.0 }).collect();
            if n >= 576 {
                x[64..128].iter_mut().for_each(|v| *v = 0.0);
                x[130] = f32::NAN;
            }
            let want = kiln_quant::kq2::quantize_kq2_q8(&x);
            // SAFETY: checked above.
            let got = unsafe { quantize_kq2_q8(&x) };
            assert_eq!(got.q, want.q, "{n}");
            let bits = |d: &[[f32; 2]]| d.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d), bits(&want.d), "{n}");
        }
    }

    /// The kq2 panel GEMM equals the AVX2 kernel bit for bit on random block bytes and on
    /// quantized rows (both bases, zero-scale blocks), with row counts that leave a partial
    /// group of rows and token counts that leave a partial, zero-padded tile.
    #[test]
    fn kq2_gemm_equals_the_avx2_kernel_bit_for_bit() {
        if !available() || !*KQ2_ZMM {
            return;
        }
        for seed in 0..4u64 {
            let blocks = 1 + seed as usize % 3;
            let (nb, tokens) = (5 + seed as usize * 3, [8, 33, 40, 64][seed as usize]);
            let mut r = rng(seed + 41);
            let rows = kq2_rows_for_test(&mut r, seed % 2 == 0, nb, blocks);
            let xs = activations(&mut r, tokens, blocks * 64, (13, -4.0), kiln_quant::kq2::quantize_kq2_q8);
            let xr: Vec<&Kq2Q8Row> = xs.iter().collect();
            let panel = Kq2Panel::build(&xr);
            let mut got = vec![f32::NAN; tokens * nb];
            // SAFETY: checked above; `nb` rows of `blocks` blocks, token rows as wide.
            unsafe { kq2_gemm(&rows, blocks * 18, nb, &panel, &mut got) };
            for t in 0..tokens {
                for j in 0..nb {
                    // SAFETY: as above.
                    let want = unsafe { x86::dot_kq2_tile(&rows[j * blocks * 18..(j + 1) * blocks * 18], [xr[t]]) }[0];
                    let g = got[t * nb + j];
                    assert_eq!(g.to_bits(), want.to_bits(), "seed {seed} row {j} token {t}: {g} vs {want}");
                }
            }
        }
    }

    /// `nb` kq2 rows of `blocks` blocks: random bytes (every magnitude index, sign, shift,
    /// basis and scale; every third row's first block zero-scale, in either basis) or
    /// quantized random weights (row 2's first block all zero).
    pub(crate) fn kq2_rows_for_test(
        r: &mut impl FnMut() -> u64,
        random_bytes: bool,
        nb: usize,
        blocks: usize,
    ) -> Vec<u8> {
        let mut rows = vec![0u8; nb * blocks * 18];
        for (j, row) in rows.chunks_mut(blocks * 18).enumerate() {
            if random_bytes {
                row.iter_mut().for_each(|b| *b = r() as u8);
                if j % 3 == 1 {
                    row[0] &= 0x80;
                }
            } else {
                let w: Vec<f32> = (0..blocks * 64)
                    .map(|i| if j == 2 && i < 64 { 0.0 } else { ((r() % 20001) as f32 / 10000.0) - 1.0 })
                    .collect();
                kiln_quant::kq2::quantize_kq2(&w, None, row).unwrap();
            }
        }
        rows
    }

    /// The 512-bit kq2 gemv equals the AVX2 kernel bit for bit on random block bytes and
    /// on quantized rows, with row counts that leave a partial group of four.
    #[test]
    fn kq2_gemv_equals_the_avx2_kernel_bit_for_bit() {
        if !available() || !*KQ2_ZMM {
            return;
        }
        for seed in 0..8u64 {
            let blocks = 1 + seed as usize % 5;
            let nb = 3 + 2 * seed as usize;
            let mut r = rng(seed + 77);
            let rows = kq2_rows_for_test(&mut r, seed % 2 == 0, nb, blocks);
            let xs = activations(&mut r, 1, blocks * 64, (11, 3.0), kiln_quant::kq2::quantize_kq2_q8);
            let mut got = vec![f32::NAN; nb];
            // SAFETY: checked above; `nb` rows of `blocks` blocks, the token row as wide.
            unsafe { kq2_gemv(&rows, blocks * 18, nb, &xs[0], &mut got) };
            for (j, g) in got.iter().enumerate() {
                // SAFETY: as above.
                let want = unsafe { x86::dot_kq2_tile(&rows[j * blocks * 18..(j + 1) * blocks * 18], [&xs[0]]) }[0];
                assert_eq!(g.to_bits(), want.to_bits(), "seed {seed} row {j}: {g} vs {want}");
            }
        }
    }

    /// Sane `d` and `dmin` of a Q4_K block.
    const Q4K_SCALES: &[(usize, f32)] = &[(0, 0.0123), (2, 0.0071)];

    /// The VNNI Q6_K tile and Q4_K gemv equal the AVX2 kernels bit for bit, on random
    /// blocks (every quant, scale and minimum pattern, −128 scales included) and
    /// activations reaching ±127.
    #[test]
    fn q6_k_tile_and_q4_k_gemv_equal_the_avx2_kernels_bit_for_bit() {
        if !available() {
            return;
        }
        for seed in 0..8u64 {
            let blocks = 1 + seed as usize % 4;
            let mut r = rng(seed + 31);
            let mut q6 = random_blocks(&mut r, blocks, 210, &[(208, 0.0123)]);
            q6[192] = 0x80;
            let q4 = random_blocks(&mut r, blocks, 144, Q4K_SCALES);
            let xs = activations(&mut r, 4, blocks * 256, (13, -4.0), ggml_dot::quantize_q8_k);
            let x4 = [&xs[0], &xs[1], &xs[2], &xs[3]];
            // SAFETY: checked above (VNNI implies the AVX2 set).
            let (got, want) =
                unsafe { (x86::dot_q6_k_tile_vnni::<4, false>(&q6, x4), x86::dot_q6_k_tile::<4, false>(&q6, x4)) };
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.to_bits(), w.to_bits(), "Q6_K seed {seed}: {g} vs {w}");
            }
            for x in &xs {
                // SAFETY: as above.
                let (g, w) = unsafe { (x86::dot_q4_k_gemv_vnni(&q4, x), x86::dot_q4_k(&q4, x, RowGroup::Gemv)) };
                assert_eq!(g.to_bits(), w.to_bits(), "Q4_K seed {seed}: {g} vs {w}");
            }
        }
    }

    /// Packed Q4_K rows give the AVX2 kernels' results bit for bit: decode (`gemv`) and the
    /// lane `gemm` kernel reading the packed form.
    #[test]
    fn packed_q4_k_equals_the_avx2_kernels_bit_for_bit() {
        if !available() {
            return;
        }
        for seed in 0..6u64 {
            let blocks = 1 + seed as usize % 4;
            let mut r = rng(seed + 61);
            let rows = random_blocks(&mut r, Q4K_ROWS * blocks, 144, Q4K_SCALES);
            let rs: [&[u8]; Q4K_ROWS] = std::array::from_fn(|j| &rows[j * blocks * 144..(j + 1) * blocks * 144]);
            let mut pk = vec![0u8; blocks * Q4K_PACKED];
            q4_k_pack(rs, blocks, &mut pk);
            let xs = activations(&mut r, 8, blocks * 256, (13, -4.0), ggml_dot::quantize_q8_k);
            let xr: Vec<&Q8KRow> = xs.iter().collect();
            for x in &xr {
                // SAFETY: checked above; `pk` holds `blocks` packed super-blocks.
                let got = unsafe { q4_k_packed_gemv(&pk, blocks, x) };
                for (j, row) in rs.iter().enumerate() {
                    // SAFETY: as above.
                    let want = unsafe { x86::dot_q4_k(row, x, RowGroup::Gemv) };
                    assert_eq!(got[j].to_bits(), want.to_bits(), "gemv seed {seed} row {j}");
                }
            }
            let (mut a, mut b) = (vec![0f32; 8 * Q4K_ROWS], vec![0f32; 8 * Q4K_ROWS]);
            // SAFETY: as above.
            unsafe {
                q4_k_gemm_rows(Q4kSource::Packed(&pk), &xr, blocks, &mut a, Q4K_ROWS, 0);
                q4_k_gemm_rows(Q4kSource::Rows(rs), &xr, blocks, &mut b, Q4K_ROWS, 0);
            }
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// Eight Q4_K rows at a time equal the AVX2 `gemm` kernel bit for bit, on random
    /// blocks (every nibble, scale and minimum pattern) and activations reaching ±127.
    #[test]
    fn q4_k_rows_equal_the_avx2_gemm_kernel_bit_for_bit() {
        if !available() {
            return;
        }
        for seed in 0..6u64 {
            let blocks = 1 + seed as usize % 4;
            let mut r = rng(seed + 99);
            let rows = random_blocks(&mut r, Q4K_ROWS * blocks, 144, Q4K_SCALES);
            let tokens = 4 * (1 + seed as usize % 3);
            let xs = activations(&mut r, tokens, blocks * 256, (13, 4.0), ggml_dot::quantize_q8_k);
            let xr: Vec<&Q8KRow> = xs.iter().collect();
            let rs: [&[u8]; Q4K_ROWS] = std::array::from_fn(|j| &rows[j * blocks * 144..(j + 1) * blocks * 144]);
            let mut got = vec![0f32; tokens * Q4K_ROWS];
            // SAFETY: checked above; every row and token row hold `blocks` super-blocks.
            unsafe { q4_k_gemm_rows(Q4kSource::Rows(rs), &xr, blocks, &mut got, Q4K_ROWS, 0) };
            for t in (0..tokens).step_by(4) {
                for (j, row) in rs.iter().enumerate() {
                    // SAFETY: as above.
                    let want = unsafe { x86::dot_q4_k_gemm4(row, [xr[t], xr[t + 1], xr[t + 2], xr[t + 3]]) };
                    for u in 0..4 {
                        let g = got[(t + u) * Q4K_ROWS + j];
                        assert_eq!(
                            g.to_bits(),
                            want[u].to_bits(),
                            "seed {seed} row {j} token {}: {g} vs {}",
                            t + u,
                            want[u]
                        );
                    }
                }
            }
        }
    }
}
