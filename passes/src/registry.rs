//! The one table of passes. Adding a pass is one file and one line here.

use kiln_frontend::Weights;
use kiln_ir::Module;
use serde_json::Value;

use crate::{
    Pass, PassCtx, PassError, PassReport, PipelineCtx, dce, fuse_sparse_attention, kv_quant, kv_share, quantize,
    sliding_window, steer,
};

pub static PASSES: &[&dyn Pass] = &[
    &dce::DeadCode,
    &quantize::Quantize,
    &steer::Steer,
    &kv_share::KvShare,
    &kv_quant::KvQuant,
    &sliding_window::SlidingWindow,
    &fuse_sparse_attention::FuseSparseAttention,
];

pub fn by_name(name: &str) -> Result<&'static dyn Pass, PassError> {
    PASSES.iter().copied().find(|p| p.name() == name).ok_or_else(|| PassError::Unknown {
        name: name.to_string(),
        known: PASSES.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
    })
}

/// Runs `(name, options)` passes in order, verifying the module after each.
/// Relative paths in options are resolved against `cx.base_dir` (the recipe's
/// directory). `on_pass` is called with each report (for progress output).
pub fn run_pipeline(
    module: &mut Module,
    weights: &mut Weights,
    passes: &[(String, Value)],
    cx: &PipelineCtx<'_>,
    on_pass: &mut dyn FnMut(&PassReport),
) -> Result<Vec<PassReport>, PassError> {
    // Resolve every name first so a typo fails before any work is done.
    let resolved = passes
        .iter()
        .map(|(n, o)| {
            let p = by_name(n)?;
            p.check_options(o)?;
            Ok((p, o))
        })
        .collect::<Result<Vec<_>, PassError>>()?;
    let mut reports = vec![];
    for (pass, options) in resolved {
        let report = pass.run(
            module,
            weights,
            &PassCtx { options, device: cx.device, base_dir: cx.base_dir, calibration: cx.calibration, memo: cx.memo },
        )?;
        kiln_ir::check(module).map_err(|err| PassError::Broken { pass: pass.name().to_string(), err })?;
        if weights.tensors.len() != module.params.len() {
            return Err(PassError::Broken {
                pass: pass.name().to_string(),
                err: kiln_ir::IrError::Verify {
                    at: "weights".into(),
                    msg: format!("{} tensors for {} params", weights.tensors.len(), module.params.len()),
                },
            });
        }
        on_pass(&report);
        reports.push(report);
    }
    Ok(reports)
}
