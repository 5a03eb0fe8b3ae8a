//! Printer for the textual IR. `parse(print(m)) == m` and `print(parse(t)) == t`
//! for printed text.

use std::fmt::Write;

use crate::module::{Meta, Module};
use crate::ops::Arg;

/// The first line of every module.
pub const HEADER: &str = "kiln-ir 1";

pub(crate) fn is_bare_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn param_ref(name: &str) -> String {
    if is_bare_name(name) { format!("@{name}") } else { format!("@{}", quote(name)) }
}

fn meta_text(m: &Meta) -> String {
    match m {
        Meta::Int(n) => n.to_string(),
        Meta::Float(x) => {
            let s = format!("{x:?}");
            if s.contains(['.', 'e', 'N', 'i']) { s } else { format!("{s}.0") }
        }
        Meta::Str(s) => quote(s),
        Meta::Bool(b) => b.to_string(),
    }
}

fn arg_text(m: &Module, a: &Arg) -> String {
    match a {
        Arg::Value(v) => v.to_string(),
        Arg::Param(p) => match m.params.get(p.index()) {
            Some(param) => param_ref(&param.name),
            None => format!("@#{}", p.0),
        },
        Arg::Int(n) => n.to_string(),
        Arg::Float(x) => format!("{x:?}"),
        Arg::Ident(s) => s.clone(),
    }
}

/// Prints a module in its canonical textual form.
pub fn print(m: &Module) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{HEADER}");
    let _ = writeln!(out, "module {}", quote(&m.name));
    for (k, v) in &m.meta {
        let key = if is_bare_name(k) { k.clone() } else { quote(k) };
        let _ = writeln!(out, "meta {key} = {}", meta_text(v));
    }
    for p in &m.params {
        let _ = writeln!(out, "param {} : {}", param_ref(&p.name), p.ty);
    }
    for (i, inst) in m.insts.iter().enumerate() {
        let form = inst.op.to_form();
        let mut args: Vec<String> = form.pos.iter().map(|a| arg_text(m, a)).collect();
        args.extend(form.kw.iter().map(|(k, a)| format!("{k}={}", arg_text(m, a))));
        let _ = write!(out, "%{i} = {}", form.name);
        if !args.is_empty() {
            let _ = write!(out, " {}", args.join(", "));
        }
        let _ = writeln!(out, " : {}", inst.ty);
    }
    if let Some(o) = m.output {
        let _ = writeln!(out, "output {o}");
    }
    out
}
