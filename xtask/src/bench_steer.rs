//! `cargo xtask bench steer`: what a compiled steering vector does to generation.
//! Compiles the steering recipe's `laptop` build once, then answers the held-out
//! questions (`recipes/steer/verbosity/heldout.txt`, never used to compute the
//! direction) greedily with the chat template at each strength (`kiln run
//! --steer NAME=S`, the same build), and reports per strength the median and
//! mean tokens until end of sequence (answers cut at `--max-tokens` count as
//! that many, and are counted), how many answers stay on topic (share a content
//! word with their question), and example answers. Writes
//! `bench/results/steer-<date>.{json,md}`.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::bench_quant::Env;
use crate::bench_spec::{run_json, today};

struct Opts {
    recipe: PathBuf,
    name: String,
    strengths: Vec<f32>,
    questions: PathBuf,
    limit: usize,
    max_tokens: usize,
    threads: usize,
    examples: usize,
    out: PathBuf,
}

fn parse(args: &[String], env: &Env) -> Result<Opts, String> {
    let mut o = Opts {
        recipe: env.root.join("recipes/smollm2-135m-verbosity.yaml"),
        name: "verbosity".into(),
        strengths: vec![-6.0, -3.0, 0.0, 3.0],
        questions: env.root.join("recipes/steer/verbosity/heldout.txt"),
        limit: 0,
        max_tokens: 320,
        threads: 2,
        examples: 4,
        out: env.root.join("bench/results"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("{a}: `{v}` is not a number"));
        match a.as_str() {
            "--recipe" => o.recipe = PathBuf::from(val()?),
            "--name" => o.name = val()?,
            "--strengths" => {
                o.strengths = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<f32>().map_err(|_| format!("--strengths: `{s}` is not a number")))
                    .collect::<Result<_, _>>()?
            }
            "--questions" => o.questions = PathBuf::from(val()?),
            "--limit" => o.limit = num(val()?)?,
            "--max-tokens" => o.max_tokens = num(val()?)?.max(1),
            "--threads" => o.threads = num(val()?)?.max(1),
            "--examples" => o.examples = num(val()?)?,
            "--out" => o.out = PathBuf::from(val()?),
            other => {
                return Err(format!(
                    "bench steer: unknown option `{other}` (--recipe --name --strengths --questions --limit \
                     --max-tokens --threads --examples --out)"
                ));
            }
        }
    }
    Ok(o)
}

const STOP: &[&str] = &[
    "what", "which", "where", "when", "why", "how", "does", "do", "is", "are", "the", "a", "an", "of", "in", "on",
    "to", "can", "you", "your", "explain", "and", "or", "for", "with", "that", "this", "from", "into", "there", "some",
    "make", "made", "use", "used", "who", "it", "its", "be", "at", "by", "as", "have", "has", "should",
];

/// Content words of `text` (lowercase, 4+ letters, not a question word), cut
/// to five letters so `bees`/`bee's` and `planting`/`plants` meet.
fn content_words(text: &str) -> std::collections::BTreeSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| w.len() >= 4 && !STOP.contains(w))
        .map(|w| w.chars().take(5).collect())
        .collect()
}

fn median(v: &[usize]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2] as f64,
        n => (s[n / 2 - 1] + s[n / 2]) as f64 / 2.0,
    }
}

pub fn run(args: &[String], env: &Env) -> Result<(), String> {
    let o = parse(args, env)?;
    let mut questions: Vec<String> = std::fs::read_to_string(&o.questions)
        .map_err(|e| format!("{}: {e}", o.questions.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if o.limit > 0 {
        questions.truncate(o.limit);
    }
    let build_root = env.root.join("target/bench-steer");
    let compiled = run_json(
        &env.kiln,
        &[
            "compile".into(),
            "--recipe".into(),
            o.recipe.display().to_string(),
            "--device".into(),
            "laptop".into(),
            "--out".into(),
            build_root.display().to_string(),
            "--json".into(),
        ],
    )?;
    let build = compiled["builds"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|b| b.get("out_dir"))
        .and_then(Value::as_str)
        .ok_or("kiln compile --json: no out_dir")?
        .to_string();
    eprintln!("bench steer: {build}, {} questions, strengths {:?}", questions.len(), o.strengths);
    let mut rows = Vec::new();
    let mut answers: Vec<Vec<String>> = Vec::new();
    for &s in &o.strengths {
        let (mut lens, mut capped, mut on_topic, mut texts) = (Vec::new(), 0usize, 0usize, Vec::new());
        for q in &questions {
            let r = run_json(
                &env.kiln,
                &[
                    "run".into(),
                    build.clone(),
                    "--chat".into(),
                    "-p".into(),
                    q.clone(),
                    "-n".into(),
                    o.max_tokens.to_string(),
                    "--steer".into(),
                    format!("{}={s}", o.name),
                    "--threads".into(),
                    o.threads.to_string(),
                    "--json".into(),
                ],
            )?;
            let out = &r["output"];
            let n = out["tokens"].as_array().map_or(0, Vec::len);
            capped += usize::from(out["stop_reason"].as_str() == Some("length"));
            let text = out["text"].as_str().unwrap_or("").to_string();
            on_topic += usize::from(!content_words(q).is_disjoint(&content_words(&text)));
            lens.push(n);
            texts.push(text);
        }
        let mean = lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64;
        eprintln!(
            "  strength {s:+}: median {} tokens, mean {mean:.1}, {capped} at the cap, {on_topic}/{} on topic",
            median(&lens),
            lens.len()
        );
        rows.push(json!({
            "strength": s, "median_tokens": median(&lens), "mean_tokens": mean, "capped": capped,
            "on_topic": on_topic, "questions": lens.len(), "tokens": lens,
        }));
        answers.push(texts);
    }
    let date = today();
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let examples: Vec<Value> = questions
        .iter()
        .enumerate()
        .take(o.examples)
        .map(|(i, q)| {
            json!({"question": q, "answers": o.strengths.iter().zip(&answers).map(|(s, a)| json!({"strength": s, "text": a[i]})).collect::<Vec<_>>()})
        })
        .collect();
    let doc = json!({
        "date": date, "recipe": o.recipe.strip_prefix(&env.root).unwrap_or(&o.recipe).display().to_string(),
        "build": build, "steering": o.name, "max_tokens": o.max_tokens, "threads": o.threads,
        "questions_file": o.questions.strip_prefix(&env.root).unwrap_or(&o.questions).display().to_string(),
        "results": rows, "examples": examples,
    });
    let jpath = o.out.join(format!("steer-{date}.json"));
    std::fs::write(&jpath, serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n")
        .map_err(|e| format!("{}: {e}", jpath.display()))?;
    let base =
        rows.iter().find(|r| r["strength"].as_f64() == Some(0.0)).map(|r| r["median_tokens"].as_f64().unwrap_or(0.0));
    let mut md = format!(
        "# Steering: `{}` on held-out questions ({date})\n\n\
         `cargo xtask bench steer`: build of `{}` (laptop, CPU backend), {} questions from `{}` (not used to \
         compute the direction), greedy, chat template, at most {max} new tokens (an answer cut there counts as \
         {max}, so a median marked ≥ is a lower bound). One run, {} threads.\n\n\
         | strength | median tokens to EOS | vs unsteered | mean | cut at the cap | on topic |\n|---:|---:|---:|---:|---:|---:|\n",
        o.name,
        doc["recipe"].as_str().unwrap_or(""),
        questions.len(),
        doc["questions_file"].as_str().unwrap_or(""),
        o.threads,
        max = o.max_tokens,
    );
    for r in &rows {
        let m = r["median_tokens"].as_f64().unwrap_or(0.0);
        // With more than half the answers cut, the median itself is a cut length: a lower bound.
        let lower =
            if r["capped"].as_u64().unwrap_or(0) * 2 > r["questions"].as_u64().unwrap_or(0) { "≥ " } else { "" };
        let ratio = base.filter(|b| *b > 0.0).map_or("–".to_string(), |b| format!("{lower}{:.2}×", m / b));
        md.push_str(&format!(
            "| {:+} | {lower}{m} | {ratio} | {:.1} | {} | {}/{} |\n",
            r["strength"].as_f64().unwrap_or(0.0),
            r["mean_tokens"].as_f64().unwrap_or(0.0),
            r["capped"],
            r["on_topic"],
            r["questions"]
        ));
    }
    md.push_str("\n## Examples\n");
    for e in &examples {
        md.push_str(&format!("\n**{}**\n\n", e["question"].as_str().unwrap_or("")));
        for a in e["answers"].as_array().into_iter().flatten() {
            let t: String = a["text"].as_str().unwrap_or("").chars().take(500).collect();
            md.push_str(&format!("- strength {:+}: {}\n", a["strength"].as_f64().unwrap_or(0.0), t.replace('\n', " ")));
        }
    }
    let mpath = o.out.join(format!("steer-{date}.md"));
    std::fs::write(&mpath, md).map_err(|e| format!("{}: {e}", mpath.display()))?;
    eprintln!("wrote {} and {}", jpath.display(), mpath.display());
    Ok(())
}
