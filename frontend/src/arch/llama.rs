//! Llama architecture (SmolLM2, Llama 2/3 without rope-frequency tables).
//!
//! GGUF files store Q and K permuted for llama.cpp's interleaved-pair RoPE, so a
//! GGUF llama uses the `interleaved` layout on the stored weights unchanged,
//! while Hugging Face checkpoints (unpermuted) use `neox`: the same math.

use kiln_ir::RopeLayout;

use super::{Arch, GgufMeta, HfConfig, common_gguf, common_hf, llama_hf_name};
use crate::decoder::DecoderConfig;
use crate::error::FrontendResult;

fn from_gguf(m: &dyn GgufMeta, vocab: u64) -> FrontendResult<DecoderConfig> {
    let mut c = common_gguf(m, "llama", vocab)?;
    c.rope_layout = RopeLayout::Interleaved;
    Ok(c)
}

fn from_hf(c: &HfConfig) -> FrontendResult<DecoderConfig> {
    common_hf(c, "llama")
}

pub const ARCH: Arch = Arch {
    gguf_name: "llama",
    hf_model_types: &["llama", "mistral"],
    from_gguf,
    from_hf,
    hf_name: llama_hf_name,
    hf_fixup: None,
    hf_lower: None,
};
