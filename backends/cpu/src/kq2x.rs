//! kq2 weights repacked at session start for decode speed: the codebook lookup done once.
//!
//! A stored kq2 group is a 9-bit magnitude index, seven sign bits and a shift bit (see
//! `kiln_quant::kq2`), 17 bits for 8 weights. Decoding it means a lookup in the 512-entry
//! magnitude codebook, which costs the 512-bit decode kernel ([`crate::vnni::kq2_gemv`])
//! about 25 vector instructions per 64 weights: it runs at 14 Gweights/s per thread, far
//! below the memory bandwidth a 2.25-bit format would allow. The packed form stores the
//! lookup's result instead, per block of 64 weights:
//!
//! - the 8 groups' magnitude codes, 2 bits per weight (`(A − 1)/2`, 16 bytes);
//! - every weight's sign σ, the eighth of each group resolved from its parity rule (8 bytes);
//! - the block header (scale index and basis flag) and the 8 groups' shift bits (2 bytes).
//!
//! That is 26 bytes per 64 weights (3.25 bits per weight in memory instead of 2.25, still
//! 28% less than Q4_K's 4.5), and decoding becomes a broadcast load, a `vpmultishiftqb`, a
//! `vgf2p8affineqb` and two masked subtractions (about 40% of the instructions of the
//! lookup). The values are moved, not changed: results equal the stored-form kernels bit
//! for bit.
//!
//! The weights come out of the decoder in a permuted order of their groups: a row's 16
//! code bytes are loaded into every 128-bit lane, so qword `k` of the vector (whose bytes
//! `vpmultishiftqb` can only fill from that qword) holds groups 0–3 for even `k` and 4–7
//! for odd `k`, and decodes group [`group_of`]`(k)`. The signs and shift bits are stored in
//! that order, and the decode kernel reads activations permuted alike ([`permute`], once
//! per token row); the prefill kernel puts the weights back in order (one `vpermq`).
//!
//! Rows are packed in groups of [`ROWS`] (eight: [`crate::vnni::kq2_gemm`]'s group, two of
//! the decode kernel's four-row steps), block by block: for each block the eight rows'
//! codes (128 bytes), signs (64), headers (8) and shift bits (8), [`PACKED`] bytes.

use std::arch::x86_64::*;

use crate::vnni::{self, KQ2_GEMM_ROWS, Kq2Panel, Kq2Slot};
use crate::x86;

/// Rows per packed group.
pub(crate) const ROWS: usize = KQ2_GEMM_ROWS;
/// Packed bytes of one block of a group.
pub(crate) const PACKED: usize = ROWS * 26;
/// Offsets within a packed block: signs, headers, shift bits (codes at 0).
const SIGNS: usize = 16 * ROWS;
const HEADERS: usize = SIGNS + 8 * ROWS;
const SHIFTS: usize = HEADERS + ROWS;

/// The group decoded into qword `k` of a row's weight vector.
pub(crate) const fn group_of(k: usize) -> usize {
    (k >> 1) + 4 * (k & 1)
}

/// Packs `nblocks` blocks of eight stored kq2 rows into `out` ([`PACKED`] bytes per block).
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    let codes = &vnni::KQ2_ZMM_TABLES.codes;
    for (bi, o) in out.chunks_exact_mut(PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let b = &row[18 * bi..18 * bi + 18];
            let (mut sigma, mut tau) = ([0u8; 8], 0u8);
            for (k, sk) in sigma.iter_mut().enumerate() {
                let g = group_of(k);
                let word = u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]);
                let index = usize::from(word & 0xff) | usize::from(b[1] >> g & 1) << 8;
                let code = codes[index / 32][index % 32] as u16;
                o[16 * r + 2 * g..16 * r + 2 * g + 2].copy_from_slice(&code.to_le_bytes());
                // σ₀..σ₆ stored; σ₇ the parity of those and of P(i), the parity of the
                // codes' low bits (Σ A / 2 = Σ c + 4).
                let stored = (word >> 8) & 0x7f;
                let parity = (stored.count_ones() + (code & 0x5555).count_ones()) & 1;
                *sk = (stored | (parity as u16) << 7) as u8;
                tau |= ((word >> 15) as u8) << k;
            }
            o[SIGNS + 8 * r..SIGNS + 8 * r + 8].copy_from_slice(&sigma);
            o[HEADERS + r] = b[0];
            o[SHIFTS + r] = tau;
        }
    }
}

/// A token row's kq2 activation quants (both bases of every block) with the groups of each
/// 64 in the decoder's order ([`group_of`]), for [`gemv`].
pub(crate) fn permute(q: &[i8]) -> Vec<i8> {
    let mut out = vec![0i8; q.len()];
    for (src, dst) in q.as_chunks::<64>().0.iter().zip(out.as_chunks_mut::<64>().0) {
        for k in 0..8 {
            let g = group_of(k);
            dst[8 * k..8 * k + 8].copy_from_slice(&src[8 * g..8 * g + 8]);
        }
    }
    out
}

/// The decoder's constant vectors: the `vpmultishiftqb` offsets (byte `i` of qword `k`
/// reads the two code bits of weight `i` of group [`group_of`]`(k)`, whose 16 bits start at
/// bit `16·(k >> 1)` of the qword) and the magnitude matrix.
struct Decoder {
    shifts: __m512i,
    mag: __m512i,
}

impl Decoder {
    /// # Safety
    /// The CPU must support AVX512F.
    #[inline(always)]
    unsafe fn new() -> Decoder {
        let shifts: [u8; 64] = std::array::from_fn(|j| (16 * ((j / 8) >> 1) + 2 * (j % 8)) as u8);
        // SAFETY: a 64-byte table; the caller's CPU features.
        unsafe {
            Decoder { shifts: _mm512_loadu_si512(shifts.as_ptr().cast()), mag: _mm512_set1_epi64(vnni::KQ2_GF_MAG) }
        }
    }

    /// The row whose 16 code bytes are at `codes`, with its (permuted) signs `sigma` and
    /// shift bits `tau`: its 64 weights' magnitudes `|4·c|` as bytes, in the decoder's
    /// order, and their signs σ (set: negative). `|4·c| = 2A + 1` where σ = τ, else `2A − 1`.
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW/VBMI, BMI2 and GFNI; `codes` points at 16 bytes.
    #[inline(always)]
    unsafe fn weights(&self, codes: *const u8, sigma: u64, tau: u8) -> (__m512i, __mmask64) {
        // SAFETY: the caller's CPU features and 16 bytes.
        unsafe {
            let v = _mm512_broadcast_i32x4(_mm_loadu_si128(codes.cast()));
            let m = _mm512_gf2p8affine_epi64_epi8::<3>(_mm512_multishift_epi64_epi8(self.shifts, v), self.mag);
            let flip = sigma ^ _pdep_u64(u64::from(tau), 0x0101_0101_0101_0101).wrapping_mul(0xff);
            (_mm512_mask_sub_epi8(m, flip, m, _mm512_set1_epi8(2)), sigma)
        }
    }
}

/// kq2's 128 block scales in eight registers.
struct ScaleTable([__m512; 8]);

impl ScaleTable {
    /// # Safety
    /// The CPU must support AVX512F.
    #[inline(always)]
    unsafe fn new() -> ScaleTable {
        let scales = &x86::KQ2_TABLES.scale;
        // SAFETY: 16 of the 128 floats each; the caller's CPU features.
        ScaleTable(std::array::from_fn(|i| unsafe { _mm512_loadu_ps(scales.as_ptr().add(16 * i)) }))
    }

    /// The scales of the header bytes in the low eight lanes of `hdr` (bit 7, the basis
    /// flag, ignored): `vpermi2ps` within each 32 entries, blends on bits 5 and 6.
    ///
    /// # Safety
    /// The CPU must support AVX512F.
    #[inline(always)]
    unsafe fn lookup(&self, hdr: __m512i) -> __m256 {
        // SAFETY: the caller's CPU features.
        unsafe {
            let t = &self.0;
            let q: [__m512; 4] = std::array::from_fn(|i| _mm512_permutex2var_ps(t[2 * i], hdr, t[2 * i + 1]));
            let b5 = _mm512_test_epi32_mask(hdr, _mm512_set1_epi32(0x20));
            let b6 = _mm512_test_epi32_mask(hdr, _mm512_set1_epi32(0x40));
            let lo = _mm512_mask_blend_ps(b5, q[0], q[1]);
            let hi = _mm512_mask_blend_ps(b5, q[2], q[3]);
            _mm512_castps512_ps256(_mm512_mask_blend_ps(b6, lo, hi))
        }
    }
}

/// Decode with a packed group: the eight rows' dots with a token row whose activation
/// quants `q` are [`permute`]d and whose scales are `d`, as `x86::dot_kq2_tile` takes them
/// (per block one exact integer and `fma(isum, ¼·(s·d), acc)`), bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, BMI2, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`vnni::KQ2_ZMM`]); `pk` holds `nblocks` packed blocks, `q` and `d` at least as many.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemv(pk: &[u8], nblocks: usize, q: &[i8], d: &[[f32; 2]]) -> [f32; ROWS] {
    // SAFETY: reads within `nblocks` packed blocks and the activations' blocks; the CPU
    // features are this function's.
    unsafe {
        let dec = Decoder::new();
        let table = ScaleTable::new();
        let zero = _mm512_setzero_si512();
        let quarter = _mm256_set1_ps(0.25);
        let (q0, d0) = (q.as_ptr(), d.as_ptr().cast::<f32>());
        let mut acc = [_mm512_setzero_ps(); 2];
        for bi in 0..nblocks {
            let p = pk.as_ptr().add(bi * PACKED);
            for off in (0..PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(x86::PREFETCH + off).cast());
            }
            // The eight rows' float factors ¼·(s·d) at once: each row's scale (looked up in
            // the 128-entry table held in registers, a gather is slow on Zen 4) and the
            // scale of its basis's activations.
            let hdrs = p.add(HEADERS).cast::<u64>().read_unaligned();
            let hv = _mm_cvtsi64_si128(hdrs as i64);
            let s = table.lookup(_mm512_cvtepu8_epi32(hv));
            // Bit 7 of a header: the block is stored unrotated (its basis is the original).
            let unrotated = _mm_movepi8_mask(hv) as u8;
            let d =
                _mm256_mask_blend_ps(unrotated, _mm256_set1_ps(*d0.add(2 * bi + 1)), _mm256_set1_ps(*d0.add(2 * bi)));
            let f = _mm256_mul_ps(quarter, _mm256_mul_ps(s, d));
            let live = _mm256_cmp_ps_mask::<_CMP_NEQ_UQ>(s, _mm256_setzero_ps());
            let qb = q0.add(128 * bi);
            for (h, acc) in acc.iter_mut().enumerate() {
                let mut dots = [zero; 4];
                for (r, dot) in dots.iter_mut().enumerate() {
                    let row = 4 * h + r;
                    let sigma = p.add(SIGNS + 8 * row).cast::<u64>().read_unaligned();
                    let (w, sigma) = dec.weights(p.add(16 * row), sigma, *p.add(SHIFTS + row));
                    // The rotated quants follow the original ones.
                    let q = _mm512_loadu_si512(qb.add(((!hdrs >> (8 * row + 7)) & 1) as usize * 64).cast());
                    *dot = _mm512_dpbusd_epi32(zero, w, _mm512_mask_sub_epi8(q, sigma, zero, q));
                }
                // Rows 4h..4h + 4's factors in every 128-bit lane.
                let fh = _mm512_broadcast_f32x4(if h == 0 {
                    _mm256_castps256_ps128(f)
                } else {
                    _mm256_extractf128_ps::<1>(f)
                });
                let lh = u16::from(live >> (4 * h) & 0xf) * 0x1111;
                *acc = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(vnni::kq2_reduce4(dots)), fh, *acc, lh);
            }
        }
        let mut out = [0f32; ROWS];
        _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(acc[0]));
        _mm_storeu_ps(out.as_mut_ptr().add(4), _mm512_castps512_ps128(acc[1]));
        out
    }
}

/// Prefill with a packed group: `tile[t·nb + j0 + r]` for its eight rows and every token row
/// of `panel`, as [`vnni::kq2_gemm`] computes them (its slots filled from the packed form,
/// each row's weights put back in order).
///
/// # Safety
/// As [`gemv`]; `nblocks ≤ panel.nblocks`; `tile` holds `panel`'s token rows × `nb ≥ j0 + 8`
/// values.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemm(pk: &[u8], nblocks: usize, panel: &Kq2Panel, tile: &mut [f32], nb: usize, j0: usize) {
    let scales = &x86::KQ2_TABLES.scale;
    let mut slots = vec![Kq2Slot::EMPTY; nblocks];
    let at = Kq2Slot::order(&mut slots, ROWS, |r, bi| pk[bi * PACKED + HEADERS + r]);
    // Qword g of a row in order is qword k of the decoder's, group_of(k) = g.
    let order: [i64; 8] = std::array::from_fn(|g| (0..8).position(|k| group_of(k) == g).unwrap_or(0) as i64);
    // SAFETY: reads within `nblocks` packed blocks; the CPU features are this function's.
    unsafe {
        let dec = Decoder::new();
        let order = _mm512_loadu_si512(order.as_ptr().cast());
        for (bi, (slot, at)) in slots.iter_mut().zip(&at).enumerate() {
            let p = pk.as_ptr().add(bi * PACKED);
            for (row, &e) in at.iter().enumerate() {
                let sigma = p.add(SIGNS + 8 * row).cast::<u64>().read_unaligned();
                let (hdr, tau) = (*p.add(HEADERS + row), *p.add(SHIFTS + row));
                let s = scales[usize::from(hdr & 0x7f)];
                slot.put_signed(usize::from(e), s, || {
                    let (m, sigma) = dec.weights(p.add(16 * row), sigma, tau);
                    _mm512_permutexvar_epi64(order, _mm512_mask_sub_epi8(m, sigma, _mm512_setzero_si512(), m))
                });
            }
        }
        vnni::kq2_slots_gemm(&slots, ROWS, panel, tile, nb, j0);
    }
}

#[cfg(test)]
mod tests {
    use kiln_quant::kq2::Kq2Q8Row;

    use super::*;
    use crate::vnni::tests::{activations, kq2_rows_for_test};
    use crate::x86::tests::rng;

    fn available() -> bool {
        *vnni::KQ2_ZMM && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("bmi2")
    }

    /// Eight stored rows of `blocks` blocks (random bytes, every index, sign, shift, basis
    /// and scale with zero-scale blocks, or quantized weights) and `tokens` activation rows.
    fn case(seed: u64, blocks: usize, tokens: usize) -> (Vec<u8>, Vec<Kq2Q8Row>) {
        let mut r = rng(seed);
        let rows = kq2_rows_for_test(&mut r, seed.is_multiple_of(2), ROWS, blocks);
        let xs = activations(&mut r, tokens, 64 * blocks, (13, -4.0), kiln_quant::kq2::quantize_kq2_q8);
        (rows, xs)
    }

    fn packed(rows: &[u8], blocks: usize) -> Vec<u8> {
        let mut pk = vec![0u8; blocks * PACKED];
        pack(std::array::from_fn(|r| &rows[r * blocks * 18..(r + 1) * blocks * 18]), blocks, &mut pk);
        pk
    }

    /// The packed decode kernel equals the stored-form AVX2 kernel bit for bit.
    #[test]
    fn packed_gemv_equals_the_stored_kernel_bit_for_bit() {
        if !available() {
            return;
        }
        for seed in 0..6u64 {
            let blocks = 1 + seed as usize * 3;
            let (rows, xs) = case(seed, blocks, 3);
            let pk = packed(&rows, blocks);
            for x in &xs {
                // SAFETY: checked above; `blocks` packed blocks and activation blocks.
                let got = unsafe { gemv(&pk, blocks, &permute(&x.q), &x.d) };
                for (j, g) in got.iter().enumerate() {
                    // SAFETY: as above.
                    let want = unsafe { x86::dot_kq2_tile(&rows[j * blocks * 18..(j + 1) * blocks * 18], [x]) }[0];
                    assert_eq!(g.to_bits(), want.to_bits(), "seed {seed} row {j}: {g} vs {want}");
                }
            }
        }
    }

    /// The packed prefill kernel equals the stored-form AVX2 kernel bit for bit.
    #[test]
    fn packed_gemm_equals_the_stored_kernel_bit_for_bit() {
        if !available() {
            return;
        }
        for seed in 0..4u64 {
            let (blocks, tokens) = (1 + seed as usize * 2, [8, 33, 40, 64][seed as usize]);
            let (rows, xs) = case(seed + 17, blocks, tokens);
            let pk = packed(&rows, blocks);
            let refs: Vec<&Kq2Q8Row> = xs.iter().collect();
            let panel = Kq2Panel::build(&refs);
            let mut got = vec![f32::NAN; tokens * ROWS];
            // SAFETY: checked above; the panel and tile are as wide.
            unsafe { gemm(&pk, blocks, &panel, &mut got, ROWS, 0) };
            for (t, x) in xs.iter().enumerate() {
                for j in 0..ROWS {
                    // SAFETY: as above.
                    let want = unsafe { x86::dot_kq2_tile(&rows[j * blocks * 18..(j + 1) * blocks * 18], [x]) }[0];
                    let g = got[t * ROWS + j];
                    assert_eq!(g.to_bits(), want.to_bits(), "seed {seed} row {j} token {t}: {g} vs {want}");
                }
            }
        }
    }
}
