//! The module: metadata, parameter declarations and one straight-line SSA graph
//! (the forward pass over T new tokens at positions pos..pos+T).

use std::collections::BTreeMap;

use crate::entities::{ParamId, ValueId};
use crate::error::{IrError, IrResult};
use crate::ops::{Op, TypeEnv};
use crate::types::TensorType;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

/// A weight tensor. Its bytes live outside the IR (in a checkpoint or a build's weight blob).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: TensorType,
}

/// One instruction: defines exactly one value.
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    pub op: Op,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Module {
    pub name: String,
    /// Free-form metadata (architecture, context length, ...), printed sorted.
    pub meta: BTreeMap<String, Meta>,
    pub params: Vec<Param>,
    /// Instructions in execution order; instruction i defines value %i.
    pub insts: Vec<Inst>,
    /// The value holding the logits `f32[T, vocab]`.
    pub output: Option<ValueId>,
}

impl Module {
    pub fn new(name: impl Into<String>) -> Self {
        Module { name: name.into(), ..Default::default() }
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.index()]
    }

    pub fn param_by_name(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(|i| ParamId(i as u32))
    }

    pub fn value_type(&self, v: ValueId) -> &TensorType {
        &self.insts[v.index()].ty
    }

    /// Declares a parameter; names must be unique.
    pub fn add_param(&mut self, name: impl Into<String>, ty: TensorType) -> IrResult<ParamId> {
        let name = name.into();
        if self.param_by_name(&name).is_some() {
            return Err(IrError::Build(format!("parameter @{name} declared twice")));
        }
        self.params.push(Param { name, ty });
        Ok(ParamId(self.params.len() as u32 - 1))
    }

    /// Appends an instruction, inferring its type; the error says why it is ill-typed.
    pub fn push(&mut self, op: Op) -> IrResult<ValueId> {
        let ty = op
            .infer(&Env { module: self, limit: self.insts.len() })
            .map_err(|msg| IrError::Build(format!("%{} = {}: {msg}", self.insts.len(), op.name())))?;
        self.insts.push(Inst { op, ty });
        Ok(ValueId(self.insts.len() as u32 - 1))
    }

    pub fn set_meta(&mut self, key: impl Into<String>, value: Meta) {
        self.meta.insert(key.into(), value);
    }

    pub fn meta_int(&self, key: &str) -> Option<i64> {
        match self.meta.get(key) {
            Some(Meta::Int(n)) => Some(*n),
            _ => None,
        }
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta.get(key) {
            Some(Meta::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Type environment over the first `limit` instructions of a module.
pub(crate) struct Env<'a> {
    pub module: &'a Module,
    pub limit: usize,
}

impl TypeEnv for Env<'_> {
    fn value_type(&self, v: ValueId) -> Option<&TensorType> {
        if v.index() < self.limit { self.module.insts.get(v.index()).map(|i| &i.ty) } else { None }
    }
    fn param_type(&self, p: ParamId) -> Option<&TensorType> {
        self.module.params.get(p.index()).map(|p| &p.ty)
    }
    fn param_name(&self, p: ParamId) -> String {
        self.module.params.get(p.index()).map(|p| p.name.clone()).unwrap_or_else(|| format!("#{}", p.0))
    }
}
