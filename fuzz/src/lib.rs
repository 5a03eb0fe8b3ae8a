//! Helpers shared by the fuzz targets: a per-process scratch directory for readers that
//! only take a path, and a GGUF vocabulary read from fuzzed metadata.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_frontend::gguf::GgufFile;
use kiln_frontend::tokenizer::GgufVocab;

/// A scratch directory private to this fuzzing process (created once, reused every run).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create the fuzz scratch directory");
        d
    })
}

/// An empty subdirectory `name` of [`scratch`] (emptied before each run).
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a fuzz run directory");
    d
}

/// Splits `data` into `n` parts at the separator `\n----\n` (missing parts are empty).
pub fn split_parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    const SEP: &[u8] = b"\n----\n";
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    while parts.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts.resize(n, &[]);
    parts
}

/// The `tokenizer.ggml.*` keys of a GGUF file as a [`GgufVocab`] (as the GGUF importer reads
/// them); `None` when a required key is missing or has the wrong type.
pub fn gguf_vocab(g: &GgufFile) -> Option<GgufVocab> {
    let u32_of = |k: &str| g.get_u64(k).ok().and_then(|v| u32::try_from(v).ok());
    Some(GgufVocab {
        origin: g.path().display().to_string(),
        model: g.get_str("tokenizer.ggml.model").ok()?.to_string(),
        pre: g.get_str("tokenizer.ggml.pre").ok().map(str::to_string),
        tokens: g.get_str_array("tokenizer.ggml.tokens").ok()?.to_vec(),
        scores: g.get_f32_array("tokenizer.ggml.scores").ok(),
        token_types: g.get_i32_array("tokenizer.ggml.token_type").ok(),
        merges: g.get_str_array("tokenizer.ggml.merges").ok().map(<[String]>::to_vec),
        bos: u32_of("tokenizer.ggml.bos_token_id"),
        eos: u32_of("tokenizer.ggml.eos_token_id"),
        eot: u32_of("tokenizer.ggml.eot_token_id"),
        eom: u32_of("tokenizer.ggml.eom_token_id"),
        unk: u32_of("tokenizer.ggml.unknown_token_id"),
        pad: u32_of("tokenizer.ggml.padding_token_id"),
        add_bos: g.get_bool("tokenizer.ggml.add_bos_token").ok(),
        add_eos: g.get_bool("tokenizer.ggml.add_eos_token").ok(),
        add_space_prefix: g.get_bool("tokenizer.ggml.add_space_prefix").ok(),
    })
}

/// Exercises a loaded tokenizer on a short fixed text (encode, decode, streaming decode).
pub fn exercise_tokenizer(t: &kiln_runtime::tokenizer::Tokenizer) {
    if let Ok(ids) = t.encode("Hello, world! 123 héllo\n\tthe end", true) {
        let _ = t.decode(&ids);
        let mut s = t.stream();
        for id in ids {
            let _ = s.push(id);
        }
        let _ = s.finish();
    }
    let _ = t.decode(&[0, 1, 2, u32::MAX]);
}
