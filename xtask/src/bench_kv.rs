//! `cargo xtask bench kv`: KV-cache bytes per token against perplexity, per
//! model: the unshared baseline, fixed groups of two layers sharing one cache,
//! and `kv_share` plans chosen under perplexity budgets on the calibration text
//! (`tests/fixtures/text/calib-excerpt.txt`). Each configuration is compiled
//! (`laptop`, CPU backend) and scored with `kiln ppl` on held-out text
//! (`tests/fixtures/text/ppl-excerpt.txt`). KV bytes count the f16 cache the CPU
//! backend keeps. Writes `bench/results/kv-<date>.{json,md}`.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::bench_quant::Env;
use crate::bench_spec::{run_json, today};

struct Opts {
    models: Vec<String>,
    budgets: Vec<String>,
    ctx: usize,
    chunks: usize,
    calib_ctx: usize,
    calib_chunks: usize,
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
            "--out" => o.out = PathBuf::from(val()?),
            other => {
                return Err(format!(
                    "bench kv: unknown option `{other}` (--models --budgets --ctx --chunks --calib-ctx --calib-chunks --out)"
                ));
            }
        }
    }
    Ok(o)
}

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    let o = parse(args, env)?;
    let work = env.root.join("target/bench-kv");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let calib = env.root.join("tests/fixtures/text/calib-excerpt.txt");
    let held_out = env.root.join("tests/fixtures/text/ppl-excerpt.txt");
    let mut configs: Vec<(String, String)> =
        vec![("baseline".into(), String::new()), ("group 2".into(), "{ group: 2 }".into())];
    for b in &o.budgets {
        configs.push((format!("budget {b}"), format!("{{ max_ppl_increase: \"{b}\" }}")));
    }
    let mut rows = Vec::new();
    for model in &o.models {
        for (i, (label, kv)) in configs.iter().enumerate() {
            let name = format!("kv-{}-{i}", model.replace('.', "_"));
            let kv_pass = if kv.is_empty() { String::new() } else { format!("      - kv_share: {kv}\n") };
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
            let report = b["manifest"]["passes"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["pass"] == "kv_share"))
                .map(|p| p["details"].clone())
                .unwrap_or(Value::Null);
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
            // Elements per token: from the pass's report, or the baseline's writers.
            let elems = report["kv_elements_per_token_after"].as_u64();
            let shared = report["share"].as_object().map_or(0, |m| m.len());
            eprintln!("bench kv: {model} {label}: ppl {ppl:.4}, {shared} layers shared, compiled in {compile_s:.0} s");
            rows.push(json!({
                "model": model, "config": label, "ppl": ppl, "kv_elements_per_token": elems,
                "kv_elements_per_token_unshared": report["kv_elements_per_token_before"],
                "layers_sharing": shared, "share": report["share"], "compile_seconds": compile_s,
                "calibration_ppl_before": report["calibration_ppl_before"], "calibration_ppl_after": report["calibration_ppl_after"],
            }));
        }
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
         tokens). `kv_share` budgets are planned on `calib-excerpt.txt` ({} chunk(s) of {} tokens). KV bytes: the f16 \
         cache of the CPU backend, K and V of every layer that writes one. One run.\n\n\
         | model | configuration | layers reading another's cache | KV bytes / token | vs baseline | perplexity | vs baseline |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        o.chunks, o.ctx, o.calib_chunks, o.calib_ctx
    );
    for model in &o.models {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["model"] == model.as_str()).collect();
        let base_ppl = mine.first().and_then(|r| r["ppl"].as_f64()).unwrap_or(f64::NAN);
        // The baseline has no kv_share report: its size is the others' size before sharing.
        let base_elems = mine.iter().find_map(|r| r["kv_elements_per_token_unshared"].as_u64());
        for r in &mine {
            let elems = r["kv_elements_per_token"].as_u64().or(base_elems);
            let bytes = elems.map_or("?".into(), |e| (e * 2).to_string());
            let rel = match (elems, base_elems) {
                (Some(e), Some(b)) if b > 0 => format!("{:.2}×", e as f64 / b as f64),
                _ => "–".into(),
            };
            let ppl = r["ppl"].as_f64().unwrap_or(f64::NAN);
            md.push_str(&format!(
                "| {model} | {} | {} | {bytes} | {rel} | {ppl:.4} | {:+.2}% |\n",
                r["config"].as_str().unwrap_or(""),
                r["layers_sharing"],
                (ppl / base_ppl - 1.0) * 100.0
            ));
        }
    }
    md.push_str(
        "\nQuantized KV caches (8-bit, 4-bit) are not built yet (issue 10); their rows join this table when they are.\n",
    );
    let mpath = o.out.join(format!("kv-{date}.md"));
    std::fs::write(&mpath, md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    eprintln!("wrote {} and {}", jpath.display(), mpath.display());
    Ok(())
}
