//! A reference session: the weights, the KV cache, and the op-by-op interpreter loop.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_ir::{AttentionAttrs, Op, ParamId, ValueId, VerifiedModule};

use super::attention::{AttnNumerics, KvCache, attend};
use super::kernels;
use super::matmul::{Weight, matmul, matmul_ggml};
use super::plan::{Rows, Schedule, executes};
use super::sparse::{self, CompressedCache, Stacked, StreamInit};
use crate::quant::{self, QuantError};
use crate::{BackendError, Logits, Numerics, Session, SessionOptions, WeightSource};

const NAME: &str = "reference";

/// The heavy kernels of a session: matmul and attention. The reference
/// interpreter's own ([`ReferenceKernels`]) are the definition; the compiled
/// CPU backend plugs its SIMD kernels in here and reuses the rest of the
/// interpreter (schedule, KV cache, row-wise ops).
pub trait Kernels: Send + Sync {
    /// `x · Wᵀ (+ bias)` for `x` holding `rows` rows of `w.k` values, which are
    /// rows `first..total` of a call over `total` tokens; returns `[rows, w.n]`.
    fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        w: Weight<'_>,
        bias: Option<&[f32]>,
        first: usize,
        total: usize,
    ) -> Result<Vec<f32>, QuantError>;

    /// Independent matmuls at once, each as [`Self::matmul`] with its [`MatJob`]'s arguments;
    /// results in order. The reference runs them in turn; a backend may run them in one
    /// parallel region (a layer's projections of one input, a MoE layer's experts), so that
    /// threads do not wait at each small matmul's end. Each result must equal its
    /// [`Self::matmul`].
    fn matmuls(&self, jobs: &[MatJob<'_>]) -> Result<Vec<Vec<f32>>, QuantError> {
        jobs.iter().map(|j| j.run(self)).collect()
    }

    /// Attention of query rows `q` (row `t` at position `first_pos + t`) over
    /// `cache`, which already holds every position up to the last query's, in the numerics
    /// `mode`.
    fn attend(
        &self,
        q: &[f32],
        first_pos: usize,
        cache: &KvCache,
        attrs: &AttentionAttrs,
        mode: AttnNumerics,
    ) -> Vec<f32> {
        attend(q, first_pos, cache, attrs, mode)
    }

    /// Compressed (DeepSeek-V4) attention of query rows `q` (row `t` at position
    /// `first_pos + t`, not rotated) over `cache`, which already holds this call's rows;
    /// `idx_q`, `idx_w`: the indexer's query projections and head weights per row.
    fn compressed_attend(
        &self,
        cache: &CompressedCache,
        q: &[f32],
        first_pos: usize,
        idx_q: Option<&[f32]>,
        idx_w: Option<&[f32]>,
        sink: &[f32],
    ) -> Vec<f32> {
        cache.attend(q, first_pos, idx_q, idx_w, sink)
    }
}

/// One matmul of a [`Kernels::matmuls`] batch: the arguments of [`Kernels::matmul`].
#[derive(Clone, Copy)]
pub struct MatJob<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub w: Weight<'a>,
    pub bias: Option<&'a [f32]>,
    pub first: usize,
    pub total: usize,
}

impl<'a> MatJob<'a> {
    /// `rows` rows of `x` times `w`, a call of its own (no bias).
    pub fn whole(x: &'a [f32], rows: usize, w: Weight<'a>) -> MatJob<'a> {
        MatJob { x, rows, w, bias: None, first: 0, total: rows }
    }

    /// This job on `kernel` alone.
    pub fn run(&self, kernel: &(impl Kernels + ?Sized)) -> Result<Vec<f32>, QuantError> {
        kernel.matmul(self.x, self.rows, self.w, self.bias, self.first, self.total)
    }
}

/// The reference kernels in the given numerics.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceKernels(pub Numerics);

impl Kernels for ReferenceKernels {
    fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        w: Weight<'_>,
        bias: Option<&[f32]>,
        first: usize,
        total: usize,
    ) -> Result<Vec<f32>, QuantError> {
        if self.0 == Numerics::Ggml && quant::ggml_dot::supports(w.dtype) {
            Ok(matmul_ggml(x, rows, w, bias, first, total))
        } else if self.0 == Numerics::Ggml && w.dtype != kiln_ir::DType::F32 {
            let mut xr = x.to_vec();
            xr.chunks_mut(w.k.max(1)).for_each(|row| crate::quant::act::round_for_dot(w.dtype, row));
            matmul(&xr, rows, w, bias)
        } else {
            matmul(x, rows, w, bias)
        }
    }
}

fn internal(msg: impl Into<String>) -> BackendError {
    BackendError::Internal { backend: NAME, msg: msg.into() }
}

fn quant_err(at: usize, e: QuantError) -> BackendError {
    internal(format!("%{at}: {e}"))
}

/// A value during one forward call: the token ids, or rows `first..T` of an
/// f32 `[T, cols]` tensor (`first` is 0, or `T − 1` when only the last row
/// was needed; see `plan`).
#[derive(Debug)]
enum Value {
    Ids(Vec<u32>),
    Act { data: Vec<f32>, cols: usize, first: usize },
}

/// A session of the reference interpreter. Made by
/// [`ReferenceBackend::prepare`](super::ReferenceBackend).
pub struct ReferenceSession {
    module: Arc<VerifiedModule>,
    weights: Arc<dyn WeightSource>,
    pool: Arc<rayon::ThreadPool>,
    max_context: usize,
    pos: usize,
    /// With ring slots (windowed attention): the most tokens one pass takes.
    ring_chunk: Option<usize>,
    rollback: crate::ring::RollbackGuard,
    vocab: usize,
    /// Rows of the smallest embedding table: token ids must be below it.
    embed_rows: Option<usize>,
    /// f32 vectors (norm weights and biases), decoded once.
    vectors: HashMap<ParamId, Vec<f32>>,
    caches: HashMap<u32, KvCache>,
    /// Compressed-attention slots.
    compressed: HashMap<u32, CompressedCache>,
    /// Schedules for [`Logits::All`] and [`Logits::Last`].
    schedule_all: Arc<Schedule>,
    schedule_last: Arc<Schedule>,
    numerics: Numerics,
    kernel: Arc<dyn Kernels>,
    /// Per-weight input statistics, when recording (calibration).
    stats: Option<HashMap<ParamId, ChannelStats>>,
    /// Run-time strengths of steering ops, by steering name.
    steer: std::collections::BTreeMap<String, f32>,
    /// Values to copy out of each forward call, and what was copied.
    capture: Option<(Vec<ValueId>, HashMap<ValueId, Captured>)>,
    /// Forward calls run so far (compressed slots begin each call's update once).
    calls: u64,
    /// `KILN_PROFILE=1`: wall time and runs per op kind, printed when the session ends.
    profile: Option<Profile>,
}

/// Wall time per op kind (matmul batches by their weights' layouts and shapes), for
/// `KILN_PROFILE=1`: where a forward call's time goes, without a profiler.
#[derive(Default)]
struct Profile(HashMap<String, (std::time::Duration, u64)>);

impl Profile {
    fn add(&mut self, label: impl FnOnce() -> String, t: std::time::Duration) {
        let e = self.0.entry(label()).or_default();
        e.0 += t;
        e.1 += 1;
    }
}

impl Drop for ReferenceSession {
    fn drop(&mut self) {
        let Some(p) = self.profile.take() else { return };
        let total: f64 = p.0.values().map(|(t, _)| t.as_secs_f64()).sum();
        let mut rows: Vec<_> = p.0.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1.0));
        eprintln!("KILN_PROFILE: {:.3} s in ops over {} forward calls", total, self.calls);
        for (label, (t, n)) in rows {
            eprintln!(
                "{:>6.1}% {:>10.3} ms {:>8} runs {:>9.1} us/run  {label}",
                100.0 * t.as_secs_f64() / total.max(1e-12),
                t.as_secs_f64() * 1e3,
                n,
                t.as_secs_f64() * 1e6 / n.max(1) as f64
            );
        }
    }
}

/// A value copied out of a forward call ([`ReferenceSession::capture`]): rows
/// `first..` of the call's tokens, `cols` wide.
#[derive(Clone, Debug, PartialEq)]
pub struct Captured {
    pub data: Vec<f32>,
    pub cols: usize,
    pub first: usize,
}

/// Statistics of the activations that entered one matmul weight: per input
/// channel `Σ x²` over every row seen, and the number of rows (llama.cpp's
/// importance matrix, `imatrix`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelStats {
    pub sum_sq: Vec<f64>,
    pub rows: u64,
}

impl std::fmt::Debug for ReferenceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceSession")
            .field("module", &self.module.name)
            .field("pos", &self.pos)
            .field("max_context", &self.max_context)
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

/// Every row of this call of f32 operand `v` of instruction `i` (what a cache append needs).
fn whole_rows(values: &[Option<Value>], v: ValueId, t_len: usize, i: usize) -> Result<&[f32], BackendError> {
    match values.get(v.index()) {
        Some(Some(Value::Act { data, first: 0, cols })) if data.len() == t_len * cols => Ok(data.as_slice()),
        _ => Err(internal(format!("%{i}: operand {v} is not available for every row"))),
    }
}

/// The fixed dimensions of parameter `p`, as `usize`.
fn param_dims(m: &VerifiedModule, p: ParamId) -> Result<Vec<usize>, BackendError> {
    let param = m.params.get(p.index()).ok_or_else(|| internal(format!("parameter #{} is not declared", p.0)))?;
    param
        .ty
        .fixed_dims()
        .and_then(|d| d.into_iter().map(|n| usize::try_from(n).ok()).collect())
        .ok_or_else(|| internal(format!("parameter @{} has no usable fixed shape", param.name)))
}

impl ReferenceSession {
    /// Starts recording, for every matmul weight, the statistics of the
    /// activations it is applied to ([`ChannelStats`]). Rows count only when
    /// they are computed: run with [`Logits::All`] to see every token.
    pub fn record_channel_stats(&mut self) {
        self.stats.get_or_insert_with(HashMap::new);
    }

    /// The statistics recorded so far (and recording goes on from zero).
    pub fn take_channel_stats(&mut self) -> HashMap<ParamId, ChannelStats> {
        self.stats.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Copies `values` out of every later forward call (each call's copies
    /// replace the last's; read them with [`ReferenceSession::take_captured`]).
    /// Only computed rows are copied: run with [`Logits::All`] to see every token.
    pub fn capture(&mut self, values: &[ValueId]) {
        self.capture = Some((values.to_vec(), HashMap::new()));
    }

    /// Bytes the KV cache holds now: every attention slot's rows, and every compressed
    /// slot's raw window, compressed rows and open compressor windows.
    pub fn kv_cache_bytes(&self) -> usize {
        self.caches.values().map(KvCache::bytes).sum::<usize>()
            + self.compressed.values().map(CompressedCache::bytes).sum::<usize>()
    }

    /// A compressed-attention slot, to inspect its rows.
    pub fn compressed_cache(&self, slot: u32) -> Option<&CompressedCache> {
        self.compressed.get(&slot)
    }

    /// The values captured by the last forward call.
    pub fn take_captured(&mut self) -> HashMap<ValueId, Captured> {
        self.capture.as_mut().map(|(_, c)| std::mem::take(c)).unwrap_or_default()
    }

    pub(crate) fn new(
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Self, BackendError> {
        Self::with_kernel(module, weights, options, Arc::new(ReferenceKernels(options.numerics)))
    }

    /// A session of this interpreter whose matmuls and attention `kernel` computes (in
    /// `options.numerics` for everything else).
    pub fn with_kernel(
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
        kernel: Arc<dyn Kernels>,
    ) -> Result<Self, BackendError> {
        crate::check_weight_sizes(&module, weights.as_ref())?;
        crate::check_steer(&module, &options.steer)?;
        let out = module.output.ok_or_else(|| internal("module has no output"))?;
        let vocab = module
            .insts
            .get(out.index())
            .and_then(|i| i.ty.last_fixed())
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| internal("output has no fixed vocabulary dimension"))?;

        let mut embed_rows: Option<usize> = None;
        let mut vectors = HashMap::new();
        let mut caches = HashMap::new();
        // One pass takes any number of tokens, unless windowed slots are kept as rings.
        let rings = crate::ring::plan(&module, options.max_context, usize::MAX);
        for inst in &module.insts {
            let vector_params: Vec<ParamId> = match &inst.op {
                Op::Embed { table, .. } => {
                    let rows = param_dims(&module, *table)?.first().copied().unwrap_or(0);
                    embed_rows = Some(embed_rows.map_or(rows, |r| r.min(rows)));
                    vec![]
                }
                Op::RmsNorm { weight, .. } => weight.iter().copied().collect(),
                Op::LayerNorm { weight, bias, .. } => weight.iter().chain(bias.iter()).copied().collect(),
                Op::MatMul { bias, .. } => bias.iter().copied().collect(),
                Op::Steer { dir, .. } => vec![*dir],
                Op::HcCoeffs { base, scale, .. } => vec![*base, *scale],
                Op::MoeRoute { bias, table, .. } => {
                    // Token ids index the hash table too: they must be below its rows.
                    if let Some(t) = table {
                        let rows = param_dims(&module, *t)?.first().copied().unwrap_or(0);
                        embed_rows = Some(embed_rows.map_or(rows, |r| r.min(rows)));
                    }
                    bias.iter().chain(table.iter()).copied().collect()
                }
                Op::CompressedAttention { .. } | Op::Compress { .. } | Op::SparseAttention { .. } => inst.op.params(),
                Op::Attention { k: Some(_), attrs, .. } => {
                    let width = usize::try_from(attrs.kv_heads * attrs.head_dim)
                        .map_err(|_| internal("attention width overflows"))?;
                    let mut cache = KvCache::with_dtype(width, options.max_context, attrs.kv_dtype);
                    if let Some(&(rows, sink)) = rings.slots.get(&attrs.cache) {
                        cache = cache.with_ring(rows, sink);
                    }
                    caches.insert(attrs.cache, cache);
                    vec![]
                }
                _ => vec![],
            };
            for p in vector_params {
                if vectors.contains_key(&p) {
                    continue;
                }
                let n = param_dims(&module, p)?.iter().product::<usize>();
                let mut v = vec![0.0f32; n];
                quant::dequantize_row(module.param(p).ty.dtype, weights.bytes(p), &mut v)
                    .map_err(|e| BackendError::BadInput(format!("@{}: {e}", module.param(p).name)))?;
                vectors.insert(p, v);
            }
        }
        let mut compressed = HashMap::new();
        // One slot per compressed attention, fused or not (an unfused group's slot is the
        // one its fused op would own).
        let fused: Vec<Op> =
            kiln_ir::analysis::sparse_groups(&module).iter().filter_map(|g| g.fused(&module)).collect();
        for op in module.insts.iter().map(|i| &i.op).chain(&fused) {
            if let Op::CompressedAttention { comp, indexer, attrs, .. } = op {
                let init = |c: &kiln_ir::CompressorOperands| -> Result<StreamInit, BackendError> {
                    let width = module.value_type(c.kv).last_fixed().unwrap_or(0) as usize;
                    let get = |p: ParamId| {
                        vectors.get(&p).cloned().ok_or_else(|| internal("compressor parameter not decoded"))
                    };
                    Ok(StreamInit { ape: get(c.ape)?, norm: get(c.norm)?, width })
                };
                let c = comp.as_ref().map(init).transpose()?;
                let ix = indexer.as_ref().map(|ix| init(&ix.keys)).transpose()?;
                compressed.insert(attrs.cache, CompressedCache::new(attrs, c, ix));
            }
        }
        for inst in &module.insts {
            if let Op::MoeRoute { logits, table: Some(t), .. } = &inst.op {
                let experts = module.value_type(*logits).last_fixed().unwrap_or(0) as f32;
                let table = vectors.get(t).ok_or_else(|| internal("routing table not decoded"))?;
                if let Some(bad) = table.iter().find(|v| !(v.fract() == 0.0 && **v >= 0.0 && **v < experts)) {
                    return Err(BackendError::BadInput(format!(
                        "routing table @{} holds {bad}, which is not an expert number below {experts}",
                        module.param(*t).name
                    )));
                }
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("kiln-ref-{i}"))
            .build()
            .map_err(|e| internal(format!("cannot start worker threads: {e}")))?;
        let schedule_all = Arc::new(Schedule::new(&module, Logits::All));
        let schedule_last = Arc::new(Schedule::new(&module, Logits::Last));
        Ok(ReferenceSession {
            module,
            weights,
            pool: Arc::new(pool),
            max_context: options.max_context,
            pos: 0,
            ring_chunk: (!rings.slots.is_empty()).then_some(rings.chunk),
            rollback: rings.guard(),
            vocab,
            embed_rows,
            vectors,
            caches,
            compressed,
            schedule_all,
            schedule_last,
            numerics: options.numerics,
            kernel,
            stats: None,
            steer: options.steer.clone(),
            capture: None,
            calls: 0,
            profile: std::env::var("KILN_PROFILE").is_ok_and(|v| v == "1").then(Profile::default),
        })
    }

    /// Compressed slot `slot` for instruction `i`, checked to hold the positions before this call.
    fn compressed_slot(&mut self, i: usize, slot: u32, pos: usize) -> Result<&mut CompressedCache, BackendError> {
        let cache = self
            .compressed
            .get_mut(&slot)
            .ok_or_else(|| internal(format!("%{i}: compressed slot {slot} was not made")))?;
        if cache.len() != pos {
            return Err(internal(format!(
                "%{i}: compressed slot {slot} holds {} positions, expected {pos}",
                cache.len()
            )));
        }
        Ok(cache)
    }

    fn vector(&self, p: ParamId) -> Result<&[f32], BackendError> {
        self.vectors.get(&p).map(Vec::as_slice).ok_or_else(|| internal(format!("parameter #{} not decoded", p.0)))
    }

    /// Checks a forward call's input before anything changes.
    fn check_input(&self, tokens: &[u32]) -> Result<(), BackendError> {
        self.rollback.check()?;
        crate::check_forward_input(tokens, self.pos, self.max_context, self.embed_rows)
    }

    /// Runs the graph for `tokens` at positions `pos..pos+T`, returning the
    /// output value. Appends to the KV caches; the caller rolls them back on error.
    fn run(&mut self, tokens: &[u32], logits: Logits) -> Result<Value, BackendError> {
        let module = Arc::clone(&self.module);
        let sched = Arc::clone(match logits {
            Logits::All => &self.schedule_all,
            Logits::Last => &self.schedule_last,
        });
        if let Some((_, got)) = self.capture.as_mut() {
            got.clear();
        }
        self.calls += 1;
        let mut values: Vec<Option<Value>> = Vec::with_capacity(module.insts.len());
        values.resize_with(module.insts.len(), || None);

        let mut i = 0;
        while i < module.insts.len() {
            let rows = sched.rows[i];
            if !executes(&module.insts[i].op, rows) {
                i += 1;
                continue;
            }
            // Matmuls run as batches: consecutive matmuls of one input (a layer's q/k/v,
            // gate/up) together.
            let end = self.siblings(&sched, i);
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            let results = if matches!(module.insts[i].op, Op::MatMul { .. }) {
                self.exec_matmuls(i..end, &values, tokens, rows, sched.gathered[i])?
            } else {
                vec![self.exec(i, &module.insts[i].op, &values, tokens, rows)?]
            };
            if let (Some(p), Some(t0)) = (self.profile.as_mut(), t0) {
                p.add(|| op_label(&module, i..end, tokens.len()), t0.elapsed());
            }
            for (j, result) in (i..end).zip(results) {
                if let (Some((want, got)), Some(Value::Act { data, cols, first })) = (self.capture.as_mut(), &result)
                    && want.contains(&ValueId(j as u32))
                {
                    got.insert(ValueId(j as u32), Captured { data: data.clone(), cols: *cols, first: *first });
                }
                values[j] = result;
                for v in &sched.free_after[j] {
                    values[v.index()] = None;
                }
            }
            i = end;
        }
        let out = module.output.ok_or_else(|| internal("module has no output"))?;
        values.get_mut(out.index()).and_then(Option::take).ok_or_else(|| internal("the output value was not computed"))
    }

    /// The end of the run of matmuls from instruction `i` that read `i`'s input with the same
    /// rows (`i + 1` when `i` is not a matmul or has no such sibling).
    fn siblings(&self, sched: &super::plan::Schedule, i: usize) -> usize {
        let insts = &self.module.insts;
        let Op::MatMul { x, .. } = insts[i].op else { return i + 1 };
        let mut end = i + 1;
        while end < insts.len()
            && matches!(insts[end].op, Op::MatMul { x: x2, .. } if x2 == x)
            && sched.rows[end] == sched.rows[i]
            && sched.gathered[end] == sched.gathered[i]
        {
            end += 1;
        }
        end
    }

    /// The matmuls `range` (siblings: one input, one schedule; or one matmul) as one
    /// [`Kernels::matmuls`] batch, collecting each one's input statistics while calibrating.
    /// `gathered`: llama.cpp runs them on the gathered output rows alone (see
    /// [`super::plan::Schedule::gathered`]).
    fn exec_matmuls(
        &mut self,
        range: std::ops::Range<usize>,
        values: &[Option<Value>],
        tokens: &[u32],
        rows: Rows,
        gathered: bool,
    ) -> Result<Vec<Option<Value>>, BackendError> {
        let t_len = tokens.len();
        let first = if rows == Rows::All { 0 } else { t_len.saturating_sub(1) };
        let n_rows = t_len - first;
        // The rows of llama.cpp's matmul: the call's, or only these once gathered.
        let (at, batch) = if gathered { (0, n_rows) } else { (first, t_len) };
        let module = Arc::clone(&self.module);
        let matmul = |i: usize| match module.insts[i].op {
            Op::MatMul { x, w, bias } => Ok((act_rows(values, x, first, n_rows, i)?, w, bias)),
            _ => Err(internal(format!("%{i}: not a matmul"))),
        };
        if let Some(stats) = self.stats.as_mut() {
            for i in range.clone() {
                let ((x, k), w, _) = matmul(i)?;
                let st = stats.entry(w).or_insert_with(|| ChannelStats { sum_sq: vec![0.0; k], rows: 0 });
                for row in x.chunks(k.max(1)) {
                    for (acc, &v) in st.sum_sq.iter_mut().zip(row) {
                        *acc += f64::from(v) * f64::from(v);
                    }
                    st.rows += 1;
                }
            }
        }
        let mut jobs = Vec::with_capacity(range.len());
        let mut widths = Vec::with_capacity(range.len());
        for i in range.clone() {
            let ((x, k), w, bias) = matmul(i)?;
            let n = matmul_rows(&module, i, w, k)?;
            let weight = Weight { bytes: self.weights.bytes(w), dtype: module.param(w).ty.dtype, n, k };
            let bias = bias.map(|p| self.vector(p)).transpose()?;
            jobs.push(MatJob { x, rows: n_rows, w: weight, bias, first: at, total: batch });
            widths.push(n);
        }
        let ys = self.kernel.matmuls(&jobs).map_err(|e| quant_err(range.start, e))?;
        Ok(ys.into_iter().zip(widths).map(|(data, cols)| Some(Value::Act { data, cols, first })).collect())
    }

    /// Executes instruction `i` for `rows` of this call's tokens; `None` when
    /// it only had a side effect (an attention op whose result is not needed
    /// still appends to its KV-cache slot). Matmuls run through [`Self::exec_matmuls`].
    fn exec(
        &mut self,
        i: usize,
        op: &Op,
        values: &[Option<Value>],
        tokens: &[u32],
        rows: Rows,
    ) -> Result<Option<Value>, BackendError> {
        let t_len = tokens.len();
        let first = if rows == Rows::All { 0 } else { t_len.saturating_sub(1) };
        let n_rows = t_len - first;
        // Rows `first..` of an f32 operand, and its row length.
        let act = |v: ValueId| act_rows(values, v, first, n_rows, i);
        let out = |data: Vec<f32>, cols: usize| Ok(Some(Value::Act { data, cols, first }));
        match op {
            Op::Tokens => Ok(Some(Value::Ids(tokens.to_vec()))),
            Op::Embed { table, ids } => {
                let ids = match values.get(ids.index()) {
                    Some(Some(Value::Ids(ids))) => ids.get(first..).unwrap_or(&[]),
                    _ => return Err(internal(format!("%{i}: token ids are not available"))),
                };
                let dims = param_dims(&self.module, *table)?;
                let (vrows, d) = match dims.as_slice() {
                    [v, d] => (*v, *d),
                    _ => return Err(internal(format!("%{i}: embedding table is not 2-D"))),
                };
                let dtype = self.module.param(*table).ty.dtype;
                let bytes = self.weights.bytes(*table);
                let rb = bytes.len() / vrows.max(1);
                let mut data = vec![0.0f32; ids.len() * d];
                for (&id, dst) in ids.iter().zip(data.chunks_mut(d.max(1))) {
                    let id = id as usize;
                    let src = bytes.get(id * rb..(id + 1) * rb).ok_or_else(|| {
                        BackendError::BadInput(format!("token id {id} is outside the embedding table"))
                    })?;
                    quant::dequantize_row(dtype, src, dst).map_err(|e| quant_err(i, e))?;
                }
                out(data, d)
            }
            Op::RmsNorm { x, weight, eps, group } => {
                let (x, cols) = act(*x)?;
                let w = weight.map(|p| self.vector(p)).transpose()?;
                out(kernels::rms_norm(x, cols, *group as usize, *eps, w), cols)
            }
            Op::LayerNorm { x, weight, bias, eps } => {
                let (x, cols) = act(*x)?;
                let w = weight.map(|p| self.vector(p)).transpose()?;
                let b = bias.map(|p| self.vector(p)).transpose()?;
                out(kernels::layer_norm(x, cols, *eps, w, b), cols)
            }
            // (Matmuls run through `exec_matmuls`.)
            Op::MatMul { .. } => Err(internal(format!("%{i}: a matmul outside a batch"))),
            Op::Add { a, b } => {
                let ((a, cols), (b, _)) = (act(*a)?, act(*b)?);
                out(kernels::add(a, b), cols)
            }
            Op::Mul { a, b } => {
                let ((a, cols), (b, _)) = (act(*a)?, act(*b)?);
                out(kernels::mul(a, b), cols)
            }
            Op::Scale { x, s } => {
                let (x, cols) = act(*x)?;
                out(kernels::scale(x, *s), cols)
            }
            Op::Act { x, kind } => {
                let (x, cols) = act(*x)?;
                out(kernels::act(x, *kind), cols)
            }
            Op::Glu { gate, up, kind } => {
                let ((g, cols), (u, _)) = (act(*gate)?, act(*up)?);
                if self.numerics == Numerics::Ggml && *kind == kiln_ir::Activation::Silu {
                    out(kernels::swiglu_ggml(g, u, cols), cols)
                } else {
                    out(kernels::glu(g, u, *kind), cols)
                }
            }
            Op::Rope { x, attrs } => {
                let (x, cols) = act(*x)?;
                out(kernels::rope(x, cols, self.pos + first, attrs), cols)
            }
            Op::Softmax { x } => {
                let (x, cols) = act(*x)?;
                out(kernels::softmax(x, cols), cols)
            }
            Op::Steer { x, dir, attrs } => {
                let (x, cols) = act(*x)?;
                let s = self.steer.get(&attrs.name).copied().unwrap_or(attrs.strength);
                out(kernels::steer(x, cols, self.vector(*dir)?, attrs.mode, s), cols)
            }
            Op::Repeat { x, times } => {
                let (x, cols) = act(*x)?;
                out(sparse::repeat(x, cols, *times as usize), cols * *times as usize)
            }
            Op::HcCoeffs { f, base, scale, streams, iters, eps } => {
                let (f, cols) = act(*f)?;
                let c = sparse::hc_coeffs(
                    f,
                    cols,
                    self.vector(*base)?,
                    self.vector(*scale)?,
                    *streams as usize,
                    *iters as usize,
                    *eps,
                );
                out(c, cols)
            }
            Op::HcPre { x, c, streams } => {
                let ((x, w), (c, cw)) = (act(*x)?, act(*c)?);
                let n = *streams as usize;
                out(sparse::hc_pre(x, c, cw, n, w / n), w / n)
            }
            Op::HcPost { x, y, c, streams } => {
                let ((x, w), (y, d), (c, _)) = (act(*x)?, act(*y)?, act(*c)?);
                out(sparse::hc_post(x, y, c, *streams as usize, d), w)
            }
            Op::MoeRoute { logits, ids, bias, table, attrs } => {
                let (l, e) = act(*logits)?;
                let ids = match ids {
                    None => None,
                    Some(v) => match values.get(v.index()) {
                        Some(Some(Value::Ids(ids))) => Some(ids.get(first..).unwrap_or(&[])),
                        _ => return Err(internal(format!("%{i}: token ids are not available"))),
                    },
                };
                let b = bias.map(|p| self.vector(p)).transpose()?;
                let tb = table.map(|p| self.vector(p)).transpose()?;
                out(sparse::moe_route(l, e, ids, b, tb, attrs), e)
            }
            Op::Moe { x, w, gate, up, down, shared, limit } => {
                let ((x, d), (w, e)) = (act(*x)?, act(*w)?);
                let stacked = |p: ParamId| -> Result<Stacked<'_>, BackendError> {
                    let dims = param_dims(&self.module, p)?;
                    let [ex, n, k] = dims[..] else {
                        return Err(internal(format!("%{i}: expert weights are not 3-D")));
                    };
                    // `n`: rows of one expert's matrix.
                    let all = Weight { bytes: self.weights.bytes(p), dtype: self.module.param(p).ty.dtype, n, k };
                    Ok(Stacked { all, experts: ex })
                };
                let plain = |p: ParamId| -> Result<Weight<'_>, BackendError> {
                    let dims = param_dims(&self.module, p)?;
                    let [n, k] = dims[..] else {
                        return Err(internal(format!("%{i}: shared expert weights are not 2-D")));
                    };
                    Ok(Weight { bytes: self.weights.bytes(p), dtype: self.module.param(p).ty.dtype, n, k })
                };
                let (g, u, dn) = (stacked(*gate)?, stacked(*up)?, stacked(*down)?);
                if g.experts != e {
                    return Err(internal(format!("%{i}: {e} routing weights for {} experts", g.experts)));
                }
                let sh = match shared {
                    Some(s) => Some([plain(s.gate)?, plain(s.up)?, plain(s.down)?]),
                    None => None,
                };
                let y =
                    sparse::moe(self.kernel.as_ref(), x, d, w, g, u, dn, sh, *limit).map_err(|e| quant_err(i, e))?;
                out(y, d)
            }
            Op::GroupedMatMul { x, w, groups } => {
                let (x, _) = act(*x)?;
                let dims = param_dims(&self.module, *w)?;
                let [n, k] = dims[..] else { return Err(internal(format!("%{i}: grouped weight is not 2-D"))) };
                let weight = Weight { bytes: self.weights.bytes(*w), dtype: self.module.param(*w).ty.dtype, n, k };
                let y = sparse::grouped_matmul(self.kernel.as_ref(), x, n_rows, weight, *groups as usize)
                    .map_err(|e| quant_err(i, e))?;
                out(y, n)
            }
            Op::CompressedAttention { q, kv, sink, comp, indexer, attrs } => {
                let whole = |v: ValueId| whole_rows(values, v, t_len, i);
                let kv_all = whole(*kv)?;
                let c = comp.as_ref().map(|c| Ok::<_, BackendError>((whole(c.kv)?, whole(c.gate)?))).transpose()?;
                let ix = indexer
                    .as_ref()
                    .map(|x| Ok::<_, BackendError>((whole(x.keys.kv)?, whole(x.keys.gate)?)))
                    .transpose()?;
                let cache = self
                    .compressed
                    .get_mut(&attrs.cache)
                    .ok_or_else(|| internal(format!("%{i}: compressed slot {} was not made", attrs.cache)))?;
                if cache.len() != self.pos {
                    return Err(internal(format!(
                        "%{i}: compressed slot {} holds {} positions, expected {}",
                        attrs.cache,
                        cache.len(),
                        self.pos
                    )));
                }
                cache.append(self.calls, kv_all, c, ix).map_err(BackendError::BadInput)?;
                if rows == Rows::Skip {
                    return Ok(None);
                }
                let (qv, cols) = act(*q)?;
                let iq = indexer.as_ref().map(|x| act(x.q).map(|a| a.0)).transpose()?;
                let iw = indexer.as_ref().map(|x| act(x.w).map(|a| a.0)).transpose()?;
                let sink = self.vectors.get(sink).ok_or_else(|| internal("sink not decoded"))?;
                let cache = &self.compressed[&attrs.cache];
                out(self.kernel.compressed_attend(cache, qv, self.pos + first, iq, iw, sink), cols)
            }
            Op::Compress { kv, gate, attrs, .. } => {
                let whole = |v: ValueId| whole_rows(values, v, t_len, i);
                let (kv, gate) = (whole(*kv)?, whole(*gate)?);
                let (calls, pos) = (self.calls, self.pos);
                let cache = self.compressed_slot(i, attrs.cache, pos)?;
                let rows = cache.append_stream(calls, attrs.index, kv, gate).map_err(BackendError::BadInput)?;
                let dim = rows.len() / t_len.max(1);
                out(rows[first * dim..].to_vec(), dim)
            }
            Op::IndexTopk { q, w, keys, attrs } => {
                let Op::Compress { attrs: k, .. } = &self.module.insts[keys.index()].op else {
                    return Err(internal(format!("%{i}: keys {keys} are not a compressor's")));
                };
                let (q, _) = act(*q)?;
                let (w, _) = act(*w)?;
                let pos = self.pos;
                let view = self.compressed_slot(i, k.cache, pos)?.view();
                let (nh, di, topk) = (attrs.heads as usize, view.attrs.index_dim as usize, attrs.topk as usize);
                let mut chosen = vec![-1f32; n_rows * topk];
                for (t, row) in chosen.chunks_mut(topk.max(1)).enumerate() {
                    let sel = view.select(Some(&q[t * nh * di..]), Some(&w[t * nh..]), pos + first + t);
                    row.iter_mut().zip(sel).for_each(|(r, s)| *r = s as f32);
                }
                out(chosen, topk)
            }
            Op::SparseAttention { q, kv, sink, select, attrs, .. } => {
                let kv_all = whole_rows(values, *kv, t_len, i)?;
                let (calls, pos) = (self.calls, self.pos);
                let cache = self.compressed_slot(i, attrs.cache, pos)?;
                cache.append_raw(calls, kv_all).map_err(BackendError::BadInput)?;
                if rows == Rows::Skip {
                    return Ok(None);
                }
                let (qv, cols) = act(*q)?;
                let chosen = select.map(act).transpose()?;
                let sink = self.vectors.get(sink).ok_or_else(|| internal("sink not decoded"))?;
                let view = self.compressed[&attrs.cache].view();
                let y = view.attend_chosen(qv, pos + first, sink, |t, p| match chosen {
                    // The selection's row numbers are exact in f32; −1 pads.
                    Some((sel, k)) => {
                        sel[t * k..(t + 1) * k].iter().filter(|w| **w >= 0.0).map(|w| *w as usize).collect()
                    }
                    None => (0..view.visible(p)).collect(),
                });
                out(y, cols)
            }
            Op::Attention { q, k, v, attrs } => {
                let cache = self
                    .caches
                    .get_mut(&attrs.cache)
                    .ok_or_else(|| internal(format!("%{i}: KV-cache slot {} has no writer", attrs.cache)))?;
                if let (Some(k), Some(v)) = (k, v) {
                    // k and v are always computed for every row (see `plan`).
                    let whole = |v: ValueId| match values.get(v.index()) {
                        Some(Some(Value::Act { data, first: 0, .. })) if data.len() == t_len * cache.width => {
                            Ok(data.as_slice())
                        }
                        _ => Err(internal(format!("%{i}: k/v operand {v} is not available for every row"))),
                    };
                    if cache.len() != self.pos {
                        return Err(internal(format!(
                            "%{i}: KV-cache slot {} holds {} positions, expected {}",
                            attrs.cache,
                            cache.len(),
                            self.pos
                        )));
                    }
                    if self.numerics == Numerics::Ggml && !cache.is_quantized() {
                        let f16 = |s: &[f32]| s.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect::<Vec<_>>();
                        cache.append(&f16(whole(*k)?), &f16(whole(*v)?));
                    } else {
                        cache.append(whole(*k)?, whole(*v)?);
                    }
                } else if cache.len() != self.pos + t_len {
                    return Err(internal(format!(
                        "%{i}: shared KV-cache slot {} holds {} positions, expected {}",
                        attrs.cache,
                        cache.len(),
                        self.pos + t_len
                    )));
                }
                if rows == Rows::Skip {
                    // Only the cache append was needed.
                    return Ok(None);
                }
                let (q, cols) = act(*q)?;
                let mode = AttnNumerics::of(self.numerics, t_len);
                out(self.kernel.attend(q, self.pos + first, cache, attrs, mode), cols)
            }
        }
    }
}

impl Session for ReferenceSession {
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, BackendError> {
        self.check_input(tokens)?;
        // Ring slots hold the keys of at most a chunk's queries: longer inputs go by chunks.
        if let Some(chunk) = self.ring_chunk.filter(|c| tokens.len() > *c) {
            let start = self.pos;
            let mut out = Vec::new();
            let parts: Vec<&[u32]> = tokens.chunks(chunk).collect();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                match self.forward(part, logits) {
                    Ok(o) if last || logits == Logits::All => out.extend(o),
                    Ok(_) => {}
                    Err(e) => {
                        self.truncate(start);
                        return Err(e);
                    }
                }
            }
            return Ok(out);
        }
        let pool = Arc::clone(&self.pool);
        let result = pool.install(|| self.run(tokens, logits));
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                let pos = self.pos;
                self.caches.values_mut().for_each(|c| c.truncate(pos));
                self.compressed.values_mut().for_each(|c| {
                    c.abort_call();
                    c.truncate(pos);
                });
                return Err(e);
            }
        };
        self.pos += tokens.len();
        let Value::Act { data, cols, .. } = value else {
            return Err(internal("the output is not an f32 tensor"));
        };
        Ok(match logits {
            Logits::All => data,
            Logits::Last => {
                let start = data.len().saturating_sub(cols);
                data[start..].to_vec()
            }
        })
    }

    fn pos(&self) -> usize {
        self.pos
    }

    fn truncate(&mut self, pos: usize) {
        self.rollback.truncate(self.pos, pos);
        if pos < self.pos {
            self.pos = pos;
            self.caches.values_mut().for_each(|c| c.truncate(pos));
            self.compressed.values_mut().for_each(|c| c.truncate(pos));
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn kv_cache_bytes(&self) -> Option<usize> {
        Some(ReferenceSession::kv_cache_bytes(self))
    }
}

/// Rows `first..first + n_rows` of the f32 value `v` (read by instruction `i`), and its row
/// length.
fn act_rows(
    values: &[Option<Value>],
    v: ValueId,
    first: usize,
    n_rows: usize,
    i: usize,
) -> Result<(&[f32], usize), BackendError> {
    match values.get(v.index()) {
        Some(Some(Value::Act { data, cols, first: f })) if *f <= first => {
            let start = (first - f) * cols;
            let end = start + n_rows * cols;
            data.get(start..end).map(|d| (d, *cols)).ok_or_else(|| internal(format!("%{i}: operand {v} is too short")))
        }
        _ => Err(internal(format!("%{i}: operand {v} is not available for rows {first}..{}", first + n_rows))),
    }
}

/// The output width of matmul `i` with weight `w` over input rows of `k`.
fn matmul_rows(module: &VerifiedModule, i: usize, w: ParamId, k: usize) -> Result<usize, BackendError> {
    let dims = param_dims(module, w)?;
    match dims.as_slice() {
        [n, kk] if *kk == k => Ok(*n),
        _ => Err(internal(format!("%{i}: weight shape {dims:?} does not fit input rows of {k}"))),
    }
}

/// The profile's label of instructions `range` (one op, or a batch of sibling matmuls by
/// their weights' layouts and shapes) in a call of `tokens` tokens.
fn op_label(module: &VerifiedModule, range: std::ops::Range<usize>, tokens: usize) -> String {
    let call = if tokens == 1 { "decode" } else { "prefill" };
    let parts: Vec<String> = range
        .map(|i| match &module.insts[i].op {
            Op::MatMul { w, .. } => {
                format!("matmul {}", module.param(*w).ty)
            }
            op => op.name().to_string(),
        })
        .collect();
    format!("{call} {}", parts.join(" + "))
}
