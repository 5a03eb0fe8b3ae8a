//! llama.cpp-compatible dot products of the 32-element legacy block formats
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with 8-bit activations, summed in the exact
//! floating-point order of ggml's x86 AVX2 kernels (`ggml_vec_dot_q4_1_q8_1` and
//! friends), so that [`crate::Numerics::Ggml`] reproduces llama.cpp's matmul
//! results bit for bit rather than to within rounding.
//!
//! Why bother: SmolLM2-135M is chaotic enough that a one-ulp difference in a
//! matmul output flips an f16 rounding in the KV cache a few layers later and
//! moves the logits by tenths. The order is:
//! - activations quantized per 32-block as in [`super::act`] (`d = amax/127`,
//!   stored f16; `s = f16(d·Σq)` for the `_1` types);
//! - per block, eight integer lanes of four consecutive products each, turned
//!   to f32 and accumulated lane-wise with a fused multiply-add by `d_w·d_x`;
//! - the lanes reduced as `hsum_float_8` does; the `_1` types then add
//!   `Σ m·s`, itself accumulated block by block with fused multiply-adds.

use half::f16;
use kiln_ir::DType;

const QK: usize = 32;

/// One row of activations quantized as ggml's Q8_0/Q8_1 (AVX2 quantizer).
pub struct Q8Row {
    /// Per block: `(d, s)` with `d` the f16-rounded scale and `s = f16(d·Σq)`.
    scales: Vec<(f32, f32)>,
    q: Vec<i8>,
}

/// Quantizes `x` (a whole number of 32-blocks) as ggml does for a dot product.
pub fn quantize_q8(x: &[f32]) -> Q8Row {
    let mut scales = Vec::with_capacity(x.len() / QK);
    let mut q = Vec::with_capacity(x.len());
    for b in x.chunks(QK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for v in b {
            let qi = (v * id).round_ties_even() as i32;
            sum += qi;
            q.push(qi as i8);
        }
        scales.push((f16::from_f32(d).to_f32(), f16::from_f32(d * sum as f32).to_f32()));
    }
    Q8Row { scales, q }
}

/// Whether [`dot`] handles weights of `dtype`.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0)
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The block's integer weights (signed for the `_0` types, unsigned for the
/// `_1` types, as ggml feeds them to `maddubs`), its `d` and its `m` (0 for `_0`).
fn unpack(dtype: DType, b: &[u8], w: &mut [i32; QK]) -> (f32, f32) {
    match dtype {
        DType::Q4_0 | DType::Q4_1 => {
            let (qs, bias, m) = if dtype == DType::Q4_0 { (&b[2..18], 8, 0.0) } else { (&b[4..20], 0, h(b, 2)) };
            for j in 0..16 {
                w[j] = (qs[j] & 15) as i32 - bias;
                w[j + 16] = (qs[j] >> 4) as i32 - bias;
            }
            (h(b, 0), m)
        }
        DType::Q5_0 | DType::Q5_1 => {
            let (qh, qs, bias, m) =
                if dtype == DType::Q5_0 { (&b[2..6], &b[6..22], 16, 0.0) } else { (&b[4..8], &b[8..24], 0, h(b, 2)) };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for j in 0..16 {
                let hi0 = ((qh >> j) & 1) << 4;
                let hi1 = ((qh >> (j + 16)) & 1) << 4;
                w[j] = ((qs[j] & 15) as u32 | hi0) as i32 - bias;
                w[j + 16] = ((qs[j] >> 4) as u32 | hi1) as i32 - bias;
            }
            (h(b, 0), m)
        }
        _ => {
            for (wj, &v) in w.iter_mut().zip(&b[2..34]) {
                *wj = v as i8 as i32;
            }
            (h(b, 0), 0.0)
        }
    }
}

/// `hsum_float_8`: (l0+l4, l1+l5, l2+l6, l3+l7) → ((r0+r2) + (r1+r3)).
fn hsum8(l: &[f32; 8]) -> f32 {
    let r = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Dot of one stored weight row of `dtype` with quantized activations, in
/// ggml's AVX2 order. `row` holds whole blocks matching `x`.
pub fn dot(dtype: DType, row: &[u8], x: &Q8Row) -> f32 {
    let bytes = dtype.block_bytes() as usize;
    let has_min = matches!(dtype, DType::Q4_1 | DType::Q5_1);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut w = [0i32; QK];
    for ((blk, &(dx, sx)), qx) in row.chunks_exact(bytes).zip(&x.scales).zip(x.q.chunks_exact(QK)) {
        let (dw, mw) = unpack(dtype, blk, &mut w);
        if has_min {
            summs = mw.mul_add(sx, summs);
        }
        let d = dw * dx;
        for (l, a) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * l..4 * l + 4).map(|e| w[e] * qx[e] as i32).sum();
            *a = d.mul_add(lane as f32, *a);
        }
    }
    hsum8(&acc) + summs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_row, quantize_row};

    #[test]
    fn matches_dequantized_dot_to_rounding() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07).collect();
        let w: Vec<f32> = (0..96).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05).collect();
        let xq = quantize_q8(&x);
        let mut xr = x.clone();
        crate::quant::act::round_for_dot(DType::Q8_0, &mut xr);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0] {
            let mut row = vec![0u8; dtype.row_bytes(96).unwrap() as usize];
            quantize_row(dtype, &w, &mut row).unwrap();
            let mut wd = vec![0f32; 96];
            dequantize_row(dtype, &row, &mut wd).unwrap();
            let want: f32 = wd.iter().zip(&xr).map(|(a, b)| a * b).sum();
            let got = dot(dtype, &row, &xq);
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype:?}: {got} vs {want}");
        }
    }
}
