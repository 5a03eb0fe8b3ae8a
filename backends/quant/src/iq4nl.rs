//! IQ4_NL: ggml's 4.5-bit non-linear block format. A block (18 B) is an f16 scale `d`
//! and 16 bytes `qs`; element `j < 16` is `T[qs[j] & 15]`, element `j + 16` is
//! `T[qs[j] >> 4]`, each times `d`, with `T` the fixed table [`VALUES`] of 16 signed
//! bytes (denser near zero, where most weights lie). It decodes as cheaply as Q4_0 (a
//! 16-entry byte lookup in place of `q − 8`) and fits weights better at 0.5 bits fewer
//! than Q5_0.
//!
//! Dequantization is bit-identical to ggml's `dequantize_row_iq4_nl` (and gguf-py's).
//! The quantizer is kiln's own (a weighted least-squares scale search over both signs
//! of the table's ends, then nearest-value refits with the stored f16 scale); blocks
//! are valid IQ4_NL for llama.cpp but not byte-identical to `llama-quantize`'s.

use super::plain::{f16_le, f32_to_f16_bits};

pub(crate) const QK: usize = 32;

/// The 16 values of the IQ4_NL table (ggml's `kvalues_iq4nl`), ascending.
pub const VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

#[inline]
pub(crate) fn dequant_iq4_nl(b: &[u8; 18], out: &mut [f32; QK]) {
    let d = f16_le([b[0], b[1]]);
    for j in 0..QK / 2 {
        out[j] = d * f32::from(VALUES[usize::from(b[2 + j] & 15)]);
        out[j + QK / 2] = d * f32::from(VALUES[usize::from(b[2 + j] >> 4)]);
    }
}

/// Midpoints between neighbouring table values: the index nearest to `v` is the number
/// of midpoints below it.
const MIDS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (VALUES[i] as f32 + VALUES[i + 1] as f32) * 0.5;
        i += 1;
    }
    m
};

/// The index of the table value nearest to `v` (ties to the lower; NaN gives 0).
#[inline]
fn nearest(v: f32) -> u8 {
    MIDS.iter().map(|&m| u8::from(v > m)).sum()
}

/// Indices nearest to `x / d` for every element, and the weighted least-squares scale
/// for them with its weighted squared error (`(0, ∞)` when no scale fits).
fn fit(x: &[f32; QK], w: &[f32; QK], inv: f32, l: &mut [u8; QK]) -> (f32, f32) {
    let (mut sxt, mut stt) = (0f64, 0f64);
    for i in 0..QK {
        l[i] = nearest(x[i] * inv);
        let t = f64::from(VALUES[usize::from(l[i])]);
        sxt += f64::from(w[i]) * f64::from(x[i]) * t;
        stt += f64::from(w[i]) * t * t;
    }
    if stt <= 0.0 {
        return (0.0, f32::INFINITY);
    }
    let d = sxt / stt;
    let err: f64 =
        (0..QK).map(|i| f64::from(w[i]) * (f64::from(x[i]) - d * f64::from(VALUES[usize::from(l[i])])).powi(2)).sum();
    (d as f32, err as f32)
}

/// One block: the scale minimizing `Σ w·(x − d·T[l])²` over candidate reciprocal scales
/// that put the element of largest magnitude at or near either end of the table, refined
/// by refitting the indices to the best scale; then stored as f16 and the indices fitted
/// once more to the stored scale.
pub(crate) fn quant_iq4_nl_weighted(x: &[f32; QK], w: &[f32; QK], b: &mut [u8; 18]) {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let mut l = [0u8; QK];
    if max == 0.0 || !max.is_finite() {
        b.fill(0);
        // Index 8 (value 1) times d = 0: every element 0.
        for q in &mut b[2..] {
            *q = 0x88;
        }
        return;
    }
    let (mut best_d, mut best_err) = (0f32, f32::INFINITY);
    let mut cand = [0u8; QK];
    // The largest element on the table's low end (−127) or high end (113), scaled
    // by 1 + k/40 either way.
    for end in [VALUES[0], VALUES[15]] {
        for k in -8..=8 {
            let inv = f32::from(end) * (1.0 + k as f32 / 40.0) / max;
            let (d, err) = fit(x, w, inv, &mut cand);
            if err < best_err {
                (best_d, best_err) = (d, err);
            }
        }
    }
    for _ in 0..2 {
        if best_d == 0.0 {
            break;
        }
        let (d, err) = fit(x, w, 1.0 / best_d, &mut cand);
        if err < best_err {
            (best_d, best_err) = (d, err);
        } else {
            break;
        }
    }
    let bits = f32_to_f16_bits(best_d);
    let d = f16_le(bits.to_le_bytes());
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    for i in 0..QK {
        l[i] = if d == 0.0 { 8 } else { nearest(x[i] * inv) };
    }
    b[0..2].copy_from_slice(&bits.to_le_bytes());
    for j in 0..QK / 2 {
        b[2 + j] = l[j] | (l[j + QK / 2] << 4);
    }
}

/// One block without importance weights: plain least squares.
pub(crate) fn quant_iq4_nl(x: &[f32; QK], b: &mut [u8; 18]) {
    quant_iq4_nl_weighted(x, &[1.0; QK], b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_picks_the_closest_value() {
        for v in -140..=130 {
            let v = v as f32 + 0.25;
            let i = usize::from(nearest(v));
            let best = VALUES.iter().map(|&t| (v - f32::from(t)).abs()).fold(f32::MAX, f32::min);
            assert_eq!((v - f32::from(VALUES[i])).abs(), best, "{v}");
        }
    }

    #[test]
    fn round_trip_error_is_small_and_zero_blocks_stay_zero() {
        let x: [f32; QK] = std::array::from_fn(|i| ((i * 37 % 29) as f32 - 14.0) * 0.013);
        let mut b = [0u8; 18];
        quant_iq4_nl(&x, &mut b);
        let mut y = [0f32; QK];
        dequant_iq4_nl(&b, &mut y);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / QK as f32).sqrt();
        let err = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / QK as f32).sqrt();
        assert!(err < 0.1 * rms, "{err} vs {rms}");
        quant_iq4_nl(&[0.0; QK], &mut b);
        dequant_iq4_nl(&b, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
