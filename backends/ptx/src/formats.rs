//! Weight layouts on the GPU: for each dtype, PTX that decodes one group of 8
//! consecutive weights of a row straight from the packed bytes (the fused
//! dequantization of the matmul kernel). Layouts are the same bytes as the
//! build's `weights.bin` (ggml blocks, kiln's kq2), so weights are uploaded
//! as they are.
//!
//! The legacy ggml blocks, IQ4_NL and plain floats are here; the K-quants and kq2 are
//! in [`crate::formats_k`].

use kiln_ir::DType;

use crate::ptx::{BinOp, Cmp, Kb, Mem, Reg, Ty, UnOp};

/// Eight decoded weights, and for kq2 whether their block is stored rotated
/// (then they multiply the block-rotated activations instead of `x`).
pub struct Group {
    pub w: [Reg; 8],
    /// A predicate: true when the group's block is in the Hadamard-rotated basis.
    pub rotated: Option<Reg>,
}

/// Whether the matmul kernel can read weights of `dtype`.
pub fn supported(dtype: DType) -> bool {
    !matches!(dtype, DType::I32)
}

/// Whether matmuls with weights of `dtype` read block-rotated activations (kq2).
pub fn needs_rotated_x(dtype: DType) -> bool {
    dtype == DType::KQ2
}

/// Emits the decoding of weights `8g .. 8g+8` of the row at `row` (a u64
/// global address). `g` is a u32 group index below `row_len / 8`. `tables`
/// is the address of the format's lookup tables ([`tables`]), if it has any.
pub fn decode8(kb: &mut Kb, dtype: DType, row: Reg, g: Reg, tables: Reg) -> Group {
    let plain = |w| Group { w, rotated: None };
    match dtype {
        DType::F32 => {
            let a = kb.index(row, g, 32);
            plain(std::array::from_fn(|i| kb.ld(Mem::F32, a, 4 * i as i32)))
        }
        DType::F16 => {
            let a = kb.index(row, g, 16);
            plain(std::array::from_fn(|i| {
                let h = kb.ld(Mem::B16, a, 2 * i as i32);
                kb.f16_to_f32(h)
            }))
        }
        DType::BF16 => {
            let a = kb.index(row, g, 16);
            plain(std::array::from_fn(|i| {
                let h = kb.ld(Mem::U16, a, 2 * i as i32);
                let s = kb.shl(Ty::U32, h, 16);
                kb.bits(Ty::F32, s)
            }))
        }
        DType::F8E4M3 => {
            // 8 bytes: two words (rows of whole groups start 4-byte aligned).
            let a = kb.index(row, g, 8);
            let words = [kb.ld(Mem::U32, a, 0), kb.ld(Mem::U32, a, 4)];
            plain(std::array::from_fn(|i| {
                let b = byte_of(kb, &words, 4, i, 0xff);
                f8e4m3_to_f32(kb, b)
            }))
        }
        DType::Q4_0 | DType::Q4_1 => {
            // 18-byte blocks are only 2-byte aligned, 20-byte blocks 4-byte aligned.
            let (bs, qs, has_min, width) = if dtype == DType::Q4_0 { (18, 2, false, 2) } else { (20, 4, true, 4) };
            let (blk, s) = block_of(kb, row, g, 4, bs);
            let d = ld_f16(kb, blk, 0);
            // w = q·d + m, or (q − 8)·d = q·d − 8d.
            let add = match has_min {
                true => ld_f16(kb, blk, 2),
                false => kb.mul(Ty::F32, d, -8.0f32),
            };
            let (a, shift) = nibble_source(kb, blk, s);
            let words = group_words(kb, a, qs, width, Some(shift));
            plain(std::array::from_fn(|i| {
                let q = byte_of(kb, &words, width, i, 15);
                let qf = kb.cvt(Ty::F32, q);
                kb.fma(qf, d, add)
            }))
        }
        DType::IQ4NL => {
            // Q4_0's layout; each nibble indexes the fixed table. With the table biased
            // by 128, w = (T[q] + 128)·d − 128d in one fma: exactly the reference's d·T[q].
            let (blk, s) = block_of(kb, row, g, 4, 18);
            let d = ld_f16(kb, blk, 0);
            let add = kb.mul(Ty::F32, d, -128.0f32);
            let (a, shift) = nibble_source(kb, blk, s);
            let words = group_words(kb, a, 2, 2, Some(shift));
            plain(std::array::from_fn(|i| {
                let q = byte_of(kb, &words, 2, i, 15);
                let t = iq4nl_biased(kb, q);
                let tf = kb.cvt(Ty::F32, t);
                kb.fma(tf, d, add)
            }))
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (bs, qh_off, qs, has_min, width) =
                if dtype == DType::Q5_0 { (22, 2, 6, false, 2) } else { (24, 4, 8, true, 4) };
            let (blk, s) = block_of(kb, row, g, 4, bs);
            let d = ld_f16(kb, blk, 0);
            let add = match has_min {
                true => ld_f16(kb, blk, 2),
                false => kb.mul(Ty::F32, d, -16.0f32),
            };
            // qh is 4 bytes at an even offset: two u16 loads.
            let lo = kb.ld(Mem::U16, blk, qh_off);
            let hi = kb.ld(Mem::U16, blk, qh_off + 2);
            let qh = kb.shl(Ty::U32, hi, 16);
            let qh = kb.bin(BinOp::Or, Ty::U32, qh, lo);
            // Bits 8s .. 8s+8 of qh belong to this group; move them to bit 4 of each weight.
            let sh = kb.shl(Ty::U32, s, 3);
            let qh = kb.shr(Ty::U32, qh, sh);
            let qh = kb.shl(Ty::U32, qh, 4);
            let (a, shift) = nibble_source(kb, blk, s);
            let words = group_words(kb, a, qs, width, Some(shift));
            plain(std::array::from_fn(|i| {
                let q = byte_of(kb, &words, width, i, 15);
                let h = if i == 0 { qh } else { kb.shr(Ty::U32, qh, i as u32) };
                let h = kb.and(Ty::U32, h, 16);
                let q = kb.bin(BinOp::Or, Ty::U32, q, h);
                let qf = kb.cvt(Ty::F32, q);
                kb.fma(qf, d, add)
            }))
        }
        DType::Q8_0 => {
            let (blk, s) = block_of(kb, row, g, 4, 34);
            let d = ld_f16(kb, blk, 0);
            let off = kb.shl(Ty::U32, s, 3);
            let off = kb.cvt(Ty::U64, off);
            let a = kb.add(Ty::U64, blk, off);
            // 34-byte blocks: the 8 quants sit at an even address.
            let words = group_words(kb, a, 2, 2, None);
            plain(std::array::from_fn(|i| {
                // Sign-extend byte i: move it to the top, shift back arithmetically.
                let up = kb.shl(Ty::U32, words[i / 2], 24 - 8 * (i as u32 % 2));
                let q = kb.shr(Ty::S32, up.as_ty(Ty::S32), 24);
                let qf = kb.cvt(Ty::F32, q);
                kb.mul(Ty::F32, qf, d)
            }))
        }
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K | DType::KQ2 => {
            crate::formats_k::decode8(kb, dtype, row, g, tables)
        }
        DType::I32 => unreachable!("i32 weights are rejected by supported()"),
    }
}

/// IQ4_NL's table (`kiln_quant::iq4nl::VALUES`) plus 128, as bytes of two u64
/// immediates: entries 0..8, then 8..16.
const IQ4NL_BIASED: [u64; 2] = {
    let mut w = [0u64; 2];
    let mut i = 0;
    while i < 16 {
        w[i / 8] |= ((kiln_quant::iq4nl::VALUES[i] as i16 + 128) as u64) << (8 * (i % 8));
        i += 1;
    }
    w
};

/// `T[q] + 128` (a u32 in 1..=241) for a nibble `q` (a u32 below 16): a register-only
/// lookup (select the half, shift its byte down), no table in memory.
fn iq4nl_biased(kb: &mut Kb, q: Reg) -> Reg {
    let upper = kb.setp(Cmp::Ge, q, 8u32);
    let half = kb.selp(Ty::U64, IQ4NL_BIASED[1] as i64, IQ4NL_BIASED[0] as i64, upper);
    let sh = kb.shl(Ty::U32, q, 3u32);
    let sh = kb.and(Ty::U32, sh, 56u32);
    let v = kb.shr(Ty::U64, half, sh);
    let v = kb.cvt(Ty::U32, v);
    kb.and(Ty::U32, v, 0xffu32)
}

/// Element `e` (a u32 index) of a row of unquantized weights, as f32.
pub fn load_plain(kb: &mut Kb, dtype: DType, row: Reg, e: Reg) -> Reg {
    match dtype {
        DType::F32 => {
            let a = kb.index(row, e, 4);
            kb.ld(Mem::F32, a, 0)
        }
        DType::F16 => {
            let a = kb.index(row, e, 2);
            let h = kb.ld(Mem::B16, a, 0);
            kb.f16_to_f32(h)
        }
        DType::BF16 => {
            let a = kb.index(row, e, 2);
            let h = kb.ld(Mem::U16, a, 0);
            let s = kb.shl(Ty::U32, h, 16);
            kb.bits(Ty::F32, s)
        }
        DType::F8E4M3 => {
            let a = kb.index(row, e, 1);
            let b = kb.ld(Mem::U8, a, 0);
            f8e4m3_to_f32(kb, b)
        }
        other => panic!("load_plain of {other}"),
    }
}

/// An FP8 E4M3 code (a u32 holding one byte) as f32, with integer ops (sm_80 has no FP8
/// conversion): exponent e > 0 moves into an f32 exponent rebiased by 120; e = 0 is
/// `m · 2^-9`, made without subnormals; 0x7f is NaN. Exact, so equal to
/// `kiln_quant::f8e4m3_to_f32` bit for bit.
pub(crate) fn f8e4m3_to_f32(kb: &mut Kb, c: Reg) -> Reg {
    let em = kb.and(Ty::U32, c, 0x7fu32);
    let normal = kb.shl(Ty::U32, em, 20u32);
    let normal = kb.add(Ty::U32, normal, 120u32 << 23);
    let normal = kb.bits(Ty::F32, normal);
    let m = kb.and(Ty::U32, c, 7u32);
    let mf = kb.cvt(Ty::F32, m);
    let sub = kb.mul(Ty::F32, mf, 1.0f32 / 512.0);
    let is_sub = kb.setp(Cmp::Lt, em, 8u32);
    let mag = kb.selp(Ty::F32, sub, normal, is_sub);
    let is_nan = kb.setp(Cmp::Eq, em, 0x7fu32);
    let mag = kb.selp(Ty::F32, f32::NAN, mag, is_nan);
    let neg = kb.setp(Cmp::Ge, c, 0x80u32);
    let minus = kb.un(UnOp::Neg, Ty::F32, mag);
    kb.selp(Ty::F32, minus, mag, neg)
}

/// An f32 rounded to an FP8 E4M3 code (u32), exactly as `kiln_quant::f32_to_f8e4m3_bits`
/// and `cvt.rn.satfinite.e4m3x2.f32`: nearest, ties to even, saturating at ±448, NaN to
/// 0x7f. Below 2^-6 the value is a count of 2^-9 steps rounded by `cvt.rni`; above it the
/// mantissa is rounded in the integer domain.
pub(crate) fn f32_to_f8e4m3(kb: &mut Kb, x: Reg) -> Reg {
    let u = kb.bits(Ty::U32, x);
    let sign = kb.shr(Ty::U32, u, 24u32);
    let sign = kb.and(Ty::U32, sign, 0x80u32);
    let a = kb.and(Ty::U32, u, 0x7fff_ffffu32);
    let af = kb.bits(Ty::F32, a);
    let steps = kb.mul(Ty::F32, af, 512.0f32);
    let sub = kb.cvt_rni(Ty::U32, steps);
    let lsb = kb.shr(Ty::U32, a, 20u32);
    let lsb = kb.and(Ty::U32, lsb, 1u32);
    let r = kb.add(Ty::U32, a, 0x7_ffffu32);
    let r = kb.add(Ty::U32, r, lsb);
    let r = kb.shr(Ty::U32, r, 20u32);
    let normal = kb.sub(Ty::U32, r, (127u32 - 7) << 3);
    let is_sub = kb.setp(Cmp::Lt, a, 0x3c80_0000u32);
    let mag = kb.selp(Ty::U32, sub, normal, is_sub);
    let mag = kb.bin(BinOp::Min, Ty::U32, mag, 0x7eu32);
    let is_nan = kb.setp(Cmp::Gt, a, 0x7f80_0000u32);
    let mag = kb.selp(Ty::U32, 0x7fu32, mag, is_nan);
    kb.bin(BinOp::Or, Ty::U32, mag, sign)
}

/// Lookup tables a format's kernels read (uploaded once per session), as bytes.
pub fn tables(dtype: DType) -> Option<Vec<u8>> {
    crate::formats_k::tables(dtype)
}

/// For a group `g` of a format with `groups_per_block` groups of 8 per block of
/// `block_bytes`: the block's address and the group's index `s` inside it.
pub(crate) fn block_of(kb: &mut Kb, row: Reg, g: Reg, groups_per_block: u32, block_bytes: u32) -> (Reg, Reg) {
    let sh = groups_per_block.trailing_zeros();
    debug_assert!(groups_per_block.is_power_of_two());
    let b = kb.shr(Ty::U32, g, sh);
    let s = kb.and(Ty::U32, g, groups_per_block - 1);
    let blk = kb.index(row, b, block_bytes);
    (blk, s)
}

/// An f16 at `base + off`, as f32.
pub(crate) fn ld_f16(kb: &mut Kb, base: Reg, off: i32) -> Reg {
    let h = kb.ld(Mem::B16, base, off);
    kb.f16_to_f32(h)
}

/// The 8 bytes at `a + off` read as `8 / width` little-endian words of `width`
/// bytes (2 or 4; the address must be aligned to it), each shifted right by `shift`.
fn group_words(kb: &mut Kb, a: Reg, off: i32, width: usize, shift: Option<Reg>) -> Vec<Reg> {
    let mem = if width == 4 { Mem::U32 } else { Mem::U16 };
    (0..8 / width)
        .map(|j| {
            let w = kb.ld(mem, a, off + (j * width) as i32);
            match shift {
                Some(sh) => kb.shr(Ty::U32, w, sh),
                None => w,
            }
        })
        .collect()
}

/// Byte `i` of the words of [`group_words`], masked with `mask`.
fn byte_of(kb: &mut Kb, words: &[Reg], width: usize, i: usize, mask: u32) -> Reg {
    let w = words[i / width];
    let sh = 8 * (i % width) as u32;
    let v = if sh == 0 { w } else { kb.shr(Ty::U32, w, sh) };
    kb.and(Ty::U32, v, mask)
}

/// For ggml's 32-weight nibble blocks (16 bytes of `qs`): group `s` (0..4) of
/// weights 8s..8s+8 reads bytes `8·(s mod 2) ..` shifted by `4·(s div 2)`.
/// Returns the block address advanced by the byte offset, and the shift.
fn nibble_source(kb: &mut Kb, blk: Reg, s: Reg) -> (Reg, Reg) {
    let half = kb.and(Ty::U32, s, 1);
    let boff = kb.shl(Ty::U32, half, 3);
    let boff = kb.cvt(Ty::U64, boff);
    let a = kb.add(Ty::U64, blk, boff);
    let hi = kb.shr(Ty::U32, s, 1);
    let shift = kb.shl(Ty::U32, hi, 2);
    (a, shift)
}
