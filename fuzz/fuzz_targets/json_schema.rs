//! Fuzz target: grammar-constrained decoding's schema compiler and matcher. The input is a
//! JSON schema (or, when it starts with `[`, a tool list), a NUL byte, then text fed to the
//! matcher. Compiling must return errors, never panic; feeding must never panic; any text
//! the matcher calls complete must be valid JSON.
#![no_main]

use kiln_runtime::grammar::Grammar;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (schema, text) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(schema), Ok(text)) = (std::str::from_utf8(schema), std::str::from_utf8(text)) else { return };
    let g = if schema.trim_start().starts_with('[') {
        Grammar::function_call_text(schema, "fuzz.json")
    } else {
        Grammar::from_schema_text(schema, "fuzz.json")
    };
    let Ok(g) = g else { return };
    let mut m = g.start();
    for c in text.chars() {
        let Some(next) = m.feed(c) else { return };
        m = next;
    }
    if m.is_complete() {
        serde_json::from_str::<serde_json::Value>(text).expect("the grammar accepted text that is not JSON");
    }
});
