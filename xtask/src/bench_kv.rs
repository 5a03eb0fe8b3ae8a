//! `cargo xtask bench kv`: KV-cache bytes per token against perplexity, per
//! model: the unshared baseline, fixed groups of two layers sharing one cache,
//! and `kv_share` plans chosen under perplexity budgets on the calibration text
//! (`tests/fixtures/text/calib-excerpt.txt`). Each configuration is compiled
//! (`laptop`, CPU backend) and scored with `kiln ppl` on held-out text
//! (`tests/fixtures/text/ppl-excerpt.txt`). KV bytes count what the cache
//! stores (f32, q8_0/q4_0 blocks or FP8 bytes). Writes `bench/results/kv-<date>.{json,md}`.
//! Also the quantized caches (`kv_quant: q8_0 / q4_0 / f8_e4m3`) and the last budget's
//! sharing plan combined with a q8_0 and with an FP8 cache.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::bench_quant::{Env, llama_ppl, model_path};
use crate::bench_spec::{run_json, today};

struct Opts {
    models: Vec<String>,
    budgets: Vec<String>,
    ctx: usize,
    chunks: usize,
    calib_ctx: usize,
    calib_chunks: usize,
    threads: usize,
    llama_bin: PathBuf,
    out: PathBuf,
}

fn parse(args: &[String], env: &Env) -> Result<Opts, String> {
    let mut o = Opts {
        models: vec!["smollm2-135m-instruct".into(), "qwen2.5-coder-0.5b".into()],
        budgets: vec!["5%".into(), "25%".into()],
        ctx: 512,
        chunks: 4,
        calib_ctx: 256,
        calib_chunks: 1,
        threads: 2,
        llama_bin: std::env::var_os("KILN_LLAMA_CPP_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| env.cache.join("llama.cpp/build/bin")),
        out: env.root.join("bench/results"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("{a}: `{v}` is not a number"));
        match a.as_str() {
            "--models" => o.models = val()?.split(',').map(str::to_string).collect(),
            "--budgets" => o.budgets = val()?.split(',').map(str::to_string).collect(),
            "--ctx" => o.ctx = num(val()?)?,
            "--chunks" => o.chunks = num(val()?)?,
            "--calib-ctx" => o.calib_ctx = num(val()?)?,
            "--calib-chunks" => o.calib_chunks = num(val()?)?,
            "--threads" => o.threads = num(val()?)?.max(1),
            "--llama-bin" => o.llama_bin = PathBuf::from(val()?),
            "--out" => o.out = PathBuf::from(val()?),
            other => {
                return Err(format!(
                    "bench kv: unknown option `{other}` (--models --budgets --ctx --chunks --calib-ctx --calib-chunks --threads --llama-bin --out)"
                ));
            }
        }
    }
    Ok(o)
}

/// A configuration's KV passes: written out, or the last budget's sharing plan with a cache type.
enum Kv {
    Passes(String),
    LastPlanWith(&'static str),
}

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    let o = parse(args, env)?;
    let work = env.root.join("target/bench-kv");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let calib = env.root.join("tests/fixtures/text/calib-excerpt.txt");
    let held_out = env.root.join("tests/fixtures/text/ppl-excerpt.txt");
    // (label, passes after dce). Every config ends in kv_quant, whose report gives the bytes.
    let mut configs: Vec<(String, String)> = vec![
        ("baseline (f32)".into(), "      - kv_quant: { type: f32 }\n".into()),
        ("q8_0 KV".into(), "      - kv_quant: { type: q8_0 }\n".into()),
        ("q4_0 KV".into(), "      - kv_quant: { type: q4_0 }\n".into()),
        ("f8_e4m3 KV".into(), "      - kv_quant: { type: f8_e4m3 }\n".into()),
        ("share: groups of 2".into(), "      - kv_share: { group: 2 }\n      - kv_quant: { type: f32 }\n".into()),
    ];
    for b in &o.budgets {
        configs.push((
            format!("share: budget {b}"),
            format!("      - kv_share: {{ max_ppl_increase: \"{b}\" }}\n      - kv_quant: {{ type: f32 }}\n"),
        ));
    }
    let mut rows = Vec::new();
    for model in &o.models {
        // The last budget's plan, reused with a q8_0 and an FP8 cache (no second search).
        let mut last_plan: Option<Value> = None;
        let mut mine: Vec<(String, Kv)> =
            configs.iter().map(|(label, kv)| (label.clone(), Kv::Passes(kv.clone()))).collect();
        for t in ["q8_0", "f8_e4m3"] {
            mine.push((format!("share (last budget's plan) + {t} KV"), Kv::LastPlanWith(t)));
        }
        for (i, (label, kv)) in mine.iter().enumerate() {
            let name = format!("kv-{}-{i}", model.replace('.', "_"));
            let kv_pass = match kv {
                Kv::Passes(passes) => passes.clone(),
                Kv::LastPlanWith(t) => {
                    let Some(plan) = &last_plan else { continue };
                    format!("      - kv_share: {{ share: {plan} }}\n      - kv_quant: {{ type: {t} }}\n")
                }
            };
            let recipe = work.join(format!("{name}.yaml"));
            let text = format!(
                "name: {name}\nmodel: {model}\ndevices:\n  laptop:\n    backend: cpu\n    passes:\n      - dce\n{kv_pass}\
                 calibration: {{ text: {}, ctx: {}, chunks: {} }}\n",
                calib.display(),
                o.calib_ctx,
                o.calib_chunks
            );
            std::fs::write(&recipe, text).map_err(|e| format!("{}: {e}", recipe.display()))?;
            let t0 = std::time::Instant::now();
            let compiled = run_json(
                &env.kiln,
                &[
                    "compile".into(),
                    "--recipe".into(),
                    recipe.display().to_string(),
                    "--device".into(),
                    "laptop".into(),
                    "--out".into(),
                    work.join("builds").display().to_string(),
                    "--json".into(),
                ],
            )?;
            let compile_s = t0.elapsed().as_secs_f64();
            let b = &compiled["builds"][0];
            let build = b["out_dir"].as_str().ok_or("kiln compile --json: no out_dir")?.to_string();
            let pass = |name: &str| {
                b["manifest"]["passes"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["pass"] == name))
                    .map(|p| p["details"].clone())
                    .unwrap_or(Value::Null)
            };
            let (report, quant) = (pass("kv_share"), pass("kv_quant"));
            if report["share"].is_object() && label.starts_with("share: budget") {
                last_plan = Some(report["share"].clone());
            }
            let ppl = run_json(
                &env.kiln,
                &[
                    "ppl".into(),
                    build.clone(),
                    "--file".into(),
                    held_out.display().to_string(),
                    "--ctx".into(),
                    o.ctx.to_string(),
                    "--chunks".into(),
                    o.chunks.to_string(),
                    "--json".into(),
                ],
            )?;
            let ppl = ppl["report"]["ppl"].as_f64().ok_or("kiln ppl --json: no ppl")?;
            let bytes = quant["kv_bytes_per_token_after"].as_u64();
            let shared = report["share"].as_object().map_or(0, |m| m.len());
            eprintln!("bench kv: {model} {label}: ppl {ppl:.4}, {shared} layers shared, compiled in {compile_s:.0} s");
            rows.push(json!({
                "model": model, "config": label, "ppl": ppl, "kv_bytes_per_token": bytes,
                "layers_sharing": shared, "share": report["share"], "compile_seconds": compile_s,
                "calibration_ppl_before": report["calibration_ppl_before"], "calibration_ppl_after": report["calibration_ppl_after"],
                "similarity": report["similarity"],
            }));
        }
    }
    // The peer: llama.cpp's perplexity on the same file, text and context with its
    // f16 cache and its q8_0/q4_0 caches (flash attention, as quantized V needs).
    let perplexity = o.llama_bin.join("llama-perplexity");
    if perplexity.exists() {
        for model in &o.models {
            let gguf = model_path(env, model)?;
            for t in ["f16", "q8_0", "q4_0"] {
                let out = std::process::Command::new(&perplexity)
                    .args(["-m", &gguf.display().to_string(), "-f", &held_out.display().to_string()])
                    .args(["-c", &o.ctx.to_string(), "--chunks", &o.chunks.to_string(), "-t", &o.threads.to_string()])
                    .args(["-ctk", t, "-ctv", t, "-fa", "on"])
                    .output()
                    .map_err(|e| format!("{}: {e}", perplexity.display()))?;
                let ppl = llama_ppl(&String::from_utf8_lossy(&out.stderr))
                    .ok_or_else(|| format!("llama-perplexity -ctk {t}: no perplexity in its output"))?;
                eprintln!("bench kv: {model} llama.cpp {t} KV: ppl {ppl:.4}");
                rows.push(json!({"model": model, "config": format!("llama.cpp, {t} KV"), "ppl": ppl, "peer": true}));
            }
        }
    } else {
        eprintln!("bench kv: {} is missing: no llama.cpp rows", perplexity.display());
    }
    let date = today();
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let doc = json!({"date": date, "ctx": o.ctx, "chunks": o.chunks, "calib_ctx": o.calib_ctx, "calib_chunks": o.calib_chunks, "results": rows});
    let jpath = o.out.join(format!("kv-{date}.json"));
    std::fs::write(&jpath, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n")
        .map_err(|e| format!("{}: {e}", jpath.display()))?;
    let mut md = format!(
        "# KV cache: bytes per token vs perplexity ({date})\n\n`cargo xtask bench kv`: each configuration compiled for \
         `laptop` (CPU backend) and scored by `kiln ppl` on `tests/fixtures/text/ppl-excerpt.txt` ({} chunks of {} \
         tokens). `kv_share` budgets are planned on `calib-excerpt.txt` ({} chunk(s) of {} tokens). KV bytes per \
         token: K and V of every layer that writes a slot, as stored (f32, q8_0/q4_0 blocks or FP8 bytes). llama.cpp rows: \
         `llama-perplexity` on the same GGUF, text and context with `-ctk/-ctv T -fa on`, relative to its own f16 \
         cache (it rotates quantized K/V by a Hadamard transform, as kiln does). One run.\n\n\
         | model | configuration | layers reading another's cache | KV bytes / token | vs baseline | perplexity | vs baseline |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        o.chunks, o.ctx, o.calib_chunks, o.calib_ctx
    );
    for model in &o.models {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["model"] == model.as_str()).collect();
        let base_ppl = mine.first().and_then(|r| r["ppl"].as_f64()).unwrap_or(f64::NAN);
        // llama.cpp's rows are relative to its own f16 cache.
        let peer_base = mine.iter().find(|r| r["peer"] == true).and_then(|r| r["ppl"].as_f64()).unwrap_or(f64::NAN);
        let base_bytes = mine.first().and_then(|r| r["kv_bytes_per_token"].as_u64());
        for r in &mine {
            let bytes = r["kv_bytes_per_token"].as_u64();
            let rel = match (bytes, base_bytes) {
                (Some(e), Some(b)) if b > 0 => format!("{:.3}×", e as f64 / b as f64),
                _ => "–".into(),
            };
            let ppl = r["ppl"].as_f64().unwrap_or(f64::NAN);
            md.push_str(&format!(
                "| {model} | {} | {} | {} | {rel} | {ppl:.4} | {:+.2}% |\n",
                r["config"].as_str().unwrap_or(""),
                r["layers_sharing"].as_u64().map_or("–".into(), |n| n.to_string()),
                bytes.map_or("–".into(), |b| b.to_string()),
                (ppl / if r["peer"] == true { peer_base } else { base_ppl } - 1.0) * 100.0
            ));
        }
    }
    md.push_str(
        "\nHow alike adjacent layers' K/V are on the calibration text (`kv_share`'s similarity report, from the \
         first budget search): the mean over layers of the per-token cosine between layer l's and layer l−1's K \
         rows and V rows, and of the cosine between layer l's attention output over its own cache and over layer \
         l−1's (the score `min_similarity` and `candidates` rank by); ρ is Spearman's rank correlation between \
         that score and the measured perplexity cost of each single merge (taken from the first budget search).\n\n\
         | model | K cosine | V cosine | attention-output cosine | ρ (score vs measured cost) |\n|---|---:|---:|---:|---:|\n",
    );
    for model in &o.models {
        let Some(sim) = rows
            .iter()
            .find(|r| r["model"] == model.as_str() && r["similarity"]["spearman_similarity_vs_cost"].is_number())
            .map(|r| &r["similarity"])
        else {
            continue;
        };
        let adjacent = sim["adjacent"].as_array().map(Vec::as_slice).unwrap_or_default();
        let mean = |key: &str| {
            let xs: Vec<f64> = adjacent.iter().filter_map(|a| a[key].as_f64()).collect();
            xs.iter().sum::<f64>() / xs.len().max(1) as f64
        };
        md.push_str(&format!(
            "| {model} | {:.3} | {:.3} | {:.3} | {} |\n",
            mean("k_cos"),
            mean("v_cos"),
            mean("attn_out_cos"),
            sim["spearman_similarity_vs_cost"].as_f64().map_or("–".into(), |r| format!("{r:+.2}"))
        ));
    }
    md.push_str(
        "\nq8_0/q4_0 KV: ggml blocks of 32 per position row (what llama.cpp's `--cache-type-k/-v` store), \
         each 64 values Hadamard-rotated before rounding. f8_e4m3 KV: one OCP FP8 E4M3 byte per value, no \
         scale, saturating at ±448 (rotated the same way; llama.cpp has no FP8 cache). Every backend but the \
         integer-only watch backend runs all three.\n",
    );
    let mpath = o.out.join(format!("kv-{date}.md"));
    std::fs::write(&mpath, md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    eprintln!("wrote {} and {}", jpath.display(), mpath.display());
    Ok(())
}
