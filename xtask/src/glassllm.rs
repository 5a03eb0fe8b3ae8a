//! `cargo xtask glassllm-to-hf`: converts the glassllm package's NumPy checkpoint
//! (`weights/<lang>.npz`) and character-BPE tokenizer (`weights/<lang>.tokenizer.json`)
//! into a Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json, generation_config.json) that kiln imports like any other.
//!
//! glassllm's math, read from its `nn.py`, `autograd.py` and `model.py` (0.1.0):
//! - weights are stored for `x @ W` (`[in, out]`); Hugging Face stores `[out, in]`, so every
//!   matrix is transposed. The embedding `E` (`[vocab, d]`) is also the output matrix (tied).
//! - RMSNorm is `x / sqrt(mean(x²) + eps) * gamma`: Llama's, eps inside the root.
//! - RoPE rotates adjacent pairs `(2i, 2i+1)` of each head by `pos · base^(-2i/d_k)`
//!   (interleaved). Hugging Face Llama rotates `(j, j + d_k/2)` ("rotate half") with the same
//!   frequencies, so the rows of Q and K are permuted per head (row `2j` → `j`, row `2j+1` →
//!   `j + d_k/2`), as Hugging Face's own Llama conversion script does. Scores `q·k` are
//!   unchanged because both sides get the same permutation; V and O are not permuted.
//! - attention scale `1/sqrt(d_k)`, causal, grouped-query with `np.repeat` over heads
//!   (kv head `j` serves query heads `j·r .. (j+1)·r`), which is Hugging Face's `repeat_kv`.
//! - SwiGLU is `(silu(x @ W1) * (x @ W3)) @ W2`: W1 is `gate_proj`, W3 `up_proj`, W2 `down_proj`.
//! - no BOS is added: `Tokenizer.encode` returns the bare pieces and `generate` starts from them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};

/// Largest array member read from an npz (glassllm's are well under a megabyte).
const MAX_MEMBER_BYTES: u64 = 1 << 30;
/// Largest npy header accepted.
const MAX_NPY_HEADER: usize = 1 << 16;

/// Element type of an npy array, as far as glassllm checkpoints need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    /// NumPy's fixed-width unicode string `<U{n}`: n UTF-32LE code units.
    Unicode(usize),
}

impl NpyDtype {
    fn item_size(self) -> Option<usize> {
        match self {
            NpyDtype::F16 => Some(2),
            NpyDtype::F32 => Some(4),
            NpyDtype::Unicode(n) => n.checked_mul(4),
        }
    }

    /// The safetensors name of a float dtype.
    fn safetensors_name(self) -> Option<&'static str> {
        match self {
            NpyDtype::F16 => Some("F16"),
            NpyDtype::F32 => Some("F32"),
            NpyDtype::Unicode(_) => None,
        }
    }
}

/// One array of an npz archive: C-order data, little-endian.
#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Npy {
    /// The text of a 0-d (or 1-element) unicode array, trailing NULs removed.
    pub fn as_text(&self) -> Option<String> {
        let NpyDtype::Unicode(_) = self.dtype else {
            return None;
        };
        let chars: Option<String> = self
            .data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&u| u != 0)
            .map(char::from_u32)
            .collect();
        chars
    }
}

/// A value of the Python-literal header dict.
#[derive(Debug, PartialEq)]
enum PyVal {
    Str(String),
    Bool(bool),
    Int(usize),
    Tuple(Vec<PyVal>),
}

struct PyParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl PyParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {} of the header", c as char, self.i))
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyVal, String> {
        if depth > 8 {
            return Err("header nests too deeply".into());
        }
        match self.peek() {
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return Err("unterminated string in the header".into());
                }
                let text =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "header is not UTF-8".to_string())?;
                self.i += 1;
                Ok(PyVal::Str(text.to_string()))
            }
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b')') {
                        self.i += 1;
                        return Ok(PyVal::Tuple(items));
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b')') => {}
                        _ => {
                            return Err(format!("expected `,` or `)` at byte {} of the header", self.i));
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                // A trailing `L` (Python 2 longs) is tolerated.
                if self.s.get(self.i) == Some(&b'L') {
                    self.i += 1;
                }
                text.parse().map(PyVal::Int).map_err(|_| format!("dimension {text} is too large"))
            }
            _ => {
                for (word, v) in [("True", true), ("False", false)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(PyVal::Bool(v));
                    }
                }
                Err(format!("unexpected text at byte {} of the header", self.i))
            }
        }
    }

    fn dict(&mut self) -> Result<BTreeMap<String, PyVal>, String> {
        self.eat(b'{')?;
        let mut out = BTreeMap::new();
        loop {
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(out);
            }
            let PyVal::Str(key) = self.value(0)? else {
                return Err("header dict keys must be strings".into());
            };
            self.eat(b':')?;
            let v = self.value(0)?;
            out.insert(key, v);
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => {
                    return Err(format!("expected `,` or `}}` at byte {} of the header", self.i));
                }
            }
        }
    }
}

/// Parses one `.npy` file (format versions 1–3; little-endian f2/f4 and `<U{n}` only).
pub fn parse_npy(bytes: &[u8]) -> Result<Npy, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy array (bad magic)".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if header_len > MAX_NPY_HEADER || header_start + header_len > bytes.len() {
        return Err(format!("header length {header_len} does not fit the {}-byte array file", bytes.len()));
    }
    let header = &bytes[header_start..header_start + header_len];
    let dict = PyParser { s: header, i: 0 }.dict()?;
    let descr = match dict.get("descr") {
        Some(PyVal::Str(s)) => s.as_str(),
        _ => return Err("header has no `descr` string".into()),
    };
    let dtype = match descr {
        "<f2" => NpyDtype::F16,
        "<f4" => NpyDtype::F32,
        d if d.starts_with("<U") => NpyDtype::Unicode(d[2..].parse().map_err(|_| format!("unsupported dtype `{d}`"))?),
        d => return Err(format!("unsupported dtype `{d}` (expected <f2, <f4 or <U)")),
    };
    match dict.get("fortran_order") {
        Some(PyVal::Bool(false)) => {}
        Some(PyVal::Bool(true)) => return Err("Fortran-order arrays are not supported".into()),
        _ => return Err("header has no `fortran_order` flag".into()),
    }
    let shape: Vec<usize> = match dict.get("shape") {
        Some(PyVal::Tuple(items)) if items.len() <= 8 => items
            .iter()
            .map(|v| match v {
                PyVal::Int(n) => Ok(*n),
                _ => Err("shape entries must be integers".to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("header has no `shape` tuple of at most 8 dimensions".into()),
    };
    let need = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.item_size()?))
        .ok_or("array size overflows")?;
    let data = &bytes[header_start + header_len..];
    if data.len() != need {
        return Err(format!("shape {shape:?} of {descr} needs {need} bytes, the file holds {}", data.len()));
    }
    Ok(Npy { dtype, shape, data: data.to_vec() })
}

/// Reads every `.npy` member of an `.npz` archive, keyed by name without `.npy`.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, Npy>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: not a zip archive: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| format!("{}: member #{i}: {e}", path.display()))?;
        let name = member.name().map_err(|e| format!("{}: member #{i}: {e}", path.display()))?.to_string();
        let Some(key) = name.strip_suffix(".npy") else {
            continue;
        };
        if member.size() > MAX_MEMBER_BYTES {
            return Err(format!("{}: {name} is {} bytes, over the limit", path.display(), member.size()));
        }
        let mut bytes = Vec::with_capacity(member.size() as usize);
        (&mut member)
            .take(MAX_MEMBER_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {name}: {e}", path.display()))?;
        let arr = parse_npy(&bytes).map_err(|e| format!("{}: {name}: {e}", path.display()))?;
        out.insert(key.to_string(), arr);
    }
    Ok(out)
}

/// glassllm's `Config` (the npz `__config__` JSON).
#[derive(Clone, Debug, PartialEq)]
pub struct GlassConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub max_len: usize,
    pub rope_base: f64,
    pub eps: f64,
}

impl GlassConfig {
    pub fn from_json(v: &Value) -> Result<GlassConfig, String> {
        let int = |k: &str| -> Result<usize, String> {
            let n = v.get(k).and_then(Value::as_u64).ok_or(format!("`{k}` is missing or not a positive integer"))?;
            if n == 0 || n > 1 << 24 {
                return Err(format!("`{k}` = {n} is out of range"));
            }
            Ok(n as usize)
        };
        let float = |k: &str| v.get(k).and_then(Value::as_f64).ok_or(format!("`{k}` is missing or not a number"));
        let c = GlassConfig {
            vocab_size: int("vocab_size")?,
            d_model: int("d_model")?,
            n_layers: int("n_layers")?,
            n_heads: int("n_heads")?,
            n_kv_heads: int("n_kv_heads")?,
            max_len: int("max_len")?,
            rope_base: float("rope_base")?,
            eps: float("eps")?,
        };
        if !c.d_model.is_multiple_of(c.n_heads)
            || !c.n_heads.is_multiple_of(c.n_kv_heads)
            || !(c.d_model / c.n_heads).is_multiple_of(2)
        {
            return Err(format!(
                "inconsistent heads: d_model {} / {} heads / {} kv heads (head size must be even)",
                c.d_model, c.n_heads, c.n_kv_heads
            ));
        }
        if c.rope_base <= 0.0 || c.eps < 0.0 {
            return Err("rope_base must be positive and eps non-negative".into());
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// A tensor of the converted checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    pub name: String,
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// `[rows, cols]` → `[cols, rows]`, any element size.
pub fn transpose(data: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * elem;
            let dst = (c * rows + r) * elem;
            out[dst..dst + elem].copy_from_slice(&data[src..src + elem]);
        }
    }
    out
}

/// Reorders the rows of an `[heads·head_dim, cols]` matrix from interleaved-pair RoPE order
/// to rotate-half order: within each head, row `2j` goes to `j` and `2j+1` to `j + head_dim/2`.
pub fn interleaved_to_half(data: &[u8], heads: usize, head_dim: usize, cols: usize, elem: usize) -> Vec<u8> {
    let row = cols * elem;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..head_dim {
            let src = h * head_dim + if j < half { 2 * j } else { 2 * (j - half) + 1 };
            let dst = h * head_dim + j;
            out[dst * row..(dst + 1) * row].copy_from_slice(&data[src * row..(src + 1) * row]);
        }
    }
    out
}

/// The config stored in the npz.
pub fn npz_config(npz: &BTreeMap<String, Npy>) -> Result<GlassConfig, String> {
    let text = npz.get("__config__").and_then(Npy::as_text).ok_or("no `__config__` string array")?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("`__config__` is not JSON: {e}"))?;
    GlassConfig::from_json(&v).map_err(|e| format!("`__config__`: {e}"))
}

/// Maps glassllm's arrays to Hugging Face Llama tensors (sorted by name); returns the FFN width too.
pub fn hf_tensors(npz: &BTreeMap<String, Npy>, cfg: &GlassConfig) -> Result<(Vec<HfTensor>, usize), String> {
    let (d, hd) = (cfg.d_model, cfg.head_dim());
    let (q_dim, kv_dim) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let hidden = npz
        .get("blocks.0.ffn.W1")
        .and_then(|a| (a.shape.len() == 2).then(|| a.shape[1]))
        .ok_or("missing or malformed `blocks.0.ffn.W1`")?;
    let get = |name: &str, shape: &[usize]| -> Result<&Npy, String> {
        let a = npz.get(name).ok_or(format!("missing array `{name}`"))?;
        if a.shape != shape {
            return Err(format!("array `{name}` has shape {:?}, expected {shape:?}", a.shape));
        }
        if a.dtype.safetensors_name().is_none() {
            return Err(format!("array `{name}` is not a float array"));
        }
        Ok(a)
    };
    let mut out = Vec::new();
    let mut push = |name: String, a: &Npy, shape: Vec<usize>, data: Vec<u8>| {
        out.push(HfTensor { name, dtype: a.dtype, shape, data });
    };
    let e = get("E", &[cfg.vocab_size, d])?;
    push("model.embed_tokens.weight".into(), e, e.shape.clone(), e.data.clone());
    let f = get("norm_f.gamma", &[d])?;
    push("model.norm.weight".into(), f, vec![d], f.data.clone());
    for l in 0..cfg.n_layers {
        let g = |n: &str| format!("blocks.{l}.{n}");
        let h = |n: &str| format!("model.layers.{l}.{n}");
        // [in, out] → [out, in]
        let t = |a: &Npy| {
            let elem = a.dtype.item_size().unwrap_or(1);
            transpose(&a.data, a.shape[0], a.shape[1], elem)
        };
        let a = get(&g("norm1.gamma"), &[d])?;
        push(h("input_layernorm.weight"), a, vec![d], a.data.clone());
        let a = get(&g("norm2.gamma"), &[d])?;
        push(h("post_attention_layernorm.weight"), a, vec![d], a.data.clone());
        let a = get(&g("attn.W_Q"), &[d, q_dim])?;
        let elem = a.dtype.item_size().unwrap_or(1);
        push(h("self_attn.q_proj.weight"), a, vec![q_dim, d], interleaved_to_half(&t(a), cfg.n_heads, hd, d, elem));
        let a = get(&g("attn.W_K"), &[d, kv_dim])?;
        let elem = a.dtype.item_size().unwrap_or(1);
        push(h("self_attn.k_proj.weight"), a, vec![kv_dim, d], interleaved_to_half(&t(a), cfg.n_kv_heads, hd, d, elem));
        let a = get(&g("attn.W_V"), &[d, kv_dim])?;
        push(h("self_attn.v_proj.weight"), a, vec![kv_dim, d], t(a));
        let a = get(&g("attn.W_O"), &[q_dim, d])?;
        push(h("self_attn.o_proj.weight"), a, vec![d, q_dim], t(a));
        let a = get(&g("ffn.W1"), &[d, hidden])?;
        push(h("mlp.gate_proj.weight"), a, vec![hidden, d], t(a));
        let a = get(&g("ffn.W3"), &[d, hidden])?;
        push(h("mlp.up_proj.weight"), a, vec![hidden, d], t(a));
        let a = get(&g("ffn.W2"), &[hidden, d])?;
        push(h("mlp.down_proj.weight"), a, vec![d, hidden], t(a));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, hidden))
}

/// A safetensors image of `tensors` (see [`kiln_frontend::safetensors::write`]).
pub fn safetensors_bytes(tensors: &[HfTensor]) -> Vec<u8> {
    let shapes: Vec<Vec<u64>> = tensors.iter().map(|t| t.shape.iter().map(|&d| d as u64).collect()).collect();
    let list: Vec<kiln_frontend::safetensors::WriteTensor<'_>> = tensors
        .iter()
        .zip(&shapes)
        .map(|(t, shape)| kiln_frontend::safetensors::WriteTensor {
            name: &t.name,
            dtype: t.dtype.safetensors_name().unwrap_or("F32"),
            shape,
            data: &t.data,
        })
        .collect();
    let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    kiln_frontend::safetensors::write(&list, &meta)
}

/// glassllm's special tokens and their ids.
pub const PAD_ID: u32 = 0;
pub const UNK_ID: u32 = 1;
pub const BOS_ID: u32 = 2;
pub const EOS_ID: u32 = 3;

pub fn config_json(cfg: &GlassConfig, hidden: usize, dtype: NpyDtype) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": null,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": true,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": if dtype == NpyDtype::F32 { "float32" } else { "float16" },
    })
}

/// A Hugging Face `tokenizer.json` for glassllm's tokenizer file, converted by kiln's frontend
/// (without kiln's private `"kiln"` section, so Hugging Face's loader reads it from a file too).
pub fn tokenizer_json(glass: &Value, origin: &str, vocab_size: usize) -> Result<Value, String> {
    let mut doc = kiln_frontend::tokenizer::glassllm_to_tokenizer_json(glass, origin).map_err(|e| e.to_string())?;
    if let Some(m) = doc.as_object_mut() {
        m.remove(kiln_frontend::tokenizer::KILN_CONFIG_KEY);
    }
    let n = doc.pointer("/model/vocab").and_then(Value::as_object).map_or(0, |v| v.len());
    if n != vocab_size {
        return Err(format!("{origin}: the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}"));
    }
    for (id, tok) in [(PAD_ID, "<pad>"), (UNK_ID, "<unk>"), (BOS_ID, "<bos>"), (EOS_ID, "<eos>")] {
        if doc.pointer(&format!("/model/vocab/{tok}")).and_then(Value::as_u64) != Some(id as u64) {
            return Err(format!("{origin}: {tok} is not token {id}"));
        }
    }
    Ok(doc)
}

pub fn tokenizer_config_json(cfg: &GlassConfig) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_len,
    })
}

pub fn generation_config_json(cfg: &GlassConfig) -> Value {
    json!({
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "max_length": cfg.max_len,
    })
}

/// Serializes JSON with object keys sorted, whatever order `serde_json` keeps them in.
struct Sorted<'a>(&'a Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut map = s.serialize_map(Some(keys.len()))?;
                for k in keys {
                    map.serialize_entry(k, &Sorted(&m[k]))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Sorted(v))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Pretty JSON with sorted keys and a final newline.
pub fn json_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(&Sorted(v)).unwrap_or_default();
    s.push('\n');
    s
}

/// The files of a converted directory, by name.
pub fn convert_files(npz: &Path, tokenizer: &Path) -> Result<BTreeMap<&'static str, Vec<u8>>, String> {
    let arrays = read_npz(npz)?;
    let cfg = npz_config(&arrays).map_err(|e| format!("{}: {e}", npz.display()))?;
    let (tensors, hidden) = hf_tensors(&arrays, &cfg).map_err(|e| format!("{}: {e}", npz.display()))?;
    let dtype = tensors.first().map_or(NpyDtype::F16, |t| t.dtype);
    let tok_text = std::fs::read_to_string(tokenizer).map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let tok: Value =
        serde_json::from_str(&tok_text).map_err(|e| format!("{}: not valid JSON: {e}", tokenizer.display()))?;
    let tok_json = tokenizer_json(&tok, &tokenizer.display().to_string(), cfg.vocab_size)?;
    let mut files = BTreeMap::new();
    files.insert("config.json", json_text(&config_json(&cfg, hidden, dtype)).into_bytes());
    files.insert("model.safetensors", safetensors_bytes(&tensors));
    files.insert("tokenizer.json", json_text(&tok_json).into_bytes());
    files.insert("tokenizer_config.json", json_text(&tokenizer_config_json(&cfg)).into_bytes());
    files.insert("generation_config.json", json_text(&generation_config_json(&cfg)).into_bytes());
    Ok(files)
}

/// Converts into `out` (created if needed; the five files are overwritten).
pub fn convert(npz: &Path, tokenizer: &Path, out: &Path) -> Result<(), String> {
    let files = convert_files(npz, tokenizer)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, bytes) in files {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

const USAGE: &str = "usage: cargo xtask glassllm-to-hf --npz PATH --tokenizer PATH --out DIR\n\
    converts glassllm's weights/<lang>.npz and <lang>.tokenizer.json into a Hugging Face Llama directory";

/// The `glassllm-to-hf` subcommand; `args` are the arguments after the subcommand name.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut npz: Option<PathBuf> = None;
    let mut tokenizer: Option<PathBuf> = None;
    let mut out: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--npz" => &mut npz,
            "--tokenizer" => &mut tokenizer,
            "--out" => &mut out,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        };
        *slot = Some(PathBuf::from(it.next().ok_or(format!("{a} needs a value\n{USAGE}"))?));
    }
    let (Some(npz), Some(tokenizer), Some(out)) = (npz, tokenizer, out) else {
        return Err(format!("--npz, --tokenizer and --out are required\n{USAGE}"));
    };
    convert(&npz, &tokenizer, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_npy() {
        let a = parse_npy(&npy("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", &[0; 12])).unwrap();
        assert_eq!((a.dtype, a.shape.clone()), (NpyDtype::F16, vec![2, 3]));
        let a = parse_npy(&npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", &[0; 12])).unwrap();
        assert_eq!(a.shape, vec![3]);
        let text: Vec<u8> = "hi".chars().chain(['\0'; 2]).flat_map(|c| (c as u32).to_le_bytes()).collect();
        let a = parse_npy(&npy("{'descr': '<U4', 'fortran_order': False, 'shape': (), }", &text)).unwrap();
        assert_eq!(a.as_text().as_deref(), Some("hi"));
    }

    #[test]
    fn rejects_bad_npy() {
        let cases = [
            (npy("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", &[0; 11]), "needs 12 bytes"),
            (npy("{'descr': '>f2', 'fortran_order': False, 'shape': (1,), }", &[0; 2]), "unsupported dtype"),
            (npy("{'descr': '<f2', 'fortran_order': True, 'shape': (1,), }", &[0; 2]), "Fortran"),
            (npy("{'descr': '<f2', 'fortran_order': False, 'shape': (99999999999999999999,), }", &[]), "too large"),
            (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", &[]), "overflow"),
            (
                npy("{'descr': '<f2', 'fortran_order': False, 'shape': ((((((((((1,),),),),),),),),),), }", &[]),
                "deeply",
            ),
            (npy("{'descr': '<f2', 'fortran_order': False, 'shape': (1,)", &[0; 2]), "expected"),
            (npy("{'descr: '<f2'}", &[]), "expected"),
            (b"\x93NUMPY\x01\x00\xff\xff{}".to_vec(), "does not fit"),
            (b"PK\x03\x04".to_vec(), "magic"),
        ];
        for (bytes, want) in cases {
            let e = parse_npy(&bytes).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn garbage_npy_never_panics() {
        let good = npy("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", &[0; 12]);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut v = good.clone();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed % v.len() as u64) as usize;
            v[i] = (seed >> 24) as u8;
            if seed.is_multiple_of(7) {
                v.truncate((seed >> 40) as usize % v.len());
            }
            let _ = parse_npy(&v);
        }
    }

    /// glassllm's interleaved-pair RoPE on `x @ W` equals rotate-half RoPE on the converted rows.
    #[test]
    fn rope_permutation_matches_interleaved() {
        let (heads, hd, d) = (2usize, 6usize, 3usize);
        let w: Vec<f32> = (0..d * heads * hd).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect(); // [d, heads·hd]
        let x = [0.3f32, -1.2, 0.7];
        let (pos, base) = (5.0f32, 10000.0f32);
        let q: Vec<f32> = (0..heads * hd).map(|o| (0..d).map(|i| x[i] * w[i * heads * hd + o]).sum()).collect();
        let angle = |i: usize| pos * base.powf(-2.0 * i as f32 / hd as f32);
        let mut glass = q.clone();
        for h in 0..heads {
            for i in 0..hd / 2 {
                let (a, b) = (q[h * hd + 2 * i], q[h * hd + 2 * i + 1]);
                let (s, c) = angle(i).sin_cos();
                glass[h * hd + 2 * i] = a * c - b * s;
                glass[h * hd + 2 * i + 1] = a * s + b * c;
            }
        }
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let hf = interleaved_to_half(&transpose(&bytes, d, heads * hd, 4), heads, hd, d, 4); // [heads·hd, d]
        let hf: Vec<f32> = hf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let y: Vec<f32> = (0..heads * hd).map(|o| (0..d).map(|i| x[i] * hf[o * d + i]).sum()).collect();
        let mut rot = y.clone();
        for h in 0..heads {
            for j in 0..hd / 2 {
                let (a, b) = (y[h * hd + j], y[h * hd + j + hd / 2]);
                let (s, c) = angle(j).sin_cos();
                rot[h * hd + j] = a * c - b * s;
                rot[h * hd + j + hd / 2] = b * c + a * s;
            }
        }
        // Per head, rotate-half output j is glassllm's output 2j and j + hd/2 is 2j+1.
        for h in 0..heads {
            for j in 0..hd / 2 {
                assert!((rot[h * hd + j] - glass[h * hd + 2 * j]).abs() < 1e-5);
                assert!((rot[h * hd + j + hd / 2] - glass[h * hd + 2 * j + 1]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn safetensors_layout() {
        let t = |n: &str, data: Vec<u8>| HfTensor {
            name: n.into(),
            dtype: NpyDtype::F16,
            shape: vec![data.len() / 2],
            data,
        };
        let a = safetensors_bytes(&[t("b", vec![1, 2]), t("a", vec![3, 4, 5, 6])]);
        let b = safetensors_bytes(&[t("a", vec![3, 4, 5, 6]), t("b", vec![1, 2])]);
        assert_eq!(a, b);
        let n = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let h: Value = serde_json::from_slice(&a[8..8 + n]).unwrap();
        assert_eq!(h["a"]["data_offsets"], json!([0, 4]));
        assert_eq!(h["b"]["data_offsets"], json!([4, 6]));
        assert_eq!(&a[8 + n..], &[3, 4, 5, 6, 1, 2]);
    }

    #[test]
    fn run_checks_arguments() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(run(&s(&["--npz"])).unwrap_err().contains("needs a value"));
        assert!(run(&s(&["--bogus", "x"])).unwrap_err().contains("unknown argument"));
        assert!(run(&s(&["--npz", "a"])).unwrap_err().contains("required"));
        let e = run(&s(&["--npz", "/nonexistent/en.npz", "--tokenizer", "t", "--out", "/tmp/x"])).unwrap_err();
        assert!(e.contains("/nonexistent/en.npz"), "{e}");
    }
}
