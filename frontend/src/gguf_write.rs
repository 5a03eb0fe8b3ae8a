//! Writer for GGUF v3 files (the inverse of [`crate::gguf`]): header, metadata of every value type,
//! tensor infos, aligned tensor data; deterministic, and written atomically (temporary file + rename).
//!
//! Layout written (little-endian): `"GGUF"`, `u32` 3, `u64` tensor count, `u64`
//! metadata count, the metadata pairs in key order, the tensor infos in the
//! order given (`name`, `u32` n_dims, `u64` dims innermost first, `u32` ggml
//! type, `u64` offset relative to the data section), zero padding to
//! `general.alignment` (default 32), then each tensor's data, each padded with
//! zeros to the alignment as llama.cpp and gguf-py do.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_ir::DType;

use crate::error::{FrontendError, FrontendResult};
use crate::gguf::{DEFAULT_ALIGNMENT, GGML_MAX_DIMS, GGUF_MAGIC, MetaArray, MetaValue, ggml_type_id};

/// The GGUF version this writer produces.
pub const GGUF_WRITE_VERSION: u32 = 3;

/// One tensor of the file to write: its data comes separately, in the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension, i.e. a
    /// kiln (row-major) shape reversed.
    pub dims: Vec<u64>,
}

impl TensorSpec {
    /// Number of elements (1 for a scalar).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data, or `None` when the innermost dimension is not
    /// a whole number of blocks of the dtype (or the size overflows).
    pub fn nbytes(&self) -> Option<u64> {
        let row = self.dims.first().copied().unwrap_or(1);
        let rows = self.dims.iter().skip(1).try_fold(1u64, |a, &d| a.checked_mul(d))?;
        self.dtype.row_bytes(row)?.checked_mul(rows)
    }
}

/// A GGUF file being assembled: metadata (written in key order, so the output
/// does not depend on insertion order) and the tensor directory (in the order added).
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorSpec>,
    /// Byte offset of each tensor relative to the data section, and its size.
    ranges: Vec<(u64, u64)>,
}

/// Where a writer's mistakes are reported (a bug in the caller, not bad input).
fn internal(msg: String) -> FrontendError {
    FrontendError::Internal(format!("GGUF writer: {msg}"))
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding `metadata` (e.g. another file's, to copy it).
    pub fn with_metadata(metadata: BTreeMap<String, MetaValue>) -> Self {
        GgufWriter { metadata, ..Self::default() }
    }

    /// Sets (or replaces) a metadata value.
    pub fn set(&mut self, key: impl Into<String>, value: MetaValue) {
        self.metadata.insert(key.into(), value);
    }

    /// Removes a metadata value, returning it.
    pub fn remove(&mut self, key: &str) -> Option<MetaValue> {
        self.metadata.remove(key)
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Alignment of the data section and of every tensor: `general.alignment`, default 32.
    pub fn alignment(&self) -> FrontendResult<u64> {
        match self.metadata.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => Ok(a),
                _ => Err(internal(format!("general.alignment is {v:?}; it must be a nonzero power of two"))),
            },
        }
    }

    /// Adds a tensor to the directory (its data is given when writing). Checks the
    /// name is new, at most four dims, and rows that are whole blocks of the dtype.
    pub fn add_tensor(&mut self, spec: TensorSpec) -> FrontendResult<()> {
        if spec.dims.len() > GGML_MAX_DIMS {
            return Err(internal(format!(
                "tensor {} has {} dims (at most {GGML_MAX_DIMS})",
                spec.name,
                spec.dims.len()
            )));
        }
        if ggml_type_id(spec.dtype).is_none() {
            return Err(FrontendError::unsupported(
                &spec.name,
                format!("stored as {}, a kiln format GGUF has no type for (export it with --type)", spec.dtype),
            ));
        }
        if self.tensors.iter().any(|t| t.name == spec.name) {
            return Err(internal(format!("duplicate tensor name {}", spec.name)));
        }
        let nbytes = spec.nbytes().ok_or_else(|| {
            internal(format!(
                "tensor {}: dims {:?} are not whole {}-element blocks of {} (or overflow)",
                spec.name,
                spec.dims,
                spec.dtype.block_elems(),
                spec.dtype
            ))
        })?;
        // Offsets are aligned when the header is laid out (the alignment may still change).
        self.ranges.push((0, nbytes));
        self.tensors.push(spec);
        Ok(())
    }

    /// The header, metadata, tensor infos and padding: everything before the
    /// data section. Also fixes each tensor's offset.
    fn layout(&mut self) -> FrontendResult<Vec<u8>> {
        let alignment = self.alignment()?;
        let mut end = 0u64;
        for r in &mut self.ranges {
            r.0 = end;
            end =
                r.0.checked_add(r.1)
                    .and_then(|e| e.checked_next_multiple_of(alignment))
                    .ok_or_else(|| internal("the data section size overflows 64 bits".into()))?;
        }
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value_type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        for (t, (offset, _)) in self.tensors.iter().zip(&self.ranges) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ggml_type_id(t.dtype).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        let data_start = (out.len() as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| internal("the header size overflows".into()))?;
        out.resize(data_start as usize, 0);
        Ok(out)
    }

    /// Bytes of the whole file once written.
    pub fn file_len(&mut self) -> FrontendResult<u64> {
        let head = self.layout()?.len() as u64;
        let data = self.ranges.last().map(|&(o, n)| o + n).unwrap_or(0);
        let alignment = self.alignment()?;
        Ok(head + data.next_multiple_of(alignment))
    }

    /// Streams the file to `w`. `data(i)` gives tensor `i`'s bytes (called once
    /// per tensor, in order, so a caller can convert tensors one at a time).
    pub fn write_to<'a, E: From<FrontendError>>(
        &mut self,
        w: &mut dyn Write,
        file: &Path,
        data: &mut dyn FnMut(usize) -> Result<Cow<'a, [u8]>, E>,
    ) -> Result<u64, E> {
        let io = |source| FrontendError::Io { file: file.to_path_buf(), source };
        let head = self.layout()?;
        let alignment = self.alignment()?;
        w.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        let zeros = vec![0u8; alignment as usize];
        for i in 0..self.tensors.len() {
            let bytes = data(i)?;
            let (_, nbytes) = self.ranges[i];
            if bytes.len() as u64 != nbytes {
                return Err(internal(format!(
                    "tensor {}: {} bytes given, {} {:?} needs {nbytes}",
                    self.tensors[i].name,
                    bytes.len(),
                    self.tensors[i].dtype,
                    self.tensors[i].dims
                ))
                .into());
            }
            w.write_all(&bytes).map_err(io)?;
            let pad = nbytes.next_multiple_of(alignment) - nbytes;
            w.write_all(&zeros[..pad as usize]).map_err(io)?;
            written += nbytes + pad;
        }
        w.flush().map_err(io)?;
        Ok(written)
    }

    /// The whole file in memory (small files and tests); `data` holds each tensor's bytes in order.
    pub fn to_bytes(&mut self, data: &[&[u8]]) -> FrontendResult<Vec<u8>> {
        if data.len() != self.tensors.len() {
            return Err(internal(format!("{} data buffers for {} tensors", data.len(), self.tensors.len())));
        }
        let mut out = Vec::new();
        self.write_to(&mut out, Path::new("<memory>"), &mut |i| Ok::<_, FrontendError>(Cow::Borrowed(data[i])))?;
        Ok(out)
    }

    /// Writes the file to `path` atomically: into a temporary file in the same
    /// directory, synced, then renamed over `path`. On any error (including one
    /// from `data`) the temporary file is removed and `path` is untouched. The
    /// directory must exist. Returns the file's size.
    pub fn write_file<'a, E: From<FrontendError>>(
        &mut self,
        path: &Path,
        data: &mut dyn FnMut(usize) -> Result<Cow<'a, [u8]>, E>,
    ) -> Result<u64, E> {
        let tmp = temp_path(path)?;
        let result = (|| {
            let io = |source| FrontendError::Io { file: path.to_path_buf(), source };
            let f = File::create(&tmp).map_err(io)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            let n = self.write_to(&mut w, path, data)?;
            let f = w.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            drop(f);
            fs::rename(&tmp, path).map_err(io)?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// `DIR/.NAME.tmp-PID` beside `path`, after checking `DIR` is an existing directory.
fn temp_path(path: &Path) -> FrontendResult<PathBuf> {
    let bad = |msg: String| FrontendError::bad(path, msg);
    let name = path.file_name().ok_or_else(|| bad("the output path names no file".into()))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad(format!("cannot write: {} is not a directory", dir.display()))),
        Err(e) => return Err(bad(format!("cannot write: directory {}: {e}", dir.display()))),
    }
    if path.is_dir() {
        return Err(bad("cannot write: it is a directory".into()));
    }
    Ok(dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF value type id of a value (the reader's numbering).
fn value_type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn array_elem_type_id(a: &MetaArray) -> u32 {
    match a {
        MetaArray::U8(_) => 0,
        MetaArray::I8(_) => 1,
        MetaArray::U16(_) => 2,
        MetaArray::I16(_) => 3,
        MetaArray::U32(_) => 4,
        MetaArray::I32(_) => 5,
        MetaArray::F32(_) => 6,
        MetaArray::Bool(_) => 7,
        MetaArray::String(_) => 8,
        MetaArray::Array(_) => 9,
        MetaArray::U64(_) => 10,
        MetaArray::I64(_) => 11,
        MetaArray::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

/// An array: element type, count, then the elements (nested arrays carry their own type and count).
fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&array_elem_type_id(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! fixed {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => fixed!(v),
        MetaArray::U16(v) => fixed!(v),
        MetaArray::I16(v) => fixed!(v),
        MetaArray::U32(v) => fixed!(v),
        MetaArray::I32(v) => fixed!(v),
        MetaArray::U64(v) => fixed!(v),
        MetaArray::I64(v) => fixed!(v),
        MetaArray::F32(v) => fixed!(v),
        MetaArray::F64(v) => fixed!(v),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        MetaArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        MetaArray::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn every_type_metadata() -> Vec<(&'static str, MetaValue)> {
        vec![
            ("general.architecture", MetaValue::String("llama".into())),
            ("t.u8", MetaValue::U8(250)),
            ("t.i8", MetaValue::I8(-7)),
            ("t.u16", MetaValue::U16(65000)),
            ("t.i16", MetaValue::I16(-30000)),
            ("t.u32", MetaValue::U32(4_000_000_000)),
            ("t.i32", MetaValue::I32(-2_000_000_000)),
            ("t.u64", MetaValue::U64(u64::MAX - 1)),
            ("t.i64", MetaValue::I64(i64::MIN + 3)),
            ("t.f32", MetaValue::F32(-1.5e-7)),
            ("t.f64", MetaValue::F64(std::f64::consts::PI)),
            ("t.bool.true", MetaValue::Bool(true)),
            ("t.bool.false", MetaValue::Bool(false)),
            ("t.str.empty", MetaValue::String(String::new())),
            ("t.str.utf8", MetaValue::String("{% if x %}héllo ✓ 世界\n{% endif %}".into())),
            ("t.arr.u8", MetaValue::Array(MetaArray::U8(vec![0, 1, 255]))),
            ("t.arr.i8", MetaValue::Array(MetaArray::I8(vec![-128, 0, 127]))),
            ("t.arr.u16", MetaValue::Array(MetaArray::U16(vec![1, 65535]))),
            ("t.arr.i16", MetaValue::Array(MetaArray::I16(vec![-32768, 32767]))),
            ("t.arr.u32", MetaValue::Array(MetaArray::U32(vec![7, u32::MAX]))),
            ("t.arr.i32", MetaValue::Array(MetaArray::I32(vec![-1, 1, 3, i32::MIN]))),
            ("t.arr.u64", MetaValue::Array(MetaArray::U64(vec![u64::MAX]))),
            ("t.arr.i64", MetaValue::Array(MetaArray::I64(vec![i64::MIN, -1]))),
            ("t.arr.f32", MetaValue::Array(MetaArray::F32(vec![0.0, -0.0, 1e30, f32::MIN_POSITIVE]))),
            ("t.arr.f64", MetaValue::Array(MetaArray::F64(vec![1e-300, -2.5]))),
            ("t.arr.bool", MetaValue::Array(MetaArray::Bool(vec![true, false, true]))),
            ("t.arr.str", MetaValue::Array(MetaArray::String(vec!["a".into(), String::new(), "Ġthe ✓".into()]))),
            ("t.arr.empty", MetaValue::Array(MetaArray::String(vec![]))),
            (
                "t.arr.nested",
                MetaValue::Array(MetaArray::Array(vec![
                    MetaArray::U32(vec![1, 2]),
                    MetaArray::String(vec!["x".into()]),
                    MetaArray::Array(vec![MetaArray::F32(vec![0.5])]),
                    MetaArray::I64(vec![]),
                ])),
            ),
        ]
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Deterministic pseudo-random bytes (valid for any quantized block layout the reader checks).
    fn junk(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as u8
            })
            .collect()
    }

    /// Tensors of several dtypes and ranks, with their data.
    fn sample_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
        let spec = |name: &str, dtype, dims: &[u64]| TensorSpec { name: name.into(), dtype, dims: dims.to_vec() };
        let mut out = vec![(spec("norm.weight", DType::F32, &[5]), f32_bytes(&[1.0, -2.0, 3.5, 0.25, 1e-3]))];
        for (i, (name, dtype, dims)) in [
            ("a.f16", DType::F16, vec![3u64, 2]),
            ("a.bf16", DType::BF16, vec![4, 1, 2]),
            ("a.q4_0", DType::Q4_0, vec![64, 3]),
            ("a.q4_1", DType::Q4_1, vec![32, 2]),
            ("a.q5_0", DType::Q5_0, vec![32, 1]),
            ("a.q5_1", DType::Q5_1, vec![96, 2]),
            ("a.q8_0", DType::Q8_0, vec![32, 5]),
            ("a.q2_k", DType::Q2K, vec![256, 1]),
            ("a.q3_k", DType::Q3K, vec![256, 2]),
            ("a.q4_k", DType::Q4K, vec![512, 1]),
            ("a.q5_k", DType::Q5K, vec![256, 1]),
            ("a.q6_k", DType::Q6K, vec![256, 3]),
            ("a.i32", DType::I32, vec![7]),
            ("a.4d", DType::F32, vec![2, 1, 3, 2]),
            ("empty", DType::F32, vec![0, 4]),
        ]
        .into_iter()
        .enumerate()
        {
            let s = spec(name, dtype, &dims);
            let n = s.nbytes().unwrap() as usize;
            out.push((s, junk(n, i as u32)));
        }
        out
    }

    fn build(meta: &[(&str, MetaValue)], tensors: &[(TensorSpec, Vec<u8>)]) -> (GgufWriter, Vec<u8>) {
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.set(*k, v.clone());
        }
        for (t, _) in tensors {
            w.add_tensor(t.clone()).unwrap();
        }
        let data: Vec<&[u8]> = tensors.iter().map(|(_, d)| d.as_slice()).collect();
        let bytes = w.to_bytes(&data).unwrap();
        (w, bytes)
    }

    #[test]
    fn metadata_of_every_type_round_trips() {
        let meta = every_type_metadata();
        let (_, bytes) = build(&meta, &[]);
        let f = GgufFile::from_bytes("meta.gguf", bytes).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.metadata().len(), meta.len());
        for (k, v) in &meta {
            assert_eq!(f.metadata().get(*k), Some(v), "{k}");
        }
        assert!(f.tensors().is_empty());
    }

    #[test]
    fn tensors_of_several_dtypes_round_trip() {
        let tensors = sample_tensors();
        for alignment in [None, Some(MetaValue::U32(64)), Some(MetaValue::U32(8))] {
            let mut meta = every_type_metadata();
            if let Some(a) = &alignment {
                meta.push(("general.alignment", a.clone()));
            }
            let (mut w, bytes) = build(&meta, &tensors);
            assert_eq!(w.file_len().unwrap(), bytes.len() as u64);
            let f = GgufFile::from_bytes("t.gguf", bytes).unwrap();
            let align = alignment.as_ref().and_then(MetaValue::as_u64).unwrap_or(32);
            assert_eq!(f.alignment(), align);
            assert_eq!(f.data_offset() % align, 0);
            assert_eq!(f.tensors().len(), tensors.len());
            for ((spec, data), info) in tensors.iter().zip(f.tensors()) {
                assert_eq!(info.name, spec.name);
                assert_eq!(info.dtype, spec.dtype);
                assert_eq!(info.dims, spec.dims);
                assert_eq!(info.offset % align, 0, "{}", spec.name);
                assert_eq!(f.tensor_data(info), data.as_slice(), "{}", spec.name);
            }
            for (k, v) in &meta {
                assert_eq!(f.metadata().get(*k), Some(v), "{k}");
            }
        }
    }

    #[test]
    fn output_is_deterministic_and_independent_of_key_order() {
        let tensors = sample_tensors();
        let meta = every_type_metadata();
        let (_, a) = build(&meta, &tensors);
        let mut rev = meta.clone();
        rev.reverse();
        let (_, b) = build(&rev, &tensors);
        assert_eq!(a, b);
        // Rewriting what was read gives the same bytes again.
        let f = GgufFile::from_bytes("a.gguf", a.clone()).unwrap();
        let mut w = GgufWriter::with_metadata(f.metadata().clone());
        for t in f.tensors() {
            w.add_tensor(TensorSpec { name: t.name.clone(), dtype: t.dtype, dims: t.dims.clone() }).unwrap();
        }
        let data: Vec<&[u8]> = f.tensors().iter().map(|t| f.tensor_data(t)).collect();
        assert_eq!(w.to_bytes(&data).unwrap(), a);
    }

    #[test]
    fn rejects_bad_tensors_and_data() {
        let spec = |name: &str, dtype, dims: &[u64]| TensorSpec { name: name.into(), dtype, dims: dims.to_vec() };
        let mut w = GgufWriter::new();
        w.add_tensor(spec("x", DType::F32, &[4])).unwrap();
        assert!(w.add_tensor(spec("x", DType::F32, &[4])).is_err(), "duplicate name");
        assert!(w.add_tensor(spec("q", DType::Q8_0, &[33, 2])).is_err(), "partial block");
        assert!(w.add_tensor(spec("d", DType::F32, &[1, 1, 1, 1, 1])).is_err(), "five dims");
        assert!(w.add_tensor(spec("o", DType::F32, &[u64::MAX, 4])).is_err(), "overflow");
        let err = w.to_bytes(&[&[0u8; 15]]).unwrap_err();
        assert!(err.to_string().contains("15 bytes given"), "{err}");
        assert!(w.to_bytes(&[]).is_err(), "missing data");
        w.set("general.alignment", MetaValue::U32(24));
        assert!(w.to_bytes(&[&[0u8; 16]]).unwrap_err().to_string().contains("power of two"));
    }

    fn test_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-gguf-write-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn dir_entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn writes_files_atomically() {
        let d = test_dir("atomic");
        let tensors = sample_tensors();
        let (mut w, want) = build(&every_type_metadata(), &tensors);
        let out = d.join("m.gguf");
        let n = w.write_file(&out, &mut |i| Ok::<_, FrontendError>(Cow::Borrowed(tensors[i].1.as_slice()))).unwrap();
        assert_eq!(n, want.len() as u64);
        assert_eq!(fs::read(&out).unwrap(), want);
        let opened = GgufFile::open(&out).unwrap();
        assert_eq!(opened.tensors().len(), tensors.len());

        // A failing data source half way leaves the old file untouched and no temporary file.
        let err = w
            .write_file(&out, &mut |i| {
                if i == 3 { Err(FrontendError::Internal("boom".into())) } else { Ok(Cow::Borrowed(&tensors[i].1[..])) }
            })
            .unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(fs::read(&out).unwrap(), want);
        assert_eq!(dir_entries(&d), vec!["m.gguf".to_string()]);

        // Same for a new path: nothing at all is left.
        let fresh = d.join("new.gguf");
        let _ = w.write_file(&fresh, &mut |_| Ok::<_, FrontendError>(Cow::Borrowed(&[0u8][..]))).unwrap_err();
        assert!(!fresh.exists());
        assert_eq!(dir_entries(&d), vec!["m.gguf".to_string()]);

        // A missing directory, or a file where the directory should be, is a clear error.
        let missing = d.join("no-such-dir").join("x.gguf");
        let err =
            w.write_file(&missing, &mut |i| Ok::<_, FrontendError>(Cow::Borrowed(&tensors[i].1[..]))).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        let under_file = out.join("x.gguf");
        let err =
            w.write_file(&under_file, &mut |i| Ok::<_, FrontendError>(Cow::Borrowed(&tensors[i].1[..]))).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert_eq!(dir_entries(&d), vec!["m.gguf".to_string()]);
        let _ = fs::remove_dir_all(&d);
    }
}
