//! `cargo xtask bench watch`: the watch build (integer-only C library) of a small recipe,
//! compiled for a Cortex-M4 and run on QEMU's mps2-an386 with instruction counting
//! (`-icount shift=0`): flash and RAM (kiln's static plan and the linked image), instructions
//! per prompt token and per decoded token (first and last step, since attention grows with
//! the position), the host build's tokens per second, and the build's quality report
//! (integer vs float model on held-out text). The Cortex-M4 run must print the host run's
//! tokens and logit hashes. Writes `bench/results/watch-<date>.{json,md}`.

use std::path::PathBuf;
use std::time::Instant;

use kiln_fixed::harness;
use serde_json::{Value, json};

use crate::bench_quant::Env;
use crate::bench_spec::{run_json, today};

struct Opts {
    recipes: Vec<PathBuf>,
    steps: usize,
    out: PathBuf,
}

fn parse(args: &[String], env: &Env) -> Result<Opts, String> {
    let mut o = Opts {
        recipes: vec![
            env.root.join("recipes/glassllm-en.yaml"),
            env.root.join("recipes/glassllm-en-int4.yaml"),
            env.root.join("recipes/glassllm-en-int4-kv4.yaml"),
            env.root.join("recipes/glassllm-en-window.yaml"),
        ],
        steps: 32,
        out: env.root.join("bench/results"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--recipes" => o.recipes = val()?.split(',').map(PathBuf::from).collect(),
            "--steps" => o.steps = val()?.parse().map_err(|_| "--steps needs a number")?,
            "--out" => o.out = PathBuf::from(val()?),
            other => return Err(format!("unknown option `{other}` (--recipes --steps --out)")),
        }
    }
    Ok(o)
}

/// Typical clocks of the named parts, for turning instructions into time (at one
/// instruction per cycle, which a Cortex-M4 sustains on this integer code only roughly).
const CLOCKS_MHZ: &[(&str, f64)] = &[("nRF52840", 64.0), ("STM32F429", 180.0), ("STM32H743", 480.0)];

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    let o = parse(args, env)?;
    for tool in ["gcc", "arm-none-eabi-gcc", "qemu-system-arm"] {
        if !harness::have(tool) {
            return Err(format!("{tool} is missing (apt-get install gcc gcc-arm-none-eabi qemu-system-arm)"));
        }
    }
    let mut results = vec![];
    for recipe in &o.recipes {
        results.push(measure(env, recipe, o.steps)?);
    }
    let date = today();
    let doc = json!({"date": date, "decode_steps": o.steps, "builds": results});
    std::fs::create_dir_all(&o.out).map_err(|e| e.to_string())?;
    let jpath = o.out.join(format!("watch-{date}.json"));
    std::fs::write(&jpath, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n")
        .map_err(|e| format!("{}: {e}", jpath.display()))?;
    let mut md = format!(
        "# Watch builds (fixed-point C) — {date}\n\n`cargo xtask bench watch`: each recipe compiled for `watch`, its C library built with `arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -O2` and run on QEMU `mps2-an386` with `-icount shift=0` (instructions counted exactly; a CMSDK timer tick is 40 instructions). Every Cortex-M4 run printed the host build's tokens and logit hashes for the prompt and all {} decode steps (bit-identical; the tests also check both against the Rust integer interpreter). Times at a clock assume one instruction per cycle.\n\n",
        o.steps
    );
    let col = |f: &dyn Fn(&Value) -> String| results.iter().map(f).collect::<Vec<_>>().join(" | ");
    let mb = |v: &Value| format!("{:.2} M", v.as_f64().unwrap_or(0.0) / 1e6);
    md += &format!(
        "| | {} |\n|---|{}\n",
        col(&|r| format!("`{}`", r["recipe"].as_str().unwrap_or("?"))),
        "---|".repeat(results.len())
    );
    let rows: Vec<(&str, Cell)> = vec![
        ("model", Box::new(|r: &Value| r["model"].as_str().unwrap_or("?").to_string())),
        (
            "flash (kiln's plan)",
            Box::new(|r: &Value| {
                format!("{:.1} KiB", r["memory_plan"]["flash_bytes"].as_f64().unwrap_or(0.0) / 1024.0)
            }),
        ),
        (
            "RAM (static plan incl. KV cache)",
            Box::new(|r: &Value| {
                format!(
                    "{:.1} KiB ({} positions)",
                    r["memory_plan"]["ram_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
                    r["memory_plan"]["max_context"]
                )
            }),
        ),
        (
            "Cortex-M4 image text / data / bss (with harness)",
            Box::new(|r: &Value| {
                let i = &r["cortex_m4_image"];
                format!("{} / {} / {}", i["text"], i["data"], i["bss"])
            }),
        ),
        ("instructions per prompt token", Box::new(move |r: &Value| mb(&r["instructions_per_prompt_token"]))),
        (
            "instructions per decoded token (first / last step)",
            Box::new(move |r: &Value| {
                let d = &r["instructions_per_decode_token"];
                format!("{} / {}", mb(&d["first"]), mb(&d["last"]))
            }),
        ),
    ];
    for (name, f) in &rows {
        md += &format!("| {name} | {} |\n", col(f.as_ref()));
    }
    for (i, (part, mhz)) in CLOCKS_MHZ.iter().enumerate() {
        md += &format!(
            "| decode at {mhz} MHz ({part}) | {} |\n",
            col(&|r| format!("{:.1} tok/s", r["decode_at_clock"][i]["decode_tok_s"].as_f64().unwrap_or(0.0)))
        );
    }
    md += &format!(
        "| host build (x86-64, gcc -O2, 1 core) | {} |\n",
        col(&|r| format!("{:.0} tok/s", r["host_tok_s"].as_f64().unwrap_or(0.0)))
    );
    md += &format!(
        "| vs the float model on held-out text: perplexity change, mean KL, top-1 agreement | {} |\n",
        col(&|r| {
            let q = &r["quality"];
            format!(
                "{:+.2}%, {:.5}, {:.1}% ({} tokens)",
                q["ppl_ratio_minus_1"].as_f64().unwrap_or(f64::NAN) * 100.0,
                q["kl_mean"].as_f64().unwrap_or(f64::NAN),
                q["top1_agreement"].as_f64().unwrap_or(f64::NAN) * 100.0,
                q["tokens_scored"]
            )
        })
    );
    let mpath = o.out.join(format!("watch-{date}.md"));
    std::fs::write(&mpath, &md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    println!("{md}");
    println!("wrote {} and {}", jpath.display(), mpath.display());
    Ok(())
}

/// A table cell computed from one build's results.
type Cell = Box<dyn Fn(&Value) -> String>;

fn measure(env: &Env, recipe: &std::path::Path, steps: usize) -> Result<Value, String> {
    let name = recipe.file_stem().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let work = env.cache.join("bench-watch").join(&name);
    let _ = std::fs::remove_dir_all(&work);
    let built = run_json(
        &env.kiln,
        &[
            "compile".into(),
            "--recipe".into(),
            recipe.display().to_string(),
            "--device".into(),
            "watch".into(),
            "--out".into(),
            work.join("build").display().to_string(),
            "--json".into(),
        ],
    )?;
    let b = &built["builds"][0];
    let build = PathBuf::from(b["out_dir"].as_str().ok_or("compile --json: no out_dir")?);
    let manifest = &b["manifest"];
    // A fixed prompt: BOS and a few common ids (the bench measures cost, not text).
    let prompt: Vec<u32> = vec![2, 100, 200, 300, 400, 500, 600, 700];

    let host_dir = work.join("host");
    harness::stage(&build, &host_dir, &prompt, steps)?;
    let exe = harness::build_host(&host_dir, &[])?;
    let t = Instant::now();
    let host = harness::run_host(&exe)?;
    let host_s = t.elapsed().as_secs_f64();
    let positions = host.limit.ok_or("host run: no context-limit line")?.1 as f64;

    let arm_dir = work.join("arm");
    harness::stage(&build, &arm_dir, &prompt, steps)?;
    let (elf, size) = harness::build_cortex_m4(&arm_dir)?;
    let arm = harness::run_qemu(&elf)?;
    if arm.tokens_and_hashes() != host.tokens_and_hashes() {
        return Err(format!("{name}: the Cortex-M4 run's tokens or logits differ from the host build's"));
    }
    let ipt = harness::INSTRUCTIONS_PER_TICK as f64;
    let prefill = arm.prefill.as_ref().ok_or("no prefill line")?;
    let prefill_per_token = prefill.ticks as f64 * ipt / prompt.len() as f64;
    let first = arm.steps.first().ok_or("no decode steps")?.ticks as f64 * ipt;
    let last = arm.steps.last().ok_or("no decode steps")?.ticks as f64 * ipt;
    let mean = arm.steps.iter().map(|s| s.ticks as f64 * ipt).sum::<f64>() / arm.steps.len() as f64;
    let sizes: Vec<u64> = size.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    let at_clock: Vec<Value> = CLOCKS_MHZ
        .iter()
        .map(|(part, mhz)| json!({"part": part, "mhz": mhz, "decode_tok_s": mhz * 1e6 / mean}))
        .collect();
    Ok(json!({
        "recipe": recipe.file_name().map(|f| f.to_string_lossy().into_owned()),
        "model": manifest["source"]["model"],
        "memory_plan": manifest["memory"],
        "cortex_m4_image": {"text": sizes.first(), "data": sizes.get(1), "bss": sizes.get(2), "flags": "-mcpu=cortex-m4 -mthumb -O2"},
        "prompt_tokens": prompt.len(),
        "instructions_per_prompt_token": prefill_per_token,
        "instructions_per_decode_token": {"first": first, "last": last, "mean": mean, "positions": [prompt.len(), prompt.len() + steps - 1]},
        "decode_at_clock": at_clock,
        // The host harness runs every position of the context once (prompt, steps, then to the limit).
        "host_tok_s": positions / host_s,
        "quality": manifest["quality"],
        "bit_identical_host_and_cortex_m4": true,
    }))
}
