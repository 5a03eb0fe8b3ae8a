//! Every kernel run by the SIMT emulator against a plain Rust computation of
//! the same op (the reference interpreter's definitions), and the printed
//! module assembled by ptxas when it is installed.

mod common;

use common::*;
use kiln_ir::{Activation, DType, RopeLayout};
use kiln_ptx::emu::{Arg, EmuMemory, launch};
use kiln_ptx::kernels;
use kiln_ptx::ptx::BinOp;

#[test]
fn matmul_plain_and_legacy_formats() {
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::IQ4NL,
    ] {
        check_matmul(dtype, 6, 96, 5, false);
        check_matmul(dtype, 5, 64, 1, true);
        check_matmul(dtype, 3, 64, 19, true);
    }
}

/// IQ4_NL's register lookup is bit-exact: every group of random blocks (all 16 indices in
/// both nibbles, scales of both signs) decodes to the reference dequantizer's values.
#[test]
fn iq4_nl_groups_are_bit_exact() {
    let k = 32 * 48;
    for seed in 0..3 {
        let mut row = rand_bytes(DType::IQ4NL.row_bytes(k as u64).unwrap() as usize, 50 + seed);
        for blk in row.chunks_exact_mut(18) {
            // A finite f16 scale: exponent 7..=15 (2^-8 .. 2), either sign.
            let e = 7 + (blk[1] >> 2) % 9;
            blk[1] = (blk[1] & 0x83) | (e << 2);
        }
        let mut want = vec![0f32; k];
        kiln_quant::dequantize_row(DType::IQ4NL, &row, &mut want).unwrap();
        for (g, (w, rot)) in decode_on_device(DType::IQ4NL, &row, k).iter().enumerate() {
            assert!(!rot);
            for i in 0..8 {
                let (a, b) = (w[i], want[8 * g + i]);
                assert_eq!(a.to_bits(), b.to_bits(), "seed {seed}: weight {}: got {a}, want {b}", 8 * g + i);
            }
        }
    }
}

#[test]
fn elementwise_kernels() {
    let n = 300;
    let a = rand_vec(n, 3);
    let b = rand_vec(n, 4);
    let mut mem = EmuMemory::new();
    let aa = upload(&mut mem, &f32_bytes(&a));
    let ba = upload(&mut mem, &f32_bytes(&b));
    let ya = mem.alloc(4 * n);
    let grid = [(n as u32).div_ceil(kernels::BLOCK), 1, 1];
    for (op, f) in [(BinOp::Add, (|x, y| x + y) as fn(f32, f32) -> f32), (BinOp::Mul, |x, y| x * y)] {
        launch(&mut mem, &kernels::binary(op), grid, &[Arg::Ptr(aa), Arg::Ptr(ba), Arg::Ptr(ya), Arg::U32(n as u32)])
            .unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| f(*x, *y)).collect();
        assert_eq!(download(&mem, ya, n), want, "{op:?}");
    }
    launch(&mut mem, &kernels::scale(), grid, &[Arg::Ptr(aa), Arg::Ptr(ya), Arg::U32(n as u32), Arg::F32(0.37)])
        .unwrap();
    assert_eq!(download(&mem, ya, n), a.iter().map(|x| x * 0.37).collect::<Vec<_>>());
    let silu = |x: f32| x / (1.0 + (-x).exp());
    let gelu = |x: f32| 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh());
    for (kind, f) in [(Activation::Silu, silu as fn(f32) -> f32), (Activation::GeluTanh, gelu)] {
        launch(&mut mem, &kernels::act(kind), grid, &[Arg::Ptr(aa), Arg::Ptr(ya), Arg::U32(n as u32)]).unwrap();
        assert_close(&download(&mem, ya, n), &a.iter().map(|x| f(*x)).collect::<Vec<_>>(), 1e-6, "act");
        launch(&mut mem, &kernels::glu(kind), grid, &[Arg::Ptr(aa), Arg::Ptr(ba), Arg::Ptr(ya), Arg::U32(n as u32)])
            .unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| f(*x) * y).collect();
        assert_close(&download(&mem, ya, n), &want, 1e-6, "glu");
    }
}

#[test]
fn rms_norm_and_softmax() {
    for &(rows, n) in &[(3usize, 200usize), (4, 64), (2, 1)] {
        let x = rand_vec(rows * n, 5);
        let w = rand_vec(n, 6);
        let mut mem = EmuMemory::new();
        let xa = upload(&mut mem, &f32_bytes(&x));
        let wa = upload(&mut mem, &f32_bytes(&w));
        let ya = mem.alloc(4 * rows * n);
        for weight in [false, true] {
            let args = [Arg::Ptr(xa), Arg::Ptr(wa), Arg::Ptr(ya), Arg::U32(n as u32), Arg::F32(1e-5)];
            launch(&mut mem, &kernels::rms_norm(weight), [rows as u32, 1, 1], &args).unwrap();
            let mut want = vec![0f32; rows * n];
            for r in 0..rows {
                let row = &x[r * n..(r + 1) * n];
                let ms = row.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                for i in 0..n {
                    want[r * n + i] = (row[i] as f64 * inv) as f32 * if weight { w[i] } else { 1.0 };
                }
            }
            assert_close(&download(&mem, ya, rows * n), &want, 1e-5, "rms_norm");
        }
        launch(&mut mem, &kernels::softmax(), [rows as u32, 1, 1], &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(n as u32)])
            .unwrap();
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            let row = &x[r * n..(r + 1) * n];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|v| ((v - m) as f64).exp()).sum();
            for i in 0..n {
                want[r * n + i] = (((row[i] - m) as f64).exp() / s) as f32;
            }
        }
        assert_close(&download(&mem, ya, rows * n), &want, 1e-6, "softmax");
        launch(&mut mem, &kernels::argmax(), [rows as u32, 1, 1], &[Arg::Ptr(xa), Arg::Ptr(ya), Arg::U32(n as u32)])
            .unwrap();
        let mut b = vec![0u8; 4 * rows];
        mem.read(ya, &mut b).unwrap();
        for r in 0..rows {
            let got = u32::from_le_bytes(b[4 * r..4 * r + 4].try_into().unwrap()) as usize;
            let row = &x[r * n..(r + 1) * n];
            let want = (0..n).fold(0, |bi, i| if row[i] > row[bi] { i } else { bi });
            assert_eq!(got, want, "argmax row {r}");
        }
    }
}

#[test]
fn rope_layouts() {
    for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
        let (t, heads, hd, rot, pos) = (3usize, 2usize, 16usize, 12usize, 5usize);
        let cols = heads * hd;
        let x = rand_vec(t * cols, 11);
        let half = rot / 2;
        let mut cs = vec![0f32; (pos + t) * half * 2];
        for p in 0..pos + t {
            for i in 0..half {
                let a = p as f32 * 10000f32.powf(-2.0 * i as f32 / rot as f32);
                cs[(p * half + i) * 2] = a.cos();
                cs[(p * half + i) * 2 + 1] = a.sin();
            }
        }
        let mut mem = EmuMemory::new();
        let xa = upload(&mut mem, &f32_bytes(&x));
        let ca = upload(&mut mem, &f32_bytes(&cs));
        let ya = mem.alloc(4 * t * cols);
        let step = upload(&mut mem, &(pos as u32).to_le_bytes());
        let args = [
            Arg::Ptr(xa),
            Arg::Ptr(ya),
            Arg::Ptr(ca),
            Arg::Ptr(step),
            Arg::U32(cols as u32),
            Arg::U32(hd as u32),
            Arg::U32(rot as u32),
        ];
        launch(&mut mem, &kernels::rope(layout), [t as u32, heads as u32, 1], &args).unwrap();
        let mut want = x.clone();
        for ti in 0..t {
            for h in 0..heads {
                let base = ti * cols + h * hd;
                for i in 0..half {
                    let (i0, i1) = match layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::Neox => (i, i + half),
                    };
                    let (c, s) = (cs[((pos + ti) * half + i) * 2], cs[((pos + ti) * half + i) * 2 + 1]);
                    let (x0, x1) = (x[base + i0], x[base + i1]);
                    want[base + i0] = x0.mul_add(c, -(x1 * s));
                    want[base + i1] = x0.mul_add(s, x1 * c);
                }
            }
        }
        assert_eq!(download(&mem, ya, t * cols), want, "rope {layout:?}");
    }
}

/// Attention over a cache filled by `kv_append`, with splits, GQA, window, sinks and soft-cap.
#[test]
fn attention_matches_naive() {
    for &(hd, window, sink, softcap, splits) in &[
        (64u32, 0u32, 0u32, 0f32, 1u32),
        (64, 0, 0, 0.0, 3),
        (48, 5, 0, 0.0, 2),
        (48, 4, 2, 0.0, 3),
        (64, 3, 9, 0.0, 2),
        (128, 0, 0, 30.0, 1),
    ] {
        let (heads, kv_heads, pos, t) = (4usize, 2usize, 6usize, 3usize);
        let hd_us = hd as usize;
        let width = kv_heads * hd_us;
        let total = pos + t;
        let kall = rand_vec(total * width, 21);
        let vall = rand_vec(total * width, 22);
        let q = rand_vec(t * heads * hd_us, 23);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut mem = EmuMemory::new();
        let kc = mem.alloc(4 * 16 * width);
        let vc = mem.alloc(4 * 16 * width);
        // A windowed slot is a ring after its sinks: here it wraps (9 positions in 8 rows).
        let (rows, ring_sink) = if window > 0 { (sink + window + t as u32 - 1, sink) } else { (16, 0) };
        // Fill the first `pos` positions, then append the T new rows.
        for (start, len) in [(0usize, pos), (pos, t)] {
            let ka = upload(&mut mem, &f32_bytes(&kall[start * width..(start + len) * width]));
            let va = upload(&mut mem, &f32_bytes(&vall[start * width..(start + len) * width]));
            let n = (len * width) as u32;
            let step = upload(&mut mem, &(start as u32).to_le_bytes());
            let args = [
                Arg::Ptr(ka),
                Arg::Ptr(va),
                Arg::Ptr(kc),
                Arg::Ptr(vc),
                Arg::Ptr(step),
                Arg::U32(n),
                Arg::U32(width as u32),
                Arg::U32(rows),
                Arg::U32(ring_sink),
            ];
            launch(&mut mem, &kernels::kv_append(), [n.div_ceil(kernels::BLOCK), 1, 1], &args).unwrap();
        }
        let qa = upload(&mut mem, &f32_bytes(&q));
        let rec = kernels::attn_record(hd) as usize;
        let part = mem.alloc(4 * t * heads * splits as usize * rec);
        let out = mem.alloc(4 * t * heads * hd_us);
        let step = upload(&mut mem, &(pos as u32).to_le_bytes());
        let args = [
            Arg::Ptr(qa),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(part),
            Arg::Ptr(step),
            Arg::U32(heads as u32),
            Arg::U32((heads / kv_heads) as u32),
            Arg::U32(width as u32),
            Arg::F32(scale),
            Arg::U32(window),
            Arg::U32(sink),
            Arg::F32(softcap),
            Arg::U32(splits),
            Arg::U32(rows),
            Arg::U32(ring_sink),
        ];
        launch(&mut mem, &kernels::attention(hd, softcap > 0.0), [heads as u32, t as u32, splits], &args).unwrap();
        let cargs = [Arg::Ptr(part), Arg::Ptr(out), Arg::U32(heads as u32), Arg::U32(hd), Arg::U32(splits)];
        launch(&mut mem, &kernels::attn_combine(), [heads as u32, t as u32, 1], &cargs).unwrap();
        let got = download(&mem, out, t * heads * hd_us);
        let mut want = vec![0f32; t * heads * hd_us];
        for ti in 0..t {
            let p = pos + ti;
            let lo = if window > 0 { (p + 1).saturating_sub(window as usize) } else { 0 };
            let keys: Vec<usize> = (0..lo.min(sink as usize)).chain(lo..=p).collect();
            for h in 0..heads {
                let kvo = (h / (heads / kv_heads)) * hd_us;
                let qh = &q[(ti * heads + h) * hd_us..][..hd_us];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let mut s =
                            scale as f64 * (0..hd_us).map(|d| (qh[d] * kall[j * width + kvo + d]) as f64).sum::<f64>();
                        if softcap > 0.0 {
                            s = softcap as f64 * (s / softcap as f64).tanh();
                        }
                        s
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for d in 0..hd_us {
                    let o: f64 = keys
                        .iter()
                        .zip(&scores)
                        .map(|(&j, s)| (s - m).exp() / z * vall[j * width + kvo + d] as f64)
                        .sum();
                    want[(ti * heads + h) * hd_us + d] = o as f32;
                }
            }
        }
        assert_close(
            &got,
            &want,
            2e-6,
            &format!("attention hd {hd} window {window} sink {sink} softcap {softcap} splits {splits}"),
        );
    }
}

/// The tensor-core prefill matmul: f16 tiles, f32 accumulation; compared with the
/// f64 product of the dequantized weights, relative to the largest output.
fn check_matmul_mma(dtype: DType, rows: usize, k: usize, t: usize, bias: bool) {
    let wf = rand_vec(rows * k, 3 + rows as u64);
    let rb = dtype.row_bytes(k as u64).unwrap() as usize;
    let mut wq = vec![0u8; rows * rb];
    let mut wd = vec![0f32; rows * k];
    for r in 0..rows {
        kiln_quant::quantize_row(dtype, &wf[r * k..(r + 1) * k], &mut wq[r * rb..(r + 1) * rb]).unwrap();
        kiln_quant::dequantize_row(dtype, &wq[r * rb..(r + 1) * rb], &mut wd[r * k..(r + 1) * k]).unwrap();
    }
    let x = rand_vec(t * k, 17);
    let b = rand_vec(rows, 19);
    let want: Vec<f32> = (0..t * rows)
        .map(|i| {
            let (ti, r) = (i / rows, i % rows);
            let s: f64 = (0..k).map(|j| wd[r * k + j] as f64 * x[ti * k + j] as f64).sum();
            (s + if bias { b[r] as f64 } else { 0.0 }) as f32
        })
        .collect();
    let mut mem = EmuMemory::new();
    let wa = upload(&mut mem, &wq);
    let xa = upload(&mut mem, &f32_bytes(&x));
    let ba = upload(&mut mem, &f32_bytes(&b));
    let ya = mem.alloc(4 * t * rows);
    let args = [
        Arg::Ptr(wa),
        Arg::Ptr(xa),
        Arg::Ptr(xa),
        Arg::Ptr(ya),
        Arg::Ptr(ba),
        Arg::Ptr(ba),
        Arg::U32(rows as u32),
        Arg::U32(k as u32),
        Arg::U32(t as u32),
        Arg::U32(rb as u32),
    ];
    let grid = kernels::matmul_mma_grid(rows as u32, t as u32);
    launch(&mut mem, &kernels::matmul_mma(dtype, bias), grid, &args).unwrap();
    let got = download(&mem, ya, t * rows);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err < 2e-3, "mma {dtype} rows {rows} k {k} t {t}: rel err {err}");
    assert!(err > 0.0 || dtype == DType::F16, "f16 rounding leaves some error");
}

#[test]
fn tensor_core_matmul_matches_within_f16_rounding() {
    for dtype in [
        DType::F32,
        DType::F16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::IQ4NL,
        DType::Q4K,
        DType::Q6K,
        DType::Q2K,
    ] {
        let k = if dtype.block_elems() >= 256 { 256 } else { 96 };
        check_matmul_mma(dtype, 70, k, 67, true);
        check_matmul_mma(dtype, 16, k, 16, false);
    }
}

#[test]
fn top_k_orders_by_value_then_index_and_skips_nan() {
    let mut row = rand_vec(300, 29);
    row[7] = row[100]; // a tie: the lower index first
    row[13] = f32::NAN;
    row[250] = f32::NEG_INFINITY;
    let mut mem = EmuMemory::new();
    let xa = upload(&mut mem, &f32_bytes(&row));
    for k in [1usize, 10, 299, 300] {
        let out = mem.alloc(8 * k);
        launch(
            &mut mem,
            &kernels::top_k(),
            [1, 1, 1],
            &[Arg::Ptr(xa), Arg::Ptr(out), Arg::U32(300), Arg::U32(k as u32)],
        )
        .unwrap();
        let mut b = vec![0u8; 8 * k];
        mem.read(out, &mut b).unwrap();
        let got: Vec<(u32, f32)> = b
            .chunks_exact(8)
            .map(|p| (u32::from_le_bytes(p[..4].try_into().unwrap()), f32::from_le_bytes(p[4..].try_into().unwrap())))
            .take_while(|(i, _)| *i != u32::MAX)
            .collect();
        let want = kiln_backends::top_k(&row, k);
        assert_eq!(got.len(), want.len(), "k {k}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0, "k {k}");
            assert_eq!(g.1.to_bits(), w.1.to_bits(), "k {k}");
        }
    }
}

/// `moe_route` against the reference's definition: every scoring, top-k with and without the
/// selection bias (ties to the lower expert), and hash routing whose table row names an
/// expert twice (counted twice).
#[test]
fn moe_route_scorings_top_k_and_hash() {
    use kiln_ir::Scoring;
    use kiln_ptx::kernels_ds4 as k4;
    let (t, e, k, scale) = (5usize, 8usize, 2usize, 1.5f32);
    let mut logits = rand_vec(t * e, 21);
    logits[3] = logits[5]; // a tie in row 0
    let bias: Vec<f32> = rand_vec(e, 22).iter().map(|v| v * 0.1).collect();
    let table: Vec<f32> = vec![1.0, 6.0, 3.0, 3.0, 0.0, 7.0, 2.0, 5.0, 4.0, 4.0];
    let ids = [0u32, 1, 2, 3, 4];
    let score = |s: Scoring, row: &[f32]| -> Vec<f32> {
        match s {
            Scoring::SqrtSoftplus => row.iter().map(|z| if *z > 20.0 { *z } else { z.exp().ln_1p() }.sqrt()).collect(),
            Scoring::Sigmoid => row.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect(),
            Scoring::Softmax => {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let ex: Vec<f32> = row.iter().map(|z| (z - m).exp()).collect();
                let sum: f32 = ex.iter().sum();
                ex.iter().map(|v| v / sum).collect()
            }
        }
    };
    let mut mem = EmuMemory::new();
    let la = upload(&mut mem, &f32_bytes(&logits));
    let ba = upload(&mut mem, &f32_bytes(&bias));
    let ta = upload(&mut mem, &f32_bytes(&table));
    let ia = upload(&mut mem, &ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    let sel = mem.alloc(4 * t * e);
    let ya = mem.alloc(4 * t * e);
    for s in [Scoring::SqrtSoftplus, Scoring::Sigmoid, Scoring::Softmax] {
        for (hash, with_bias) in [(false, false), (false, true), (true, false)] {
            let args = [
                Arg::Ptr(la),
                Arg::Ptr(ia),
                Arg::Ptr(ba),
                Arg::Ptr(ta),
                Arg::Ptr(sel),
                Arg::Ptr(ya),
                Arg::U32(t as u32),
                Arg::U32(e as u32),
                Arg::U32(k as u32),
                Arg::F32(scale),
            ];
            launch(&mut mem, &k4::moe_route(s, hash, with_bias), [1, 1, 1], &args).unwrap();
            let mut want = vec![0f32; t * e];
            for (r, row) in logits.chunks(e).enumerate() {
                let sc = score(s, row);
                let chosen: Vec<usize> = if hash {
                    table[r * k..(r + 1) * k].iter().map(|v| *v as usize).collect()
                } else {
                    let v: Vec<f32> = sc.iter().zip(&bias).map(|(a, b)| if with_bias { a + b } else { *a }).collect();
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
                    order.truncate(k);
                    order
                };
                let total: f32 = chosen.iter().map(|&j| sc[j]).sum::<f32>() + 1e-20;
                for &j in &chosen {
                    want[r * e + j] += sc[j] / total * scale;
                }
            }
            assert_close(&download(&mem, ya, t * e), &want, 2e-6, &format!("{s:?} hash={hash} bias={with_bias}"));
        }
    }
}

/// The stacked-experts matmul over the device's plan (`moe_plan`, `moe_gather`) equals each
/// expert's own matmul over the rows that chose it, for a quantized and a plain layout.
#[test]
fn expert_matmuls_over_gathered_rows() {
    use kiln_ptx::kernels_ds4 as k4;
    let (t, e, d, n) = (6usize, 4usize, 64usize, 5usize);
    // Row r < 5 chooses experts r % 4 and (r + 1) % 4; row 5 chooses none.
    let mut w = vec![0f32; t * e];
    for r in 0..t - 1 {
        w[r * e + r % e] = 0.5;
        w[r * e + (r + 1) % e] = 0.25;
    }
    let x = rand_vec(t * d, 31);
    for dtype in [DType::F32, DType::Q8_0] {
        let rb = dtype.row_bytes(d as u64).unwrap() as usize;
        let wf = rand_vec(e * n * d, 32);
        let mut wq = vec![0u8; e * n * rb];
        for (row, out) in wf.chunks(d).zip(wq.chunks_mut(rb)) {
            kiln_quant::quantize_row(dtype, row, out).unwrap();
        }
        let mut mem = EmuMemory::new();
        let (wa, xa, wa_w) =
            (upload(&mut mem, &wq), upload(&mut mem, &f32_bytes(&x)), upload(&mut mem, &f32_bytes(&w)));
        let cap = t * 2;
        let (seg, idx, at) = (mem.alloc(4 * (2 * e + 1)), mem.alloc(4 * cap), mem.alloc(4 * t * e));
        let (xs, ys) = (mem.alloc(4 * cap * d), mem.alloc(4 * cap * n));
        let args = [Arg::Ptr(wa_w), Arg::Ptr(seg), Arg::Ptr(idx), Arg::Ptr(at), Arg::U32(t as u32), Arg::U32(e as u32)];
        launch(&mut mem, &k4::moe_plan(), [1, 1, 1], &args).unwrap();
        let args = [
            Arg::Ptr(xa),
            Arg::Ptr(idx),
            Arg::Ptr(seg),
            Arg::Ptr(xs),
            Arg::U32((cap * d) as u32),
            Arg::U32(d as u32),
            Arg::U32(e as u32),
        ];
        launch(&mut mem, &k4::moe_gather(), [((cap * d) as u32).div_ceil(kernels::BLOCK), 1, 1], &args).unwrap();
        let args = [
            Arg::Ptr(wa),
            Arg::Ptr(xs),
            Arg::Ptr(xs),
            Arg::Ptr(ys),
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::U32(n as u32),
            Arg::U32(d as u32),
            Arg::U32(0),
            Arg::U32(rb as u32),
            Arg::Ptr(seg),
            Arg::U32((n * rb) as u32),
        ];
        let grid = kernels::matmul_experts_grid(n as u32, t as u32, e as u32);
        launch(&mut mem, &kernels::matmul_experts(dtype, false), grid, &args).unwrap();
        let at_v: Vec<u32> = download(&mem, at, t * e).iter().map(|v| v.to_bits()).collect();
        let got = download(&mem, ys, cap * n);
        for ex in 0..e {
            let mut wd = vec![0f32; n * d];
            for (row, out) in wq[ex * n * rb..(ex + 1) * n * rb].chunks(rb).zip(wd.chunks_mut(d)) {
                kiln_quant::dequantize_row(dtype, row, out).unwrap();
            }
            for r in (0..t).filter(|r| w[r * e + ex] != 0.0) {
                let g = at_v[r * e + ex] as usize;
                for o in 0..n {
                    let want: f32 = (0..d).map(|c| wd[o * d + c] * x[r * d + c]).sum();
                    let v = got[g * n + o];
                    assert!(
                        (v - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} expert {ex} row {r} out {o}: {v} vs {want}"
                    );
                }
            }
        }
    }
}
