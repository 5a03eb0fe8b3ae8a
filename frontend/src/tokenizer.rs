//! Tokenizer conversion: GGUF vocabularies (and glassllm BPE files) to Hugging Face `tokenizer.json`.
//!
//! The GGUF side is described by [`GgufVocab`], a plain struct the caller fills from the
//! `tokenizer.ggml.*` metadata keys. [`gguf_vocab_to_tokenizer_json`] turns it into a
//! `tokenizer.json` document that the `tokenizers` crate (and Hugging Face's Python package)
//! can load, reproducing llama.cpp's tokenization:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The pre-tokenizer is the list of
//!   regexes llama.cpp applies for `tokenizer.ggml.pre` (each one an isolating `Split`,
//!   applied in order, then a byte-level mapping without its own regex).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece BPE. The merges are derived from the
//!   vocabulary and its scores (every split of a piece into two pieces becomes a merge ranked
//!   by the merged piece's score), with byte fallback and the `▁` space replacement, which
//!   is what llama.cpp's SPM tokenizer computes.
//!
//! Decisions that `tokenizer.json` cannot express (which ids end generation, llama.cpp's
//! decoding flags) travel in a `"kiln"` object at the top level of the document
//! ([`KilnTokenizerConfig`]); the `tokenizers` crate ignores unknown top-level keys.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{BTreeSet, HashMap};

/// GGUF token type: normal token (`tokenizer.ggml.token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type: unknown token.
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF token type: control token (special; rendered only on request).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type: user-defined token (always matched verbatim in text).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF token type: unused token.
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// GGUF token type: byte token (`<0xAB>`).
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// Key of the kiln-side settings object inside a converted `tokenizer.json`.
pub const KILN_CONFIG_KEY: &str = "kiln";

/// Token texts that llama.cpp treats as end-of-generation markers when present in a vocabulary.
pub const EOG_TOKEN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
    "</s>",
    "<eos>",
];

/// A GGUF tokenizer description, filled by the caller from the `tokenizer.ggml.*` keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// Where the vocabulary came from (a file name); used in error messages.
    pub origin: String,
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (`"smollm"`, `"qwen2"`, `"llama3"`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges` (`"left right"` strings).
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece only).
    pub add_space_prefix: Option<bool>,
}

/// Kiln-side tokenizer settings stored under the `"kiln"` key of a converted `tokenizer.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KilnTokenizerConfig {
    /// What the tokenizer was converted from, e.g. `"gguf:gpt2/smollm"`.
    pub source: String,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_id: Option<u32>,
    /// Tokens that end generation: EOS plus end-of-turn markers.
    pub eog_ids: Vec<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Padding token.
    pub pad_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS (also encoded in the post-processor).
    pub add_bos: bool,
    /// Whether encoding with special tokens appends EOS (also encoded in the post-processor).
    pub add_eos: bool,
    /// llama.cpp's `clean_spaces` decoding flag (informational).
    pub clean_spaces: bool,
}

/// Errors from tokenizer conversion; each names the source and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerConvertError {
    /// The `tokenizer.ggml.model` value is not supported.
    #[error("{origin}: unsupported tokenizer model '{model}' (supported: gpt2, llama)")]
    UnsupportedModel {
        /// Source of the vocabulary.
        origin: String,
        /// The model name.
        model: String,
    },
    /// The `tokenizer.ggml.pre` value is not supported.
    #[error("{origin}: unsupported pre-tokenizer '{pre}'")]
    UnsupportedPreTokenizer {
        /// Source of the vocabulary.
        origin: String,
        /// The pre-tokenizer name.
        pre: String,
    },
    /// The vocabulary has no tokens.
    #[error("{origin}: the vocabulary is empty")]
    EmptyVocab {
        /// Source of the vocabulary.
        origin: String,
    },
    /// An array that must parallel the token list has another length.
    #[error("{origin}: {what} has {got} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        /// Source of the vocabulary.
        origin: String,
        /// Which array.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The number of tokens.
        expected: usize,
    },
    /// A byte-level BPE vocabulary lacks `tokenizer.ggml.merges`.
    #[error("{origin}: tokenizer model 'gpt2' needs tokenizer.ggml.merges, which is missing")]
    MissingMerges {
        /// Source of the vocabulary.
        origin: String,
    },
    /// A merge rule is not two tokens separated by a space.
    #[error("{origin}: merge #{index} ('{merge}') is not two tokens separated by a space")]
    BadMerge {
        /// Source of the vocabulary.
        origin: String,
        /// Index of the merge.
        index: usize,
        /// The merge text.
        merge: String,
    },
    /// A special token id is outside the vocabulary.
    #[error("{origin}: {what} token id {id} is outside the vocabulary of {n_tokens} tokens")]
    SpecialOutOfRange {
        /// Source of the vocabulary.
        origin: String,
        /// Which special token.
        what: &'static str,
        /// The id.
        id: u32,
        /// The vocabulary size.
        n_tokens: usize,
    },
    /// `add_bos`/`add_eos` is requested but the token is not defined.
    #[error("{origin}: {what} is requested but the vocabulary defines no such token")]
    MissingSpecial {
        /// Source of the vocabulary.
        origin: String,
        /// What is missing.
        what: &'static str,
    },
    /// A glassllm tokenizer file could not be parsed.
    #[error("{origin}: not a glassllm tokenizer file: {detail}")]
    Glassllm {
        /// Source of the file.
        origin: String,
        /// What is wrong.
        detail: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer regexes (as llama.cpp's `llm_tokenizer_bpe` applies them)
// ---------------------------------------------------------------------------------------------

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_JAIS2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";
const RE_DEEPSEEK3_MAIN: &str = r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_FALCON_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|`]+";
const RE_DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
const RE_PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const RE_CHATGLM4: &str = RE_LLAMA3;
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const RE_UFAKZEKA: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_MINICPM5: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one `tokenizer.ggml.pre` value tokenizes (mirrors llama.cpp's per-type settings).
#[derive(Debug, Clone, Copy)]
struct PreSpec {
    regexes: &'static [&'static str],
    ignore_merges: bool,
    clean_spaces: bool,
    default_add_bos: bool,
    no_bos: bool,
}

const fn spec(regexes: &'static [&'static str], clean_spaces: bool) -> PreSpec {
    PreSpec { regexes, ignore_merges: false, clean_spaces, default_add_bos: false, no_bos: false }
}

/// The pre-tokenizer names this converter understands.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
    "deepseek-coder",
    "deepseek-v3",
    "hunyuan-dense",
    "joyai-llm",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "exaone4",
    "olmo",
    "jais",
    "trillion",
    "granite-docling",
    "jais-2",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "stablelm2",
    "hunyuan",
    "solar-open",
    "grok-2",
    "qwen35",
    "poro-chat",
    "bloom",
    "gpt3-finnish",
    "viking",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "tekken",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "seed-coder",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "ufakzeka",
    "minicpm5",
];

fn pre_spec(pre: &str) -> Option<PreSpec> {
    let s = match pre {
        "default" => spec(&[RE_DEFAULT_PUNCT, RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            PreSpec { ignore_merges: true, default_add_bos: true, ..spec(&[RE_LLAMA3], true) }
        }
        "dbrx" | "smaug-bpe" => spec(&[RE_LLAMA3], true),
        "deepseek-coder" => spec(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" => {
            spec(&[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", RE_DEEPSEEK3_MAIN], false)
        }
        "falcon" => spec(&[RE_FALCON_PUNCT, RE_GPT2, "[0-9][0-9][0-9]"], true),
        "mpt" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "modern-bert" | "exaone4" | "olmo" | "jais" => spec(&[RE_GPT2], true),
        "trillion" | "granite-docling" => spec(&[RE_GPT2], false),
        "jais-2" => spec(&[RE_JAIS2], true),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => spec(&[r"\p{N}", RE_GPT2], true),
        "command-r" | "smollm" => spec(&[r"\p{N}", RE_GPT2], false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" | "grok-2" => {
            spec(&[RE_QWEN2], false)
        }
        "megrez" | "stablelm2" => spec(&[RE_QWEN2], true),
        "qwen35" => spec(&[RE_QWEN35], false),
        "poro-chat" => spec(&[RE_PORO], false),
        "bloom" | "gpt3-finnish" => spec(&[RE_PORO], true),
        "viking" => spec(&[RE_PORO, r"\p{N}"], false),
        "chatglm-bpe" => PreSpec { no_bos: true, ..spec(&[RE_CHATGLM4], true) },
        "glm4" | "glm5" => PreSpec { no_bos: true, ignore_merges: true, ..spec(&[RE_CHATGLM4], true) },
        "tekken" => PreSpec { ignore_merges: true, default_add_bos: true, ..spec(&[RE_TEKKEN], false) },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => spec(&[RE_GPT4O], false),
        "seed-coder" => spec(&[RE_SEED_CODER], false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => spec(&[RE_BAILINGMOE], false),
        "ufakzeka" => spec(&[RE_UFAKZEKA], false),
        "minicpm5" => PreSpec { ignore_merges: true, ..spec(&[r"\p{N}{1,3}", RE_MINICPM5], true) },
        _ => return None,
    };
    Some(s)
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn added_token(id: u32, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// A `TemplateProcessing` post-processor adding BOS and/or EOS, or `null` when neither is added.
fn template_post_processor(bos: Option<(u32, &str)>, eos: Option<(u32, &str)>) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |name: &str| json!({"SpecialToken": {"id": name, "type_id": 0}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Map::new();
    for (part, type_id) in [("A", 0u32), ("B", 1u32)] {
        let target = if part == "A" { &mut single } else { &mut pair };
        if let Some((_, name)) = bos {
            target.push(special(name));
        }
        target.push(seq(part, type_id));
        if let Some((_, name)) = eos {
            target.push(special(name));
        }
    }
    let mut full_pair = single.clone();
    full_pair.extend(pair);
    for (id, name) in [bos, eos].into_iter().flatten() {
        special_tokens.insert(name.to_string(), json!({"id": name, "ids": [id], "tokens": [name]}));
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": full_pair,
        "special_tokens": special_tokens,
    })
}

fn check_special(
    origin: &str,
    what: &'static str,
    id: Option<u32>,
    n_tokens: usize,
) -> Result<Option<u32>, TokenizerConvertError> {
    match id {
        Some(id) if (id as usize) >= n_tokens => {
            Err(TokenizerConvertError::SpecialOutOfRange { origin: origin.to_string(), what, id, n_tokens })
        }
        other => Ok(other),
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF conversion
// ---------------------------------------------------------------------------------------------

/// Converts a GGUF vocabulary into a Hugging Face `tokenizer.json` document.
///
/// The document carries a `"kiln"` object ([`KilnTokenizerConfig`]) with BOS/EOS and
/// end-of-generation ids. Serialize it with `serde_json::to_string` to write a file.
pub fn gguf_vocab_to_tokenizer_json(vocab: &GgufVocab) -> Result<Value, TokenizerConvertError> {
    let origin = if vocab.origin.is_empty() { "GGUF vocabulary" } else { vocab.origin.as_str() };
    let n = vocab.tokens.len();
    if n == 0 {
        return Err(TokenizerConvertError::EmptyVocab { origin: origin.to_string() });
    }
    if u32::try_from(n).is_err() {
        return Err(TokenizerConvertError::LengthMismatch {
            origin: origin.to_string(),
            what: "tokenizer.ggml.tokens (more than 2^32 tokens)",
            got: n,
            expected: u32::MAX as usize,
        });
    }
    for (what, len) in [
        ("tokenizer.ggml.scores", vocab.scores.as_ref().map(Vec::len)),
        ("tokenizer.ggml.token_type", vocab.token_types.as_ref().map(Vec::len)),
    ] {
        if let Some(len) = len
            && len < n
        {
            return Err(TokenizerConvertError::LengthMismatch {
                origin: origin.to_string(),
                what,
                got: len,
                expected: n,
            });
        }
    }

    // llama.cpp renames empty tokens so that every id has a distinct, non-empty text.
    let tokens: Vec<String> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t.clone() })
        .collect();
    let token_type =
        |i: usize| -> i32 { vocab.token_types.as_ref().and_then(|t| t.get(i).copied()).unwrap_or(TOKEN_TYPE_NORMAL) };

    let is_spm = match vocab.model.as_str() {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(TokenizerConvertError::UnsupportedModel {
                origin: origin.to_string(),
                model: other.to_string(),
            });
        }
    };

    // Special ids, with llama.cpp's defaults for SentencePiece vocabularies.
    let (mut bos, mut eos, mut unk) = (vocab.bos, vocab.eos, vocab.unk);
    if is_spm {
        bos = bos.or(Some(1));
        eos = eos.or(Some(2));
        unk = unk.or(Some(0));
    }
    let bos = check_special(origin, "BOS", bos, n)?;
    let eos = check_special(origin, "EOS", eos, n)?;
    let unk = check_special(origin, "UNK", unk, n)?;
    let pad = check_special(origin, "PAD", vocab.pad, n)?;
    let eot = check_special(origin, "EOT", vocab.eot, n)?;
    let eom = check_special(origin, "EOM", vocab.eom, n)?;

    let pre_name = vocab.pre.clone().unwrap_or_else(|| "default".to_string());
    let pre = if is_spm {
        None
    } else {
        Some(pre_spec(&pre_name).ok_or_else(|| TokenizerConvertError::UnsupportedPreTokenizer {
            origin: origin.to_string(),
            pre: pre_name.clone(),
        })?)
    };
    let bos = if pre.is_some_and(|p| p.no_bos) { None } else { bos };

    let default_add_bos = if is_spm { true } else { pre.is_some_and(|p| p.default_add_bos) };
    let add_bos = vocab.add_bos.unwrap_or(default_add_bos);
    let add_eos = vocab.add_eos.unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(TokenizerConvertError::MissingSpecial {
            origin: origin.to_string(),
            what: "tokenizer.ggml.add_bos_token",
        });
    }
    if add_eos && eos.is_none() {
        return Err(TokenizerConvertError::MissingSpecial {
            origin: origin.to_string(),
            what: "tokenizer.ggml.add_eos_token",
        });
    }

    // End-of-generation ids: EOS, EOT, EOM and tokens whose text marks an end of turn.
    let mut eog: BTreeSet<u32> = [eos, eot, eom].into_iter().flatten().collect();
    for (i, t) in tokens.iter().enumerate() {
        if EOG_TOKEN_TEXTS.contains(&t.as_str()) {
            eog.insert(i as u32);
        }
    }

    // Added tokens: control and unknown tokens are special; user-defined are plain added tokens.
    let named_special: BTreeSet<u32> = [bos, eos, unk, pad, eot, eom].into_iter().flatten().collect();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let id = i as u32;
        let ty = token_type(i);
        let special =
            ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN || named_special.contains(&id) || eog.contains(&id);
        if special {
            added.push(added_token(id, t, true));
        } else if ty == TOKEN_TYPE_USER_DEFINED {
            added.push(added_token(id, t, false));
        }
    }

    let mut vocab_map = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // Later duplicates win, as in llama.cpp's token_to_id map.
        vocab_map.insert(t.clone(), json!(i));
    }

    let text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(String::as_str);
    let post = template_post_processor(
        if add_bos { bos.zip(text(bos)) } else { None },
        if add_eos { eos.zip(text(eos)) } else { None },
    );

    let (source, normalizer, pre_tokenizer, model, decoder, clean_spaces) = if let Some(pre) = pre {
        let merges =
            vocab.merges.as_ref().ok_or_else(|| TokenizerConvertError::MissingMerges { origin: origin.to_string() })?;
        let mut merge_list = Vec::with_capacity(merges.len());
        for (index, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let pos = m.as_bytes().get(1..).and_then(|rest| rest.iter().position(|&b| b == b' '));
            let pos = pos.map(|p| p + 1);
            let Some(pos) = pos else {
                return Err(TokenizerConvertError::BadMerge { origin: origin.to_string(), index, merge: m.clone() });
            };
            let (left, right) = (&m[..pos], &m[pos + 1..]);
            if !vocab_map.contains_key(left)
                || !vocab_map.contains_key(right)
                || !vocab_map.contains_key(&format!("{left}{right}"))
            {
                // A merge whose parts or result are not tokens can never fire in llama.cpp
                // (its result would not be a token); the tokenizers crate rejects it.
                continue;
            }
            merge_list.push(json!([left, right]));
        }
        let mut pre_tokenizers: Vec<Value> = pre
            .regexes
            .iter()
            .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
            .collect();
        pre_tokenizers.push(json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
        }));
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab_map,
            "merges": merge_list,
        });
        (
            format!("gguf:gpt2/{pre_name}"),
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": pre_tokenizers}),
            model,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
            pre.clean_spaces,
        )
    } else {
        let add_space_prefix = vocab.add_space_prefix.unwrap_or(true);
        let merges = spm_merges(&tokens, vocab.scores.as_deref(), &vocab_map);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if add_space_prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                replace,
            ]})
        } else {
            replace
        };
        let unk_text = text(unk).map(str::to_string);
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": unk_text,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges,
        });
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            "gguf:llama".to_string(),
            normalizer,
            Value::Null,
            model,
            json!({"type": "Sequence", "decoders": decoders}),
            false,
        )
    };

    let config = KilnTokenizerConfig {
        source,
        bos_id: bos,
        eos_id: eos,
        eog_ids: eog.into_iter().collect(),
        unk_id: unk,
        pad_id: pad,
        add_bos,
        add_eos,
        clean_spaces,
    };
    let config_value = serde_json::to_value(&config).unwrap_or(Value::Null);

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": model,
        KILN_CONFIG_KEY: config_value,
    }))
}

/// Derives BPE merges from a SentencePiece vocabulary: every split of a token into two
/// tokens is a merge, ranked by the merged token's score (highest first, ties by id).
fn spm_merges(tokens: &[String], scores: Option<&[f32]>, vocab: &Map<String, Value>) -> Vec<Value> {
    let id_of: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let score = |i: usize| scores.and_then(|s| s.get(i).copied()).unwrap_or(0.0);
    let mut candidates: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        // Only the canonical id of a text can be produced by merging.
        if vocab.get(t).and_then(Value::as_u64) != Some(id as u64) {
            continue;
        }
        for (pos, _) in t.char_indices().skip(1) {
            let (left, right) = t.split_at(pos);
            if let (Some(&l), Some(_)) = (id_of.get(left), id_of.get(right)) {
                candidates.push((score(id), id, l, left, right));
            }
        }
    }
    let s = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    candidates.sort_by(|a, b| s(b.0).total_cmp(&s(a.0)).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    candidates.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect()
}

/// Reads the kiln settings stored in a `tokenizer.json` document, if present.
pub fn kiln_config_of(doc: &Value) -> Option<KilnTokenizerConfig> {
    doc.get(KILN_CONFIG_KEY).and_then(|v| serde_json::from_value(v.clone()).ok())
}

// ---------------------------------------------------------------------------------------------
// glassllm
// ---------------------------------------------------------------------------------------------

/// The special tokens glassllm places before its alphabet.
pub const GLASSLLM_SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<bos>", "<eos>"];

#[derive(Deserialize)]
struct GlassllmFile {
    version: u32,
    alphabet: Vec<String>,
    merges: Vec<(String, String)>,
}

/// Whether a JSON document looks like a glassllm tokenizer file (`{"version": 1, "alphabet", "merges"}`).
pub fn is_glassllm_tokenizer(doc: &Value) -> bool {
    doc.get("alphabet").is_some_and(Value::is_array)
        && doc.get("merges").is_some_and(Value::is_array)
        && doc.get("model").is_none()
}

/// Converts a glassllm character-BPE tokenizer file into a `tokenizer.json` document.
///
/// glassllm normalizes to NFC, replaces spaces with `▁`, splits chunks with
/// `\n|▁*[^▁\n]+|▁+` and applies its merges by rank; its vocabulary is the four specials,
/// then the alphabet, then one token per merge. Its specials are never matched in text;
/// decoding drops them, renders `<unk>` as `⁇` and maps `▁` back to spaces.
pub fn glassllm_to_tokenizer_json(doc: &Value, origin: &str) -> Result<Value, TokenizerConvertError> {
    let bad = |detail: String| TokenizerConvertError::Glassllm { origin: origin.to_string(), detail };
    let file: GlassllmFile = serde_json::from_value(doc.clone()).map_err(|e| bad(e.to_string()))?;
    if file.version != 1 {
        return Err(bad(format!("unsupported version {}", file.version)));
    }
    let mut vocab: Vec<String> = GLASSLLM_SPECIALS.iter().map(|s| s.to_string()).collect();
    vocab.extend(file.alphabet.iter().cloned());
    vocab.extend(file.merges.iter().map(|(a, b)| format!("{a}{b}")));
    let mut vocab_map = Map::new();
    for (i, t) in vocab.iter().enumerate() {
        vocab_map.insert(t.clone(), json!(i));
    }
    for (i, (a, b)) in file.merges.iter().enumerate() {
        if !vocab_map.contains_key(a) || !vocab_map.contains_key(b) {
            return Err(bad(format!("merge #{i} ({a:?}, {b:?}) uses a symbol that is not in the vocabulary")));
        }
    }
    let merges: Vec<Value> = file.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let config = KilnTokenizerConfig {
        source: "glassllm".to_string(),
        bos_id: Some(2),
        eos_id: Some(3),
        eog_ids: vec![3],
        unk_id: Some(1),
        pad_id: Some(0),
        add_bos: false,
        add_eos: false,
        clean_spaces: false,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        // glassllm never matches its specials in text, so they are not added tokens; the
        // decoder drops them instead.
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\n|\u{2581}*[^\u{2581}\n]+|\u{2581}+"},
            "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "<unk>"}, "content": "\u{2047}"},
            {"type": "Replace", "pattern": {"String": "<pad>"}, "content": ""},
            {"type": "Replace", "pattern": {"String": "<bos>"}, "content": ""},
            {"type": "Replace", "pattern": {"String": "<eos>"}, "content": ""},
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges,
        },
        KILN_CONFIG_KEY: serde_json::to_value(&config).unwrap_or(Value::Null),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_gpt2(pre: &str) -> GgufVocab {
        GgufVocab {
            origin: "tiny.gguf".into(),
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens: ["a", "b", "ab", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec(),
            token_types: Some(vec![1, 1, 1, 3, 3, 3]),
            merges: Some(vec!["a b".into(), "x y".into()]),
            bos: Some(3),
            eos: Some(5),
            ..Default::default()
        }
    }

    #[test]
    fn gpt2_document_shape() {
        let doc = gguf_vocab_to_tokenizer_json(&tiny_gpt2("smollm")).unwrap();
        assert_eq!(doc["model"]["type"], "BPE");
        // The unusable merge "x y" is dropped.
        assert_eq!(doc["model"]["merges"], json!([["a", "b"]]));
        assert_eq!(doc["pre_tokenizer"]["pretokenizers"].as_array().unwrap().len(), 3);
        assert_eq!(doc["added_tokens"].as_array().unwrap().len(), 3);
        assert!(doc["post_processor"].is_null());
        let cfg = kiln_config_of(&doc).unwrap();
        assert_eq!(cfg.bos_id, Some(3));
        assert_eq!(cfg.eog_ids, vec![3, 5]);
        assert!(!cfg.add_bos);
    }

    #[test]
    fn llama3_adds_bos_by_default() {
        let doc = gguf_vocab_to_tokenizer_json(&tiny_gpt2("llama3")).unwrap();
        assert_eq!(doc["post_processor"]["type"], "TemplateProcessing");
        assert_eq!(doc["model"]["ignore_merges"], true);
        assert!(kiln_config_of(&doc).unwrap().add_bos);
    }

    #[test]
    fn every_supported_pre_is_known() {
        for pre in SUPPORTED_PRE_TOKENIZERS {
            assert!(pre_spec(pre).is_some(), "{pre}");
        }
    }

    #[test]
    fn errors_name_the_origin() {
        let mut v = tiny_gpt2("no-such-pre");
        let e = gguf_vocab_to_tokenizer_json(&v).unwrap_err().to_string();
        assert!(e.contains("tiny.gguf") && e.contains("no-such-pre"), "{e}");
        v.pre = Some("gpt-2".into());
        v.merges = Some(vec!["ab".into()]);
        let e = gguf_vocab_to_tokenizer_json(&v).unwrap_err().to_string();
        assert!(e.contains("merge #0"), "{e}");
        v.merges = None;
        assert!(matches!(gguf_vocab_to_tokenizer_json(&v), Err(TokenizerConvertError::MissingMerges { .. })));
        v.model = "t5".into();
        assert!(matches!(gguf_vocab_to_tokenizer_json(&v), Err(TokenizerConvertError::UnsupportedModel { .. })));
        let mut v = tiny_gpt2("gpt-2");
        v.eos = Some(99);
        assert!(matches!(gguf_vocab_to_tokenizer_json(&v), Err(TokenizerConvertError::SpecialOutOfRange { .. })));
        v.eos = None;
        v.token_types = Some(vec![1]);
        assert!(matches!(gguf_vocab_to_tokenizer_json(&v), Err(TokenizerConvertError::LengthMismatch { .. })));
        let empty = GgufVocab { model: "gpt2".into(), ..Default::default() };
        assert!(matches!(gguf_vocab_to_tokenizer_json(&empty), Err(TokenizerConvertError::EmptyVocab { .. })));
    }

    #[test]
    fn spm_merges_follow_scores() {
        let v = GgufVocab {
            model: "llama".into(),
            tokens: ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "abc"].map(String::from).to_vec(),
            scores: Some(vec![0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0]),
            token_types: Some(vec![2, 3, 3, 1, 1, 1, 1, 1, 1]),
            ..Default::default()
        };
        let doc = gguf_vocab_to_tokenizer_json(&v).unwrap();
        assert_eq!(doc["model"]["merges"], json!([["b", "c"], ["a", "b"], ["a", "bc"], ["ab", "c"]]));
        assert_eq!(doc["model"]["byte_fallback"], true);
        assert_eq!(doc["post_processor"]["special_tokens"]["<s>"]["ids"], json!([1]));
        let cfg = kiln_config_of(&doc).unwrap();
        assert!(cfg.add_bos);
        assert_eq!(cfg.eog_ids, vec![2]);
    }

    #[test]
    fn glassllm_conversion() {
        let doc = json!({"version": 1, "alphabet": ["a", "b", "\u{2581}"], "merges": [["a", "b"], ["\u{2581}", "ab"]]});
        assert!(is_glassllm_tokenizer(&doc));
        let out = glassllm_to_tokenizer_json(&doc, "en.tokenizer.json").unwrap();
        assert_eq!(out["model"]["vocab"]["\u{2581}ab"], 8);
        let bad = json!({"version": 1, "alphabet": ["a"], "merges": [["a", "q"]]});
        let e = glassllm_to_tokenizer_json(&bad, "x.json").unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("merge #0"), "{e}");
    }
}
