//! `steer`: activation steering compiled into the graph. Reads per-layer
//! directions (`kiln steer compute`'s safetensors, or a llama.cpp control-vector
//! GGUF), and after the output of each chosen layer inserts a `steer` op:
//! `y = x + s·d` (add) or `y = x − s·d·(d·x)` (project, `d` normalized here).
//!
//! ```yaml
//! - steer: { vector: verbosity.safetensors, layers: 10..20, strength: -4.0, mode: add, name: verbosity }
//! ```
//! `layers`: `a..b` (b excluded), `a..=b`, a list, or `all` (the default: every
//! layer the file has a direction for). `mode` defaults to `add`, `name` to the
//! file's stem; a session can override the strength by name (`kiln run --steer`).

use std::path::{Path, PathBuf};

use kiln_frontend::Weights;
use kiln_frontend::control_vector::ControlVector;
use kiln_frontend::weights::TensorBytes;
use kiln_ir::{Module, Op, SteerAttrs, SteerMode, TensorType, ValueId, is_steer_name};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Pass, PassCtx, PassError, PassReport};

pub struct Steer;

const NAME: &str = "steer";

fn bad(msg: impl Into<String>) -> PassError {
    PassError::BadOptions { pass: NAME, msg: msg.into() }
}

/// Which layers a recipe names.
#[derive(Clone, Debug, PartialEq)]
enum Layers {
    All,
    List(Vec<usize>),
}

#[derive(Clone, Debug)]
struct Options {
    vector: PathBuf,
    layers: Layers,
    strength: f32,
    mode: SteerMode,
    name: Option<String>,
}

fn parse_range(s: &str) -> Result<Vec<usize>, PassError> {
    let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad(format!("layers `{s}`: `{t}` is not a layer index")));
    if s.trim() == "all" {
        return Err(bad("internal: `all` is not a range"));
    }
    let (a, b, inclusive) = if let Some((a, b)) = s.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = s.split_once("..") {
        (a, b, false)
    } else {
        let n = num(s)?;
        return Ok(vec![n]);
    };
    let (a, b) = (num(a)?, num(b)?);
    let end = if inclusive { b + 1 } else { b };
    if end <= a {
        return Err(bad(format!("layers `{s}` is empty")));
    }
    Ok((a..end).collect())
}

fn parse(options: &Value) -> Result<Options, PassError> {
    let o = options.as_object().ok_or_else(|| bad("expects a map: { vector, strength, layers?, mode?, name? }"))?;
    for k in o.keys() {
        if !matches!(k.as_str(), "vector" | "layers" | "strength" | "mode" | "name") {
            return Err(bad(format!("unknown option `{k}` (vector, layers, strength, mode, name)")));
        }
    }
    let vector = o.get("vector").and_then(Value::as_str).ok_or_else(|| bad("needs `vector: FILE`"))?;
    let strength = o.get("strength").and_then(Value::as_f64).ok_or_else(|| bad("needs a numeric `strength`"))? as f32;
    if !strength.is_finite() {
        return Err(bad("`strength` must be finite"));
    }
    let mode = match o.get("mode") {
        None => SteerMode::Add,
        Some(Value::String(m)) => {
            SteerMode::from_name(m).ok_or_else(|| bad(format!("mode `{m}`: expected `add` or `project`")))?
        }
        Some(other) => return Err(bad(format!("mode must be `add` or `project`, found {other}"))),
    };
    let layers = match o.get("layers") {
        None => Layers::All,
        Some(Value::String(s)) if s.trim() == "all" => Layers::All,
        Some(Value::String(s)) => Layers::List(parse_range(s)?),
        Some(Value::Number(n)) => {
            Layers::List(vec![n.as_u64().ok_or_else(|| bad(format!("layer {n} is not a layer index")))? as usize])
        }
        Some(Value::Array(a)) => Layers::List(
            a.iter()
                .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("layer {v} is not a layer index"))))
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => return Err(bad(format!("layers must be `a..b`, `a..=b`, a list or `all`, found {other}"))),
    };
    let name = match o.get("name") {
        None => None,
        Some(Value::String(n)) if is_steer_name(n) => Some(n.clone()),
        Some(other) => return Err(bad(format!("name {other} must be a lowercase letter then [a-z0-9_]"))),
    };
    Ok(Options { vector: PathBuf::from(vector), layers, strength, mode, name })
}

/// A steering name from a file name: `verbosity.safetensors` → `verbosity`.
fn name_from_file(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
    let mut n: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(60).collect();
    if !n.starts_with(|c: char| c.is_ascii_lowercase()) {
        n.insert(0, 's');
    }
    n
}

/// Rebuilds `m`'s instructions with `make(x)` inserted right after each value in
/// `after` (in order), every later use of that value reading the new one instead.
fn insert_after(m: &mut Module, after: &[(ValueId, Op)]) -> Result<Vec<ValueId>, kiln_ir::IrError> {
    let old = std::mem::take(&mut m.insts);
    let mut remap: Vec<ValueId> = Vec::with_capacity(old.len());
    let mut inserted = Vec::new();
    for (i, inst) in old.into_iter().enumerate() {
        let mut op = inst.op;
        op.map_values(|v| remap[v.index()]);
        let mut new = m.push(op)?;
        if let Some((_, steer)) = after.iter().find(|(v, _)| v.index() == i) {
            let mut steer = steer.clone();
            steer.map_values(|_| new);
            new = m.push(steer)?;
            inserted.push(new);
        }
        remap.push(new);
    }
    m.output = m.output.map(|v| remap[v.index()]);
    Ok(inserted)
}

impl Pass for Steer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn summary(&self) -> &'static str {
        "insert activation steering (add or project a direction) after chosen layers"
    }

    fn check_options(&self, options: &Value) -> Result<(), PassError> {
        parse(options).map(|_| ())
    }

    fn run(&self, m: &mut Module, w: &mut Weights, ctx: &PassCtx) -> Result<PassReport, PassError> {
        let o = parse(ctx.options)?;
        let unsupported = |msg: String| PassError::Unsupported { pass: NAME, msg };
        let outs = kiln_ir::analysis::layer_outputs(m).map_err(unsupported)?;
        let path = ctx.base_dir.join(&o.vector);
        let input = |msg: String| PassError::Input { pass: NAME, msg };
        let bytes = std::fs::read(&path).map_err(|e| input(format!("{}: {e}", path.display())))?;
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        let cv = ControlVector::from_bytes(&path, bytes).map_err(|e| input(e.to_string()))?;
        let name = o.name.clone().unwrap_or_else(|| name_from_file(&o.vector));
        if m.insts.iter().any(|i| matches!(&i.op, Op::Steer { attrs, .. } if attrs.name == name)) {
            return Err(bad(format!("the module already has a steering named `{name}`: give this one another `name`")));
        }
        let width = m.value_type(outs[0]).last_fixed().unwrap_or(0) as usize;
        if cv.n_embd != width {
            return Err(input(format!(
                "{}: directions have {} elements, the model's residual stream {width}",
                path.display(),
                cv.n_embd
            )));
        }
        let layers = match &o.layers {
            Layers::All => cv.layers.keys().copied().collect::<Vec<_>>(),
            Layers::List(l) => l.clone(),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut points = Vec::new();
        let mut norms = Vec::new();
        for &l in &layers {
            if l >= outs.len() {
                return Err(bad(format!("layer {l} does not exist (the model has {} layers)", outs.len())));
            }
            if !seen.insert(l) {
                return Err(bad(format!("layer {l} is named twice")));
            }
            let mut d =
                cv.layers.get(&l).cloned().ok_or_else(|| {
                    input(format!("{}: has no direction for layer {l} (direction.{l})", path.display()))
                })?;
            let norm = d.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
            if o.mode == SteerMode::Project {
                if norm == 0.0 {
                    return Err(input(format!(
                        "{}: direction.{l} is zero and cannot be projected out",
                        path.display()
                    )));
                }
                d.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
            }
            norms.push(norm);
            let pname = format!("steer.{name}.{l}");
            let dir = m
                .add_param(pname, TensorType::fixed(kiln_ir::DType::F32, &[width as u64]))
                .map_err(|e| bad(e.to_string()))?;
            w.tensors.push(TensorBytes::from_f32(&d));
            let attrs = SteerAttrs { mode: o.mode, strength: o.strength, name: name.clone() };
            points.push((outs[l], Op::Steer { x: outs[l], dir, attrs }));
        }
        points.sort_by_key(|(v, _)| *v);
        insert_after(m, &points).map_err(|e| PassError::Broken { pass: NAME.into(), err: e })?;
        Ok(PassReport {
            pass: NAME.into(),
            summary: format!(
                "`{name}`: {} {} at {} layer(s) ({}), strength {}",
                o.mode.name(),
                o.vector.display(),
                seen.len(),
                compact(&seen.iter().copied().collect::<Vec<_>>()),
                o.strength
            ),
            details: json!({
                "name": name,
                "mode": o.mode.name(),
                "strength": o.strength,
                "layers": seen.iter().collect::<Vec<_>>(),
                "vector": o.vector.display().to_string(),
                "vector_sha256": sha,
                "direction_norms": norms,
            }),
        })
    }
}

/// `[1, 2, 3, 7]` → `1..=3, 7`.
fn compact(ls: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ls.len() {
        let mut j = i;
        while j + 1 < ls.len() && ls[j + 1] == ls[j] + 1 {
            j += 1;
        }
        parts.push(if j > i { format!("{}..={}", ls[i], ls[j]) } else { ls[i].to_string() });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_names() {
        assert_eq!(parse_range("10..13").unwrap(), vec![10, 11, 12]);
        assert_eq!(parse_range("10..=12").unwrap(), vec![10, 11, 12]);
        assert_eq!(parse_range("4").unwrap(), vec![4]);
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("a..3").is_err());
        assert_eq!(name_from_file(Path::new("dir/Verbosity-v2.safetensors")), "verbosity_v2");
        assert_eq!(name_from_file(Path::new("2x.gguf")), "s2x");
        assert_eq!(compact(&[1, 2, 3, 7, 9, 10]), "1..=3, 7, 9..=10");
    }

    #[test]
    fn options_are_checked() {
        let ok = json!({"vector": "v.safetensors", "strength": -4, "layers": "10..20", "mode": "project"});
        let o = parse(&ok).unwrap();
        assert_eq!(o.mode, SteerMode::Project);
        assert_eq!(o.layers, Layers::List((10..20).collect()));
        for badopt in [
            json!({"strength": 1}),
            json!({"vector": "v", "strength": "x"}),
            json!({"vector": "v", "strength": 1, "mode": "mul"}),
            json!({"vector": "v", "strength": 1, "layers": "3..1"}),
            json!({"vector": "v", "strength": 1, "name": "Bad Name"}),
            json!({"vector": "v", "strength": 1, "extra": 1}),
        ] {
            assert!(parse(&badopt).is_err(), "{badopt} should be refused");
        }
    }
}
