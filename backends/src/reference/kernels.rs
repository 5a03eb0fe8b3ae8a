//! Row-wise kernels of the reference interpreter: the f32 dot product, norms,
//! elementwise ops, activations, softmax and RoPE.
//!
//! Each function is the definition of its op. The arithmetic follows ggml's
//! CPU kernels (operation order, where ggml accumulates in double, the form of
//! each formula) so results stay close to llama.cpp; where that matters it is
//! said at the function.
//!
//! Activations are row-major `[rows, cols]` slices of f32.

use kiln_ir::{Activation, RopeAttrs, RopeLayout};

/// Accumulator lanes of [`dot`].
const LANES: usize = 8;

/// Sums the accumulator lanes pairwise (the same tree as `quant::dot_row`).
#[inline]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `Σ a[i]·b[i]` over `min(a.len(), b.len())` elements, in eight interleaved
/// f32 accumulators (element `i` goes to lane `i % 8`), the lanes summed
/// pairwise, then the tail of fewer than eight elements added.
///
/// This is exactly the summation order of `quant::dot_row`, so a matmul that
/// dequantizes a weight row and calls `dot` gives bit-identical results to
/// one that calls `dot_row` on the stored row.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (af, at) = a.as_chunks::<LANES>();
    let (bf, bt) = b.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in af.iter().zip(bf) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in at.iter().zip(bt) {
        tail += x * y;
    }
    sum_lanes(&acc) + tail
}

/// Four f32 lanes, which the compiler keeps in one SIMD register.
#[derive(Clone, Copy)]
#[repr(align(16))]
struct F32x4([f32; 4]);

impl F32x4 {
    const ZERO: F32x4 = F32x4([0.0; 4]);

    #[inline(always)]
    fn load(s: &[f32]) -> F32x4 {
        F32x4([s[0], s[1], s[2], s[3]])
    }

    /// `self + a·b`, lane by lane (a multiply then an add, not fused).
    #[inline(always)]
    fn mul_add(self, a: F32x4, b: F32x4) -> F32x4 {
        let (s, a, b) = (self.0, a.0, b.0);
        F32x4([s[0] + a[0] * b[0], s[1] + a[1] * b[1], s[2] + a[2] * b[2], s[3] + a[3] * b[3]])
    }
}

/// Four dot products of the rows `w[0..4]` with the same `x`, each in the
/// order of [`dot`] (so each result is bit-identical to `dot(w[r], x)`),
/// sharing the loads of `x`: the matmul microkernel.
///
/// Written with explicit 4-lane groups (lanes 0–3 and 4–7 of each row's
/// accumulator) so each group maps onto one SSE register.
#[inline]
pub(crate) fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    if w.iter().any(|r| r.len() != n) {
        return w.map(|r| dot(r, x));
    }
    let full = n / LANES * LANES;
    let mut acc = [[F32x4::ZERO; 2]; 4];
    let mut i = 0;
    while i < full {
        let x0 = F32x4::load(&x[i..i + 4]);
        let x1 = F32x4::load(&x[i + 4..i + 8]);
        for r in 0..4 {
            acc[r][0] = acc[r][0].mul_add(F32x4::load(&w[r][i..i + 4]), x0);
            acc[r][1] = acc[r][1].mul_add(F32x4::load(&w[r][i + 4..i + 8]), x1);
        }
        i += LANES;
    }
    // Without this barrier the compiler sees the four per-row reductions
    // below as one 4-wide operation and "vectorizes" the loop across rows,
    // with shuffles in every iteration (2–3x slower).
    let acc = std::hint::black_box(acc);
    let mut out = [0.0f32; 4];
    for ((o, a), row) in out.iter_mut().zip(&acc).zip(&w) {
        let (lo, hi) = (a[0].0, a[1].0);
        let lanes = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
        let mut tail = 0.0f32;
        for (p, q) in row[full..].iter().zip(&x[full..]) {
            tail += p * q;
        }
        *o = sum_lanes(&lanes) + tail;
    }
    out
}

/// RMS normalization of each group of `group` elements (0 = the whole row):
/// `y = (x · 1/sqrt(mean(x²) + eps)) · w`.
///
/// As in ggml's `rms_norm`, the sum of squares is accumulated in f64 and the
/// mean is rounded to f32 before `1/sqrtf(mean + eps)`; the weight multiply
/// comes after the scaling (ggml applies it as a separate `mul`).
pub(crate) fn rms_norm(x: &[f32], cols: usize, group: usize, eps: f32, w: Option<&[f32]>) -> Vec<f32> {
    let g = if group == 0 { cols } else { group };
    let mut y = x.to_vec();
    if g == 0 {
        return y;
    }
    for chunk in y.chunks_mut(g) {
        // Each square rounded to f32 and summed in f64, as ggml does.
        let sum: f64 = chunk.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / chunk.len() as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for v in chunk.iter_mut() {
            *v *= scale;
        }
        if let Some(w) = w {
            for (v, &wi) in chunk.iter_mut().zip(w) {
                *v *= wi;
            }
        }
    }
    y
}

/// Layer normalization of each row: `y = (x − mean) / sqrt(var + eps) · w + b`
/// (biased variance). As in ggml's `norm`, the sums for the mean and the
/// variance are accumulated in f64 and rounded to f32.
pub(crate) fn layer_norm(x: &[f32], cols: usize, eps: f32, w: Option<&[f32]>, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = x.to_vec();
    if cols == 0 {
        return y;
    }
    for row in y.chunks_mut(cols) {
        let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
        let mean = (sum / cols as f64) as f32;
        let mut sum2 = 0.0f64;
        for v in row.iter_mut() {
            *v -= mean;
            sum2 += f64::from(*v) * f64::from(*v);
        }
        let var = (sum2 / cols as f64) as f32;
        let scale = 1.0f32 / (var + eps).sqrt();
        for v in row.iter_mut() {
            *v *= scale;
        }
        if let Some(w) = w {
            for (v, &wi) in row.iter_mut().zip(w) {
                *v *= wi;
            }
        }
        if let Some(b) = b {
            for (v, &bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
    y
}

/// `a + b`, elementwise.
pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `a · b`, elementwise.
pub(crate) fn mul(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x * y).collect()
}

/// `s · x`, elementwise.
pub(crate) fn scale(x: &[f32], s: f32) -> Vec<f32> {
    x.iter().map(|v| v * s).collect()
}

/// Steering of each `cols`-wide row of `x` along `d` with strength `s`: `x + s·d`
/// (add; `s·d` is rounded first, as llama.cpp scales a control vector once), or
/// `x − (s·(d·x))·d` (project; the dot product is accumulated in f64). Strength 0
/// is the identity, bit for bit.
pub(crate) fn steer(x: &[f32], cols: usize, d: &[f32], mode: kiln_ir::SteerMode, s: f32) -> Vec<f32> {
    if s == 0.0 {
        return x.to_vec();
    }
    let mut y = x.to_vec();
    match mode {
        kiln_ir::SteerMode::Add => {
            let sd: Vec<f32> = d.iter().map(|v| s * v).collect();
            for row in y.chunks_mut(cols.max(1)) {
                row.iter_mut().zip(&sd).for_each(|(v, a)| *v += a);
            }
        }
        kiln_ir::SteerMode::Project => {
            for row in y.chunks_mut(cols.max(1)) {
                let dot: f64 = row.iter().zip(d).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                let c = s * dot as f32;
                row.iter_mut().zip(d).for_each(|(v, b)| *v -= c * b);
            }
        }
    }
    y
}

/// √(2/π), as ggml spells it.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh GELU approximation.
const GELU_COEF_A: f32 = 0.044715;

/// One activation: SiLU `x / (1 + e^(−x))` (= x·σ(x)), or tanh-GELU
/// `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`, both in ggml's form.
#[inline]
pub(crate) fn activate(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh()),
    }
}

/// `act(x)`, elementwise.
pub(crate) fn act(x: &[f32], kind: Activation) -> Vec<f32> {
    x.iter().map(|&v| activate(kind, v)).collect()
}

/// `act(gate) · up`, elementwise (SwiGLU / GeGLU).
pub(crate) fn glu(gate: &[f32], up: &[f32], kind: Activation) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| activate(kind, g) * u).collect()
}

/// `silu(gate) · up` as ggml's x86 AVX2 `ggml_vec_swiglu_f32` computes it, for
/// llama.cpp-compatible numerics: each full group of 8 uses ggml's vector
/// `expf` ([`ggml_v_expf`]), the tail of a row libm's `expf`.
/// Rows run in parallel (each row's values do not depend on the split).
pub(crate) fn swiglu_ggml(gate: &[f32], up: &[f32], cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let cols = cols.max(1);
    let mut y = vec![0f32; gate.len().min(up.len())];
    #[cfg(target_arch = "x86_64")]
    let fma = std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fma = false;
    y.par_chunks_mut(cols).zip(gate.par_chunks(cols)).zip(up.par_chunks(cols)).for_each(|((y, g), u)| {
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: the CPU has FMA.
            unsafe { swiglu_row_fma(y, g, u) };
            return;
        }
        let _ = fma;
        swiglu_row(y, g, u);
    });
    y
}

/// One row of [`swiglu_ggml`].
#[inline(always)]
fn swiglu_row(y: &mut [f32], g: &[f32], u: &[f32]) {
    let n = y.len().min(g.len()).min(u.len());
    let vec_end = n - n % 8;
    // Two loops, the first branch-free, so that the compiler vectorises it.
    for ((yv, &gv), &uv) in y[..vec_end].iter_mut().zip(&g[..vec_end]).zip(&u[..vec_end]) {
        *yv = gv / (1.0 + ggml_v_expf(-gv)) * uv;
    }
    for ((yv, &gv), &uv) in y[vec_end..n].iter_mut().zip(&g[vec_end..n]).zip(&u[vec_end..n]) {
        *yv = gv / (1.0 + (-gv).exp()) * uv;
    }
}

/// [`swiglu_row`] compiled with FMA instructions for its `mul_add`s (the same
/// single-rounding operation libm's `fmaf` computes, without the call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn swiglu_row_fma(y: &mut [f32], g: &[f32], u: &[f32]) {
    swiglu_row(y, g, u);
}

/// One lane of ggml's vectorised `expf` (the Arm optimized-routines polynomial
/// it adapts; at most about 1.5 ulp from the true value): `2^n · (1 + p(b))`
/// with `n = round(x / ln 2)`, `b = x − n·ln 2` in two parts, and explicit
/// scaling where `|n| > 126`. Every step is the same f32 operation (fused
/// where ggml fuses) so the result is bit-identical.
#[inline(always)]
pub(crate) fn ggml_v_expf(x: f32) -> f32 {
    let (n, j, k, e) = expf_parts(x);
    // All three cases computed and one selected (no branches, so loops over it vectorise).
    let (normal, big) = (j.mul_add(k, k), expf_scaled(n, j, e));
    if n.abs() <= 126.0 { normal } else { big }
}

/// The shared steps of [`ggml_v_expf`]: `n = round(x / ln 2)`, the polynomial `j` of the
/// remainder, `k = 2^n` as built from the bits, and those bits `e`.
#[inline(always)]
fn expf_parts(x: f32) -> (f32, f32, f32, u32) {
    const SHIFT: f32 = 12582912.0; // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), SHIFT); // 1/ln 2
    let n = z - SHIFT;
    let b = (-n).mul_add(f32::from_bits(0x35bf_be8e), (-n).mul_add(f32::from_bits(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let p = |bits: u32| f32::from_bits(bits);
    let j = p(0x3c07_2010)
        .mul_add(b, p(0x3d2b_9f17))
        .mul_add(u, p(0x3e2a_af33).mul_add(b, p(0x3eff_fedb)))
        .mul_add(u, p(0x3f7f_fff6) * b);
    (n, j, k, e)
}

/// [`ggml_v_expf`] where `|n| > 126`: explicit scaling, saturating beyond `|n| > 192`.
#[inline(always)]
fn expf_scaled(n: f32, j: f32, e: u32) -> f32 {
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 { s1 * s1 } else { s2.mul_add(j, s2) * s1 }
}

/// Softmax of one row in place: `e^(x − max) / Σ e^(x − max)`. The sum is
/// accumulated in f64 as in ggml's `soft_max`, then its f32 inverse scales
/// the row. An all-−∞ row becomes all zeros.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over the last dimension of every row.
pub(crate) fn softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    if cols > 0 {
        y.chunks_mut(cols).for_each(softmax_row);
    }
    y
}

/// `(cos, sin)` of the rotation angle of each pair `i < rot_dims/2` at position `p`.
///
/// The angle is `p · freq_scale · theta^(−2i/rot_dims)`, computed the way
/// ggml's `rope_cache_init` does so results match llama.cpp: `theta_scale =
/// powf(theta, −2/rot_dims)`, a running f32 `t` starts at `p` and is
/// multiplied by `theta_scale` after each pair, and the angle is
/// `freq_scale · t`.
pub fn rope_angles(p: usize, attrs: &RopeAttrs) -> Vec<(f32, f32)> {
    let half = (attrs.rot_dims / 2) as usize;
    let theta_scale = attrs.theta.powf(-2.0 / attrs.rot_dims as f32);
    let mut t = p as f32;
    let mut out = Vec::with_capacity(half);
    for _ in 0..half {
        let angle = attrs.freq_scale * t;
        out.push((angle.cos(), angle.sin()));
        t *= theta_scale;
    }
    out
}

/// Rotary position embedding of rows at positions `first_pos, first_pos+1, …`.
///
/// Each row is a sequence of heads of `head_dim` values; in each head the
/// first `rot_dims` values rotate and the rest are copied. Pair `i` is
/// `(2i, 2i+1)` for the interleaved layout and `(i, i + rot_dims/2)` for
/// NeoX; it turns by its angle from [`rope_angles`]:
/// `(x0, x1) ↦ (x0·cos − x1·sin, x0·sin + x1·cos)`, each with one fused multiply-add.
pub(crate) fn rope(x: &[f32], cols: usize, first_pos: usize, attrs: &RopeAttrs) -> Vec<f32> {
    let mut y = x.to_vec();
    let hd = attrs.head_dim as usize;
    let rot = (attrs.rot_dims as usize).min(hd);
    let half = rot / 2;
    if cols == 0 || hd == 0 {
        return y;
    }
    for (t, row) in y.chunks_mut(cols).enumerate() {
        let cs = rope_angles(first_pos + t, attrs);
        for head in row.chunks_exact_mut(hd) {
            for (i, &(c, s)) in cs.iter().enumerate().take(half) {
                let (i0, i1) = match attrs.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Neox => (i, i + half),
                };
                let (x0, x1) = (head[i0], head[i1]);
                // Fused as ggml's rotate_pairs is compiled (GCC contracts
                // `x0*c - x1*s` into fma(x0, c, -(x1*s))): bit-identical
                // rotations keep llama.cpp-compatible numerics exact.
                head[i0] = x0.mul_add(c, -(x1 * s));
                head[i1] = x0.mul_add(s, x1 * c);
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot4_matches_dot_bitwise() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<Vec<f32>> = (0..4).map(|r| (0..37).map(|i| ((i * (r + 2)) as f32 * 0.11).cos()).collect()).collect();
        let got = dot4([&w[0], &w[1], &w[2], &w[3]], &x);
        for r in 0..4 {
            assert_eq!(got[r].to_bits(), dot(&w[r], &x).to_bits());
        }
    }

    /// The branch-free `ggml_v_expf` picks ggml's case by case result (its vector code
    /// blends the three) for every input class: normal, the scaled ranges beyond ±126·ln 2
    /// and ±192·ln 2, infinities and NaN; and the vectorised SwiGLU row equals the
    /// element-by-element definition.
    #[test]
    fn branch_free_expf_and_swiglu_match_the_case_by_case_definition() {
        // ggml's vector code as its scalar reading: one case or the other, by branch.
        fn cases(x: f32) -> f32 {
            let (n, j, k, e) = expf_parts(x);
            if n.abs() <= 126.0 {
                return j.mul_add(k, k);
            }
            expf_scaled(n, j, e)
        }
        let mut xs: Vec<f32> = (-3000..=3000).map(|i| i as f32 * 0.047).collect();
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0, 88.7, -87.4, -103.9, 89.0]);
        for &x in &xs {
            let (got, want) = (ggml_v_expf(x), cases(x));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{x}: {got} vs {want}");
        }
        let g: Vec<f32> = xs.iter().map(|x| x * 0.1).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| (i as f32 * 0.3).sin()).collect();
        let got = swiglu_ggml(&g, &u, g.len());
        let vec_end = g.len() / 8 * 8;
        for (i, got) in got.iter().enumerate() {
            let e = if i < vec_end { cases(-g[i]) } else { (-g[i]).exp() };
            let want = g[i] / (1.0 + e) * u[i];
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{i}: {got} vs {want}");
        }
    }

    #[test]
    fn softmax_of_neg_inf_row_is_zero() {
        let mut r = [f32::NEG_INFINITY; 3];
        softmax_row(&mut r);
        assert_eq!(r, [0.0; 3]);
    }
}
