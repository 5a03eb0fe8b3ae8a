//! Q8_0 weights with one row per 32-bit lane (x86-64, AVX-512). Q8_0's definition is
//! ggml's `vec_dot` order (llama.cpp does not repack Q8_0 on x86): per block eight integer
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
//! Weights are stored offset to unsigned (`w + 128`, the sign bit flipped) for `vpdpbusd`;
//! each lane's sum starts at `−128·Σx` over its four activations.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::Q8Row;

const QK: usize = 32;
const BLOCK: usize = 34;

/// Rows per packed group: one per 32-bit lane of a 512-bit vector.
pub(crate) const ROWS: usize = 16;
/// Bytes of one block of a packed group: the sixteen rows' f16 scales, then for each group
/// `l` of four weights the sixteen rows' four bytes, offset to unsigned. As many bytes as the
/// sixteen stored blocks.
pub(crate) const PACKED: usize = ROWS * BLOCK;

/// Sixteen Q8_0 rows of `nblocks` blocks each, interleaved into `out` as [`PACKED`] says.
/// Lossless: every byte moves, the weights with their sign bit flipped.
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    crate::lut4::interleave16(rows, nblocks, BLOCK, 0x80, out);
}

/// Per block of a token row, per group `l` of four activations, `−128·Σx`: where lane `l`'s
/// integer sum against the offset weights starts.
pub(crate) fn offsets(x: &Q8Row, nblocks: usize) -> Vec<i32> {
    x.q.chunks_exact(4).take(8 * nblocks).map(|g| -128 * g.iter().map(|&v| i32::from(v)).sum::<i32>()).collect()
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
pub(crate) unsafe fn gemm16<const N: usize>(
    pk: &[u8],
    nblocks: usize,
    xs: [&Q8Row; N],
    off: [&[i32]; N],
) -> [[f32; ROWS]; N] {
    const { assert!(N <= TOKENS) };
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let base = pk.as_ptr();
    for b in 0..nblocks {
        // SAFETY (all reads): inside block `b` of the group and of every token row.
        unsafe {
            let blk = base.add(b * PACKED);
            if crate::x86::PREFETCH > 0 {
                for c in 0..PACKED.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(crate::x86::PREFETCH + 64 * c).cast());
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
            for t in 0..N {
                let q = xs[t].q.as_ptr().add(b * QK).cast::<i32>();
                let o = off[t].as_ptr().add(8 * b);
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(xs[t].scales.get_unchecked(b).0));
                for l in 0..8 {
                    let w = _mm512_loadu_si512(blk.add(2 * ROWS + 64 * l).cast());
                    let lane = _mm512_dpbusd_epi32(
                        _mm512_set1_epi32(*o.add(l)),
                        w,
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
        // `hsum_float_8`, then the `_0` types' `+ 0` (which turns −0 into +0).
        let v = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[2]), _mm512_add_ps(r[1], r[3])), _mm512_setzero_ps());
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

    #[test]
    fn packed_kernel_equals_the_definition_bit_for_bit() {
        if !*crate::lut4::ZMM {
            return;
        }
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
                    let mut row: Vec<u8> = (0..nblocks * BLOCK).map(|_| r() as u8).collect();
                    for blk in row.chunks_mut(BLOCK) {
                        let d = (r() % 1000) as f32 * 1e-5 * if r() % 2 == 0 { 1.0 } else { -1.0 };
                        blk[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                    }
                    row
                })
                .collect();
            let mut pk = vec![0u8; nblocks * PACKED];
            pack(std::array::from_fn(|i| &rows[i][..]), nblocks, &mut pk);
            let xs: Vec<Q8Row> = (0..TOKENS)
                .map(|t| {
                    let x: Vec<f32> = (0..k).map(|i| ((i * 7919 + t * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect();
                    ggml_dot::quantize_q8(&x)
                })
                .collect();
            let offs: Vec<Vec<i32>> = xs.iter().map(|x| offsets(x, nblocks)).collect();
            // SAFETY: checked above; sizes as built.
            let got = unsafe { gemm16::<TOKENS>(&pk, nblocks, [&xs[0], &xs[1]], [&offs[0][..], &offs[1][..]]) };
            // SAFETY: as above.
            let one = unsafe { gemm16::<1>(&pk, nblocks, [&xs[1]], [&offs[1][..]]) };
            assert_eq!(one[0], got[1]);
            for t in 0..TOKENS {
                let a = Activations::Q8(Q8Row { scales: xs[t].scales.clone(), q: xs[t].q.clone() });
                for (lane, row) in rows.iter().enumerate() {
                    let want = ggml_dot::dot(DType::Q8_0, row, &a, RowGroup::Gemv);
                    assert_eq!(got[t][lane].to_bits(), want.to_bits(), "k={k} t={t} row={lane}");
                }
            }
        }
    }
}
