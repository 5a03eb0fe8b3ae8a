//! From verified IR to the PTX module: which ops the backend runs, and the
//! kernels a module needs (one per variant used, in a fixed order so the
//! printed module is deterministic).

use std::collections::BTreeMap;

use kiln_ir::{Op, VerifiedModule};

use crate::formats;
use crate::kernels;
use crate::kernels_ds4 as k4;
use crate::ptx::{self, BinOp, Kernel};

/// Name of kq2's activation-rotation kernel.
pub const KQ2_ROTATE: &str = "kq2_rotate";

/// Largest head dimension the attention kernel is built for.
pub const MAX_HEAD_DIM: u64 = 512;

/// Whether the PTX backend runs `op` of `module`.
pub fn supports(module: &VerifiedModule, op: &Op) -> bool {
    match op {
        Op::Tokens
        | Op::Embed { .. }
        | Op::RmsNorm { .. }
        | Op::Add { .. }
        | Op::Mul { .. }
        | Op::Scale { .. }
        | Op::Act { .. }
        | Op::Glu { .. }
        | Op::Softmax { .. }
        | Op::Steer { .. }
        | Op::Rope { .. } => true,
        // DeepSeek-V4 (`kernels_ds4`, `session/ds4.rs`).
        Op::Repeat { .. } | Op::HcPre { .. } | Op::HcPost { .. } | Op::MoeRoute { .. } => true,
        Op::HcCoeffs { streams, .. } => (1..=k4::MAX_HC_STREAMS).contains(streams),
        Op::Moe { w, .. } => routed(module, *w) && bad_weight(module, op).is_none(),
        Op::GroupedMatMul { .. } => bad_weight(module, op).is_none(),
        Op::CompressedAttention { indexer, attrs, .. } => {
            let rd = attrs.rope.rot_dims;
            attrs.head_dim.is_multiple_of(32)
                && attrs.head_dim <= k4::MAX_CA_DIM
                && attrs.index_dim <= k4::MAX_CA_DIM
                && rd.is_multiple_of(2)
                && rd <= attrs.head_dim
                && (indexer.is_none() || rd <= attrs.index_dim)
        }
        // Not built for the GPU: layer norm, and the unfused DeepSeek-V4 attention (the
        // `fuse_sparse_attention` pass makes `compressed_attention` of it).
        Op::LayerNorm { .. } | Op::Compress { .. } | Op::IndexTopk { .. } | Op::SparseAttention { .. } => false,
        Op::MatMul { w, .. } => {
            let ty = &module.param(*w).ty;
            let plain = ty.dtype.block_elems() == 1;
            formats::supported(ty.dtype)
                && ty.last_fixed().is_some_and(|k| (plain || k % 8 == 0) && k > 0 && k <= u32::MAX as u64)
        }
        // Quantized KV caches: q8_0/q4_0/f8_e4m3 rows of whole 64-value rotation chunks.
        Op::Attention { attrs, .. } => {
            use kiln_ir::DType;
            attrs.head_dim <= MAX_HEAD_DIM
                && match attrs.kv_dtype {
                    DType::F32 => true,
                    DType::Q8_0 | DType::Q4_0 | DType::F8E4M3 => (attrs.kv_heads * attrs.head_dim).is_multiple_of(64),
                    _ => false,
                }
        }
    }
}

/// Whether `w` is a `moe_route` result (which bounds the experts a token chooses).
fn routed(module: &VerifiedModule, w: kiln_ir::ValueId) -> bool {
    matches!(module.insts.get(w.index()).map(|i| &i.op), Some(Op::MoeRoute { .. }))
}

/// Whether the matmul kernels decode `dtype` rows of `k` values.
fn weight_ok(dtype: kiln_ir::DType, k: u64) -> bool {
    formats::supported(dtype) && k > 0 && k <= u32::MAX as u64 && (dtype.block_elems() == 1 || k.is_multiple_of(8))
}

/// The first expert or grouped weight of `op` the matmul kernels cannot read, as a message.
fn bad_weight(module: &VerifiedModule, op: &Op) -> Option<String> {
    let ws: Vec<kiln_ir::ParamId> = match op {
        Op::Moe { gate, up, down, shared, .. } => {
            let mut v = vec![*gate, *up, *down];
            if let Some(s) = shared {
                v.extend([s.gate, s.up, s.down]);
            }
            v
        }
        Op::GroupedMatMul { w, .. } => vec![*w],
        _ => vec![],
    };
    ws.into_iter().find_map(|p| {
        let ty = &module.param(p).ty;
        let k = ty.last_fixed().unwrap_or(0);
        (!weight_ok(ty.dtype, k)).then(|| {
            format!(
                "weight @{} is {} with rows of {k} (the PTX matmul kernels decode {} rows of a multiple of 8)",
                module.param(p).name,
                ty.dtype.name(),
                if formats::supported(ty.dtype) { "its" } else { "other types'" }
            )
        })
    })
}

/// What `supports` refuses about `op` beyond its name.
pub fn unsupported_detail(module: &VerifiedModule, op: &Op) -> Option<String> {
    match op {
        Op::Moe { w, .. } if !routed(module, *w) => Some("its routing weights do not come from `moe_route`".into()),
        Op::Moe { .. } | Op::GroupedMatMul { .. } => bad_weight(module, op),
        Op::HcCoeffs { streams, .. } => {
            Some(format!("{streams} streams (the kernel holds at most {} in registers)", k4::MAX_HC_STREAMS))
        }
        Op::CompressedAttention { attrs, .. } => Some(format!(
            "head_dim {} / index_dim {} / rope dims {} (built for head dims a multiple of 32 up to {})",
            attrs.head_dim,
            attrs.index_dim,
            attrs.rope.rot_dims,
            k4::MAX_CA_DIM
        )),
        _ => None,
    }
}

/// Whether matmuls with weight `w` need the ragged kernel (row length not a multiple of 8).
pub fn ragged(module: &VerifiedModule, w: kiln_ir::ParamId) -> bool {
    module.param(w).ty.last_fixed().is_some_and(|k| k % 8 != 0)
}

/// Whether prefill matmuls with weight `w` run on tensor cores ([`kernels::matmul_mma`]).
/// Not in a module that routes experts or selects compressed rows by top-k (DeepSeek-V4):
/// the f16 operands' ~3e-4 relative error flips decisions whose margins are that small
/// (the fixture's router margin is 3e-4), so prefill would choose other experts and rows
/// than decode does; its matmuls stay f32.
pub fn uses_mma(module: &VerifiedModule, w: kiln_ir::ParamId) -> bool {
    let ty = &module.param(w).ty;
    ty.last_fixed().is_some_and(|k| kernels::mma_eligible(ty.dtype, k)) && !top_k_decisions(module)
}

/// Whether `module` takes top-k decisions on activations (`moe_route`, the indexer of
/// `compressed_attention`).
pub fn top_k_decisions(module: &VerifiedModule) -> bool {
    module.insts.iter().any(|i| match &i.op {
        Op::MoeRoute { table, .. } => table.is_none(),
        Op::CompressedAttention { indexer, .. } => indexer.is_some(),
        _ => false,
    })
}

/// Tokens from which a forward call's matmuls use tensor cores.
pub const MMA_MIN_TOKENS: usize = 16;

/// The kernels `module` launches, by name.
pub fn kernels_for(module: &VerifiedModule) -> Vec<Kernel> {
    let mut ks: BTreeMap<String, Kernel> = BTreeMap::new();
    let mut add = |k: Kernel| {
        ks.entry(k.name.clone()).or_insert(k);
    };
    for inst in &module.insts {
        // DeepSeek-V4's own kernels for this op (the plan shared with the other GPU backend).
        let ds4_plan = |add: &mut dyn FnMut(Kernel)| {
            for k in k4::for_op(module, &inst.op) {
                add(k4::build(k));
            }
        };
        match &inst.op {
            Op::RmsNorm { weight, .. } => add(kernels::rms_norm(weight.is_some())),
            Op::MatMul { w, bias, .. } => {
                let dt = module.param(*w).ty.dtype;
                add(kernels::matmul_variant(dt, bias.is_some(), ragged(module, *w)));
                if uses_mma(module, *w) {
                    add(kernels::matmul_mma(dt, bias.is_some()));
                }
                if formats::needs_rotated_x(dt) {
                    add(crate::formats_k::rotate_kernel());
                }
            }
            Op::Add { .. } => add(kernels::binary(BinOp::Add)),
            Op::Mul { .. } => add(kernels::binary(BinOp::Mul)),
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
                if attrs.kv_dtype != kiln_ir::DType::F32 {
                    if k.is_some() {
                        add(kernels::kv_append_q(attrs.kv_dtype));
                    }
                    add(kernels::kv_dequant(attrs.kv_dtype));
                } else if k.is_some() {
                    add(kernels::kv_append());
                }
                add(kernels::attention(attrs.head_dim as u32, attrs.softcap > 0.0));
                add(kernels::attn_combine());
            }
            Op::Tokens | Op::Embed { .. } | Op::LayerNorm { .. } => {}
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
                    add(if stacked { kernels::matmul_experts(dt, r) } else { kernels::matmul_variant(dt, false, r) });
                    if formats::needs_rotated_x(dt) {
                        add(crate::formats_k::rotate_kernel());
                    }
                }
            }
            Op::GroupedMatMul { w, .. } => {
                let dt = module.param(*w).ty.dtype;
                ds4_plan(&mut add);
                add(kernels::matmul_variant(dt, false, ragged(module, *w)));
                if formats::needs_rotated_x(dt) {
                    add(crate::formats_k::rotate_kernel());
                }
            }
            Op::CompressedAttention { .. } => ds4_plan(&mut add),
            // Refused by `supports`.
            Op::Compress { .. } | Op::IndexTopk { .. } | Op::SparseAttention { .. } => {}
        }
    }
    // Greedy decoding and top-k sampling on the device.
    add(kernels::argmax());
    add(kernels::top_k());
    ks.into_values().collect()
}

/// The PTX text of `module`'s kernels.
pub fn module_ptx(module: &VerifiedModule) -> String {
    ptx::print_module(&kernels_for(module))
}

/// Every kernel variant the backend can emit (each weight dtype with and
/// without bias, ragged rows, both RoPE layouts, attention for the common head
/// sizes): what the ptxas check assembles.
pub fn all_kernels() -> Vec<Kernel> {
    use kiln_ir::{Activation, DType, RopeLayout};
    let mut ks = Vec::new();
    for dt in DType::floats() {
        for bias in [false, true] {
            ks.push(kernels::matmul_variant(dt, bias, false));
            if kernels::mma_eligible(dt, 256) {
                ks.push(kernels::matmul_mma(dt, bias));
            }
            if dt.block_elems() == 1 {
                ks.push(kernels::matmul_variant(dt, bias, true));
            }
        }
    }
    ks.push(crate::formats_k::rotate_kernel());
    ks.push(kernels::rms_norm(false));
    ks.push(kernels::rms_norm(true));
    ks.push(kernels::binary(BinOp::Add));
    ks.push(kernels::binary(BinOp::Mul));
    ks.push(kernels::scale());
    for a in [Activation::Silu, Activation::GeluTanh] {
        ks.push(kernels::act(a));
        ks.push(kernels::glu(a));
    }
    ks.push(kernels::softmax());
    ks.push(kernels::steer(kiln_ir::SteerMode::Add));
    ks.push(kernels::steer(kiln_ir::SteerMode::Project));
    ks.push(kernels::rope(RopeLayout::Interleaved));
    ks.push(kernels::rope(RopeLayout::Neox));
    ks.push(kernels::kv_append());
    for dt in [DType::Q8_0, DType::Q4_0, DType::F8E4M3] {
        ks.push(kernels::kv_append_q(dt));
        ks.push(kernels::kv_dequant(dt));
    }
    for hd in [32, 64, 80, 128, 256] {
        ks.push(kernels::attention(hd, false));
        ks.push(kernels::attention(hd, true));
    }
    ks.push(kernels::attn_combine());
    ks.push(kernels::argmax());
    ks.push(kernels::top_k());
    for dt in DType::floats() {
        ks.push(kernels::matmul_experts(dt, false));
        if dt.block_elems() == 1 {
            ks.push(kernels::matmul_experts(dt, true));
        }
    }
    ks.extend(k4::all());
    ks
}

/// The `ptxas` to check PTX with: `$KILN_PTXAS`, else `ptxas` on the `PATH`.
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("ptxas")).find(|p| p.is_file()))
}
