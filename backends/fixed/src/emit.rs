//! The C99 library of a fixed-point build: `kiln_model.h` (the API), `kiln_model.c`
//! (the kernels of `c/kiln_ops.c`, the static memory plan, the step list) and
//! `kiln_weights.h`/`.c` (every constant as a `const` array, for flash).

use std::fmt::Write as _;

use crate::program::*;

const OPS: &str = include_str!("../c/kiln_ops.c");

fn cname(c: &Const) -> String {
    format!("kiln_{}", c.name)
}

fn ctype(d: &Data) -> (&'static str, usize) {
    match d {
        Data::U8(v) => ("uint8_t", v.len()),
        Data::I8(v) => ("int8_t", v.len()),
        Data::I16(v) => ("int16_t", v.len()),
        Data::I32(v) => ("int32_t", v.len()),
    }
}

/// Appends `v` in decimal (fast: weight files hold millions of numbers).
fn push_int(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    let mut u = v.unsigned_abs();
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_array<T: Copy + Into<i64>>(out: &mut Vec<u8>, decl: &str, v: &[T]) {
    out.extend_from_slice(decl.as_bytes());
    out.extend_from_slice(b" = {\n");
    for chunk in v.chunks(24) {
        for x in chunk {
            push_int(out, (*x).into());
            out.push(b',');
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"};\n");
}

pub fn weights_h(p: &Program) -> String {
    let mut s = String::from(
        "/* kiln fixed-point build: constant data (generated; do not edit). */\n#ifndef KILN_WEIGHTS_H\n#define KILN_WEIGHTS_H\n#include <stdint.h>\n",
    );
    for c in &p.consts {
        let (t, n) = ctype(&c.data);
        let _ = writeln!(s, "extern const {t} {}[{n}];", cname(c));
    }
    s + "#endif\n"
}

pub fn weights_c(p: &Program) -> Vec<u8> {
    let mut out =
        b"/* kiln fixed-point build: constant data (generated; do not edit). */\n#include \"kiln_weights.h\"\n"
            .to_vec();
    for c in &p.consts {
        let (t, n) = ctype(&c.data);
        let decl = format!("const {t} {}[{n}]", cname(c));
        match &c.data {
            Data::U8(v) => push_array(&mut out, &decl, v),
            Data::I8(v) => push_array(&mut out, &decl, v),
            Data::I16(v) => push_array(&mut out, &decl, v),
            Data::I32(v) => push_array(&mut out, &decl, v),
        }
    }
    out
}

pub fn model_h(p: &Program) -> String {
    format!(
        "/* kiln fixed-point build of `{name}` (generated; do not edit).
 * Integer-only C99: no malloc, no floating point, no libc beyond memcpy/memset.
 * Logits are Q16 fixed point (value = logit / 65536). */
#ifndef KILN_MODEL_H
#define KILN_MODEL_H
#include <stdint.h>

#define KILN_VOCAB {vocab}
#define KILN_MAX_CONTEXT {ctx}
#define KILN_FLASH_BYTES {flash}
#define KILN_RAM_BYTES {ram}

#define KILN_ERR_CONTEXT (-1) /* the prompt does not fit in KILN_MAX_CONTEXT */
#define KILN_ERR_TOKEN (-2)   /* a token id outside the vocabulary */
#define KILN_ERR_EMPTY (-3)   /* prefill of no tokens */

/* Empties the KV cache (position 0). */
void kiln_init(void);
/* Tokens in the KV cache. */
int32_t kiln_pos(void);
/* Forgets positions at and after pos. */
void kiln_truncate(int32_t pos);
/* Runs n prompt tokens; returns the greedy next token (lowest id on ties) or a
 * KILN_ERR_* code (then nothing changed). logits (KILN_VOCAB, may be 0) gets the
 * last token's logits. */
int32_t kiln_prefill(const int32_t *tokens, int32_t n, int32_t *logits);
/* Runs one token; like kiln_prefill with n = 1. */
int32_t kiln_decode_step(int32_t token, int32_t *logits);
#endif
",
        name = p.name,
        vocab = p.vocab,
        ctx = p.max_context,
        flash = p.flash_bytes(),
        ram = p.ram_bytes(),
    )
}

fn b(x: Buf) -> String {
    format!("A + {}", x.off)
}

pub fn model_c(p: &Program) -> String {
    let mut s = format!(
        "/* kiln fixed-point build of `{}` (generated; do not edit). */\n#include <stdint.h>\n#include <string.h>\n#include \"kiln_model.h\"\n#include \"kiln_weights.h\"\n\n",
        p.name
    );
    let mut uses: Vec<&str> = p
        .steps
        .iter()
        .map(|st| match st {
            Step::Embed { table, .. } if table.format == RowFormat::Q4 => "EMBED_Q4",
            Step::Embed { .. } => "EMBED",
            Step::RmsNorm { .. } => "RMS_NORM",
            Step::MatMul { w, .. } if w.format == RowFormat::Q4 => "MATMUL_Q4",
            Step::MatMul { .. } => "MATMUL",
            Step::Add { .. } => "ADD",
            Step::Mul { .. } => "MUL",
            Step::Scale { .. } => "SCALE",
            Step::Act { .. } => "ACT_N",
            Step::Glu { .. } => "GLU",
            Step::Rope { .. } => "ROPE",
            Step::Attention { .. } => "ATTENTION",
        })
        .collect();
    if p.slots.iter().any(|sl| sl.bits == 8) {
        uses.push("KV8");
    }
    if p.slots.iter().any(|sl| sl.bits == 4) {
        uses.push("KV4");
    }
    uses.sort();
    uses.dedup();
    for u in uses {
        let _ = writeln!(s, "#define KILN_USE_{u}");
    }
    s += OPS;
    let c = |id: ConstId| cname(&p.consts[id.0]);
    let _ = writeln!(s, "\n/* static memory plan: {} bytes of RAM */", p.ram_bytes());
    let _ = writeln!(s, "static int32_t A[{}]; /* activation arena */", p.arena.max(1));
    let _ = writeln!(s, "static int16_t M16[{}]; /* 16-bit mantissas */", p.scratch16.max(1));
    let _ = writeln!(s, "static int32_t SC[{}]; /* attention scores */", p.scores.max(1));
    if p.scratch_groups > 0 {
        let _ = writeln!(s, "static int32_t G32[{}]; /* group sums of a 4-bit matmul's input */", p.scratch_groups);
    }
    for (i, sl) in p.slots.iter().enumerate() {
        let n = sl.rows * sl.kv_heads;
        let (ty, mantissas) = if sl.bits == 4 {
            ("uint8_t".to_string(), n * sl.head_dim / 2)
        } else {
            (format!("int{}_t", sl.bits), n * sl.head_dim)
        };
        let shifts = n * sl.groups();
        let _ = writeln!(
            s,
            "static {ty} K{i}[{}], V{i}[{}];\nstatic uint8_t KS{i}[{}], VS{i}[{}];",
            mantissas.max(1),
            mantissas.max(1),
            shifts.max(1),
            shifts.max(1)
        );
    }
    if !p.slots.is_empty() {
        let list: Vec<String> = p
            .slots
            .iter()
            .enumerate()
            .map(|(i, sl)| {
                let kv = match sl.bits {
                    8 => format!("0, 0, K{i}, V{i}"),
                    4 => "0, 0, 0, 0".to_string(),
                    _ => format!("K{i}, V{i}, 0, 0"),
                };
                let kv4 = if sl.bits == 4 { format!(", K{i}, V{i}") } else { String::new() };
                format!("{{{kv}, KS{i}, VS{i}, {}, {}, {}, {}{kv4}}}", sl.kv_heads, sl.head_dim, sl.rows, sl.sink)
            })
            .collect();
        let _ = writeln!(s, "static k_slot SLOTS[{}] = {{{}}};", p.slots.len(), list.join(", "));
    }
    s += "static int32_t kiln_position;\n\nstatic void forward(int32_t token, int32_t pos) {\n";
    if p.slots.is_empty() {
        s += "    (void)pos;\n";
    }
    for st in &p.steps {
        let line = match st {
            Step::Embed { table, out } => format!(
                "{}({}, {}, {}, {}, {}, token);",
                if table.format == RowFormat::Q4 { "k_embed_q4" } else { "k_embed" },
                b(*out),
                c(table.w),
                c(table.mult),
                c(table.shift),
                table.cols
            ),
            Step::RmsNorm { x, out, group, gamma, eps_q } => {
                let (g, gl) = match gamma {
                    Some(g) => (c(*g), ctype(p.data(*g)).1),
                    None => ("0".into(), 1),
                };
                format!("k_rms_norm({}, {}, {}, {group}, {g}, {gl}, {eps_q}u);", b(*x), b(*out), x.len)
            }
            Step::MatMul { x, out, w, bias } => format!(
                "{}({}, {}, {}, {}, {}, {}, {}, {}, M16{});",
                if w.format == RowFormat::Q4 { "k_matmul_q4" } else { "k_matmul" },
                b(*x),
                b(*out),
                w.rows,
                w.cols,
                c(w.w),
                c(w.mult),
                c(w.shift),
                bias.map(c).unwrap_or_else(|| "0".into()),
                if w.format == RowFormat::Q4 { ", G32" } else { "" }
            ),
            Step::Add { a, b: bb, out } => format!("k_add({}, {}, {}, {});", b(*a), b(*bb), b(*out), out.len),
            Step::Mul { a, b: bb, out } => format!("k_mul({}, {}, {}, {});", b(*a), b(*bb), b(*out), out.len),
            Step::Scale { x, out, mult, shift } => {
                format!("k_scale({}, {}, {}, {mult}, {shift});", b(*x), b(*out), out.len)
            }
            Step::Act { x, out, kind } => format!("k_act_n({}, {}, {}, {});", b(*x), b(*out), out.len, kind_id(*kind)),
            Step::Glu { gate, up, out, kind } => {
                format!("k_glu({}, {}, {}, {}, {});", b(*gate), b(*up), b(*out), out.len, kind_id(*kind))
            }
            Step::Rope { x, out, table, head_dim, rot, neox } => format!(
                "k_rope({}, {}, {}, {}, pos, {head_dim}, {rot}, {});",
                b(*x),
                b(*out),
                out.len,
                c(*table),
                *neox as i32
            ),
            Step::Attention { q, kv, out, slot, heads, mult, shift, window, sink, softcap, .. } => {
                let (kn, vn) = match kv {
                    Some((k, v)) => (b(*k), b(*v)),
                    None => ("0".into(), "0".into()),
                };
                let [(m1, s1), (m2, s2)] = softcap.unwrap_or([(0, 0), (0, 0)]);
                format!(
                    "k_attention({}, {kn}, {vn}, {}, &SLOTS[{slot}], pos, {heads}, {mult}, {shift}, {window}, {sink}, {}, {m1}, {s1}, {m2}, {s2}, M16, SC);",
                    b(*q),
                    b(*out),
                    softcap.is_some() as i32
                )
            }
        };
        let _ = writeln!(s, "    {line}");
    }
    s += "}\n";
    let _ = write!(
        s,
        "
void kiln_init(void) {{ kiln_position = 0; }}

int32_t kiln_pos(void) {{ return kiln_position; }}

void kiln_truncate(int32_t pos) {{
    if (pos >= 0 && pos < kiln_position) kiln_position = pos;
}}

static int32_t kiln_argmax(int32_t *logits) {{
    const int32_t *l = A + {off};
    int32_t i, best = 0;
    for (i = 1; i < KILN_VOCAB; i++)
        if (l[i] > l[best]) best = i;
    if (logits) memcpy(logits, l, sizeof(int32_t) * KILN_VOCAB);
    return best;
}}

int32_t kiln_prefill(const int32_t *tokens, int32_t n, int32_t *logits) {{
    int32_t i;
    if (n <= 0) return KILN_ERR_EMPTY;
    if (n > KILN_MAX_CONTEXT - kiln_position) return KILN_ERR_CONTEXT;
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= {rows}) return KILN_ERR_TOKEN;
    for (i = 0; i < n; i++) {{
        forward(tokens[i], kiln_position);
        kiln_position++;
    }}
    return kiln_argmax(logits);
}}

int32_t kiln_decode_step(int32_t token, int32_t *logits) {{ return kiln_prefill(&token, 1, logits); }}
",
        off = p.logits.off,
        rows = p.vocab_rows,
    );
    s
}

fn kind_id(k: ActKind) -> i32 {
    match k {
        ActKind::Silu => 0,
        ActKind::GeluTanh => 1,
    }
}
