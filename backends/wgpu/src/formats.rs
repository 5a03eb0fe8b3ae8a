//! Fused weight decoders in WGSL: for each layout, `dec8(row, g)` returns the 8 weights of
//! group `g` of the row that starts at byte `row` of `b_w` (the layout's bytes exactly as
//! stored in the build, read as u32 words), and for unquantized rows `load1(row, e)` one
//! element. The math follows `kiln_quant`'s reference dequantizers (ggml's layouts).

use kiln_ir::DType;

/// Whether the wgpu backend has a decoder for `dtype`.
pub fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32 | DType::F16 | DType::BF16 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0
    )
}

/// Byte, u16, u32 and f16 reads at any byte address of `b_w`.
const BYTES: &str = "
fn rd8(a: u32) -> u32 {
    return (b_w[a >> 2u] >> ((a & 3u) * 8u)) & 0xffu;
}

fn rd16(a: u32) -> u32 {
    if (a & 1u) == 0u {
        return (b_w[a >> 2u] >> ((a & 2u) * 8u)) & 0xffffu;
    }
    return rd8(a) | (rd8(a + 1u) << 8u);
}

fn rd32(a: u32) -> u32 {
    if (a & 3u) == 0u {
        return b_w[a >> 2u];
    }
    return rd16(a) | (rd16(a + 2u) << 16u);
}

fn rdf16(a: u32) -> f32 {
    return half(rd16(a));
}
";

/// IEEE half (low 16 bits of `h`) to f32, exactly, with integer ops only (WGSL's
/// `unpack2x16float` is not available on every device).
const HALF: &str = "
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

/// Element `e` of 4-bit quants `qs` (32 per block: low nibbles, then high nibbles).
const NIBBLE: &str = "
fn nib(qs: u32, e: u32) -> u32 {
    let b = rd8(qs + (e & 15u));
    return select(b & 15u, b >> 4u, e >= 16u);
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
            _ => unreachable!("ragged rows are for unquantized weights"),
        };
        let helpers = if dtype == DType::F16 { HALF } else { "" };
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
            format!("{BYTES}{HALF}"),
            "let blk = row + (g >> 2u) * 34u;
let d = rdf16(blk);
let q = blk + 2u + (g & 3u) * 8u;
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = f32(i32(rd8(q + i) << 24u) >> 24u) * d;
}",
        ),
        DType::Q4_0 => (
            format!("{BYTES}{HALF}{NIBBLE}"),
            "let blk = row + (g >> 2u) * 18u;
let d = rdf16(blk);
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = (f32(nib(blk + 2u, (g & 3u) * 8u + i)) - 8.0) * d;
}",
        ),
        DType::Q4_1 => (
            format!("{BYTES}{HALF}{NIBBLE}"),
            "let blk = row + (g >> 2u) * 20u;
let d = rdf16(blk);
let m = rdf16(blk + 2u);
for (var i = 0u; i < 8u; i = i + 1u) {
    o[i] = f32(nib(blk + 4u, (g & 3u) * 8u + i)) * d + m;
}",
        ),
        DType::Q5_0 => (
            format!("{BYTES}{HALF}{NIBBLE}"),
            "let blk = row + (g >> 2u) * 22u;
let d = rdf16(blk);
let qh = rd32(blk + 2u);
for (var i = 0u; i < 8u; i = i + 1u) {
    let e = (g & 3u) * 8u + i;
    let q = nib(blk + 6u, e) | (((qh >> e) & 1u) << 4u);
    o[i] = (f32(q) - 16.0) * d;
}",
        ),
        DType::Q5_1 => (
            format!("{BYTES}{HALF}{NIBBLE}"),
            "let blk = row + (g >> 2u) * 24u;
let d = rdf16(blk);
let m = rdf16(blk + 2u);
let qh = rd32(blk + 4u);
for (var i = 0u; i < 8u; i = i + 1u) {
    let e = (g & 3u) * 8u + i;
    let q = nib(blk + 8u, e) | (((qh >> e) & 1u) << 4u);
    o[i] = f32(q) * d + m;
}",
        ),
        other => unreachable!("no WGSL decoder for {other}"),
    };
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "{helpers}\nfn dec8(row: u32, g: u32) -> array<f32, 8> {{\n    var o: array<f32, 8>;\n{body}    return o;\n}}\n"
    )
}
