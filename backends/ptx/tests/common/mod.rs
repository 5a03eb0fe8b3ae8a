//! Helpers shared by the kernel tests.
#![allow(dead_code)]

use kiln_ir::DType;
use kiln_ptx::emu::{Arg, EmuMemory, launch};
use kiln_ptx::kernels;
use kiln_ptx::ptx::{BinOp, Cmp, Kb, Kernel, Mem, ParamTy, Special, Ty};

/// A xorshift64 stream from `seed` (the tests' one source of pseudo-random numbers).
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// Deterministic pseudo-random floats in [-1, 1).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = xorshift(seed);
    (0..n).map(|_| ((r() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect()
}

/// Deterministic pseudo-random bytes.
pub fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = xorshift(seed);
    (0..n).map(|_| (r() >> 32) as u8).collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn upload(mem: &mut EmuMemory, bytes: &[u8]) -> u64 {
    let a = mem.alloc(bytes.len().max(4));
    mem.write(a, bytes).unwrap();
    a
}

pub fn download(mem: &EmuMemory, a: u64, n: usize) -> Vec<f32> {
    let mut b = vec![0u8; 4 * n];
    mem.read(a, &mut b).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= tol, "{what}: element {i}: got {g}, want {w} (rel err {err:e} > {tol:e})");
    }
}

/// Runs the matmul kernel for `dtype` on random weights and activations and
/// compares with dequantize-then-multiply in f64.
pub fn check_matmul(dtype: DType, rows: usize, k: usize, t: usize, bias: bool) {
    let wf = rand_vec(rows * k, 1 + rows as u64);
    let rb = dtype.row_bytes(k as u64).unwrap() as usize;
    let mut wq = vec![0u8; rows * rb];
    for r in 0..rows {
        kiln_quant::quantize_row(dtype, &wf[r * k..(r + 1) * k], &mut wq[r * rb..(r + 1) * rb]).unwrap();
    }
    check_matmul_bytes(dtype, &wq, rows, k, t, bias);
}

/// Like [`check_matmul`], for given weight bytes (`rows` rows of `k` weights).
pub fn check_matmul_bytes(dtype: DType, wq: &[u8], rows: usize, k: usize, t: usize, bias: bool) {
    let rb = dtype.row_bytes(k as u64).unwrap() as usize;
    assert_eq!(wq.len(), rows * rb);
    let mut wd = vec![0f32; rows * k];
    for r in 0..rows {
        kiln_quant::dequantize_row(dtype, &wq[r * rb..(r + 1) * rb], &mut wd[r * k..(r + 1) * k]).unwrap();
    }
    let x = rand_vec(t * k, 7);
    let b = rand_vec(rows, 9);
    let mut want = vec![0f32; t * rows];
    for ti in 0..t {
        for r in 0..rows {
            let mut s = 0f64;
            for i in 0..k {
                s += wd[r * k + i] as f64 * x[ti * k + i] as f64;
            }
            if bias {
                s += b[r] as f64;
            }
            want[ti * rows + r] = s as f32;
        }
    }
    let kern = kernels::matmul(dtype, bias);
    let mut mem = EmuMemory::new();
    let wa = upload(&mut mem, wq);
    let xa = upload(&mut mem, &f32_bytes(&x));
    let ba = upload(&mut mem, &f32_bytes(&b));
    let ya = mem.alloc(4 * t * rows);
    let tables = kiln_ptx::formats::tables(dtype).unwrap_or_else(|| vec![0; 4]);
    let ta = upload(&mut mem, &tables);
    let xr = if kiln_ptx::formats::needs_rotated_x(dtype) {
        let xr = kiln_ptx::formats_k::rotate_host(&x, k);
        upload(&mut mem, &f32_bytes(&xr))
    } else {
        xa
    };
    let grid = kernels::matmul_grid(rows as u32, t as u32);
    let args = [
        Arg::Ptr(wa),
        Arg::Ptr(xa),
        Arg::Ptr(xr),
        Arg::Ptr(ya),
        Arg::Ptr(ba),
        Arg::Ptr(ta),
        Arg::U32(rows as u32),
        Arg::U32(k as u32),
        Arg::U32(t as u32),
        Arg::U32(rb as u32),
    ];
    launch(&mut mem, &kern, grid, &args).unwrap();
    let got = download(&mem, ya, t * rows);
    assert_close(&got, &want, 2e-5 * (k as f32).sqrt(), &format!("matmul {dtype}"));
}

/// A kernel that decodes every group of one row: arguments `row, tables,
/// out, groups`; thread g writes its 8 weights and 1.0 if the group is
/// rotated (else 0.0) at `out + 36·g`.
pub fn decode_kernel(dtype: DType) -> Kernel {
    let mut kb = Kb::new(
        format!("decode_{}", dtype.name()),
        &[("row", ParamTy::Ptr), ("tables", ParamTy::Ptr), ("out", ParamTy::Ptr), ("groups", ParamTy::U32)],
        kernels::BLOCK,
    );
    let (row, tables, out, groups) = (kb.param(0), kb.param(1), kb.param(2), kb.param(3));
    let tid = kb.tid();
    let cta = kb.special(Special::CtaidX);
    let g = kb.mad(Ty::U32, cta, kernels::BLOCK, tid);
    let ok = kb.setp(Cmp::Lt, g, groups);
    let last = kb.sub(Ty::U32, groups, 1u32);
    let gc = kb.bin(BinOp::Min, Ty::U32, g, last);
    let grp = kiln_ptx::formats::decode8(&mut kb, dtype, row, gc, tables);
    let rot = match grp.rotated {
        Some(p) => kb.selp(Ty::F32, 1.0f32, 0.0f32, p),
        None => kb.imm(Ty::F32, 0.0f32),
    };
    let oa = kb.index(out, gc, 36);
    kb.guarded(ok, false, |kb| {
        for (i, &w) in grp.w.iter().enumerate() {
            kb.st(Mem::F32, oa, 4 * i as i32, w);
        }
        kb.st(Mem::F32, oa, 32, rot);
    });
    kb.finish()
}

/// Runs [`decode_kernel`] on `row` (k weights): the 8 weights and the
/// rotated flag of each group.
pub fn decode_on_device(dtype: DType, row: &[u8], k: usize) -> Vec<([f32; 8], bool)> {
    let groups = k / 8;
    let mut mem = EmuMemory::new();
    let ra = upload(&mut mem, row);
    let ta = upload(&mut mem, &kiln_ptx::formats::tables(dtype).unwrap_or_else(|| vec![0; 4]));
    let oa = mem.alloc(36 * groups);
    let args = [Arg::Ptr(ra), Arg::Ptr(ta), Arg::Ptr(oa), Arg::U32(groups as u32)];
    launch(&mut mem, &decode_kernel(dtype), [(groups as u32).div_ceil(kernels::BLOCK), 1, 1], &args).unwrap();
    download(&mem, oa, 9 * groups).chunks_exact(9).map(|c| (std::array::from_fn(|i| c[i]), c[8] == 1.0)).collect()
}
