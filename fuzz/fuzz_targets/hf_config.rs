//! Fuzz target: `config.json` of a Hugging Face directory, read by every architecture's
//! importer (top level and `text_config`), never panics.
#![no_main]

use std::path::Path;

use kiln_frontend::arch::{ARCHES, HfConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let file = Path::new("fuzz/config.json");
    // DeepSeek-V4 has its own config reader (its `from_hf` only says it lowers itself).
    let _ = kiln_frontend::arch::deepseek_v4::config(&HfConfig { file, json: &json });
    for a in ARCHES {
        let _ = (a.from_hf)(&HfConfig { file, json: &json });
        if let Some(text) = json.get("text_config") {
            let _ = (a.from_hf)(&HfConfig { file, json: text });
        }
    }
});
