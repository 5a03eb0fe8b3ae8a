//! Grammar-constrained decoding: generation that can only produce JSON valid against a
//! JSON schema, e.g. a function call against a tool schema (what a watch assistant emits).
//!
//! A schema compiles to a small grammar ([`Grammar`]); a [`Matcher`] is the set of parse
//! stacks that the text so far leaves open (a schema has choices: optional properties,
//! `anyOf`, array lengths, the end of a number). At each step the decoder walks the
//! candidate tokens from the most likely down and takes the first (greedy) or the best few
//! (sampling) whose text the matcher accepts; the end-of-sequence token is allowed only
//! when the value is complete, and generation stops as soon as nothing more can follow.
//! Works on every backend: it only needs the logits row.
//!
//! Supported schema keywords: `type` (object, string, integer, number, boolean, null,
//! array; or a list of them), `properties`, `required`, `enum`, `const`, `anyOf`/`oneOf`,
//! `items`, `minItems`/`maxItems`, `minLength`/`maxLength`, and `description`/`title`/
//! `default`/`$schema`/`additionalProperties`/`format` (read and ignored: only the listed
//! properties are generated, in their order). Anything else is refused by name.

use std::collections::HashSet;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{RuntimeError, RuntimeResult};
use crate::tokenizer::Tokenizer;

/// Longest string generated where the schema sets no `maxLength`.
pub const DEFAULT_MAX_STRING: usize = 64;
/// Most array items generated where the schema sets no `maxItems`.
pub const DEFAULT_MAX_ITEMS: usize = 8;
/// Digits of an integer part, and of a fraction.
const MAX_INT_DIGITS: u8 = 12;
const MAX_FRAC_DIGITS: u8 = 6;
/// Open parse stacks kept (choices that share a prefix), and expansions tried per character;
/// beyond either, the remaining choices are dropped (a schema nesting `anyOf`s ever deeper
/// cannot make a step slow).
const MAX_ALTS: usize = 256;
const MAX_SETTLE_STEPS: usize = 20_000;

#[derive(Clone, Debug)]
enum Node {
    Object(Vec<Prop>),
    Str { min: usize, max: usize },
    Int,
    Num,
    Lit(u32),
    Array { items: u32, min: usize, max: usize },
    AnyOf(Vec<u32>),
}

#[derive(Clone, Debug)]
struct Prop {
    /// `"key":` as a literal.
    key: u32,
    node: u32,
    required: bool,
}

/// A JSON document with object keys in document order (a schema's `properties` order is
/// the order the model writes them in; `serde_json::Value` would sort them).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
        serde_json::from_str(text)
    }
    fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(key, _)| key == k).map(|(_, v)| v),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(v) => Some(v),
            _ => None,
        }
    }
    fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.as_u64(),
            _ => None,
        }
    }
    /// Compact JSON text.
    fn text(&self) -> String {
        match self {
            Json::Null => "null".into(),
            Json::Bool(b) => b.to_string(),
            Json::Num(n) => n.to_string(),
            Json::Str(s) => serde_json::Value::String(s.clone()).to_string(),
            Json::Arr(v) => format!("[{}]", v.iter().map(Json::text).collect::<Vec<_>>().join(",")),
            Json::Obj(m) => format!(
                "{{{}}}",
                m.iter()
                    .map(|(k, v)| format!("{}:{}", Json::Str(k.clone()).text(), v.text()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n).map(Json::Num).ok_or_else(|| E::custom("a non-finite number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = vec![];
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Arr(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v: Vec<(String, Json)> = vec![];
                while let Some((k, x)) = a.next_entry::<String, Json>()? {
                    v.retain(|(key, _)| *key != k);
                    v.push((k, x));
                }
                Ok(Json::Obj(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A compiled schema.
#[derive(Clone, Debug)]
pub struct Grammar {
    nodes: Vec<Node>,
    texts: Vec<Vec<char>>,
    root: u32,
}

const T_OPEN: u32 = 0;
const T_CLOSE: u32 = 1;
const T_COMMA: u32 = 2;
const T_SPACE: u32 = 3;
const T_LBRACK: u32 = 4;
const T_RBRACK: u32 = 5;
const T_QUOTE: u32 = 6;

impl Grammar {
    /// Compiles a JSON schema given as text. `origin` names it in errors.
    pub fn from_schema_text(text: &str, origin: &str) -> RuntimeResult<Grammar> {
        let j = Json::parse(text).map_err(|e| RuntimeError::Invalid(format!("{origin}: not JSON: {e}")))?;
        Grammar::from_schema(&j, origin)
    }

    /// Compiles a function-call grammar from a tool list given as text.
    pub fn function_call_text(text: &str, origin: &str) -> RuntimeResult<Grammar> {
        let j = Json::parse(text).map_err(|e| RuntimeError::Invalid(format!("{origin}: not JSON: {e}")))?;
        Grammar::function_call(&j, origin)
    }

    /// Compiles a JSON schema. `origin` names it in errors.
    pub fn from_schema(schema: &Json, origin: &str) -> RuntimeResult<Grammar> {
        let mut g = Grammar { nodes: vec![], texts: vec![], root: 0 };
        for t in ["{", "}", ",", " ", "[", "]", "\""] {
            g.text(t);
        }
        g.root = g.node(schema, origin, "$")?;
        Ok(g)
    }

    /// The grammar of one function call against a list of tools (OpenAI-style
    /// `{"name", "description", "parameters"}` objects, optionally wrapped as
    /// `{"type": "function", "function": {...}}`): `{"name": "<tool>", "arguments": {...}}`.
    pub fn function_call(tools: &Json, origin: &str) -> RuntimeResult<Grammar> {
        let list = match tools {
            Json::Arr(v) => v.clone(),
            Json::Obj(_) => vec![tools.clone()],
            _ => return Err(bad(origin, "$", "a tool list must be an array of tool objects")),
        };
        if list.is_empty() {
            return Err(bad(origin, "$", "the tool list is empty"));
        }
        let str_ = |s: &str| Json::Str(s.to_string());
        let mut calls = vec![];
        for (i, t) in list.iter().enumerate() {
            let t = t.get("function").unwrap_or(t);
            let name = t
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| bad(origin, &format!("$[{i}]"), "a tool has no `name`"))?;
            let params = t
                .get("parameters")
                .cloned()
                .unwrap_or(Json::Obj(vec![("type".into(), str_("object")), ("properties".into(), Json::Obj(vec![]))]));
            calls.push(Json::Obj(vec![
                ("type".into(), str_("object")),
                (
                    "properties".into(),
                    Json::Obj(vec![
                        ("name".into(), Json::Obj(vec![("const".into(), str_(name))])),
                        ("arguments".into(), params),
                    ]),
                ),
                ("required".into(), Json::Arr(vec![str_("name"), str_("arguments")])),
            ]));
        }
        Grammar::from_schema(&Json::Obj(vec![("anyOf".into(), Json::Arr(calls))]), origin)
    }

    fn text(&mut self, t: &str) -> u32 {
        let chars: Vec<char> = t.chars().collect();
        if let Some(i) = self.texts.iter().position(|x| *x == chars) {
            return i as u32;
        }
        self.texts.push(chars);
        (self.texts.len() - 1) as u32
    }

    fn push(&mut self, n: Node) -> u32 {
        self.nodes.push(n);
        (self.nodes.len() - 1) as u32
    }

    fn lit_value(&mut self, v: &Json) -> u32 {
        let t = self.text(&v.text());
        self.push(Node::Lit(t))
    }

    fn node(&mut self, s: &Json, origin: &str, at: &str) -> RuntimeResult<u32> {
        let o = match s {
            Json::Obj(o) if !o.is_empty() => o,
            Json::Obj(_) | Json::Bool(true) => {
                return Err(bad(origin, at, "an unconstrained value (give it a `type`)"));
            }
            _ => return Err(bad(origin, at, "a schema must be an object")),
        };
        const KNOWN: &[&str] = &[
            "type",
            "properties",
            "required",
            "enum",
            "const",
            "anyOf",
            "oneOf",
            "items",
            "minItems",
            "maxItems",
            "minLength",
            "maxLength",
            "description",
            "title",
            "default",
            "$schema",
            "additionalProperties",
            "format",
            "examples",
        ];
        if let Some((k, _)) = o.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
            return Err(bad(origin, at, &format!("schema keyword `{k}` is not supported")));
        }
        if let Some(c) = s.get("const") {
            return Ok(self.lit_value(c));
        }
        if let Some(e) = s.get("enum") {
            let opts = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad(origin, at, "`enum` must be a non-empty array"))?;
            let alts = opts.iter().map(|v| self.lit_value(v)).collect();
            return Ok(self.push(Node::AnyOf(alts)));
        }
        if let Some(any) = s.get("anyOf").or_else(|| s.get("oneOf")) {
            let list = any
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad(origin, at, "`anyOf` must be a non-empty array"))?;
            let mut alts = vec![];
            for (i, x) in list.iter().enumerate() {
                alts.push(self.node(x, origin, &format!("{at}.anyOf[{i}]"))?);
            }
            return Ok(self.push(Node::AnyOf(alts)));
        }
        let uint = |k: &str, d: usize| -> RuntimeResult<usize> {
            match s.get(k) {
                None => Ok(d),
                Some(v) => {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| bad(origin, at, &format!("`{k}` must be a count")))
                }
            }
        };
        let ty = s.get("type").ok_or_else(|| bad(origin, at, "no `type`, `enum`, `const` or `anyOf`"))?;
        if let Some(list) = ty.as_array() {
            let mut alts = vec![];
            for t in list {
                let one: Vec<(String, Json)> =
                    o.iter().map(|(k, v)| (k.clone(), if k == "type" { t.clone() } else { v.clone() })).collect();
                alts.push(self.node(&Json::Obj(one), origin, at)?);
            }
            return Ok(self.push(Node::AnyOf(alts)));
        }
        match ty.as_str().unwrap_or("") {
            "object" => {
                let required: Vec<&str> = s
                    .get("required")
                    .and_then(Json::as_array)
                    .map(|r| r.iter().filter_map(Json::as_str).collect())
                    .unwrap_or_default();
                let mut props = vec![];
                let mut names = vec![];
                if let Some(p) = s.get("properties") {
                    let Json::Obj(p) = p else { return Err(bad(origin, at, "`properties` must be an object")) };
                    for (k, v) in p {
                        let node = self.node(v, origin, &format!("{at}.{k}"))?;
                        let key = self.text(&format!("{}:", Json::Str(k.clone()).text()));
                        props.push(Prop { key, node, required: required.contains(&k.as_str()) });
                        names.push(k.as_str());
                    }
                }
                if let Some(r) = required.iter().find(|r| !names.contains(r)) {
                    return Err(bad(origin, at, &format!("required property `{r}` is not in `properties`")));
                }
                Ok(self.push(Node::Object(props)))
            }
            "string" => {
                let (min, max) = (uint("minLength", 0)?, uint("maxLength", DEFAULT_MAX_STRING)?);
                if min > max {
                    return Err(bad(origin, at, "minLength > maxLength"));
                }
                Ok(self.push(Node::Str { min, max }))
            }
            "integer" => Ok(self.push(Node::Int)),
            "number" => Ok(self.push(Node::Num)),
            "boolean" => {
                let (t, f) = (self.lit_value(&Json::Bool(true)), self.lit_value(&Json::Bool(false)));
                Ok(self.push(Node::AnyOf(vec![t, f])))
            }
            "null" => Ok(self.lit_value(&Json::Null)),
            "array" => {
                let items = s.get("items").ok_or_else(|| bad(origin, at, "an array needs `items`"))?;
                let items = self.node(items, origin, &format!("{at}[]"))?;
                let (min, max) = (uint("minItems", 0)?, uint("maxItems", DEFAULT_MAX_ITEMS)?);
                if min > max {
                    return Err(bad(origin, at, "minItems > maxItems"));
                }
                Ok(self.push(Node::Array { items, min, max }))
            }
            other => Err(bad(origin, at, &format!("type `{other}` is not supported"))),
        }
    }

    /// A matcher at the start of the value.
    pub fn start(&self) -> Matcher<'_> {
        let mut m = Matcher { g: self, alts: vec![] };
        m.alts = m.settle(vec![vec![Item::Value(self.root)]]);
        m
    }
}

fn bad(origin: &str, at: &str, msg: &str) -> RuntimeError {
    RuntimeError::Invalid(format!("{origin}: at {at}: {msg}"))
}

/// One entry of a parse stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Item {
    Value(u32),
    Lit { t: u32, pos: u16 },
    Props { obj: u32, next: u16, any: bool },
    Str { node: u32, len: u16, esc: u8 },
    Num { int_only: bool, st: u8, digits: u8 },
    Arr { node: u32, count: u16 },
    Ws,
}

/// The parse stacks the text so far leaves open.
#[derive(Clone, Debug)]
pub struct Matcher<'g> {
    g: &'g Grammar,
    /// Each stack has its top last; an empty stack means the value is complete.
    alts: Vec<Vec<Item>>,
}

impl<'g> Matcher<'g> {
    /// Whether the text so far is a complete value.
    pub fn is_complete(&self) -> bool {
        self.alts.iter().any(Vec::is_empty)
    }

    /// Whether any character may follow.
    pub fn can_continue(&self) -> bool {
        self.alts.iter().any(|a| !a.is_empty())
    }

    /// The matcher after `s`, or `None` when `s` cannot continue the text.
    pub fn feed_str(&self, s: &str) -> Option<Matcher<'g>> {
        let mut m = self.clone();
        for c in s.chars() {
            m = m.feed(c)?;
        }
        Some(m)
    }

    /// The matcher after one character.
    pub fn feed(&self, c: char) -> Option<Matcher<'g>> {
        let mut next = vec![];
        for alt in &self.alts {
            let Some(top) = alt.last() else { continue };
            let mut a = alt.clone();
            let ok = match *top {
                Item::Lit { t, pos } => {
                    let text = &self.g.texts[t as usize];
                    if text.get(pos as usize) == Some(&c) {
                        *a.last_mut().expect("top") = Item::Lit { t, pos: pos + 1 };
                        true
                    } else {
                        false
                    }
                }
                Item::Str { node, len, esc } => {
                    let Node::Str { min, max } = self.g.nodes[node as usize] else { unreachable!("a string item") };
                    let (len_u, room) = (len as usize, (len as usize) < max);
                    let top = a.last_mut().expect("top");
                    match esc {
                        0 if c == '"' => {
                            // A closing quote: the end, if the string is long enough.
                            let done = len_u >= min;
                            if done {
                                a.pop();
                            }
                            done
                        }
                        0 if c == '\\' => {
                            *top = Item::Str { node, len, esc: 1 };
                            room
                        }
                        0 => {
                            *top = Item::Str { node, len: len + 1, esc: 0 };
                            room && !c.is_control()
                        }
                        1 if "\"\\/bfnrt".contains(c) => {
                            *top = Item::Str { node, len: len + 1, esc: 0 };
                            true
                        }
                        1 if c == 'u' => {
                            *top = Item::Str { node, len, esc: 2 };
                            true
                        }
                        2..=5 if c.is_ascii_hexdigit() => {
                            *top = if esc == 5 {
                                Item::Str { node, len: len + 1, esc: 0 }
                            } else {
                                Item::Str { node, len, esc: esc + 1 }
                            };
                            true
                        }
                        _ => false,
                    }
                }
                Item::Num { int_only, st, digits } => {
                    let top = a.last_mut().expect("top");
                    let d = c.is_ascii_digit();
                    let to = |st: u8, digits: u8| Item::Num { int_only, st, digits };
                    match (st, c) {
                        (0, '-') => {
                            *top = to(1, 0);
                            true
                        }
                        (0 | 1, '0') => {
                            *top = to(2, 1);
                            true
                        }
                        (0 | 1, _) if d => {
                            *top = to(3, 1);
                            true
                        }
                        (3, _) if d && digits < MAX_INT_DIGITS => {
                            *top = to(3, digits + 1);
                            true
                        }
                        (2 | 3, '.') if !int_only => {
                            *top = to(4, 0);
                            true
                        }
                        (4, _) if d => {
                            *top = to(5, 1);
                            true
                        }
                        (5, _) if d && digits < MAX_FRAC_DIGITS => {
                            *top = to(5, digits + 1);
                            true
                        }
                        _ => false,
                    }
                }
                _ => unreachable!("settled stacks end in a consuming item"),
            };
            if ok {
                next.push(a);
            }
        }
        let alts = self.settle(next);
        if alts.is_empty() { None } else { Some(Matcher { g: self.g, alts }) }
    }

    /// Expands every stack until its top consumes a character (or it is empty), following
    /// every choice; duplicates are merged.
    fn settle(&self, work: Vec<Vec<Item>>) -> Vec<Vec<Item>> {
        let g = self.g;
        let mut work = work;
        let mut out = vec![];
        let mut seen = HashSet::new();
        let mut steps = 0usize;
        while let Some(mut a) = work.pop() {
            steps += 1;
            if out.len() >= MAX_ALTS || steps > MAX_SETTLE_STEPS {
                break;
            }
            let Some(top) = a.last().cloned() else {
                if seen.insert(a.clone()) {
                    out.push(a);
                }
                continue;
            };
            match top {
                Item::Lit { t, pos } => {
                    if pos as usize >= g.texts[t as usize].len() {
                        a.pop();
                        work.push(a);
                    } else if seen.insert(a.clone()) {
                        out.push(a);
                    }
                }
                Item::Str { .. } => {
                    if seen.insert(a.clone()) {
                        out.push(a);
                    }
                }
                Item::Num { st, .. } => {
                    if matches!(st, 2 | 3 | 5) {
                        let mut done = a.clone();
                        done.pop();
                        work.push(done);
                    }
                    if seen.insert(a.clone()) {
                        out.push(a);
                    }
                }
                Item::Ws => {
                    a.pop();
                    let mut sp = a.clone();
                    sp.push(Item::Lit { t: T_SPACE, pos: 0 });
                    work.push(sp);
                    work.push(a);
                }
                Item::Value(n) => {
                    a.pop();
                    match &g.nodes[n as usize] {
                        Node::Object(_) => {
                            a.push(Item::Lit { t: T_CLOSE, pos: 0 });
                            a.push(Item::Props { obj: n, next: 0, any: false });
                            a.push(Item::Lit { t: T_OPEN, pos: 0 });
                            work.push(a);
                        }
                        Node::Str { .. } => {
                            a.push(Item::Str { node: n, len: 0, esc: 0 });
                            a.push(Item::Lit { t: T_QUOTE, pos: 0 });
                            work.push(a);
                        }
                        Node::Int | Node::Num => {
                            a.push(Item::Num { int_only: matches!(g.nodes[n as usize], Node::Int), st: 0, digits: 0 });
                            work.push(a);
                        }
                        Node::Lit(t) => {
                            a.push(Item::Lit { t: *t, pos: 0 });
                            work.push(a);
                        }
                        Node::Array { .. } => {
                            a.push(Item::Lit { t: T_RBRACK, pos: 0 });
                            a.push(Item::Arr { node: n, count: 0 });
                            a.push(Item::Lit { t: T_LBRACK, pos: 0 });
                            work.push(a);
                        }
                        Node::AnyOf(alts) => {
                            for x in alts {
                                let mut b = a.clone();
                                b.push(Item::Value(*x));
                                work.push(b);
                            }
                        }
                    }
                }
                Item::Props { obj, next, any } => {
                    a.pop();
                    let Node::Object(props) = &g.nodes[obj as usize] else { unreachable!("an object item") };
                    let Some(p) = props.get(next as usize) else {
                        work.push(a);
                        continue;
                    };
                    if !p.required {
                        let mut skip = a.clone();
                        skip.push(Item::Props { obj, next: next + 1, any });
                        work.push(skip);
                    }
                    a.push(Item::Props { obj, next: next + 1, any: true });
                    a.push(Item::Value(p.node));
                    a.push(Item::Ws);
                    a.push(Item::Lit { t: p.key, pos: 0 });
                    if any {
                        a.push(Item::Ws);
                        a.push(Item::Lit { t: T_COMMA, pos: 0 });
                    }
                    work.push(a);
                }
                Item::Arr { node, count } => {
                    a.pop();
                    let Node::Array { items, min, max } = g.nodes[node as usize] else { unreachable!("an array item") };
                    if count as usize >= min {
                        work.push(a.clone());
                    }
                    if (count as usize) < max {
                        a.push(Item::Arr { node, count: count + 1 });
                        a.push(Item::Value(items));
                        if count > 0 {
                            a.push(Item::Ws);
                            a.push(Item::Lit { t: T_COMMA, pos: 0 });
                        }
                        work.push(a);
                    }
                }
            }
        }
        out
    }
}

/// The text each token adds when appended to a sequence (as the streaming decoder would
/// print it), or `None` for tokens whose text is not plain (special tokens, partial
/// UTF-8 bytes).
pub fn token_texts(tok: &Tokenizer) -> RuntimeResult<Vec<Option<String>>> {
    // Decoded after an anchor token, so word-start markers become the space they stand for.
    let anchor = tok.encode("a", false)?.first().copied();
    let base = match anchor {
        Some(a) => tok.decode_with(&[a], true)?,
        None => String::new(),
    };
    let mut out = Vec::with_capacity(tok.vocab_size());
    for id in 0..tok.vocab_size() as u32 {
        let ids: Vec<u32> = anchor.into_iter().chain([id]).collect();
        // Special tokens decode to nothing (as the stream decoder prints them) and drop out.
        let s = tok.decode_with(&ids, true).ok().and_then(|s| s.strip_prefix(&base).map(str::to_string));
        out.push(s.filter(|s| !s.is_empty() && !s.contains('\u{FFFD}')));
    }
    Ok(out)
}

/// Picks the next token under the grammar: candidates in descending logit order (lowest
/// id on ties), the first `want` whose text the matcher accepts (plus an end-of-sequence
/// token when the value is complete). Returns `(id, matcher after it)` pairs.
pub fn viable<'g>(
    m: &Matcher<'g>,
    logits: &[f32],
    texts: &[Option<String>],
    eos: &[u32],
    want: usize,
) -> Vec<(u32, Option<Matcher<'g>>)> {
    let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let mut out = vec![];
    for id in order {
        if eos.contains(&id) {
            if m.is_complete() {
                out.push((id, None));
            }
        } else if let Some(Some(t)) = texts.get(id as usize)
            && let Some(next) = m.feed_str(t)
        {
            out.push((id, Some(next)));
        }
        if out.len() >= want {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Json {
        Json::parse(text).unwrap()
    }

    fn accepts(g: &Grammar, s: &str) -> bool {
        g.start().feed_str(s).is_some_and(|m| m.is_complete())
    }

    #[test]
    fn a_function_call_grammar_accepts_exactly_valid_calls() {
        let tools = json(
            r#"[
            {"name": "set_timer", "parameters": {"type": "object", "properties": {
                "minutes": {"type": "integer"}, "label": {"type": "string", "maxLength": 8}}, "required": ["minutes"]}},
            {"type": "function", "function": {"name": "lights", "parameters": {"type": "object", "properties": {
                "on": {"type": "boolean"}, "room": {"enum": ["kitchen", "hall"]}}, "required": ["on", "room"]}}}
        ]"#,
        );
        let g = Grammar::function_call(&tools, "tools.json").unwrap();
        for ok in [
            r#"{"name":"set_timer","arguments":{"minutes":5}}"#,
            r#"{"name": "set_timer", "arguments": {"minutes": 15, "label": "tea"}}"#,
            r#"{"name":"lights","arguments":{"on":true,"room":"hall"}}"#,
        ] {
            assert!(accepts(&g, ok), "{ok}");
        }
        for bad in [
            r#"{"name":"set_timer","arguments":{}}"#,
            r#"{"name":"set_timer","arguments":{"minutes":"5"}}"#,
            r#"{"name":"set_timer","arguments":{"minutes":5,"label":"far too long"}}"#,
            r#"{"name":"lights","arguments":{"on":true,"room":"garage"}}"#,
            r#"{"name":"oven","arguments":{}}"#,
            r#"{"name":"set_timer","arguments":{"minutes":05}}"#,
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        // Properties come in the schema's order.
        assert!(!accepts(&g, r#"{"name":"set_timer","arguments":{"label":"a","minutes":5}}"#));
        // Prefixes of valid calls stay open; the end only where the value is complete.
        let m = g.start().feed_str(r#"{"name":"set_timer","arguments":{"minutes":1"#).unwrap();
        assert!(!m.is_complete() && m.can_continue());
        let m = m.feed_str("}}").unwrap();
        assert!(m.is_complete() && !m.can_continue());
    }

    #[test]
    fn unsupported_schema_keywords_are_named() {
        let e =
            Grammar::from_schema(&json(r#"{"type": "string", "pattern": "a+"}"#), "s.json").unwrap_err().to_string();
        assert!(e.contains("s.json") && e.contains("`pattern`"), "{e}");
        let e = Grammar::from_schema(&json(r#"{"type": "object", "properties": {}, "required": ["x"]}"#), "s.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("required property `x`"), "{e}");
    }

    #[test]
    fn numbers_arrays_and_escapes() {
        let g = Grammar::from_schema(
            &json(r#"{"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3}"#),
            "s",
        )
        .unwrap();
        assert!(accepts(&g, "[1.5, -2, 0.25]"));
        assert!(!accepts(&g, "[]"));
        assert!(!accepts(&g, "[1,2,3,4]"));
        assert!(!accepts(&g, "[1.]"));
        let g = Grammar::from_schema(&json(r#"{"type": "string"}"#), "s").unwrap();
        assert!(accepts(&g, r#""a\"b\u00e9c""#));
        assert!(!accepts(&g, "\"a\nb\""));
    }
}
