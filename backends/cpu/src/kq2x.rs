//! kq2 weights repacked at session start for decode speed: the codebook lookup done once.
//!
//! A stored kq2 group is a 9-bit magnitude index, seven sign bits and a shift bit (see
//! `kiln_quant::kq2`), 17 bits for 8 weights. Decoding it means a lookup in the 512-entry
//! magnitude codebook, which costs the 512-bit decode kernel ([`crate::vnni::kq2_gemv`])
//! about 25 vector instructions per 64 weights: it runs at 14 Gweights/s per thread, far
//! below the memory bandwidth a 2.25-bit format would allow. The packed form stores the
//! lookup's result instead, per block of 64 weights:
//!
//! - each weight's signed magnitude `(−1)^σ·2A` (A ∈ {1, 3, 5, 7}) as a 3-bit code
//!   `t = ((−1)^σ·2A + 14) / 4` (24 bytes, the eight weights of a group in three bytes);
//! - the 8 groups' shift bits τ (the ±¼ of E8P: `4·c = (−1)^σ·2A + τ'`, τ' = ∓1; 1 byte);
//! - the block header (scale index and basis flag, 1 byte).
//!
//! That is 26 bytes per 64 weights (3.25 bits per weight in memory instead of 2.25, still
//! 28% less than Q4_K's 4.5). Decoding a row is half a `vpermb` (each group's three bytes
//! into its qword, two rows at once), a `vpmultishiftqb` (each weight's three bits into its
//! byte) and a `vpand`: `t`, an unsigned byte, whose `vpdpbusd` with the activation quants
//! needs no per-row sign work (the activations' own signs stand; the block integer is
//! `4·Σ t·q` plus the part below). On Zen 4 the shuffles, `vpdpbusd`, `vpmaddwd` and
//! `vpackssdw` of 512 bits each take about a cycle of the same two pipes, so the kernel is
//! written to count them: 26 → 40 Gweights/s per thread against the previous form (signs
//! and magnitudes apart, 2.25 + 1 bits: a `vpmultishiftqb`, a `vgf2p8affineqb` and masked
//! sign and shift fix-ups per row, and a transposing reduction by shuffles).
//!
//! The shift bits and the `−14` offset are the same for all weights of a group, so their
//! part of a row's block integer, `Σ_g τ'_g·Q_g − 14·Σq` (`Q_g` the sum of group g's quants), is a function of
//! the row's τ byte alone: [`ShiftSums`] tabulates it once per token row and block
//! (two 16-entry halves per basis, looked up for eight rows at once by `vpermi2d`).
//! The values are moved, not changed: results equal the stored-form kernels bit for bit.
//!
//! Rows are packed in groups of [`ROWS`] (eight: [`crate::vnni::kq2_gemm`]'s group, the
//! decode kernel's step), block by block: for each block the eight rows' codes (192 bytes),
//! shift bits (8) and headers (8), [`PACKED`] bytes.

use std::arch::x86_64::*;

use crate::vnni::{self, KQ2_GEMM_ROWS, Kq2Panel, Kq2Slot};
use crate::x86;

/// Rows per packed group.
pub(crate) const ROWS: usize = KQ2_GEMM_ROWS;
/// Packed bytes of one block of a group.
pub(crate) const PACKED: usize = ROWS * 26;
/// Offsets within a packed block: shift bits, headers (codes at 0, 24 bytes per row).
const TAUS: usize = 24 * ROWS;
const HEADERS: usize = TAUS + ROWS;

/// Packs `nblocks` blocks of eight stored kq2 rows into `out` ([`PACKED`] bytes per block).
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    let codes = &vnni::KQ2_ZMM_TABLES.codes;
    for (bi, o) in out.chunks_exact_mut(PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let b = &row[18 * bi..18 * bi + 18];
            let mut tau = 0u8;
            for g in 0..8 {
                let word = u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]);
                let index = usize::from(word & 0xff) | usize::from(b[1] >> g & 1) << 8;
                // Two bits per weight, (A − 1)/2.
                let code = u32::from(codes[index / 32][index % 32] as u16);
                // σ₀..σ₆ stored; σ₇ the parity of those and of P(i), the parity of the
                // codes' low bits (Σ A / 2 = Σ c + 4).
                let stored = u32::from(word >> 8) & 0x7f;
                let sigma = stored | ((stored.count_ones() + (code & 0x5555).count_ones()) & 1) << 7;
                // t = σ ? 3 − c : 4 + c, three bits per weight.
                let t = (0..8).fold(0u32, |t, i| {
                    let c = code >> (2 * i) & 3;
                    t | (if sigma >> i & 1 == 1 { 3 - c } else { 4 + c }) << (3 * i)
                });
                o[24 * r + 3 * g..24 * r + 3 * g + 3].copy_from_slice(&t.to_le_bytes()[..3]);
                tau |= ((word >> 15) as u8) << g;
            }
            o[TAUS + r] = tau;
            o[HEADERS + r] = b[0];
        }
    }
}

/// A token row's per-block table of the shift bits' and offset's part of a row's block
/// integer, `Σ_g τ'_g·Q_g − 14·Σq` over the quants of the row's basis (τ'_g = −1 where bit
/// g of its shift byte τ is set, else +1): for basis flag `U` (the header's bit 7) it is
/// `lo[16U + (τ & 15)]` plus `hi[16U + (τ >> 4)]`.
pub(crate) struct ShiftSums(Vec<[i32; 64]>);

impl ShiftSums {
    /// The table of a token row's kq2 activation quants (both bases of every block).
    pub(crate) fn new(q: &[i8]) -> ShiftSums {
        ShiftSums(
            q.as_chunks::<128>()
                .0
                .iter()
                .map(|b| {
                    let mut t = [0i32; 64];
                    // U = 1: the original basis (quants 0..64); U = 0: the rotated one.
                    for (u, base) in [(0usize, 64usize), (1, 0)] {
                        let sums: [i32; 8] = std::array::from_fn(|g| {
                            b[base + 8 * g..base + 8 * g + 8].iter().map(|&v| i32::from(v)).sum()
                        });
                        let total: i32 = sums.iter().sum();
                        for x in 0..16 {
                            let part =
                                |off: usize| -> i32 { (0..4).filter(|g| x >> g & 1 == 1).map(|g| sums[off + g]).sum() };
                            // Σ τ'Q = Σq − 2·Σ_{τ set} Q, so with −14·Σq: −13·Σq − 2·(…).
                            t[16 * u + x] = -13 * total - 2 * part(0);
                            t[32 + 16 * u + x] = -2 * part(4);
                        }
                    }
                    t
                })
                .collect(),
        )
    }
}

/// The decoder's constant vectors: the `vpermb` indices (qword k's bytes 0..3 group k's
/// three code bytes of the first row of a pair, bytes 3..6 those of the second) and the
/// two rows' `vpmultishiftqb` offsets (byte i of a qword its weight's three bits).
struct Decoder {
    place: __m512i,
    shifts: [__m512i; 2],
}

impl Decoder {
    /// # Safety
    /// The CPU must support AVX512F.
    #[inline(always)]
    unsafe fn new() -> Decoder {
        let place: [u8; 64] = std::array::from_fn(|j| {
            let (k, i) = (j / 8, (j % 8).min(5));
            (24 * (i / 3) + 3 * k + i % 3) as u8
        });
        let shifts = |row: usize| -> [u8; 64] { std::array::from_fn(|j| (24 * row + 3 * (j % 8)) as u8) };
        // SAFETY: 64-byte tables; the caller's CPU features.
        unsafe {
            let load = |t: [u8; 64]| _mm512_loadu_si512(t.as_ptr().cast());
            Decoder { place: load(place), shifts: [load(shifts(0)), load(shifts(1))] }
        }
    }

    /// The two rows whose 24 code bytes each are at `codes` (64 readable): their 64
    /// weights' `t = ((−1)^σ·2A + 14) / 4` as unsigned bytes, in order. One `vpermb` places
    /// both rows' groups; a `vpand` (which any vector pipe runs, where a `vgf2p8affineqb`
    /// could have made `4t` at once: Zen 4 has two pipes for that, already busy with
    /// `vpdpbusd`) keeps each weight's bits, the factor 4 applied to the block integers.
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW/VBMI; `codes` points at 64 readable bytes.
    #[inline(always)]
    unsafe fn pair(&self, codes: *const u8) -> [__m512i; 2] {
        // SAFETY: the caller's CPU features and 64 bytes.
        unsafe {
            let v = _mm512_permutexvar_epi8(self.place, _mm512_loadu_si512(codes.cast()));
            self.shifts.map(|s| _mm512_and_si512(_mm512_multishift_epi64_epi8(s, v), _mm512_set1_epi8(7)))
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

/// Eight rows' 16 lane sums `d` (each within ±2¹³) reduced to one exact integer each, row
/// `r` in lane `r`: pairs narrowed to 16 bits and added by `vpmaddwd` twice, then the four
/// 128-bit lanes added.
///
/// # Safety
/// The CPU must support AVX512F/BW/VL.
#[inline(always)]
unsafe fn reduce8(d: [__m512i; 8]) -> __m256i {
    // SAFETY: the caller's CPU features.
    unsafe {
        let ones = _mm512_set1_epi16(1);
        // Per 128-bit lane: [a0+a1, a2+a3, b0+b1, b2+b3] of rows a, b.
        let m: [__m512i; 4] =
            std::array::from_fn(|i| _mm512_madd_epi16(_mm512_packs_epi32(d[2 * i], d[2 * i + 1]), ones));
        // Per 128-bit lane: rows 4h..4h + 4's sums over the lane.
        let v0 = _mm512_madd_epi16(_mm512_packs_epi32(m[0], m[1]), ones);
        let v1 = _mm512_madd_epi16(_mm512_packs_epi32(m[2], m[3]), ones);
        // [v0 lanes 0+2, 1+3, v1 lanes 0+2, 1+3], then the halves' two lanes added.
        let u = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b01_00_01_00>(v0, v1),
            _mm512_shuffle_i32x4::<0b11_10_11_10>(v0, v1),
        );
        let (lo, hi) = (_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64::<1>(u));
        _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(lo, hi), _mm256_permute2x128_si256::<0x31>(lo, hi))
    }
}

/// Decode with a packed group: the eight rows' dots with a token row whose activation
/// quants are `q`, their [`ShiftSums`] `taus` and scales `d`, as `x86::dot_kq2_tile` takes
/// them (per block one exact integer and `fma(isum, ¼·(s·d), acc)`), bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, BMI2, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`vnni::KQ2_ZMM`]); `pk` holds `nblocks` packed blocks, `q`, `taus` and `d` at least as
/// many.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemv(pk: &[u8], nblocks: usize, q: &[i8], taus: &ShiftSums, d: &[[f32; 2]]) -> [f32; ROWS] {
    // SAFETY: reads within `nblocks` packed blocks and the activations' blocks; the CPU
    // features are this function's.
    unsafe {
        let dec = Decoder::new();
        let table = ScaleTable::new();
        let quarter = _mm256_set1_ps(0.25);
        let (q0, d0, t0) = (q.as_ptr(), d.as_ptr().cast::<f32>(), taus.0.as_ptr().cast::<i32>());
        let mut acc = _mm256_setzero_ps();
        for bi in 0..nblocks {
            let p = pk.as_ptr().add(bi * PACKED);
            for off in (0..PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(x86::PREFETCH + off).cast());
            }
            let qb = q0.add(128 * bi);
            let hdrs = p.add(HEADERS).cast::<u64>().read_unaligned();
            let mut dots = [_mm512_setzero_si512(); ROWS];
            for (pair, dots) in dots.as_chunks_mut::<2>().0.iter_mut().enumerate() {
                let w = dec.pair(p.add(48 * pair));
                for ((dot, w), r) in dots.iter_mut().zip(w).zip(2 * pair..) {
                    // The rotated quants follow the original ones.
                    let q = _mm512_loadu_si512(qb.add(((!hdrs >> (8 * r + 7)) & 1) as usize * 64).cast());
                    *dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, q);
                }
            }
            // The eight rows' float factors ¼·(s·d) at once: each row's scale (looked up in
            // the 128-entry table held in registers, a gather is slow on Zen 4) and the
            // scale of its basis's activations.
            let hv = _mm_cvtsi64_si128(hdrs as i64);
            let h32 = _mm512_cvtepu8_epi32(hv);
            let s = table.lookup(h32);
            // Bit 7 of a header: the block is stored unrotated (its basis is the original).
            let unrotated = _mm_movepi8_mask(hv) as u8;
            let d =
                _mm256_mask_blend_ps(unrotated, _mm256_set1_ps(*d0.add(2 * bi + 1)), _mm256_set1_ps(*d0.add(2 * bi)));
            let f = _mm256_mul_ps(quarter, _mm256_mul_ps(s, d));
            let live = _mm256_cmp_ps_mask::<_CMP_NEQ_UQ>(s, _mm256_setzero_ps());
            // The shift bits' part: 16·U + each half of τ into the block's tables.
            let u16 = _mm512_and_si512(_mm512_srli_epi32::<3>(h32), _mm512_set1_epi32(16));
            let tau = _mm512_cvtepu8_epi32(_mm_cvtsi64_si128(p.add(TAUS).cast::<i64>().read_unaligned()));
            let lo = _mm512_add_epi32(u16, _mm512_and_si512(tau, _mm512_set1_epi32(15)));
            let hi = _mm512_add_epi32(u16, _mm512_srli_epi32::<4>(tau));
            let tb = t0.add(64 * bi);
            let shift = _mm512_add_epi32(
                _mm512_permutex2var_epi32(_mm512_loadu_si512(tb.cast()), lo, _mm512_loadu_si512(tb.add(16).cast())),
                _mm512_permutex2var_epi32(
                    _mm512_loadu_si512(tb.add(32).cast()),
                    hi,
                    _mm512_loadu_si512(tb.add(48).cast()),
                ),
            );
            let isum = _mm256_add_epi32(_mm256_slli_epi32::<2>(reduce8(dots)), _mm512_castsi512_si256(shift));
            acc = _mm256_mask3_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc, live);
        }
        let mut out = [0f32; ROWS];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
    }
}

/// Prefill with a packed group: `tile[t·nb + j0 + r]` for its eight rows and every token row
/// of `panel`, as [`vnni::kq2_gemm`] computes them (its slots filled from the packed form).
///
/// # Safety
/// As [`gemv`]; `nblocks ≤ panel.nblocks`; `tile` holds `panel`'s token rows × `nb ≥ j0 + 8`
/// values.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemm(pk: &[u8], nblocks: usize, panel: &Kq2Panel, tile: &mut [f32], nb: usize, j0: usize) {
    let scales = &x86::KQ2_TABLES.scale;
    let mut slots = vec![Kq2Slot::EMPTY; nblocks];
    let at = Kq2Slot::order(&mut slots, ROWS, |r, bi| pk[bi * PACKED + HEADERS + r]);
    // SAFETY: reads within `nblocks` packed blocks; the CPU features are this function's.
    unsafe {
        let dec = Decoder::new();
        for (bi, (slot, at)) in slots.iter_mut().zip(&at).enumerate() {
            let p = pk.as_ptr().add(bi * PACKED);
            for (row, &e) in at.iter().enumerate() {
                let (hdr, tau) = (*p.add(HEADERS + row), *p.add(TAUS + row));
                let s = scales[usize::from(hdr & 0x7f)];
                slot.put_signed(usize::from(e), s, || {
                    // 4·c = 4t − 14 + τ': 4t − 13, less 2 in the groups whose τ is set.
                    let t = dec.pair(p.add(48 * (row / 2)))[row % 2];
                    let w = _mm512_sub_epi8(_mm512_slli_epi16::<2>(t), _mm512_set1_epi8(13));
                    let set = _pdep_u64(u64::from(tau), 0x0101_0101_0101_0101).wrapping_mul(0xff);
                    _mm512_mask_sub_epi8(w, set, w, _mm512_set1_epi8(2))
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
                let got = unsafe { gemv(&pk, blocks, &x.q, &ShiftSums::new(&x.q), &x.d) };
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
