//! Quantized block math for ggml-compatible storage formats: row dequantization, the reference quantized dot product and quantizers.
//!
//! Every function works on one *row*: a whole number of blocks of `dtype`
//! (see [`DType::block_elems`] / [`DType::block_bytes`]). Dequantization is
//! bit-identical to ggml's `dequantize_row_*` and gguf-py's
//! `gguf.quants.dequantize`; quantization ([`quantize_row`],
//! [`quantize_row_weighted`]) is bit-identical to ggml's quantizers
//! (llama.cpp b11434), with or without an importance matrix, for every ggml
//! type but IQ4_NL, whose quantizer is kiln's own ([`iq4nl`]).

pub mod act;
pub mod ggml_dot;
pub mod iq4nl;
pub mod kq2;
mod kquants;
mod kquants_quant;
mod legacy;
mod plain;
pub use plain::{F8E4M3_MAX, f8e4m3_to_f32, f32_to_f8e4m3_bits};

use kiln_ir::DType;
use thiserror::Error;

/// Why a row could not be (de)quantized.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantError {
    /// The element count is not a whole number of blocks.
    #[error("{dtype}: {elems} elements are not a whole number of {block_elems}-element blocks")]
    PartialBlock { dtype: DType, elems: usize, block_elems: u64 },
    /// The byte buffer does not hold exactly the blocks for the element count.
    #[error("{dtype}: {elems} elements take {expected} bytes but the buffer has {actual} bytes")]
    SizeMismatch { dtype: DType, elems: usize, expected: usize, actual: usize },
    /// The operation is not implemented for this dtype.
    #[error("{dtype}: {op} is not supported for this type")]
    Unsupported { dtype: DType, op: &'static str },
    /// The importance weights do not have one entry per element of the row.
    #[error("{dtype}: a row of {elems} elements needs {elems} importance weights, got {actual}")]
    ImportanceLength { dtype: DType, elems: usize, actual: usize },
}

/// Bytes of `elems` elements of `dtype`, or the reason that is not a whole
/// number of blocks.
fn row_bytes(dtype: DType, elems: usize) -> Result<usize, QuantError> {
    let partial = || QuantError::PartialBlock { dtype, elems, block_elems: dtype.block_elems() };
    let n = dtype.row_bytes(elems as u64).ok_or_else(partial)?;
    usize::try_from(n).map_err(|_| partial())
}

/// Checks that `bytes` holds exactly the blocks of `elems` elements.
fn check_row(dtype: DType, elems: usize, bytes: usize) -> Result<(), QuantError> {
    let expected = row_bytes(dtype, elems)?;
    if expected != bytes {
        return Err(QuantError::SizeMismatch { dtype, elems, expected, actual: bytes });
    }
    Ok(())
}

/// Dequantizes one row: `src` must hold exactly the `dst.len() / block_elems`
/// blocks of `dtype`. Supports every float storage type (not `I32`).
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_row(dtype, dst.len(), src.len())?;
    match dtype {
        DType::F32 => plain::dequant_f32(src, dst),
        DType::F16 => plain::dequant_f16(src, dst),
        DType::BF16 => plain::dequant_bf16(src, dst),
        DType::F8E4M3 => plain::dequant_f8e4m3(src, dst),
        DType::I32 => {
            return Err(QuantError::Unsupported { dtype, op: "dequantization" });
        }
        DType::Q4_0 => blocks(src, dst, legacy::dequant_q4_0),
        DType::Q4_1 => blocks(src, dst, legacy::dequant_q4_1),
        DType::Q5_0 => blocks(src, dst, legacy::dequant_q5_0),
        DType::Q5_1 => blocks(src, dst, legacy::dequant_q5_1),
        DType::Q8_0 => blocks(src, dst, legacy::dequant_q8_0),
        DType::IQ4NL => blocks(src, dst, iq4nl::dequant_iq4_nl),
        DType::Q2K => blocks(src, dst, kquants::dequant_q2_k),
        DType::Q3K => blocks(src, dst, kquants::dequant_q3_k),
        DType::Q4K => blocks(src, dst, kquants::dequant_q4_k),
        DType::Q5K => blocks(src, dst, kquants::dequant_q5_k),
        DType::Q6K => blocks(src, dst, kquants::dequant_q6_k),
        DType::KQ2 => kq2::dequantize_kq2(src, dst)?,
    }
    Ok(())
}

/// Dot product of one quantized row with `x` (`x.len()` elements; `row`
/// must hold exactly their blocks). Dequantizes block by block into a stack
/// buffer, without allocating. Equal to [`dequantize_row`] followed by an
/// f32 dot product, up to the order of the additions.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check_row(dtype, x.len(), row.len())?;
    Ok(match dtype {
        DType::F32 => plain::dot_f32(row, x),
        DType::F16 => plain::dot_f16(row, x),
        DType::BF16 => plain::dot_bf16(row, x),
        DType::F8E4M3 => plain::dot_f8e4m3(row, x),
        DType::I32 => {
            return Err(QuantError::Unsupported { dtype, op: "dot product" });
        }
        DType::Q4_0 => dot_blocks(row, x, legacy::dequant_q4_0),
        DType::Q4_1 => dot_blocks(row, x, legacy::dequant_q4_1),
        DType::Q5_0 => dot_blocks(row, x, legacy::dequant_q5_0),
        DType::Q5_1 => dot_blocks(row, x, legacy::dequant_q5_1),
        DType::Q8_0 => dot_blocks(row, x, legacy::dequant_q8_0),
        DType::IQ4NL => dot_blocks(row, x, iq4nl::dequant_iq4_nl),
        DType::Q2K => dot_blocks(row, x, kquants::dequant_q2_k),
        DType::Q3K => dot_blocks(row, x, kquants::dequant_q3_k),
        DType::Q4K => dot_blocks(row, x, kquants::dequant_q4_k),
        DType::Q5K => dot_blocks(row, x, kquants::dequant_q5_k),
        DType::Q6K => dot_blocks(row, x, kquants::dequant_q6_k),
        DType::KQ2 => kq2::dot_kq2(row, x)?,
    })
}

/// Quantizes one row of `src.len()` elements into `dst`, which must have
/// exactly the bytes of their blocks. Bit-identical to ggml's
/// `quantize_row_*_ref` (which is also what ggml's `quantize_*` run without
/// an importance matrix): round-to-nearest for the float and legacy types,
/// ggml's scale searches for Q2_K…Q6_K. Supported for every type but `I32`.
///
/// Never panics on finite input. Blocks made from NaN or infinite elements
/// are unspecified (as in ggml); the float types convert them as usual.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_row(dtype, src.len(), dst.len())?;
    match dtype {
        DType::F32 => plain::quant_f32(src, dst),
        DType::F16 => plain::quant_f16(src, dst),
        DType::BF16 => plain::quant_bf16(src, dst),
        DType::F8E4M3 => plain::quant_f8e4m3(src, dst),
        DType::Q4_0 => quant_blocks(src, dst, legacy::quant_q4_0),
        DType::Q4_1 => quant_blocks(src, dst, legacy::quant_q4_1),
        DType::Q5_0 => quant_blocks(src, dst, legacy::quant_q5_0),
        DType::Q5_1 => quant_blocks(src, dst, legacy::quant_q5_1),
        DType::Q8_0 => quant_blocks(src, dst, legacy::quant_q8_0),
        DType::IQ4NL => quant_blocks(src, dst, iq4nl::quant_iq4_nl),
        DType::Q2K => quant_blocks(src, dst, kquants_quant::quant_q2_k),
        DType::Q3K => quant_blocks(src, dst, kquants_quant::quant_q3_k),
        DType::Q4K => quant_blocks(src, dst, kquants_quant::quant_q4_k),
        DType::Q5K => quant_blocks(src, dst, kquants_quant::quant_q5_k),
        DType::Q6K => quant_blocks(src, dst, |x, b| kquants_quant::quant_q6_k(x, None, b)),
        DType::KQ2 => kq2::quantize_kq2(src, None, dst)?,
        DType::I32 => {
            return Err(QuantError::Unsupported { dtype, op: "quantization" });
        }
    }
    Ok(())
}

/// Quantizes one row like [`quantize_row`], but guided by `importance`: one
/// weight per element (per input column of the weight matrix, e.g. an
/// imatrix's mean squared activations), so that important columns are
/// reproduced more accurately. Bit-identical to ggml's
/// `quantize_*(src, dst, 1, n, importance)` (`ggml_quantize_chunk`, as run by
/// `llama-quantize --imatrix`).
///
/// `None` is exactly [`quantize_row`] (ggml falls back to `_ref` for every
/// type here). Q8_0 and the float types ignore the weights, as ggml does.
/// Weights should be finite and non-negative; other values never panic but
/// give unspecified blocks. Q4_0, Q4_1, Q5_0 and Q5_1 use the mean square of
/// the whole row, so quantizing a row in pieces differs from quantizing it
/// at once; the k-quants work per 256-element block.
pub fn quantize_row_weighted(
    dtype: DType,
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let Some(qw) = importance else {
        return quantize_row(dtype, src, dst);
    };
    check_row(dtype, src.len(), dst.len())?;
    if qw.len() != src.len() {
        return Err(QuantError::ImportanceLength { dtype, elems: src.len(), actual: qw.len() });
    }
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::Q8_0 | DType::I32 => {
            return quantize_row(dtype, src, dst);
        }
        DType::Q4_0 => legacy::quant_row_weighted(src, qw, dst, legacy::quant_q4_0_weighted),
        DType::Q4_1 => legacy::quant_row_weighted(src, qw, dst, legacy::quant_q4_1_weighted),
        DType::Q5_0 => legacy::quant_row_weighted(src, qw, dst, legacy::quant_q5_0_weighted),
        DType::Q5_1 => legacy::quant_row_weighted(src, qw, dst, legacy::quant_q5_1_weighted),
        DType::IQ4NL => legacy::quant_row_weighted(src, qw, dst, iq4nl::quant_iq4_nl_weighted),
        DType::Q2K => weighted_blocks(src, qw, dst, kquants_quant::quant_q2_k_weighted),
        DType::Q3K => weighted_blocks(src, qw, dst, kquants_quant::quant_q3_k_weighted),
        DType::Q4K => weighted_blocks(src, qw, dst, kquants_quant::quant_q4_k_weighted),
        DType::Q5K => weighted_blocks(src, qw, dst, kquants_quant::quant_q5_k_weighted),
        DType::Q6K => weighted_blocks(src, qw, dst, |x, w, b| kquants_quant::quant_q6_k(x, Some(w), b)),
        DType::KQ2 => kq2::quantize_kq2(src, Some(qw), dst)?,
    }
    Ok(())
}

/// Applies a per-block dequantizer to every block (lengths checked by the caller).
#[inline]
fn blocks<const B: usize, const Q: usize>(src: &[u8], dst: &mut [f32], f: impl Fn(&[u8; B], &mut [f32; Q])) {
    for (b, o) in src.as_chunks::<B>().0.iter().zip(dst.as_chunks_mut::<Q>().0) {
        f(b, o);
    }
}

/// Applies a per-block weighted quantizer to every block and its weights
/// (lengths checked by the caller).
#[inline]
fn weighted_blocks<const B: usize, const Q: usize>(
    src: &[f32],
    qw: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; Q], &[f32; Q], &mut [u8; B]),
) {
    let blocks = src.as_chunks::<Q>().0.iter().zip(qw.as_chunks::<Q>().0);
    for ((x, w), b) in blocks.zip(dst.as_chunks_mut::<B>().0) {
        f(x, w, b);
    }
}

/// Applies a per-block quantizer to every block (lengths checked by the caller).
#[inline]
fn quant_blocks<const B: usize, const Q: usize>(src: &[f32], dst: &mut [u8], f: impl Fn(&[f32; Q], &mut [u8; B])) {
    for (x, b) in src.as_chunks::<Q>().0.iter().zip(dst.as_chunks_mut::<B>().0) {
        f(x, b);
    }
}

const LANES: usize = 8;

/// Sums accumulator lanes pairwise.
#[inline]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Dot of a row of blocks with `x`: each block is dequantized into a stack
/// buffer and multiplied into eight accumulators (lengths checked by the caller).
#[inline]
fn dot_blocks<const B: usize, const Q: usize>(row: &[u8], x: &[f32], f: impl Fn(&[u8; B], &mut [f32; Q])) -> f32 {
    let mut buf = [0.0f32; Q];
    let mut acc = [0.0f32; LANES];
    for (b, xs) in row.as_chunks::<B>().0.iter().zip(x.as_chunks::<Q>().0) {
        f(b, &mut buf);
        for (w, v) in buf.as_chunks::<LANES>().0.iter().zip(xs.as_chunks::<LANES>().0) {
            for k in 0..LANES {
                acc[k] += w[k] * v[k];
            }
        }
    }
    sum_lanes(&acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every dtype these functions handle.
    fn float_types() -> Vec<DType> {
        DType::floats().collect()
    }

    fn be(d: DType) -> usize {
        d.block_elems() as usize
    }

    fn bb(d: DType) -> usize {
        d.block_bytes() as usize
    }

    #[test]
    fn length_errors_are_reported_not_panicked() {
        let mut out = [0.0f32; 32];
        assert_eq!(
            dequantize_row(DType::Q4_0, &[0u8; 17], &mut out),
            Err(QuantError::SizeMismatch { dtype: DType::Q4_0, elems: 32, expected: 18, actual: 17 })
        );
        assert_eq!(
            dequantize_row(DType::Q4_0, &[0u8; 18], &mut out[..31]),
            Err(QuantError::PartialBlock { dtype: DType::Q4_0, elems: 31, block_elems: 32 })
        );
        assert!(matches!(
            dequantize_row(DType::I32, &[0u8; 4], &mut out[..1]),
            Err(QuantError::Unsupported { dtype: DType::I32, .. })
        ));
        assert!(dot_row(DType::Q6K, &[0u8; 209], &[0.0; 256]).is_err());
        assert!(dot_row(DType::F16, &[0u8; 4], &[0.0; 3]).is_err());
        assert!(quantize_row(DType::Q4K, &[0.0; 256], &mut [0u8; 143]).is_err());
        assert!(quantize_row(DType::I32, &[0.0; 1], &mut [0u8; 4]).is_err());
        assert!(quantize_row(DType::Q8_0, &[0.0; 32], &mut [0u8; 35]).is_err());
        let msg = dequantize_row(DType::Q8_0, &[0u8; 3], &mut out).map_err(|e| e.to_string());
        assert_eq!(msg, Err("q8_0: 32 elements take 34 bytes but the buffer has 3 bytes".into()));
    }

    #[test]
    fn empty_rows_are_fine() {
        for d in float_types() {
            assert_eq!(dequantize_row(d, &[], &mut []), Ok(()));
            assert_eq!(dot_row(d, &[], &[]), Ok(0.0));
        }
    }

    #[test]
    fn hand_built_blocks() {
        // Q8_0: d = 0.5, q = j - 16.
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));
        let mut out = [0.0f32; 32];
        assert_eq!(dequantize_row(DType::Q8_0, &b, &mut out), Ok(()));
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5);
        }
        // Q4_0: d = 2, qs[j] = j | (15 - j) << 4.
        let mut b = vec![0x00, 0x40];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        assert_eq!(dequantize_row(DType::Q4_0, &b, &mut out), Ok(()));
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * (7.0 - j as f32));
        }
        // Q5_1: d = 1, m = -16, qh = all ones, qs = 0: every q is 16, value 0.
        let mut b = vec![0x00, 0x3c, 0x00, 0xcc, 0xff, 0xff, 0xff, 0xff];
        b.extend([0u8; 16]);
        assert_eq!(dequantize_row(DType::Q5_1, &b, &mut out), Ok(()));
        assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
    }

    #[test]
    fn q4_k_scale_unpacking() {
        // d = 1, dmin = 1, scales chosen so sub-block j has scale j+1 and min j,
        // with the high bits of sub-blocks 4..8 exercised (scale 33+j, min 40+j).
        let mut b = [0u8; 144];
        b[0..2].copy_from_slice(&[0x00, 0x3c]);
        b[2..4].copy_from_slice(&[0x00, 0x3c]);
        let sc: [u8; 8] = [1, 2, 3, 4, 37, 38, 39, 40];
        let mn: [u8; 8] = [0, 1, 2, 3, 44, 45, 46, 47];
        let s = &mut b[4..16];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        // All quants 1: value = sc - mn.
        b[16..].fill(0x11);
        let mut out = [0.0f32; 256];
        assert_eq!(dequantize_row(DType::Q4K, &b, &mut out), Ok(()));
        for (e, v) in out.iter().enumerate() {
            let j = e / 32;
            assert_eq!(*v, f32::from(sc[j]) - f32::from(mn[j]), "element {e}");
        }
    }

    /// Makes random row bytes finite: the f16 scale fields of each block are
    /// replaced by values from `scales`, plain elements lose their top exponent bit.
    fn sanitize(dtype: DType, bytes: &mut [u8], scales: &[u16]) {
        let fields: &[usize] = match dtype {
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4NL => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q2K => &[80, 82],
            DType::Q3K => &[108],
            DType::Q6K => &[208],
            // Any kq2 bytes decode to finite values.
            DType::KQ2 => &[],
            // Plain types: clear the exponent's top bit so no inf/NaN appears.
            DType::F16 => {
                for c in bytes.chunks_exact_mut(2) {
                    c[1] &= 0xbf;
                }
                return;
            }
            DType::BF16 => {
                for c in bytes.chunks_exact_mut(2) {
                    c[1] &= 0xbf;
                }
                return;
            }
            DType::F32 => {
                for c in bytes.chunks_exact_mut(4) {
                    c[3] &= 0xbf;
                }
                return;
            }
            // FP8: no infinities; clear NaN codes' low bit.
            DType::F8E4M3 => {
                for c in bytes.iter_mut().filter(|c| **c & 0x7f == 0x7f) {
                    *c &= 0xfe;
                }
                return;
            }
            DType::I32 => &[],
        };
        for (i, block) in bytes.chunks_exact_mut(bb(dtype)).enumerate() {
            for (k, &f) in fields.iter().enumerate() {
                // Clearing the top exponent bit keeps scales finite and below 2.
                let bits = scales[(i * 2 + k) % scales.len()] & 0xbfff;
                block[f..f + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
    }

    fn dtype_strategy() -> impl Strategy<Value = DType> {
        proptest::sample::select(float_types())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn dot_row_matches_dequantize_then_dot(
            dtype in dtype_strategy(),
            nblocks in 0usize..5,
            extra in 0usize..9,
            seed_bytes in proptest::collection::vec(any::<u8>(), 5 * 256 * 4 + 64),
            scales in proptest::collection::vec(any::<u16>(), 1..8),
            xs in proptest::collection::vec(-4.0f32..4.0, 5 * 256 + 16),
        ) {
            // Plain types get a few extra elements to exercise the tail.
            let n = nblocks * be(dtype) + if dtype.is_quantized() { 0 } else { extra };
            let nbytes = n / be(dtype) * bb(dtype);
            let mut row = seed_bytes[..nbytes].to_vec();
            sanitize(dtype, &mut row, &scales);
            let x = &xs[..n];
            let mut w = vec![0.0f32; n];
            prop_assert_eq!(dequantize_row(dtype, &row, &mut w), Ok(()));
            prop_assert!(w.iter().all(|v| v.is_finite()));
            let reference: f64 = w.iter().zip(x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let scale: f64 = w.iter().zip(x).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum();
            let got = dot_row(dtype, &row, x).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let tol = scale * 1e-5 + 1e-30;
            prop_assert!(
                (f64::from(got) - reference).abs() <= tol,
                "{dtype}: got {got}, reference {reference}, tolerance {tol}"
            );
        }

        #[test]
        fn q8_0_round_trip_error_is_bounded(xs in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4)) {
            round_trip(DType::Q8_0, &xs, |amax, _range, _min| amax / 127.0 * 0.6 + 1e-5)?;
        }

        #[test]
        fn q4_0_round_trip_error_is_bounded(xs in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4)) {
            // The element opposite the block's extreme clamps from 16 to 15: one full step.
            round_trip(DType::Q4_0, &xs, |amax, _range, _min| amax / 8.0 * 1.01 + 1e-5)?;
        }

        #[test]
        fn q5_0_round_trip_error_is_bounded(xs in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4)) {
            round_trip(DType::Q5_0, &xs, |amax, _range, _min| amax / 16.0 * 1.01 + 1e-5)?;
        }

        #[test]
        fn q4_1_round_trip_error_is_bounded(xs in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4)) {
            round_trip(DType::Q4_1, &xs, |_amax, range, min| {
                range / 15.0 * 0.52 + min.abs() / 1024.0 + 1e-5
            })?;
        }

        #[test]
        fn q5_1_round_trip_error_is_bounded(xs in proptest::collection::vec(-1000.0f32..1000.0, 32 * 4)) {
            round_trip(DType::Q5_1, &xs, |_amax, range, min| {
                range / 31.0 * 0.54 + min.abs() / 1024.0 + 1e-5
            })?;
        }

        #[test]
        fn plain_round_trips(xs in proptest::collection::vec(-65000.0f32..65000.0, 1..40)) {
            round_trip(DType::F32, &xs, |_, _, _| 0.0)?;
            round_trip(DType::F16, &xs, |amax, _, _| amax / 2048.0 + 1e-7)?;
            round_trip(DType::BF16, &xs, |amax, _, _| amax / 256.0)?;
        }

        #[test]
        fn f8e4m3_round_trip_error_is_half_a_step(xs in proptest::collection::vec(-448.0f32..448.0, 1..40)) {
            // 3 mantissa bits: at most 1/16 of the value, or half the 2^-9 subnormal step.
            let n = xs.len();
            let mut q = vec![0u8; n];
            quantize_row(DType::F8E4M3, &xs, &mut q).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut back = vec![0.0f32; n];
            dequantize_row(DType::F8E4M3, &q, &mut back).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (a, b) in xs.iter().zip(&back) {
                prop_assert!((a - b).abs() <= (a.abs() / 16.0).max(1.0 / 1024.0), "{a} -> {b}");
            }
        }
    }

    /// Quantizes `xs`, dequantizes, and checks each element's error against
    /// `budget(block absmax, block max - min, block min)`.
    fn round_trip(dtype: DType, xs: &[f32], budget: impl Fn(f32, f32, f32) -> f32) -> Result<(), TestCaseError> {
        let n = xs.len();
        let mut q = vec![0u8; n / be(dtype) * bb(dtype)];
        quantize_row(dtype, xs, &mut q).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut back = vec![0.0f32; n];
        dequantize_row(dtype, &q, &mut back).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let group = if dtype.is_quantized() { be(dtype) } else { n };
        for (bx, bback) in xs.chunks(group).zip(back.chunks(group)) {
            let amax = bx.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let min = bx.iter().fold(f32::MAX, |a, &v| a.min(v));
            let max = bx.iter().fold(-f32::MAX, |a, &v| a.max(v));
            let limit = budget(amax, max - min, min);
            for (a, b) in bx.iter().zip(bback) {
                prop_assert!((a - b).abs() <= limit, "{dtype}: {a} -> {b}, limit {limit}");
            }
        }
        Ok(())
    }
}
