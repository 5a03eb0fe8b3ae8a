//! Fuzz target: `config.json` of a Hugging Face directory, read by every architecture's
//! importer (top level and `text_config`), never panics.
#![no_main]

use std::path::Path;

use kiln_frontend::arch::{ARCHES, HfConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let file = Path::new("fuzz/config.json");
    for a in ARCHES {
        let _ = (a.from_hf)(&HfConfig { file, json: &json });
        if let Some(text) = json.get("text_config") {
            let _ = (a.from_hf)(&HfConfig { file, json: text });
        }
    }
});
