//! Every kernel variant, and the module of a small model, assembled by
//! NVIDIA's `ptxas` for sm_80 and sm_90 (zero errors, zero warnings), and the
//! small model's module snapshot-tested (`KILN_BLESS=1` rewrites the snapshot).
//!
//! `ptxas` is `$KILN_PTXAS` or the one on the `PATH` (`.ci/run` installs the
//! pinned `nvidia-cuda-nvcc-cu12` wheel). Without it the assembly tests skip
//! with a printed reason, or fail under `KILN_REQUIRE_PTXAS=1` (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_ptx::{lower, ptx};

fn ptxas() -> Option<PathBuf> {
    let found = lower::find_ptxas();
    if found.is_none() {
        let msg = "no ptxas: set KILN_PTXAS or put ptxas on the PATH (pip wheel nvidia-cuda-nvcc-cu12)";
        if std::env::var("KILN_REQUIRE_PTXAS").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn assemble(ptxas: &Path, text: &str, what: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ptxas-{what}"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("module.ptx");
    std::fs::write(&src, text).unwrap();
    for arch in ["sm_80", "sm_90"] {
        let out = Command::new(ptxas)
            .args(["--gpu-name", arch, "--warn-on-spills"])
            .arg(&src)
            .arg("-o")
            .arg(dir.join(format!("{arch}.cubin")))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "ptxas {arch} on {what} ({}): status {}\n{stderr}",
            src.display(),
            out.status
        );
    }
}

#[test]
fn every_kernel_variant_assembles_for_sm80_and_sm90() {
    let Some(p) = ptxas() else { return };
    let ks = lower::all_kernels();
    assert!(ks.len() >= 60, "{} kernels", ks.len());
    assemble(&p, &ptx::print_module(&ks), "all-kernels");
}

fn tiny_llama_ptx() -> String {
    let case = kiln_backends::conformance::cases().into_iter().find(|c| c.name == "tiny llama").unwrap();
    let m = kiln_ir::verify(case.module).unwrap();
    lower::module_ptx(&m)
}

#[test]
fn tiny_llama_module_assembles() {
    let Some(p) = ptxas() else { return };
    assemble(&p, &tiny_llama_ptx(), "tiny-llama");
}

#[test]
fn tiny_llama_module_snapshot() {
    let got = tiny_llama_ptx();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/tiny_llama.ptx");
    if std::env::var("KILN_BLESS").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with KILN_BLESS=1 to create it)", path.display()));
    if got != want {
        let line = got.lines().zip(want.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "the PTX of the tiny llama changed at line {} (got `{}`, snapshot `{}`); if intended, rerun with KILN_BLESS=1",
            line + 1,
            got.lines().nth(line).unwrap_or(""),
            want.lines().nth(line).unwrap_or("")
        );
    }
}

#[test]
fn printing_is_deterministic() {
    assert_eq!(tiny_llama_ptx(), tiny_llama_ptx());
}
