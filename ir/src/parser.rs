//! Parser for the textual IR. Errors carry line and column. Comments start with `;`.

use std::collections::HashMap;

use crate::entities::{ParamId, ValueId};
use crate::error::{IrError, IrResult};
use crate::module::{Inst, Meta, Module, Param};
use crate::ops::{Arg, Op};
use crate::printer::HEADER;
use crate::types::{DType, Dim, TensorType};

/// Largest accepted dimension or integer attribute (guards against absurd inputs).
const MAX_INT: u64 = 1 << 48;

struct Cursor<'a> {
    src: &'a str,
    pos: usize,
    line: usize,
    col: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> IrResult<T> {
        Err(IrError::Parse { line: self.line, col: self.col, msg: msg.into() })
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    /// Skips spaces, tabs and comments, not newlines.
    fn skip_inline(&mut self) {
        while let Some(c) = self.peek() {
            if c == ' ' || c == '\t' || c == '\r' {
                self.bump();
            } else if c == ';' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.bump();
                }
            } else {
                break;
            }
        }
    }

    /// Skips whitespace, comments and blank lines.
    fn skip_blank(&mut self) {
        loop {
            self.skip_inline();
            if self.peek() == Some('\n') {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn at_eof(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn end_line(&mut self) -> IrResult<()> {
        self.skip_inline();
        match self.peek() {
            None => Ok(()),
            Some('\n') => {
                self.bump();
                Ok(())
            }
            Some(c) => self.err(format!("unexpected `{c}` at end of line")),
        }
    }

    fn expect(&mut self, c: char) -> IrResult<()> {
        self.skip_inline();
        if self.peek() == Some(c) {
            self.bump();
            Ok(())
        } else {
            let found = self.peek().map(|c| format!("`{c}`")).unwrap_or_else(|| "end of input".into());
            self.err(format!("expected `{c}`, found {found}"))
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_inline();
        if self.peek() == Some(c) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> IrResult<&'a str> {
        self.skip_inline();
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+') {
                self.bump();
            } else {
                break;
            }
        }
        if start == self.pos {
            let found = self.peek().map(|c| format!("`{c}`")).unwrap_or_else(|| "end of input".into());
            return self.err(format!("expected a name or number, found {found}"));
        }
        Ok(&self.src[start..self.pos])
    }

    fn keyword(&mut self, kw: &str) -> IrResult<()> {
        let (line, col) = (self.line, self.col);
        let w = self.word()?;
        if w != kw {
            return Err(IrError::Parse { line, col, msg: format!("expected `{kw}`, found `{w}`") });
        }
        Ok(())
    }

    fn string(&mut self) -> IrResult<String> {
        self.skip_inline();
        if self.peek() != Some('"') {
            return self.err("expected a string in double quotes");
        }
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return self.err("unterminated string"),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        if self.bump() != Some('{') {
                            return self.err("expected `{` after \\u");
                        }
                        let mut hex = String::new();
                        loop {
                            match self.bump() {
                                Some('}') => break,
                                Some(c) if c.is_ascii_hexdigit() && hex.len() < 6 => hex.push(c),
                                _ => return self.err("bad \\u{...} escape"),
                            }
                        }
                        let c = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                        match c {
                            Some(c) => out.push(c),
                            None => return self.err("bad \\u{...} escape"),
                        }
                    }
                    _ => return self.err("unknown escape in string"),
                },
                Some(c) => out.push(c),
            }
        }
    }

    /// `@name` or `@"name"`.
    fn param_name(&mut self) -> IrResult<String> {
        self.expect('@')?;
        if self.peek() == Some('"') { self.string() } else { Ok(self.word()?.to_string()) }
    }

    /// `%name`.
    fn value_name(&mut self) -> IrResult<&'a str> {
        self.expect('%')?;
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                self.bump();
            } else {
                break;
            }
        }
        if start == self.pos {
            return self.err("expected a value name after `%`");
        }
        Ok(&self.src[start..self.pos])
    }
}

fn parse_int(c: &Cursor, w: &str) -> IrResult<u64> {
    match w.parse::<u64>() {
        Ok(n) if n <= MAX_INT => Ok(n),
        Ok(n) => c.err(format!("integer {n} is too large")),
        Err(_) => c.err(format!("expected an integer, found `{w}`")),
    }
}

fn looks_float(w: &str) -> bool {
    w.contains(['.', 'e', 'E']) || matches!(w, "inf" | "-inf" | "NaN")
}

struct Parser<'a> {
    c: Cursor<'a>,
    module: Module,
    values: HashMap<&'a str, ValueId>,
}

impl<'a> Parser<'a> {
    fn ty(&mut self) -> IrResult<TensorType> {
        self.c.skip_inline();
        let (line, col) = (self.c.line, self.c.col);
        let name = self.c.word()?;
        let dtype = DType::from_name(name).ok_or_else(|| IrError::Parse {
            line,
            col,
            msg: format!("unknown dtype `{name}`"),
        })?;
        self.c.expect('[')?;
        let mut shape = vec![];
        if !self.c.eat(']') {
            loop {
                let w = self.c.word()?;
                if w == "T" {
                    shape.push(Dim::Seq);
                } else {
                    shape.push(Dim::Fixed(parse_int(&self.c, w)?));
                }
                if shape.len() > 8 {
                    return self.c.err("more than 8 dimensions");
                }
                if self.c.eat(']') {
                    break;
                }
                self.c.expect(',')?;
            }
        }
        Ok(TensorType { dtype, shape })
    }

    fn param_ref(&mut self) -> IrResult<ParamId> {
        self.c.skip_inline();
        let (line, col) = (self.c.line, self.c.col);
        let name = self.c.param_name()?;
        self.module.param_by_name(&name).ok_or(IrError::Parse {
            line,
            col,
            msg: format!("undeclared parameter @{name}"),
        })
    }

    fn value_ref(&mut self) -> IrResult<ValueId> {
        self.c.skip_inline();
        let (line, col) = (self.c.line, self.c.col);
        let name = self.c.value_name()?;
        self.values.get(name).copied().ok_or(IrError::Parse {
            line,
            col,
            msg: format!("value %{name} is used before it is defined"),
        })
    }

    fn arg(&mut self) -> IrResult<Arg> {
        self.c.skip_inline();
        match self.c.peek() {
            Some('%') => Ok(Arg::Value(self.value_ref()?)),
            Some('@') => Ok(Arg::Param(self.param_ref()?)),
            _ => {
                let w = self.c.word()?;
                let first = w.chars().next().unwrap_or(' ');
                if first.is_ascii_digit() || first == '-' || first == '+' || matches!(w, "inf" | "NaN") {
                    if looks_float(w) {
                        match w.parse::<f32>() {
                            Ok(x) => Ok(Arg::Float(x)),
                            Err(_) => self.c.err(format!("bad number `{w}`")),
                        }
                    } else {
                        Ok(Arg::Int(parse_int(&self.c, w)?))
                    }
                } else {
                    Ok(Arg::Ident(w.to_string()))
                }
            }
        }
    }

    fn meta_value(&mut self) -> IrResult<Meta> {
        self.c.skip_inline();
        if self.c.peek() == Some('"') {
            return Ok(Meta::Str(self.c.string()?));
        }
        let w = self.c.word()?;
        match w {
            "true" => Ok(Meta::Bool(true)),
            "false" => Ok(Meta::Bool(false)),
            _ if looks_float(w) => match w.parse::<f64>() {
                Ok(x) => Ok(Meta::Float(x)),
                Err(_) => self.c.err(format!("bad number `{w}`")),
            },
            _ => match w.parse::<i64>() {
                Ok(n) => Ok(Meta::Int(n)),
                Err(_) => self.c.err(format!("bad metadata value `{w}`")),
            },
        }
    }

    fn inst(&mut self) -> IrResult<()> {
        let (line, col) = (self.c.line, self.c.col);
        let name = self.c.value_name()?;
        if self.values.contains_key(name) {
            return Err(IrError::Parse { line, col, msg: format!("value %{name} is defined twice") });
        }
        self.c.expect('=')?;
        self.c.skip_inline();
        let (oline, ocol) = (self.c.line, self.c.col);
        let opname = self.c.word()?;
        let mut pos = vec![];
        let mut kw: Vec<(String, Arg)> = vec![];
        self.c.skip_inline();
        if self.c.peek() != Some(':') {
            loop {
                self.c.skip_inline();
                let save = (self.c.pos, self.c.line, self.c.col);
                // keyword argument: name '=' arg
                let is_kw = matches!(self.c.peek(), Some(c) if c.is_ascii_alphabetic()) && {
                    let _ = self.c.word();
                    self.c.skip_inline();
                    self.c.peek() == Some('=')
                };
                (self.c.pos, self.c.line, self.c.col) = save;
                if is_kw {
                    let key = self.c.word()?.to_string();
                    self.c.expect('=')?;
                    if kw.iter().any(|(k, _)| *k == key) {
                        return self.c.err(format!("attribute `{key}` given twice"));
                    }
                    let a = self.arg()?;
                    kw.push((key, a));
                } else {
                    if !kw.is_empty() {
                        return self.c.err("positional operand after a keyword attribute");
                    }
                    pos.push(self.arg()?);
                }
                if !self.c.eat(',') {
                    break;
                }
            }
        }
        let op = Op::from_form(opname, pos, kw).map_err(|msg| IrError::Parse { line: oline, col: ocol, msg })?;
        self.c.expect(':')?;
        let ty = self.ty()?;
        self.c.end_line()?;
        let id = ValueId(self.module.insts.len() as u32);
        self.values.insert(name, id);
        self.module.insts.push(Inst { op, ty });
        Ok(())
    }

    fn run(mut self) -> IrResult<Module> {
        self.c.skip_blank();
        let header_end = self.c.src[self.c.pos..].find('\n').map(|i| self.c.pos + i).unwrap_or(self.c.src.len());
        let header = self.c.src[self.c.pos..header_end].trim_end();
        if header != HEADER {
            return self.c.err(format!("expected header `{HEADER}`"));
        }
        while self.c.pos < header_end {
            self.c.bump();
        }
        self.c.end_line()?;
        self.c.skip_blank();
        self.c.keyword("module")?;
        self.module.name = self.c.string()?;
        self.c.end_line()?;
        loop {
            self.c.skip_blank();
            if self.c.at_eof() {
                break;
            }
            let (line, col) = (self.c.line, self.c.col);
            if self.c.peek() == Some('%') {
                self.inst()?;
                continue;
            }
            let w = self.c.word()?;
            match w {
                "meta" => {
                    if !self.module.insts.is_empty() {
                        return Err(IrError::Parse { line, col, msg: "meta after the first instruction".into() });
                    }
                    self.c.skip_inline();
                    let key = if self.c.peek() == Some('"') { self.c.string()? } else { self.c.word()?.to_string() };
                    self.c.expect('=')?;
                    let v = self.meta_value()?;
                    if self.module.meta.insert(key.clone(), v).is_some() {
                        return Err(IrError::Parse { line, col, msg: format!("meta `{key}` given twice") });
                    }
                    self.c.end_line()?;
                }
                "param" => {
                    if !self.module.insts.is_empty() {
                        return Err(IrError::Parse { line, col, msg: "param after the first instruction".into() });
                    }
                    let name = self.c.param_name()?;
                    self.c.expect(':')?;
                    let ty = self.ty()?;
                    if self.module.param_by_name(&name).is_some() {
                        return Err(IrError::Parse { line, col, msg: format!("parameter @{name} declared twice") });
                    }
                    self.module.params.push(Param { name, ty });
                    self.c.end_line()?;
                }
                "output" => {
                    if self.module.output.is_some() {
                        return Err(IrError::Parse { line, col, msg: "second `output`".into() });
                    }
                    self.module.output = Some(self.value_ref()?);
                    self.c.end_line()?;
                }
                other => {
                    return Err(IrError::Parse {
                        line,
                        col,
                        msg: format!("expected `meta`, `param`, `%N = ...` or `output`, found `{other}`"),
                    });
                }
            }
        }
        Ok(self.module)
    }
}

/// Parses textual IR. Types are taken as written; run the verifier to check them.
pub fn parse(src: &str) -> IrResult<Module> {
    let p = Parser { c: Cursor { src, pos: 0, line: 1, col: 1 }, module: Module::default(), values: HashMap::new() };
    p.run()
}
