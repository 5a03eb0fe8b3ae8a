//! `cargo xtask`: kiln's developer and CI entry points. Each command builds the
//! `kiln` binary (release) and drives it, so users and CI run exactly what ships.
//!
//! - `compile --recipe R --device D [--out DIR]`: build a recipe for a device (or `all`).
//! - `test`: fetch the test models and run the whole test suite.
//! - `fetch-models [ID...]`: fetch pinned registry models and convert glassllm to a HF directory.
//! - `glassllm-to-hf --npz P --tokenizer P --out DIR`: the glassllm converter on its own.
//! - `bench quant`: kiln's quantization presets vs llama.cpp's (see `bench_quant`).
//! - `bench attention`: DeepSeek-V4 compressed attention vs dense decode (see `bench_attention`).
//! - `bench cranelift`: a Cranelift-JIT matvec vs the hand-written kernels (see `bench_cranelift`).
//! - `fuzz [--seconds N] [TARGET...]`: run the cargo-fuzz targets (see `fuzz.rs`).

mod fuzz;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the release `kiln` binary and returns its path.
fn build_kiln() -> Result<PathBuf, String> {
    let status = Command::new(cargo())
        .current_dir(root())
        .args(["build", "--release", "--quiet", "-p", "kiln", "--bin", "kiln"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building kiln failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    Ok(target.join("release").join("kiln"))
}

fn run_kiln(args: &[String]) -> Result<(), String> {
    let kiln = build_kiln()?;
    let status = Command::new(&kiln).args(args).status().map_err(|e| format!("cannot run {}: {e}", kiln.display()))?;
    if status.success() { Ok(()) } else { Err(format!("kiln {} failed ({status})", args.join(" "))) }
}

/// `$KILN_CACHE`, or `~/.cache/kiln` (the same rule as the kiln binary).
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

fn fetch_models(ids: &[String]) -> Result<(), String> {
    // Any glassllm id (`glassllm-en`, `glassllm-en-tokenizer`, the converted `glassllm-en-hf`)
    // means the Hugging Face directory, which needs both registry files.
    let wants_glass = ids.is_empty() || ids.iter().any(|i| i.starts_with("glassllm"));
    let mut args = vec!["fetch".to_string()];
    args.extend(ids.iter().filter(|i| !i.starts_with("glassllm")).cloned());
    if wants_glass && !ids.is_empty() {
        args.extend(["glassllm-en".to_string(), "glassllm-en-tokenizer".to_string()]);
    }
    run_kiln(&args)?;
    if wants_glass {
        let models = cache_dir().join("models");
        let out = models.join("glassllm-en-hf");
        xtask::glassllm::convert(&models.join("glassllm-en.npz"), &models.join("glassllm-en.tokenizer.json"), &out)?;
        println!("glassllm-en-hf: {}", out.display());
    }
    Ok(())
}

/// Models the test suite needs (fetched first, then required by the tests).
const TEST_MODELS: &[&str] =
    &["smollm2-135m-instruct", "qwen2.5-coder-0.5b", "gemma3-270m", "glassllm-en", "glassllm-en-tokenizer"];

/// Fetches the test models and runs the whole test suite (nextest when installed).
fn test(extra: &[String]) -> Result<(), String> {
    fetch_models(&TEST_MODELS.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    // NVIDIA's ptxas (a pinned wheel): every emitted PTX module is assembled for sm_80/sm_90.
    run_kiln(&["fetch".to_string(), "ptxas".to_string()])?;
    let has_nextest = Command::new(cargo()).args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success());
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root())
        .env("KILN_REQUIRE_MODELS", "1")
        .env("KILN_PTXAS", cache_dir().join("tools/ptxas-12.9.86"))
        .env("KILN_REQUIRE_PTXAS", "1");
    if has_nextest {
        cmd.args(["nextest", "run", "--workspace", "--release", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--release", "--no-fail-fast"]);
    }
    // The CUDA session is compiled and its GPU test runs; it skips without a driver.
    cmd.args(["--features", "kiln-ptx/cuda"]);
    cmd.args(extra);
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !Path::new("/proc/driver/nvidia").exists() {
        println!(
            "note: no NVIDIA driver on this machine: the GPU differential test (kiln-ptx tests/cuda.rs) \
             skipped; the PTX kernels and session ran in the SIMT emulator and every PTX module was \
             assembled by ptxas (sm_80, sm_90)"
        );
    }
    if status.success() { Ok(()) } else { Err("tests failed".into()) }
}

const USAGE: &str = "usage: cargo xtask <command>\n\
  test [ARGS...]        fetch the test models, then run every test (nextest)\n\
  compile --recipe R --device watch|phone|laptop|all [--out DIR] [--json]\n\
  fetch-models [ID...]\n\
  bench cpu [--models ID,ID] [--pp 512] [--tg 128] [--reps 2] [--threads 2]\n\
  bench quant [--models ID,ID] [--ctx 512] [--chunks 8] [--calib-chunks 8] [--threads 2]\n\
  bench spec [--models ID,ID] [--tokens 64] [--threads 2] [--backend reference]\n\
  bench steer [--recipe R] [--strengths -6,-3,0,3] [--max-tokens 320] [--limit N] [--threads 2]\n\
  bench kv [--models ID,ID] [--budgets 5%,25%] [--ctx 512] [--chunks 4] [--calib-ctx 256] [--calib-chunks 1]\n\
  bench watch [--recipes R,R] [--steps 32]   # Cortex-M4 under QEMU: flash, RAM, instructions/token\n\
  bench attention [--contexts 1024,4096,16384,65536] [--steps 24] [--chunk 2048] [--threads 2]   # CSA/HCA vs dense decode\n\
  bench cranelift [--out DIR]   # Cranelift-JIT Q8_0 matvec vs the hand-written kernels\n\
  glassllm-to-hf --npz PATH --tokenizer PATH --out DIR\n\
  fuzz [--seconds 20] [--jobs 1] [--seed] [TARGET...]   run the fuzz targets (needs cargo-fuzz)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "compile" => {
            let mut a = vec!["compile".to_string()];
            a.extend(rest.iter().cloned());
            run_kiln(&a)
        }
        "fetch-models" => fetch_models(rest),
        "test" => test(rest),
        "glassllm-to-hf" => xtask::glassllm::run(rest),
        "fuzz" => fuzz::run(rest),
        "bench" => match rest.first().map(String::as_str) {
            Some("quant") => build_kiln().and_then(|kiln| {
                xtask::bench_quant::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("cpu") => build_kiln().and_then(|kiln| {
                xtask::bench_cpu::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("spec") => build_kiln().and_then(|kiln| {
                xtask::bench_spec::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("kv") => build_kiln().and_then(|kiln| {
                xtask::bench_kv::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("steer") => build_kiln().and_then(|kiln| {
                xtask::bench_steer::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("watch") => build_kiln().and_then(|kiln| {
                xtask::bench_watch::run(&rest[1..], &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() })
            }),
            Some("attention") => build_kiln().and_then(|kiln| {
                xtask::bench_attention::run(
                    &rest[1..],
                    &xtask::bench_quant::Env { root: root(), kiln, cache: cache_dir() },
                )
            }),
            Some("cranelift") => xtask::bench_cranelift::run(&rest[1..], &root()),
            _ => Err(format!(
                "usage: cargo xtask bench cpu|quant|spec|steer|kv|watch|attention|cranelift [OPTIONS]\n{USAGE}"
            )),
        },
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
