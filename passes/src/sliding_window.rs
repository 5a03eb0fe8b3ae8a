//! `sliding_window`: long-context attention for dense models. Every attention op sees only
//! the last `window` positions plus the first `sink` ones (the "attention sinks" of
//! StreamingLLM, Xiao et al. 2023: the first tokens soak up attention mass a softmax must
//! put somewhere, and dropping them is what breaks plain windowed attention), so attention
//! work per token stops growing with the context.
//!
//! ```yaml
//! - sliding_window: { window: 512, sink: 4 }
//! ```
//!
//! Layers that already have a narrower window (Gemma's local layers) keep it. Nothing is
//! retrained, so the model sees less than it was trained to: with the recipe's
//! `calibration` text (whose `ctx` should exceed the window, or nothing is cut) the pass
//! measures the perplexity before and after and reports both; the build's `quality`
//! report gives the change on held-out text.

use kiln_frontend::Weights;
use kiln_ir::{Module, Op};
use serde_json::{Value, json};

use crate::{Pass, PassCtx, PassError, PassReport};

pub struct SlidingWindow;

const NAME: &str = "sliding_window";

fn parse(options: &Value) -> Result<(u64, u64), PassError> {
    let bad = |msg: String| PassError::BadOptions { pass: NAME, msg };
    let o = options.as_object().ok_or_else(|| bad("expects a map: { window: N, sink: M }".into()))?;
    if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "window" | "sink")) {
        return Err(bad(format!("unknown option `{k}` (window, sink)")));
    }
    let int = |k: &str| match o.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= u32::MAX as u64)
            .map(Some)
            .ok_or_else(|| bad(format!("`{k}` must be a whole number of tokens below 2^32, not {v}"))),
    };
    let window = int("window")?.ok_or_else(|| bad("needs `window: N` (tokens)".into()))?;
    if window == 0 {
        return Err(bad("`window` must be at least 1".into()));
    }
    Ok((window, int("sink")?.unwrap_or(4)))
}

impl Pass for SlidingWindow {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "attend over the last `window` tokens plus `sink` first ones (long-context attention)"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        parse(options).map(|_| ())
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        let (window, sink) = parse(ctx.options)?;
        // Calibration perplexity, when the recipe has calibration text.
        let ppl = |m: &Module, w: &Weights| {
            ctx.calibration
                .measure
                .map(|measure| measure(m, w))
                .transpose()
                .map_err(|msg| PassError::Input { pass: NAME, msg })
        };
        let before = ppl(m, w)?;
        let (mut changed, mut kept) = (0, 0);
        for inst in &mut m.insts {
            if let Op::Attention { attrs, .. } = &mut inst.op {
                if attrs.window != 0 && attrs.window <= window {
                    kept += 1;
                    continue;
                }
                attrs.window = window;
                attrs.sink = sink;
                changed += 1;
            }
        }
        if changed == 0 && kept == 0 {
            return Err(PassError::Unsupported { pass: NAME, msg: "the model has no attention ops".into() });
        }
        let after = ppl(m, w)?;
        let change = match (before, after) {
            (Some(b), Some(a)) => format!(", calibration perplexity {b:.4} → {a:.4} ({:+.2}%)", (a / b - 1.0) * 100.0),
            _ => String::new(),
        };
        Ok(PassReport {
            pass: NAME.into(),
            summary: format!(
                "{changed} attention ops see the last {window} tokens and the first {sink}; {kept} keep a narrower window{change}"
            ),
            details: json!({
                "window": window, "sink": sink, "attention_ops": changed, "kept_narrower": kept,
                "keys_per_query_at_most": window + sink,
                "calibration_ppl_before": before, "calibration_ppl_after": after,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert_eq!(parse(&json!({"window": 256})).unwrap(), (256, 4));
        assert_eq!(parse(&json!({"window": 256, "sink": 0})).unwrap(), (256, 0));
        for bad in [json!({}), json!({"window": 0}), json!({"window": -3}), json!({"window": 8, "sinks": 2}), json!(7)]
        {
            assert!(matches!(parse(&bad), Err(PassError::BadOptions { .. })), "{bad}");
        }
    }
}
