//! The matmul kernel: `y[t, o] = Σ_i x[t, i] · W[o, i]`, with `W` stored row by
//! row in any float or quantized dtype, parallel over blocks of output rows.
//!
//! Each parallel task dequantizes its block of weight rows once with
//! `quant::dequantize_row` and dots every row with every token's input row
//! (four weight rows at a time, [`dot4`]), so each weight row is dequantized
//! once per call, not once per token. The sums run in the order of
//! `quant::dot_row` (see [`dot`]), so the result is bit-identical to calling
//! `dot_row` per (token, weight row), and independent of how many tokens the
//! call has: a prompt run in one call, in chunks, or token by token gives the
//! same numbers.
//!
//! (Dequantizing a block then `dot4` measured as fast as `quant::dot_row` per
//! row for single-token decode, and much faster for prefill, so there is one
//! path for both.)

use kiln_ir::DType;
use rayon::prelude::*;

use super::kernels::{dot, dot4};
use crate::quant::ggml_dot::RowGroup;
use crate::quant::{self, QuantError};

/// Upper bound on the f32 bytes of dequantized weight rows one task holds
/// (so they stay in L2 while every token's row streams past).
const TILE_BYTES: usize = 128 * 1024;
/// Most weight rows per task.
const MAX_BLOCK: usize = 64;

/// A weight matrix `[n, k]` as stored: `n` rows of `k` elements of `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub n: usize,
    pub k: usize,
}

impl Weight<'_> {
    /// Stored bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.bytes.len().checked_div(self.n).unwrap_or(0)
    }

    /// Stored bytes of row `o` (empty when out of range; the caller checked sizes).
    pub fn row(&self, o: usize) -> &[u8] {
        let rb = self.row_bytes();
        self.bytes.get(o * rb..(o + 1) * rb).unwrap_or(&[])
    }
}

/// `x · Wᵀ (+ bias)` for `x` holding `rows` rows of `w.k` values; returns
/// `[rows, w.n]`. The bias is added after the dot product (as ggml's
/// separate `add`).
pub(crate) fn matmul(x: &[f32], rows: usize, w: Weight<'_>, bias: Option<&[f32]>) -> Result<Vec<f32>, QuantError> {
    let (n, k) = (w.n, w.k);
    if n == 0 || rows == 0 {
        return Ok(vec![0.0; rows * n]);
    }
    if w.dtype == DType::KQ2 {
        return Ok(matmul_kq2(x, rows, w, bias));
    }
    // Few enough rows per task that the dequantized block stays in L2, and
    // enough tasks (about four per thread) to balance even a small matrix;
    // a multiple of 4 for `dot4`.
    let l2_rows = (TILE_BYTES / (4 * k.max(1))).clamp(4, MAX_BLOCK);
    let balanced = n.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(4);
    let block = l2_rows.min(balanced).max(4) / 4 * 4;

    let tiles: Vec<Vec<f32>> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let o0 = b * block;
            let nb = block.min(n - o0);
            let mut wbuf = vec![0.0f32; nb * k];
            if k > 0 {
                for (j, dst) in wbuf.chunks_mut(k).enumerate() {
                    quant::dequantize_row(w.dtype, w.row(o0 + j), dst)?;
                }
            }
            let wrow = |j: usize| &wbuf[j * k..(j + 1) * k];
            // tile[t][j] = x[t] · W[o0 + j]
            let mut tile = vec![0.0f32; rows * nb];
            for (out, xt) in tile.chunks_mut(nb).zip(x.chunks(k.max(1))) {
                let mut j = 0;
                while j + 4 <= nb {
                    let r = dot4([wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3)], xt);
                    out[j..j + 4].copy_from_slice(&r);
                    j += 4;
                }
                for (jj, o) in out.iter_mut().enumerate().skip(j) {
                    *o = dot(wrow(jj), xt);
                }
            }
            Ok(tile)
        })
        .collect::<Result<_, QuantError>>()?;

    Ok(place_tiles(&tiles, block, rows, n, bias))
}

/// Assembles `[rows, n]` from per-block tiles (`tiles[b]` holds, for each of
/// the `rows` token rows, the outputs of weight rows `b·block..`), adding the
/// bias after the dot products (as ggml's separate `add`).
pub fn place_tiles(tiles: &[Vec<f32>], block: usize, rows: usize, n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * n];
    for (b, tile) in tiles.iter().enumerate() {
        let o0 = b * block;
        let nb = block.min(n - o0);
        for (yt, src) in y.chunks_mut(n).zip(tile.chunks(nb)) {
            yt[o0..o0 + nb].copy_from_slice(src);
            if let Some(bias) = bias {
                for (v, &bi) in yt[o0..o0 + nb].iter_mut().zip(&bias[o0.min(bias.len())..]) {
                    *v += bi;
                }
            }
        }
    }
    y
}

/// kq2 weights are dotted in their storage basis
/// (`quant::kq2::dot_kq2_rotated`, the format's definition): each token row
/// is rotated once, and no weight is taken back to the original basis.
fn matmul_kq2(x: &[f32], rows: usize, w: Weight<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let xs: Vec<(&[f32], Vec<f32>)> =
        x.chunks(k.max(1)).take(rows).map(|r| (r, quant::kq2::kq2_rotate_row(r))).collect();
    let mut y = vec![0.0f32; rows * n];
    y.par_chunks_mut(n).zip(&xs).for_each(|(yt, (xt, xr))| {
        yt.par_iter_mut().enumerate().for_each(|(o, v)| {
            *v = quant::kq2::dot_kq2_rotated(w.row(o), xt, xr) + bias.map_or(0.0, |b| b[o]);
        });
    });
    y
}

/// [`matmul`] in llama.cpp-compatible numerics for the types of [`quant::ggml_dot`]:
/// activations quantized once per token row, each product summed in ggml's
/// order; the bias added afterwards. `x` holds rows `first..total` of a call
/// over `total` tokens, which decides each row's [`RowGroup`] (llama.cpp runs a
/// prompt's rows through one matmul; a row kiln computes alone because only it
/// is needed is treated as part of that batch).
pub(crate) fn matmul_ggml(
    x: &[f32],
    rows: usize,
    w: Weight<'_>,
    bias: Option<&[f32]>,
    first: usize,
    total: usize,
) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let xq: Vec<quant::ggml_dot::Activations> =
        x.chunks(k.max(1)).take(rows).filter_map(|r| quant::ggml_dot::quantize_for(w.dtype, r)).collect();
    let mut y = vec![0.0f32; rows * n];
    y.par_chunks_mut(n.max(1)).zip(&xq).enumerate().for_each(|(t, (yt, xt))| {
        let group = RowGroup::of(first + t, total);
        for (o, v) in yt.iter_mut().enumerate() {
            *v = quant::ggml_dot::dot(w.dtype, w.row(o), xt, group) + bias.map_or(0.0, |b| b[o]);
        }
    });
    y
}
