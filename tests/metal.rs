//! The Metal backend through the CLI: a device with `backend: metal` compiles to a build
//! that carries one MSL file per kernel, printed by naga from the wgpu backend's validated
//! WGSL (the same kernels the wgpu tests run on lavapipe), and `metal.json`; the MSL of a
//! small model is snapshot-tested. Off Apple targets, running it fails with a clear message,
//! and a `[metal, cpu]` device runs on the CPU backend.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn compile(model: &Path, dir: &Path, backend: &str) -> PathBuf {
    let text = format!(
        "name: mac-test\nmodel: {}\ndevices:\n  laptop:\n    backend: {backend}\n    passes: [dce]\n",
        model.display()
    );
    let recipe = dir.join("mac.yaml");
    write(&recipe, text.as_bytes());
    let out = dir.join("out");
    let o = kiln()
        .args(["compile", "--recipe", recipe.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "compile failed: {}", stderr(&o));
    out.join("mac-test").join("laptop")
}

#[test]
fn glassllm_metal_build_carries_msl_from_the_shared_lowering() {
    let Some(model) = model("glassllm-en-hf") else { return };
    let dir = tempdir("metal-glass");
    let build = compile(&model, &dir, "metal");
    let manifest: Value = serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["backend"], "metal");
    let files: Vec<String> =
        manifest["backend_files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    let meta: Value = serde_json::from_slice(&std::fs::read(build.join("metal.json")).unwrap()).unwrap();
    let kernels = meta["kernels"].as_array().unwrap();
    assert_eq!(kernels.len() + 1, files.len(), "one .metal per kernel, and metal.json");

    // Each MSL file is what naga prints from that kernel's validated WGSL, entry point included.
    let mut all = String::new();
    for k in kernels {
        let file = k["file"].as_str().unwrap();
        let msl = std::fs::read_to_string(build.join(file)).unwrap();
        assert!(msl.contains(&format!("kernel void {}(", k["entry"].as_str().unwrap())), "{file}");
        let wgsl = kiln_wgpu::lower::all_kernels()
            .into_iter()
            .chain(kiln_wgpu::lower::kernels_for(&std::sync::Arc::new(
                kiln_ir::verify(kiln_ir::parse(&std::fs::read_to_string(build.join("model.kir")).unwrap()).unwrap())
                    .unwrap(),
            )))
            .find(|w| w.name == k["name"].as_str().unwrap())
            .expect("a wgpu kernel of the same name");
        assert_eq!(
            kiln_metal::msl::kernel_msl(&wgsl).unwrap().0,
            msl,
            "{file} is not naga's MSL of {}.wgsl",
            wgsl.name
        );
        all += &format!("// ==== {file}\n{msl}");
    }
    let snap = root().join("tests/fixtures/msl/glassllm-en.metal");
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::write(&snap, &all).unwrap();
    } else {
        let want = std::fs::read_to_string(&snap).expect("snapshot (create with KILN_BLESS=1)");
        assert!(all == want, "glassllm's MSL changed; if intended, rerun with KILN_BLESS=1");
    }

    if !cfg!(target_vendor = "apple") {
        let o = kiln().args(["run", build.to_str().unwrap(), "-p", "Once", "-n", "2"]).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("Metal runs on Apple targets"), "{}", stderr(&o));
    }
}

#[test]
fn metal_then_cpu_device_runs_on_the_cpu_backend_off_apple() {
    let Some(model) = model("glassllm-en-hf") else { return };
    if cfg!(target_vendor = "apple") {
        return;
    }
    let dir = tempdir("metal-cpu");
    let build = compile(&model, &dir, "[metal, cpu]");
    let o =
        kiln().args(["run", build.to_str().unwrap(), "-p", "Once upon a time", "-n", "8", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["backend"], "cpu");
}
