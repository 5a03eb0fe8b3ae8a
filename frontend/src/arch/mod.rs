//! Architecture registry: each supported architecture is one file that reads
//! hyperparameters (from GGUF metadata or a Hugging Face config.json) into a
//! [`DecoderConfig`] and maps Hugging Face tensor names to kiln's canonical names.

pub mod deepseek_v4;
pub mod gemma3;
pub mod llama;
pub mod qwen2;

use std::path::Path;

use serde_json::Value;

use crate::decoder::{DecoderConfig, LayerSpec};
use crate::error::{FrontendError, FrontendResult};

/// Typed access to GGUF metadata, errors naming the file.
pub trait GgufMeta {
    fn file(&self) -> &Path;
    fn u64(&self, key: &str) -> FrontendResult<Option<u64>>;
    fn f32(&self, key: &str) -> FrontendResult<Option<f32>>;
    fn str(&self, key: &str) -> FrontendResult<Option<String>>;
}

/// Hook to convert a tensor loaded from a Hugging Face checkpoint (e.g. Gemma's norm offset).
pub type HfFixup = fn(canonical: &str, values: &mut [f32]) -> bool;

/// Lowers a Hugging Face checkpoint with an architecture's own graph (architectures
/// outside the Llama family): config, tensors (by canonical name), model name.
pub type HfLower = fn(
    &HfConfig,
    &dyn crate::decoder::TensorSource,
    &str,
) -> FrontendResult<(kiln_ir::Module, crate::weights::Weights)>;

/// One architecture.
pub struct Arch {
    /// `general.architecture` in GGUF.
    pub gguf_name: &'static str,
    /// `model_type` values in a Hugging Face config.json.
    pub hf_model_types: &'static [&'static str],
    pub from_gguf: fn(&dyn GgufMeta, vocab: u64) -> FrontendResult<DecoderConfig>,
    pub from_hf: fn(&HfConfig) -> FrontendResult<DecoderConfig>,
    /// Maps a Hugging Face tensor name to kiln's canonical name (None: not used by kiln).
    pub hf_name: fn(&str) -> Option<String>,
    /// Converts float tensors after loading from a Hugging Face checkpoint; returns whether it changed them.
    pub hf_fixup: Option<HfFixup>,
    /// The architecture's own lowering of a Hugging Face checkpoint, instead of `from_hf` and
    /// the shared Llama-family decoder (DeepSeek-V4).
    pub hf_lower: Option<HfLower>,
}

/// The registry: adding an architecture is one file and one line here.
pub const ARCHES: &[&Arch] = &[&llama::ARCH, &qwen2::ARCH, &gemma3::ARCH, &deepseek_v4::ARCH];

pub fn by_gguf_name(name: &str) -> Option<&'static Arch> {
    ARCHES.iter().copied().find(|a| a.gguf_name == name)
}

pub fn by_hf_model_type(t: &str) -> Option<&'static Arch> {
    ARCHES.iter().copied().find(|a| a.hf_model_types.contains(&t))
}

pub fn known_names() -> String {
    ARCHES.iter().map(|a| a.gguf_name).collect::<Vec<_>>().join(", ")
}

/// A parsed config.json with typed getters that name the file in errors.
pub struct HfConfig<'a> {
    pub file: &'a Path,
    pub json: &'a Value,
}

impl HfConfig<'_> {
    fn bad(&self, msg: String) -> FrontendError {
        FrontendError::bad(self.file, msg)
    }
    pub fn opt_u64(&self, key: &str) -> FrontendResult<Option<u64>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("`{key}` must be a non-negative integer, found {v}"))),
        }
    }
    pub fn u64(&self, key: &str) -> FrontendResult<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.bad(format!("missing `{key}`")))
    }
    pub fn opt_f32(&self, key: &str) -> FrontendResult<Option<f32>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.bad(format!("`{key}` must be a number, found {v}"))),
        }
    }
    pub fn opt_str(&self, key: &str) -> FrontendResult<Option<String>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(format!("`{key}` must be a string, found {v}"))),
        }
    }
    pub fn opt_bool(&self, key: &str) -> FrontendResult<Option<bool>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(format!("`{key}` must be true or false, found {v}"))),
        }
    }
}

fn req<T>(file: &Path, key: &str, v: Option<T>) -> FrontendResult<T> {
    v.ok_or_else(|| FrontendError::bad(file, format!("missing metadata key `{key}`")))
}

/// Limits on hyperparameters, so hostile files cannot make kiln allocate absurd sizes.
const MAX_LAYERS: u64 = 1024;
const MAX_DIM: u64 = 1 << 20;

fn check_range(file: &Path, what: &str, v: u64, max: u64) -> FrontendResult<u64> {
    if v == 0 || v > max {
        return Err(FrontendError::bad(file, format!("{what} = {v} is out of range (1..={max})")));
    }
    Ok(v)
}

/// Hyperparameters shared by every Llama-family source, before arch-specific tweaks.
struct Hyper<'a> {
    arch: &'a str,
    n_layers: u64,
    d: u64,
    ffn: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    vocab: u64,
    ctx: u64,
    eps: f32,
    theta: f32,
    rot_dims: u64,
    freq_scale: f32,
}

impl Hyper<'_> {
    /// A plain Llama decoder (SwiGLU, NEOX RoPE, 1/sqrt(head_dim) scale, full attention).
    fn config(self) -> DecoderConfig {
        DecoderConfig {
            arch: self.arch.to_string(),
            n_layers: self.n_layers as usize,
            d_model: self.d,
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn_dim: self.ffn,
            vocab: self.vocab,
            context_length: self.ctx,
            norm_eps: self.eps,
            rope_layout: kiln_ir::RopeLayout::Neox,
            rot_dims: self.rot_dims,
            act: kiln_ir::Activation::Silu,
            embed_scale: None,
            attn_scale: 1.0 / (self.head_dim as f32).sqrt(),
            qk_norm: false,
            post_norms: false,
            layers: (0..self.n_layers)
                .map(|_| LayerSpec { window: 0, rope_theta: self.theta, rope_freq_scale: self.freq_scale })
                .collect(),
        }
    }
}

/// The hyperparameters every Llama-family GGUF carries under `{arch}.*`.
pub(crate) fn common_gguf(m: &dyn GgufMeta, arch: &str, vocab: u64) -> FrontendResult<DecoderConfig> {
    let f = m.file();
    let k = |s: &str| format!("{arch}.{s}");
    let n_layers = check_range(f, "block_count", req(f, &k("block_count"), m.u64(&k("block_count"))?)?, MAX_LAYERS)?;
    let d =
        check_range(f, "embedding_length", req(f, &k("embedding_length"), m.u64(&k("embedding_length"))?)?, MAX_DIM)?;
    let ffn = check_range(
        f,
        "feed_forward_length",
        req(f, &k("feed_forward_length"), m.u64(&k("feed_forward_length"))?)?,
        MAX_DIM,
    )?;
    let heads = check_range(
        f,
        "attention.head_count",
        req(f, &k("attention.head_count"), m.u64(&k("attention.head_count"))?)?,
        4096,
    )?;
    let kv_heads =
        check_range(f, "attention.head_count_kv", m.u64(&k("attention.head_count_kv"))?.unwrap_or(heads), 4096)?;
    let head_dim = match m.u64(&k("attention.key_length"))? {
        Some(n) => n,
        None if d % heads == 0 => d / heads,
        None => {
            return Err(FrontendError::bad(f, format!("embedding_length {d} is not divisible by head_count {heads}")));
        }
    };
    let head_dim = check_range(f, "head dim", head_dim, 4096)?;
    if let Some(vl) = m.u64(&k("attention.value_length"))?
        && vl != head_dim
    {
        return Err(FrontendError::unsupported(f, format!("value_length {vl} differs from key_length {head_dim}")));
    }
    let eps = req(f, &k("attention.layer_norm_rms_epsilon"), m.f32(&k("attention.layer_norm_rms_epsilon"))?)?;
    let theta = m.f32(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let rot_dims = m.u64(&k("rope.dimension_count"))?.unwrap_or(head_dim);
    let ctx = m.u64(&k("context_length"))?.unwrap_or(4096).min(1 << 24);
    let freq_scale = match m.str(&k("rope.scaling.type"))?.as_deref() {
        None | Some("none") => 1.0,
        Some("linear") => match m.f32(&k("rope.scaling.factor"))? {
            Some(f) if f > 0.0 => 1.0 / f,
            _ => 1.0,
        },
        Some(other) => return Err(FrontendError::unsupported(f, format!("rope scaling type `{other}`"))),
    };
    Ok(Hyper { arch, n_layers, d, ffn, heads, kv_heads, head_dim, vocab, ctx, eps, theta, rot_dims, freq_scale }
        .config())
}

/// The hyperparameters every Llama-family config.json carries.
pub(crate) fn common_hf(c: &HfConfig, arch: &str) -> FrontendResult<DecoderConfig> {
    let f = c.file;
    let n_layers = check_range(f, "num_hidden_layers", c.u64("num_hidden_layers")?, MAX_LAYERS)?;
    let d = check_range(f, "hidden_size", c.u64("hidden_size")?, MAX_DIM)?;
    let ffn = check_range(f, "intermediate_size", c.u64("intermediate_size")?, MAX_DIM)?;
    let heads = check_range(f, "num_attention_heads", c.u64("num_attention_heads")?, 4096)?;
    let kv_heads = check_range(f, "num_key_value_heads", c.opt_u64("num_key_value_heads")?.unwrap_or(heads), 4096)?;
    let head_dim = match c.opt_u64("head_dim")? {
        Some(n) => n,
        None if d % heads == 0 => d / heads,
        None => {
            return Err(FrontendError::bad(
                f,
                format!("hidden_size {d} is not divisible by num_attention_heads {heads}"),
            ));
        }
    };
    let head_dim = check_range(f, "head_dim", head_dim, 4096)?;
    let vocab = check_range(f, "vocab_size", c.u64("vocab_size")?, 1 << 24)?;
    let eps = c.opt_f32("rms_norm_eps")?.unwrap_or(1e-6);
    let theta = c.opt_f32("rope_theta")?.unwrap_or(10000.0);
    let ctx = c.opt_u64("max_position_embeddings")?.unwrap_or(4096).min(1 << 24);
    let mut freq_scale = 1.0;
    if let Some(rs) = c.json.get("rope_scaling").filter(|v| !v.is_null()) {
        let ty = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|v| v.as_str()).unwrap_or("");
        match ty {
            "default" => {}
            "linear" => {
                if let Some(fac) = rs.get("factor").and_then(|v| v.as_f64()).filter(|f| *f > 0.0) {
                    freq_scale = 1.0 / fac as f32;
                }
            }
            other => return Err(FrontendError::unsupported(f, format!("rope_scaling type `{other}`"))),
        }
    }
    if let Some(act) = c.opt_str("hidden_act")?
        && act != "silu"
        && arch != "gemma3"
    {
        return Err(FrontendError::unsupported(f, format!("hidden_act `{act}`")));
    }
    Ok(Hyper {
        arch,
        n_layers,
        d,
        ffn,
        heads,
        kv_heads,
        head_dim,
        vocab,
        ctx,
        eps,
        theta,
        rot_dims: head_dim,
        freq_scale,
    }
    .config())
}

/// The Hugging Face → canonical name mapping shared by Llama-family models.
pub(crate) fn llama_hf_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("model.").unwrap_or(hf);
    match hf {
        "embed_tokens.weight" => return Some("token_embd.weight".into()),
        "norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let canon = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{canon}"))
}
