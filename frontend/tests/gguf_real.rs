//! Opens the real SmolLM2-135M (Q4_1) and Qwen2.5-Coder-0.5B (Q4_K_M mix) GGUF files, when present, and checks metadata, the tensor directory and dequantized data against gguf-py fixtures.
//!
//! Paths: `KILN_SMOLLM2_GGUF` / `KILN_QWEN05_GGUF`, else the files under
//! `${KILN_CACHE:-~/.cache/kiln}/models/` (see tests/oracle/README.md). A
//! test whose file is absent prints why and passes.

use std::path::{Path, PathBuf};

use kiln_backends::quant::dequantize_row;
use kiln_frontend::gguf::{GgufFile, TensorInfo};
use kiln_ir::DType;

/// The model file from `env_var` or the kiln cache, or `None` (with the
/// reason printed) when it is not available.
fn model_path(env_var: &str, cache_name: &str) -> Option<PathBuf> {
    let path = match std::env::var_os(env_var) {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("KILN_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
            cache.join("models").join(cache_name)
        }
    };
    if !path.is_file() {
        eprintln!("skipped: {} does not exist (set {env_var} to the model file)", path.display());
        return None;
    }
    Some(path)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dequant").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn open(path: &Path) -> GgufFile {
    GgufFile::open(path).unwrap_or_else(|e| panic!("{e}"))
}

fn tensor<'a>(f: &'a GgufFile, name: &str) -> &'a TensorInfo {
    f.tensor(name).unwrap_or_else(|| panic!("{}: no tensor {name}", f.path().display()))
}

/// Asserts that `fixture_name` starts with the first bytes of tensor `name`
/// (the fixture generator copied them from this file).
fn assert_fixture_is_prefix_of(f: &GgufFile, name: &str, fixture_name: &str, n_blocks: usize) {
    let t = tensor(f, name);
    let n = n_blocks * t.dtype.block_bytes() as usize;
    let fx = fixture(fixture_name);
    assert_eq!(&fx[..n], &f.tensor_data(t)[..n], "{fixture_name} vs {name}");
}

/// Dequantizes the first rows of every tensor: no errors, finite values.
fn dequantize_some_rows(f: &GgufFile) {
    for t in f.tensors() {
        let data = f.tensor_data(t);
        assert_eq!(data.len() as u64, t.nbytes, "{}", t.name);
        let row_elems = t.dims[0] as usize;
        let rb = t.dtype.row_bytes(t.dims[0]).unwrap_or_else(|| panic!("{}", t.name)) as usize;
        let mut out = vec![0.0f32; row_elems];
        for r in data.chunks(rb).take(2) {
            dequantize_row(t.dtype, r, &mut out).unwrap_or_else(|e| panic!("{}: {e}", t.name));
            assert!(out.iter().all(|v| v.is_finite()), "{}: non-finite weights", t.name);
        }
    }
}

fn count(f: &GgufFile, d: DType) -> usize {
    f.tensors().iter().filter(|t| t.dtype == d).count()
}

#[test]
fn smollm2_q4_1_opens_and_dequantizes() {
    let Some(path) = model_path("KILN_SMOLLM2_GGUF", "smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let f = open(&path);
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.get_str("general.architecture").ok(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count").ok(), Some(30));
    assert_eq!(f.get_u64("llama.embedding_length").ok(), Some(576));
    assert_eq!(f.get_u64("llama.attention.head_count").ok(), Some(9));
    assert_eq!(f.get_u64("llama.attention.head_count_kv").ok(), Some(3));
    assert!(f.get_f32("llama.attention.layer_norm_rms_epsilon").is_ok());
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.len(), 49152);
    let types = f.get_i32_array("tokenizer.ggml.token_type").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(types.len(), 49152);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!((count(&f, DType::Q4_1), count(&f, DType::F32), count(&f, DType::Q8_0)), (210, 61, 1));

    let embd = tensor(&f, "token_embd.weight");
    assert_eq!((embd.dtype, embd.dims.as_slice()), (DType::Q8_0, &[576u64, 49152][..]));
    let row_bytes = DType::Q8_0.row_bytes(576).unwrap_or_else(|| panic!("row bytes")) as usize;
    let mut row = vec![0.0f32; 576];
    dequantize_row(DType::Q8_0, &f.tensor_data(embd)[..row_bytes], &mut row).unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<f32> =
        fixture("smollm2_token_embd_row0.f32").as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect();
    assert_eq!(want.len(), 576);
    let same = row.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "token_embd.weight row 0 differs from gguf-py");

    assert_fixture_is_prefix_of(&f, "blk.0.attn_q.weight", "q4_1.bin", 16);
    assert_fixture_is_prefix_of(&f, "token_embd.weight", "q8_0.bin", 16);
    dequantize_some_rows(&f);
}

#[test]
fn qwen25_coder_q4_k_m_opens_and_dequantizes() {
    let Some(path) = model_path("KILN_QWEN05_GGUF", "qwen2.5-coder-0.5b.gguf") else {
        return;
    };
    let f = open(&path);
    assert_eq!(f.get_str("general.architecture").ok(), Some("qwen2"));
    assert_eq!(f.get_u64("qwen2.block_count").ok(), Some(24));
    assert_eq!(f.get_u64("qwen2.embedding_length").ok(), Some(896));
    assert_eq!(f.tensors().len(), 291);
    let counts = [DType::Q5_0, DType::F32, DType::Q8_0, DType::Q6K, DType::Q4K].map(|d| count(&f, d));
    assert_eq!(counts, [133, 121, 13, 12, 12]);
    assert_eq!(tensor(&f, "token_embd.weight").dims, [896, 151936]);

    assert_fixture_is_prefix_of(&f, "blk.0.ffn_gate.weight", "q5_0.bin", 16);
    assert_fixture_is_prefix_of(&f, "blk.2.ffn_down.weight", "q4_k.bin", 4);
    assert_fixture_is_prefix_of(&f, "blk.0.ffn_down.weight", "q6_k.bin", 4);
    dequantize_some_rows(&f);
}
