//! A runnable model: verified module + weights + tokenizer + chat template, loaded
//! from a GGUF file, a Hugging Face directory or a kiln build.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backends::{BuildFile, Session, SessionOptions, WeightSource};
use kiln_ir::{ParamId, VerifiedModule};
use serde_json::Value;

use crate::artifact;
use crate::chat::ChatTemplate;
use crate::error::{RuntimeError, RuntimeResult};
use crate::tokenizer::Tokenizer;

/// Weights of a checkpoint imported directly (no build).
pub struct ImportedWeights(pub kiln_frontend::Weights);

impl WeightSource for ImportedWeights {
    fn bytes(&self, p: ParamId) -> &[u8] {
        self.0.bytes(p)
    }
}

pub struct Model {
    pub path: PathBuf,
    pub module: Arc<VerifiedModule>,
    pub weights: Arc<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    /// Backend named by the build's manifest ("reference" for checkpoints).
    pub backend: String,
    /// The build manifest, when loaded from a build.
    pub manifest: Option<Value>,
    /// The backend's generated files of the build (kernel sources).
    pub backend_files: Vec<BuildFile>,
    /// Run-time strengths of the build's steering ops, by name (`kiln run --steer`).
    pub steer: std::collections::BTreeMap<String, f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.path).field("backend", &self.backend).finish()
    }
}

fn chat_template_of(tok: &Tokenizer, source: Option<&str>, origin: String) -> RuntimeResult<Option<ChatTemplate>> {
    let Some(src) = source else { return Ok(None) };
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let bos = name(tok.bos_id());
    let eos = name(tok.config().eos_id);
    Ok(Some(ChatTemplate::new(src, origin, bos, eos)?))
}

impl Model {
    /// Loads MODEL: a kiln build directory, a Hugging Face directory or a GGUF file.
    pub fn load(path: &Path) -> RuntimeResult<Model> {
        if artifact::is_build(path) {
            let b = artifact::open_build(path)?;
            let origin = b.dir.join(artifact::TOKENIZER_FILE).display().to_string();
            let tokenizer = Tokenizer::from_bytes(&b.tokenizer_json, &origin)?;
            let chat = chat_template_of(
                &tokenizer,
                b.chat_template.as_deref(),
                b.dir.join(artifact::CHAT_TEMPLATE_FILE).display().to_string(),
            )?;
            // The first of the build's backends that can run on this machine.
            let listed: Vec<&str> = match b.manifest.get("backends").and_then(Value::as_array) {
                Some(v) => v.iter().filter_map(Value::as_str).collect(),
                None => b.manifest.get("backend").and_then(Value::as_str).into_iter().collect(),
            };
            let backend = listed
                .iter()
                .find(|n| crate::backends::available_here(n))
                .or(listed.last())
                .copied()
                .unwrap_or("reference")
                .to_string();
            return Ok(Model {
                path: path.to_path_buf(),
                module: b.module,
                weights: b.weights,
                tokenizer,
                chat,
                backend,
                manifest: Some(b.manifest),
                backend_files: b.backend_files,
                steer: Default::default(),
            });
        }
        let mut imported = kiln_frontend::import(path)?;
        // A checkpoint run as it is gets the lowering every build gets: DeepSeek-V4's
        // unfused attention becomes the fused op the backends run fast (the importer's
        // unfused form is what `kiln_frontend::import` returns).
        if !kiln_ir::analysis::sparse_groups(&imported.module).is_empty() {
            kiln_passes::run_pipeline(
                &mut imported.module,
                &mut imported.weights,
                &[("fuse_sparse_attention".into(), Value::Null)],
                &kiln_passes::PipelineCtx { device: "", base_dir: path, calibration: Default::default(), memo: None },
                &mut |_| {},
            )
            .map_err(|e| RuntimeError::bad(path, e.to_string()))?;
        }
        let module = kiln_ir::verify(imported.module)
            .map_err(|e| RuntimeError::bad(path, format!("imported module failed verification: {e}")))?;
        let tokenizer = Tokenizer::from_bytes(imported.tokenizer_json.as_bytes(), &path.display().to_string())?;
        let chat = chat_template_of(
            &tokenizer,
            imported.chat_template.as_deref(),
            format!("{}: chat template", path.display()),
        )?;
        Ok(Model {
            path: path.to_path_buf(),
            module: Arc::new(module),
            weights: Arc::new(ImportedWeights(imported.weights)),
            tokenizer,
            chat,
            backend: "reference".into(),
            manifest: None,
            backend_files: Vec::new(),
            steer: Default::default(),
        })
    }

    /// A model from an imported or transformed module and its weights (as the
    /// compiler holds them between passes), named `path` in messages.
    pub fn from_parts(
        path: &Path,
        module: kiln_ir::Module,
        weights: kiln_frontend::Weights,
        tokenizer_json: &[u8],
        chat_template: Option<&str>,
    ) -> RuntimeResult<Model> {
        let module =
            kiln_ir::verify(module).map_err(|e| RuntimeError::bad(path, format!("module failed verification: {e}")))?;
        let tokenizer = Tokenizer::from_bytes(tokenizer_json, &path.display().to_string())?;
        let chat = chat_template_of(&tokenizer, chat_template, format!("{}: chat template", path.display()))?;
        Ok(Model {
            path: path.to_path_buf(),
            module: Arc::new(module),
            weights: Arc::new(ImportedWeights(weights)),
            tokenizer,
            chat,
            backend: "reference".into(),
            manifest: None,
            backend_files: Vec::new(),
            steer: Default::default(),
        })
    }

    /// The model's trained context length (from the IR metadata).
    pub fn context_length(&self) -> usize {
        self.module.meta_int("context_length").and_then(|n| usize::try_from(n).ok()).unwrap_or(2048)
    }

    pub fn vocab_size(&self) -> usize {
        self.module.meta_int("vocab_size").and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
    }

    /// Starts a session on the model's backend with room for `max_context` positions
    /// (capped at the model's context length).
    pub fn session(&self, max_context: usize, threads: usize) -> RuntimeResult<Box<dyn Session>> {
        self.session_with(max_context, threads, kiln_backends::Numerics::Exact)
    }

    /// Like [`Model::session`], with a choice of numerics (llama.cpp-compatible rounding for comparisons).
    pub fn session_with(
        &self,
        max_context: usize,
        threads: usize,
        numerics: kiln_backends::Numerics,
    ) -> RuntimeResult<Box<dyn Session>> {
        let backend = crate::backends::backend_by_name(&self.backend)?;
        if let Some(what) = kiln_backends::first_unsupported(backend.as_ref(), &self.module) {
            return Err(RuntimeError::Invalid(format!("backend `{}` cannot run {what}", self.backend)));
        }
        let opts = SessionOptions {
            max_context: max_context.min(self.context_length()),
            threads,
            numerics,
            files: self.backend_files.clone(),
            steer: self.steer.clone(),
        };
        Ok(backend.prepare(self.module.clone(), self.weights.clone(), &opts)?)
    }
}
