//! `kv_quant`: the KV cache's storage type. Every attention op's slot stores K
//! and V as ggml `q8_0` or `q4_0` blocks of 32 along each position's row (the
//! layout llama.cpp's `--cache-type-k/-v` uses), as FP8 E4M3 bytes (`f8_e4m3`:
//! one byte per value, no scales; saturates at ±448), or as `f32`, the default.
//!
//! ```yaml
//! - kv_quant: { type: q8_0 }   # or q4_0, f8_e4m3, f32
//! ```
//!
//! Every backend but the integer-only `fixed` one runs all four; `fixed` runs
//! `q8_0` and `q4_0` as its own 8- and 4-bit caches.

use kiln_frontend::Weights;
use kiln_ir::{DType, KV_DTYPES, Module, Op};
use serde_json::{Value, json};

use crate::{Pass, PassCtx, PassError, PassReport};

pub struct KvQuant;

const NAME: &str = "kv_quant";

fn parse(options: &Value) -> Result<DType, PassError> {
    let bad = |msg: String| PassError::BadOptions { pass: NAME, msg };
    let o = options.as_object().ok_or_else(|| bad("expects a map: { type: q8_0 | q4_0 | f8_e4m3 | f32 }".into()))?;
    if let Some(k) = o.keys().find(|k| k.as_str() != "type") {
        return Err(bad(format!("unknown option `{k}` (type)")));
    }
    let t =
        o.get("type").and_then(Value::as_str).ok_or_else(|| bad("needs `type: q8_0 | q4_0 | f8_e4m3 | f32`".into()))?;
    DType::from_name(t)
        .filter(|d| KV_DTYPES.contains(d))
        .ok_or_else(|| bad(format!("type `{t}`: the KV cache can be f32, q8_0, q4_0 or f8_e4m3")))
}

/// Bytes per token of every slot written, stored as each op's type.
pub fn kv_bytes_per_token(m: &Module) -> u64 {
    m.insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Attention { k: Some(_), attrs, .. } => {
                attrs.kv_dtype.row_bytes(attrs.kv_heads * attrs.head_dim).map(|b| 2 * b)
            }
            _ => None,
        })
        .sum()
}

impl Pass for KvQuant {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "store the KV cache as q8_0 or q4_0 blocks, or FP8 E4M3"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        parse(options).map(|_| ())
    }

    fn run(&self, m: &mut Module, _w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        let dtype = parse(ctx.options)?;
        let before = kv_bytes_per_token(m);
        let mut ops = 0;
        for (i, inst) in m.insts.iter_mut().enumerate() {
            if let Op::Attention { attrs, .. } = &mut inst.op {
                if attrs.head_dim % dtype.block_elems() != 0 {
                    return Err(PassError::Unsupported {
                        pass: NAME,
                        msg: format!(
                            "%{i}: head_dim {} is not a multiple of {dtype}'s blocks of {}",
                            attrs.head_dim,
                            dtype.block_elems()
                        ),
                    });
                }
                attrs.kv_dtype = dtype;
                ops += 1;
            }
        }
        let after = kv_bytes_per_token(m);
        Ok(PassReport {
            pass: NAME.into(),
            summary: format!("{ops} attention ops store K/V as {dtype}: {before} → {after} bytes per token"),
            details: json!({"type": dtype.name(), "attention_ops": ops, "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after}),
        })
    }
}
