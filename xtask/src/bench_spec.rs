//! `cargo xtask bench spec`: prompt-lookup speculative decoding against plain
//! greedy decoding on the same model, backend and thread count, in one run:
//! the 20 code and prose prompts of `tests/fixtures/text/spec-prompts.json`,
//! `kiln run --json` with and without `--speculate`, each prompt's tokens
//! compared (they must be identical), decode tokens/s, draft acceptance and
//! tokens per forward call. Writes `bench/results/spec-<date>.{json,md}`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::bench_quant::Env;

struct Opts {
    models: Vec<String>,
    tokens: usize,
    threads: usize,
    backend: String,
    out: PathBuf,
}

fn parse(args: &[String], env: &Env) -> Result<Opts, String> {
    let mut o = Opts {
        models: vec!["smollm2-135m-instruct".into(), "qwen2.5-coder-0.5b".into()],
        tokens: 64,
        threads: 2,
        backend: "reference".into(),
        out: env.root.join("bench/results"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--models" => o.models = val()?.split(',').map(str::to_string).collect(),
            "--tokens" => o.tokens = val()?.parse().map_err(|_| "--tokens needs a number")?,
            "--threads" => o.threads = val()?.parse().map_err(|_| "--threads needs a number")?,
            "--backend" => o.backend = val()?,
            "--out" => o.out = PathBuf::from(val()?),
            other => return Err(format!("unknown option `{other}` (--models --tokens --threads --backend --out)")),
        }
    }
    Ok(o)
}

pub(crate) fn run_json(kiln: &Path, args: &[String]) -> Result<Value, String> {
    let out = Command::new(kiln).args(args).output().map_err(|e| format!("cannot run {}: {e}", kiln.display()))?;
    if !out.status.success() {
        return Err(format!("kiln {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("kiln {}: bad JSON: {e}", args.join(" ")))
}

pub(crate) fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output().ok();
    out.and_then(|o| String::from_utf8(o.stdout).ok()).map(|s| s.trim().to_string()).unwrap_or_else(|| "undated".into())
}

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    let o = parse(args, env)?;
    let prompts: Value = serde_json::from_str(
        &std::fs::read_to_string(env.root.join("tests/fixtures/text/spec-prompts.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    for model in &o.models {
        for kind in ["code", "prose"] {
            let list = prompts[kind].as_array().ok_or("spec-prompts.json: bad format")?;
            let (mut plain_tok, mut plain_s, mut spec_tok, mut spec_s) = (0usize, 0f64, 0usize, 0f64);
            let (mut drafted, mut accepted, mut calls, mut identical) = (0u64, 0u64, 0u64, 0usize);
            for p in list {
                let p = p.as_str().ok_or("spec-prompts.json: a prompt is not a string")?;
                let base: Vec<String> = [
                    "run",
                    model,
                    "--json",
                    "--ignore-eos",
                    "-n",
                    &o.tokens.to_string(),
                    "--threads",
                    &o.threads.to_string(),
                    "--backend",
                    &o.backend,
                    "-p",
                    p,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let plain = run_json(&env.kiln, &base)?;
                let mut sa = base.clone();
                sa.push("--speculate".into());
                let spec = run_json(&env.kiln, &sa)?;
                let (po, so) = (&plain["output"], &spec["output"]);
                if po["tokens"] == so["tokens"] {
                    identical += 1;
                } else {
                    return Err(format!("{model}: speculative output differs from greedy on prompt {p:?}"));
                }
                let n = so["tokens"].as_array().map_or(0, Vec::len);
                plain_tok += n;
                spec_tok += n;
                plain_s += po["decode_seconds"].as_f64().unwrap_or(0.0);
                spec_s += so["decode_seconds"].as_f64().unwrap_or(0.0);
                let st = &spec["speculative"];
                drafted += st["drafted"].as_u64().unwrap_or(0);
                accepted += st["accepted"].as_u64().unwrap_or(0);
                calls += st["forward_calls"].as_u64().unwrap_or(0);
            }
            let rate = |t: usize, s: f64| if s > 0.0 { t as f64 / s } else { 0.0 };
            let r = json!({
                "model": model,
                "prompts": kind,
                "count": list.len(),
                "identical": identical,
                "tokens_per_prompt": o.tokens,
                "greedy_tokens_per_second": rate(plain_tok, plain_s),
                "speculative_tokens_per_second": rate(spec_tok, spec_s),
                "speedup": if plain_s > 0.0 && spec_s > 0.0 { plain_s / spec_s } else { 0.0 },
                "drafted": drafted,
                "accepted": accepted,
                "acceptance_rate": if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 },
                "tokens_per_forward_call": if calls > 0 { spec_tok as f64 / calls as f64 } else { 0.0 },
            });
            eprintln!("{r}");
            results.push(r);
        }
    }
    let date = today();
    let doc = json!({"date": date, "backend": o.backend, "threads": o.threads, "results": results});
    std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
    let jpath = o.out.join(format!("spec-{date}.json"));
    std::fs::write(&jpath, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n")
        .map_err(|e| e.to_string())?;
    let mut md = format!(
        "# Speculative decoding (prompt lookup) vs greedy — {date}\n\n`cargo xtask bench spec`: backend `{}`, {} threads, {} new tokens per prompt, the 20 prompts of `tests/fixtures/text/spec-prompts.json`; every speculative output was token-for-token the greedy one.\n\n| model | prompts | greedy t/s | speculative t/s | speedup | acceptance | tokens per forward call |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        o.backend, o.threads, o.tokens
    );
    for r in &results {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.0}% | {:.2} |\n",
            r["model"].as_str().unwrap_or(""),
            r["prompts"].as_str().unwrap_or(""),
            r["greedy_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["speculative_tokens_per_second"].as_f64().unwrap_or(0.0),
            r["speedup"].as_f64().unwrap_or(0.0),
            100.0 * r["acceptance_rate"].as_f64().unwrap_or(0.0),
            r["tokens_per_forward_call"].as_f64().unwrap_or(0.0),
        ));
    }
    let mpath = o.out.join(format!("spec-{date}.md"));
    std::fs::write(&mpath, md).map_err(|e| e.to_string())?;
    println!("wrote {} and {}", jpath.display(), mpath.display());
    Ok(())
}
