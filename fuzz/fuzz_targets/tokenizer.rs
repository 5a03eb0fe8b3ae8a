//! Fuzz target: loading a `tokenizer.json` (or glassllm tokenizer file) and using it never panics.
#![no_main]

use kiln_runtime::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tokenizer::from_bytes(data, "fuzz/tokenizer.json") {
        kiln_fuzz::exercise_tokenizer(&t);
    }
});
