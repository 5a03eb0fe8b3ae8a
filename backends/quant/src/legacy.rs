//! The 32-element "legacy" ggml block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: bit-exact dequantization and reference quantizers.
//!
//! Layouts (all little-endian, `d`/`m` are f16):
//! - Q4_0 (18 B): `d`, `qs[16]`; element `j < 16` is `qs[j] & 15`, element `j + 16` is `qs[j] >> 4`; value `d * (q - 8)`.
//! - Q4_1 (20 B): `d`, `m`, `qs[16]`; value `d * q + m`.
//! - Q5_0 (22 B): `d`, `qh: u32`, `qs[16]`; bit `j` of `qh` is bit 4 of element `j`; value `d * (q - 16)`.
//! - Q5_1 (24 B): `d`, `m`, `qh: u32`, `qs[16]`; value `d * q + m`.
//! - Q8_0 (34 B): `d`, `qs[32]: i8`; value `q * d`.
//!
//! The arithmetic is done in f32 in the same order as ggml's
//! `dequantize_row_*` and gguf-py's `dequantize_blocks`, so results are
//! bit-identical. The quantizers follow ggml's `quantize_row_*_ref`, and the
//! importance-weighted ones ggml's `quantize_row_*_impl` (what
//! `quantize_q4_0` … `quantize_q5_1` run when given an imatrix).

use super::kquants_quant::{MinFit, Search, imatrix_weights, make_qkx_quants, make_qx_quants};
use super::plain::{f16_le, f32_to_f16_bits};

pub(crate) const QK: usize = 32;

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_le([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn dequant_q4_0(b: &[u8; 18], out: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..QK / 2 {
        out[j] = d * f32::from((qs[j] & 0x0f) as i8 - 8);
        out[j + QK / 2] = d * f32::from((qs[j] >> 4) as i8 - 8);
    }
}

#[inline]
pub(crate) fn dequant_q4_1(b: &[u8; 20], out: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..QK / 2 {
        out[j] = d * f32::from(qs[j] & 0x0f) + m;
        out[j + QK / 2] = d * f32::from(qs[j] >> 4) + m;
    }
}

#[inline]
pub(crate) fn dequant_q5_0(b: &[u8; 22], out: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + QK / 2)) & 1) << 4) as u8;
        let q0 = ((qs[j] & 0x0f) | h0) as i8 - 16;
        let q1 = ((qs[j] >> 4) | h1) as i8 - 16;
        out[j] = d * f32::from(q0);
        out[j + QK / 2] = d * f32::from(q1);
    }
}

#[inline]
pub(crate) fn dequant_q5_1(b: &[u8; 24], out: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..QK / 2 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + QK / 2)) & 1) << 4) as u8;
        out[j] = d * f32::from((qs[j] & 0x0f) | h0) + m;
        out[j + QK / 2] = d * f32::from((qs[j] >> 4) | h1) + m;
    }
}

#[inline]
pub(crate) fn dequant_q8_0(b: &[u8; 34], out: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// `1/d`, or 0 when `d` is 0 (ggml's `d ? 1.0f/d : 0.0f`).
#[inline]
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// The element with the largest magnitude (the first one on ties), as ggml's
/// `quantize_row_q4_0_ref` finds it.
#[inline]
fn signed_absmax(x: &[f32; QK]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum like ggml's reference loops (start at ±FLT_MAX).
#[inline]
fn min_max(x: &[f32; QK]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `(int8_t)(v)` for values ggml guarantees to be in range; saturating here
/// (and 0 for NaN) instead of undefined behaviour.
#[inline]
fn trunc_i8(v: f32) -> i8 {
    v as i8
}

pub(crate) fn quant_q4_0(x: &[f32; QK], b: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for j in 0..QK / 2 {
        let q0 = trunc_i8(x[j] * id + 8.5).clamp(0, 15) as u8;
        let q1 = trunc_i8(x[j + QK / 2] * id + 8.5).clamp(0, 15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

pub(crate) fn quant_q4_1(x: &[f32; QK], b: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16_bits(min).to_le_bytes());
    for j in 0..QK / 2 {
        let q0 = trunc_i8((x[j] - min) * id + 0.5).clamp(0, 15) as u8;
        let q1 = trunc_i8((x[j + QK / 2] - min) * id + 0.5).clamp(0, 15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

pub(crate) fn quant_q5_0(x: &[f32; QK], b: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let q0 = trunc_i8(x[j] * id + 16.5).clamp(0, 31) as u8;
        let q1 = trunc_i8(x[j + QK / 2] * id + 16.5).clamp(0, 31) as u8;
        b[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + QK / 2);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

pub(crate) fn quant_q5_1(x: &[f32; QK], b: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16_bits(min).to_le_bytes());
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let q0 = trunc_i8((x[j] - min) * id + 0.5).clamp(0, 31) as u8;
        let q1 = trunc_i8((x[j + QK / 2] - min) * id + 0.5).clamp(0, 31) as u8;
        b[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + QK / 2);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

pub(crate) fn quant_q8_0(x: &[f32; QK], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        // roundf: half away from zero; `as` saturates (ggml's is UB out of range).
        *q = ((v * id).round() as i8) as u8;
    }
}

/// Quantizes a whole row with importance weights `qw` (one per element), as
/// ggml's `quantize_row_*_impl` do: the weights are `qw · sqrt(σ² + x²)` with
/// σ² the mean square of the *row*, so this cannot work block by block.
/// Lengths are checked by the caller.
pub(crate) fn quant_row_weighted<const B: usize>(
    x: &[f32],
    qw: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; QK], &[f32; QK], &mut [u8; B]),
) {
    let sum_x2 = x.iter().fold(0.0f32, |s, &v| s + v * v);
    let sigma2 = sum_x2 / x.len() as f32;
    let blocks = x.as_chunks::<QK>().0.iter().zip(qw.as_chunks::<QK>().0);
    for ((xb, qb), b) in blocks.zip(dst.as_chunks_mut::<B>().0) {
        f(xb, &imatrix_weights(xb, qb, sigma2), b);
    }
}

/// The asymmetric search of the weighted Q4_1/Q5_1 quantizers.
const fn legacy_fit(nmax: i32) -> MinFit {
    MinFit { search: Search::Qkx3, nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false }
}

/// One Q4_0 block from its final weights (`quantize_row_q4_0_impl`).
pub(crate) fn quant_q4_0_weighted(x: &[f32; QK], w: &[f32; QK], b: &mut [u8; 18]) {
    let mut l = [0i8; QK];
    let d = make_qx_quants(8, x, &mut l, Some(w));
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for j in 0..QK / 2 {
        b[2 + j] = (l[j] as u8) | ((l[j + QK / 2] as u8) << 4);
    }
}

/// One Q4_1 block from its final weights (`quantize_row_q4_1_impl`).
pub(crate) fn quant_q4_1_weighted(x: &[f32; QK], w: &[f32; QK], b: &mut [u8; 20]) {
    let (mut l, mut aux) = ([0u8; QK], [0u8; QK]);
    let (d, min) = make_qkx_quants(&legacy_fit(15), x, w, &mut l, &mut aux);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16_bits(-min).to_le_bytes());
    for j in 0..QK / 2 {
        b[4 + j] = l[j] | (l[j + QK / 2] << 4);
    }
}

/// Packs 5-bit quants `l` into `qh` (fifth bits) and `qs` (low nibbles).
fn pack_q5(l: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut h = 0u32;
    for j in 0..QK / 2 {
        let (q0, q1) = (l[j], l[j + QK / 2]);
        qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        h |= u32::from((q0 & 0x10) >> 4) << j;
        h |= u32::from((q1 & 0x10) >> 4) << (j + QK / 2);
    }
    qh.copy_from_slice(&h.to_le_bytes());
}

/// One Q5_0 block from its final weights (`quantize_row_q5_0_impl`).
pub(crate) fn quant_q5_0_weighted(x: &[f32; QK], w: &[f32; QK], b: &mut [u8; 22]) {
    let mut l = [0i8; QK];
    let d = make_qx_quants(16, x, &mut l, Some(w));
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    let l: [u8; QK] = std::array::from_fn(|j| l[j] as u8);
    let (qh, qs) = b[2..].split_at_mut(4);
    pack_q5(&l, qh, qs);
}

/// One Q5_1 block from its final weights (`quantize_row_q5_1_impl`).
pub(crate) fn quant_q5_1_weighted(x: &[f32; QK], w: &[f32; QK], b: &mut [u8; 24]) {
    let (mut l, mut aux) = ([0u8; QK], [0u8; QK]);
    let (d, min) = make_qkx_quants(&legacy_fit(31), x, w, &mut l, &mut aux);
    b[0..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16_bits(-min).to_le_bytes());
    let (qh, qs) = b[4..].split_at_mut(4);
    pack_q5(&l, qh, qs);
}
