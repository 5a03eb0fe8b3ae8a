//! The importer entry point: detects the checkpoint kind and lowers it.

use std::path::{Path, PathBuf};

use kiln_ir::Module;

use crate::error::{FrontendError, FrontendResult};
use crate::weights::Weights;

/// A checkpoint lowered to kiln IR, with everything a build needs.
#[derive(Debug)]
pub struct ImportedModel {
    pub module: Module,
    pub weights: Weights,
    /// A Hugging Face tokenizer.json document.
    pub tokenizer_json: String,
    /// The chat template (Jinja), if the checkpoint has one.
    pub chat_template: Option<String>,
    /// Where it came from.
    pub source: PathBuf,
}

/// Imports a GGUF file or a Hugging Face directory (config.json + safetensors + tokenizer.json).
pub fn import(path: &Path) -> FrontendResult<ImportedModel> {
    let meta = std::fs::metadata(path).map_err(|source| FrontendError::Io { file: path.to_path_buf(), source })?;
    if meta.is_dir() {
        crate::hf::import_dir(path)
    } else {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "bin" | "pt" | "pth" | "pkl" | "ckpt" => Err(FrontendError::unsupported(
                path,
                "PyTorch pickle checkpoints can run code when loaded and are refused; convert them to safetensors",
            )),
            "safetensors" => Err(FrontendError::bad(
                path,
                "a lone .safetensors file has no config; pass the Hugging Face directory that holds config.json",
            )),
            _ => crate::gguf_import::import_gguf(path),
        }
    }
}
