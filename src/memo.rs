//! The compile driver's memo: results of deterministic, expensive work that builds
//! of one model share (a tensor quantized to a format, a measured perplexity),
//! kept on disk under `<cache>/memo/` (or `$KILN_MEMO_DIR`) by content hash.
//!
//! Every key is salted with a hash of the running `kiln` executable, so a rebuilt
//! kiln (whose quantizers may round differently) never reads an older kiln's
//! results. Each entry carries a checksum of its key and bytes; an entry that fails
//! it, or cannot be read, is a miss and is recomputed. Writes go to a temporary
//! file renamed into place, so concurrent builds and interrupted ones leave only
//! whole entries. The store is trimmed to `$KILN_MEMO_MAX_MB` (default 4096) by
//! dropping the least recently written entries when it is opened.
//! `KILN_MEMO=off` turns it off.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::models;

const DEFAULT_MAX_MB: u64 = 4096;

pub struct DiskMemo {
    dir: PathBuf,
    salt: [u8; 32],
}

/// A hash of the running executable (zeros when it cannot be read: then every
/// entry written by such a run shares that salt, which only an unreadable
/// executable produces).
fn exe_salt() -> [u8; 32] {
    static SALT: OnceLock<[u8; 32]> = OnceLock::new();
    *SALT.get_or_init(|| {
        std::env::current_exe().and_then(std::fs::read).map(|b| Sha256::digest(&b).into()).unwrap_or([0; 32])
    })
}

impl DiskMemo {
    /// The memo the environment asks for: `None` when `KILN_MEMO=off` or its
    /// directory cannot be made.
    pub fn from_env() -> Option<DiskMemo> {
        if std::env::var("KILN_MEMO").is_ok_and(|v| v == "off" || v == "0") {
            return None;
        }
        let dir = std::env::var_os("KILN_MEMO_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| models::cache_dir().join("memo"));
        let max_mb = std::env::var("KILN_MEMO_MAX_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_MB);
        DiskMemo::open(&dir, max_mb.saturating_mul(1 << 20))
    }

    /// The memo in `dir`, trimmed to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Option<DiskMemo> {
        std::fs::create_dir_all(dir).ok()?;
        trim(dir, max_bytes);
        Some(DiskMemo { dir: dir.to_path_buf(), salt: exe_salt() })
    }

    fn path(&self, key: &[u8; 32]) -> (PathBuf, [u8; 32]) {
        let salted: [u8; 32] = Sha256::new().chain_update(self.salt).chain_update(key).finalize().into();
        let hex: String = salted.iter().map(|b| format!("{b:02x}")).collect();
        (self.dir.join(&hex[..2]).join(&hex[2..]), salted)
    }
}

fn checksum(salted: &[u8; 32], value: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(salted).chain_update(value).finalize().into()
}

impl kiln_passes::Memo for DiskMemo {
    fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        let (path, salted) = self.path(key);
        let mut v = std::fs::read(path).ok()?;
        let body = v.len().checked_sub(32)?;
        if v[body..] != checksum(&salted, &v[..body]) {
            return None;
        }
        v.truncate(body);
        Some(v)
    }

    fn put(&self, key: &[u8; 32], value: &[u8]) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let (path, salted) = self.path(key);
        let Some(dir) = path.parent() else { return };
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let mut body = Vec::with_capacity(value.len() + 32);
            body.extend_from_slice(value);
            body.extend_from_slice(&checksum(&salted, value));
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &path)
        };
        // Best effort: a full disk only costs the recomputation.
        if write().is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Drops the least recently written entries of `dir` until it holds at most `max_bytes`.
fn trim(dir: &Path, max_bytes: u64) {
    let mut entries = vec![];
    let Ok(subdirs) = std::fs::read_dir(dir) else { return };
    for sub in subdirs.flatten() {
        let Ok(files) = std::fs::read_dir(sub.path()) else { continue };
        for f in files.flatten() {
            if let Ok(md) = f.metadata()
                && md.is_file()
            {
                entries.push((md.modified().ok(), md.len(), f.path()));
            }
        }
    }
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    if total <= max_bytes {
        return;
    }
    entries.sort_by_key(|e| e.0);
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_passes::Memo;

    use super::*;

    #[test]
    fn stores_checks_and_trims() {
        let dir = std::env::temp_dir().join(format!("kiln-memo-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = DiskMemo::open(&dir, u64::MAX).unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(m.get(&a), None);
        m.put(&a, b"quantized bytes");
        m.put(&b, &[]);
        assert_eq!(m.get(&a).as_deref(), Some(&b"quantized bytes"[..]));
        assert_eq!(m.get(&b).as_deref(), Some(&[][..]));
        // A mangled entry is a miss, not wrong bytes.
        let (path, _) = m.path(&a);
        let mut raw = std::fs::read(&path).unwrap();
        raw[0] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(m.get(&a), None);
        // A truncated one too.
        std::fs::write(&path, &raw[..10]).unwrap();
        assert_eq!(m.get(&a), None);
        // Trimming to zero bytes empties the store.
        drop(m);
        let m = DiskMemo::open(&dir, 0).unwrap();
        assert_eq!(m.get(&b), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
