//! Fuzz target: the control-vector reader (steering directions as safetensors or
//! llama.cpp control-vector GGUF) must return errors, never panic or over-allocate;
//! what it accepts must survive a write and re-read unchanged.
#![no_main]

use std::path::Path;

use kiln_frontend::control_vector::ControlVector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cv) = ControlVector::from_bytes(Path::new("fuzz.cv"), data.to_vec()) else { return };
    let again = ControlVector::from_bytes(Path::new("fuzz.safetensors"), cv.to_safetensors()).expect("re-read");
    assert_eq!(again.layers, cv.layers);
    if !cv.layers.contains_key(&0)
        && let Ok(g) = cv.to_gguf("llama")
    {
        let back = ControlVector::from_bytes(Path::new("fuzz.gguf"), g).expect("re-read gguf");
        assert_eq!(back.layers, cv.layers);
    }
});
