//! Weights repacked once at session start for the lane kernels (llama.cpp's CPU
//! "repack" buffers do the same): Q4_K matmul weights as groups of eight rows
//! interleaved per super-block ([`crate::vnni::q4_k_pack`]), so decode reads each
//! weight once with one row per vector lane and no transposes, and prefill loads
//! the lane layout instead of building it. Only on CPUs with the VNNI kernels.
//!
//! The packing is lossless (values moved, not changed), so results stay the
//! reference interpreter's bit for bit. Once a weight is packed its stored bytes
//! are no longer read by a matmul; where they are pages of a read-only file
//! mapping (a GGUF or a kiln build, mapped by the runtime) they are dropped from
//! this process (`MADV_DONTNEED`: the file and the page cache keep them), so the
//! weights are not resident twice.

use std::collections::HashMap;

use kiln_backends::WeightSource;
use kiln_backends::reference::Weight;
use kiln_ir::{DType, Op, VerifiedModule};
use kiln_quant::ggml_dot::{Q8KRow, RowGroup};
use rayon::prelude::*;

use crate::vnni::{self, Q4K_PACKED, Q4K_ROWS};

/// One packed weight: `n / 8` groups of eight rows, each `nblocks` packed super-blocks.
struct PackedQ4k {
    n: usize,
    nblocks: usize,
    data: Vec<u8>,
}

/// The session's packed weights, found by the address and length of their stored bytes
/// (what a matmul's [`Weight`] carries).
#[derive(Default)]
pub struct PackedWeights {
    q4k: HashMap<(usize, usize), PackedQ4k>,
}

impl PackedWeights {
    /// Packs every Q4_K weight of a `matmul` whose rows come in whole groups of eight.
    pub fn build(module: &VerifiedModule, weights: &dyn WeightSource) -> PackedWeights {
        let mut q4k = HashMap::new();
        for inst in &module.insts {
            let Op::MatMul { w, .. } = inst.op else { continue };
            let ty = &module.param(w).ty;
            let (DType::Q4K, Some([n, k])) = (ty.dtype, ty.fixed_dims().as_deref().map(|d| [d[0], d[d.len() - 1]]))
            else {
                continue;
            };
            if ty.shape.len() != 2 {
                continue;
            }
            let (Ok(n), Ok(k)) = (usize::try_from(n), usize::try_from(k)) else { continue };
            let bytes = weights.bytes(w);
            if n == 0 || !n.is_multiple_of(Q4K_ROWS) || !k.is_multiple_of(256) || bytes.len() != n * k / 256 * 144 {
                continue;
            }
            let key = (bytes.as_ptr() as usize, bytes.len());
            if q4k.contains_key(&key) {
                continue;
            }
            let nblocks = k / 256;
            let rb = nblocks * 144;
            let group = nblocks * Q4K_PACKED;
            let mut data = vec![0u8; n / Q4K_ROWS * group];
            data.par_chunks_mut(group).enumerate().for_each(|(g, out)| {
                let rows: [&[u8]; Q4K_ROWS] = std::array::from_fn(|r| &bytes[(g * 8 + r) * rb..(g * 8 + r + 1) * rb]);
                vnni::q4_k_pack(rows, nblocks, out);
            });
            release_mapped(bytes);
            q4k.insert(key, PackedQ4k { n, nblocks, data });
        }
        PackedWeights { q4k }
    }

    /// Whether no weight was packed.
    pub fn is_empty(&self) -> bool {
        self.q4k.is_empty()
    }

    /// `x · Wᵀ (+ bias)` from the packed form of `w`, or `None` when `w` was not packed.
    /// `xs` are the token rows' Q8_K activations, `groups` their [`RowGroup`]s.
    pub(crate) fn matmul(
        &self,
        w: &Weight<'_>,
        xs: &[&Q8KRow],
        groups: &[RowGroup],
        bias: Option<&[f32]>,
    ) -> Option<Vec<f32>> {
        let p = self.q4k.get(&(w.bytes.as_ptr() as usize, w.bytes.len()))?;
        if p.n != w.n || xs.iter().any(|x| x.d.len() < p.nblocks || x.bsums.len() < 16 * p.nblocks) {
            return None;
        }
        let (n, rows) = (p.n, xs.len());
        let group = p.nblocks * Q4K_PACKED;
        let ngroups = n / Q4K_ROWS;
        // The batch's `gemm` rows (a multiple of four) and its `gemv` rest.
        let gemm = groups.iter().take_while(|g| **g == RowGroup::Gemm).count();
        // Enough tasks to balance the threads, each a run of row groups.
        let threads = rayon::current_num_threads().max(1);
        let per_task = ngroups.div_ceil(4 * threads).max(1);
        let tiles: Vec<Vec<f32>> = (0..ngroups.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let g0 = task * per_task;
                let g1 = (g0 + per_task).min(ngroups);
                let nb = (g1 - g0) * Q4K_ROWS;
                let mut tile = vec![0f32; rows * nb];
                for g in g0..g1 {
                    let pk = &p.data[g * group..(g + 1) * group];
                    let j0 = (g - g0) * Q4K_ROWS;
                    if gemm > 0 {
                        // SAFETY: the backend packs only with `Isa::Avx512Vnni` (AVX2, FMA, F16C,
                        // AVX512F/VL/VNNI); `pk` holds `nblocks` packed super-blocks and every
                        // token row at least as many (checked above).
                        unsafe {
                            vnni::q4_k_gemm_rows(vnni::Q4kSource::Packed(pk), &xs[..gemm], p.nblocks, &mut tile, nb, j0)
                        };
                    }
                    for (t, x) in xs.iter().enumerate().skip(gemm) {
                        // SAFETY: as above.
                        let v = unsafe { vnni::q4_k_packed_gemv(pk, p.nblocks, x) };
                        tile[t * nb + j0..t * nb + j0 + Q4K_ROWS].copy_from_slice(&v);
                    }
                }
                tile
            })
            .collect();
        Some(kiln_backends::reference::place_tiles(&tiles, per_task * Q4K_ROWS, rows, n, bias))
    }
}

/// Drops the pages of `bytes` from this process when they lie in a read-only file
/// mapping (re-read from the file if ever touched again); anything else — heap memory,
/// writable mappings — is left alone.
fn release_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
        // `lo-hi perms offset dev inode path`: a file-backed, read-only, private mapping.
        let file_mapped = maps.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (Some(range), Some(perms), Some(_), Some(_), Some(inode), Some(path)) =
                (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return false;
            };
            let Some((lo, hi)) = range.split_once('-') else { return false };
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) else {
                return false;
            };
            lo <= start && end <= hi && (perms == "r--p" || perms == "r--s") && inode != "0" && path.starts_with('/')
        });
        if !file_mapped {
            return;
        }
        let page = 4096;
        let (a, b) = (start.div_ceil(page) * page, end / page * page);
        if a < b {
            // SAFETY: the whole pages of a read-only file mapping that holds `bytes`;
            // dropping them only makes a later read fault them in again from the file.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}
