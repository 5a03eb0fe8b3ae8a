//! Building and running a watch build's C library outside kiln: on the host (`gcc`) and
//! on a Cortex-M4 under QEMU (`arm-none-eabi-gcc`, `qemu-system-arm -M mps2-an386`),
//! with a small harness that prefills a prompt, decodes greedily and prints a hash of
//! every step's Q16 logits. Used by the tests (bit-identity with the interpreter) and by
//! `cargo xtask bench watch` (cycles per token under QEMU's instruction counting).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::interp::Machine;

const RUN_C: &str = include_str!("../harness/run.c");
const HOST_C: &str = include_str!("../harness/host.c");
const CORTEX_M_C: &str = include_str!("../harness/cortex_m.c");
const MPS2_LD: &str = include_str!("../harness/mps2.ld");

/// The library's files in a build directory.
pub const LIBRARY: &[&str] = &["kiln_model.h", "kiln_model.c", "kiln_weights.h", "kiln_weights.c"];

/// Warnings the library must compile without (the and then some).
pub const STRICT: &[&str] = &["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wpedantic"];

/// Flags of the Cortex-M4 build (no FPU used: integer-only code, soft-float ABI).
pub const CORTEX_M4: &[&str] = &["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"];

/// One line of harness output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLine {
    /// The prompt length (prefill) or the decode step index.
    pub n: i64,
    pub token: i64,
    pub hash: u64,
    /// Counter ticks the call took (0 on the host).
    pub ticks: u64,
}

/// Everything a harness run printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    pub prefill: Option<StepLine>,
    pub steps: Vec<StepLine>,
    /// Every step's logits, when built with `KILN_DUMP_LOGITS`.
    pub logits: Vec<Vec<i32>>,
    /// The error code and position once the context is full.
    pub limit: Option<(i64, i64)>,
}

impl Trace {
    /// `(token, hash)` of the prefill and every step: what must match bit for bit.
    pub fn tokens_and_hashes(&self) -> Vec<(i64, u64)> {
        self.prefill.iter().chain(&self.steps).map(|l| (l.token, l.hash)).collect()
    }
}

/// FNV-1a over the little-endian bytes of the logits (as the harness computes it).
pub fn fnv(logits: &[i32]) -> u64 {
    let mut h = 14695981039346656037u64;
    for v in logits {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(1099511628211);
        }
    }
    h
}

/// What the harness must print, computed by the interpreter.
pub fn expected(machine: &mut Machine, prompt: &[u32], steps: usize) -> Result<Trace, String> {
    let mut t = Trace::default();
    machine.truncate(0);
    let mut last = vec![];
    for &tok in prompt {
        last = machine.step(tok).map_err(|e| format!("{e:?}"))?.to_vec();
    }
    let arg = |l: &[i32]| l.iter().enumerate().fold(0usize, |b, (i, v)| if *v > l[b] { i } else { b }) as i64;
    let mut tok = arg(&last);
    t.prefill = Some(StepLine { n: prompt.len() as i64, token: tok, hash: fnv(&last), ticks: 0 });
    t.logits.push(last);
    for s in 0..steps {
        let l = machine.step(tok as u32).map_err(|e| format!("{e:?}"))?.to_vec();
        tok = arg(&l);
        t.steps.push(StepLine { n: s as i64, token: tok, hash: fnv(&l), ticks: 0 });
        t.logits.push(l);
    }
    Ok(t)
}

/// Parses harness output.
pub fn parse(out: &str) -> Result<Trace, String> {
    let mut t = Trace::default();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<i64>().ok()).ok_or(format!("bad line `{line}`"));
        match f.first().copied() {
            Some("prefill") | Some("step") => {
                let hash =
                    f.get(3).and_then(|h| u64::from_str_radix(h, 16).ok()).ok_or(format!("bad line `{line}`"))?;
                let l = StepLine { n: num(1)?, token: num(2)?, hash, ticks: num(4)? as u64 };
                if f[0] == "prefill" {
                    t.prefill = Some(l);
                } else {
                    t.steps.push(l);
                }
                t.logits.push(vec![]);
            }
            Some("limit") => t.limit = Some((num(1)?, num(2)?)),
            Some(v) if v.parse::<i32>().is_ok() => {
                t.logits.last_mut().ok_or("logits before any step")?.push(v.parse().unwrap_or(0))
            }
            Some(_) => return Err(format!("unexpected harness output `{line}`")),
            None => {}
        }
    }
    if t.logits.iter().all(|l| l.is_empty()) {
        t.logits.clear();
    }
    Ok(t)
}

/// Copies the library of `build` and the harness into `dir`, with the prompt and the
/// number of decode steps in `prompt.h`.
pub fn stage(build: &Path, dir: &Path, prompt: &[u32], steps: usize) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for f in LIBRARY {
        std::fs::copy(build.join(f), dir.join(f)).map_err(|e| format!("{}: {e}", build.join(f).display()))?;
    }
    let list: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let prompt_h = format!("#define KILN_PROMPT {{{}}}\n#define KILN_STEPS {steps}\n", list.join(", "));
    for (name, text) in [
        ("run.c", RUN_C),
        ("host.c", HOST_C),
        ("cortex_m.c", CORTEX_M_C),
        ("mps2.ld", MPS2_LD),
        ("prompt.h", &prompt_h),
    ] {
        std::fs::write(dir.join(name), text).map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let o = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

/// Whether a program is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Compiles the staged library (strict C99) and the host harness with `gcc`; `extra`
/// adds flags (e.g. sanitizers, `-DKILN_DUMP_LOGITS`).
pub fn build_host(dir: &Path, extra: &[&str]) -> Result<PathBuf, String> {
    let exe = dir.join("host");
    for f in ["kiln_model.c", "kiln_weights.c"] {
        run(Command::new("gcc").current_dir(dir).args(STRICT).args(["-O2", "-c", f]).args(extra))?;
    }
    run(Command::new("gcc")
        .current_dir(dir)
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O2",
            "-I.",
            "run.c",
            "host.c",
            "kiln_model.o",
            "kiln_weights.o",
            "-o",
            "host",
        ])
        .args(extra))?;
    Ok(exe)
}

/// Compiles the staged library (strict C99) and the bare-metal harness for a Cortex-M4
/// with `arm-none-eabi-gcc`; returns the ELF and its `size` line.
pub fn build_cortex_m4(dir: &Path) -> Result<(PathBuf, String), String> {
    let cc = "arm-none-eabi-gcc";
    for (f, o) in [("kiln_model.c", "m.o"), ("kiln_weights.c", "w.o")] {
        run(Command::new(cc).current_dir(dir).args(CORTEX_M4).args(STRICT).args(["-O2", "-c", f, "-o", o]))?;
    }
    run(Command::new(cc)
        .current_dir(dir)
        .args(CORTEX_M4)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-I.", "-c", "run.c", "-o", "r.o"]))?;
    run(Command::new(cc).current_dir(dir).args(CORTEX_M4).args([
        "-std=gnu99",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O2",
        "-ffreestanding",
        "-fno-builtin",
        "-c",
        "cortex_m.c",
        "-o",
        "c.o",
    ]))?;
    run(Command::new(cc).current_dir(dir).args(CORTEX_M4).args([
        "-nostdlib",
        "-T",
        "mps2.ld",
        "c.o",
        "r.o",
        "m.o",
        "w.o",
        "-lgcc",
        "-o",
        "kiln.elf",
    ]))?;
    let size = run(Command::new("arm-none-eabi-size").current_dir(dir).arg("kiln.elf")).unwrap_or_default();
    Ok((dir.join("kiln.elf"), size.lines().last().unwrap_or("").trim().to_string()))
}

/// Runs an executable and parses its output.
pub fn run_host(exe: &Path) -> Result<Trace, String> {
    parse(&run(&mut Command::new(exe))?)
}

/// Instructions per CMSDK timer tick under `-icount shift=0` (1 ns per instruction, the
/// timer at the board's 25 MHz).
pub const INSTRUCTIONS_PER_TICK: u64 = 40;

/// Runs the ELF on QEMU's mps2-an386 (Cortex-M4) with semihosting, counting instructions
/// (`-icount shift=0`), and parses its output.
pub fn run_qemu(elf: &Path) -> Result<Trace, String> {
    parse(&run(Command::new("qemu-system-arm")
        .args([
            "-M",
            "mps2-an386",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
            "-icount",
            "shift=0",
            "-kernel",
        ])
        .arg(elf))?)
}
