//! Q6_K and Q3_K weights with one row per 32-bit lane (x86-64, AVX-512), repacked once per
//! session into groups of sixteen rows. Both definitions are ggml's `vec_dot` orders
//! (`x86::dot_q6_k`, `x86::dot_q3_k_tile`): per super-block eight exact integer lanes, lane
//! `l` the scaled sums of bytes `4l..4l+4` of every 32-weight segment, each added to its own
//! float accumulator by `fma(d8·d, lane, acc)`, the eight reduced as `hsum_float_8` at the
//! end. Row at a time that is a transposed, horizontal computation: every 32 weights are
//! unpacked from their bit planes, and the scales picked per segment, for one row. Q6_K is a
//! third of the bytes of a Q4_K_M file, Q3_K the output projection and a fifth of the weights
//! of kiln's 2-bit build of Qwen2.5-Coder-1.5B; row at a time both decoded compute-bound (Q6_K
//! 20 GB/s from memory on one thread, Q3_K 25 Gweights/s).
//!
//! In a packed group one 512-bit vector holds the same four-byte group of every row: the bit
//! planes of four segments unpack with a handful of whole-vector operations into unsigned
//! codes (Q6_K 0..63, Q3_K 0..7), each segment's products go to lane `l`'s accumulator by one
//! `vpmaddubsw` and one `vpdpwssd` against the rows' scales (as i16 pairs), the offset of the
//! unsigned codes is taken off exactly (Q6_K: `32·(bs₂ₗ·sc₂ₗ + bs₂ₗ₊₁·sc₂ₗ₊₁)` per lane, as its
//! definition subtracts it; Q3_K: `4·(y₀ + y₁)` per product pair, the definition's signed
//! weights), the float step is one vertical fused multiply-add per lane, and the reduction
//! eight vertical adds in `hsum_float_8`'s order: every output gets the definition's bits,
//! sixteen rows at once, with no horizontal work.
//!
//! Prefill (batches of eight token rows or more) follows llama.cpp's tiled K-quant order
//! (`ggml_dot::dot_k_tiled`): per super-block one exact integer total and one
//! `fma(d·total, d8, acc)`. [`gemm_tiled`] unpacks each four-byte group of the sixteen rows
//! once for up to eight token rows, each with a single integer accumulator.
//!
//! A packed super-block is the sixteen stored blocks' bytes (Q3_K's 12-byte scale fields as
//! sixteen bytes, unpacked), padded to whole cache lines: a 512-bit load that straddles two
//! lines costs a second memory access when decode streams the weights. At offset 0, for each
//! lane group `l` the rows' scale pairs `(sc₂ₗ, sc₂ₗ₊₁)` (at `32l + 2r` for row r); then the
//! bit planes in the kernel's order; then the rows' f16 `d` (at `2r`), so that a super-block is
//! read front to back.

use std::arch::x86_64::*;

use kiln_quant::ggml_dot::Q8KRow;

/// Rows per packed group: one per 32-bit lane of a 512-bit vector.
pub(crate) const ROWS: usize = 16;

/// Super-blocks ahead that the kernels prefetch.
const PREFETCH_AHEAD: usize = 4;

/// A K-quant layout with a lane form.
pub(crate) trait Kind {
    /// Bytes of one stored super-block.
    const BLOCK: usize;
    /// Offset of the f16 `d` in a stored super-block.
    const D_STORED: usize;
    /// Bytes of one packed super-block of a group.
    const PACKED: usize;
    /// Offset of the rows' `d`s in a packed super-block.
    const D: usize;
    /// Row `r`'s four-byte groups of bit planes: (offset in a packed super-block, offset in
    /// the stored block).
    fn places(r: usize) -> impl Iterator<Item = (usize, usize)>;
    /// The sixteen signed scales of a stored super-block.
    fn scales_of(blk: &[u8]) -> [i8; 16];
    /// Per super-block of a token row, what the offset of the unsigned codes needs (i16
    /// pairs as i32): Q6_K its eight bsum pairs `(bs₂ₗ, bs₂ₗ₊₁)`, Q3_K for each four-byte group
    /// `(4·(y₀ + y₁), 4·(y₂ + y₃))`.
    fn offsets(x: &Q8KRow, nblocks: usize) -> Vec<i32>;
    /// The unsigned codes of four-byte group `g` of half `h` of packed super-block `c`,
    /// sixteen rows per vector, one vector per 32-weight segment of the half.
    ///
    /// # Safety
    /// The CPU features of [`gemv`]; `c` points at one whole packed super-block.
    unsafe fn segments(c: *const u8, h: usize, g: usize) -> [__m512i; 4];
    /// Whether the offset is taken per product pair (Q3_K) rather than per lane (Q6_K).
    const PAIR_OFFSETS: bool;
}

/// Q6_K: per half `h` and four-byte group `c` (0..8), at `256 + (8h + c)·192`, the sixteen
/// rows' `ql[64h + 4c..+4]` (at 4r), their `ql[64h + 32 + 4c..+4]` (at 64 + 4r) and their
/// `qh[32h + 4c..+4]` (at 128 + 4r); the `d`s at 3,328. 3,360 bytes, padded to 3,392.
pub(crate) struct Q6;

/// Q3_K: per four-byte group `c`, at `256 + 64c`, the sixteen rows' `hmask[4c..+4]`; then per
/// half `h` and group `c`, at `768 + (8h + c)·64`, their `qs[32h + 4c..+4]`; the `d`s at 1,792.
/// 1,824 bytes (the scales unpacked), padded to 1,856.
pub(crate) struct Q3;

const SCALES: usize = 0;
const PLANES: usize = SCALES + 8 * 32;

impl Kind for Q6 {
    const BLOCK: usize = 210;
    const D_STORED: usize = 208;
    const D: usize = PLANES + 16 * 192;
    const PACKED: usize = (Self::D + 2 * ROWS).next_multiple_of(64);
    const PAIR_OFFSETS: bool = false;

    fn places(r: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..2).flat_map(move |h| {
            (0..8).flat_map(move |c| {
                let at = PLANES + (8 * h + c) * 192 + 4 * r;
                [(at, 64 * h + 4 * c), (at + 64, 64 * h + 32 + 4 * c), (at + 128, 128 + 32 * h + 4 * c)]
            })
        })
    }

    fn scales_of(blk: &[u8]) -> [i8; 16] {
        std::array::from_fn(|j| blk[192 + j] as i8)
    }

    fn offsets(x: &Q8KRow, nblocks: usize) -> Vec<i32> {
        x.bsums.chunks_exact(2).take(8 * nblocks).map(|p| pair(p[0], p[1])).collect()
    }

    #[inline(always)]
    unsafe fn segments(c: *const u8, h: usize, g: usize) -> [__m512i; 4] {
        // SAFETY: the caller's (the reads inside the super-block; the CPU features).
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let at = c.add(PLANES + (8 * h + g) * 192);
            let a = _mm512_loadu_si512(at.cast());
            let b = _mm512_loadu_si512(at.add(64).cast());
            let qh = _mm512_loadu_si512(at.add(128).cast());
            // Segment s: the low (s < 2) or high nibbles of `a` (even s) or `b`, and bits
            // 2s..2s+2 of `qh` as bits 4..6.
            let high = [
                _mm512_set1_epi8(0x03),
                _mm512_set1_epi8(0x0c),
                _mm512_set1_epi8(0x30),
                _mm512_set1_epi8(0xc0u8 as i8),
            ];
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
}

impl Kind for Q3 {
    const BLOCK: usize = 110;
    const D_STORED: usize = 108;
    const D: usize = PLANES + 8 * 64 + 16 * 64;
    const PACKED: usize = (Self::D + 2 * ROWS).next_multiple_of(64);
    const PAIR_OFFSETS: bool = true;

    fn places(r: usize) -> impl Iterator<Item = (usize, usize)> {
        let hmask = (0..8).map(move |c| (PLANES + 64 * c + 4 * r, 4 * c));
        let qs = (0..16).map(move |hc| (PLANES + 8 * 64 + 64 * hc + 4 * r, 32 + 4 * hc));
        hmask.chain(qs)
    }

    fn scales_of(blk: &[u8]) -> [i8; 16] {
        kiln_quant::ggml_dot::q3_k_scales(&blk[96..108])
    }

    fn offsets(x: &Q8KRow, nblocks: usize) -> Vec<i32> {
        let four = |a: i8, b: i8| 4 * (i32::from(a) + i32::from(b));
        x.q.chunks_exact(4).take(64 * nblocks).map(|y| pair(four(y[0], y[1]), four(y[2], y[3]))).collect()
    }

    #[inline(always)]
    unsafe fn segments(c: *const u8, h: usize, g: usize) -> [__m512i; 4] {
        // SAFETY: the caller's (the reads inside the super-block; the CPU features).
        unsafe {
            let three = _mm512_set1_epi8(3);
            let four = _mm512_set1_epi8(4);
            let qs = _mm512_loadu_si512(c.add(PLANES + 8 * 64 + (8 * h + g) * 64).cast());
            let hm = _mm512_loadu_si512(c.add(PLANES + 64 * g).cast());
            // Segment s: bits 2s..2s+2 of `qs`, and bit 4h + s of `hmask` as bit 2.
            let low = [
                _mm512_and_si512(qs, three),
                _mm512_and_si512(_mm512_srli_epi16::<2>(qs), three),
                _mm512_and_si512(_mm512_srli_epi16::<4>(qs), three),
                _mm512_and_si512(_mm512_srli_epi16::<6>(qs), three),
            ];
            let bit = if h == 0 {
                [_mm512_slli_epi16::<2>(hm), _mm512_slli_epi16::<1>(hm), hm, _mm512_srli_epi16::<1>(hm)]
            } else {
                [
                    _mm512_srli_epi16::<2>(hm),
                    _mm512_srli_epi16::<3>(hm),
                    _mm512_srli_epi16::<4>(hm),
                    _mm512_srli_epi16::<5>(hm),
                ]
            };
            [
                _mm512_or_si512(low[0], _mm512_and_si512(bit[0], four)),
                _mm512_or_si512(low[1], _mm512_and_si512(bit[1], four)),
                _mm512_or_si512(low[2], _mm512_and_si512(bit[2], four)),
                _mm512_or_si512(low[3], _mm512_and_si512(bit[3], four)),
            ]
        }
    }
}

/// Two i16 values as the i32 `vpdpwssd` reads them (each fits: sums of at most sixteen 8-bit
/// quants, or four times two).
fn pair(lo: i32, hi: i32) -> i32 {
    (u32::from(lo as i16 as u16) | (u32::from(hi as i16 as u16) << 16)) as i32
}

/// Sixteen rows of layout `K` and `nblocks` super-blocks each, interleaved into `out`
/// (`nblocks · K::PACKED` bytes). Lossless: every bit plane and `d` moves unchanged, the
/// scales are kept as bytes (the padding stays zero).
pub(crate) fn pack<K: Kind>(rows: [&[u8]; ROWS], nblocks: usize, out: &mut [u8]) {
    for (bi, dst) in out.chunks_exact_mut(K::PACKED).take(nblocks).enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let blk = &row[bi * K::BLOCK..(bi + 1) * K::BLOCK];
            for (at, src) in K::places(r) {
                dst[at..at + 4].copy_from_slice(&blk[src..src + 4]);
            }
            let sc = K::scales_of(blk);
            for l in 0..8 {
                dst[SCALES + 32 * l + 2 * r] = sc[2 * l] as u8;
                dst[SCALES + 32 * l + 2 * r + 1] = sc[2 * l + 1] as u8;
            }
            dst[K::D + 2 * r..K::D + 2 * r + 2].copy_from_slice(&blk[K::D_STORED..K::D_STORED + 2]);
        }
    }
}

/// Per 32-bit lane, its low (`hi` = 0) or high i16 twice: a row's scale for both products of
/// a pair.
///
/// # Safety
/// The CPU features of [`gemv`].
#[inline(always)]
unsafe fn pick(hi: usize) -> __m512i {
    let idx: [u8; 64] = std::array::from_fn(|i| ((i & 12) + (i & 1) + 2 * hi) as u8);
    // SAFETY: 64 bytes; the caller's CPU features.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// The rows' scales of sub-blocks `8h + 2s + e` (s = 0..4) of packed super-block `c`, each i16
/// twice per 32-bit lane (`pick`: the low (e = 0) or high i16 of each scale pair).
///
/// # Safety
/// As [`Kind::segments`].
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

/// The rows' scale pairs of lane group `l` of packed super-block `c`: `(sc₂ₗ, sc₂ₗ₊₁)` as
/// i16 per 32-bit lane.
///
/// # Safety
/// As [`Kind::segments`].
#[inline(always)]
unsafe fn scale_pairs(c: *const u8, l: usize) -> __m512i {
    // SAFETY: the caller's.
    unsafe { _mm512_cvtepi8_epi16(_mm256_loadu_si256(c.add(SCALES + 32 * l).cast())) }
}

/// The i16 products of segment `s` (codes `u`) with the token's four activations at `q`,
/// less the unsigned codes' offset where it is taken per pair (Q3_K: `off`, its entry of
/// [`Kind::offsets`]).
///
/// # Safety
/// As [`Kind::segments`]; `q` and `off` point at the group's activations and offset pair.
#[inline(always)]
unsafe fn products<K: Kind>(u: __m512i, q: *const i8, off: *const i32) -> __m512i {
    // SAFETY: the caller's.
    unsafe {
        let p = _mm512_maddubs_epi16(u, _mm512_set1_epi32(q.cast::<i32>().read_unaligned()));
        if K::PAIR_OFFSETS { _mm512_sub_epi16(p, _mm512_set1_epi32(off.read())) } else { p }
    }
}

/// Q6_K's per-lane offset of super-block `c`: `32·Σ (bs·sc)` of lane group `l`'s two
/// sub-blocks (`offs`: the token's eight bsum pairs of the super-block).
///
/// # Safety
/// As [`Kind::segments`]; `offs` holds eight pairs.
#[inline(always)]
unsafe fn lane_offset(c: *const u8, l: usize, offs: *const i32) -> __m512i {
    // SAFETY: the caller's.
    unsafe {
        let bs = _mm512_set1_epi32(offs.add(l).read());
        _mm512_slli_epi32::<5>(_mm512_dpwssd_epi32(_mm512_setzero_si512(), scale_pairs(c, l), bs))
    }
}

/// The sixteen rows of a packed group of layout `K` (`pk`, `nblocks` super-blocks) dotted with
/// one token row `x` (its [`Kind::offsets`] `offs`), each in the definition's order (the row
/// kernels' `TILED = false`): the same integer lanes, the same fused multiply-adds, the same
/// reduction, so every output equals it bit for bit.
///
/// # Safety
/// The CPU must have what [`crate::lut4::ZMM`] checks; `pk` holds `nblocks` packed
/// super-blocks, `x` and `offs` at least `nblocks` super-blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemv<K: Kind>(pk: &[u8], nblocks: usize, x: &Q8KRow, offs: &[i32]) -> [f32; ROWS] {
    // SAFETY: the CPU features are the caller's.
    let pick = unsafe { [pick(0), pick(1)] };
    let per_block = if K::PAIR_OFFSETS { 64 } else { 8 };
    let mut acc = [_mm512_setzero_ps(); 8];
    for bi in 0..nblocks {
        // SAFETY: every read is inside packed super-block `bi`, the token's super-block `bi`
        // and its offsets (the caller's).
        unsafe {
            let c = pk.as_ptr().add(bi * K::PACKED);
            let q = x.q.as_ptr().add(bi * 256);
            let o = offs.as_ptr().add(bi * per_block);
            // Every line of the super-block [`PREFETCH_AHEAD`] ahead, into L2: the unrolled
            // body's loads reach memory in no order a hardware prefetcher follows (without
            // this, decode from memory runs at a third of the speed; into L1 the prefetches
            // fill its miss buffers and stall).
            for off in (0..K::PACKED).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(c.wrapping_add(PREFETCH_AHEAD * K::PACKED + off).cast());
            }
            // Q6_K: each lane starts at its offset, less (integer sums: the order of the
            // additions does not change them).
            let mut lanes = [_mm512_setzero_si512(); 8];
            if !K::PAIR_OFFSETS {
                for l in 0..8 {
                    lanes[l] = _mm512_sub_epi32(_mm512_setzero_si512(), lane_offset(c, l, o));
                }
            }
            // Per half h, per four-byte group g: the products of segment s go to lane g with
            // the scale of sub-block 8h + 2s (g < 4) or 8h + 2s + 1. Each call below is one
            // half's four groups of one kind, unrolled with constant lane indices, so that the
            // lanes stay in registers.
            let (mut lo, mut hi) = ([lanes[0], lanes[1], lanes[2], lanes[3]], [lanes[4], lanes[5], lanes[6], lanes[7]]);
            groups4::<K>(c, q, o, 0, 0, &pick[0], &mut lo);
            groups4::<K>(c, q, o, 0, 1, &pick[1], &mut hi);
            groups4::<K>(c, q, o, 1, 0, &pick[0], &mut lo);
            groups4::<K>(c, q, o, 1, 1, &pick[1], &mut hi);
            let lanes = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            let d = _mm512_mul_ps(_mm512_set1_ps(x.d[bi]), _mm512_cvtph_ps(_mm256_loadu_si256(c.add(K::D).cast())));
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

/// Token rows per call of [`gemm_tiled`].
pub(crate) const TILE_TOKENS: usize = 8;

/// The sixteen rows of a packed group of layout `K` (`pk`, `nblocks` super-blocks) dotted with
/// `N` token rows `xs` (their [`Kind::offsets`] `offs`) in llama.cpp's tiled K-quant order: per
/// super-block the exact integer total (the order of integer additions changes nothing), then
/// `acc = fma(d·f32(total), d8, acc)`, as `ggml_dot::tiled_block`; every output equals the row
/// kernel's (`TILED = true`) bit for bit.
///
/// # Safety
/// As [`gemv`]'s, for every token row.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
pub(crate) unsafe fn gemm_tiled<K: Kind, const N: usize>(
    pk: &[u8],
    nblocks: usize,
    xs: [&Q8KRow; N],
    offs: [&[i32]; N],
) -> [[f32; ROWS]; N] {
    // SAFETY: the CPU features are the caller's.
    let pick = unsafe { [pick(0), pick(1)] };
    let per_block = if K::PAIR_OFFSETS { 64 } else { 8 };
    let mut acc = [_mm512_setzero_ps(); N];
    for bi in 0..nblocks {
        // SAFETY: every read is inside packed super-block `bi`, the token rows' super-block
        // `bi` and their offsets (the caller's).
        unsafe {
            let c = pk.as_ptr().add(bi * K::PACKED);
            let mut total = [_mm512_setzero_si512(); N];
            for h in 0..2 {
                for e in 0..2 {
                    let sc = scales(c, h, &pick[e]);
                    for g in 4 * e..4 * e + 4 {
                        let seg = K::segments(c, h, g);
                        for t in 0..N {
                            let at = 128 * h + 4 * g;
                            let q = xs[t].q.as_ptr().add(bi * 256 + at);
                            let o = offs[t].as_ptr().wrapping_add(bi * per_block + at / 4);
                            for s in 0..4 {
                                let p = products::<K>(seg[s], q.add(32 * s), o.wrapping_add(8 * s));
                                total[t] = _mm512_dpwssd_epi32(total[t], p, sc[s]);
                            }
                        }
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(K::D).cast()));
            for t in 0..N {
                if !K::PAIR_OFFSETS {
                    let o = offs[t].as_ptr().add(bi * per_block);
                    for l in 0..8 {
                        total[t] = _mm512_sub_epi32(total[t], lane_offset(c, l, o));
                    }
                }
                let r = _mm512_mul_ps(d, _mm512_cvtepi32_ps(total[t]));
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
/// super-block `q` (offsets `o`), into their lanes (`pick`: the scale pick of sub-blocks
/// `2s + e`).
///
/// # Safety
/// As [`gemv`]'s; `c`, `q` and `o` point at one whole packed and token super-block.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices over fixed arrays unroll; closures would not inline
unsafe fn groups4<K: Kind>(
    c: *const u8,
    q: *const i8,
    o: *const i32,
    h: usize,
    e: usize,
    pick: &__m512i,
    lanes: &mut [__m512i; 4],
) {
    // SAFETY: the caller's (all reads inside the super-blocks; the CPU features).
    unsafe {
        let sc = scales(c, h, pick);
        for i in 0..4 {
            let g = 4 * e + i;
            let seg = K::segments(c, h, g);
            for s in 0..4 {
                let at = 128 * h + 32 * s + 4 * g;
                let p = products::<K>(seg[s], q.add(at), o.wrapping_add(at / 4));
                lanes[i] = _mm512_dpwssd_epi32(lanes[i], p, sc[s]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_quant::ggml_dot;

    use super::*;
    use crate::x86::tests::rng;

    /// Random rows of layout `K` (every code and scale pattern) with sane `d`s.
    fn rows<K: Kind>(seed: u64, nblocks: usize) -> Vec<u8> {
        let mut r = rng(seed);
        let mut out: Vec<u8> = (0..ROWS * nblocks * K::BLOCK).map(|_| r() as u8).collect();
        for (i, blk) in out.chunks_mut(K::BLOCK).enumerate() {
            let d = 0.001 + (i % 7) as f32 * 0.0007;
            let d = half::f16::from_f32(if i % 3 == 0 { -d } else { d });
            blk[K::D_STORED..K::D_STORED + 2].copy_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// Random rows as sixteen slices' bytes, and their packed form.
    fn packed<K: Kind>(seed: u64, nblocks: usize) -> (Vec<u8>, Vec<u8>) {
        let src = rows::<K>(seed, nblocks);
        let rb = nblocks * K::BLOCK;
        let mut pk = vec![0u8; nblocks * K::PACKED];
        pack::<K>(std::array::from_fn(|r| &src[r * rb..(r + 1) * rb]), nblocks, &mut pk);
        (src, pk)
    }

    /// Every byte of a stored block is a bit-plane group the packing moves, a scale byte or
    /// `d`; the packed groups do not overlap.
    fn check_layout<K: Kind>(scale_bytes: std::ops::Range<usize>) {
        let mut stored = vec![0u8; K::BLOCK];
        let mut packed = vec![0u8; K::PACKED];
        for r in 0..ROWS {
            for (at, src) in K::places(r) {
                for i in 0..4 {
                    stored[src + i] += u8::from(r == 0);
                    packed[at + i] += 1;
                }
            }
        }
        for i in scale_bytes.chain(K::D_STORED..K::D_STORED + 2) {
            stored[i] += 1;
        }
        assert!(stored.iter().all(|&n| n == 1), "{stored:?}");
        assert!(packed[PLANES..K::D].iter().all(|&n| n == 1));
        assert!(K::D + 2 * ROWS <= K::PACKED && K::PACKED.is_multiple_of(64));
    }

    #[test]
    fn the_layouts_keep_every_byte() {
        check_layout::<Q6>(192..208);
        check_layout::<Q3>(96..108);
    }

    type RowKernel<const T: usize> = unsafe fn(&[u8], [&Q8KRow; T]) -> [f32; T];

    fn check_gemv<K: Kind>(seed0: u64, want: RowKernel<1>) {
        if !*crate::lut4::ZMM {
            return;
        }
        for seed in 0..6u64 {
            let nblocks = 1 + seed as usize % 4;
            let (src, pk) = packed::<K>(seed0 + seed, nblocks);
            let rb = nblocks * K::BLOCK;
            let xs = crate::vnni::tests::activations(
                &mut rng(seed + 7),
                3,
                nblocks * 256,
                (11, if seed % 2 == 0 { 4.0 } else { -4.0 }),
                ggml_dot::quantize_q8_k,
            );
            for x in &xs {
                let offs = K::offsets(x, nblocks);
                // SAFETY: checked above; `pk`, `x` and `offs` hold `nblocks` super-blocks.
                let got = unsafe { gemv::<K>(&pk, nblocks, x, &offs) };
                for (r, row) in src.chunks_exact(rb).enumerate() {
                    // SAFETY: as above (AVX2, FMA, F16C).
                    let want = unsafe { want(row, [x]) }[0];
                    assert_eq!(got[r].to_bits(), want.to_bits(), "seed {seed} row {r}: {} vs {want}", got[r]);
                }
            }
        }
    }

    fn check_tiled<K: Kind>(seed0: u64, want: RowKernel<1>) {
        if !*crate::lut4::ZMM {
            return;
        }
        for seed in 0..4u64 {
            let nblocks = 1 + seed as usize % 3;
            let (src, pk) = packed::<K>(seed0 + seed, nblocks);
            let rb = nblocks * K::BLOCK;
            let xs = crate::vnni::tests::activations(
                &mut rng(seed + 3),
                TILE_TOKENS,
                nblocks * 256,
                (9, 4.0),
                ggml_dot::quantize_q8_k,
            );
            let offs: Vec<Vec<i32>> = xs.iter().map(|x| K::offsets(x, nblocks)).collect();
            // SAFETY: checked above; `pk`, every token row and its offsets hold `nblocks` super-blocks.
            let (got, one) = unsafe {
                (
                    gemm_tiled::<K, TILE_TOKENS>(
                        &pk,
                        nblocks,
                        std::array::from_fn(|t| &xs[t]),
                        std::array::from_fn(|t| &offs[t][..]),
                    ),
                    gemm_tiled::<K, 1>(&pk, nblocks, [&xs[5]], [&offs[5][..]]),
                )
            };
            for (r, row) in src.chunks_exact(rb).enumerate() {
                for (t, x) in xs.iter().enumerate() {
                    // SAFETY: as above (AVX2, FMA, F16C).
                    let want = unsafe { want(row, [x]) }[0];
                    assert_eq!(got[t][r].to_bits(), want.to_bits(), "seed {seed} row {r} token {t}");
                }
                assert_eq!(one[0][r].to_bits(), got[5][r].to_bits());
            }
        }
    }

    #[test]
    fn q6_k_lanes_equal_the_row_kernels_bit_for_bit() {
        check_gemv::<Q6>(31, crate::x86::dot_q6_k_tile::<1, false>);
        check_tiled::<Q6>(57, crate::x86::dot_q6_k_tile::<1, true>);
    }

    #[test]
    fn q3_k_lanes_equal_the_row_kernels_bit_for_bit() {
        check_gemv::<Q3>(71, crate::x86::dot_q3_k_tile::<1, false>);
        check_tiled::<Q3>(93, crate::x86::dot_q3_k_tile::<1, true>);
    }
}
