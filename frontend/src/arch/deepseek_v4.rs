//! DeepSeek-V4 (`model_type: deepseek_v4`): reads its config.json, maps its tensor names,
//! and lowers it with its own graph — hyper-connections, compressed sparse attention
//! and mixtures of experts are not the Llama family's decoder.
//!
//! The computation is the one `tests/fixtures/deepseek-v4/README.md` specifies (and
//! `tests/oracle/deepseek_v4_numpy.py` runs). Per layer, around each of attention and MoE:
//!
//! ```text
//! c = hc_coeffs(matmul(rms_norm(X), hc_fn))       X: the hc_mult streams [T, n·D]
//! h = rms_norm(hc_pre(X, c), norm)
//! X = hc_post(X, block(h), c)
//! ```
//!
//! Tensor names: Hugging Face's `save_pretrained` spelling (`model.` prefix,
//! `model.embed_tokens.weight`, `model.hc_head.hc_fn`, `lm_head.weight`) and the official
//! upstream one (`embed.weight`, `head.weight`, `hc_head_fn`, `layers.N.…`) both map to
//! kiln's canonical GGUF-style names (`blk.N.attn_q_a.weight`, …; see [`canonical`]).
//! Routed experts are stored one tensor per expert and stacked into `[E, I, D]` params
//! (`blk.N.ffn_gate_exps.weight`, llama.cpp's convention); the hash-routing table `tid2eid`
//! (int64) becomes an f32 param of exact expert numbers (`blk.N.ffn_gate_hash.weight`).

use kiln_ir::{
    CompressAttrs, CompressorOperands, DType, ExpertParams, IndexTopkAttrs, Meta, Module, MoeRouteAttrs, Op, ParamId,
    RotaryAttrs, Scoring, SparseAttentionAttrs, TensorType, ValueId,
};
use serde_json::Value;

use super::{Arch, GgufMeta, HfConfig};
use crate::decoder::{DecoderConfig, TensorSource};
use crate::error::{FrontendError, FrontendResult};
use crate::weights::{SourceTensor, TensorBytes, Weights, plain_to_f32};

/// Attention kind of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Raw sliding window only.
    Sliding,
    /// Compressed sparse attention: overlapping compressor windows and the Lightning Indexer.
    Csa,
    /// Heavily compressed attention: non-overlapping windows, every visible row.
    Hca,
}

/// A RoPE table's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    /// (factor, original_max_position_embeddings, beta_fast, beta_slow) for YaRN.
    pub yarn: Option<(f32, u64, f32, f32)>,
}

/// DeepSeek-V4 hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct V4Config {
    pub vocab: u64,
    pub d: u64,
    pub n_layers: usize,
    pub heads: u64,
    pub head_dim: u64,
    pub rot_dims: u64,
    pub q_lora: u64,
    pub o_groups: u64,
    pub o_lora: u64,
    pub experts: u64,
    pub top_k: u64,
    pub moe_inter: u64,
    pub scoring: Scoring,
    pub routed_scale: f32,
    pub swiglu_limit: f32,
    pub kinds: Vec<LayerKind>,
    /// Whether each layer routes by token id (`hash_moe`).
    pub hash: Vec<bool>,
    pub ratio_csa: u64,
    pub ratio_hca: u64,
    pub window: u64,
    pub index_heads: u64,
    pub index_dim: u64,
    pub index_topk: u64,
    pub hc: u64,
    pub sinkhorn_iters: u64,
    pub hc_eps: f32,
    pub eps: f32,
    pub rope_main: RopeParams,
    pub rope_compress: RopeParams,
    pub context: u64,
}

const MAX_DIM: u64 = 1 << 20;

/// Reads a config.json; errors name the file and the key.
pub fn config(c: &HfConfig) -> FrontendResult<V4Config> {
    let f = c.file;
    let bad = |msg: String| FrontendError::bad(f, msg);
    let range = |key: &str, v: u64, max: u64| -> FrontendResult<u64> {
        if v == 0 || v > max {
            return Err(bad(format!("`{key}` = {v} is out of range (1..={max})")));
        }
        Ok(v)
    };
    let req = |key: &str, max: u64| -> FrontendResult<u64> { range(key, c.u64(key)?, max) };
    let n_layers = req("num_hidden_layers", 1024)? as usize;
    let head_dim = req("head_dim", 4096)?;
    let strings = |key: &str| -> FrontendResult<Option<Vec<String>>> {
        match c.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| bad(format!("`{key}` must list strings, found {v}")))
                })
                .collect::<FrontendResult<Vec<_>>>()
                .map(Some),
            Some(v) => Err(bad(format!("`{key}` must be a list of strings, found {v}"))),
        }
    };
    let rates = c.json.get("compress_rates");
    let rate = |key: &str, flat: &str, default: u64| -> FrontendResult<u64> {
        let v = match rates.and_then(|r| r.get(key)) {
            Some(v) => {
                v.as_u64().ok_or_else(|| bad(format!("`compress_rates.{key}` must be an integer, found {v}")))?
            }
            None => c.opt_u64(flat)?.unwrap_or(default),
        };
        range(&format!("compress_rates.{key}"), v, 1 << 16)
    };
    let ratio_csa = rate("compressed_sparse_attention", "compress_rate_csa", 4)?;
    let ratio_hca = rate("heavily_compressed_attention", "compress_rate_hca", 128)?;
    let kinds: Vec<LayerKind> = match strings("layer_types")? {
        Some(list) => list
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(LayerKind::Sliding),
                "compressed_sparse_attention" => Ok(LayerKind::Csa),
                "heavily_compressed_attention" => Ok(LayerKind::Hca),
                other => Err(FrontendError::unsupported(f, format!("layer type `{other}`"))),
            })
            .collect::<FrontendResult<_>>()?,
        // The upstream form: a compress ratio per layer (0 = sliding window only).
        None => match c.json.get("compress_ratios") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| match v.as_u64() {
                    Some(0) => Ok(LayerKind::Sliding),
                    Some(r) if r == ratio_csa => Ok(LayerKind::Csa),
                    Some(r) if r == ratio_hca => Ok(LayerKind::Hca),
                    _ => Err(FrontendError::unsupported(
                        f,
                        format!("compress ratio {v} (0, the CSA rate {ratio_csa} or the HCA rate {ratio_hca})"),
                    )),
                })
                .collect::<FrontendResult<_>>()?,
            _ => {
                return Err(bad("missing `layer_types` (sliding_attention | compressed_sparse_attention | \
                                heavily_compressed_attention per layer) or `compress_ratios`"
                    .into()));
            }
        },
    };
    if kinds.len() < n_layers {
        return Err(bad(format!("`layer_types` lists {} layers, num_hidden_layers is {n_layers}", kinds.len())));
    }
    let hash: Vec<bool> = match strings("mlp_layer_types")? {
        Some(list) => list
            .iter()
            .map(|t| match t.as_str() {
                "hash_moe" => Ok(true),
                "moe" => Ok(false),
                other => Err(FrontendError::unsupported(f, format!("mlp layer type `{other}`"))),
            })
            .collect::<FrontendResult<_>>()?,
        None => {
            let nh = c.opt_u64("num_hash_layers")?.unwrap_or(3) as usize;
            (0..n_layers).map(|i| i < nh).collect()
        }
    };
    if hash.len() < n_layers {
        return Err(bad(format!("`mlp_layer_types` lists {} layers, num_hidden_layers is {n_layers}", hash.len())));
    }
    let scoring = match c.opt_str("scoring_func")?.as_deref().unwrap_or("sqrtsoftplus") {
        "sqrtsoftplus" => Scoring::SqrtSoftplus,
        "sigmoid" => Scoring::Sigmoid,
        "softmax" => Scoring::Softmax,
        other => {
            return Err(FrontendError::unsupported(
                f,
                format!("scoring_func `{other}` (kiln knows sqrtsoftplus, sigmoid, softmax)"),
            ));
        }
    };
    if let Some(act) = c.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(FrontendError::unsupported(f, format!("hidden_act `{act}`")));
    }
    let prf = match c.opt_f32("partial_rotary_factor")? {
        Some(p) => p,
        None => match c.opt_u64("qk_rope_head_dim")? {
            Some(r) => r as f32 / head_dim as f32,
            None => 64.0 / 512.0,
        },
    };
    let rot_dims = (head_dim as f32 * prf) as u64;
    if rot_dims == 0 || rot_dims > head_dim || !rot_dims.is_multiple_of(2) {
        return Err(bad(format!("partial_rotary_factor {prf} gives {rot_dims} rotary dims of head_dim {head_dim}")));
    }
    let (rope_main, rope_compress) = rope(c)?;
    let eps = c.opt_f32("rms_norm_eps")?.unwrap_or(1e-6);
    let hc_eps = c.opt_f32("hc_eps")?.unwrap_or(1e-6);
    for (k, v) in [("rms_norm_eps", eps), ("hc_eps", hc_eps)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(bad(format!("`{k}` = {v} must be finite and non-negative")));
        }
    }
    let cfg = V4Config {
        vocab: req("vocab_size", 1 << 24)?,
        d: req("hidden_size", MAX_DIM)?,
        n_layers,
        heads: req("num_attention_heads", 4096)?,
        head_dim,
        rot_dims,
        q_lora: req("q_lora_rank", MAX_DIM)?,
        o_groups: req("o_groups", 4096)?,
        o_lora: req("o_lora_rank", MAX_DIM)?,
        experts: req("n_routed_experts", 1 << 16)?,
        top_k: req("num_experts_per_tok", 1 << 16)?,
        moe_inter: req("moe_intermediate_size", MAX_DIM)?,
        scoring,
        routed_scale: c.opt_f32("routed_scaling_factor")?.unwrap_or(1.5),
        swiglu_limit: c.opt_f32("swiglu_limit")?.unwrap_or(10.0),
        kinds: kinds[..n_layers].to_vec(),
        hash: hash[..n_layers].to_vec(),
        ratio_csa,
        ratio_hca,
        window: req("sliding_window", 1 << 24)?,
        index_heads: req("index_n_heads", 4096)?,
        index_dim: req("index_head_dim", 4096)?,
        index_topk: req("index_topk", 1 << 24)?,
        hc: req("hc_mult", 64)?,
        sinkhorn_iters: req("hc_sinkhorn_iters", 1000)?,
        hc_eps,
        eps,
        rope_main,
        rope_compress,
        context: c.opt_u64("max_position_embeddings")?.unwrap_or(4096).min(1 << 24),
    };
    if !(cfg.swiglu_limit.is_finite() && cfg.swiglu_limit >= 0.0 && cfg.routed_scale.is_finite()) {
        return Err(bad("`swiglu_limit` and `routed_scaling_factor` must be finite".into()));
    }
    if cfg.top_k > cfg.experts {
        return Err(bad(format!("num_experts_per_tok {} exceeds n_routed_experts {}", cfg.top_k, cfg.experts)));
    }
    if !(cfg.heads * head_dim).is_multiple_of(cfg.o_groups) || !cfg.heads.is_multiple_of(cfg.o_groups) {
        return Err(bad(format!("o_groups {} does not divide {} heads", cfg.o_groups, cfg.heads)));
    }
    if cfg.kinds.contains(&LayerKind::Csa) && rot_dims > cfg.index_dim {
        return Err(bad(format!("{rot_dims} rotary dims do not fit index_head_dim {}", cfg.index_dim)));
    }
    Ok(cfg)
}

/// The main and compress RoPE tables: `rope_parameters: {main, compress}`, or the flat
/// form (`rope_theta`, `compress_rope_theta`, YaRN keys for the compress table).
fn rope(c: &HfConfig) -> FrontendResult<(RopeParams, RopeParams)> {
    let f = c.file;
    let table = |v: &Value, default_theta: f32, what: &str| -> FrontendResult<RopeParams> {
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let theta = num("rope_theta").map_or(default_theta, |t| t as f32);
        if !(theta > 1.0 && theta.is_finite()) {
            return Err(FrontendError::bad(f, format!("{what} rope_theta {theta} must be above 1")));
        }
        match v.get("rope_type").and_then(Value::as_str).unwrap_or("default") {
            "default" => Ok(RopeParams { theta, yarn: None }),
            "yarn" => {
                let factor = num("factor").unwrap_or(1.0) as f32;
                let orig = v.get("original_max_position_embeddings").and_then(Value::as_u64).unwrap_or(0);
                if let Some(af) = num("attention_factor")
                    && af != 1.0
                {
                    return Err(FrontendError::unsupported(f, format!("{what} YaRN attention_factor {af} (only 1.0)")));
                }
                let fast = num("beta_fast").unwrap_or(32.0) as f32;
                let slow = num("beta_slow").unwrap_or(1.0) as f32;
                if factor <= 1.0 {
                    return Ok(RopeParams { theta, yarn: None });
                }
                if orig == 0 || !factor.is_finite() || !(fast > 0.0 && slow > 0.0) {
                    return Err(FrontendError::bad(
                        f,
                        format!("{what} YaRN parameters are incomplete or out of range"),
                    ));
                }
                Ok(RopeParams { theta, yarn: Some((factor, orig, fast, slow)) })
            }
            other => Err(FrontendError::unsupported(f, format!("{what} rope_type `{other}`"))),
        }
    };
    let rp = c.json.get("rope_parameters").filter(|v| v.is_object());
    let main_theta = c.opt_f32("rope_theta")?.unwrap_or(10000.0);
    let comp_theta = c.opt_f32("compress_rope_theta")?.unwrap_or(160000.0);
    match (rp.and_then(|r| r.get("main")), rp.and_then(|r| r.get("compress"))) {
        (Some(m), Some(cm)) if m.is_object() && cm.is_object() => {
            Ok((table(m, main_theta, "main")?, table(cm, comp_theta, "compress")?))
        }
        _ => {
            // Flat form: the YaRN keys belong to the compress table.
            let mut flat = rp.cloned().unwrap_or_else(|| Value::Object(Default::default()));
            if let Value::Object(o) = &mut flat {
                o.insert("rope_theta".into(), Value::from(f64::from(comp_theta)));
            }
            let main = RopeParams { theta: main_theta, yarn: None };
            Ok((main, table(&flat, comp_theta, "compress")?))
        }
    }
}

/// Hugging Face / upstream tensor name → kiln's canonical name (`None`: not used, e.g. `mtp.*`).
pub fn canonical(hf: &str) -> Option<String> {
    let name = hf.strip_prefix("model.").unwrap_or(hf);
    let top = match name {
        "embed_tokens.weight" | "embed.weight" => Some("token_embd.weight"),
        "lm_head.weight" | "head.weight" => Some("output.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "hc_head.hc_fn" | "hc_head_fn" => Some("output_hc_fn.weight"),
        "hc_head.hc_base" | "hc_head_base" => Some("output_hc_base.weight"),
        "hc_head.hc_scale" | "hc_head_scale" => Some("output_hc_scale.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = name.strip_prefix("layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    if let Some(e) = name.strip_prefix("ffn.experts.") {
        let (e, w) = e.split_once('.')?;
        let e: u32 = e.parse().ok()?;
        let kind = match w {
            "w1.weight" => "ffn_gate_exps",
            "w3.weight" => "ffn_up_exps",
            "w2.weight" => "ffn_down_exps",
            _ => return None,
        };
        return Some(format!("blk.{layer}.{kind}.{e}"));
    }
    let canon = match name {
        "hc_attn_fn" => "hc_attn_fn.weight",
        "hc_attn_base" => "hc_attn_base.weight",
        "hc_attn_scale" => "hc_attn_scale.weight",
        "hc_ffn_fn" => "hc_ffn_fn.weight",
        "hc_ffn_base" => "hc_ffn_base.weight",
        "hc_ffn_scale" => "hc_ffn_scale.weight",
        "attn_norm.weight" => "attn_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "attn.wq_a.weight" => "attn_q_a.weight",
        "attn.q_norm.weight" => "attn_q_a_norm.weight",
        "attn.wq_b.weight" => "attn_q_b.weight",
        "attn.wkv.weight" => "attn_kv.weight",
        "attn.norm.weight" => "attn_kv_norm.weight",
        "attn.attn_sink" => "attn_sinks.weight",
        "attn.wo_a.weight" => "attn_output_a.weight",
        "attn.wo_b.weight" => "attn_output_b.weight",
        "attn.compressor.wkv.weight" => "attn_comp_kv.weight",
        "attn.compressor.wgate.weight" => "attn_comp_gate.weight",
        "attn.compressor.ape" => "attn_comp_ape.weight",
        "attn.compressor.norm.weight" => "attn_comp_norm.weight",
        "attn.indexer.compressor.wkv.weight" => "attn_idx_kv.weight",
        "attn.indexer.compressor.wgate.weight" => "attn_idx_gate.weight",
        "attn.indexer.compressor.ape" => "attn_idx_ape.weight",
        "attn.indexer.compressor.norm.weight" => "attn_idx_norm.weight",
        "attn.indexer.wq_b.weight" => "attn_idx_q.weight",
        "attn.indexer.weights_proj.weight" => "attn_idx_w.weight",
        "ffn.gate.weight" => "ffn_gate_inp.weight",
        "ffn.gate.bias" => "exp_probs_b.bias",
        "ffn.gate.tid2eid" => "ffn_gate_hash.weight",
        "ffn.shared_experts.w1.weight" => "ffn_gate_shexp.weight",
        "ffn.shared_experts.w3.weight" => "ffn_up_shexp.weight",
        "ffn.shared_experts.w2.weight" => "ffn_down_shexp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{canon}"))
}

/// Builds the module, fetching tensors by canonical name.
struct Builder<'a> {
    src: &'a dyn TensorSource,
    module: Module,
    weights: Weights,
}

impl Builder<'_> {
    fn bad(&self, msg: impl Into<String>) -> FrontendError {
        FrontendError::bad(self.src.file(), msg)
    }

    fn push(&mut self, op: Op) -> FrontendResult<ValueId> {
        self.module.push(op).map_err(|e| FrontendError::Internal(format!("lowering deepseek_v4: {e}")))
    }

    fn add(&mut self, name: &str, t: SourceTensor) -> FrontendResult<ParamId> {
        let id = self.module.add_param(name, t.ty).map_err(|e| FrontendError::Internal(e.to_string()))?;
        self.weights.tensors.push(t.bytes);
        Ok(id)
    }

    fn fetch(&self, name: &str, shape: &[u64]) -> FrontendResult<SourceTensor> {
        let t = self.src.get(name)?.ok_or_else(|| self.bad(format!("missing tensor {name}")))?;
        let dims = t.ty.fixed_dims().unwrap_or_default();
        if dims != shape {
            return Err(
                self.bad(format!("tensor {name} has shape {dims:?}, expected {shape:?} for this configuration"))
            );
        }
        if t.ty.storage_bytes() != Some(t.bytes.as_bytes().len() as u64) {
            return Err(self.bad(format!("tensor {name}: stored size does not match {}", t.ty)));
        }
        Ok(t)
    }

    /// A matrix (any float dtype), kept as stored.
    fn matrix(&mut self, name: &str, shape: &[u64]) -> FrontendResult<ParamId> {
        let t = self.fetch(name, shape)?;
        self.add(name, t)
    }

    /// A small tensor (norm, bias, scale, gate bias per slot), converted to f32.
    fn floats(&mut self, name: &str, shape: &[u64]) -> FrontendResult<ParamId> {
        let t = self.fetch(name, shape)?;
        let vals = plain_to_f32(t.ty.dtype, t.bytes.as_bytes())
            .ok_or_else(|| self.bad(format!("tensor {name}: expected f32/f16/bf16, found {}", t.ty.dtype)))?;
        if vals.iter().any(|v| !v.is_finite()) {
            return Err(self.bad(format!("tensor {name} contains NaN or infinite values")));
        }
        self.add(name, SourceTensor { ty: TensorType::fixed(DType::F32, shape), bytes: TensorBytes::from_f32(&vals) })
    }

    /// `E` per-expert matrices `{kind}.{e}` stacked into one `[E, rows, cols]` param `{kind}.weight`.
    fn stacked(&mut self, kind: &str, experts: u64, rows: u64, cols: u64) -> FrontendResult<ParamId> {
        let mut bytes = Vec::new();
        let mut dtype = None;
        for e in 0..experts {
            let t = self.fetch(&format!("{kind}.{e}"), &[rows, cols])?;
            if dtype.is_some_and(|d| d != t.ty.dtype) {
                return Err(self.bad(format!("experts of {kind} are stored in different dtypes")));
            }
            dtype = Some(t.ty.dtype);
            bytes.extend_from_slice(t.bytes.as_bytes());
        }
        let dtype = dtype.ok_or_else(|| self.bad(format!("no experts for {kind}")))?;
        let ty = TensorType::fixed(dtype, &[experts, rows, cols]);
        self.add(&format!("{kind}.weight"), SourceTensor { ty, bytes: TensorBytes::owned(bytes) })
    }

    /// The token → expert table (int64 in the checkpoint) as an f32 param of expert numbers.
    fn hash_table(&mut self, name: &str, vocab: u64, k: u64, experts: u64) -> FrontendResult<ParamId> {
        let (shape, vals) = self.src.get_ints(name)?.ok_or_else(|| self.bad(format!("missing tensor {name}")))?;
        if shape != [vocab, k] {
            return Err(self.bad(format!("tensor {name} has shape {shape:?}, expected {:?}", [vocab, k])));
        }
        if let Some(v) = vals.iter().find(|v| !(0..experts as i64).contains(v)) {
            return Err(self.bad(format!("tensor {name} names expert {v}, outside 0..{experts}")));
        }
        let f: Vec<f32> = vals.iter().map(|v| *v as f32).collect();
        self.add(
            name,
            SourceTensor { ty: TensorType::fixed(DType::F32, &[vocab, k]), bytes: TensorBytes::from_f32(&f) },
        )
    }

    fn rms(&mut self, x: ValueId, weight: Option<ParamId>, eps: f32, group: u64) -> FrontendResult<ValueId> {
        self.push(Op::RmsNorm { x, weight, eps, group })
    }

    fn mm(&mut self, x: ValueId, w: ParamId) -> FrontendResult<ValueId> {
        self.push(Op::MatMul { x, w, bias: None })
    }
}

fn rotary(c: &V4Config, p: &RopeParams) -> RotaryAttrs {
    let (yarn_factor, yarn_orig_ctx, yarn_beta_fast, yarn_beta_slow) = p.yarn.unwrap_or((1.0, 0, 0.0, 0.0));
    RotaryAttrs { rot_dims: c.rot_dims, theta: p.theta, yarn_factor, yarn_orig_ctx, yarn_beta_fast, yarn_beta_slow }
}

/// Lowers a DeepSeek-V4 checkpoint.
pub fn lower(c: &HfConfig, src: &dyn TensorSource, model_name: &str) -> FrontendResult<(Module, Weights)> {
    let cfg = config(c)?;
    let mut b = Builder { src, module: Module::new(model_name), weights: Weights::default() };
    let (d, n, hd, eps) = (cfg.d, cfg.hc, cfg.head_dim, cfg.eps);
    let m = &mut b.module;
    m.set_meta("arch", Meta::Str("deepseek_v4".into()));
    m.set_meta("context_length", Meta::Int(cfg.context as i64));
    m.set_meta("vocab_size", Meta::Int(cfg.vocab as i64));
    m.set_meta("n_layers", Meta::Int(cfg.n_layers as i64));
    m.set_meta("d_model", Meta::Int(d as i64));
    m.set_meta("hc_mult", Meta::Int(n as i64));

    let embd = b.matrix("token_embd.weight", &[cfg.vocab, d])?;
    let tokens = b.push(Op::Tokens)?;
    let e = b.push(Op::Embed { table: embd, ids: tokens })?;
    let mut x = b.push(Op::Repeat { x: e, times: n })?;
    let mix = (2 + n) * n;
    // mHC around `block`: returns the new streams.
    let hyper = |b: &mut Builder, x: ValueId, l: usize, which: &str| -> FrontendResult<(ValueId, ValueId)> {
        let p = |s: &str| format!("blk.{l}.hc_{which}_{s}.weight");
        let fnw = b.matrix(&p("fn"), &[mix, n * d])?;
        let base = b.floats(&p("base"), &[mix])?;
        let scale = b.floats(&p("scale"), &[3])?;
        let xn = b.rms(x, None, eps, 0)?;
        let f = b.mm(xn, fnw)?;
        let coeffs = b.push(Op::HcCoeffs { f, base, scale, streams: n, iters: cfg.sinkhorn_iters, eps: cfg.hc_eps })?;
        let h = b.push(Op::HcPre { x, c: coeffs, streams: n })?;
        Ok((h, coeffs))
    };
    for l in 0..cfg.n_layers {
        let t = |s: &str| format!("blk.{l}.{s}");
        let kind = cfg.kinds[l];
        // Attention.
        let (h, coeffs) = hyper(&mut b, x, l, "attn")?;
        let w = b.floats(&t("attn_norm.weight"), &[d])?;
        let a = b.rms(h, Some(w), eps, 0)?;
        let wqa = b.matrix(&t("attn_q_a.weight"), &[cfg.q_lora, d])?;
        let qn = b.floats(&t("attn_q_a_norm.weight"), &[cfg.q_lora])?;
        let wqb = b.matrix(&t("attn_q_b.weight"), &[cfg.heads * hd, cfg.q_lora])?;
        let qa = b.mm(a, wqa)?;
        let qr = b.rms(qa, Some(qn), eps, 0)?;
        let qb = b.mm(qr, wqb)?;
        let q = b.rms(qb, None, eps, hd)?;
        let wkv = b.matrix(&t("attn_kv.weight"), &[hd, d])?;
        let kvn = b.floats(&t("attn_kv_norm.weight"), &[hd])?;
        let kv0 = b.mm(a, wkv)?;
        let kv = b.rms(kv0, Some(kvn), eps, 0)?;
        let sink = b.floats(&t("attn_sinks.weight"), &[cfg.heads])?;
        let (ratio, overlap) = match kind {
            LayerKind::Sliding => (0, false),
            LayerKind::Csa => (cfg.ratio_csa, true),
            LayerKind::Hca => (cfg.ratio_hca, false),
        };
        let stream = |b: &mut Builder, pre: &str, dim: u64, overlap: bool| -> FrontendResult<CompressorOperands> {
            let width = if overlap { 2 * dim } else { dim };
            let wk = b.matrix(&t(&format!("{pre}_kv.weight")), &[width, d])?;
            let wg = b.matrix(&t(&format!("{pre}_gate.weight")), &[width, d])?;
            let ape = b.floats(&t(&format!("{pre}_ape.weight")), &[ratio, width])?;
            let norm = b.floats(&t(&format!("{pre}_norm.weight")), &[dim])?;
            let kv = b.mm(a, wk)?;
            let gate = b.mm(a, wg)?;
            Ok(CompressorOperands { kv, gate, ape, norm })
        };
        // The unfused form (as transformers' modules compute it: compressors, indexer,
        // attention); the `fuse_sparse_attention` pass makes it one `compressed_attention`.
        let rope = rotary(&cfg, if kind == LayerKind::Sliding { &cfg.rope_main } else { &cfg.rope_compress });
        let compress = |b: &mut Builder, c: CompressorOperands, index: bool| {
            let attrs = CompressAttrs { cache: l as u32, index, ratio, eps, rope: rope.clone() };
            b.push(Op::Compress { kv: c.kv, gate: c.gate, ape: c.ape, norm: c.norm, attrs })
        };
        let comp = if ratio > 0 {
            let c = stream(&mut b, "attn_comp", hd, overlap)?;
            Some(compress(&mut b, c, false)?)
        } else {
            None
        };
        let select = if kind == LayerKind::Csa {
            let c = stream(&mut b, "attn_idx", cfg.index_dim, true)?;
            let keys = compress(&mut b, c, true)?;
            let wq = b.matrix(&t("attn_idx_q.weight"), &[cfg.index_heads * cfg.index_dim, cfg.q_lora])?;
            let ww = b.matrix(&t("attn_idx_w.weight"), &[cfg.index_heads, d])?;
            let q = b.mm(qr, wq)?;
            let w = b.mm(a, ww)?;
            let attrs = IndexTopkAttrs { topk: cfg.index_topk, heads: cfg.index_heads };
            Some(b.push(Op::IndexTopk { q, w, keys, attrs })?)
        } else {
            None
        };
        let attrs = SparseAttentionAttrs {
            cache: l as u32,
            heads: cfg.heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: cfg.window,
            rope,
        };
        let o = b.push(Op::SparseAttention { q, kv, sink, comp, select, attrs })?;
        let g = cfg.o_groups;
        let woa = b.matrix(&t("attn_output_a.weight"), &[g * cfg.o_lora, cfg.heads * hd / g])?;
        let wob = b.matrix(&t("attn_output_b.weight"), &[d, g * cfg.o_lora])?;
        let mid = b.push(Op::GroupedMatMul { x: o, w: woa, groups: g })?;
        let y = b.mm(mid, wob)?;
        x = b.push(Op::HcPost { x, y, c: coeffs, streams: n })?;
        // Mixture of experts.
        let (h, coeffs) = hyper(&mut b, x, l, "ffn")?;
        let w = b.floats(&t("ffn_norm.weight"), &[d])?;
        let z = b.rms(h, Some(w), eps, 0)?;
        let router = b.matrix(&t("ffn_gate_inp.weight"), &[cfg.experts, d])?;
        let logits = b.mm(z, router)?;
        let (ids, bias, table) = if cfg.hash[l] {
            (Some(tokens), None, Some(b.hash_table(&t("ffn_gate_hash.weight"), cfg.vocab, cfg.top_k, cfg.experts)?))
        } else {
            (None, Some(b.floats(&t("exp_probs_b.bias"), &[cfg.experts])?), None)
        };
        let attrs = MoeRouteAttrs { scoring: cfg.scoring, top_k: cfg.top_k, scale: cfg.routed_scale };
        let weights = b.push(Op::MoeRoute { logits, ids, bias, table, attrs })?;
        let (ne, i) = (cfg.experts, cfg.moe_inter);
        let gate = b.stacked(&t("ffn_gate_exps"), ne, i, d)?;
        let up = b.stacked(&t("ffn_up_exps"), ne, i, d)?;
        let down = b.stacked(&t("ffn_down_exps"), ne, d, i)?;
        let shared = ExpertParams {
            gate: b.matrix(&t("ffn_gate_shexp.weight"), &[i, d])?,
            up: b.matrix(&t("ffn_up_shexp.weight"), &[i, d])?,
            down: b.matrix(&t("ffn_down_shexp.weight"), &[d, i])?,
        };
        let y = b.push(Op::Moe { x: z, w: weights, gate, up, down, shared: Some(shared), limit: cfg.swiglu_limit })?;
        x = b.push(Op::HcPost { x, y, c: coeffs, streams: n })?;
    }
    // Collapse the streams, final norm, head.
    let fnw = b.matrix("output_hc_fn.weight", &[n, n * d])?;
    let base = b.floats("output_hc_base.weight", &[n])?;
    let scale = b.floats("output_hc_scale.weight", &[1])?;
    let xn = b.rms(x, None, eps, 0)?;
    let f = b.mm(xn, fnw)?;
    let coeffs = b.push(Op::HcCoeffs { f, base, scale, streams: n, iters: cfg.sinkhorn_iters, eps: cfg.hc_eps })?;
    let h = b.push(Op::HcPre { x, c: coeffs, streams: n })?;
    let w = b.floats("output_norm.weight", &[d])?;
    let y = b.rms(h, Some(w), eps, 0)?;
    let head = b.matrix("output.weight", &[cfg.vocab, d])?;
    let logits = b.mm(y, head)?;
    b.module.output = Some(logits);
    kiln_ir::check(&b.module).map_err(|e| FrontendError::Internal(format!("lowered deepseek_v4 module: {e}")))?;
    Ok((b.module, b.weights))
}

fn from_gguf(m: &dyn GgufMeta, _vocab: u64) -> FrontendResult<DecoderConfig> {
    Err(FrontendError::unsupported(m.file(), "DeepSeek-V4 GGUF files; import the Hugging Face checkpoint directory"))
}

fn from_hf(c: &HfConfig) -> FrontendResult<DecoderConfig> {
    Err(FrontendError::Internal(format!(
        "{}: deepseek_v4 has its own lowering (`hf_lower`), not the Llama-family decoder",
        c.file.display()
    )))
}

pub const ARCH: Arch = Arch {
    gguf_name: "deepseek_v4",
    hf_model_types: &["deepseek_v4"],
    from_gguf,
    from_hf,
    hf_name: canonical,
    hf_fixup: None,
    hf_lower: Some(lower),
};

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::{HfConfig, LayerKind, canonical, config};

    fn fixture_config() -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek-v4/tiny/config.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    fn read(json: &Value) -> Result<super::V4Config, String> {
        config(&HfConfig { file: Path::new("config.json"), json }).map_err(|e| e.to_string())
    }

    #[test]
    fn upstream_config_forms_read_like_the_hugging_face_ones() {
        let hf = fixture_config();
        let want = read(&hf).unwrap();
        assert_eq!(want.kinds[..3], [LayerKind::Sliding, LayerKind::Csa, LayerKind::Hca]);
        assert_eq!(want.rope_compress.yarn, Some((16.0, 65536, 32.0, 1.0)));
        // Per-layer compress ratios, flat rates and a flat rope dict (YaRN keys for the compress table).
        let mut up = hf.clone();
        let o = up.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("compress_rates");
        o.insert("compress_ratios".into(), json!([0, 4, 16, 4, 16, 0]));
        o.insert("compress_rate_csa".into(), json!(4));
        o.insert("compress_rate_hca".into(), json!(16));
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                   "beta_fast": 32, "beta_slow": 1}),
        );
        assert_eq!(read(&up).unwrap(), want);
        up["compress_ratios"][2] = json!(8);
        let e = read(&up).unwrap_err();
        assert!(e.contains("config.json") && e.contains("compress ratio 8"), "{e}");
        let mut bad = hf.clone();
        bad["rope_parameters"]["compress"]["rope_type"] = json!("longrope");
        let e = read(&bad).unwrap_err();
        assert!(e.contains("unsupported") && e.contains("longrope"), "{e}");
        let mut bad = hf;
        bad["num_experts_per_tok"] = json!(9);
        let e = read(&bad).unwrap_err();
        assert!(e.contains("exceeds n_routed_experts"), "{e}");
    }

    #[test]
    fn both_spellings_map_to_one_canonical_name() {
        for (a, b, want) in [
            ("model.embed_tokens.weight", "embed.weight", "token_embd.weight"),
            ("lm_head.weight", "head.weight", "output.weight"),
            ("model.hc_head.hc_fn", "hc_head_fn", "output_hc_fn.weight"),
            ("model.norm.weight", "norm.weight", "output_norm.weight"),
            ("model.layers.3.attn.wq_a.weight", "layers.3.attn.wq_a.weight", "blk.3.attn_q_a.weight"),
            ("model.layers.0.ffn.experts.7.w2.weight", "layers.0.ffn.experts.7.w2.weight", "blk.0.ffn_down_exps.7"),
            ("model.layers.1.ffn.gate.tid2eid", "layers.1.ffn.gate.tid2eid", "blk.1.ffn_gate_hash.weight"),
        ] {
            assert_eq!(canonical(a).as_deref(), Some(want), "{a}");
            assert_eq!(canonical(b).as_deref(), Some(want), "{b}");
        }
        assert_eq!(canonical("mtp.0.emb.weight"), None);
        assert_eq!(canonical("model.layers.0.ffn.experts.x.w1.weight"), None);
    }
}
