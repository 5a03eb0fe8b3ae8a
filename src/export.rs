//! `kiln export`: writes a model (GGUF file, kiln build or registry id) as a GGUF file llama.cpp loads:
//! the source GGUF's metadata, the IR's tensors, optionally converted to other ggml types per tensor.
//!
//! The tensors come from the IR's parameters (a build's may differ from its source's after
//! passes), under their GGUF names and in the source file's order; kiln keeps GGUF's stored
//! layout (llama's permuted Q/K included), so no tensor needs mapping back. The metadata
//! (hyperparameters, tokenizer, chat template) is the source GGUF's, which is why a Hugging
//! Face source is refused: kiln does not write that metadata itself.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_backends::quant::{self, QuantError};
use kiln_frontend::FrontendError;
use kiln_frontend::gguf::{GgufFile, MetaValue, TensorInfo};
use kiln_frontend::gguf_write::{GgufWriter, TensorSpec};
use kiln_ir::{DType, Op, ParamId};
use kiln_runtime::Model;
use serde::Serialize;
use serde_json::Value;

use crate::error::{KilnError, KilnResult};
use crate::models;

/// Metadata key naming the kiln version that wrote the file.
pub const EXPORTED_BY_KEY: &str = "kiln.exported_by";

/// `PATTERN=TYPE`: tensors whose name contains PATTERN (or matches it as a glob
/// with `*` and `?`) get TYPE. Later rules win.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub dtype: DType,
}

impl Rule {
    /// Parses `PATTERN=TYPE`.
    pub fn parse(s: &str) -> KilnResult<Rule> {
        let (pattern, ty) = s
            .rsplit_once('=')
            .filter(|(p, _)| !p.is_empty())
            .ok_or_else(|| KilnError::bad("--rule", format!("`{s}` is not PATTERN=TYPE")))?;
        Ok(Rule { pattern: pattern.to_string(), dtype: parse_type(ty, "--rule")? })
    }

    pub fn matches(&self, name: &str) -> bool {
        if self.pattern.contains(['*', '?']) {
            glob(self.pattern.as_bytes(), name.as_bytes())
        } else {
            name.contains(&self.pattern)
        }
    }
}

/// A weight type by name (`q8_0`, `Q4_K`, `f16`, ...). Integer types are refused.
pub fn parse_type(s: &str, what: &str) -> KilnResult<DType> {
    match DType::from_name(&s.trim().to_ascii_lowercase()) {
        Some(d) if d.is_float() || d.is_quantized() => Ok(d),
        _ => {
            let known: Vec<&str> = DType::ALL.iter().filter(|d| **d != DType::I32).map(|d| d.name()).collect();
            Err(KilnError::bad(what, format!("unknown weight type `{s}` (known: {})", known.join(", "))))
        }
    }
}

/// `*` matches any run of characters, `?` one character.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// The GGUF file to write.
    pub out: PathBuf,
    /// `--type`: every matmul weight (embedding table included) converted to this type.
    pub default_type: Option<DType>,
    /// `--rule PATTERN=TYPE`, in order; later rules win over earlier ones and over `--type`.
    pub rules: Vec<Rule>,
    /// Worker threads for conversion (0 = all cores).
    pub threads: usize,
}

/// Tensors, bytes and parameters of one type in the written file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeTotals {
    pub tensors: usize,
    pub bytes: u64,
    pub params: u64,
}

/// A tensor whose rows do not fit the requested type's blocks, written as another type.
#[derive(Clone, Debug, Serialize)]
pub struct Fallback {
    pub tensor: String,
    pub requested: String,
    pub used: String,
    pub row: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    /// The GGUF whose metadata was copied.
    pub metadata_from: PathBuf,
    pub tensors: usize,
    pub per_type: BTreeMap<String, TypeTotals>,
    /// Tensors requantized by `--type` / `--rule`.
    pub converted: usize,
    /// Tensors whose bytes differ from the metadata source's (converted here or by a build's passes).
    pub changed: usize,
    pub fallbacks: Vec<Fallback>,
    /// `general.file_type` written (llama_ftype), or `None` when dropped.
    pub file_type: Option<u32>,
    /// Bytes of all tensor data.
    pub tensor_bytes: u64,
    pub file_bytes: u64,
    /// Elements of all tensors.
    pub params: u64,
    /// `tensor_bytes × 8 ÷ params`, as llama.cpp prints it.
    pub bits_per_weight: f64,
}

/// llama.cpp's `llama_ftype` for a file whose matmul weights are mostly `d`.
pub fn llama_ftype(d: DType) -> Option<u32> {
    Some(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::Q5_0 => 8,
        DType::Q5_1 => 9,
        DType::Q2K => 10,
        DType::Q3K => 11, // Q3_K_S: q3_k throughout
        DType::Q4K => 14, // Q4_K_S
        DType::Q5K => 16, // Q5_K_S
        DType::Q6K => 18,
        DType::BF16 => 32,
        DType::IQ4NL => 25,
        DType::I32 | DType::KQ2 | DType::F8E4M3 => return None,
    })
}

/// llama.cpp's fallback (`tensor_type_fallback`) when a row of `row` elements is not
/// whole blocks of `want`: a 32-block type of similar size, else f16 (q2_k/q3_k fall
/// to q4_0, as in llama.cpp b11434).
pub fn fit_type(want: DType, row: u64) -> DType {
    if row.is_multiple_of(want.block_elems()) {
        return want;
    }
    let next = match want {
        DType::Q2K | DType::Q3K => DType::Q4_0,
        DType::Q4K => DType::Q5_0,
        DType::Q5K => DType::Q5_1,
        DType::Q6K => DType::Q8_0,
        _ => DType::F16,
    };
    if row.is_multiple_of(next.block_elems()) { next } else { DType::F16 }
}

impl Fallback {
    fn new(tensor: &str, requested: DType, used: DType, row: u64) -> Self {
        Fallback { tensor: tensor.to_string(), requested: requested.name().into(), used: used.name().into(), row }
    }
}

/// Where a tensor's bytes come from.
enum Data<'a> {
    /// The metadata source's stored bytes, unchanged.
    Source(&'a TensorInfo),
    /// The IR parameter's bytes, unchanged.
    Ir(ParamId),
    /// The IR parameter requantized.
    Convert { param: ParamId, from: DType, rows: usize, cols: usize },
}

struct Planned<'a> {
    spec: TensorSpec,
    data: Data<'a>,
}

const HF_UNSUPPORTED: &str = "export of a Hugging Face source needs the GGUF metadata (architecture \
     hyperparameters, tokenizer vocabulary and merges, chat template) that kiln only copies from a GGUF source \
     and cannot write yet; export the model's GGUF file instead, or convert the directory with llama.cpp's \
     convert_hf_to_gguf.py first";

fn unsupported_hf(model: &Path) -> KilnError {
    KilnError::Unsupported(format!("{}: unsupported: {HF_UNSUPPORTED}", model.display()))
}

fn is_gguf_file(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"GGUF"
}

/// The GGUF whose metadata describes `model`: itself, or a build's source (the
/// registry model its manifest names, found in the cache).
pub fn metadata_source(model: &Path, log: &mut dyn FnMut(&str)) -> KilnResult<PathBuf> {
    if kiln_runtime::artifact::is_build(model) {
        let mpath = model.join(kiln_runtime::artifact::MANIFEST);
        let text = std::fs::read_to_string(&mpath).map_err(|e| KilnError::io(&mpath, e))?;
        let manifest: Value =
            serde_json::from_str(&text).map_err(|e| KilnError::bad(&mpath, format!("invalid JSON: {e}")))?;
        let src = manifest.get("source").filter(|v| v.is_object()).ok_or_else(|| {
            KilnError::Unsupported(format!(
                "{}: unsupported: the build's manifest names no source model, whose GGUF metadata export needs",
                mpath.display()
            ))
        })?;
        let id = src.get("model").and_then(Value::as_str).unwrap_or_default();
        let want_sha = src.get("sha256").and_then(Value::as_str).unwrap_or_default();
        let reg = models::registry()?;
        let path = if let Some(e) = reg.models.get(id) {
            if !want_sha.is_empty() && e.sha256 != want_sha {
                return Err(KilnError::Unsupported(format!(
                    "{}: unsupported: the build was made from {id} with sha256 {want_sha}, but the registry now pins \
                     {}; export needs the build's source GGUF",
                    mpath.display(),
                    e.sha256
                )));
            }
            models::fetch(id, log)?
        } else {
            let p = PathBuf::from(id);
            if p.is_dir() {
                return Err(unsupported_hf(model));
            }
            if !p.is_file() || (!want_sha.is_empty() && models::sha256_file(&p)? != want_sha) {
                return Err(KilnError::Unsupported(format!(
                    "{}: unsupported: the build's source `{id}` is not a registry model and was not found as the \
                     file it was built from; export needs the source GGUF's metadata (export that GGUF instead)",
                    mpath.display()
                )));
            }
            p
        };
        if path.is_dir() {
            return Err(unsupported_hf(model));
        }
        if !is_gguf_file(&path) {
            return Err(KilnError::Unsupported(format!(
                "{}: unsupported: the build's source {} is not a GGUF file; {HF_UNSUPPORTED}",
                model.display(),
                path.display()
            )));
        }
        return Ok(path);
    }
    if model.is_dir() {
        return Err(unsupported_hf(model));
    }
    Ok(model.to_path_buf())
}

/// Checks that `out` can be created: its directory exists and it is not a directory.
fn check_output(out: &Path) -> KilnResult<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(KilnError::bad(out, format!("cannot write: {} is not a directory", dir.display()))),
        Err(e) => return Err(KilnError::bad(out, format!("cannot write: directory {}: {e}", dir.display()))),
    }
    if out.is_dir() {
        return Err(KilnError::bad(out, "cannot write: it is a directory"));
    }
    Ok(())
}

/// Whether the stored tensor holds exactly the IR parameter's values (same
/// bytes, or f16/bf16 that the importer widened to f32).
fn stored_equals_ir(info: &TensorInfo, stored: &[u8], ir_dtype: DType, ir: &[u8]) -> bool {
    if info.dtype == ir_dtype {
        return stored == ir;
    }
    ir_dtype == DType::F32
        && matches!(info.dtype, DType::F16 | DType::BF16)
        && kiln_frontend::weights::plain_to_f32(info.dtype, stored).is_some_and(|v| {
            v.len() * 4 == ir.len() && v.iter().zip(ir.chunks_exact(4)).all(|(x, c)| x.to_le_bytes() == c)
        })
}

/// Parameters the IR uses as matmul weights or embedding tables.
fn matmul_weights(model: &Model) -> HashSet<ParamId> {
    model
        .module
        .insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::MatMul { w, .. } => Some(*w),
            Op::Embed { table, .. } => Some(*table),
            _ => None,
        })
        .collect()
}

fn quant_unsupported(d: DType, e: &QuantError) -> KilnError {
    let can: Vec<&str> = DType::ALL.iter().filter(|t| can_quantize(**t)).map(|t| t.name()).collect();
    KilnError::Unsupported(format!("export to {d}: {e} (kiln can quantize to: {})", can.join(", ")))
}

fn probe_quantize(d: DType) -> Result<(), QuantError> {
    let n = d.block_elems() as usize;
    let mut out = vec![0u8; d.block_bytes() as usize];
    quant::quantize_row(d, &vec![0.0; n], &mut out)
}

fn can_quantize(d: DType) -> bool {
    probe_quantize(d).is_ok()
}

/// Requantizes `rows` rows of `cols` elements from `from` to `to`, rows split over threads.
fn convert(
    from: DType,
    to: DType,
    src: &[u8],
    rows: usize,
    cols: usize,
    threads: usize,
) -> Result<Vec<u8>, QuantError> {
    let partial = |d: DType| QuantError::PartialBlock { dtype: d, elems: cols, block_elems: d.block_elems() };
    let in_row = from.row_bytes(cols as u64).ok_or_else(|| partial(from))? as usize;
    let out_row = to.row_bytes(cols as u64).ok_or_else(|| partial(to))? as usize;
    let mut out = vec![0u8; rows * out_row];
    if rows == 0 || out_row == 0 {
        return Ok(out);
    }
    if src.len() != rows * in_row {
        return Err(QuantError::SizeMismatch {
            dtype: from,
            elems: rows * cols,
            expected: rows * in_row,
            actual: src.len(),
        });
    }
    let per = rows.div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let jobs: Vec<_> = out
            .chunks_mut(per * out_row)
            .zip(src.chunks(per * in_row))
            .map(|(o, i)| {
                s.spawn(move || -> Result<(), QuantError> {
                    let mut buf = vec![0f32; cols];
                    for (orow, irow) in o.chunks_exact_mut(out_row).zip(i.chunks_exact(in_row)) {
                        quant::dequantize_row(from, irow, &mut buf)?;
                        quant::quantize_row(to, &buf, orow)?;
                    }
                    Ok(())
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(out)
}

fn threads(n: usize) -> usize {
    if n == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { n }
}

/// Exports `model` (a GGUF file or a kiln build directory; resolve registry ids
/// first) to `opts.out`. Nothing is written unless every check passes; the file
/// appears atomically. `on_tensor(i, n, name)` is called as tensors are written.
pub fn export(
    model_path: &Path,
    opts: &ExportOptions,
    log: &mut dyn FnMut(&str),
    on_tensor: &mut dyn FnMut(usize, usize, &str),
) -> KilnResult<ExportReport> {
    check_output(&opts.out)?;
    let meta_path = metadata_source(model_path, log)?;
    let source = GgufFile::open(&meta_path).map_err(FrontendError::from)?;
    log(&format!("loading {}", model_path.display()));
    let model = Model::load(model_path)?;
    let module = &model.module;
    let weights = model.weights.as_ref();
    let matmul = matmul_weights(&model);

    let mut ir_by_name: HashMap<&str, ParamId> =
        module.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), ParamId(i as u32))).collect();
    let mut plan: Vec<Planned> = Vec::with_capacity(source.tensors().len());
    let mut fallbacks = vec![];
    let mut used_rules = vec![false; opts.rules.len()];
    let mut converted = 0;
    let mut changed = 0;
    for info in source.tensors() {
        let stored = source.tensor_data(info);
        let Some(id) = ir_by_name.remove(info.name.as_str()) else {
            // Not used by kiln's graph: llama.cpp may still want it; copy it as stored.
            plan.push(Planned { spec: spec_of(info), data: Data::Source(info) });
            continue;
        };
        let p = module.param(id);
        let shape = p.ty.fixed_dims().unwrap_or_default();
        let dims: Vec<u64> = shape.iter().rev().copied().collect();
        if dims != info.dims {
            return Err(KilnError::Unsupported(format!(
                "{}: unsupported: parameter {} has shape {shape:?} in the IR but GGUF dims {:?} in {}",
                model_path.display(),
                info.name,
                info.dims,
                meta_path.display()
            )));
        }
        let ir_bytes = weights.bytes(id);
        let same = stored_equals_ir(info, stored, p.ty.dtype, ir_bytes);
        let keep = if same { Data::Source(info) } else { Data::Ir(id) };
        let mut want = None;
        if matmul.contains(&id) && shape.len() == 2 {
            want = opts.default_type;
            for (i, r) in opts.rules.iter().enumerate() {
                if r.matches(&info.name) {
                    want = Some(r.dtype);
                    used_rules[i] = true;
                }
            }
        }
        let target = want.map(|w| (w, fit_type(w, dims[0])));
        match target {
            Some((w, t)) if t != p.ty.dtype => {
                if t != w {
                    fallbacks.push(Fallback::new(&info.name, w, t, dims[0]));
                }
                converted += 1;
                changed += 1;
                plan.push(Planned {
                    spec: TensorSpec { name: info.name.clone(), dtype: t, dims },
                    data: Data::Convert {
                        param: id,
                        from: p.ty.dtype,
                        rows: shape[0] as usize,
                        cols: shape[1] as usize,
                    },
                });
            }
            _ => {
                if let Some((w, t)) = target.filter(|(w, t)| w != t) {
                    fallbacks.push(Fallback::new(&info.name, w, t, dims[0]));
                }
                let spec = match keep {
                    Data::Source(_) => spec_of(info),
                    _ => {
                        changed += 1;
                        TensorSpec { name: info.name.clone(), dtype: p.ty.dtype, dims }
                    }
                };
                plan.push(Planned { spec, data: keep });
            }
        }
    }
    if let Some(name) = module.params.iter().map(|p| p.name.as_str()).find(|n| ir_by_name.contains_key(n)) {
        return Err(KilnError::Unsupported(format!(
            "{}: unsupported: parameter {name} has no tensor in the source GGUF {}, so llama.cpp would not know it",
            model_path.display(),
            meta_path.display()
        )));
    }
    if let Some(i) = used_rules.iter().position(|u| !u) {
        let r = &opts.rules[i];
        return Err(KilnError::bad(
            "--rule",
            format!("`{}={}` matches no matmul weight of {}", r.pattern, r.dtype, model_path.display()),
        ));
    }
    // Every type the plan quantizes to must be one kiln can produce: fail before writing.
    let mut targets: Vec<DType> =
        plan.iter().filter(|t| matches!(t.data, Data::Convert { .. })).map(|t| t.spec.dtype).collect();
    targets.sort_by_key(|d| d.name());
    targets.dedup();
    for d in targets {
        probe_quantize(d).map_err(|e| quant_unsupported(d, &e))?;
    }

    let mut w = GgufWriter::with_metadata(source.metadata().clone());
    let file_type = if changed == 0 {
        source.metadata().get("general.file_type").and_then(MetaValue::as_u64).and_then(|v| u32::try_from(v).ok())
    } else if opts.rules.is_empty() && converted > 0 {
        opts.default_type.and_then(llama_ftype)
    } else {
        None
    };
    if changed > 0 {
        match file_type {
            Some(ft) => w.set("general.file_type", MetaValue::U32(ft)),
            None => {
                // llama.cpp guesses the file type from the tensors when the key is absent.
                w.remove("general.file_type");
            }
        }
        w.set("general.quantized_by", MetaValue::String(format!("kiln {}", env!("CARGO_PKG_VERSION"))));
        if plan.iter().any(|t| t.spec.dtype.is_quantized())
            && !w.metadata().contains_key("general.quantization_version")
        {
            w.set("general.quantization_version", MetaValue::U32(2));
        }
    }
    w.set(EXPORTED_BY_KEY, MetaValue::String(format!("kiln {}", env!("CARGO_PKG_VERSION"))));

    let mut per_type: BTreeMap<String, TypeTotals> = BTreeMap::new();
    let (mut tensor_bytes, mut params) = (0u64, 0u64);
    for t in &plan {
        let n = t.spec.nbytes().unwrap_or(0);
        let e = per_type.entry(t.spec.dtype.name().to_string()).or_default();
        e.tensors += 1;
        e.bytes += n;
        e.params += t.spec.n_elements();
        tensor_bytes += n;
        params += t.spec.n_elements();
        w.add_tensor(t.spec.clone())?;
    }

    log(&format!("writing {}", opts.out.display()));
    let n = plan.len();
    let nthreads = threads(opts.threads);
    let file_bytes = w.write_file::<KilnError>(&opts.out, &mut |i| {
        let t = &plan[i];
        on_tensor(i, n, &t.spec.name);
        Ok(match t.data {
            Data::Source(info) => Cow::Borrowed(source.tensor_data(info)),
            Data::Ir(id) => Cow::Owned(weights.bytes(id).to_vec()),
            Data::Convert { param, from, rows, cols } => Cow::Owned(
                convert(from, t.spec.dtype, weights.bytes(param), rows, cols, nthreads)
                    .map_err(|e| quant_unsupported(t.spec.dtype, &e))?,
            ),
        })
    })?;
    on_tensor(n, n, "");
    Ok(ExportReport {
        path: opts.out.clone(),
        metadata_from: meta_path,
        tensors: plan.len(),
        per_type,
        converted,
        changed,
        fallbacks,
        file_type,
        tensor_bytes,
        file_bytes,
        params,
        bits_per_weight: if params == 0 { 0.0 } else { tensor_bytes as f64 * 8.0 / params as f64 },
    })
}

fn spec_of(info: &TensorInfo) -> TensorSpec {
    TensorSpec { name: info.name.clone(), dtype: info.dtype, dims: info.dims.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_substrings_and_globs() {
        let r = Rule::parse("attn_v=q8_0").unwrap();
        assert_eq!(r.dtype, DType::Q8_0);
        assert!(r.matches("blk.3.attn_v.weight"));
        assert!(!r.matches("blk.3.attn_k.weight"));
        let g = Rule::parse("blk.1?.ffn_*=Q4_K").unwrap();
        assert_eq!(g.dtype, DType::Q4K);
        assert!(g.matches("blk.12.ffn_down.weight"));
        assert!(!g.matches("blk.1.ffn_down.weight"));
        assert!(!g.matches("xblk.12.ffn_down.weight"));
        assert!(Rule::parse("*=f16").unwrap().matches("token_embd.weight"));
        assert!(Rule::parse("nothing").is_err());
        assert!(Rule::parse("=q8_0").is_err());
        let e = Rule::parse("x=q9_9").unwrap_err().to_string();
        assert!(e.contains("unknown weight type `q9_9`") && e.contains("q8_0"), "{e}");
        assert!(parse_type("i32", "--type").is_err());
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(fit_type(DType::Q4K, 512), DType::Q4K);
        assert_eq!(fit_type(DType::Q4K, 576), DType::Q5_0);
        assert_eq!(fit_type(DType::Q5K, 576), DType::Q5_1);
        assert_eq!(fit_type(DType::Q6K, 576), DType::Q8_0);
        assert_eq!(fit_type(DType::Q2K, 576), DType::Q4_0);
        assert_eq!(fit_type(DType::Q3K, 576), DType::Q4_0);
        assert_eq!(fit_type(DType::Q6K, 100), DType::F16);
        assert_eq!(fit_type(DType::Q8_0, 100), DType::F16);
        assert_eq!(fit_type(DType::F32, 7), DType::F32);
    }

    #[test]
    fn conversion_round_trips_through_dequantization() {
        let (rows, cols) = (5usize, 64usize);
        let vals: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let src: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        for threads in [1, 2, 8] {
            let q = convert(DType::F32, DType::Q8_0, &src, rows, cols, threads).unwrap();
            assert_eq!(q.len(), rows * 68);
            let mut back = vec![0f32; rows * cols];
            for (r, row) in q.chunks_exact(68).enumerate() {
                quant::dequantize_row(DType::Q8_0, row, &mut back[r * cols..(r + 1) * cols]).unwrap();
            }
            for (a, b) in vals.iter().zip(&back) {
                assert!((a - b).abs() < 0.03, "{a} vs {b}");
            }
            let single = convert(DType::F32, DType::Q8_0, &src, rows, cols, 1).unwrap();
            assert_eq!(q, single, "threads must not change the bytes");
        }
        assert!(matches!(convert(DType::F32, DType::I32, &src, rows, cols, 1), Err(QuantError::Unsupported { .. })));
    }
}
