//! Steering directions on disk: one `f32[n_embd]` vector per layer, named
//! `direction.N` for the output of layer N (0-based), in safetensors (kiln's
//! own files, with how they were made in the metadata) or in llama.cpp's
//! control-vector GGUF (`general.architecture = controlvector`).
//!
//! llama.cpp adds `direction.N` (times the strength) to the output of layer N
//! and never to layer 0's; its `cvector-generator` computes `direction.N` from
//! the output of layer N − 1. Kiln keeps the file's meaning (the layer a
//! vector is applied to) and computes `direction.N` from layer N itself.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_ir::DType;

use crate::error::{FrontendError, FrontendResult};
use crate::gguf::{GGUF_MAGIC, GgufFile, MetaValue};
use crate::gguf_write::{GgufWriter, TensorSpec};
use crate::safetensors::{SafetensorsFile, WriteTensor};

/// llama.cpp's architecture name for control-vector files.
pub const GGUF_ARCH: &str = "controlvector";

/// Per-layer steering directions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControlVector {
    pub n_embd: usize,
    /// Layer index (0-based, the layer whose output is steered) → direction.
    pub layers: BTreeMap<usize, Vec<f32>>,
    /// Free-form description (how it was computed, from which model).
    pub meta: BTreeMap<String, String>,
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("direction.")?.parse().ok()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl ControlVector {
    /// Reads a control vector from safetensors or GGUF (told apart by the magic).
    pub fn open(path: &Path) -> FrontendResult<ControlVector> {
        let bytes = std::fs::read(path).map_err(|source| FrontendError::Io { file: path.into(), source })?;
        Self::from_bytes(path, bytes)
    }

    /// [`ControlVector::open`] on a file's bytes (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> FrontendResult<ControlVector> {
        let cv = if bytes.starts_with(&GGUF_MAGIC) {
            Self::from_gguf(&GgufFile::from_bytes(path, bytes)?)?
        } else {
            Self::from_safetensors(&SafetensorsFile::from_bytes(path, bytes)?)?
        };
        cv.check(path)?;
        Ok(cv)
    }

    fn check(&self, path: &Path) -> FrontendResult<()> {
        let bad = |msg: String| FrontendError::bad(path, msg);
        if self.layers.is_empty() {
            return Err(bad("no `direction.N` tensors: not a control vector".into()));
        }
        for (l, v) in &self.layers {
            if v.len() != self.n_embd {
                return Err(bad(format!("direction.{l} has {} elements, the others {}", v.len(), self.n_embd)));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!("direction.{l}[{i}] is not finite")));
            }
        }
        Ok(())
    }

    fn from_gguf(f: &GgufFile) -> FrontendResult<ControlVector> {
        let bad = |msg: String| FrontendError::bad(f.path(), msg);
        match f.get_str("general.architecture") {
            Ok(GGUF_ARCH) => {}
            Ok(other) => return Err(bad(format!("general.architecture is `{other}`, not `{GGUF_ARCH}`"))),
            Err(_) => return Err(bad("no general.architecture: not a control-vector GGUF".into())),
        }
        let mut cv = ControlVector::default();
        if let Ok(hint) = f.get_str("controlvector.model_hint") {
            cv.meta.insert("model_hint".into(), hint.to_string());
        }
        for t in f.tensors() {
            let layer =
                layer_of(&t.name).ok_or_else(|| bad(format!("tensor `{}` is not named direction.N", t.name)))?;
            if t.dtype != DType::F32 || t.dims.len() != 1 {
                return Err(bad(format!("{} must be a 1-D f32 tensor, found {} {:?}", t.name, t.dtype, t.dims)));
            }
            cv.n_embd = t.dims[0] as usize;
            if cv.layers.insert(layer, f32s(f.tensor_data(t))).is_some() {
                return Err(bad(format!("{} appears twice", t.name)));
            }
        }
        Ok(cv)
    }

    fn from_safetensors(f: &SafetensorsFile) -> FrontendResult<ControlVector> {
        let bad = |msg: String| FrontendError::bad(f.path(), msg);
        let mut cv = ControlVector { meta: f.metadata().clone(), ..Default::default() };
        for name in f.names() {
            let Some(layer) = layer_of(name) else { continue };
            let info = f.info(name).ok_or_else(|| bad(format!("{name}: no header entry")))?;
            if info.dtype.name() != "F32" || info.shape.len() != 1 {
                return Err(bad(format!(
                    "{name} must be a 1-D F32 tensor, found {} {:?}",
                    info.dtype.name(),
                    info.shape
                )));
            }
            let bytes = f.raw_bytes(name).ok_or_else(|| bad(format!("{name}: data out of range")))?;
            cv.n_embd = info.shape[0] as usize;
            cv.layers.insert(layer, f32s(bytes));
        }
        Ok(cv)
    }

    /// The safetensors image (deterministic).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>)> = self
            .layers
            .iter()
            .map(|(l, v)| (format!("direction.{l}"), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let shape = [self.n_embd as u64];
        let tensors: Vec<WriteTensor<'_>> =
            data.iter().map(|(n, d)| WriteTensor { name: n, dtype: "F32", shape: &shape, data: d }).collect();
        crate::safetensors::write(&tensors, &self.meta)
    }

    /// The llama.cpp control-vector GGUF image. llama.cpp refuses `direction.0`,
    /// so a layer-0 direction is an error here.
    pub fn to_gguf(&self, model_hint: &str) -> FrontendResult<Vec<u8>> {
        if self.layers.contains_key(&0) {
            return Err(FrontendError::Internal(
                "llama.cpp control vectors cannot steer layer 0 (it refuses direction.0)".into(),
            ));
        }
        let mut w = GgufWriter::new();
        w.set("general.architecture", MetaValue::String(GGUF_ARCH.into()));
        w.set(format!("{GGUF_ARCH}.model_hint"), MetaValue::String(model_hint.into()));
        w.set(format!("{GGUF_ARCH}.layer_count"), MetaValue::I32(self.layers.len() as i32));
        let mut data = Vec::new();
        for (l, v) in &self.layers {
            w.add_tensor(TensorSpec {
                name: format!("direction.{l}"),
                dtype: DType::F32,
                dims: vec![self.n_embd as u64],
            })?;
            data.push(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        }
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        w.to_bytes(&refs)
    }
}
