//! Oracle debugging: a greedy continuation in llama.cpp-compatible numerics, printing the top
//! two (id, logit) per step as `kiln-greedy-ids --top 2` reports them:
//! `greedy_top MODEL PROMPT STEPS [BACKEND]`.
use std::path::Path;

use kiln_backends::{Logits, Numerics};
use kiln_runtime::model::Model;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut model = Model::load(Path::new(&a[1])).unwrap();
    model.backend = a.get(4).cloned().unwrap_or("reference".into());
    let n: usize = a[3].parse().unwrap();
    let ids = model.tokenizer.encode(&a[2], true).unwrap();
    let mut s = model.session_with(ids.len() + n + 1, 0, Numerics::Ggml).unwrap();
    let mut logits = s.forward(&ids, Logits::Last).unwrap();
    for step in 0..n {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
        println!("{step} {} {:.6} {} {:.6}", idx[0], logits[idx[0]], idx[1], logits[idx[1]]);
        logits = s.forward(&[idx[0] as u32], Logits::Last).unwrap();
    }
}
