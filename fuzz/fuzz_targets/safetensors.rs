//! Fuzz target: the safetensors header parser and tensor reads never panic or over-allocate.
#![no_main]

use std::sync::Arc;

use kiln_frontend::safetensors::SafetensorsFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) else { return };
    let f = Arc::new(f);
    let names: Vec<String> = f.names().into_iter().map(str::to_string).collect();
    for n in &names {
        let _ = f.raw_bytes(n);
        if let Ok(Some(t)) = f.tensor(n) {
            let _ = kiln_frontend::weights::plain_to_f32(t.ty.dtype, t.bytes.as_bytes());
        }
    }
});
