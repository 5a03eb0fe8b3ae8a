//! Attention over the KV cache, llama.cpp's flash attention with an f16 value
//! accumulator (the reference's `Numerics::Ggml` definition, bit for bit),
//! parallel over (token, head) pairs; AVX2 for the dot products and the
//! accumulator updates.

use kiln_backends::reference::{self, KvCache};
use kiln_ir::AttentionAttrs;
use rayon::prelude::*;

use crate::kernels::Isa;

/// Attention of query rows `q` (row `t` at position `first_pos + t`) over `cache`.
pub(crate) fn attend(
    isa: Isa,
    q: &[f32],
    first_pos: usize,
    cache: &KvCache,
    attrs: &AttentionAttrs,
    ggml: bool,
) -> Vec<f32> {
    if cache.is_quantized() {
        return attend(isa, q, first_pos, &cache.dequantized(ggml), attrs, ggml);
    }
    let heads = attrs.heads as usize;
    let hd = attrs.head_dim as usize;
    if !isa.avx2() || !ggml || hd == 0 || !hd.is_multiple_of(8) || heads == 0 {
        return reference::attend(q, first_pos, cache, attrs, ggml);
    }
    attend_avx2(q, first_pos, cache, attrs)
}

#[cfg(target_arch = "x86_64")]
fn attend_avx2(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs) -> Vec<f32> {
    let heads = attrs.heads as usize;
    let hd = attrs.head_dim as usize;
    let group = (attrs.heads / attrs.kv_heads.max(1)).max(1) as usize;
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |scratch, (idx, o)| {
            let (t, h) = (idx / heads, idx % heads);
            let p = first_pos + t;
            let (sinks, window) = attrs.key_ranges(p, cache.len());
            let qh = &q[idx * hd..(idx + 1) * hd];
            // SAFETY: only called with `Isa::Avx2`, detected at run time.
            let rows = sinks.chain(window).map(|j| cache.row(j));
            unsafe { crate::x86::flash_f16(qh, cache, rows, (h / group) * hd, attrs, o, scratch) };
        },
    );
    out
}

#[cfg(not(target_arch = "x86_64"))]
fn attend_avx2(q: &[f32], first_pos: usize, cache: &KvCache, attrs: &AttentionAttrs) -> Vec<f32> {
    reference::attend(q, first_pos, cache, attrs, true)
}
