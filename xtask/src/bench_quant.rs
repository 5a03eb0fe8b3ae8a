//! `cargo xtask bench quant`: kiln's quantization presets against llama.cpp's
//! quantizers on the same models, calibration text, held-out text and context,
//! in one run. For each model:
//!
//! - llama.cpp: `llama-imatrix` on the calibration text, then `llama-quantize
//!   --allow-requantize --imatrix` to IQ2_XXS, IQ2_XS, IQ2_S, Q2_K, Q3_K_S and
//!   Q4_K_M, each scored by `llama-perplexity`;
//! - kiln: `kiln compile` of a recipe whose `quantize` pass targets the bits per
//!   weight of llama.cpp's IQ2_XS, Q3_K_S and Q4_K_M files (same calibration
//!   text, budget allocated by measured sensitivity), each scored by `kiln ppl`
//!   on the CPU backend;
//! - bits per weight counted as llama.cpp counts them (all tensor bytes × 8 ÷
//!   all parameters), quantizing wall time and peak RSS (GNU time), and decode
//!   speed of the 2-bit and 4-bit files (`kiln bench`, `llama-bench`).
//!
//! Writes `bench/results/quant-<date>.{json,md,svg}` (the SVG is the
//! perplexity-vs-bpw picture, one panel per model). The default models are the
//! issue's three; with Qwen2.5-Coder-1.5B a run takes hours on two cores
//! (`--models` picks fewer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// llama.cpp types compared, and the kiln preset that targets each one's size.
const LLAMA_TYPES: &[&str] = &["IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "Q3_K_S", "Q4_K_M"];
/// The candidates of kiln's 2-bit presets.
const TWO_BIT: &[&str] =
    &["kq2", "q2_k", "q3_k", "iq4_nl", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"];
/// (preset, the llama.cpp type whose bpw it targets or a bpw, candidate formats).
/// Every preset allocates its budget by measured sensitivity (`sensitivity:
/// measured`). `kiln-2.6` is a true 2-bit build of every model, also of those whose
/// rows llama.cpp's 2-bit types cannot hold (its IQ2_XS of SmolLM2 is ~4.9 bpw).
const PRESETS: &[(&str, &str, &[&str])] = &[
    ("kiln-2bit", "IQ2_XS", TWO_BIT),
    ("kiln-2.6", "2.6", TWO_BIT),
    ("kiln-3bit", "Q3_K_S", &["kq2", "q2_k", "q3_k", "iq4_nl", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q8_0"]),
    ("kiln-4bit", "Q4_K_M", &["q3_k", "iq4_nl", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0"]),
];

pub struct Env {
    pub root: PathBuf,
    pub kiln: PathBuf,
    pub cache: PathBuf,
}

struct Opts {
    models: Vec<String>,
    ctx: usize,
    chunks: usize,
    calib_chunks: usize,
    threads: usize,
    llama_bin: PathBuf,
    out: PathBuf,
    calib: PathBuf,
    heldout: PathBuf,
    /// The 4-bit comparison's second, longer held-out text ([`four_bit_long`]) and its chunks.
    long_heldout: PathBuf,
    long_chunks: usize,
    /// `--long-4bit-only`: only [`four_bit_long`], on the files an earlier run left.
    long_only: bool,
}

fn parse(args: &[String], env: &Env) -> Result<Opts, String> {
    let mut o = Opts {
        models: vec!["smollm2-135m-instruct".into(), "qwen2.5-coder-0.5b".into(), "qwen2.5-coder-1.5b".into()],
        ctx: 512,
        chunks: 8,
        calib_chunks: 8,
        threads: 2,
        llama_bin: std::env::var_os("KILN_LLAMA_CPP_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| env.cache.join("llama.cpp/build/bin")),
        out: env.root.join("bench/results"),
        calib: env.root.join("tests/fixtures/text/calib-excerpt.txt"),
        heldout: env.root.join("tests/fixtures/text/ppl-excerpt.txt"),
        long_heldout: env.root.join("tests/fixtures/text/heldout-long.txt"),
        long_chunks: 40,
        long_only: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("{a}: `{v}` is not a number"));
        match a.as_str() {
            "--models" => o.models = val()?.split(',').map(str::to_string).collect(),
            "--ctx" => o.ctx = num(val()?)?,
            "--chunks" => o.chunks = num(val()?)?,
            "--calib-chunks" => o.calib_chunks = num(val()?)?,
            "--threads" => o.threads = num(val()?)?,
            "--llama-bin" => o.llama_bin = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            "--calib" => o.calib = PathBuf::from(val()?),
            "--heldout" => o.heldout = PathBuf::from(val()?),
            "--long-heldout" => o.long_heldout = PathBuf::from(val()?),
            "--long-chunks" => o.long_chunks = num(val()?)?,
            "--long-4bit-only" => o.long_only = true,
            other => return Err(format!("bench quant: unknown option `{other}`")),
        }
    }
    for b in ["llama-imatrix", "llama-quantize", "llama-perplexity", "llama-bench"] {
        if !o.llama_bin.join(b).exists() {
            return Err(format!(
                "{} is missing: build llama.cpp with tests/oracle/build_llama_cpp.sh (or set KILN_LLAMA_CPP_BIN)",
                o.llama_bin.join(b).display()
            ));
        }
    }
    Ok(o)
}

/// Runs `cmd` under GNU time when available: (stdout, stderr, seconds, peak RSS MiB).
pub(crate) fn timed(program: &Path, args: &[String]) -> Result<(String, String, f64, Option<f64>), String> {
    let gnu_time = Path::new("/usr/bin/time");
    let t0 = std::time::Instant::now();
    let out = if gnu_time.exists() {
        Command::new(gnu_time).arg("-f").arg("KILNTIME %e %M").arg(program).args(args).output()
    } else {
        Command::new(program).args(args).output()
    }
    .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let tail: String =
            stderr.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(format!("{} {} failed ({}):\n{tail}", program.display(), args.join(" "), out.status));
    }
    let rss = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("KILNTIME "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|kib| kib / 1024.0);
    Ok((stdout, stderr, secs, rss))
}

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Bits per weight as llama.cpp counts them: all tensor bytes × 8 ÷ all
/// elements. Reads only the GGUF header, so any ggml type counts (IQ2 too):
/// a tensor's bytes run from its offset to the next tensor's (alignment
/// padding, under 32 bytes a tensor, is counted with it).
pub(crate) fn gguf_bpw(path: &Path) -> Result<(f64, u64), String> {
    let buf = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = || format!("{}: not a GGUF file kiln's bench can read", path.display());
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = buf.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    fn u32_(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn u64_(b: &[u8]) -> u64 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    if take(4)? != b"GGUF" {
        return Err(bad());
    }
    take(4)?;
    let n_tensors = u64_(take(8)?) as usize;
    let n_kv = u64_(take(8)?) as usize;
    let mut alignment = 32u64;
    // Skips one value of `ty` (returns a u64 view of scalars, for general.alignment).
    fn skip(take: &mut dyn FnMut(usize) -> Result<Vec<u8>, String>, ty: u32) -> Result<u64, String> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(n) = fixed(ty) {
            let b = take(n)?;
            return Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64));
        }
        match ty {
            8 => {
                let n = u64_(&take(8)?) as usize;
                take(n)?;
                Ok(0)
            }
            9 => {
                let et = u32_(&take(4)?);
                let n = u64_(&take(8)?);
                for _ in 0..n {
                    skip(take, et)?;
                }
                Ok(0)
            }
            _ => Err(format!("unknown GGUF value type {ty}")),
        }
    }
    let mut take_owned = |n: usize| take(n).map(<[u8]>::to_vec);
    for _ in 0..n_kv {
        let kl = u64_(&take_owned(8)?) as usize;
        let key = String::from_utf8_lossy(&take_owned(kl)?).into_owned();
        let ty = u32_(&take_owned(4)?);
        let v = skip(&mut take_owned, ty)?;
        if key == "general.alignment" {
            alignment = v.max(1);
        }
    }
    let mut infos = vec![];
    for _ in 0..n_tensors {
        let nl = u64_(&take_owned(8)?) as usize;
        take_owned(nl)?;
        let nd = u32_(&take_owned(4)?) as usize;
        let mut elems = 1u64;
        for _ in 0..nd {
            elems = elems.saturating_mul(u64_(&take_owned(8)?));
        }
        take_owned(4)?;
        infos.push((u64_(&take_owned(8)?), elems));
    }
    let data = (at as u64).div_ceil(alignment) * alignment;
    infos.sort();
    let (mut bytes, mut elems) = (0u64, 0u64);
    for (i, (off, n)) in infos.iter().enumerate() {
        let end = infos.get(i + 1).map_or(buf.len() as u64 - data, |x| x.0);
        bytes += end.saturating_sub(*off);
        elems += n;
    }
    Ok((bytes as f64 * 8.0 / elems.max(1) as f64, elems))
}

/// `Final estimate: PPL = 12.3456 +/- ...` from llama-perplexity's output.
pub(crate) fn llama_ppl(text: &str) -> Option<f64> {
    let at = text.rfind("Final estimate: PPL = ")?;
    text[at + 22..].split_whitespace().next()?.parse().ok()
}

/// `label: value ± uncertainty` from llama-perplexity's KL-divergence summary.
fn llama_stat(text: &str, label: &str) -> Option<(f64, f64)> {
    // The label's own line: `Mean PPL(Q)` is also the start of `Mean PPL(Q)/PPL(base)`.
    let rest = text.lines().rev().find_map(|l| l.split_once(label)?.1.trim_start().strip_prefix(':'))?;
    let mut it = rest.split_whitespace().filter(|t| *t != "±" && *t != "%");
    let v = it.next()?.trim_end_matches('%').parse().ok()?;
    let u = it.next().and_then(|t| t.trim_end_matches('%').parse().ok()).unwrap_or(0.0);
    Some((v, u))
}

/// llama-perplexity's `--kl-divergence` summary of a file against the source's logits:
/// its perplexity, the mean ln(PPL/PPL(source)) and KL divergence (each with its
/// uncertainty) and how often the top token is the source's.
fn llama_kld(text: &str) -> Option<Value> {
    let (ppl, _) = llama_stat(text, "Mean PPL(Q)")?;
    let (ln_ratio, ln_ratio_unc) = llama_stat(text, "Mean ln(PPL(Q)/PPL(base))")?;
    let (kld, kld_unc) = llama_stat(text, "Mean    KLD")?;
    let (top, _) = llama_stat(text, "Same top p")?;
    Some(
        json!({"ppl": ppl, "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_unc": ln_ratio_unc, "kld": kld, "kld_unc": kld_unc, "same_top_pct": top}),
    )
}

/// The registry file of `id` (from `kiln models`), fetched into the cache.
pub(crate) fn model_path(env: &Env, id: &str) -> Result<PathBuf, String> {
    let out = Command::new(&env.kiln).args(["fetch", id]).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("kiln fetch {id} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let list = Command::new(&env.kiln).arg("models").output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&list.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{id}: ")))
        .ok_or_else(|| format!("{id} is not in the registry"))?;
    let file = line.rsplit_once('(').and_then(|(_, f)| f.strip_suffix(')')).ok_or("cannot parse `kiln models`")?;
    Ok(env.cache.join("models").join(file))
}

fn kiln_json(env: &Env, args: &[String]) -> Result<(Value, f64, Option<f64>), String> {
    let (out, _, secs, rss) = timed(&env.kiln, args)?;
    let v = serde_json::from_str(&out).map_err(|e| format!("kiln {}: bad JSON: {e}", args.join(" ")))?;
    Ok((v, secs, rss))
}

/// llama-perplexity's arguments for `model`'s perplexity on `chunks` chunks of `text`.
fn llama_ppl_args(o: &Opts, model: &Path, text: &Path, chunks: usize) -> Vec<String> {
    let mut args: Vec<String> = vec!["-m".into(), s(model), "-f".into(), s(text), "-c".into(), o.ctx.to_string()];
    args.extend(["--chunks".into(), chunks.to_string(), "-t".into(), o.threads.to_string()]);
    args
}

/// llama-perplexity's KL divergence of `model` from the source whose log-probabilities are
/// in `base` (`--kl-divergence-base`, which also holds the text's tokens): its summary.
fn score_kld(o: &Opts, model: &Path, base: &Path) -> Result<Value, String> {
    let args: Vec<String> = vec![
        "-m".into(),
        s(model),
        "-c".into(),
        o.ctx.to_string(),
        "-t".into(),
        o.threads.to_string(),
        "--kl-divergence-base".into(),
        s(base),
        "--kl-divergence".into(),
    ];
    // The summary is printed to stdout, the log to stderr.
    let (out, err, _, _) = timed(&o.llama_bin.join("llama-perplexity"), &args)?;
    llama_kld(&format!("{err}\n{out}")).ok_or_else(|| "no KL-divergence summary in llama-perplexity's output".into())
}

/// `kiln ppl` of `model` on `text` (`chunks` chunks of `o.ctx` tokens, `o.threads` threads;
/// `backend` where `model` is a GGUF file rather than a build): its report.
fn kiln_ppl(
    env: &Env,
    o: &Opts,
    model: &Path,
    text: &Path,
    chunks: usize,
    backend: Option<&str>,
) -> Result<Value, String> {
    let mut args: Vec<String> = vec![
        "ppl".into(),
        s(model),
        "-f".into(),
        s(text),
        "--ctx".into(),
        o.ctx.to_string(),
        "--chunks".into(),
        chunks.to_string(),
        "--threads".into(),
        o.threads.to_string(),
        "--json".into(),
    ];
    if let Some(b) = backend {
        args.extend(["--backend".into(), b.into()]);
    }
    Ok(kiln_json(env, &args)?.0["report"].clone())
}

fn bench_model(env: &Env, o: &Opts, id: &str, work: &Path) -> Result<Value, String> {
    let model = model_path(env, id)?;
    let (src_bpw, params) = gguf_bpw(&model)?;
    let lb = |b: &str| o.llama_bin.join(b);
    let (ctx, t) = (o.ctx.to_string(), o.threads.to_string());
    let ppl_args = |m: &Path| llama_ppl_args(o, m, &o.heldout, o.chunks);
    // The source's log-probabilities, kept for llama-perplexity's KL divergence of every
    // other file against the source: what perplexity differences of a few tenths of a
    // percent on this text cannot resolve, the KL divergence to the source does.
    eprintln!("[{id}] source");
    let base = work.join("source-logits.bin");
    let mut src_args = ppl_args(&model);
    src_args.extend(["--kl-divergence-base".into(), s(&base)]);
    let (_, err, _, _) = timed(&lb("llama-perplexity"), &src_args)?;
    let llama_src_ppl = llama_ppl(&err).ok_or("no perplexity in llama-perplexity's output")?;
    let kv = kiln_ppl(env, o, &model, &o.heldout, o.chunks, Some("cpu"))?;
    let kiln_src_ppl = kv["ppl"].as_f64().ok_or("kiln ppl: no ppl")?;

    eprintln!("[{id}] llama-imatrix");
    let imatrix = work.join("imatrix.gguf");
    timed(
        &lb("llama-imatrix"),
        &[
            "-m".into(),
            s(&model),
            "-f".into(),
            s(&o.calib),
            "-c".into(),
            ctx.clone(),
            "--chunks".into(),
            o.calib_chunks.to_string(),
            "-t".into(),
            t.clone(),
            "-o".into(),
            s(&imatrix),
        ],
    )?;
    let mut llama = BTreeMap::new();
    for ty in LLAMA_TYPES {
        eprintln!("[{id}] llama-quantize {ty}");
        let out = work.join(format!("llama-{ty}.gguf"));
        let (_, _, secs, rss) = timed(
            &lb("llama-quantize"),
            &[
                "--allow-requantize".into(),
                "--imatrix".into(),
                s(&imatrix),
                s(&model),
                s(&out),
                ty.to_string(),
                t.clone(),
            ],
        )?;
        let (bpw, _) = gguf_bpw(&out)?;
        let kld = score_kld(o, &out, &base)?;
        llama.insert(ty.to_string(), json!({"bpw": bpw, "ppl": kld["ppl"], "vs_source": kld, "quantize_seconds": secs, "quantize_peak_rss_mib": rss, "weights_per_second": params as f64 / secs, "file": s(&out)}));
    }

    let mut kiln = BTreeMap::new();
    for (preset, target_ty, candidates) in PRESETS {
        let target = target_ty.parse::<f64>().ok().or_else(|| llama[*target_ty]["bpw"].as_f64()).unwrap_or(0.0);
        eprintln!("[{id}] {preset} (target {target:.4} bpw)");
        let recipe = work.join(format!("{preset}.yaml"));
        // The CPU backend: 8-bit activations in every dot product, as llama-perplexity
        // scores llama.cpp's files (on GGUF types it reproduces llama.cpp's logits bit for
        // bit), so both sides are scored by the same numerics.
        let text = format!(
            "name: {preset}\nmodel: {}\ndevices:\n  laptop:\n    backend: cpu\n    passes: [dce, {{ quantize: {{ target_bpw: {target}, sensitivity: measured, candidates: [{}] }} }}]\ncalibration: {{ text: {}, ctx: {}, chunks: {} }}\n",
            s(&model),
            candidates.join(", "),
            s(&o.calib),
            o.ctx,
            o.calib_chunks
        );
        std::fs::write(&recipe, text).map_err(|e| e.to_string())?;
        let res = kiln_json(
            env,
            &[
                "compile".into(),
                "--recipe".into(),
                s(&recipe),
                "--device".into(),
                "laptop".into(),
                "--out".into(),
                s(&work.join("kiln")),
                "--json".into(),
            ],
        );
        let entry = match res {
            Err(e) => json!({"error": e, "target_bpw": target}),
            Ok((v, secs, rss)) => {
                let manifest = &v["builds"][0]["manifest"];
                let rep = manifest["passes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|p| p["pass"] == "quantize"))
                    .cloned()
                    .unwrap_or(Value::Null);
                let build = work.join("kiln").join(preset).join("laptop");
                let pv = kiln_ppl(env, o, &build, &o.heldout, o.chunks, None)?;
                json!({
                    "target_bpw": target,
                    "bpw": rep["details"]["bits_per_weight"],
                    "formats": rep["details"]["formats"],
                    "ppl": pv["ppl"],
                    "compile_seconds": secs,
                    "compile_peak_rss_mib": rss,
                    "weights_per_second": params as f64 / secs,
                    "memo": rep["details"]["memo"],
                    "sensitivity_groups": rep["details"]["sensitivity"]["groups"].as_object().map_or(0, |g| g.len()),
                    "build": s(&build),
                })
            }
        };
        kiln.insert(preset.to_string(), entry);
    }

    // Interop: the 4-bit build exported as GGUF and scored by llama.cpp itself.
    let export = if kiln["kiln-4bit"].get("error").is_none() {
        eprintln!("[{id}] kiln export --gguf kiln-4bit, llama-perplexity");
        let gguf = work.join("kiln-4bit.gguf");
        let build = work.join("kiln").join("kiln-4bit").join("laptop");
        match timed(&env.kiln, &["export".into(), s(&build), "--gguf".into(), s(&gguf)])
            .and_then(|_| score_kld(o, &gguf, &base))
        {
            Ok(kld) => {
                let (bpw, _) = gguf_bpw(&gguf)?;
                json!({"bpw": bpw, "llama_ppl": kld["ppl"], "kiln_ppl": kiln["kiln-4bit"]["ppl"], "vs_source": kld})
            }
            Err(e) => json!({"error": e}),
        }
    } else {
        Value::Null
    };

    let long = four_bit_long(env, o, id, &model, work).unwrap_or_else(|e| json!({"error": e}));

    // Decode speed of the 2-bit and 4-bit files (64-token prompt, 32 generated tokens).
    let mut speed = BTreeMap::new();
    for (name, build) in [("kiln-2bit", "kiln-2bit"), ("kiln-2.6", "kiln-2.6"), ("kiln-4bit", "kiln-4bit")] {
        if kiln[name].get("error").is_some() {
            continue;
        }
        let b = work.join("kiln").join(build).join("laptop");
        if let Ok((v, _, _)) = kiln_json(
            env,
            &[
                "bench".into(),
                s(&b),
                "--pp".into(),
                "64".into(),
                "--tg".into(),
                "32".into(),
                "--threads".into(),
                t.clone(),
                "--json".into(),
            ],
        ) {
            speed.insert(name.to_string(), v["report"]["decode_tokens_per_second"].clone());
        }
    }
    for ty in ["IQ2_XS", "Q4_K_M"] {
        let f = work.join(format!("llama-{ty}.gguf"));
        let (out, _, _, _) = timed(
            &lb("llama-bench"),
            &[
                "-m".into(),
                s(&f),
                "-p".into(),
                "0".into(),
                "-n".into(),
                "32".into(),
                "-t".into(),
                t.clone(),
                "-o".into(),
                "json".into(),
            ],
        )?;
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        speed.insert(format!("llama.cpp {ty}"), v[0]["avg_ts"].clone());
    }
    Ok(json!({
        "model": id,
        "file": s(&model),
        "params": params,
        "source_bpw": src_bpw,
        "source_ppl": {"llama.cpp": llama_src_ppl, "kiln": kiln_src_ppl},
        "llama.cpp": llama,
        "kiln": kiln,
        "export_4bit": export,
        "four_bit_long": long,
        "decode_tokens_per_second": speed,
    }))
}

/// The 4-bit comparison again on a second held-out text five times longer (`long_chunks`
/// chunks of `long_heldout`, by default Macbeth from Act I scene VI on: disjoint from the
/// main text). At 4 bits the quantizers' differences are a few tenths of a percent of
/// perplexity, which is noise on the main text's 4k tokens (its ln-ratio uncertainty is
/// ±0.003); on 20k tokens it is about ±0.0013. Scored against the source by
/// llama-perplexity (KL divergence, ln(PPL/PPL(source)) with its uncertainty, same top
/// token): llama.cpp's Q4_K_M file and kiln's 4-bit build exported as GGUF, plus kiln's own
/// perplexity of that build. Uses the files the model's run made in `work`.
fn four_bit_long(env: &Env, o: &Opts, id: &str, model: &Path, work: &Path) -> Result<Value, String> {
    let lb = |b: &str| o.llama_bin.join(b);
    let q4 = work.join("llama-Q4_K_M.gguf");
    let gguf = work.join("kiln-4bit.gguf");
    let build = work.join("kiln").join("kiln-4bit").join("laptop");
    for f in [&q4, &gguf, &build] {
        if !f.exists() {
            return Err(format!("{} is missing (made by the model's run of this bench)", f.display()));
        }
    }
    eprintln!("[{id}] 4-bit on {} ({} chunks)", o.long_heldout.display(), o.long_chunks);
    // The source's log-probabilities on this text (several GB for a 152k vocabulary):
    // removed again when done.
    let base = work.join("source-logits-long.bin");
    let mut src_args = llama_ppl_args(o, model, &o.long_heldout, o.long_chunks);
    src_args.extend(["--kl-divergence-base".into(), s(&base)]);
    let scored = timed(&lb("llama-perplexity"), &src_args).and_then(|(_, err, _, _)| {
        let source_ppl = llama_ppl(&err).ok_or("no perplexity in llama-perplexity's output")?;
        Ok((source_ppl, score_kld(o, &q4, &base)?, score_kld(o, &gguf, &base)?))
    });
    let _ = std::fs::remove_file(&base);
    let (source_ppl, llama_q4, kiln_q4) = scored?;
    let kv = kiln_ppl(env, o, &build, &o.long_heldout, o.long_chunks, None)?;
    Ok(json!({
        "text": s(&o.long_heldout),
        "chunks": o.long_chunks,
        "ctx": o.ctx,
        "source_ppl": source_ppl,
        "llama.cpp Q4_K_M": llama_q4,
        "kiln-4bit": {"kiln_ppl": kv["ppl"], "exported_gguf": kiln_q4},
    }))
}

/// `v` with `d` decimals, or "–" when it is not a number.
fn fmt_num(v: &Value, d: usize) -> String {
    v.as_f64().map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into())
}

/// A mean KL divergence, 4 decimals. llama-perplexity's KL divergence reads the source's
/// log-probabilities back rounded to 16 bits, so a file identical to the source scores a
/// hair below zero: shown as 0.
fn fmt_kld(v: &Value) -> String {
    fmt_num(&v.as_f64().map(|x| x.max(0.0)).into(), 4)
}

/// llama-perplexity's summary value `key` of `v` with its uncertainty (`key_unc`).
fn plus_minus(v: &Value, key: &str) -> String {
    let x = if key == "kld" { fmt_kld(&v[key]) } else { fmt_num(&v[key], 4) };
    format!("{x} ± {}", fmt_num(&v[&format!("{key}_unc")], 4))
}

/// Markdown lines for [`four_bit_long`]'s result `x`.
fn four_bit_long_md(x: &Value) -> String {
    if x.is_null() {
        return String::new();
    }
    if let Some(e) = x.get("error") {
        return format!(
            "- 4-bit on the long held-out text: failed: {}\n",
            e.as_str().unwrap_or("").lines().last().unwrap_or("")
        );
    }
    let f = fmt_num;
    let (k, l) = (&x["kiln-4bit"]["exported_gguf"], &x["llama.cpp Q4_K_M"]);
    let pm = plus_minus;
    let verdict = match (k["ppl"].as_f64(), l["ppl"].as_f64(), k["kld"].as_f64(), l["kld"].as_f64()) {
        (Some(kp), Some(lp), Some(kk), Some(lk)) => format!(
            "{}; {}",
            if kp <= lp { "kiln no worse by perplexity" } else { "kiln **worse** by perplexity" },
            if kk < lk { "closer to the source" } else { "**not** closer to the source" }
        ),
        _ => "incomplete".into(),
    };
    format!(
        "- kiln-4bit vs Q4_K_M on the long held-out text (`{}`, {} chunks of {}; source ppl {}), scored by llama-perplexity: \
         ppl {} vs {} (kiln's own {}), ln(PPL/PPL(source)) {} vs {}, KLD {} vs {}, same top token {}% vs {}%: {verdict}\n",
        Path::new(x["text"].as_str().unwrap_or(""))
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        x["chunks"],
        x["ctx"],
        f(&x["source_ppl"], 4),
        f(&k["ppl"], 4),
        f(&l["ppl"], 4),
        f(&x["kiln-4bit"]["kiln_ppl"], 4),
        pm(k, "ln_ppl_ratio"),
        pm(l, "ln_ppl_ratio"),
        pm(k, "kld"),
        pm(l, "kld"),
        f(&k["same_top_pct"], 2),
        f(&l["same_top_pct"], 2),
    )
}

fn markdown(results: &[Value], o: &Opts, date: &str) -> String {
    let mut md = format!(
        "# Quantization: kiln vs llama.cpp ({date})\n\nOne run on this machine (`cargo xtask bench quant`). Calibration: `{}` ({} chunks of {}); \
         perplexity: `{}`, {} chunks of {} tokens (llama-perplexity's chunking for both). bpw = all tensor bytes × 8 ÷ all parameters. \
         kiln presets target the bpw of the llama.cpp file named in brackets (or the bpw there).\n\n",
        o.calib.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        o.calib_chunks,
        o.ctx,
        o.heldout.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        o.chunks,
        o.ctx
    );
    for r in results {
        if let Some(e) = r.get("error") {
            md += &format!("## {}\n\nfailed: {e}\n\n", r["model"]);
            continue;
        }
        md += &format!(
            "## {} ({} parameters, source {:.3} bpw, source ppl llama.cpp {:.4} / kiln {:.4})\n\n| quantizer | bpw | ppl | KLD vs source | quantize s | Mweights/s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|\n",
            r["model"].as_str().unwrap_or(""),
            r["params"],
            r["source_bpw"].as_f64().unwrap_or(0.0),
            r["source_ppl"]["llama.cpp"].as_f64().unwrap_or(0.0),
            r["source_ppl"]["kiln"].as_f64().unwrap_or(0.0),
        );
        let f = fmt_num;
        let mw = |v: &Value| v.as_f64().map(|x| format!("{:.2}", x / 1e6)).unwrap_or_else(|| "–".into());
        let kld = fmt_kld;
        for ty in LLAMA_TYPES {
            let e = &r["llama.cpp"][*ty];
            md += &format!(
                "| llama.cpp {ty} | {} | {} | {} | {} | {} | {} |\n",
                f(&e["bpw"], 3),
                f(&e["ppl"], 4),
                kld(&e["vs_source"]["kld"]),
                f(&e["quantize_seconds"], 1),
                mw(&e["weights_per_second"]),
                f(&e["quantize_peak_rss_mib"], 0)
            );
        }
        for (p, ty, _) in PRESETS {
            let e = &r["kiln"][*p];
            if let Some(err) = e.get("error") {
                md += &format!(
                    "| {p} [{ty}] | target {} | failed: {} | | | | |\n",
                    f(&e["target_bpw"], 3),
                    err.as_str().unwrap_or("").lines().last().unwrap_or("")
                );
            } else {
                let hits = e["memo"]["hits"].as_u64().unwrap_or(0);
                // Only the 4-bit build is in GGUF types, scored against the source by llama.cpp.
                let kld = if *p == "kiln-4bit" {
                    format!("{}‡", kld(&r["export_4bit"]["vs_source"]["kld"]))
                } else {
                    "–".into()
                };
                md += &format!(
                    "| {p} [{ty}] | {} | {} | {kld} | {}{} | {} | {} |\n",
                    f(&e["bpw"], 3),
                    f(&e["ppl"], 4),
                    f(&e["compile_seconds"], 1),
                    if hits > 0 { "†" } else { "" },
                    mw(&e["weights_per_second"]),
                    f(&e["compile_peak_rss_mib"], 0)
                );
            }
        }
        md += "\nkiln's time is the whole `kiln compile` (import, importance matrix, the measured sensitivity's perplexity runs, quantization, writing the build); † the build reused results from kiln's memo (quantized tensors, error samples, measured perplexities, keyed by content), which each run starts empty: left by an earlier preset of the model, or the same work repeated within the build. KLD vs source: llama-perplexity's mean KL divergence of the file's next-token distributions from the source model's on the held-out text; ‡ of kiln-4bit's build exported by `kiln export --gguf` (the other kiln builds use kiln's own formats, which llama.cpp cannot load).\n";
        // The comparisons, each at no more bits per weight than llama.cpp's file.
        for (p, ty, _) in PRESETS {
            let (k, l) = (&r["kiln"][*p], &r["llama.cpp"][*ty]);
            if let (Some(kb), Some(kp), Some(lb), Some(lp)) =
                (k["bpw"].as_f64(), k["ppl"].as_f64(), l["bpw"].as_f64(), l["ppl"].as_f64())
            {
                md += &format!(
                    "- {p} vs {ty}: {kb:.4} vs {lb:.4} bpw, ppl {kp:.4} vs {lp:.4} ({:+.1}%): {}\n",
                    (kp / lp - 1.0) * 100.0,
                    if kb <= lb && kp < lp { "kiln better at no more bits" } else { "kiln **not** better" }
                );
            }
        }
        let x = &r["export_4bit"];
        let (kv, lv) = (&x["vs_source"], &r["llama.cpp"]["Q4_K_M"]["vs_source"]);
        if let (Some(kk), Some(lk)) = (kv["kld"].as_f64(), lv["kld"].as_f64()) {
            let pm = plus_minus;
            md += &format!(
                "- kiln-4bit vs Q4_K_M against the source (llama-perplexity --kl-divergence): KLD {} vs {}, ln(PPL/PPL(source)) {} vs {}, same top token {}% vs {}%: {}\n",
                pm(kv, "kld"),
                pm(lv, "kld"),
                pm(kv, "ln_ppl_ratio"),
                pm(lv, "ln_ppl_ratio"),
                f(&kv["same_top_pct"], 2),
                f(&lv["same_top_pct"], 2),
                if kk < lk { "kiln closer to the source" } else { "kiln **not** closer to the source" }
            );
        }
        if let (Some(lp), Some(kp)) = (x["llama_ppl"].as_f64(), x["kiln_ppl"].as_f64()) {
            md += &format!(
                "- kiln-4bit exported by `kiln export --gguf` ({} bpw), scored by llama-perplexity: {lp:.4} vs kiln's {kp:.4} ({:+.2}%)\n",
                f(&x["bpw"], 3),
                (lp / kp - 1.0) * 100.0
            );
        } else if let Some(e) = x.get("error") {
            md += &format!(
                "- kiln-4bit GGUF export: failed: {}\n",
                e.as_str().unwrap_or("").lines().last().unwrap_or("")
            );
        }
        md += &four_bit_long_md(&r["four_bit_long"]);
        md += "\nDecode tokens/s (tg32, same threads): ";
        md += &r["decode_tokens_per_second"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k} {}", f(v, 2))).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let tps = |k: &str| r["decode_tokens_per_second"][k].as_f64();
        if let (Some(k2), Some(k4), Some(l2)) = (tps("kiln-2bit"), tps("kiln-4bit"), tps("llama.cpp IQ2_XS")) {
            md += &format!(" (kiln-2bit: {:.2}× kiln-4bit, {:.2}× llama.cpp IQ2_XS)", k2 / k4, k2 / l2);
        }
        // What happened to a measurement, written into the JSON by hand (e.g. decode timed
        // again because something else ran on the machine during the run's timing).
        if let Some(note) = r["decode_note"].as_str() {
            md += &format!("\n\n{note}");
        }
        md += "\n\n";
    }
    md
}

/// Perplexity vs bits per weight, one panel per model (log-scale ppl).
fn svg(results: &[Value]) -> String {
    let ok: Vec<&Value> = results.iter().filter(|r| r.get("error").is_none()).collect();
    let (pw, ph, m) = (420.0, 300.0, 50.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        pw * ok.len().max(1) as f64,
        ph
    );
    for (i, r) in ok.iter().enumerate() {
        let x0 = i as f64 * pw;
        let mut pts: Vec<(String, f64, f64, &str)> = vec![];
        for ty in LLAMA_TYPES {
            let e = &r["llama.cpp"][*ty];
            if let (Some(b), Some(p)) = (e["bpw"].as_f64(), e["ppl"].as_f64()) {
                pts.push((ty.to_string(), b, p, "#d62728"));
            }
        }
        for (p, _, _) in PRESETS {
            let e = &r["kiln"][*p];
            if let (Some(b), Some(q)) = (e["bpw"].as_f64(), e["ppl"].as_f64()) {
                pts.push((p.to_string(), b, q, "#1f77b4"));
            }
        }
        if pts.is_empty() {
            continue;
        }
        let (bmin, bmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (lmin, lmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.2.ln()), b.max(p.2.ln())));
        let sx = |b: f64| x0 + m + (b - bmin + 0.1) / (bmax - bmin + 0.2) * (pw - 2.0 * m);
        let sy = |p: f64| ph - m - (p.ln() - lmin + 0.05) / (lmax - lmin + 0.1) * (ph - 2.0 * m);
        out += &format!(
            "<text x=\"{}\" y=\"18\" font-weight=\"bold\">{}</text>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
            x0 + m,
            r["model"].as_str().unwrap_or(""),
            x0 + m,
            ph - m,
            x0 + pw - m,
            ph - m,
            x0 + m,
            m,
            x0 + m,
            ph - m
        );
        out += &format!("<text x=\"{}\" y=\"{}\">bits per weight</text>\n", x0 + pw / 2.0 - 40.0, ph - 12.0);
        out += &format!(
            "<text x=\"{}\" y=\"{}\" transform=\"rotate(-90 {} {})\">perplexity (log)</text>\n",
            x0 + 14.0,
            ph / 2.0 + 40.0,
            x0 + 14.0,
            ph / 2.0 + 40.0
        );
        for (color, name) in [("#d62728", "llama.cpp"), ("#1f77b4", "kiln")] {
            let mut series: Vec<&(String, f64, f64, &str)> = pts.iter().filter(|p| p.3 == color).collect();
            series.sort_by(|a, b| a.1.total_cmp(&b.1));
            let path: Vec<String> = series.iter().map(|p| format!("{:.1},{:.1}", sx(p.1), sy(p.2))).collect();
            out += &format!("<polyline fill=\"none\" stroke=\"{color}\" points=\"{}\"/>\n", path.join(" "));
            for p in &series {
                out += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{} {:.2}/{:.1}</text>\n",
                    sx(p.1),
                    sy(p.2),
                    sx(p.1) + 4.0,
                    sy(p.2) - 4.0,
                    p.0,
                    p.1,
                    p.2
                );
            }
            let ly = if name == "kiln" { 34.0 } else { 48.0 };
            out += &format!("<text x=\"{}\" y=\"{ly}\" fill=\"{color}\">● {name}</text>\n", x0 + pw - m - 60.0);
        }
        for b in [2.0, 3.0, 4.0, 5.0, 6.0, 8.0] {
            if b >= bmin - 0.1 && b <= bmax + 0.1 {
                out += &format!("<text x=\"{:.1}\" y=\"{}\">{b}</text>\n", sx(b) - 4.0, ph - m + 14.0);
            }
        }
    }
    out + "</svg>\n"
}

/// `--render FILE.json`: rewrites a run's markdown and SVG from its JSON (the table and
/// picture change without measuring again).
fn render(json_path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(json_path).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{}: bad JSON: {e}", json_path.display()))?;
    let results = doc["results"].as_array().ok_or_else(|| format!("{}: no `results`", json_path.display()))?;
    let num = |k: &str| doc[k].as_u64().map(|v| v as usize).ok_or_else(|| format!("{}: no `{k}`", json_path.display()));
    let o = Opts {
        models: vec![],
        ctx: num("ctx")?,
        chunks: num("chunks")?,
        calib_chunks: num("calib_chunks")?,
        threads: doc["machine"]["threads"].as_u64().unwrap_or(0) as usize,
        llama_bin: PathBuf::new(),
        out: PathBuf::new(),
        calib: PathBuf::from(doc["calib"].as_str().unwrap_or("calib-excerpt.txt")),
        heldout: PathBuf::from(doc["heldout"].as_str().unwrap_or("ppl-excerpt.txt")),
        long_heldout: PathBuf::from(doc["long_heldout"].as_str().unwrap_or("")),
        long_chunks: doc["long_chunks"].as_u64().unwrap_or(0) as usize,
        long_only: false,
    };
    let date = doc["date"].as_str().unwrap_or("");
    std::fs::write(json_path.with_extension("md"), markdown(results, &o, date)).map_err(|e| e.to_string())?;
    std::fs::write(json_path.with_extension("svg"), svg(results)).map_err(|e| e.to_string())?;
    println!("wrote {}", json_path.with_extension("{md,svg}").display());
    Ok(())
}

/// `--long-4bit-only`: [`four_bit_long`] for each model on the files an earlier full run
/// left in the cache, written to `quant-long4-<date>.{json,md}` (a supplement to that run,
/// not a run of the whole bench).
fn long_only(env: &Env, o: &Opts, work: &Path, date: &str) -> Result<(), String> {
    let mut results = vec![];
    let mut md = format!(
        "# Quantization at 4 bits on a longer held-out text ({date})\n\n`cargo xtask bench quant --long-4bit-only`: the files of the \
         last full run of `bench quant` (llama.cpp's Q4_K_M and kiln's 4-bit build exported as GGUF), scored against the source \
         by llama-perplexity on `{}` ({} chunks of {} tokens).\n\n",
        o.long_heldout.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        o.long_chunks,
        o.ctx
    );
    for id in &o.models {
        let r = model_path(env, id).and_then(|m| four_bit_long(env, o, id, &m, &work.join(id)));
        let r = r.unwrap_or_else(|e| json!({"error": e}));
        md += &format!("## {id}\n\n{}\n", four_bit_long_md(&r));
        results.push(json!({"model": id, "four_bit_long": r}));
    }
    let base = o.out.join(format!("quant-long4-{date}"));
    std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
    let doc = json!({"date": date, "threads": o.threads, "ctx": o.ctx, "long_heldout": s(&o.long_heldout), "long_chunks": o.long_chunks, "results": results});
    std::fs::write(base.with_extension("json"), serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(base.with_extension("md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    println!("wrote {}.{{json,md}}", base.display());
    Ok(())
}

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    if let [flag, file] = args
        && flag == "--render"
    {
        return render(Path::new(file));
    }
    let o = parse(args, env)?;
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|d| String::from_utf8_lossy(&d.stdout).trim().to_string())
        .unwrap_or_default();
    let work = env.cache.join("bench-quant");
    if o.long_only {
        return long_only(env, &o, &work, &date);
    }
    // kiln's memo starts empty, so the run's first preset of each model pays for all its
    // work and the table marks what later presets reused.
    let memo = work.join("memo");
    let _ = std::fs::remove_dir_all(&memo);
    // SAFETY: set before this process starts any thread; the kiln processes inherit it.
    unsafe { std::env::set_var("KILN_MEMO_DIR", &memo) };
    std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
    let base = o.out.join(format!("quant-{date}"));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    // Written after every model, so a long run that stops early keeps what it measured.
    let write = |results: &[Value]| -> Result<(), String> {
        let doc = json!({"date": date, "machine": {"cpu": cpu, "threads": o.threads}, "ctx": o.ctx, "chunks": o.chunks, "calib_chunks": o.calib_chunks, "calib": s(&o.calib), "heldout": s(&o.heldout), "long_heldout": s(&o.long_heldout), "long_chunks": o.long_chunks, "models": o.models, "results": results});
        std::fs::write(base.with_extension("json"), serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
            .map_err(|e| e.to_string())?;
        std::fs::write(base.with_extension("md"), markdown(results, &o, &date)).map_err(|e| e.to_string())?;
        std::fs::write(base.with_extension("svg"), svg(results)).map_err(|e| e.to_string())
    };
    let mut results = vec![];
    for id in &o.models {
        let dir = work.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let r = bench_model(env, &o, id, &dir).unwrap_or_else(|e| json!({"model": id, "error": e}));
        eprintln!("[{id}] done");
        results.push(r);
        write(&results)?;
    }
    println!("{}", markdown(&results, &o, &date));
    println!("wrote {}.{{json,md,svg}}", base.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_verdict_reads_perplexity_and_kl_divergence() {
        let side = |ppl: f64, kld: f64| json!({"ppl": ppl, "kld": kld, "kld_unc": 0.0001, "ln_ppl_ratio": 0.001, "ln_ppl_ratio_unc": 0.001, "same_top_pct": 97.5});
        let x = |k: Value, l: Value| json!({"text": "/x/heldout-long.txt", "chunks": 40, "ctx": 512, "source_ppl": 20.0, "kiln-4bit": {"kiln_ppl": 20.01, "exported_gguf": k}, "llama.cpp Q4_K_M": l});
        let md = four_bit_long_md(&x(side(20.0, 0.0), side(20.1, 0.006)));
        assert!(md.contains("heldout-long.txt`, 40 chunks of 512"), "{md}");
        assert!(md.contains("ppl 20.0000 vs 20.1000 (kiln's own 20.0100)"), "{md}");
        assert!(md.ends_with("kiln no worse by perplexity; closer to the source\n"), "{md}");
        let md = four_bit_long_md(&x(side(20.2, 0.007), side(20.1, 0.006)));
        assert!(md.ends_with("kiln **worse** by perplexity; **not** closer to the source\n"), "{md}");
        assert!(four_bit_long_md(&json!({"error": "a\nb is missing"})).contains("failed: b is missing"));
        assert_eq!(four_bit_long_md(&Value::Null), "");
    }

    #[test]
    fn kl_divergence_summary_is_read() {
        // Lines as llama-perplexity --kl-divergence prints them (SmolLM2's Q4_K_M).
        let out = "Mean PPL(Q)                   :  35.501643 ±   2.561198\n\
                   Mean PPL(base)                :  34.305685 ±   2.441804\n\
                   Mean ln(PPL(Q)/PPL(base))     :   0.034268 ±   0.007236\n\
                   Mean PPL(Q)/PPL(base)         :   1.034862 ±   0.007488\n\
                   ====== KL divergence statistics ======\n\
                   Mean    KLD:   0.044144 ±   0.001382\n\
                   Maximum KLD:   0.983872\n\
                   Mean    Δp: -0.357 ± 0.100 %\n\
                   Same top p: 87.157 ± 0.741 %\n";
        let v = llama_kld(out).unwrap();
        assert_eq!(v["ppl"], 35.501643);
        assert_eq!(v["ln_ppl_ratio"], 0.034268);
        assert_eq!(v["ln_ppl_ratio_unc"], 0.007236);
        assert_eq!(v["kld"], 0.044144);
        assert_eq!(v["kld_unc"], 0.001382);
        assert_eq!(v["same_top_pct"], 87.157);
        assert!(llama_kld("Final estimate: PPL = 12.3 +/- 0.1").is_none());
    }
}
