//! Group decoders for the 256-weight ggml K-quants (Q2_K … Q6_K) and kiln's
//! kq2, the kq2 lookup tables, and kq2's rotation of the activations
//! ([`rotate_host`], [`rotate_kernel`]).
//!
//! Each decoder emits the PTX for weights `8g .. 8g+8` of a row (one group,
//! one lane of the matmul). In every format here those 8 weights share one
//! sub-block scale and their quants sit in 8 consecutive bytes of each of
//! the block's bit planes, so a group costs a few scale loads and two 32-bit
//! words per plane; the planes are combined four weights at a time inside a
//! 32-bit word (one small integer per byte) before each byte is converted.
//!
//! Alignment: weight tensors start 16-byte aligned (`weights.bin` aligns
//! them to 64, device allocations to 256) and rows are whole blocks, so a
//! block starts at a multiple of gcd(block bytes, 16): 4 for Q2_K (84 B),
//! 16 for Q4_K/Q5_K (144/176 B), only 2 for Q3_K, Q6_K (110/210 B) and kq2
//! (18 B). Loads are sized accordingly (u32 pairs made of two u16 loads where
//! only 2 is guaranteed). The kq2 tables need 4-byte alignment.
//!
//! Arithmetic follows the reference dequantizers in `kiln_quant`: Q3_K, Q6_K
//! and kq2 are bit-exact (`fma(q, dl, −c·dl)` with an exact power-of-two `c`
//! rounds once, like `dl · (q − c)`); Q2_K, Q4_K and Q5_K compute
//! `dl · q − ml` as one fma where the reference rounds twice.

use kiln_ir::DType;
use kiln_quant::kq2::{KQ2_ABS_ENTRIES, KQ2_RHT_SIGNS, KQ2_SCALE_MAX, kq2_abs_codebook, kq2_scale};

use crate::formats::{Group, block_of, ld_f16};
use crate::kernels::BLOCK;
use crate::ptx::{BinOp, Cmp, Kb, Kernel, Mem, ParamTy, Reg, Shfl, Special, Ty, UnOp};

/// Emits the decoding of weights `8g .. 8g+8` of the row at `row` for the
/// K-quants and kq2 (see [`crate::formats::decode8`]). For kq2 the values
/// are the block's storage vector and `rotated` says whether they multiply
/// the block-rotated activations ([`rotate_host`]).
pub fn decode8(kb: &mut Kb, dtype: DType, row: Reg, g: Reg, tables: Reg) -> Group {
    let plain = |w| Group { w, rotated: None };
    match dtype {
        DType::Q2K => plain(q2_k(kb, row, g)),
        DType::Q3K => plain(q3_k(kb, row, g)),
        DType::Q4K => plain(q45_k(kb, row, g, false)),
        DType::Q5K => plain(q45_k(kb, row, g, true)),
        DType::Q6K => plain(q6_k(kb, row, g)),
        DType::KQ2 => kq2(kb, row, g, tables),
        _ => unreachable!("{dtype} is decoded in formats.rs"),
    }
}

// ---- helpers ------------------------------------------------------------

/// `base + off` for a u32 byte offset.
fn at(kb: &mut Kb, base: Reg, off: Reg) -> Reg {
    let o = kb.cvt(Ty::U64, off);
    kb.add(Ty::U64, base, o)
}

/// `(s >> shift) & mask`.
fn bits(kb: &mut Kb, s: Reg, shift: u32, mask: u32) -> Reg {
    let t = kb.shr(Ty::U32, s, shift);
    kb.and(Ty::U32, t, mask)
}

/// The u32 at `a + off`, read as two u16 loads (for addresses that are only
/// even).
fn ld_u32_2(kb: &mut Kb, a: Reg, off: i32) -> Reg {
    let lo = kb.ld(Mem::U16, a, off);
    let hi = kb.ld(Mem::U16, a, off + 2);
    kb.mad(Ty::U32, hi, 65536u32, lo)
}

/// The 8 bytes at `a + off` (8-byte aligned) as two u32 words.
fn ld_u64_words(kb: &mut Kb, a: Reg, off: i32) -> [Reg; 2] {
    let v = kb.ld(Mem::U64, a, off);
    let lo = kb.cvt(Ty::U32, v);
    let h = kb.shr(Ty::U64, v, 32u32);
    let hi = kb.cvt(Ty::U32, h);
    [lo, hi]
}

/// The 8 bytes at `a + off` (4-byte aligned) as two u32 words.
fn ld_u32_words(kb: &mut Kb, a: Reg, off: i32) -> [Reg; 2] {
    [kb.ld(Mem::U32, a, off), kb.ld(Mem::U32, a, off + 4)]
}

/// The 8 bytes at `a + off` (2-byte aligned) as two u32 words.
fn ld_u16_words(kb: &mut Kb, a: Reg, off: i32) -> [Reg; 2] {
    [ld_u32_2(kb, a, off), ld_u32_2(kb, a, off + 4)]
}

/// `((w >> shift) & mask)` on a word of four packed bytes: one bit field of
/// each byte (`mask` repeated per byte, e.g. `0x03030303`).
fn field4(kb: &mut Kb, w: Reg, shift: Reg, mask: u32) -> Reg {
    let t = kb.shr(Ty::U32, w, shift);
    kb.and(Ty::U32, t, mask)
}

/// `a | (b << sh)`.
fn or_shl(kb: &mut Kb, a: Reg, b: Reg, sh: u32) -> Reg {
    let t = kb.shl(Ty::U32, b, sh);
    kb.bin(BinOp::Or, Ty::U32, a, t)
}

/// The four bytes of `w` as u32 values, each masked by `m` (byte 3 is
/// taken as it is: the caller's word has no bits above `m` there).
fn unpack4(kb: &mut Kb, w: Reg, m: u32) -> [Reg; 4] {
    [kb.and(Ty::U32, w, m), bits(kb, w, 8, m), bits(kb, w, 16, m), kb.shr(Ty::U32, w, 24u32)]
}

/// `fma(q_i, a, b)` for the 8 small integers held in the bytes of `words`.
fn fma8(kb: &mut Kb, words: [Reg; 2], m: u32, a: Reg, b: Reg) -> [Reg; 8] {
    let q: Vec<Reg> = words.iter().flat_map(|&w| unpack4(kb, w, m)).collect();
    std::array::from_fn(|i| {
        let f = kb.cvt(Ty::F32, q[i]);
        kb.fma(f, a, b)
    })
}

// ---- K-quants -----------------------------------------------------------
//
// A 256-weight super-block, group s = 0..32 of it (weights 8s..8s+8). The
// 2-bit planes (Q2_K, Q3_K low bits, Q6_K high bits) hold 128 weights in 32
// bytes: weight 128h + 32p + i (i < 32) is bits 2p..2p+2 of byte 32h + i.
// So group s reads bytes 32·(s >> 4) + 8·(s & 3) .. +8 at shift 2·((s >> 2) & 3).

/// Byte offset `32·(s >> 4) + 8·(s & 3)` of a group in a 2-bit plane, and
/// the plane's shift `2·((s >> 2) & 3)`.
fn plane2(kb: &mut Kb, s: Reg) -> (Reg, Reg) {
    let hi = kb.and(Ty::U32, s, 16u32);
    let lo = kb.and(Ty::U32, s, 3u32);
    let lo8 = kb.shl(Ty::U32, lo, 3u32);
    let off = kb.mad(Ty::U32, hi, 2u32, lo8);
    let s1 = shr32(kb, s, 1);
    let shift = kb.and(Ty::U32, s1, 6u32);
    (off, shift)
}

/// `a >> n` (logical).
fn shr32(kb: &mut Kb, a: Reg, n: u32) -> Reg {
    kb.shr(Ty::U32, a, n)
}

/// Q2_K, 84 bytes: `scales[16]` (byte j for weights 16j..16j+16: low nibble
/// scale, high nibble min), `qs[64]` (2-bit planes), `d`, `dmin` (f16).
/// w = d·sc·q − dmin·m.
fn q2_k(kb: &mut Kb, row: Reg, g: Reg) -> [Reg; 8] {
    let (blk, s) = block_of(kb, row, g, 32, 84);
    let j = shr32(kb, s, 1);
    let sa = at(kb, blk, j);
    let sm = kb.ld(Mem::U8, sa, 0);
    let d = ld_f16(kb, blk, 80);
    let dmin = ld_f16(kb, blk, 82);
    let sc = kb.and(Ty::U32, sm, 15u32);
    let scf = kb.cvt(Ty::F32, sc);
    let dl = kb.mul(Ty::F32, d, scf);
    let mn = shr32(kb, sm, 4);
    let mnf = kb.cvt(Ty::F32, mn);
    let ml = kb.mul(Ty::F32, dmin, mnf);
    let nml = kb.un(UnOp::Neg, Ty::F32, ml);
    let (off, shift) = plane2(kb, s);
    let qa = at(kb, blk, off);
    let [w0, w1] = ld_u32_words(kb, qa, 16);
    let q = [field4(kb, w0, shift, 0x0303_0303), field4(kb, w1, shift, 0x0303_0303)];
    fma8(kb, q, 3, dl, nml)
}

/// Q3_K, 110 bytes: `hmask[32]` (the high bit of weight 32b + i is bit b
/// of byte i), `qs[64]` (low 2 bits, 2-bit planes), `scales[12]` (16 signed
/// 6-bit scales: low nibbles in bytes 0..8, high 2-bit pairs in 8..12),
/// `d` (f16). w = d·(sc − 32)·(q − 4·(1 − h)).
fn q3_k(kb: &mut Kb, row: Reg, g: Reg) -> [Reg; 8] {
    let (blk, s) = block_of(kb, row, g, 32, 110);
    // Scale j = s/2: low 4 bits from byte 96 + (j & 7) at shift 4·(j >> 3),
    // high 2 bits from byte 104 + (j & 3) at shift 2·(j >> 2).
    let j = shr32(kb, s, 1);
    let jl = kb.and(Ty::U32, j, 7u32);
    let la = at(kb, blk, jl);
    let lb = kb.ld(Mem::U8, la, 96);
    let lsh = kb.and(Ty::U32, s, 16u32);
    let lsh = shr32(kb, lsh, 2);
    let lo = field4(kb, lb, lsh, 15);
    let jh = kb.and(Ty::U32, j, 3u32);
    let ha = at(kb, blk, jh);
    let hb = kb.ld(Mem::U8, ha, 104);
    let s2 = shr32(kb, s, 2);
    let hsh = kb.and(Ty::U32, s2, 6u32);
    let hi = field4(kb, hb, hsh, 3);
    let sc = or_shl(kb, lo, hi, 4);
    let sc = kb.sub(Ty::S32, sc.as_ty(Ty::S32), 32);
    let scf = kb.cvt(Ty::F32, sc);
    let d = ld_f16(kb, blk, 108);
    let dl = kb.mul(Ty::F32, d, scf);
    let m4 = kb.mul(Ty::F32, dl, -4.0f32);
    // q + 4 = low | h << 2 per byte; h is bit (s >> 2) of hmask[8·(s & 3) + i].
    let (off, shift) = plane2(kb, s);
    let qa = at(kb, blk, off);
    let ql = ld_u16_words(kb, qa, 32);
    let lo8 = kb.and(Ty::U32, s, 3u32);
    let lo8 = kb.shl(Ty::U32, lo8, 3u32);
    let ma = at(kb, blk, lo8);
    let hm = ld_u16_words(kb, ma, 0);
    let hbit = shr32(kb, s, 2);
    let q = std::array::from_fn(|w| {
        let l = field4(kb, ql[w], shift, 0x0303_0303);
        let h = field4(kb, hm[w], hbit, 0x0101_0101);
        or_shl(kb, l, h, 2)
    });
    fma8(kb, q, 7, dl, m4)
}

/// Scale and min (6 bits each) of sub-block `j` (0..8) of Q4_K/Q5_K, from
/// the 12 bytes at `blk + 4` (ggml's `get_scale_min_k4`): with a, b, c the
/// bytes j&3, 4 + (j&3), 8 + (j&3):
/// j < 4: (a & 63, b & 63); j ≥ 4: (c & 15 | (a >> 6) << 4, c >> 4 | (b >> 6) << 4).
fn scale_min_k4(kb: &mut Kb, blk: Reg, j: Reg) -> (Reg, Reg) {
    let j3 = kb.and(Ty::U32, j, 3u32);
    let sa = at(kb, blk, j3);
    let a = kb.ld(Mem::U8, sa, 4);
    let b = kb.ld(Mem::U8, sa, 8);
    let c = kb.ld(Mem::U8, sa, 12);
    let sc_lo = kb.and(Ty::U32, a, 63u32);
    let m_lo = kb.and(Ty::U32, b, 63u32);
    let c_lo = kb.and(Ty::U32, c, 15u32);
    let a_hi = shr32(kb, a, 6);
    let sc_hi = or_shl(kb, c_lo, a_hi, 4);
    let c_hi = shr32(kb, c, 4);
    let b_hi = shr32(kb, b, 6);
    let m_hi = or_shl(kb, c_hi, b_hi, 4);
    let low = kb.setp(Cmp::Lt, j, 4u32);
    let sc = kb.selp(Ty::U32, sc_lo, sc_hi, low);
    let m = kb.selp(Ty::U32, m_lo, m_hi, low);
    (sc, m)
}

/// Q4_K, 144 bytes: `d`, `dmin` (f16), `scales[12]`, `qs[128]`; Q5_K, 176
/// bytes: the same with `qh[32]` (5th bits) before `qs`. Sub-block j = s/4
/// (32 weights): qs bytes 32·(j/2) + i, nibble j & 1; qh byte i, bit j.
/// w = d·sc·q − dmin·m.
fn q45_k(kb: &mut Kb, row: Reg, g: Reg, q5: bool) -> [Reg; 8] {
    let (blk, s) = block_of(kb, row, g, 32, if q5 { 176 } else { 144 });
    let j = shr32(kb, s, 2);
    let (sc, m) = scale_min_k4(kb, blk, j);
    let d = ld_f16(kb, blk, 0);
    let dmin = ld_f16(kb, blk, 2);
    let scf = kb.cvt(Ty::F32, sc);
    let d1 = kb.mul(Ty::F32, d, scf);
    let mf = kb.cvt(Ty::F32, m);
    let m1 = kb.mul(Ty::F32, dmin, mf);
    let nm1 = kb.un(UnOp::Neg, Ty::F32, m1);
    // Bytes 32·(s >> 3) + 8·(s & 3) of qs, nibble shift 4·((s >> 2) & 1) = s & 4.
    let i0 = kb.and(Ty::U32, s, 3u32);
    let i0 = kb.shl(Ty::U32, i0, 3u32);
    let hi = kb.and(Ty::U32, s, 24u32);
    let off = kb.mad(Ty::U32, hi, 4u32, i0);
    let qa = at(kb, blk, off);
    let nshift = kb.and(Ty::U32, s, 4u32);
    let qs = ld_u64_words(kb, qa, if q5 { 48 } else { 16 });
    let mut q = [field4(kb, qs[0], nshift, 0x0f0f_0f0f), field4(kb, qs[1], nshift, 0x0f0f_0f0f)];
    if q5 {
        let ha = at(kb, blk, i0);
        let qh = ld_u64_words(kb, ha, 16);
        for w in 0..2 {
            let h = field4(kb, qh[w], j, 0x0101_0101);
            q[w] = or_shl(kb, q[w], h, 4);
        }
    }
    fma8(kb, q, if q5 { 31 } else { 15 }, d1, nm1)
}

/// Q6_K, 210 bytes: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits, 2-bit
/// planes), `scales[16]` (i8, one per 16 weights), `d` (f16). In each half
/// h of 128 weights, weight 128h + 32p + i has the nibble (p >> 1) of
/// ql[64h + 32·(p & 1) + i] and bits 2p.. of qh[32h + i]. w = d·sc·(q − 32).
fn q6_k(kb: &mut Kb, row: Reg, g: Reg) -> [Reg; 8] {
    let (blk, s) = block_of(kb, row, g, 32, 210);
    let j = shr32(kb, s, 1);
    let sa = at(kb, blk, j);
    let sc = kb.ld(Mem::S8, sa, 192);
    let scf = kb.cvt(Ty::F32, sc);
    let d = ld_f16(kb, blk, 208);
    let dl = kb.mul(Ty::F32, d, scf);
    let m32 = kb.mul(Ty::F32, dl, -32.0f32);
    // qh: the 2-bit plane layout.
    let (hoff, hshift) = plane2(kb, s);
    let ha = at(kb, blk, hoff);
    let qh = ld_u16_words(kb, ha, 128);
    // ql: 64·(s >> 4) + 32·((s >> 2) & 1) + 8·(s & 3) = 4·(s & 16) + 8·(s & 4) + 8·(s & 3).
    let h64 = kb.and(Ty::U32, s, 16u32);
    let p32 = kb.and(Ty::U32, s, 4u32);
    let i8_ = kb.and(Ty::U32, s, 3u32);
    let i8_ = kb.shl(Ty::U32, i8_, 3u32);
    let off = kb.mad(Ty::U32, h64, 4u32, i8_);
    let off = kb.mad(Ty::U32, p32, 8u32, off);
    let la = at(kb, blk, off);
    let ql = ld_u16_words(kb, la, 0);
    // Nibble 4·((s >> 3) & 1) = (s >> 1) & 4.
    let lshift = shr32(kb, s, 1);
    let lshift = kb.and(Ty::U32, lshift, 4u32);
    let q = std::array::from_fn(|w| {
        let l = field4(kb, ql[w], lshift, 0x0f0f_0f0f);
        let h = field4(kb, qh[w], hshift, 0x0303_0303);
        or_shl(kb, l, h, 4)
    });
    fma8(kb, q, 63, dl, m32)
}

// ---- kq2 ----------------------------------------------------------------

/// Bytes of kq2's magnitude table in [`tables`]: 8 per entry.
const KQ2_ABS_BYTES: usize = 8 * KQ2_ABS_ENTRIES;

/// kq2's tables: 512 magnitude entries of 8 bytes, then 128 f32 scales.
///
/// Entry i, byte j: `2·A[i]ⱼ + 17` (A[i]ⱼ ∈ {1,3,5,7}, so 19..=31), and bit
/// 7 of byte 0 holds the sign parity P(i). Scale k: `kq2_scale(k) / 4`
/// (exact: a power of two).
fn kq2_tables() -> Vec<u8> {
    let mut t = Vec::with_capacity(KQ2_ABS_BYTES + 4 * (KQ2_SCALE_MAX as usize + 1));
    for a in kq2_abs_codebook() {
        let p = (a.iter().map(|&v| u32::from(v)).sum::<u32>() / 2 % 2) as u8;
        for (j, &v) in a.iter().enumerate() {
            t.push((2 * v + 17) | if j == 0 { p << 7 } else { 0 });
        }
    }
    for k in 0..=KQ2_SCALE_MAX {
        t.extend((kq2_scale(k) * 0.25).to_le_bytes());
    }
    t
}

/// kq2, 18 bytes per 64 weights: byte 0 = U (bit 7) | scale index k; byte 1
/// bit s = bit 8 of group s's magnitude index; then per group a u16: bits
/// 0–7 index, 8–14 signs σ₀..σ₆, 15 shift t. Storage value
/// v_j = scale(k)·(±A_j/2 + (t ? −¼ : ¼)), σ₇ from the parity rule.
///
/// In quarters, 4·c_j = σ_j·2A_j + τ (σ, τ = ±1), computed as the byte
/// B_j = 16 + 4·c_j ∈ 1..=31 for four coordinates at once, so that
/// v_j = fma(B_j, s/4, −16·s/4) (exact: one rounding of s·c_j, like the
/// reference). With u = 16 + 2A_j + σ_j·τ = T − 2e (T the table byte 2A_j + 17,
/// e = [σ = −1] xor t): B = u for σ = +1 and 32 − u = (u ^ 31) + 1 for σ = −1.
fn kq2(kb: &mut Kb, row: Reg, g: Reg, tables: Reg) -> Group {
    let (blk, s) = block_of(kb, row, g, 8, 18);
    let hdr = kb.ld(Mem::U16, blk, 0);
    let go = kb.shl(Ty::U32, s, 1u32);
    let ga = at(kb, blk, go);
    let code = kb.ld(Mem::U16, ga, 2);
    let unrotated = kb.and(Ty::U32, hdr, 0x80u32);
    let rotated = kb.setp(Cmp::Eq, unrotated, 0u32);
    // Magnitude index: low byte of the group's u16, bit 8 from byte 1 of the header.
    let s8 = kb.add(Ty::U32, s, 8u32);
    let i8_ = field4(kb, hdr, s8, 1);
    let ilo = kb.and(Ty::U32, code, 0xffu32);
    let idx = kb.mad(Ty::U32, i8_, 256u32, ilo);
    let ta = kb.index(tables, idx, 8);
    let t = ld_u32_words(kb, ta, 0);
    let k = kb.and(Ty::U32, hdr, 0x7fu32);
    let sa = kb.index(tables, k, 4);
    let s4 = kb.ld(Mem::F32, sa, KQ2_ABS_BYTES as i32);
    let m16 = kb.mul(Ty::F32, s4, -16.0f32);
    // σ bits (1 = negative): the 7 stored, the 8th makes their parity P(idx).
    let sg7 = bits(kb, code, 8, 0x7f);
    let p = bits(kb, t[0], 7, 1);
    let n = kb.un(UnOp::Popc, Ty::U32, sg7);
    let n = kb.add(Ty::U32, n, p);
    let b7 = kb.and(Ty::U32, n, 1u32);
    let sg = kb.mad(Ty::U32, b7, 128u32, sg7);
    let tb = shr32(kb, code, 15);
    let tm = kb.mul(Ty::U32, tb, 0xffu32);
    let e = kb.bin(BinOp::Xor, Ty::U32, sg, tm);
    let b = std::array::from_fn(|w| {
        // Bits 4w..4w+4 of σ and e spread to bit 0 (σ) and bit 1 (2e) of each byte.
        let (sn, en) = if w == 0 {
            (kb.and(Ty::U32, sg, 15u32), kb.and(Ty::U32, e, 15u32))
        } else {
            (shr32(kb, sg, 4), shr32(kb, e, 4))
        };
        let sm = kb.mul(Ty::U32, sn, 0x0020_4081u32);
        let sb = kb.and(Ty::U32, sm, 0x0101_0101u32);
        let em = kb.mul(Ty::U32, en, 0x0040_8102u32);
        let e2 = kb.and(Ty::U32, em, 0x0202_0202u32);
        let uu = kb.sub(Ty::U32, t[w], e2);
        let flip = kb.mul(Ty::U32, sb, 31u32);
        let x = kb.bin(BinOp::Xor, Ty::U32, uu, flip);
        kb.add(Ty::U32, x, sb)
    });
    let w = fma8(kb, b, 0x1f, s4, m16);
    Group { w, rotated: Some(rotated) }
}

/// Lookup tables the matmul reads for `dtype` (kq2's magnitudes and scales).
pub fn tables(dtype: DType) -> Option<Vec<u8>> {
    (dtype == DType::KQ2).then(kq2_tables)
}

// ---- kq2 activation rotation ---------------------------------------------

/// S[j] of kq2's rotation: true (negate) where bit j of [`KQ2_RHT_SIGNS`] is set.
fn rht_negate(j: usize) -> bool {
    KQ2_RHT_SIGNS >> j & 1 == 1
}

/// kq2's block rotation of activations on the host: `x` is `[T, k]`
/// row-major (k a multiple of 64, so every 64-block lies in one row) and
/// each 64-block b becomes `H·(S ⊙ b)/8`, H the Sylvester–Hadamard matrix
/// run as the radix-2 butterfly (stages 1, 2, … 32, like `kiln_quant::kq2`).
pub fn rotate_host(x: &[f32], k: usize) -> Vec<f32> {
    assert!(k.is_multiple_of(64) && x.len().is_multiple_of(64), "rotate_host: k = {k}, {} values", x.len());
    let mut y = x.to_vec();
    for b in y.chunks_exact_mut(64) {
        for (j, v) in b.iter_mut().enumerate() {
            if rht_negate(j) {
                *v = -*v;
            }
        }
        let mut h = 1;
        while h < 64 {
            for i in (0..64).step_by(2 * h) {
                for j in i..i + h {
                    let (a, c) = (b[j], b[j + h]);
                    b[j] = a + c;
                    b[j + h] = a - c;
                }
            }
            h *= 2;
        }
        for v in b.iter_mut() {
            *v *= 0.125;
        }
    }
    y
}

/// kq2's rotation on the device, bit-identical to [`rotate_host`]:
/// arguments `x, y, n` (`n = T·k` elements, a multiple of 64; `y` may be
/// `x`). Blocks of [`BLOCK`] threads, one element each, so a block rotates two
/// 64-chunks; grid `ceil(n / 128)`. Butterfly stages 1..16 are warp
/// shuffles, stage 32 (across the chunk's two warps) goes through shared memory.
pub fn rotate_kernel() -> Kernel {
    assert_eq!(BLOCK, 128, "rotate_kernel assumes two 64-chunks per block");
    let mut kb = Kb::new("kq2_rotate", &[("x", ParamTy::Ptr), ("y", ParamTy::Ptr), ("n", ParamTy::U32)], BLOCK);
    let (x, y, n) = (kb.param(0), kb.param(1), kb.param(2));
    let smem_off = kb.shared(4 * BLOCK);
    let smem = kb.shared_base();
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let i = kb.mad(Ty::U32, cta, BLOCK, tid);
    // The second chunk of the last block may lie past n: its threads carry 0.
    let ok = kb.setp(Cmp::Lt, i, n);
    let xa = kb.index(x, i, 4);
    let v = kb.imm(Ty::F32, 0.0f32);
    kb.guarded(ok, false, |kb| {
        let xv = kb.ld(Mem::F32, xa, 0);
        kb.mov_to(v, xv);
    });
    // S: bit (tid & 63) of the 64-bit sign mask, from its 32-bit halves.
    let lane = kb.and(Ty::U32, tid, 31u32);
    let upper = kb.and(Ty::U32, tid, 32u32);
    let upper = kb.setp(Cmp::Ne, upper, 0u32);
    let mask = kb.selp(Ty::U32, (KQ2_RHT_SIGNS >> 32) as u32, KQ2_RHT_SIGNS as u32, upper);
    let sbit = kb.shr(Ty::U32, mask, lane);
    let sbit = kb.and(Ty::U32, sbit, 1u32);
    let neg = kb.setp(Cmp::Ne, sbit, 0u32);
    let nv = kb.un(UnOp::Neg, Ty::F32, v);
    let mut v = kb.selp(Ty::F32, nv, v, neg);
    // v[j], v[j + h] ← v[j] + v[j + h], v[j] − v[j + h].
    let butterfly = |kb: &mut Kb, v: Reg, other: Reg, high: Reg| {
        let sum = kb.add(Ty::F32, v, other);
        let diff = kb.sub(Ty::F32, other, v);
        kb.selp(Ty::F32, diff, sum, high)
    };
    for h in [1u32, 2, 4, 8, 16] {
        let other = kb.shfl(Shfl::Bfly, v, h);
        let hb = kb.and(Ty::U32, lane, h);
        let high = kb.setp(Cmp::Ne, hb, 0u32);
        v = butterfly(&mut kb, v, other, high);
    }
    let slot = kb.mad(Ty::U32, tid, 4u32, smem);
    kb.st_shared(slot, smem_off as i32, v);
    kb.bar();
    let pt = kb.bin(BinOp::Xor, Ty::U32, tid, 32u32);
    let pslot = kb.mad(Ty::U32, pt, 4u32, smem);
    let other = kb.ld_shared(pslot, smem_off as i32);
    let v = butterfly(&mut kb, v, other, upper);
    let r = kb.mul(Ty::F32, v, 0.125f32);
    let ya = kb.index(y, i, 4);
    kb.guarded(ok, false, |kb| kb.st(Mem::F32, ya, 0, r));
    kb.finish()
}
