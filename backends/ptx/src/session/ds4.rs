//! The PTX session's DeepSeek-V4 ops: device state made at `prepare` (f32 copies of the
//! small parameters, the experts' scratch, each compressed-attention slot's rings and
//! compressed rows) and each op's launches (`kernels_ds4`).
//!
//! A compressed slot on the device is kept by position, not by call: the rotated raw K=V
//! rows and each compressor's projections in rings of `chunk + max(window, 2·ratio)`
//! positions, the compressed rows (and indexer keys) by window number. Windows are closed
//! by the call whose tokens end them, reading the projections from the ring; so a
//! rollback of up to `chunk` positions is exact (the rings still hold what the next call
//! reads, and rows of windows that close again are rewritten), and a longer one is
//! refused by the session's rollback guard until it restarts at 0.

use std::collections::HashMap;

use kiln_backends::{BackendError, WeightSource};
use kiln_ir::{CompressorOperands, Op, ParamId, RotaryAttrs, VerifiedModule};

use super::{PtxSession, u32_of, usize_of};
use crate::device::{Device, internal};
use crate::emu::Arg;
use crate::kernels::{self, BLOCK};
use crate::kernels_ds4 as k4;

/// One compressor stream's device state.
#[derive(Clone, Copy)]
pub(super) struct Stream {
    kv: u64,
    gate: u64,
    entries: u64,
    width: usize,
    dim: usize,
    ape: u64,
    norm: u64,
}

/// One compressed-attention op's device state.
pub(super) struct Slot {
    raw: u64,
    ring: usize,
    cap: usize,
    comp: Option<Stream>,
    index: Option<Stream>,
    /// A compressed row of zeros when the op has no compressor.
    no_comp: u64,
    table: u64,
}

/// Scratch of the `moe` ops (sized for the largest).
#[derive(Default)]
pub(super) struct MoeScratch {
    seg: u64,
    idx: u64,
    at: u64,
    xs: u64,
    g: u64,
    u: u64,
    h: u64,
    ys: u64,
    sg: u64,
    su: u64,
    sh: u64,
    out: u64,
}

#[derive(Default)]
pub(super) struct Ds4 {
    /// f32 copies of the small parameters (HC bases and scales, router bias and table,
    /// sinks, compressor `ape` and norms).
    vectors: HashMap<ParamId, u64>,
    /// The call's token ids (u32), for hash routing.
    pub(super) ids: Option<u64>,
    slots: HashMap<usize, Slot>,
    moe: MoeScratch,
    /// Routing scratch `[chunk, E]`.
    route: u64,
    /// `grouped_matmul` scratch: one group's input and output rows.
    gx: u64,
    gy: u64,
    /// Indexer scratch shared by the compressed-attention ops (which run in turn): rotated
    /// queries, scores `[chunk, rows]`, the chosen rows `[chunk, topk]` (a row list of
    /// `chunk` entries the attention kernel reads, unused, when no op has an indexer).
    iq: u64,
    scores: u64,
    sel: u64,
    /// Device bytes of the compressed slots (rings and compressed rows, allocated once).
    pub(super) cache_bytes: usize,
}

/// Rows of the gathered expert inputs of a `moe` whose weights come from `w`: every token
/// chooses at most `top_k` experts.
fn moe_top_k(module: &VerifiedModule, w: kiln_ir::ValueId) -> Option<u64> {
    match &module.insts.get(w.index())?.op {
        Op::MoeRoute { attrs, .. } => Some(attrs.top_k),
        _ => None,
    }
}

fn dims(module: &VerifiedModule, p: ParamId) -> Result<Vec<usize>, BackendError> {
    module
        .param(p)
        .ty
        .fixed_dims()
        .ok_or_else(|| internal(format!("@{} has no fixed shape", module.param(p).name)))?
        .into_iter()
        .map(|d| usize_of(d, "dimension"))
        .collect()
}

/// `(cos, sin)` per (position, pair) of a DeepSeek-V4 RoPE, as the reference computes them.
fn rope_table(r: &RotaryAttrs, positions: usize) -> Vec<u8> {
    let inv = kiln_backends::reference::inv_freq(r);
    let mut t = Vec::with_capacity(positions * inv.len() * 8);
    for p in 0..positions {
        for f in &inv {
            let a = p as f32 * f;
            t.extend_from_slice(&(f64::from(a).cos() as f32).to_le_bytes());
            t.extend_from_slice(&(f64::from(a).sin() as f32).to_le_bytes());
        }
    }
    t
}

impl Ds4 {
    /// The DS4 state of `module` (nothing when it has no DS4 op). `mats`: the weights its
    /// experts and grouped matmuls read, to upload with the matmul weights.
    pub(super) fn new<D: Device>(
        dev: &mut D,
        module: &VerifiedModule,
        weights: &dyn WeightSource,
        chunk: usize,
        max_context: usize,
    ) -> Result<Ds4, BackendError> {
        let mut s = Ds4::default();
        let mut vector = |dev: &mut D, p: ParamId| -> Result<u64, BackendError> {
            if let Some(a) = s.vectors.get(&p) {
                return Ok(*a);
            }
            let n: usize = dims(module, p)?.iter().product();
            let mut v = vec![0f32; n];
            kiln_backends::quant::dequantize_row(module.param(p).ty.dtype, weights.bytes(p), &mut v)
                .map_err(|e| BackendError::BadInput(format!("@{}: {e}", module.param(p).name)))?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let a = dev.alloc(bytes.len().max(4))?;
            dev.upload(a, &bytes)?;
            s.vectors.insert(p, a);
            Ok(a)
        };
        let mut route_floats = 0usize;
        let (mut moe_rows, mut moe_d, mut moe_i, mut moe_si, mut moe_e) = (0usize, 0usize, 0usize, 0usize, 0usize);
        let (mut g_in, mut g_out) = (0usize, 0usize);
        let mut slots = HashMap::new();
        let (mut iq_floats, mut score_floats, mut sel_rows) = (0usize, 0usize, chunk);
        let mut tables: HashMap<Vec<u32>, u64> = HashMap::new();
        let cols = |v: kiln_ir::ValueId| usize_of(module.value_type(v).last_fixed().unwrap_or(0), "columns");
        for (i, inst) in module.insts.iter().enumerate() {
            match &inst.op {
                Op::HcCoeffs { base, scale, .. } => {
                    vector(dev, *base)?;
                    vector(dev, *scale)?;
                }
                Op::MoeRoute { logits, ids, bias, table, .. } => {
                    if let Some(b) = bias {
                        vector(dev, *b)?;
                    }
                    if let Some(tb) = table {
                        let experts = module.value_type(*logits).last_fixed().unwrap_or(0) as f32;
                        let n: usize = dims(module, *tb)?.iter().product();
                        let mut v = vec![0f32; n];
                        kiln_backends::quant::dequantize_row(module.param(*tb).ty.dtype, weights.bytes(*tb), &mut v)
                            .map_err(|e| BackendError::BadInput(format!("@{}: {e}", module.param(*tb).name)))?;
                        if let Some(bad) = v.iter().find(|x| !(x.fract() == 0.0 && **x >= 0.0 && **x < experts)) {
                            return Err(BackendError::BadInput(format!(
                                "routing table @{} holds {bad}, which is not an expert number below {experts}",
                                module.param(*tb).name
                            )));
                        }
                        vector(dev, *tb)?;
                    }
                    if ids.is_some() && s.ids.is_none() {
                        s.ids = Some(dev.alloc(4 * chunk)?);
                    }
                    route_floats = route_floats.max(chunk * cols(*logits)?);
                }
                Op::Moe { x, w, gate, up, shared, .. } => {
                    let top_k = moe_top_k(module, *w).ok_or_else(|| internal("moe weights not from moe_route"))?;
                    let e = cols(*w)?;
                    let d = cols(*x)?;
                    let gi = dims(module, *gate)?;
                    let ui = dims(module, *up)?;
                    moe_rows = moe_rows.max(chunk * usize_of(top_k, "top_k")?.min(e));
                    moe_d = moe_d.max(d);
                    moe_i = moe_i.max(gi[1]).max(ui[1]);
                    moe_e = moe_e.max(e);
                    if let Some(sx) = shared {
                        moe_si = moe_si.max(dims(module, sx.gate)?[0]).max(dims(module, sx.up)?[0]);
                    }
                }
                Op::GroupedMatMul { x, w, groups } => {
                    let wd = dims(module, *w)?;
                    g_in = g_in.max(chunk * cols(*x)? / usize_of(*groups, "groups")?.max(1));
                    g_out = g_out.max(chunk * wd[0] / usize_of(*groups, "groups")?.max(1));
                }
                Op::CompressedAttention { sink, comp, indexer, attrs, .. } => {
                    vector(dev, *sink)?;
                    let hd = usize_of(attrs.head_dim, "head_dim")?;
                    let ratio = usize_of(attrs.ratio, "ratio")?;
                    let window = usize_of(attrs.window, "window")?;
                    let ring = chunk + window.max(2 * ratio).max(1);
                    let cap = max_context.checked_div(ratio).map_or(1, |c| c + 1);
                    let key: Vec<u32> = vec![
                        attrs.rope.rot_dims as u32,
                        attrs.rope.theta.to_bits(),
                        attrs.rope.yarn_factor.to_bits(),
                        attrs.rope.yarn_orig_ctx as u32,
                        attrs.rope.yarn_beta_fast.to_bits(),
                        attrs.rope.yarn_beta_slow.to_bits(),
                    ];
                    let table = match tables.get(&key) {
                        Some(a) => *a,
                        None => {
                            let t = rope_table(&attrs.rope, max_context + 1);
                            let a = dev.alloc(t.len().max(8))?;
                            dev.upload(a, &t)?;
                            tables.insert(key, a);
                            a
                        }
                    };
                    let mut bytes = 4 * ring * hd;
                    let mut stream = |dev: &mut D, c: &CompressorOperands, dim: u64| -> Result<Stream, BackendError> {
                        let width = cols(c.kv)?;
                        let dim = usize_of(dim, "dim")?;
                        bytes += 4 * (2 * ring * width + cap * dim);
                        Ok(Stream {
                            kv: dev.alloc(4 * ring * width)?,
                            gate: dev.alloc(4 * ring * width)?,
                            entries: dev.alloc(4 * cap * dim)?,
                            width,
                            dim,
                            ape: vector(dev, c.ape)?,
                            norm: vector(dev, c.norm)?,
                        })
                    };
                    let comp_s = match comp {
                        Some(c) if ratio > 0 => Some(stream(dev, c, attrs.head_dim)?),
                        _ => None,
                    };
                    let index_s = match indexer {
                        Some(ix) if ratio > 0 => Some(stream(dev, &ix.keys, attrs.index_dim)?),
                        _ => None,
                    };
                    if index_s.is_some() {
                        let nq = usize_of(attrs.index_heads * attrs.index_dim, "indexer width")?;
                        iq_floats = iq_floats.max(chunk * nq);
                        score_floats = score_floats.max(chunk * cap);
                        sel_rows = sel_rows.max(chunk * usize_of(attrs.topk, "topk")?.max(1));
                    }
                    s.cache_bytes += bytes;
                    let no_comp = if comp_s.is_none() { dev.alloc(4 * hd)? } else { 0 };
                    let raw = dev.alloc(4 * ring * hd)?;
                    slots.insert(i, Slot { raw, ring, cap, comp: comp_s, index: index_s, no_comp, table });
                }
                _ => {}
            }
        }
        if !slots.is_empty() {
            s.iq = dev.alloc(4 * iq_floats.max(1))?;
            s.scores = dev.alloc(4 * score_floats.max(1))?;
            s.sel = dev.alloc(4 * sel_rows)?;
        }
        s.slots = slots;
        if route_floats > 0 {
            s.route = dev.alloc(4 * route_floats)?;
        }
        if moe_rows > 0 {
            let m = &mut s.moe;
            m.seg = dev.alloc(4 * (2 * moe_e + 1))?;
            m.idx = dev.alloc(4 * moe_rows)?;
            m.at = dev.alloc(4 * chunk * moe_e)?;
            m.xs = dev.alloc(4 * moe_rows * moe_d)?;
            m.g = dev.alloc(4 * moe_rows * moe_i)?;
            m.u = dev.alloc(4 * moe_rows * moe_i)?;
            m.h = dev.alloc(4 * moe_rows * moe_i)?;
            m.ys = dev.alloc(4 * moe_rows * moe_d)?;
            if moe_si > 0 {
                m.sg = dev.alloc(4 * chunk * moe_si)?;
                m.su = dev.alloc(4 * chunk * moe_si)?;
                m.sh = dev.alloc(4 * chunk * moe_si)?;
                m.out = dev.alloc(4 * chunk * moe_d)?;
            }
        }
        if g_in > 0 {
            s.gx = dev.alloc(4 * g_in)?;
            s.gy = dev.alloc(4 * g_out.max(1))?;
        }
        Ok(s)
    }

    /// Whether the module has a compressed-attention op (its rollback is limited to a chunk).
    pub(super) fn has_slots(&self) -> bool {
        !self.slots.is_empty()
    }
}

/// Floats of the kq2-rotated activation scratch the DS4 matmuls of `module` need.
pub(super) fn xr_floats(module: &VerifiedModule, chunk: usize) -> Result<usize, BackendError> {
    let mut n = 0usize;
    for inst in &module.insts {
        let mats: Vec<(ParamId, usize)> = match &inst.op {
            Op::Moe { w, gate, up, down, shared, .. } => {
                let rows = chunk * usize_of(moe_top_k(module, *w).unwrap_or(0), "top_k")?;
                let mut v = vec![(*gate, rows), (*up, rows), (*down, rows)];
                if let Some(s) = shared {
                    v.extend([(s.gate, chunk), (s.up, chunk), (s.down, chunk)]);
                }
                v
            }
            Op::GroupedMatMul { w, .. } => vec![(*w, chunk)],
            _ => vec![],
        };
        for (p, rows) in mats {
            if crate::formats::needs_rotated_x(module.param(p).ty.dtype) {
                n = n.max(rows * dims(module, p)?.last().copied().unwrap_or(0));
            }
        }
    }
    Ok(n)
}

/// The matmul-like weights of a DS4 op (uploaded in their stored layout).
pub(super) fn weights_of(op: &Op) -> Vec<ParamId> {
    match op {
        Op::Moe { gate, up, down, shared, .. } => {
            let mut v = vec![*gate, *up, *down];
            if let Some(s) = shared {
                v.extend([s.gate, s.up, s.down]);
            }
            v
        }
        Op::GroupedMatMul { w, .. } => vec![*w],
        _ => vec![],
    }
}

impl<D: Device> PtxSession<D> {
    fn ds4_vector(&self, p: ParamId) -> Result<u64, BackendError> {
        self.ds4.vectors.get(&p).copied().ok_or_else(|| internal(format!("parameter #{} is not on the device", p.0)))
    }

    fn launch1(&mut self, name: &str, n: usize, args: &[Arg]) -> Result<(), BackendError> {
        let n = u32_of(n, "elements")?;
        self.dev.launch(name, [n.div_ceil(BLOCK).max(1), 1, 1], args)
    }

    /// `y[t, rows] = x[t, k] · wᵀ` with weight `p` (from byte `w_off`, `rows` rows): the
    /// CUDA-core matmul kernel, rotating `x` first for kq2. `experts`: the stacked-experts
    /// variant over `(experts, gathered rows, seg)`: the rows `seg` names (`t` is then the
    /// most rows an expert has).
    #[allow(clippy::too_many_arguments)]
    fn ds4_matmul(
        &mut self,
        p: ParamId,
        w_off: u64,
        x: u64,
        y: u64,
        rows: usize,
        t: usize,
        experts: Option<(usize, usize, u64)>,
    ) -> Result<(), BackendError> {
        let module = self.module.clone();
        let ty = &module.param(p).ty;
        let dt = ty.dtype;
        let k = usize_of(ty.last_fixed().unwrap_or(0), "row length")?;
        let rb = usize_of(dt.row_bytes(k as u64).unwrap_or(0), "row bytes")?;
        let mut xr = x;
        if crate::formats::needs_rotated_x(dt) {
            let rows_x = experts.map_or(t, |(_, total_rows, _)| total_rows);
            let nn = u32_of(rows_x * k, "elements")?;
            let args = [Arg::Ptr(x), Arg::Ptr(self.xr), Arg::U32(nn)];
            self.dev.launch(crate::lower::KQ2_ROTATE, [nn.div_ceil(BLOCK), 1, 1], &args)?;
            xr = self.xr;
        }
        let ragged = k % 8 != 0;
        let mut args = vec![
            Arg::Ptr(self.param(p)? + w_off),
            Arg::Ptr(x),
            Arg::Ptr(xr),
            Arg::Ptr(y),
            Arg::Ptr(0),
            Arg::Ptr(self.tables.get(&dt).copied().unwrap_or(0)),
            Arg::U32(u32_of(rows, "rows")?),
            Arg::U32(u32_of(k, "row length")?),
            Arg::U32(u32_of(t, "tokens")?),
            Arg::U32(u32_of(rb, "row bytes")?),
        ];
        let rows = u32_of(rows, "rows")?;
        match experts {
            Some((e, _, seg)) => {
                args.push(Arg::Ptr(seg));
                args.push(Arg::U32(u32_of(rows as usize * rb, "bytes per expert")?));
                let grid = kernels::matmul_experts_grid(rows, t as u32, u32_of(e, "experts")?);
                self.dev.launch(&kernels::matmul_experts_name(dt, ragged), grid, &args)
            }
            None => {
                self.dev.launch(&kernels::matmul_name(dt, false, ragged), kernels::matmul_grid(rows, t as u32), &args)
            }
        }
    }

    /// Queues the launches of DS4 op `i` over `t` tokens.
    pub(super) fn launch_ds4(&mut self, i: usize, t: usize) -> Result<(), BackendError> {
        let module = self.module.clone();
        let op = &module.insts[i].op;
        let y = self.bufs[i].ok_or_else(|| internal(format!("%{i} has no buffer")))?;
        let cols = self.cols[i];
        let tu = u32_of(t, "tokens")?;
        match op {
            Op::Repeat { x, times } => {
                let times = usize_of(*times, "times")?;
                let args = [
                    Arg::Ptr(self.buf(*x)?),
                    Arg::Ptr(y),
                    Arg::U32(u32_of(t * cols, "elements")?),
                    Arg::U32(u32_of(cols / times.max(1), "columns")?),
                    Arg::U32(times as u32),
                ];
                self.launch1("ds4_repeat", t * cols, &args)
            }
            Op::HcCoeffs { f, base, scale, streams, iters, eps } => {
                let pre_only = cols as u64 == *streams;
                let args = [
                    Arg::Ptr(self.buf(*f)?),
                    Arg::Ptr(self.ds4_vector(*base)?),
                    Arg::Ptr(self.ds4_vector(*scale)?),
                    Arg::Ptr(y),
                    Arg::U32(tu),
                    Arg::U32(u32_of(usize_of(*iters, "iterations")?, "iterations")?),
                    Arg::F32(*eps),
                ];
                self.launch1(&k4::hc_coeffs_name(*streams, pre_only), t, &args)
            }
            Op::HcPre { x, c, streams } => {
                let args = [
                    Arg::Ptr(self.buf(*x)?),
                    Arg::Ptr(self.buf(*c)?),
                    Arg::Ptr(y),
                    Arg::U32(u32_of(t * cols, "elements")?),
                    Arg::U32(cols as u32),
                    Arg::U32(*streams as u32),
                    Arg::U32(u32_of(self.cols[c.index()], "columns")?),
                ];
                self.launch1("hc_pre", t * cols, &args)
            }
            Op::HcPost { x, y: yb, c, streams } => {
                let d = self.cols[yb.index()];
                let args = [
                    Arg::Ptr(self.buf(*x)?),
                    Arg::Ptr(self.buf(*yb)?),
                    Arg::Ptr(self.buf(*c)?),
                    Arg::Ptr(y),
                    Arg::U32(u32_of(t * cols, "elements")?),
                    Arg::U32(u32_of(d, "columns")?),
                    Arg::U32(*streams as u32),
                ];
                self.launch1("hc_post", t * cols, &args)
            }
            Op::MoeRoute { logits, ids, bias, table, attrs } => {
                let args = [
                    Arg::Ptr(self.buf(*logits)?),
                    Arg::Ptr(if ids.is_some() { self.ds4.ids.unwrap_or(0) } else { 0 }),
                    Arg::Ptr(bias.map(|b| self.ds4_vector(b)).transpose()?.unwrap_or(0)),
                    Arg::Ptr(table.map(|b| self.ds4_vector(b)).transpose()?.unwrap_or(0)),
                    Arg::Ptr(self.ds4.route),
                    Arg::Ptr(y),
                    Arg::U32(tu),
                    Arg::U32(u32_of(cols, "experts")?),
                    Arg::U32(u32_of(usize_of(attrs.top_k, "top_k")?, "top_k")?),
                    Arg::F32(attrs.scale),
                ];
                let hash = table.is_some() && ids.is_some();
                let name = k4::moe_route_name(attrs.scoring, hash, bias.is_some() && !hash);
                self.launch1(&name, t, &args)
            }
            Op::Moe { x, w, gate, up, down, shared, limit } => {
                let (xa, wa) = (self.buf(*x)?, self.buf(*w)?);
                let d = cols;
                let e = self.cols[w.index()];
                let top_k = usize_of(moe_top_k(&module, *w).unwrap_or(0), "top_k")?.min(e);
                let rows = t * top_k;
                let inter = dims(&module, *gate)?[1];
                let m = std::mem::take(&mut self.ds4.moe);
                let r = (|| {
                    let (eu, du) = (u32_of(e, "experts")?, u32_of(d, "columns")?);
                    let args =
                        [Arg::Ptr(wa), Arg::Ptr(m.seg), Arg::Ptr(m.idx), Arg::Ptr(m.at), Arg::U32(tu), Arg::U32(eu)];
                    self.dev.launch("moe_plan", [1, 1, 1], &args)?;
                    let n = u32_of(rows * d, "elements")?;
                    let args = [
                        Arg::Ptr(xa),
                        Arg::Ptr(m.idx),
                        Arg::Ptr(m.seg),
                        Arg::Ptr(m.xs),
                        Arg::U32(n),
                        Arg::U32(du),
                        Arg::U32(eu),
                    ];
                    self.launch1("moe_gather", rows * d, &args)?;
                    self.ds4_matmul(*gate, 0, m.xs, m.g, inter, t, Some((e, rows, m.seg)))?;
                    self.ds4_matmul(*up, 0, m.xs, m.u, inter, t, Some((e, rows, m.seg)))?;
                    let lim = if *limit > 0.0 { *limit } else { f32::INFINITY };
                    let n = u32_of(rows * inter, "elements")?;
                    let args = [Arg::Ptr(m.g), Arg::Ptr(m.u), Arg::Ptr(m.h), Arg::U32(n), Arg::F32(lim)];
                    self.launch1("moe_swiglu", rows * inter, &args)?;
                    self.ds4_matmul(*down, 0, m.h, m.ys, d, t, Some((e, rows, m.seg)))?;
                    if let Some(s) = shared {
                        let si = dims(&module, s.gate)?[0];
                        self.ds4_matmul(s.gate, 0, xa, m.sg, si, t, None)?;
                        self.ds4_matmul(s.up, 0, xa, m.su, si, t, None)?;
                        let n = u32_of(t * si, "elements")?;
                        let args = [Arg::Ptr(m.sg), Arg::Ptr(m.su), Arg::Ptr(m.sh), Arg::U32(n), Arg::F32(lim)];
                        self.launch1("moe_swiglu", t * si, &args)?;
                        self.ds4_matmul(s.down, 0, m.sh, m.out, d, t, None)?;
                    }
                    let args = [
                        Arg::Ptr(wa),
                        Arg::Ptr(m.at),
                        Arg::Ptr(m.ys),
                        Arg::Ptr(if shared.is_some() { m.out } else { 0 }),
                        Arg::Ptr(y),
                        Arg::U32(u32_of(t * d, "elements")?),
                        Arg::U32(du),
                        Arg::U32(eu),
                        Arg::U32(u32_of(rows.max(1), "rows")?),
                        Arg::U32(shared.is_some() as u32),
                    ];
                    self.launch1("moe_combine", t * d, &args)
                })();
                self.ds4.moe = m;
                r
            }
            Op::GroupedMatMul { x, w, groups } => {
                let g = usize_of(*groups, "groups")?.max(1);
                let wd = dims(&module, *w)?;
                let (r, k) = (wd[0] / g, wd[1]);
                let rb = usize_of(module.param(*w).ty.dtype.row_bytes(k as u64).unwrap_or(0), "row bytes")?;
                let (xa, gx, gy) = (self.buf(*x)?, self.ds4.gx, self.ds4.gy);
                for gi in 0..g {
                    let u = |v: usize| u32_of(v, "columns");
                    let args = [
                        Arg::Ptr(xa),
                        Arg::Ptr(gx),
                        Arg::U32(u(t * k)?),
                        Arg::U32(u(k)?),
                        Arg::U32(u(g * k)?),
                        Arg::U32(u(gi * k)?),
                        Arg::U32(u(k)?),
                        Arg::U32(0),
                    ];
                    self.launch1("ds4_copy_cols", t * k, &args)?;
                    self.ds4_matmul(*w, (gi * r * rb) as u64, gx, gy, r, t, None)?;
                    let args = [
                        Arg::Ptr(gy),
                        Arg::Ptr(y),
                        Arg::U32(u(t * r)?),
                        Arg::U32(u(r)?),
                        Arg::U32(u(r)?),
                        Arg::U32(0),
                        Arg::U32(u(g * r)?),
                        Arg::U32(u(gi * r)?),
                    ];
                    self.launch1("ds4_copy_cols", t * r, &args)?;
                }
                Ok(())
            }
            Op::CompressedAttention { q, kv, sink, comp, indexer, attrs } => {
                let slot = self.ds4.slots.get(&i).ok_or_else(|| internal("compressed slot missing"))?;
                let (raw, ring, cap, table) = (slot.raw, slot.ring, slot.cap, slot.table);
                let hd = usize_of(attrs.head_dim, "head_dim")?;
                let rd = u32_of(usize_of(attrs.rope.rot_dims, "rope dims")?, "rope dims")?;
                let ratio = u32_of(usize_of(attrs.ratio, "ratio")?, "ratio")?;
                let step = self.step;
                let u = |v: usize| u32_of(v, "size");
                // Compressor streams: projections into their rings, then the windows this call closes.
                let streams: Vec<(&CompressorOperands, &Stream)> = [
                    comp.as_ref().zip(slot.comp.as_ref()),
                    indexer.as_ref().map(|ix| &ix.keys).zip(slot.index.as_ref()),
                ]
                .into_iter()
                .flatten()
                .collect();
                let slot_info: Vec<(u64, u64, Stream)> = streams
                    .iter()
                    .map(|(c, s)| Ok::<_, BackendError>((self.buf(c.kv)?, self.buf(c.gate)?, **s)))
                    .collect::<Result<_, _>>()?;
                // Raw rows, rotated, into the ring.
                let args = [
                    Arg::Ptr(self.buf(*kv)?),
                    Arg::Ptr(raw),
                    Arg::Ptr(table),
                    Arg::Ptr(step),
                    Arg::U32(u(t * hd)?),
                    Arg::U32(u(hd)?),
                    Arg::U32(u(hd)?),
                    Arg::U32(rd),
                    Arg::U32(u(ring)?),
                ];
                self.launch1("ca_rope", t * hd, &args)?;
                for (kv_v, gate_v, st) in slot_info {
                    let Stream { kv: kv_r, gate: gate_r, entries, width, dim, ape, norm } = st;
                    for (src, dst) in [(kv_v, kv_r), (gate_v, gate_r)] {
                        let args = [
                            Arg::Ptr(src),
                            Arg::Ptr(dst),
                            Arg::Ptr(step),
                            Arg::U32(u(t * width)?),
                            Arg::U32(u(width)?),
                            Arg::U32(u(ring)?),
                        ];
                        self.launch1("ca_store", t * width, &args)?;
                    }
                    let args = [
                        Arg::Ptr(kv_r),
                        Arg::Ptr(gate_r),
                        Arg::Ptr(ape),
                        Arg::Ptr(norm),
                        Arg::Ptr(entries),
                        Arg::Ptr(table),
                        Arg::Ptr(step),
                        Arg::U32(tu),
                        Arg::U32(ratio),
                        Arg::U32(u(dim)?),
                        Arg::U32(u(width)?),
                        Arg::U32(u(ring)?),
                        Arg::F32(attrs.eps),
                        Arg::U32(rd),
                    ];
                    self.dev.launch("ca_compress", [tu / ratio.max(1) + 1, 1, 1], &args)?;
                }
                let slot = &self.ds4.slots[&i];
                let (sel, topk) = match (indexer, slot.index.as_ref()) {
                    (Some(ix), Some(st)) => {
                        let (nh, di) = (usize_of(attrs.index_heads, "heads")?, usize_of(attrs.index_dim, "dim")?);
                        let (iq, scores, sel, entries) = (self.ds4.iq, self.ds4.scores, self.ds4.sel, st.entries);
                        let args = [
                            Arg::Ptr(self.buf(ix.q)?),
                            Arg::Ptr(iq),
                            Arg::Ptr(table),
                            Arg::Ptr(step),
                            Arg::U32(u(t * nh * di)?),
                            Arg::U32(u(nh * di)?),
                            Arg::U32(u(di)?),
                            Arg::U32(rd),
                            Arg::U32(0),
                        ];
                        self.launch1("ca_rope", t * nh * di, &args)?;
                        let args = [
                            Arg::Ptr(iq),
                            Arg::Ptr(self.buf(ix.w)?),
                            Arg::Ptr(entries),
                            Arg::Ptr(scores),
                            Arg::Ptr(step),
                            Arg::U32(u(nh)?),
                            Arg::U32(u(di)?),
                            Arg::U32(ratio),
                            Arg::U32(u(cap)?),
                            Arg::F32(1.0 / (nh as f32).sqrt()),
                            Arg::F32(1.0 / (di as f32).sqrt()),
                        ];
                        self.dev.launch("ca_index_scores", [u(cap)?.div_ceil(BLOCK), tu, 1], &args)?;
                        let topk = u(usize_of(attrs.topk, "topk")?.max(1))?;
                        let args = [
                            Arg::Ptr(scores),
                            Arg::Ptr(sel),
                            Arg::Ptr(step),
                            Arg::U32(ratio),
                            Arg::U32(u(cap)?),
                            Arg::U32(topk),
                        ];
                        self.dev.launch("ca_index_topk", [tu, 1, 1], &args)?;
                        (sel, topk)
                    }
                    _ => (self.ds4.sel, 0),
                };
                let slot = &self.ds4.slots[&i];
                let (comp_rows, ratio_arg, cap_arg) = match slot.comp.as_ref() {
                    Some(s) => (s.entries, ratio, u(cap)?),
                    None => (slot.no_comp, 0, 1),
                };
                let args = [
                    Arg::Ptr(self.buf(*q)?),
                    Arg::Ptr(raw),
                    Arg::Ptr(comp_rows),
                    Arg::Ptr(sel),
                    Arg::Ptr(self.ds4_vector(*sink)?),
                    Arg::Ptr(table),
                    Arg::Ptr(y),
                    Arg::Ptr(step),
                    Arg::U32(u(usize_of(attrs.heads, "heads")?)?),
                    Arg::F32(attrs.scale),
                    Arg::U32(u(usize_of(attrs.window, "window")?)?),
                    Arg::U32(u(ring)?),
                    Arg::U32(ratio_arg),
                    Arg::U32(topk),
                    Arg::U32(cap_arg),
                    Arg::U32(rd),
                ];
                let heads = u(usize_of(attrs.heads, "heads")?)?;
                self.dev.launch(&k4::ca_attend_name(hd as u32), [heads, tu, 1], &args)
            }
            _ => Err(internal(format!("`{}` is not a DeepSeek-V4 op", op.name()))),
        }
    }
}
