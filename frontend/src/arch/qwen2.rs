//! Qwen2 architecture (Qwen2.5, Qwen2.5-Coder): Llama with q/k/v biases and NEOX RoPE.
//! Biases need no flag: the shared lowering adds them when the checkpoint has them.

use super::{Arch, GgufMeta, HfConfig, common_gguf, common_hf, llama_hf_name};
use crate::decoder::DecoderConfig;
use crate::error::FrontendResult;

fn from_gguf(m: &dyn GgufMeta, vocab: u64) -> FrontendResult<DecoderConfig> {
    common_gguf(m, "qwen2", vocab)
}

fn from_hf(c: &HfConfig) -> FrontendResult<DecoderConfig> {
    common_hf(c, "qwen2")
}

pub const ARCH: Arch = Arch {
    gguf_name: "qwen2",
    hf_model_types: &["qwen2"],
    from_gguf,
    from_hf,
    hf_name: llama_hf_name,
    hf_fixup: None,
    hf_lower: None,
};
