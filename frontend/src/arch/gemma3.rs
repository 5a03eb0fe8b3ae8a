//! Gemma 3 text architecture: GeGLU (tanh GELU), embeddings scaled by sqrt(d),
//! per-head q/k RMSNorm, post-attention and post-FFN norms, and interleaved
//! sliding-window (local, RoPE base 10000) and global layers (one in six).
//!
//! Gemma's RMSNorm multiplies by (1 + w). GGUF files store w + 1 already; for
//! Hugging Face checkpoints the fixup adds 1 at import.

use super::{Arch, GgufMeta, HfConfig, common_gguf, common_hf, llama_hf_name};
use crate::decoder::DecoderConfig;
use crate::error::{FrontendError, FrontendResult};

/// Every `SWA_PATTERN`-th layer is global, the others use the sliding window.
const SWA_PATTERN: usize = 6;
const LOCAL_ROPE_THETA: f32 = 10000.0;

fn finish(mut c: DecoderConfig, window: u64, query_pre_attn_scalar: Option<f32>, local_theta: f32) -> DecoderConfig {
    c.act = kiln_ir::Activation::GeluTanh;
    c.embed_scale = Some((c.d_model as f32).sqrt());
    c.qk_norm = true;
    c.post_norms = true;
    if let Some(s) = query_pre_attn_scalar {
        c.attn_scale = 1.0 / s.sqrt();
    }
    for (i, l) in c.layers.iter_mut().enumerate() {
        if (i + 1) % SWA_PATTERN != 0 {
            l.window = window;
            l.rope_theta = local_theta;
            l.rope_freq_scale = 1.0;
        }
    }
    c
}

fn from_gguf(m: &dyn GgufMeta, vocab: u64) -> FrontendResult<DecoderConfig> {
    let c = common_gguf(m, "gemma3", vocab)?;
    let window = m
        .u64("gemma3.attention.sliding_window")?
        .ok_or_else(|| FrontendError::bad(m.file(), "missing metadata key `gemma3.attention.sliding_window`"))?;
    Ok(finish(c, window, None, LOCAL_ROPE_THETA))
}

fn from_hf(cfg: &HfConfig) -> FrontendResult<DecoderConfig> {
    let c = common_hf(cfg, "gemma3")?;
    if let Some(act) = cfg.opt_str("hidden_activation")?
        && act != "gelu_pytorch_tanh"
    {
        return Err(FrontendError::unsupported(cfg.file, format!("hidden_activation `{act}`")));
    }
    let window = cfg.u64("sliding_window")?;
    let local_theta = cfg.opt_f32("rope_local_base_freq")?.unwrap_or(LOCAL_ROPE_THETA);
    Ok(finish(c, window, cfg.opt_f32("query_pre_attn_scalar")?, local_theta))
}

fn hf_name(hf: &str) -> Option<String> {
    let base = hf.strip_prefix("language_model.").unwrap_or(hf);
    let short = base.strip_prefix("model.").unwrap_or(base);
    if let Some(rest) = short.strip_prefix("layers.") {
        let (layer, name) = rest.split_once('.')?;
        let canon = match name {
            "post_attention_layernorm.weight" => "post_attention_norm.weight",
            "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
            "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
            _ => return llama_hf_name(short),
        };
        return Some(format!("blk.{layer}.{canon}"));
    }
    llama_hf_name(short)
}

fn hf_fixup(canonical: &str, values: &mut [f32]) -> bool {
    if canonical.ends_with("norm.weight") {
        values.iter_mut().for_each(|v| *v += 1.0);
        true
    } else {
        false
    }
}

pub const ARCH: Arch = Arch {
    gguf_name: "gemma3",
    hf_model_types: &["gemma3_text", "gemma3"],
    from_gguf,
    from_hf,
    hf_name,
    hf_fixup: Some(hf_fixup),
    hf_lower: None,
};
