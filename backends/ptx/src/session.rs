//! The PTX session: device buffers for weights (uploaded once, in their packed
//! layout), a device KV cache per slot, activation buffers reused by value
//! lifetime, and one launch sequence per forward call.
//!
//! Token embedding runs on the host (the reference dequantizer gathers `T`
//! rows and uploads them, as llama.cpp keeps its input layer on the CPU);
//! everything after it runs on the device, and only the logits come back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kiln_backends::reference::rope_angles;
use kiln_backends::{BackendError, Logits, Session, SessionOptions, WeightSource};
use kiln_ir::{AttentionAttrs, DType, Op, ParamId, RopeAttrs, ValueId, VerifiedModule};

use crate::device::{Device, internal};
use crate::emu::Arg;
use crate::kernels::{self, BLOCK};
use crate::lower;

mod ds4;

/// Most tokens one launch sequence processes; longer inputs run in chunks.
pub const MAX_CHUNK: usize = 512;
/// Largest k the device top-k selects (larger k select on the host).
pub const MAX_TOP_K: usize = 256;
/// Forward calls of at most this many tokens split attention keys like decode steps.
const SPLIT_TOKENS: usize = 16;
/// Most key splits of decode attention (flash-decoding).
pub const MAX_SPLITS: u32 = 32;
/// Keys per split a decode step at full context aims for.
const KEYS_PER_SPLIT: u32 = 256;

struct Cache {
    k: u64,
    v: u64,
    width: usize,
    /// Positions held: the context, or for a slot only windowed attention reads, its
    /// sinks and a ring (`kiln_backends::ring`).
    rows: usize,
    /// Leading positions kept outside the ring.
    sink: usize,
    /// F32, or a block type (`q8_0`, `q4_0`): rows of rotated ggml blocks, dequantized
    /// into the session's f32 scratch rows before each attention reads them.
    dtype: DType,
}

pub struct PtxSession<D: Device> {
    dev: D,
    module: Arc<VerifiedModule>,
    weights: Arc<dyn WeightSource>,
    max_context: usize,
    chunk: usize,
    pos: usize,
    vocab: usize,
    embed_rows: Option<usize>,
    /// Device copy of each parameter read on the device.
    params: HashMap<ParamId, u64>,
    /// Buffer of each value (None for token ids).
    bufs: Vec<Option<u64>>,
    /// Columns of each value.
    cols: Vec<usize>,
    caches: HashMap<u32, Cache>,
    /// (cos, sin) tables per RoPE variant.
    rope_tables: HashMap<(u64, u32, u32), u64>,
    /// Scratch: attention partial results, kq2-rotated activations.
    part: u64,
    /// f32 K and V rows a quantized slot is dequantized into for attention (one for all layers).
    kv_scratch: Option<(u64, u64)>,
    xr: u64,
    tables: HashMap<DType, u64>,
    /// One u32: the device argmax's result.
    argmax_out: u64,
    /// `MAX_TOP_K` (id, logit) pairs: the device top-k's result.
    top_k_out: u64,
    /// The forward call's first position (u32), read by the kernels.
    step: u64,
    decode_splits: u32,
    /// With ring KV slots: how far back a rollback may go (a chunk).
    rollback: kiln_backends::ring::RollbackGuard,
    /// Run-time strengths of steering ops, by name.
    steer: std::collections::BTreeMap<String, f32>,
    /// Decode steps replay one recorded launch sequence (`KILN_PTX_GRAPHS=0` turns it off).
    use_graphs: bool,
    decode_graph: Option<crate::device::GraphId>,
    logits_host: Vec<u8>,
    /// DeepSeek-V4 ops' device state.
    ds4: ds4::Ds4,
}

fn rope_key(a: &RopeAttrs) -> (u64, u32, u32) {
    (a.rot_dims, a.theta.to_bits(), a.freq_scale.to_bits())
}

fn usize_of(v: u64, what: &str) -> Result<usize, BackendError> {
    usize::try_from(v).map_err(|_| internal(format!("{what} {v} does not fit this machine")))
}

fn u32_of(v: usize, what: &str) -> Result<u32, BackendError> {
    u32::try_from(v)
        .map_err(|_| BackendError::BadInput(format!("{what} {v} exceeds the PTX backend's 32-bit indexing")))
}

/// Key splits of decode attention for a cache of `max_context` positions
/// (fixed per session, so the decode graph is; each query cuts its own keys).
fn decode_splits(max_context: usize) -> u32 {
    (max_context.div_ceil(KEYS_PER_SPLIT as usize) as u32).clamp(1, MAX_SPLITS)
}

impl<D: Device> PtxSession<D> {
    pub fn new(
        mut dev: D,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Self, BackendError> {
        kiln_backends::check_weight_sizes(&module, weights.as_ref())?;
        kiln_backends::check_steer(&module, &options.steer)?;
        let out = module.output.ok_or_else(|| internal("module has no output"))?;
        let n = module.insts.len();
        let cols: Vec<usize> = module
            .insts
            .iter()
            .map(|inst| inst.ty.last_fixed().map_or(Ok(0), |c| usize_of(c, "columns")))
            .collect::<Result<_, _>>()?;
        let vocab = cols[out.index()];
        let max_context = options.max_context;
        // Windowed slots as rings (and shorter chunks when all attention is windowed).
        let ring_plan = kiln_backends::ring::plan(&module, max_context, MAX_CHUNK);
        let mut rollback = ring_plan.guard();
        let (chunk, rings) = (ring_plan.chunk, ring_plan.slots);

        // Weights read on the device, uploaded once in their stored layout.
        let mut params = HashMap::new();
        let mut embed_rows: Option<usize> = None;
        let mut max_kq2_k = 0usize;
        let mut tables = HashMap::new();
        for inst in &module.insts {
            let on_device: Vec<ParamId> = match &inst.op {
                Op::Embed { table, .. } => {
                    let rows = module.param(*table).ty.fixed_dims().and_then(|d| d.first().copied()).unwrap_or(0);
                    let rows = usize_of(rows, "embedding rows")?;
                    embed_rows = Some(embed_rows.map_or(rows, |r| r.min(rows)));
                    vec![]
                }
                Op::MatMul { w, bias, .. } => {
                    let dt = module.param(*w).ty.dtype;
                    if crate::formats::needs_rotated_x(dt) {
                        let k = module.param(*w).ty.last_fixed().unwrap_or(0);
                        max_kq2_k = max_kq2_k.max(usize_of(k, "row length")?);
                    }
                    if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(dt)
                        && let Some(t) = crate::formats::tables(dt)
                    {
                        let a = dev.alloc(t.len())?;
                        dev.upload(a, &t)?;
                        e.insert(a);
                    }
                    std::iter::once(*w).chain(bias.iter().copied()).collect()
                }
                Op::Moe { .. } | Op::GroupedMatMul { .. } => {
                    let ws = ds4::weights_of(&inst.op);
                    for w in &ws {
                        let dt = module.param(*w).ty.dtype;
                        if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(dt)
                            && let Some(t) = crate::formats::tables(dt)
                        {
                            let a = dev.alloc(t.len())?;
                            dev.upload(a, &t)?;
                            e.insert(a);
                        }
                    }
                    ws
                }
                Op::RmsNorm { weight, .. } => weight.iter().copied().collect(),
                Op::Steer { dir, .. } => vec![*dir],
                _ => vec![],
            };
            for p in on_device {
                if let std::collections::hash_map::Entry::Vacant(e) = params.entry(p) {
                    let bytes = weights.bytes(p);
                    let a = dev.alloc(bytes.len())?;
                    dev.upload(a, bytes)?;
                    e.insert(a);
                }
            }
        }

        // Activation buffers: a value takes a free buffer at least its size, and
        // gives it back after its last reader.
        let last_use = kiln_ir::analysis::last_uses(&module);
        let mut free: BTreeMap<(usize, u64), ()> = BTreeMap::new();
        let mut bufs = vec![None; n];
        let mut sizes = vec![0usize; n];
        for (i, inst) in module.insts.iter().enumerate() {
            if !matches!(inst.op, Op::Tokens) {
                let need = 4 * chunk * cols[i].max(1);
                let found = free.range((need, 0)..).next().map(|(k, _)| *k);
                let (size, addr) = match found {
                    Some(k) => {
                        free.remove(&k);
                        k
                    }
                    None => (need, dev.alloc(need)?),
                };
                bufs[i] = Some(addr);
                sizes[i] = size;
            }
            for v in inst.op.values() {
                let vi = v.index();
                if last_use[vi] == Some(i)
                    && vi != out.index()
                    && let Some(a) = bufs[vi]
                {
                    free.insert((sizes[vi], a), ());
                }
            }
        }

        // KV caches, RoPE tables, attention scratch.
        let mut caches = HashMap::new();
        let mut rope_tables = HashMap::new();
        let mut part_floats = 0usize;
        let mut scratch_floats = 0usize;
        for inst in &module.insts {
            match &inst.op {
                Op::Attention { k, attrs, .. } => {
                    let AttentionAttrs { heads, kv_heads, head_dim, kv_dtype, .. } = *attrs;
                    let width = usize_of(kv_heads * head_dim, "attention width")?;
                    let (rows, sink) = rings.get(&attrs.cache).copied().unwrap_or((max_context, 0));
                    if kv_dtype != DType::F32 {
                        scratch_floats = scratch_floats.max(rows * width);
                    }
                    if k.is_some() {
                        let row = usize_of(kv_dtype.row_bytes(width as u64).unwrap_or(0), "KV row bytes")?;
                        let bytes = rows * row;
                        let (k, v) = (dev.alloc(bytes)?, dev.alloc(bytes)?);
                        caches.insert(attrs.cache, Cache { k, v, width, rows, sink, dtype: kv_dtype });
                    }
                    let rec = kernels::attn_record(u32_of(usize_of(head_dim, "head_dim")?, "head_dim")?) as usize;
                    let heads = usize_of(heads, "heads")?;
                    part_floats = part_floats.max(heads * rec * chunk.max(MAX_SPLITS as usize));
                }
                Op::Rope { attrs, .. } => {
                    if let std::collections::hash_map::Entry::Vacant(e) = rope_tables.entry(rope_key(attrs)) {
                        let mut t = Vec::with_capacity(max_context * attrs.rot_dims as usize * 4);
                        for p in 0..max_context {
                            for (c, s) in rope_angles(p, attrs) {
                                t.extend_from_slice(&c.to_le_bytes());
                                t.extend_from_slice(&s.to_le_bytes());
                            }
                        }
                        let a = dev.alloc(t.len())?;
                        dev.upload(a, &t)?;
                        e.insert(a);
                    }
                }
                _ => {}
            }
        }
        let part = dev.alloc(4 * part_floats.max(1))?;
        let kv_scratch = if scratch_floats > 0 {
            let bytes = 4 * scratch_floats;
            Some((dev.alloc(bytes)?, dev.alloc(bytes)?))
        } else {
            None
        };
        let xr = dev.alloc(4 * (chunk * max_kq2_k).max(ds4::xr_floats(&module, chunk)?).max(1))?;
        let ds4 = ds4::Ds4::new(&mut dev, &module, weights.as_ref(), chunk, max_context)?;
        if ds4.has_slots() {
            // Compressed slots keep `chunk` positions of slack in their rings (see `ds4`).
            rollback = kiln_backends::ring::RollbackGuard::new(Some(chunk));
        }
        let argmax_out = dev.alloc(4)?;
        let top_k_out = dev.alloc(8 * MAX_TOP_K)?;
        let step = dev.alloc(16)?;
        let use_graphs = std::env::var("KILN_PTX_GRAPHS").map_or(true, |v| v != "0");
        Ok(PtxSession {
            dev,
            module,
            weights,
            max_context,
            chunk,
            pos: 0,
            vocab,
            embed_rows,
            params,
            bufs,
            cols,
            caches,
            rope_tables,
            part,
            kv_scratch,
            xr,
            tables,
            argmax_out,
            top_k_out,
            step,
            decode_splits: decode_splits(max_context),
            rollback,
            use_graphs,
            steer: options.steer.clone(),
            decode_graph: None,
            logits_host: Vec::new(),
            ds4,
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    fn buf(&self, v: ValueId) -> Result<u64, BackendError> {
        self.bufs.get(v.index()).copied().flatten().ok_or_else(|| internal(format!("{v} has no buffer")))
    }

    fn param(&self, p: ParamId) -> Result<u64, BackendError> {
        self.params.get(&p).copied().ok_or_else(|| internal(format!("parameter #{} is not on the device", p.0)))
    }

    fn check_input(&self, tokens: &[u32]) -> Result<(), BackendError> {
        self.rollback.check()?;
        kiln_backends::check_forward_input(tokens, self.pos, self.max_context, self.embed_rows)
    }

    /// Runs the graph over `tokens` (at most `chunk`) at the current position.
    /// Returns the output buffer address and how many rows it holds.
    fn run_chunk(&mut self, tokens: &[u32], last_only: bool) -> Result<(u64, usize), BackendError> {
        let t = tokens.len();
        let module = self.module.clone();
        // Host side first: embedding rows and the step buffer (the launches read
        // the position from it, so a recorded sequence replays at any position).
        for (i, inst) in module.insts.iter().enumerate() {
            if let Op::Embed { table, .. } = &inst.op {
                let cols = self.cols[i];
                let p = module.param(*table);
                let dt = p.ty.dtype;
                let bytes = self.weights.bytes(*table);
                let rb = usize_of(dt.row_bytes(cols as u64).unwrap_or(0), "row bytes")?;
                let mut rows = vec![0f32; t * cols];
                for (r, &id) in tokens.iter().enumerate() {
                    let src = &bytes[id as usize * rb..(id as usize + 1) * rb];
                    kiln_backends::quant::dequantize_row(dt, src, &mut rows[r * cols..(r + 1) * cols])
                        .map_err(|e| BackendError::BadInput(format!("@{}: {e}", p.name)))?;
                }
                let raw: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
                let y = self.bufs[i].ok_or_else(|| internal("embed without buffer"))?;
                self.dev.upload(y, &raw)?;
            }
        }
        let posu = u32_of(self.pos, "position")?;
        self.dev.upload(self.step, &posu.to_le_bytes())?;
        if let Some(ids) = self.ds4.ids {
            let raw: Vec<u8> = tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.dev.upload(ids, &raw)?;
        }
        if t == 1 && last_only && self.use_graphs {
            // Decode: one recorded graph, replayed every step.
            let g = match self.decode_graph {
                Some(g) => g,
                None => {
                    self.dev.begin_capture()?;
                    let r = self.launch_all(1, true);
                    let g = self.dev.end_capture()?;
                    r?;
                    self.decode_graph = Some(g);
                    g
                }
            };
            self.dev.replay(g)?;
            let out = module.output.ok_or_else(|| internal("no output"))?;
            return Ok((self.buf(out)?, 1));
        }
        self.launch_all(t, last_only)
    }

    /// Queues the launch sequence of a forward call of `t` tokens; every
    /// argument depends only on `t` and `last_only` (the position comes from
    /// the step buffer). Returns the output buffer and how many rows it holds.
    fn launch_all(&mut self, t: usize, last_only: bool) -> Result<(u64, usize), BackendError> {
        let tu = u32_of(t, "tokens")?;
        let module = self.module.clone();
        let out = module.output.ok_or_else(|| internal("no output"))?;
        let mut out_rows = t;
        // The value (and row offset) whose kq2 rotation the scratch buffer holds.
        let mut rotated: Option<(ValueId, u64)> = None;
        for (i, inst) in module.insts.iter().enumerate() {
            let y = self.bufs[i];
            let cols = self.cols[i];
            let n = u32_of(t * cols, "elements")?;
            let grid1 = [n.div_ceil(BLOCK), 1, 1];
            match &inst.op {
                Op::Tokens | Op::Embed { .. } => {}
                Op::RmsNorm { x, weight, eps, group } => {
                    let g = if *group == 0 { cols } else { usize_of(*group, "group")? };
                    let w = match weight {
                        Some(w) => self.param(*w)?,
                        None => 0,
                    };
                    let args = [
                        Arg::Ptr(self.buf(*x)?),
                        Arg::Ptr(w),
                        Arg::Ptr(y.unwrap_or(0)),
                        Arg::U32(g as u32),
                        Arg::F32(*eps),
                    ];
                    let groups = u32_of(t * cols / g.max(1), "norm groups")?;
                    self.dev.launch(&kernels::rms_norm_name(weight.is_some()), [groups, 1, 1], &args)?;
                }
                Op::MatMul { x, w, bias } => {
                    let wt = &module.param(*w).ty;
                    let dt = wt.dtype;
                    let k = usize_of(wt.last_fixed().unwrap_or(0), "row length")?;
                    let rb = u32_of(usize_of(dt.row_bytes(k as u64).unwrap_or(0), "row bytes")?, "row bytes")?;
                    let (mut xa, mut tt) = (self.buf(*x)?, t);
                    if i == out.index() && last_only {
                        xa += (4 * (t - 1) * k) as u64;
                        tt = 1;
                        out_rows = 1;
                    }
                    let mut xr = xa;
                    if crate::formats::needs_rotated_x(dt) {
                        // q, k and v (gate and up) read the same x: rotate it once.
                        if rotated != Some((*x, xa)) {
                            let nn = u32_of(tt * k, "elements")?;
                            let args = [Arg::Ptr(xa), Arg::Ptr(self.xr), Arg::U32(nn)];
                            self.dev.launch(lower::KQ2_ROTATE, [nn.div_ceil(BLOCK), 1, 1], &args)?;
                            rotated = Some((*x, xa));
                        }
                        xr = self.xr;
                    }
                    let bias_a = match bias {
                        Some(b) => self.param(*b)?,
                        None => 0,
                    };
                    let rows = u32_of(cols, "rows")?;
                    let args = [
                        Arg::Ptr(self.param(*w)?),
                        Arg::Ptr(xa),
                        Arg::Ptr(xr),
                        Arg::Ptr(y.unwrap_or(0)),
                        Arg::Ptr(bias_a),
                        Arg::Ptr(self.tables.get(&dt).copied().unwrap_or(0)),
                        Arg::U32(rows),
                        Arg::U32(k as u32),
                        Arg::U32(tt as u32),
                        Arg::U32(rb),
                    ];
                    if tt >= lower::MMA_MIN_TOKENS && self.dev.tensor_cores() && lower::uses_mma(&module, *w) {
                        let name = kernels::matmul_mma_name(dt, bias.is_some());
                        self.dev.launch(&name, kernels::matmul_mma_grid(rows, tt as u32), &args)?;
                    } else {
                        let name = kernels::matmul_name(dt, bias.is_some(), lower::ragged(&module, *w));
                        self.dev.launch(&name, kernels::matmul_grid(rows, tt as u32), &args)?;
                    }
                }
                Op::Add { a, b } | Op::Mul { a, b } => {
                    let name = if matches!(inst.op, Op::Add { .. }) { "add" } else { "mul" };
                    let args =
                        [Arg::Ptr(self.buf(*a)?), Arg::Ptr(self.buf(*b)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(n)];
                    self.dev.launch(name, grid1, &args)?;
                }
                Op::Scale { x, s } => {
                    let args = [Arg::Ptr(self.buf(*x)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(n), Arg::F32(*s)];
                    self.dev.launch("scale", grid1, &args)?;
                }
                Op::Act { x, kind } => {
                    let args = [Arg::Ptr(self.buf(*x)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(n)];
                    self.dev.launch(&kernels::act_name(*kind), grid1, &args)?;
                }
                Op::Glu { gate, up, kind } => {
                    let args =
                        [Arg::Ptr(self.buf(*gate)?), Arg::Ptr(self.buf(*up)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(n)];
                    self.dev.launch(&kernels::glu_name(*kind), grid1, &args)?;
                }
                Op::Softmax { x } => {
                    let args = [Arg::Ptr(self.buf(*x)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(cols as u32)];
                    self.dev.launch("softmax", [tu, 1, 1], &args)?;
                }
                Op::Steer { x, dir, attrs } => {
                    let s = self.steer.get(&attrs.name).copied().unwrap_or(attrs.strength);
                    if s == 0.0 {
                        // Strength 0 is the identity, bit for bit (x·1 keeps the sign of zero; x + 0·d would not).
                        let args = [Arg::Ptr(self.buf(*x)?), Arg::Ptr(y.unwrap_or(0)), Arg::U32(n), Arg::F32(1.0)];
                        self.dev.launch("scale", grid1, &args)?;
                    } else {
                        let args = [
                            Arg::Ptr(self.buf(*x)?),
                            Arg::Ptr(self.param(*dir)?),
                            Arg::Ptr(y.unwrap_or(0)),
                            Arg::U32(cols as u32),
                            Arg::F32(s),
                        ];
                        self.dev.launch(&kernels::steer_name(attrs.mode), [tu, 1, 1], &args)?;
                    }
                }
                Op::Rope { x, attrs } => {
                    let table =
                        *self.rope_tables.get(&rope_key(attrs)).ok_or_else(|| internal("rope table missing"))?;
                    let hd = u32_of(usize_of(attrs.head_dim, "head_dim")?, "head_dim")?;
                    let heads = u32_of(cols, "columns")? / hd.max(1);
                    let args = [
                        Arg::Ptr(self.buf(*x)?),
                        Arg::Ptr(y.unwrap_or(0)),
                        Arg::Ptr(table),
                        Arg::Ptr(self.step),
                        Arg::U32(cols as u32),
                        Arg::U32(hd),
                        Arg::U32(attrs.rot_dims as u32),
                    ];
                    self.dev.launch(&kernels::rope_name(attrs.layout), [tu, heads, 1], &args)?;
                }
                Op::Attention { q, k, v, attrs } => {
                    let cache = self.caches.get(&attrs.cache).ok_or_else(|| internal("KV cache slot missing"))?;
                    let (mut kc, mut vc, width, dtype) = (cache.k, cache.v, cache.width, cache.dtype);
                    let (rows, ring_sink) = (u32_of(cache.rows, "KV rows")?, u32_of(cache.sink, "KV sinks")?);
                    if let (Some(k), Some(v)) = (k, v) {
                        // f32 slots take one thread per value, quantized ones one per 64-value chunk.
                        let (kernel, n) = if dtype == DType::F32 {
                            ("kv_append".to_string(), u32_of(t * width, "elements")?)
                        } else {
                            (kernels::kv_append_q_name(dtype), u32_of(t * width / 64, "elements")?)
                        };
                        let args = [
                            Arg::Ptr(self.buf(*k)?),
                            Arg::Ptr(self.buf(*v)?),
                            Arg::Ptr(kc),
                            Arg::Ptr(vc),
                            Arg::Ptr(self.step),
                            Arg::U32(n),
                            Arg::U32(width as u32),
                            Arg::U32(rows),
                            Arg::U32(ring_sink),
                        ];
                        self.dev.launch(&kernel, [n.div_ceil(BLOCK), 1, 1], &args)?;
                    }
                    if dtype != DType::F32 {
                        // The slot's rows so far, as f32, for the attention kernel.
                        let (kf, vf) = self.kv_scratch.ok_or_else(|| internal("KV scratch missing"))?;
                        let all = u32_of(rows as usize * width / 64, "elements")?;
                        let args = [
                            Arg::Ptr(kc),
                            Arg::Ptr(vc),
                            Arg::Ptr(kf),
                            Arg::Ptr(vf),
                            Arg::Ptr(self.step),
                            Arg::U32(tu),
                            Arg::U32(width as u32),
                            Arg::U32(rows),
                        ];
                        self.dev.launch(&kernels::kv_dequant_name(dtype), [all.div_ceil(BLOCK), 1, 1], &args)?;
                        (kc, vc) = (kf, vf);
                    }
                    let hd = attrs.head_dim as u32;
                    let heads = attrs.heads as u32;
                    let group = (attrs.heads / attrs.kv_heads.max(1)).max(1) as u32;
                    // Short batches (speculative verification) split keys exactly like a
                    // decode step, so each of their rows equals a single-token call.
                    let splits = if t <= SPLIT_TOKENS { self.decode_splits } else { 1 };
                    let args = [
                        Arg::Ptr(self.buf(*q)?),
                        Arg::Ptr(kc),
                        Arg::Ptr(vc),
                        Arg::Ptr(self.part),
                        Arg::Ptr(self.step),
                        Arg::U32(heads),
                        Arg::U32(group),
                        Arg::U32(width as u32),
                        Arg::F32(attrs.scale),
                        Arg::U32(attrs.window as u32),
                        Arg::U32(attrs.sink as u32),
                        Arg::F32(attrs.softcap),
                        Arg::U32(splits),
                        Arg::U32(rows),
                        Arg::U32(ring_sink),
                    ];
                    self.dev.launch(&kernels::attention_name(hd, attrs.softcap > 0.0), [heads, tu, splits], &args)?;
                    let cargs = [
                        Arg::Ptr(self.part),
                        Arg::Ptr(y.unwrap_or(0)),
                        Arg::U32(heads),
                        Arg::U32(hd),
                        Arg::U32(splits),
                    ];
                    self.dev.launch("attn_combine", [heads, tu, 1], &cargs)?;
                }
                Op::LayerNorm { .. } => return Err(internal("layer_norm reached the PTX session")),
                Op::Repeat { .. }
                | Op::HcCoeffs { .. }
                | Op::HcPre { .. }
                | Op::HcPost { .. }
                | Op::MoeRoute { .. }
                | Op::Moe { .. }
                | Op::GroupedMatMul { .. }
                | Op::CompressedAttention { .. } => {
                    self.launch_ds4(i, t)?;
                    // The DS4 matmuls may have used the kq2 rotation scratch.
                    rotated = None;
                }
                op @ (Op::Compress { .. } | Op::IndexTopk { .. } | Op::SparseAttention { .. }) => {
                    return Err(internal(format!("`{}` reached the PTX session", op.name())));
                }
            }
        }
        let addr = self.buf(out)?;
        if last_only && out_rows > 1 {
            // The output op was not trimmed to the last row: point at it.
            return Ok((addr + (4 * (out_rows - 1) * self.vocab) as u64, 1));
        }
        Ok((addr, out_rows))
    }
}

impl<D: Device> PtxSession<D> {
    /// Runs every chunk of `tokens`, the last one's output matmul for its last
    /// row only; returns the last chunk's output buffer and rows.
    fn run_all(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        mut each: impl FnMut(&mut Self, u64, usize, bool) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        self.check_input(tokens)?;
        let start = self.pos;
        let chunks: Vec<&[u32]> = tokens.chunks(self.chunk).collect();
        let last = chunks.len() - 1;
        for (ci, c) in chunks.into_iter().enumerate() {
            let r = self.run_chunk(c, logits == Logits::Last).and_then(|(addr, rows)| {
                self.pos += c.len();
                each(self, addr, rows, ci == last)
            });
            if let Err(e) = r {
                self.pos = start;
                return Err(e);
            }
        }
        Ok(())
    }
}

impl<D: Device> Session for PtxSession<D> {
    fn forward_top_k(&mut self, tokens: &[u32], k: usize) -> Result<Vec<(u32, f32)>, BackendError> {
        let k = k.min(self.vocab);
        if k > MAX_TOP_K {
            // Beyond the device buffer: the whole row, selected on the host.
            let logits = self.forward(tokens, Logits::Last)?;
            return Ok(kiln_backends::top_k(&logits, k));
        }
        let mut out = Vec::with_capacity(k);
        self.run_all(tokens, Logits::Last, |s, addr, _rows, last| {
            if last && k > 0 {
                let args = [Arg::Ptr(addr), Arg::Ptr(s.top_k_out), Arg::U32(s.vocab as u32), Arg::U32(k as u32)];
                s.dev.launch("top_k", [1, 1, 1], &args)?;
                let mut b = vec![0u8; 8 * k];
                s.dev.download(s.top_k_out, &mut b)?;
                for pair in b.chunks_exact(8) {
                    let id = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
                    if id == u32::MAX {
                        break;
                    }
                    out.push((id, f32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]])));
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32, BackendError> {
        let mut id = 0u32;
        self.run_all(tokens, Logits::Last, |s, addr, _rows, last| {
            if last {
                let args = [Arg::Ptr(addr), Arg::Ptr(s.argmax_out), Arg::U32(s.vocab as u32)];
                s.dev.launch("argmax", [1, 1, 1], &args)?;
                let mut b = [0u8; 4];
                s.dev.download(s.argmax_out, &mut b)?;
                id = u32::from_le_bytes(b);
            }
            Ok(())
        })?;
        Ok(id)
    }

    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, BackendError> {
        let mut out = Vec::new();
        self.run_all(tokens, logits, |s, addr, rows, last| {
            if logits == Logits::All || last {
                let bytes = 4 * rows * s.vocab;
                let mut host = std::mem::take(&mut s.logits_host);
                host.resize(bytes, 0);
                let r = s.dev.download(addr, &mut host);
                out.extend(host.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                s.logits_host = host;
                r?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn pos(&self) -> usize {
        self.pos
    }

    /// The device memory of the KV slots (allocated once: the context's rows, or a
    /// windowed slot's sinks and ring; a compressed slot's rings and compressed rows).
    fn kv_cache_bytes(&self) -> Option<usize> {
        let kv: usize =
            self.caches.values().map(|c| 2 * c.rows * c.dtype.row_bytes(c.width as u64).unwrap_or(0) as usize).sum();
        Some(kv + self.ds4.cache_bytes)
    }

    fn truncate(&mut self, pos: usize) {
        self.rollback.truncate(self.pos, pos);
        self.pos = self.pos.min(pos);
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
