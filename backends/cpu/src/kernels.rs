//! Row kernels by weight layout: activations prepared once per token row for
//! the layout's dot type, then one kernel per stored weight row.
//!
//! Layouts with a llama.cpp dot type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K…Q6_K)
//! take 8-bit activations and integer dot products (AVX2 when the CPU has it,
//! else the scalar definition in `kiln_quant::ggml_dot`); so does kq2, with
//! its own 8-bit dot type (`kiln_quant::kq2::Kq2Q8Row`: the row quantized in
//! the original and the rotated basis); every other layout takes activations rounded as
//! `kiln_quant::act::round_for_dot` says, each weight row dequantized and
//! dotted in the reference's order. Every path gives the reference
//! interpreter's `Numerics::Ggml` result, bit for bit.

use kiln_ir::DType;
use kiln_quant::ggml_dot::{self, Activations, RowGroup};
use kiln_quant::{self as quant, QuantError};

#[cfg(target_arch = "x86_64")]
use crate::x86::{self, Legacy};

/// The instruction set the kernels use, detected once at session start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isa {
    /// The AVX2 kernels, with AVX-512 VNNI (`vpdpbusd` on 256-bit vectors) for the
    /// 8-bit dots that have a VNNI kernel (x86-64 since Ice Lake / Zen 4).
    Avx512Vnni,
    /// AVX2 + FMA + F16C (x86-64 since Haswell / Zen).
    Avx2,
    /// Portable scalar code.
    #[default]
    Scalar,
}

impl Isa {
    /// The best instruction set this CPU has.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2].into_iter().find(|i| i.available()).unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            match self {
                Isa::Avx512Vnni => {
                    avx2 && std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512vl")
                        && std::is_x86_feature_detected!("avx512vnni")
                }
                Isa::Avx2 => avx2,
                Isa::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// Whether the AVX2 kernels run (the VNNI set includes them).
    pub fn avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512Vnni)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// One token row of activations prepared for a weight layout.
pub(crate) enum Prepared {
    Int(Activations),
    Float(Vec<f32>),
}

/// The token rows' activations of one integer kind (`pick`), if every row has that kind.
pub(crate) fn all_of<'a, T>(xs: &'a [Prepared], pick: fn(&'a Activations) -> Option<&'a T>) -> Option<Vec<&'a T>> {
    xs.iter().map(|p| if let Prepared::Int(a) = p { pick(a) } else { None }).collect()
}

/// The Q8_0/Q8_1 activations of an [`Activations`] (for [`all_of`]).
pub(crate) fn q8_of(a: &Activations) -> Option<&ggml_dot::Q8Row> {
    if let Activations::Q8(q) = a { Some(q) } else { None }
}

/// The Q8_K activations of an [`Activations`] (for [`all_of`]).
pub(crate) fn q8k_of(a: &Activations) -> Option<&ggml_dot::Q8KRow> {
    if let Activations::Q8K(q) = a { Some(q) } else { None }
}

/// The kq2 activations of an [`Activations`] (for [`all_of`]).
pub(crate) fn kq2_of(a: &Activations) -> Option<&kiln_quant::kq2::Kq2Q8Row> {
    if let Activations::Kq2(q) = a { Some(q) } else { None }
}

/// Prepares `x` (one row of `k` values) for dots with weights of `dtype`.
pub(crate) fn prepare(isa: Isa, dtype: DType, x: &[f32]) -> Prepared {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::IQ4NL)
    {
        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
        return Prepared::Int(Activations::Q8(unsafe { x86::quantize_q8(x) }));
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2()
        && matches!(dtype, DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K)
        && x.len().is_multiple_of(256)
    {
        // SAFETY: as above.
        return Prepared::Int(Activations::Q8K(unsafe { x86::quantize_q8_k(x) }));
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && dtype == DType::KQ2 && std::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX512F/VL with `Isa::Avx512Vnni`, AVX512BW checked.
        return Prepared::Int(Activations::Kq2(unsafe { crate::vnni::quantize_kq2_q8(x) }));
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

/// Activation layouts built once per matmul for the whole batch of token rows, for the
/// prefill kernels that read them (every row block of the matmul shares them).
#[derive(Default)]
pub(crate) struct Batch {
    /// Each token row's [`RowGroup`] (which kernel llama.cpp would run it through).
    pub(crate) groups: Vec<RowGroup>,
    /// kq2 with 512-bit decoding: the token rows side by side ([`crate::vnni::Kq2Panel`]).
    #[cfg(target_arch = "x86_64")]
    kq2: Option<crate::vnni::Kq2Panel>,
}

/// Token rows from which kq2 prefill uses the panel kernel rather than one 512-bit decode
/// pass per row (a panel tile holds 32, zero-padded).
#[cfg(target_arch = "x86_64")]
pub(crate) const KQ2_PANEL_MIN_TOKENS: usize = 8;

impl Batch {
    /// What the kernels for `dtype` on `isa` read besides the token rows `xs` (of the
    /// given groups).
    pub(crate) fn build(isa: Isa, dtype: DType, xs: &[Prepared], groups: Vec<RowGroup>) -> Batch {
        #[cfg(target_arch = "x86_64")]
        if dtype == DType::KQ2
            && xs.len() >= KQ2_PANEL_MIN_TOKENS
            && isa == Isa::Avx512Vnni
            && *crate::vnni::KQ2_ZMM
            && let Some(acts) = all_of(xs, kq2_of)
        {
            return Batch { groups, kq2: Some(crate::vnni::Kq2Panel::build(&acts)) };
        }
        let _ = (isa, dtype, xs);
        Batch { groups, ..Batch::default() }
    }
}

/// `tile[t·nb + j] = row_j · xs[t]` for the `nb` consecutive stored rows in
/// `rows` (`rb` bytes each) and every prepared token row `xs[t]` (of
/// [`RowGroup`] `batch.groups[t]`).
pub(crate) fn dot_tile(
    isa: Isa,
    dtype: DType,
    rows: &[u8],
    rb: usize,
    xs: &[Prepared],
    batch: &Batch,
    tile: &mut [f32],
) -> Result<(), QuantError> {
    let nb = rows.len().checked_div(rb).unwrap_or(0);
    let groups = &batch.groups[..];
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && avx2_tile(isa, dtype, rows, rb, nb, xs, batch, tile) {
        return Ok(());
    }
    let k = xs.iter().find_map(|x| if let Prepared::Float(x) = x { Some(x.len()) } else { None });
    if let Some(k) = k {
        // Float layouts: each weight row dequantized once, dotted with every
        // token row in the reference's order.
        // (AVX2: the dots taken 8 lanes at a time, bit for bit.)
        let mut w = vec![0f32; k];
        for (j, r) in rows.chunks_exact(rb.max(1)).enumerate() {
            quant::dequantize_row(dtype, r, &mut w)?;
            for (t, x) in xs.iter().enumerate() {
                if let Prepared::Float(x) = x {
                    #[cfg(target_arch = "x86_64")]
                    if isa.avx2() {
                        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                        tile[t * nb + j] = unsafe { x86::dot_f32(&w, x) };
                        continue;
                    }
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
                Prepared::Float(_) => {}
            }
        }
    }
    Ok(())
}

/// Token rows per prefill chunk (their 8-bit activations stay in L1/L2
/// while a block of weight rows passes).
#[cfg(target_arch = "x86_64")]
const TOKEN_CHUNK: usize = 32;

/// Prefill tiles of `R` weight rows × `T` token rows over token chunks of
/// [`TOKEN_CHUNK`]; leftover rows and tokens one at a time.
#[cfg(target_arch = "x86_64")]
fn prefill_legacy<const R: usize, const T: usize>(
    legacy: Legacy,
    rows: &[u8],
    rb: usize,
    nb: usize,
    q8: &[&ggml_dot::Q8Row],
    tile: &mut [f32],
) {
    let rb = rb.max(1);
    let row = |j: usize| &rows[j * rb..(j + 1) * rb];
    for t0 in (0..q8.len()).step_by(TOKEN_CHUNK) {
        let ts = &q8[t0..(t0 + TOKEN_CHUNK).min(q8.len())];
        let tfull = ts.len() / T * T;
        let rfull = nb / R * R;
        for j in (0..rfull).step_by(R) {
            let rs: [&[u8]; R] = std::array::from_fn(|r| row(j + r));
            for t in (0..tfull).step_by(T) {
                let xs: [&ggml_dot::Q8Row; T] = std::array::from_fn(|u| ts[t + u]);
                // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                let v = unsafe { x86::dot_legacy_tile(legacy, rs, xs) };
                for (r, vr) in v.into_iter().enumerate() {
                    for (u, v) in vr.into_iter().enumerate() {
                        tile[(t0 + t + u) * nb + j + r] = v;
                    }
                }
            }
        }
        legacy_rest(legacy, rows, rb, nb, ts, &mut tile[t0 * nb..], rfull, tfull);
    }
}

/// The outputs a tiled kernel left (it did rows below `rows_done` for token rows below
/// `tokens_done`): the other rows of those token rows and every row of the rest, one
/// dot at a time.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn legacy_rest(
    legacy: Legacy,
    rows: &[u8],
    rb: usize,
    nb: usize,
    q8: &[&ggml_dot::Q8Row],
    tile: &mut [f32],
    rows_done: usize,
    tokens_done: usize,
) {
    let rb = rb.max(1);
    for (t, q) in q8.iter().enumerate() {
        let first = if t < tokens_done { rows_done } else { 0 };
        for j in first..nb {
            // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
            tile[t * nb + j] = unsafe { x86::dot_legacy(legacy, &rows[j * rb..(j + 1) * rb], q) };
        }
    }
}

/// Decode: `R` consecutive weight rows at a time share each activation block.
#[cfg(target_arch = "x86_64")]
fn decode_rows<const R: usize, const VNNI: bool>(
    legacy: Legacy,
    rows: &[u8],
    rb: usize,
    x: &ggml_dot::Q8Row,
    out: &mut [f32],
) {
    let rb = rb.max(1);
    let groups = rows.chunks_exact(rb * R);
    let rest = groups.remainder();
    let mut o = out.chunks_exact_mut(R);
    for (g, dst) in groups.zip(&mut o) {
        let rs: [&[u8]; R] = std::array::from_fn(|r| &g[r * rb..(r + 1) * rb]);
        // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C, and
        // `VNNI` only with `Isa::Avx512Vnni`, when it also has AVX512F/VL/VNNI.
        let v = unsafe {
            if VNNI { crate::vnni::dot_legacy_tile(legacy, rs, [x]) } else { x86::dot_legacy_tile(legacy, rs, [x]) }
        };
        for (d, v) in dst.iter_mut().zip(v) {
            *d = v[0];
        }
    }
    let tail = o.into_remainder();
    for (d, r) in tail.iter_mut().zip(rest.chunks_exact(rb)) {
        // SAFETY: as above.
        *d = unsafe { x86::dot_legacy(legacy, r, x) };
    }
}

/// Q4_0 or IQ4_NL rows (`table`) as stored, in tiles of two weight rows × four token rows,
/// the rest one at a time.
#[cfg(target_arch = "x86_64")]
fn lut4_tiles(table: &[i8; 16], rows: &[u8], rb: usize, nb: usize, q8: &[&ggml_dot::Q8Row], tile: &mut [f32]) {
    use crate::lut4::dot_tile;
    let row = |j: usize| &rows[j * rb..(j + 1) * rb];
    let (rfull, tfull) = (nb / 2 * 2, q8.len() / 4 * 4);
    for j in (0..rfull).step_by(2) {
        for t in (0..tfull).step_by(4) {
            // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
            let v = unsafe { dot_tile(table, [row(j), row(j + 1)], [q8[t], q8[t + 1], q8[t + 2], q8[t + 3]]) };
            for (r, vr) in v.iter().enumerate() {
                for (u, v) in vr.iter().enumerate() {
                    tile[(t + u) * nb + j + r] = *v;
                }
            }
        }
    }
    for (t, x) in q8.iter().enumerate() {
        let first = if t < tfull { rfull } else { 0 };
        for j in first..nb {
            // SAFETY: as above.
            tile[t * nb + j] = unsafe { dot_tile(table, [row(j)], [*x]) }[0][0];
        }
    }
}

/// [`dot_tile`] with the AVX2 kernels; false (nothing written) when `dtype` has none.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn avx2_tile(
    isa: Isa,
    dtype: DType,
    rows: &[u8],
    rb: usize,
    nb: usize,
    xs: &[Prepared],
    batch: &Batch,
    tile: &mut [f32],
) -> bool {
    let groups = &batch.groups[..];
    let legacy = match dtype {
        DType::Q4_1 => Legacy::Q4_1,
        DType::Q5_0 => Legacy::Q5_0,
        DType::Q5_1 => Legacy::Q5_1,
        DType::Q8_0 => Legacy::Q8_0,
        DType::Q4_0 | DType::IQ4NL => {
            // (On AVX-512 CPUs the session's packed form serves whole groups of sixteen rows;
            // see `crate::packed`. These are the rows as stored.)
            let Some(q8) = all_of(xs, q8_of) else {
                return false;
            };
            lut4_tiles(crate::lut4::table_of(dtype), rows, rb.max(1), nb, &q8, tile);
            return true;
        }
        DType::KQ2 => {
            let Some(acts) = all_of(xs, kq2_of) else {
                return false;
            };
            if isa == Isa::Avx512Vnni && *crate::vnni::KQ2_ZMM {
                if let Some(panel) = &batch.kq2 {
                    // SAFETY: `Isa::Avx512Vnni` and `KQ2_ZMM` are only detected when the CPU has
                    // AVX2, FMA, F16C, AVX512F/VL/BW/VNNI/VBMI/BITALG and GFNI; `rows` holds `nb`
                    // rows of `rb` bytes and `tile` the panel's token rows × `nb` values.
                    unsafe { crate::vnni::kq2_gemm(rows, rb.max(1), nb, panel, tile) };
                } else {
                    for (t, a) in acts.iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { crate::vnni::kq2_gemv(rows, rb.max(1), nb, a, &mut tile[t * nb..(t + 1) * nb]) };
                    }
                }
                return true;
            }
            // Four token rows per weight row (each block decoded once for them), the rest one by one.
            let quads = acts.len() / 4 * 4;
            for (j, r) in rows.chunks_exact(rb.max(1)).enumerate() {
                for t in (0..quads).step_by(4) {
                    // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                    let v = unsafe { x86::dot_kq2_tile(r, [acts[t], acts[t + 1], acts[t + 2], acts[t + 3]]) };
                    for (u, v) in v.into_iter().enumerate() {
                        tile[(t + u) * nb + j] = v;
                    }
                }
                for (t, a) in acts.iter().enumerate().skip(quads) {
                    // SAFETY: as above.
                    tile[t * nb + j] = unsafe { x86::dot_kq2_tile(r, [*a]) }[0];
                }
            }
            return true;
        }
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => {
            let Some(q8k) = all_of(xs, q8k_of) else {
                return false;
            };
            let rb = rb.max(1);
            let quads = q8k.len() / 4 * 4;
            let vnni = isa == Isa::Avx512Vnni;
            // VNNI, Q4_K: eight weight rows at a time (one per lane) for the batch's `gemm`
            // tokens, each super-block of the rows laid out once for all of them.
            let (rows8, gemm) = if vnni && dtype == DType::Q4K {
                let g = groups.iter().take_while(|g| g.is_gemm()).count() / 4 * 4;
                (if g > 0 { nb / crate::vnni::Q4K_ROWS * crate::vnni::Q4K_ROWS } else { 0 }, g)
            } else {
                (0, 0)
            };
            // (Q4_K super-blocks: 144 bytes.)
            let nblocks = q8k.iter().map(|x| x.d.len()).fold(rb / 144, usize::min);
            for j0 in (0..rows8).step_by(crate::vnni::Q4K_ROWS) {
                let rs: [&[u8]; crate::vnni::Q4K_ROWS] =
                    std::array::from_fn(|r| &rows[(j0 + r) * rb..(j0 + r + 1) * rb]);
                // SAFETY: `Isa::Avx512Vnni` is only detected when the CPU has AVX2, FMA, F16C and
                // AVX512F/VL/VNNI; every row and token row hold `nblocks` super-blocks.
                unsafe {
                    crate::vnni::q4_k_gemm_rows(crate::vnni::Q4kSource::Rows(rs), &q8k[..gemm], nblocks, tile, nb, j0)
                };
            }
            // Whether the batch goes through llama.cpp's tiled K-quant order (all its rows do
            // or none; Q4_K, repacked, keeps its `gemm`/`gemv` split).
            let tiled = groups.first().is_some_and(|g| g.is_tiled());
            // VNNI, Q6_K and Q3_K prefill: each group of rows unpacked once for all token rows.
            // SAFETY (all four): `Isa::Avx512Vnni` is only detected when the CPU has AVX2, FMA,
            // F16C and AVX512F/VL/VNNI; `rows` holds `nb` rows of `rb` bytes.
            let (rows_done, tokens_done) = match (dtype, tiled) {
                (DType::Q6K, false) if vnni && q8k.len() >= 4 => unsafe {
                    crate::vnni::q6_k_gemm::<false>(rows, rb, nb, &q8k, tile)
                },
                (DType::Q6K, true) if vnni && q8k.len() >= 4 => unsafe {
                    crate::vnni::q6_k_gemm::<true>(rows, rb, nb, &q8k, tile)
                },
                (DType::Q3K, false) if vnni && q8k.len() >= 4 => unsafe {
                    crate::vnni::q3_k_gemm::<false>(rows, rb, nb, &q8k, tile)
                },
                (DType::Q3K, true) if vnni && q8k.len() >= 4 => unsafe {
                    crate::vnni::q3_k_gemm::<true>(rows, rb, nb, &q8k, tile)
                },
                _ => (rows8, gemm),
            };
            for (j, r) in rows.chunks_exact(rb).enumerate() {
                let done = if j < rows_done { tokens_done } else { 0 };
                for t in (done..quads).step_by(4) {
                    let x4 = [q8k[t], q8k[t + 1], q8k[t + 2], q8k[t + 3]];
                    let g4 = [groups[t], groups[t + 1], groups[t + 2], groups[t + 3]];
                    // SAFETY: `Isa::Avx2` is only detected when the CPU has AVX2, FMA and F16C.
                    let v = unsafe {
                        match (dtype, tiled) {
                            (DType::Q4K, _) if g4.iter().all(|g| g.is_gemm()) => x86::dot_q4_k_gemm4(r, x4),
                            (DType::Q4K, _) => x86::dot_q4_k_tile(r, x4, g4),
                            (DType::Q3K, false) => x86::dot_q3_k_tile::<4, false>(r, x4),
                            (DType::Q3K, true) => x86::dot_q3_k_tile::<4, true>(r, x4),
                            (DType::Q5K, false) => x86::dot_q5_k_tile::<4, false>(r, x4),
                            (DType::Q5K, true) => x86::dot_q5_k_tile::<4, true>(r, x4),
                            (DType::Q2K, false) => x86::dot_q2_k_tile::<4, false>(r, x4),
                            (DType::Q2K, true) => x86::dot_q2_k_tile::<4, true>(r, x4),
                            (_, false) if vnni => x86::dot_q6_k_tile_vnni::<4, false>(r, x4),
                            (_, true) if vnni => x86::dot_q6_k_tile_vnni::<4, true>(r, x4),
                            (_, false) => x86::dot_q6_k_tile::<4, false>(r, x4),
                            (_, true) => x86::dot_q6_k_tile::<4, true>(r, x4),
                        }
                    };
                    for (u, v) in v.into_iter().enumerate() {
                        tile[(t + u) * nb + j] = v;
                    }
                }
                for (t, q) in q8k.iter().enumerate().skip(quads) {
                    // SAFETY: as above.
                    tile[t * nb + j] = unsafe {
                        match (dtype, tiled) {
                            (DType::Q4K, _) if vnni && !groups[t].is_gemm() => x86::dot_q4_k_gemv_vnni(r, q),
                            (DType::Q4K, _) => x86::dot_q4_k(r, q, groups[t]),
                            (DType::Q3K, false) => x86::dot_q3_k_tile::<1, false>(r, [*q])[0],
                            (DType::Q3K, true) => x86::dot_q3_k_tile::<1, true>(r, [*q])[0],
                            (DType::Q5K, false) => x86::dot_q5_k_tile::<1, false>(r, [*q])[0],
                            (DType::Q5K, true) => x86::dot_q5_k_tile::<1, true>(r, [*q])[0],
                            (DType::Q2K, false) => x86::dot_q2_k_tile::<1, false>(r, [*q])[0],
                            (DType::Q2K, true) => x86::dot_q2_k_tile::<1, true>(r, [*q])[0],
                            (_, false) if vnni => x86::dot_q6_k_tile_vnni::<1, false>(r, [*q])[0],
                            (_, true) if vnni => x86::dot_q6_k_tile_vnni::<1, true>(r, [*q])[0],
                            (_, false) => x86::dot_q6_k(r, q),
                            (_, true) => x86::dot_q6_k_tile::<1, true>(r, [*q])[0],
                        }
                    };
                }
            }
            return true;
        }
        _ => return false,
    };
    let Some(q8) = all_of(xs, q8_of) else {
        return false;
    };
    // Decode (one token row): one weight row at a time. (Two or four rows
    // sharing each activation block win when the weights sit in L2, but lose
    // a third of the speed when they stream from memory, as they do in a
    // model; see `examples/matvec.rs`.)
    if let [x] = q8[..] {
        if isa == Isa::Avx512Vnni {
            decode_rows::<1, true>(legacy, rows, rb, x, tile);
        } else {
            decode_rows::<1, false>(legacy, rows, rb, x, tile);
        }
        return true;
    }
    // Prefill: token rows in cache-sized chunks; in each, tiles of weight
    // rows × token rows, each weight block unpacked once for the tile's
    // tokens and each activation block loaded once for its rows.
    if isa == Isa::Avx512Vnni {
        // Each group of weight rows unpacked once for all the token rows.
        // SAFETY: `Isa::Avx512Vnni` is only detected when the CPU has AVX2, FMA, F16C and
        // AVX512F/VL/VNNI; `rows` holds `nb` rows of `rb` bytes.
        let (rd, td) = unsafe { crate::vnni::legacy_gemm(legacy, rows, rb, nb, &q8, tile) };
        legacy_rest(legacy, rows, rb, nb, &q8, tile, rd, td);
    } else {
        prefill_legacy::<2, 4>(legacy, rows, rb, nb, &q8, tile);
    }
    true
}
