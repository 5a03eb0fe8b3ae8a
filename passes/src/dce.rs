//! `dce`: removes instructions whose values never reach the output (keeping KV-cache
//! writers other kept ops read) and parameters nothing uses, renumbering ids.

use kiln_frontend::Weights;
use kiln_ir::{Module, Op, ParamId, ValueId};
use serde_json::json;

use crate::{Pass, PassCtx, PassError, PassReport};

pub struct DeadCode;

impl Pass for DeadCode {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn summary(&self) -> &'static str {
        "remove instructions and parameters that do not contribute to the logits"
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<(), PassError> {
        crate::no_options("dce", options)
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        self.check_options(ctx.options)?;
        let Some(out) = m.output else {
            return Err(PassError::Unsupported { pass: "dce", msg: "module has no output".into() });
        };
        let n = m.insts.len();
        let mut live = vec![false; n];
        live[out.index()] = true;
        // Attention ops that share a cache slot keep its writer alive.
        let writer_of = |slot: u32, m: &Module| {
            m.insts.iter().position(|i| matches!(&i.op, Op::Attention { k: Some(_), attrs, .. } if attrs.cache == slot))
        };
        for i in (0..n).rev() {
            if !live[i] {
                continue;
            }
            for v in m.insts[i].op.values() {
                live[v.index()] = true;
            }
            if let Op::Attention { k: None, attrs, .. } = &m.insts[i].op
                && let Some(wi) = writer_of(attrs.cache, m)
            {
                // The writer precedes i (verified), so the reverse walk still reaches it.
                live[wi] = true;
            }
        }
        let mut remap = vec![None; n];
        let mut insts = Vec::with_capacity(n);
        for (i, inst) in m.insts.drain(..).enumerate() {
            if live[i] {
                remap[i] = Some(ValueId(insts.len() as u32));
                insts.push(inst);
            }
        }
        for inst in &mut insts {
            inst.op.map_values(|v| remap[v.index()].unwrap_or(v));
        }
        let removed_insts = n - insts.len();
        m.insts = insts;
        m.output = remap[out.index()];

        let mut used = vec![false; m.params.len()];
        for inst in &m.insts {
            for p in inst.op.params() {
                used[p.index()] = true;
            }
        }
        let mut premap = vec![None; m.params.len()];
        let (mut params, mut tensors) = (vec![], vec![]);
        let mut bytes_removed = 0u64;
        for (i, (p, t)) in m.params.drain(..).zip(w.tensors.drain(..)).enumerate() {
            if used[i] {
                premap[i] = Some(ParamId(params.len() as u32));
                params.push(p);
                tensors.push(t);
            } else {
                bytes_removed += t.as_bytes().len() as u64;
            }
        }
        let removed_params = premap.iter().filter(|p| p.is_none()).count();
        m.params = params;
        w.tensors = tensors;
        for inst in &mut m.insts {
            inst.op.map_params(|p| premap[p.index()].unwrap_or(p));
        }
        Ok(PassReport {
            pass: "dce".into(),
            summary: format!(
                "removed {removed_insts} instructions and {removed_params} parameters ({bytes_removed} bytes)"
            ),
            details: json!({"instructions_removed": removed_insts, "params_removed": removed_params, "bytes_removed": bytes_removed}),
        })
    }
}
