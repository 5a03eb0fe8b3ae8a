//! Text tokenization for generation: a wrapper over the `tokenizers` crate plus a streaming detokenizer.
//!
//! A [`Tokenizer`] loads a Hugging Face `tokenizer.json` (as produced by
//! `kiln_frontend::tokenizer::gguf_vocab_to_tokenizer_json`, or shipped with a checkpoint) or
//! a glassllm BPE file, and knows the model's BOS and end-of-generation ids. Whether BOS is
//! prepended lives in the document's post-processor, so `encode(text, true)` honours the
//! GGUF's `add_bos_token`. [`TokenStream`] turns generated ids into text deltas, holding back
//! output while a UTF-8 character is split across tokens (byte fallback or byte-level BPE).

use kiln_frontend::tokenizer::{
    EOG_TOKEN_TEXTS, GgufVocab, KILN_CONFIG_KEY, KilnTokenizerConfig, TokenizerConvertError,
    gguf_vocab_to_tokenizer_json, glassllm_to_tokenizer_json, is_glassllm_tokenizer,
};
use serde_json::Value;
use std::path::Path;

/// Errors from loading or running a tokenizer; each names the tokenizer's origin.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file could not be read.
    #[error("{origin}: cannot read tokenizer file: {source}")]
    Io {
        /// Path of the file.
        origin: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not JSON.
    #[error("{origin}: tokenizer file is not valid JSON: {detail}")]
    Json {
        /// Where the document came from.
        origin: String,
        /// Parser message.
        detail: String,
    },
    /// The document is JSON but the `tokenizers` crate rejects it.
    #[error("{origin}: invalid tokenizer.json: {detail}")]
    Load {
        /// Where the document came from.
        origin: String,
        /// Loader message.
        detail: String,
    },
    /// Conversion from a GGUF vocabulary or glassllm file failed.
    #[error(transparent)]
    Convert(#[from] TokenizerConvertError),
    /// Encoding failed.
    #[error("{origin}: cannot encode text: {detail}")]
    Encode {
        /// Where the tokenizer came from.
        origin: String,
        /// Tokenizer message.
        detail: String,
    },
    /// Decoding failed.
    #[error("{origin}: cannot decode token ids: {detail}")]
    Decode {
        /// Where the tokenizer came from.
        origin: String,
        /// Tokenizer message.
        detail: String,
    },
}

/// A loaded tokenizer with kiln's settings (BOS, end-of-generation ids).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: KilnTokenizerConfig,
    origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("config", &self.config)
            .finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` (or glassllm tokenizer file) from disk.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { origin: origin.clone(), source })?;
        Self::from_bytes(&bytes, &origin)
    }

    /// Parses a `tokenizer.json` document or a glassllm tokenizer file; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, TokenizerError> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|e| TokenizerError::Json { origin: origin.to_string(), detail: e.to_string() })?;
        Self::from_value(doc, origin)
    }

    /// Converts a GGUF vocabulary and loads the result.
    pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Self, TokenizerError> {
        let doc = gguf_vocab_to_tokenizer_json(vocab)?;
        let origin = if vocab.origin.is_empty() { "GGUF vocabulary" } else { vocab.origin.as_str() };
        Self::from_value(doc, origin)
    }

    /// Loads a parsed document (Hugging Face `tokenizer.json` or glassllm file).
    pub fn from_value(doc: Value, origin: &str) -> Result<Self, TokenizerError> {
        let doc = if is_glassllm_tokenizer(&doc) { glassllm_to_tokenizer_json(&doc, origin)? } else { doc };
        let stored: Option<KilnTokenizerConfig> =
            doc.get(KILN_CONFIG_KEY).and_then(|v| serde_json::from_value(v.clone()).ok());
        let inner: tokenizers::Tokenizer = serde_json::from_value(doc.clone())
            .map_err(|e| TokenizerError::Load { origin: origin.to_string(), detail: e.to_string() })?;
        let config = match stored {
            Some(c) => c,
            None => infer_config(&inner, &doc),
        };
        Ok(Self { inner, config, origin: origin.to_string() })
    }

    /// Replaces the kiln settings (e.g. with BOS/EOS from a Hugging Face `tokenizer_config.json`).
    pub fn with_config(mut self, config: KilnTokenizerConfig) -> Self {
        self.config = config;
        self
    }

    /// Encodes text. With `add_special`, the model's BOS/EOS are added as its tokenizer says
    /// (for GGUF models: `tokenizer.ggml.add_bos_token`). Special-token texts in `text` are
    /// always recognised as the special tokens.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode { origin: self.origin.clone(), detail: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, true)
    }

    /// Decodes ids to text; `skip_special` leaves out special tokens (BOS, EOS, chat markers).
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode { origin: self.origin.clone(), detail: e.to_string() })
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.config.bos_id
    }

    /// Tokens that end generation: EOS plus end-of-turn markers such as `<|im_end|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.config.eog_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.config.eog_ids.contains(&id)
    }

    /// Whether encoding with special tokens prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.config.add_bos
    }

    /// Number of ids (model vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token text (model vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id as stored in the vocabulary (not decoded).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Kiln settings of this tokenizer.
    pub fn config(&self) -> &KilnTokenizerConfig {
        &self.config
    }

    /// Where this tokenizer came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A streaming detokenizer that starts with no context.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream::new(self)
    }
}

/// Settings for a `tokenizer.json` without a kiln section: BOS from the post-processor,
/// end-of-generation ids from well-known token texts.
fn infer_config(inner: &tokenizers::Tokenizer, doc: &Value) -> KilnTokenizerConfig {
    let mut bos_id = None;
    let mut eos_id = None;
    let post = &doc["post_processor"];
    let mut post_ids = Vec::new();
    if post["type"] == "TemplateProcessing"
        && let Some(single) = post["single"].as_array()
    {
        let mut seen_seq = false;
        for piece in single {
            if piece.get("Sequence").is_some() {
                seen_seq = true;
            } else if let Some(name) = piece["SpecialToken"]["id"].as_str() {
                let id = post["special_tokens"][name]["ids"][0].as_u64().map(|v| v as u32);
                post_ids.push((seen_seq, id));
            }
        }
    }
    for (after, id) in &post_ids {
        if *after {
            eos_id = eos_id.or(*id);
        } else {
            bos_id = bos_id.or(*id);
        }
    }
    let add_bos = bos_id.is_some();
    let add_eos = eos_id.is_some();
    let mut eog: Vec<u32> = EOG_TOKEN_TEXTS.iter().filter_map(|t| inner.token_to_id(t)).collect();
    if bos_id.is_none() {
        bos_id = ["<s>", "<bos>", "<|begin_of_text|>"].iter().find_map(|t| inner.token_to_id(t));
    }
    if let Some(e) = eos_id {
        eog.push(e);
    } else {
        eos_id = ["</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"].iter().find_map(|t| inner.token_to_id(t));
    }
    eog.extend(eos_id);
    eog.sort_unstable();
    eog.dedup();
    KilnTokenizerConfig {
        source: "tokenizer.json".to_string(),
        bos_id,
        eos_id,
        eog_ids: eog,
        unk_id: None,
        pad_id: None,
        add_bos,
        add_eos,
        clean_spaces: false,
    }
}

/// Streaming detokenizer: feed generated ids one at a time, get the new text for each.
///
/// It decodes a small window of recent ids and emits what the newest id added, holding text
/// back while the window ends in an incomplete UTF-8 character (shown by the decoders as
/// U+FFFD). Concatenating every [`TokenStream::push`] result and [`TokenStream::finish`]
/// gives the same text as decoding all pushed ids at once (context ids excluded).
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

/// A window holding back more ids than this emits anyway: no UTF-8 character spans more
/// than four byte tokens, so a longer run ending in U+FFFD is a genuine replacement character.
const MAX_PENDING: usize = 4;

impl<'a> TokenStream<'a> {
    /// A stream with no preceding context; special tokens are not rendered.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_context(tokenizer, &[])
    }

    /// A stream that continues after `context` (e.g. the prompt): the last few context ids
    /// are used so the first generated token keeps its leading space. Nothing from the
    /// context is emitted.
    pub fn with_context(tokenizer: &'a Tokenizer, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(MAX_PENDING)..];
        Self { tokenizer, ids: tail.to_vec(), prefix_offset: 0, read_offset: tail.len(), skip_special: true }
    }

    /// Whether special tokens are left out of the text (default: true).
    pub fn skip_special(mut self, skip: bool) -> Self {
        self.skip_special = skip;
        self
    }

    /// Adds one id; returns the text it completes (possibly empty while a character is split).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        let pending = self.ids.len() - self.read_offset;
        if full.ends_with('\u{FFFD}') && pending < MAX_PENDING {
            return Ok(String::new());
        }
        let delta = text_after(&prefix, &full);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Emits whatever is still held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text_after(&prefix, &full))
    }

    /// All ids pushed so far (including retained context).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode_range(&self, start: usize, end: usize) -> Result<String, TokenizerError> {
        match self.ids.get(start..end) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode_with(ids, self.skip_special),
            _ => Ok(String::new()),
        }
    }
}

/// The part of `full` after `prefix`; if `full` does not extend `prefix` (a decoder changed
/// earlier text), the part after their longest common prefix.
fn text_after(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let mut common = 0;
    for ((i, a), b) in full.char_indices().zip(prefix.chars()) {
        if a != b {
            break;
        }
        common = i + a.len_utf8();
    }
    full.get(common..).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u32 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (i, t) in ["▁", "h", "i", "▁h", "▁hi", "é"].iter().enumerate() {
            tokens.push(t.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        GgufVocab {
            origin: "spm-test".into(),
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            ..Default::default()
        }
    }

    #[test]
    fn spm_encode_decode_with_byte_fallback() {
        let tok = Tokenizer::from_gguf_vocab(&spm_vocab()).unwrap();
        let base = 3 + 256;
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_ids(), &[2]);
        // "hi" -> "▁hi" with BOS.
        assert_eq!(tok.encode("hi", true).unwrap(), vec![1, base as u32 + 4]);
        assert_eq!(tok.encode("hi", false).unwrap(), vec![base as u32 + 4]);
        // "€" is not in the vocabulary: three byte tokens (E2 82 AC).
        let ids = tok.encode("hi €", false).unwrap();
        assert_eq!(ids, vec![base as u32 + 4, base as u32, 3 + 0xE2, 3 + 0x82, 3 + 0xAC]);
        assert_eq!(tok.decode(&ids).unwrap(), "hi €");
        // Streaming holds back the split character.
        let mut s = tok.stream();
        let deltas: Vec<String> = ids.iter().map(|&i| s.push(i).unwrap()).collect();
        assert_eq!(deltas, vec!["hi", " ", "", "", "€"]);
        assert_eq!(s.finish().unwrap(), "");
    }

    #[test]
    fn stream_flushes_incomplete_character() {
        let tok = Tokenizer::from_gguf_vocab(&spm_vocab()).unwrap();
        let mut s = tok.stream();
        assert_eq!(s.push(3 + 0xE2).unwrap(), "");
        assert_eq!(s.finish().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stream_with_context_keeps_leading_space() {
        let tok = Tokenizer::from_gguf_vocab(&spm_vocab()).unwrap();
        let base = 3 + 256u32;
        let prompt = tok.encode("hi", true).unwrap();
        let mut s = TokenStream::with_context(&tok, &prompt);
        assert_eq!(s.push(base + 4).unwrap(), " hi");
        let mut plain = tok.stream();
        assert_eq!(plain.push(base + 4).unwrap(), "hi");
        // Special tokens are skipped; unknown ids decode to nothing instead of failing.
        assert_eq!(plain.push(2).unwrap(), "");
        assert_eq!(plain.push(999_999).unwrap(), "");
    }

    #[test]
    fn spm_without_space_prefix() {
        // Gemma-style: no "▁" prepended, so decoding keeps a leading space.
        let mut v = spm_vocab();
        v.add_space_prefix = Some(false);
        let tok = Tokenizer::from_gguf_vocab(&v).unwrap();
        let base = 3 + 256u32;
        assert_eq!(tok.encode("hi", false).unwrap(), vec![base + 1, base + 2]);
        assert_eq!(tok.encode(" hi", false).unwrap(), vec![base + 4]);
        assert_eq!(tok.decode(&[base + 4]).unwrap(), " hi");
    }

    #[test]
    fn every_supported_pre_tokenizer_loads() {
        // A byte-level vocabulary covering all 256 byte symbols, so any text encodes.
        let mut shifted = 0;
        let unique: Vec<String> = (0..=255u8)
            .map(|b| match b {
                b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => char::from(b).to_string(),
                _ => {
                    shifted += 1;
                    char::from_u32(255 + shifted).unwrap_or('?').to_string()
                }
            })
            .collect();
        for pre in kiln_frontend::tokenizer::SUPPORTED_PRE_TOKENIZERS {
            let v = GgufVocab {
                origin: format!("pre={pre}"),
                model: "gpt2".into(),
                pre: Some(pre.to_string()),
                tokens: unique.clone(),
                merges: Some(vec![]),
                bos: Some(0),
                ..Default::default()
            };
            let tok = Tokenizer::from_gguf_vocab(&v).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let text = "Hello, World! It's 12345 — naïve 你好\n\n  x";
            let ids = tok.encode(text, false).unwrap_or_else(|e| panic!("{pre}: {e}"));
            assert_eq!(tok.decode(&ids).unwrap(), text, "{pre}");
        }
    }

    #[test]
    fn bad_documents_are_errors() {
        let e = Tokenizer::from_bytes(b"{not json", "x.json").unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
        let e = Tokenizer::from_bytes(br#"{"model": {"type": "Nope"}}"#, "y.json").unwrap_err().to_string();
        assert!(e.contains("y.json"), "{e}");
        let e = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    }

    #[test]
    fn text_after_handles_rewrites() {
        assert_eq!(text_after("ab", "abc"), "c");
        assert_eq!(text_after("aé", "aéx"), "x");
        assert_eq!(text_after("ax", "ayz"), "yz");
    }
}
