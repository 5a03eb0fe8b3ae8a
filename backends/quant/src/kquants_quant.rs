//! Quantizers for the k-quant formats Q2_K…Q6_K, bit-exact with ggml: round-to-nearest-with-search (`quantize_row_q*_K_ref`) and importance-weighted (`quantize_q*_K` with an imatrix), plus the scale searches they share with the weighted legacy quantizers.
//!
//! Each function follows its ggml counterpart (llama.cpp b11434,
//! `ggml-quants.c`) operation for operation: the same f32 expressions in the
//! same order (ggml-base is built without FMA, so nothing is fused), ggml's
//! `nearest_int` rounding, and scales rounded to f16 before the final
//! requantization. Integer results are truncated to the storage width exactly
//! where ggml stores them into 8-bit arrays. Block layouts are described in
//! `kquants.rs`.
//!
//! Finite inputs never panic (huge values may overflow to inf/NaN inside the
//! search and then give ggml's equally meaningless blocks); blocks made from
//! non-finite inputs are unspecified.

use super::kquants::{QK_K, q3_k_scales, scale_min_k4};
use super::plain::{f16_to_f32, f32_to_f16_bits};

/// Groups whose largest magnitude is below this quantize to all zeros
/// (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: adds 1.5·2²³ so the FPU rounds to an integer (ties to
/// even) and reads it from the mantissa. Exact for |v| < 2²²; beyond that it
/// returns the same wrapped value as ggml instead of panicking.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Stores `v` as little-endian f16 at `b[at..at + 2]` and returns the stored value.
#[inline]
fn put_f16(b: &mut [u8], at: usize, v: f32) -> f32 {
    let bits = f32_to_f16_bits(v);
    b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    f16_to_f32(bits)
}

/// `Σ x²` summed in order.
#[inline]
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |s, &v| s + v * v)
}

/// `Σ w` summed in order.
#[inline]
fn sum(w: &[f32]) -> f32 {
    w.iter().fold(0.0, |s, &v| s + v)
}

/// Importance-derived weights `qw · sqrt(σ² + x²)` used by every weighted path.
#[inline]
pub(crate) fn imatrix_weights<const N: usize>(x: &[f32; N], qw: &[f32; N], sigma2: f32) -> [f32; N] {
    std::array::from_fn(|i| qw[i] * (sigma2 + x[i] * x[i]).sqrt())
}

/// ggml's `make_qx_quants(n, nmax, x, L, 1, qw)`: a symmetric scale found by
/// trying 19 reciprocal scales around `nmax / max` and keeping the weighted
/// least-squares best. Weights are `qw`, or `x²` when `None`. Writes
/// `L[i] ∈ 0..2·nmax` (offset by `nmax`) and returns the scale.
pub(crate) fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let weight = |i: usize| qw.map_or(x[i] * x[i], |w| w[i]);
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Weighted Σ w·x·l and Σ w·l² for the quants of one reciprocal scale.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = quant(iscale, v) as f32;
            let w = weight(i);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l_out: &mut [i8]| {
        for (o, &v) in l_out.iter_mut().zip(x) {
            *o = (quant(iscale, v) + nmax) as i8;
        }
    };

    let iscale = (-nmax) as f32 / max;
    fill(iscale, l_out);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l_out);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants(n, 4, x, L, true)`: symmetric 3-bit quants with
/// `x²` weights, refined by up to five rounds of coordinate descent. Writes
/// `L[i] ∈ 0..8` and returns the scale.
fn make_q3_quants(x: &[f32], l_out: &mut [i8]) -> f32 {
    const NMAX: i32 = 4;
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = (-NMAX) as f32 / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (o, &v) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
        *o = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (o, &v) in l_out.iter_mut().zip(x) {
            let w = v * v;
            let cur = f32::from(*o);
            let mut slx = sumlx - w * v * cur;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * cur * cur;
                let new_l = nearest_int(v * sl2 / slx).clamp(-NMAX, NMAX - 1);
                if new_l != i32::from(*o) {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *o = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for o in l_out.iter_mut() {
        *o += NMAX as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Which of ggml's two scale-and-min searches [`make_qkx_quants`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Search {
    /// `make_qkx2_quants` (the `_ref` quantizers).
    Qkx2,
    /// `make_qkx3_quants` (the weighted quantizers): gives up when
    /// `max <= min` and guards the rounding against inf/NaN.
    Qkx3,
}

/// Parameters of an asymmetric (scale and min) search.
#[derive(Clone, Copy)]
pub(crate) struct MinFit {
    pub(crate) search: Search,
    /// Largest quant.
    pub(crate) nmax: i32,
    /// Reciprocal scales tried: `(nmax + rmin + rdelta·k) / (max − min)`, `k ∈ 0..=nstep`.
    pub(crate) rmin: f32,
    pub(crate) rdelta: f32,
    pub(crate) nstep: i32,
    /// Minimize the weighted absolute error instead of the squared error.
    pub(crate) use_mad: bool,
}

/// ggml's `make_qkx2_quants` / `make_qkx3_quants`: fits `x ≈ scale·L − the_min`
/// with `L ∈ 0..=nmax` by weighted least squares over a range of reciprocal
/// scales. Returns `(scale, the_min)`; `the_min ≥ 0` except on degenerate
/// input. `l_out` and `aux` have `x.len()` entries.
pub(crate) fn make_qkx_quants(p: &MinFit, x: &[f32], weights: &[f32], l_out: &mut [u8], aux: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    let degenerate = match p.search {
        Search::Qkx2 => max == min,
        Search::Qkx3 => max <= min,
    };
    if degenerate {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmax = p.nmax as f32;
    let error = |scale: f32, min: f32, l: &[u8]| {
        let mut e = 0.0f32;
        for i in 0..n {
            let diff = scale * f32::from(l[i]) + min - x[i];
            let diff = if p.use_mad { diff.abs() } else { diff * diff };
            e += weights[i] * diff;
        }
        e
    };

    let iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = nearest_int(iscale * (v - min)).clamp(0, p.nmax) as u8;
    }
    let mut best_error = error(scale, min, l_out);
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        let iscale = (p.rmin + p.rdelta * is as f32 + nmax) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = match p.search {
                Search::Qkx2 => nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax),
                Search::Qkx3 => {
                    // `min` is the best fit so far and can be at or near `max`,
                    // so v can be inf, NaN or out of range for nearest_int.
                    let v = iscale * (x[i] - min);
                    if v > 0.0 { nearest_int(if v < nmax { v } else { nmax }) } else { 0 }
                }
            };
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, aux);
            if cur_error < best_error {
                l_out.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: quantizes non-negative `x` (sub-block scales or
/// mins) to `L ∈ 0..=nmax` with one scale, weighted by `qw`: a search over
/// nine reciprocal scales, then up to five rounds of coordinate descent.
/// Returns the scale. Like ggml, `L` holds the 8-bit truncation of what it
/// computed (negative inputs wrap).
fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * f32::from(l_out[i]);
        best_mse += qw[i] * diff * diff;
    }
    for is in (-4..=4).filter(|&is| is != 0) {
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..x.len() {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = nearest_int(iscale * x[i]).min(nmax);
        l_out[i] = l as u8;
        let (w, l) = (qw[i], l as f32);
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..x.len() {
            let w = qw[i];
            let cur = f32::from(l_out[i]);
            let mut slx = sumlx - w * x[i] * cur;
            let mut sl2 = suml2 - w * cur * cur;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != i32::from(l_out[i]) {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Packs four 2-bit quants per byte the k-quant way: byte `k` of each
/// 128-element half holds elements `k`, `k+32`, `k+64`, `k+96`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for half in 0..2 {
        for k in 0..32 {
            let e = half * 128 + k;
            qs[half * 32 + k] = l[e] | (l[e + 32] << 2) | (l[e + 64] << 4) | (l[e + 96] << 6);
        }
    }
}

// ---------------------------------------------------------------- Q2_K

const Q2_REF: MinFit = MinFit { search: Search::Qkx2, nmax: 3, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };
const Q2_WEIGHTED: MinFit =
    MinFit { search: Search::Qkx3, nmax: 3, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false };

/// Requantizes every sub-block with its stored (f16 and 4-bit) scale and min,
/// then packs the quants (shared tail of both Q2_K quantizers). Sub-blocks
/// whose scale is zero keep the quants `l` already holds.
fn finish_q2_k(x: &[f32; QK_K], l: &mut [u8; QK_K], b: &mut [u8; 84]) {
    let d = f16_to_f32(u16::from_le_bytes([b[80], b[81]]));
    let dmin = f16_to_f32(u16::from_le_bytes([b[82], b[83]]));
    let scales: [u8; 16] = std::array::from_fn(|j| b[j]);
    let subs = x.as_chunks::<16>().0.iter().zip(l.as_chunks_mut::<16>().0);
    for (&sc, (xs, ls)) in scales.iter().zip(subs) {
        let dj = d * f32::from(sc & 0x0f);
        if dj == 0.0 {
            continue;
        }
        let m = dmin * f32::from(sc >> 4);
        for (q, &v) in ls.iter_mut().zip(xs) {
            *q = nearest_int((v + m) / dj).clamp(0, 3) as u8;
        }
    }
    pack_2bit(l, &mut b[16..80]);
}

/// `quantize_row_q2_K_ref` for one block.
pub(crate) fn quant_q2_k(x: &[f32; QK_K], b: &mut [u8; 84]) {
    let mut l = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let (scale, min) = make_qkx_quants(&Q2_REF, xs, &weights, &mut l[16 * j..16 * j + 16], &mut aux);
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            b[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(b, 80, max_scale / 15.0);
    } else {
        b[..16].fill(0);
        put_f16(b, 80, 0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            b[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        put_f16(b, 82, max_min / 15.0);
    } else {
        put_f16(b, 82, 0.0);
    }
    finish_q2_k(x, &mut l, b);
}

/// `quantize_row_q2_K_impl` (ggml's `quantize_q2_K` with an imatrix) for one block.
pub(crate) fn quant_q2_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], b: &mut [u8; 84]) {
    let mut l = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = sum_squares(x) / QK_K as f32;
    for (j, (xs, qs)) in x.as_chunks::<16>().0.iter().zip(qw.as_chunks::<16>().0).enumerate() {
        let weight = imatrix_weights(xs, qs, sigma2);
        sw[j] = sum(&weight);
        (scales[j], mins[j]) = make_qkx_quants(&Q2_WEIGHTED, xs, &weight, &mut l[16 * j..16 * j + 16], &mut aux);
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    put_f16(b, 80, dm);
    put_f16(b, 82, mm);
    for j in 0..16 {
        b[j] = ls[j] | (lm[j] << 4);
    }
    finish_q2_k(x, &mut l, b);
}

// ---------------------------------------------------------------- Q3_K

/// Stores the 6-bit scale `l` of sub-block `j` into a Q3_K `scales[12]`
/// (low nibbles in bytes 0..8, high bit pairs in bytes 8..12). Bytes must
/// start zeroed and `j` go up from 0.
fn pack_q3_scale(s: &mut [u8], j: usize, l: u8) {
    if j < 8 {
        s[j] = l & 0x0f;
    } else {
        s[j - 8] |= (l & 0x0f) << 4;
    }
    s[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
}

/// Requantizes with the stored scales, splits off the high bits into `hmask`
/// and packs the low bits (shared tail of both Q3_K quantizers).
fn finish_q3_k(x: &[f32; QK_K], l: &mut [i8; QK_K], b: &mut [u8; 110]) {
    let d_all = f16_to_f32(u16::from_le_bytes([b[108], b[109]]));
    let scales = q3_k_scales(&b[96..108]);
    let subs = x.as_chunks::<16>().0.iter().zip(l.as_chunks_mut::<16>().0);
    for (&sc, (xs, ls)) in scales.iter().zip(subs) {
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        for (q, &v) in ls.iter_mut().zip(xs) {
            *q = (nearest_int(v / d).clamp(-4, 3) + 4) as i8;
        }
    }
    // High bit of element j goes to bit j / 32 of hmask[j % 32].
    b[..32].fill(0);
    for (j, q) in l.iter_mut().enumerate() {
        if *q > 3 {
            b[j % 32] |= 1 << (j / 32);
            *q -= 4;
        }
    }
    let low: [u8; QK_K] = std::array::from_fn(|j| l[j] as u8);
    pack_2bit(&low, &mut b[32..96]);
}

/// `quantize_row_q3_K_ref` for one block.
pub(crate) fn quant_q3_k(x: &[f32; QK_K], b: &mut [u8; 110]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    b[96..108].fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let q = (nearest_int(iscale * s) as i8).clamp(-32, 31) + 32;
            pack_q3_scale(&mut b[96..108], j, q as u8);
        }
        put_f16(b, 108, 1.0 / iscale);
    } else {
        put_f16(b, 108, 0.0);
    }
    finish_q3_k(x, &mut l, b);
}

/// `quantize_row_q3_K_impl` (ggml's `quantize_q3_K` with an imatrix) for one block.
pub(crate) fn quant_q3_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], b: &mut [u8; 110]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    for (j, (xs, qs)) in x.as_chunks::<16>().0.iter().zip(qw.as_chunks::<16>().0).enumerate() {
        let weight = imatrix_weights(xs, qs, sigma2);
        sw[j] = sum(&weight);
        scales[j] = make_qx_quants(4, xs, &mut l[16 * j..16 * j + 16], Some(&weight));
    }
    b[96..108].fill(0);
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(32, &scales, &mut ls, Some(&sw));
    for (j, &q) in ls.iter().enumerate() {
        pack_q3_scale(&mut b[96..108], j, q as u8);
    }
    put_f16(b, 108, d_block);
    finish_q3_k(x, &mut l, b);
}

// ---------------------------------------------------------- Q4_K and Q5_K

/// Packs eight 6-bit scales and mins into Q4_K/Q5_K's `scales[12]` (the
/// inverse of [`scale_min_k4`]); like ggml, values above 63 spill their
/// extra bits rather than being clamped here.
fn pack_scale_min_k4(s: &mut [u8], ls: &[u8; 8], lm: &[u8; 8]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// Requantizes each 32-element sub-block of a Q4_K/Q5_K block with its stored
/// scale and min into `l ∈ 0..=nmax`; sub-blocks with a zero scale keep `l`.
fn requantize_k4(x: &[f32; QK_K], l: &mut [u8; QK_K], b: &[u8], nmax: i32) {
    let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    let dmin = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let dj = d * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
}

/// The unweighted Q4_K/Q5_K search (shared part of their `_ref` quantizers):
/// fits every sub-block with `make_qkx2_quants` under `av_x + |x|` weights,
/// quantizes scales and mins to 6 bits against their maxima, and writes `d`,
/// `dmin` and `scales` into `b[0..16]`.
fn fit_k4_ref(x: &[f32; QK_K], l: &mut [u8; QK_K], b: &mut [u8], fit: &MinFit) {
    let mut aux = [0u8; 32];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for (j, xs) in x.as_chunks::<32>().0.iter().enumerate() {
        let av_x = (sum_squares(xs) / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        (scales[j], mins[j]) = make_qkx_quants(fit, xs, &weights, &mut l[32 * j..32 * j + 32], &mut aux);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    pack_scale_min_k4(&mut b[4..16], &ls, &lm);
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);
}

/// The weighted Q4_K/Q5_K search (`quantize_row_q4_K_impl`/`_q5_K_impl`):
/// fits every sub-block with `make_qkx3_quants` under imatrix weights, then
/// the scales and mins with `make_qp_quants`; writes `b[0..16]`. Q5_K clamps
/// the 6-bit scales (`clamp`), Q4_K does not.
fn fit_k4_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], l: &mut [u8; QK_K], b: &mut [u8], nmax: i32, clamp: bool) {
    let fit = MinFit { search: Search::Qkx3, nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false };
    let mut aux = [0u8; 32];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut sw = [0.0f32; 8];
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    for (j, (xs, qs)) in x.as_chunks::<32>().0.iter().zip(qw.as_chunks::<32>().0).enumerate() {
        let weights = imatrix_weights(xs, qs, sigma2);
        sw[j] = sum(&weights);
        (scales[j], mins[j]) = make_qkx_quants(&fit, xs, &weights, &mut l[32 * j..32 * j + 32], &mut aux);
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    if clamp {
        for v in ls.iter_mut().chain(lm.iter_mut()) {
            *v = (*v).min(63);
        }
    }
    pack_scale_min_k4(&mut b[4..16], &ls, &lm);
    put_f16(b, 0, d_block);
    put_f16(b, 2, m_block);
}

/// Packs 4-bit quants: byte `k` of each 32-byte group `g` holds elements
/// `64g + k` (low nibble) and `64g + k + 32` (high nibble).
fn pack_4bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for g in 0..4 {
        for k in 0..32 {
            qs[32 * g + k] = l[64 * g + k] | (l[64 * g + k + 32] << 4);
        }
    }
}

/// Packs 5-bit quants: the low nibbles as [`pack_4bit`] into `qs`, the fifth
/// bits into `qh` (bit `2g` / `2g+1` of `qh[k]` for elements `64g + k` / `+ 32`).
fn pack_5bit(l: &[u8; QK_K], qh: &mut [u8], qs: &mut [u8]) {
    qh.fill(0);
    for g in 0..4 {
        for k in 0..32 {
            let (lo, hi) = (l[64 * g + k], l[64 * g + k + 32]);
            qh[k] |= (((lo >> 4) & 1) << (2 * g)) | (((hi >> 4) & 1) << (2 * g + 1));
            qs[32 * g + k] = (lo & 0x0f) | ((hi & 0x0f) << 4);
        }
    }
}

const Q4_REF: MinFit = MinFit { search: Search::Qkx2, nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };
const Q5_REF: MinFit = MinFit { search: Search::Qkx2, nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false };

/// `quantize_row_q4_K_ref` for one block.
pub(crate) fn quant_q4_k(x: &[f32; QK_K], b: &mut [u8; 144]) {
    let mut l = [0u8; QK_K];
    fit_k4_ref(x, &mut l, b, &Q4_REF);
    requantize_k4(x, &mut l, b, 15);
    pack_4bit(&l, &mut b[16..144]);
}

/// `quantize_row_q4_K_impl` (ggml's `quantize_q4_K` with an imatrix) for one block.
pub(crate) fn quant_q4_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], b: &mut [u8; 144]) {
    let mut l = [0u8; QK_K];
    fit_k4_weighted(x, qw, &mut l, b, 15, false);
    requantize_k4(x, &mut l, b, 15);
    pack_4bit(&l, &mut b[16..144]);
}

/// `quantize_row_q5_K_ref` for one block.
pub(crate) fn quant_q5_k(x: &[f32; QK_K], b: &mut [u8; 176]) {
    let mut l = [0u8; QK_K];
    fit_k4_ref(x, &mut l, b, &Q5_REF);
    requantize_k4(x, &mut l, b, 31);
    let (qh, qs) = b[16..].split_at_mut(32);
    pack_5bit(&l, qh, qs);
}

/// `quantize_row_q5_K_impl` (ggml's `quantize_q5_K` with an imatrix) for one block.
pub(crate) fn quant_q5_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], b: &mut [u8; 176]) {
    let mut l = [0u8; QK_K];
    fit_k4_weighted(x, qw, &mut l, b, 31, true);
    requantize_k4(x, &mut l, b, 31);
    let (qh, qs) = b[16..].split_at_mut(32);
    pack_5bit(&l, qh, qs);
}

// ---------------------------------------------------------------- Q6_K

/// `quantize_row_q6_K_ref` (`qw` = `None`) or `quantize_row_q6_K_impl` with an
/// imatrix (`Some`: the raw importances weight `make_qx_quants`) for one block.
pub(crate) fn quant_q6_k(x: &[f32; QK_K], qw: Option<&[f32; QK_K]>, b: &mut [u8; 210]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    let subs = x.as_chunks::<16>().0.iter().zip(l.as_chunks_mut::<16>().0);
    for (j, (scale, (xs, ls))) in scales.iter_mut().zip(subs).enumerate() {
        *scale = make_qx_quants(32, xs, ls, qw.map(|w| &w[16 * j..16 * j + 16]));
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_f16(b, 208, 1.0 / iscale);
    for j in 0..16 {
        b[192 + j] = nearest_int(iscale * scales[j]).min(127) as u8;
    }
    for j in 0..16 {
        let dj = d * f32::from(b[192 + j] as i8);
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    // Quants are 0..64 here; low nibbles to ql, high bit pairs to qh.
    let q: [u8; QK_K] = std::array::from_fn(|i| l[i] as u8);
    let (ql, qh) = b[..192].split_at_mut(128);
    for half in 0..2 {
        for k in 0..32 {
            let e = 128 * half + k;
            ql[64 * half + k] = (q[e] & 0x0f) | ((q[e + 64] & 0x0f) << 4);
            ql[64 * half + k + 32] = (q[e + 32] & 0x0f) | ((q[e + 96] & 0x0f) << 4);
            qh[32 * half + k] =
                (q[e] >> 4) | ((q[e + 32] >> 4) << 2) | ((q[e + 64] >> 4) << 4) | ((q[e + 96] >> 4) << 6);
        }
    }
}
