//! Calibration: the importance matrix of a model on a text. The reference
//! interpreter runs the text in chunks (as `llama-imatrix` does) and records,
//! for every matmul weight, `Σ x²` per input channel over all tokens and the
//! number of tokens; quantization passes weight each column's rounding error by
//! `Σ x² / rows`, its mean squared activation.
//!
//! Stored as safetensors (`<weight>.in_sum2` f32 `[k]`, `<weight>.counts` f32
//! `[1]`, llama.cpp's imatrix names) with the model and text hashes, chunking
//! and kiln version as metadata, and cached under
//! `<cache>/imatrix/<key>.safetensors`, `key = sha256(model, text, ctx, chunks)`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_backends::reference::{ChannelStats, ReferenceBackend};
use kiln_backends::{Logits, Numerics, SessionOptions};
use kiln_frontend::safetensors::{SafetensorsFile, WriteTensor};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{RuntimeError, RuntimeResult};
use crate::model::Model;

/// Format tag in the file's metadata; bump when the layout changes.
const FORMAT: &str = "kiln-imatrix-1";

/// The importance matrix of one model on one text.
#[derive(Clone, Debug, PartialEq)]
pub struct Imatrix {
    /// sha256 of the model's IR text and weight bytes ([`model_hash`]).
    pub model_sha256: String,
    /// sha256 of the calibration text.
    pub text_sha256: String,
    pub ctx: usize,
    pub chunks: usize,
    /// Per weight name: per input channel `Σ x²` and the rows seen.
    pub entries: BTreeMap<String, ChannelStats>,
}

/// What `kiln calibrate` reports.
#[derive(Clone, Debug, Serialize)]
pub struct CalibrationSummary {
    pub path: PathBuf,
    pub cached: bool,
    pub model_sha256: String,
    pub text_sha256: String,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens: u64,
    pub weights: usize,
    pub seconds: f64,
}

impl Imatrix {
    /// Mean squared activation per input channel of weight `name`.
    pub fn importance(&self, name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(name)?;
        let n = e.rows.max(1) as f64;
        Some(e.sum_sq.iter().map(|s| (s / n) as f32).collect())
    }

    /// Tokens seen by the weights that see every token (the most rows of any entry).
    pub fn tokens(&self) -> u64 {
        self.entries.values().map(|e| e.rows).max().unwrap_or(0)
    }

    /// The file image (deterministic: same statistics, same bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut data: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
        for (name, e) in &self.entries {
            let sums: Vec<u8> = e.sum_sq.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
            data.push((format!("{name}.in_sum2"), vec![e.sum_sq.len() as u64], sums));
            data.push((format!("{name}.counts"), vec![1], (e.rows as f32).to_le_bytes().to_vec()));
        }
        let tensors: Vec<WriteTensor<'_>> =
            data.iter().map(|(n, s, d)| WriteTensor { name: n, dtype: "F32", shape: s, data: d }).collect();
        let meta = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("model_sha256".to_string(), self.model_sha256.clone()),
            ("text_sha256".to_string(), self.text_sha256.clone()),
            ("ctx".to_string(), self.ctx.to_string()),
            ("chunks".to_string(), self.chunks.to_string()),
        ]);
        kiln_frontend::safetensors::write(&tensors, &meta)
    }

    /// Reads a file written by [`Imatrix::to_bytes`].
    pub fn open(path: &Path) -> RuntimeResult<Imatrix> {
        let bad = |msg: String| RuntimeError::bad(path, msg);
        let f = SafetensorsFile::open(path)?;
        let meta = f.metadata();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a kiln importance matrix (format is not {FORMAT})")));
        }
        let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata has no `{k}`")));
        let num = |k: &str| -> RuntimeResult<usize> {
            field(k)?.parse().map_err(|_| bad(format!("metadata `{k}` is not a number")))
        };
        let f32s = |name: &str| -> RuntimeResult<Vec<f32>> {
            let b = f.raw_bytes(name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let mut entries = BTreeMap::new();
        for name in f.names() {
            let Some(weight) = name.strip_suffix(".in_sum2") else { continue };
            let counts = f32s(&format!("{weight}.counts"))?;
            let rows = match counts.as_slice() {
                [c] if c.is_finite() && *c >= 0.0 => *c as u64,
                _ => return Err(bad(format!("`{weight}.counts` is not one non-negative count"))),
            };
            let sum_sq = f32s(name)?.into_iter().map(f64::from).collect();
            entries.insert(weight.to_string(), ChannelStats { sum_sq, rows });
        }
        Ok(Imatrix {
            model_sha256: field("model_sha256")?,
            text_sha256: field("text_sha256")?,
            ctx: num("ctx")?,
            chunks: num("chunks")?,
            entries,
        })
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 over the model's IR text and every parameter's bytes: the identity
/// of what calibration runs, whatever file format it came from.
pub fn model_hash(model: &Model) -> String {
    let mut h = Sha256::new();
    h.update(kiln_ir::print(&model.module).as_bytes());
    for (i, _) in model.module.params.iter().enumerate() {
        h.update(model.weights.bytes(kiln_ir::ParamId(i as u32)));
    }
    hex(h.finalize())
}

/// The cache key of a calibration run.
pub fn cache_key(model_sha256: &str, text_sha256: &str, ctx: usize, chunks: usize) -> String {
    let mut h = Sha256::new();
    h.update(format!("{FORMAT}\n{model_sha256}\n{text_sha256}\n{ctx}\n{chunks}\n").as_bytes());
    hex(h.finalize())[..32].to_string()
}

/// Runs `text` through `model` in chunks of `ctx` tokens (at most `max_chunks`,
/// 0 = all; the first token of a chunk becomes BOS when the model adds one, as
/// in `llama-imatrix`) and collects the importance matrix.
pub fn calibrate(
    model: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    on_chunk: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<Imatrix> {
    calibrate_with(model, text, ctx, max_chunks, threads, Numerics::Exact, on_chunk)
}

/// [`calibrate`] with a choice of numerics (`Ggml` to compare with `llama-imatrix`).
pub fn calibrate_with(
    model: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    numerics: Numerics,
    on_chunk: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<Imatrix> {
    let text_chunks = crate::ppl::Chunks::of(model, text, ctx, max_chunks, "the calibration text")?;
    let chunks = text_chunks.count;
    let opts = SessionOptions { max_context: ctx, threads, numerics, ..Default::default() };
    let mut session = ReferenceBackend::new().prepare_session(model.module.clone(), model.weights.clone(), &opts)?;
    session.record_channel_stats();
    for c in 0..chunks {
        let batch = text_chunks.batch(model, c);
        kiln_backends::Session::truncate(&mut session, 0);
        kiln_backends::Session::forward(&mut session, &batch, Logits::All)?;
        on_chunk(c + 1, chunks);
    }
    let stats: HashMap<kiln_ir::ParamId, ChannelStats> = session.take_channel_stats();
    let entries = stats.into_iter().map(|(p, s)| (model.module.param(p).name.clone(), s)).collect();
    Ok(Imatrix {
        model_sha256: model_hash(model),
        text_sha256: hex(Sha256::digest(text.as_bytes())),
        ctx,
        chunks,
        entries,
    })
}

/// Runs `text` through `model` on the reference runtime in llama-perplexity's
/// chunks of `ctx` tokens (at most `max_chunks`, 0 = all) and calls
/// `visit(rows, per_value)` once per chunk, `per_value[i]` being the chunk's
/// `rows × width` row-major copy of `values[i]` (for passes that choose by what the
/// model computes, e.g. how alike two layers' K/V are).
pub fn capture_values(
    model: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    values: &[kiln_ir::ValueId],
    visit: &mut dyn FnMut(usize, &[&[f32]]),
) -> RuntimeResult<()> {
    let text_chunks = crate::ppl::Chunks::of(model, text, ctx, max_chunks, "the calibration text")?;
    let opts = SessionOptions { max_context: ctx, threads, numerics: Numerics::Exact, ..Default::default() };
    let mut session = ReferenceBackend::new().prepare_session(model.module.clone(), model.weights.clone(), &opts)?;
    session.capture(values);
    for c in 0..text_chunks.count {
        let batch = text_chunks.batch(model, c);
        kiln_backends::Session::truncate(&mut session, 0);
        kiln_backends::Session::forward(&mut session, &batch, Logits::All)?;
        let got = session.take_captured();
        let per: Vec<&[f32]> = values
            .iter()
            .map(|v| {
                got.get(v).map(|c| c.data.as_slice()).ok_or_else(|| {
                    RuntimeError::Invalid(format!("value {v} was not computed, so it cannot be captured"))
                })
            })
            .collect::<RuntimeResult<_>>()?;
        visit(batch.len(), &per);
    }
    Ok(())
}

/// [`calibrate`] through the cache in `cache_dir`: an existing file for the
/// same model, text, ctx and chunk count is read instead of recomputed. The
/// file is written atomically (temporary file, then rename).
pub fn calibrate_cached(
    model: &Model,
    text: &str,
    ctx: usize,
    max_chunks: usize,
    threads: usize,
    cache_dir: &Path,
    on_chunk: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<(Imatrix, CalibrationSummary)> {
    let t0 = std::time::Instant::now();
    let model_sha = model_hash(model);
    let text_sha = hex(Sha256::digest(text.as_bytes()));
    let path =
        cache_dir.join("imatrix").join(format!("{}.safetensors", cache_key(&model_sha, &text_sha, ctx, max_chunks)));
    let (im, cached) = match Imatrix::open(&path) {
        Ok(im) if im.model_sha256 == model_sha && im.text_sha256 == text_sha && im.ctx == ctx => (im, true),
        _ => {
            let im = calibrate(model, text, ctx, max_chunks, threads, on_chunk)?;
            let dir = path.parent().unwrap_or(cache_dir);
            std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, im.to_bytes()).map_err(|e| RuntimeError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| RuntimeError::io(&path, e))?;
            (im, false)
        }
    };
    let summary = CalibrationSummary {
        path,
        cached,
        model_sha256: model_sha,
        text_sha256: text_sha,
        ctx,
        chunks: im.chunks,
        tokens: im.tokens(),
        weights: im.entries.len(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((im, summary))
}
