//! Plain (unblocked) little-endian float formats: F32, F16 and BF16 conversion, dequantization and dot products.

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
