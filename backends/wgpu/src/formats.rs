//! Fused weight decoders in WGSL: for each layout, `dec8(row, g)` returns the 8 weights of
//! group `g` of the row that starts at byte `row` of `b_w` (the layout's bytes exactly as
//! stored in the build, read as u32 words), and for unquantized rows `load1(row, e)` one
//! element. The math follows `kiln_quant`'s reference dequantizers (ggml's layouts).

use kiln_ir::DType;

/// Whether the wgpu backend has a decoder for `dtype`.
pub fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32
            | DType::F16
            | DType::BF16
            | DType::F8E4M3
            | DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::IQ4NL
            | DType::Q2K
            | DType::Q3K
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
            | DType::KQ2
    )
}

/// Byte, u16, u32 and f16 reads at any byte address of `b_w`.
const BYTES: &str = "
fn rd32(a: u32) -> u32 {
    let i = a >> 2u;
    let sh = (a & 3u) * 8u;
    if sh == 0u {
        return b_w[i];
    }
    return (b_w[i] >> sh) | (b_w[i + 1u] << (32u - sh));
}

fn rd8(a: u32) -> u32 {
    return (b_w[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

fn rd16(a: u32) -> u32 {
    if (a & 3u) == 3u {
        return rd32(a) & 0xffffu;
    }
    return (b_w[a >> 2u] >> ((a & 3u) * 8u)) & 0xffffu;
}

fn rdf16(a: u32) -> f32 {
    return half(rd16(a));
}
";

/// IEEE half (low 16 bits of `h`) to f32, exactly, with integer ops only (WGSL's
/// `unpack2x16float` is not available on every device).
pub(crate) const HALF: &str = "
fn half(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * 5.9604645e-8));
    }
    if e == 31u {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}
";

/// FP8 E4M3 (low 8 bits of `c`) to f32, exactly, with integer ops only: exponent e > 0
/// rebiased into an f32's, e = 0 as `m · 2^-9` (no subnormal f32 anywhere), 0x7f NaN
/// (`kiln_quant::f8e4m3_to_f32`).
pub(crate) const E4M3: &str = "
fn e4m3(c: u32) -> f32 {
    let em = c & 0x7fu;
    var mag = bitcast<f32>((em << 20u) + (120u << 23u));
    if em < 8u {
        mag = f32(em) * 0.001953125;
    }
    if em == 0x7fu {
        mag = bitcast<f32>(0x7f800000u | (c << 16u));
    }
    return select(mag, -mag, (c & 0x80u) != 0u);
}
";

/// The 8 consecutive bytes at any byte address `a` (`rd8x2`), and byte `i` of them (`byte8`).
const BYTES8: &str = "
fn rd8x2(a: u32) -> vec2<u32> {
    return vec2<u32>(rd32(a), rd32(a + 4u));
}

fn byte8(w: vec2<u32>, i: u32) -> u32 {
    return (w[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
}
";

/// The `dec8` body of a 4-bit 32-block layout (an f16 scale, then 16 quant bytes: elements
/// 0..16 the low nibbles, 16..32 the high ones; group `g & 3` reads 8 bytes at one shift),
/// each weight the WGSL expression `$w` of its nibble `n` and the scale `d` (Q4_0, IQ4_NL).
macro_rules! nibbles32 {
    ($w:literal) => {
        concat!(
            "let blk = row + (g >> 2u) * 18u;
let d = rdf16(blk);
let e0 = (g & 3u) * 8u;
let q = rd8x2(blk + 2u + (e0 & 15u));
let sh = (e0 >> 4u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let n = (byte8(q, i) >> sh) & 15u;
    o[i] = ",
            $w,
            ";
}"
        )
    };
}

/// IQ4_NL's table (`kiln_quant::iq4nl::VALUES`): 16 signed bytes packed little-endian
/// into 4 words, so a lookup is a dynamically indexed vector component and a sign-extending
/// byte extract (no array in private memory).
fn iq4nl_table() -> String {
    let w: [u32; 4] = std::array::from_fn(|i| {
        u32::from_le_bytes(std::array::from_fn(|j| kiln_quant::iq4nl::VALUES[4 * i + j] as u8))
    });
    format!(
        "
const IQ4NL_T = vec4<u32>({:#010x}u, {:#010x}u, {:#010x}u, {:#010x}u);

fn iq4nl(n: u32) -> f32 {{
    return f32(extractBits(bitcast<i32>(IQ4NL_T[n >> 2u]), (n & 3u) * 8u, 8u));
}}
",
        w[0], w[1], w[2], w[3]
    )
}

/// Scale and min (6 bits each) of sub-block `j` of a Q4_K/Q5_K block whose 12 packed scale
/// bytes start at `s` (ggml's `get_scale_min_k4`).
const SCALE_MIN_K4: &str = "
fn scale_min_k4(s: u32, j: u32) -> vec2<u32> {
    if j < 4u {
        return vec2<u32>(rd8(s + j) & 63u, rd8(s + j + 4u) & 63u);
    }
    let a = rd8(s + j + 4u);
    return vec2<u32>((a & 15u) | ((rd8(s + j - 4u) >> 6u) << 4u), (a >> 4u) | ((rd8(s + j) >> 6u) << 4u));
}
";

/// Whether group `g` of a kq2 row lies in a block stored rotated (its `U` bit clear).
const KQ2_ROTATED: &str = "
fn kq2_rotated(row: u32, g: u32) -> bool {
    return (rd8(row + (g >> 3u) * 18u) & 0x80u) == 0u;
}
";

/// The WGSL helpers a matmul over `dtype` weights needs (`dec8`, or `load1` when `ragged`).
pub fn decoder(dtype: DType, ragged: bool) -> String {
    if ragged {
        let body = match dtype {
            DType::F32 => "return bitcast<f32>(b_w[(row >> 2u) + e]);",
            // Rows of 2-byte elements start at any even byte.
            DType::F16 => "let a = row + 2u * e;\n    return half(b_w[a >> 2u] >> ((a & 2u) * 8u));",
            DType::BF16 => {
                "let a = row + 2u * e;\n    return bitcast<f32>(((b_w[a >> 2u] >> ((a & 2u) * 8u)) & 0xffffu) << 16u);"
            }
            DType::F8E4M3 => "let a = row + e;\n    return e4m3(b_w[a >> 2u] >> ((a & 3u) * 8u));",
            _ => unreachable!("ragged rows are for unquantized weights"),
        };
        let helpers = match dtype {
            DType::F16 => HALF,
            DType::F8E4M3 => E4M3,
            _ => "",
        };
        return format!("{helpers}\nfn load1(row: u32, e: u32) -> f32 {{\n    {body}\n}}\n");
    }
    let (helpers, body) = match dtype {
        DType::F32 => (
            String::new(),
            "let b = (row >> 2u) + g * 8u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = bitcast<f32>(b_w[b + i]);
}",
        ),
        DType::F16 => (
            HALF.to_string(),
            "let b = (row >> 2u) + g * 4u;
for (var i = 0u; i < 4u; i = i + 1u) {
    let w = b_w[b + i];
    o[2u * i] = half(w);
    o[2u * i + 1u] = half(w >> 16u);
}",
        ),
        DType::F8E4M3 => (
            E4M3.to_string(),
            "let b = (row >> 2u) + g * 2u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = e4m3(b_w[b + (i >> 2u)] >> ((i & 3u) * 8u));
}",
        ),
        DType::BF16 => (
            String::new(),
            "let b = (row >> 2u) + g * 4u;
for (var i = 0u; i < 4u; i = i + 1u) {
    let w = b_w[b + i];
    o[2u * i] = bitcast<f32>(w << 16u);
    o[2u * i + 1u] = bitcast<f32>(w & 0xffff0000u);
}",
        ),
        DType::Q8_0 => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 2u) * 34u;
let d = rdf16(blk);
let q = rd8x2(blk + 2u + (g & 3u) * 8u);
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = f32(extractBits(bitcast<i32>(q[i >> 2u]), (i & 3u) * 8u, 8u)) * d;
}",
        ),
        DType::Q4_0 => (format!("{BYTES}{HALF}{BYTES8}"), nibbles32!("(f32(n) - 8.0) * d")),
        // IQ4_NL: Q4_0's layout, each nibble an index into the fixed table (`d · T[q]`,
        // one rounding like the reference).
        DType::IQ4NL => (format!("{BYTES}{HALF}{BYTES8}{}", iq4nl_table()), nibbles32!("iq4nl(n) * d")),
        DType::Q4_1 => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 2u) * 20u;
let d = rdf16(blk);
let m = rdf16(blk + 2u);
let e0 = (g & 3u) * 8u;
let q = rd8x2(blk + 4u + (e0 & 15u));
let sh = (e0 >> 4u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = f32((byte8(q, i) >> sh) & 15u) * d + m;
}",
        ),
        DType::Q5_0 => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 2u) * 22u;
let d = rdf16(blk);
let qh = rd32(blk + 2u);
let e0 = (g & 3u) * 8u;
let q = rd8x2(blk + 6u + (e0 & 15u));
let sh = (e0 >> 4u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let v = ((byte8(q, i) >> sh) & 15u) | (((qh >> (e0 + i)) & 1u) << 4u);
    o[i] = (f32(v) - 16.0) * d;
}",
        ),
        DType::Q5_1 => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 2u) * 24u;
let d = rdf16(blk);
let m = rdf16(blk + 2u);
let qh = rd32(blk + 4u);
let e0 = (g & 3u) * 8u;
let q = rd8x2(blk + 8u + (e0 & 15u));
let sh = (e0 >> 4u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let v = ((byte8(q, i) >> sh) & 15u) | (((qh >> (e0 + i)) & 1u) << 4u);
    o[i] = f32(v) * d + m;
}",
        ),
        // K-quants: 256-element super-blocks of 32 groups; `n` is the group's first element
        // within its super-block, and a group of 8 never straddles a sub-block.
        DType::Q2K => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 5u) * 84u;
let n = (g & 31u) * 8u;
let d = rdf16(blk + 80u);
let dmin = rdf16(blk + 82u);
let sc = rd8(blk + (n >> 4u));
let dl = d * f32(sc & 15u);
let ml = dmin * f32(sc >> 4u);
let q = rd8x2(blk + 16u + (n >> 7u) * 32u + (n & 31u));
let sh = ((n >> 5u) & 3u) * 2u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = dl * f32((byte8(q, i) >> sh) & 3u) - ml;
}",
        ),
        DType::Q3K => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 5u) * 110u;
let n = (g & 31u) * 8u;
let d = rdf16(blk + 108u);
let j = n >> 4u;
let s = rd8(blk + 96u + (j & 7u));
let lo = select(s >> 4u, s & 15u, j < 8u);
let hi = (rd8(blk + 104u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
let dl = d * f32(i32(lo | (hi << 4u)) - 32);
let hm = rd8x2(blk + (n & 31u));
let hbit = n >> 5u;
let q = rd8x2(blk + 32u + (n >> 7u) * 32u + (n & 31u));
let sh = ((n >> 5u) & 3u) * 2u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let sub = select(0, 4, ((byte8(hm, i) >> hbit) & 1u) == 0u);
    o[i] = dl * f32(i32((byte8(q, i) >> sh) & 3u) - sub);
}",
        ),
        DType::Q4K => (
            format!("{BYTES}{HALF}{BYTES8}{SCALE_MIN_K4}"),
            "let blk = row + (g >> 5u) * 144u;
let n = (g & 31u) * 8u;
let d = rdf16(blk);
let dmin = rdf16(blk + 2u);
let j = n >> 5u;
let sm = scale_min_k4(blk + 4u, j);
let d1 = d * f32(sm.x);
let m1 = dmin * f32(sm.y);
let q = rd8x2(blk + 16u + (j >> 1u) * 32u + (n & 31u));
let sh = (j & 1u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = d1 * f32((byte8(q, i) >> sh) & 15u) - m1;
}",
        ),
        DType::Q5K => (
            format!("{BYTES}{HALF}{BYTES8}{SCALE_MIN_K4}"),
            "let blk = row + (g >> 5u) * 176u;
let n = (g & 31u) * 8u;
let d = rdf16(blk);
let dmin = rdf16(blk + 2u);
let j = n >> 5u;
let sm = scale_min_k4(blk + 4u, j);
let d1 = d * f32(sm.x);
let m1 = dmin * f32(sm.y);
let qh = rd8x2(blk + 16u + (n & 31u));
let q = rd8x2(blk + 48u + (j >> 1u) * 32u + (n & 31u));
let sh = (j & 1u) * 4u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let v = ((byte8(q, i) >> sh) & 15u) | (((byte8(qh, i) >> j) & 1u) << 4u);
    o[i] = d1 * f32(v) - m1;
}",
        ),
        DType::Q6K => (
            format!("{BYTES}{HALF}{BYTES8}"),
            "let blk = row + (g >> 5u) * 210u;
let n = (g & 31u) * 8u;
let d = rdf16(blk + 208u);
let dl = d * f32(i32(rd8(blk + 192u + (n >> 4u)) << 24u) >> 24u);
let h = n >> 7u;
let quarter = (n >> 5u) & 3u;
let ql = rd8x2(blk + h * 64u + (quarter & 1u) * 32u + (n & 31u));
let qh = rd8x2(blk + 128u + h * 32u + (n & 31u));
let ls = (quarter >> 1u) * 4u;
let hs = quarter * 2u;
for (var i = 0u; i < 8u; i = i + 1u) {
    let q = i32(((byte8(ql, i) >> ls) & 15u) | (((byte8(qh, i) >> hs) & 3u) << 4u)) - 32;
    o[i] = dl * f32(q);
}",
        ),
        // kq2: 18-byte blocks of 64 (8 groups), decoded with the lookup tables the session
        // uploads (`kiln_ptx::formats::tables`, bound as `b_tables`): 512 magnitude entries
        // of 8 bytes (byte j = 2·A_j + 17, bit 7 of byte 0 the sign parity P), then 128 f32
        // scales `kq2_scale(k) / 4`. In quarters of the scale, 4·c_j = ±2·A_j + τ (τ = ±1,
        // the shift bit), so w_j = f32(4·c_j) · scale / 4, exact like the reference's
        // `scale · c_j`. The values are the block's storage vector: a rotated block
        // ([`KQ2_ROTATED`]) multiplies the block-rotated activations.
        DType::KQ2 => (
            format!("{BYTES}{HALF}{KQ2_ROTATED}"),
            "let blk = row + (g >> 3u) * 18u;
let s = g & 7u;
let hdr = rd16(blk);
let code = rd16(blk + 2u + 2u * s);
let idx = (code & 0xffu) | (((hdr >> (8u + s)) & 1u) << 8u);
let ta = p.tables_off + 2u * idx;
let t0 = b_tables[ta];
let t1 = b_tables[ta + 1u];
let s4 = bitcast<f32>(b_tables[p.tables_off + 1024u + (hdr & 0x7fu)]);
let sg7 = (code >> 8u) & 0x7fu;
let sg = sg7 | (((countOneBits(sg7) + ((t0 >> 7u) & 1u)) & 1u) << 7u);
let tau = select(1, -1, (code >> 15u) != 0u);
for (var i = 0u; i < 8u; i = i + 1u) {
    let a2 = i32((select(t0, t1, i >= 4u) >> ((i & 3u) * 8u)) & 0x1fu) - 17;
    o[i] = f32(select(a2, -a2, ((sg >> i) & 1u) != 0u) + tau) * s4;
}",
        ),
        other => unreachable!("no WGSL decoder for {other}"),
    };
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "{helpers}\nfn dec8(row: u32, g: u32) -> array<f32, 8> {{\n    var o: array<f32, 8>;\n{body}    return o;\n}}\n"
    )
}
