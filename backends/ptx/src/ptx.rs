//! A small PTX builder: typed virtual registers, a closed instruction set, and
//! a printer. Kernels are Rust functions that call [`Kb`]; the same
//! [`Kernel`] value is printed as PTX text (for ptxas and the CUDA driver) and
//! executed by the SIMT emulator in [`crate::emu`] (for tests without a GPU).
//!
//! The instruction set is deliberately narrow: what kiln's kernels use, each
//! with one meaning that the printer and the emulator agree on. Branches must
//! be uniform across a thread block (the emulator checks this); per-thread
//! conditions are expressed with predicated instructions (`guard`) or `selp`.

use std::fmt::Write as _;

/// Register types. Integer signedness lives in the register so that
/// comparisons, shifts, conversions and min/max print the right suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    Pred,
    /// 16 raw bits (an f16 value before conversion).
    B16,
    U32,
    S32,
    U64,
    S64,
    F32,
}

impl Ty {
    fn suffix(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::B16 => "b16",
            Ty::U32 => "u32",
            Ty::S32 => "s32",
            Ty::U64 => "u64",
            Ty::S64 => "s64",
            Ty::F32 => "f32",
        }
    }
    fn bits_suffix(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::B16 => "b16",
            Ty::U32 | Ty::S32 | Ty::F32 => "b32",
            Ty::U64 | Ty::S64 => "b64",
        }
    }
    pub(crate) fn is_float(self) -> bool {
        self == Ty::F32
    }
    pub(crate) fn is_signed(self) -> bool {
        matches!(self, Ty::S32 | Ty::S64)
    }
    pub(crate) fn is_64(self) -> bool {
        matches!(self, Ty::U64 | Ty::S64)
    }
    /// Register class index used for declarations and by the emulator.
    fn class(self) -> usize {
        match self {
            Ty::Pred => 0,
            Ty::B16 => 1,
            Ty::U32 | Ty::S32 => 2,
            Ty::U64 | Ty::S64 => 3,
            Ty::F32 => 4,
        }
    }
}

const CLASS_PREFIX: [&str; 5] = ["%p", "%h", "%r", "%rd", "%f"];
const CLASS_DECL: [&str; 5] = ["pred", "b16", "b32", "b64", "f32"];

/// A virtual register: its number within its class and its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reg {
    pub(crate) n: u32,
    pub(crate) ty: Ty,
}

impl Reg {
    pub fn ty(self) -> Ty {
        self.ty
    }
    /// The register reinterpreted with another type of the same class
    /// (e.g. a u32 read as s32).
    pub fn as_ty(self, ty: Ty) -> Reg {
        assert_eq!(self.ty.class(), ty.class(), "as_ty changes register class");
        Reg { n: self.n, ty }
    }
    pub(crate) fn slot(self) -> (usize, u32) {
        (self.ty.class(), self.n)
    }
}

/// An instruction operand: a register or an immediate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Src {
    R(Reg),
    /// An integer immediate (printed in decimal).
    I(i64),
    /// An f32 immediate (printed as its bits, `0fXXXXXXXX`, so it is exact).
    F(f32),
}

impl From<Reg> for Src {
    fn from(r: Reg) -> Src {
        Src::R(r)
    }
}
impl From<i64> for Src {
    fn from(v: i64) -> Src {
        Src::I(v)
    }
}
impl From<i32> for Src {
    fn from(v: i32) -> Src {
        Src::I(v as i64)
    }
}
impl From<u32> for Src {
    fn from(v: u32) -> Src {
        Src::I(v as i64)
    }
}
impl From<f32> for Src {
    fn from(v: f32) -> Src {
        Src::F(v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    /// Integer: low half of the product. Float: round to nearest.
    Mul,
    /// Float: IEEE division (`div.rn`). Integer: truncating.
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    /// Arithmetic for signed registers, logical for unsigned.
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Mov,
    Neg,
    Abs,
    Not,
    /// IEEE square root (`sqrt.rn.f32`).
    Sqrt,
    /// `1/x` rounded to nearest (`rcp.rn.f32`).
    Rcp,
    /// 2^x (`ex2.approx.f32`, about 2 ulp).
    Ex2,
    /// log2(x) (`lg2.approx.f32`, about 2⁻²² relative error).
    Lg2,
    /// tanh (`tanh.approx.f32`, sm_75+, about 2⁻¹¹ relative error).
    Tanh,
    /// Number of set bits of a 32-bit register (result u32).
    Popc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn name(self, float: bool, signed: bool) -> &'static str {
        match (self, float || signed) {
            (Cmp::Eq, _) => "eq",
            (Cmp::Ne, _) => "ne",
            (Cmp::Lt, true) => "lt",
            (Cmp::Le, true) => "le",
            (Cmp::Gt, true) => "gt",
            (Cmp::Ge, true) => "ge",
            (Cmp::Lt, false) => "lo",
            (Cmp::Le, false) => "ls",
            (Cmp::Gt, false) => "hi",
            (Cmp::Ge, false) => "hs",
        }
    }
}

/// Memory state spaces kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
}

/// Width and extension of a load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mem {
    U8,
    S8,
    U16,
    /// 16 bits into a B16 register.
    B16,
    U32,
    F32,
    U64,
}

impl Mem {
    pub(crate) fn bytes(self) -> usize {
        match self {
            Mem::U8 | Mem::S8 => 1,
            Mem::U16 | Mem::B16 => 2,
            Mem::U32 | Mem::F32 => 4,
            Mem::U64 => 8,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Mem::U8 => "u8",
            Mem::S8 => "s8",
            Mem::U16 => "u16",
            Mem::B16 => "b16",
            Mem::U32 => "u32",
            Mem::F32 => "f32",
            Mem::U64 => "u64",
        }
    }
}

/// Special registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    TidX,
    CtaidX,
    CtaidY,
    CtaidZ,
    NtidX,
    NctaidX,
    NctaidY,
    NctaidZ,
}

impl Special {
    fn name(self) -> &'static str {
        match self {
            Special::TidX => "%tid.x",
            Special::CtaidX => "%ctaid.x",
            Special::CtaidY => "%ctaid.y",
            Special::CtaidZ => "%ctaid.z",
            Special::NtidX => "%ntid.x",
            Special::NctaidX => "%nctaid.x",
            Special::NctaidY => "%nctaid.y",
            Special::NctaidZ => "%nctaid.z",
        }
    }
}

/// Warp shuffle modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shfl {
    /// Lane `i` reads lane `i ^ b`.
    Bfly,
    /// Lane `i` reads lane `b`.
    Idx,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Inst {
    Bin {
        op: BinOp,
        d: Reg,
        a: Src,
        b: Src,
    },
    Un {
        op: UnOp,
        d: Reg,
        a: Src,
    },
    /// `d = a * b + c` (float: one rounding; integer: low half).
    Fma {
        d: Reg,
        a: Src,
        b: Src,
        c: Src,
    },
    /// `d (64-bit) = a (32-bit) * b (32-bit)`.
    MulWide {
        d: Reg,
        a: Src,
        b: Src,
    },
    /// Conversion between the register types of `d` and `a` (float→int truncates, int→float rounds to nearest).
    Cvt {
        d: Reg,
        a: Reg,
    },
    /// f32 → integer, rounded to the nearest integer, ties to even (`cvt.rni`).
    CvtRni {
        d: Reg,
        a: Reg,
    },
    /// f16 bits → f32.
    CvtF16 {
        d: Reg,
        a: Reg,
    },
    /// Reinterpret bits between registers of the same width (e.g. u32 → f32).
    Bits {
        d: Reg,
        a: Reg,
    },
    Setp {
        cmp: Cmp,
        d: Reg,
        a: Src,
        b: Src,
    },
    /// `d = p ? a : b`.
    Selp {
        d: Reg,
        a: Src,
        b: Src,
        p: Reg,
    },
    Ld {
        space: Space,
        mem: Mem,
        d: Reg,
        addr: Reg,
        off: i32,
    },
    St {
        space: Space,
        mem: Mem,
        addr: Reg,
        off: i32,
        v: Src,
    },
    /// Four f32 from global memory at a 16-byte aligned address (`ld.global.v4.f32`).
    LdV4 {
        d: [Reg; 4],
        addr: Reg,
        off: i32,
    },
    /// Two f32 rounded to f16 and packed in a u32: `hi` in bits 16..32, `lo` in 0..16
    /// (`cvt.rn.f16x2.f32 d, hi, lo`).
    PackF16x2 {
        d: Reg,
        hi: Reg,
        lo: Reg,
    },
    /// Warp-wide tensor-core product `D = A·B + C` of a 16×16 f16 A (row-major), a
    /// 16×8 f16 B (column-major) and 16×8 f32 C/D, in PTX's fragment layout
    /// (`mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`). With `g = lane / 4`,
    /// `q = lane % 4`: a[0] = A[g][2q..], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..],
    /// a[3] = A[g+8][2q+8..]; b[0] = B[2q..][g], b[1] = B[2q+8..][g]; c/d[0,1] =
    /// C[g][2q, 2q+1], c/d[2,3] = C[g+8][2q, 2q+1]. Pairs are f16x2, lower index low.
    Mma {
        d: [Reg; 4],
        a: [Reg; 4],
        b: [Reg; 2],
        c: [Reg; 4],
    },
    /// Loads kernel parameter `i` (pointers are converted to global addresses).
    Param {
        d: Reg,
        i: usize,
    },
    Sreg {
        d: Reg,
        s: Special,
    },
    /// Address of the kernel's shared memory array (u32).
    SharedBase {
        d: Reg,
    },
    Shfl {
        mode: Shfl,
        d: Reg,
        a: Reg,
        b: Src,
    },
    Bar,
    Label(u32),
    /// Branch, taken when `pred` (or its negation) holds; must be uniform over the block.
    Bra {
        target: u32,
        pred: Option<(Reg, bool)>,
    },
}

/// An instruction with an optional per-thread guard `@p` / `@!p`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub guard: Option<(Reg, bool)>,
    pub inst: Inst,
}

/// Kernel parameter types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamTy {
    /// A device pointer (u64).
    Ptr,
    U32,
    F32,
}

/// A kernel: name, parameters, register counts, shared memory and body.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<(String, ParamTy)>,
    pub(crate) regs: [u32; 5],
    /// Bytes of `.shared` memory.
    pub shared_bytes: u32,
    pub body: Vec<Stmt>,
    /// Threads per block the kernel is written for (its loops assume it).
    pub block: u32,
}

/// Kernel builder.
pub struct Kb {
    k: Kernel,
    labels: u32,
    guard: Option<(Reg, bool)>,
}

impl Kb {
    pub fn new(name: impl Into<String>, params: &[(&str, ParamTy)], block: u32) -> Kb {
        Kb {
            k: Kernel {
                name: name.into(),
                params: params.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
                regs: [0; 5],
                shared_bytes: 0,
                body: Vec::new(),
                block,
            },
            labels: 0,
            guard: None,
        }
    }

    pub fn finish(self) -> Kernel {
        self.k
    }

    pub fn block(&self) -> u32 {
        self.k.block
    }

    /// Reserves `bytes` of shared memory (16-byte aligned); returns its byte offset.
    pub fn shared(&mut self, bytes: u32) -> u32 {
        let off = self.k.shared_bytes.div_ceil(16) * 16;
        self.k.shared_bytes = off + bytes;
        off
    }

    pub fn reg(&mut self, ty: Ty) -> Reg {
        let c = ty.class();
        let n = self.k.regs[c];
        self.k.regs[c] += 1;
        Reg { n, ty }
    }

    pub fn push(&mut self, inst: Inst) {
        self.k.body.push(Stmt { guard: self.guard, inst });
    }

    /// Runs `f` with every instruction it emits guarded by `p` (or `!p`).
    pub fn guarded<R>(&mut self, p: Reg, negate: bool, f: impl FnOnce(&mut Kb) -> R) -> R {
        assert!(self.guard.is_none(), "nested guards");
        assert_eq!(p.ty, Ty::Pred);
        self.guard = Some((p, negate));
        let r = f(self);
        self.guard = None;
        r
    }

    // ---- values -------------------------------------------------------

    pub fn param(&mut self, i: usize) -> Reg {
        let ty = match self.k.params[i].1 {
            ParamTy::Ptr => Ty::U64,
            ParamTy::U32 => Ty::U32,
            ParamTy::F32 => Ty::F32,
        };
        let d = self.reg(ty);
        self.push(Inst::Param { d, i });
        d
    }

    pub fn special(&mut self, s: Special) -> Reg {
        let d = self.reg(Ty::U32);
        self.push(Inst::Sreg { d, s });
        d
    }

    pub fn tid(&mut self) -> Reg {
        self.special(Special::TidX)
    }

    pub fn shared_base(&mut self) -> Reg {
        let d = self.reg(Ty::U32);
        self.push(Inst::SharedBase { d });
        d
    }

    pub fn imm(&mut self, ty: Ty, v: impl Into<Src>) -> Reg {
        self.un(UnOp::Mov, ty, v)
    }

    pub fn bin(&mut self, op: BinOp, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Bin { op, d, a: a.into(), b: b.into() });
        d
    }

    /// `d op= b` in place (for loop-carried registers).
    pub fn bin_to(&mut self, op: BinOp, d: Reg, a: impl Into<Src>, b: impl Into<Src>) {
        self.push(Inst::Bin { op, d, a: a.into(), b: b.into() });
    }

    pub fn un(&mut self, op: UnOp, ty: Ty, a: impl Into<Src>) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Un { op, d, a: a.into() });
        d
    }

    pub fn mov_to(&mut self, d: Reg, a: impl Into<Src>) {
        self.push(Inst::Un { op: UnOp::Mov, d, a: a.into() });
    }

    pub fn add(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::Add, ty, a, b)
    }
    pub fn sub(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::Sub, ty, a, b)
    }
    pub fn mul(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::Mul, ty, a, b)
    }
    pub fn and(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::And, ty, a, b)
    }
    pub fn shr(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::Shr, ty, a, b)
    }
    pub fn shl(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        self.bin(BinOp::Shl, ty, a, b)
    }

    pub fn fma(&mut self, a: impl Into<Src>, b: impl Into<Src>, c: impl Into<Src>) -> Reg {
        let d = self.reg(Ty::F32);
        self.push(Inst::Fma { d, a: a.into(), b: b.into(), c: c.into() });
        d
    }

    /// `d = a * b + d`.
    pub fn fma_to(&mut self, d: Reg, a: impl Into<Src>, b: impl Into<Src>) {
        self.push(Inst::Fma { d, a: a.into(), b: b.into(), c: Src::R(d) });
    }

    /// Integer multiply-add `a * b + c` (low half).
    pub fn mad(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>, c: impl Into<Src>) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Fma { d, a: a.into(), b: b.into(), c: c.into() });
        d
    }

    pub fn mul_wide(&mut self, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        let d = self.reg(Ty::U64);
        self.push(Inst::MulWide { d, a: a.into(), b: b.into() });
        d
    }

    pub fn cvt(&mut self, ty: Ty, a: Reg) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Cvt { d, a });
        d
    }

    /// `a` (f32) rounded to the nearest integer of type `ty`, ties to even.
    pub fn cvt_rni(&mut self, ty: Ty, a: Reg) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::CvtRni { d, a });
        d
    }

    pub fn f16_to_f32(&mut self, a: Reg) -> Reg {
        let d = self.reg(Ty::F32);
        self.push(Inst::CvtF16 { d, a });
        d
    }

    pub fn bits(&mut self, ty: Ty, a: Reg) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Bits { d, a });
        d
    }

    pub fn setp(&mut self, cmp: Cmp, a: impl Into<Src>, b: impl Into<Src>) -> Reg {
        let d = self.reg(Ty::Pred);
        self.push(Inst::Setp { cmp, d, a: a.into(), b: b.into() });
        d
    }

    pub fn selp(&mut self, ty: Ty, a: impl Into<Src>, b: impl Into<Src>, p: Reg) -> Reg {
        let d = self.reg(ty);
        self.push(Inst::Selp { d, a: a.into(), b: b.into(), p });
        d
    }

    /// `addr + idx * scale` as a u64 address (`idx` a u32).
    pub fn index(&mut self, addr: Reg, idx: impl Into<Src>, scale: u32) -> Reg {
        let off = self.mul_wide(idx, scale);
        self.add(Ty::U64, addr, off)
    }

    pub fn ld(&mut self, mem: Mem, addr: Reg, off: i32) -> Reg {
        let ty = match mem {
            Mem::U8 | Mem::U16 | Mem::U32 => Ty::U32,
            Mem::S8 => Ty::S32,
            Mem::B16 => Ty::B16,
            Mem::F32 => Ty::F32,
            Mem::U64 => Ty::U64,
        };
        let d = self.reg(ty);
        self.push(Inst::Ld { space: Space::Global, mem, d, addr, off });
        d
    }

    pub fn pack_f16x2(&mut self, hi: Reg, lo: Reg) -> Reg {
        let d = self.reg(Ty::U32);
        self.push(Inst::PackF16x2 { d, hi, lo });
        d
    }

    /// `acc = A·B + acc` on tensor cores (see [`Inst::Mma`]).
    pub fn mma_to(&mut self, acc: [Reg; 4], a: [Reg; 4], b: [Reg; 2]) {
        self.push(Inst::Mma { d: acc, a, b, c: acc });
    }

    /// A u32 from shared memory.
    pub fn ld_shared_u32(&mut self, addr: Reg, off: i32) -> Reg {
        let d = self.reg(Ty::U32);
        self.push(Inst::Ld { space: Space::Shared, mem: Mem::U32, d, addr, off });
        d
    }

    pub fn st_shared_u32(&mut self, addr: Reg, off: i32, v: impl Into<Src>) {
        self.push(Inst::St { space: Space::Shared, mem: Mem::U32, addr, off, v: v.into() });
    }

    /// Four consecutive f32 at a 16-byte aligned global address.
    pub fn ld_v4(&mut self, addr: Reg, off: i32) -> [Reg; 4] {
        let d = [self.reg(Ty::F32), self.reg(Ty::F32), self.reg(Ty::F32), self.reg(Ty::F32)];
        self.push(Inst::LdV4 { d, addr, off });
        d
    }

    pub fn st(&mut self, mem: Mem, addr: Reg, off: i32, v: impl Into<Src>) {
        self.push(Inst::St { space: Space::Global, mem, addr, off, v: v.into() });
    }

    pub fn ld_shared(&mut self, addr: Reg, off: i32) -> Reg {
        let d = self.reg(Ty::F32);
        self.push(Inst::Ld { space: Space::Shared, mem: Mem::F32, d, addr, off });
        d
    }

    pub fn st_shared(&mut self, addr: Reg, off: i32, v: impl Into<Src>) {
        self.push(Inst::St { space: Space::Shared, mem: Mem::F32, addr, off, v: v.into() });
    }

    pub fn shfl(&mut self, mode: Shfl, a: Reg, b: impl Into<Src>) -> Reg {
        let d = self.reg(a.ty);
        self.push(Inst::Shfl { mode, d, a, b: b.into() });
        d
    }

    pub fn bar(&mut self) {
        self.push(Inst::Bar);
    }

    /// Sum of `v` over the 32 lanes of each warp (every lane gets the sum).
    pub fn warp_sum(&mut self, v: Reg) -> Reg {
        let mut acc = v;
        for sh in [16, 8, 4, 2, 1] {
            let o = self.shfl(Shfl::Bfly, acc, sh);
            acc = self.add(Ty::F32, acc, o);
        }
        acc
    }

    /// Maximum of `v` over each warp.
    pub fn warp_max(&mut self, v: Reg) -> Reg {
        let mut acc = v;
        for sh in [16, 8, 4, 2, 1] {
            let o = self.shfl(Shfl::Bfly, acc, sh);
            acc = self.bin(BinOp::Max, Ty::F32, acc, o);
        }
        acc
    }

    /// e^x through `ex2.approx` (x · log2 e).
    pub fn exp(&mut self, x: impl Into<Src>) -> Reg {
        let t = self.mul(Ty::F32, x, std::f32::consts::LOG2_E);
        self.un(UnOp::Ex2, Ty::F32, t)
    }

    /// tanh as `1 − 2/(e^{2x} + 1)` through `ex2.approx` (about 1e-7 absolute
    /// error; `tanh.approx.f32` is 5e-4 relative, too coarse for GELU and soft-caps).
    pub fn tanh(&mut self, x: impl Into<Src>) -> Reg {
        let x2 = self.mul(Ty::F32, x, 2.0f32);
        let e = self.exp(x2);
        let d = self.add(Ty::F32, e, 1.0f32);
        let q = self.bin(BinOp::Div, Ty::F32, 2.0f32, d);
        self.sub(Ty::F32, 1.0f32, q)
    }

    // ---- control flow (uniform over the block) ------------------------

    pub fn label(&mut self) -> u32 {
        self.labels += 1;
        self.labels
    }

    pub fn place(&mut self, l: u32) {
        assert!(self.guard.is_none(), "labels cannot be guarded");
        self.k.body.push(Stmt { guard: None, inst: Inst::Label(l) });
    }

    pub fn bra(&mut self, target: u32, pred: Option<(Reg, bool)>) {
        assert!(self.guard.is_none(), "branches cannot be guarded");
        self.k.body.push(Stmt { guard: None, inst: Inst::Bra { target, pred } });
    }

    /// `for i in start..end step step { body(i) }` over u32 values; `end` must be
    /// the same for every thread of the block.
    pub fn for_range(
        &mut self,
        start: impl Into<Src>,
        end: impl Into<Src>,
        step: impl Into<Src>,
        body: impl FnOnce(&mut Kb, Reg),
    ) {
        let (end, step) = (end.into(), step.into());
        let i = self.imm(Ty::U32, start);
        let (top, exit) = (self.label(), self.label());
        self.place(top);
        let done = self.setp(Cmp::Ge, i, end);
        self.bra(exit, Some((done, false)));
        body(self, i);
        self.bin_to(BinOp::Add, i, i, step);
        self.bra(top, None);
        self.place(exit);
    }
}

// ---- printing -----------------------------------------------------------

/// PTX ISA version and target the printer emits.
pub const PTX_VERSION: &str = "7.8";
pub const PTX_TARGET: &str = "sm_80";

fn reg_name(r: Reg) -> String {
    format!("{}{}", CLASS_PREFIX[r.ty.class()], r.n)
}

fn src(s: Src, ty: Ty) -> String {
    match s {
        Src::R(r) => reg_name(r),
        Src::I(v) if ty.is_float() => format!("0f{:08X}", (v as f32).to_bits()),
        Src::I(v) => v.to_string(),
        Src::F(f) if ty.is_float() => format!("0f{:08X}", f.to_bits()),
        Src::F(f) => (f as i64).to_string(),
    }
}

fn print_inst(out: &mut String, k: &Kernel, inst: &Inst) {
    let w = |out: &mut String, s: String| {
        out.push_str(&s);
    };
    match inst {
        Inst::Bin { op, d, a, b } => {
            let t = d.ty;
            let s = match (op, t) {
                (BinOp::Add, _) => format!("add.{}", t.suffix()),
                (BinOp::Sub, _) => format!("sub.{}", t.suffix()),
                (BinOp::Mul, Ty::F32) => "mul.rn.f32".to_string(),
                (BinOp::Mul, _) => format!("mul.lo.{}", t.suffix()),
                (BinOp::Div, Ty::F32) => "div.rn.f32".to_string(),
                (BinOp::Div, _) => format!("div.{}", t.suffix()),
                (BinOp::Rem, _) => format!("rem.{}", t.suffix()),
                (BinOp::Min, _) => format!("min.{}", t.suffix()),
                (BinOp::Max, _) => format!("max.{}", t.suffix()),
                (BinOp::And, _) => format!("and.{}", t.bits_suffix()),
                (BinOp::Or, _) => format!("or.{}", t.bits_suffix()),
                (BinOp::Xor, _) => format!("xor.{}", t.bits_suffix()),
                (BinOp::Shl, _) => format!("shl.{}", t.bits_suffix()),
                (BinOp::Shr, _) => format!("shr.{}", t.suffix()),
            };
            // Shift amounts are always u32 operands.
            let bt = if matches!(op, BinOp::Shl | BinOp::Shr) { Ty::U32 } else { t };
            w(out, format!("{s} {}, {}, {};", reg_name(*d), src(*a, t), src(*b, bt)));
        }
        Inst::Un { op, d, a } => {
            let t = d.ty;
            let s = match op {
                UnOp::Mov => format!("mov.{}", t.suffix()),
                UnOp::Neg => format!("neg.{}", t.suffix()),
                UnOp::Abs => format!("abs.{}", t.suffix()),
                UnOp::Not => format!("not.{}", t.bits_suffix()),
                UnOp::Sqrt => "sqrt.rn.f32".into(),
                UnOp::Rcp => "rcp.rn.f32".into(),
                UnOp::Ex2 => "ex2.approx.ftz.f32".into(),
                UnOp::Lg2 => "lg2.approx.f32".into(),
                UnOp::Tanh => "tanh.approx.f32".into(),
                UnOp::Popc => "popc.b32".into(),
            };
            let at = if *op == UnOp::Popc { Ty::U32 } else { t };
            w(out, format!("{s} {}, {};", reg_name(*d), src(*a, at)));
        }
        Inst::Fma { d, a, b, c } => {
            let s = if d.ty.is_float() { "fma.rn.f32".to_string() } else { format!("mad.lo.{}", d.ty.suffix()) };
            w(out, format!("{s} {}, {}, {}, {};", reg_name(*d), src(*a, d.ty), src(*b, d.ty), src(*c, d.ty)));
        }
        Inst::MulWide { d, a, b } => {
            let s = if d.ty.is_signed() { "s32" } else { "u32" };
            w(out, format!("mul.wide.{s} {}, {}, {};", reg_name(*d), src(*a, Ty::U32), src(*b, Ty::U32)));
        }
        Inst::Cvt { d, a } => {
            let rnd = match (d.ty.is_float(), a.ty.is_float()) {
                (true, false) => ".rn",
                (false, true) => ".rzi",
                _ => "",
            };
            w(out, format!("cvt{rnd}.{}.{} {}, {};", d.ty.suffix(), a.ty.suffix(), reg_name(*d), reg_name(*a)));
        }
        Inst::CvtRni { d, a } => {
            w(out, format!("cvt.rni.{}.{} {}, {};", d.ty.suffix(), a.ty.suffix(), reg_name(*d), reg_name(*a)))
        }
        Inst::CvtF16 { d, a } => w(out, format!("cvt.f32.f16 {}, {};", reg_name(*d), reg_name(*a))),
        Inst::Bits { d, a } => w(out, format!("mov.{} {}, {};", d.ty.bits_suffix(), reg_name(*d), reg_name(*a))),
        Inst::Setp { cmp, d, a, b } => {
            let t = match a {
                Src::R(r) => r.ty,
                _ => match b {
                    Src::R(r) => r.ty,
                    _ => Ty::U32,
                },
            };
            w(
                out,
                format!(
                    "setp.{}.{} {}, {}, {};",
                    cmp.name(t.is_float(), t.is_signed()),
                    t.suffix(),
                    reg_name(*d),
                    src(*a, t),
                    src(*b, t)
                ),
            );
        }
        Inst::Selp { d, a, b, p } => w(
            out,
            format!("selp.{} {}, {}, {}, {};", d.ty.suffix(), reg_name(*d), src(*a, d.ty), src(*b, d.ty), reg_name(*p)),
        ),
        Inst::LdV4 { d, addr, off } => w(
            out,
            format!(
                "ld.global.v4.f32 {{{}, {}, {}, {}}}, [{}{}];",
                reg_name(d[0]),
                reg_name(d[1]),
                reg_name(d[2]),
                reg_name(d[3]),
                reg_name(*addr),
                offset(*off)
            ),
        ),
        Inst::PackF16x2 { d, hi, lo } => {
            w(out, format!("cvt.rn.f16x2.f32 {}, {}, {};", reg_name(*d), reg_name(*hi), reg_name(*lo)))
        }
        Inst::Mma { d, a, b, c } => {
            let l = |r: &[Reg]| r.iter().map(|x| reg_name(*x)).collect::<Vec<_>>().join(", ");
            w(
                out,
                format!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{}}}, {{{}}}, {{{}}}, {{{}}};",
                    l(d),
                    l(a),
                    l(b),
                    l(c)
                ),
            )
        }
        Inst::Ld { space, mem, d, addr, off } => {
            let sp = if *space == Space::Global { "global" } else { "shared" };
            w(out, format!("ld.{sp}.{} {}, [{}{}];", mem.suffix(), reg_name(*d), reg_name(*addr), offset(*off)));
        }
        Inst::St { space, mem, addr, off, v } => {
            let sp = if *space == Space::Global { "global" } else { "shared" };
            let vt = match mem {
                Mem::F32 => Ty::F32,
                Mem::U64 => Ty::U64,
                _ => Ty::U32,
            };
            w(out, format!("st.{sp}.{} [{}{}], {};", mem.suffix(), reg_name(*addr), offset(*off), src(*v, vt)));
        }
        Inst::Param { d, i } => {
            let (_, ty) = &k.params[*i];
            match ty {
                ParamTy::Ptr => {
                    w(out, format!("ld.param.u64 {}, [{}_param_{i}];\n\t", reg_name(*d), k.name));
                    w(out, format!("cvta.to.global.u64 {0}, {0};", reg_name(*d)));
                }
                ParamTy::U32 => w(out, format!("ld.param.u32 {}, [{}_param_{i}];", reg_name(*d), k.name)),
                ParamTy::F32 => w(out, format!("ld.param.f32 {}, [{}_param_{i}];", reg_name(*d), k.name)),
            }
        }
        Inst::Sreg { d, s } => w(out, format!("mov.u32 {}, {};", reg_name(*d), s.name())),
        Inst::SharedBase { d } => w(out, format!("mov.u32 {}, {}_smem;", reg_name(*d), k.name)),
        Inst::Shfl { mode, d, a, b } => {
            let (m, c) = match mode {
                Shfl::Bfly => ("bfly", "0x1f"),
                Shfl::Idx => ("idx", "0x1f"),
            };
            w(
                out,
                format!("shfl.sync.{m}.b32 {}, {}, {}, {c}, 0xffffffff;", reg_name(*d), reg_name(*a), src(*b, Ty::U32)),
            );
        }
        Inst::Bar => w(out, "bar.sync 0;".into()),
        Inst::Label(_) => {}
        Inst::Bra { target, .. } => w(out, format!("bra.uni $L{target};")),
    }
}

fn offset(off: i32) -> String {
    match off {
        0 => String::new(),
        o if o > 0 => format!("+{o}"),
        o => format!("{o}"),
    }
}

/// Prints one kernel as a PTX `.entry`.
pub fn print_kernel(out: &mut String, k: &Kernel) {
    let _ = writeln!(out, "// {} threads per block", k.block);
    let _ = write!(out, ".visible .entry {}(", k.name);
    for (i, (name, ty)) in k.params.iter().enumerate() {
        let t = match ty {
            ParamTy::Ptr => "u64",
            ParamTy::U32 => "u32",
            ParamTy::F32 => "f32",
        };
        let sep = if i + 1 == k.params.len() { "" } else { "," };
        let _ = write!(out, "\n\t.param .{t} {}_param_{i}{sep} // {name}", k.name);
    }
    let _ = writeln!(out, "\n)\n.maxntid {}, 1, 1\n{{", k.block);
    for (c, n) in k.regs.iter().enumerate() {
        if *n > 0 {
            let _ = writeln!(out, "\t.reg .{} {}<{}>;", CLASS_DECL[c], CLASS_PREFIX[c], n);
        }
    }
    if k.shared_bytes > 0 {
        let _ = writeln!(out, "\t.shared .align 16 .b8 {}_smem[{}];", k.name, k.shared_bytes);
    }
    for st in &k.body {
        if let Inst::Label(l) = st.inst {
            let _ = writeln!(out, "$L{l}:");
            continue;
        }
        out.push('\t');
        if let Some((p, neg)) = st.guard {
            let _ = write!(out, "@{}{} ", if neg { "!" } else { "" }, reg_name(p));
        }
        if let Inst::Bra { pred: Some((p, neg)), target } = &st.inst {
            let _ = write!(out, "@{}{} bra.uni $L{target};", if *neg { "!" } else { "" }, reg_name(*p));
        } else {
            print_inst(out, k, &st.inst);
        }
        out.push('\n');
    }
    out.push_str("\tret;\n}\n");
}

/// Prints a PTX module holding `kernels`.
pub fn print_module(kernels: &[Kernel]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "// Generated by kiln (backends/ptx). Do not edit.");
    let _ = writeln!(out, ".version {PTX_VERSION}\n.target {PTX_TARGET}\n.address_size 64\n");
    for k in kernels {
        print_kernel(&mut out, k);
        out.push('\n');
    }
    out
}
