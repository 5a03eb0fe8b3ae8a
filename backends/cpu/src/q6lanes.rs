//! Q6_K weights with one row per 32-bit lane (x86-64, AVX-512), for decode. The definition
//! is ggml's Q6_K `vec_dot` order (`x86::dot_q6_k`): per super-block eight exact integer
//! lanes, lane `l` the scaled sums of bytes `4l..4l+4` of every 32-weight segment less
//! `32·(bs₂ₗ·sc₂ₗ + bs₂ₗ₊₁·sc₂ₗ₊₁)`, each added to its own float accumulator by
//! `fma(d8·d, lane, acc)`, the eight reduced as `hsum_float_8` at the end. Row at a time
//! that is a transposed, horizontal computation: every 32 weights are unpacked from their
//! nibble and high-bit bytes, and the scales picked per segment, for one row; on the
//! 1.5B model's Q4_K_M build its Q6_K tensors (a third of the bytes) decoded at about
//! 21 GB/s per thread, below what memory gives.
//!
//! Repacked once per session into groups of sixteen rows (1% larger: each super-block padded
//! to whole cache lines), one 512-bit vector holds the same
//! four-byte group of every row: the nibbles and high bits of four segments unpack with
//! a handful of whole-vector operations, each segment's products go to lane `l`'s
//! accumulator by one `vpmaddubsw` and one `vpdpwssd` against the row scales (as i16
//! pairs), the correction is one `vpdpwssd` per lane, the float step one vertical fused
//! multiply-add per lane, and the reduction eight vertical adds in `hsum_float_8`'s order:
//! every output gets the definition's bits, sixteen rows at once, with no horizontal work.
//!
//! Prefill (batches of eight token rows or more) follows llama.cpp's tiled K-quant order
//! (`ggml_dot::dot_k_tiled`): per super-block one exact integer total and one
//! `fma(d·total, d8, acc)`. [`gemm_tiled`] unpacks each four-byte group of the sixteen rows
//! once for up to eight token rows, each with a single integer accumulator.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::Q8KRow;

/// Rows per packed group: one per 32-bit lane of a 512-bit vector.
pub(crate) const ROWS: usize = 16;

/// Bytes of one stored Q6_K super-block.
const BLOCK: usize = 210;

/// Bytes of one super-block of a packed group: the sixteen stored blocks' 3,360 bytes,
/// padded to whole cache lines (a 512-bit load that straddles two lines costs a second
/// memory access when decode streams the weights). At [`SCALES`], for each lane group `l`
/// the rows' scale pairs `(sc₂ₗ, sc₂ₗ₊₁)` (at `32l + 2r` for row r); at [`QUANTS`], for each
/// half `h` (128 weights) and four-byte group `c` (0..8), at `(8h + c)·192`: the sixteen
/// rows' `ql[64h + 4c..+4]` (at 4r), their `ql[64h + 32 + 4c..+4]` (at 64 + 4r) and their
/// `qh[32h + 4c..+4]` (at 128 + 4r); at [`D`] the rows' f16 `d` (at 2r). The order is the
/// kernel's, so a super-block is read front to back.
pub(crate) const PACKED: usize = (ROWS * BLOCK).next_multiple_of(64);
const SCALES: usize = 0;
const QUANTS: usize = SCALES + 8 * 32;
const D: usize = QUANTS + 16 * 192;
const _: () = assert!(D + 2 * ROWS == ROWS * BLOCK);

/// Super-blocks ahead that [`gemv`] prefetches.
const PREFETCH_AHEAD: usize = 4;

/// Sixteen Q6_K rows of `nblocks` super-blocks each, interleaved into `out` as [`PACKED`]
/// says. Lossless: every byte moves, none changes (the padding stays zero).
pub(crate) fn pack(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    for (bi, dst) in out.chunks_exact_mut(PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[bi * BLOCK..(bi + 1) * BLOCK];
            for (at, src) in places(r) {
                dst[at..at + 4].copy_from_slice(&blk[src..src + 4]);
            }
            for l in 0..8 {
                dst[SCALES + 32 * l + 2 * r..SCALES + 32 * l + 2 * r + 2]
                    .copy_from_slice(&blk[192 + 2 * l..194 + 2 * l]);
            }
            dst[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[208..210]);
        }
    }
}

/// [`pack`] undone: the sixteen stored rows, `nblocks · 210` bytes each, one after another.
#[cfg(test)]
fn unpack(pk: &[u8], nblocks: usize, rows: &mut [u8]) {
    let rb = nblocks * BLOCK;
    for (bi, src) in pk.chunks_exact(PACKED).take(nblocks).enumerate() {
        for r in 0..ROWS {
            let blk = &mut rows[r * rb + bi * BLOCK..r * rb + (bi + 1) * BLOCK];
            for (at, dst) in places(r) {
                blk[dst..dst + 4].copy_from_slice(&src[at..at + 4]);
            }
            for l in 0..8 {
                blk[192 + 2 * l..194 + 2 * l]
                    .copy_from_slice(&src[SCALES + 32 * l + 2 * r..SCALES + 32 * l + 2 * r + 2]);
            }
            blk[208..210].copy_from_slice(&src[D + 2 * r..D + 2 * r + 2]);
        }
    }
}

/// Row `r`'s four-byte groups of quants: (offset in a packed super-block, offset in the
/// stored block).
fn places(r: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..2).flat_map(move |h| {
        (0..8).flat_map(move |c| {
            let at = QUANTS + (8 * h + c) * 192 + 4 * r;
            [(at, 64 * h + 4 * c), (at + 64, 64 * h + 32 + 4 * c), (at + 128, 128 + 32 * h + 4 * c)]
        })
    })
}

/// Per super-block of a token row, per lane group `l`, its bsums `(bs₂ₗ, bs₂ₗ₊₁)` as an i16
/// pair (each a sum of sixteen 8-bit quants, so it fits), for the correction's `vpdpwssd`.
pub(crate) fn bsum_pairs(x: &Q8KRow, nblocks: usize) -> Vec<i32> {
    x.bsums
        .chunks_exact(2)
        .take(8 * nblocks)
        .map(|p| (u32::from(p[0] as i16 as u16) | (u32::from(p[1] as i16 as u16) << 16)) as i32)
        .collect()
}

/// The sixteen rows of a packed group (`pk`, `nblocks` super-blocks) dotted with one token
/// row `x` (its [`bsum_pairs`] `pairs`), each in `x86::dot_q6_k`'s order: the same integer
/// lanes, the same fused multiply-adds, the same reduction, so every output equals it bit
/// for bit.
///
/// # Safety
/// The CPU must have what [`crate::lut4::ZMM`] checks; `pk` holds `nblocks` packed
/// super-blocks, `x` and `pairs` at least `nblocks` super-blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemv(pk: &[u8], nblocks: usize, x: &Q8KRow, pairs: &[i32]) -> [f32; ROWS] {
    // Per 32-bit lane, its low (high) i16 twice: a row's scale for both products of a pair.
    let pick: [__m512i; 2] = std::array::from_fn(|hi| {
        let idx: [u8; 64] = std::array::from_fn(|i| ((i & 12) + (i & 1) + 2 * hi) as u8);
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    });
    let mut acc = [_mm512_setzero_ps(); 8];
    for bi in 0..nblocks {
        // SAFETY: every read is inside packed super-block `bi`, the token's super-block `bi`
        // and its eight pairs (the caller's).
        unsafe {
            let c = pk.as_ptr().add(bi * PACKED);
            let q = x.q.as_ptr().add(bi * 256);
            // Every line of the super-block [`PREFETCH_AHEAD`] ahead, into L2: the unrolled
            // body's loads reach memory in no order a hardware prefetcher follows (without
            // this, decode from memory runs at a third of the speed; into L1 the prefetches
            // fill its miss buffers and stall).
            for off in (0..PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(PREFETCH_AHEAD * PACKED + off).cast());
            }
            // The rows' scale pairs of lane group l: (sc₂ₗ, sc₂ₗ₊₁) as i16 per 32-bit lane.
            let scale_pairs = |l: usize| _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.add(SCALES + 32 * l).cast()));
            // Each lane starts at −32·(bs₂ₗ·sc₂ₗ + bs₂ₗ₊₁·sc₂ₗ₊₁), the definition's correction
            // (integer sums: the order of the additions does not change them).
            let mut lanes = [_mm512_setzero_si512(); 8];
            for l in 0..8 {
                let bs = _mm512_set1_epi32(*pairs.get_unchecked(8 * bi + l));
                let fix = _mm512_dpwssd_epi32(_mm512_setzero_si512(), scale_pairs(l), bs);
                lanes[l] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<5>(fix));
            }
            // Per half h, per four-byte group g: the products of segment s go to lane g with
            // the scale of sub-block 8h + 2s (g < 4) or 8h + 2s + 1. Each call below is one
            // half's four groups of one kind, unrolled with constant lane indices, so that the
            // lanes stay in registers.
            let (mut lo, mut hi) = ([lanes[0], lanes[1], lanes[2], lanes[3]], [lanes[4], lanes[5], lanes[6], lanes[7]]);
            groups4(c, q, 0, 0, &pick[0], &mut lo);
            groups4(c, q, 0, 1, &pick[1], &mut hi);
            groups4(c, q, 1, 0, &pick[0], &mut lo);
            groups4(c, q, 1, 1, &pick[1], &mut hi);
            let lanes = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            let d = _mm512_mul_ps(_mm512_set1_ps(x.d[bi]), _mm512_cvtph_ps(_mm256_loadu_si256(c.add(D).cast())));
            for l in 0..8 {
                acc[l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes[l]), acc[l]);
            }
        }
    }
    // `hsum_float_8`: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
    let sum = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[4]), _mm512_add_ps(acc[2], acc[6])),
        _mm512_add_ps(_mm512_add_ps(acc[1], acc[5]), _mm512_add_ps(acc[3], acc[7])),
    );
    let mut out = [0f32; ROWS];
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum) };
    out
}

/// The 6-bit codes (as bytes) of four-byte group `g` of half `h` of packed super-block `c`,
/// sixteen rows per vector, one vector per 32-weight segment of the half.
///
/// # Safety
/// As [`gemv`]'s; `c` points at one whole packed super-block.
#[inline(always)]
unsafe fn segments(c: *const u8, h: usize, g: usize) -> [__m512i; 4] {
    // SAFETY: the caller's (the reads inside the super-block; the CPU features).
    unsafe {
        let m4 = _mm512_set1_epi8(0x0f);
        let at = c.add(QUANTS + (8 * h + g) * 192);
        let a = _mm512_loadu_si512(at.cast());
        let b = _mm512_loadu_si512(at.add(64).cast());
        let qh = _mm512_loadu_si512(at.add(128).cast());
        // Segment s: the low (s < 2) or high nibbles of `a` (even s) or `b`, and bits 2s..2s+2
        // of `qh` as bits 4..6.
        let high =
            [_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30), _mm512_set1_epi8(0xc0u8 as i8)];
        [
            _mm512_or_si512(_mm512_and_si512(a, m4), _mm512_slli_epi16::<4>(_mm512_and_si512(qh, high[0]))),
            _mm512_or_si512(_mm512_and_si512(b, m4), _mm512_slli_epi16::<2>(_mm512_and_si512(qh, high[1]))),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(a), m4), _mm512_and_si512(qh, high[2])),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(b), m4),
                _mm512_srli_epi16::<2>(_mm512_and_si512(qh, high[3])),
            ),
        ]
    }
}

/// The rows' scales of sub-blocks `8h + 2s + e` (s = 0..4) of packed super-block `c`, each i16
/// twice per 32-bit lane (`pick`: the low (e = 0) or high i16 of each scale pair).
///
/// # Safety
/// As [`segments`].
#[inline(always)]
unsafe fn scales(c: *const u8, h: usize, pick: &__m512i) -> [__m512i; 4] {
    // SAFETY: the caller's (the reads inside the super-block; the CPU features).
    unsafe {
        let mut sc = [_mm512_setzero_si512(); 4];
        for (s, sc) in sc.iter_mut().enumerate() {
            let pairs = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.add(SCALES + 32 * (4 * h + s)).cast()));
            *sc = _mm512_shuffle_epi8(pairs, *pick);
        }
        sc
    }
}

/// Token rows per call of [`gemm_tiled`].
pub(crate) const TILE_TOKENS: usize = 8;

/// The sixteen rows of a packed group (`pk`, `nblocks` super-blocks) dotted with `N` token
/// rows `xs` (their [`bsum_pairs`] `pairs`) in llama.cpp's tiled K-quant order: per
/// super-block the exact integer total `Σ sc·Σ q·q8 − 32·Σ sc·bs` (the order of integer
/// additions changes nothing), then `acc = fma(d·f32(total), d8, acc)`, as
/// `ggml_dot::tiled_block`; every output equals `x86::dot_q6_k_tile::<_, true>` bit for bit.
///
/// # Safety
/// As [`gemv`]'s, for every token row.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemm_tiled<const N: usize>(
    pk: &[u8],
    nblocks: usize,
    xs: [&Q8KRow; N],
    pairs: [&[i32]; N],
) -> [[f32; ROWS]; N] {
    let pick: [__m512i; 2] = std::array::from_fn(|hi| {
        let idx: [u8; 64] = std::array::from_fn(|i| ((i & 12) + (i & 1) + 2 * hi) as u8);
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    });
    let mut acc = [_mm512_setzero_ps(); N];
    for bi in 0..nblocks {
        // SAFETY: every read is inside packed super-block `bi`, the token rows' super-block
        // `bi` and their pairs (the caller's).
        unsafe {
            let c = pk.as_ptr().add(bi * PACKED);
            let mut total = [_mm512_setzero_si512(); N];
            for h in 0..2 {
                for e in 0..2 {
                    let sc = scales(c, h, &pick[e]);
                    for g in 4 * e..4 * e + 4 {
                        let seg = segments(c, h, g);
                        for t in 0..N {
                            let q = xs[t].q.as_ptr().add(bi * 256 + 128 * h + 4 * g);
                            for s in 0..4 {
                                let y = _mm512_set1_epi32(q.add(32 * s).cast::<i32>().read_unaligned());
                                total[t] = _mm512_dpwssd_epi32(total[t], _mm512_maddubs_epi16(seg[s], y), sc[s]);
                            }
                        }
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(D).cast()));
            for t in 0..N {
                let mut fix = _mm512_setzero_si512();
                for l in 0..8 {
                    let bs = _mm512_set1_epi32(*pairs[t].get_unchecked(8 * bi + l));
                    let scale_pairs = _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.add(SCALES + 32 * l).cast()));
                    fix = _mm512_dpwssd_epi32(fix, scale_pairs, bs);
                }
                let s1 = _mm512_sub_epi32(total[t], _mm512_slli_epi32::<5>(fix));
                let r = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s1));
                acc[t] = _mm512_fmadd_ps(r, _mm512_set1_ps(xs[t].d[bi]), acc[t]);
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

/// Four-byte groups `4e..4e + 4` of half `h` of a packed super-block `c` against token
/// super-block `q`, into their lanes (`pick`: the scale pick of sub-blocks `2s + e`).
///
/// # Safety
/// As [`gemv`]'s; `c` and `q` point at one whole packed and token super-block.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
unsafe fn groups4(c: *const u8, q: *const i8, h: usize, e: usize, pick: &__m512i, lanes: &mut [__m512i; 4]) {
    // SAFETY: the caller's (all reads inside the two super-blocks; the CPU features).
    unsafe {
        let sc = scales(c, h, pick);
        for i in 0..4 {
            let g = 4 * e + i;
            let seg = segments(c, h, g);
            for s in 0..4 {
                let y = _mm512_set1_epi32(q.add(128 * h + 32 * s + 4 * g).cast::<i32>().read_unaligned());
                lanes[i] = _mm512_dpwssd_epi32(lanes[i], _mm512_maddubs_epi16(seg[s], y), sc[s]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_quant::ggml_dot;

    use super::*;
    use crate::x86::tests::rng;

    /// Random Q6_K rows (every quant and scale pattern) with sane `d`s.
    fn rows(seed: u64, nblocks: usize) -> Vec<u8> {
        let mut r = rng(seed);
        let mut out: Vec<u8> = (0..ROWS * nblocks * BLOCK).map(|_| r() as u8).collect();
        for (i, blk) in out.chunks_mut(BLOCK).enumerate() {
            let d = 0.001 + (i % 7) as f32 * 0.0007;
            blk[208..210].copy_from_slice(&half::f16::from_f32(if i % 3 == 0 { -d } else { d }).to_le_bytes());
        }
        out
    }

    /// Random rows ([`rows`]) as sixteen slices, and their packed form.
    fn packed(seed: u64, nblocks: usize) -> (Vec<u8>, Vec<u8>) {
        let src = rows(seed, nblocks);
        let rb = nblocks * BLOCK;
        let mut pk = vec![0u8; nblocks * PACKED];
        pack(std::array::from_fn(|r| &src[r * rb..(r + 1) * rb]), nblocks, &mut pk);
        (src, pk)
    }

    #[test]
    fn packing_is_lossless() {
        for nblocks in 1..4 {
            let (src, pk) = packed(nblocks as u64, nblocks);
            let mut back = vec![0u8; src.len()];
            unpack(&pk, nblocks, &mut back);
            assert_eq!(back, src);
        }
    }

    #[test]
    fn tiled_gemm_equals_the_row_kernel_bit_for_bit() {
        if !*crate::lut4::ZMM {
            return;
        }
        for seed in 0..4u64 {
            let nblocks = 1 + seed as usize % 3;
            let (src, pk) = packed(seed + 57, nblocks);
            let rb = nblocks * BLOCK;
            let rs: [&[u8]; ROWS] = std::array::from_fn(|r| &src[r * rb..(r + 1) * rb]);
            let xs = crate::vnni::tests::activations(
                &mut rng(seed + 3),
                TILE_TOKENS,
                nblocks * 256,
                (9, 4.0),
                ggml_dot::quantize_q8_k,
            );
            let pairs: Vec<Vec<i32>> = xs.iter().map(|x| bsum_pairs(x, nblocks)).collect();
            // SAFETY: checked above; `pk`, every token row and its pairs hold `nblocks` super-blocks.
            let got = unsafe {
                gemm_tiled::<TILE_TOKENS>(
                    &pk,
                    nblocks,
                    std::array::from_fn(|t| &xs[t]),
                    std::array::from_fn(|t| &pairs[t][..]),
                )
            };
            // SAFETY: as above.
            let one = unsafe { gemm_tiled::<1>(&pk, nblocks, [&xs[5]], [&pairs[5][..]]) };
            for (r, row) in rs.iter().enumerate() {
                for (t, x) in xs.iter().enumerate() {
                    // SAFETY: as above (AVX2, FMA, F16C).
                    let want = unsafe { crate::x86::dot_q6_k_tile::<1, true>(row, [x]) }[0];
                    assert_eq!(got[t][r].to_bits(), want.to_bits(), "seed {seed} row {r} token {t}");
                }
                assert_eq!(one[0][r].to_bits(), got[5][r].to_bits());
            }
        }
    }

    #[test]
    fn gemv_equals_the_row_kernel_bit_for_bit() {
        if !*crate::lut4::ZMM {
            return;
        }
        for seed in 0..6u64 {
            let nblocks = 1 + seed as usize % 4;
            let (src, pk) = packed(seed + 31, nblocks);
            let rb = nblocks * BLOCK;
            let rs: [&[u8]; ROWS] = std::array::from_fn(|r| &src[r * rb..(r + 1) * rb]);
            let xs = crate::vnni::tests::activations(
                &mut rng(seed + 7),
                3,
                nblocks * 256,
                (11, if seed % 2 == 0 { 4.0 } else { -4.0 }),
                ggml_dot::quantize_q8_k,
            );
            for x in &xs {
                let pairs = bsum_pairs(x, nblocks);
                // SAFETY: checked above; `pk`, `x` and `pairs` hold `nblocks` super-blocks.
                let got = unsafe { gemv(&pk, nblocks, x, &pairs) };
                for (r, row) in rs.iter().enumerate() {
                    // SAFETY: as above (AVX2, FMA, F16C).
                    let want = unsafe { crate::x86::dot_q6_k(row, x) };
                    assert_eq!(got[r].to_bits(), want.to_bits(), "seed {seed} row {r}: {} vs {want}", got[r]);
                }
            }
        }
    }
}
