//! kiln's fixed-point backend (`fixed`): integer-only builds for microcontrollers.
//!
//! - [`lower`]: a verified module and its weights become a [`program::Program`]: int8
//!   weights with per-row multiplier + shift (Q4_0 tensors as exact 4-bit groups), Q16
//!   activations scaled per vector at run time, RoPE tables, a 16- or 8-bit KV cache, a
//!   static memory plan.
//! - [`interp`]: the integer interpreter, the definition of every op bit for bit
//!   ([`int`] holds the rounding primitives); the backend's sessions run it, so `kiln run`
//!   on a watch build computes exactly what the microcontroller computes.
//! - [`emit`]: the C99 library a build carries (`kiln_model.h/.c`, `kiln_weights.h/.c`),
//!   the same kernels in C (`c/kiln_ops.c`), checked bit for bit against the interpreter
//!   on the host and on a Cortex-M4 under QEMU.

pub mod emit;
pub mod harness;
pub mod int;
pub mod interp;
pub mod lower;
pub mod program;

use std::sync::Arc;

use kiln_backends::{Backend, BackendError, BuildFile, Logits, Session, SessionOptions, WeightSource};
use kiln_ir::{Op, VerifiedModule};
use serde_json::json;

/// Context of a build when the model allows more (RAM on a microcontroller is the limit).
pub const DEFAULT_BUILD_CONTEXT: usize = 256;

/// Microcontroller targets the build report checks the memory plan against.
pub const TARGETS: &[(&str, usize, usize)] = &[
    ("nRF52840 (Cortex-M4F, 1 MiB flash, 256 KiB RAM)", 1 << 20, 256 << 10),
    ("STM32F429ZI (Cortex-M4, 2 MiB flash, 256 KiB RAM)", 2 << 20, 256 << 10),
    ("STM32H743 (Cortex-M7, 2 MiB flash, 1 MiB RAM)", 2 << 20, 1 << 20),
    ("QEMU mps2-an386 (Cortex-M4, 4 MiB code, 4 MiB RAM)", 4 << 20, 4 << 20),
];

const NAME: &str = "fixed";

#[derive(Clone, Copy, Debug, Default)]
pub struct FixedBackend;

impl FixedBackend {
    pub fn new() -> Self {
        FixedBackend
    }
}

/// The context a build of `module` is planned for.
pub fn build_context(module: &VerifiedModule) -> usize {
    let ctx = module.meta_int("context_length").unwrap_or(DEFAULT_BUILD_CONTEXT as i64).max(1) as usize;
    ctx.min(DEFAULT_BUILD_CONTEXT)
}

/// The memory report of a program: flash, RAM and which targets it fits.
pub fn memory_report(p: &program::Program) -> serde_json::Value {
    let (flash, ram) = (p.flash_bytes(), p.ram_bytes());
    let targets: Vec<_> = TARGETS
        .iter()
        .map(|(name, f, r)| json!({"target": name, "flash": f, "ram": r, "fits": flash <= *f && ram <= *r}))
        .collect();
    json!({
        "max_context": p.max_context,
        "flash_bytes": flash,
        "ram_bytes": ram,
        "ram": {"arena": 4 * p.arena, "scratch": 2 * p.scratch16, "scores": 4 * p.scores, "kv_cache": p.kv_bytes()},
        "targets": targets,
    })
}

impl Backend for FixedBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn supports(&self, module: &VerifiedModule, op: &Op) -> bool {
        lower::unsupported(module, op).is_none()
    }

    fn unsupported_detail(&self, module: &VerifiedModule, op: &Op) -> Option<String> {
        lower::unsupported(module, op).filter(|why| !why.starts_with("op `"))
    }

    fn prepare(
        &self,
        module: Arc<VerifiedModule>,
        weights: Arc<dyn WeightSource>,
        options: &SessionOptions,
    ) -> Result<Box<dyn Session>, BackendError> {
        if let Some(what) = kiln_backends::first_unsupported(self, &module) {
            return Err(BackendError::Unsupported { backend: NAME, what });
        }
        if !options.steer.is_empty() {
            return Err(BackendError::Unsupported { backend: NAME, what: "run-time steering strengths".into() });
        }
        kiln_backends::check_weight_sizes(&module, weights.as_ref())?;
        let ctx = if options.max_context == 0 { build_context(&module) } else { options.max_context };
        let program = lower::lower(&module, weights.as_ref(), ctx).map_err(|what| {
            if what.starts_with("a context") {
                BackendError::BadInput(format!("backend `fixed`: {what}"))
            } else {
                BackendError::Unsupported { backend: NAME, what }
            }
        })?;
        let rings = program.slots.iter().any(|s| s.rows < program.max_context);
        let rollback = kiln_backends::ring::RollbackGuard::new(rings.then_some(1));
        Ok(Box::new(FixedSession { machine: interp::Machine::new(program), rollback }))
    }

    /// The C library (`kiln_model.h/.c`, `kiln_weights.h/.c`) and `fixed.json`, the
    /// memory report (flash, RAM, the targets it fits).
    fn emit(&self, module: &VerifiedModule, weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
        emit_files(module, weights)
    }
}

fn emit_files(module: &VerifiedModule, weights: &dyn WeightSource) -> Result<Vec<BuildFile>, BackendError> {
    if let Some(what) = kiln_backends::first_unsupported(&FixedBackend, module) {
        return Err(BackendError::Unsupported { backend: NAME, what });
    }
    let p = lower::lower(module, weights, build_context(module))
        .map_err(|what| BackendError::Unsupported { backend: NAME, what })?;
    let report = serde_json::to_vec_pretty(&memory_report(&p)).expect("json");
    Ok(vec![
        BuildFile { name: "kiln_model.h".into(), bytes: emit::model_h(&p).into_bytes() },
        BuildFile { name: "kiln_model.c".into(), bytes: emit::model_c(&p).into_bytes() },
        BuildFile { name: "kiln_weights.h".into(), bytes: emit::weights_h(&p).into_bytes() },
        BuildFile { name: "kiln_weights.c".into(), bytes: emit::weights_c(&p) },
        BuildFile { name: "fixed.json".into(), bytes: report },
    ])
}

/// A session over the integer interpreter.
pub struct FixedSession {
    machine: interp::Machine,
    /// Ring slots (sinks + window rows) keep no slack: one position of rollback at most.
    rollback: kiln_backends::ring::RollbackGuard,
}

impl FixedSession {
    /// Runs one token and returns its logits exactly as the C library does (Q16).
    pub fn step_q16(&mut self, token: u32) -> Result<Vec<i32>, BackendError> {
        self.rollback.check()?;
        self.machine.step(token).map(|l| l.to_vec()).map_err(step_error)
    }

    pub fn program(&self) -> &program::Program {
        self.machine.program()
    }
}

fn step_error(e: interp::StepError) -> BackendError {
    match e {
        interp::StepError::Context { max } => {
            BackendError::BadInput(format!("the prompt does not fit in the context of {max} positions"))
        }
        interp::StepError::Token { id, vocab } => {
            BackendError::BadInput(format!("token id {id} is outside the vocabulary ({vocab})"))
        }
    }
}

impl Session for FixedSession {
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, BackendError> {
        let p = self.machine.program();
        self.rollback.check()?;
        if tokens.is_empty() {
            return Err(BackendError::BadInput("no tokens".into()));
        }
        if self.machine.pos() + tokens.len() > p.max_context {
            return Err(step_error(interp::StepError::Context { max: p.max_context }));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= p.vocab_rows) {
            return Err(step_error(interp::StepError::Token { id, vocab: p.vocab_rows }));
        }
        let mut out = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            let l = self.machine.step(t).map_err(step_error)?;
            if logits == Logits::All || i + 1 == tokens.len() {
                out.extend(l.iter().map(|v| *v as f32 / 65536.0));
            }
        }
        Ok(out)
    }

    fn pos(&self) -> usize {
        self.machine.pos()
    }

    fn truncate(&mut self, pos: usize) {
        self.rollback.truncate(self.machine.pos(), pos);
        self.machine.truncate(pos);
    }

    fn vocab_size(&self) -> usize {
        self.machine.program().vocab
    }
}
