//! Bit-exact checks of `kiln_backends::quant` against fixtures produced by gguf-py (tests/oracle/make_dequant_fixtures.py).

use std::path::PathBuf;

use kiln_backends::quant::{dequantize_row, dot_row, quantize_row};
use kiln_ir::DType;

// Every ggml-compatible float storage dtype (`DType::floats()`, `is_ggml`) has `<name>.bin` and `<name>.f32` fixtures.

/// Dtypes with `<name>.quant.bin` fixtures (gguf-py quantization of `quant_input.f32`).
const QUANT_TYPES: &[DType] =
    &[DType::F16, DType::BF16, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dequant")
}

fn read(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_f32(name: &str) -> Vec<f32> {
    let bytes = read(name);
    assert_eq!(bytes.len() % 4, 0, "{name}: not a whole number of f32");
    bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect()
}

/// Compares bit patterns; a NaN only has to be matched by a NaN.
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut mismatches = Vec::new();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() };
        if !same {
            mismatches.push(format!("[{i}] got {g:e} ({:#010x}) want {w:e} ({:#010x})", g.to_bits(), w.to_bits()));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {} values differ; first: {:?}",
        mismatches.len(),
        want.len(),
        &mismatches[..mismatches.len().min(8)]
    );
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    for dtype in DType::floats().filter(|d| d.is_ggml()) {
        let src = read(&format!("{dtype}.bin"));
        let want = read_f32(&format!("{dtype}.f32"));
        let mut got = vec![0.0f32; want.len()];
        dequantize_row(dtype, &src, &mut got).unwrap_or_else(|e| panic!("{e}"));
        assert_same_bits(&format!("dequantize {dtype}"), &got, &want);
    }
}

#[test]
fn dequantize_one_block_at_a_time_matches_too() {
    for dtype in DType::floats().filter(|d| d.is_ggml()) {
        let src = read(&format!("{dtype}.bin"));
        let want = read_f32(&format!("{dtype}.f32"));
        let (be, bb) = (dtype.block_elems() as usize, dtype.block_bytes() as usize);
        let mut got = vec![0.0f32; want.len()];
        for (s, d) in src.chunks(bb).zip(got.chunks_mut(be)) {
            dequantize_row(dtype, s, d).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_same_bits(&format!("blockwise {dtype}"), &got, &want);
    }
}

#[test]
fn dot_row_agrees_with_the_oracle_values() {
    for dtype in DType::floats().filter(|d| d.is_ggml()) {
        let src = read(&format!("{dtype}.bin"));
        let want = read_f32(&format!("{dtype}.f32"));
        // Drop non-finite oracle values by zeroing their x (they would poison the sum).
        let x: Vec<f32> = (0..want.len())
            .map(|i| if want[i].is_finite() { ((i * 37 % 101) as f32 - 50.0) / 25.0 } else { 0.0 })
            .collect();
        let got = dot_row(dtype, &src, &x).unwrap_or_else(|e| panic!("{e}"));
        if want.iter().any(|w| !w.is_finite()) {
            // 0 * inf/NaN is NaN, as it would be in dequantize-then-dot.
            assert!(got.is_nan(), "{dtype}: {got}");
            continue;
        }
        let reference: f64 = want.iter().zip(&x).map(|(w, x)| f64::from(*w) * f64::from(*x)).sum();
        let scale: f64 = want.iter().zip(&x).map(|(w, x)| (f64::from(*w) * f64::from(*x)).abs()).sum();
        assert!((f64::from(got) - reference).abs() <= scale * 1e-5, "{dtype}: dot {got} vs reference {reference}");
    }
}

#[test]
fn quantize_matches_gguf_py_bit_for_bit() {
    let input = read_f32("quant_input.f32");
    for &dtype in QUANT_TYPES {
        let want = read(&format!("{dtype}.quant.bin"));
        let mut got = vec![0u8; want.len()];
        quantize_row(dtype, &input, &mut got).unwrap_or_else(|e| panic!("{e}"));
        let bb = dtype.block_bytes() as usize;
        let first_bad = got.chunks(bb).zip(want.chunks(bb)).position(|(g, w)| g != w);
        assert_eq!(
            first_bad,
            None,
            "quantize {dtype}: block {first_bad:?} differs: got {:02x?} want {:02x?}",
            first_bad.map(|b| &got[b * bb..(b + 1) * bb]),
            first_bad.map(|b| &want[b * bb..(b + 1) * bb]),
        );
    }
}
