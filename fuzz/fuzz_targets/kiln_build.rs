//! Fuzz target: opening a kiln build directory (manifest, file list and hashes, IR,
//! weight layout, tokenizer settings) gives an error, never a panic.
//!
//! The first byte picks the mode. Even: the rest is `manifest.json` as is, next to a
//! fixed small set of files. Odd: the rest is split at `\n----\n` into `model.kir`,
//! `weights.bin`, `tokenizer.json`, `tokenizer.kiln.json` and extra manifest fields, and a
//! manifest listing them with their true sizes and sha256s is written, so the hash
//! checks pass and the IR, layout and tokenizer readers see the fuzzed bytes.
#![no_main]

use kiln_runtime::artifact::{open_build, sha256_hex};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const FILES: [&str; 4] = ["model.kir", "weights.bin", "tokenizer.json", "tokenizer.kiln.json"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let d = kiln_fuzz::fresh_dir("build");
    if mode % 2 == 0 {
        for (f, body) in FILES.iter().zip([&b"kiln-ir 1\n"[..], b"", b"{}", b"{}"]) {
            std::fs::write(d.join(f), body).unwrap();
        }
        std::fs::write(d.join("manifest.json"), rest).unwrap();
    } else {
        let parts = kiln_fuzz::split_parts(rest, 5);
        let mut files = vec![];
        for (i, name) in FILES.iter().enumerate() {
            if i == 3 && mode & 2 != 0 {
                continue; // tokenizer.kiln.json is optional
            }
            std::fs::write(d.join(name), parts[i]).unwrap();
            files.push(json!({"path": name, "bytes": parts[i].len(), "sha256": sha256_hex(parts[i])}));
        }
        let mut manifest = json!({"format": "kiln-build", "format_version": 1, "files": files});
        if let Ok(Value::Object(extra)) = serde_json::from_slice::<Value>(parts[4])
            && let Some(m) = manifest.as_object_mut()
        {
            for (k, v) in extra {
                if k != "files" {
                    m.insert(k, v);
                }
            }
        }
        std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
    }
    if let Ok(b) = open_build(&d)
        && let Ok(t) = kiln_runtime::tokenizer::Tokenizer::from_bytes(&b.tokenizer_json, "fuzz/tokenizer.json")
    {
        kiln_fuzz::exercise_tokenizer(&t);
    }
});
