//! llama.cpp-compatible dot products of the 32-element legacy block formats
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) with 8-bit activations, summed in the exact
//! floating-point order of ggml's x86 AVX2 kernels (`ggml_vec_dot_q4_1_q8_1` and
//! friends), so that `kiln_backends::Numerics::Ggml` reproduces llama.cpp's matmul
//! results bit for bit rather than to within rounding.
//!
//! Q4_0 and IQ4_NL take Q8_0 activations too but are summed as ggml's repacked 8×8
//! kernels do ([`dot_lut4`]): llama.cpp repacks both on AVX2 CPUs.
//!
//! The k-quants Q3_K, Q4_K and Q6_K take 256-element Q8_K activations
//! ([`quantize_q8_k`]); their per-super-block integer sums are exact, and the
//! float steps follow ggml's x86 kernels: Q3_K and Q6_K the eight-lane AVX2
//! `ggml_vec_dot_q3_K_q8_K` / `ggml_vec_dot_q6_K_q8_K`, Q4_K the repacked 8×8 `gemv`/`gemm` kernels (one
//! fused multiply-add per super-block for the scales and one for the minimums,
//! subtracted at the end), which llama.cpp uses for Q4_K whenever the output
//! count is a multiple of 8.
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
    pub scales: Vec<(f32, f32)>,
    /// The quants, 32 per block.
    pub q: Vec<i8>,
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

/// One row of activations quantized as ggml's Q8_K (`quantize_row_q8_K_ref`):
/// per 256-block `iscale = −127/max` (max the signed value of largest
/// magnitude), `q = min(127, round(iscale·x))`, `d = 1/iscale`, and the sums of
/// each 16 quants.
pub struct Q8KRow {
    /// Per 256-block: the scale.
    pub d: Vec<f32>,
    /// The quants, 256 per block.
    pub q: Vec<i8>,
    /// Per block: the sums of each 16 consecutive quants.
    pub bsums: Vec<i32>,
}

/// Quantizes `x` (a whole number of 256-blocks) as ggml's Q8_K.
pub fn quantize_q8_k(x: &[f32]) -> Q8KRow {
    let (mut d, mut q, mut bsums) = (vec![], Vec::with_capacity(x.len()), vec![]);
    for b in x.chunks(QK_K) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            d.push(0.0);
            q.extend(std::iter::repeat_n(0i8, b.len()));
            bsums.extend(std::iter::repeat_n(0, b.len() / 16));
            continue;
        }
        let iscale = -127.0 / max;
        let start = q.len();
        q.extend(b.iter().map(|&v| (iscale * v).round_ties_even().min(127.0) as i8));
        bsums.extend(q[start..].chunks(16).map(|c| c.iter().map(|&v| v as i32).sum::<i32>()));
        d.push(1.0 / iscale);
    }
    Q8KRow { d, q, bsums }
}

const QK_K: usize = 256;

pub use super::kquants::{q3_k_scales, scale_min_k4};

/// Activations quantized for one weight type: Q8_0/Q8_1 or Q8_K.
pub enum Activations {
    Q8(Q8Row),
    Q8K(Q8KRow),
    /// kiln's own kq2 format: its 8-bit dot type (no llama.cpp counterpart,
    /// the same idea as Q8_K; see [`crate::kq2::Kq2Q8Row`]).
    Kq2(crate::kq2::Kq2Q8Row),
}

/// Quantizes one row of activations for a dot product with weights of `dtype`
/// (`None` when [`dot`] does not handle `dtype`).
pub fn quantize_for(dtype: DType, x: &[f32]) -> Option<Activations> {
    match dtype {
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::IQ4NL => {
            Some(Activations::Q8(quantize_q8(x)))
        }
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => Some(Activations::Q8K(quantize_q8_k(x))),
        DType::KQ2 => Some(Activations::Kq2(crate::kq2::quantize_kq2_q8(x))),
        _ => None,
    }
}

/// Whether [`dot`] handles weights of `dtype`.
pub fn supports(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::IQ4NL
            | DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::KQ2
    )
}

/// Token rows from which llama.cpp b11434 runs a matmul of Q2_K, Q3_K, Q5_K or Q6_K weights
/// (Q4_K too where it does not repack them) through its tiled K-quant kernels
/// (`ggml-cpu/tiled`) instead of `vec_dot`.
pub const TILED_MIN_ROWS: usize = 8;

/// How llama.cpp runs one token row of a matmul, which decides the float summation order:
/// - the repacked Q4_K kernels take the rows in groups of four by `gemm` (which adds each
///   pair of sub-blocks to the float accumulators) and the `rows % 4` left over one at a
///   time by `gemv` (which adds each whole super-block);
/// - in a matmul of [`TILED_MIN_ROWS`] rows or more, the other K-quants go through the
///   tiled kernels (one exact integer per super-block, see [`dot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowGroup {
    /// In a `gemm` group of four, in a matmul of fewer than [`TILED_MIN_ROWS`] rows.
    Gemm,
    /// Left over (`gemv`), in a matmul of fewer than [`TILED_MIN_ROWS`] rows.
    Gemv,
    /// In a `gemm` group of four, in a tiled matmul.
    TiledGemm,
    /// Left over (`gemv`), in a tiled matmul.
    TiledGemv,
}

impl RowGroup {
    /// The group of row `t` of a matmul over `rows` rows.
    pub fn of(t: usize, rows: usize) -> RowGroup {
        match (t < rows - rows % 4, rows >= TILED_MIN_ROWS) {
            (true, false) => RowGroup::Gemm,
            (false, false) => RowGroup::Gemv,
            (true, true) => RowGroup::TiledGemm,
            (false, true) => RowGroup::TiledGemv,
        }
    }

    /// Whether the repacked Q4_K kernels take the row in a `gemm` group of four.
    pub fn is_gemm(self) -> bool {
        matches!(self, RowGroup::Gemm | RowGroup::TiledGemm)
    }

    /// Whether the matmul goes through the tiled K-quant kernels.
    pub fn is_tiled(self) -> bool {
        matches!(self, RowGroup::TiledGemm | RowGroup::TiledGemv)
    }
}

/// Dot of one stored weight row of `dtype` with activations from
/// [`quantize_for`] of the same dtype (0 if they do not match).
pub fn dot(dtype: DType, row: &[u8], x: &Activations, group: RowGroup) -> f32 {
    match (dtype, x) {
        (DType::Q4K, Activations::Q8K(a)) => dot_q4_k(row, a, group),
        (DType::Q6K | DType::Q3K | DType::Q5K | DType::Q2K, Activations::Q8K(a)) if group.is_tiled() => {
            dot_k_tiled(dtype, row, a)
        }
        (DType::Q6K, Activations::Q8K(a)) => dot_q6_k(row, a),
        (DType::Q3K, Activations::Q8K(a)) => dot_q3_k(row, a),
        (DType::Q5K, Activations::Q8K(a)) => dot_q5_k(row, a),
        (DType::Q2K, Activations::Q8K(a)) => dot_q2_k(row, a),
        (DType::KQ2, Activations::Kq2(a)) => crate::kq2::dot_kq2_q8(row, a),
        (DType::Q4_0 | DType::IQ4NL, Activations::Q8(a)) => dot_lut4(row, a, lut4_table(dtype).unwrap_or(&Q4_0_TABLE)),
        (_, Activations::Q8(a)) => dot_legacy(dtype, row, a),
        _ => 0.0,
    }
}

/// Q4_K: the exact integers `Σ_j sc_j Σ q·q8` and `Σ_j m_j Σ q8`, each scaled
/// by `d·d8` / `dmin·d8` with a fused multiply-add into its own accumulator,
/// once per super-block ([`RowGroup::Gemv`]) or once per pair of sub-blocks
/// ([`RowGroup::Gemm`]), as ggml's repacked 8×8 kernels do for one output.
fn dot_q4_k(row: &[u8], x: &Q8KRow, group: RowGroup) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (bi, blk) in row.chunks_exact(144).enumerate() {
        let (dw, dmin) = (h(blk, 0), h(blk, 2));
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        let q8 = &x.q[bi * QK_K..(bi + 1) * QK_K];
        let bs = &x.bsums[bi * 16..(bi + 1) * 16];
        let dx = x.d[bi];
        let (mut isum, mut imin) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = super::kquants::scale_min_k4(j, scales);
            let (g, nib) = (j / 2, j % 2);
            let q = &qs[g * 32..g * 32 + 32];
            let s: i32 =
                q.iter().zip(&q8[j * 32..j * 32 + 32]).map(|(&b, &y)| ((b >> (4 * nib)) & 15) as i32 * y as i32).sum();
            isum += sc as i32 * s;
            imin += m as i32 * (bs[2 * j] + bs[2 * j + 1]);
            if group.is_gemm() && nib == 1 {
                acc = (isum as f32).mul_add(dw * dx, acc);
                acc_min = (imin as f32).mul_add(dmin * dx, acc_min);
                (isum, imin) = (0, 0);
            }
        }
        if !group.is_gemm() {
            acc = (isum as f32).mul_add(dw * dx, acc);
            acc_min = (imin as f32).mul_add(dmin * dx, acc_min);
        }
    }
    acc - acc_min
}

/// Q4_0's codes as table values: `c − 8`.
const Q4_0_TABLE: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];

/// The value table of a layout whose 18-byte blocks hold an f16 scale and 32 four-bit codes
/// standing for `d·T[code]`: Q4_0 and IQ4_NL (`None` for every other dtype).
pub fn lut4_table(dtype: DType) -> Option<&'static [i8; 16]> {
    match dtype {
        DType::Q4_0 => Some(&Q4_0_TABLE),
        DType::IQ4NL => Some(&crate::iq4nl::VALUES),
        _ => None,
    }
}

/// Q4_0 or IQ4_NL (`table`, see [`lut4_table`]) with Q8_0 activations as ggml's repacked
/// 8×8 AVX2 kernels compute one output (llama.cpp repacks both types and runs these for
/// decode and prefill alike whenever the output count is a multiple of 8, as in every model
/// here): per block the exact integer `Σ T[q]·q8` over all 32 elements, added with one fused
/// multiply-add by `d·d8` (an f32 product) into a single accumulator, block after block.
/// (Checked bit for bit against ggml's own kernels: `tests/oracle_llama_cpp.rs`.)
pub fn dot_lut4(row: &[u8], x: &Q8Row, table: &[i8; 16]) -> f32 {
    let mut acc = 0f32;
    for ((blk, &(dx, _)), qx) in row.chunks_exact(18).zip(&x.scales).zip(x.q.chunks_exact(QK)) {
        let qs = &blk[2..18];
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += i32::from(table[usize::from(qs[j] & 15)]) * i32::from(qx[j]);
            isum += i32::from(table[usize::from(qs[j] >> 4)]) * i32::from(qx[j + QK / 2]);
        }
        acc = (isum as f32).mul_add(h(blk, 0) * dx, acc);
    }
    acc
}

/// Q6_K as ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`: eight integer lanes per
/// super-block ([`q6_k_lanes`]), each added to its float lane as `fma(d8·d, lane, acc)`,
/// lanes reduced at the end.
fn dot_q6_k(row: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    for (bi, blk) in row.chunks_exact(210).enumerate() {
        let d = x.d[bi] * h(blk, 208);
        for (a, lane) in acc.iter_mut().zip(q6_k_lanes(blk, x, bi)) {
            *a = d.mul_add(lane as f32, *a);
        }
    }
    hsum8(&acc)
}

/// The eight exact integer lanes of Q6_K super-block `bi` (`blk`) against `x`: lane `l`
/// holds elements `4l..4l+3` of every 32-element segment, times their 16-element scale,
/// less `32·Σ scale·bsum` of 16-groups `2l, 2l+1`.
fn q6_k_lanes(blk: &[u8], x: &Q8KRow, bi: usize) -> [i32; 8] {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let sc = |i: usize| sc[i] as i8 as i32;
    let q8 = &x.q[bi * QK_K..(bi + 1) * QK_K];
    let bs = &x.bsums[bi * 16..(bi + 1) * 16];
    let mut lanes = [0i32; 8];
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..half * 64 + 64], &qh[half * 32..half * 32 + 32]);
        for seg in 0..4 {
            let (lo_off, lo_shift) = ((seg & 1) * 32, (seg >> 1) * 4);
            for (l, lane) in lanes.iter_mut().enumerate() {
                let s = sc(half * 8 + seg * 2 + l / 4);
                let mut p = 0i32;
                for e in 4 * l..4 * l + 4 {
                    let q6 = ((ql[lo_off + e] >> lo_shift) & 15) | (((qh[e] >> (2 * seg)) & 3) << 4);
                    p += q6 as i32 * q8[half * 128 + seg * 32 + e] as i32;
                }
                *lane += s * p;
            }
        }
    }
    for (l, lane) in lanes.iter_mut().enumerate() {
        *lane -= 32 * (bs[2 * l] * sc(2 * l) + bs[2 * l + 1] * sc(2 * l + 1));
    }
    lanes
}

/// Q3_K as ggml's AVX2 `ggml_vec_dot_q3_K_q8_K`: eight integer lanes per super-block
/// ([`q3_k_lanes`]), added to the float lanes as `fma(d8·d, lane, acc)`, lanes reduced at
/// the end.
fn dot_q3_k(row: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    for (bi, blk) in row.chunks_exact(110).enumerate().take(x.d.len()) {
        let d = x.d[bi] * h(blk, 108);
        for (a, lane) in acc.iter_mut().zip(q3_k_lanes(blk, x, bi)) {
            *a = d.mul_add(lane as f32, *a);
        }
    }
    hsum8(&acc)
}

/// The eight exact integer lanes of Q3_K super-block `bi`: lane `l` holds elements
/// `4l..4l+3` of every 32-element segment, each weight `(low 2 bits − 4·[high bit clear])`
/// times its 16-element scale.
fn q3_k_lanes(blk: &[u8], x: &Q8KRow, bi: usize) -> [i32; 8] {
    let (hmask, qs) = (&blk[0..32], &blk[32..96]);
    let sc = super::kquants::q3_k_scales(&blk[96..108]);
    let q8 = &x.q[bi * QK_K..(bi + 1) * QK_K];
    let mut lanes = [0i32; 8];
    for half in 0..2 {
        for shift in 0..4 {
            let bit = half * 4 + shift;
            for (l, lane) in lanes.iter_mut().enumerate() {
                let s = i32::from(sc[half * 8 + shift * 2 + l / 4]);
                let mut p = 0i32;
                for e in 4 * l..4 * l + 4 {
                    let low = i32::from((qs[half * 32 + e] >> (2 * shift)) & 3);
                    let w = low - if hmask[e] >> bit & 1 == 0 { 4 } else { 0 };
                    p += w * i32::from(q8[half * 128 + shift * 32 + e]);
                }
                *lane += s * p;
            }
        }
    }
    lanes
}

/// Q2_K as ggml's AVX2 `ggml_vec_dot_q2_K_q8_K`: per super-block eight exact lanes of the
/// minimums' share added to the float lanes as `fma(−d8·dmin, lane, acc)`, then eight exact
/// lanes of scaled products added as `fma(d8·d, lane, acc)` ([`q2_k_lanes`]); the lanes
/// reduced at the end.
fn dot_q2_k(row: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    for (bi, blk) in row.chunks_exact(84).enumerate().take(x.d.len()) {
        let d = x.d[bi] * h(blk, 80);
        let dmin = -x.d[bi] * h(blk, 82);
        let (lanes, mins) = q2_k_lanes(blk, x, bi);
        for (a, m) in acc.iter_mut().zip(mins) {
            *a = dmin.mul_add(m as f32, *a);
        }
        for (a, lane) in acc.iter_mut().zip(lanes) {
            *a = d.mul_add(lane as f32, *a);
        }
    }
    hsum8(&acc)
}

/// The exact integer lanes of Q2_K super-block `bi`: the scaled products (lane `l` holds
/// elements `4l..4l+3` of every 32-element segment, times the scale of its 16) and the
/// minimums' share (lane `l`: `m_2l·bsum_2l + m_2l+1·bsum_2l+1`).
fn q2_k_lanes(blk: &[u8], x: &Q8KRow, bi: usize) -> ([i32; 8], [i32; 8]) {
    let (scales, qs) = (&blk[0..16], &blk[16..80]);
    let q8 = &x.q[bi * QK_K..(bi + 1) * QK_K];
    let bs = &x.bsums[bi * 16..(bi + 1) * 16];
    let mins: [i32; 8] = std::array::from_fn(|l| {
        i32::from(scales[2 * l] >> 4) * bs[2 * l] + i32::from(scales[2 * l + 1] >> 4) * bs[2 * l + 1]
    });
    let mut lanes = [0i32; 8];
    for half in 0..2 {
        for shift in 0..4 {
            for (l, lane) in lanes.iter_mut().enumerate() {
                let sc = i32::from(scales[half * 8 + 2 * shift + l / 4] & 15);
                let p: i32 = (4 * l..4 * l + 4)
                    .map(|e| {
                        i32::from((qs[half * 32 + e] >> (2 * shift)) & 3) * i32::from(q8[half * 128 + shift * 32 + e])
                    })
                    .sum();
                *lane += sc * p;
            }
        }
    }
    (lanes, mins)
}

/// Q5_K as ggml's AVX2 `ggml_vec_dot_q5_K_q8_K`: per super-block the minimums' share as
/// one exact integer `Σ_j m_j·(Σ q8 of sub-block j)`, added to a float sum as
/// `fma(−d8·dmin, I, summs)` (ggml's `summs += dmin * I`, which GCC contracts into one fused
/// multiply-add when it compiles for FMA, as llama.cpp's x86 builds do); eight integer lanes
/// ([`q5_k_lanes`]) added to the float lanes as `fma(d8·d, lane, acc)`; at the end
/// `hsum8(acc) + summs`.
fn dot_q5_k(row: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (bi, blk) in row.chunks_exact(176).enumerate().take(x.d.len()) {
        let d = x.d[bi] * h(blk, 0);
        let dmin = -x.d[bi] * h(blk, 2);
        let (lanes, imin) = q5_k_lanes(blk, x, bi);
        summs = dmin.mul_add(imin as f32, summs);
        for (a, lane) in acc.iter_mut().zip(lanes) {
            *a = d.mul_add(lane as f32, *a);
        }
    }
    hsum8(&acc) + summs
}

/// The exact integers of Q5_K super-block `bi`: eight lanes (lane `l` holds elements
/// `4l..4l+3` of every 32-element sub-block times its scale) and the minimums' share
/// `Σ_j m_j·(Σ q8 of sub-block j)`.
fn q5_k_lanes(blk: &[u8], x: &Q8KRow, bi: usize) -> ([i32; 8], i32) {
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    let q8 = &x.q[bi * QK_K..(bi + 1) * QK_K];
    let bs = &x.bsums[bi * 16..(bi + 1) * 16];
    let mut lanes = [0i32; 8];
    let mut imin = 0i32;
    for j in 0..8 {
        let (sc, m) = super::kquants::scale_min_k4(j, &blk[4..16]);
        imin += i32::from(m) * (bs[2 * j] + bs[2 * j + 1]);
        let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        for (l, lane) in lanes.iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4)
                .map(|e| {
                    let v = ((q[e] >> (4 * (j % 2))) & 15) | (((qh[e] >> j) & 1) << 4);
                    i32::from(v) * i32::from(q8[j * 32 + e])
                })
                .sum();
            *lane += i32::from(sc) * p;
        }
    }
    (lanes, imin)
}

/// Q2_K, Q3_K, Q5_K or Q6_K in a tiled matmul ([`RowGroup::is_tiled`]), as ggml's AVX2 tiled
/// K-quant kernel computes one output: per super-block the exact integers `s1 = Σ_j sc_j·Σ
/// w·q8` (the weights' signed codes times their sub-block scales) and, for the types with
/// minimums, `s2 = Σ_j m_j·bsum_j`; then `r = d·f32(s1)`, `r = fma(−dmin, f32(s2), r)`, and
/// `acc = fma(r, d8, acc)` block after block. (Checked bit for bit against ggml's own
/// kernels: `tests/oracle_llama_cpp.rs`.)
pub fn dot_k_tiled(dtype: DType, row: &[u8], x: &Q8KRow) -> f32 {
    let bytes = dtype.block_bytes() as usize;
    let mut acc = 0f32;
    for (bi, blk) in row.chunks_exact(bytes).enumerate().take(x.d.len()) {
        let sum = |l: [i32; 8]| l.iter().sum::<i32>();
        let (s1, min) = match dtype {
            DType::Q6K => (sum(q6_k_lanes(blk, x, bi)), None),
            DType::Q3K => (sum(q3_k_lanes(blk, x, bi)), None),
            DType::Q2K => {
                let (lanes, mins) = q2_k_lanes(blk, x, bi);
                (sum(lanes), Some((h(blk, 82), sum(mins))))
            }
            DType::Q5K => {
                let (lanes, imin) = q5_k_lanes(blk, x, bi);
                (sum(lanes), Some((h(blk, 2), imin)))
            }
            _ => return 0.0,
        };
        // Where each layout keeps its f16 `d`.
        let d = h(
            blk,
            match dtype {
                DType::Q6K => 208,
                DType::Q3K => 108,
                DType::Q2K => 80,
                _ => 0,
            },
        );
        acc = tiled_block(acc, s1, d, min, x.d[bi]);
    }
    acc
}

/// One super-block of [`dot_k_tiled`] added to `acc`: `r = d·f32(s1)`, with minimums
/// `(dmin, s2)` `r = fma(−dmin, f32(s2), r)`, then `fma(r, d8, acc)`. (The SIMD kernels call
/// it with the integers they sum.)
#[inline(always)]
pub fn tiled_block(acc: f32, s1: i32, d: f32, min: Option<(f32, i32)>, d8: f32) -> f32 {
    let mut r = d * s1 as f32;
    if let Some((dmin, s2)) = min {
        r = (-dmin).mul_add(s2 as f32, r);
    }
    r.mul_add(d8, acc)
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The block's integer weights (signed for the `_0` types, unsigned for the
/// `_1` types, as ggml feeds them to `maddubs`), its `d` and its `m` (0 for `_0`).
fn unpack(dtype: DType, b: &[u8], w: &mut [i32; QK]) -> (f32, f32) {
    match dtype {
        // (Q4_0 is summed by `dot_lut4`.)
        DType::Q4_1 => {
            let qs = &b[4..20];
            for j in 0..16 {
                w[j] = (qs[j] & 15) as i32;
                w[j + 16] = (qs[j] >> 4) as i32;
            }
            (h(b, 0), h(b, 2))
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

/// Dot of one stored legacy-block weight row with Q8_0/Q8_1 activations, in
/// ggml's AVX2 order. `row` holds whole blocks matching `x`.
fn dot_legacy(dtype: DType, row: &[u8], x: &Q8Row) -> f32 {
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
    use crate::{dequantize_row, quantize_row};

    #[test]
    fn matches_dequantized_dot_to_rounding() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07).collect();
        let w: Vec<f32> = (0..96).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05).collect();
        let xq = Activations::Q8(quantize_q8(&x));
        let mut xr = x.clone();
        crate::act::round_for_dot(DType::Q8_0, &mut xr);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::IQ4NL] {
            let mut row = vec![0u8; dtype.row_bytes(96).unwrap() as usize];
            quantize_row(dtype, &w, &mut row).unwrap();
            let mut wd = vec![0f32; 96];
            dequantize_row(dtype, &row, &mut wd).unwrap();
            let want: f32 = wd.iter().zip(&xr).map(|(a, b)| a * b).sum();
            let got = dot(dtype, &row, &xq, RowGroup::Gemv);
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype:?}: {got} vs {want}");
        }
    }

    #[test]
    fn k_quant_dots_match_dequantized_dot_to_rounding() {
        let n = 512;
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.07).collect();
        let xq = quantize_for(DType::Q6K, &x).unwrap();
        let mut xr = x.clone();
        crate::act::round_for_dot(DType::Q6K, &mut xr);
        for (dtype, seed) in [(DType::Q4K, 1u64), (DType::Q6K, 2)] {
            let row = kquant_row(dtype, seed);
            let mut wd = vec![0f32; n];
            dequantize_row(dtype, &row, &mut wd).unwrap();
            let want: f32 = wd.iter().zip(&xr).map(|(a, b)| a * b).sum();
            let got = dot(dtype, &row, &xq, RowGroup::Gemv);
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype:?}: {got} vs {want}");
            let grouped = dot(dtype, &row, &xq, RowGroup::Gemm);
            assert!((grouped - want).abs() < 1e-3 * want.abs().max(1.0), "{dtype:?}: {grouped} vs {want}");
        }
        assert_eq!(RowGroup::of(3, 5), RowGroup::Gemm);
        assert_eq!(RowGroup::of(4, 5), RowGroup::Gemv);
        assert_eq!(RowGroup::of(0, 1), RowGroup::Gemv);
    }

    /// A valid row of `dtype` (kiln has no k-quant quantizer yet): random
    /// bytes with finite, modest f16 scales.
    fn kquant_row(dtype: DType, seed: u64) -> Vec<u8> {
        let bytes = dtype.row_bytes(512).unwrap() as usize;
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut row: Vec<u8> = (0..bytes)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        for blk in row.chunks_mut(dtype.block_bytes() as usize) {
            match dtype {
                DType::Q4K => {
                    blk[0..2].copy_from_slice(&scale);
                    blk[2..4].copy_from_slice(&scale);
                }
                _ => blk[208..210].copy_from_slice(&scale),
            }
        }
        row
    }
}
