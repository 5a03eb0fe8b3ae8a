//! Quantized KV-cache kernels (`q8_0`, `q4_0`, `f8_e4m3`) in WGSL, with the PTX kernels' names,
//! arguments and grids (`kiln_ptx::kernels::kv_append_q`, `kv_dequant`): a thread per 64
//! values, rotated by `H/8` (the reference cache's butterflies, in the same order) and
//! stored as two ggml blocks (or 64 FP8 bytes). A 64-value chunk is 68 (q8_0), 36 (q4_0)
//! or 64 (f8_e4m3) bytes, whole words, so each thread writes only words of its own.

use kiln_ir::DType;
use kiln_ptx::kernels as ptxk;

use crate::kernels::{Arg, Kernel};

/// Butterflies and the f32 → f16 conversion shared by both kernels (f16 → f32 is
/// `formats::HALF`).
const COMMON: &str = "
fn rotate64(v: ptr<function, array<f32, 64>>) {
    for (var h = 1u; h < 64u; h = h * 2u) {
        for (var i = 0u; i < 64u; i = i + 2u * h) {
            for (var j = i; j < i + h; j = j + 1u) {
                let a = (*v)[j];
                let b = (*v)[j + h];
                (*v)[j] = a + b;
                (*v)[j + h] = a - b;
            }
        }
    }
    for (var i = 0u; i < 64u; i = i + 1u) {
        (*v)[i] = (*v)[i] * 0.125;
    }
}

// f32 to IEEE half bits, round to nearest even (integer ops only).
fn to_half(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let s = (b >> 16u) & 0x8000u;
    let e = i32((b >> 23u) & 0xffu) - 112;
    let m = b & 0x7fffffu;
    if e >= 31 {
        return s | select(0x7c00u, 0x7e00u, (b & 0x7fffffffu) > 0x7f800000u);
    }
    if e <= 0 {
        if e < -10 {
            return s;
        }
        let mm = m | 0x800000u;
        let shift = u32(14 - e);
        var hm = mm >> shift;
        let rem = mm & ((1u << shift) - 1u);
        let halfway = 1u << (shift - 1u);
        if rem > halfway || (rem == halfway && (hm & 1u) == 1u) {
            hm = hm + 1u;
        }
        return s | hm;
    }
    var hv = (u32(e) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if rem > 0x1000u || (rem == 0x1000u && (hv & 1u) == 1u) {
        hv = hv + 1u;
    }
    return s | hv;
}

fn inverse_or_zero(d: f32) -> f32 {
    return select(1.0 / d, 0.0, d == 0.0);
}
";

/// The WGSL that quantizes 32 values into the block at `bytes[o ..]`, and back.
fn block(dtype: DType) -> &'static str {
    match dtype {
        DType::Q8_0 => {
            "
fn quantize(v: ptr<function, array<f32, 64>>, first: u32, bytes: ptr<function, array<u32, 68>>, o: u32) {
    var amax = 0.0;
    for (var i = 0u; i < 32u; i = i + 1u) {
        amax = max(amax, abs((*v)[first + i]));
    }
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    let dh = to_half(d);
    (*bytes)[o] = dh & 0xffu;
    (*bytes)[o + 1u] = dh >> 8u;
    for (var i = 0u; i < 32u; i = i + 1u) {
        // Round half away from zero (C's roundf).
        let y = (*v)[first + i] * id;
        let t = trunc(y);
        var q = i32(t);
        if abs(y - t) >= 0.5 {
            q = q + select(1, -1, y < 0.0);
        }
        (*bytes)[o + 2u + i] = u32(q) & 0xffu;
    }
}

fn dequantize(bytes: ptr<function, array<u32, 68>>, o: u32, v: ptr<function, array<f32, 64>>, first: u32) {
    let d = half((*bytes)[o] | ((*bytes)[o + 1u] << 8u));
    for (var i = 0u; i < 32u; i = i + 1u) {
        let q = i32((*bytes)[o + 2u + i] << 24u) >> 24u;
        (*v)[first + i] = f32(q) * d;
    }
}
"
        }
        DType::Q4_0 => {
            "
fn quantize(v: ptr<function, array<f32, 64>>, first: u32, bytes: ptr<function, array<u32, 68>>, o: u32) {
    var amax = 0.0;
    var mx = 0.0;
    for (var i = 0u; i < 32u; i = i + 1u) {
        let x = (*v)[first + i];
        if amax < abs(x) {
            amax = abs(x);
            mx = x;
        }
    }
    let d = mx / -8.0;
    let id = inverse_or_zero(d);
    let dh = to_half(d);
    (*bytes)[o] = dh & 0xffu;
    (*bytes)[o + 1u] = dh >> 8u;
    for (var j = 0u; j < 16u; j = j + 1u) {
        let q0 = u32(clamp(i32(trunc((*v)[first + j] * id + 8.5)), 0, 15));
        let q1 = u32(clamp(i32(trunc((*v)[first + j + 16u] * id + 8.5)), 0, 15));
        (*bytes)[o + 2u + j] = q0 | (q1 << 4u);
    }
}

fn dequantize(bytes: ptr<function, array<u32, 68>>, o: u32, v: ptr<function, array<f32, 64>>, first: u32) {
    let d = half((*bytes)[o] | ((*bytes)[o + 1u] << 8u));
    for (var j = 0u; j < 16u; j = j + 1u) {
        let b = (*bytes)[o + 2u + j];
        (*v)[first + j] = f32(i32(b & 15u) - 8) * d;
        (*v)[first + j + 16u] = f32(i32(b >> 4u) - 8) * d;
    }
}
"
        }
        DType::F8E4M3 => {
            "
// f32 to an FP8 E4M3 code: nearest, ties to even, saturating at 448, NaN to 0x7f
// (kiln_quant::f32_to_f8e4m3_bits; WGSL's round() ties to even).
fn to_e4m3(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let s = (b >> 24u) & 0x80u;
    let a = b & 0x7fffffffu;
    if a > 0x7f800000u {
        return s | 0x7fu;
    }
    var m = ((a + 0x7ffffu + ((a >> 20u) & 1u)) >> 20u) - 960u;
    if a < 0x3c800000u {
        m = u32(round(bitcast<f32>(a) * 512.0));
    }
    return s | min(m, 0x7eu);
}

fn quantize(v: ptr<function, array<f32, 64>>, first: u32, bytes: ptr<function, array<u32, 68>>, o: u32) {
    for (var i = 0u; i < 32u; i = i + 1u) {
        (*bytes)[o + i] = to_e4m3((*v)[first + i]);
    }
}

fn dequantize(bytes: ptr<function, array<u32, 68>>, o: u32, v: ptr<function, array<f32, 64>>, first: u32) {
    for (var i = 0u; i < 32u; i = i + 1u) {
        (*v)[first + i] = e4m3((*bytes)[o + i]);
    }
}
"
        }
        other => panic!("no quantized KV cache of type {other}"),
    }
}

/// The WGSL module-scope code of a kernel over `dtype` blocks.
fn decls(dtype: DType) -> String {
    format!("{COMMON}{}{}{}{}", crate::formats::HALF, crate::formats::E4M3, crate::kernels::RING_ROW, block(dtype))
}

/// Words of one 64-value chunk (two blocks) and of one row of `p.width` values.
fn sizes(dtype: DType) -> (u64, String) {
    let bb = u64::from(ptxk::kv_block_bytes(dtype));
    (2 * bb / 4, format!("let row_words = (p.width >> 5u) * {bb}u / 4u;\n"))
}

/// `kv_append_q8_0` / `kv_append_q4_0`. Arguments `k, v, kc, vc, step, n (= T·width/64), width`.
pub fn kv_append_q(dtype: DType) -> Kernel {
    let bb = ptxk::kv_block_bytes(dtype);
    let (words, row_words) = sizes(dtype);
    // The same steps for K and for V.
    let store = |x: &str, cache: &str| {
        format!(
            "for (var i = 0u; i < 64u; i = i + 1u) {{
    v[i] = b_{x}[p.{x}_off + src + i];
}}
rotate64(&v);
quantize(&v, 0u, &bytes, 0u);
quantize(&v, 32u, &bytes, {bb}u);
for (var w = 0u; w < {words}u; w = w + 1u) {{
    b_{cache}[p.{cache}_off + dst + w] = bytes[4u * w] | (bytes[4u * w + 1u] << 8u) | (bytes[4u * w + 2u] << 16u) | (bytes[4u * w + 3u] << 24u);
}}
"
        )
    };
    Kernel::new(
        ptxk::kv_append_q_name(dtype),
        &[
            ("k", Arg::In),
            ("v", Arg::In),
            ("kc", Arg::OutWords),
            ("vc", Arg::OutWords),
            ("step", Arg::Words),
            ("n", Arg::U32),
            ("width", Arg::U32),
            ("rows", Arg::U32),
            ("sink", Arg::U32),
        ],
        decls(dtype),
        format!(
            "let c = wg.x * 128u + tid;
if c >= p.n {{
    return;
}}
let cpr = p.width >> 6u;
let r = c / cpr;
let j = c - r * cpr;
let src = r * p.width + j * 64u;
{row_words}let dst = ring_row(b_step[p.step_off] + r, p.rows, p.sink) * row_words + j * {words}u;
var v: array<f32, 64>;
var bytes: array<u32, 68>;
{}{}",
            store("k", "kc"),
            store("v", "vc")
        ),
    )
}

/// `kv_dequant_q8_0` / `kv_dequant_q4_0`: rows `0 .. pos + t` into f32 scratch rows.
/// Arguments `kc, vc, kf, vf, step, t, width`; grid `ceil(max_context·width/64 / 128)`.
pub fn kv_dequant(dtype: DType) -> Kernel {
    let bb = ptxk::kv_block_bytes(dtype);
    let (words, row_words) = sizes(dtype);
    let load = |cache: &str, f: &str| {
        format!(
            "for (var w = 0u; w < {words}u; w = w + 1u) {{
    let x = b_{cache}[p.{cache}_off + src + w];
    bytes[4u * w] = x & 0xffu;
    bytes[4u * w + 1u] = (x >> 8u) & 0xffu;
    bytes[4u * w + 2u] = (x >> 16u) & 0xffu;
    bytes[4u * w + 3u] = x >> 24u;
}}
dequantize(&bytes, 0u, &v, 0u);
dequantize(&bytes, {bb}u, &v, 32u);
rotate64(&v);
for (var i = 0u; i < 64u; i = i + 1u) {{
    b_{f}[p.{f}_off + dst + i] = v[i];
}}
"
        )
    };
    Kernel::new(
        ptxk::kv_dequant_name(dtype),
        &[
            ("kc", Arg::Words),
            ("vc", Arg::Words),
            ("kf", Arg::Out),
            ("vf", Arg::Out),
            ("step", Arg::Words),
            ("t", Arg::U32),
            ("width", Arg::U32),
            ("rows", Arg::U32),
        ],
        decls(dtype),
        format!(
            "let c = wg.x * 128u + tid;
let cpr = p.width >> 6u;
if c >= min(b_step[p.step_off] + p.t, p.rows) * cpr {{
    return;
}}
let r = c / cpr;
let j = c - r * cpr;
{row_words}let src = r * row_words + j * {words}u;
let dst = r * p.width + j * 64u;
var v: array<f32, 64>;
var bytes: array<u32, 68>;
{}{}",
            load("kc", "kf"),
            load("vc", "vf")
        ),
    )
}
