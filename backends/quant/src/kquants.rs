//! The 256-element ggml "k-quant" super-block formats Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: bit-exact dequantization.
//!
//! Layouts (little-endian; `d`/`dmin` are f16; QK_K = 256):
//! - Q2_K (84 B): `scales[16]` (low nibble scale, high nibble min), `qs[64]` (2-bit), `d`, `dmin`.
//! - Q3_K (110 B): `hmask[32]`, `qs[64]` (low 2 bits), `scales[12]` (16 packed 6-bit scales), `d`.
//! - Q4_K (144 B): `d`, `dmin`, `scales[12]` (8 packed 6-bit scale/min pairs), `qs[128]` (4-bit).
//! - Q5_K (176 B): `d`, `dmin`, `scales[12]`, `qh[32]` (5th bits), `qs[128]`.
//! - Q6_K (210 B): `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]: i8`, `d`.
//!
//! Arithmetic is f32 and grouped as in ggml's `dequantize_row_*` (and
//! gguf-py): per-sub-block factors `d * scale` and `dmin * min` are rounded
//! to f32 first, then `factor * q - min_factor`.

use super::plain::f16_le;

pub(crate) const QK_K: usize = 256;

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_le([b[at], b[at + 1]])
}

pub(crate) fn dequant_q2_k(b: &[u8; 84], out: &mut [f32; QK_K]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    // Two 128-element halves; each uses 32 bytes of qs at 4 shifts.
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in 0..4 {
            for part in 0..2 {
                let sc = scales[half * 8 + shift * 2 + part];
                let dl = d * f32::from(sc & 0x0f);
                let ml = dmin * f32::from(sc >> 4);
                let base = half * 128 + shift * 32 + part * 16;
                for l in 0..16 {
                    let v = (q[part * 16 + l] >> (2 * shift)) & 3;
                    out[base + l] = dl * f32::from(v) - ml;
                }
            }
        }
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block.
#[inline]
pub fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

pub(crate) fn dequant_q3_k(b: &[u8; 110], out: &mut [f32; QK_K]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in 0..4 {
            // Bit index into hmask: one bit per 32-element group.
            let hbit = half * 4 + shift;
            for part in 0..2 {
                let dl = d * f32::from(scales[half * 8 + shift * 2 + part]);
                let base = half * 128 + shift * 32 + part * 16;
                for l in 0..16 {
                    let i = part * 16 + l;
                    let low = ((q[i] >> (2 * shift)) & 3) as i8;
                    let sub = if (hmask[i] >> hbit) & 1 == 0 { 4 } else { 0 };
                    out[base + l] = dl * f32::from(low - sub);
                }
            }
        }
    }
}

/// Scale and min (6 bits each) of sub-block `j` of a Q4_K/Q5_K block
/// (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

pub(crate) fn dequant_q4_k(b: &[u8; 144], out: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Four 64-element groups; each uses 32 bytes: low nibbles, then high.
    for g in 0..4 {
        let q = &qs[g * 32..g * 32 + 32];
        for nib in 0..2 {
            let (sc, m) = scale_min_k4(g * 2 + nib, scales);
            let d1 = d * f32::from(sc);
            let m1 = dmin * f32::from(m);
            let o = &mut out[g * 64 + nib * 32..g * 64 + nib * 32 + 32];
            for (ol, &ql) in o.iter_mut().zip(q) {
                *ol = d1 * f32::from((ql >> (4 * nib)) & 0x0f) - m1;
            }
        }
    }
}

pub(crate) fn dequant_q5_k(b: &[u8; 176], out: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for g in 0..4 {
        let q = &qs[g * 32..g * 32 + 32];
        for nib in 0..2 {
            let j = g * 2 + nib;
            let (sc, m) = scale_min_k4(j, scales);
            let d1 = d * f32::from(sc);
            let m1 = dmin * f32::from(m);
            let o = &mut out[j * 32..j * 32 + 32];
            for ((ol, &ql), &h) in o.iter_mut().zip(q).zip(qh) {
                let v = ((ql >> (4 * nib)) & 0x0f) | (((h >> j) & 1) << 4);
                *ol = d1 * f32::from(v) - m1;
            }
        }
    }
}

pub(crate) fn dequant_q6_k(b: &[u8; 210], out: &mut [f32; QK_K]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    // Two 128-element halves; each uses 64 bytes of ql and 32 of qh.
    for half in 0..2 {
        let ql = &ql[half * 64..half * 64 + 64];
        let qh = &qh[half * 32..half * 32 + 32];
        for quarter in 0..4 {
            // quarter 0: ql[l] low, 1: ql[l+32] low, 2: ql[l] high, 3: ql[l+32] high.
            let lo_off = (quarter & 1) * 32;
            let lo_shift = (quarter >> 1) * 4;
            for part in 0..2 {
                let sub = half * 8 + quarter * 2 + part;
                let dl = d * f32::from(scales[sub] as i8);
                let base = half * 128 + quarter * 32 + part * 16;
                for l in 0..16 {
                    let i = part * 16 + l;
                    let lo = (ql[lo_off + i] >> lo_shift) & 0x0f;
                    let hi = (qh[i] >> (2 * quarter)) & 3;
                    let q = (lo | (hi << 4)) as i8 - 32;
                    out[base + l] = dl * f32::from(q);
                }
            }
        }
    }
}
