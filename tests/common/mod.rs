//! Shared helpers for the CLI integration tests: run the built `kiln` binary,
//! locate fetched models, make temporary directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

pub fn run(args: &[&str]) -> Output {
    kiln().args(args).output().expect("kiln runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
}

/// The cached file of a registry model. When it is absent the test is skipped with a
/// printed reason, unless `KILN_REQUIRE_MODELS=1` (set by `.ci/run`), where it fails.
pub fn model(file: &str) -> Option<PathBuf> {
    let p = cache_dir().join("models").join(file);
    if p.exists() {
        return Some(p);
    }
    let msg = format!("{} is missing: run `cargo xtask fetch-models` first", p.display());
    if std::env::var("KILN_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

pub fn smollm2() -> Option<PathBuf> {
    model("smollm2-135m-instruct-q4_1.gguf")
}

pub fn qwen05() -> Option<PathBuf> {
    model("qwen2.5-coder-0.5b.gguf")
}

/// A fresh temporary directory under the target dir, removed when the guard drops unless the
/// test is panicking (then it is kept for inspection). Tests that build real models write
/// hundreds of megabytes each; leaving them all behind filled CI's disk.
pub fn tempdir(name: &str) -> TempDir {
    let d = root().join("target").join("test-tmp").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    TempDir(d)
}

pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn write(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).expect("write file");
}

/// The model at `path` (a GGUF or HF directory) after one pass, and the pass's report details.
pub fn after_pass(
    path: &Path,
    pass: &str,
    options: serde_json::Value,
    calibration: kiln_passes::Calibration<'_>,
) -> (kiln_runtime::Model, serde_json::Value) {
    let imported = kiln_frontend::import(path).unwrap();
    let (mut m, mut w) = (imported.module, imported.weights);
    let reports = kiln_passes::run_pipeline(
        &mut m,
        &mut w,
        &[(pass.into(), options)],
        &kiln_passes::PipelineCtx { device: "laptop", base_dir: &root(), calibration, memo: None },
        &mut |_| {},
    )
    .unwrap();
    let model = kiln_runtime::Model::from_parts(
        path,
        m,
        w,
        imported.tokenizer_json.as_bytes(),
        imported.chat_template.as_deref(),
    )
    .unwrap();
    (model, reports[0].details.clone())
}
