//! Hugging Face directory importer: `config.json` + safetensors weights (one file or
//! sharded with `model.safetensors.index.json`) + `tokenizer.json`, lowered through
//! the architecture registry and the shared decoder lowering.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_ir::{DType, TensorType};
use serde_json::Value;

use crate::arch::{self, Arch, HfConfig};
use crate::decoder::{self, TensorSource};
use crate::error::{FrontendError, FrontendResult};
use crate::import::ImportedModel;
use crate::safetensors::SafetensorsFile;
use crate::weights::{SourceTensor, TensorBytes, plain_to_f32};

/// Largest JSON side file read (config, index, tokenizer config); tokenizer.json may be larger.
const MAX_JSON_BYTES: u64 = 64 << 20;
const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// Imports a Hugging Face model directory.
pub fn import_dir(dir: &Path) -> FrontendResult<ImportedModel> {
    let (module, weights) = import_dir_graph(dir)?;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json = read_text(
        &tokenizer_path,
        MAX_TOKENIZER_BYTES,
        "kiln needs the fast-tokenizer file tokenizer.json next to config.json",
    )?;
    serde_json::from_str::<serde::de::IgnoredAny>(&tokenizer_json)
        .map_err(|e| FrontendError::bad(&tokenizer_path, format!("not valid JSON: {e}")))?;
    let chat_template = chat_template(dir)?;
    Ok(ImportedModel { module, weights, tokenizer_json, chat_template, source: dir.to_path_buf() })
}

/// Lowers a Hugging Face model directory's `config.json` and safetensors weights to a
/// module and its weights, without the tokenizer (which [`import_dir`] adds).
pub fn import_dir_graph(dir: &Path) -> FrontendResult<(kiln_ir::Module, crate::weights::Weights)> {
    let config_path = dir.join("config.json");
    let config_json = read_json(&config_path, MAX_JSON_BYTES, "a Hugging Face model directory needs config.json")?;
    let (arch, cfg_json) = find_arch(&config_path, &config_json)?;
    let config = HfConfig { file: &config_path, json: cfg_json };
    let source = HfTensors::open(dir, arch)?;
    let name = model_name(dir);
    match arch.hf_lower {
        Some(lower) => lower(&config, &source, &name),
        None => decoder::lower(&(arch.from_hf)(&config)?, &source, &name),
    }
}

/// The architecture for `model_type`, and the object holding the text model's hyperparameters
/// (the top level, or `text_config` for multimodal wrappers such as Gemma 3).
fn find_arch<'a>(file: &Path, json: &'a Value) -> FrontendResult<(&'static Arch, &'a Value)> {
    if !json.is_object() {
        return Err(FrontendError::bad(file, "config.json is not a JSON object"));
    }
    let known = || arch::ARCHES.iter().flat_map(|a| a.hf_model_types.iter().copied()).collect::<Vec<_>>().join(", ");
    let model_type = match json.get("model_type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(FrontendError::bad(file, format!("`model_type` must be a string, found {other}")));
        }
        None => {
            return Err(FrontendError::bad(file, format!("missing `model_type` (supported: {})", known())));
        }
    };
    let text = json.get("text_config").filter(|t| t.is_object() && json.get("hidden_size").is_none());
    let text_type = text.and_then(|t| t.get("model_type")).and_then(Value::as_str);
    let arch =
        arch::by_hf_model_type(model_type).or_else(|| text_type.and_then(arch::by_hf_model_type)).ok_or_else(|| {
            FrontendError::unsupported(file, format!("model_type `{model_type}` (supported: {})", known()))
        })?;
    Ok((arch, text.unwrap_or(json)))
}

fn model_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(dir).or_else(|| dir.canonicalize().ok().as_deref().and_then(named)).unwrap_or_else(|| "model".to_string())
}

fn read_bounded(path: &Path, max: u64, missing_hint: &str) -> FrontendResult<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            FrontendError::bad(path, format!("file not found; {missing_hint}"))
        } else {
            FrontendError::Io { file: path.to_path_buf(), source }
        }
    })?;
    if meta.len() > max {
        return Err(FrontendError::bad(path, format!("{} bytes is larger than the {max}-byte limit", meta.len())));
    }
    std::fs::read(path).map_err(|source| FrontendError::Io { file: path.to_path_buf(), source })
}

fn read_text(path: &Path, max: u64, missing_hint: &str) -> FrontendResult<String> {
    let bytes = read_bounded(path, max, missing_hint)?;
    String::from_utf8(bytes).map_err(|e| FrontendError::bad(path, format!("not valid UTF-8: {e}")))
}

fn read_json(path: &Path, max: u64, missing_hint: &str) -> FrontendResult<Value> {
    let bytes = read_bounded(path, max, missing_hint)?;
    serde_json::from_slice(&bytes).map_err(|e| FrontendError::bad(path, format!("not valid JSON: {e}")))
}

/// The chat template: `chat_template` of tokenizer_config.json (a string, or a list of
/// `{name, template}` from which "default" or else the first is taken), else `chat_template.jinja`.
fn chat_template(dir: &Path) -> FrontendResult<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        let json = read_json(&path, MAX_JSON_BYTES, "")?;
        match json.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Array(list)) => {
                let template = |v: &Value| v.get("template").and_then(Value::as_str).map(str::to_string);
                let named = list.iter().find(|v| v.get("name").and_then(Value::as_str) == Some("default"));
                let chosen = named.or_else(|| list.first());
                return match chosen {
                    None => Ok(None),
                    Some(v) => template(v).map(Some).ok_or_else(|| {
                        FrontendError::bad(
                            &path,
                            "`chat_template` list entries must be {\"name\", \"template\"} objects",
                        )
                    }),
                };
            }
            Some(other) => {
                return Err(FrontendError::bad(
                    &path,
                    format!("`chat_template` must be a string or a list of named templates, found {other}"),
                ));
            }
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read_text(&jinja, MAX_JSON_BYTES, "").map(Some);
    }
    Ok(None)
}

/// Whether a shard file name from the index is a plain file name inside the directory.
fn plain_file_name(name: &str) -> bool {
    let forbidden = name.is_empty() || name == "." || name.contains("..") || name.contains(['/', '\\', '\0', ':']);
    !forbidden
}

/// The safetensors files of a directory, with kiln's canonical names mapped to the
/// Hugging Face names (and shards) that hold them.
pub struct HfTensors {
    file: PathBuf,
    arch: &'static Arch,
    shards: Vec<Arc<SafetensorsFile>>,
    /// canonical name → (shard index, Hugging Face name)
    by_canonical: HashMap<String, (usize, String)>,
}

impl HfTensors {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path, arch: &'static Arch) -> FrontendResult<HfTensors> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // (shard index, HF name) pairs to map, and the file errors name.
        let (file, shards, names): (PathBuf, Vec<Arc<SafetensorsFile>>, Vec<(usize, String)>) = if single.is_file() {
            let f = Arc::new(SafetensorsFile::open(&single)?);
            let names = f.names().into_iter().map(|n| (0, n.to_string())).collect();
            (single, vec![f], names)
        } else if index.is_file() {
            let (shards, names) = open_index(dir, &index)?;
            (index, shards, names)
        } else {
            return Err(missing_weights(dir));
        };
        let mut by_canonical: HashMap<String, (usize, String)> = HashMap::new();
        for (shard, hf) in names {
            let Some(canon) = (arch.hf_name)(&hf) else {
                continue;
            };
            if let Some((_, prev)) = by_canonical.get(&canon) {
                return Err(FrontendError::bad(
                    &file,
                    format!("tensors {prev} and {hf} both map to kiln's {canon}; the checkpoint is ambiguous"),
                ));
            }
            by_canonical.insert(canon, (shard, hf));
        }
        if by_canonical.is_empty() {
            return Err(FrontendError::bad(
                &file,
                format!("no tensor has a name kiln knows for the {} architecture", arch.gguf_name),
            ));
        }
        Ok(HfTensors { file, arch, shards, by_canonical })
    }

    /// Number of tensors kiln can address by canonical name.
    pub fn len(&self) -> usize {
        self.by_canonical.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_canonical.is_empty()
    }
}

type ShardSet = (Vec<Arc<SafetensorsFile>>, Vec<(usize, String)>);

fn open_index(dir: &Path, index: &Path) -> FrontendResult<ShardSet> {
    let json = read_json(index, MAX_JSON_BYTES, "")?;
    let Some(Value::Object(map)) = json.get("weight_map") else {
        return Err(FrontendError::bad(index, "missing `weight_map` object"));
    };
    let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
    let mut shards = Vec::new();
    let mut names = Vec::with_capacity(map.len());
    for (name, shard) in map {
        let Value::String(shard) = shard else {
            return Err(FrontendError::bad(index, format!("weight_map entry {name} is not a file name: {shard}")));
        };
        if !plain_file_name(shard) {
            return Err(FrontendError::bad(
                index,
                format!(
                    "weight_map entry {name} names shard `{shard}`, which is not a plain file name in the directory"
                ),
            ));
        }
        let id = match shard_ids.get(shard) {
            Some(&id) => id,
            None => {
                let f = Arc::new(SafetensorsFile::open(&dir.join(shard))?);
                shards.push(f);
                shard_ids.insert(shard.clone(), shards.len() - 1);
                shards.len() - 1
            }
        };
        if !shards[id].contains(name) {
            return Err(FrontendError::bad(
                index,
                format!("weight_map puts {name} in {shard}, which has no such tensor"),
            ));
        }
        names.push((id, name.clone()));
    }
    Ok((shards, names))
}

fn missing_weights(dir: &Path) -> FrontendError {
    let pickles = ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth"];
    if pickles.iter().any(|p| dir.join(p).exists()) {
        return FrontendError::unsupported(
            dir,
            "this checkpoint only has PyTorch pickle weights (pytorch_model.bin), which can run code when \
             loaded; convert them to safetensors (model.safetensors) first",
        );
    }
    FrontendError::bad(dir, "no weights: expected model.safetensors or model.safetensors.index.json")
}

impl TensorSource for HfTensors {
    fn file(&self) -> &Path {
        &self.file
    }

    fn get_ints(&self, name: &str) -> FrontendResult<Option<(Vec<u64>, Vec<i64>)>> {
        let Some((shard, hf)) = self.by_canonical.get(name) else {
            return Ok(None);
        };
        let Some(shard) = self.shards.get(*shard) else {
            return Err(FrontendError::Internal(format!("shard index out of range for {hf}")));
        };
        let (Some(info), Some(bytes)) = (shard.info(hf), shard.raw_bytes(hf)) else {
            return Err(FrontendError::Internal(format!("{hf} vanished from {}", shard.path().display())));
        };
        let values: Vec<i64> = match info.dtype.name().as_str() {
            "I64" => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            "I32" => {
                bytes.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4])))).collect()
            }
            other => {
                return Err(FrontendError::bad(
                    shard.path(),
                    format!("tensor {hf} has dtype {other}; an integer table (I64 or I32) was expected"),
                ));
            }
        };
        Ok(Some((info.shape.clone(), values)))
    }

    fn get(&self, name: &str) -> FrontendResult<Option<SourceTensor>> {
        let Some((shard, hf)) = self.by_canonical.get(name) else {
            return Ok(None);
        };
        let Some(shard) = self.shards.get(*shard) else {
            return Err(FrontendError::Internal(format!("shard index out of range for {hf}")));
        };
        let Some(t) = shard.tensor(hf)? else {
            return Err(FrontendError::Internal(format!("{hf} vanished from {}", shard.path().display())));
        };
        let Some(fixup) = self.arch.hf_fixup else {
            return Ok(Some(t));
        };
        let Some(mut values) = plain_to_f32(t.ty.dtype, t.bytes.as_bytes()) else {
            return Ok(Some(t));
        };
        if !fixup(name, &mut values) {
            return Ok(Some(t));
        }
        let dims = t.ty.fixed_dims().unwrap_or_default();
        Ok(Some(SourceTensor { ty: TensorType::fixed(DType::F32, &dims), bytes: TensorBytes::from_f32(&values) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny llama: 1 layer, d=8, 2 heads of 4, 1 kv head, ffn 16, vocab 10.
    fn config() -> Value {
        json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32,
            "hidden_act": "silu", "tie_word_embeddings": true
        })
    }

    fn tensors() -> Vec<(String, Vec<u64>)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![10, 8]), ("model.norm.weight".into(), vec![8])];
        let l = |n: &str| format!("model.layers.0.{n}");
        for (n, s) in [
            ("input_layernorm.weight", vec![8]),
            ("self_attn.q_proj.weight", vec![8, 8]),
            ("self_attn.k_proj.weight", vec![4, 8]),
            ("self_attn.v_proj.weight", vec![4, 8]),
            ("self_attn.o_proj.weight", vec![8, 8]),
            ("post_attention_layernorm.weight", vec![8]),
            ("mlp.gate_proj.weight", vec![16, 8]),
            ("mlp.up_proj.weight", vec![16, 8]),
            ("mlp.down_proj.weight", vec![8, 16]),
        ] {
            v.push((l(n), s));
        }
        v
    }

    /// A safetensors image holding `names` as F16 ones.
    fn image(names: &[(String, Vec<u64>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (n, shape) in names {
            let elems: u64 = shape.iter().product();
            let begin = data.len();
            for _ in 0..elems {
                data.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            }
            header.insert(n.clone(), json!({"dtype": "F16", "shape": shape, "data_offsets": [begin, data.len()]}));
        }
        let h = serde_json::to_vec(&Value::Object(header)).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("kiln-hf-{tag}-{}", std::process::id())).join("tiny-llama");
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn write(d: &Path, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(d.join(name), bytes).unwrap();
    }

    fn full(tag: &str) -> Dir {
        let d = dir(tag);
        write(&d.0, "config.json", config().to_string());
        write(&d.0, "model.safetensors", image(&tensors()));
        write(&d.0, "tokenizer.json", r#"{"model": {"type": "BPE"}}"#);
        d
    }

    #[test]
    fn imports_single_file() {
        let d = full("single");
        write(&d.0, "tokenizer_config.json", json!({"chat_template": "{{ x }}"}).to_string());
        let m = import_dir(&d.0).unwrap();
        assert_eq!(m.module.name, "tiny-llama");
        assert_eq!(m.chat_template.as_deref(), Some("{{ x }}"));
        assert!(m.tokenizer_json.contains("BPE"));
        // Norm weights are converted to f32; matrices stay mapped F16.
        assert!(m.weights.tensors.iter().any(|t| matches!(t, TensorBytes::Mapped { .. })));
    }

    #[test]
    fn imports_sharded() {
        let d = dir("sharded");
        write(&d.0, "config.json", config().to_string());
        write(&d.0, "tokenizer.json", "{}");
        let all = tensors();
        let (a, b) = all.split_at(4);
        write(&d.0, "model-00001-of-00002.safetensors", image(a));
        write(&d.0, "model-00002-of-00002.safetensors", image(b));
        let mut map = serde_json::Map::new();
        for (n, _) in a {
            map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
        }
        for (n, _) in b {
            map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
        }
        write(&d.0, "model.safetensors.index.json", json!({"weight_map": map}).to_string());
        write(
            &d.0,
            "tokenizer_config.json",
            json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
                .to_string(),
        );
        let m = import_dir(&d.0).unwrap();
        assert_eq!(m.chat_template.as_deref(), Some("D"));

        map.insert("model.norm.weight".into(), json!("../evil.safetensors"));
        write(&d.0, "model.safetensors.index.json", json!({"weight_map": map}).to_string());
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("index.json") && e.contains("not a plain file name"), "{e}");
        map.insert("model.norm.weight".into(), json!("model-00001-of-00002.safetensors"));
        map.insert("model.layers.0.mlp.down_proj.weight".into(), json!("model-00001-of-00002.safetensors"));
        write(&d.0, "model.safetensors.index.json", json!({"weight_map": map}).to_string());
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("has no such tensor"), "{e}");
    }

    #[test]
    fn clear_errors() {
        let d = full("errors");
        std::fs::remove_file(d.0.join("tokenizer.json")).unwrap();
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
        write(&d.0, "tokenizer.json", "{oops");
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("not valid JSON"), "{e}");

        write(&d.0, "config.json", "{");
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
        write(&d.0, "config.json", json!({"model_type": "mamba"}).to_string());
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("unsupported") && e.contains("mamba") && e.contains("llama"), "{e}");
        std::fs::remove_file(d.0.join("config.json")).unwrap();
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("not found"), "{e}");

        write(&d.0, "config.json", config().to_string());
        std::fs::remove_file(d.0.join("model.safetensors")).unwrap();
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("no weights"), "{e}");
        write(&d.0, "pytorch_model.bin", b"PK");
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("convert") && e.contains("safetensors"), "{e}");

        // A missing tensor names the file and the canonical name.
        let mut t = tensors();
        t.retain(|(n, _)| !n.contains("down_proj"));
        write(&d.0, "model.safetensors", image(&t));
        let e = import_dir(&d.0).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("blk.0.ffn_down.weight"), "{e}");
    }

    #[test]
    fn gemma_fixup_converts_norms() {
        let d = dir("fixup");
        let t = vec![("model.norm.weight".to_string(), vec![3u64]), ("model.embed_tokens.weight".into(), vec![2, 3])];
        write(&d.0, "model.safetensors", image(&t));
        let arch = arch::by_hf_model_type("gemma3_text").unwrap();
        let src = HfTensors::open(&d.0, arch).unwrap();
        let n = src.get("output_norm.weight").unwrap().unwrap();
        assert_eq!(n.ty, TensorType::fixed(DType::F32, &[3]));
        assert_eq!(plain_to_f32(DType::F32, n.bytes.as_bytes()), Some(vec![2.0; 3]));
        let e = src.get("token_embd.weight").unwrap().unwrap();
        assert_eq!(e.ty.dtype, DType::F16);
        assert!(src.get("output.weight").unwrap().is_none());
    }

    #[test]
    fn shard_names() {
        assert!(plain_file_name("model-00001-of-00002.safetensors"));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "x..y", "C:x"] {
            assert!(!plain_file_name(bad), "{bad}");
        }
    }
}
