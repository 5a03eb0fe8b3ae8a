//! The CPU backend against the reference interpreter: the common differential
//! body (per-op budgets against kiln's exact numerics), and bit-for-bit
//! equality with the reference in llama.cpp numerics, which is what the CPU
//! backend computes, on every instruction-set path this CPU has (AVX-512 VNNI, AVX2,
//! portable scalar).

use std::sync::Arc;

use kiln_backends::conformance::{self, OwnedWeights, cases};
use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Backend, Logits, Numerics, SessionOptions, WeightSource};
use kiln_cpu::{CpuBackend, Isa};
use kiln_ir::verify;

/// The CPU backend computes in llama.cpp's numerics, so the common body holds
/// it to the reference in the same numerics.
#[test]
fn cpu_backend_matches_the_reference_within_budgets() {
    conformance::check_backend_in(&CpuBackend::new(), Numerics::Ggml);
}

/// Every case, every forward call: the logits of `backend` equal the
/// reference's `Numerics::Ggml` logits bit for bit.
fn bit_exact(backend: &CpuBackend) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in cases() {
        let module = Arc::new(verify(c.module.clone()).unwrap());
        let weights: Arc<dyn WeightSource> = Arc::new(OwnedWeights(c.weights.clone()));
        let opts = SessionOptions { max_context: 128, threads: 2, numerics: Numerics::Ggml, ..Default::default() };
        let mut want = ReferenceBackend.prepare(module.clone(), weights.clone(), &opts).unwrap();
        let mut got = backend.prepare(module, weights, &SessionOptions { numerics: Numerics::Exact, ..opts }).unwrap();
        let mut calls = c.calls.clone();
        // A prompt long enough for the four-token kernels and their remainder.
        calls.push(((0..11).map(|i| (i * 7 % 30) as u32).collect(), Logits::All));
        for (tokens, mode) in &calls {
            let w = want.forward(tokens, *mode).unwrap();
            let g = got.forward(tokens, *mode).unwrap();
            checked += 1;
            if w.iter().map(|v| v.to_bits()).ne(g.iter().map(|v| v.to_bits())) {
                let worst = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                failures.push(format!("{}: {} tokens, max |diff| {worst:e}", c.name, tokens.len()));
                break;
            }
        }
    }
    assert!(checked > 100);
    assert!(
        failures.is_empty(),
        "{} ({}) differs from the reference (Ggml numerics):\n{}",
        backend.isa().name(),
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cpu_backend_equals_the_reference_in_ggml_numerics_bit_for_bit() {
    bit_exact(&CpuBackend::new());
}

#[test]
fn scalar_path_equals_the_reference_in_ggml_numerics_bit_for_bit() {
    let b = CpuBackend::with_isa(Isa::Scalar);
    assert_eq!(b.isa(), Isa::Scalar);
    bit_exact(&b);
}

#[test]
fn avx2_path_equals_the_reference_in_ggml_numerics_bit_for_bit() {
    // On a CPU with AVX-512 VNNI the default path is that one; this holds the AVX2 kernels too.
    let b = CpuBackend::with_isa(Isa::Avx2);
    if b.isa() == Isa::Avx2 {
        bit_exact(&b);
    }
}
