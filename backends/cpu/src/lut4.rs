//! Kernels for the 18-byte blocks of 32 four-bit codes and an f16 scale whose weights are
//! `d·T[code]` for a 16-entry table `T` (x86-64): IQ4_NL (`T` its non-linear table) and Q4_0
//! (`T[c] = c − 8`). The definition (`kiln_quant::ggml_dot::dot_lut4`, the order of llama.cpp's
//! repacked 8×8 kernels, which it runs for both types) keeps one float accumulator per
//! output: per block the exact integer `Σ T[q]·x`, then one fused multiply-add by `d·d_x`.
//! Any kernel that gets each block's integer exactly and applies the steps in block order
//! gives its bits, so:
//!
//! - AVX2 ([`dot_tile`]): rows as stored; per block a byte lookup (`vpshufb`) turns the
//!   nibbles into table values, `maddubs`/`madd` and a horizontal sum give the integer.
//! - AVX-512 ([`Packed16`], [`gemm16`]): sixteen rows repacked once per session so that a
//!   512-bit vector holds one four-byte weight group of each row; the lookup gives the
//!   table values offset to unsigned bytes (`T + 128`), and `vpdpbusd` against a broadcast
//!   four-byte activation group adds every row's products at once, without transposes or
//!   horizontal sums (the offset comes off as `128·Σx` per block). Decode runs it for one
//!   token row, prefill for eight at a time with each block's lookups shared.

use std::arch::x86_64::*;

use kiln_ir::DType;
use kiln_quant::ggml_dot::{Q8Row, lut4_table};

use crate::x86;

const QK: usize = 32;
const BLOCK: usize = 18;

/// The table of `dtype` (Q4_0 or IQ4_NL) as a 16-byte lookup, repeated in both 128-bit halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn table256(table: &[i8; 16]) -> __m256i {
    // SAFETY: 16 bytes.
    let t = unsafe { _mm_loadu_si128(table.as_ptr().cast()) };
    _mm256_set_m128i(t, t)
}

/// The table of a four-bit lookup layout (Q4_0 or IQ4_NL).
pub(crate) fn table_of(dtype: DType) -> &'static [i8; 16] {
    lut4_table(dtype).unwrap_or(&kiln_quant::iq4nl::VALUES)
}

/// `R` stored rows against `T` token rows (Q8_0 activations), each output in the
/// definition's order; `table` is the layout's ([`table_of`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_tile<const R: usize, const T: usize>(
    table: &[i8; 16],
    rows: [&[u8]; R],
    xs: [&Q8Row; T],
) -> [[f32; T]; R] {
    let nblocks = rows
        .iter()
        .map(|r| r.len() / BLOCK)
        .chain(xs.iter().map(|x| x.scales.len().min(x.q.len() / QK)))
        .min()
        .unwrap_or(0);
    let table = table256(table);
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[0f32; T]; R];
    for b in 0..nblocks {
        for r in 0..R {
            let blk = &rows[r][b * BLOCK..(b + 1) * BLOCK];
            // SAFETY: 16 bytes of quants after the scale.
            let qs = unsafe { _mm_loadu_si128(blk[2..].as_ptr().cast()) };
            let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs), low);
            let w = _mm256_shuffle_epi8(table, nib);
            let wabs = _mm256_sign_epi8(w, w);
            let dw = {
                let bits = u16::from_le_bytes([blk[0], blk[1]]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
            };
            for t in 0..T {
                // SAFETY: block `b` < nblocks of the token row.
                let qx = unsafe { _mm256_loadu_si256(xs[t].q.as_ptr().add(b * QK).cast()) };
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(qx, w)), ones);
                let isum = x86::hsum_i32(p);
                acc[r][t] = x86::fma(isum as f32, dw * xs[t].scales[b].0, acc[r][t]);
            }
        }
    }
    acc
}

/// Rows per packed group: one per 32-bit lane of a 512-bit vector.
pub(crate) const ROWS: usize = 16;
/// Bytes of one block of a packed group: the sixteen rows' f16 scales, then for each of
/// the block's four quant words `k` the sixteen rows' word `k` (bytes `4k..4k+4`, which
/// hold elements `4k..4k+4` in their low nibbles and `16+4k..16+4k+4` in their high ones).
pub(crate) const PACKED: usize = ROWS * BLOCK;

/// Whether this CPU has what the packed kernels need: AVX512F/VL/VNNI and AVX512BW (for
/// the byte lookups on 512-bit vectors).
pub(crate) static ZMM: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
});

/// Sixteen rows of `nblocks` blocks each, interleaved into `out` (`nblocks · PACKED`
/// bytes) as [`PACKED`] describes. Lossless: every byte moves, none changes.
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    interleave16(rows, nblocks, BLOCK, 0, out);
}

/// The sixteen-row lane layout of blocks of `block` bytes (an f16 scale, then four-byte
/// groups): per block the sixteen scales, then for each group the sixteen rows' four bytes,
/// each XORed with `flip`. Shared by [`pack`] and `q8lanes::pack`.
pub(crate) fn interleave16(rows: [&[u8]; ROWS], nblocks: usize, block: usize, flip: u8, out: &mut [u8]) {
    let groups = (block - 2) / 4;
    for (b, dst) in out.chunks_exact_mut(ROWS * block).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[b * block..(b + 1) * block];
            dst[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            for k in 0..groups {
                let at = 2 * ROWS + k * 4 * ROWS + 4 * r;
                for (d, s) in dst[at..at + 4].iter_mut().zip(&blk[2 + 4 * k..6 + 4 * k]) {
                    *d = s ^ flip;
                }
            }
        }
    }
}

/// Per token row and block, `−128·Σx` over the block's 32 activations: the start of a
/// block's integer sum against the offset table values.
pub(crate) fn offsets(x: &Q8Row, nblocks: usize) -> Vec<i32> {
    x.q.chunks_exact(QK).take(nblocks).map(|b| -128 * b.iter().map(|&v| i32::from(v)).sum::<i32>()).collect()
}

/// Token rows per pass of [`gemm16`] (each block's lookups serve them all).
pub(crate) const TOKENS: usize = 8;

/// One packed group (`pk`, `nblocks` blocks, codes looked up in `table`) against up to
/// [`TOKENS`] token rows `xs` (with their [`offsets`] `off`): `out[t][lane]` is row `lane`
/// of the group dotted with token row `t`, in the definition's order.
///
/// # Safety
/// The CPU must have what [`ZMM`] checks; `pk` holds `nblocks` packed blocks, and every
/// token row and offset list at least `nblocks` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemm16<const N: usize>(
    table: &[i8; 16],
    pk: &[u8],
    nblocks: usize,
    xs: [&Q8Row; N],
    off: [&[i32]; N],
) -> [[f32; ROWS]; N] {
    const { assert!(N <= TOKENS) };
    // SAFETY: 16 bytes.
    let t128 = unsafe { _mm_loadu_si128(table.as_ptr().cast()) };
    let table = _mm512_xor_si512(_mm512_broadcast_i32x4(t128), _mm512_set1_epi8(-128));
    let low = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); N];
    let base = pk.as_ptr();
    for b in 0..nblocks {
        // SAFETY (all reads): inside block `b` of the group and of every token row.
        unsafe {
            let blk = base.add(b * PACKED);
            x86::prefetch_ahead(blk, PACKED);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
            let mut w = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                let v = _mm512_loadu_si512(blk.add(2 * ROWS + 64 * k).cast());
                w[k] = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low));
                w[4 + k] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), low));
            }
            for t in 0..N {
                let q = xs[t].q.as_ptr().add(b * QK).cast::<i32>();
                let mut isum = _mm512_set1_epi32(*off[t].get_unchecked(b));
                for g in 0..8 {
                    isum = _mm512_dpbusd_epi32(isum, w[g], _mm512_set1_epi32(q.add(g).read_unaligned()));
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(xs[t].scales.get_unchecked(b).0));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[t]);
            }
        }
    }
    let mut out = [[0f32; ROWS]; N];
    for t in 0..N {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
    }
    out
}

#[cfg(test)]
mod tests {
    use kiln_quant::ggml_dot::{self, Activations, RowGroup};

    use super::*;

    fn rows(n: usize, k: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .map(|_| {
                let mut row: Vec<u8> = (0..k / QK * BLOCK).map(|_| r() as u8).collect();
                for blk in row.chunks_mut(BLOCK) {
                    let d = (r() % 1000) as f32 * 1e-5 * if r() % 2 == 0 { 1.0 } else { -1.0 };
                    blk[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                }
                row
            })
            .collect()
    }

    fn acts(k: usize, seed: u64) -> Q8Row {
        let x: Vec<f32> = (0..k).map(|i| ((i as u64 * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect();
        ggml_dot::quantize_q8(&x)
    }

    fn want(dtype: DType, row: &[u8], x: &Q8Row) -> f32 {
        let a = Activations::Q8(Q8Row { scales: x.scales.clone(), q: x.q.clone() });
        ggml_dot::dot(dtype, row, &a, RowGroup::Gemv)
    }

    const TYPES: [DType; 2] = [DType::IQ4NL, DType::Q4_0];

    #[test]
    fn avx2_tile_equals_the_definition_bit_for_bit() {
        if !crate::Isa::Avx2.available() {
            return;
        }
        for (dtype, seed) in TYPES.into_iter().flat_map(|d| (0..8).map(move |s| (d, s))) {
            let k = 32 * (1 + seed as usize * 5);
            let rs = rows(2, k, seed);
            let xs: Vec<Q8Row> = (0..3).map(|t| acts(k, seed * 10 + t)).collect();
            // SAFETY: checked above.
            let got = unsafe { dot_tile(table_of(dtype), [&rs[0], &rs[1]], [&xs[0], &xs[1], &xs[2]]) };
            for r in 0..2 {
                for t in 0..3 {
                    assert_eq!(got[r][t].to_bits(), want(dtype, &rs[r], &xs[t]).to_bits(), "{dtype} k={k} r={r} t={t}");
                }
            }
        }
    }

    #[test]
    fn packed_kernel_equals_the_definition_bit_for_bit() {
        if !*ZMM {
            return;
        }
        for (dtype, seed) in TYPES.into_iter().flat_map(|d| (0..6).map(move |s| (d, s))) {
            let table = table_of(dtype);
            let k = 32 * (1 + seed as usize * 7);
            let nblocks = k / QK;
            let rs = rows(ROWS, k, seed);
            let mut pk = vec![0u8; nblocks * PACKED];
            pack(std::array::from_fn(|r| &rs[r][..]), nblocks, &mut pk);
            let xs: Vec<Q8Row> = (0..TOKENS).map(|t| acts(k, seed * 10 + t as u64)).collect();
            let offs: Vec<Vec<i32>> = xs.iter().map(|x| offsets(x, nblocks)).collect();
            // SAFETY: checked above; sizes as built.
            let got = unsafe {
                gemm16::<TOKENS>(
                    table,
                    &pk,
                    nblocks,
                    std::array::from_fn(|t| &xs[t]),
                    std::array::from_fn(|t| &offs[t][..]),
                )
            };
            // SAFETY: as above.
            let one = unsafe { gemm16::<1>(table, &pk, nblocks, [&xs[3]], [&offs[3][..]]) };
            for t in 0..TOKENS {
                for r in 0..ROWS {
                    assert_eq!(got[t][r].to_bits(), want(dtype, &rs[r], &xs[t]).to_bits(), "{dtype} k={k} r={r} t={t}");
                }
            }
            assert_eq!(one[0], got[3]);
        }
    }
}
