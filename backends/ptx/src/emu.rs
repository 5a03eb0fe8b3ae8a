//! A SIMT emulator for [`Kernel`]s: runs the kernels kiln emits on the CPU,
//! so every kernel and the whole PTX session are tested on machines without
//! a GPU.
//!
//! Each thread block runs in lockstep: one instruction for every thread, then
//! the next. That is a legal schedule of a correct kernel, and the emulator
//! rejects what would make it differ from other schedules:
//! - a branch whose condition differs between threads of a block (kiln's
//!   kernels branch only uniformly and predicate the rest);
//! - a shared-memory word read by one thread after another thread wrote it
//!   with no `bar.sync` between (a missing barrier);
//! - an out-of-bounds or misaligned global or shared access (named with the
//!   kernel, the instruction and the thread), division by zero, a shuffle
//!   with inactive lanes.
//!
//! Approximate instructions (`ex2.approx`, `tanh.approx`) are computed
//! exactly here; kernels' error budgets cover the difference.

use std::collections::HashMap;

use crate::ptx::{BinOp, Cmp, Inst, Kernel, Mem, ParamTy, Shfl, Space, Special, Src, Ty, UnOp};

/// A kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

/// Global memory of the emulated device: buffers at increasing addresses.
#[derive(Debug, Default)]
pub struct EmuMemory {
    bufs: Vec<(u64, Vec<u8>)>,
    next: u64,
}

const BASE: u64 = 0x7f00_0000_0000;

impl EmuMemory {
    pub fn new() -> Self {
        EmuMemory { bufs: Vec::new(), next: BASE }
    }

    /// Allocates `bytes` zeroed bytes, 256-byte aligned, with a gap after each buffer.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        let addr = self.next;
        self.bufs.push((addr, vec![0; bytes]));
        self.next = (addr + bytes as u64 + 256).div_ceil(256) * 256 + 256;
        addr
    }

    fn find(&self, addr: u64, len: usize) -> Option<(usize, usize)> {
        let i = self.bufs.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (a, b) = &self.bufs[i];
        let off = (addr - a) as usize;
        (off.checked_add(len)? <= b.len()).then_some((i, off))
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        let (i, off) = self
            .find(addr, data.len())
            .ok_or_else(|| format!("write of {} bytes at {addr:#x} is out of bounds", data.len()))?;
        self.bufs[i].1[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), String> {
        let (i, off) = self
            .find(addr, out.len())
            .ok_or_else(|| format!("read of {} bytes at {addr:#x} is out of bounds", out.len()))?;
        out.copy_from_slice(&self.bufs[i].1[off..off + out.len()]);
        Ok(())
    }

    /// Frees the buffer at `addr`.
    pub fn free(&mut self, addr: u64) {
        self.bufs.retain(|(a, _)| *a != addr);
    }
}

struct Block<'a> {
    k: &'a Kernel,
    n: usize,
    regs: [Vec<u64>; 5],
    stride: [usize; 5],
    shared: Vec<u8>,
    /// Per shared 4-byte word: (writer thread, barrier epoch).
    shared_tag: Vec<(u32, u32)>,
    epoch: u32,
    ctaid: [u32; 3],
    grid: [u32; 3],
}

impl Block<'_> {
    #[inline]
    fn get(&self, t: usize, r: crate::ptx::Reg) -> u64 {
        let (c, n) = r.slot();
        self.regs[c][t * self.stride[c] + n as usize]
    }
    #[inline]
    fn set(&mut self, t: usize, r: crate::ptx::Reg, v: u64) {
        let (c, n) = r.slot();
        let v = match r.ty {
            Ty::Pred => v & 1,
            Ty::B16 => v & 0xffff,
            Ty::U32 | Ty::S32 | Ty::F32 => v & 0xffff_ffff,
            Ty::U64 | Ty::S64 => v,
        };
        self.regs[c][t * self.stride[c] + n as usize] = v;
    }
    fn src(&self, t: usize, s: Src, ty: Ty) -> u64 {
        match s {
            Src::R(r) => self.get(t, r),
            Src::I(v) if ty == Ty::F32 => (v as f32).to_bits() as u64,
            Src::I(v) => v as u64,
            Src::F(f) if ty == Ty::F32 => f.to_bits() as u64,
            Src::F(f) => f as i64 as u64,
        }
    }
}

fn f(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
fn fb(x: f32) -> u64 {
    x.to_bits() as u64
}

fn sext32(v: u64) -> i64 {
    v as u32 as i32 as i64
}

fn bin(op: BinOp, ty: Ty, a: u64, b: u64) -> Result<u64, String> {
    Ok(match ty {
        Ty::F32 => {
            let (x, y) = (f(a), f(b));
            fb(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Min => x.min(y),
                BinOp::Max => x.max(y),
                _ => return Err(format!("{op:?} on f32")),
            })
        }
        Ty::Pred => match op {
            BinOp::And => a & b & 1,
            BinOp::Or => (a | b) & 1,
            BinOp::Xor => (a ^ b) & 1,
            _ => return Err(format!("{op:?} on pred")),
        },
        Ty::U32 | Ty::S32 | Ty::U64 | Ty::S64 | Ty::B16 => {
            let bits = if ty.is_64() { 64 } else { 32 };
            let mask = if bits == 64 { u64::MAX } else { 0xffff_ffff };
            let (a, b) = (a & mask, b & mask);
            let signed = ty.is_signed();
            let sa = if bits == 64 { a as i64 } else { sext32(a) };
            let sb = if bits == 64 { b as i64 } else { sext32(b) };
            let r = match op {
                BinOp::Add => a.wrapping_add(b),
                BinOp::Sub => a.wrapping_sub(b),
                BinOp::Mul => a.wrapping_mul(b),
                BinOp::Div | BinOp::Rem if b == 0 => return Err("integer division by zero".into()),
                BinOp::Div if signed => sa.wrapping_div(sb) as u64,
                BinOp::Div => a / b,
                BinOp::Rem if signed => sa.wrapping_rem(sb) as u64,
                BinOp::Rem => a % b,
                BinOp::Min if signed => sa.min(sb) as u64,
                BinOp::Min => a.min(b),
                BinOp::Max if signed => sa.max(sb) as u64,
                BinOp::Max => a.max(b),
                BinOp::And => a & b,
                BinOp::Or => a | b,
                BinOp::Xor => a ^ b,
                BinOp::Shl => {
                    let s = b & 0xffff_ffff;
                    if s >= bits { 0 } else { a << s }
                }
                BinOp::Shr => {
                    let s = b & 0xffff_ffff;
                    if signed {
                        (sa >> s.min(bits - 1)) as u64
                    } else if s >= bits {
                        0
                    } else {
                        a >> s
                    }
                }
            };
            r & mask
        }
    })
}

fn load(mem: Mem, bytes: &[u8]) -> u64 {
    match mem {
        Mem::U8 => bytes[0] as u64,
        Mem::S8 => (bytes[0] as i8 as i32 as u32) as u64,
        Mem::U16 | Mem::B16 => u16::from_le_bytes([bytes[0], bytes[1]]) as u64,
        Mem::U32 | Mem::F32 => u32::from_le_bytes(bytes[..4].try_into().unwrap()) as u64,
        Mem::U64 => u64::from_le_bytes(bytes[..8].try_into().unwrap()),
    }
}

/// Runs `k` over a grid of `grid` blocks of `k.block` threads.
pub fn launch(mem: &mut EmuMemory, k: &Kernel, grid: [u32; 3], args: &[Arg]) -> Result<(), String> {
    let err = |pc: usize, t: usize, m: String| format!("kernel `{}` instruction {pc} thread {t}: {m}", k.name);
    if args.len() != k.params.len() {
        return Err(format!("kernel `{}` takes {} arguments, got {}", k.name, k.params.len(), args.len()));
    }
    for (i, (a, (name, ty))) in args.iter().zip(&k.params).enumerate() {
        let ok =
            matches!((a, ty), (Arg::Ptr(_), ParamTy::Ptr) | (Arg::U32(_), ParamTy::U32) | (Arg::F32(_), ParamTy::F32));
        if !ok {
            return Err(format!("kernel `{}` argument {i} (`{name}`): expected {ty:?}, got {a:?}", k.name));
        }
    }
    let n = k.block as usize;
    if n == 0 || !n.is_multiple_of(32) {
        return Err(format!("kernel `{}`: block size {n} is not a multiple of 32", k.name));
    }
    let labels: HashMap<u32, usize> = k
        .body
        .iter()
        .enumerate()
        .filter_map(|(i, s)| if let Inst::Label(l) = s.inst { Some((l, i)) } else { None })
        .collect();
    let stride = k.regs.map(|c| c as usize);
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                let mut b = Block {
                    k,
                    n,
                    regs: std::array::from_fn(|c| vec![0u64; stride[c] * n]),
                    stride,
                    shared: vec![0u8; k.shared_bytes as usize],
                    shared_tag: vec![(u32::MAX, 0); (k.shared_bytes as usize).div_ceil(4)],
                    epoch: 0,
                    ctaid: [x, y, z],
                    grid,
                };
                run_block(&mut b, mem, args, &labels).map_err(|(pc, t, m)| err(pc, t, m))?;
            }
        }
    }
    Ok(())
}

type Fault = (usize, usize, String);

fn run_block(b: &mut Block<'_>, mem: &mut EmuMemory, args: &[Arg], labels: &HashMap<u32, usize>) -> Result<(), Fault> {
    let k = b.k;
    let n = b.n;
    let mut pc = 0usize;
    let mut active = vec![true; n];
    let mut steps: u64 = 0;
    while pc < k.body.len() {
        steps += 1;
        if steps > 50_000_000 {
            return Err((pc, 0, "more than 50M instructions in one block (runaway loop?)".into()));
        }
        let st = &k.body[pc];
        for (t, a) in active.iter_mut().enumerate() {
            *a = match st.guard {
                None => true,
                Some((p, neg)) => (b.get(t, p) == 1) != neg,
            };
        }
        match &st.inst {
            Inst::Label(_) => {}
            Inst::Bra { target, pred } => {
                let take = |t: usize| match pred {
                    None => true,
                    Some((p, neg)) => (b.get(t, *p) == 1) != *neg,
                };
                let first = take(0);
                if let Some(t) = (1..n).find(|&t| take(t) != first) {
                    return Err((pc, t, format!("divergent branch to $L{target} (thread 0 {first}, thread {t} not)")));
                }
                if first {
                    pc = *labels.get(target).ok_or((pc, 0, format!("no label $L{target}")))?;
                    continue;
                }
            }
            Inst::Bar => {
                if active.iter().any(|a| !a) {
                    return Err((pc, 0, "bar.sync under a guard".into()));
                }
                b.epoch += 1;
            }
            Inst::Shfl { mode, d, a, b: lane } => {
                if active.iter().any(|a| !a) {
                    return Err((pc, 0, "shfl.sync with inactive lanes".into()));
                }
                for w in (0..n).step_by(32) {
                    let vals: Vec<u64> = (0..32).map(|l| b.get(w + l, *a)).collect();
                    for l in 0..32 {
                        let s = b.src(w + l, *lane, Ty::U32) as usize & 31;
                        let from = match mode {
                            Shfl::Bfly => l ^ s,
                            Shfl::Idx => s,
                        };
                        b.set(w + l, *d, vals[from]);
                    }
                }
            }
            Inst::Mma { d, a, b: bf, c } => {
                if active.iter().any(|a| !a) {
                    return Err((pc, 0, "mma.sync with inactive lanes".into()));
                }
                let h = |v: u64, hi: bool| half::f16::from_bits((if hi { v >> 16 } else { v }) as u16).to_f32();
                for w in (0..n).step_by(32) {
                    let (mut am, mut bm, mut cm) = ([[0f32; 16]; 16], [[0f32; 8]; 16], [[0f32; 8]; 16]);
                    for lane in 0..32 {
                        let (g, q) = (lane / 4, lane % 4);
                        let t = w + lane;
                        for (i, (r, k)) in
                            [(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)].into_iter().enumerate()
                        {
                            let v = b.get(t, a[i]);
                            am[r][k] = h(v, false);
                            am[r][k + 1] = h(v, true);
                        }
                        for (i, k) in [2 * q, 2 * q + 8].into_iter().enumerate() {
                            let v = b.get(t, bf[i]);
                            bm[k][g] = h(v, false);
                            bm[k + 1][g] = h(v, true);
                        }
                        for (i, (r, col)) in
                            [(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)].into_iter().enumerate()
                        {
                            cm[r][col] = f(b.get(t, c[i]));
                        }
                    }
                    for lane in 0..32 {
                        let (g, q) = (lane / 4, lane % 4);
                        for (i, (r, col)) in
                            [(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)].into_iter().enumerate()
                        {
                            // Products of f16 values are exact in f32; sum in k order.
                            let mut acc = cm[r][col];
                            for (k, row) in bm.iter().enumerate() {
                                acc += am[r][k] * row[col];
                            }
                            b.set(w + lane, d[i], fb(acc));
                        }
                    }
                }
            }
            inst => {
                for (t, &on) in active.iter().enumerate() {
                    if on {
                        exec(b, mem, args, inst, t).map_err(|m| (pc, t, m))?;
                    }
                }
            }
        }
        pc += 1;
    }
    Ok(())
}

fn exec(b: &mut Block<'_>, mem: &mut EmuMemory, args: &[Arg], inst: &Inst, t: usize) -> Result<(), String> {
    match inst {
        Inst::Bin { op, d, a, b: bb } => {
            let at = if matches!(op, BinOp::Shl | BinOp::Shr) { Ty::U32 } else { d.ty };
            let v = bin(*op, d.ty, b.src(t, *a, d.ty), b.src(t, *bb, at))?;
            b.set(t, *d, v);
        }
        Inst::Un { op, d, a } => {
            let at = if *op == UnOp::Popc { Ty::U32 } else { d.ty };
            let x = b.src(t, *a, at);
            let v = match (op, d.ty) {
                (UnOp::Mov, _) => x,
                (UnOp::Neg, Ty::F32) => fb(-f(x)),
                (UnOp::Neg, _) => x.wrapping_neg(),
                (UnOp::Abs, Ty::F32) => fb(f(x).abs()),
                (UnOp::Abs, Ty::S32) => sext32(x).unsigned_abs(),
                (UnOp::Abs, _) => (x as i64).unsigned_abs(),
                (UnOp::Not, _) => !x,
                (UnOp::Sqrt, _) => fb(f(x).sqrt()),
                (UnOp::Rcp, _) => fb(1.0 / f(x)),
                (UnOp::Ex2, _) => fb(f(x).exp2()),
                (UnOp::Lg2, _) => fb(f(x).log2()),
                (UnOp::Tanh, _) => fb(f(x).tanh()),
                (UnOp::Popc, _) => (x as u32).count_ones() as u64,
            };
            b.set(t, *d, v);
        }
        Inst::Fma { d, a, b: bb, c } => {
            let (x, y, z) = (b.src(t, *a, d.ty), b.src(t, *bb, d.ty), b.src(t, *c, d.ty));
            let v = if d.ty == Ty::F32 { fb(f(x).mul_add(f(y), f(z))) } else { x.wrapping_mul(y).wrapping_add(z) };
            b.set(t, *d, v);
        }
        Inst::MulWide { d, a, b: bb } => {
            let (x, y) = (b.src(t, *a, Ty::U32), b.src(t, *bb, Ty::U32));
            let v =
                if d.ty.is_signed() { (sext32(x) * sext32(y)) as u64 } else { (x & 0xffff_ffff) * (y & 0xffff_ffff) };
            b.set(t, *d, v);
        }
        Inst::Cvt { d, a } => {
            let x = b.get(t, *a);
            let v = match (d.ty, a.ty) {
                (Ty::F32, Ty::U32) => fb(x as u32 as f32),
                (Ty::F32, Ty::S32) => fb(x as u32 as i32 as f32),
                (Ty::F32, Ty::U64) => fb(x as f32),
                (Ty::F32, Ty::S64) => fb(x as i64 as f32),
                (Ty::U32, Ty::F32) => f(x) as u32 as u64,
                (Ty::S32, Ty::F32) => f(x) as i32 as u32 as u64,
                (Ty::U64, Ty::U32) => x & 0xffff_ffff,
                (Ty::U64 | Ty::S64, Ty::S32) => sext32(x) as u64,
                (Ty::S64, Ty::U32) => x & 0xffff_ffff,
                (Ty::U32 | Ty::S32, _) => x & 0xffff_ffff,
                (dt, at) => return Err(format!("unsupported cvt {dt:?} <- {at:?}")),
            };
            b.set(t, *d, v);
        }
        Inst::CvtRni { d, a } => {
            // PTX saturates out-of-range results and turns NaN into 0.
            let x = f(b.get(t, *a)).round_ties_even();
            let v = match d.ty {
                Ty::U32 => x as u32 as u64,
                Ty::S32 => x as i32 as u32 as u64,
                dt => return Err(format!("unsupported cvt.rni to {dt:?}")),
            };
            b.set(t, *d, v);
        }
        Inst::CvtF16 { d, a } => {
            let v = half::f16::from_bits(b.get(t, *a) as u16).to_f32();
            b.set(t, *d, fb(v));
        }
        Inst::Bits { d, a } => {
            let v = b.get(t, *a);
            b.set(t, *d, v);
        }
        Inst::Setp { cmp, d, a, b: bb } => {
            let ty = match (a, bb) {
                (Src::R(r), _) | (_, Src::R(r)) => r.ty,
                _ => Ty::U32,
            };
            let (x, y) = (b.src(t, *a, ty), b.src(t, *bb, ty));
            let r = match ty {
                Ty::F32 => {
                    let (x, y) = (f(x), f(y));
                    if x.is_nan() || y.is_nan() {
                        false
                    } else {
                        match cmp {
                            Cmp::Eq => x == y,
                            Cmp::Ne => x != y,
                            Cmp::Lt => x < y,
                            Cmp::Le => x <= y,
                            Cmp::Gt => x > y,
                            Cmp::Ge => x >= y,
                        }
                    }
                }
                _ => {
                    let (sx, sy): (i128, i128) = match ty {
                        Ty::S32 => (sext32(x) as i128, sext32(y) as i128),
                        Ty::S64 => (x as i64 as i128, y as i64 as i128),
                        Ty::U64 => (x as i128, y as i128),
                        _ => ((x & 0xffff_ffff) as i128, (y & 0xffff_ffff) as i128),
                    };
                    match cmp {
                        Cmp::Eq => sx == sy,
                        Cmp::Ne => sx != sy,
                        Cmp::Lt => sx < sy,
                        Cmp::Le => sx <= sy,
                        Cmp::Gt => sx > sy,
                        Cmp::Ge => sx >= sy,
                    }
                }
            };
            b.set(t, *d, r as u64);
        }
        Inst::Selp { d, a, b: bb, p } => {
            let v = if b.get(t, *p) == 1 { b.src(t, *a, d.ty) } else { b.src(t, *bb, d.ty) };
            b.set(t, *d, v);
        }
        Inst::LdV4 { d, addr, off } => {
            let a = b.get(t, *addr).wrapping_add(*off as i64 as u64);
            if !a.is_multiple_of(16) {
                return Err(format!("misaligned 16-byte vector load at {a:#x}"));
            }
            let mut buf = [0u8; 16];
            mem.read(a, &mut buf)?;
            for (i, r) in d.iter().enumerate() {
                b.set(t, *r, u32::from_le_bytes(buf[4 * i..4 * i + 4].try_into().unwrap()) as u64);
            }
        }
        Inst::PackF16x2 { d, hi, lo } => {
            let hb = half::f16::from_f32(f(b.get(t, *hi))).to_bits() as u64;
            let lb = half::f16::from_f32(f(b.get(t, *lo))).to_bits() as u64;
            b.set(t, *d, (hb << 16) | lb);
        }
        Inst::Ld { space, mem: m, d, addr, off } => {
            let len = m.bytes();
            let a = b.get(t, *addr).wrapping_add(*off as i64 as u64);
            if !a.is_multiple_of(len as u64) {
                return Err(format!("misaligned {len}-byte load at {a:#x}"));
            }
            let mut buf = [0u8; 8];
            match space {
                Space::Global => mem.read(a, &mut buf[..len])?,
                Space::Shared => {
                    let a = a as usize;
                    if a + len > b.shared.len() {
                        return Err(format!("shared load at {a} beyond {} bytes", b.shared.len()));
                    }
                    let (w, e) = b.shared_tag[a / 4];
                    if w != u32::MAX && w as usize != t && e == b.epoch {
                        return Err(format!("shared word {a} read after thread {w} wrote it without bar.sync"));
                    }
                    buf[..len].copy_from_slice(&b.shared[a..a + len]);
                }
            }
            b.set(t, *d, load(*m, &buf));
        }
        Inst::St { space, mem: m, addr, off, v } => {
            let len = m.bytes();
            let vt = match m {
                Mem::F32 => Ty::F32,
                Mem::U64 => Ty::U64,
                _ => Ty::U32,
            };
            let val = b.src(t, *v, vt).to_le_bytes();
            let a = b.get(t, *addr).wrapping_add(*off as i64 as u64);
            if !a.is_multiple_of(len as u64) {
                return Err(format!("misaligned {len}-byte store at {a:#x}"));
            }
            match space {
                Space::Global => mem.write(a, &val[..len])?,
                Space::Shared => {
                    let a = a as usize;
                    if a + len > b.shared.len() {
                        return Err(format!("shared store at {a} beyond {} bytes", b.shared.len()));
                    }
                    b.shared[a..a + len].copy_from_slice(&val[..len]);
                    b.shared_tag[a / 4] = (t as u32, b.epoch);
                }
            }
        }
        Inst::Param { d, i } => {
            let v = match args[*i] {
                Arg::Ptr(p) => p,
                Arg::U32(u) => u as u64,
                Arg::F32(x) => fb(x),
            };
            b.set(t, *d, v);
        }
        Inst::Sreg { d, s } => {
            let v = match s {
                Special::TidX => t as u32,
                Special::CtaidX => b.ctaid[0],
                Special::CtaidY => b.ctaid[1],
                Special::CtaidZ => b.ctaid[2],
                Special::NtidX => b.n as u32,
                Special::NctaidX => b.grid[0],
                Special::NctaidY => b.grid[1],
                Special::NctaidZ => b.grid[2],
            };
            b.set(t, *d, v as u64);
        }
        Inst::SharedBase { d } => b.set(t, *d, 0),
        Inst::Shfl { .. } | Inst::Mma { .. } | Inst::Bar | Inst::Label(_) | Inst::Bra { .. } => {
            unreachable!("handled per block")
        }
    }
    Ok(())
}
