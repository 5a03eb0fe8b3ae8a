//! Row kernels by weight layout: activations prepared once per token row for
//! the layout's dot type, then one kernel per stored weight row.
//!
//! Layouts with a llama.cpp dot type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)
//! take 8-bit activations and integer dot products (AVX2 when the CPU has it,
//! else the scalar definition in `kiln_quant::ggml_dot`); every other layout
//! takes activations rounded as `kiln_quant::act::round_for_dot` says and the
//! exact f32 dot of `kiln_quant::dot_row`. Either way the result is the
//! reference interpreter's in `Numerics::Ggml`, bit for bit.

use kiln_ir::DType;
use kiln_quant::ggml_dot::{self, Activations, RowGroup};
use kiln_quant::{self as quant, QuantError};

#[cfg(target_arch = "x86_64")]
use crate::x86::{self, Legacy};

/// The instruction set the kernels use, detected once at session start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA + F16C (x86-64 since Haswell / Zen).
    Avx2,
    /// Portable scalar code.
    Scalar,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// One token row of activations prepared for a weight layout.
pub(crate) enum Prepared {
    Int(Activations),
    Float(Vec<f32>),
    /// kq2: the row and its rotation to the storage basis.
    Kq2 {
        x: Vec<f32>,
        xr: Vec<f32>,
    },
}

/// Prepares `x` (one row of `k` values) for dots with weights of `dtype`.
pub(crate) fn prepare(isa: Isa, dtype: DType, x: &[f32]) -> Prepared {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0) {
        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
        return Prepared::Int(Activations::Q8(unsafe { x86::quantize_q8(x) }));
    }
    if dtype == DType::KQ2 {
        return Prepared::Kq2 { x: x.to_vec(), xr: quant::kq2::kq2_rotate_row(x) };
    }
    let _ = isa;
    match ggml_dot::quantize_for(dtype, x) {
        Some(a) => Prepared::Int(a),
        None => {
            let mut r = x.to_vec();
            quant::act::round_for_dot(dtype, &mut r);
            Prepared::Float(r)
        }
    }
}

/// `tile[t·nb + j] = row_j · xs[t]` for the `nb` consecutive stored rows in
/// `rows` (`rb` bytes each) and every prepared token row `xs[t]` (of
/// [`RowGroup`] `groups[t]`).
pub(crate) fn dot_tile(
    isa: Isa,
    dtype: DType,
    rows: &[u8],
    rb: usize,
    xs: &[Prepared],
    groups: &[RowGroup],
    tile: &mut [f32],
) -> Result<(), QuantError> {
    let nb = rows.len().checked_div(rb).unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && avx2_tile(dtype, rows, rb, nb, xs, groups, tile) {
        return Ok(());
    }
    let _ = isa;
    let k = xs.iter().find_map(|x| if let Prepared::Float(x) = x { Some(x.len()) } else { None });
    if let Some(k) = k {
        // Float layouts: each weight row dequantized once, dotted with every
        // token row in the reference's order.
        let mut w = vec![0f32; k];
        for (j, r) in rows.chunks_exact(rb.max(1)).enumerate() {
            quant::dequantize_row(dtype, r, &mut w)?;
            for (t, x) in xs.iter().enumerate() {
                if let Prepared::Float(x) = x {
                    tile[t * nb + j] = kiln_backends::reference::dot(&w, x);
                }
            }
        }
        return Ok(());
    }
    for ((out, p), &group) in tile.chunks_mut(nb.max(1)).zip(xs).zip(groups) {
        for (o, r) in out.iter_mut().zip(rows.chunks_exact(rb.max(1))) {
            match p {
                Prepared::Int(a) => *o = ggml_dot::dot(dtype, r, a, group),
                Prepared::Kq2 { x, xr } => *o = quant::kq2::dot_kq2_rotated(r, x, xr),
                Prepared::Float(_) => {}
            }
        }
    }
    Ok(())
}

/// [`dot_tile`] with the AVX2 kernels; false (nothing written) when `dtype` has none.
#[cfg(target_arch = "x86_64")]
fn avx2_tile(
    dtype: DType,
    rows: &[u8],
    rb: usize,
    nb: usize,
    xs: &[Prepared],
    groups: &[RowGroup],
    tile: &mut [f32],
) -> bool {
    let legacy = match dtype {
        DType::Q4_0 => Legacy::Q4_0,
        DType::Q4_1 => Legacy::Q4_1,
        DType::Q5_0 => Legacy::Q5_0,
        DType::Q5_1 => Legacy::Q5_1,
        DType::Q8_0 => Legacy::Q8_0,
        DType::KQ2 => {
            for (t, p) in xs.iter().enumerate() {
                let Prepared::Kq2 { x, xr } = p else { return false };
                for (j, r) in rows.chunks_exact(rb.max(1)).enumerate() {
                    // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                    tile[t * nb + j] = unsafe { x86::dot_kq2(r, x, xr) };
                }
            }
            return true;
        }
        DType::Q4K | DType::Q6K => {
            let q8k: Vec<_> = xs
                .iter()
                .filter_map(|x| match x {
                    Prepared::Int(Activations::Q8K(q)) => Some(q),
                    _ => None,
                })
                .collect();
            if q8k.len() != xs.len() {
                return false;
            }
            for ((out, q), &group) in tile.chunks_mut(nb.max(1)).zip(q8k).zip(groups) {
                for (o, r) in out.iter_mut().zip(rows.chunks_exact(rb.max(1))) {
                    // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                    *o = unsafe { if dtype == DType::Q4K { x86::dot_q4_k(r, q, group) } else { x86::dot_q6_k(r, q) } };
                }
            }
            return true;
        }
        _ => return false,
    };
    let q8: Vec<_> = xs
        .iter()
        .filter_map(|x| match x {
            Prepared::Int(Activations::Q8(q)) => Some(q),
            _ => None,
        })
        .collect();
    if q8.len() != xs.len() {
        return false;
    }
    // Decode (one token row): four weight rows at a time. Prefill: four
    // token rows per weight row, each block unpacked once for them.
    let mut wrows = rows.chunks_exact(rb.max(1)).enumerate();
    if q8.len() == 1 {
        let x = q8[0];
        while nb >= 4 && tile.len() >= nb {
            let Some((j, r0)) = wrows.next() else { break };
            if j + 4 > nb {
                // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                tile[j] = unsafe { x86::dot_legacy(legacy, r0, x) };
                continue;
            }
            let (Some((_, r1)), Some((_, r2)), Some((_, r3))) = (wrows.next(), wrows.next(), wrows.next()) else {
                break;
            };
            // SAFETY: as above.
            let v = unsafe { x86::dot_legacy_tile(legacy, [r0, r1, r2, r3], [x]) };
            for (u, v) in v.into_iter().enumerate() {
                tile[j + u] = v[0];
            }
        }
        for (j, r) in wrows {
            // SAFETY: as above.
            tile[j] = unsafe { x86::dot_legacy(legacy, r, x) };
        }
        return true;
    }
    let quads = q8.len() / 4 * 4;
    for (j, r) in wrows {
        for t in (0..quads).step_by(4) {
            // SAFETY: as above.
            let v = unsafe { x86::dot_legacy_tile(legacy, [r], [q8[t], q8[t + 1], q8[t + 2], q8[t + 3]]) };
            for (u, v) in v[0].into_iter().enumerate() {
                tile[(t + u) * nb + j] = v;
            }
        }
        for (t, q) in q8.iter().enumerate().skip(quads) {
            // SAFETY: as above.
            tile[t * nb + j] = unsafe { x86::dot_legacy(legacy, r, q) };
        }
    }
    true
}
