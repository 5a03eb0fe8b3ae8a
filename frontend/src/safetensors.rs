//! A memory-mapped safetensors reader: validates the header of untrusted files and
//! serves f32/f16/bf16 tensors zero copy as [`SourceTensor`]s.
//!
//! Layout: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}, ..}`),
//! then the data region; offsets are relative to the start of the data region.
//! Shapes are row-major with the last dimension contiguous, which is kiln's order.
//!
//! Every tensor's offsets are checked at open (in range, `end >= begin`, no overlaps,
//! size = elements × dtype size), so a tensor of a dtype kiln cannot use (an `I64`
//! buffer, say) does not stop a checkpoint from opening: asking for it is an
//! [`FrontendError::Unsupported`] error naming the tensor and its dtype.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_ir::{DType, TensorType};
use serde_json::Value;

use crate::error::{FrontendError, FrontendResult};
use crate::weights::{ByteOwner, SourceTensor, TensorBytes};

/// Largest header accepted (the format's own reference reader uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Largest tensor rank accepted.
pub const MAX_RANK: usize = 8;

/// Element type of a stored tensor, as the safetensors header names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StDtype {
    /// One kiln can load: F32, F16 or BF16.
    Float(DType),
    /// A dtype of the format that kiln does not load, with its element size in bytes
    /// (`None` for a name this reader does not know, whose size cannot be checked).
    Other { name: String, size: Option<u64> },
}

impl StDtype {
    fn parse(name: &str) -> StDtype {
        let other = |size: u64| StDtype::Other { name: name.to_string(), size: Some(size) };
        match name {
            "F32" => StDtype::Float(DType::F32),
            "F16" => StDtype::Float(DType::F16),
            "BF16" => StDtype::Float(DType::BF16),
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => other(1),
            "I16" | "U16" => other(2),
            "I32" | "U32" => other(4),
            "F64" | "I64" | "U64" => other(8),
            _ => StDtype::Other { name: name.to_string(), size: None },
        }
    }

    fn elem_size(&self) -> Option<u64> {
        match self {
            StDtype::Float(DType::F32) => Some(4),
            StDtype::Float(_) => Some(2),
            StDtype::Other { size, .. } => *size,
        }
    }

    /// The name used in the header.
    pub fn name(&self) -> String {
        match self {
            StDtype::Float(DType::F32) => "F32".into(),
            StDtype::Float(DType::F16) => "F16".into(),
            StDtype::Float(DType::BF16) => "BF16".into(),
            StDtype::Float(d) => d.to_string(),
            StDtype::Other { name, .. } => name.clone(),
        }
    }
}

/// One tensor's header entry, with absolute byte offsets into the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub offset: usize,
    pub len: usize,
}

/// The bytes of the file: a read-only memory map, or an owned buffer.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    metadata: BTreeMap<String, String>,
    tensors: HashMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("len", &self.all_bytes().len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl ByteOwner for SafetensorsFile {
    fn all_bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl SafetensorsFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: &Path) -> FrontendResult<SafetensorsFile> {
        let io = |source| FrontendError::Io { file: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len < 8 {
            // Too short to hold a header; parse() reports it without mapping an empty file.
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. As with any
            // memory-mapped file, another process truncating or rewriting the file
            // while it is open is outside what this reader guards against.
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Validates a safetensors image already in memory; `path` only names it in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> FrontendResult<SafetensorsFile> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> FrontendResult<SafetensorsFile> {
        let data: &[u8] = match &bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        };
        let (metadata, tensors) = parse_header(&path, data)?;
        Ok(SafetensorsFile { path, bytes, metadata, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The header entry of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The tensor's stored bytes (any dtype).
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        self.all_bytes().get(t.offset..t.offset + t.len)
    }

    /// A float tensor, zero copy. `Ok(None)` when the file has no such tensor;
    /// an Unsupported error when its dtype is not F32/F16/BF16.
    pub fn tensor(self: &Arc<Self>, name: &str) -> FrontendResult<Option<SourceTensor>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        let dtype = match &t.dtype {
            StDtype::Float(d) => *d,
            StDtype::Other { name: dt, .. } => {
                return Err(FrontendError::unsupported(
                    &self.path,
                    format!("tensor {name} has dtype {dt}; kiln loads F32, F16 and BF16 tensors"),
                ));
            }
        };
        let owner: Arc<dyn ByteOwner> = self.clone();
        Ok(Some(SourceTensor {
            ty: TensorType::fixed(dtype, &t.shape),
            bytes: TensorBytes::Mapped { owner, offset: t.offset, len: t.len },
        }))
    }
}

type Header = (BTreeMap<String, String>, HashMap<String, TensorInfo>);

fn parse_header(path: &Path, data: &[u8]) -> FrontendResult<Header> {
    let bad = |msg: String| FrontendError::bad(path, msg);
    let file_len = data.len() as u64;
    if file_len < 8 {
        return Err(bad(format!("not a safetensors file: {file_len} bytes is too short for the header length")));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&data[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    if n > file_len - 8 {
        return Err(bad(format!("header length {n} runs past the end of the {file_len}-byte file")));
    }
    // n <= file_len - 8, so these fit in usize.
    let data_start = 8 + n as usize;
    let header = &data[8..data_start];
    let json: Value = serde_json::from_slice(header).map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let Value::Object(entries) = json else {
        return Err(bad("the header is not a JSON object".into()));
    };
    let data_len = file_len - data_start as u64;
    let mut metadata = BTreeMap::new();
    let mut tensors = HashMap::with_capacity(entries.len());
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == "__metadata__" {
            metadata = parse_metadata(path, entry)?;
            continue;
        }
        let (info, begin, end) = parse_entry(path, name, entry, data_len)?;
        let info = TensorInfo { offset: data_start + begin as usize, ..info };
        if end > begin {
            ranges.push((begin, end, name.as_str()));
        }
        tensors.insert(name.clone(), info);
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((b0, e0, n0), (b1, _, n1)) = (w[0], w[1]);
        if b1 < e0 {
            return Err(bad(format!(
                "tensors {n0} (bytes {b0}..{e0}) and {n1} (from byte {b1}) overlap in the data region"
            )));
        }
    }
    Ok((metadata, tensors))
}

fn parse_metadata(path: &Path, v: &Value) -> FrontendResult<BTreeMap<String, String>> {
    let Value::Object(m) = v else {
        return Err(FrontendError::bad(path, "`__metadata__` is not a JSON object"));
    };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(FrontendError::bad(path, format!("`__metadata__` value of `{k}` is not a string: {other}"))),
        })
        .collect()
}

/// Validates one tensor entry; returns it with offsets relative to the data region.
fn parse_entry(path: &Path, name: &str, v: &Value, data_len: u64) -> FrontendResult<(TensorInfo, u64, u64)> {
    let bad = |msg: String| FrontendError::bad(path, format!("tensor {name}: {msg}"));
    let Value::Object(m) = v else {
        return Err(bad("the header entry is not a JSON object".into()));
    };
    let dtype = match m.get("dtype") {
        Some(Value::String(s)) => StDtype::parse(s),
        Some(other) => return Err(bad(format!("`dtype` is not a string: {other}"))),
        None => return Err(bad("missing `dtype`".into())),
    };
    let shape: Vec<u64> = match m.get("shape") {
        Some(Value::Array(a)) => {
            if a.len() > MAX_RANK {
                return Err(bad(format!("rank {} exceeds the limit of {MAX_RANK}", a.len())));
            }
            a.iter()
                .map(|d| d.as_u64().ok_or_else(|| bad(format!("shape entry {d} is not a non-negative integer"))))
                .collect::<FrontendResult<_>>()?
        }
        Some(other) => return Err(bad(format!("`shape` is not an array: {other}"))),
        None => return Err(bad("missing `shape`".into())),
    };
    let (begin, end) = match m.get("data_offsets") {
        Some(Value::Array(a)) if a.len() == 2 => match (a[0].as_u64(), a[1].as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => {
                return Err(bad(format!("`data_offsets` must be two non-negative integers, found {a:?}")));
            }
        },
        Some(other) => {
            return Err(bad(format!("`data_offsets` must be [begin, end], found {other}")));
        }
        None => return Err(bad("missing `data_offsets`".into())),
    };
    if end < begin {
        return Err(bad(format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    if end > data_len {
        return Err(bad(format!("data_offsets [{begin}, {end}] run past the {data_len}-byte data region")));
    }
    let stored = end - begin;
    if let Some(size) = dtype.elem_size() {
        let elems = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let need = elems.and_then(|e| e.checked_mul(size));
        if need != Some(stored) {
            let need = need.map_or_else(|| "an overflowing number of".to_string(), |n| n.to_string());
            return Err(bad(format!(
                "shape {shape:?} of {} needs {need} bytes but data_offsets [{begin}, {end}] hold {stored}",
                dtype.name()
            )));
        }
    }
    // end <= data_len <= file length, which fits in usize.
    Ok((TensorInfo { dtype, shape, offset: begin as usize, len: stored as usize }, begin, end))
}

/// One tensor to write with [`write`]: name, safetensors dtype name (`"F32"`,
/// `"F16"`, `"BF16"`, …), shape and little-endian data.
pub struct WriteTensor<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// A safetensors image: header (names sorted, `__metadata__` first, padded with
/// spaces to 8 bytes), then the data in the same order. The same tensors and
/// metadata always give the same bytes.
pub fn write(tensors: &[WriteTensor<'_>], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut sorted: Vec<&WriteTensor<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let meta = serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into());
    let mut header = format!("{{\"__metadata__\":{meta}");
    let mut offset = 0usize;
    for t in &sorted {
        let name = serde_json::to_string(t.name).unwrap_or_default();
        let shape = t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        let end = offset + t.data.len();
        let _ = write!(
            header,
            ",{name}:{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{offset},{end}]}}",
            t.dtype
        );
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in sorted {
        out.extend_from_slice(t.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(header: &Value, data: &[u8]) -> Vec<u8> {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out
    }

    fn open(header: &Value, data: &[u8]) -> FrontendResult<Arc<SafetensorsFile>> {
        SafetensorsFile::from_bytes("t.safetensors", image(header, data)).map(Arc::new)
    }

    fn err(header: &Value, data: &[u8]) -> String {
        open(header, data).unwrap_err().to_string()
    }

    #[test]
    fn reads_float_tensors_zero_copy() {
        let mut data = Vec::new();
        for x in [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0] {
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        data.extend_from_slice(&half::bf16::from_f32(-2.0).to_le_bytes());
        let h = json!({
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F16", "shape": [1], "data_offsets": [24, 26]},
            "c": {"dtype": "BF16", "shape": [], "data_offsets": [26, 28]},
            "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [28, 28]},
        });
        let f = open(&h, &data).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f.names(), vec!["a", "b", "c", "e"]);
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        let a = f.tensor("a").unwrap().unwrap();
        assert_eq!(a.ty, TensorType::fixed(DType::F32, &[2, 3]));
        assert_eq!(a.bytes.as_bytes(), &data[..24]);
        assert!(matches!(a.bytes, TensorBytes::Mapped { .. }));
        let b = f.tensor("b").unwrap().unwrap();
        assert_eq!(crate::weights::plain_to_f32(b.ty.dtype, b.bytes.as_bytes()), Some(vec![0.5]));
        let c = f.tensor("c").unwrap().unwrap();
        assert_eq!(crate::weights::plain_to_f32(c.ty.dtype, c.bytes.as_bytes()), Some(vec![-2.0]));
        assert!(f.tensor("missing").unwrap().is_none());
    }

    #[test]
    fn other_dtypes_open_but_are_refused_on_use() {
        let h = json!({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
                       "x": {"dtype": "F4_MYSTERY", "shape": [3], "data_offsets": [16, 17]}});
        let f = open(&h, &[0; 17]).unwrap();
        let e = f.tensor("ids").unwrap_err().to_string();
        assert!(e.contains("t.safetensors") && e.contains("ids") && e.contains("I64"), "{e}");
        let e = f.tensor("x").unwrap_err().to_string();
        assert!(e.contains("F4_MYSTERY"), "{e}");
        assert_eq!(f.raw_bytes("ids").map(<[u8]>::len), Some(16));
    }

    #[test]
    fn rejects_bad_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "too short"),
            (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
            ([&50u64.to_le_bytes()[..], b"{}"].concat(), "past the end"),
            ([&2u64.to_le_bytes()[..], b"{x"].concat(), "not valid JSON"),
            ([&2u64.to_le_bytes()[..], b"[]"].concat(), "not a JSON object"),
        ];
        for (bytes, want) in cases {
            let e = SafetensorsFile::from_bytes("t.safetensors", bytes).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("t.safetensors"), "{e} (wanted {want})");
        }
        let t = |entry: Value| json!({ "w": entry });
        let ok = |dt: &str, shape: Value, off: Value| t(json!({"dtype": dt, "shape": shape, "data_offsets": off}));
        let cases = [
            (ok("F32", json!([2]), json!([0, 4])), "needs 8 bytes"),
            (ok("F32", json!([2]), json!([8, 0])), "end before"),
            (ok("F32", json!([4]), json!([0, 16])), "run past"),
            (ok("F32", json!([u64::MAX, u64::MAX]), json!([0, 8])), "overflowing"),
            (ok("F32", json!([1, 1, 1, 1, 1, 1, 1, 1, 1]), json!([0, 4])), "rank 9"),
            (ok("F32", json!([-1]), json!([0, 4])), "not a non-negative integer"),
            (ok("F32", json!([1]), json!([0])), "data_offsets"),
            (ok("F32", json!("x"), json!([0, 4])), "not an array"),
            (t(json!({"shape": [1], "data_offsets": [0, 4]})), "missing `dtype`"),
            (t(json!(7)), "not a JSON object"),
            (json!({"__metadata__": {"a": 1}}), "not a string"),
            (json!({"__metadata__": []}), "not a JSON object"),
        ];
        for (h, want) in cases {
            let e = err(&h, &[0; 8]);
            assert!(e.contains(want) && e.starts_with("t.safetensors"), "{e} (wanted {want})");
        }
    }

    #[test]
    fn rejects_overlaps() {
        let h = json!({
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        });
        let e = err(&h, &[0; 8]);
        assert!(e.contains("overlap"), "{e}");
    }

    #[test]
    fn open_names_the_file() {
        let dir = std::env::temp_dir().join(format!("kiln-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("empty.safetensors");
        std::fs::write(&p, b"").unwrap();
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("empty.safetensors") && e.contains("too short"), "{e}");
        let p2 = dir.join("good.safetensors");
        std::fs::write(&p2, image(&json!({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}), &[0; 4]))
            .unwrap();
        let f = Arc::new(SafetensorsFile::open(&p2).unwrap());
        assert_eq!(f.tensor("a").unwrap().unwrap().bytes.as_bytes(), &[0; 4]);
        let e = SafetensorsFile::open(&dir.join("nope.safetensors")).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: mutate a valid image byte by byte.
        let h = json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}});
        let good = image(&h, &[7; 12]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4000 {
            let mut v = good.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % v.len() as u64) as usize;
                v[i] = (seed >> 32) as u8;
            }
            if seed.is_multiple_of(5) {
                v.truncate((seed >> 40) as usize % v.len());
            }
            if let Ok(f) = SafetensorsFile::from_bytes("f", v) {
                let f = Arc::new(f);
                for n in f.names().iter().map(|s| s.to_string()).collect::<Vec<_>>() {
                    if let Ok(Some(t)) = f.tensor(&n) {
                        assert_eq!(Some(t.bytes.as_bytes().len() as u64), t.ty.storage_bytes());
                    }
                }
            }
        }
    }
}
