//! Steering directions from contrastive prompt pairs (`kiln steer compute`).
//!
//! Each pair (a positive and a negative prompt, e.g. the same question answered
//! verbosely and concisely) runs through the reference interpreter; the residual
//! stream after every layer is captured, reduced to one vector per prompt
//! (`positions`), and the per-pair differences `pos − neg` give each layer's
//! direction (`method`): their mean, or their first principal component
//! (uncentered, as llama.cpp's `cvector-generator`; its sign chosen so that the
//! positive prompts project higher). Directions are unit vectors named
//! `direction.N` for layer N, the layer whose output they were measured on and
//! are applied to.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_backends::reference::ReferenceBackend;
use kiln_backends::{Logits, Numerics, Session, SessionOptions};
use kiln_frontend::control_vector::ControlVector;
use serde::Serialize;

use crate::error::{RuntimeError, RuntimeResult};
use crate::model::Model;

/// How a layer's direction is derived from the paired differences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The mean difference, normalized.
    Mean,
    /// The first principal component of the differences (uncentered).
    Pca,
}

impl Method {
    pub fn from_name(s: &str) -> Option<Method> {
        match s {
            "mean" => Some(Method::Mean),
            "pca" => Some(Method::Pca),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Mean => "mean",
            Method::Pca => "pca",
        }
    }
}

/// Which token positions of a prompt stand for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// The last token.
    Last,
    /// The mean over the tokens after the pair's shared prefix (the part where
    /// the two prompts differ, e.g. the answers to the same question).
    Suffix,
}

impl Positions {
    pub fn from_name(s: &str) -> Option<Positions> {
        match s {
            "last" => Some(Positions::Last),
            "suffix" => Some(Positions::Suffix),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Positions::Last => "last",
            Positions::Suffix => "suffix",
        }
    }
}

/// Per-layer diagnostics of a computed direction.
#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub layer: usize,
    /// Norm of the mean difference (how far apart the two sets are along it).
    pub mean_diff_norm: f64,
    /// Fraction of pairs whose difference projects positively on the direction.
    pub agreement: f64,
}

/// What `kiln steer compute` made.
#[derive(Clone, Debug, Serialize)]
pub struct SteerSummary {
    pub pairs: usize,
    pub tokens: usize,
    pub method: Method,
    pub positions: Positions,
    pub layers: Vec<LayerStats>,
    pub seconds: f64,
}

/// Reads a prompt file: one prompt per line, empty lines skipped, escapes
/// `\n \r \t \\ \" \'` decoded (llama.cpp's `cvector-generator` convention).
pub fn read_prompts(path: &Path) -> RuntimeResult<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    let prompts: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(unescape).collect();
    if prompts.is_empty() {
        return Err(RuntimeError::bad(path, "no prompts (one prompt per line)"));
    }
    Ok(prompts)
}

fn unescape(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut it = line.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalize(v: &mut [f64]) -> f64 {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    n
}

/// The first principal component of `samples` (uncentered: the top eigenvector
/// of `Σ s sᵀ`), by power iteration from `start`.
fn first_component(samples: &[Vec<f64>], start: &[f64]) -> Vec<f64> {
    let mut v = start.to_vec();
    if normalize(&mut v) == 0.0 {
        v = samples.first().cloned().unwrap_or_default();
        normalize(&mut v);
    }
    for _ in 0..500 {
        let mut next = vec![0.0; v.len()];
        for s in samples {
            let c = dot(s, &v);
            next.iter_mut().zip(s).for_each(|(n, x)| *n += c * x);
        }
        if normalize(&mut next) == 0.0 {
            break;
        }
        let moved = 1.0 - dot(&next, &v).abs();
        v = next;
        if moved < 1e-12 {
            break;
        }
    }
    v
}

/// Computes one direction per layer from `positive[i]` vs `negative[i]`.
/// `on_pair(done, total)` reports progress.
pub fn compute(
    model: &Model,
    positive: &[String],
    negative: &[String],
    method: Method,
    positions: Positions,
    threads: usize,
    on_pair: &mut dyn FnMut(usize, usize),
) -> RuntimeResult<(ControlVector, SteerSummary)> {
    let t0 = std::time::Instant::now();
    if positive.len() != negative.len() || positive.is_empty() {
        return Err(RuntimeError::Invalid(format!(
            "need as many positive as negative prompts, and at least one pair (got {} and {})",
            positive.len(),
            negative.len()
        )));
    }
    let outs = kiln_ir::analysis::layer_outputs(&model.module).map_err(|e| {
        RuntimeError::Invalid(format!("{}: cannot find the layers to steer: {e}", model.path.display()))
    })?;
    let tokenize = |t: &String| model.tokenizer.encode(t, true);
    let pairs: Vec<(Vec<u32>, Vec<u32>)> =
        positive.iter().zip(negative).map(|(p, n)| Ok((tokenize(p)?, tokenize(n)?))).collect::<RuntimeResult<_>>()?;
    let longest = pairs.iter().map(|(p, n)| p.len().max(n.len())).max().unwrap_or(1);
    if longest > model.context_length() {
        return Err(RuntimeError::Invalid(format!(
            "a prompt has {longest} tokens, more than the model's context of {}",
            model.context_length()
        )));
    }
    let opts = SessionOptions { max_context: longest, threads, numerics: Numerics::Exact, ..Default::default() };
    let mut session = ReferenceBackend::new().prepare_session(model.module.clone(), model.weights.clone(), &opts)?;
    session.capture(&outs);
    let n_layers = outs.len();
    let mut samples: Vec<Vec<Vec<f64>>> = vec![Vec::with_capacity(pairs.len()); n_layers];
    let mut width = 0;
    let mut tokens = 0;
    for (i, (p, n)) in pairs.iter().enumerate() {
        if p == n {
            return Err(RuntimeError::Invalid(format!(
                "pair {}: the positive and negative prompts are the same",
                i + 1
            )));
        }
        let shared = p.iter().zip(n).take_while(|(a, b)| a == b).count();
        if positions == Positions::Suffix && (shared == p.len() || shared == n.len()) {
            return Err(RuntimeError::Invalid(format!(
                "pair {}: one prompt is a prefix of the other, so it has no differing suffix to average",
                i + 1
            )));
        }
        let mut reps: Vec<Vec<Vec<f64>>> = Vec::with_capacity(2);
        for toks in [p, n] {
            session.truncate(0);
            session.forward(toks, Logits::All)?;
            tokens += toks.len();
            let got = session.take_captured();
            let mut per_layer = Vec::with_capacity(n_layers);
            for v in &outs {
                let c =
                    got.get(v).ok_or_else(|| RuntimeError::Invalid(format!("layer output {v} was not captured")))?;
                width = c.cols;
                let rows = c.data.len() / c.cols.max(1);
                let range = match positions {
                    Positions::Last => rows - 1..rows,
                    Positions::Suffix => shared.saturating_sub(c.first)..rows,
                };
                let mut m = vec![0.0f64; c.cols];
                for r in range.clone() {
                    m.iter_mut().zip(&c.data[r * c.cols..(r + 1) * c.cols]).for_each(|(a, x)| *a += f64::from(*x));
                }
                let k = range.len().max(1) as f64;
                m.iter_mut().for_each(|a| *a /= k);
                per_layer.push(m);
            }
            reps.push(per_layer);
        }
        for (l, s) in samples.iter_mut().enumerate() {
            s.push(reps[0][l].iter().zip(&reps[1][l]).map(|(a, b)| a - b).collect());
        }
        on_pair(i + 1, pairs.len());
    }
    let mut cv = ControlVector { n_embd: width, ..Default::default() };
    let mut stats = Vec::with_capacity(n_layers);
    for (l, s) in samples.iter().enumerate() {
        let mut mean = vec![0.0f64; width];
        for d in s {
            mean.iter_mut().zip(d).for_each(|(m, x)| *m += x);
        }
        mean.iter_mut().for_each(|m| *m /= s.len() as f64);
        let mut dir = match method {
            Method::Mean => mean.clone(),
            Method::Pca => first_component(s, &mean),
        };
        let mean_norm = dot(&mean, &mean).sqrt();
        normalize(&mut dir);
        if dot(&dir, &mean) < 0.0 {
            dir.iter_mut().for_each(|x| *x = -*x);
        }
        let agreement = s.iter().filter(|d| dot(d, &dir) > 0.0).count() as f64 / s.len() as f64;
        stats.push(LayerStats { layer: l, mean_diff_norm: mean_norm, agreement });
        cv.layers.insert(l, dir.iter().map(|x| *x as f32).collect());
    }
    let file = model.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    cv.meta = BTreeMap::from([
        ("format".to_string(), "kiln-steer-1".to_string()),
        ("model".to_string(), file),
        ("model_hint".to_string(), model.module.meta_str("arch").unwrap_or("").to_string()),
        ("method".to_string(), method.name().to_string()),
        ("positions".to_string(), positions.name().to_string()),
        ("pairs".to_string(), pairs.len().to_string()),
        ("layer_stats".to_string(), serde_json::to_string(&stats).unwrap_or_default()),
    ]);
    let summary = SteerSummary {
        pairs: pairs.len(),
        tokens,
        method,
        positions,
        layers: stats,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((cv, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_follow_llama_cpp_prompt_files() {
        assert_eq!(unescape(r"a\nb\tc\\d\q"), "a\nb\tc\\d\\q");
        assert_eq!(unescape(r"end\"), "end\\");
    }

    #[test]
    fn power_iteration_finds_the_dominant_axis() {
        // Differences spread along (1, 1)/√2 with a little noise on the other axis.
        let s: Vec<Vec<f64>> =
            [(3.0, 3.1), (-2.0, -2.1), (1.0, 0.9), (4.0, 4.0)].iter().map(|&(a, b)| vec![a, b]).collect();
        let v = first_component(&s, &[1.0, 0.0]);
        assert!((v[0].abs() - v[1].abs()).abs() < 0.02, "{v:?}");
        assert!((dot(&v, &v) - 1.0).abs() < 1e-9);
    }
}
