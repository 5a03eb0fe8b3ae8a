//! The matmul kernel: `y[t, o] = Σ_i x[t, i] · W[o, i]`, with `W` stored row by
//! row in any float or quantized dtype, parallel over output rows.
//!
//! Two paths, with bit-identical results (both sum in the order of
//! [`kernels::dot`], which is the order of `quant::dot_row`):
//! - one token (decode): each weight row is dotted in place with
//!   `quant::dot_row`, which dequantizes block by block on the stack;
//! - several tokens (prefill): each task dequantizes a block of weight rows
//!   once with `quant::dequantize_row` and dots them with every token's row,
//!   so each weight row is dequantized once per call, not once per token.

use kiln_ir::DType;
use rayon::prelude::*;

use super::kernels::{dot, dot4};
use crate::quant::{self, QuantError};

/// Weight rows per parallel task in the single-token path.
const DECODE_ROWS: usize = 64;
/// Upper bound on the f32 bytes of dequantized weight rows one prefill task holds.
const PREFILL_TILE_BYTES: usize = 128 * 1024;

/// A weight matrix `[n, k]` as stored: `n` rows of `row_bytes` bytes of `dtype`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weight<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub n: usize,
    pub k: usize,
}

impl Weight<'_> {
    fn row_bytes(&self) -> usize {
        if self.n == 0 {
            0
        } else {
            self.bytes.len() / self.n
        }
    }
    fn row(&self, o: usize) -> &[u8] {
        let rb = self.row_bytes();
        self.bytes.get(o * rb..(o + 1) * rb).unwrap_or(&[])
    }
}

/// `x · Wᵀ (+ bias)` for `x` of `rows` rows of `w.k` values; returns `[rows, w.n]`.
///
/// The bias is added after the dot product (as ggml's separate `add`).
pub(crate) fn matmul(
    x: &[f32],
    rows: usize,
    w: Weight<'_>,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>, QuantError> {
    let mut y = if rows == 1 {
        matvec(x, w)?
    } else {
        matmat(x, rows, w)?
    };
    if let Some(b) = bias {
        for row in y.chunks_mut(w.n.max(1)) {
            for (v, &bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
    Ok(y)
}

/// One token: `y[o] = dot_row(W[o], x)`, parallel over chunks of output rows.
fn matvec(x: &[f32], w: Weight<'_>) -> Result<Vec<f32>, QuantError> {
    let mut y = vec![0.0f32; w.n];
    y.par_chunks_mut(DECODE_ROWS)
        .enumerate()
        .try_for_each(|(c, ys)| {
            for (j, out) in ys.iter_mut().enumerate() {
                *out = quant::dot_row(w.dtype, w.row(c * DECODE_ROWS + j), &x[..w.k])?;
            }
            Ok(())
        })?;
    Ok(y)
}

/// Several tokens: tasks over blocks of output rows; each dequantizes its
/// block once and computes the `[rows, block]` tile, which is then copied
/// into place.
fn matmat(x: &[f32], rows: usize, w: Weight<'_>) -> Result<Vec<f32>, QuantError> {
    let k = w.k;
    // Enough rows per block to amortize the task, few enough that the
    // dequantized block stays in L2; a multiple of 4 for `dot4`.
    let block = (PREFILL_TILE_BYTES / (4 * k.max(1))).clamp(4, 64) / 4 * 4;
    let nblocks = w.n.div_ceil(block);
    let tiles: Vec<Vec<f32>> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let o0 = b * block;
            let nb = block.min(w.n - o0);
            let mut wbuf = vec![0.0f32; nb * k];
            for (j, dst) in wbuf.chunks_mut(k.max(1)).enumerate() {
                quant::dequantize_row(w.dtype, w.row(o0 + j), dst)?;
            }
            let wrows: Vec<&[f32]> = if k == 0 {
                vec![&[][..]; nb]
            } else {
                wbuf.chunks(k).collect()
            };
            let mut tile = vec![0.0f32; rows * nb];
            for (t, out) in tile.chunks_mut(nb).enumerate() {
                let xt = &x[t * k..(t + 1) * k];
                let mut j = 0;
                while j + 4 <= nb {
                    let r = dot4([wrows[j], wrows[j + 1], wrows[j + 2], wrows[j + 3]], xt);
                    out[j..j + 4].copy_from_slice(&r);
                    j += 4;
                }
                for jj in j..nb {
                    out[jj] = dot(wrows[jj], xt);
                }
            }
            Ok(tile)
        })
        .collect::<Result<_, QuantError>>()?;
    let mut y = vec![0.0f32; rows * w.n];
    for (b, tile) in tiles.iter().enumerate() {
        let o0 = b * block;
        let nb = block.min(w.n - o0);
        for (t, src) in tile.chunks(nb.max(1)).enumerate() {
            y[t * w.n + o0..t * w.n + o0 + nb].copy_from_slice(src);
        }
    }
    Ok(y)
}
