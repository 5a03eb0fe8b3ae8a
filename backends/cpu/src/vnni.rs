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

use kiln_quant::ggml_dot::Q8Row;

use crate::x86::{self, Legacy, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

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
        Legacy::Q4_0 => tile::<Q4_0, R, T>(rows, xs),
        Legacy::Q4_1 => tile::<Q4_1, R, T>(rows, xs),
        Legacy::Q5_0 => tile::<Q5_0, R, T>(rows, xs),
        Legacy::Q5_1 => tile::<Q5_1, R, T>(rows, xs),
        Legacy::Q8_0 => tile::<Q8_0, R, T>(rows, xs),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn tile<const K: u8, const R: usize, const T: usize>(rows: [&[u8]; R], xs: [&Q8Row; T]) -> [[f32; T]; R] {
    let bytes = [18, 20, 22, 24, 34][K as usize];
    let signed = matches!(K, Q4_0 | Q5_0 | Q8_0);
    let nblocks = rows
        .iter()
        .map(|r| r.len() / bytes)
        .chain(xs.iter().map(|x| x.scales.len().min(x.q.len() / QK)))
        .min()
        .unwrap_or(0);
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

#[cfg(test)]
mod tests {
    use kiln_quant::ggml_dot;

    use super::*;

    fn available() -> bool {
        crate::Isa::Avx512Vnni.available()
    }

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Tiles of every legacy layout equal the AVX2 tiles bit for bit, random bytes (every
    /// quant pattern, Q8_0's −128 included) against activations that reach ±127.
    #[test]
    fn legacy_tiles_equal_the_avx2_tiles_bit_for_bit() {
        if !available() {
            return;
        }
        let kinds =
            [(Legacy::Q4_0, 18), (Legacy::Q4_1, 20), (Legacy::Q5_0, 22), (Legacy::Q5_1, 24), (Legacy::Q8_0, 34)];
        for (kind, bytes) in kinds {
            for seed in 0..12u64 {
                let blocks = 1 + seed as usize % 9;
                let mut r = rng(seed + 7);
                let rows: Vec<Vec<u8>> = (0..3)
                    .map(|_| {
                        let mut row: Vec<u8> = (0..blocks * bytes).map(|_| r() as u8).collect();
                        for blk in row.chunks_mut(bytes) {
                            blk[0..2].copy_from_slice(&half::f16::from_f32(0.0123).to_le_bytes());
                            if matches!(kind, Legacy::Q4_1 | Legacy::Q5_1) {
                                blk[2..4].copy_from_slice(&half::f16::from_f32(-0.0071).to_le_bytes());
                            }
                        }
                        row
                    })
                    .collect();
                let xs: Vec<_> = (0..4)
                    .map(|t| {
                        let x: Vec<f32> = (0..blocks * 32)
                            .map(|i| if (i + t) % 11 == 0 { -3.0 } else { ((r() % 20001) as f32 / 10000.0) - 1.0 })
                            .collect();
                        ggml_dot::quantize_q8(&x)
                    })
                    .collect();
                let rs = [rows[0].as_slice(), rows[1].as_slice(), rows[2].as_slice()];
                let x4 = [&xs[0], &xs[1], &xs[2], &xs[3]];
                // SAFETY: checked above (VNNI implies the AVX2 set).
                let (got, want) = unsafe { (dot_legacy_tile(kind, rs, x4), x86::dot_legacy_tile(kind, rs, x4)) };
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert_eq!(g.to_bits(), w.to_bits(), "{kind:?} {blocks} blocks: {g} vs {w}");
                }
            }
        }
    }
}
