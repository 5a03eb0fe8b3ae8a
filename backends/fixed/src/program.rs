//! A fixed-point program: what the lowering produces and both the interpreter and the
//! C printer consume. Data only: integer constants (flash), a static buffer plan (RAM)
//! and a straight-line list of steps for one token.

/// A constant array that lives in flash.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
}

impl Data {
    pub fn bytes(&self) -> usize {
        match self {
            Data::U8(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::I16(v) => 2 * v.len(),
            Data::I32(v) => 4 * v.len(),
        }
    }
}

/// Index of a constant in [`Program::consts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConstId(pub usize);

#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    /// C identifier.
    pub name: String,
    pub data: Data,
}

/// A range of the activation arena, in 32-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub off: usize,
    pub len: usize,
}

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    /// int8 per row: `w[r][c] = q · mult[r] · 2^-shift[r]`.
    I8,
    /// 4-bit groups of 32 (a Q4_0 tensor's values, exactly): byte `k` of a group holds
    /// `q[2k]` (low nibble) and `q[2k+1]` (high), `w = (q − 8) · mult[r][g] · 2^-shift[r]`
    /// with a signed 16-bit multiplier per group and a shift per row.
    Q4,
}

/// A weight matrix `[rows, cols]` and its scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub format: RowFormat,
    pub w: ConstId,
    pub mult: ConstId,
    pub shift: ConstId,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    Silu,
    GeluTanh,
}

/// One step of the per-token program. All activations are Q16 `i32`.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Row `token` of the table, dequantized to Q16.
    Embed {
        table: Rows,
        out: Buf,
    },
    /// RMS normalization over groups of `group`, times `gamma` (Q16) when given.
    /// `eps_q` is `round(eps · 2^32)`.
    RmsNorm {
        x: Buf,
        out: Buf,
        group: usize,
        gamma: Option<ConstId>,
        eps_q: u64,
    },
    /// `out = W · x (+ bias)`.
    MatMul {
        x: Buf,
        out: Buf,
        w: Rows,
        bias: Option<ConstId>,
    },
    Add {
        a: Buf,
        b: Buf,
        out: Buf,
    },
    Mul {
        a: Buf,
        b: Buf,
        out: Buf,
    },
    /// `out = x · mult · 2^-shift`.
    Scale {
        x: Buf,
        out: Buf,
        mult: i32,
        shift: i32,
    },
    Act {
        x: Buf,
        out: Buf,
        kind: ActKind,
    },
    Glu {
        gate: Buf,
        up: Buf,
        out: Buf,
        kind: ActKind,
    },
    /// Rotary embedding from the `[max_context][half][cos, sin]` Q14 table.
    Rope {
        x: Buf,
        out: Buf,
        table: ConstId,
        head_dim: usize,
        rot: usize,
        neox: bool,
    },
    /// Appends `k`/`v` (when given) to cache `slot` and attends over it.
    Attention {
        q: Buf,
        kv: Option<(Buf, Buf)>,
        out: Buf,
        slot: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        /// The score scale as `mult · 2^-shift`.
        mult: i32,
        shift: i32,
        window: usize,
        /// With a window: the first `sink` positions stay visible too.
        sink: usize,
        /// Soft-cap: `2/cap` and `cap` as multipliers.
        softcap: Option<[(i32, i32); 2]>,
    },
}

/// A KV-cache slot: `rows × kv_heads × head_dim` mantissas for K and V (16-bit; 8-bit
/// for a slot the module stores as `q8_0`; 4-bit, two per byte, for `q4_0`), with one
/// shift per row, head and group of [`Slot::group`] channels.
///
/// A slot holds every position (`rows` = the context) unless its attention is windowed:
/// then it keeps the first `sink` positions and a ring of the last `rows − sink`
/// ([`Slot::row`]), so its RAM no longer grows with the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// 16, 8 or 4.
    pub bits: usize,
    /// Positions held.
    pub rows: usize,
    /// Leading positions kept outside the ring (0 for a slot without a window).
    pub sink: usize,
}

/// Channels per shift of a 4-bit slot (a whole head for 16 and 8 bits).
pub const KV4_GROUP: usize = 32;

impl Slot {
    /// Channels that share one shift.
    pub fn group(&self) -> usize {
        if self.bits == 4 { KV4_GROUP } else { self.head_dim }
    }

    /// Shifts per position and head.
    pub fn groups(&self) -> usize {
        self.head_dim.checked_div(self.group()).unwrap_or(0)
    }

    /// The row holding position `j`: `j` for the sinks, then a ring of `rows − sink` rows
    /// (every position for a slot that holds the whole context).
    pub fn row(&self, j: usize) -> usize {
        kiln_backends::ring::row(j, self.rows, self.sink)
    }

    /// Bytes of K (or V) per position: mantissas and shifts.
    pub fn bytes_per_position(&self) -> usize {
        self.kv_heads * (self.bits * self.head_dim / 8 + self.groups())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub name: String,
    pub max_context: usize,
    /// Width of the logits.
    pub vocab: usize,
    /// Rows of the embedding table: the token ids a step accepts.
    pub vocab_rows: usize,
    pub consts: Vec<Const>,
    /// The `2^(-k/64)` table (Q30) of every exponential.
    pub exp2: ConstId,
    pub steps: Vec<Step>,
    /// Activation arena size in 32-bit words.
    pub arena: usize,
    /// Scratch for 16-bit mantissas (matmul inputs, a query head), in elements.
    pub scratch16: usize,
    /// Scratch for per-group sums of a 4-bit matmul's input, in 32-bit words.
    pub scratch_groups: usize,
    /// Attention scores of one query (the most keys any attention op reads), in 32-bit words.
    pub scores: usize,
    pub slots: Vec<Slot>,
    /// Where the logits are after the last step.
    pub logits: Buf,
}

impl Program {
    pub fn data(&self, c: ConstId) -> &Data {
        &self.consts[c.0].data
    }

    /// Bytes of constant data (flash).
    pub fn flash_bytes(&self) -> usize {
        self.consts.iter().map(|c| c.data.bytes()).sum()
    }

    /// Bytes of the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.slots.iter().map(|s| 2 * s.rows * s.bytes_per_position()).sum()
    }

    /// Bytes of static RAM: the arena, the scratch, the scores row and the KV cache.
    pub fn ram_bytes(&self) -> usize {
        4 * self.arena + 2 * self.scratch16 + 4 * self.scratch_groups + 4 * self.scores + self.kv_bytes()
    }
}
