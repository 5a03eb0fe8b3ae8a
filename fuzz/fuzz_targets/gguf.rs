//! Fuzz target: the GGUF reader (header, metadata, tensor infos and data bounds), the
//! architecture hyperparameters read from its metadata, and the conversion of its
//! vocabulary to a tokenizer must return errors, never panic, hang or over-allocate.
#![no_main]

use std::path::Path;

use kiln_frontend::arch::{self, GgufMeta};
use kiln_frontend::gguf::{GgufError, GgufFile};
use kiln_frontend::{FrontendError, FrontendResult};
use libfuzzer_sys::fuzz_target;

struct Meta<'a>(&'a GgufFile);

impl Meta<'_> {
    fn opt<T>(&self, r: Result<T, GgufError>) -> FrontendResult<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(e) => Err(FrontendError::Gguf(e)),
        }
    }
}

impl GgufMeta for Meta<'_> {
    fn file(&self) -> &Path {
        self.0.path()
    }
    fn u64(&self, key: &str) -> FrontendResult<Option<u64>> {
        self.opt(self.0.get_u64(key))
    }
    fn f32(&self, key: &str) -> FrontendResult<Option<f32>> {
        self.opt(self.0.get_f32(key))
    }
    fn str(&self, key: &str) -> FrontendResult<Option<String>> {
        self.opt(self.0.get_str(key).map(str::to_string))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else { return };
    for t in f.tensors() {
        let _ = f.tensor_data(t);
    }
    if let Some(a) = f.get_str("general.architecture").ok().and_then(arch::by_gguf_name) {
        let rows = match f.tensor("token_embd.weight").map(|t| t.dims.as_slice()) {
            Some([_, rows]) => *rows,
            _ => 32,
        };
        let _ = (a.from_gguf)(&Meta(&f), rows);
    }
    if let Some(vocab) = kiln_fuzz::gguf_vocab(&f)
        && let Ok(t) = kiln_runtime::tokenizer::Tokenizer::from_gguf_vocab(&vocab)
    {
        kiln_fuzz::exercise_tokenizer(&t);
    }
});
