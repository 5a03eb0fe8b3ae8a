//! Weights repacked once at session start for the lane kernels (llama.cpp's CPU
//! "repack" buffers do the same): Q4_K matmul weights as groups of eight rows
//! interleaved per super-block ([`crate::vnni::q4_k_pack`]), Q4_0 and IQ4_NL ones as groups
//! of sixteen rows interleaved per block ([`crate::lut4::pack`]), Q8_0, Q5_0, Q4_1 and Q5_1
//! ones likewise ([`crate::q8lanes::pack`]), Q6_K ones as groups of sixteen rows
//! ([`crate::klanes`]), Q3_K ones likewise, so decode reads each weight once with one row per
//! vector lane and no transposes, and prefill loads the lane layout instead of building it.
//! kq2 weights are stored with their codebook lookup done ([`crate::kq2x`]): 3.25 bits per
//! weight in memory instead of 2.25, traded for a decode kernel 40% faster (it was bound
//! by the lookup, not by memory). Only on CPUs with the VNNI kernels.
//!
//! The packing is lossless (values moved, not changed), so results stay the
//! reference interpreter's bit for bit. Once a weight is packed its stored bytes
//! are no longer read by a matmul; where they are pages of a read-only file
//! mapping (a GGUF or a kiln build, mapped by the runtime) they are dropped from
//! this process (`MADV_DONTNEED`: the file and the page cache keep them), so the
//! weights are not resident twice.
//!
//! Matmul weights with no packed form (Q6_K while its lanes are off, Q2_K, Q5_K, ...) that
//! are read from a file mapping are copied as they are onto 2 MiB pages
//! ([`crate::hugebuf`]), and the session reads them there ([`HugeCopies`], the weights it is
//! given): a Q4_K_M file's Q6_K tensors are a third of its bytes, and from the mapping's 4 KiB
//! pages every 4 KiB of the stream is a TLB miss and a prefetcher restart.
//! `KILN_HUGE_COPIES=0` reads them in place.

use std::collections::HashMap;

use kiln_backends::WeightSource;
use kiln_backends::reference::Weight;
use std::sync::Arc;

use kiln_ir::{DType, Op, ParamId, VerifiedModule};
use kiln_quant::ggml_dot::{Q8Row, RowGroup};
use rayon::prelude::*;

use crate::kernels::{Prepared, all_of, kq2_of, q8_of, q8k_of};
use crate::vnni::{self, Q4K_PACKED, Q4K_ROWS};
use crate::{klanes, kq2x, lut4, q8lanes};

/// A packed layout: its dtype, rows per group and packed bytes per block of a group.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// Eight Q4_K rows per group ([`vnni::q4_k_pack`]).
    Q4k,
    /// Sixteen Q4_0 or IQ4_NL rows per group ([`lut4::pack`]).
    Lut4(DType),
    /// Sixteen Q8_0 rows per group ([`q8lanes::pack`]).
    Q8,
    /// Sixteen Q5_0 rows per group ([`q8lanes::pack`]).
    Q5,
    /// Sixteen Q4_1 rows per group ([`q8lanes::pack`]).
    Q41,
    /// Sixteen Q5_1 rows per group ([`q8lanes::pack`]).
    Q51,
    /// Eight kq2 rows per group, the codebook lookup done ([`kq2x::pack`]).
    Kq2,
    /// Sixteen Q6_K rows per group ([`klanes::pack`]).
    Q6k,
    /// Sixteen Q3_K rows per group ([`klanes::pack`]).
    Q3k,
}

impl Layout {
    fn of(dtype: DType) -> Option<Layout> {
        match dtype {
            DType::Q4K => Some(Layout::Q4k),
            DType::Q4_0 | DType::IQ4NL if *lut4::ZMM => Some(Layout::Lut4(dtype)),
            DType::Q8_0 if *lut4::ZMM => Some(Layout::Q8),
            DType::Q5_0 if *lut4::ZMM => Some(Layout::Q5),
            DType::Q4_1 if *lut4::ZMM => Some(Layout::Q41),
            DType::Q5_1 if *lut4::ZMM => Some(Layout::Q51),
            DType::Q6K if *lut4::ZMM && *Q6K_LANES => Some(Layout::Q6k),
            DType::Q3K if *lut4::ZMM => Some(Layout::Q3k),
            DType::KQ2 if *vnni::KQ2_ZMM && is_x86_feature_detected!("bmi2") => Some(Layout::Kq2),
            _ => None,
        }
    }

    fn dtype(self) -> DType {
        match self {
            Layout::Q4k => DType::Q4K,
            Layout::Lut4(d) => d,
            Layout::Q8 => DType::Q8_0,
            Layout::Q5 => DType::Q5_0,
            Layout::Q41 => DType::Q4_1,
            Layout::Q51 => DType::Q5_1,
            Layout::Kq2 => DType::KQ2,
            Layout::Q6k => DType::Q6K,
            Layout::Q3k => DType::Q3K,
        }
    }

    fn rows(self) -> usize {
        match self {
            Layout::Q4k => Q4K_ROWS,
            Layout::Lut4(_) => lut4::ROWS,
            Layout::Q8 | Layout::Q5 | Layout::Q41 | Layout::Q51 => q8lanes::ROWS,
            Layout::Q6k | Layout::Q3k => klanes::ROWS,
            Layout::Kq2 => kq2x::ROWS,
        }
    }

    fn packed_block(self) -> usize {
        match self {
            Layout::Q4k => Q4K_PACKED,
            Layout::Lut4(_) => lut4::PACKED,
            Layout::Q8 => q8lanes::packed(q8lanes::Q8),
            Layout::Q5 => q8lanes::packed(q8lanes::Q5),
            Layout::Q41 => q8lanes::packed(q8lanes::Q41),
            Layout::Q51 => q8lanes::packed(q8lanes::Q51),
            Layout::Kq2 => kq2x::PACKED,
            Layout::Q6k => <klanes::Q6 as klanes::Kind>::PACKED,
            Layout::Q3k => <klanes::Q3 as klanes::Kind>::PACKED,
        }
    }
}

/// Whether Q6_K weights are packed (`KILN_Q6K_LANES=1`): off by default. One thread's Q6_K
/// matvec is 1.3–1.5× faster in lanes, but Qwen2.5-Coder-1.5B's Q4_K_M decode on two threads
/// measured 7% slower with them (27.9 against 30.0 tokens/s), not yet understood.
static Q6K_LANES: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("KILN_Q6K_LANES").is_some_and(|v| v == "1"));

/// One packed weight: `n / rows` groups of rows, each `nblocks` packed blocks.
struct Packed {
    layout: Layout,
    n: usize,
    nblocks: usize,
    /// On 2 MiB pages where the system gives them ([`crate::hugebuf`]).
    data: crate::hugebuf::HugeBuf,
}

/// The session's packed weights, found by the address and length of their stored bytes
/// (what a matmul's [`Weight`] carries).
#[derive(Default)]
pub struct PackedWeights {
    packed: HashMap<(usize, usize), Packed>,
}

/// A session's weights with some parameters read from copies on 2 MiB pages instead of
/// where `inner` keeps them (module docs): every reader — matmuls and the embedding lookup
/// alike — gets the copy.
pub struct HugeCopies {
    inner: Arc<dyn WeightSource>,
    copies: HashMap<ParamId, crate::hugebuf::HugeBuf>,
}

impl WeightSource for HugeCopies {
    fn bytes(&self, p: ParamId) -> &[u8] {
        match self.copies.get(&p) {
            Some(c) => c,
            None => self.inner.bytes(p),
        }
    }
}

/// Whether matmul weights without a packed form are copied onto huge pages
/// (`KILN_HUGE_COPIES=0` turns it off).
static HUGE_COPIES: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("KILN_HUGE_COPIES").is_none_or(|v| v != "0"));

impl PackedWeights {
    /// Packs every Q4_K (and, on CPUs with AVX512BW, Q4_0, IQ4_NL, Q5_0, Q4_1, Q5_1 and Q8_0, and
    /// with VBMI, BITALG, GFNI and BMI2 too, kq2) weight of a `matmul` whose rows come in
    /// whole groups, and copies the other matmul weights read from a file mapping onto huge
    /// pages: the packed weights, and the weights the session is to read (`weights`, or
    /// [`HugeCopies`] of it).
    pub fn build(module: &VerifiedModule, weights: Arc<dyn WeightSource>) -> (PackedWeights, Arc<dyn WeightSource>) {
        let (mut packed, mut copies) = (HashMap::new(), HashMap::new());
        let file_maps = read_only_file_maps();
        // A tied output matrix is also the token embedding table, whose rows the embedding
        // lookup reads from the stored bytes when the matmul reads a packed form: those pages
        // stay mapped (dropped, each prompt's scattered rows would fault back in one page at
        // a time: 105 ms of a 512-token prefill of Qwen2.5-Coder-0.5B, 5% of it, with its
        // 151,936-row Q8_0 table). A copy is read by both, so its pages go.
        let embedded: std::collections::HashSet<_> = module
            .insts
            .iter()
            .filter_map(|i| if let Op::Embed { table, .. } = i.op { Some(table) } else { None })
            .collect();
        for inst in &module.insts {
            let Op::MatMul { w, .. } = inst.op else { continue };
            let ty = &module.param(w).ty;
            let Some(dims) = ty.fixed_dims() else { continue };
            let [n, k] = dims[..] else { continue };
            let (Ok(n), Ok(k)) = (usize::try_from(n), usize::try_from(k)) else { continue };
            let bytes = weights.bytes(w);
            let key = (bytes.as_ptr() as usize, bytes.len());
            if packed.contains_key(&key) || copies.contains_key(&w) {
                continue;
            }
            if let Some(p) = Packed::of(&Weight { bytes, dtype: ty.dtype, n, k }) {
                packed.insert(key, p);
                if embedded.contains(&w) {
                    continue;
                }
            } else if *HUGE_COPIES && bytes.len() >= COPY_MIN && in_maps(&file_maps, bytes) {
                // The row kernels read it as stored, but from a file mapping's 4 KiB pages
                // (Q6_K, a third of a Q4_K_M file's bytes, is not repacked: module docs).
                let mut copy = crate::hugebuf::HugeBuf::zeroed(bytes.len());
                copy.copy_from_slice(bytes);
                copies.insert(w, copy);
            } else {
                continue;
            }
            release_mapped(&file_maps, bytes);
        }
        let weights: Arc<dyn WeightSource> =
            if copies.is_empty() { weights } else { Arc::new(HugeCopies { inner: weights, copies }) };
        (PackedWeights { packed }, weights)
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
        match p.layout {
            Layout::Q4k => {}
            Layout::Kq2 => return p.kq2_matmul(w, xs, bias),
            Layout::Q6k => return p.klanes_matmul::<klanes::Q6>(w, xs, groups, bias),
            Layout::Q3k => return p.klanes_matmul::<klanes::Q3>(w, xs, groups, bias),
            _ => return p.rows16_matmul(w, xs, bias),
        }
        let xs = all_of(xs, q8k_of)?;
        if p.n != w.n || xs.iter().any(|x| x.d.len() < p.nblocks || x.bsums.len() < 16 * p.nblocks) {
            return None;
        }
        // The batch's `gemm` rows (a multiple of four) and its `gemv` rest.
        let gemm = groups.iter().take_while(|g| g.is_gemm()).count();
        Some(p.over_groups(xs.len(), bias, |pk, tile, nb, j0| {
            if gemm > 0 {
                // SAFETY: the backend packs only with `Isa::Avx512Vnni` (AVX2, FMA, F16C,
                // AVX512F/VL/VNNI); `pk` holds `nblocks` packed super-blocks and every
                // token row at least as many (checked above).
                unsafe { vnni::q4_k_gemm_rows(vnni::Q4kSource::Packed(pk), &xs[..gemm], p.nblocks, tile, nb, j0) };
            }
            for (t, x) in xs.iter().enumerate().skip(gemm) {
                // SAFETY: as above.
                let v = unsafe { vnni::q4_k_packed_gemv(pk, p.nblocks, x) };
                tile[t * nb + j0..t * nb + j0 + Q4K_ROWS].copy_from_slice(&v);
            }
        }))
    }
}

impl Packed {
    /// `w` packed, if its layout has a packed form and its rows come in whole groups.
    fn of(w: &Weight<'_>) -> Option<Packed> {
        Self::with(w, Layout::of(w.dtype)?)
    }

    /// `w` packed in `layout` (of its dtype), if its rows come in whole groups.
    fn with(w: &Weight<'_>, layout: Layout) -> Option<Packed> {
        let (n, k, bytes) = (w.n, w.k, w.bytes);
        let (be, bb) = (layout.dtype().block_elems() as usize, layout.dtype().block_bytes() as usize);
        let rows = layout.rows();
        if n == 0 || !n.is_multiple_of(rows) || !k.is_multiple_of(be) || bytes.len() != n * (k / be) * bb {
            return None;
        }
        let nblocks = k / be;
        let rb = nblocks * bb;
        let group = nblocks * layout.packed_block();
        let mut data = crate::hugebuf::HugeBuf::zeroed(n / rows * group);
        data.par_chunks_mut(group).enumerate().for_each(|(g, out)| {
            let row = |r: usize| &bytes[(g * rows + r) * rb..(g * rows + r + 1) * rb];
            match layout {
                Layout::Q4k => vnni::q4_k_pack(std::array::from_fn(row), nblocks, out),
                Layout::Lut4(_) => lut4::pack(std::array::from_fn(row), nblocks, out),
                Layout::Q8 => q8lanes::pack::<{ q8lanes::Q8 }>(std::array::from_fn(row), nblocks, out),
                Layout::Q5 => q8lanes::pack::<{ q8lanes::Q5 }>(std::array::from_fn(row), nblocks, out),
                Layout::Q41 => q8lanes::pack::<{ q8lanes::Q41 }>(std::array::from_fn(row), nblocks, out),
                Layout::Q51 => q8lanes::pack::<{ q8lanes::Q51 }>(std::array::from_fn(row), nblocks, out),
                Layout::Kq2 => kq2x::pack(std::array::from_fn(row), nblocks, out),
                Layout::Q6k => klanes::pack::<klanes::Q6>(std::array::from_fn(row), nblocks, out),
                Layout::Q3k => klanes::pack::<klanes::Q3>(std::array::from_fn(row), nblocks, out),
            }
        });
        Some(Packed { layout, n, nblocks, data })
    }

    /// [`PackedWeights::matmul`] for kq2: per group of eight rows, a batch of
    /// [`crate::kernels::KQ2_PANEL_MIN_TOKENS`] or more token rows through the prefill kernel
    /// (the token rows laid out once, [`vnni::Kq2Panel`]), fewer one by one.
    fn kq2_matmul(&self, w: &Weight<'_>, xs: &[Prepared], bias: Option<&[f32]>) -> Option<Vec<f32>> {
        let xs = all_of(xs, kq2_of)?;
        let nblocks = self.nblocks;
        if self.n != w.n || xs.iter().any(|x| x.d.len() < nblocks || x.q.len() < 128 * nblocks) {
            return None;
        }
        let panel = (xs.len() >= crate::kernels::KQ2_PANEL_MIN_TOKENS).then(|| vnni::Kq2Panel::build(&xs));
        // The decode kernel's tables of the shift bits' part, once per token row.
        let sums: Vec<kq2x::BlockSums> =
            if panel.is_none() { xs.iter().map(|x| kq2x::BlockSums::new(&x.q)).collect() } else { Vec::new() };
        Some(self.over_groups(xs.len(), bias, |pk, tile, nb, j0| {
            // SAFETY: packed only where `KQ2_ZMM` and BMI2 hold (and the backend packs only
            // with `Isa::Avx512Vnni`); `pk` holds `nblocks` packed blocks, every token row
            // (and so the panel) at least as many (checked above).
            unsafe {
                match &panel {
                    Some(panel) => kq2x::gemm(pk, nblocks, panel, tile, nb, j0),
                    None => {
                        for (t, (x, sums)) in xs.iter().zip(&sums).enumerate() {
                            let v = kq2x::gemv(pk, nblocks, &x.q, sums, &x.d);
                            tile[t * nb + j0..t * nb + j0 + kq2x::ROWS].copy_from_slice(&v);
                        }
                    }
                }
            }
        }))
    }

    /// [`PackedWeights::matmul`] for Q6_K and Q3_K (`K`): batches in llama.cpp's tiled order
    /// (eight token rows or more) through [`klanes::gemm_tiled`], eight token rows a call;
    /// smaller ones (decode) through the lane kernel, a token row at a time.
    fn klanes_matmul<K: klanes::Kind>(
        &self,
        w: &Weight<'_>,
        xs: &[Prepared],
        groups: &[RowGroup],
        bias: Option<&[f32]>,
    ) -> Option<Vec<f32>> {
        let xs = all_of(xs, q8k_of)?;
        let nblocks = self.nblocks;
        if self.n != w.n
            || xs.iter().any(|x| x.d.len() < nblocks || x.bsums.len() < 16 * nblocks || x.q.len() < 256 * nblocks)
        {
            return None;
        }
        let tiled = groups.first().is_some_and(|g| g.is_tiled());
        let offs: Vec<Vec<i32>> = xs.iter().map(|x| K::offsets(x, nblocks)).collect();
        let rows = xs.len();
        Some(self.over_groups(rows, bias, |pk, tile, nb, j0| {
            let mut put = |t: usize, v: &[f32; ROWS16]| tile[t * nb + j0..t * nb + j0 + ROWS16].copy_from_slice(v);
            // SAFETY: packed only where `lut4::ZMM` holds; `pk` holds `nblocks` packed
            // super-blocks, every token row and its offsets at least as many (checked above).
            unsafe {
                if !tiled {
                    for t in 0..rows {
                        put(t, &klanes::gemv::<K>(pk, nblocks, xs[t], &offs[t]));
                    }
                    return;
                }
                const T: usize = klanes::TILE_TOKENS;
                let full = rows / T * T;
                for t0 in (0..full).step_by(T) {
                    let v = klanes::gemm_tiled::<K, T>(
                        pk,
                        nblocks,
                        std::array::from_fn(|u| xs[t0 + u]),
                        std::array::from_fn(|u| &offs[t0 + u][..]),
                    );
                    v.iter().enumerate().for_each(|(u, v)| put(t0 + u, v));
                }
                for t in full..rows {
                    put(t, &klanes::gemm_tiled::<K, 1>(pk, nblocks, [xs[t]], [&offs[t][..]])[0]);
                }
            }
        }))
    }

    /// [`PackedWeights::matmul`] for the sixteen-row layouts (Q4_0 and IQ4_NL, Q8_0, Q5_0, Q4_1,
    /// Q5_1): per group of sixteen rows, the token rows a tile at a time (`lut4::TOKENS` or
    /// `q8lanes::TOKENS`), then the rest one by one.
    fn rows16_matmul(&self, w: &Weight<'_>, xs: &[Prepared], bias: Option<&[f32]>) -> Option<Vec<f32>> {
        let xs = all_of(xs, q8_of)?;
        if self.n != w.n || xs.iter().any(|x| x.scales.len() < self.nblocks || x.q.len() < 32 * self.nblocks) {
            return None;
        }
        Some(match self.layout {
            Layout::Q8 => self.lanes_matmul::<{ q8lanes::Q8 }>(&xs, bias),
            Layout::Q5 => self.lanes_matmul::<{ q8lanes::Q5 }>(&xs, bias),
            Layout::Q41 => self.lanes_matmul::<{ q8lanes::Q41 }>(&xs, bias),
            Layout::Q51 => self.lanes_matmul::<{ q8lanes::Q51 }>(&xs, bias),
            Layout::Lut4(dtype) => self.lut4_matmul(lut4::table_of(dtype), &xs, bias),
            Layout::Q4k | Layout::Kq2 | Layout::Q6k | Layout::Q3k => {
                unreachable!("Q4_K, Q6_K, Q3_K and kq2 have their own matmuls")
            }
        })
    }

    /// [`Self::rows16_matmul`] for `q8lanes` layout `K` (token rows checked there).
    fn lanes_matmul<const K: u8>(&self, xs: &[&Q8Row], bias: Option<&[f32]>) -> Vec<f32> {
        let (rows, nblocks) = (xs.len(), self.nblocks);
        let offs: Vec<Vec<i32>> = xs.iter().map(|x| q8lanes::offsets::<K>(x, nblocks)).collect();
        let full = rows / q8lanes::TOKENS * q8lanes::TOKENS;
        self.over_groups(rows, bias, |pk, tile, nb, j0| {
            let mut put = |t: usize, v: &[f32; ROWS16]| tile[t * nb + j0..t * nb + j0 + ROWS16].copy_from_slice(v);
            // SAFETY: packed only where `lut4::ZMM` holds; `pk` holds `nblocks` packed blocks and
            // every token row and offset list as many (checked by the caller).
            unsafe {
                for t0 in (0..full).step_by(q8lanes::TOKENS) {
                    let x = std::array::from_fn(|u| xs[t0 + u]);
                    let o = std::array::from_fn(|u| &offs[t0 + u][..]);
                    let v = q8lanes::gemm16::<K, { q8lanes::TOKENS }>(pk, nblocks, x, o);
                    v.iter().enumerate().for_each(|(u, v)| put(t0 + u, v));
                }
                for t0 in full..rows {
                    put(t0, &q8lanes::gemm16::<K, 1>(pk, nblocks, [xs[t0]], [&offs[t0][..]])[0]);
                }
            }
        })
    }

    /// [`Self::rows16_matmul`] for Q4_0 and IQ4_NL (`table`; token rows checked there).
    fn lut4_matmul(&self, table: &[i8; 16], xs: &[&Q8Row], bias: Option<&[f32]>) -> Vec<f32> {
        let (rows, nblocks) = (xs.len(), self.nblocks);
        let offs: Vec<Vec<i32>> = xs.iter().map(|x| lut4::offsets(x, nblocks)).collect();
        let full = rows / lut4::TOKENS * lut4::TOKENS;
        self.over_groups(rows, bias, |pk, tile, nb, j0| {
            let mut put = |t: usize, v: &[f32; ROWS16]| tile[t * nb + j0..t * nb + j0 + ROWS16].copy_from_slice(v);
            // SAFETY: as in `lanes_matmul`.
            unsafe {
                for t0 in (0..full).step_by(lut4::TOKENS) {
                    let x = std::array::from_fn(|u| xs[t0 + u]);
                    let o = std::array::from_fn(|u| &offs[t0 + u][..]);
                    let v = lut4::gemm16::<{ lut4::TOKENS }>(table, pk, nblocks, x, o);
                    v.iter().enumerate().for_each(|(u, v)| put(t0 + u, v));
                }
                for t0 in full..rows {
                    put(t0, &lut4::gemm16::<1>(table, pk, nblocks, [xs[t0]], [&offs[t0][..]])[0]);
                }
            }
        })
    }

    /// `x · Wᵀ (+ bias)` for `rows` token rows, the groups of rows split into enough tasks to
    /// balance the threads (each a run of groups): `group(pk, tile, nb, j0)` writes one packed
    /// group's outputs into its task's tile (`rows` × `nb` values) from column `j0`.
    fn over_groups(
        &self,
        rows: usize,
        bias: Option<&[f32]>,
        group: impl Fn(&[u8], &mut [f32], usize, usize) + Sync,
    ) -> Vec<f32> {
        let per_group = self.layout.rows();
        let bytes = self.nblocks * self.layout.packed_block();
        let ngroups = self.n / per_group;
        let threads = rayon::current_num_threads().max(1);
        let per_task = ngroups.div_ceil(4 * threads).max(1);
        let tiles: Vec<Vec<f32>> = (0..ngroups.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let g0 = task * per_task;
                let g1 = (g0 + per_task).min(ngroups);
                let nb = (g1 - g0) * per_group;
                let mut tile = vec![0f32; rows * nb];
                for g in g0..g1 {
                    group(&self.data[g * bytes..(g + 1) * bytes], &mut tile, nb, (g - g0) * per_group);
                }
                tile
            })
            .collect();
        kiln_backends::reference::place_tiles(&tiles, per_task * per_group, rows, self.n, bias)
    }
}

/// Rows per group of the sixteen-row layouts (one per 32-bit lane of a 512-bit vector).
const ROWS16: usize = 16;
const _: () = assert!(lut4::ROWS == ROWS16 && q8lanes::ROWS == ROWS16);

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

/// The smallest weight copied onto huge pages: one huge page's worth.
const COPY_MIN: usize = 2 << 20;

/// Whether `bytes` lie in one of the mappings `maps`.
fn in_maps(maps: &[(usize, usize)], bytes: &[u8]) -> bool {
    let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    maps.iter().any(|&(lo, hi)| lo <= start && end <= hi)
}

/// Drops the pages of `bytes` from this process when they lie in one of the read-only
/// file mappings `maps` (re-read from the file if ever touched again); anything else —
/// heap memory, writable mappings — is left alone.
fn release_mapped(maps: &[(usize, usize)], bytes: &[u8]) {
    if !in_maps(maps, bytes) {
        return;
    }
    let start = bytes.as_ptr() as usize;
    let end = start + bytes.len();
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

#[cfg(test)]
mod tests {
    use kiln_backends::reference::Kernels;

    use super::*;
    use crate::{CpuKernels, Isa};

    /// Q6_K and Q3_K matrices through the packed kernels (decode: the lane kernel; batches
    /// of eight token rows or more: the tiled one) equal them through the row kernels, bit
    /// for bit, with and without a bias.
    #[test]
    fn packed_k_quant_matmuls_equal_the_row_kernels_bit_for_bit() {
        if !*lut4::ZMM {
            return;
        }
        let (n, k) = (48usize, 512usize);
        for (dtype, d_at) in [(DType::Q6K, 208), (DType::Q3K, 108)] {
            let bb = dtype.block_bytes() as usize;
            let mut r = crate::x86::tests::rng(0x2545);
            let mut bytes: Vec<u8> = (0..n * (k / 256) * bb).map(|_| r() as u8).collect();
            for (i, blk) in bytes.chunks_mut(bb).enumerate() {
                let d = half::f16::from_f32(0.002 + 0.0003 * (i % 5) as f32);
                blk[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
            }
            let w = Weight { bytes: &bytes, dtype, n, k };
            let rows = CpuKernels::new(Isa::Avx512Vnni);
            let mut packed = rows.clone();
            let layout = if dtype == DType::Q6K { Layout::Q6k } else { Layout::Q3k };
            let p = Packed::with(&w, layout).unwrap();
            let key = (w.bytes.as_ptr() as usize, w.bytes.len());
            packed.packed = Some(std::sync::Arc::new(PackedWeights { packed: [(key, p)].into_iter().collect() }));
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / 7.0).collect();
            for tokens in [1usize, 2, 3, 4, 7, 40] {
                let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
                for b in [None, Some(&bias[..])] {
                    let want = rows.matmul(&x, tokens, w, b, 0, tokens).unwrap();
                    let got = packed.matmul(&x, tokens, w, b, 0, tokens).unwrap();
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{dtype:?}, {tokens} token rows"
                    );
                }
            }
        }
    }

    /// [`HugeCopies`] gives its copies' bytes for the copied parameters (the stored ones
    /// poisoned after copying) and the stored bytes for the others.
    #[test]
    fn huge_copies_are_what_the_session_reads() {
        struct Stored(Vec<Vec<u8>>);
        impl WeightSource for Stored {
            fn bytes(&self, p: ParamId) -> &[u8] {
                &self.0[p.index()]
            }
        }
        let want: Vec<u8> = (0..(3usize << 20)).map(|i| (i * 31 % 251) as u8).collect();
        let mut copy = crate::hugebuf::HugeBuf::zeroed(want.len());
        copy.copy_from_slice(&want);
        let inner = Arc::new(Stored(vec![vec![0xff; want.len()], vec![7u8; 100]]));
        let w = HugeCopies { inner, copies: [(ParamId(0), copy)].into_iter().collect() };
        assert!(w.bytes(ParamId(0)) == &want[..]);
        assert_eq!(w.bytes(ParamId(1)), &[7u8; 100][..]);
    }
}
