//! Q8_0, Q5_0, Q4_1 and Q5_1 weights with one row per 32-bit lane (x86-64, AVX-512). Their definition
//! is ggml's `vec_dot` order (llama.cpp repacks none of them on x86): per block eight integer
//! lanes of four consecutive products, each added to its own float accumulator by
//! `fma(d·d8, lane, acc)`, the eight reduced as `hsum_float_8` at the end
//! (`kiln_quant::ggml_dot`). Those are eight accumulators per output, so a row-at-a-time kernel
//! spends most of its work on horizontal structure and stays well below memory speed
//! (11 Gweights/s per thread here). With sixteen rows repacked once per session so that one
//! 512-bit vector holds the four-byte group `l` of every row, each lane `l` of all sixteen rows
//! is one `vpdpbusd` against the broadcast activation group, its float step one vertical
//! fused multiply-add into accumulator `l`, and the reduction eight vertical adds in
//! `hsum_float_8`'s order: every output gets the definition's bits.
//!
//! Q8_0 weights are stored offset to unsigned (`w + 128`, the sign bit flipped) for
//! `vpdpbusd`, each lane's sum starting at `−128·Σx` over its four activations. Q5_0 keeps its
//! nibbles and fifth bits (`qh`) per block of sixteen rows; the unsigned codes `w + 16` are
//! rebuilt per lane group (the fifth bits spread to bit 4 of each byte by one multiply), each
//! lane's sum starting at `−16·Σx`. Q4_1's codes are unsigned already (sums from zero); its
//! minimums add `fma(m, s8, summs)` per block, sixteen rows per vector, and the float lanes'
//! reduction then adds `summs`, as ggml's `hsum_float_8(acc) + summs`. Q5_1 is Q5_0's codes
//! without the offset (unsigned, sums from zero) and Q4_1's minimums.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::Q8Row;

const QK: usize = 32;

/// The layouts: Q8_0 (34-byte blocks), Q5_0 (22-byte blocks), Q4_1 (20-byte blocks) and
/// Q5_1 (24-byte blocks).
pub(crate) const Q8: u8 = 0;
pub(crate) const Q5: u8 = 1;
pub(crate) const Q41: u8 = 2;
pub(crate) const Q51: u8 = 3;

/// Whether layout `K` has a minimum per block (the `_1` types).
const fn has_min(k: u8) -> bool {
    k == Q41 || k == Q51
}

/// Whether layout `K` has fifth bits (`qh`) per block.
const fn has_qh(k: u8) -> bool {
    k == Q5 || k == Q51
}

/// Offset of the sixteen rows' `qh` words in a packed block (after the scales, and the
/// minimums for Q5_1).
const fn qh_at(k: u8) -> usize {
    if k == Q51 { 4 * ROWS } else { 2 * ROWS }
}

/// Offset of the quant words in a packed block.
const fn quants_at(k: u8) -> usize {
    2 * ROWS + if has_min(k) { 2 * ROWS } else { 0 } + if has_qh(k) { 4 * ROWS } else { 0 }
}

/// Bytes of one stored block of layout `K`.
const fn block(k: u8) -> usize {
    match k {
        Q8 => 34,
        Q5 => 22,
        Q41 => 20,
        _ => 24,
    }
}

/// Rows per packed group: one per 32-bit lane of a 512-bit vector.
pub(crate) const ROWS: usize = 16;

/// Bytes of one block of a packed group of layout `K`, as many as the sixteen stored blocks:
/// the sixteen rows' f16 scales, then
/// - Q8_0: for each group `l` of four weights the sixteen rows' four bytes, offset to unsigned;
/// - Q5_0: the sixteen rows' `qh` words, then for each of the four quant words the sixteen
///   rows' words (nibbles of elements `4k..4k+4` and `16+4k..16+4k+4`);
/// - Q4_1: the sixteen rows' f16 minimums, then the quant words as Q5_0's;
/// - Q5_1: the sixteen rows' f16 minimums, their `qh` words, then the quant words.
pub(crate) const fn packed(k: u8) -> usize {
    ROWS * block(k)
}

/// Sixteen rows of layout `K` and `nblocks` blocks each, interleaved into `out` as
/// [`packed`] says. Lossless: every byte moves (Q8_0's weights with their sign bit flipped).
pub(crate) fn pack<const K: u8>(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    if K == Q8 {
        crate::lut4::interleave16(rows, nblocks, block(Q8), 0x80, out);
        return;
    }
    // After the scale: Q5_0 its 4-byte `qh`, Q4_1 its 2-byte minimum, Q5_1 both.
    let head = if has_min(K) { 2 } else { 0 } + if has_qh(K) { 4 } else { 0 };
    for (b, dst) in out.chunks_exact_mut(packed(K)).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[b * block(K)..(b + 1) * block(K)];
            dst[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            let mut at = 2;
            if has_min(K) {
                dst[2 * ROWS + 2 * r..2 * ROWS + 2 * r + 2].copy_from_slice(&blk[at..at + 2]);
                at += 2;
            }
            if has_qh(K) {
                dst[qh_at(K) + 4 * r..qh_at(K) + 4 * r + 4].copy_from_slice(&blk[at..at + 4]);
            }
            for k in 0..4 {
                let at = quants_at(K) + k * 4 * ROWS + 4 * r;
                dst[at..at + 4].copy_from_slice(&blk[2 + head + 4 * k..6 + head + 4 * k]);
            }
        }
    }
}

/// Per block of a token row, per group `l` of four activations, `−c·Σx` (`c` = 128 for Q8_0,
/// 16 for Q5_0, 0 for Q4_1 and Q5_1): where lane `l`'s integer sum against the offset weights
/// starts.
pub(crate) fn offsets<const K: u8>(x: &Q8Row, nblocks: usize) -> Vec<i32> {
    let c = match K {
        Q8 => -128,
        Q5 => -16,
        _ => 0,
    };
    x.q.chunks_exact(4).take(8 * nblocks).map(|g| c * g.iter().map(|&v| i32::from(v)).sum::<i32>()).collect()
}

/// The eight lane groups of one packed block (`blk`) as unsigned bytes, sixteen rows each.
///
/// # Safety
/// The CPU features of [`gemm16`]; `blk` points at one whole packed block of layout `K`.
#[inline(always)]
unsafe fn weights<const K: u8>(blk: *const u8) -> [__m512i; 8] {
    // SAFETY (all reads): inside the block; the CPU features are the caller's.
    unsafe {
        let mut w = [_mm512_setzero_si512(); 8];
        if K == Q8 {
            for (l, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(blk.add(2 * ROWS + 64 * l).cast());
            }
            return w;
        }
        let low = _mm512_set1_epi8(0x0f);
        for k in 0..4 {
            let v = _mm512_loadu_si512(blk.add(quants_at(K) + 64 * k).cast());
            w[k] = _mm512_and_si512(v, low);
            w[4 + k] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
        }
        if !has_qh(K) {
            return w;
        }
        let qh = _mm512_loadu_si512(blk.add(qh_at(K)).cast());
        for (l, w) in w.iter_mut().enumerate() {
            // Bits 4l..4l+4 of each row's qh to bit 4 of its four bytes: the four bits times
            // 2^4 + 2^11 + 2^18 + 2^25 land apart (no carries), bit j at 8j + 4.
            let h = _mm512_and_si512(_mm512_srlv_epi32(qh, _mm512_set1_epi32(4 * l as i32)), _mm512_set1_epi32(0xf));
            let spread =
                _mm512_and_si512(_mm512_mullo_epi32(h, _mm512_set1_epi32(0x0204_0810)), _mm512_set1_epi32(0x1010_1010));
            *w = _mm512_or_si512(*w, spread);
        }
        w
    }
}

/// Token rows per call of [`gemm16`] (eight float accumulators each stay in registers).
pub(crate) const TOKENS: usize = 2;

/// One packed group (`pk`, `nblocks` blocks) against up to [`TOKENS`] token rows `xs` (with
/// their [`offsets`] `off`): `out[t][lane]` is row `lane` of the group dotted with token row
/// `t`, in the definition's order.
///
/// # Safety
/// The CPU must have what [`crate::lut4::ZMM`] checks; `pk` holds `nblocks` packed blocks,
/// and every token row and offset list at least `nblocks` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemm16<const K: u8, const N: usize>(
    pk: &[u8],
    nblocks: usize,
    xs: [&Q8Row; N],
    off: [&[i32]; N],
) -> [[f32; ROWS]; N] {
    const { assert!(N <= TOKENS) };
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    // Q4_1 and Q5_1: the minimums' share, `summs` of sixteen rows.
    let mut summs = [_mm512_setzero_ps(); N];
    let base = pk.as_ptr();
    for b in 0..nblocks {
        // SAFETY (all reads): inside block `b` of the group and of every token row.
        unsafe {
            let blk = base.add(b * packed(K));
            crate::x86::prefetch_ahead(blk, packed(K));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
            let w = weights::<K>(blk);
            if has_min(K) {
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2 * ROWS).cast()));
                for t in 0..N {
                    summs[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[t].scales.get_unchecked(b).1), summs[t]);
                }
            }
            for t in 0..N {
                let q = xs[t].q.as_ptr().add(b * QK).cast::<i32>();
                let o = off[t].as_ptr().add(8 * b);
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(xs[t].scales.get_unchecked(b).0));
                for l in 0..8 {
                    let lane = _mm512_dpbusd_epi32(
                        _mm512_set1_epi32(*o.add(l)),
                        w[l],
                        _mm512_set1_epi32(q.add(l).read_unaligned()),
                    );
                    acc[t][l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane), acc[t][l]);
                }
            }
        }
    }
    let mut out = [[0f32; ROWS]; N];
    for t in 0..N {
        let a = &acc[t];
        let r = [
            _mm512_add_ps(a[0], a[4]),
            _mm512_add_ps(a[1], a[5]),
            _mm512_add_ps(a[2], a[6]),
            _mm512_add_ps(a[3], a[7]),
        ];
        // `hsum_float_8`, then `+ summs` (the `_0` types' `+ 0`, which turns −0 into +0).
        let v = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[2]), _mm512_add_ps(r[1], r[3])), summs[t]);
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), v) };
    }
    out
}

#[cfg(test)]
mod tests {
    use kiln_ir::DType;
    use kiln_quant::ggml_dot::{self, Activations, RowGroup};

    use super::*;

    fn check<const K: u8>(dtype: DType) {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for k in [32usize, 96, 576] {
            let nblocks = k / QK;
            let rows: Vec<Vec<u8>> = (0..ROWS)
                .map(|_| {
                    let mut row: Vec<u8> = (0..nblocks * block(K)).map(|_| r() as u8).collect();
                    for blk in row.chunks_mut(block(K)) {
                        let d = (r() % 1000) as f32 * 1e-5 * if r() % 2 == 0 { 1.0 } else { -1.0 };
                        blk[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                        if has_min(K) {
                            let m = (r() % 1000) as f32 * -1e-5;
                            blk[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
                        }
                    }
                    row
                })
                .collect();
            let mut pk = vec![0u8; nblocks * packed(K)];
            pack::<K>(std::array::from_fn(|i| &rows[i][..]), nblocks, &mut pk);
            let xs: Vec<Q8Row> = (0..TOKENS)
                .map(|t| {
                    let x: Vec<f32> = (0..k).map(|i| ((i * 7919 + t * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect();
                    ggml_dot::quantize_q8(&x)
                })
                .collect();
            let offs: Vec<Vec<i32>> = xs.iter().map(|x| offsets::<K>(x, nblocks)).collect();
            // SAFETY: checked by the caller; sizes as built.
            let got = unsafe { gemm16::<K, TOKENS>(&pk, nblocks, [&xs[0], &xs[1]], [&offs[0][..], &offs[1][..]]) };
            // SAFETY: as above.
            let one = unsafe { gemm16::<K, 1>(&pk, nblocks, [&xs[1]], [&offs[1][..]]) };
            assert_eq!(one[0], got[1]);
            for t in 0..TOKENS {
                let a = Activations::Q8(Q8Row { scales: xs[t].scales.clone(), q: xs[t].q.clone() });
                for (lane, row) in rows.iter().enumerate() {
                    let want = ggml_dot::dot(dtype, row, &a, RowGroup::Gemv);
                    assert_eq!(got[t][lane].to_bits(), want.to_bits(), "{dtype} k={k} t={t} row={lane}");
                }
            }
        }
    }

    #[test]
    fn packed_kernels_equal_the_definition_bit_for_bit() {
        if !*crate::lut4::ZMM {
            return;
        }
        check::<Q8>(DType::Q8_0);
        check::<Q5>(DType::Q5_0);
        check::<Q41>(DType::Q4_1);
        check::<Q51>(DType::Q5_1);
    }
}
