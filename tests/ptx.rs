//! The PTX backend through the CLI: a recipe's `gpu` device compiles to a build
//! that carries its kernels (`kernels.ptx`, listed and hashed in the manifest),
//! the module is snapshot-tested and assembled by ptxas, the build runs on the
//! SIMT emulator (`KILN_PTX_DEVICE=emulator`) token for token like the reference
//! interpreter, and without a GPU the CUDA path fails with a clear message.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn recipe(dir: &Path, model: &Path) -> PathBuf {
    let text = format!(
        "name: glass-gpu\nmodel: {}\ndevices:\n  gpu:\n    backend: ptx\n    passes: [dce]\n  laptop:\n    backend: reference\n    passes: [dce]\n",
        model.display()
    );
    let p = dir.join("glass-gpu.yaml");
    write(&p, text.as_bytes());
    p
}

fn compile(recipe: &Path, device: &str, out: &Path) -> PathBuf {
    let o = kiln()
        .args(["compile", "--recipe", recipe.to_str().unwrap(), "--device", device, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    out.join("glass-gpu").join(device)
}

fn greedy(model: &Path, backend: &str) -> Vec<u64> {
    generate(model, backend, &[])
}

fn generate(model: &Path, backend: &str, extra: &[&str]) -> Vec<u64> {
    let o = kiln()
        .env("KILN_PTX_DEVICE", "emulator")
        .args(["run", model.to_str().unwrap(), "--backend", backend, "-p", "Once upon a time", "-n", "24", "--json"])
        .args(["--ignore-eos"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "run on {backend} failed: {}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["output"]["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[test]
fn glassllm_gpu_build_carries_kernels_and_runs_like_the_reference() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("ptx-glass");
    let r = recipe(&dir, &model);
    let build = compile(&r, "gpu", &dir.join("out"));

    // The kernels are part of the build, hashed like every file.
    let manifest: Value = serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["backend"], "ptx");
    assert_eq!(manifest["backend_files"], serde_json::json!(["kernels.ptx"]));
    let ptx = std::fs::read_to_string(build.join("kernels.ptx")).unwrap();
    assert!(manifest["files"].as_array().unwrap().iter().any(|f| f["path"] == "kernels.ptx"));
    assert!(ptx.contains(".target sm_80") && ptx.contains(".visible .entry matmul_f16_ragged"), "{}", &ptx[..200]);

    // Snapshot of a real small model's PTX (KILN_BLESS=1 rewrites it).
    let snap = root().join("tests/fixtures/ptx/glassllm-en.ptx");
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::write(&snap, &ptx).unwrap();
    } else {
        let want = std::fs::read_to_string(&snap).expect("snapshot (create with KILN_BLESS=1)");
        assert!(ptx == want, "glassllm's PTX changed; if intended, rerun with KILN_BLESS=1");
    }

    // ptxas accepts it for both targets.
    if let Some(ptxas) = kiln_ptx::lower::find_ptxas() {
        for arch in ["sm_80", "sm_90"] {
            let o = std::process::Command::new(&ptxas)
                .args(["--gpu-name", arch])
                .arg(build.join("kernels.ptx"))
                .arg("-o")
                .arg(dir.join(format!("{arch}.cubin")))
                .output()
                .unwrap();
            assert!(o.status.success() && o.stderr.is_empty(), "ptxas {arch}: {}", stderr(&o));
        }
    } else if std::env::var("KILN_REQUIRE_PTXAS").as_deref() == Ok("1") {
        panic!("no ptxas (KILN_PTXAS)");
    } else {
        eprintln!("SKIPPED ptxas: set KILN_PTXAS");
    }

    // The build on the emulator decodes exactly like the reference interpreter.
    let on_ptx = greedy(&build, "ptx");
    let on_ref = greedy(&build, "reference");
    assert_eq!(on_ptx.len(), 24);
    assert_eq!(on_ptx, on_ref);
    // Seeded top-k sampling: the device's top-k feeds the same sampler.
    let sampling = ["--temp", "0.9", "--top-k", "20", "--seed", "5"];
    assert_eq!(generate(&build, "ptx", &sampling), generate(&build, "reference", &sampling));

    // A tampered kernel file is refused when the build is opened.
    let mut bad = ptx.clone().into_bytes();
    bad[100] ^= 1;
    std::fs::write(build.join("kernels.ptx"), &bad).unwrap();
    let o = run(&["run", build.to_str().unwrap(), "-p", "x", "-n", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("kernels.ptx") && stderr(&o).contains("sha256"), "{}", stderr(&o));
}

#[test]
fn ptx_without_a_gpu_says_so() {
    let Some(model) = model("glassllm-en-hf") else { return };
    if kiln_ptx::lower::find_ptxas().is_some() && std::path::Path::new("/proc/driver/nvidia").exists() {
        eprintln!("SKIPPED: this machine has an NVIDIA driver");
        return;
    }
    let o = kiln()
        .env_remove("KILN_PTX_DEVICE")
        .args(["run", model.to_str().unwrap(), "--backend", "ptx", "-p", "x", "-n", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("ptx") && (e.contains("CUDA") || e.contains("cuda")), "{e}");
}

#[test]
fn unknown_backend_override_is_refused() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let o = run(&["run", model.to_str().unwrap(), "--backend", "tpu", "-p", "x", "-n", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown backend `tpu`"), "{}", stderr(&o));
}
