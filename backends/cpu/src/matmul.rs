//! The CPU backend's matmul: activations prepared once per token row, the
//! weight rows split into blocks across the worker threads, each block's
//! rows read once per call (all token rows dotted against a block while it
//! is in cache).

use kiln_backends::reference::{AttnNumerics, CompressedCache, Kernels, KvCache, MatJob, Weight, place_tiles};
use kiln_ir::AttentionAttrs;
use kiln_quant::QuantError;
use kiln_quant::ggml_dot::RowGroup;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use std::sync::Arc;

use crate::kernels::{Batch, Isa, dot_tile, prepare};
#[cfg(target_arch = "x86_64")]
use crate::packed::PackedWeights;

/// Stored weight bytes one task reads per block (about half an L2).
const BLOCK_BYTES: usize = 256 * 1024;

/// [`Kernels`] with the crate's SIMD kernels.
#[derive(Clone, Default)]
pub struct CpuKernels {
    pub isa: Isa,
    /// Weights repacked at session start (see [`crate::packed`]).
    #[cfg(target_arch = "x86_64")]
    pub packed: Option<Arc<PackedWeights>>,
}

impl CpuKernels {
    /// The kernels of `isa`, reading every weight as stored.
    pub fn new(isa: Isa) -> Self {
        CpuKernels {
            isa,
            #[cfg(target_arch = "x86_64")]
            packed: None,
        }
    }
}

impl std::fmt::Debug for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("CpuKernels");
        d.field("isa", &self.isa);
        #[cfg(target_arch = "x86_64")]
        d.field("packed", &self.packed.is_some());
        d.finish()
    }
}

impl Kernels for CpuKernels {
    fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        w: Weight<'_>,
        bias: Option<&[f32]>,
        first: usize,
        total: usize,
    ) -> Result<Vec<f32>, QuantError> {
        let (n, k) = (w.n, w.k);
        if n == 0 || rows == 0 {
            return Ok(vec![0.0f32; rows * n]);
        }
        let rb = w.row_bytes();
        let xs: Vec<_> = x.chunks(k.max(1)).take(rows).map(|r| prepare(self.isa, w.dtype, r)).collect();
        let groups: Vec<RowGroup> = (0..rows).map(|t| RowGroup::of(first + t, total)).collect();
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = &self.packed
            && let Some(y) = packed.matmul(&w, &xs, &groups, bias)
        {
            return Ok(y);
        }
        // Enough blocks to balance the threads (four each), few enough rows per
        // block that a block's bytes stay in L2 while every token row passes.
        let threads = rayon::current_num_threads().max(1);
        let by_cache = (BLOCK_BYTES / rb.max(1)).max(8);
        let by_balance = n.div_ceil(4 * threads).max(8);
        // Whole groups of eight rows: the VNNI Q4_K kernel takes rows eight at a time
        // and leaves the rest of a block to a slower one.
        let block = (by_cache.min(by_balance) / 8 * 8).max(8).min(n);
        let isa = self.isa;
        let batch = Batch::build(isa, w.dtype, &xs, groups);
        if rows == 1 {
            // One token row: each block's outputs are contiguous, written in place.
            let mut y = vec![0.0f32; n];
            y.par_chunks_mut(block).enumerate().try_for_each(|(b, out)| {
                let o0 = b * block;
                dot_tile(isa, w.dtype, &w.bytes[o0 * rb..(o0 + out.len()) * rb], rb, &xs, &batch, out)
            })?;
            if let Some(bias) = bias {
                y.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
            return Ok(y);
        }
        let tiles: Vec<Vec<f32>> = (0..n.div_ceil(block))
            .into_par_iter()
            .map(|b| {
                let o0 = b * block;
                let nb = block.min(n - o0);
                let bytes = &w.bytes[o0 * rb..(o0 + nb) * rb];
                let mut tile = vec![0.0f32; rows * nb];
                dot_tile(isa, w.dtype, bytes, rb, &xs, &batch, &mut tile)?;
                Ok(tile)
            })
            .collect::<Result<_, QuantError>>()?;
        Ok(place_tiles(&tiles, block, rows, n, bias))
    }

    /// The jobs as one parallel region: each job's own row blocks are parallel too, so
    /// threads take work from the other jobs instead of waiting at each one's end.
    fn matmuls(&self, jobs: &[MatJob<'_>]) -> Result<Vec<Vec<f32>>, QuantError> {
        jobs.par_iter().map(|j| j.run(self)).collect()
    }

    fn attend(
        &self,
        q: &[f32],
        first_pos: usize,
        cache: &KvCache,
        attrs: &AttentionAttrs,
        mode: AttnNumerics,
    ) -> Vec<f32> {
        crate::attention::attend(self.isa, q, first_pos, cache, attrs, mode)
    }

    fn compressed_attend(
        &self,
        cache: &CompressedCache,
        q: &[f32],
        first_pos: usize,
        idx_q: Option<&[f32]>,
        idx_w: Option<&[f32]>,
        sink: &[f32],
    ) -> Vec<f32> {
        crate::compressed::attend(self.isa, &cache.view(), q, first_pos, idx_q, idx_w, sink)
    }
}
