//! Reliability: a build killed mid-write leaves the previous build intact, runtime
//! limits (context, prompt, generation length) give clear errors, a long run stops
//! cleanly on SIGINT, and inputs the fuzzers found stay fixed.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn assert_clean_error(o: &Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "error line: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
    for s in must_contain {
        assert!(err.contains(s), "stderr should contain {s:?}: {err}");
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// Hidden temporary directories a build of `name` leaves next to it (`.NAME.tmp-PID`, `.NAME.old-PID`).
fn temp_dirs(parent: &Path, name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!(".{name}.")))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait for kiln") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("kiln did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_during_compile_keeps_the_previous_build() {
    if smollm2().is_none() {
        return;
    }
    let dir = tempdir("kill-compile");
    let recipe = root().join("recipes/smollm2-135m.yaml");
    let out = dir.join("out");
    let args = ["compile", "--recipe", recipe.to_str().unwrap(), "--device", "laptop", "--out", out.to_str().unwrap()];
    let o = run(&args);
    assert!(o.status.success(), "first compile: {}", stderr(&o));
    let parent = out.join("smollm2-135m");
    let build = parent.join("laptop");
    let before = files(&build);

    // Start a second compile into the same output and SIGKILL it while it writes weights.bin.
    let mut killed = 0;
    for _attempt in 0..5 {
        let mut child = kiln().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("kiln runs");
        let t0 = Instant::now();
        let mut hit = false;
        while t0.elapsed() < Duration::from_secs(300) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let writing = temp_dirs(&parent, "laptop").iter().any(|t| t.join("weights.bin").exists());
            if writing {
                child.kill().unwrap(); // SIGKILL
                hit = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let status = child.wait().unwrap();
        if hit && !status.success() {
            killed += 1;
            break;
        }
    }
    assert_eq!(killed, 1, "could not kill a compile while it was writing");

    // The previous build is byte-for-byte intact and runs.
    assert!(files(&build) == before, "the previous build changed after kill -9");
    let o = run(&["run", build.to_str().unwrap(), "--prompt", "The capital of France is", "-n", "4", "--json"]);
    assert!(o.status.success(), "the previous build no longer runs: {}", stderr(&o));

    // What the killed compile left is a hidden temp dir without a manifest: never taken for a build.
    let stray = temp_dirs(&parent, "laptop");
    assert!(!stray.is_empty(), "kill -9 mid-write should leave its temp dir behind");
    for t in &stray {
        assert!(!t.join("manifest.json").exists(), "{} has a manifest", t.display());
        let o = run(&["run", t.to_str().unwrap(), "--prompt", "x", "-n", "1"]);
        assert!(!o.status.success(), "{} was loaded as a model", t.display());
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let names: Vec<String> =
        std::fs::read_dir(&parent).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().filter(|n| !n.starts_with('.')).eq(["laptop"].iter()), "{names:?}");

    // The next compile succeeds and removes the dead process's temp dir.
    let o = run(&args);
    assert!(o.status.success(), "compile after kill: {}", stderr(&o));
    assert!(temp_dirs(&parent, "laptop").is_empty(), "stale temp dirs: {:?}", temp_dirs(&parent, "laptop"));
    assert!(files(&build) == before, "the rebuild differs from the first build");
}

#[test]
fn run_limits_give_clear_errors() {
    let Some(m) = model("glassllm-en-hf") else { return };
    let m = m.to_str().unwrap();
    // --ctx beyond the model's context (128 tokens).
    let o = run(&["run", m, "--prompt", "Once upon a time", "--ctx", "4096"]);
    assert_clean_error(&o, &["--ctx 4096 is larger than the model's context length 128"]);
    // A prompt longer than the context.
    let long = "the cat sat on the mat. ".repeat(100);
    let o = run(&["run", m, "--prompt", &long, "-n", "1"]);
    assert_clean_error(&o, &["the prompt is", "does not fit the model's context length 128"]);
    // Prompt + new tokens beyond the context.
    let o = run(&["run", m, "--prompt", "Once upon a time", "-n", "100000", "--ignore-eos"]);
    assert_clean_error(&o, &["new tokens exceed the model's context length 128", "use -n"]);
    // A generation length whose sum with the prompt overflows is the same error, not a panic.
    let o = run(&["run", m, "--prompt", "Once upon a time", "-n", &usize::MAX.to_string()]);
    assert_clean_error(&o, &["exceed the model's context length 128"]);
    // --ctx too small for prompt + new tokens.
    let o = run(&["run", m, "--prompt", "Once upon a time", "--ctx", "8", "-n", "64"]);
    assert_clean_error(&o, &["new tokens do not fit --ctx 8"]);
    // Right at the limit works.
    let o = run(&["run", m, "--prompt", "Once upon a time", "--ctx", "128", "-n", "100", "--ignore-eos", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn sigint_stops_a_long_run_cleanly() {
    let Some(m) = smollm2() else { return };
    let prompt = "Once upon a time";
    let mut child = kiln()
        .args(["run", m.to_str().unwrap(), "--prompt", prompt, "-n", "4000", "--ignore-eos", "--threads", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        // Read until some generated text has been printed, then hand the rest over.
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while seen.len() < prompt.len() + 40 {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        (seen, out)
    });
    let (seen, mut out) = reader.join().unwrap();
    assert!(
        seen.len() >= prompt.len() + 40,
        "kiln printed too little before ending: {:?}",
        String::from_utf8_lossy(&seen)
    );
    let pid = child.id().to_string();
    let k = std::process::Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
    assert!(k.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(60));
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(status.code(), Some(130), "exit status {status:?}; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("kiln: interrupted"), "{err}");
    assert!(err.contains("(interrupted)"), "the run summary names the stop reason: {err}");
    assert!(String::from_utf8_lossy(&seen).starts_with(prompt));
}
