//! The integer primitives of fixed-point builds: the definition of every rounding step.
//!
//! `c/kiln_ops.c` is the same functions in C99, statement for statement; the
//! interpreter (`interp.rs`) and the emitted library must agree bit for bit, so any
//! change here is a change there (the host and Cortex-M tests compare them).
//!
//! Conventions: activations are `i32` in Q16 (16 fractional bits); products and sums
//! are `i64`; every right shift rounds half up (`rshr`); every narrowing saturates.

/// `log2(e)` in Q30.
pub const LOG2E_Q30: i64 = 1_549_082_005;
/// Entries of the `2^(-k/64)` table (Q30), `k = 0..=64`.
pub const EXP2_STEPS: usize = 64;
/// GELU (tanh form) constants in Q16: `0.044715` and `2·sqrt(2/π)`.
pub const GELU_A_Q16: i64 = 2930;
pub const GELU_B_Q16: i64 = 104_581;

/// `round(2^(-k/64) · 2^30)` for `k = 0..=64`: the one table behind every exponential.
pub fn exp2_table() -> Vec<i32> {
    (0..=EXP2_STEPS)
        .map(|k| (2f64.powf(-(k as f64) / EXP2_STEPS as f64) * (1u64 << 30) as f64).round() as i32)
        .collect()
}

/// Right shift rounding half up, `0 <= s <= 62` (Rust's `>>` on signed values floors, as
/// the C's portable `k_asr` does).
#[inline]
pub fn rshr(x: i64, s: u32) -> i64 {
    if s == 0 { x } else { (x + (1i64 << (s - 1))) >> s }
}

/// `x · 2^-s` rounded (s > 0) or `x · 2^-s` exactly, saturated to ±2^62 (s <= 0).
#[inline]
pub fn shift_round(x: i64, s: i32) -> i64 {
    if s > 62 {
        0
    } else if s >= 0 {
        rshr(x, s as u32)
    } else {
        let l = (-s) as u32;
        let lim = 1i64 << 62;
        if l >= 62 || x > (lim >> l) || x < -(lim >> l) {
            if x > 0 {
                lim
            } else if x < 0 {
                -lim
            } else {
                0
            }
        } else {
            x * (1i64 << l)
        }
    }
}

#[inline]
pub fn sat32(x: i64) -> i32 {
    x.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

#[inline]
pub fn sat16(x: i64) -> i16 {
    x.clamp(-32767, 32767) as i16
}

/// Bits needed to hold `u` (0 for 0).
#[inline]
pub fn bitlen(u: u64) -> u32 {
    64 - u.leading_zeros()
}

/// `floor(sqrt(n))`, bit by bit.
pub fn isqrt(n: u64) -> u32 {
    let (mut rem, mut root) = (n, 0u64);
    let mut bit = 1u64 << 62;
    while bit > n {
        bit >>= 2;
    }
    while bit != 0 {
        if rem >= root + bit {
            rem -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    root as u32
}

/// The shift that brings the largest magnitude of `x` into 15 bits (0 when it fits).
pub fn block_shift(x: &[i32]) -> u32 {
    let amax = x.iter().map(|v| (*v as i64).unsigned_abs()).max().unwrap_or(0);
    bitlen(amax).saturating_sub(15)
}

/// Quantizes `x` (Q16) to 16-bit mantissas with a shared shift: `x ≈ m · 2^sh`.
pub fn quantize16(x: &[i32], m: &mut [i16]) -> u32 {
    let sh = block_shift(x);
    for (d, v) in m.iter_mut().zip(x) {
        *d = sat16(rshr(*v as i64, sh));
    }
    sh
}

/// Quantizes `x` (Q16) to 8-bit mantissas (|m| ≤ 127, kept in `i16`s) with a shared shift.
pub fn quantize8(x: &[i32], m: &mut [i16]) -> u32 {
    let sh = block_shift(x) + 8;
    for (d, v) in m.iter_mut().zip(x) {
        *d = rshr(*v as i64, sh).clamp(-127, 127) as i16;
    }
    sh
}

/// Quantizes `x` (Q16) to 4-bit mantissas (−8..=7, kept in `i16`s) with a shared shift.
pub fn quantize4(x: &[i32], m: &mut [i16]) -> u32 {
    let sh = block_shift(x) + 12;
    for (d, v) in m.iter_mut().zip(x) {
        *d = rshr(*v as i64, sh).clamp(-8, 7) as i16;
    }
    sh
}

/// `e^(-x)` for `x >= 0` (Q16 in, Q16 out).
pub fn exp_neg(x: i64, table: &[i32]) -> i64 {
    let x = x.clamp(0, i32::MAX as i64);
    let u = rshr(x * LOG2E_Q30, 30);
    let n = u >> 16;
    if n >= 31 {
        return 0;
    }
    let f = u & 0xFFFF;
    let (idx, fr) = ((f >> 10) as usize, f & 1023);
    let (a, b) = (table[idx] as i64, table[idx + 1] as i64);
    let v = a + rshr((b - a) * fr, 10);
    rshr(v, 14 + n as u32)
}

/// The logistic function (Q16 in, Q16 out).
pub fn sigmoid(x: i64, table: &[i32]) -> i64 {
    let e = exp_neg(x.abs(), table);
    let s = ((1u64 << 32) / (65536 + e as u64)) as i64;
    if x >= 0 { s } else { 65536 - s }
}

pub fn silu(x: i32, table: &[i32]) -> i32 {
    sat32(rshr(x as i64 * sigmoid(x as i64, table), 16))
}

/// GELU, tanh form: `x · σ(2·sqrt(2/π)·(x + 0.044715·x³))`, the cube on `x` clamped to ±16.
pub fn gelu_tanh(x: i32, table: &[i32]) -> i32 {
    let xc = (x as i64).clamp(-(16 << 16), 16 << 16);
    let x2 = rshr(xc * xc, 16);
    let x3 = rshr(x2 * xc, 16);
    let inner = xc + rshr(x3 * GELU_A_Q16, 16);
    let z = rshr(inner * GELU_B_Q16, 16);
    sat32(rshr(x as i64 * sigmoid(z, table), 16))
}

/// `a / b` rounded half away from zero, `b > 0`.
pub fn div_round(a: i64, b: i64) -> i64 {
    if a >= 0 { (a + b / 2) / b } else { -((-a + b / 2) / b) }
}

/// A real multiplier as `m · 2^-shift` with `|m|` in `[2^14, 2^15)` (0 → (0, 0)).
pub fn quant_mult(x: f64) -> (i32, i32) {
    if x == 0.0 || !x.is_finite() {
        return (0, 0);
    }
    let e = x.abs().log2().floor() as i32 + 1; // |x| = f·2^e, f in [0.5, 1)
    let mut f = x.abs() / 2f64.powi(e);
    let mut e = e;
    if f >= 1.0 {
        f /= 2.0;
        e += 1;
    }
    if f < 0.5 {
        f *= 2.0;
        e -= 1;
    }
    let mut m = (f * 32768.0).round() as i64;
    if m == 32768 {
        m = 16384;
        e += 1;
    }
    let m = if x < 0.0 { -m } else { m };
    (m as i32, 15 - e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_sigmoid_are_close_to_the_real_functions() {
        let t = exp2_table();
        for i in 0..4000 {
            let x = i as f64 * 0.005;
            let got = exp_neg((x * 65536.0).round() as i64, &t) as f64 / 65536.0;
            assert!((got - (-x).exp()).abs() < 4e-5, "exp(-{x}) = {got}");
        }
        for i in -2000..2000 {
            let x = i as f64 * 0.01;
            let got = sigmoid((x * 65536.0).round() as i64, &t) as f64 / 65536.0;
            assert!((got - 1.0 / (1.0 + (-x).exp())).abs() < 4e-5, "σ({x}) = {got}");
        }
    }

    #[test]
    fn mult_shift_represents_the_real_value() {
        for x in [1e-6, 0.001, 0.0361, 0.125, 0.5, 1.0, 1.7, 3.0, 1000.0, -0.2] {
            let (m, s) = quant_mult(x);
            assert!((m.unsigned_abs() as i64) >= 1 << 14 && (m.unsigned_abs() as i64) < 1 << 15, "{x}: {m}");
            let back = m as f64 * 2f64.powi(-s);
            assert!(((back - x) / x).abs() < 4e-5, "{x}: {back}");
        }
    }

    #[test]
    fn isqrt_is_floor_sqrt() {
        for n in [0u64, 1, 2, 3, 4, 15, 16, 17, 1 << 40, (1 << 62) - 1, 1 << 61, 123_456_789_012] {
            let r = isqrt(n) as u64;
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "{n}: {r}");
        }
    }
}
