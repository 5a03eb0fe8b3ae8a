//! Cranelift against kiln's hand-written CPU kernels, for the matvec that dominates
//! decode (`cargo xtask bench cranelift`, or `cargo run --release` here with
//! `--out DIR`).
//!
//! Issue 12 asks whether generating code pays off: kernels JIT-compiled per shape at load
//! (Cranelift) against the hand-written `std::arch` kernels. This measures one such
//! kernel honestly: a Q8_0 matvec (ggml blocks of 32 signed bytes and an f16 scale, 8-bit
//! activations, the layout of SmolLM2's and Qwen2.5's tied output projections) JIT-compiled
//! by Cranelift for each matrix width, with every advantage a JIT can take: the block loop
//! has a constant trip count (unrolled by two), the f16 scales are converted to f32 at
//! load, so the kernel reads one f32 per block. Its body is what Cranelift's x64 backend
//! can express: 128-bit vectors, ggml's sign trick around `x86_pmaddubsw`, `fma`.
//! Cranelift has no 256- or 512-bit vector types, no `vpdpbusd`, `pmaddwd` or `psignb`.
//!
//! Before timing, every JIT output is checked against kiln's reference dot (the ggml
//! definition; the JIT kernel sums its float steps in another order, so within 1e-5 of
//! the largest output, not bit for bit). Single thread, the fastest of several repetitions, for
//! three shapes; peers in the same run: kiln's AVX2 kernel (rows as stored) and, on
//! AVX-512 VNNI CPUs, its sixteen-row lane kernel (`q8lanes.rs`, weights repacked once).

use std::time::Instant;

use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I16X8, I32X4, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module, default_libcall_names};
use kiln_backends::reference::{Kernels, Weight};
use kiln_cpu::{CpuKernels, Isa};
use kiln_ir::DType;
use kiln_quant::ggml_dot::{Q8Row, quantize_q8};
use serde_json::json;

/// `out[j] = Σ_b wd[j·nb + b]·xd[b]·Σ q_w·q_x` over the `n` rows at `w` (34-byte Q8_0
/// blocks) against the activation quants `xq` and per-block `(d, s)` pairs `xd`.
type Kernel = unsafe extern "C" fn(*const u8, i64, *const i8, *const f32, *const f32, *mut f32);

const BLOCK: i64 = 34;

/// Cranelift's Q8_0 matvec for rows of `nb` blocks (`nb` even), and its compile time.
fn jit(nb: usize) -> Result<(JITModule, Kernel, f64), String> {
    let t0 = Instant::now();
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| e.to_string())?;
    let isa = cranelift_native::builder()
        .map_err(|e| e.to_string())?
        .finish(settings::Flags::new(flags))
        .map_err(|e| e.to_string())?;
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let mut ctx = module.make_context();
    for _ in 0..6 {
        ctx.func.signature.params.push(AbiParam::new(I64));
    }
    let mut fbc = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fbc);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (w, n, xq, xd, wd, out) = (p[0], p[1], p[2], p[3], p[4], p[5]);
        let mf = MemFlagsData::trusted();
        // Row loop: (row, row pointer, row's scales pointer).
        let row_head = b.create_block();
        for _ in 0..3 {
            b.append_block_param(row_head, I64);
        }
        let row_body = b.create_block();
        let exit = b.create_block();
        let zero = b.ins().iconst(I64, 0);
        b.ins().jump(row_head, &[zero.into(), w.into(), wd.into()]);
        b.switch_to_block(row_head);
        let rp = b.block_params(row_head).to_vec();
        let (row, wrow, wdrow) = (rp[0], rp[1], rp[2]);
        let more = b.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, row, n);
        b.ins().brif(more, row_body, &[], exit, &[]);
        b.switch_to_block(row_body);
        // Block loop, two blocks per trip: (block pair index, acc).
        let blk_head = b.create_block();
        b.append_block_param(blk_head, I64);
        b.append_block_param(blk_head, F32X4);
        let blk_body = b.create_block();
        let row_done = b.create_block();
        b.append_block_param(row_done, F32X4);
        let fz = b.ins().f32const(0.0);
        let acc0 = b.ins().splat(F32X4, fz);
        b.ins().jump(blk_head, &[zero.into(), acc0.into()]);
        b.switch_to_block(blk_head);
        let bp = b.block_params(blk_head).to_vec();
        let (k, acc) = (bp[0], bp[1]);
        let nbv = b.ins().iconst(I64, nb as i64);
        let more = b.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, k, nbv);
        b.ins().brif(more, blk_body, &[], row_done, &[acc.into()]);
        b.switch_to_block(blk_body);
        let mut acc = acc;
        for u in 0..2i64 {
            let kb = b.ins().iadd_imm_s(k, u);
            let woff = b.ins().imul_imm_s(kb, BLOCK);
            let wb = b.ins().iadd(wrow, woff);
            let xoff = b.ins().imul_imm_s(kb, 32);
            let xb = b.ins().iadd(xq, xoff);
            let mut sum = None;
            for h in 0..2i32 {
                let wv = b.ins().load(I8X16, mf, wb, 2 + 16 * h);
                let xv = b.ins().load(I8X16, mf, xb, 16 * h);
                // ggml's sign trick with `pmaddubsw` (unsigned × signed bytes): |x| against
                // w with x's sign (Cranelift has no `psignb`: a compare, a negation and a
                // select), adjacent pairs summed to i16 (≤ 127·128·2, no saturation with
                // |x| ≤ 127), then widened to i32 (no `pmaddwd` either).
                let ax = b.ins().iabs(xv);
                let zero8 = b.ins().iconst(cranelift_codegen::ir::types::I8, 0);
                let z = b.ins().splat(I8X16, zero8);
                let neg = b.ins().icmp(cranelift_codegen::ir::condcodes::IntCC::SignedLessThan, xv, z);
                let wn = b.ins().ineg(wv);
                let ws = b.ins().bitselect(neg, wn, wv);
                let pairs = b.ins().x86_pmaddubsw(ws, ax);
                debug_assert_eq!(b.func.dfg.value_type(pairs), I16X8);
                let lo = b.ins().swiden_low(pairs);
                let hi = b.ins().swiden_high(pairs);
                let d = b.ins().iadd(lo, hi);
                sum = Some(match sum {
                    None => d,
                    Some(s) => b.ins().iadd(s, d),
                });
            }
            let sum = sum.expect("four products");
            debug_assert_eq!(b.func.dfg.value_type(sum), I32X4);
            let sf = b.ins().fcvt_from_sint(F32X4, sum);
            let soff = b.ins().imul_imm_s(kb, 4);
            let sa = b.ins().iadd(wdrow, soff);
            let ws = b.ins().load(F32, mf, sa, 0);
            let doff = b.ins().imul_imm_s(kb, 8);
            let da = b.ins().iadd(xd, doff);
            let xs = b.ins().load(F32, mf, da, 0);
            let f = b.ins().fmul(ws, xs);
            let fv = b.ins().splat(F32X4, f);
            acc = b.ins().fma(sf, fv, acc);
        }
        let k2 = b.ins().iadd_imm_s(k, 2);
        b.ins().jump(blk_head, &[k2.into(), acc.into()]);
        b.switch_to_block(row_done);
        let acc = b.block_params(row_done)[0];
        let lanes: Vec<_> = (0..4u8).map(|l| b.ins().extractlane(acc, l)).collect();
        let s01 = b.ins().fadd(lanes[0], lanes[1]);
        let s23 = b.ins().fadd(lanes[2], lanes[3]);
        let s = b.ins().fadd(s01, s23);
        let ooff = b.ins().imul_imm_s(row, 4);
        let oa = b.ins().iadd(out, ooff);
        b.ins().store(mf, s, oa, 0);
        let row1 = b.ins().iadd_imm_s(row, 1);
        let wnext = b.ins().iadd_imm_s(wrow, BLOCK * nb as i64);
        let wdnext = b.ins().iadd_imm_s(wdrow, 4 * nb as i64);
        b.ins().jump(row_head, &[row1.into(), wnext.into(), wdnext.into()]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let id = module.declare_function("q8_0_matvec", Linkage::Local, &ctx.func.signature).map_err(|e| e.to_string())?;
    module.define_function(id, &mut ctx).map_err(|e| e.to_string())?;
    module.clear_context(&mut ctx);
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let code = module.get_finalized_function(id);
    // SAFETY: the function just compiled has the `Kernel` signature (six i64-sized
    // arguments, System V on x86-64, no return).
    let f: Kernel = unsafe { std::mem::transmute::<*const u8, Kernel>(code) };
    Ok((module, f, t0.elapsed().as_secs_f64()))
}

/// Random Q8_0 rows (sane f16 scales) and an activation row.
fn matrix(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut bytes = vec![0u8; n * k / 32 * BLOCK as usize];
    for blk in bytes.chunks_mut(BLOCK as usize) {
        let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
        blk[..2].copy_from_slice(&d.to_le_bytes());
        // Quants in −127..=127, as ggml's Q8_0 quantizer writes them (the sign trick, in
        // ggml's kernels as in the JIT one, cannot negate −128).
        blk[2..].iter_mut().for_each(|b| *b = ((next() % 255) as i32 - 127) as i8 as u8);
    }
    let x = (0..k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
    (bytes, x)
}

/// The fastest of `reps` runs of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let out_dir = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1)).cloned();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| e.to_string())?;
    let isa = Isa::detect();
    let mut rows = vec![];
    for (n, k) in [(1536usize, 576usize), (1536, 8960), (32768, 2048)] {
        let (bytes, x) = matrix(n, k, (n * k) as u64);
        let nb = k / 32;
        let q: Q8Row = quantize_q8(&x);
        let xd: Vec<f32> = q.scales.iter().flat_map(|&(d, s)| [d, s]).collect();
        // Load-time preparation the JIT kernel gets: the f16 weight scales as f32.
        let wd: Vec<f32> =
            bytes.chunks(BLOCK as usize).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let (_module, kernel, compile_s) = jit(nb)?;
        let mut y = vec![0f32; n];
        let run = |y: &mut [f32]| {
            // SAFETY: `bytes` holds `n` rows of `nb` blocks, `q` and `xd` `nb` blocks,
            // `wd` `n·nb` scales, `y` `n` outputs.
            unsafe { kernel(bytes.as_ptr(), n as i64, q.q.as_ptr(), xd.as_ptr(), wd.as_ptr(), y.as_mut_ptr()) }
        };
        run(&mut y);
        // Checked against kiln's reference dot before any timing.
        let w = Weight { bytes: &bytes, dtype: DType::Q8_0, n, k };
        let reference = CpuKernels::new(Isa::Scalar).matmul(&x, 1, w, None, 0, 1).map_err(|e| e.to_string())?;
        // Relative to the largest output: the float steps are summed in another order, and
        // an output near zero is a cancellation of much larger terms.
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = y.iter().zip(&reference).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max);
        if worst > 1e-5 {
            return Err(format!(
                "{n}x{k}: the JIT kernel differs from the reference by {worst:e} of its largest output"
            ));
        }
        let reps = (400_000_000 / (n * k)).max(10);
        let gw = |s: f64| (n * k) as f64 / s / 1e9;
        let jit_s = pool.install(|| best(reps, || run(&mut y)));
        let avx2 = CpuKernels::new(Isa::Avx2);
        let avx2_s = pool.install(|| best(reps, || drop(std::hint::black_box(avx2.matmul(&x, 1, w, None, 0, 1)))));
        let mut lanes_s = None;
        if isa == Isa::Avx512Vnni {
            let mut kk = CpuKernels::new(isa);
            kk.packed = Some(std::sync::Arc::new(kiln_cpu::PackedWeights::of_matrix(&w))).filter(|p| !p.is_empty());
            lanes_s = Some(pool.install(|| best(reps, || drop(std::hint::black_box(kk.matmul(&x, 1, w, None, 0, 1))))));
        }
        println!(
            "Q8_0 {n}x{k}: Cranelift {:.2} Gweights/s (compiled in {:.1} ms), kiln AVX2 {:.2}{}",
            gw(jit_s),
            compile_s * 1e3,
            gw(avx2_s),
            lanes_s.map(|s| format!(", kiln AVX-512 lanes {:.2}", gw(s))).unwrap_or_default()
        );
        rows.push(json!({
            "shape": [n, k],
            "max_error_vs_reference_over_largest_output": worst,
            "cranelift": {"gweights_per_second": gw(jit_s), "compile_ms": compile_s * 1e3},
            "kiln_avx2": {"gweights_per_second": gw(avx2_s)},
            "kiln_avx512_lanes": lanes_s.map(|s| json!({"gweights_per_second": gw(s)})),
        }));
    }
    let report = json!({"kernel": "Q8_0 matvec, one thread", "isa": isa.name(), "rows": rows});
    if let Some(dir) = out_dir {
        let path = std::path::Path::new(&dir).join("cranelift.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
