//! Oracle debugging: kiln's llama.cpp-numerics matmul (`kiln_quant::ggml_dot`) of one GGUF
//! tensor against the output of `kiln-ggml-matmul` (tests/oracle/ggml_matmul.cpp) for the
//! same deterministic activations (tests/oracle/make_matmul_refs.py's), counting the outputs
//! that differ: `matmul_cmp MODEL.gguf TENSOR TOKENS Y.bin`.
use kiln_backends::quant::ggml_dot;

fn act(i: usize, t: usize) -> f32 {
    let v = (((i * 7919 + t * 104_729) % 2001) as f32 - 1000.0) / 250.0;
    if i.is_multiple_of(37) { v * 8.0 } else { v }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let f = kiln_frontend::gguf::GgufFile::open(std::path::Path::new(&a[1])).unwrap();
    let info = f.tensor(&a[2]).unwrap();
    let tokens: usize = a[3].parse().unwrap();
    let want: Vec<f32> =
        std::fs::read(&a[4]).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let (k, n) = (info.dims[0] as usize, info.dims[1] as usize);
    let data = f.tensor_data(info);
    let rb = data.len() / n;
    let mut bad = 0;
    let mut maxrel = 0f32;
    for t in 0..tokens {
        let x: Vec<f32> = (0..k).map(|i| act(i, t)).collect();
        let q = ggml_dot::quantize_for(info.dtype, &x).unwrap();
        let g = ggml_dot::RowGroup::of(t, tokens);
        for o in 0..n {
            let y = ggml_dot::dot(info.dtype, &data[o * rb..(o + 1) * rb], &q, g);
            let w = want[t * n + o];
            if y.to_bits() != w.to_bits() {
                if bad < 6 {
                    println!("t={t} o={o} kiln {y} ggml {w}");
                }
                bad += 1;
                maxrel = maxrel.max((y - w).abs() / w.abs().max(1e-6));
            }
        }
    }
    println!("{} {} T={tokens}: {bad}/{} differ, max rel {maxrel:.2e}", a[2], info.dtype, tokens * n);
}
