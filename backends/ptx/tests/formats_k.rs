//! The K-quant and kq2 group decoders (`kiln_ptx::formats_k`) run by the SIMT
//! emulator: group by group against the reference dequantizers, inside the
//! matmul kernel, and kq2's activation rotation on the host and the device.

mod common;

use common::*;
use kiln_ir::DType;
use kiln_ptx::emu::{Arg, EmuMemory, launch};
use kiln_ptx::{formats_k, kernels};
use kiln_quant::kq2::{KQ2_UNROTATED, dot_kq2, kq2_codeword, kq2_scale, quantize_kq2};

const K_QUANTS: [DType; 5] = [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K];

/// Offsets of the f16 scale fields of a K-quant block.
fn f16_fields(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q2K => &[80, 82],
        DType::Q3K => &[108],
        DType::Q4K | DType::Q5K => &[0, 2],
        DType::Q6K => &[208],
        _ => &[],
    }
}

/// Random blocks of `dtype` (every quant and scale bit pattern) with finite
/// f16 scales in about ±[2⁻⁸, 2).
fn random_row(dtype: DType, k: usize, seed: u64) -> Vec<u8> {
    let rb = dtype.row_bytes(k as u64).unwrap() as usize;
    let mut b = rand_bytes(rb, seed);
    for blk in b.chunks_exact_mut(dtype.block_bytes() as usize) {
        for &f in f16_fields(dtype) {
            // Exponent 7..=15 (of 31, bias 15): 2^-8 .. 2.
            let e = 7 + (blk[f + 1] >> 2) % 9;
            blk[f + 1] = (blk[f + 1] & 0x83) | (e << 2);
        }
    }
    if dtype == DType::KQ2 {
        // Scale indices 60..=100 (about 2⁻⁶ .. 2²), both rotation flags.
        for blk in b.chunks_exact_mut(18) {
            blk[0] = (blk[0] & KQ2_UNROTATED) | (60 + (blk[0] & 0x7f) % 41);
        }
    }
    b
}

/// The 17-bit codeword of group `g` of a kq2 block (the layout in `kiln_quant::kq2`).
fn kq2_code(b: &[u8], g: usize) -> u32 {
    let lo = u32::from(u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]));
    (lo & 0xff) | u32::from(b[1] >> g & 1) << 8 | (lo >> 8) << 9
}

/// A kq2 row's storage vectors v (scale · codeword) and each block's
/// rotation flag.
fn kq2_storage(row: &[u8]) -> (Vec<f32>, Vec<bool>) {
    let mut v = Vec::new();
    let mut rotated = Vec::new();
    for b in row.chunks_exact(18) {
        let s = kq2_scale(b[0]);
        for g in 0..8 {
            v.extend(kq2_codeword(kq2_code(b, g)).map(|c| c * s));
        }
        rotated.push(b[0] & KQ2_UNROTATED == 0);
    }
    (v, rotated)
}

#[test]
fn k_quant_groups_match_the_reference() {
    for dtype in K_QUANTS {
        let k = 768;
        for seed in 0..3 {
            let row = random_row(dtype, k, 100 + seed);
            let mut want = vec![0f32; k];
            kiln_quant::dequantize_row(dtype, &row, &mut want).unwrap();
            let got = decode_on_device(dtype, &row, k);
            for (g, (w, rot)) in got.iter().enumerate() {
                assert!(!rot, "{dtype}: group {g} flagged rotated");
                // Q3_K and Q6_K are bit-exact; Q2_K, Q4_K, Q5_K fuse d·sc·q − dmin·m into
                // one fma where the reference rounds twice: an ulp or so of the block's range.
                let blk = &want[g / 32 * 256..][..256];
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let tol = if matches!(dtype, DType::Q3K | DType::Q6K) { 0.0 } else { 2.0 * f32::EPSILON * amax };
                for i in 0..8 {
                    let (a, b) = (w[i], want[8 * g + i]);
                    assert!((a - b).abs() <= tol, "{dtype} seed {seed}: weight {}: got {a}, want {b}", 8 * g + i);
                }
            }
        }
    }
}

#[test]
fn kq2_groups_match_the_codewords_exactly() {
    // Random blocks: every magnitude index, sign pattern, shift bit and both flags.
    let k = 64 * 40;
    let row = random_row(DType::KQ2, k, 7);
    let (v, rotated) = kq2_storage(&row);
    assert!(rotated.iter().any(|&r| r) && rotated.iter().any(|&r| !r));
    let got = decode_on_device(DType::KQ2, &row, k);
    for (g, (w, rot)) in got.iter().enumerate() {
        assert_eq!(*rot, rotated[g / 8], "group {g} flag");
        for i in 0..8 {
            assert_eq!(w[i].to_bits(), v[8 * g + i].to_bits(), "group {g} weight {i}: {} vs {}", w[i], v[8 * g + i]);
        }
    }
    // Every magnitude index and scale, via hand-built blocks: block m holds
    // index 8m + g in group g, scale index m % 128, signs and shifts from m.
    let mut row = Vec::new();
    for m in 0..64usize {
        let mut b = [0u8; 18];
        b[0] = (m % 128) as u8 | if m % 3 == 0 { KQ2_UNROTATED } else { 0 };
        for g in 0..8 {
            let idx = 8 * m + g;
            b[1] |= ((idx >> 8) as u8 & 1) << g;
            let lo = (idx & 0xff) as u16 | ((((m * 37 + g * 11) & 0xff) as u16) << 8);
            b[2 + 2 * g..4 + 2 * g].copy_from_slice(&lo.to_le_bytes());
        }
        row.extend(b);
    }
    let (v, rotated) = kq2_storage(&row);
    let got = decode_on_device(DType::KQ2, &row, 64 * 64);
    for (g, (w, rot)) in got.iter().enumerate() {
        assert_eq!(*rot, rotated[g / 8], "group {g} flag");
        // Exact, but scale index 0 may give −0 where the device gives +0.
        assert_eq!(*w, std::array::from_fn(|i| v[8 * g + i]), "group {g}");
    }
}

#[test]
fn matmul_k_quants() {
    for dtype in K_QUANTS {
        check_matmul(dtype, 6, 256, 5, false);
        check_matmul(dtype, 5, 512, 1, true);
        check_matmul(dtype, 3, 256, 1, false);
        check_matmul(dtype, 4, 512, 5, true);
    }
}

/// kq2 rows with rotated and unrotated blocks: quantized without importance,
/// quantized with importance concentrated on a few columns (which makes the
/// quantizer keep some blocks unrotated), and random bytes.
fn kq2_rows(rows: usize, k: usize) -> Vec<u8> {
    let rb = k / 64 * 18;
    let mut wq = vec![0u8; rows * rb];
    let wf = rand_vec(rows * k, 31);
    let imp: Vec<f32> = (0..k).map(|i| if i % 64 < 3 || i % 29 == 0 { 50.0 } else { 0.01 }).collect();
    for (r, dst) in wq.chunks_exact_mut(rb).enumerate() {
        let src = &wf[r * k..(r + 1) * k];
        match r % 3 {
            0 => quantize_kq2(src, None, dst).unwrap(),
            1 => quantize_kq2(src, Some(&imp), dst).unwrap(),
            _ => dst.copy_from_slice(&random_row(DType::KQ2, k, 40 + r as u64)),
        }
    }
    let (_, rotated) = kq2_storage(&wq);
    assert!(rotated.iter().any(|&r| r) && rotated.iter().any(|&r| !r), "kq2 test rows need both kinds of block");
    wq
}

#[test]
fn matmul_kq2() {
    // kiln_quant's own quantizer (both kinds of block may occur).
    check_matmul(DType::KQ2, 6, 64, 5, false);
    check_matmul(DType::KQ2, 5, 192, 1, true);
    check_matmul(DType::KQ2, 4, 192, 5, true);
    check_matmul(DType::KQ2, 3, 64, 1, false);
    // Rows that surely mix rotated and unrotated blocks.
    for &(rows, k, t, bias) in
        &[(6usize, 64usize, 5usize, false), (5, 192, 1, true), (7, 320, 5, true), (3, 192, 1, false)]
    {
        check_matmul_bytes(DType::KQ2, &kq2_rows(rows, k), rows, k, t, bias);
    }
}

#[test]
fn rotate_kernel_matches_rotate_host() {
    let kern = formats_k::rotate_kernel();
    assert_eq!(kern.name, "kq2_rotate");
    // n = 576: the last block's second chunk lies past n; n = 256: whole blocks.
    for &(t, k) in &[(3usize, 192usize), (1, 64), (2, 128), (5, 64)] {
        let n = t * k;
        let x = rand_vec(n, 50 + n as u64);
        let want = formats_k::rotate_host(&x, k);
        let mut mem = EmuMemory::new();
        let xa = upload(&mut mem, &f32_bytes(&x));
        let ya = mem.alloc(4 * n);
        let grid = [(n as u32).div_ceil(kernels::BLOCK), 1, 1];
        launch(&mut mem, &kern, grid, &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(n as u32)]).unwrap();
        let got = download(&mem, ya, n);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "T {t} k {k}"
        );
        // In place.
        launch(&mut mem, &kern, grid, &[Arg::Ptr(xa), Arg::Ptr(xa), Arg::U32(n as u32)]).unwrap();
        assert_eq!(download(&mem, xa, n), got, "in place, T {t} k {k}");
    }
}

#[test]
fn rotate_host_is_the_rotation_of_dot_kq2() {
    let k = 320;
    let rows = 6;
    let wq = kq2_rows(rows, k);
    let x = rand_vec(k, 61);
    let xr = formats_k::rotate_host(&x, k);
    // The rotation is orthogonal: norms agree.
    let n2 = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    assert!((n2(&x) - n2(&xr)).abs() <= 1e-5 * n2(&x));
    for (r, row) in wq.chunks_exact(k / 64 * 18).enumerate() {
        let (v, rotated) = kq2_storage(row);
        let mut got = 0f64;
        let mut scale = 0f64;
        for (i, vi) in v.iter().enumerate() {
            let xi = if rotated[i / 64] { xr[i] } else { x[i] };
            got += *vi as f64 * xi as f64;
            scale += (*vi as f64 * xi as f64).abs();
        }
        let want = dot_kq2(row, &x).unwrap() as f64;
        assert!((got - want).abs() <= 1e-5 * scale + 1e-6, "row {r}: {got} vs dot_kq2 {want}");
        let mut wd = vec![0f32; k];
        kiln_quant::dequantize_row(DType::KQ2, row, &mut wd).unwrap();
        let plain: f64 = wd.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((got - plain).abs() <= 1e-5 * scale + 1e-6, "row {r}: {got} vs dequantized {plain}");
    }
}

#[test]
fn tables_only_for_kq2() {
    for dtype in K_QUANTS {
        assert!(formats_k::tables(dtype).is_none(), "{dtype}");
    }
    let t = formats_k::tables(DType::KQ2).unwrap();
    assert_eq!(t.len() % 4, 0);
}
