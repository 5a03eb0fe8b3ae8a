//! Shared lowering of Llama-family decoder-only transformers (llama, qwen2, gemma3)
//! to kiln IR. Architecture files only describe hyperparameters and tensor names;
//! the graph is built here once.

use std::path::{Path, PathBuf};

use kiln_ir::{
    Activation, AttentionAttrs, DType, Dim, Meta, Module, Op, ParamId, RopeAttrs, RopeLayout, TensorType, ValueId,
};

use crate::error::{FrontendError, FrontendResult};
use crate::weights::{SourceTensor, TensorBytes, Weights, plain_to_f32};

/// Per-layer attention variant.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    /// Sliding window in tokens, 0 = full causal attention.
    pub window: u64,
    pub rope_theta: f32,
    pub rope_freq_scale: f32,
}

/// Hyperparameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub arch: String,
    pub n_layers: usize,
    pub d_model: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    pub ffn_dim: u64,
    pub vocab: u64,
    pub context_length: u64,
    pub norm_eps: f32,
    pub rope_layout: RopeLayout,
    pub rot_dims: u64,
    pub act: Activation,
    /// Multiply embeddings by this (Gemma: sqrt(d_model)).
    pub embed_scale: Option<f32>,
    pub attn_scale: f32,
    /// Per-head RMSNorm of q and k before RoPE (Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm after attention and after the FFN, before the residual add (Gemma 2/3).
    pub post_norms: bool,
    pub layers: Vec<LayerSpec>,
}

/// Where tensors come from, by kiln's canonical (GGUF-style) names, in kiln shape order.
pub trait TensorSource {
    fn file(&self) -> &Path;
    fn get(&self, name: &str) -> FrontendResult<Option<SourceTensor>>;
    /// An integer tensor (e.g. a token → expert table) as its shape and values; sources
    /// that hold none answer `Ok(None)`.
    fn get_ints(&self, _name: &str) -> FrontendResult<Option<(Vec<u64>, Vec<i64>)>> {
        Ok(None)
    }
}

struct Lowering<'a> {
    cfg: &'a DecoderConfig,
    src: &'a dyn TensorSource,
    file: PathBuf,
    module: Module,
    weights: Weights,
}

fn shape_text(s: &[u64]) -> String {
    format!("{s:?}")
}

impl Lowering<'_> {
    fn bad(&self, msg: impl Into<String>) -> FrontendError {
        FrontendError::bad(&self.file, msg)
    }

    fn build_err(&self, e: kiln_ir::IrError) -> FrontendError {
        FrontendError::Internal(format!("lowering {}: {e}", self.file.display()))
    }

    fn fetch(&self, name: &str, shape: &[u64]) -> FrontendResult<Option<SourceTensor>> {
        let Some(t) = self.src.get(name)? else { return Ok(None) };
        let dims = t.ty.fixed_dims().unwrap_or_default();
        if dims != shape {
            return Err(self.bad(format!(
                "tensor {name} has shape {}, expected {} for this configuration",
                shape_text(&dims),
                shape_text(shape)
            )));
        }
        let expect = t.ty.storage_bytes();
        if expect != Some(t.bytes.as_bytes().len() as u64) {
            return Err(self.bad(format!(
                "tensor {name}: {} needs {:?} bytes but {} are stored",
                t.ty,
                expect,
                t.bytes.as_bytes().len()
            )));
        }
        Ok(Some(t))
    }

    fn add(&mut self, name: &str, t: SourceTensor) -> FrontendResult<ParamId> {
        let id = self.module.add_param(name, t.ty).map_err(|e| self.build_err(e))?;
        self.weights.tensors.push(t.bytes);
        Ok(id)
    }

    /// A weight matrix or table, any dtype.
    fn matrix(&mut self, name: &str, shape: &[u64]) -> FrontendResult<ParamId> {
        self.opt_matrix(name, shape)?.ok_or_else(|| self.bad(format!("missing tensor {name}")))
    }

    fn opt_matrix(&mut self, name: &str, shape: &[u64]) -> FrontendResult<Option<ParamId>> {
        match self.fetch(name, shape)? {
            None => Ok(None),
            Some(t) => {
                let last = shape.last().copied().unwrap_or(1);
                if last % t.ty.dtype.block_elems() != 0 {
                    return Err(self.bad(format!("tensor {name}: rows of {last} do not fit {} blocks", t.ty.dtype)));
                }
                Ok(Some(self.add(name, t)?))
            }
        }
    }

    /// A vector (norm weight, bias), converted to f32.
    fn vector(&mut self, name: &str, n: u64) -> FrontendResult<Option<ParamId>> {
        let Some(t) = self.fetch(name, &[n])? else { return Ok(None) };
        let t = if t.ty.dtype == DType::F32 {
            t
        } else {
            let vals = plain_to_f32(t.ty.dtype, t.bytes.as_bytes()).ok_or_else(|| {
                self.bad(format!("tensor {name}: vectors must be f32/f16/bf16, found {}", t.ty.dtype))
            })?;
            SourceTensor { ty: TensorType::fixed(DType::F32, &[n]), bytes: TensorBytes::from_f32(&vals) }
        };
        if t.bytes.as_bytes().chunks_exact(4).any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()) {
            return Err(self.bad(format!("tensor {name} contains NaN or infinite values")));
        }
        Ok(Some(self.add(name, t)?))
    }

    fn required_vector(&mut self, name: &str, n: u64) -> FrontendResult<ParamId> {
        self.vector(name, n)?.ok_or_else(|| self.bad(format!("missing tensor {name}")))
    }

    fn push(&mut self, op: Op) -> FrontendResult<ValueId> {
        self.module.push(op).map_err(|e| FrontendError::Internal(format!("lowering: {e}")))
    }

    fn norm(&mut self, x: ValueId, name: &str, n: u64, group: u64) -> FrontendResult<ValueId> {
        let w = self.required_vector(name, n)?;
        self.push(Op::RmsNorm { x, weight: Some(w), eps: self.cfg.norm_eps, group })
    }

    fn run(mut self, model_name: &str) -> FrontendResult<(Module, Weights)> {
        let c = self.cfg;
        let (d, hd) = (c.d_model, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        if c.layers.len() != c.n_layers {
            return Err(FrontendError::Internal("layer specs do not match the layer count".into()));
        }
        if c.n_heads == 0 || c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(self.bad(format!(
                "attention head counts are inconsistent: {} heads, {} kv heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        if c.rot_dims == 0 || c.rot_dims > hd || !c.rot_dims.is_multiple_of(2) {
            return Err(self.bad(format!("rope dimension count {} does not fit head_dim {hd}", c.rot_dims)));
        }
        self.module.name = model_name.to_string();
        self.module.set_meta("arch", Meta::Str(c.arch.clone()));
        self.module.set_meta("context_length", Meta::Int(c.context_length as i64));
        self.module.set_meta("vocab_size", Meta::Int(c.vocab as i64));
        self.module.set_meta("n_layers", Meta::Int(c.n_layers as i64));
        self.module.set_meta("d_model", Meta::Int(d as i64));

        let embd = self.matrix("token_embd.weight", &[c.vocab, d])?;
        let tokens = self.push(Op::Tokens)?;
        let mut x = self.push(Op::Embed { table: embd, ids: tokens })?;
        if let Some(s) = c.embed_scale {
            x = self.push(Op::Scale { x, s })?;
        }
        for l in 0..c.n_layers {
            let spec = c.layers[l].clone();
            let b = |n: &str| format!("blk.{l}.{n}");
            let n = self.norm(x, &b("attn_norm.weight"), d, 0)?;
            let wq = self.matrix(&b("attn_q.weight"), &[q_dim, d])?;
            let bq = self.vector(&b("attn_q.bias"), q_dim)?;
            let wk = self.matrix(&b("attn_k.weight"), &[kv_dim, d])?;
            let bk = self.vector(&b("attn_k.bias"), kv_dim)?;
            let wv = self.matrix(&b("attn_v.weight"), &[kv_dim, d])?;
            let bv = self.vector(&b("attn_v.bias"), kv_dim)?;
            let mut q = self.push(Op::MatMul { x: n, w: wq, bias: bq })?;
            let mut k = self.push(Op::MatMul { x: n, w: wk, bias: bk })?;
            let v = self.push(Op::MatMul { x: n, w: wv, bias: bv })?;
            if c.qk_norm {
                q = self.norm(q, &b("attn_q_norm.weight"), hd, hd)?;
                k = self.norm(k, &b("attn_k_norm.weight"), hd, hd)?;
            }
            let rope = RopeAttrs {
                head_dim: hd,
                rot_dims: c.rot_dims,
                theta: spec.rope_theta,
                freq_scale: spec.rope_freq_scale,
                layout: c.rope_layout,
            };
            let q = self.push(Op::Rope { x: q, attrs: rope.clone() })?;
            let k = self.push(Op::Rope { x: k, attrs: rope })?;
            let attrs = AttentionAttrs {
                cache: l as u32,
                heads: c.n_heads,
                kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: c.attn_scale,
                window: spec.window,
                sink: 0,
                softcap: 0.0,
                kv_dtype: kiln_ir::DType::F32,
            };
            let a = self.push(Op::Attention { q, k: Some(k), v: Some(v), attrs })?;
            let wo = self.matrix(&b("attn_output.weight"), &[d, q_dim])?;
            let mut o = self.push(Op::MatMul { x: a, w: wo, bias: None })?;
            if c.post_norms {
                o = self.norm(o, &b("post_attention_norm.weight"), d, 0)?;
            }
            x = self.push(Op::Add { a: x, b: o })?;
            let n = self.norm(x, &b("ffn_norm.weight"), d, 0)?;
            let wg = self.matrix(&b("ffn_gate.weight"), &[c.ffn_dim, d])?;
            let wu = self.matrix(&b("ffn_up.weight"), &[c.ffn_dim, d])?;
            let wd = self.matrix(&b("ffn_down.weight"), &[d, c.ffn_dim])?;
            let g = self.push(Op::MatMul { x: n, w: wg, bias: None })?;
            let u = self.push(Op::MatMul { x: n, w: wu, bias: None })?;
            let y = self.push(Op::Glu { gate: g, up: u, kind: c.act })?;
            let mut y = self.push(Op::MatMul { x: y, w: wd, bias: None })?;
            if c.post_norms {
                y = self.norm(y, &b("post_ffw_norm.weight"), d, 0)?;
            }
            x = self.push(Op::Add { a: x, b: y })?;
        }
        let x = self.norm(x, "output_norm.weight", d, 0)?;
        let out_w = match self.opt_matrix("output.weight", &[c.vocab, d])? {
            Some(w) => w,
            None => embd,
        };
        let logits = self.push(Op::MatMul { x, w: out_w, bias: None })?;
        self.module.output = Some(logits);
        debug_assert_eq!(self.module.value_type(logits).shape, vec![Dim::Seq, Dim::Fixed(c.vocab)]);
        kiln_ir::check(&self.module).map_err(|e| FrontendError::Internal(format!("lowered module: {e}")))?;
        Ok((self.module, self.weights))
    }
}

/// Lowers a Llama-family checkpoint to a module and its weights.
pub fn lower(cfg: &DecoderConfig, src: &dyn TensorSource, model_name: &str) -> FrontendResult<(Module, Weights)> {
    let l =
        Lowering { cfg, src, file: src.file().to_path_buf(), module: Module::default(), weights: Weights::default() };
    l.run(model_name)
}
