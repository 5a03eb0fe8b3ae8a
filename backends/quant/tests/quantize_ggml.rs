//! Quantizers against ggml: byte equality with llama.cpp's own output (fixtures from
//! `tests/oracle/make_quant_fixtures.sh`), with and without importance weights, plus
//! round-trip error budgets, the benefit of importance weighting, and robustness.

use kiln_ir::DType;
use kiln_quant::{QuantError, dequantize_row, quantize_row, quantize_row_weighted};
use proptest::prelude::*;
use std::path::PathBuf;

/// Every type ggml can quantize that kiln quantizes, weighted and not.
const TYPES: &[DType] = &[
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
];

/// The fixture tensors: name, rows, columns (see the oracle program).
const TENSORS: &[(&str, usize, usize)] = &[("a", 16, 512), ("b", 4, 768), ("c", 2, 256)];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

fn read(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name).as_chunks::<4>().0.iter().map(|b| f32::from_le_bytes(*b)).collect()
}

fn row_bytes(dtype: DType, n: usize) -> usize {
    n / dtype.block_elems() as usize * dtype.block_bytes() as usize
}

/// Quantizes every row of every fixture tensor and compares with ggml's bytes.
fn check_against_ggml(weighted: bool) {
    for &(name, rows, cols) in TENSORS {
        let input = read_f32(&format!("{name}.input.f32"));
        let imatrix = read_f32(&format!("{name}.imatrix.f32"));
        assert_eq!((input.len(), imatrix.len()), (rows * cols, cols), "{name}: fixture shape");
        for &dtype in TYPES {
            let suffix = if weighted { ".imat" } else { "" };
            let want = read(&format!("{name}.{dtype}{suffix}.bin"));
            let rb = row_bytes(dtype, cols);
            assert_eq!(want.len(), rows * rb, "{name}.{dtype}{suffix}: fixture size");
            let bb = dtype.block_bytes() as usize;
            for (r, (x, want)) in input.chunks(cols).zip(want.chunks(rb)).enumerate() {
                let mut got = vec![0u8; rb];
                let importance = weighted.then_some(imatrix.as_slice());
                quantize_row_weighted(dtype, x, importance, &mut got).unwrap_or_else(|e| panic!("{e}"));
                let bad = got.chunks(bb).zip(want.chunks(bb)).position(|(g, w)| g != w);
                assert_eq!(
                    bad,
                    None,
                    "{name}.{dtype}{suffix} row {r}: block {bad:?} differs\n got  {:02x?}\n want {:02x?}",
                    bad.map(|b| &got[b * bb..(b + 1) * bb]),
                    bad.map(|b| &want[b * bb..(b + 1) * bb]),
                );
                if !weighted {
                    let mut plain = vec![0u8; rb];
                    quantize_row(dtype, x, &mut plain).unwrap_or_else(|e| panic!("{e}"));
                    assert!(plain == got, "{name}.{dtype} row {r}: quantize_row differs from weighted(None)");
                }
            }
        }
    }
}

#[test]
fn unweighted_matches_ggml_bit_for_bit() {
    check_against_ggml(false);
}

#[test]
fn importance_weighted_matches_ggml_bit_for_bit() {
    check_against_ggml(true);
}

#[test]
fn importance_length_is_checked() {
    let x = [0.5f32; 256];
    let mut out = [0u8; 144];
    assert_eq!(
        quantize_row_weighted(DType::Q4K, &x, Some(&[1.0; 255]), &mut out),
        Err(QuantError::ImportanceLength { dtype: DType::Q4K, elems: 256, actual: 255 })
    );
    assert!(matches!(
        quantize_row_weighted(DType::Q4K, &x, Some(&[1.0; 256]), &mut out[..143]),
        Err(QuantError::SizeMismatch { .. })
    ));
    assert!(matches!(
        quantize_row_weighted(DType::Q6K, &x[..100], None, &mut out[..100]),
        Err(QuantError::PartialBlock { .. })
    ));
}

/// Deterministic pseudo-random numbers (splitmix64) for the non-proptest tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / 16_777_216.0
    }

    /// Approximately standard normal.
    fn gauss(&mut self) -> f32 {
        (0..12).map(|_| self.uniform()).sum::<f32>() - 6.0
    }
}

fn round_trip(dtype: DType, x: &[f32], importance: Option<&[f32]>) -> Vec<f32> {
    let mut q = vec![0u8; row_bytes(dtype, x.len())];
    quantize_row_weighted(dtype, x, importance, &mut q).unwrap_or_else(|e| panic!("{dtype}: {e}"));
    let mut back = vec![0.0f32; x.len()];
    dequantize_row(dtype, &q, &mut back).unwrap_or_else(|e| panic!("{dtype}: {e}"));
    back
}

/// RMS error relative to the row's RMS (0 for an all-zero row reproduced exactly).
fn relative_rmse(x: &[f32], back: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(back).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum();
    let norm: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    if err == 0.0 { 0.0 } else { (err / norm).sqrt() }
}

/// Round-trip budgets: the largest relative RMSE of quantize→dequantize allowed
/// for (dense rows, rows with one huge outlier or a constant value), weighted or
/// not, with row magnitudes 2^-6..2^6. Measured worst cases over 2,000 dense and
/// 20,000 special rows of each kind (about 20% below each budget):
///
/// | type | dense (uniform, cubed, Gaussian) | special (outlier / constant) |
/// |------|------|------|
/// | Q2_K | 0.446 | 0.431 / 0.001 |
/// | Q3_K | 0.185 | 0.205 / 0.002 |
/// | Q4_K | 0.092 | 0.150 / 0.017 |
/// | Q5_K | 0.046 | 0.076 / 0.035 |
/// | Q6_K | 0.025 | 0.240 (weighted; 0.049 unweighted) / 0.065 |
/// | Q4_0 | 0.101 | 0.272 / 0.001 |
/// | Q4_1 | 0.099 | 0.139 / 0.001 |
/// | Q5_0 | 0.055 | 0.135 / 0.001 |
/// | Q5_1 | 0.047 | 0.069 / 0.001 |
/// | Q8_0 | 0.0063 | 0.017 / 0.002 |
///
/// Typical (mean) dense errors are 10–20% below the worst. Weighted Q6_K passes
/// the raw importances to its scale search, so an outlier in an unimportant
/// column may be clipped; Q6_K's constant rows lose to its f16 `d` going
/// subnormal (`d` = amax / 4096).
fn budget(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::Q2K => (0.53, 0.52),
        DType::Q3K => (0.22, 0.25),
        DType::Q4K => (0.11, 0.18),
        DType::Q5K => (0.055, 0.09),
        DType::Q6K => (0.03, 0.29),
        DType::Q4_0 => (0.12, 0.33),
        DType::Q4_1 => (0.12, 0.17),
        DType::Q5_0 => (0.065, 0.165),
        DType::Q5_1 => (0.056, 0.085),
        DType::Q8_0 => (0.0075, 0.02),
        _ => (0.0, 0.0),
    }
}

/// A test row: whether it is "special" (one outlier, constant, zero) and its values.
fn row_strategy() -> impl Strategy<Value = (bool, Vec<f32>)> {
    (1usize..=3, -6i32..=6).prop_flat_map(|(blocks, exp)| {
        let scale = 2f32.powi(exp);
        let n = blocks * 256;
        let unit = || proptest::collection::vec(-1.0f32..1.0, n);
        prop_oneof![
            unit().prop_map(move |v| (false, v.iter().map(|x| x * scale).collect())),
            unit().prop_map(move |v| (false, v.iter().map(|x| x * x * x * scale).collect())),
            (unit(), 0..n, 10.0f32..1000.0, any::<bool>()).prop_map(move |(mut v, at, big, neg)| {
                v[at] = if neg { -big } else { big };
                (true, v.iter().map(|x| x * scale).collect())
            }),
            (0.1f32..1.0, any::<bool>()).prop_map(move |(c, neg)| (true, vec![if neg { -c } else { c } * scale; n])),
            Just((true, vec![0.0f32; n])),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_error_is_within_budget((special, x) in row_strategy(), seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let importance: Vec<f32> = (0..x.len()).map(|_| rng.gauss().powi(2) + 0.01).collect();
        for &dtype in TYPES {
            let (dense, spec) = budget(dtype);
            let limit = if special { spec } else { dense };
            for imp in [None, Some(importance.as_slice())] {
                let back = round_trip(dtype, &x, imp);
                let e = relative_rmse(&x, &back);
                prop_assert!(e <= limit, "{dtype} (weighted: {}): relative RMSE {e} > {limit}", imp.is_some());
                if x.iter().all(|&v| v == 0.0) {
                    prop_assert!(back.iter().all(|&v| v == 0.0), "{dtype}: zero row not reproduced");
                }
            }
        }
    }

    #[test]
    fn any_finite_row_and_importance_quantize_without_panicking(
        x in proptest::collection::vec(finite(), 256),
        importance in proptest::collection::vec(finite(), 256),
    ) {
        for &dtype in TYPES {
            let mut out = vec![0u8; row_bytes(dtype, 256)];
            prop_assert_eq!(quantize_row(dtype, &x, &mut out), Ok(()));
            prop_assert_eq!(quantize_row_weighted(dtype, &x, Some(&importance), &mut out), Ok(()));
        }
    }
}

/// Any finite f32, of every magnitude and sign.
fn finite() -> impl Strategy<Value = f32> {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

#[test]
fn importance_lowers_the_weighted_error() {
    let mut rng = Rng(7);
    for &dtype in TYPES.iter().filter(|&&d| d != DType::Q8_0) {
        let (mut with, mut without) = (0.0f64, 0.0f64);
        for _ in 0..64 {
            let x: Vec<f32> = (0..512).map(|_| 0.02 * rng.gauss()).collect();
            // Like an imatrix: chi-square-ish, with a few dominant channels.
            let imp: Vec<f32> = (0..512)
                .map(|_| (rng.gauss().powi(2) + 0.01) * if rng.next().is_multiple_of(32) { 100.0 } else { 1.0 })
                .collect();
            let werr = |back: &[f32]| -> f64 {
                let e: f64 =
                    x.iter().zip(back).zip(&imp).map(|((a, b), w)| f64::from(*w) * f64::from(a - b).powi(2)).sum();
                let n: f64 = x.iter().zip(&imp).map(|(a, w)| f64::from(*w) * f64::from(*a).powi(2)).sum();
                e / n
            };
            with += werr(&round_trip(dtype, &x, Some(&imp)));
            without += werr(&round_trip(dtype, &x, None));
        }
        println!(
            "{dtype}: importance-weighted relative MSE {:.3e} with vs {:.3e} without",
            with / 64.0,
            without / 64.0
        );
        assert!(with < without, "{dtype}: importance did not help: {with} vs {without}");
    }
}

#[test]
fn extreme_and_non_finite_inputs_do_not_panic() {
    let specials = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45, -1e-45, 1e38, -1e-38, 3e19, 0.0, -0.0];
    let mut rng = Rng(11);
    let mut rows: Vec<Vec<f32>> = vec![
        vec![f32::MAX; 512],
        vec![-f32::MAX; 512],
        vec![1e-45; 512],
        (0..512).map(|i| specials[i % specials.len()]).collect(),
        (0..512).map(|_| specials[(rng.next() % specials.len() as u64) as usize]).collect(),
        (0..512).map(|i| if i % 3 == 0 { 1e30 * rng.gauss() } else { 1e-30 * rng.gauss() }).collect(),
    ];
    let mut nonfinite: Vec<f32> = (0..512).map(|_| rng.gauss()).collect();
    nonfinite[3] = f32::NAN;
    nonfinite[300] = f32::INFINITY;
    nonfinite[301] = f32::NEG_INFINITY;
    rows.push(nonfinite);
    let importances: Vec<Vec<f32>> = vec![
        vec![1.0; 512],
        vec![0.0; 512],
        vec![f32::MAX; 512],
        (0..512).map(|i| specials[i % specials.len()].abs()).collect(),
        (0..512).map(|i| if i % 7 == 0 { f32::NAN } else { -1.0 }).collect(),
    ];
    for &dtype in TYPES {
        let mut out = vec![0u8; row_bytes(dtype, 512)];
        for x in &rows {
            assert_eq!(quantize_row(dtype, x, &mut out), Ok(()));
            for imp in &importances {
                assert_eq!(quantize_row_weighted(dtype, x, Some(imp), &mut out), Ok(()));
            }
        }
    }
}
