//! Element types, quantized block layouts, dimensions and tensor types.

use std::fmt;

/// Element type of a tensor. Quantized types store elements in blocks along
/// the innermost (last) dimension; `block_elems` elements take `block_bytes` bytes.
///
/// The block formats with a GGUF name are bit-compatible with GGUF/ggml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// OCP FP8 E4M3 (`e4m3fn`: 1 sign, 4 exponent bits biased by 7, 3 mantissa bits;
    /// finite up to ±448, 0x7f/0xff NaN, no infinities), one byte per element and no
    /// scale. The format NVIDIA's sm_89+ converts in hardware and safetensors calls
    /// `F8_E4M3`. No GGUF type.
    F8E4M3,
    I32,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    /// ggml's IQ4_NL: 32-weight blocks of an f16 scale and 4-bit indices into a
    /// fixed non-linear table of 16 signed bytes (4.5 bits per weight).
    IQ4NL,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// kiln's own 2.25-bit format (64-weight blocks of lattice codewords after
    /// a Hadamard rotation; see `kiln_quant::kq2`). No GGUF type.
    KQ2,
}

impl DType {
    /// Every dtype kiln knows, in a fixed order (used by tests and the parser).
    pub const ALL: &'static [DType] = &[
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::I32,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::IQ4NL,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::KQ2,
    ];

    /// Whether the layout is bit-compatible with a ggml/GGUF type (every dtype
    /// but kiln's own formats and FP8, which GGUF lacks).
    pub fn is_ggml(self) -> bool {
        !matches!(self, DType::KQ2 | DType::F8E4M3)
    }

    /// Every float storage type (plain and quantized), in [`DType::ALL`] order.
    pub fn floats() -> impl Iterator<Item = DType> {
        DType::ALL.iter().copied().filter(|d| d.is_float())
    }

    /// The name used in the textual IR and in recipes.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8_e4m3",
            DType::I32 => "i32",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::IQ4NL => "iq4_nl",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::KQ2 => "kq2",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == s)
    }

    /// Elements per block (1 for plain types).
    pub fn block_elems(self) -> u64 {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::I32 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::IQ4NL => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => 256,
            DType::KQ2 => 64,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::IQ4NL => 18,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::KQ2 => 18,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    /// Bits per weight of the storage format.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }

    /// Bytes needed for one row of `n` elements, or `None` when `n` is not a
    /// whole number of blocks or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension of a shape: fixed, or the symbolic sequence length `T`
/// (the number of tokens in the current forward call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(u64),
    Seq,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Seq => f.write_str("T"),
        }
    }
}

/// Type of a value or parameter: element type plus shape (row-major, the last
/// dimension is contiguous).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }

    pub fn fixed(dtype: DType, shape: &[u64]) -> Self {
        TensorType { dtype, shape: shape.iter().map(|&n| Dim::Fixed(n)).collect() }
    }

    /// Number of elements when every dimension is fixed.
    pub fn fixed_elems(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, d| match d {
            Dim::Fixed(n) => acc.checked_mul(*n),
            Dim::Seq => None,
        })
    }

    /// Fixed dimensions as plain numbers, when every dimension is fixed.
    pub fn fixed_dims(&self) -> Option<Vec<u64>> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Seq => None,
            })
            .collect()
    }

    /// Storage bytes of a fixed-shape tensor (rows × row_bytes of the last dim).
    pub fn storage_bytes(&self) -> Option<u64> {
        let dims = self.fixed_dims()?;
        let (last, rest) = match dims.split_last() {
            Some((l, r)) => (*l, r),
            None => (1, &[][..]),
        };
        let rows = rest.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        rows.checked_mul(self.dtype.row_bytes(last)?)
    }

    /// Last dimension, if fixed.
    pub fn last_fixed(&self) -> Option<u64> {
        match self.shape.last() {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
