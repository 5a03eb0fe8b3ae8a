//! AVX2 + FMA + F16C row-dot kernels (x86-64).
//!
//! Each function computes the same value as its scalar definition in
//! `kiln_quant::ggml_dot`, bit for bit: the integer parts of a block's dot
//! product are exact in any order, and the float steps (the per-lane fused
//! multiply-adds by `d_w·d_x`, the lane reduction of `hsum_float_8`, the
//! `Σ m·s` of the `_1` types, the per-super-block steps of the k-quants) are
//! taken in the same order as there. The unit tests and the crate's
//! differential tests hold them to that.
//!
//! Only called after [`super::Isa::detect`] found `avx2`, `fma` and `f16c`.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::{Q8KRow, Q8Row, RowGroup};
use kiln_quant::kq2::Kq2Q8Row;

const QK: usize = 32;
const QK_K: usize = 256;

/// The little-endian f16 at `b[at..at + 2]` as f32 (F16C, inlined).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `a·b + c` with one rounding (`f32::mul_add` would call libm's `fmaf`
/// unless the whole crate were compiled for FMA).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fma(a: f32, b: f32, c: f32) -> f32 {
    _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)))
}

/// `hsum_float_8`: (l0+l4, l1+l5, l2+l6, l3+l7) → ((r0+r2) + (r1+r3)).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum8(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Sum of the eight i32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_i32(x: __m256i) -> i32 {
    let r = _mm_add_epi32(_mm256_extracti128_si256::<1>(x), _mm256_castsi256_si128(x));
    let r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    let r = _mm_add_epi32(r, _mm_shuffle_epi32::<0b01>(r));
    _mm_cvtsi128_si32(r)
}

/// One super-block of `kiln_quant::ggml_dot::dot_k_tiled` (llama.cpp's tiled K-quant matmul,
/// for batches of eight token rows or more): the definition's `tiled_block` with `s1` the sum
/// of the block's exact integer lanes (here, under FMA, its `mul_add`s are single instructions).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn tiled_step(acc: f32, lanes: __m256i, d: f32, min: Option<(f32, i32)>, d8: f32) -> f32 {
    kiln_quant::ggml_dot::tiled_block(acc, hsum_i32(lanes), d, min, d8)
}

/// Bit `j` of `bits` → byte `j` is 0xFF when set, 0 otherwise (32 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit_mask(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    // Byte j takes byte j/8 of `bits`.
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, shuf);
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, sel), sel)
}

/// Σ over 4-element groups of `u[e]·s[e]` (u unsigned ≤ 63·… so no i16 saturation): 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_us(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// The 32 weights of one legacy block, and its `d` and `m`: unsigned for the `_1`
/// types (with `m`), signed for the `_0` types. (Q4_0 is summed in another order: see
/// [`crate::lut4`].)
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Legacy {
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

/// Dot of one stored legacy-block row with Q8_0/Q8_1 activations (`ggml_dot::dot` order).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_legacy(kind: Legacy, row: &[u8], x: &Q8Row) -> f32 {
    dot_legacy_tile(kind, [row], [x])[0][0]
}

/// How far ahead of the block being read the weight prefetches reach, bytes.
pub(crate) const PREFETCH: usize = 2048;

/// Prefetch hints for the cache lines `PREFETCH` bytes past a block of
/// `len` bytes at `p` (hints only: addresses past the row are harmless).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn prefetch_ahead(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + off).cast());
        off += 64;
    }
}

pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q5_0: u8 = 2;
pub(crate) const Q5_1: u8 = 3;
pub(crate) const Q8_0: u8 = 4;

/// Two little-endian f16 at `p` as f32 (one F16C conversion).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees 4 readable bytes.
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe { p.cast::<i32>().read_unaligned() }));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The 32 weights of the legacy block at `p` as bytes (signed for the `_0`
/// types, unsigned for the `_1` types), its `d` and its `m` (0 for `_0`).
///
/// # Safety
/// `p` points at one whole block of layout `K`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack<const K: u8>(p: *const u8) -> (__m256i, f32, f32) {
    let nib = |q: *const u8| {
        // SAFETY: 16 bytes of quants follow the block header.
        let lo = unsafe { _mm_loadu_si128(q.cast()) };
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo), _mm256_set1_epi8(0x0f))
    };
    // SAFETY (all reads): inside the block.
    unsafe {
        match K {
            Q4_1 => {
                let (d, m) = f16x2(p);
                (nib(p.add(4)), d, m)
            }
            Q5_0 => {
                let d = f16(std::slice::from_raw_parts(p, 2), 0);
                let qh = p.add(2).cast::<u32>().read_unaligned();
                // q − 16 as a signed byte: the nibble with 0xF0 set where the fifth bit is clear.
                let clear = _mm256_andnot_si256(bit_mask(qh), _mm256_set1_epi8(0xf0u8 as i8));
                (_mm256_or_si256(nib(p.add(6)), clear), d, 0.0)
            }
            Q5_1 => {
                let (d, m) = f16x2(p);
                let qh = p.add(4).cast::<u32>().read_unaligned();
                let hi = _mm256_and_si256(bit_mask(qh), _mm256_set1_epi8(0x10));
                (_mm256_or_si256(nib(p.add(8)), hi), d, m)
            }
            _ => (_mm256_loadu_si256(p.add(2).cast()), f16(std::slice::from_raw_parts(p, 2), 0), 0.0),
        }
    }
}

/// [`dot_legacy`] of `R` weight rows with `T` token rows at once: each weight
/// block is unpacked once for all tokens and each activation block loaded
/// once for all rows, with `R·T` independent accumulators. Each result is
/// computed in exactly the order of a single dot.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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

/// Bytes per block of legacy layout `k`, and the blocks every weight row and every
/// activation row of a tile hold.
#[inline]
pub(crate) fn legacy_blocks(k: u8, rows: &[&[u8]], xs: &[&Q8Row]) -> (usize, usize) {
    let bytes = [18, 20, 22, 24, 34][k as usize];
    let nblocks = rows
        .iter()
        .map(|r| r.len() / bytes)
        .chain(xs.iter().map(|x| x.scales.len().min(x.q.len() / QK)))
        .min()
        .unwrap_or(0);
    (bytes, nblocks)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const K: u8, const R: usize, const T: usize>(rows: [&[u8]; R], xs: [&Q8Row; T]) -> [[f32; T]; R] {
    let signed = matches!(K, Q5_0 | Q8_0);
    let (bytes, nblocks) = legacy_blocks(K, &rows, &xs);
    let wp: [*const u8; R] = rows.map(|r| r.as_ptr());
    let qp: [*const i8; T] = xs.map(|x| x.q.as_ptr());
    let sp: [*const (f32, f32); T] = xs.map(|x| x.scales.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut summs = [[0f32; T]; R];
    for b in 0..nblocks {
        let mut qx = [_mm256_setzero_si256(); T];
        let mut sc = [(0f32, 0f32); T];
        for t in 0..T {
            // SAFETY: block `b` < nblocks of every activation row.
            unsafe {
                qx[t] = _mm256_loadu_si256(qp[t].add(b * QK).cast());
                sc[t] = *sp[t].add(b);
            }
        }
        for r in 0..R {
            // Weights stream from memory once per token: ask for them ahead
            // (a hint; past the row's end it only touches the next row).
            if PREFETCH > 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp[r].wrapping_add(b * bytes + PREFETCH).cast());
            }
            // SAFETY: block `b` < nblocks of every weight row.
            let (w, dw, mw) = unsafe { unpack::<K>(wp[r].add(b * bytes)) };
            // For the signed types the sign moves onto the activations (`maddubs` takes unsigned × signed).
            let wu = if signed { _mm256_sign_epi8(w, w) } else { w };
            for t in 0..T {
                let (dx, sx) = sc[t];
                let p = if signed { dot_us(wu, _mm256_sign_epi8(qx[t], w)) } else { dot_us(wu, qx[t]) };
                if !signed {
                    summs[r][t] = fma(mw, sx, summs[r][t]);
                }
                acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|t| hsum8(acc[r][t]) + summs[r][t]))
}

/// Q4_K with Q8_K activations (`ggml_dot::dot_q4_k` order).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q4_k(row: &[u8], x: &Q8KRow, group: RowGroup) -> f32 {
    if !group.is_gemm() {
        return dot_q4_k_gemv(row, x);
    }
    dot_q4_k_tile(row, [x], [group])[0]
}

/// The 128-bit lane `half` (0 or 1) of `v` in both lanes: a K-quant super-block's eight
/// 16-bit scales of one 128-element half, for the segments of that half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn half_lanes(v: __m256i, half: usize) -> __m256i {
    if half == 0 { _mm256_permute2x128_si256::<0x00>(v, v) } else { _mm256_permute2x128_si256::<0x11>(v, v) }
}

/// The eight 6-bit scales and eight 6-bit minimums of a Q4_K block, unpacked
/// from its 12 scale bytes with whole-word operations (the same values as
/// `scale_min_k4`): `(scales, mins)`, each as eight bytes of a u64.
#[inline(always)]
pub(crate) fn q4_k_scales_mins(s: &[u8]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    const M6: u32 = 0x3f3f_3f3f;
    const M4: u32 = 0x0f0f_0f0f;
    const M2: u32 = 0x0303_0303;
    // j < 4: scale = s[j] & 63, min = s[j+4] & 63;
    // j ≥ 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4, min = (s[j+4] >> 4) | (s[j] >> 6) << 4.
    let sc_lo = u0 & M6;
    let sc_hi = (u2 & M4) | ((u0 >> 6) & M2) << 4;
    let mn_lo = u1 & M6;
    let mn_hi = ((u2 >> 4) & M4) | ((u1 >> 6) & M2) << 4;
    (u64::from(sc_lo) | u64::from(sc_hi) << 32, u64::from(mn_lo) | u64::from(mn_hi) << 32)
}

/// [`dot_q4_k`] for a single row of a batch's `gemv` group (decode): the
/// integer sums of a super-block kept in vectors (scales broadcast by
/// shuffles, the minimums' products by one `madd`) and reduced once.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_k_gemv(row: &[u8], x: &Q8KRow) -> f32 {
    q4_k_gemv::<false>(row, x)
}

/// [`dot_q4_k_gemv`] with VNNI: each scale product added by one `vpdpwssd` into a
/// single accumulator for the super-block (the same exact integer sum).
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) fn dot_q4_k_gemv_vnni(row: &[u8], x: &Q8KRow) -> f32 {
    q4_k_gemv::<true>(row, x)
}

/// The body of [`dot_q4_k_gemv`] and [`dot_q4_k_gemv_vnni`], inlined into each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_gemv<const VNNI: bool>(row: &[u8], x: &Q8KRow) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    let nblocks = (row.len() / 144).min(x.d.len());
    let picks = q4_k_picks();
    for bi in 0..nblocks {
        let blk = &row[bi * 144..bi * 144 + 144];
        prefetch_ahead(blk.as_ptr(), 144);
        let b = q4_k_unpack(blk, &picks);
        let isum = if VNNI {
            let q8 = x.q.as_ptr().wrapping_add(bi * QK_K);
            let mut a = _mm256_setzero_si256();
            for (g, u) in b.u.iter().enumerate() {
                // SAFETY: 64 quants of the super-block; VNNI only in `dot_q4_k_gemv_vnni`.
                unsafe {
                    let (y0, y1) =
                        (_mm256_loadu_si256(q8.add(64 * g).cast()), _mm256_loadu_si256(q8.add(64 * g + 32).cast()));
                    a = _mm256_dpwssd_epi32(a, _mm256_maddubs_epi16(u[0], y0), u[2]);
                    a = _mm256_dpwssd_epi32(a, _mm256_maddubs_epi16(u[1], y1), u[3]);
                }
            }
            hsum_i32(a)
        } else {
            let (p, _) = q4_k_token(&b, x, bi);
            hsum_i32(_mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3])))
        };
        let bs = &x.bsums[bi * 16..bi * 16 + 16];
        // SAFETY: 16 i32.
        let (b0, b1) =
            unsafe { (_mm256_loadu_si256(bs.as_ptr().cast()), _mm256_loadu_si256(bs.as_ptr().add(8).cast())) };
        let prod = _mm256_mullo_epi32(_mm256_hadd_epi32(b0, b1), b.mins);
        let dx = x.d[bi];
        acc = fma(isum as f32, b.dw * dx, acc);
        acc_min = fma(hsum_i32(prod) as f32, b.dmin * dx, acc_min);
    }
    acc - acc_min
}

/// `shuffle_epi8` patterns spreading 16-bit lane `j` of a register over all
/// of its 128-bit half (the widened scale of sub-block `j`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_picks() -> [__m256i; 8] {
    std::array::from_fn(|j| {
        let j = j as i8;
        let (a, b) = (2 * j, 2 * j + 1);
        _mm256_setr_epi8(a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b)
    })
}

/// One Q4_K super-block unpacked for several token rows.
struct Q4kBlock {
    dw: f32,
    dmin: f32,
    /// Per sub-block pair g: low nibbles, high nibbles, their two scales (as i16).
    u: [[__m256i; 4]; 4],
    /// The minimums in the order `hadd` leaves the bsum pairs: [0 1 4 5 | 2 3 6 7].
    mins: __m256i,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_unpack(blk: &[u8], picks: &[__m256i; 8]) -> Q4kBlock {
    let mask = _mm256_set1_epi8(0x0f);
    // SAFETY: the block's first 4 bytes.
    let (dw, dmin) = unsafe { f16x2(blk.as_ptr()) };
    let (sc, mn) = q4_k_scales_mins(&blk[4..16]);
    let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
    let u = std::array::from_fn(|g| {
        // SAFETY: 32 bytes of qs.
        let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * g).cast()) };
        [
            _mm256_and_si256(q, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
            _mm256_shuffle_epi8(sc16, picks[2 * g]),
            _mm256_shuffle_epi8(sc16, picks[2 * g + 1]),
        ]
    });
    let m = mn.to_le_bytes().map(i32::from);
    let mins = _mm256_setr_epi32(m[0], m[1], m[4], m[5], m[2], m[3], m[6], m[7]);
    Q4kBlock { dw, dmin, u, mins }
}

/// For token row `x` and super-block `bi`: the four sub-block pairs' integer
/// sums (as 8 lanes each) and the minimums' products `m_j·(bsum pair j)` in
/// `hadd` order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_token(b: &Q4kBlock, x: &Q8KRow, bi: usize) -> ([__m256i; 4], __m256i) {
    let q8 = x.q.as_ptr().wrapping_add(bi * QK_K);
    let p = std::array::from_fn(|g| {
        let u = &b.u[g];
        // SAFETY: 64 quants of the super-block.
        let (y0, y1) =
            unsafe { (_mm256_loadu_si256(q8.add(64 * g).cast()), _mm256_loadu_si256(q8.add(64 * g + 32).cast())) };
        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u[0], y0), u[2]);
        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u[1], y1), u[3]);
        _mm256_add_epi32(p0, p1)
    });
    let bs = &x.bsums[bi * 16..bi * 16 + 16];
    // SAFETY: 16 i32.
    let (b0, b1) = unsafe { (_mm256_loadu_si256(bs.as_ptr().cast()), _mm256_loadu_si256(bs.as_ptr().add(8).cast())) };
    (p, _mm256_mullo_epi32(_mm256_hadd_epi32(b0, b1), b.mins))
}

/// The four pair sums `[s0 s1 s2 s3]` and pair minimums `[m0 m1 m2 m3]` of [`q4_k_token`]'s output.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_pair_sums(p: &[__m256i; 4], prod: __m256i) -> (__m128i, __m128i) {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    let sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
    // hadd of [j0 j1 j4 j5 | j2 j3 j6 j7] → [g0 g2 · · | g1 g3 · ·] → [g0 g1 g2 g3].
    let mh = _mm256_hadd_epi32(prod, prod);
    (sums, _mm_unpacklo_epi32(_mm256_castsi256_si128(mh), _mm256_extracti128_si256::<1>(mh)))
}

/// [`dot_q4_k`] of one weight row with `T` token rows: each super-block is
/// unpacked once (nibbles and broadcast scales kept in a small table in L1),
/// then each token's four sub-block-pair sums are reduced together and
/// added in the single-dot order (`gemm`: one fused multiply-add per pair;
/// `gemv`: one per super-block).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q4_k_tile<const T: usize>(row: &[u8], xs: [&Q8KRow; T], groups: [RowGroup; T]) -> [f32; T] {
    let (mut acc, mut acc_min) = ([0f32; T], [0f32; T]);
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 144, usize::min);
    let picks = q4_k_picks();
    for bi in 0..nblocks {
        let b = q4_k_unpack(&row[bi * 144..bi * 144 + 144], &picks);
        for t in 0..T {
            let (p, prod) = q4_k_token(&b, xs[t], bi);
            let dx = xs[t].d[bi];
            if groups[t].is_gemm() {
                let (sums, mins) = q4_k_pair_sums(&p, prod);
                let lanes = |v: __m128i| {
                    let mut o = [0i32; 4];
                    // SAFETY: 4 i32.
                    unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), v) };
                    o
                };
                let (s, m) = (lanes(sums), lanes(mins));
                for g in 0..4 {
                    acc[t] = fma(s[g] as f32, b.dw * dx, acc[t]);
                    acc_min[t] = fma(m[g] as f32, b.dmin * dx, acc_min[t]);
                }
            } else {
                let isum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3])));
                acc[t] = fma(isum as f32, b.dw * dx, acc[t]);
                acc_min[t] = fma(hsum_i32(prod) as f32, b.dmin * dx, acc_min[t]);
            }
        }
    }
    std::array::from_fn(|t| acc[t] - acc_min[t])
}

/// [`dot_q4_k_tile`] for four token rows of a batch's `gemm` group (prefill):
/// the float steps of the four tokens run as the four lanes of one vector
/// (per sub-block pair g, in order: `acc = fma(Σ_g, d·d8, acc)` and the same
/// for the minimums), after a 4×4 transpose of the per-token pair sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q4_k_gemm4(row: &[u8], xs: [&Q8KRow; 4]) -> [f32; 4] {
    let (mut acc, mut acc_min) = (_mm_setzero_ps(), _mm_setzero_ps());
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 144, usize::min);
    let picks = q4_k_picks();
    let tr = |v: [__m128i; 4]| {
        let a = _mm_unpacklo_epi32(v[0], v[1]);
        let b = _mm_unpackhi_epi32(v[0], v[1]);
        let c = _mm_unpacklo_epi32(v[2], v[3]);
        let d = _mm_unpackhi_epi32(v[2], v[3]);
        [_mm_unpacklo_epi64(a, c), _mm_unpackhi_epi64(a, c), _mm_unpacklo_epi64(b, d), _mm_unpackhi_epi64(b, d)]
    };
    for bi in 0..nblocks {
        let b = q4_k_unpack(&row[bi * 144..bi * 144 + 144], &picks);
        let mut sums = [_mm_setzero_si128(); 4];
        let mut mins = [_mm_setzero_si128(); 4];
        for t in 0..4 {
            let (p, prod) = q4_k_token(&b, xs[t], bi);
            (sums[t], mins[t]) = q4_k_pair_sums(&p, prod);
        }
        // Transposed: element t of column g is token t's value for pair g.
        let (s4, m4) = (tr(sums), tr(mins));
        let dx = _mm_setr_ps(xs[0].d[bi], xs[1].d[bi], xs[2].d[bi], xs[3].d[bi]);
        let dd = _mm_mul_ps(_mm_set1_ps(b.dw), dx);
        let dm = _mm_mul_ps(_mm_set1_ps(b.dmin), dx);
        for g in 0..4 {
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s4[g]), dd, acc);
            acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(m4[g]), dm, acc_min);
        }
    }
    let mut out = [0f32; 4];
    // SAFETY: 4 floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(acc, acc_min)) };
    out
}

/// Per 32-element segment of a 128-element half of a Q3_K/Q6_K super-block: the
/// `_mm256_shuffle_epi8` indices that broadcast the half's 16-bit scales 2·seg (first 16
/// elements) and 2·seg + 1 (last 16) over the segment's 16-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k_scale_picks() -> [__m256i; 4] {
    std::array::from_fn(|seg| {
        let idx: [u8; 32] = std::array::from_fn(|i| (4 * seg + if i < 16 { 0 } else { 2 } + (i & 1)) as u8);
        // SAFETY: 32 bytes.
        unsafe { _mm256_loadu_si256(idx.as_ptr().cast()) }
    })
}

/// The 32 six-bit values (as bytes) of segment `seg` (0..4) of one 128-element half of a
/// Q6_K super-block, from the half's two 32-byte low-nibble vectors and its 32 high-bit bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q6_k_segment([ql0, ql1, qh]: [__m256i; 3], seg: usize) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0f);
    let ql = if seg & 1 == 0 { ql0 } else { ql1 };
    let lo = if seg >> 1 == 0 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4) };
    let h = match seg {
        0 => qh,
        1 => _mm256_srli_epi16::<2>(qh),
        2 => _mm256_srli_epi16::<4>(qh),
        _ => _mm256_srli_epi16::<6>(qh),
    };
    _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(h, _mm256_set1_epi8(3))))
}

/// The 32 weights (−4..3, as bytes) of segment `shift` (0..4) of 128-element half `half` of
/// a Q3_K super-block: the 2-bit values of the half's 32 bytes `q3` at that shift, less 4
/// where the segment's bit of the high-bit mask `hbits` is clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q3_k_segment(q3: __m256i, hbits: __m256i, half: usize, shift: usize) -> __m256i {
    let m3 = _mm256_set1_epi8(3);
    let low = match shift {
        0 => _mm256_and_si256(q3, m3),
        1 => _mm256_and_si256(_mm256_srli_epi16::<2>(q3), m3),
        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(q3), m3),
        _ => _mm256_and_si256(_mm256_srli_epi16::<6>(q3), m3),
    };
    let bit = _mm256_set1_epi8(1 << (half * 4 + shift));
    let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), _mm256_setzero_si256());
    _mm256_sub_epi8(low, _mm256_and_si256(clear, _mm256_set1_epi8(4)))
}

/// `kiln_quant::ggml_dot::q3_k_scales` in one vector: the sixteen signed 6-bit scales of a
/// Q3_K block from its 12 scale bytes at `s` (low nibbles of bytes 0–7, then their high
/// nibbles; two more bits each from bytes 8–11, byte `j % 4` shifted by `2·(j / 4)`). The
/// scalar form was most of a Q3_K decode (10.5 → 25 Gweights/s per thread without it).
///
/// Not a `#[target_feature]` function, like [`kq2_decode`], so that it inlines.
///
/// # Safety
/// The CPU must support AVX2; `s` points at 12 readable bytes.
#[inline(always)]
pub(crate) unsafe fn q3_k_scales(s: *const u8) -> __m128i {
    // SAFETY: the caller's.
    unsafe {
        let nib = _mm_set1_epi8(0x0f);
        let b = _mm_loadl_epi64(s.cast());
        let low = _mm_unpacklo_epi64(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16::<4>(b), nib));
        let hb = _mm_set1_epi32(s.add(8).cast::<i32>().read_unaligned());
        let high = _mm_and_si128(_mm_srlv_epi32(hb, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
        _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16::<4>(high)), _mm_set1_epi8(32))
    }
}

/// `kiln_backends::reference::dot` on AVX2, bit for bit: eight f32 lanes (element `i` in lane
/// `i % 8`), each step a rounded product then a rounded sum (no fused multiply-add), the lanes
/// summed pairwise as the reference does, then the tail of fewer than eight elements.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        // SAFETY: 8 floats of each.
        let (x, y) = unsafe { (_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i))) };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    dot_f32_tail(acc, &a[full..n], &b[full..n])
}

/// The end of [`dot_f32`]: the eight lanes summed as the reference's `sum_lanes`,
/// `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`, plus the tail `a·b` in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32_tail(acc: __m256, a: &[f32], b: &[f32]) -> f32 {
    let mut tail = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        tail += x * y;
    }
    let r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let t = _mm_add_ps(r, _mm_shuffle_ps::<0b10_11_00_01>(r, r));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t))) + tail
}

/// Q2_K with Q8_K activations (`ggml_dot::dot_q2_k` order, ggml's AVX2 kernel; with `TILED`
/// `ggml_dot::dot_k_tiled`'s, its tiled kernel): one weight row with `T` token rows, each
/// super-block's scales unpacked once for all of them.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // token indices over fixed arrays unroll
pub(crate) fn dot_q2_k_tile<const T: usize, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut tiled = [0f32; T];
    let mut mins_share = [_mm256_setzero_si256(); T];
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 84, usize::min);
    let picks = k_scale_picks();
    let (m3, m4) = (_mm256_set1_epi8(3), _mm_set1_epi8(0x0f));
    for (bi, blk) in row.as_chunks::<84>().0.iter().enumerate().take(nblocks) {
        prefetch_ahead(blk.as_ptr(), 84);
        // SAFETY: the 16 scale bytes.
        let sm = unsafe { _mm_loadu_si128(blk.as_ptr().cast()) };
        let mins = _mm256_cvtepi8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
        let scales = _mm256_cvtepi8_epi16(_mm_and_si128(sm, m4));
        let (dw, dmin) = (f16(blk, 80), f16(blk, 82));
        for t in 0..T {
            // The block's 16 activation sums as i16 (|Σ| ≤ 16·127), in order.
            // SAFETY: 16 sums of block `bi`.
            let bs = unsafe {
                let p = xs[t].bsums.as_ptr().add(16 * bi);
                _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(8).cast()),
                ))
            };
            let prod = _mm256_madd_epi16(mins, bs);
            if TILED {
                mins_share[t] = prod;
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(-xs[t].d[bi] * dmin), _mm256_cvtepi32_ps(prod), acc[t]);
            }
        }
        let mut lanes = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            // SAFETY: 32 bytes of 2-bit quants inside the block.
            let q2 = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * half).cast()) };
            let sc_half = half_lanes(scales, half);
            for (shift, pick) in picks.iter().enumerate() {
                let w = _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * shift as i32)), m3);
                let sc = _mm256_shuffle_epi8(sc_half, *pick);
                for t in 0..T {
                    // SAFETY: 32 quants at this segment.
                    let y =
                        unsafe { _mm256_loadu_si256(xs[t].q.as_ptr().add(bi * QK_K + half * 128 + shift * 32).cast()) };
                    lanes[t] = _mm256_add_epi32(lanes[t], _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), sc));
                }
            }
        }
        for t in 0..T {
            if TILED {
                tiled[t] = tiled_step(tiled[t], lanes[t], dw, Some((dmin, hsum_i32(mins_share[t]))), xs[t].d[bi]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xs[t].d[bi] * dw), _mm256_cvtepi32_ps(lanes[t]), acc[t]);
            }
        }
    }
    if TILED {
        return tiled;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        out[t] = hsum8(acc[t]);
    }
    out
}

/// Q5_K with Q8_K activations (`ggml_dot::dot_q5_k` order, ggml's AVX2 kernel; with `TILED`
/// `ggml_dot::dot_k_tiled`'s): one weight row with `T` token rows, each super-block's 5-bit
/// values assembled once for all of them.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // token indices over fixed arrays unroll
pub(crate) fn dot_q5_k_tile<const T: usize, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut summs = [0f32; T];
    let mut imins = [0i32; T];
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 176, usize::min);
    let (m4, one) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(1));
    for (bi, blk) in row.as_chunks::<176>().0.iter().enumerate().take(nblocks) {
        prefetch_ahead(blk.as_ptr(), 176);
        // The eight 6-bit scales and minimums (Q5_K keeps them as Q4_K does).
        let (sc, mn) = q4_k_scales_mins(&blk[4..16]);
        let scale = |j: usize| (sc >> (8 * j)) as u8;
        let min = |j: usize| (mn >> (8 * j)) as u8;
        let (dw, dmin) = (f16(blk, 0), f16(blk, 2));
        for t in 0..T {
            let bs = &xs[t].bsums[bi * 16..bi * 16 + 16];
            let mut imin = 0i32;
            for j in 0..8 {
                imin += i32::from(min(j)) * (bs[2 * j] + bs[2 * j + 1]);
            }
            if TILED {
                imins[t] = imin;
            } else {
                summs[t] = (-xs[t].d[bi] * dmin).mul_add(imin as f32, summs[t]);
            }
        }
        // SAFETY: the 32 high-bit bytes.
        let hbits = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16).cast()) };
        let mut lanes = [_mm256_setzero_si256(); T];
        for g in 0..4 {
            // SAFETY: 32 bytes of nibbles inside the block.
            let q5 = unsafe { _mm256_loadu_si256(blk.as_ptr().add(48 + 32 * g).cast()) };
            let high =
                |j: i32| _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(hbits, _mm_cvtsi32_si128(j)), one));
            let w0 = _mm256_add_epi8(_mm256_and_si256(q5, m4), high(2 * g as i32));
            let w1 = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(q5), m4), high(2 * g as i32 + 1));
            let (s0, s1) = (_mm256_set1_epi16(i16::from(scale(2 * g))), _mm256_set1_epi16(i16::from(scale(2 * g + 1))));
            for t in 0..T {
                // SAFETY: 64 quants of this pair of sub-blocks.
                let (y0, y1) = unsafe {
                    let p = xs[t].q.as_ptr().add(bi * QK_K + 64 * g);
                    (_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(32).cast()))
                };
                let p0 = _mm256_madd_epi16(s0, _mm256_maddubs_epi16(w0, y0));
                let p1 = _mm256_madd_epi16(s1, _mm256_maddubs_epi16(w1, y1));
                lanes[t] = _mm256_add_epi32(lanes[t], _mm256_add_epi32(p0, p1));
            }
        }
        for t in 0..T {
            if TILED {
                // (`summs` holds the tiled sums here.)
                summs[t] = tiled_step(summs[t], lanes[t], dw, Some((dmin, imins[t])), xs[t].d[bi]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xs[t].d[bi] * dw), _mm256_cvtepi32_ps(lanes[t]), acc[t]);
            }
        }
    }
    if TILED {
        return summs;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        out[t] = hsum8(acc[t]) + summs[t];
    }
    out
}

/// Q6_K with Q8_K activations (`ggml_dot::dot_q6_k` order: eight lanes per
/// super-block, each `fma(d, lane − sub, acc)`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q6_k(row: &[u8], x: &Q8KRow) -> f32 {
    dot_q6_k_tile::<1, false>(row, [x])[0]
}

/// [`dot_q6_k`] of one weight row with `T` token rows, each segment's 6-bit
/// values assembled once for all of them (with `TILED`, `ggml_dot::dot_k_tiled`'s order).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q6_k_tile<const T: usize, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    q6_k_tile::<T, false, TILED>(row, xs)
}

/// [`dot_q6_k_tile`] with VNNI: the scale products added by one `vpdpwssd` instead of
/// `madd` + `add` (the same exact lanes).
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512VL and AVX512VNNI.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) fn dot_q6_k_tile_vnni<const T: usize, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    q6_k_tile::<T, true, TILED>(row, xs)
}

/// The body of [`dot_q6_k_tile`] and [`dot_q6_k_tile_vnni`], inlined into each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_tile<const T: usize, const VNNI: bool, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut tiled = [0f32; T];
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 210, usize::min);
    let picks = k_scale_picks();
    for bi in 0..nblocks {
        let blk = &row[bi * 210..bi * 210 + 210];
        prefetch_ahead(blk.as_ptr(), 210);
        // SAFETY: the 16 scale bytes.
        let sc_bytes = unsafe { _mm_loadu_si128(blk.as_ptr().add(192).cast()) };
        let sc_all = _mm256_cvtepi8_epi16(sc_bytes);
        let mut lanes = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            // SAFETY: each load stays inside the 210-byte block.
            let (ql0, ql1, qh) = unsafe {
                (
                    _mm256_loadu_si256(blk[half * 64..].as_ptr().cast()),
                    _mm256_loadu_si256(blk[half * 64 + 32..].as_ptr().cast()),
                    _mm256_loadu_si256(blk[128 + half * 32..].as_ptr().cast()),
                )
            };
            // Scales 8·half .. 8·half + 8 as i16, in both 128-bit lanes.
            let sc_half = half_lanes(sc_all, half);
            for (seg, pick) in picks.iter().enumerate() {
                let q6 = q6_k_segment([ql0, ql1, qh], seg);
                let scales = _mm256_shuffle_epi8(sc_half, *pick);
                for t in 0..T {
                    // SAFETY: 32 quants at this segment.
                    let y =
                        unsafe { _mm256_loadu_si256(xs[t].q.as_ptr().add(bi * QK_K + half * 128 + seg * 32).cast()) };
                    let p = _mm256_maddubs_epi16(q6, y);
                    lanes[t] = if VNNI {
                        // SAFETY: only in `dot_q6_k_tile_vnni`, for CPUs with AVX512VNNI/VL.
                        unsafe { _mm256_dpwssd_epi32(lanes[t], p, scales) }
                    } else {
                        _mm256_add_epi32(lanes[t], _mm256_madd_epi16(p, scales))
                    };
                }
            }
        }
        // Scales as i32, for the 32·Σ scale·bsum correction of each lane.
        let sc32 = [_mm256_cvtepi8_epi32(sc_bytes), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc_bytes, sc_bytes))];
        let d6 = f16(blk, 208);
        for t in 0..T {
            let bs = &xs[t].bsums[bi * 16..bi * 16 + 16];
            // SAFETY: 16 i32.
            let (b0, b1) =
                unsafe { (_mm256_loadu_si256(bs.as_ptr().cast()), _mm256_loadu_si256(bs.as_ptr().add(8).cast())) };
            // hadd within lanes: [p0 p1 p4 p5 | p2 p3 p6 p7], p_l = bs[2l]·sc[2l] + bs[2l+1]·sc[2l+1]; put in order.
            let pairs = _mm256_hadd_epi32(_mm256_mullo_epi32(b0, sc32[0]), _mm256_mullo_epi32(b1, sc32[1]));
            let sub = _mm256_slli_epi32::<5>(_mm256_permute4x64_epi64::<0b11_01_10_00>(pairs));
            let lanes = _mm256_sub_epi32(lanes[t], sub);
            if TILED {
                tiled[t] = tiled_step(tiled[t], lanes, d6, None, xs[t].d[bi]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xs[t].d[bi] * d6), _mm256_cvtepi32_ps(lanes), acc[t]);
            }
        }
    }
    if TILED {
        return tiled;
    }
    std::array::from_fn(|t| hsum8(acc[t]))
}

/// Q3_K with Q8_K activations (`ggml_dot`'s Q3_K order: eight exact lanes
/// per super-block, each `fma(d8·d, lane, acc)`; with `TILED` `ggml_dot::dot_k_tiled`'s), `T`
/// token rows at once: each 32-weight segment is unpacked once for all of them.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_q3_k_tile<const T: usize, const TILED: bool>(row: &[u8], xs: [&Q8KRow; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let mut tiled = [0f32; T];
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 110, usize::min);
    let picks = k_scale_picks();
    for (bi, blk) in row.chunks_exact(110).enumerate().take(nblocks) {
        prefetch_ahead(blk.as_ptr(), 110);
        // SAFETY: the 12 scale bytes.
        let sc_all = _mm256_cvtepi8_epi16(unsafe { q3_k_scales(blk.as_ptr().add(96)) });
        // SAFETY: the 32 bytes of the high-bit mask.
        let hbits = unsafe { _mm256_loadu_si256(blk.as_ptr().cast()) };
        let mut lanes = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            // SAFETY: 32 bytes of 2-bit quants inside the block.
            let q3 = unsafe { _mm256_loadu_si256(blk.as_ptr().add(32 + 32 * half).cast()) };
            let sc_half = half_lanes(sc_all, half);
            for (shift, pick) in picks.iter().enumerate() {
                // The weights (−4..3), their magnitudes for `maddubs`, their signs for the activations.
                let w = q3_k_segment(q3, hbits, half, shift);
                let wabs = _mm256_sign_epi8(w, w);
                let scales = _mm256_shuffle_epi8(sc_half, *pick);
                for t in 0..T {
                    // SAFETY: 32 quants at this segment.
                    let y =
                        unsafe { _mm256_loadu_si256(xs[t].q.as_ptr().add(bi * QK_K + half * 128 + shift * 32).cast()) };
                    let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(y, w));
                    lanes[t] = _mm256_add_epi32(lanes[t], _mm256_madd_epi16(p, scales));
                }
            }
        }
        let d3 = f16(blk, 108);
        for t in 0..T {
            if TILED {
                tiled[t] = tiled_step(tiled[t], lanes[t], d3, None, xs[t].d[bi]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xs[t].d[bi] * d3), _mm256_cvtepi32_ps(lanes[t]), acc[t]);
            }
        }
    }
    if TILED {
        return tiled;
    }
    std::array::from_fn(|t| hsum8(acc[t]))
}

/// Rounds 8 floats to f16 and back (round to nearest even, as `half`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round_f16(x: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
}

/// ggml's AVX2 `ggml_vec_dot_f16` order (see the reference's `ggml_dot_f16`):
/// four 8-lane FMA accumulators over steps of 32, reduced (0+2)+(1+3), then
/// the halves, then as `_mm_hadd_ps` twice; leftovers added in f64.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f16_order(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let np = n - n % 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < np {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 ≤ np ≤ both lengths.
            let (xv, yv) =
                unsafe { (_mm256_loadu_ps(x.as_ptr().add(i + 8 * j)), _mm256_loadu_ps(y.as_ptr().add(i + 8 * j))) };
            *a = _mm256_fmadd_ps(xv, yv, *a);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let t = _mm_hadd_ps(t, t);
    let t = _mm_hadd_ps(t, t);
    let mut sum = _mm_cvtss_f32(t) as f64;
    for k in np..n {
        sum += (x[k] * y[k]) as f64;
    }
    sum as f32
}

/// llama.cpp's CPU flash attention for one (query, head) over the positions
/// `range` yields (sinks, then the window) of an f16-valued cache: the reference's `flash_f16`, bit for bit,
/// with the value accumulator updated 8 lanes at a time. `o.len()` (the head
/// size) must be a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn flash_f16(
    qh: &[f32],
    cache: &kiln_backends::reference::KvCache,
    range: impl Iterator<Item = usize>,
    kv_off: usize,
    attrs: &kiln_ir::AttentionAttrs,
    o: &mut [f32],
    (acc, q16): &mut (Vec<f32>, Vec<f32>),
) {
    let (keys, values, width) = (&cache.k, &cache.v, cache.width);
    let (scale, softcap) = (attrs.scale, attrs.softcap);
    let hd = o.len();
    q16.clear();
    q16.extend(qh.iter().map(|&v| half::f16::from_f32(v).to_f32()));
    acc.clear();
    acc.resize(hd, 0.0);
    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
    for j in range {
        let kj = &keys[j * width + kv_off..j * width + kv_off + hd];
        let mut s = dot_f16_order(q16, kj) * scale;
        if softcap > 0.0 {
            s = softcap * (s / softcap).tanh();
        }
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            let msv = _mm256_set1_ps(ms);
            for a in acc.chunks_exact_mut(8) {
                // SAFETY: 8 floats.
                unsafe { _mm256_storeu_ps(a.as_mut_ptr(), round_f16(_mm256_mul_ps(_mm256_loadu_ps(a.as_ptr()), msv))) };
            }
        } else {
            vs = (s - m).exp();
        }
        let vj = &values[j * width + kv_off..j * width + kv_off + hd];
        let vsv = _mm256_set1_ps(vs);
        for (a, v) in acc.chunks_exact_mut(8).zip(vj.chunks_exact(8)) {
            // SAFETY: 8 floats each.
            unsafe {
                let r = _mm256_fmadd_ps(_mm256_loadu_ps(v.as_ptr()), vsv, _mm256_loadu_ps(a.as_ptr()));
                _mm256_storeu_ps(a.as_mut_ptr(), round_f16(r));
            }
        }
        s_sum = fma(s_sum, ms, vs);
    }
    let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (od, a) in o.iter_mut().zip(acc.iter()) {
        *od = a * inv;
    }
}

/// `ggml_dot::quantize_q8` (Q8_0/Q8_1 activations), 8 lanes at a time; bit-identical.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_q8(x: &[f32]) -> Q8Row {
    let mut scales = Vec::with_capacity(x.len() / QK);
    let mut q = vec![0i8; x.len()];
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (b, qb) in x.chunks(QK).zip(q.chunks_mut(QK)) {
        if b.len() < QK {
            // A short tail (never for whole blocks): the scalar definition.
            let r = kiln_quant::ggml_dot::quantize_q8(b);
            qb.copy_from_slice(&r.q);
            scales.extend(r.scales);
            continue;
        }
        // SAFETY: 32 floats.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * i)) });
        let mut mx = _mm256_setzero_ps();
        for vi in v {
            mx = _mm256_max_ps(mx, _mm256_and_ps(vi, abs_mask));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let mut sum = _mm256_setzero_si256();
        let mut out = [0i32; 32];
        for (i, vi) in v.into_iter().enumerate() {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(vi, idv));
            let qi = _mm256_cvtps_epi32(r);
            sum = _mm256_add_epi32(sum, qi);
            // SAFETY: 8 i32.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(8 * i).cast(), qi) };
        }
        for (o, v) in qb.iter_mut().zip(out) {
            *o = v as i8;
        }
        let sum = hsum_i32(sum);
        scales.push((half::f16::from_f32(d).to_f32(), half::f16::from_f32(d * sum as f32).to_f32()));
    }
    Q8Row { scales, q }
}

/// kq2 decoding tables for the SIMD kernel: per magnitude index the eight
/// odd magnitudes `A` doubled, as signed bytes, with coordinate 7 negated
/// when the index's parity `P(i)` is 1 (so that the sign of coordinate 7 is
/// just the parity of the seven stored sign bits); and the 128 block scales.
/// With the signs and the shift bit's ±1 added, a group's bytes are `4·c`
/// for its codeword `c` (see `kiln_quant::kq2`).
pub(crate) struct Kq2Tables {
    mag: [u64; 512],
    pub(crate) scale: [f32; 128],
}

pub(crate) static KQ2_TABLES: std::sync::LazyLock<Kq2Tables> = std::sync::LazyLock::new(|| {
    let abs = kiln_quant::kq2::kq2_abs_codebook();
    let mut mag = [0u64; 512];
    for (m, a) in mag.iter_mut().zip(abs) {
        let parity = (a.iter().map(|&k| u32::from(k)).sum::<u32>() / 2) & 1;
        let bytes: [u8; 8] = std::array::from_fn(|j| {
            let v = 2 * a[j] as i8;
            (if j == 7 && parity == 1 { -v } else { v }) as u8
        });
        *m = u64::from_le_bytes(bytes);
    }
    let scale = std::array::from_fn(|k| kiln_quant::kq2::kq2_scale(k as u8));
    Kq2Tables { mag, scale }
});

/// Shuffle indices spreading byte 2g + 1 of the group words over group g's
/// eight bytes: groups 0–3, then 4–7 (the words are in both 128-bit lanes).
const KQ2_SPREAD: [[u8; 32]; 2] = {
    let mut out = [[0u8; 32]; 2];
    let mut half = 0;
    while half < 2 {
        let mut i = 0;
        while i < 32 {
            out[half][i] = (2 * (4 * half + i / 8) + 1) as u8;
            i += 1;
        }
        half += 1;
    }
    out
};

/// Decodes one kq2 block's eight codewords to the bytes `4·c`: groups 0–3
/// in the first vector, 4–7 in the second. Magnitudes come from the table
/// (one 8-byte load per group); the sign bits, their parity (coordinate 7)
/// and the shift bits are spread over the group's bytes with shuffles.
///
/// Not a `#[target_feature]` function so that it can be always inlined
/// into its AVX2 caller (rustc refuses `inline(always)` on those).
///
/// # Safety
/// The CPU must support AVX2; `b` is one 18-byte block.
#[inline(always)]
pub(crate) unsafe fn kq2_decode(t: &Kq2Tables, b: &[u8; 18]) -> [__m256i; 2] {
    // SAFETY: the caller's (the CPU has AVX2; the reads are in bounds, see above).
    unsafe {
        let words = _mm_loadu_si128(b.as_ptr().add(2).cast());
        // Odd bytes: sign bits 0–6 (bit 7 is the shift bit). Bit 7 of the sign
        // byte becomes the parity of the seven: nibble parities from a table.
        let low7 = _mm_and_si128(words, _mm_set1_epi8(0x7f));
        let par = _mm_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
        let nib = _mm_set1_epi8(0x0f);
        let p = _mm_xor_si128(
            _mm_shuffle_epi8(par, _mm_and_si128(low7, nib)),
            _mm_shuffle_epi8(par, _mm_and_si128(_mm_srli_epi16::<4>(low7), nib)),
        );
        let signs = _mm256_broadcastsi128_si256(_mm_or_si128(low7, p));
        let tmask = _mm256_broadcastsi128_si256(_mm_srai_epi16::<15>(words));
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let one = _mm256_set1_epi8(1);
        // Magnitudes: group g's index is the low byte of its word, bit 8 from byte 1. Eight
        // scalar table loads (a `vpgatherdq` per four was slower on Zen 4).
        let m = |g: usize| t.mag[usize::from(b[2 + 2 * g]) | (usize::from(b[1] >> g) & 1) << 8] as i64;
        let mut out = [_mm256_setzero_si256(); 2];
        for (half, o) in out.iter_mut().enumerate() {
            let g0 = 4 * half;
            let mag = _mm256_set_epi64x(m(g0 + 3), m(g0 + 2), m(g0 + 1), m(g0));
            // Byte 2g + 1 (group g's signs and shift bit) over group g's 8 bytes.
            let spread = _mm256_loadu_si256(KQ2_SPREAD[half].as_ptr().cast());
            let neg = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(signs, spread), bits), bits);
            let shift = _mm256_or_si256(_mm256_shuffle_epi8(tmask, spread), one);
            *o = _mm256_add_epi8(_mm256_sign_epi8(mag, _mm256_or_si256(neg, one)), shift);
        }
        out
    }
}

/// The four integer lanes of `Σ w·q` over 64 weights (lane `m`: weights `16m..16m+16`) as
/// `[c0, c2, c0, c2 | c1, c3, c1, c3]` (their sum, [`kq2_total`], is the block's integer of
/// `kiln_quant::kq2::dot_kq2_q8`): `w` the
/// bytes `4·c` of [`kq2_decode`] (odd, so never 0) and `wabs` their magnitudes, `q` 64
/// activation quants; exact (|pair sums| ≤ 2·15·127).
///
/// # Safety
/// The CPU must support AVX2; `q` holds 64 bytes.
#[inline(always)]
unsafe fn kq2_isum(w: &[__m256i; 2], wabs: &[__m256i; 2], q: &[i8]) -> __m256i {
    // SAFETY: the caller's (the CPU has AVX2; the reads are in bounds, see above).
    unsafe {
        let (q0, q1) = (_mm256_loadu_si256(q.as_ptr().cast()), _mm256_loadu_si256(q.as_ptr().add(32).cast()));
        let ones = _mm256_set1_epi16(1);
        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[0], _mm256_sign_epi8(q0, w[0])), ones);
        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[1], _mm256_sign_epi8(q1, w[1])), ones);
        let h = _mm256_hadd_epi32(p0, p1);
        _mm256_hadd_epi32(h, h)
    }
}

/// The block's integer `l0 + l1 + l2 + l3` from [`kq2_isum`]'s lanes (lanes 0 and 1 of the
/// low half are `l0` and `l2`, of the high half `l1` and `l3`; lanes 2 and 3 repeat them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn kq2_total(isum: __m256i) -> i32 {
    let x = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256::<1>(isum));
    _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32::<0b01>(x)))
}

/// Dots of one kq2 row with `T` token rows of 8-bit kq2 activations
/// (`kiln_quant::kq2::Kq2Q8Row`): each block decoded once for all of them,
/// each result `kiln_quant::kq2::dot_kq2_q8`'s, bit for bit (exact integer
/// lanes summed to the block's integer, one fused multiply-add per block).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_kq2_tile<const T: usize>(row: &[u8], xs: [&Kq2Q8Row; T]) -> [f32; T] {
    let t = &*KQ2_TABLES;
    let mut acc = [0f32; T];
    let nblocks = xs.iter().map(|x| x.d.len()).fold(row.len() / 18, usize::min);
    for (bi, b) in row.as_chunks::<18>().0.iter().enumerate().take(nblocks) {
        prefetch_ahead(b.as_ptr(), 18);
        let s = t.scale[usize::from(b[0] & 0x7f)];
        if s == 0.0 {
            continue;
        }
        // SAFETY: AVX2 (this function's target features); `b` is one block.
        let w = unsafe { kq2_decode(t, b) };
        let wabs = [_mm256_sign_epi8(w[0], w[0]), _mm256_sign_epi8(w[1], w[1])];
        let unrotated = b[0] & 0x80 != 0;
        for (a, x) in acc.iter_mut().zip(xs) {
            let (q, d) = x.block(bi, unrotated);
            // SAFETY: AVX2; `q` is the block's 64 quants.
            let isum = unsafe { kq2_isum(&w, &wabs, q) };
            *a = (kq2_total(isum) as f32).mul_add(0.25 * (s * d), *a);
        }
    }
    acc
}

/// `ggml_dot::quantize_q8_k` (Q8_K activations), 8 lanes at a time; bit-identical.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_q8_k(x: &[f32]) -> Q8KRow {
    let nb = x.len() / QK_K;
    let (mut d, mut q, mut bsums) = (Vec::with_capacity(nb), vec![0i8; nb * QK_K], Vec::with_capacity(nb * 16));
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (b, qb) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)) {
        let mut mx = _mm256_setzero_ps();
        for i in 0..32 {
            // SAFETY: 8 of the block's 256 floats.
            mx = _mm256_max_ps(mx, _mm256_and_ps(unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * i)) }, abs_mask));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 {
            d.push(0.0);
            bsums.extend([0; 16]);
            continue;
        }
        // The signed value of the first element of largest magnitude (as the scalar scan picks it).
        let max = b.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        let iv = _mm256_set1_ps(iscale);
        let top = _mm256_set1_ps(127.0);
        for (g, qg) in qb.chunks_exact_mut(16).enumerate() {
            let mut out = [0i32; 16];
            let mut sum = _mm256_setzero_si256();
            for h in 0..2 {
                // SAFETY: 8 floats of the block.
                let v = unsafe { _mm256_loadu_ps(b.as_ptr().add(16 * g + 8 * h)) };
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(iv, v));
                let qi = _mm256_cvtps_epi32(_mm256_min_ps(r, top));
                sum = _mm256_add_epi32(sum, qi);
                // SAFETY: 8 i32.
                unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(8 * h).cast(), qi) };
            }
            for (o, v) in qg.iter_mut().zip(out) {
                *o = v as i8;
            }
            bsums.push(hsum_i32(sum));
        }
        d.push(1.0 / iscale);
    }
    Q8KRow { d, q, bsums }
}

#[cfg(test)]
pub(crate) mod tests {
    use kiln_ir::DType;
    use kiln_quant::ggml_dot::{self, Activations};

    use super::*;

    /// The kernel tests' xorshift stream (seeded, never zero).
    pub(crate) fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn random_row(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let mut r = rng(seed);
        let mut row: Vec<u8> = (0..dtype.row_bytes(n as u64).unwrap() as usize).map(|_| r() as u8).collect();
        // Finite, modest f16 scales where the format keeps them.
        let s = half::f16::from_f32(0.0123).to_le_bytes();
        let m = half::f16::from_f32(-0.0071).to_le_bytes();
        let bb = dtype.block_bytes() as usize;
        for blk in row.chunks_mut(bb) {
            match dtype {
                DType::Q4K | DType::Q5K => {
                    blk[0..2].copy_from_slice(&s);
                    blk[2..4].copy_from_slice(&m);
                }
                DType::Q6K => blk[208..210].copy_from_slice(&s),
                DType::Q3K => blk[108..110].copy_from_slice(&s),
                DType::Q2K => {
                    blk[80..82].copy_from_slice(&s);
                    blk[82..84].copy_from_slice(&m);
                }
                DType::Q4_1 | DType::Q5_1 => {
                    blk[0..2].copy_from_slice(&s);
                    blk[2..4].copy_from_slice(&m);
                }
                _ => blk[0..2].copy_from_slice(&s),
            }
        }
        row
    }

    fn acts(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n).map(|i| ((r() % 20001) as f32 / 10000.0 - 1.0) * if i % 37 == 0 { 9.0 } else { 1.0 }).collect()
    }

    fn avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    #[test]
    fn legacy_dots_equal_the_scalar_definition_bit_for_bit() {
        if !avx2() {
            return;
        }
        for (dtype, kind) in [
            (DType::Q4_1, Legacy::Q4_1),
            (DType::Q5_0, Legacy::Q5_0),
            (DType::Q5_1, Legacy::Q5_1),
            (DType::Q8_0, Legacy::Q8_0),
        ] {
            for seed in 0..20 {
                let n = 32 * (1 + seed as usize % 24);
                let row = random_row(dtype, n, seed);
                let x = ggml_dot::quantize_q8(&acts(n, seed + 100));
                let want = ggml_dot::dot(
                    dtype,
                    &row,
                    &Activations::Q8(ggml_dot::quantize_q8(&acts(n, seed + 100))),
                    RowGroup::Gemv,
                );
                // SAFETY: checked above.
                let got = unsafe { dot_legacy(kind, &row, &x) };
                assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} n={n}: {got} vs {want}");
            }
        }
    }

    /// The AVX2 f32 dot equals the reference's bit for bit, its lane order included.
    #[test]
    fn f32_dot_equals_the_reference_bit_for_bit() {
        if !crate::Isa::Avx2.available() {
            return;
        }
        let mut r = rng(61);
        for n in [0usize, 5, 8, 45, 64, 1003] {
            // Magnitudes spread over decades, so that a different lane order would show.
            let a: Vec<f32> =
                (0..n).map(|i| ((r() % 2001) as f32 - 1000.0) / 77.0 * 10f32.powi((i % 7) as i32 - 3)).collect();
            let b: Vec<f32> = (0..n).map(|_| ((r() % 2001) as f32 - 1000.0) / 313.0).collect();
            // SAFETY: checked above.
            let got = unsafe { dot_f32(&a, &b) };
            assert_eq!(got.to_bits(), kiln_backends::reference::dot(&a, &b).to_bits(), "n {n}");
        }
    }

    #[test]
    fn kq2_dot_equals_the_definition_bit_for_bit() {
        if !avx2() {
            return;
        }
        for seed in 0..40 {
            let n = 64 * (1 + seed as usize % 12);
            let w = acts(n, seed + 1);
            let mut x = acts(n, seed + 2);
            let mut row = vec![0u8; kiln_quant::kq2::kq2_row_bytes(n).unwrap()];
            kiln_quant::kq2::quantize_kq2(&w, None, &mut row).unwrap();
            if seed % 3 == 0 {
                // Some blocks stored unrotated, some zero.
                for b in row.chunks_mut(18).step_by(2) {
                    b[0] |= 0x80;
                }
                if row.len() >= 36 {
                    row[18..36].fill(0);
                }
            }
            if seed % 5 == 1 {
                // Arbitrary bytes: every codeword, sign and shift pattern.
                let mut z = seed;
                for v in row.iter_mut() {
                    z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    *v = (z >> 33) as u8;
                }
            }
            if seed % 7 == 2 {
                x[..64].fill(0.0);
            }
            let xs: Vec<_> = (0..4).map(|u| kiln_quant::kq2::quantize_kq2_q8(&acts(n, seed + 10 + u))).collect();
            let q = kiln_quant::kq2::quantize_kq2_q8(&x);
            let want = kiln_quant::kq2::dot_kq2_q8(&row, &q);
            // SAFETY: checked above.
            let got = unsafe { dot_kq2_tile(&row, [&q]) }[0];
            assert_eq!(got.to_bits(), want.to_bits(), "n={n}: {got} vs {want}");
            // SAFETY: checked above.
            let got4 = unsafe { dot_kq2_tile(&row, [&xs[0], &xs[1], &xs[2], &xs[3]]) };
            for (g, x) in got4.iter().zip(&xs) {
                assert_eq!(g.to_bits(), kiln_quant::kq2::dot_kq2_q8(&row, x).to_bits());
            }
        }
    }

    #[test]
    fn activation_quantizer_equals_the_scalar_definition() {
        if !avx2() {
            return;
        }
        for seed in 0..50 {
            let mut x = acts(32 * (1 + seed as usize % 9), seed);
            if seed % 5 == 0 {
                x[..32].iter_mut().for_each(|v| *v = 0.0);
            }
            let want = ggml_dot::quantize_q8(&x);
            // SAFETY: checked above.
            let got = unsafe { quantize_q8(&x) };
            assert_eq!(got.q, want.q);
            assert_eq!(got.scales, want.scales);
        }
    }

    #[test]
    fn q8_k_quantizer_equals_the_scalar_definition() {
        if !avx2() {
            return;
        }
        for seed in 0..30 {
            let mut x = acts(256 * (1 + seed as usize % 4), seed);
            if seed % 4 == 0 {
                x[..256].iter_mut().for_each(|v| *v = 0.0);
            }
            if seed % 4 == 1 {
                // Ties in magnitude with opposite signs: the first one sets the sign.
                x[3] = -20.0;
                x[7] = 20.0;
            }
            let want = ggml_dot::quantize_q8_k(&x);
            // SAFETY: checked above.
            let got = unsafe { quantize_q8_k(&x) };
            assert_eq!(got.q, want.q);
            assert_eq!(got.bsums, want.bsums);
            assert_eq!(
                got.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn k_quant_dots_equal_the_scalar_definition_bit_for_bit() {
        if !avx2() {
            return;
        }
        for seed in 0..20 {
            let n = 256 * (1 + seed as usize % 6);
            let x = acts(n, seed + 7);
            for dtype in [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K] {
                let row = random_row(dtype, n, seed);
                let a = ggml_dot::quantize_for(dtype, &x).unwrap();
                let Activations::Q8K(q) = &a else { unreachable!() };
                for group in [RowGroup::Gemv, RowGroup::Gemm, RowGroup::TiledGemv, RowGroup::TiledGemm] {
                    let want = ggml_dot::dot(dtype, &row, &a, group);
                    // SAFETY: checked above.
                    let got = unsafe {
                        match (dtype, group.is_tiled()) {
                            (DType::Q4K, _) => dot_q4_k(&row, q, group),
                            (DType::Q3K, false) => dot_q3_k_tile::<1, false>(&row, [q])[0],
                            (DType::Q3K, true) => dot_q3_k_tile::<1, true>(&row, [q])[0],
                            (DType::Q5K, false) => dot_q5_k_tile::<1, false>(&row, [q])[0],
                            (DType::Q5K, true) => dot_q5_k_tile::<1, true>(&row, [q])[0],
                            (DType::Q2K, false) => dot_q2_k_tile::<1, false>(&row, [q])[0],
                            (DType::Q2K, true) => dot_q2_k_tile::<1, true>(&row, [q])[0],
                            (_, false) => dot_q6_k(&row, q),
                            (_, true) => dot_q6_k_tile::<1, true>(&row, [q])[0],
                        }
                    };
                    assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} {group:?} n={n}: {got} vs {want}");
                }
            }
        }
    }
}
