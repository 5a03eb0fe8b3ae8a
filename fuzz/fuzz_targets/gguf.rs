//! Fuzz target: the GGUF reader must return an error, never panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = kiln_frontend::gguf::GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        for t in f.tensors() {
            let _ = f.tensor_data(t);
        }
    }
});
