//! kq2: the codebook is the documented subset of the E8 lattice, the searches
//! are exact, blocks decode as the layout says, round trips stay within
//! measured error budgets, importance weighting helps, `dot_kq2` agrees with
//! dequantization, and hostile input neither panics nor decodes to non-finite
//! values.

use std::collections::HashSet;

use kiln_ir::DType;
use kiln_quant::QuantError;
use kiln_quant::kq2::*;
use proptest::prelude::*;

/// A small deterministic generator (PCG-like LCG), uniform and Gaussian.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn gauss_vec(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.gauss() * sigma).collect()
    }
}

fn quantize(x: &[f32], imp: Option<&[f32]>) -> Vec<u8> {
    let mut q = vec![0u8; kq2_row_bytes(x.len()).expect("multiple of 64")];
    quantize_kq2(x, imp, &mut q).expect("lengths match");
    q
}

fn dequantize(q: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    dequantize_kq2(q, &mut out).expect("lengths match");
    out
}

/// sqrt(Σ d (x − y)² / Σ d x²), with d = 1 when `imp` is `None`.
fn rel_rmse(x: &[f32], y: &[f32], imp: Option<&[f32]>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (j, (a, b)) in x.iter().zip(y).enumerate() {
        let d = imp.map_or(1.0, |w| f64::from(w[j]));
        num += d * f64::from(a - b).powi(2);
        den += d * f64::from(*a).powi(2);
    }
    (num / den).sqrt()
}

// ---------------------------------------------------------------------------
// Codebook

/// The documented order of the magnitude table: (Σk², max k, distinct values, k).
fn table_key(k: &[u8; 8]) -> (u32, u8, usize, [u8; 8]) {
    let set: HashSet<u8> = k.iter().copied().collect();
    (k.iter().map(|&v| u32::from(v).pow(2)).sum(), *k.iter().max().unwrap(), set.len(), *k)
}

#[test]
fn magnitude_table_is_the_documented_one() {
    let a = kq2_abs_codebook();
    assert_eq!(a.len(), KQ2_ABS_ENTRIES);
    assert!(a.iter().all(|k| k.iter().all(|v| [1, 3, 5, 7].contains(v))));
    // Strictly increasing in the documented order, hence distinct.
    assert!(a.windows(2).all(|w| table_key(&w[0]) < table_key(&w[1])));
    // Every vector with Σk² ≤ 48, then 28 + 28 + 5 at Σk² = 56.
    let n2 = |k: &[u8; 8]| k.iter().map(|&v| u32::from(v).pow(2)).sum::<u32>();
    assert_eq!(a.iter().filter(|k| n2(k) <= 48).count(), 451);
    let sorted = |k: &[u8; 8]| {
        let mut s = *k;
        s.sort_unstable_by(|x, y| y.cmp(x));
        s
    };
    let count = |p: [u8; 8]| a.iter().filter(|k| sorted(k) == p).count();
    assert_eq!(count([3, 3, 3, 3, 3, 3, 1, 1]), 28);
    assert_eq!(count([5, 5, 1, 1, 1, 1, 1, 1]), 28);
    assert_eq!(count([5, 3, 3, 3, 1, 1, 1, 1]), 5);
    assert_eq!(a.iter().filter(|k| n2(k) > 56).count(), 0);
    // The weighted search places at most two magnitudes above 3/2 by enumeration.
    assert!(a.iter().all(|k| k.iter().filter(|&&v| v > 3).count() <= 2));
    assert_eq!(a[0], [1; 8]);
    assert_eq!(a[511], [1, 1, 1, 3, 1, 3, 3, 5]);
}

#[test]
fn codewords_are_distinct_shifted_e8_points() {
    let a = kq2_abs_codebook();
    let mut seen = HashSet::with_capacity(KQ2_CODEWORDS as usize);
    for code in 0..KQ2_CODEWORDS {
        let c = kq2_codeword(code);
        let shift = if code >> 16 & 1 == 1 { -0.25 } else { 0.25 };
        // s = c − shift: half-integer coordinates (2s odd), even sum: a point of E8.
        let s2: [i32; 8] = c.map(|v| {
            let t = 2.0 * (v - shift);
            assert_eq!(t, t.round(), "{code:#x}: {c:?}");
            t as i32
        });
        assert!(s2.iter().all(|v| v % 2 != 0), "{code:#x}: {c:?}");
        assert_eq!(s2.iter().sum::<i32>() % 4, 0, "{code:#x}: coordinate sum of {c:?} is odd");
        assert!(s2.iter().map(|v| v * v).sum::<i32>() <= 56, "{code:#x}: |s|² > 14");
        // Magnitudes from the table, signs 0..7 from the sign bits.
        let k = a[(code & 0x1ff) as usize];
        for i in 0..8 {
            assert_eq!(s2[i].unsigned_abs(), u32::from(k[i]), "{code:#x}");
            if i < 7 {
                assert_eq!(s2[i] < 0, code >> (9 + i) & 1 == 1, "{code:#x}");
            }
        }
        assert!(seen.insert(c.map(|v| (v * 4.0) as i32)), "{code:#x} repeats {c:?}");
    }
    // Closed under negation.
    for c in &seen {
        assert!(seen.contains(&c.map(|v| -v)));
    }
}

/// Brute force over all 2¹⁷ codewords under the diagonal metric `w`.
fn brute_force(y: &[f32; 8], w: &[f32; 8]) -> f32 {
    (0..KQ2_CODEWORDS)
        .map(|code| {
            let c = kq2_codeword(code);
            (0..8).map(|i| w[i] * (y[i] - c[i]).powi(2)).sum::<f32>()
        })
        .fold(f32::INFINITY, f32::min)
}

fn dist(y: &[f32; 8], w: &[f32; 8], code: u32) -> f32 {
    let c = kq2_codeword(code);
    (0..8).map(|i| w[i] * (y[i] - c[i]).powi(2)).sum()
}

#[test]
fn nearest_codeword_is_exact() {
    let mut rng = Rng(1);
    let ones = [1.0; 8];
    for n in 0..300 {
        // Typical (|y| ~ 1), large (outer shell) and tiny targets.
        let sigma = [1.0, 2.5, 0.05][n % 3];
        let y: [f32; 8] = std::array::from_fn(|_| rng.gauss() * sigma);
        let (got, best) = (dist(&y, &ones, kq2_nearest(&y)), brute_force(&y, &ones));
        assert!(got <= best * (1.0 + 1e-5) + 1e-6, "{y:?}: {got} vs brute force {best}");
    }
}

#[test]
fn weighted_nearest_codeword_is_exact() {
    let mut rng = Rng(2);
    for n in 0..300 {
        let sigma = [1.0, 2.5, 0.05][n % 3];
        let y: [f32; 8] = std::array::from_fn(|_| rng.gauss() * sigma);
        // Log-normal weights, some of them 0.
        let w: [f32; 8] = std::array::from_fn(|i| if (n + i) % 7 == 0 { 0.0 } else { (2.0 * rng.gauss()).exp() });
        let (got, best) = (dist(&y, &w, kq2_nearest_weighted(&y, &w)), brute_force(&y, &w));
        assert!(got <= best * (1.0 + 1e-5) + 1e-6, "{y:?} {w:?}: {got} vs brute force {best}");
    }
}

// ---------------------------------------------------------------------------
// Layout

#[test]
fn scale_table() {
    assert_eq!(kq2_scale(0), 0.0);
    assert_eq!(kq2_scale(1), 2f32.powi(-17));
    assert_eq!(kq2_scale(86), 1.0);
    assert_eq!(kq2_scale(87), KQ2_SCALE_MANTISSAS[1]);
    assert_eq!(kq2_scale(127), KQ2_SCALE_MANTISSAS[1] * 256.0);
    for k in 1..=KQ2_SCALE_MAX {
        let exact = 2f64.powf(f64::from(k - 1) / 5.0 - 17.0);
        assert!((f64::from(kq2_scale(k)) / exact - 1.0).abs() < 1e-7, "k = {k}");
        // The U flag is not part of the scale.
        assert_eq!(kq2_scale(k | KQ2_UNROTATED), kq2_scale(k));
    }
    for (j, m) in KQ2_SCALE_MANTISSAS.iter().enumerate() {
        assert_eq!(*m, 2f64.powf(j as f64 / 5.0) as f32);
    }
}

/// w = S ⊙ (H·v)/8 with an explicit Hadamard matrix.
fn unrotate_reference(v: &[f32]) -> Vec<f32> {
    (0..64)
        .map(|j| {
            let sum: f64 = (0..64usize)
                .map(|m| if (j & m).count_ones() % 2 == 1 { -f64::from(v[m]) } else { f64::from(v[m]) })
                .sum();
            let s = if KQ2_RHT_SIGNS >> j & 1 == 1 { -1.0 } else { 1.0 };
            (s * sum / 8.0) as f32
        })
        .collect()
}

#[test]
fn hand_built_block_decodes_as_documented() {
    let a = kq2_abs_codebook();
    let index = |k: [u8; 8]| a.iter().position(|e| *e == k).unwrap() as u16;
    let mut b = [0u8; KQ2_BLOCK_BYTES];
    b[0] = 86 | KQ2_UNROTATED; // scale 1, unrotated
    // Group 0: magnitudes ½⁸, coordinates 0 and 2 negative, shift +¼.
    b[2..4].copy_from_slice(&(index([1; 8]) | 0b000_0101 << 8).to_le_bytes());
    // Group 1: (½⁷, 3/2): Σk/2 = 5 is odd, so with no sign bits coordinate 7
    // is negative; shift −¼.
    b[4..6].copy_from_slice(&(index([1, 1, 1, 1, 1, 1, 1, 3]) | 1 << 15).to_le_bytes());
    // Group 2: entry 300 (bit 8 in byte 1), sign bit of coordinate 6.
    let e = 300u16;
    b[1] |= 1 << 2;
    b[6..8].copy_from_slice(&((e & 0xff) | 1 << 14).to_le_bytes());
    // Groups 3..8: entry 0, no signs, shift +¼: ¾ everywhere.
    let mut out = [0.0f32; 64];
    dequantize_kq2(&b, &mut out).unwrap();
    assert_eq!(out[..8], [-0.25, 0.75, -0.25, 0.75, 0.75, 0.75, 0.75, 0.75]);
    assert_eq!(out[8..16], [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, -1.75]);
    let k = a[usize::from(e)];
    let neg7 = (1 + k.iter().map(|&v| u32::from(v)).sum::<u32>() / 2) % 2 == 1;
    for i in 0..8 {
        let neg = i == 6 || (i == 7 && neg7);
        let mag = f32::from(k[i]) / 2.0;
        assert_eq!(out[16 + i], if neg { 0.25 - mag } else { mag + 0.25 }, "coordinate {i}");
    }
    assert!(out[24..].iter().all(|&v| v == 0.75));
    // The same codes rotated, at scale 2^-17: the inverse RHT of the storage vector.
    let storage: Vec<f32> = out.iter().map(|v| v * 2f32.powi(-17)).collect();
    b[0] = 1;
    dequantize_kq2(&b, &mut out).unwrap();
    for (got, want) in out.iter().zip(unrotate_reference(&storage)) {
        assert!((got - want).abs() <= 1e-6 * 2f32.powi(-17), "{got} vs {want}");
    }
    // Scale index 0 is the zero block whatever the codes.
    b[0] = KQ2_UNROTATED;
    dequantize_kq2(&b, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn lengths() {
    assert_eq!(kq2_row_bytes(896), Some(252));
    assert_eq!(kq2_row_bytes(576), Some(162));
    assert_eq!(kq2_row_bytes(0), Some(0));
    assert_eq!(kq2_row_bytes(100), None);
    let partial = QuantError::PartialBlock { dtype: DType::KQ2, elems: 100, block_elems: 64 };
    assert_eq!(dequantize_kq2(&[0; 36], &mut [0.0; 100]), Err(partial.clone()));
    assert_eq!(quantize_kq2(&[0.0; 100], None, &mut [0; 36]), Err(partial));
    assert_eq!(
        dot_kq2(&[0; 17], &[0.0; 64]),
        Err(QuantError::SizeMismatch { dtype: DType::KQ2, elems: 64, expected: 18, actual: 17 })
    );
    assert_eq!(
        quantize_kq2(&[0.0; 64], Some(&[1.0; 63]), &mut [0; 18]),
        Err(QuantError::ImportanceLength { dtype: DType::KQ2, elems: 64, actual: 63 })
    );
    assert_eq!(quantize_kq2(&[], None, &mut []), Ok(()));
    assert_eq!(dequantize_kq2(&[], &mut []), Ok(()));
    assert_eq!(dot_kq2(&[], &[]), Ok(0.0));
}

// ---------------------------------------------------------------------------
// Quality

/// Gaussian rows: measured 0.2611 relative RMSE (MSE 0.068 of the variance;
/// the rate-distortion bound at the codewords' 2.125 bits is 0.053).
#[test]
fn gaussian_round_trip_budget() {
    let x = Rng(7).gauss_vec(64 * 1024, 0.02);
    let err = rel_rmse(&x, &dequantize(&quantize(&x, None), x.len()), None);
    assert!(err < 0.27, "relative RMSE {err}");
    // Scale invariance across the range: the same rows at 10⁻³ and 10³ times.
    for f in [1e-3f32, 1e3] {
        let y: Vec<f32> = x.iter().map(|v| v * f).collect();
        let e = rel_rmse(&y, &dequantize(&quantize(&y, None), y.len()), None);
        assert!((e - err).abs() < 0.01, "scaled by {f}: {e} vs {err}");
    }
}

/// Gaussian rows with every 97th weight 12× larger: measured 0.2457.
#[test]
fn outlier_round_trip_budget() {
    let mut x = Rng(8).gauss_vec(64 * 1024, 0.02);
    for i in (0..x.len()).step_by(97) {
        x[i] *= 12.0;
    }
    let err = rel_rmse(&x, &dequantize(&quantize(&x, None), x.len()), None);
    assert!(err < 0.26, "relative RMSE {err}");
    // The outliers themselves keep most of their value.
    let q = dequantize(&quantize(&x, None), x.len());
    let outliers: Vec<usize> = (0..x.len()).step_by(97).collect();
    let (num, den) = outliers
        .iter()
        .fold((0.0f64, 0.0f64), |(n, d), &i| (n + f64::from(x[i] - q[i]).powi(2), d + f64::from(x[i]).powi(2)));
    assert!((num / den).sqrt() < 0.2, "outliers' relative RMSE {}", (num / den).sqrt());
}

/// Log-normal importance (σ = 2): the weighted error measured 0.1385 with the
/// importance against 0.2748 without.
#[test]
fn importance_lowers_the_weighted_error() {
    let mut rng = Rng(9);
    let x = rng.gauss_vec(64 * 1024, 0.02);
    let imp: Vec<f32> = (0..1024).map(|_| (2.0 * rng.gauss()).exp()).collect();
    let (mut with, mut without) = (0.0, 0.0);
    for row in x.chunks(1024) {
        with += rel_rmse(row, &dequantize(&quantize(row, Some(&imp)), 1024), Some(&imp)).powi(2);
        without += rel_rmse(row, &dequantize(&quantize(row, None), 1024), Some(&imp)).powi(2);
    }
    let (with, without) = ((with / 64.0).sqrt(), (without / 64.0).sqrt());
    assert!(with < 0.6 * without, "weighted relative RMSE {with} with importance, {without} without");
    // Uniform importance is no importance.
    let row = &x[..1024];
    assert_eq!(quantize(row, Some(&[3.5; 1024])), quantize(row, None));
}

#[test]
fn both_bases_occur() {
    // Even on i.i.d. Gaussian rows (which the rotation leaves i.i.d. Gaussian)
    // the quantizer keeps whichever basis codes each block better.
    let mut rng = Rng(10);
    let x = rng.gauss_vec(64 * 256, 0.02);
    let imp: Vec<f32> = (0..64 * 256).map(|j| if j % 64 < 3 { 100.0 } else { 1.0 }).collect();
    for q in [quantize(&x, None), quantize(&x, Some(&imp))] {
        let unrotated = q.chunks(KQ2_BLOCK_BYTES).filter(|b| b[0] & KQ2_UNROTATED != 0).count();
        assert!(unrotated > 0 && unrotated < 256, "{unrotated} of 256 blocks unrotated");
    }
}

/// Σ w·x in f64 and Σ |w·x|.
fn dot_reference(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, a), (p, q)| {
        let t = f64::from(*p) * f64::from(*q);
        (s + t, a + t.abs())
    })
}

#[test]
fn dot_matches_dequantize_then_dot() {
    let mut rng = Rng(11);
    for n in [64usize, 896, 4864] {
        let w = rng.gauss_vec(n, 0.02);
        // Uneven importance so that both bases occur; one block is zero.
        let imp: Vec<f32> = (0..n).map(|j| if j % 61 == 0 { 50.0 } else { 1.0 }).collect();
        let mut w = w;
        w[..64].fill(0.0);
        let q = quantize(&w, Some(&imp));
        let x = rng.gauss_vec(n, 1.0);
        let (want, scale) = dot_reference(&dequantize(&q, n), &x);
        let got = f64::from(dot_kq2(&q, &x).unwrap());
        assert!((got - want).abs() <= 1e-4 * scale, "n = {n}: {got} vs {want} (Σ|w·x| = {scale})");
    }
}

#[test]
fn eight_bit_dot_on_real_shaped_rows() {
    // Gaussian rows and activations with a few outlier channels, both bases:
    // the 8-bit dot stays within 1% of the exact one relative to Σ|w·x|.
    let mut rng = Rng(21);
    for n in [64usize, 896, 4864] {
        let w = rng.gauss_vec(n, 0.02);
        let imp: Vec<f32> = (0..n).map(|j| if j % 61 == 0 { 50.0 } else { 1.0 }).collect();
        let q = quantize(&w, Some(&imp));
        let mut x = rng.gauss_vec(n, 1.0);
        for j in (0..n).step_by(97) {
            x[j] *= 20.0;
        }
        let (want, scale) = dot_reference(&dequantize(&q, n), &x);
        let got = f64::from(dot_kq2_q8(&q, &quantize_kq2_q8(&x)));
        assert!((got - want).abs() <= 1e-2 * scale, "n = {n}: {got} vs {want} (Σ|w·x| = {scale})");
    }
    // Non-finite activations give a non-finite result; zero ones give 0.
    let q = quantize(&Rng(22).gauss_vec(128, 0.02), None);
    let mut x = vec![0.5f32; 128];
    x[70] = f32::NAN;
    assert!(!dot_kq2_q8(&q, &quantize_kq2_q8(&x)).is_finite());
    assert_eq!(dot_kq2_q8(&q, &quantize_kq2_q8(&[0.0; 128])), 0.0);
}

#[test]
fn hostile_input_never_panics() {
    let n = 256;
    let mut rows: Vec<Vec<f32>> = vec![
        vec![0.0; n],
        vec![1e30; n],
        vec![f32::MAX; n],
        vec![-f32::MAX; n],
        vec![1e-40; n],
        vec![f32::MIN_POSITIVE; n],
        vec![f32::NAN; n],
        vec![f32::INFINITY; n],
    ];
    let mut mixed = Rng(12).gauss_vec(n, 1.0);
    mixed[3] = f32::NAN;
    mixed[70] = f32::NEG_INFINITY;
    mixed[140] = 1e35;
    mixed[200] = -1e-42;
    rows.push(mixed.clone());
    let imps: Vec<Option<Vec<f32>>> = vec![
        None,
        Some(vec![0.0; n]),
        Some(vec![f32::NAN; n]),
        Some(vec![-1.0; n]),
        Some(vec![f32::INFINITY; n]),
        Some(vec![f32::MAX; n]),
        Some((0..n).map(|j| [1.0, f32::NAN, -2.0, 1e-30, 1e30, f32::INFINITY, 0.0][j % 7]).collect()),
    ];
    let x = Rng(13).gauss_vec(n, 1.0);
    for row in &rows {
        for imp in &imps {
            let q = quantize(row, imp.as_deref());
            let back = dequantize(&q, n);
            assert!(back.iter().all(|v| v.is_finite()), "{:?}", &row[..4]);
            assert!(dot_kq2(&q, &x).unwrap().is_finite());
        }
    }
    // Zeros and non-finite values come back as exact zeros.
    for row in [&rows[0], &rows[6], &rows[7]] {
        assert!(dequantize(&quantize(row, None), n).iter().all(|&v| v == 0.0));
    }
    // NaN/inf weights are coded as 0: the rest of their block is still close.
    let mut clean = mixed.clone();
    for v in &mut clean {
        if !v.is_finite() || v.abs() > 1e3 || v.abs() < 1e-30 {
            *v = 0.0;
        }
    }
    mixed[140] = 0.0;
    mixed[200] = 0.0;
    let back = dequantize(&quantize(&mixed, None), n);
    assert!(rel_rmse(&clean, &back, None) < 0.3);
    assert!(back[3].abs() < 1.5 && back[70].abs() < 1.5);
}

#[test]
fn quantization_is_deterministic() {
    let mut rng = Rng(14);
    let x = rng.gauss_vec(896, 0.02);
    let imp: Vec<f32> = (0..896).map(|_| rng.gauss().abs()).collect();
    assert_eq!(quantize(&x, Some(&imp)), quantize(&x, Some(&imp)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any bytes decode to finite weights within the documented bound, and
    /// the dot product agrees with them.
    #[test]
    fn any_bytes_decode_finite(
        bytes in proptest::collection::vec(any::<u8>(), 3 * KQ2_BLOCK_BYTES),
        x in proptest::collection::vec(-4.0f32..4.0, 3 * 64),
    ) {
        let w = dequantize(&bytes, 3 * 64);
        prop_assert!(w.iter().all(|v| v.is_finite() && v.abs() <= 8.0 * 295.0 * 2.75));
        let (want, scale) = dot_reference(&w, &x);
        let got = f64::from(dot_kq2(&bytes, &x).unwrap());
        prop_assert!((got - want).abs() <= 1e-4 * scale + 1e-30, "{} vs {}", got, want);
    }

    /// The 8-bit dot (kq2's dot type, `Numerics::Ggml`) is within the
    /// rounding bound of the activations' quantization of the exact dot: per
    /// block the rounding error e has |e|₂ ≤ 8·(d/2) with d ≤ |x_b|₂/127 in
    /// either basis, and the storage-basis weights have the norm of the
    /// block's weights (the rotation is orthogonal), so
    /// |Δ| ≤ Σ_b |w_b|₂·4·|x_b|₂/127 (plus float rounding).
    #[test]
    fn eight_bit_dot_is_within_its_rounding_bound(
        bytes in proptest::collection::vec(any::<u8>(), 3 * KQ2_BLOCK_BYTES),
        x in proptest::collection::vec(-4.0f32..4.0, 3 * 64),
    ) {
        let w = dequantize(&bytes, 3 * 64);
        let (want, scale) = dot_reference(&w, &x);
        let got = f64::from(dot_kq2_q8(&bytes, &quantize_kq2_q8(&x)));
        let norm = |v: &[f32]| v.iter().map(|e| f64::from(*e).powi(2)).sum::<f64>().sqrt();
        let bound: f64 = w.chunks(64).zip(x.chunks(64)).map(|(wb, xb)| norm(wb) * 4.0 * norm(xb) / 127.0).sum();
        prop_assert!((got - want).abs() <= bound * 1.0001 + 1e-4 * scale + 1e-30, "{} vs {} (bound {})", got, want, bound);
    }

    /// Random rows at magnitudes across the scale range round-trip with a
    /// bounded error, whatever the importance.
    #[test]
    fn random_rows_round_trip(
        xs in proptest::collection::vec(-1.0f32..1.0, 2 * 64),
        exp in -14i32..8,
        imp in proptest::collection::vec(0.0f32..10.0, 2 * 64),
    ) {
        let x: Vec<f32> = xs.iter().map(|v| v * 2f32.powi(exp)).collect();
        let back = dequantize(&quantize(&x, Some(&imp)), x.len());
        prop_assert!(back.iter().all(|v| v.is_finite()));
        let err = rel_rmse(&x, &back, Some(&imp));
        prop_assert!(err < 0.35 || x.iter().all(|v| *v == 0.0), "relative RMSE {}", err);
    }
}

/// Quantization speed (`cargo test --release -p kiln-quant --test kq2 -- --ignored --nocapture`).
#[test]
#[ignore]
fn quantization_speed() {
    let mut rng = Rng(15);
    let x = rng.gauss_vec(64 * 4096, 0.02);
    let imp: Vec<f32> = (0..x.len()).map(|_| (2.0 * rng.gauss()).exp()).collect();
    let t = std::time::Instant::now();
    let q = quantize(&x, Some(&imp));
    let secs = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let back = dequantize(&q, x.len());
    let dq = t.elapsed().as_secs_f64();
    eprintln!(
        "quantize {:.2} µs/weight, dequantize {:.1} ns/weight ({})",
        secs * 1e6 / x.len() as f64,
        dq * 1e9 / x.len() as f64,
        back[0]
    );
}
