//! Tokenizer tests against real vocabularies: llama.cpp's vocab test suite, SmolLM2 and
//! Qwen2.5 GGUFs (with the llama.cpp oracle fixtures when present) and glassllm.
//!
//! Files that are not in the repository are looked up in the kiln cache
//! (`$KILN_CACHE`, default `~/.cache/kiln`); when absent the test prints why it skipped.

use kiln_frontend::gguf::GgufFile;
use kiln_frontend::tokenizer::GgufVocab;
use kiln_runtime::tokenizer::{TokenStream, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// GGUF vocabulary (tokenizer.ggml.* keys) through the frontend's reader
// ---------------------------------------------------------------------------------------------

struct GgufTok {
    vocab: GgufVocab,
    chat_template: Option<String>,
}

fn read_gguf_vocab(path: &Path) -> GgufTok {
    let g = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let s = |k: &str| g.get_str(k).ok().map(str::to_string);
    let id = |k: &str| g.get_u64(k).ok().and_then(|v| u32::try_from(v).ok());
    let b = |k: &str| g.get_bool(k).ok();
    let vocab = GgufVocab {
        origin: path.display().to_string(),
        model: s("tokenizer.ggml.model").unwrap_or_default(),
        pre: s("tokenizer.ggml.pre"),
        tokens: g.get_str_array("tokenizer.ggml.tokens").map(<[String]>::to_vec).unwrap_or_default(),
        scores: g.get_f32_array("tokenizer.ggml.scores").ok(),
        token_types: g.get_i32_array("tokenizer.ggml.token_type").ok(),
        merges: g.get_str_array("tokenizer.ggml.merges").ok().map(<[String]>::to_vec),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        eot: id("tokenizer.ggml.eot_token_id"),
        eom: id("tokenizer.ggml.eom_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        add_bos: b("tokenizer.ggml.add_bos_token"),
        add_eos: b("tokenizer.ggml.add_eos_token"),
        add_space_prefix: b("tokenizer.ggml.add_space_prefix"),
    };
    GgufTok { vocab, chat_template: s("tokenizer.chat_template") }
}

// ---------------------------------------------------------------------------------------------
// Locations
// ---------------------------------------------------------------------------------------------

fn kiln_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/kiln")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn skip(test: &str, reason: String) {
    eprintln!("SKIPPED {test}: {reason}");
}

/// Checks ids and round-trip decoding; returns a description of each mismatch.
fn check_case(tok: &Tokenizer, text: &str, expected: &[u32], add_special: bool) -> Option<String> {
    let got = match tok.encode(text, add_special) {
        Ok(ids) => ids,
        Err(e) => return Some(format!("{text:?}: encode error {e}")),
    };
    if got != expected {
        return Some(format!("{text:?}:\n    expected {expected:?}\n    got      {got:?}"));
    }
    None
}

/// Streams `ids` one at a time and checks the concatenation equals a one-shot decode.
fn check_stream(tok: &Tokenizer, ids: &[u32]) {
    let whole = tok.decode(ids).unwrap();
    let mut stream = TokenStream::new(tok);
    let mut text = String::new();
    for &id in ids {
        text.push_str(&stream.push(id).unwrap());
    }
    text.push_str(&stream.finish().unwrap());
    assert_eq!(text, whole, "streamed decode differs for {ids:?}");
}

// ---------------------------------------------------------------------------------------------
// llama.cpp's vocabulary test suite (models/ggml-vocab-*.gguf with .inp / .out)
// ---------------------------------------------------------------------------------------------

fn vocab_suite_dir() -> Option<PathBuf> {
    let candidates =
        [std::env::var_os("KILN_LLAMA_VOCAB_DIR").map(PathBuf::from), Some(kiln_cache().join("llama.cpp/src/models"))];
    candidates.into_iter().flatten().find(|p| p.join("ggml-vocab-gpt-2.gguf.inp").exists())
}

fn parse_suite(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(n) => {
                texts.push(inp[pos..pos + n].to_string());
                pos += n + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{name}: .inp and .out disagree");
    texts.into_iter().zip(ids).collect()
}

/// Vocabularies whose llama.cpp test cases must all match.
const MUST_PASS: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "llama-spm",
    "phi-3",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
    "falcon",
    "deepseek-coder",
];

#[test]
fn llama_cpp_vocab_suite() {
    let Some(dir) = vocab_suite_dir() else {
        skip(
            "llama_cpp_vocab_suite",
            format!(
                "llama.cpp's models/ggml-vocab-*.gguf not found (set KILN_LLAMA_VOCAB_DIR or unpack the sdist into {})",
                kiln_cache().join("llama.cpp/src").display()
            ),
        );
        return;
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| n.strip_prefix("ggml-vocab-")?.strip_suffix(".gguf.out").map(str::to_string))
        .collect();
    names.sort();
    let mut failures = Vec::new();
    for name in &names {
        let g = read_gguf_vocab(&dir.join(format!("ggml-vocab-{name}.gguf")));
        let tok = match Tokenizer::from_gguf_vocab(&g.vocab) {
            Ok(t) => t,
            Err(e) => {
                if MUST_PASS.contains(&name.as_str()) {
                    failures.push(format!("{name}: {e}"));
                } else {
                    println!("vocab {name}: not supported ({e})");
                }
                continue;
            }
        };
        let cases = parse_suite(&dir, name);
        let mismatches: Vec<String> =
            cases.iter().filter_map(|(text, ids)| check_case(&tok, text, ids, false)).collect();
        println!(
            "vocab {name} ({} {:?}): {}/{} cases match",
            g.vocab.model,
            g.vocab.pre,
            cases.len() - mismatches.len(),
            cases.len()
        );
        for m in mismatches.iter().take(5) {
            println!("  {m}");
        }
        if MUST_PASS.contains(&name.as_str()) {
            failures.extend(mismatches.into_iter().map(|m| format!("{name}: {m}")));
            for (_, ids) in &cases {
                check_stream(&tok, ids);
            }
        }
    }
    for name in MUST_PASS {
        if !names.iter().any(|n| n == name) {
            failures.push(format!("{name}: vocab file missing from {}", dir.display()));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Real model GGUFs and the llama.cpp oracle
// ---------------------------------------------------------------------------------------------

fn oracle_fixture(model: &str) -> Option<Value> {
    let dir = std::env::var_os("KILN_ORACLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/fixtures/oracle"));
    let path = dir.join(format!("{model}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Compares with the oracle's `tokenize` list (llama_tokenize add_special=true, parse_special=true)
/// and its prompt ids. Returns the number of compared cases, or None when the fixture is absent.
fn compare_with_oracle(tok: &Tokenizer, model: &str) -> Option<usize> {
    let oracle = oracle_fixture(model)?;
    let mut failures = Vec::new();
    let mut n = 0;
    for case in oracle["tokenize"].as_array().into_iter().flatten() {
        let (Some(text), Some(ids)) = (case["text"].as_str(), case["ids"].as_array()) else {
            continue;
        };
        let ids: Vec<u32> = ids.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect();
        n += 1;
        failures.extend(check_case(tok, text, &ids, true));
        check_stream(tok, &ids);
    }
    for p in oracle["prompts"].as_array().into_iter().flatten() {
        let (Some(text), Some(ids)) = (p["text"].as_str(), p["prompt_ids"].as_array()) else {
            continue;
        };
        let ids: Vec<u32> = ids.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect();
        n += 1;
        failures.extend(check_case(tok, text, &ids, true));
        if let Some(gen_ids) = p["generated_ids"].as_array() {
            let gen_ids: Vec<u32> = gen_ids.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect();
            check_stream(tok, &gen_ids);
        }
    }
    assert!(failures.is_empty(), "{model}: {} mismatches with llama.cpp:\n{}", failures.len(), failures.join("\n"));
    Some(n)
}

fn model_path(file: &str) -> Option<PathBuf> {
    let p = kiln_cache().join("models").join(file);
    p.exists().then_some(p)
}

#[test]
fn smollm2_gguf_tokenizer() {
    let test = "smollm2_gguf_tokenizer";
    let Some(path) = model_path("smollm2-135m-instruct-q4_1.gguf") else {
        skip(test, format!("{} not found", kiln_cache().join("models/smollm2-135m-instruct-q4_1.gguf").display()));
        return;
    };
    let g = read_gguf_vocab(&path);
    assert_eq!(g.vocab.pre.as_deref(), Some("smollm"));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_chat_template.jinja");
    assert_eq!(g.chat_template.as_deref(), std::fs::read_to_string(fixture).ok().as_deref(), "chat template fixture");
    let tok = Tokenizer::from_gguf_vocab(&g.vocab).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.adds_bos());
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(tok.eos_ids().contains(&2) && tok.eos_ids().contains(&im_end), "{:?}", tok.eos_ids());
    // Control tokens are single ids; digits split one by one (smollm pre-tokenizer).
    let ids = tok.encode("<|im_start|>user\nHello 2024<|im_end|>", true).unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    let digits = tok.encode("2024", false).unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    let text = "Héllo wörld! 你好 🦙 — tabs\tand  spaces\n\nend";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    check_stream(&tok, &ids);
    // Chat template from the same file renders.
    if let Some(t) = &g.chat_template {
        let tpl =
            kiln_runtime::chat::ChatTemplate::new(t, path.display().to_string(), "<|im_start|>", "<|im_end|>").unwrap();
        let prompt = tpl.render(&[kiln_runtime::chat::ChatMessage::new("user", "Hi")], true).unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
        let ids = tok.encode(&prompt, true).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    }
    match compare_with_oracle(&tok, "smollm2") {
        Some(n) => println!("{test}: {n} llama.cpp oracle cases match"),
        None => skip(
            &format!("{test} (oracle part)"),
            "tests/fixtures/oracle/smollm2.json not generated yet (tests/oracle/make_llama_refs.py)".to_string(),
        ),
    }
}

#[test]
fn qwen25_gguf_tokenizer() {
    let test = "qwen25_gguf_tokenizer";
    let Some(path) = model_path("qwen2.5-coder-0.5b.gguf") else {
        skip(test, format!("{} not found", kiln_cache().join("models/qwen2.5-coder-0.5b.gguf").display()));
        return;
    };
    let g = read_gguf_vocab(&path);
    assert_eq!(g.vocab.pre.as_deref(), Some("qwen2"));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2.5_chat_template.jinja");
    assert_eq!(g.chat_template.as_deref(), std::fs::read_to_string(fixture).ok().as_deref(), "chat template fixture");
    let tok = Tokenizer::from_gguf_vocab(&g.vocab).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert!(tok.is_eos(im_end) && tok.is_eos(eot), "{:?}", tok.eos_ids());
    assert!(!tok.adds_bos());
    let text = "def f(x):\n    return x ** 2  # squares 12345\n\n\tprint('done')";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    check_stream(&tok, &ids);
    match compare_with_oracle(&tok, "qwen2.5-coder-0.5b") {
        Some(n) => println!("{test}: {n} llama.cpp oracle cases match"),
        None => skip(
            &format!("{test} (oracle part)"),
            "tests/fixtures/oracle/qwen2.5-coder-0.5b.json not generated yet (tests/oracle/make_llama_refs.py)"
                .to_string(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// glassllm (fixtures committed: the MIT-licensed en tokenizer and ids from its Python code)
// ---------------------------------------------------------------------------------------------

#[test]
fn glassllm_tokenizer_matches_python() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tok = Tokenizer::from_file(fixtures.join("glassllm_en.tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    assert_eq!(tok.eos_ids(), &[3]);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("glassllm_en_expected.json")).unwrap()).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        if let Some(m) = check_case(&tok, text, &ids, true) {
            panic!("glassllm mismatch: {m}");
        }
        assert_eq!(tok.decode(&ids).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        check_stream(&tok, &ids);
    }
    // Specials decode to nothing, as in glassllm.
    assert_eq!(tok.decode(&[2, 56, 3, 0]).unwrap(), "a");
}
