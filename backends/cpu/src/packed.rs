//! Weights repacked once at session start for the lane kernels (llama.cpp's CPU
//! "repack" buffers do the same): Q4_K matmul weights as groups of eight rows
//! interleaved per super-block ([`crate::vnni::q4_k_pack`]), Q4_0 and IQ4_NL ones as groups
//! of sixteen rows interleaved per block ([`crate::lut4::pack`]), so decode reads each
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
use kiln_quant::ggml_dot::RowGroup;
use rayon::prelude::*;

use crate::kernels::{Prepared, all_of, q8k_of};
use crate::lut4;
use crate::vnni::{self, Q4K_PACKED, Q4K_ROWS};

/// A packed layout: its dtype, rows per group and packed bytes per block of a group.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// Eight Q4_K rows per group ([`vnni::q4_k_pack`]).
    Q4k,
    /// Sixteen Q4_0 or IQ4_NL rows per group ([`lut4::pack`]).
    Lut4(DType),
}

impl Layout {
    fn of(dtype: DType) -> Option<Layout> {
        match dtype {
            DType::Q4K => Some(Layout::Q4k),
            DType::Q4_0 | DType::IQ4NL if *lut4::ZMM => Some(Layout::Lut4(dtype)),
            _ => None,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Layout::Q4k => DType::Q4K,
            Layout::Lut4(d) => d,
        }
    }

    fn rows(self) -> usize {
        match self {
            Layout::Q4k => Q4K_ROWS,
            Layout::Lut4(_) => lut4::ROWS,
        }
    }

    fn packed_block(self) -> usize {
        match self {
            Layout::Q4k => Q4K_PACKED,
            Layout::Lut4(_) => lut4::PACKED,
        }
    }
}

/// One packed weight: `n / rows` groups of rows, each `nblocks` packed blocks.
struct Packed {
    layout: Layout,
    n: usize,
    nblocks: usize,
    data: Vec<u8>,
}

/// The session's packed weights, found by the address and length of their stored bytes
/// (what a matmul's [`Weight`] carries).
#[derive(Default)]
pub struct PackedWeights {
    packed: HashMap<(usize, usize), Packed>,
}

impl PackedWeights {
    /// Packs every Q4_K (and, on CPUs with AVX512BW, Q4_0 and IQ4_NL) weight of a `matmul`
    /// whose rows come in whole groups.
    pub fn build(module: &VerifiedModule, weights: &dyn WeightSource) -> PackedWeights {
        let mut packed = HashMap::new();
        let file_maps = read_only_file_maps();
        for inst in &module.insts {
            let Op::MatMul { w, .. } = inst.op else { continue };
            let ty = &module.param(w).ty;
            let Some(dims) = ty.fixed_dims() else { continue };
            let [n, k] = dims[..] else { continue };
            let (Ok(n), Ok(k)) = (usize::try_from(n), usize::try_from(k)) else { continue };
            let bytes = weights.bytes(w);
            let key = (bytes.as_ptr() as usize, bytes.len());
            if packed.contains_key(&key) {
                continue;
            }
            if let Some(p) = Packed::of(&Weight { bytes, dtype: ty.dtype, n, k }) {
                release_mapped(&file_maps, bytes);
                packed.insert(key, p);
            }
        }
        PackedWeights { packed }
    }

    /// One matrix packed as [`PackedWeights::build`] packs a matmul weight (nothing when its
    /// layout or shape has no packed form): for kernel benchmarks.
    pub fn of_matrix(w: &Weight<'_>) -> PackedWeights {
        let packed = Packed::of(w).map(|p| ((w.bytes.as_ptr() as usize, w.bytes.len()), p));
        PackedWeights { packed: packed.into_iter().collect() }
    }

    /// Whether no weight was packed.
    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    /// `x · Wᵀ (+ bias)` from the packed form of `w`, or `None` when `w` was not packed
    /// (or the token rows, `xs` with [`RowGroup`]s `groups`, are not Q8_K activations).
    pub(crate) fn matmul(
        &self,
        w: &Weight<'_>,
        xs: &[Prepared],
        groups: &[RowGroup],
        bias: Option<&[f32]>,
    ) -> Option<Vec<f32>> {
        let p = self.packed.get(&(w.bytes.as_ptr() as usize, w.bytes.len()))?;
        if let Layout::Lut4(dtype) = p.layout {
            return p.lut4_matmul(lut4::table_of(dtype), w, xs, bias);
        }
        let xs = all_of(xs, q8k_of)?;
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

impl Packed {
    /// `w` packed, if its layout has a packed form and its rows come in whole groups.
    fn of(w: &Weight<'_>) -> Option<Packed> {
        let layout = Layout::of(w.dtype)?;
        let (n, k, bytes) = (w.n, w.k, w.bytes);
        let (be, bb) = (layout.dtype().block_elems() as usize, layout.dtype().block_bytes() as usize);
        let rows = layout.rows();
        if n == 0 || !n.is_multiple_of(rows) || !k.is_multiple_of(be) || bytes.len() != n * (k / be) * bb {
            return None;
        }
        let nblocks = k / be;
        let rb = nblocks * bb;
        let group = nblocks * layout.packed_block();
        let mut data = vec![0u8; n / rows * group];
        data.par_chunks_mut(group).enumerate().for_each(|(g, out)| {
            let row = |r: usize| &bytes[(g * rows + r) * rb..(g * rows + r + 1) * rb];
            match layout {
                Layout::Q4k => vnni::q4_k_pack(std::array::from_fn(row), nblocks, out),
                Layout::Lut4(_) => lut4::pack(std::array::from_fn(row), nblocks, out),
            }
        });
        Some(Packed { layout, n, nblocks, data })
    }

    /// [`PackedWeights::matmul`] for Q4_0 and IQ4_NL (`table`): per group of sixteen rows,
    /// the token rows [`lut4::TOKENS`] at a time, then the rest one by one.
    fn lut4_matmul(&self, table: &[i8; 16], w: &Weight<'_>, xs: &[Prepared], bias: Option<&[f32]>) -> Option<Vec<f32>> {
        let xs = all_of(xs, q8_of)?;
        if self.n != w.n || xs.iter().any(|x| x.scales.len() < self.nblocks || x.q.len() < 32 * self.nblocks) {
            return None;
        }
        let (n, rows, nblocks) = (self.n, xs.len(), self.nblocks);
        let offs: Vec<Vec<i32>> = xs.iter().map(|x| lut4::offsets(x, nblocks)).collect();
        let group = nblocks * lut4::PACKED;
        let ngroups = n / lut4::ROWS;
        let threads = rayon::current_num_threads().max(1);
        let per_task = ngroups.div_ceil(4 * threads).max(1);
        let full = rows / lut4::TOKENS * lut4::TOKENS;
        let tiles: Vec<Vec<f32>> = (0..ngroups.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let g0 = task * per_task;
                let g1 = (g0 + per_task).min(ngroups);
                let nb = (g1 - g0) * lut4::ROWS;
                let mut tile = vec![0f32; rows * nb];
                for g in g0..g1 {
                    let pk = &self.data[g * group..(g + 1) * group];
                    let j0 = (g - g0) * lut4::ROWS;
                    let mut put = |t: usize, v: &[f32; lut4::ROWS]| {
                        tile[t * nb + j0..t * nb + j0 + lut4::ROWS].copy_from_slice(v);
                    };
                    for t0 in (0..full).step_by(lut4::TOKENS) {
                        // SAFETY: packed only where `lut4::ZMM` holds; `pk` holds `nblocks`
                        // packed blocks and every token row and offset list as many (checked above).
                        let v = unsafe {
                            lut4::gemm16::<{ lut4::TOKENS }>(
                                table,
                                pk,
                                nblocks,
                                std::array::from_fn(|u| xs[t0 + u]),
                                std::array::from_fn(|u| &offs[t0 + u][..]),
                            )
                        };
                        for (u, v) in v.iter().enumerate() {
                            put(t0 + u, v);
                        }
                    }
                    for t in full..rows {
                        // SAFETY: as above.
                        let v = unsafe { lut4::gemm16::<1>(table, pk, nblocks, [xs[t]], [&offs[t][..]]) };
                        put(t, &v[0]);
                    }
                }
                tile
            })
            .collect();
        Some(kiln_backends::reference::place_tiles(&tiles, per_task * lut4::ROWS, rows, n, bias))
    }
}

/// The Q8_0 activations of an [`Activations`](kiln_quant::ggml_dot::Activations) (for [`all_of`]).
fn q8_of(a: &kiln_quant::ggml_dot::Activations) -> Option<&kiln_quant::ggml_dot::Q8Row> {
    if let kiln_quant::ggml_dot::Activations::Q8(q) = a { Some(q) } else { None }
}

/// The address ranges of this process's read-only file mappings (`r--p` / `r--s` with a
/// file behind them), from `/proc/self/maps` (Linux); empty where that cannot be read.
fn read_only_file_maps() -> Vec<(usize, usize)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return Vec::new() };
    // `lo-hi perms offset dev inode path`.
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms, _, _, inode, path) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let (lo, hi) = range.split_once('-')?;
            let read_only_file = matches!(perms, "r--p" | "r--s") && inode != "0" && path.starts_with('/');
            read_only_file.then_some((usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?))
        })
        .collect()
}

/// Drops the pages of `bytes` from this process when they lie in one of the read-only
/// file mappings `maps` (re-read from the file if ever touched again); anything else —
/// heap memory, writable mappings — is left alone.
fn release_mapped(maps: &[(usize, usize)], bytes: &[u8]) {
    let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    if !maps.iter().any(|&(lo, hi)| lo <= start && end <= hi) {
        return;
    }
    let page = 4096;
    let (a, b) = (start.div_ceil(page) * page, end / page * page);
    #[cfg(target_os = "linux")]
    if a < b {
        // SAFETY: the whole pages of a read-only file mapping that holds `bytes`; dropping
        // them only makes a later read fault them in again from the file.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (a, b);
}
