//! Memory-mapped reader for GGUF v2/v3 model files: header, metadata, tensor directory, with every count, size and offset checked against hostile input.
//!
//! Layout (little-endian): `"GGUF"`, `u32` version, `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos
//! (`name`, `u32` n_dims, `u64` dims, `u32` ggml type, `u64` offset relative
//! to the data section), padding to `general.alignment` (default 32), then
//! the tensor data.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use kiln_ir::DType;
use thiserror::Error;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Most dimensions a ggml tensor can have.
pub const GGML_MAX_DIMS: usize = 4;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of metadata arrays accepted (arrays of arrays of ...).
pub const MAX_ARRAY_NESTING: usize = 8;

/// Bytes of the fixed header (magic, version, tensor count, metadata count).
const HEADER_BYTES: usize = 24;
/// Smallest encoding of one metadata pair: empty key, type, one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: empty name, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Why a GGUF file could not be read. Every message starts with the file path.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a GGUF file: starts with {found:02x?}, expected \"GGUF\"")]
    BadMagic { file: PathBuf, found: Vec<u8> },
    #[error("{file}: big-endian GGUF files are not supported")]
    BigEndian { file: PathBuf },
    #[error("{file}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { file: PathBuf, version: u32 },
    #[error("{file}: truncated: {what} ends at byte {end} but the file has {len} bytes")]
    Truncated { file: PathBuf, what: String, end: u128, len: u64 },
    #[error(
        "{file}: {what} claims {count} entries of at least {min_bytes} bytes each, \
         but only {remaining} bytes remain"
    )]
    ImplausibleCount { file: PathBuf, what: String, count: u64, min_bytes: u64, remaining: u64 },
    #[error("{file}: {what} has unknown metadata value type {type_id}")]
    BadValueType { file: PathBuf, what: String, type_id: u32 },
    #[error("{file}: {what} nests arrays deeper than {MAX_ARRAY_NESTING} levels")]
    NestingTooDeep { file: PathBuf, what: String },
    #[error("{file}: {what} has invalid boolean byte {byte:#04x} (expected 0 or 1)")]
    InvalidBool { file: PathBuf, what: String, byte: u8 },
    #[error("{file}: {what} is not valid UTF-8")]
    InvalidUtf8 { file: PathBuf, what: String },
    #[error("{file}: duplicate metadata key \"{key}\"")]
    DuplicateKey { file: PathBuf, key: String },
    #[error("{file}: general.alignment is {value}; it must be a nonzero power of two")]
    BadAlignment { file: PathBuf, value: String },
    #[error("{file}: tensor \"{tensor}\" has {n_dims} dimensions; at most {GGML_MAX_DIMS} are supported")]
    TooManyDims { file: PathBuf, tensor: String, n_dims: u32 },
    #[error("{file}: tensor \"{tensor}\" has unsupported ggml type id {type_id}")]
    UnsupportedType { file: PathBuf, tensor: String, type_id: u32 },
    #[error("{file}: tensor \"{tensor}\" has bad shape {dims:?}: {problem}")]
    BadShape { file: PathBuf, tensor: String, dims: Vec<u64>, problem: String },
    #[error("{file}: tensor \"{tensor}\" data offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor { file: PathBuf, tensor: String, offset: u64, alignment: u64 },
    #[error("{file}: tensor \"{tensor}\" data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    TensorOutOfBounds { file: PathBuf, tensor: String, start: u128, end: u128, len: u64 },
    #[error("{file}: duplicate tensor name \"{tensor}\"")]
    DuplicateTensor { file: PathBuf, tensor: String },
    #[error(
        "{file}: tensor \"{second}\" data starting at byte {second_start} overlaps \
         tensor \"{first}\" data [{first_start}, {first_end})"
    )]
    OverlappingTensors {
        file: PathBuf,
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
    },
    #[error("{file}: the data section offset overflows (alignment {alignment})")]
    DataOffsetOverflow { file: PathBuf, alignment: u64 },
    #[error("{file}: metadata key \"{key}\" is missing")]
    MissingKey { file: PathBuf, key: String },
    #[error("{file}: metadata key \"{key}\" is {found}, expected {expected}")]
    WrongType { file: PathBuf, key: String, expected: &'static str, found: String },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

/// A metadata array: all elements share one type, stored unboxed.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
}

impl MetaValue {
    /// The GGUF name of the value's type, e.g. `u32` or `array of string`.
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("array of {}", a.elem_type_name()),
            _ => scalar_type_name(self).to_string(),
        }
    }

    /// The value as a `u64`, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

fn scalar_type_name(v: &MetaValue) -> &'static str {
    match v {
        MetaValue::U8(_) => "u8",
        MetaValue::I8(_) => "i8",
        MetaValue::U16(_) => "u16",
        MetaValue::I16(_) => "i16",
        MetaValue::U32(_) => "u32",
        MetaValue::I32(_) => "i32",
        MetaValue::U64(_) => "u64",
        MetaValue::I64(_) => "i64",
        MetaValue::F32(_) => "f32",
        MetaValue::F64(_) => "f64",
        MetaValue::Bool(_) => "bool",
        MetaValue::String(_) => "string",
        MetaValue::Array(_) => "array",
    }
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type (`array` for nested arrays).
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F32(_) => "f32",
            MetaArray::F64(_) => "f64",
            MetaArray::Bool(_) => "bool",
            MetaArray::String(_) => "string",
            MetaArray::Array(_) => "array",
        }
    }
}

/// One tensor of the file's directory, validated against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: u64,
}

impl TensorInfo {
    /// Number of elements (the product of `dims`; 1 for a scalar).
    pub fn n_elements(&self) -> u64 {
        // Validated not to overflow when the file was opened.
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// The ggml type id → [`DType`] mapping (`None` for types kiln does not support).
pub fn dtype_from_ggml(type_id: u32) -> Option<DType> {
    Some(match type_id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2K,
        11 => DType::Q3K,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        20 => DType::IQ4NL,
        26 => DType::I32,
        30 => DType::BF16,
        _ => return None,
    })
}

/// The ggml type id of a [`DType`] (inverse of [`dtype_from_ggml`]); `None`
/// for kiln's own formats and FP8, which GGUF cannot hold.
pub fn ggml_type_id(dtype: DType) -> Option<u32> {
    Some(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q2K => 10,
        DType::Q3K => 11,
        DType::Q4K => 12,
        DType::Q5K => 13,
        DType::Q6K => 14,
        DType::IQ4NL => 20,
        DType::I32 => 26,
        DType::BF16 => 30,
        DType::KQ2 | DType::F8E4M3 => return None,
    })
}

/// The bytes of the file: a read-only memory map, or an owned buffer.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.bytes.len())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io { file: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. As with
            // any memory-mapped file, another process truncating or rewriting
            // the file while it is open is outside what this reader guards.
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Validates a GGUF image already in memory; `path` is only used in
    /// error messages and [`GgufFile::path`].
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile, GgufError> {
        let parsed = Parser::new(&bytes, &path).parse()?;
        Ok(GgufFile {
            path,
            bytes,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            index: parsed.index,
            tensors: parsed.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (from `general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The whole file image.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The data bytes of a tensor of this file (a slice of the map). The
    /// ranges of this file's tensors were checked when it was opened; a
    /// `TensorInfo` whose range lies outside this file gets an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset)
            .ok()
            .zip(usize::try_from(info.nbytes).ok())
            .and_then(|(start, n)| Some(start..start.checked_add(n)?));
        range.and_then(|r| self.bytes.get(r)).unwrap_or(&[])
    }

    /// The metadata value of `key`, or a missing-key error.
    pub fn get(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { file: self.path.clone(), key: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::WrongType { file: self.path.clone(), key: key.to_string(), expected, found }
    }

    /// A non-negative integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64().ok_or_else(|| {
            let found = match v {
                MetaValue::I8(_) | MetaValue::I16(_) | MetaValue::I32(_) | MetaValue::I64(_) => {
                    format!("the negative {} {}", v.type_name(), display_scalar(v))
                }
                _ => v.type_name(),
            };
            self.wrong_type(key, "a non-negative integer", found)
        })
    }

    /// An `f32`, or an `f64` rounded to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.get(key)? {
            MetaValue::F32(v) => Ok(*v),
            MetaValue::F64(v) => Ok(*v as f32),
            v => Err(self.wrong_type(key, "f32 or f64", v.type_name())),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            MetaValue::Bool(v) => Ok(*v),
            v => Err(self.wrong_type(key, "bool", v.type_name())),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            MetaValue::String(v) => Ok(v),
            v => Err(self.wrong_type(key, "string", v.type_name())),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        match self.get(key)? {
            MetaValue::Array(MetaArray::String(v)) => Ok(v),
            v => Err(self.wrong_type(key, "array of string", v.type_name())),
        }
    }

    /// An array of `f32`, or of `f64` rounded to `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        match self.get(key)? {
            MetaValue::Array(MetaArray::F32(v)) => Ok(v.clone()),
            MetaValue::Array(MetaArray::F64(v)) => Ok(v.iter().map(|&x| x as f32).collect()),
            v => Err(self.wrong_type(key, "array of f32 or f64", v.type_name())),
        }
    }

    /// An array of integers of any width whose every element fits in `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        fn conv<T: Copy>(v: &[T]) -> Option<Vec<i32>>
        where
            i32: TryFrom<T>,
        {
            v.iter().map(|&x| i32::try_from(x).ok()).collect()
        }
        const EXPECTED: &str = "array of integers within the i32 range";
        let v = self.get(key)?;
        let MetaValue::Array(a) = v else {
            return Err(self.wrong_type(key, EXPECTED, v.type_name()));
        };
        let out = match a {
            MetaArray::U8(v) => conv(v),
            MetaArray::I8(v) => conv(v),
            MetaArray::U16(v) => conv(v),
            MetaArray::I16(v) => conv(v),
            MetaArray::U32(v) => conv(v),
            MetaArray::I32(v) => Some(v.clone()),
            MetaArray::U64(v) => conv(v),
            MetaArray::I64(v) => conv(v),
            _ => return Err(self.wrong_type(key, EXPECTED, v.type_name())),
        };
        out.ok_or_else(|| self.wrong_type(key, EXPECTED, format!("{} with an out-of-range element", v.type_name())))
    }
}

fn display_scalar(v: &MetaValue) -> String {
    match v {
        MetaValue::I8(x) => x.to_string(),
        MetaValue::I16(x) => x.to_string(),
        MetaValue::I32(x) => x.to_string(),
        MetaValue::I64(x) => x.to_string(),
        _ => String::new(),
    }
}

/// What is being read, for error messages (formatted only on error).
#[derive(Clone, Copy)]
enum Item<'a> {
    Header,
    Key(u64),
    Value(&'a str),
    TensorInfo(u64),
}

impl fmt::Display for Item<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Header => f.write_str("the header"),
            Item::Key(i) => write!(f, "metadata key {i}"),
            Item::Value(k) => write!(f, "the value of metadata key \"{k}\""),
            Item::TensorInfo(i) => write!(f, "tensor info {i}"),
        }
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a Path,
}

macro_rules! read_le {
    ($name:ident, $t:ty) => {
        fn $name(&mut self, item: Item<'_>) -> Result<$t, GgufError> {
            let b = self.take_array::<{ size_of::<$t>() }>(item)?;
            Ok(<$t>::from_le_bytes(b))
        }
    };
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8], file: &'a Path) -> Self {
        Parser { buf, pos: 0, file }
    }

    fn file(&self) -> PathBuf {
        self.file.to_path_buf()
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, item: Item<'_>, n: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file(),
            what: item.to_string(),
            end: self.pos as u128 + u128::from(n),
            len: self.buf.len() as u64,
        }
    }

    fn take(&mut self, n: u64, item: Item<'_>) -> Result<&'a [u8], GgufError> {
        let len = usize::try_from(n).ok().filter(|&n| n <= self.remaining()).ok_or_else(|| self.truncated(item, n))?;
        let s = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self, item: Item<'_>) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, item)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    read_le!(u8, u8);
    read_le!(i8, i8);
    read_le!(u16, u16);
    read_le!(i16, i16);
    read_le!(u32, u32);
    read_le!(i32, i32);
    read_le!(u64, u64);
    read_le!(i64, i64);
    read_le!(f32, f32);
    read_le!(f64, f64);

    fn bool(&mut self, item: Item<'_>) -> Result<bool, GgufError> {
        match self.u8(item)? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool { file: self.file(), what: item.to_string(), byte }),
        }
    }

    fn string(&mut self, item: Item<'_>) -> Result<String, GgufError> {
        let n = self.u64(item)?;
        let bytes = self.take(n, item)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { file: self.file(), what: item.to_string() })
    }

    /// Checks that `count` entries of at least `min_bytes` each can fit in
    /// the rest of the file, so allocating `count` entries is bounded by the
    /// file size.
    fn bounded_count(&self, count: u64, min_bytes: u64, what: impl FnOnce() -> String) -> Result<usize, GgufError> {
        let remaining = self.remaining() as u64;
        match usize::try_from(count) {
            Ok(n) if count <= remaining / min_bytes => Ok(n),
            _ => Err(GgufError::ImplausibleCount { file: self.file(), what: what(), count, min_bytes, remaining }),
        }
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        let magic = self.buf.get(..4).unwrap_or(self.buf);
        if magic != GGUF_MAGIC {
            if magic.len() < 4 && GGUF_MAGIC.starts_with(magic) {
                return Err(self.truncated(Item::Header, HEADER_BYTES as u64));
            }
            return Err(GgufError::BadMagic { file: self.file(), found: magic.to_vec() });
        }
        if self.buf.len() < HEADER_BYTES {
            return Err(self.truncated(Item::Header, HEADER_BYTES as u64));
        }
        self.pos = 4;
        let version = self.u32(Item::Header)?;
        match version {
            2 | 3 => {}
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(GgufError::BigEndian { file: self.file() });
            }
            _ => {
                return Err(GgufError::UnsupportedVersion { file: self.file(), version });
            }
        }
        let n_tensors = self.u64(Item::Header)?;
        let n_kv = self.u64(Item::Header)?;

        let n_kv = self.bounded_count(n_kv, MIN_KV_BYTES, || "the header's metadata count".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv as u64 {
            let key = self.string(Item::Key(i))?;
            let value = self.value(Item::Value(&key))?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey { file: self.file(), key });
            }
            metadata.insert(key, value);
        }
        let alignment = self.alignment(&metadata)?;

        let n_tensors = self.bounded_count(n_tensors, MIN_TENSOR_INFO_BYTES, || "the header's tensor count".into())?;
        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors as u64 {
            raw.push(self.tensor_info(Item::TensorInfo(i))?);
        }

        let data_offset = (self.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| GgufError::DataOffsetOverflow { file: self.file(), alignment })?;
        let (tensors, index) = self.check_tensors(raw, data_offset, alignment)?;
        Ok(Parsed { version, alignment, data_offset, metadata, tensors, index })
    }

    fn alignment(&self, metadata: &BTreeMap<String, MetaValue>) -> Result<u64, GgufError> {
        let Some(v) = metadata.get("general.alignment") else {
            return Ok(DEFAULT_ALIGNMENT);
        };
        match v.as_u64() {
            Some(a) if a.is_power_of_two() => Ok(a),
            _ => Err(GgufError::BadAlignment { file: self.file(), value: format!("{v:?}") }),
        }
    }

    fn value(&mut self, item: Item<'_>) -> Result<MetaValue, GgufError> {
        let type_id = self.u32(item)?;
        self.value_of_type(type_id, item, 0)
    }

    fn value_of_type(&mut self, type_id: u32, item: Item<'_>, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.u8(item)?),
            1 => MetaValue::I8(self.i8(item)?),
            2 => MetaValue::U16(self.u16(item)?),
            3 => MetaValue::I16(self.i16(item)?),
            4 => MetaValue::U32(self.u32(item)?),
            5 => MetaValue::I32(self.i32(item)?),
            6 => MetaValue::F32(self.f32(item)?),
            7 => MetaValue::Bool(self.bool(item)?),
            8 => MetaValue::String(self.string(item)?),
            9 => MetaValue::Array(self.array(item, depth)?),
            10 => MetaValue::U64(self.u64(item)?),
            11 => MetaValue::I64(self.i64(item)?),
            12 => MetaValue::F64(self.f64(item)?),
            _ => return Err(self.bad_type(item, type_id)),
        })
    }

    fn bad_type(&self, item: Item<'_>, type_id: u32) -> GgufError {
        GgufError::BadValueType { file: self.file(), what: item.to_string(), type_id }
    }

    fn array(&mut self, item: Item<'_>, depth: usize) -> Result<MetaArray, GgufError> {
        if depth >= MAX_ARRAY_NESTING {
            return Err(GgufError::NestingTooDeep { file: self.file(), what: item.to_string() });
        }
        let elem_type = self.u32(item)?;
        let count = self.u64(item)?;
        let min_bytes = match elem_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => return Err(self.bad_type(item, elem_type)),
        };
        let n = self.bounded_count(count, min_bytes, || format!("the array in {item}"))?;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let bytes = self.take(n as u64 * min_bytes, item)?;
                MetaArray::$variant(
                    bytes.as_chunks::<{ size_of::<$t>() }>().0.iter().map(|c| <$t>::from_le_bytes(*c)).collect(),
                )
            }};
        }
        Ok(match elem_type {
            0 => MetaArray::U8(self.take(n as u64, item)?.to_vec()),
            1 => fixed!(I8, i8),
            2 => fixed!(U16, u16),
            3 => fixed!(I16, i16),
            4 => fixed!(U32, u32),
            5 => fixed!(I32, i32),
            6 => fixed!(F32, f32),
            10 => fixed!(U64, u64),
            11 => fixed!(I64, i64),
            12 => fixed!(F64, f64),
            7 => MetaArray::Bool((0..n).map(|_| self.bool(item)).collect::<Result<_, _>>()?),
            8 => MetaArray::String((0..n).map(|_| self.string(item)).collect::<Result<_, _>>()?),
            _ => MetaArray::Array((0..n).map(|_| self.array(item, depth + 1)).collect::<Result<_, _>>()?),
        })
    }

    fn tensor_info(&mut self, item: Item<'_>) -> Result<RawTensor, GgufError> {
        let name = self.string(item)?;
        let n_dims = self.u32(item)?;
        if n_dims as usize > GGML_MAX_DIMS {
            return Err(GgufError::TooManyDims { file: self.file(), tensor: name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(item)?);
        }
        let type_id = self.u32(item)?;
        let rel_offset = self.u64(item)?;
        Ok(RawTensor { name, dims, type_id, rel_offset })
    }

    fn check_tensors(
        &self,
        raw: Vec<RawTensor>,
        data_offset: u64,
        alignment: u64,
    ) -> Result<(Vec<TensorInfo>, HashMap<String, usize>), GgufError> {
        let len = self.buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for RawTensor { name, dims, type_id, rel_offset } in raw {
            let Some(dtype) = dtype_from_ggml(type_id) else {
                return Err(GgufError::UnsupportedType { file: self.file(), tensor: name, type_id });
            };
            let bad_shape = |problem: String| GgufError::BadShape {
                file: self.file(),
                tensor: name.clone(),
                dims: dims.clone(),
                problem,
            };
            if dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_none() {
                return Err(bad_shape("the element count overflows 64 bits".into()));
            }
            let row = dims.first().copied().unwrap_or(1);
            let rows = dims.iter().skip(1).product::<u64>();
            let Some(row_bytes) = dtype.row_bytes(row) else {
                return Err(bad_shape(format!(
                    "the innermost dimension {row} is not a multiple of the {dtype} block size {}",
                    dtype.block_elems()
                )));
            };
            let Some(nbytes) = row_bytes.checked_mul(rows) else {
                return Err(bad_shape("the byte size overflows 64 bits".into()));
            };
            if !rel_offset.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor {
                    file: self.file(),
                    tensor: name,
                    offset: rel_offset,
                    alignment,
                });
            }
            let start = u128::from(data_offset) + u128::from(rel_offset);
            let end = start + u128::from(nbytes);
            if end > u128::from(len) {
                return Err(GgufError::TensorOutOfBounds { file: self.file(), tensor: name, start, end, len });
            }
            if index.contains_key(&name) {
                return Err(GgufError::DuplicateTensor { file: self.file(), tensor: name });
            }
            index.insert(name.clone(), tensors.len());
            // start < end <= len, which fits in u64.
            tensors.push(TensorInfo { name, dtype, dims, offset: start as u64, nbytes });
        }

        let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.nbytes > 0).collect();
        order.sort_by_key(|t| t.offset);
        for pair in order.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            // No overflow: both ranges were checked against the file size.
            if b.offset < a.offset + a.nbytes {
                return Err(GgufError::OverlappingTensors {
                    file: self.file(),
                    first: a.name.clone(),
                    first_start: a.offset,
                    first_end: a.offset + a.nbytes,
                    second: b.name.clone(),
                    second_start: b.offset,
                });
            }
        }
        Ok((tensors, index))
    }
}

struct RawTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    rel_offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny GGUF writer for building test files by hand.
    #[derive(Clone)]
    struct Writer {
        version: u32,
        n_tensors_override: Option<u64>,
        n_kv_override: Option<u64>,
        kvs: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, u64)>,
        alignment: usize,
        data: Vec<u8>,
    }

    fn str_bytes(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    fn array_bytes(elem_type: u32, count: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = elem_type.to_le_bytes().to_vec();
        v.extend(count.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    impl Writer {
        fn new(version: u32) -> Self {
            Writer {
                version,
                n_tensors_override: None,
                n_kv_override: None,
                kvs: Vec::new(),
                tensors: Vec::new(),
                alignment: 32,
                data: Vec::new(),
            }
        }

        fn kv(mut self, key: &str, type_id: u32, value: Vec<u8>) -> Self {
            self.kvs.push((key.to_string(), type_id, value));
            self
        }

        fn kv_str(self, key: &str, value: &str) -> Self {
            self.kv(key, 8, str_bytes(value.as_bytes()))
        }

        fn kv_u32(self, key: &str, value: u32) -> Self {
            self.kv(key, 4, value.to_le_bytes().to_vec())
        }

        /// Adds a tensor whose data is `data`, placed at the next aligned offset.
        fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: &[u8]) -> Self {
            let off = self.data.len().next_multiple_of(self.alignment);
            self.data.resize(off, 0);
            self.data.extend_from_slice(data);
            self.tensors.push((name.to_string(), dims.to_vec(), type_id, off as u64));
            self
        }

        /// Adds a tensor info only (offset given, no data).
        fn tensor_info(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
            self.tensors.push((name.to_string(), dims.to_vec(), type_id, offset));
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = GGUF_MAGIC.to_vec();
            b.extend(self.version.to_le_bytes());
            b.extend(self.n_tensors_override.unwrap_or(self.tensors.len() as u64).to_le_bytes());
            b.extend(self.n_kv_override.unwrap_or(self.kvs.len() as u64).to_le_bytes());
            for (k, t, v) in &self.kvs {
                b.extend(str_bytes(k.as_bytes()));
                b.extend(t.to_le_bytes());
                b.extend(v);
            }
            for (name, dims, t, off) in &self.tensors {
                b.extend(str_bytes(name.as_bytes()));
                b.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    b.extend(d.to_le_bytes());
                }
                b.extend(t.to_le_bytes());
                b.extend(off.to_le_bytes());
            }
            b.resize(b.len().next_multiple_of(self.alignment), 0);
            b.extend(&self.data);
            b
        }

        fn parse(&self) -> Result<GgufFile, GgufError> {
            GgufFile::from_bytes("test.gguf", self.bytes())
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A valid file with every metadata type and three tensors.
    fn sample(version: u32) -> Writer {
        let mut q8 = vec![0x00, 0x3c]; // d = 1.0
        q8.extend((0..32).map(|i: i32| (i - 16) as i8 as u8));
        Writer::new(version)
            .kv_str("general.architecture", "llama")
            .kv("u8", 0, vec![200])
            .kv("i8", 1, vec![0xfe])
            .kv("u16", 2, 60000u16.to_le_bytes().to_vec())
            .kv("i16", 3, (-300i16).to_le_bytes().to_vec())
            .kv_u32("llama.block_count", 30)
            .kv("i32", 5, (-7i32).to_le_bytes().to_vec())
            .kv("f32", 6, 1.5f32.to_le_bytes().to_vec())
            .kv("flag", 7, vec![1])
            .kv("u64", 10, u64::MAX.to_le_bytes().to_vec())
            .kv("i64", 11, (-1i64).to_le_bytes().to_vec())
            .kv("f64", 12, 0.25f64.to_le_bytes().to_vec())
            .kv("tokens", 9, array_bytes(8, 3, &[str_bytes(b"a"), str_bytes(b""), str_bytes("é".as_bytes())].concat()))
            .kv("scores", 9, array_bytes(6, 2, &f32_bytes(&[0.5, -2.0])))
            .kv("types", 9, array_bytes(5, 3, &[1i32, -1, 6].map(i32::to_le_bytes).concat()))
            .kv("small", 9, array_bytes(0, 2, &[3, 4]))
            .kv("nested", 9, array_bytes(9, 2, &[array_bytes(0, 1, &[9]), array_bytes(7, 2, &[1, 0])].concat()))
            .tensor("norm", &[4], 0, &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))
            .tensor("embd", &[32, 1], 8, &q8)
            .tensor("empty", &[0, 3], 0, &[])
    }

    #[test]
    fn reads_valid_v3_and_v2_files() {
        for version in [2, 3] {
            let f = sample(version).parse().map_err(|e| e.to_string());
            let f = match f {
                Ok(f) => f,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(f.version(), version);
            assert_eq!(f.alignment(), 32);
            assert_eq!(f.data_offset() % 32, 0);
            assert_eq!(f.get_str("general.architecture").ok(), Some("llama"));
            assert_eq!(f.get_u64("llama.block_count").ok(), Some(30));
            assert_eq!(f.get_u64("u8").ok(), Some(200));
            assert_eq!(f.get_u64("u16").ok(), Some(60000));
            assert_eq!(f.get_u64("u64").ok(), Some(u64::MAX));
            assert_eq!(f.get("i8").ok(), Some(&MetaValue::I8(-2)));
            assert_eq!(f.get("i16").ok(), Some(&MetaValue::I16(-300)));
            assert_eq!(f.get("i64").ok(), Some(&MetaValue::I64(-1)));
            assert_eq!(f.get_f32("f32").ok(), Some(1.5));
            assert_eq!(f.get_f32("f64").ok(), Some(0.25));
            assert_eq!(f.get_bool("flag").ok(), Some(true));
            let tokens = f.get_str_array("tokens").map(<[String]>::to_vec).ok();
            assert_eq!(tokens, Some(vec!["a".to_string(), String::new(), "é".to_string()]));
            assert_eq!(f.get_f32_array("scores").ok(), Some(vec![0.5, -2.0]));
            assert_eq!(f.get_i32_array("types").ok(), Some(vec![1, -1, 6]));
            assert_eq!(f.get_i32_array("small").ok(), Some(vec![3, 4]));
            assert_eq!(
                f.get("nested").ok(),
                Some(&MetaValue::Array(MetaArray::Array(vec![
                    MetaArray::U8(vec![9]),
                    MetaArray::Bool(vec![true, false])
                ])))
            );
            assert_eq!(f.metadata().len(), 17);

            assert_eq!(f.tensors().len(), 3);
            let norm = f.tensor("norm").cloned();
            let norm = norm.as_ref();
            assert_eq!(norm.map(|t| (t.dtype, t.dims.clone(), t.nbytes)), Some((DType::F32, vec![4], 16)));
            assert_eq!(norm.map(|t| f.tensor_data(t).to_vec()), Some(f32_bytes(&[1.0, 2.0, 3.0, 4.0])));
            let embd = f.tensor("embd").cloned();
            assert_eq!(embd.as_ref().map(|t| (t.dtype, t.nbytes, t.n_elements())), Some((DType::Q8_0, 34, 32)));
            assert_eq!(embd.as_ref().map(|t| t.offset % 32), Some(0));
            assert_eq!(embd.map(|t| f.tensor_data(&t)[2]), Some((-16i8) as u8));
            assert_eq!(f.tensor("empty").map(|t| t.nbytes), Some(0));
            assert!(f.tensor("missing").is_none());
        }
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut w = sample(3).kv("general.alignment", 4, 64u32.to_le_bytes().to_vec());
        w.alignment = 64;
        w.tensors.clear();
        w.data.clear();
        let w = w.tensor("a", &[2], 0, &f32_bytes(&[1.0, 2.0])).tensor("b", &[1], 0, &f32_bytes(&[3.0]));
        let f = w.parse().map_err(|e| e.to_string());
        assert_eq!(f.as_ref().map(|f| f.alignment()), Ok(64));
        assert_eq!(f.as_ref().map(|f| f.data_offset() % 64), Ok(0));
        assert_eq!(f.as_ref().map(|f| f.tensors()[1].offset - f.tensors()[0].offset), Ok(64));
    }

    #[test]
    fn getters_report_missing_and_wrong_types() {
        let f = match sample(3).parse() {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        let msg = |r: Result<(), GgufError>| r.map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(msg(f.get_u64("nope").map(drop)), "test.gguf: metadata key \"nope\" is missing");
        assert_eq!(
            msg(f.get_u64("i32").map(drop)),
            "test.gguf: metadata key \"i32\" is the negative i32 -7, expected a non-negative integer"
        );
        assert_eq!(msg(f.get_str("u8").map(drop)), "test.gguf: metadata key \"u8\" is u8, expected string");
        assert!(matches!(f.get_f32("u8"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.get_bool("u8"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.get_str_array("scores"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.get_f32_array("tokens"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.get_i32_array("scores"), Err(GgufError::WrongType { .. })));
        assert!(matches!(f.get_i32_array("u8"), Err(GgufError::WrongType { .. })));
        let big = Writer::new(3).kv("big", 9, array_bytes(4, 1, &u32::MAX.to_le_bytes()));
        let f = big.parse().map_err(|e| e.to_string());
        assert!(matches!(f.map(|f| f.get_i32_array("big")), Ok(Err(GgufError::WrongType { .. }))));
    }

    #[test]
    fn opens_from_disk_via_mmap() {
        let dir = std::env::temp_dir().join(format!("kiln-gguf-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("sample.gguf");
        let written = std::fs::write(&path, sample(3).bytes());
        assert!(written.is_ok());
        let f = GgufFile::open(&path).map_err(|e| e.to_string());
        assert_eq!(f.as_ref().map(|f| f.path().to_path_buf()), Ok(path.clone()));
        assert_eq!(f.as_ref().map(|f| f.tensors().len()), Ok(3));
        let empty = dir.join("empty.gguf");
        assert!(std::fs::write(&empty, b"").is_ok());
        assert!(matches!(GgufFile::open(&empty), Err(GgufError::Truncated { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        let missing = GgufFile::open(&dir.join("missing.gguf"));
        assert!(matches!(missing, Err(GgufError::Io { .. })));
        assert!(missing.map_err(|e| e.to_string()).err().unwrap_or_default().contains("missing.gguf: cannot read"));
    }

    fn err(w: &Writer) -> GgufError {
        match w.parse() {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn rejects_bad_magic_version_and_endianness() {
        let mut b = sample(3).bytes();
        b[0] = b'X';
        let e = GgufFile::from_bytes("x.gguf", b).err();
        assert!(matches!(e, Some(GgufError::BadMagic { .. })), "{e:?}");
        assert!(matches!(err(&Writer::new(1)), GgufError::UnsupportedVersion { version: 1, .. }));
        assert!(matches!(err(&Writer::new(4)), GgufError::UnsupportedVersion { version: 4, .. }));
        assert!(matches!(err(&Writer::new(3u32.swap_bytes())), GgufError::BigEndian { .. }));
        let e = GgufFile::from_bytes("x.gguf", b"GG".to_vec()).err();
        assert!(matches!(e, Some(GgufError::Truncated { .. })), "{e:?}");
        let e = GgufFile::from_bytes("x.gguf", b"PK\x03\x04".to_vec()).map_err(|e| e.to_string()).err();
        assert_eq!(e.as_deref(), Some("x.gguf: not a GGUF file: starts with [50, 4b, 03, 04], expected \"GGUF\""));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = sample(3).bytes();
        for n in 0..full.len() {
            let r = GgufFile::from_bytes("t.gguf", full[..n].to_vec());
            assert!(r.is_err(), "prefix of {n} bytes parsed");
        }
        // A cut inside the tensor infos reports the item and the sizes.
        let cut = full.len() - 200;
        let e = GgufFile::from_bytes("t.gguf", full[..cut].to_vec()).map_err(|e| e.to_string()).err();
        let e = e.unwrap_or_default();
        assert!(e.starts_with("t.gguf: "), "{e}");
    }

    #[test]
    fn truncated_tensor_info_message() {
        let w = Writer::new(3).tensor("w", &[4], 0, &[0; 16]);
        let b = w.bytes();
        // Header 24 bytes, name length + "w" 9, n_dims 4, dims 8, type 4: cut inside the type.
        let e = GgufFile::from_bytes("t.gguf", b[..48].to_vec()).map_err(|e| e.to_string()).err();
        assert_eq!(e.as_deref(), Some("t.gguf: truncated: tensor info 0 ends at byte 49 but the file has 48 bytes"));
    }

    #[test]
    fn single_byte_corruptions_never_panic() {
        let full = sample(3).bytes();
        for i in 0..full.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = full.clone();
                b[i] = v;
                let _ = GgufFile::from_bytes("c.gguf", b);
            }
        }
    }

    #[test]
    fn huge_lengths_and_counts_are_bounded() {
        let e = err(&Writer::new(3).kv("s", 8, u64::MAX.to_le_bytes().to_vec()));
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        let e = err(&Writer::new(3).kv("a", 9, array_bytes(4, u64::MAX / 2, &[])));
        assert!(matches!(e, GgufError::ImplausibleCount { .. }), "{e}");
        let e = err(&Writer::new(3).kv("a", 9, array_bytes(8, 1 << 40, &[])));
        assert!(matches!(e, GgufError::ImplausibleCount { .. }), "{e}");
        let mut w = Writer::new(3);
        w.n_tensors_override = Some(u64::MAX);
        assert!(matches!(err(&w), GgufError::ImplausibleCount { .. }));
        let mut w = Writer::new(3);
        w.n_kv_override = Some(1 << 60);
        assert!(matches!(err(&w), GgufError::ImplausibleCount { .. }));
        let mut key = (u64::MAX - 3).to_le_bytes().to_vec();
        key.extend([0; 16]);
        let mut b = Writer::new(3).bytes();
        b.truncate(24);
        b[16..24].copy_from_slice(&1u64.to_le_bytes());
        b.extend(key);
        let e = GgufFile::from_bytes("k.gguf", b).err();
        assert!(matches!(e, Some(GgufError::Truncated { .. })), "{e:?}");
    }

    #[test]
    fn rejects_bad_metadata() {
        let e = err(&Writer::new(3).kv("x", 13, vec![0; 8]));
        assert!(matches!(e, GgufError::BadValueType { type_id: 13, .. }), "{e}");
        let e = err(&Writer::new(3).kv("x", 9, array_bytes(77, 0, &[])));
        assert!(matches!(e, GgufError::BadValueType { type_id: 77, .. }), "{e}");
        let e = err(&Writer::new(3).kv("x", 7, vec![2]));
        assert!(matches!(e, GgufError::InvalidBool { byte: 2, .. }), "{e}");
        let e = err(&Writer::new(3).kv("x", 8, str_bytes(&[0xff, 0xfe])));
        assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
        let e = err(&Writer::new(3).kv_u32("dup", 1).kv_u32("dup", 2));
        assert!(matches!(e, GgufError::DuplicateKey { .. }), "{e}");
        // Arrays nested one level too deep.
        let mut v = array_bytes(0, 0, &[]);
        for _ in 0..MAX_ARRAY_NESTING {
            v = array_bytes(9, 1, &v);
        }
        let e = err(&Writer::new(3).kv("deep", 9, v));
        assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
        for bad in [0u32, 3, 48] {
            let e = err(&Writer::new(3).kv_u32("general.alignment", bad));
            assert!(matches!(e, GgufError::BadAlignment { .. }), "{e}");
        }
        let e = err(&Writer::new(3).kv_str("general.alignment", "32"));
        assert!(matches!(e, GgufError::BadAlignment { .. }), "{e}");
    }

    #[test]
    fn rejects_bad_tensors() {
        let base = Writer::new(3);
        let e = err(&base.clone().tensor("t", &[1, 1, 1, 1, 1], 0, &[0; 4]));
        assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }), "{e}");
        for id in [4u32, 9, 15, 99, u32::MAX] {
            let e = err(&base.clone().tensor("t", &[32], id, &[0; 64]));
            assert!(matches!(e, GgufError::UnsupportedType { type_id, .. } if type_id == id), "{e}");
        }
        let e = err(&base.clone().tensor("t", &[u64::MAX, 2], 0, &[]));
        assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[1 << 62, 1], 0, &[]));
        assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[33], 8, &[0; 36]));
        assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[4], 0, &[0; 16]).tensor_info("u", &[4], 0, 8));
        assert!(matches!(e, GgufError::MisalignedTensor { offset: 8, .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[4], 0, &[0; 8]));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
        let e = err(&base.clone().tensor_info("t", &[4], 0, u64::MAX - 31));
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[4], 0, &[0; 16]).tensor("t", &[4], 0, &[0; 16]));
        assert!(matches!(e, GgufError::DuplicateTensor { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[16], 0, &[0; 64]).tensor_info("u", &[4], 0, 32));
        assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
        let e = err(&base.clone().tensor("t", &[16], 0, &[0; 64]).tensor_info("u", &[16], 0, 0));
        assert!(matches!(e, GgufError::OverlappingTensors { .. }), "{e}");
        // Adjacent (touching) ranges are fine.
        let ok = base.clone().tensor("t", &[8], 0, &[0; 32]).tensor("u", &[8], 0, &[0; 32]).parse();
        assert!(ok.is_ok());
        let e = err(&base.clone().tensor("t", &[4], 0, &[0; 8])).to_string();
        assert!(e.starts_with("test.gguf: tensor \"t\" data ["), "{e}");
    }

    /// Checks what a successful parse promises: every tensor's bytes are in
    /// the file, aligned, and disjoint from the others.
    fn check_invariants(f: &GgufFile) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for t in f.tensors() {
            prop_assert!(t.offset.checked_add(t.nbytes).is_some_and(|e| e <= f.len()));
            prop_assert!(f.tensor_data(t).len() as u64 == t.nbytes);
            prop_assert!((t.offset - f.data_offset()).is_multiple_of(f.alignment()));
            prop_assert!(t.dims.len() <= GGML_MAX_DIMS);
            if t.nbytes > 0 {
                ranges.push((t.offset, t.offset + t.nbytes));
            }
        }
        ranges.sort_unstable();
        prop_assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        #[test]
        fn mutated_files_never_panic(
            edits in proptest::collection::vec((0usize..2048, proptest::num::u8::ANY), 1..8),
            cut in 0usize..2048,
        ) {
            let mut b = sample(3).bytes();
            let n = b.len();
            for (i, v) in edits {
                b[i % n] = v;
            }
            b.truncate(n - cut % (n / 4));
            if let Ok(f) = GgufFile::from_bytes("m.gguf", b) {
                check_invariants(&f)?;
            }
        }

        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut b = Writer::new(3).bytes();
            b.truncate(HEADER_BYTES);
            b[8..16].copy_from_slice(&2u64.to_le_bytes());
            b[16..24].copy_from_slice(&2u64.to_le_bytes());
            b.extend(body);
            if let Ok(f) = GgufFile::from_bytes("r.gguf", b) {
                check_invariants(&f)?;
            }
        }
    }

    #[test]
    fn ggml_type_ids_round_trip() {
        for &d in DType::ALL {
            match ggml_type_id(d) {
                Some(id) => assert_eq!(dtype_from_ggml(id), Some(d)),
                None => assert!(!d.is_ggml(), "{d}: only kiln's own formats and FP8 lack a GGUF type"),
            }
        }
    }
}
