//! Plain (unblocked) little-endian float formats: F32, F16, BF16 and FP8 E4M3 conversion,
//! dequantization and dot products.

/// Converts IEEE half-precision bits to `f32`, exactly.
///
/// NaN payloads are kept as they are (shifted into the f32 mantissa), the way
/// numpy's conversion does, so signalling NaNs stay signalling. Branch-free
/// (selects only) so loops over it vectorize.
#[inline]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let h = u32::from(bits);
    // Exponent and mantissa moved into f32 position.
    let o = (h & 0x7fff) << 13;
    let exp = o & 0x0f80_0000;
    // Normal numbers: rebias the exponent from 15 to 127.
    let normal = o + 0x3800_0000;
    // Infinity/NaN: exponent all ones, mantissa (payload) kept.
    let inf_nan = normal + 0x3800_0000;
    // Zero/subnormal: man * 2^-24, computed exactly as (2^-14 + man * 2^-24) - 2^-14.
    let subnormal = (f32::from_bits(o + 0x3880_0000) - f32::from_bits(0x3880_0000)).to_bits();
    let mag = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(mag | ((h & 0x8000) << 16))
}

/// Reads the little-endian f16 at `bytes[0..2]` as `f32`.
#[inline]
pub(crate) fn f16_le(bytes: [u8; 2]) -> f32 {
    f16_to_f32(u16::from_le_bytes(bytes))
}

/// Rounds an `f32` to half precision (round to nearest, ties to even), as
/// `GGML_FP32_TO_FP16` and numpy's `astype(np.float16)` do.
#[inline]
pub(crate) fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Converts bfloat16 bits to `f32` (exact: bf16 is the top half of an f32).
#[inline]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Rounds an `f32` to bfloat16 like ggml's `ggml_compute_fp32_to_bf16`:
/// NaNs are forced quiet, everything else rounds to nearest even.
#[inline]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
}

/// Largest finite FP8 E4M3 value.
pub const F8E4M3_MAX: f32 = 448.0;

/// Converts FP8 E4M3 (`e4m3fn`) bits to `f32`, exactly.
///
/// The seven magnitude bits placed at the top of an f32's exponent-and-mantissa field make
/// an f32 that is the value times 2^-120 (an E4M3 subnormal becomes an f32 subnormal of the
/// same mantissa), so one multiply by 2^120 finishes the job; 0x7f/0xff are NaN. Kernels
/// that decode FP8 with integer ops (PTX without sm_89, WGSL, AVX2) use the same identity.
#[inline]
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    if bits & 0x7f == 0x7f {
        return f32::NAN;
    }
    let mag = f32::from_bits(u32::from(bits & 0x7f) << 20) * f32::from_bits((127 + 120) << 23);
    if bits & 0x80 != 0 { -mag } else { mag }
}

/// Rounds an `f32` to FP8 E4M3 the way PTX's `cvt.rn.satfinite.e4m3x2.f32` does: to
/// nearest, ties to even; magnitudes beyond 448 (infinities included) saturate to ±448;
/// NaN becomes 0x7f (with the sign).
#[inline]
pub fn f32_to_f8e4m3_bits(x: f32) -> u8 {
    let u = x.to_bits();
    let sign = ((u >> 24) & 0x80) as u8;
    let a = u & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7f;
    }
    let mag = if a < 0x3c80_0000 {
        // Below 2^-6: a multiple of 2^-9 (the subnormal step). The sum's rounding to
        // an integer number of steps is round-to-nearest-even; 8 steps is 2^-6, whose
        // code (exponent 1, mantissa 0) is 8 as well.
        let steps = f32::from_bits(a) * 512.0;
        ((steps + 8_388_608.0) - 8_388_608.0) as u32
    } else {
        // Normal: round the 23-bit mantissa to 3 bits (nearest, ties to even; a carry
        // moves into the exponent), then rebias the exponent from 127 to 7.
        let r = (a + 0x7_ffff + ((a >> 20) & 1)) >> 20;
        r - ((127 - 7) << 3)
    };
    sign | mag.min(0x7e) as u8
}

pub(crate) fn dequant_f8e4m3(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f8e4m3_to_f32(*s);
    }
}

pub(crate) fn quant_f8e4m3(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32_to_f8e4m3_bits(*s);
    }
}

pub(crate) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.as_chunks::<4>().0) {
        *d = f32::from_le_bytes(*s);
    }
}

pub(crate) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
        *d = f16_le(*s);
    }
}

pub(crate) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.as_chunks::<2>().0) {
        *d = bf16_to_f32(u16::from_le_bytes(*s));
    }
}

pub(crate) fn quant_f32(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.as_chunks_mut::<4>().0.iter_mut().zip(src) {
        *d = s.to_le_bytes();
    }
}

pub(crate) fn quant_f16(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
        *d = f32_to_f16_bits(*s).to_le_bytes();
    }
}

pub(crate) fn quant_bf16(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.as_chunks_mut::<2>().0.iter_mut().zip(src) {
        *d = f32_to_bf16_bits(*s).to_le_bytes();
    }
}

/// Dot product of a row of plain elements with `x`: converts 256 elements
/// at a time into a stack buffer with `conv` (a vectorizable loop), then
/// multiplies into eight accumulators. `row` holds exactly `x.len()`
/// elements of `elem_bytes` bytes.
#[inline]
fn dot_buffered(row: &[u8], x: &[f32], elem_bytes: usize, conv: fn(&[u8], &mut [f32])) -> f32 {
    const CHUNK: usize = 256;
    let mut buf = [0.0f32; CHUNK];
    let mut acc = [0.0f32; super::LANES];
    let mut tail = 0.0f32;
    for (xs, rs) in x.chunks(CHUNK).zip(row.chunks(CHUNK * elem_bytes)) {
        let w = &mut buf[..xs.len()];
        conv(rs, w);
        let (w_full, w_tail) = w.as_chunks::<{ super::LANES }>();
        let (x_full, x_tail) = xs.as_chunks::<{ super::LANES }>();
        for (ws, vs) in w_full.iter().zip(x_full) {
            for k in 0..super::LANES {
                acc[k] += ws[k] * vs[k];
            }
        }
        for (wv, xv) in w_tail.iter().zip(x_tail) {
            tail += wv * xv;
        }
    }
    super::sum_lanes(&acc) + tail
}

pub(crate) fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_buffered(row, x, 4, dequant_f32)
}

pub(crate) fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_buffered(row, x, 2, dequant_f16)
}

pub(crate) fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_buffered(row, x, 2, dequant_bf16)
}

pub(crate) fn dot_f8e4m3(row: &[u8], x: &[f32]) -> f32 {
    dot_buffered(row, x, 1, dequant_f8e4m3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_non_nan_value() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let ours = f16_to_f32(bits);
            if h.is_nan() {
                assert!(ours.is_nan(), "{bits:#06x}");
                // Payload is preserved, quiet bit untouched.
                assert_eq!(ours.to_bits() & 0x003f_ffff, u32::from(bits & 0x1ff) << 13);
            } else {
                assert_eq!(ours.to_bits(), h.to_f32().to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn f16_round_trip_is_identity_for_non_nan() {
        for bits in 0..=u16::MAX {
            let f = f16_to_f32(bits);
            if !f.is_nan() {
                assert_eq!(f32_to_f16_bits(f), bits);
            }
        }
    }

    /// Every finite E4M3 value, from its definition: `(-1)^s · 2^(e−7) · (1 + m/8)`, or
    /// `2^-6 · m/8` for e = 0.
    fn e4m3_by_definition(bits: u8) -> Option<f64> {
        let (s, e, m) = (bits >> 7, (bits >> 3) & 15, bits & 7);
        if e == 15 && m == 7 {
            return None;
        }
        let mag = if e == 0 {
            f64::from(m) / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + f64::from(m) / 8.0) * 2f64.powi(i32::from(e) - 7)
        };
        Some(if s == 1 { -mag } else { mag })
    }

    #[test]
    fn f8e4m3_decoding_matches_the_definition_for_every_code() {
        for bits in 0..=255u8 {
            match e4m3_by_definition(bits) {
                Some(v) => assert_eq!(f64::from(f8e4m3_to_f32(bits)), v, "{bits:#04x}"),
                None => assert!(f8e4m3_to_f32(bits).is_nan(), "{bits:#04x}"),
            }
        }
        assert_eq!(f8e4m3_to_f32(0x7e), F8E4M3_MAX);
    }

    /// The nearest finite E4M3 value to `x` by search over all codes (ties to the even
    /// code, i.e. the one with mantissa bit 0), saturating: the definition the fast
    /// conversion must meet.
    fn e4m3_nearest(x: f32) -> u8 {
        let x = f64::from(x).clamp(-448.0, 448.0);
        let mut best: Option<(f64, u8)> = None;
        for bits in 0..=255u8 {
            let Some(v) = e4m3_by_definition(bits) else { continue };
            if (v < 0.0) != x.is_sign_negative() && v != 0.0 {
                continue;
            }
            let d = (v - x).abs();
            best = match best {
                Some((bd, bb)) if bd < d || (bd == d && bb & 1 == 0) => Some((bd, bb)),
                _ => Some((d, bits)),
            };
        }
        let b = best.expect("some code").1;
        // Zero keeps x's sign.
        if b & 0x7f == 0 { if x.is_sign_negative() { 0x80 } else { 0 } } else { b }
    }

    #[test]
    fn f8e4m3_rounding_is_nearest_even_and_saturates() {
        // Every code's value, the midpoints between neighbours and the points just off them.
        let mut xs = vec![0.0f32, -0.0, 1e-30, 460.0, 464.0, 1e9, f32::INFINITY, f32::NEG_INFINITY, f32::MAX];
        let vals: Vec<f64> = (0..=0x7eu8).filter_map(e4m3_by_definition).collect();
        for w in vals.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            for v in [w[0], mid] {
                let f = v as f32;
                xs.extend([f, f32::from_bits(f.to_bits() + 1), f32::from_bits(f.to_bits().saturating_sub(1))]);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            xs.push(f32::from_bits((seed >> 32) as u32 & 0x43ff_ffff | (seed as u32 & 0x8000_0000)));
        }
        for x in xs.iter().flat_map(|&x| [x, -x]) {
            assert_eq!(f32_to_f8e4m3_bits(x), e4m3_nearest(x), "{x:e} ({:#010x})", x.to_bits());
        }
        assert_eq!(f32_to_f8e4m3_bits(f32::NAN) & 0x7f, 0x7f);
        for bits in (0..=255u8).filter(|b| b & 0x7f != 0x7f) {
            assert_eq!(f32_to_f8e4m3_bits(f8e4m3_to_f32(bits)), bits, "{bits:#04x}");
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even_and_quiets_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // Exactly halfway between 0x3f80 and 0x3f81: ties to even (0x3f80).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        // Halfway between 0x3f81 and 0x3f82: ties to even (0x3f82).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_to_f32(0xbf80), -1.0);
    }
}
