//! The compile pipeline: recipe → fetch → import → passes (verified after each)
//! → backend support check → atomic build directory with its manifest.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{KilnError, KilnResult};
use crate::models;
use crate::recipe::{DEVICES, LoadedRecipe};

#[derive(Debug, Clone, Serialize)]
pub struct CompileResult {
    pub device: String,
    pub backend: String,
    pub out_dir: PathBuf,
    pub manifest: Value,
}

/// Resolves the recipe's model to a local path (fetching registry models) and
/// describes it for the manifest.
fn source_of(r: &LoadedRecipe, log: &mut dyn FnMut(&str)) -> KilnResult<(PathBuf, Value)> {
    let reg = models::registry()?;
    if let Some(e) = reg.models.get(&r.recipe.model) {
        let path = models::fetch(&r.recipe.model, log)?;
        let pkgs: Vec<Value> =
            e.packages.iter().map(|p| json!({"name": p.name, "version": p.version, "sha256": p.sha256})).collect();
        return Ok((path, json!({"model": r.recipe.model, "file": e.file, "sha256": e.sha256, "packages": pkgs})));
    }
    let base = r.path.parent().unwrap_or(Path::new("."));
    let mut path = base.join(&r.recipe.model);
    // A model kiln's tools made in the model cache (`cargo xtask fetch-models` converts
    // glassllm's npz to the Hugging Face directory `glassllm-en-hf`).
    let cached = models::cache_dir().join("models").join(&r.recipe.model);
    if !path.exists() && !r.recipe.model.contains(['/', '\\']) && cached.is_dir() {
        path = cached;
    }
    if !path.exists() {
        let known = reg.models.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(KilnError::bad(
            &r.path,
            format!(
                "model `{}` is neither a registry id (known: {known}), a model `cargo xtask fetch-models` made in the model cache, nor an existing path ({})",
                r.recipe.model,
                path.display()
            ),
        ));
    }
    let file_name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let sha = if path.is_file() { models::sha256_file(&path)? } else { String::new() };
    Ok((path, json!({"model": r.recipe.model, "file": file_name, "sha256": sha})))
}

/// The compiler's weights, lent to a backend's `emit`.
struct BorrowedWeights<'a>(&'a kiln_frontend::Weights);

impl kiln_backends::WeightSource for BorrowedWeights<'_> {
    fn bytes(&self, p: kiln_ir::ParamId) -> &[u8] {
        self.0.bytes(p)
    }
}

/// Compiles one device of a recipe into `out_root/<recipe>/<device>/`.
pub fn compile_device(
    r: &LoadedRecipe,
    device: &str,
    out_root: &Path,
    log: &mut dyn FnMut(&str),
) -> KilnResult<CompileResult> {
    let spec = r.device(device)?;
    // Fail before any work when one of the device's backends is not in this kiln.
    let backend_names = spec.backend.names();
    let backends = backend_names
        .iter()
        .map(|name| {
            kiln_runtime::backends::backend_by_name(name)
                .map_err(|e| KilnError::Unsupported(format!("{}: device `{device}`: {e}", r.path.display())))
        })
        .collect::<KilnResult<Vec<_>>>()?;
    let passes: Vec<(String, Value)> =
        spec.passes.iter().map(|p| p.resolve().map_err(|m| KilnError::bad(&r.path, m))).collect::<KilnResult<_>>()?;
    let (src_path, source) = source_of(r, log)?;
    log(&format!("importing {}", src_path.display()));
    let imported = kiln_frontend::import(&src_path)?;
    let mut module = imported.module;
    let mut weights = imported.weights;
    kiln_ir::check(&module)?;
    let source_model = || {
        kiln_runtime::Model::from_parts(
            &src_path,
            module.clone(),
            weights.clone(),
            imported.tokenizer_json.as_bytes(),
            imported.chat_template.as_deref(),
        )
    };
    // Calibration, when the recipe has it and a pass can use it.
    let (importance, calibration) = match &r.recipe.calibration {
        Some(spec) if passes.iter().any(|(n, _)| n == "quantize") => {
            let (text_path, text) = r.read_text(spec)?;
            log(&format!("calibrating on {}", text_path.display()));
            let model = source_model()?;
            let (im, summary) = kiln_runtime::calibrate::calibrate_cached(
                &model,
                &text,
                spec.ctx,
                spec.chunks,
                0,
                &models::cache_dir(),
                &mut |_, _| {},
            )?;
            let imp = kiln_passes::Importance(
                im.entries.keys().filter_map(|k| im.importance(k).map(|v| (k.clone(), v))).collect(),
            );
            (
                Some(imp),
                json!({"text": spec.text, "ctx": spec.ctx, "chunks": summary.chunks, "tokens": summary.tokens, "text_sha256": summary.text_sha256, "imatrix": summary.path.file_name().map(|f| f.to_string_lossy().into_owned())}),
            )
        }
        _ => (None, Value::Null),
    };
    let reference = if r.recipe.quality.is_some() { Some(source_model()?) } else { None };
    let base_dir = r.path.parent().unwrap_or(Path::new("."));
    // Passes that choose by measured quality get the perplexity of a candidate on
    // the calibration text, computed on the CPU backend.
    let calib_text = match &r.recipe.calibration {
        Some(spec) => Some((spec, r.read_text(spec)?.1)),
        None => None,
    };
    // A candidate module as a model (the source's tokenizer), for the oracles below.
    let candidate = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| {
        kiln_runtime::Model::from_parts(
            &src_path,
            m.clone(),
            w.clone(),
            imported.tokenizer_json.as_bytes(),
            imported.chat_template.as_deref(),
        )
        .map_err(|e| e.to_string())
    };
    // Results of expensive work builds of one model share (quantized tensors, measured
    // perplexities), kept between runs (see `memo`).
    let memo = crate::memo::DiskMemo::from_env();
    let measure = |m: &kiln_ir::Module, w: &kiln_frontend::Weights| -> Result<f64, String> {
        use kiln_passes::Memo;
        let Some((spec, text)) = &calib_text else { return Err("no calibration text".into()) };
        // The perplexity depends on the module, every weight byte, the text and its chunking.
        let key: Option<[u8; 32]> = memo.as_ref().map(|_| {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(b"kiln.measure.v1 cpu\0");
            h.update(kiln_ir::printer::print(m).as_bytes());
            for t in &w.tensors {
                let b = t.as_bytes();
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            h.update((spec.ctx as u64).to_le_bytes());
            h.update((spec.chunks as u64).to_le_bytes());
            h.update(text.as_bytes());
            h.finalize().into()
        });
        if let (Some(memo), Some(key)) = (&memo, &key)
            && let Some(v) = memo.get(key).and_then(|v| <[u8; 8]>::try_from(v).ok())
        {
            return Ok(f64::from_le_bytes(v));
        }
        let mut model = candidate(m, w)?;
        model.backend = "cpu".into();
        let ppl = kiln_runtime::ppl::perplexity(&model, text, spec.ctx, spec.chunks, 0, &mut |_, _, _| {})
            .map_err(|e| e.to_string())?;
        if let (Some(memo), Some(key)) = (&memo, &key) {
            memo.put(key, &ppl.ppl.to_le_bytes());
        }
        Ok(ppl.ppl)
    };
    // Passes that choose by what the model computes get chosen values on the same text.
    let capture = |m: &kiln_ir::Module,
                   w: &kiln_frontend::Weights,
                   values: &[kiln_ir::ValueId],
                   visit: &mut dyn FnMut(usize, &[&[f32]])|
     -> Result<(), String> {
        let Some((spec, text)) = &calib_text else { return Err("no calibration text".into()) };
        kiln_runtime::calibrate::capture_values(&candidate(m, w)?, text, spec.ctx, spec.chunks, 0, values, visit)
            .map_err(|e| e.to_string())
    };
    let oracles = match &calib_text {
        Some(_) => kiln_passes::Calibration {
            importance: importance.as_ref(),
            measure: Some(&measure),
            capture: Some(&capture),
        },
        None => kiln_passes::Calibration { importance: importance.as_ref(), ..Default::default() },
    };
    let memo_ref = memo.as_ref().map(|m| m as &dyn kiln_passes::Memo);
    let reports = kiln_passes::run_pipeline(
        &mut module,
        &mut weights,
        &passes,
        &kiln_passes::PipelineCtx { device, base_dir, calibration: oracles, memo: memo_ref },
        &mut |rep| log(&format!("pass {}: {}", rep.pass, rep.summary)),
    )?;
    // Quality against the source, when the model's outputs changed and the recipe gives a
    // text: the weights (quantize), the KV cache (kv_quant, kv_share) or what attention sees
    // (sliding_window). A fixed-point build changes every weight and activation, whatever the
    // passes did. Steering changes the outputs on purpose and is not scored against the source.
    let fixed = backend_names[0] == "fixed";
    let changed = fixed
        || reports
            .iter()
            .any(|rep| matches!(rep.pass.as_str(), "quantize" | "kv_quant" | "kv_share" | "sliding_window"));
    let quality = match (&r.recipe.quality, reference) {
        (Some(spec), Some(src_model)) if changed => {
            let (text_path, text) = r.read_text(spec)?;
            log(&format!("measuring quality on {}", text_path.display()));
            let mut built = kiln_runtime::Model::from_parts(
                &src_path,
                module.clone(),
                weights.clone(),
                imported.tokenizer_json.as_bytes(),
                imported.chat_template.as_deref(),
            )?;
            if fixed {
                built.backend = "fixed".into();
            }
            let q =
                kiln_runtime::quality::compare(&src_model, &built, &text, spec.ctx, spec.chunks, 0, &mut |_, _| {})?;
            log(&format!(
                "quality: ppl {:.4} vs source {:.4} ({:+.2}%), mean KL {:.5}, top-1 agreement {:.2}%",
                q.ppl,
                q.ppl_source,
                q.ppl_ratio_minus_1 * 100.0,
                q.kl_mean,
                q.top1_agreement * 100.0
            ));
            json!(q)
        }
        (None, _) if changed => json!({"skipped": "the recipe has no `quality` text"}),
        _ => Value::Null,
    };
    let verified = kiln_ir::verify(module)?;
    // Every listed backend must run the module; the build carries all their files.
    let mut backend_files: Vec<kiln_backends::BuildFile> = Vec::new();
    for backend in &backends {
        let name = backend.name();
        if let Some(what) = kiln_backends::first_unsupported(backend.as_ref(), &verified) {
            return Err(KilnError::Unsupported(format!(
                "{}: device `{device}`: backend `{name}` does not support {what}",
                r.path.display()
            )));
        }
        let files = backend.emit(&verified, &BorrowedWeights(&weights)).map_err(|e| {
            KilnError::Unsupported(format!("{}: device `{device}`: backend `{name}`: {e}", r.path.display()))
        })?;
        for f in files {
            if backend_files.iter().any(|g| g.name == f.name) {
                return Err(KilnError::Unsupported(format!(
                    "{}: device `{device}`: two backends both write `{}`",
                    r.path.display(),
                    f.name
                )));
            }
            backend_files.push(f);
        }
    }
    // The fixed-point backend's memory plan goes into the manifest.
    let memory = match backend_files.iter().find(|f| f.name == "fixed.json") {
        Some(f) => serde_json::from_slice(&f.bytes)
            .map_err(|e| kiln_backends::BackendError::Internal { backend: "fixed", msg: format!("fixed.json: {e}") })?,
        None => Value::Null,
    };
    let out_dir = out_root.join(&r.recipe.name).join(device);
    log(&format!("writing {}", out_dir.display()));
    let recipe_name = r.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let extra = json!({
        "recipe": {"name": r.recipe.name, "file": recipe_name, "sha256": kiln_runtime::artifact::sha256_hex(r.text.as_bytes())},
        "device": device,
        "backend": backend_names[0],
        "backends": backend_names,
        "source": source,
        "passes": reports,
        "calibration": calibration,
        "quality": quality,
        "memory": memory,
    });
    let inputs = kiln_runtime::artifact::BuildInputs {
        tokenizer_json: &imported.tokenizer_json,
        chat_template: imported.chat_template.as_deref(),
        manifest_extra: extra,
        backend_files: &backend_files,
    };
    let manifest = kiln_runtime::artifact::write_build(&out_dir, &verified, &|p| weights.bytes(p).to_vec(), &inputs)?;
    Ok(CompileResult { device: device.to_string(), backend: backend_names.join(", "), out_dir, manifest })
}

/// Devices `--device` names: one, or `all` (every device the recipe lists, in watch/phone/laptop order).
pub fn devices_for(r: &LoadedRecipe, device: &str) -> KilnResult<Vec<String>> {
    if device == "all" {
        Ok(DEVICES.iter().filter(|d| r.recipe.devices.contains_key(**d)).map(|d| d.to_string()).collect())
    } else {
        r.device(device)?;
        Ok(vec![device.to_string()])
    }
}
