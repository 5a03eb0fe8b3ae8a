//! From verified IR to WGSL: which ops the backend runs, and the kernels a module needs
//! (one per variant used, in a fixed order so the emitted files are deterministic).

use std::collections::BTreeMap;

use kiln_ir::{DType, Op, VerifiedModule};

use crate::kernels::{self, Kernel};
use crate::{ds4, formats};

/// Whether the wgpu backend runs `op` of `module`: what the shared launch sequence runs
/// (`kiln_ptx::lower::supports`, which refuses the unfused DeepSeek-V4 attention ops), with
/// a WGSL decoder for every matmul-like weight's layout (DeepSeek-V4's experts and grouped
/// projections too; a group of a grouped projection must start at a 4-byte boundary, where
/// the launch sequence points its matmul).
pub fn supports(module: &VerifiedModule, op: &Op) -> bool {
    let decodes = |p: kiln_ir::ParamId| formats::supported(module.param(p).ty.dtype);
    let ok = match op {
        Op::MatMul { w, .. } => decodes(*w),
        Op::Moe { gate, up, down, shared, .. } => {
            [*gate, *up, *down].into_iter().chain(shared.iter().flat_map(|s| [s.gate, s.up, s.down])).all(decodes)
        }
        Op::GroupedMatMul { w, groups, .. } => {
            let ty = &module.param(*w).ty;
            let rows = ty.fixed_dims().and_then(|d| d.first().copied()).unwrap_or(0) / (*groups).max(1);
            let bytes = ty.last_fixed().and_then(|k| ty.dtype.row_bytes(k)).unwrap_or(0);
            decodes(*w) && (rows * bytes).is_multiple_of(4)
        }
        _ => true,
    };
    ok && kiln_ptx::lower::supports(module, op)
}

fn ragged(module: &VerifiedModule, w: kiln_ir::ParamId) -> bool {
    kiln_ptx::lower::ragged(module, w)
}

/// The kernels `module` launches, by name.
pub fn kernels_for(module: &VerifiedModule) -> Vec<Kernel> {
    let mut ks: BTreeMap<String, Kernel> = BTreeMap::new();
    let mut add = |k: Kernel| {
        ks.entry(k.name.clone()).or_insert(k);
    };
    for inst in &module.insts {
        // DeepSeek-V4's own kernels for this op (the plan shared with the other GPU backend).
        let ds4_plan = |add: &mut dyn FnMut(Kernel)| {
            for k in kiln_ptx::kernels_ds4::for_op(module, &inst.op) {
                add(ds4::build(k));
            }
        };
        match &inst.op {
            Op::RmsNorm { weight, .. } => add(kernels::rms_norm(weight.is_some())),
            Op::MatMul { w, bias, .. } => {
                let dt = module.param(*w).ty.dtype;
                for rpt in [false, true] {
                    add(kernels::matmul_variant(dt, bias.is_some(), ragged(module, *w), rpt));
                }
                if kiln_ptx::formats::needs_rotated_x(dt) {
                    add(kernels::kq2_rotate());
                }
            }
            Op::Add { .. } => add(kernels::binary(false)),
            Op::Mul { .. } => add(kernels::binary(true)),
            Op::Scale { .. } => add(kernels::scale()),
            Op::Act { kind, .. } => add(kernels::act(*kind)),
            Op::Glu { kind, .. } => add(kernels::glu(*kind)),
            Op::Softmax { .. } => add(kernels::softmax()),
            Op::Steer { attrs, .. } => {
                add(kernels::steer(attrs.mode));
                add(kernels::scale()); // strength 0 runs as a copy
            }
            Op::Rope { attrs, .. } => add(kernels::rope(attrs.layout)),
            Op::Attention { k, attrs, .. } => {
                if attrs.kv_dtype != DType::F32 {
                    if k.is_some() {
                        add(crate::kv::kv_append_q(attrs.kv_dtype));
                    }
                    add(crate::kv::kv_dequant(attrs.kv_dtype));
                } else if k.is_some() {
                    add(kernels::kv_append());
                }
                add(kernels::attention(attrs.head_dim as u32, attrs.softcap > 0.0));
                add(kernels::attn_combine());
            }
            Op::Tokens | Op::Embed { .. } | Op::LayerNorm { .. } => {}
            // DeepSeek-V4: the PTX backend's plan (`kiln_ptx::kernels_ds4::for_op`) in WGSL.
            Op::Repeat { .. } | Op::HcCoeffs { .. } | Op::HcPre { .. } | Op::HcPost { .. } | Op::MoeRoute { .. } => {
                ds4_plan(&mut add)
            }
            Op::Moe { gate, up, down, shared, .. } => {
                ds4_plan(&mut add);
                for (p, stacked) in [(*gate, true), (*up, true), (*down, true)]
                    .into_iter()
                    .chain(shared.iter().flat_map(|s| [(s.gate, false), (s.up, false), (s.down, false)]))
                {
                    let dt = module.param(p).ty.dtype;
                    let r = ragged(module, p);
                    for rpt in [false, true] {
                        add(if stacked {
                            kernels::matmul_experts(dt, r, rpt)
                        } else {
                            kernels::matmul_variant(dt, false, r, rpt)
                        });
                    }
                    if kiln_ptx::formats::needs_rotated_x(dt) {
                        add(kernels::kq2_rotate());
                    }
                }
            }
            Op::GroupedMatMul { w, .. } => {
                let dt = module.param(*w).ty.dtype;
                ds4_plan(&mut add);
                for rpt in [false, true] {
                    add(kernels::matmul_variant(dt, false, ragged(module, *w), rpt));
                }
                if kiln_ptx::formats::needs_rotated_x(dt) {
                    add(kernels::kq2_rotate());
                }
            }
            Op::CompressedAttention { .. } => ds4_plan(&mut add),
            // Refused by `supports` (the PTX backend's list).
            Op::Compress { .. } | Op::IndexTopk { .. } | Op::SparseAttention { .. } => {}
        }
    }
    add(kernels::argmax());
    add(kernels::top_k());
    ks.into_values().collect()
}

/// Every kernel variant the backend can emit (each supported weight dtype with and
/// without bias, ragged rows, both RoPE layouts, attention for the common head sizes):
/// what the validation test checks with naga.
pub fn all_kernels() -> Vec<Kernel> {
    use kiln_ir::{Activation, RopeLayout, SteerMode};
    let mut ks = Vec::new();
    for dt in DType::floats().filter(|d| formats::supported(*d)) {
        for bias in [false, true] {
            for rpt in [false, true] {
                ks.push(kernels::matmul_variant(dt, bias, false, rpt));
                if dt.block_elems() == 1 {
                    ks.push(kernels::matmul_variant(dt, bias, true, rpt));
                }
            }
        }
        for rpt in [false, true] {
            ks.push(kernels::matmul_experts(dt, false, rpt));
            if dt.block_elems() == 1 {
                ks.push(kernels::matmul_experts(dt, true, rpt));
            }
        }
    }
    ks.push(kernels::kq2_rotate());
    ks.push(kernels::rms_norm(false));
    ks.push(kernels::rms_norm(true));
    ks.push(kernels::binary(false));
    ks.push(kernels::binary(true));
    ks.push(kernels::scale());
    for a in [Activation::Silu, Activation::GeluTanh] {
        ks.push(kernels::act(a));
        ks.push(kernels::glu(a));
    }
    ks.push(kernels::softmax());
    ks.push(kernels::steer(SteerMode::Add));
    ks.push(kernels::steer(SteerMode::Project));
    ks.push(kernels::rope(RopeLayout::Interleaved));
    ks.push(kernels::rope(RopeLayout::Neox));
    ks.push(kernels::kv_append());
    for dt in [DType::Q8_0, DType::Q4_0, DType::F8E4M3] {
        ks.push(crate::kv::kv_append_q(dt));
        ks.push(crate::kv::kv_dequant(dt));
    }
    for hd in [32, 64, 80, 128, 256, 512] {
        ks.push(kernels::attention(hd, false));
        ks.push(kernels::attention(hd, true));
    }
    ks.push(kernels::attn_combine());
    ks.push(kernels::argmax());
    ks.push(kernels::top_k());
    ks.extend(ds4::all());
    ks
}

/// File name of kernel `name` in a build.
pub fn file_name(name: &str) -> String {
    format!("{name}.wgsl")
}

/// Checks a kernel's WGSL with naga (parse and validate); the error names the kernel.
pub fn validate(name: &str, src: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| format!("{name}.wgsl: {}", e.emit_to_string(src)))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("{name}.wgsl: {}", e.emit_to_string(src)))?;
    Ok(())
}
