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
//! 28% less than Q4_K's 4.5).
//!
//! The decode kernel works on the eight rows of a group at once, one group of 8 weights of
//! each row per step: qword r of a step's vector is row r's group s. Decoding a step is half
//! a `vpermb` (each row's three code bytes into its qword, two steps at once), a
//! `vpmultishiftqb` (each weight's three bits into bits 2..5 of its byte), a `vpternlogd`
//! (those bits, and bit 1 set: `4t + 2`) and a masked `vpxorq` (bit 1 cleared in the rows
//! whose group s has its shift bit set): `4c + 15`, an unsigned byte, whose `vpdpbusd` meets
//! group s's activation quants broadcast to every qword (the rotated ones where a row's
//! block is stored rotated: a masked broadcast load). No per-row sign work (the
//! activations' own signs stand), and no reduction across vector lanes: a row's sum is its
//! qword's two dwords, less `15·Σq` of its basis (a per-token sum per block and basis,
//! [`BlockSums`]). On Zen 4 the 512-bit shuffles, `vpdpbusd` and `vpermi2ps` each take
//! about a cycle of the same two pipes while logic ops run on any, so the kernel is written
//! to count the former, and the block scales are computed in 256-bit lanes instead of
//! looked up ([`Scales`]): 26 → 46 Gweights/s per thread against the previous form (signs
//! and magnitudes apart, 2.25 + 1 bits: a `vpmultishiftqb`, a `vgf2p8affineqb` and masked
//! sign and shift fix-ups per row, a transposing reduction by shuffles and a 128-entry
//! scale table in registers).
//!
//! The shift bits were once a per-token table (`Σ_g τ'_g·Q_g` for each τ byte, 256 bytes
//! per block, looked up by two `vpermi2d`). For a feed-forward down projection's 8960-wide
//! rows that table and the quants (54 KiB) overflowed L1 beside the weight stream, and
//! read from memory those rows decoded at two thirds of the speed of short ones; with the
//! shift applied per step the activations take 144 bytes per block and long rows stream
//! like short ones. The values are moved, not changed: results equal the stored-form
//! kernels bit for bit.
//!
//! Rows are packed in groups of [`ROWS`] (eight: [`crate::vnni::kq2_gemm`]'s group and the
//! decode kernel's), block by block: for each block the eight steps' codes (24 bytes each,
//! row r's group s at `24s + 3r`), the shift bits transposed (byte s: bit r is row r's
//! shift bit of group s) and the rows' headers (8), [`PACKED`] bytes.

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
        let mut t = [[0u8; 64]; ROWS];
        o[TAUS..TAUS + ROWS].fill(0);
        for (r, row) in rows.iter().enumerate() {
            let b = &row[18 * bi..18 * bi + 18];
            let mut tau = 0u8;
            for g in 0..8 {
                let word = u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]);
                let index = usize::from(word & 0xff) | usize::from(b[1] >> g & 1) << 8;
                // Two bits per weight, (A − 1)/2.
                let code = codes[index / 32][index % 32] as u16;
                // σ₀..σ₆ stored; σ₇ the parity of those and of P(i), the parity of the
                // codes' low bits (Σ A / 2 = Σ c + 4).
                let stored = (word >> 8) & 0x7f;
                let sigma = stored | (((stored.count_ones() + (code & 0x5555).count_ones()) & 1) as u16) << 7;
                for i in 0..8 {
                    // t = σ ? 3 − c : 4 + c.
                    let c = (code >> (2 * i) & 3) as u8;
                    t[r][8 * g + i] = if sigma >> i & 1 == 1 { 3 - c } else { 4 + c };
                }
                tau |= ((word >> 15) as u8) << g;
            }
            // Transposed: byte s holds the eight rows' shift bits of group s (bit r: row r).
            for g in 0..8 {
                o[TAUS + g] |= (tau >> g & 1) << r;
            }
            o[HEADERS + r] = b[0];
        }
        // Step s: group s of each row, row r's in qword r.
        for s in 0..8 {
            for (r, t) in t.iter().enumerate() {
                let bits = (0..8).fold(0u32, |acc, i| acc | u32::from(t[8 * s + i]) << (3 * i));
                o[24 * s + 3 * r..24 * s + 3 * r + 3].copy_from_slice(&bits.to_le_bytes()[..3]);
            }
        }
    }
}

/// A token row's sums of its kq2 activation quants per block and basis, `[original
/// (quants 0..64), rotated (64..128)]`: the decode kernel's weight bytes are `4·c + 15`, so
/// a row's block integer is its dot with the quants less `15·Σq` of its basis.
pub(crate) struct BlockSums(Vec<[i32; 2]>);

impl BlockSums {
    /// The sums of a token row's kq2 activation quants (both bases of every block).
    pub(crate) fn new(q: &[i8]) -> BlockSums {
        BlockSums(
            q.as_chunks::<128>()
                .0
                .iter()
                .map(|b| {
                    let sum = |h: &[i8]| h.iter().map(|&v| i32::from(v)).sum::<i32>();
                    [sum(&b[..64]), sum(&b[64..])]
                })
                .collect(),
        )
    }
}

/// The decoder's constant vectors: the `vpermb` indices (qword k's bytes 0..3 the three
/// code bytes at `3k` of the first step of a pair, bytes 3..6 those of the second) and the
/// two steps' `vpmultishiftqb` offsets (byte i of a qword: its weight's three bits at bits
/// 2..5, the window starting two bits early, rotating within the qword).
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
        let shifts = |row: usize| -> [u8; 64] { std::array::from_fn(|j| ((24 * row + 3 * (j % 8) + 62) % 64) as u8) };
        // SAFETY: 64-byte tables; the caller's CPU features.
        unsafe {
            let load = |t: [u8; 64]| _mm512_loadu_si512(t.as_ptr().cast());
            Decoder { place: load(place), shifts: [load(shifts(0)), load(shifts(1))] }
        }
    }

    /// The two steps whose 24 code bytes each are at `codes` (64 readable): their 64
    /// weights' `4t + 2` (`t = ((−1)^σ·2A + 14) / 4`) as unsigned bytes (qword r: row r's
    /// group). One `vpermb` places both steps' codes, a `vpmultishiftqb` puts each weight's
    /// three bits at bits 2..5 of its byte and one `vpternlogd` (which any vector pipe runs,
    /// unlike the shuffles and `vpdpbusd`) keeps them and sets bit 1: `4t + 2 = 4c + 16 − τ'`
    /// for a group whose shift τ' is +1 (bit 1 cleared where it is −1: `4c + 15` either way).
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW/VBMI; `codes` points at 64 readable bytes.
    #[inline(always)]
    unsafe fn pair(&self, codes: *const u8) -> [__m512i; 2] {
        // SAFETY: the caller's CPU features and 64 bytes.
        unsafe {
            let v = _mm512_permutexvar_epi8(self.place, _mm512_loadu_si512(codes.cast()));
            self.shifts.map(|s| {
                // (x & 0x1c) | 0x02.
                _mm512_ternarylogic_epi32::<0xea>(
                    _mm512_multishift_epi64_epi8(s, v),
                    _mm512_set1_epi8(0x1c),
                    _mm512_set1_epi8(0x02),
                )
            })
        }
    }
}

/// kq2's block scales computed, not looked up: `scale(k) = M[(k − 1) mod 5]·2^(⌊(k − 1)/5⌋ −
/// 17)` (`kiln_quant::kq2`), the five mantissas with their 2⁻¹⁷ in one register, the
/// exponent added to the float's bits. A 128-entry table lookup for eight rows took four
/// `vpermi2ps` of 512 bits and their blends, about 1.5 cycles per row of the decode kernel.
struct Scales(__m256);

impl Scales {
    /// # Safety
    /// The CPU must support AVX.
    #[inline(always)]
    unsafe fn new() -> Scales {
        let t = &x86::KQ2_TABLES.scale;
        // SAFETY: the caller's CPU features.
        Scales(unsafe { _mm256_setr_ps(t[1], t[2], t[3], t[4], t[5], 0.0, 0.0, 0.0) })
    }

    /// The scales of the header bytes in the eight lanes of `hdr` (bit 7, the basis flag,
    /// ignored) and which are not zero (`k ≠ 0`; the scale of those lanes is not defined).
    ///
    /// # Safety
    /// The CPU must support AVX2 and AVX512F/VL.
    #[inline(always)]
    unsafe fn of(&self, hdr: __m256i) -> (__m256, __mmask8) {
        // SAFETY: the caller's CPU features.
        unsafe {
            let k = _mm256_and_si256(hdr, _mm256_set1_epi32(0x7f));
            let live = _mm256_test_epi32_mask(k, k);
            let x = _mm256_max_epi32(_mm256_sub_epi32(k, _mm256_set1_epi32(1)), _mm256_setzero_si256());
            // ⌊x/5⌋ = (205·x) >> 10 for x < 1024; the product fits the low 16 bits.
            let e = _mm256_srli_epi32::<10>(_mm256_mullo_epi16(x, _mm256_set1_epi32(205)));
            let r = _mm256_sub_epi32(x, _mm256_add_epi32(_mm256_slli_epi32::<2>(e), e));
            let m = _mm256_permutevar8x32_ps(self.0, r);
            (_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(m), _mm256_slli_epi32::<23>(e))), live)
        }
    }
}

/// Decode with a packed group: the eight rows' dots with a token row whose activation
/// quants are `q`, their [`BlockSums`] `sums` and scales `d`, as `x86::dot_kq2_tile` takes
/// them (per block one exact integer and `fma(isum, ¼·(s·d), acc)`), bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, BMI2, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`vnni::KQ2_ZMM`]); `pk` holds `nblocks` packed blocks, `q`, `taus` and `d` at least as
/// many.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemv(pk: &[u8], nblocks: usize, q: &[i8], sums: &BlockSums, d: &[[f32; 2]]) -> [f32; ROWS] {
    // SAFETY: reads within `nblocks` packed blocks and the activations' blocks; the CPU
    // features are this function's.
    unsafe {
        let dec = Decoder::new();
        let scales = Scales::new();
        let quarter = _mm256_set1_ps(0.25);
        let (q0, d0, s0) = (q.as_ptr(), d.as_ptr().cast::<f32>(), sums.0.as_ptr().cast::<i32>());
        let fifteen = _mm256_set1_epi32(15);
        let shift = _mm512_set1_epi8(0x02);
        let mut acc = _mm256_setzero_ps();
        for bi in 0..nblocks {
            let p = pk.as_ptr().add(bi * PACKED);
            for off in (0..PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(x86::PREFETCH + off).cast());
            }
            let hdrs = p.add(HEADERS).cast::<u64>().read_unaligned();
            let hv = _mm_cvtsi64_si128(hdrs as i64);
            // Bit 7 of a header: the block is stored unrotated (its basis is the original).
            let unrotated = _mm_movepi8_mask(hv) as u8;
            let qb = q0.add(128 * bi);
            // Byte s: the rows (bit r: row r) whose group s has its shift bit set (τ' = −1).
            let taus = p.add(TAUS).cast::<u64>().read_unaligned();
            // Two accumulators: steps in turn, the dependency chains half as long.
            let mut dots = [_mm512_setzero_si512(); 2];
            for pair in 0..4 {
                let w = dec.pair(p.add(48 * pair));
                for (h, (dot, w)) in dots.iter_mut().zip(w).enumerate() {
                    let s = 2 * pair + h;
                    // 4c + 15: bit 1 cleared in the rows whose group s shifts by −¼.
                    let w = _mm512_mask_xor_epi64(w, (taus >> (8 * s)) as u8, w, shift);
                    // Group s's quants in every qword, the rotated ones where the row's block is.
                    let q = _mm512_mask_blend_epi64(
                        unrotated,
                        _mm512_set1_epi64(qb.add(64 + 8 * s).cast::<i64>().read_unaligned()),
                        _mm512_set1_epi64(qb.add(8 * s).cast::<i64>().read_unaligned()),
                    );
                    *dot = _mm512_dpbusd_epi32(*dot, w, q);
                }
            }
            // Row r's sum: the two dwords of qword r.
            let sum = _mm512_add_epi32(dots[0], dots[1]);
            let sum = _mm512_cvtepi64_epi32(_mm512_add_epi32(sum, _mm512_srli_epi64::<32>(sum)));
            // The eight rows' float factors ¼·(s·d) at once: each row's scale (looked up in
            // the 128-entry table held in registers, a gather is slow on Zen 4) and the
            // scale of its basis's activations.
            let h32 = _mm512_cvtepu8_epi32(hv);
            let (s, live) = scales.of(_mm512_castsi512_si256(h32));
            let d =
                _mm256_mask_blend_ps(unrotated, _mm256_set1_ps(*d0.add(2 * bi + 1)), _mm256_set1_ps(*d0.add(2 * bi)));
            let f = _mm256_mul_ps(quarter, _mm256_mul_ps(s, d));
            // The block integer Σ 4c·q: less 15·Σq of each row's basis.
            let basis_sum = _mm256_mask_blend_epi32(
                unrotated,
                _mm256_set1_epi32(*s0.add(2 * bi + 1)),
                _mm256_set1_epi32(*s0.add(2 * bi)),
            );
            let isum = _mm256_sub_epi32(sum, _mm256_mullo_epi32(basis_sum, fifteen));
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
        let mut steps = [[0u64; 8]; 8];
        for (bi, (slot, at)) in slots.iter_mut().zip(&at).enumerate() {
            let p = pk.as_ptr().add(bi * PACKED);
            for pair in 0..4 {
                for (h, w) in dec.pair(p.add(48 * pair)).into_iter().enumerate() {
                    _mm512_storeu_si512(steps[2 * pair + h].as_mut_ptr().cast(), w);
                }
            }
            let taus = p.add(TAUS).cast::<u64>().read_unaligned();
            for (row, &e) in at.iter().enumerate() {
                // The row's shift bits (bit g: group g) from the transposed bytes.
                let (hdr, tau) = (*p.add(HEADERS + row), _pext_u64(taus, 0x0101_0101_0101_0101 << row));
                let s = scales[usize::from(hdr & 0x7f)];
                slot.put_signed(usize::from(e), s, || {
                    // The row's 4t + 2 in order: its group s is qword `row` of step s.
                    let t: [u64; 8] = std::array::from_fn(|s| steps[s][row]);
                    let t = _mm512_loadu_si512(t.as_ptr().cast());
                    // 4·c = 4t − 14 + τ': 4t − 13, less 2 in the groups whose τ is set.
                    let w = _mm512_sub_epi8(t, _mm512_set1_epi8(15));
                    let set = _pdep_u64(tau, 0x0101_0101_0101_0101).wrapping_mul(0xff);
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

    /// The computed block scales equal kq2's table, every header byte.
    #[test]
    fn computed_scales_equal_the_table() {
        if !available() {
            return;
        }
        for hi in [0u8, 0x80] {
            for k0 in (0..128u8).step_by(8) {
                let hdr: [i32; 8] = std::array::from_fn(|i| i32::from(hi | (k0 + i as u8)));
                let mut got = [0f32; 8];
                // SAFETY: checked above.
                let live = unsafe {
                    let (s, live) = Scales::new().of(_mm256_loadu_si256(hdr.as_ptr().cast()));
                    _mm256_storeu_ps(got.as_mut_ptr(), s);
                    live
                };
                for (i, g) in got.iter().enumerate() {
                    let k = usize::from(k0) + i;
                    assert_eq!(live >> i & 1 == 1, k != 0, "k {k}");
                    if k != 0 {
                        assert_eq!(g.to_bits(), x86::KQ2_TABLES.scale[k].to_bits(), "k {k}");
                    }
                }
            }
        }
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
                let got = unsafe { gemv(&pk, blocks, &x.q, &BlockSums::new(&x.q), &x.d) };
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
