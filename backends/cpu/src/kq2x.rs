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
//! 28% less than Q4_K's 4.5), and decoding becomes a byte permute, a `vpmultishiftqb`, a
//! `vgf2p8affineqb` and two masked subtractions: the decode kernel reads its weights at
//! close to the memory bandwidth instead of being bound by the lookup. The values are
//! moved, not changed: results equal the stored-form kernels bit for bit.
//!
//! Rows are packed in groups of [`ROWS`] (eight: [`crate::vnni::kq2_gemm`]'s group, two of
//! the decode kernel's four-row steps), block by block: for each block the eight rows'
//! codes (128 bytes), signs (64), headers (8) and shift bits (8), [`PACKED`] bytes.

use std::arch::x86_64::*;

use kiln_quant::kq2::Kq2Q8Row;

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

/// Packs `nblocks` blocks of eight stored kq2 rows into `out` ([`PACKED`] bytes per block).
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    let codes = &vnni::KQ2_ZMM_TABLES.codes;
    for (bi, o) in out.chunks_exact_mut(PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let b = &row[18 * bi..18 * bi + 18];
            let (mut sigma, mut tau) = (0u64, 0u8);
            for g in 0..8 {
                let word = u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]);
                let index = usize::from(word & 0xff) | usize::from(b[1] >> g & 1) << 8;
                let code = codes[index / 32][index % 32] as u16;
                o[16 * r + 2 * g..16 * r + 2 * g + 2].copy_from_slice(&code.to_le_bytes());
                // σ₀..σ₆ stored; σ₇ the parity of those and of P(i), the parity of the
                // codes' low bits (Σ A / 2 = Σ c + 4).
                let stored = (word >> 8) & 0x7f;
                let parity = (stored.count_ones() + (code & 0x5555).count_ones()) & 1;
                sigma |= u64::from(stored | (parity as u16) << 7) << (8 * g);
                tau |= ((word >> 15) as u8) << g;
            }
            o[SIGNS + 8 * r..SIGNS + 8 * r + 8].copy_from_slice(&sigma.to_le_bytes());
            o[HEADERS + r] = b[0];
            o[SHIFTS + r] = tau;
        }
    }
}

/// The decoder's constant vectors: per row of a four-row half, the `vpermb` indices laying
/// group `g`'s two code bytes at the start of qword `g`, and the `vpmultishiftqb` offsets.
struct Decoder {
    index: [__m512i; 4],
    shifts: __m512i,
    mag: __m512i,
}

impl Decoder {
    /// # Safety
    /// The CPU must support AVX512F.
    #[inline(always)]
    unsafe fn new() -> Decoder {
        let index: [[u8; 64]; 4] = std::array::from_fn(|r| {
            std::array::from_fn(|i| {
                let g = i / 8;
                (16 * r + 2 * g + usize::from(i % 8 != 0)) as u8
            })
        });
        // SAFETY: 64-byte tables; the caller's CPU features.
        unsafe {
            Decoder {
                index: index.map(|ix| _mm512_loadu_si512(ix.as_ptr().cast())),
                shifts: _mm512_loadu_si512(vnni::KQ2_ZMM_TABLES.shifts.as_ptr().cast()),
                mag: _mm512_set1_epi64(vnni::KQ2_GF_MAG),
            }
        }
    }

    /// Row `r` (of four) of a half's codes `codes`, with its signs `sigma` and shift bits
    /// `tau`: its 64 weights' magnitudes `|4·c|` as bytes and their signs σ (set: negative).
    /// `|4·c| = 2A + 1` where σ = τ, else `2A − 1`.
    ///
    /// # Safety
    /// The CPU must support AVX512F/BW/VBMI, BMI2 and GFNI.
    #[inline(always)]
    unsafe fn weights(&self, codes: __m512i, r: usize, sigma: u64, tau: u8) -> (__m512i, __mmask64) {
        // SAFETY: the caller's CPU features.
        unsafe {
            let v = _mm512_permutexvar_epi8(self.index[r], codes);
            let m = _mm512_gf2p8affine_epi64_epi8::<3>(_mm512_multishift_epi64_epi8(self.shifts, v), self.mag);
            let flip = sigma ^ _pdep_u64(u64::from(tau), 0x0101_0101_0101_0101).wrapping_mul(0xff);
            (_mm512_mask_sub_epi8(m, flip, m, _mm512_set1_epi8(2)), sigma)
        }
    }
}

/// Decode with a packed group: the eight rows' dots with `x`, as `x86::dot_kq2_tile` takes
/// them (per block one exact integer and `fma(isum, ¼·(s·d), acc)`), bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, BMI2, AVX512F/BW/VL/VNNI/VBMI/BITALG and GFNI
/// ([`vnni::KQ2_ZMM`]); `pk` holds `nblocks` packed blocks and `x` at least as many.
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,avx512bitalg,gfni")]
pub(crate) unsafe fn gemv(pk: &[u8], nblocks: usize, x: &Kq2Q8Row) -> [f32; ROWS] {
    let scales = &x86::KQ2_TABLES.scale;
    // SAFETY: reads within `nblocks` packed blocks and the activations' blocks; the CPU
    // features are this function's.
    unsafe {
        let dec = Decoder::new();
        let zero = _mm512_setzero_si512();
        let (q0, d0) = (x.q.as_ptr(), x.d.as_ptr().cast::<f32>());
        let mut acc = [_mm512_setzero_ps(); 2];
        for bi in 0..nblocks {
            let p = pk.as_ptr().add(bi * PACKED);
            for off in (0..PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(x86::PREFETCH + off).cast());
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let codes = _mm512_loadu_si512(p.add(64 * h).cast());
                let mut d = [zero; 4];
                let mut f = [0f32; 4];
                let mut live = 0u16;
                for r in 0..4 {
                    let row = 4 * h + r;
                    let sigma = p.add(SIGNS + 8 * row).cast::<u64>().read_unaligned();
                    let (hdr, tau) = (*p.add(HEADERS + row), *p.add(SHIFTS + row));
                    let (w, sigma) = dec.weights(codes, r, sigma, tau);
                    // The block's basis: its activation quants and their scale.
                    let at = 2 * bi + usize::from(hdr >> 7 ^ 1);
                    let q = _mm512_loadu_si512(q0.add(64 * at).cast());
                    d[r] = _mm512_dpbusd_epi32(zero, w, _mm512_mask_sub_epi8(q, sigma, zero, q));
                    let s = *scales.get_unchecked(usize::from(hdr & 0x7f));
                    f[r] = 0.25 * (s * *d0.add(at));
                    live |= u16::from(s != 0.0) << r;
                }
                *acc = vnni::kq2_step4(d, f, live, *acc);
            }
        }
        let mut out = [0f32; ROWS];
        _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(acc[0]));
        _mm_storeu_ps(out.as_mut_ptr().add(4), _mm512_castps512_ps128(acc[1]));
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
        for (bi, slot) in slots.iter_mut().enumerate() {
            let p = pk.as_ptr().add(bi * PACKED);
            for h in 0..2 {
                let codes = _mm512_loadu_si512(p.add(64 * h).cast());
                for r in 0..4 {
                    let row = 4 * h + r;
                    let sigma = p.add(SIGNS + 8 * row).cast::<u64>().read_unaligned();
                    let (hdr, tau) = (*p.add(HEADERS + row), *p.add(SHIFTS + row));
                    let s = scales[usize::from(hdr & 0x7f)];
                    slot.put(usize::from(at[bi][row]), s, || dec.weights(codes, r, sigma, tau));
                }
            }
        }
        vnni::kq2_slots_gemm(&slots, ROWS, panel, tile, nb, j0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn available() -> bool {
        *vnni::KQ2_ZMM && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("bmi2")
    }

    /// Eight random stored rows of `blocks` blocks (every index, sign, shift, basis and
    /// scale; some zero-scale blocks) and random activations.
    fn case(seed: u64, blocks: usize, tokens: usize) -> (Vec<u8>, Vec<Kq2Q8Row>) {
        let mut r = rng(seed);
        let mut rows = vec![0u8; ROWS * blocks * 18];
        rows.iter_mut().for_each(|b| *b = r() as u8);
        for (j, row) in rows.chunks_mut(blocks * 18).enumerate() {
            if j % 3 == 1 {
                row[0] &= 0x80;
            }
        }
        let xs = (0..tokens)
            .map(|_| {
                let x: Vec<f32> = (0..64 * blocks).map(|_| (r() % 2001) as f32 / 1000.0 - 1.0).collect();
                kiln_quant::kq2::quantize_kq2_q8(&x)
            })
            .collect();
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
                let got = unsafe { gemv(&pk, blocks, x) };
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
