//! Activation rounding as ggml's CPU backend does it before a dot product with a
//! weight row: activations are quantized to the weight type's "vec dot" type
//! (Q8_0, Q8_1, Q8_K, F16 or BF16) and the products are taken against those values.
//! kiln uses it only in llama.cpp-compatible numerics (`kiln_backends::Numerics::Ggml`),
//! to compare with llama.cpp token for token; the exact f32 path is the default.

use half::{bf16, f16};
use kiln_ir::DType;

/// Rounds one row of activations in place the way ggml rounds them for a dot
/// product with weights of `weight` type. The row length must be a whole number
/// of the activation type's blocks (true whenever the weight row is).
pub fn round_for_dot(weight: DType, x: &mut [f32]) {
    match weight {
        // ggml has no FP8: its weights meet exact f32 activations.
        DType::F32 | DType::F8E4M3 | DType::I32 => {}
        DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::Q4_1 | DType::Q5_1 | DType::IQ4NL => {
            x.chunks_mut(32).for_each(round_q8_0_block)
        }
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => x.chunks_mut(256).for_each(round_q8_k_block),
        // kq2's 8-bit dot type quantizes the row in two bases (`kq2::Kq2Q8Row`),
        // which no single rounding of `x` expresses: `ggml_dot` handles it.
        DType::KQ2 => {}
    }
}

/// Q8_0/Q8_1 as ggml's AVX2 quantizer: scale `amax/127` stored as f16,
/// `q = round_half_even(x · 127/amax)`.
fn round_q8_0_block(b: &mut [f32]) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        b.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let d = f16::from_f32(amax / 127.0).to_f32();
    let id = 127.0 / amax;
    for v in b.iter_mut() {
        *v = (*v * id).round_ties_even() * d;
    }
}

/// Q8_K as ggml's reference quantizer: scale from the signed value of largest
/// magnitude, `iscale = -127/max`, `q = min(127, nearest(iscale·x))`, `d = 1/iscale` (f32).
fn round_q8_k_block(b: &mut [f32]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b.iter() {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        b.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for v in b.iter_mut() {
        let q = (iscale * *v).round_ties_even().min(127.0);
        *v = q * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rounding_keeps_values_on_the_grid() {
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 10.0) * 0.37).collect();
        let orig = x.clone();
        round_for_dot(DType::Q4_0, &mut x);
        let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in orig.iter().zip(&x) {
            assert!((a - b).abs() <= amax / 127.0, "{a} vs {b}");
        }
        assert_eq!(x.iter().fold(0f32, |m, v| m.max(v.abs())), f16::from_f32(amax / 127.0).to_f32() * 127.0);
    }

    #[test]
    fn q8_k_and_plain_types() {
        let mut x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let orig = x.clone();
        round_for_dot(DType::Q6K, &mut x);
        let amax = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(orig.iter().zip(&x).all(|(a, b)| (a - b).abs() <= amax / 127.0 * 0.5 + 1e-6));
        let mut y = orig.clone();
        round_for_dot(DType::F32, &mut y);
        assert_eq!(y, orig);
        round_for_dot(DType::F16, &mut y);
        assert!(y.iter().all(|v| f16::from_f32(*v).to_f32() == *v));
    }
}
