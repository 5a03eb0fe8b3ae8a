//! Fuzz target: a sharded Hugging Face checkpoint's `model.safetensors.index.json` (the
//! shard names it gives must stay inside the directory; every listed tensor must exist).
//! The directory holds two small valid shards and the fuzzed index.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_frontend::hf::HfTensors;
use libfuzzer_sys::fuzz_target;

/// A two-tensor F32 shard.
fn shard(names: [&str; 2]) -> Vec<u8> {
    let header = format!(
        r#"{{"{}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}},"{}":{{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}}}"#,
        names[0], names[1]
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend([0u8; 24]);
    out
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = kiln_fuzz::fresh_dir("index");
        let a = shard(["model.embed_tokens.weight", "model.norm.weight"]);
        let b = shard(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"]);
        std::fs::write(d.join("model-00001-of-00002.safetensors"), a).unwrap();
        std::fs::write(d.join("model-00002-of-00002.safetensors"), b).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join("model.safetensors.index.json"), data).unwrap();
    for a in kiln_frontend::arch::ARCHES {
        let _ = HfTensors::open(d, a);
    }
});
