//! DeepSeek-V4's routing and stacked-experts kernels on the wgpu adapter (lavapipe in CI)
//! against their definitions, as `kiln_ptx`'s kernel tests check the PTX twins: every
//! `moe_route` scoring (the fixture uses one), with and without the selection bias, ties,
//! a hash row naming an expert twice; the experts matmul over the device's plan in both
//! matmul variants. Skipped without an adapter, unless `KILN_REQUIRE_WGPU=1`.

use std::collections::HashMap;

use kiln_ir::{DType, Scoring};
use kiln_ptx::device::Device;
use kiln_ptx::emu::Arg;
use kiln_wgpu::kernels::{self, Kernel};
use kiln_wgpu::{WgpuDevice, ds4};

fn device(ks: &[Kernel]) -> Option<WgpuDevice> {
    if let Err(e) = kiln_wgpu::device::open_device() {
        assert!(std::env::var("KILN_REQUIRE_WGPU").as_deref() != Ok("1"), "KILN_REQUIRE_WGPU=1 but {e}");
        eprintln!("SKIPPED (no wgpu adapter): {e}");
        return None;
    }
    let sources: HashMap<String, String> = ks.iter().map(|k| (k.name.clone(), k.source())).collect();
    Some(WgpuDevice::new(ks, &sources).unwrap())
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn up(dev: &mut WgpuDevice, bytes: &[u8]) -> u64 {
    let a = dev.alloc(bytes.len()).unwrap();
    dev.upload(a, bytes).unwrap();
    a
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn down(dev: &mut WgpuDevice, a: u64, n: usize) -> Vec<f32> {
    let mut b = vec![0u8; 4 * n];
    dev.download(a, &mut b).unwrap();
    b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn moe_route_scorings_top_k_and_hash() {
    let variants: Vec<(Scoring, bool, bool)> = [Scoring::SqrtSoftplus, Scoring::Sigmoid, Scoring::Softmax]
        .into_iter()
        .flat_map(|s| [(s, false, false), (s, false, true), (s, true, false)])
        .collect();
    let ks: Vec<Kernel> = variants.iter().map(|&(s, h, b)| ds4::moe_route(s, h, b)).collect();
    let Some(mut dev) = device(&ks) else { return };
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
    let la = up(&mut dev, &f32_bytes(&logits));
    let ba = up(&mut dev, &f32_bytes(&bias));
    let ta = up(&mut dev, &f32_bytes(&table));
    let ia = up(&mut dev, &ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    let sel = dev.alloc(4 * t * e).unwrap();
    let ya = dev.alloc(4 * t * e).unwrap();
    for &(s, hash, with_bias) in &variants {
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
        dev.launch(&kiln_ptx::kernels_ds4::moe_route_name(s, hash, with_bias), [1, 1, 1], &args).unwrap();
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
        let got = down(&mut dev, ya, t * e);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 2e-6 * (1.0 + w.abs()), "{s:?} hash={hash} bias={with_bias} [{i}]: {g} vs {w}");
        }
    }
}

/// The stacked-experts matmul over `moe_plan`/`moe_gather` equals each expert's own matmul
/// over the rows that chose it, for a quantized and a plain layout, in the 32-lanes-per-row
/// variant and the row-per-thread one.
#[test]
fn expert_matmuls_over_gathered_rows() {
    let (t, e, d, n) = (6usize, 4usize, 64usize, 5usize);
    let mut w = vec![0f32; t * e];
    for r in 0..t - 1 {
        w[r * e + r % e] = 0.5;
        w[r * e + (r + 1) % e] = 0.25;
    }
    let x = rand_vec(t * d, 31);
    for dtype in [DType::F32, DType::Q8_0] {
        for row_per_thread in [false, true] {
            let mut ks = vec![ds4::moe_plan(), ds4::moe_gather(), kernels::matmul_experts(dtype, false, false)];
            if row_per_thread {
                ks.push(kernels::matmul_experts(dtype, false, true));
            }
            let Some(mut dev) = device(&ks) else { return };
            let rb = dtype.row_bytes(d as u64).unwrap() as usize;
            let wf = rand_vec(e * n * d, 32);
            let mut wq = vec![0u8; e * n * rb];
            for (row, out) in wf.chunks(d).zip(wq.chunks_mut(rb)) {
                kiln_quant::quantize_row(dtype, row, out).unwrap();
            }
            let (wa, xa, wa_w) = (up(&mut dev, &wq), up(&mut dev, &f32_bytes(&x)), up(&mut dev, &f32_bytes(&w)));
            let cap = t * 2;
            let seg = dev.alloc(4 * (2 * e + 1)).unwrap();
            let idx = dev.alloc(4 * cap).unwrap();
            let at = dev.alloc(4 * t * e).unwrap();
            let (xs, ys) = (dev.alloc(4 * cap * d).unwrap(), dev.alloc(4 * cap * n).unwrap());
            let args =
                [Arg::Ptr(wa_w), Arg::Ptr(seg), Arg::Ptr(idx), Arg::Ptr(at), Arg::U32(t as u32), Arg::U32(e as u32)];
            dev.launch("moe_plan", [1, 1, 1], &args).unwrap();
            let args = [
                Arg::Ptr(xa),
                Arg::Ptr(idx),
                Arg::Ptr(seg),
                Arg::Ptr(xs),
                Arg::U32((cap * d) as u32),
                Arg::U32(d as u32),
                Arg::U32(e as u32),
            ];
            dev.launch("moe_gather", [((cap * d) as u32).div_ceil(kernels::BLOCK), 1, 1], &args).unwrap();
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
            let grid = kiln_ptx::kernels::matmul_experts_grid(n as u32, t as u32, e as u32);
            dev.launch(&kiln_ptx::kernels::matmul_experts_name(dtype, false), grid, &args).unwrap();
            let mut atb = vec![0u8; 4 * t * e];
            dev.download(at, &mut atb).unwrap();
            let at_v: Vec<u32> = atb.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let got = down(&mut dev, ys, cap * n);
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
                            "{dtype:?} rpt={row_per_thread} expert {ex} row {r} out {o}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
