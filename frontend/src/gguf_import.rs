//! GGUF → kiln IR: reads hyperparameters and the vocabulary from GGUF metadata,
//! serves tensors zero-copy from the memory map, and lowers through the arch registry.

use std::path::Path;
use std::sync::Arc;

use kiln_ir::{Dim, TensorType};

use crate::arch::{self, GgufMeta};
use crate::decoder::{self, TensorSource};
use crate::error::{FrontendError, FrontendResult};
use crate::gguf::{GgufError, GgufFile};
use crate::import::ImportedModel;
use crate::tokenizer::{GgufVocab, gguf_vocab_to_tokenizer_json};
use crate::weights::{ByteOwner, SourceTensor, TensorBytes};

impl ByteOwner for GgufFile {
    fn all_bytes(&self) -> &[u8] {
        self.bytes()
    }
}

fn from_gguf_err(e: GgufError) -> FrontendError {
    FrontendError::Gguf(e)
}

struct Meta<'a>(&'a GgufFile);

impl Meta<'_> {
    fn opt<T>(&self, r: Result<T, GgufError>) -> FrontendResult<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(e) => Err(from_gguf_err(e)),
        }
    }
}

impl GgufMeta for Meta<'_> {
    fn file(&self) -> &Path {
        self.0.path()
    }
    fn u64(&self, key: &str) -> FrontendResult<Option<u64>> {
        self.opt(self.0.get_u64(key))
    }
    fn f32(&self, key: &str) -> FrontendResult<Option<f32>> {
        self.opt(self.0.get_f32(key))
    }
    fn str(&self, key: &str) -> FrontendResult<Option<String>> {
        self.opt(self.0.get_str(key).map(str::to_string))
    }
}

struct Source {
    file: Arc<GgufFile>,
}

impl TensorSource for Source {
    fn file(&self) -> &Path {
        self.file.path()
    }
    fn get(&self, name: &str) -> FrontendResult<Option<SourceTensor>> {
        let Some(info) = self.file.tensor(name) else { return Ok(None) };
        // GGUF lists dims innermost first; kiln shapes are outermost first.
        let shape = info.dims.iter().rev().map(|&d| Dim::Fixed(d)).collect();
        let ty = TensorType::new(info.dtype, shape);
        let (offset, len) = match (usize::try_from(info.offset), usize::try_from(info.nbytes)) {
            (Ok(o), Ok(n)) => (o, n),
            _ => return Err(FrontendError::bad(self.file.path(), format!("tensor {name}: offset out of range"))),
        };
        Ok(Some(SourceTensor { ty, bytes: TensorBytes::Mapped { owner: self.file.clone(), offset, len } }))
    }
}

fn vocab_of(g: &GgufFile) -> FrontendResult<GgufVocab> {
    let m = Meta(g);
    let opt_u32 = |k: &str| -> FrontendResult<Option<u32>> { Ok(m.u64(k)?.and_then(|v| u32::try_from(v).ok())) };
    let opt_bool = |k: &str| m.opt(g.get_bool(k));
    Ok(GgufVocab {
        origin: g.path().display().to_string(),
        model: g.get_str("tokenizer.ggml.model").map_err(from_gguf_err)?.to_string(),
        pre: m.str("tokenizer.ggml.pre")?,
        tokens: g.get_str_array("tokenizer.ggml.tokens").map_err(from_gguf_err)?.to_vec(),
        scores: m.opt(g.get_f32_array("tokenizer.ggml.scores"))?,
        token_types: m.opt(g.get_i32_array("tokenizer.ggml.token_type"))?,
        merges: m.opt(g.get_str_array("tokenizer.ggml.merges").map(<[String]>::to_vec))?,
        bos: opt_u32("tokenizer.ggml.bos_token_id")?,
        eos: opt_u32("tokenizer.ggml.eos_token_id")?,
        eot: opt_u32("tokenizer.ggml.eot_token_id")?,
        eom: opt_u32("tokenizer.ggml.eom_token_id")?,
        unk: opt_u32("tokenizer.ggml.unknown_token_id")?,
        pad: opt_u32("tokenizer.ggml.padding_token_id")?,
        add_bos: opt_bool("tokenizer.ggml.add_bos_token")?,
        add_eos: opt_bool("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
    })
}

/// Imports a GGUF file.
pub fn import_gguf(path: &Path) -> FrontendResult<ImportedModel> {
    let file = Arc::new(GgufFile::open(path).map_err(from_gguf_err)?);
    let arch_name = file.get_str("general.architecture").map_err(from_gguf_err)?.to_string();
    let arch = arch::by_gguf_name(&arch_name).ok_or_else(|| {
        FrontendError::unsupported(path, format!("architecture `{arch_name}` (kiln supports: {})", arch::known_names()))
    })?;
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(FrontendError::unsupported(path, "per-dimension RoPE frequency tables (rope_freqs.weight)"));
    }
    let vocab_rows = match file.tensor("token_embd.weight").map(|t| t.dims.as_slice()) {
        Some([_, rows]) => *rows,
        _ => return Err(FrontendError::bad(path, "missing or malformed tensor token_embd.weight")),
    };
    let cfg = (arch.from_gguf)(&Meta(&file), vocab_rows)?;
    let name = Meta(&file)
        .str("general.name")?
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let (module, weights) = decoder::lower(&cfg, &Source { file: file.clone() }, &name)?;
    let vocab = vocab_of(&file)?;
    if vocab.tokens.len() as u64 != vocab_rows {
        // llama.cpp allows padded embedding tables; only more tokens than rows is fatal.
        if vocab.tokens.len() as u64 > vocab_rows {
            return Err(FrontendError::bad(
                path,
                format!("the vocabulary has {} tokens but token_embd.weight has {vocab_rows} rows", vocab.tokens.len()),
            ));
        }
    }
    let tokenizer_json = gguf_vocab_to_tokenizer_json(&vocab)
        .map_err(|e| FrontendError::bad(path, format!("tokenizer: {e}")))?
        .to_string();
    let chat_template = Meta(&file).str("tokenizer.chat_template")?;
    Ok(ImportedModel { module, weights, tokenizer_json, chat_template, source: path.to_path_buf() })
}
