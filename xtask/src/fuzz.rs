//! `cargo xtask fuzz`: seeds the fuzz corpora from the cached real models and the repo's
//! recipes and IR files, runs every cargo-fuzz target of `fuzz/` for a fixed time, and
//! reports per target the executions, libFuzzer's coverage (`cov:`, `ft:`) and crashes.
//!
//! ```sh
//! cargo xtask fuzz --seconds 20 --jobs 2 --dev   # every target, 20 s each (what CI runs)
//! cargo xtask fuzz --seconds 600 --jobs 2 gguf   # one target, 10 minutes
//! cargo xtask fuzz --seed                        # only (re)write the seed corpora
//! ```
//!
//! Needs `cargo-fuzz` (`cargo install --locked cargo-fuzz`); it is never installed from
//! here. The fuzz crate is built on the stable toolchain with `RUSTC_BOOTSTRAP=1` (allowed
//! for that crate only), optimized, with debug assertions (overflow checks) and
//! AddressSanitizer. Corpora live in `fuzz/corpus/<target>/` (not committed), crashing
//! inputs in `fuzz/artifacts/<target>/`, logs in `fuzz/logs/<target>.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln_frontend::gguf::{GgufFile, MetaArray, MetaValue};
use kiln_frontend::gguf_write::GgufWriter;
use serde_json::{Value, json};

/// Every fuzz target of `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &[
    "gguf",
    "safetensors",
    "safetensors_index",
    "hf_config",
    "tokenizer",
    "recipe",
    "ir_text",
    "kiln_build",
    "control_vector",
    "json_schema",
];

/// libFuzzer's limits for every run: an input taking over 10 s is a hang, over 2 GiB RSS a blow-up.
const LIBFUZZER_LIMITS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-malloc_limit_mb=1024"];

const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [--jobs J] [--sanitizer address|none] [--dev] [--keep-going] [--seed] [TARGET...]\n\
  runs each target (default: all) for N seconds (default 20), J at a time (default 1);\n\
  --dev builds unoptimized (fast to build, slower to run; CI); --keep-going records crashes\n\
  and keeps fuzzing (libFuzzer fork mode); --seed only writes the seed corpora. Targets: ";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

struct Options {
    seconds: u64,
    jobs: usize,
    sanitizer: String,
    seed_only: bool,
    /// Unoptimized build (`cargo fuzz --dev`): builds in a fraction of the time, runs slower; for CI's short runs.
    dev: bool,
    /// libFuzzer's fork mode: record crashes, timeouts and OOMs and keep fuzzing (long runs).
    keep_going: bool,
    targets: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let usage = || format!("{USAGE}{}", TARGETS.join(", "));
    let mut o = Options {
        seconds: 20,
        jobs: 1,
        sanitizer: "address".into(),
        seed_only: false,
        keep_going: false,
        dev: false,
        targets: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value\n{}", usage()));
        match a.as_str() {
            "--seconds" => o.seconds = value("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--jobs" => o.jobs = value("--jobs")?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--sanitizer" => o.sanitizer = value("--sanitizer")?,
            "--seed" => o.seed_only = true,
            "--keep-going" => o.keep_going = true,
            "--dev" => o.dev = true,
            "-h" | "--help" => return Err(usage()),
            t if TARGETS.contains(&t) => o.targets.push(t.to_string()),
            other => return Err(format!("unknown fuzz target or option `{other}`\n{}", usage())),
        }
    }
    if o.targets.is_empty() {
        o.targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    o.jobs = o.jobs.max(1);
    Ok(o)
}

/// What one target's run reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunStats {
    pub execs: u64,
    pub cov: u64,
    pub ft: u64,
    pub corpus: u64,
    pub crashes: Vec<String>,
    /// Sum of fork mode's `oom/timeout/crash:` counts.
    pub fork_failures: u64,
    pub exit_ok: bool,
}

/// Reads libFuzzer's output: the last status line's `cov:`, `ft:` and `corp:`, and
/// `stat::number_of_executed_units` (or the last `#N` count).
pub fn parse_libfuzzer_log(log: &str) -> RunStats {
    let mut s = RunStats::default();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            if let Some(n) = words.next().and_then(|n| n.trim_end_matches(':').parse().ok()) {
                s.execs = n;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            for w in words.windows(2) {
                let num = || w[1].split('/').next().and_then(|n| n.parse().ok());
                match w[0] {
                    "cov:" => s.cov = num().unwrap_or(s.cov),
                    "ft:" => s.ft = num().unwrap_or(s.ft),
                    "corp:" => s.corpus = num().unwrap_or(s.corpus),
                    "oom/timeout/crash:" => {
                        let n: Vec<u64> = w[1].split('/').filter_map(|n| n.parse().ok()).collect();
                        s.fork_failures = n.iter().sum();
                    }
                    _ => {}
                }
            }
        } else if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            s.execs = n.trim().parse().unwrap_or(s.execs);
        } else if let Some(p) = line.split("Test unit written to ").nth(1) {
            s.crashes.push(p.trim().to_string());
        }
    }
    s
}

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse_args(args)?;
    let fuzz = root().join("fuzz");
    seed(&fuzz.join("corpus"))?;
    if o.seed_only {
        return Ok(());
    }
    let has_cargo_fuzz = Command::new(cargo()).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        return Err("cargo-fuzz is not installed; install it with `cargo install --locked cargo-fuzz` \
                    (kiln never installs it for you)"
            .into());
    }
    let build_start = Instant::now();
    // `cargo fuzz build` takes one target or none (all).
    let builds: Vec<Option<&String>> =
        if o.targets.len() == TARGETS.len() { vec![None] } else { o.targets.iter().map(Some).collect() };
    let profile = if o.dev { "--dev" } else { "--release" };
    for target in builds {
        let status = fuzz_cmd()
            .args(["build", profile, "--sanitizer", &o.sanitizer, "--debug-assertions"])
            .args(target)
            .status()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        if !status.success() {
            return Err("building the fuzz targets failed".into());
        }
    }
    println!("fuzz targets built in {:.0} s", build_start.elapsed().as_secs_f64());
    let logs = fuzz.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut results: Vec<(String, RunStats)> = vec![];
    for chunk in o.targets.chunks(o.jobs) {
        let mut running = vec![];
        for t in chunk {
            let log_path = logs.join(format!("{t}.log"));
            let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
            let artifacts = fuzz.join("artifacts").join(t);
            std::fs::create_dir_all(&artifacts).map_err(|e| format!("{}: {e}", artifacts.display()))?;
            let before = list(&artifacts);
            println!("fuzzing {t} for {} s (log: {})", o.seconds, log_path.display());
            let child = fuzz_cmd()
                .args(["run", profile, "--sanitizer", &o.sanitizer, "--debug-assertions", t])
                .arg(fuzz.join("corpus").join(t))
                .arg("--")
                .arg(format!("-max_total_time={}", o.seconds))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(LIBFUZZER_LIMITS)
                .arg("-print_final_stats=1")
                .args(if o.keep_going {
                    &["-fork=1", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1"][..]
                } else {
                    &[][..]
                })
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
            running.push((t.clone(), log_path, child, artifacts, before));
        }
        for (t, log_path, mut child, artifacts, before) in running {
            let status = child.wait().map_err(|e| format!("cargo fuzz run {t}: {e}"))?;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let mut stats = parse_libfuzzer_log(&log);
            stats.exit_ok = status.success();
            for new in list(&artifacts).into_iter().filter(|a| !before.contains(a)) {
                let new = new.display().to_string();
                if !stats.crashes.iter().any(|c| new.ends_with(c.as_str()) || c.ends_with(new.as_str())) {
                    stats.crashes.push(new);
                }
            }
            if !status.success() && stats.crashes.is_empty() {
                stats.crashes.push(format!("exit {status}; see {}", log_path.display()));
            }
            results.push((t, stats));
        }
    }
    println!(
        "\n| target | seconds | execs | cov | ft | corpus | crashes |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (t, s) in &results {
        let crashes = if s.crashes.is_empty() { "0".to_string() } else { s.crashes.join(", ") };
        println!("| {t} | {} | {} | {} | {} | {} | {crashes} |", o.seconds, s.execs, s.cov, s.ft, s.corpus);
    }
    let failed: Vec<&str> = results.iter().filter(|(_, s)| !s.crashes.is_empty()).map(|(t, _)| t.as_str()).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets crashed: {} (inputs under fuzz/artifacts/; replay with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET FILE`)",
            failed.join(", ")
        ))
    }
}

/// `cargo fuzz` in `fuzz/` on the stable toolchain: cargo-fuzz passes nightly `-Z` flags
/// (sanitizer coverage, `-Zsanitizer`), which `RUSTC_BOOTSTRAP=1` allows for this crate.
/// The files in `dir` (crash, timeout and OOM inputs libFuzzer wrote).
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new(cargo());
    c.current_dir(root().join("fuzz")).env("RUSTC_BOOTSTRAP", "1").arg("fuzz").stdin(Stdio::null());
    c
}

// ---------------------------------------------------------------- seeds

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

/// Writes one seed file `corpus/<target>/<name>`.
fn put(corpus: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
    let d = corpus.join(target);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    std::fs::write(d.join(format!("seed-{name}")), bytes).map_err(|e| format!("{}: {e}", d.display()))
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// Seeds every target's corpus from the cached models (when present), the repo's recipes
/// and IR filetests, and small hand-made inputs. Seeds stay small (a few hundred KB each
/// at most), so every run starts from real structure without committing corpora.
pub fn seed(corpus: &Path) -> Result<(), String> {
    let models = cache_dir().join("models");
    let mut n = 0usize;
    let mut put = |target: &str, name: &str, bytes: &[u8]| {
        n += 1;
        put(corpus, target, name, bytes)
    };
    // GGUF: the head of each real file (header + metadata, cut), and the whole metadata with
    // arrays shortened and a few small tensors, rewritten as a valid file.
    for p in files_with_ext(&models, "gguf") {
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        put("gguf", &format!("{stem}-head"), &bytes[..bytes.len().min(64 << 10)])?;
        if let Ok(g) = GgufFile::open(&p) {
            put("gguf", &format!("{stem}-small"), &small_gguf(&g)?)?;
        }
    }
    let glass = models.join("glassllm-en-hf");
    if let Ok(b) = std::fs::read(glass.join("model.safetensors")) {
        if let Some(s) = small_safetensors(&b) {
            put("safetensors", "glassllm-small", &s)?;
        }
        put("safetensors", "glassllm-head", &b[..b.len().min(16 << 10)])?;
    }
    for f in ["config.json", "tokenizer_config.json"] {
        if let Ok(b) = std::fs::read(glass.join(f)) {
            put("hf_config", &format!("glassllm-{f}"), &b)?;
        }
    }
    for (name, cfg) in hf_configs() {
        put("hf_config", name, cfg.to_string().as_bytes())?;
    }
    let mut tokenizers = vec![glass.join("tokenizer.json"), models.join("glassllm-en.tokenizer.json")];
    tokenizers.extend(std::fs::read_dir(root().join("build")).into_iter().flatten().flatten().flat_map(|recipe| {
        std::fs::read_dir(recipe.path()).into_iter().flatten().flatten().map(|dev| dev.path().join("tokenizer.json"))
    }));
    for (i, p) in tokenizers.iter().enumerate() {
        if let Ok(b) = std::fs::read(p)
            && let Ok(doc) = serde_json::from_slice::<Value>(&b)
        {
            put("tokenizer", &format!("{i}"), small_tokenizer(doc).to_string().as_bytes())?;
        }
    }
    put("safetensors_index", "two-shards", index_seed().to_string().as_bytes())?;
    for p in [
        root().join("recipes/steer/verbosity/verbosity.safetensors"),
        root().join("tests/fixtures/steer/llama-cvector-verbosity-mean.gguf"),
    ] {
        let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        put("control_vector", &p.file_name().unwrap_or_default().to_string_lossy(), &b)?;
    }
    // Tool lists with calls they accept (the target splits schema and text at a NUL byte).
    for p in files_with_ext(&root().join("tests/fixtures/tools"), "json") {
        let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let call = br#"{"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}}"#;
        put("json_schema", &name, &[&b[..], b"\0", call].concat())?;
    }
    put(
        "json_schema",
        "schema-array",
        b"{\"type\": \"array\", \"items\": {\"type\": \"number\"}, \"maxItems\": 3}\0[1.5, -2, 0]",
    )?;
    for p in files_with_ext(&root().join("recipes"), "yaml") {
        let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        put("recipe", &p.file_name().unwrap_or_default().to_string_lossy(), &b)?;
    }
    let kirs = files_with_ext(&root().join("ir/tests/filetests"), "kir");
    for p in &kirs {
        let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        put("ir_text", &name, &b)?;
        // build, odd mode: model.kir, weights.bin, tokenizer.json, tokenizer.kiln.json, manifest fields
        let mut parts = vec![1u8];
        parts.extend(b);
        for part in [&b""[..], b"{}", br#"{"source":"fuzz","eog_ids":[0],"add_bos":false}"#, b"{}"] {
            parts.extend(b"\n----\n");
            parts.extend(part);
        }
        put("kiln_build", &name, &parts)?;
    }
    for d in std::fs::read_dir(root().join("build")).into_iter().flatten().flatten() {
        for dev in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            let tag = format!("{}-{}", d.file_name().to_string_lossy(), dev.file_name().to_string_lossy());
            if let Ok(m) = std::fs::read(dev.path().join("manifest.json")) {
                let mut seed = vec![0u8];
                seed.extend(m);
                put("kiln_build", &format!("{tag}-manifest"), &seed)?;
            }
            if let Ok(k) = std::fs::read(dev.path().join("model.kir"))
                && k.len() < 256 << 10
            {
                put("ir_text", &format!("{tag}-model.kir"), &k)?;
            }
        }
    }
    println!("fuzz seeds: {n} files under {}", corpus.display());
    Ok(())
}

/// The file's metadata with every array cut to its first 256 entries, plus three small tensors.
fn small_gguf(g: &GgufFile) -> Result<Vec<u8>, String> {
    let cut = |a: &MetaArray| -> MetaArray {
        const N: usize = 256;
        match a {
            MetaArray::String(v) => MetaArray::String(v.iter().take(N).cloned().collect()),
            MetaArray::F32(v) => MetaArray::F32(v.iter().take(N).copied().collect()),
            MetaArray::I32(v) => MetaArray::I32(v.iter().take(N).copied().collect()),
            MetaArray::U32(v) => MetaArray::U32(v.iter().take(N).copied().collect()),
            other => other.clone(),
        }
    };
    let meta: BTreeMap<String, MetaValue> = g
        .metadata()
        .iter()
        .filter(|(k, _)| k.as_str() != "tokenizer.chat_template")
        .map(|(k, v)| (k.clone(), if let MetaValue::Array(a) = v { MetaValue::Array(cut(a)) } else { v.clone() }))
        .collect();
    let mut w = GgufWriter::with_metadata(meta);
    let mut data: Vec<Vec<u8>> = vec![];
    for t in g.tensors().iter().filter(|t| t.nbytes <= 4096).take(2) {
        w.add_tensor(kiln_frontend::gguf_write::TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            dims: t.dims.clone(),
        })
        .map_err(|e| e.to_string())?;
        data.push(g.tensor_data(t).to_vec());
    }
    if let Some(t) = g.tensors().iter().find(|t| t.name == "token_embd.weight") {
        // Same dtype and row length, 4 rows.
        let spec = kiln_frontend::gguf_write::TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            dims: vec![t.dims.first().copied().unwrap_or(1), 4],
        };
        let bytes = spec.nbytes().unwrap_or(0) as usize;
        w.add_tensor(spec).map_err(|e| e.to_string())?;
        data.push(g.tensor_data(t)[..bytes.min(t.nbytes as usize)].to_vec());
    }
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    w.to_bytes(&refs).map_err(|e| e.to_string())
}

/// A valid safetensors file with the real header's first tensors (names, dtypes, ranks), each cut to 2 elements per dim.
fn small_safetensors(b: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(b.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut out = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, info) in header.into_iter().take(12) {
        if name == "__metadata__" {
            out.insert(name, info);
            continue;
        }
        let dtype = info.get("dtype")?.as_str()?.to_string();
        let size = match dtype.as_str() {
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" => 2,
            "F64" | "I64" => 8,
            _ => 1,
        };
        let shape: Vec<u64> = info.get("shape")?.as_array()?.iter().map(|d| d.as_u64().unwrap_or(1).min(2)).collect();
        let bytes = shape.iter().product::<u64>() * size;
        out.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let text = Value::Object(out).to_string();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text.as_bytes());
    file.extend(std::iter::repeat_n(0x3cu8, offset as usize));
    Some(file)
}

/// A `tokenizer.json` cut to its first 300 tokens (merges and added tokens that only use them).
fn small_tokenizer(mut doc: Value) -> Value {
    const KEEP: usize = 300;
    let Some(model) = doc.get_mut("model") else { return doc };
    let mut kept = std::collections::HashSet::new();
    if let Some(Value::Object(vocab)) = model.get_mut("vocab") {
        let mut entries: Vec<(String, Value)> = std::mem::take(vocab).into_iter().collect();
        entries.sort_by_key(|(_, id)| id.as_u64().unwrap_or(u64::MAX));
        for (tok, id) in entries.into_iter().take(KEEP) {
            kept.insert(tok.clone());
            vocab.insert(tok, id);
        }
    }
    if let Some(Value::Array(merges)) = model.get_mut("merges") {
        merges.retain(|m| {
            let pair: Vec<String> = match m {
                Value::String(s) => s.split(' ').map(str::to_string).collect(),
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                _ => vec![],
            };
            pair.len() == 2 && kept.contains(&pair[0]) && kept.contains(&pair[1]) && kept.contains(&pair.concat())
        });
        merges.truncate(KEEP);
    }
    if let Some(Value::Array(added)) = doc.get_mut("added_tokens") {
        added.retain(|t| t.get("id").and_then(Value::as_u64).is_some_and(|id| (id as usize) < KEEP));
    }
    doc
}

fn index_seed() -> Value {
    json!({
        "metadata": {"total_size": 48},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.self_attn.q_proj.weight": "model-00002-of-00002.safetensors",
            "model.layers.0.input_layernorm.weight": "model-00002-of-00002.safetensors"
        }
    })
}

/// One small config.json per architecture (as their Hugging Face checkpoints write them).
fn hf_configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "llama",
            json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": true,
            "head_dim": 64, "rope_scaling": null}),
        ),
        (
            "qwen2",
            json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": true,
            "sliding_window": 32768, "use_sliding_window": false}),
        ),
        (
            "gemma3",
            json!({"model_type": "gemma3", "architectures": ["Gemma3ForCausalLM"],
            "text_config": {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "sliding_window": 512, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
            "hidden_activation": "gelu_pytorch_tanh", "layer_types": ["sliding_attention", "full_attention"]}}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_stats() {
        let log = "INFO: seed corpus: files: 3\n\
            #2\tINITED cov: 120 ft: 130 corp: 3/40b exec/s: 0 rss: 40Mb\n\
            #4096\tpulse  cov: 150 ft: 200 corp: 9/1Kb lim: 40 exec/s: 2048 rss: 41Mb\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='a/'; Test unit written to a/crash-abc\n\
            stat::number_of_executed_units: 5000\n";
        let s = parse_libfuzzer_log(log);
        assert_eq!((s.execs, s.cov, s.ft, s.corpus), (5000, 150, 200, 9));
        assert_eq!(s.crashes, vec!["a/crash-abc".to_string()]);
    }

    #[test]
    fn splits_arguments() {
        let o = parse_args(&["--seconds".into(), "5".into(), "gguf".into()]).unwrap();
        assert_eq!((o.seconds, o.targets), (5, vec!["gguf".to_string()]));
        assert!(parse_args(&["nope".into()]).is_err());
    }
}
