//! kiln's build artifact: a directory holding the verified IR (`model.kir`), an
//! aligned weight blob (`weights.bin`, laid out from the IR alone), the tokenizer,
//! the chat template and `manifest.json` (every file's sha256, recipe, pass reports).
//!
//! Builds are written to a temporary directory and renamed into place, so a
//! reader sees either the previous build or the complete new one. Loading checks
//! every hash before anything runs.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backends::{BuildFile, WeightSource};
use kiln_ir::{Module, ParamId, VerifiedModule};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{RuntimeError, RuntimeResult};

pub const FORMAT: &str = "kiln-build";
pub const FORMAT_VERSION: u64 = 1;
/// Alignment of every tensor in `weights.bin` (cache line and SIMD friendly).
pub const ALIGN: u64 = 64;
pub const MANIFEST: &str = "manifest.json";
pub const IR_FILE: &str = "model.kir";
pub const WEIGHTS_FILE: &str = "weights.bin";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// kiln's tokenizer settings (BOS, end-of-generation ids), kept out of `tokenizer.json`
/// so that file stays loadable by other tools.
pub const TOKENIZER_KILN_FILE: &str = "tokenizer.kiln.json";

/// Byte ranges of every parameter in the weight blob, and its total size.
pub fn layout(module: &Module) -> RuntimeResult<(Vec<(u64, u64)>, u64)> {
    let mut ranges = Vec::with_capacity(module.params.len());
    let mut end = 0u64;
    for p in &module.params {
        let n =
            p.ty.storage_bytes()
                .ok_or_else(|| RuntimeError::Invalid(format!("param @{} has no fixed size", p.name)))?;
        let start = end.div_ceil(ALIGN) * ALIGN;
        ranges.push((start, n));
        end = start + n;
    }
    Ok((ranges, end))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams a file through sha256.
pub fn sha256_file(path: &Path) -> RuntimeResult<String> {
    let mut f = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| RuntimeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// What goes into a build besides the module and its weights.
pub struct BuildInputs<'a> {
    pub tokenizer_json: &'a str,
    pub chat_template: Option<&'a str>,
    /// Recipe, device, backend, source model and pass reports; merged into the manifest.
    pub manifest_extra: Value,
    /// The backend's generated files (kernel sources), listed under `backend_files`.
    pub backend_files: &'a [BuildFile],
}

/// Writes a build into `dir` atomically (temp dir + rename). Returns the manifest.
pub fn write_build(
    dir: &Path,
    module: &VerifiedModule,
    weights: &dyn Fn(ParamId) -> Vec<u8>,
    inputs: &BuildInputs,
) -> RuntimeResult<Value> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| RuntimeError::io(parent, e))?;
    let name = dir.file_name().ok_or_else(|| RuntimeError::Invalid(format!("bad output path {}", dir.display())))?;
    remove_stale(parent, &name.to_string_lossy());
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
    }
    let result = write_into(&tmp, module, weights, inputs).and_then(|manifest| {
        swap_into_place(&tmp, dir)?;
        Ok(manifest)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_file(path: &Path, bytes: &[u8]) -> RuntimeResult<()> {
    let mut f = File::create(path).map_err(|e| RuntimeError::io(path, e))?;
    f.write_all(bytes).map_err(|e| RuntimeError::io(path, e))?;
    f.sync_all().map_err(|e| RuntimeError::io(path, e))
}

fn write_into(
    tmp: &Path,
    module: &VerifiedModule,
    weights: &dyn Fn(ParamId) -> Vec<u8>,
    inputs: &BuildInputs,
) -> RuntimeResult<Value> {
    fs::create_dir_all(tmp).map_err(|e| RuntimeError::io(tmp, e))?;
    let mut files = vec![];
    let ir = kiln_ir::print(module);
    write_file(&tmp.join(IR_FILE), ir.as_bytes())?;
    files.push(json!({"path": IR_FILE, "bytes": ir.len(), "sha256": sha256_hex(ir.as_bytes())}));

    let (ranges, total) = layout(module)?;
    let wpath = tmp.join(WEIGHTS_FILE);
    let f = File::create(&wpath).map_err(|e| RuntimeError::io(&wpath, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let zeros = [0u8; ALIGN as usize];
    for (i, (start, n)) in ranges.iter().enumerate() {
        let pad = (start - pos) as usize;
        w.write_all(&zeros[..pad]).map_err(|e| RuntimeError::io(&wpath, e))?;
        h.update(&zeros[..pad]);
        let bytes = weights(ParamId(i as u32));
        if bytes.len() as u64 != *n {
            return Err(RuntimeError::Invalid(format!(
                "param @{}: {} bytes given, the IR says {n}",
                module.params[i].name,
                bytes.len()
            )));
        }
        w.write_all(&bytes).map_err(|e| RuntimeError::io(&wpath, e))?;
        h.update(&bytes);
        pos = start + n;
    }
    let f = w.into_inner().map_err(|e| RuntimeError::io(&wpath, e.into_error()))?;
    f.sync_all().map_err(|e| RuntimeError::io(&wpath, e))?;
    files.push(json!({"path": WEIGHTS_FILE, "bytes": total, "sha256": hex(&h.finalize())}));

    let mut tok: Value = serde_json::from_str(inputs.tokenizer_json)
        .map_err(|e| RuntimeError::Invalid(format!("tokenizer.json is not JSON: {e}")))?;
    let kiln_cfg = tok.as_object_mut().and_then(|o| o.remove(kiln_frontend::tokenizer::KILN_CONFIG_KEY));
    let tok_text = serde_json::to_string(&tok).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    write_file(&tmp.join(TOKENIZER_FILE), tok_text.as_bytes())?;
    files.push(json!({"path": TOKENIZER_FILE, "bytes": tok_text.len(), "sha256": sha256_hex(tok_text.as_bytes())}));
    if let Some(cfg) = kiln_cfg {
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| RuntimeError::Invalid(e.to_string()))? + "\n";
        write_file(&tmp.join(TOKENIZER_KILN_FILE), text.as_bytes())?;
        files.push(json!({"path": TOKENIZER_KILN_FILE, "bytes": text.len(), "sha256": sha256_hex(text.as_bytes())}));
    }
    if let Some(t) = inputs.chat_template {
        write_file(&tmp.join(CHAT_TEMPLATE_FILE), t.as_bytes())?;
        files.push(json!({"path": CHAT_TEMPLATE_FILE, "bytes": t.len(), "sha256": sha256_hex(t.as_bytes())}));
    }
    let mut backend_names = vec![];
    for f in inputs.backend_files {
        let reserved = [MANIFEST, IR_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_KILN_FILE, CHAT_TEMPLATE_FILE];
        if f.name.is_empty()
            || f.name.contains(['/', '\\'])
            || f.name.starts_with('.')
            || reserved.contains(&f.name.as_str())
        {
            return Err(RuntimeError::Invalid(format!("backend file name `{}` is not allowed", f.name)));
        }
        write_file(&tmp.join(&f.name), &f.bytes)?;
        files.push(json!({"path": f.name, "bytes": f.bytes.len(), "sha256": sha256_hex(&f.bytes)}));
        backend_names.push(f.name.clone());
    }
    let mut manifest = json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "weights": {"file": WEIGHTS_FILE, "alignment": ALIGN, "params": module.params.len(), "bytes": total},
        "files": files,
    });
    if !backend_names.is_empty() {
        manifest["backend_files"] = json!(backend_names);
    }
    if let (Value::Object(m), Value::Object(extra)) = (&mut manifest, &inputs.manifest_extra) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| RuntimeError::Invalid(e.to_string()))? + "\n";
    write_file(&tmp.join(MANIFEST), text.as_bytes())?;
    Ok(manifest)
}

/// Removes `.NAME.tmp-PID` / `.NAME.old-PID` directories left by builds that were
/// killed (their process no longer exists), so interrupted builds leave no litter.
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let pid = [".tmp-", ".old-"]
            .iter()
            .find_map(|tag| file.strip_prefix(&format!(".{name}{tag}")))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
            if !alive {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Replaces `dir` with `tmp`: the old build stays intact until the new one is complete.
fn swap_into_place(tmp: &Path, dir: &Path) -> RuntimeResult<()> {
    if dir.exists() && exchange(tmp, dir) {
        // `tmp` now holds the previous build; the new one is in place in one step.
        let _ = fs::remove_dir_all(tmp);
        return Ok(());
    }
    if dir.exists() {
        let old = dir.with_file_name(format!(
            ".{}.old-{}",
            dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        fs::rename(dir, &old).map_err(|e| RuntimeError::io(dir, e))?;
        if let Err(e) = fs::rename(tmp, dir) {
            let _ = fs::rename(&old, dir);
            return Err(RuntimeError::io(dir, e));
        }
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(tmp, dir).map_err(|e| RuntimeError::io(dir, e))?;
    }
    Ok(())
}

/// Atomically exchanges two directories (Linux `renameat2(RENAME_EXCHANGE)`), so a
/// reader or a kill never sees the build path empty. False where unavailable.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (CString::new(a.as_os_str().as_bytes()), CString::new(b.as_os_str().as_bytes())) else {
        return false;
    };
    // SAFETY: both pointers are valid NUL-terminated paths for the duration of the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> bool {
    false
}

/// Whether `path` looks like a kiln build directory.
pub fn is_build(path: &Path) -> bool {
    path.is_dir() && path.join(MANIFEST).is_file()
}

/// Weights of a loaded build: one read-only map of `weights.bin`.
pub struct BlobWeights {
    map: memmap2::Mmap,
    ranges: Vec<(u64, u64)>,
}

impl WeightSource for BlobWeights {
    fn bytes(&self, p: ParamId) -> &[u8] {
        let (s, n) = self.ranges[p.index()];
        &self.map[s as usize..(s + n) as usize]
    }
}

/// A build opened and checked.
pub struct OpenedBuild {
    pub dir: PathBuf,
    pub manifest: Value,
    pub module: Arc<VerifiedModule>,
    pub weights: Arc<BlobWeights>,
    pub tokenizer_json: Vec<u8>,
    pub chat_template: Option<String>,
    /// The backend's generated files (checked like every listed file).
    pub backend_files: Vec<BuildFile>,
}

/// Opens a build: checks the manifest, every file's size and sha256, parses and
/// verifies the IR and maps the weights. Tampered or truncated builds are refused.
pub fn open_build(dir: &Path) -> RuntimeResult<OpenedBuild> {
    let mpath = dir.join(MANIFEST);
    let text = fs::read_to_string(&mpath).map_err(|e| RuntimeError::io(&mpath, e))?;
    let manifest: Value =
        serde_json::from_str(&text).map_err(|e| RuntimeError::bad(&mpath, format!("invalid JSON: {e}")))?;
    if manifest.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(RuntimeError::bad(&mpath, format!("not a kiln build manifest (`format` is not \"{FORMAT}\")")));
    }
    let version = manifest.get("format_version").and_then(Value::as_u64);
    if version != Some(FORMAT_VERSION) {
        return Err(RuntimeError::bad(
            &mpath,
            format!("unsupported build format version {version:?}, this kiln reads {FORMAT_VERSION}"),
        ));
    }
    let files = manifest
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| RuntimeError::bad(&mpath, "missing `files` list"))?;
    let mut listed = vec![];
    for f in files {
        let (Some(rel), Some(want), Some(bytes)) = (
            f.get("path").and_then(Value::as_str),
            f.get("sha256").and_then(Value::as_str),
            f.get("bytes").and_then(Value::as_u64),
        ) else {
            return Err(RuntimeError::bad(&mpath, format!("malformed file entry {f}")));
        };
        if rel.contains(['/', '\\']) || rel.starts_with('.') {
            return Err(RuntimeError::bad(&mpath, format!("file entry `{rel}` must be a plain file name")));
        }
        let path = dir.join(rel);
        let len = fs::metadata(&path).map_err(|e| RuntimeError::io(&path, e))?.len();
        if len != bytes {
            return Err(RuntimeError::bad(
                &path,
                format!("size is {len} bytes, the manifest says {bytes}: truncated or modified build"),
            ));
        }
        let got = sha256_file(&path)?;
        if got != want {
            return Err(RuntimeError::bad(
                &path,
                format!("sha256 mismatch (manifest {want}, file {got}): the build was modified"),
            ));
        }
        listed.push(rel.to_string());
    }
    for required in [IR_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        if !listed.iter().any(|l| l == required) {
            return Err(RuntimeError::bad(&mpath, format!("the manifest does not list {required}")));
        }
    }
    let ir_path = dir.join(IR_FILE);
    let ir = fs::read_to_string(&ir_path).map_err(|e| RuntimeError::io(&ir_path, e))?;
    let module =
        kiln_ir::parse(&ir).and_then(kiln_ir::verify).map_err(|e| RuntimeError::bad(&ir_path, e.to_string()))?;
    let (ranges, total) = layout(&module)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let wf = File::open(&wpath).map_err(|e| RuntimeError::io(&wpath, e))?;
    // SAFETY: read-only private map; the file's hash was just checked.
    let map = unsafe { memmap2::Mmap::map(&wf) }.map_err(|e| RuntimeError::io(&wpath, e))?;
    if map.len() as u64 != total {
        return Err(RuntimeError::bad(&wpath, format!("{} bytes, the IR's layout needs {total}", map.len())));
    }
    let tpath = dir.join(TOKENIZER_FILE);
    let mut tokenizer_json = fs::read(&tpath).map_err(|e| RuntimeError::io(&tpath, e))?;
    if listed.iter().any(|l| l == TOKENIZER_KILN_FILE) {
        // Put kiln's settings back where the runtime tokenizer reads them.
        let kpath = dir.join(TOKENIZER_KILN_FILE);
        let cfg: Value = serde_json::from_slice(&fs::read(&kpath).map_err(|e| RuntimeError::io(&kpath, e))?)
            .map_err(|e| RuntimeError::bad(&kpath, format!("invalid JSON: {e}")))?;
        let mut doc: Value = serde_json::from_slice(&tokenizer_json)
            .map_err(|e| RuntimeError::bad(&tpath, format!("invalid JSON: {e}")))?;
        if let Some(o) = doc.as_object_mut() {
            o.insert(kiln_frontend::tokenizer::KILN_CONFIG_KEY.to_string(), cfg);
        }
        tokenizer_json = serde_json::to_vec(&doc).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    }
    let cpath = dir.join(CHAT_TEMPLATE_FILE);
    let chat_template = if listed.iter().any(|l| l == CHAT_TEMPLATE_FILE) {
        Some(fs::read_to_string(&cpath).map_err(|e| RuntimeError::io(&cpath, e))?)
    } else {
        None
    };
    let mut backend_files = vec![];
    if let Some(names) = manifest.get("backend_files") {
        let names = names.as_array().ok_or_else(|| RuntimeError::bad(&mpath, "`backend_files` must be a list"))?;
        for n in names {
            let name = n.as_str().filter(|n| listed.iter().any(|l| l == n)).ok_or_else(|| {
                RuntimeError::bad(&mpath, format!("backend file {n} is not a file the manifest lists"))
            })?;
            let path = dir.join(name);
            let bytes = fs::read(&path).map_err(|e| RuntimeError::io(&path, e))?;
            backend_files.push(BuildFile { name: name.to_string(), bytes });
        }
    }
    Ok(OpenedBuild {
        dir: dir.to_path_buf(),
        manifest,
        module: Arc::new(module),
        weights: Arc::new(BlobWeights { map, ranges }),
        tokenizer_json,
        chat_template,
        backend_files,
    })
}
