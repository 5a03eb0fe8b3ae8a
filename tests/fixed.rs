//! The watch build (`backend: fixed`) through the CLI: glassllm compiles to an integer-only
//! C99 library whose logits are bit-identical to the Rust integer interpreter's — built
//! with `gcc -std=c99 -Wall -Wextra -Werror` and run on the host, and built with
//! `arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb` and run on QEMU's mps2-an386 — for a fixed
//! prompt and 32 greedy decode steps; the emitted C is snapshot-tested; filling the context
//! to its limit runs clean under AddressSanitizer/UBSan and the next token is refused.
//!
//! The embedded toolchain (`gcc-arm-none-eabi`, `qemu-system-arm`) is skipped with a printed
//! reason when absent, except under `KILN_REQUIRE_EMBEDDED=1` (set by `.ci/run`).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kiln_fixed::harness;
use serde_json::Value;

/// The prompt every check runs: "Once upon a time" with glassllm's special tokens.
fn prompt(build: &Path) -> Vec<u32> {
    let model = kiln_runtime::Model::load(build).expect("load the watch build");
    model.tokenizer.encode("Once upon a time", true).expect("tokenize")
}

fn compile_glassllm(dir: &Path) -> Option<PathBuf> {
    compile_recipe(dir, "glassllm-en")
}

/// The watch build of `recipes/<name>.yaml` (a glassllm recipe).
fn compile_recipe(dir: &Path, name: &str) -> Option<PathBuf> {
    model("glassllm-en-hf")?;
    let out = dir.join("out");
    let recipe = root().join(format!("recipes/{name}.yaml"));
    let o =
        run(&["compile", "--recipe", recipe.to_str().unwrap(), "--device", "watch", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    Some(out.join(name).join("watch"))
}

/// The interpreter's trace for the build's program (its context, its weights).
fn interpreter_trace(build: &Path, prompt: &[u32], steps: usize) -> harness::Trace {
    let model = kiln_runtime::Model::load(build).expect("load");
    let program =
        kiln_fixed::lower::lower(&model.module, model.weights.as_ref(), kiln_fixed::build_context(&model.module))
            .expect("lower");
    let mut m = kiln_fixed::interp::Machine::new(program);
    harness::expected(&mut m, prompt, steps).expect("interpreter")
}

fn embedded_tools() -> bool {
    let have = harness::have("arm-none-eabi-gcc") && harness::have("qemu-system-arm");
    if !have {
        let msg = "arm-none-eabi-gcc or qemu-system-arm is missing (apt-get install gcc-arm-none-eabi qemu-system-arm)";
        if std::env::var("KILN_REQUIRE_EMBEDDED").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    have
}

const STEPS: usize = 32;

#[test]
fn glassllm_watch_build_is_bit_identical_on_host_and_cortex_m4() {
    let dir = tempdir("fixed-glass");
    let Some(build) = compile_glassllm(&dir) else { return };

    // The manifest carries the memory plan and the quality of the integer build.
    let manifest: Value = serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["backend"], "fixed");
    let mem = &manifest["memory"];
    assert!(mem["flash_bytes"].as_u64().unwrap() > 800_000, "{mem}");
    assert!(mem["ram_bytes"].as_u64().unwrap() < 256 << 10, "{mem}");
    assert_eq!(mem["max_context"], 128);
    let q = &manifest["quality"];
    // Budget: the integer build (int8 weights, Q16 activations) stays within 1% of the float
    // model's perplexity on held-out text and agrees on the top-1 token at least 95% of the time.
    assert!(q["ppl_ratio_minus_1"].as_f64().unwrap().abs() < 0.01, "{q}");
    assert!(q["top1_agreement"].as_f64().unwrap() > 0.95, "{q}");

    let prompt = prompt(&build);
    let want = interpreter_trace(&build, &prompt, STEPS);

    // Host: strict C99, every logit of every step equal to the interpreter's.
    let host = dir.join("host");
    harness::stage(&build, &host, &prompt, STEPS).unwrap();
    let exe = harness::build_host(&host, &["-DKILN_DUMP_LOGITS"]).unwrap();
    let got = harness::run_host(&exe).unwrap();
    assert_eq!(got.logits.len(), STEPS + 1);
    for (i, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        assert!(g == w, "host logits differ from the interpreter's at step {i}");
    }
    assert_eq!(got.tokens_and_hashes(), want.tokens_and_hashes());
    assert_eq!(got.limit, Some((-1, 128)), "the context limit");

    // The float model's greedy continuation is what the integer build writes too.
    let text = kiln().args(["run", build.to_str().unwrap(), "-p", "Once upon a time", "-n", "16"]).output().unwrap();
    assert!(text.status.success(), "{}", stderr(&text));

    // Cortex-M4 under QEMU: the same tokens and logit hashes.
    if embedded_tools() {
        let arm = dir.join("arm");
        harness::stage(&build, &arm, &prompt, STEPS).unwrap();
        let (elf, size) = harness::build_cortex_m4(&arm).unwrap();
        eprintln!("cortex-m4 image: {size}");
        // Integer only: no soft-float helper is linked in.
        let nm = std::process::Command::new("arm-none-eabi-nm").arg(&elf).output().unwrap();
        let syms = String::from_utf8_lossy(&nm.stdout);
        let float: Vec<&str> = syms
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter(|n| n.starts_with("__"))
            .filter(|n| {
                ["__aeabi_f", "__aeabi_d", "sf3", "df3", "sf2", "df2", "sfsi", "dfsi", "floatsi"]
                    .iter()
                    .any(|p| n.contains(p))
            })
            .collect();
        assert!(float.is_empty(), "floating-point helpers in the Cortex-M4 image: {float:?}");
        let got = harness::run_qemu(&elf).unwrap();
        assert_eq!(got.tokens_and_hashes(), want.tokens_and_hashes(), "Cortex-M4 logits differ from the interpreter's");
        assert_eq!(got.limit, Some((-1, 128)), "the context limit on the Cortex-M4");
        assert!(got.steps.iter().all(|s| s.ticks > 0), "the timer counted");
    }
}

/// The small build (Q4_0 tensors kept as packed nibbles, the Cortex-M4's UXTB16/SMLAD path;
/// an 8-bit KV cache): bit-identical too, in less flash and RAM.
#[test]
fn glassllm_int4_watch_build_is_bit_identical_on_host_and_cortex_m4() {
    int4_build_is_bit_identical("glassllm-en-int4", "static int8_t K0[", 80 << 10, &[], STEPS);
}

/// Window + sink attention (`sliding_window`): each KV slot is a ring of 36 rows, a third of
/// the RAM; the prompt and 100 greedy steps wrap the ring three times, bit-identical on host
/// (under AddressSanitizer and UBSan) and Cortex-M4.
#[test]
fn glassllm_window_watch_build_with_ring_caches_is_bit_identical_on_host_and_cortex_m4() {
    int4_build_is_bit_identical(
        "glassllm-en-window",
        "static int8_t K0[",
        32 << 10,
        &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        100,
    );
}

/// The smallest build: 4-bit weights and a 4-bit KV cache (nibbles with a shift per 32
/// channels), bit-identical on host (here under AddressSanitizer and UBSan) and Cortex-M4.
#[test]
fn glassllm_int4_kv4_watch_build_is_bit_identical_on_host_and_cortex_m4() {
    int4_build_is_bit_identical(
        "glassllm-en-int4-kv4",
        "static uint8_t K0[",
        48 << 10,
        &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        STEPS,
    );
}

/// Compiles `recipe` (4-bit weights) for the watch and checks its size, its quality and
/// that the host (with `cflags`) and the Cortex-M4 compute the interpreter's bits for the
/// prompt and `steps` greedy tokens.
fn int4_build_is_bit_identical(recipe: &str, kv_array: &str, max_ram: u64, cflags: &[&str], steps: usize) {
    let dir = tempdir(&format!("fixed-{recipe}"));
    let Some(build) = compile_recipe(&dir, recipe) else { return };
    let manifest: Value = serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["memory"]["flash_bytes"].as_u64().unwrap() < 640 << 10, "{}", manifest["memory"]);
    assert!(manifest["memory"]["ram_bytes"].as_u64().unwrap() < max_ram, "{}", manifest["memory"]);
    let q = &manifest["quality"];
    // Budget for 4-bit weights: perplexity within 5% of the float model, top-1 agreement ≥ 80%.
    assert!(q["ppl_ratio_minus_1"].as_f64().unwrap().abs() < 0.05, "{q}");
    assert!(q["top1_agreement"].as_f64().unwrap() > 0.80, "{q}");
    let model_c = std::fs::read_to_string(build.join("kiln_model.c")).unwrap();
    assert!(model_c.contains("k_matmul_q4("), "no 4-bit matmul in the build");
    assert!(model_c.contains(kv_array), "no `{kv_array}` KV cache in the build");

    let prompt = prompt(&build);
    let want = interpreter_trace(&build, &prompt, steps);
    let host = dir.join("host");
    harness::stage(&build, &host, &prompt, steps).unwrap();
    let flags: Vec<&str> = ["-DKILN_DUMP_LOGITS"].iter().chain(cflags).copied().collect();
    let got = harness::run_host(&harness::build_host(&host, &flags).unwrap()).unwrap();
    for (i, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        assert!(g == w, "host logits differ from the interpreter's at step {i}");
    }
    assert_eq!(got.tokens_and_hashes(), want.tokens_and_hashes());
    if embedded_tools() {
        let arm = dir.join("arm");
        harness::stage(&build, &arm, &prompt, steps).unwrap();
        let (elf, _) = harness::build_cortex_m4(&arm).unwrap();
        let got = harness::run_qemu(&elf).unwrap();
        assert_eq!(got.tokens_and_hashes(), want.tokens_and_hashes(), "Cortex-M4 logits differ from the interpreter's");
    }
}

#[test]
fn every_prompt_length_up_to_the_context_is_in_bounds() {
    let dir = tempdir("fixed-asan");
    let Some(build) = compile_glassllm(&dir) else { return };
    // The harness fills the context to its limit one token at a time (and the prompt and
    // steps before it), under AddressSanitizer and UBSan: any out-of-bounds access or
    // signed overflow aborts the run.
    let host = dir.join("asan");
    harness::stage(&build, &host, &[2, 5, 9], 4).unwrap();
    let exe = harness::build_host(&host, &["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"]).unwrap();
    let got = harness::run_host(&exe).unwrap();
    assert_eq!(got.limit, Some((-1, 128)));

    // Through the runtime: a prompt longer than the context is a clear error.
    let long = "word ".repeat(200);
    let o = kiln().args(["run", build.to_str().unwrap(), "-p", &long, "-n", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not fit the model's context length 128"), "{}", stderr(&o));
    // And the session itself refuses what does not fit, changing nothing.
    let model = kiln_runtime::Model::load(&build).unwrap();
    let mut s = model.session(8, 1).unwrap();
    s.forward(&[2, 5, 9], kiln_backends::Logits::Last).unwrap();
    let e = s.forward(&[5; 6], kiln_backends::Logits::Last).unwrap_err().to_string();
    assert!(e.contains("context of 8 positions"), "{e}");
    assert_eq!(s.pos(), 3);
    let e = s.forward(&[5000], kiln_backends::Logits::Last).unwrap_err().to_string();
    assert!(e.contains("token id 5000"), "{e}");
}

#[test]
fn emitted_c_matches_the_snapshot() {
    let dir = tempdir("fixed-snap");
    let Some(build) = compile_glassllm(&dir) else { return };
    let mut all = String::new();
    for f in ["kiln_model.h", "kiln_model.c", "kiln_weights.h"] {
        all += &format!("// ==== {f}\n{}", std::fs::read_to_string(build.join(f)).unwrap());
    }
    // The weights file is millions of numbers: its hash stands for it.
    let w = std::fs::read(build.join("kiln_weights.c")).unwrap();
    all += &format!("// ==== kiln_weights.c sha256 {}\n", kiln_runtime::artifact::sha256_hex(&w));
    let snap = root().join("tests/fixtures/c/glassllm-en.c");
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::write(&snap, &all).unwrap();
    } else {
        let want = std::fs::read_to_string(&snap).expect("snapshot (create with KILN_BLESS=1)");
        assert!(all == want, "glassllm's C library changed; if intended, rerun with KILN_BLESS=1");
    }
}
