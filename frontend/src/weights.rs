//! Parameter bytes of an imported model: slices of a memory-mapped checkpoint
//! where the stored layout is already kiln's, owned buffers where it was converted.

use std::sync::Arc;

use kiln_ir::{DType, ParamId, TensorType};

/// Something that owns a byte region (a memory-mapped file).
pub trait ByteOwner: Send + Sync {
    fn all_bytes(&self) -> &[u8];
}

/// The bytes of one tensor.
#[derive(Clone)]
pub enum TensorBytes {
    /// A range of a memory-mapped file (zero copy).
    Mapped { owner: Arc<dyn ByteOwner>, offset: usize, len: usize },
    /// Converted data.
    Owned(Arc<Vec<u8>>),
}

impl TensorBytes {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped { owner, offset, len } => &owner.all_bytes()[*offset..*offset + *len],
            TensorBytes::Owned(v) => v,
        }
    }

    pub fn owned(v: Vec<u8>) -> Self {
        TensorBytes::Owned(Arc::new(v))
    }

    pub fn from_f32(values: &[f32]) -> Self {
        TensorBytes::owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorBytes::Mapped { offset, len, .. } => write!(f, "Mapped({offset}..+{len})"),
            TensorBytes::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
        }
    }
}

/// A tensor as a checkpoint provides it, in kiln's shape order (last dim contiguous).
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub ty: TensorType,
    pub bytes: TensorBytes,
}

/// The parameter bytes of a module, indexed by [`ParamId`].
#[derive(Clone, Debug, Default)]
pub struct Weights {
    pub tensors: Vec<TensorBytes>,
}

impl Weights {
    pub fn bytes(&self, p: ParamId) -> &[u8] {
        self.tensors[p.index()].as_bytes()
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.as_bytes().len() as u64).sum()
    }
}

/// Decodes a plain float tensor (f32/f16/bf16) to f32 values; `None` for other dtypes.
pub fn plain_to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        DType::F32 => Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        DType::F16 => Some(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        DType::BF16 => Some(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        _ => None,
    }
}
