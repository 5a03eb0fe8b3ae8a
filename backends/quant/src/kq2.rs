//! kq2: kiln's own 2.25-bit weight format. Each block of 64 weights is turned
//! by a randomized Hadamard transform (RHT), cut into 8 groups of 8, and each
//! group is coded by one of 2¹⁷ points of the E8 lattice (shifted by ±¼) times
//! a 7-bit logarithmic block scale; a flag bit lets a block skip the rotation
//! when the importance weights say that is better.
//!
//! Row functions only, like the rest of the crate: [`kq2_row_bytes`],
//! [`quantize_kq2`], [`dequantize_kq2`] (back to the original basis, a
//! drop-in dequantizer) and [`dot_kq2`] (rotates `x` instead of the weights).
//!
//! # Block layout
//!
//! A row of n weights (n a multiple of 64) is n/64 blocks of 18 bytes, in
//! order: **144 bits per 64 weights = 2.25 bits per weight**.
//!
//! | byte | contents |
//! |---|---|
//! | 0 | bit 7: `U`, the block is stored unrotated; bits 0–6: scale index `k` |
//! | 1 | bit g (g = 0..8): bit 8 of group g's magnitude index |
//! | 2 + 2g, 3 + 2g | group g, a little-endian u16: bits 0–7 = bits 0–7 of the magnitude index `i`, bits 8–14 = sign bits of coordinates 0–6, bit 15 = shift bit `t` |
//!
//! Group g holds coordinates 8g..8g+8 of the block's *storage vector* v.
//! Its 17-bit codeword (magnitude index i ∈ 0..512, sign bits b₀..b₆, shift
//! bit t) decodes to
//!
//! ```text
//! a   = A[i] / 2                       magnitudes: A[i] ∈ {1,3,5,7}⁸ (below)
//! b₇  = (popcount(b₀..b₆) + P(i)) mod 2,   P(i) = ((Σⱼ A[i]ⱼ) / 2) mod 2
//! cⱼ  = (−1)^bⱼ · aⱼ + (t ? −¼ : +¼)
//! v[8g + j] = scale(k) · cⱼ
//! ```
//!
//! `k = 0` is the all-zero block (scale 0). Otherwise
//! `scale(k) = M[(k − 1) mod 5] · 2^(⌊(k − 1)/5⌋ − 17)` with `M` the f32
//! values nearest to 2^(j/5), j = 0..5 ([`KQ2_SCALE_MANTISSAS`]): five steps
//! per octave from 2⁻¹⁷ ≈ 7.6·10⁻⁶ (k = 1) through 1 (k = 86) to 294.1
//! (k = 127), each an exact product. Weights, for j = 0..64:
//!
//! ```text
//! U = 1:  w[j] = v[j]
//! U = 0:  w[j] = S[j] · (1/8) · Σₘ (−1)^popcount(j & m) · v[m]      (w = S ⊙ H·v / 8)
//! ```
//!
//! H is the 64×64 Sylvester–Hadamard matrix and `S[j] = −1` where bit j of
//! [`KQ2_RHT_SIGNS`] is set (the splitmix64 output of the fixed seed
//! `0x6b71_325f_7268_7421`, "kq2_rht!"). H·H = 64·I, so the quantizer's
//! forward rotation is v = H·(S ⊙ w)/8 and the transform is orthogonal. The
//! reference decoder runs H as the radix-2 butterfly of [`dequantize_kq2`];
//! another implementation (a GPU kernel) agrees to f32 rounding.
//!
//! ## The codebook
//!
//! A (the magnitude codebook, [`kq2_abs_codebook`]) holds the first 512
//! vectors of {1,3,5,7}⁸ in the order (Σ k², largest k, number of distinct
//! values, lexicographic). That is: all 451 vectors with Σ k² ≤ 48 (the
//! permutations of 1⁸, 31⁷, 3²1⁶, 3³1⁵, 51⁷, 3⁴1⁴, 531⁶, 3⁵1³, 53²1⁵), all 28 of
//! 3⁶1², all 28 of 5²1⁶ and the 5 lexicographically first of 53³1⁴ (Σ k² = 56).
//!
//! With the parity rule, s = (−1)^b ⊙ a has half-integer coordinates and an
//! even sum, i.e. s is a point of the E8 lattice (its half-integer coset) with
//! |s|² ≤ 14, and each codeword is c = s ± ¼·1. The 2¹⁷ codewords are the
//! 65 536 such points of E8 shifted by +¼ and by −¼: QuIP#'s "E8P"
//! construction (E8 + ¼, 7 sign bits with a parity rule, a shift bit) with
//! its magnitude table doubled from 256 to 512 entries; the table is computed
//! here from the rule above at first use, not copied. The codewords are
//! distinct (s + ¼ has every coordinate in Z + ¾, s − ¼ in Z + ¼, and no
//! coordinate of s is 0, so its magnitudes and signs are determined) and the
//! set is symmetric under negation (−(s + ¼) = (−s) − ¼, and −s keeps the parity).
//!
//! # Why this design
//!
//! llama.cpp's IQ2_XS (2.3125 bpw) codes unrotated weights by 8 with an
//! E8-derived 512-point grid, 7 sign bits + parity, and a 4-bit scale per 16.
//! kq2 spends its bits differently, each choice measured on Qwen2.5-Coder-0.5B
//! rows with a real importance matrix (`tests/oracle/kq2_compare.py`):
//!
//! * **Rotation.** The RHT makes each block's coordinates nearly Gaussian and
//!   spreads outliers, which is where lattice codebooks are at their best and
//!   where fine-grained scales stop paying: kq2 spends 0.125 bits per weight
//!   on its scale and flag, IQ2_XS 0.3125 on its scales.
//! * **17-bit codewords, 7-bit scale** rather than E8P's 16-bit codewords and
//!   an f16 scale (also 2.25 bpw): doubling the magnitude table cuts the
//!   Gaussian MSE at the best fixed scale from 0.090 to 0.078 (about 8% RMSE on
//!   real rows), while a log scale with 5 steps per octave costs under 1%
//!   against a finer one (the search tries neighbouring steps anyway) and
//!   leaves a bit for `U`.
//! * **The `U` flag.** Importance (mean squared activation per column) is
//!   very uneven in LLM layers (max/mean 11–66 here). The rotation spreads
//!   every coordinate's error over all 64 columns, so a block whose
//!   importance sits in a few columns is better stored unrotated and searched
//!   with the importance as its metric. The quantizer tries both and keeps
//!   the better: about 35–40% of real blocks choose `U`, worth about 3% RMSE.
//! * **2.25, not 2.3125 bits.** Rows of 576 or 896 weights are not whole
//!   256-blocks (IQ2_XS cannot quantize them at all), and a 64-block must be
//!   whole bytes: 18 bytes is the most that stays at or under IQ2_XS's rate.
//!
//! # Quantization
//!
//! The error that counts is E = Σⱼ dⱼ (wⱼ − ŵⱼ)² with d the importance (or 1).
//! In the rotated basis E = rᵀ·M·r with r the storage-basis residual and
//! M = H·diag(d)·H/64: not diagonal, and its diagonal is exactly mean(d), so a
//! per-coordinate importance carried into the rotated basis would be a
//! constant. kq2 therefore never transforms the importance; per block it
//!
//! 1. normalizes the weights by a power of two, guesses k₀ from their RMS and
//!    tries scales k₀ − 1, k₀, k₀ + 1;
//! 2. rotated: finds each group's Euclidean-nearest codeword (exactly, via
//!    the sign/magnitude structure, see `nearest`), and judges every
//!    candidate by E in the original basis;
//! 3. unrotated: finds each group's nearest codeword under the diagonal
//!    metric d (exactly, see `nearest_weighted`);
//! 4. refines the two best rotated candidates by coordinate descent over the
//!    groups under the full M (each group moves to the codeword nearest its
//!    conditional optimum and keeps it if E drops), then refits the scale
//!    to the refined codes (weighted least squares, both neighbouring steps)
//!    and refines again;
//! 5. keeps the lowest E among these and the all-zero block.
//!
//! About 1.9 µs per weight on one core (ggml's IQ2_XS quantizer: 3.2 µs on the
//! same machine and rows); dequantization about 5 ns per weight.
//!
//! # Results
//!
//! Importance-weighted relative RMSE, sqrt(Σ d (w − ŵ)² / Σ d w²), on 256
//! rows each of attn_q, ffn_gate, ffn_up, ffn_down of layers 0, 12 and 23 of
//! Qwen2.5-Coder-0.5B, mean over the 12 tensors, every format quantized with
//! the same importance (`tests/oracle/kq2_compare.py`, llama.cpp b11434):
//!
//! | format | bits/weight | weighted relative RMSE | vs IQ2_XS |
//! |---|---|---|---|
//! | **kq2** | 2.25 | **0.1916** | **−22.0%** |
//! | kq2 quantized without the importance | 2.25 | 0.2227 | −9.4% |
//! | IQ2_XXS | 2.0625 | 0.2881 | +17.3% |
//! | IQ2_XS | 2.3125 | 0.2457 | |
//! | IQ2_S | 2.5625 | 0.2150 | −12.5% |
//! | Q2_K | 2.625 | 0.2108 | −14.2% |
//! | Q3_K | 3.4375 | 0.1214 | −50.6% |
//!
//! kq2 beats IQ2_XS on every one of the 12 tensors, by 14.7% (layer 0
//! ffn_up) to 47.8% (layer 0 attn_q), and IQ2_S and Q2_K on average at fewer
//! bits. (ggml needs whole 256-blocks, so it gets the 896-wide rows two at a
//! time.) Tensor error is not model quality: perplexity and KL divergence
//! against the unquantized model are the final judges.
//!
//! # Non-finite input
//!
//! Never panics. NaN and ±inf weights are quantized as 0. Importance entries
//! that are NaN, infinite, zero or negative count as 0; a block whose
//! importance is all 0 is quantized unweighted. Blocks beyond the scale range
//! saturate (the largest codeword coordinate is 2.75·294.1 ≈ 809, which the
//! rotation can spread into a single weight of up to 8 times that) and blocks
//! far below it become 0. Any 18 bytes decode to finite weights,
//! |w| ≤ 8·294.1·2.75.
//! `dot_kq2` with a non-finite `x` returns a non-finite result.

use std::ops::Range;
use std::sync::LazyLock;

use kiln_ir::DType;

use crate::QuantError;

/// Weights per block.
pub const KQ2_BLOCK_ELEMS: usize = 64;
/// Bytes per block.
pub const KQ2_BLOCK_BYTES: usize = 18;
/// Entries of the magnitude codebook (9 bits of each codeword).
pub const KQ2_ABS_ENTRIES: usize = 512;
/// Distinct codewords: 9 magnitude-index bits, 7 sign bits, 1 shift bit.
pub const KQ2_CODEWORDS: u32 = 1 << 17;
/// Largest scale index (7 bits).
pub const KQ2_SCALE_MAX: u8 = 127;
/// Byte-0 flag: the block is stored in the original basis.
pub const KQ2_UNROTATED: u8 = 0x80;
/// f32 nearest to 2^(j/5), j = 0..5: the mantissas of the scale table.
pub const KQ2_SCALE_MANTISSAS: [f32; 5] = [1.0, 1.148_698_3, 1.319_508, 1.515_716_6, 1.741_101_1];

/// Weights per codeword.
const GROUP: usize = 8;
/// Codewords per block.
const GROUPS: usize = KQ2_BLOCK_ELEMS / GROUP;
/// Scale steps per octave.
const STEPS: i32 = 5;
/// scale(1) = 2^-E0.
const E0: i32 = 17;
/// The first scale tried is the one nearest this fraction of the block's RMS.
const SCALE_GUESS: f64 = 0.85;
/// Rotated candidates refined under the importance metric.
const REFINED: usize = 2;
/// Coordinate-descent sweeps over the 8 groups, at most.
const SWEEPS: usize = 3;

/// The dtype named in [`QuantError`]s.
const ERROR_DTYPE: DType = DType::KQ2;

/// splitmix64's output function.
const fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bit j set: weight j of every block is negated before the Hadamard
/// transform. splitmix64 of the seed "kq2_rht!" (`0x6b71_325f_7268_7421`).
pub const KQ2_RHT_SIGNS: u64 = splitmix64(0x6b71_325f_7268_7421);

/// Bytes of a row of `n` weights, or `None` when `n` is not a multiple of 64.
pub fn kq2_row_bytes(n: usize) -> Option<usize> {
    n.is_multiple_of(KQ2_BLOCK_ELEMS).then(|| n / KQ2_BLOCK_ELEMS * KQ2_BLOCK_BYTES)
}

/// Checks that `bytes` holds exactly the blocks of `elems` weights.
fn check(elems: usize, bytes: usize) -> Result<(), QuantError> {
    let partial = QuantError::PartialBlock { dtype: ERROR_DTYPE, elems, block_elems: KQ2_BLOCK_ELEMS as u64 };
    let expected = kq2_row_bytes(elems).ok_or(partial)?;
    if expected != bytes {
        return Err(QuantError::SizeMismatch { dtype: ERROR_DTYPE, elems, expected, actual: bytes });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Scales and rotation

/// The scale of index `k` (see the module docs); 0 for k = 0, and indices
/// above 127 (which a block cannot hold) read as their low 7 bits.
#[inline]
pub fn kq2_scale(k: u8) -> f32 {
    let k = i32::from(k & 0x7f);
    if k == 0 {
        return 0.0;
    }
    let j = k - 1;
    // 2^(j/5 − 17) as mantissa × exact power of two (a normal f32: −17..=8).
    let pow2 = f32::from_bits(((j / STEPS - E0 + 127) as u32) << 23);
    KQ2_SCALE_MANTISSAS[(j % STEPS) as usize] * pow2
}

/// In-place unnormalized fast Walsh–Hadamard transform (v ← H·v).
#[inline]
pub fn fwht64(v: &mut [f32; 64]) {
    let mut h = 1;
    while h < 64 {
        for i in (0..64).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// S[j]: −1 where bit j of [`KQ2_RHT_SIGNS`] is set.
#[inline]
fn rht_sign(j: usize) -> f32 {
    if KQ2_RHT_SIGNS >> j & 1 == 1 { -1.0 } else { 1.0 }
}

/// The storage basis of a rotated block: v = H·(S ⊙ w)/8 (kernels that rotate
/// the activations instead of the weights, as [`dot_kq2`] does, apply it to x).
#[inline]
pub fn kq2_rotate(w: &[f32; 64]) -> [f32; 64] {
    rotate(w)
}

#[inline]
fn rotate(w: &[f32; 64]) -> [f32; 64] {
    let mut v: [f32; 64] = std::array::from_fn(|j| w[j] * rht_sign(j));
    fwht64(&mut v);
    v.map(|e| e * 0.125)
}

/// The original basis of a rotated block, in place: w = S ⊙ (H·v)/8.
#[inline]
fn unrotate(v: &mut [f32; 64]) {
    fwht64(v);
    for (j, e) in v.iter_mut().enumerate() {
        *e *= 0.125 * rht_sign(j);
    }
}

// ---------------------------------------------------------------------------
// Codebook

/// A permutation class of magnitude vectors (the arrangements of one multiset).
struct Class {
    /// Magnitudes in descending order.
    a: [f32; 8],
    /// The same as odd integers (a = k/2).
    k: [u8; 8],
    /// Σ a².
    norm2: f32,
    /// Required parity of the number of negative signs.
    parity: u8,
    /// Whether the codebook holds every arrangement.
    full: bool,
    /// How often each of the magnitudes ½, 3/2, 5/2, 7/2 occurs.
    count: [u8; 4],
    /// Its members' chunks in [`Codebook::chunks`].
    range: Range<usize>,
}

/// Eight codebook entries as columns (`a[i][l]`: coordinate i of lane l);
/// each class is padded to whole chunks with lanes that never win.
struct Chunk {
    a: [[f32; 8]; 8],
    /// 0 for an entry, +inf for padding.
    pad: [f32; 8],
    /// The entry's parity as 0.0 or 1.0.
    parity: [f32; 8],
    idx: [u16; 8],
}

/// The magnitude codebook and the search structures derived from it.
struct Codebook {
    /// A: odd integers k, the magnitudes are k/2.
    abs: Vec<[u8; 8]>,
    /// Magnitudes k/2.
    vals: Vec<[f32; 8]>,
    /// P: required parity of the number of negative signs, (Σk/2) mod 2.
    parity: Vec<u8>,
    /// Classes by ascending norm.
    classes: Vec<Class>,
    chunks: Vec<Chunk>,
    /// Entry index by [`key`], `u16::MAX` where absent.
    lookup: Vec<u16>,
}

/// Upper bound on the number of permutation classes in the codebook (12).
const MAX_CLASSES: usize = 16;

/// A magnitude vector packed in 16 bits: (k − 1)/2 in 2 bits per coordinate.
#[inline]
fn key(k: &[u8; 8]) -> usize {
    k.iter().enumerate().fold(0, |a, (i, &v)| a | usize::from((v - 1) / 2) << (2 * i))
}

/// (Σk/2) mod 2 for odd k: the sign parity that puts σ ⊙ k/2 in E8.
fn parity_of(k: &[u8; 8]) -> u8 {
    (k.iter().map(|&v| u32::from(v)).sum::<u32>() / 2 % 2) as u8
}

/// The sort key of the magnitude table: (Σk², max k, distinct values, k).
fn table_order(k: &[u8; 8]) -> (u32, u8, usize, [u8; 8]) {
    let mut sorted = *k;
    sorted.sort_unstable();
    let distinct = 1 + sorted.windows(2).filter(|w| w[0] != w[1]).count();
    (k.iter().map(|&v| u32::from(v) * u32::from(v)).sum(), sorted[7], distinct, *k)
}

/// The magnitude table A: the first 512 of {1,3,5,7}⁸ in [`table_order`].
fn abs_entries() -> Vec<[u8; 8]> {
    let mut all: Vec<[u8; 8]> =
        (0u32..1 << 16).map(|code| std::array::from_fn(|i| (2 * (code >> (2 * i) & 3) + 1) as u8)).collect();
    // Keys computed once per entry (the keys are distinct, so the order is the same).
    all.sort_by_cached_key(table_order);
    all.truncate(KQ2_ABS_ENTRIES);
    all
}

/// Distinct arrangements of a multiset of 8 (sorted descending).
fn arrangements(p: &[u8; 8]) -> usize {
    let fact = |n: usize| (1..=n).product::<usize>();
    let mut n = fact(8);
    let mut i = 0;
    while i < 8 {
        let run = p[i..].iter().take_while(|&&v| v == p[i]).count();
        n /= fact(run);
        i += run;
    }
    n
}

fn build_codebook() -> Codebook {
    let abs = abs_entries();
    let vals: Vec<[f32; 8]> = abs.iter().map(|k| k.map(|v| f32::from(v) * 0.5)).collect();
    let parity: Vec<u8> = abs.iter().map(parity_of).collect();
    let mut lookup = vec![u16::MAX; 1 << 16];
    for (i, k) in abs.iter().enumerate() {
        lookup[key(k)] = i as u16;
    }
    // Classes by (Σk², partial, pattern): full classes before a partial one of the same norm.
    let mut by_pattern: std::collections::BTreeMap<[u8; 8], Vec<u16>> = Default::default();
    for (i, k) in abs.iter().enumerate() {
        let mut p = *k;
        p.sort_unstable_by(|a, b| b.cmp(a));
        by_pattern.entry(p).or_default().push(i as u16);
    }
    let mut order: Vec<(u32, bool, [u8; 8], Vec<u16>)> = by_pattern
        .into_iter()
        .map(|(p, list)| {
            let n2 = p.iter().map(|&v| u32::from(v) * u32::from(v)).sum();
            (n2, list.len() != arrangements(&p), p, list)
        })
        .collect();
    order.sort();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut classes = Vec::new();
    for (_, partial, pat, list) in order {
        let start = chunks.len();
        for part in list.chunks(8) {
            let mut ch = Chunk { a: [[0.0; 8]; 8], pad: [f32::INFINITY; 8], parity: [0.0; 8], idx: [0; 8] };
            for (l, &e) in part.iter().enumerate() {
                let e = usize::from(e);
                for (i, col) in ch.a.iter_mut().enumerate() {
                    col[l] = vals[e][i];
                }
                ch.pad[l] = 0.0;
                ch.parity[l] = f32::from(parity[e]);
                ch.idx[l] = e as u16;
            }
            chunks.push(ch);
        }
        let a = pat.map(|v| f32::from(v) * 0.5);
        classes.push(Class {
            a,
            k: pat,
            norm2: a.iter().map(|v| v * v).sum(),
            parity: parity_of(&pat),
            full: !partial,
            count: std::array::from_fn(|m| pat.iter().filter(|&&v| v == 2 * m as u8 + 1).count() as u8),
            range: start..chunks.len(),
        });
    }
    debug_assert!(classes.len() <= MAX_CLASSES, "the table has 12 classes");
    Codebook { abs, vals, parity, classes, chunks, lookup }
}

static CODEBOOK: LazyLock<Codebook> = LazyLock::new(build_codebook);

/// The magnitude table A: entry i holds the odd integers k whose halves are
/// the magnitudes of magnitude index i (see the module docs).
pub fn kq2_abs_codebook() -> &'static [[u8; 8]] {
    &CODEBOOK.abs
}

/// Decodes a 17-bit codeword (bits 0–8 magnitude index, 9–15 sign bits of
/// coordinates 0–6, 16 shift bit; higher bits ignored) into its 8 values in
/// units of the block scale.
#[inline]
pub fn kq2_codeword(code: u32) -> [f32; 8] {
    decode_code(&CODEBOOK, code)
}

#[inline]
fn decode_code(cb: &Codebook, code: u32) -> [f32; 8] {
    let idx = (code & 0x1ff) as usize;
    let signs = code >> 9 & 0x7f;
    let shift = if code >> 16 & 1 == 1 { -0.25 } else { 0.25 };
    let signs = signs | ((signs.count_ones() + u32::from(cb.parity[idx])) & 1) << 7;
    let a = &cb.vals[idx];
    std::array::from_fn(|i| if signs >> i & 1 == 1 { shift - a[i] } else { a[i] + shift })
}

/// The codeword nearest to `y` (Euclidean). Exposed for tests.
#[doc(hidden)]
pub fn kq2_nearest(y: &[f32; 8]) -> u32 {
    nearest(&CODEBOOK, y)
}

/// The codeword nearest to `y` under the diagonal metric `w` (w ≥ 0). Exposed for tests.
#[doc(hidden)]
pub fn kq2_nearest_weighted(y: &[f32; 8], w: &[f32; 8]) -> u32 {
    nearest_weighted(&CODEBOOK, y, w)
}

// ---------------------------------------------------------------------------
// Row functions

/// The 17-bit codeword of group `g` of a block.
#[inline]
fn block_code(b: &[u8; KQ2_BLOCK_BYTES], g: usize) -> u32 {
    let lo = u32::from(u16::from_le_bytes([b[2 + 2 * g], b[3 + 2 * g]]));
    (lo & 0xff) | u32::from(b[1] >> g & 1) << 8 | (lo >> 8) << 9
}

fn encode_block(k: u8, unrotated: bool, codes: &[u32; GROUPS], b: &mut [u8; KQ2_BLOCK_BYTES]) {
    b[0] = k | if unrotated { KQ2_UNROTATED } else { 0 };
    b[1] = 0;
    for (g, &code) in codes.iter().enumerate() {
        b[1] |= ((code >> 8 & 1) as u8) << g;
        let lo = (code & 0xff) | (code >> 9 & 0xff) << 8;
        b[2 + 2 * g..4 + 2 * g].copy_from_slice(&(lo as u16).to_le_bytes());
    }
}

/// Decodes a block's codewords times `s` into `out` (storage basis).
#[inline]
fn decode_codes(cb: &Codebook, codes: impl Fn(usize) -> u32, s: f32, out: &mut [f32; 64]) {
    for (g, o) in out.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        let c = decode_code(cb, codes(g));
        for i in 0..8 {
            o[i] = c[i] * s;
        }
    }
}

/// Dequantizes a kq2 row into `dst`, in the original basis: `src` must hold
/// exactly the blocks of `dst.len()` weights.
pub fn dequantize_kq2(src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check(dst.len(), src.len())?;
    let cb = &*CODEBOOK;
    for (b, o) in src.as_chunks::<KQ2_BLOCK_BYTES>().0.iter().zip(dst.as_chunks_mut::<64>().0) {
        decode_codes(cb, |g| block_code(b, g), kq2_scale(b[0]), o);
        if b[0] & KQ2_UNROTATED == 0 {
            unrotate(o);
        }
    }
    Ok(())
}

/// Dot product of a kq2 row with `x` (`x.len()` weights; `row` must hold
/// exactly their blocks), without going back to the original basis: for a
/// rotated block w·x = v·(H·(S ⊙ x)/8), since the rotation is orthogonal, so
/// `x` is rotated once per block and dotted with the decoded codewords, and
/// the block scale is applied once. Equal to [`dequantize_kq2`] followed by a
/// dot product up to f32 rounding.
pub fn dot_kq2(row: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check(x.len(), row.len())?;
    Ok(dot_kq2_rotated(row, x, &kq2_rotate_row(x)))
}

/// `x` with every 64-block rotated to the storage basis ([`kq2_rotate`]); a
/// tail shorter than a block is copied as is.
pub fn kq2_rotate_row(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(64) {
        match <&[f32; 64]>::try_from(b) {
            Ok(b) => out.extend_from_slice(&rotate(b)),
            Err(_) => out.extend_from_slice(b),
        }
    }
    out
}

/// [`dot_kq2`] with the rotated activations given (`xr = kq2_rotate_row(x)`,
/// computed once per activation row for all weight rows): the definition of
/// kq2's dot product, whose order SIMD kernels reproduce. Per block: eight
/// lanes `lanes[i] += c[i]·x[8g + i]` over the groups g (a multiply, then an
/// add), reduced as `((l0+l4) + (l1+l5)) + ((l2+l6) + (l3+l7))`, then
/// `acc += scale · that`. Blocks past the shorter of `row` and `x` are ignored.
pub fn dot_kq2_rotated(row: &[u8], x: &[f32], xr: &[f32]) -> f32 {
    let cb = &*CODEBOOK;
    let mut acc = 0.0f32;
    for ((b, xs), xrs) in
        row.as_chunks::<KQ2_BLOCK_BYTES>().0.iter().zip(x.as_chunks::<64>().0).zip(xr.as_chunks::<64>().0)
    {
        let s = kq2_scale(b[0]);
        if s == 0.0 {
            continue;
        }
        let xv = if b[0] & KQ2_UNROTATED == 0 { xrs } else { xs };
        let mut lanes = [0.0f32; 8];
        for (g, xg) in xv.as_chunks::<8>().0.iter().enumerate() {
            let c = decode_code(cb, block_code(b, g));
            for i in 0..8 {
                lanes[i] += c[i] * xg[i];
            }
        }
        acc += s * (((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])));
    }
    acc
}

/// One row of activations in kq2's 8-bit dot type: per 64-block the
/// original-basis values and their rotation ([`kq2_rotate`]), each quantized
/// to `i8` with its own scale `d = amax/127` (`q = round_half_even(v·127/amax)`).
///
/// This is kq2's counterpart of ggml's Q8_K: with it a block's dot product is
/// one exact integer sum (the codewords times 4 are odd integers in −15..15,
/// so `Σ 4c·q` over 64 weights fits easily in an `i32`) and one float step.
/// It is what `Numerics::Ggml` (the CPU backend's numerics) uses for kq2; the
/// exact-activation definition [`dot_kq2_rotated`] stays the reference's.
#[derive(Clone, Debug, PartialEq)]
pub struct Kq2Q8Row {
    /// Per block: `[d of the original-basis quants, d of the rotated quants]`.
    pub d: Vec<[f32; 2]>,
    /// Per block 128 quants: the 64 original-basis ones, then the 64 rotated ones.
    pub q: Vec<i8>,
}

impl Kq2Q8Row {
    /// Quants and scale of block `bi` in the basis its weights are stored in.
    #[inline]
    pub fn block(&self, bi: usize, unrotated: bool) -> (&[i8], f32) {
        let which = usize::from(!unrotated);
        (&self.q[bi * 128 + 64 * which..bi * 128 + 64 * which + 64], self.d[bi][which])
    }
}

/// Quantizes `x` as [`Kq2Q8Row`]: whole 64-blocks only (a tail is dropped, as
/// kq2 rows have none). A block with a non-finite value gets scale NaN and
/// zero quants, so a dot with it is NaN (as with exact activations).
pub fn quantize_kq2_q8(x: &[f32]) -> Kq2Q8Row {
    let blocks = x.as_chunks::<64>().0;
    let mut d = Vec::with_capacity(blocks.len());
    let mut q = vec![0i8; blocks.len() * 128];
    for (b, qb) in blocks.iter().zip(q.chunks_exact_mut(128)) {
        let r = rotate(b);
        let mut ds = [0f32; 2];
        for ((v, qh), dv) in [b, &r].into_iter().zip(qb.chunks_exact_mut(64)).zip(&mut ds) {
            *dv = quantize_i8(v, qh);
        }
        d.push(ds);
    }
    Kq2Q8Row { d, q }
}

/// `q = round_half_even(v·127/amax)`, returning `amax/127` (0 for an all-zero
/// block, NaN with zero quants when a value is not finite).
fn quantize_i8(v: &[f32; 64], q: &mut [i8]) -> f32 {
    if !v.iter().all(|e| e.is_finite()) {
        q.fill(0);
        return f32::NAN;
    }
    let amax = v.iter().fold(0f32, |m, e| m.max(e.abs()));
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let id = 127.0 / amax;
    for (o, e) in q.iter_mut().zip(v) {
        *o = round_ties_even_small(e * id) as i8;
    }
    amax / 127.0
}

/// `x.round_ties_even()` for |x| < 2²² (up to the sign of a zero): adding and taking away
/// 1.5·2²³ leaves the nearest integer, ties to even, under the default rounding. Inline
/// arithmetic, where `round_ties_even` is a libm call per element on baseline x86-64 (no
/// SSE4.1 `roundss`): that call was a tenth of a 2-bit prefill.
#[inline(always)]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12582912.0; // 1.5·2²³
    (x + MAGIC) - MAGIC
}

/// The codeword of `code` times 4 (odd integers in −15..=15), exactly.
#[inline]
fn decode_code4(cb: &Codebook, code: u32) -> [i8; 8] {
    decode_code(cb, code).map(|c| (4.0 * c) as i8)
}

/// Dot of a kq2 row with [`Kq2Q8Row`] activations, the definition the SIMD
/// kernels reproduce bit for bit. Per block with a nonzero scale `s`, against
/// the quants of the block's storage basis (rotated unless the `U` flag is
/// set) with their scale `d`: one exact integer `Σ 4c·q` over the block's 64
/// weights, added as `acc = fma(isum, ¼·(s·d), acc)`, blocks in order. Blocks
/// past the shorter of `row` and `x` are ignored.
///
/// One float step per block (not one per lane, as ggml's legacy dots take): a
/// decode kernel holding a block in one 512-bit vector reduces its `vpdpbusd`
/// sums exactly in integers, and a prefill kernel with token rows across its
/// vector lanes keeps one accumulator per row and token half, in registers.
pub fn dot_kq2_q8(row: &[u8], x: &Kq2Q8Row) -> f32 {
    let cb = &*CODEBOOK;
    let mut acc = 0f32;
    for (bi, b) in row.as_chunks::<KQ2_BLOCK_BYTES>().0.iter().enumerate().take(x.d.len()) {
        let s = kq2_scale(b[0]);
        if s == 0.0 {
            continue;
        }
        let (q, d) = x.block(bi, b[0] & KQ2_UNROTATED != 0);
        let mut isum = 0i32;
        for g in 0..8 {
            for (w, &qv) in decode_code4(cb, block_code(b, g)).iter().zip(&q[8 * g..8 * g + 8]) {
                isum += i32::from(*w) * i32::from(qv);
            }
        }
        acc = (isum as f32).mul_add(0.25 * (s * d), acc);
    }
    acc
}

/// Quantizes a row of `src.len()` weights (a multiple of 64) into `dst`
/// (exactly its blocks), minimizing Σ importance · error² per block.
///
/// `importance` has one weight per element (for a weight matrix row: the
/// mean squared activation of each input column, an imatrix); `None` weighs
/// every element equally. See the module docs for the search and for
/// non-finite values.
pub fn quantize_kq2(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) -> Result<(), QuantError> {
    check(src.len(), dst.len())?;
    if let Some(w) = importance
        && w.len() != src.len()
    {
        return Err(QuantError::ImportanceLength { dtype: ERROR_DTYPE, elems: src.len(), actual: w.len() });
    }
    let cb = &*CODEBOOK;
    let blocks = src.as_chunks::<64>().0.iter().zip(dst.as_chunks_mut::<KQ2_BLOCK_BYTES>().0);
    for (i, (x, b)) in blocks.enumerate() {
        let w = importance.and_then(|w| w.as_chunks::<64>().0.get(i));
        quant_block(cb, x, w, b);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Block search

/// One candidate encoding of a block and its weighted error (normalized units).
#[derive(Clone, Copy)]
struct Cand {
    k: u8,
    unrotated: bool,
    codes: [u32; GROUPS],
    err: f32,
}

/// What the search needs about one block, in normalized units.
struct Block {
    /// Weights divided by 2^e, so that max |x| is in [1, 2).
    x: [f32; 64],
    /// H·(S ⊙ x)/8.
    xr: [f32; 64],
    /// Importance, scaled to max 1.
    d: [f32; 64],
    /// Cholesky factor of M_gg (see [`refine`]), `None` if degenerate.
    chol: Option<[[f32; 8]; 8]>,
    e: i32,
}

impl Block {
    /// Scale index k in normalized units, if usable (finite, and not so small
    /// that the targets x/s could overflow).
    fn scale(&self, k: u8) -> Option<f32> {
        let s = (f64::from(kq2_scale(k)) * 2f64.powi(-self.e)) as f32;
        (s.is_finite() && s >= 1e-6).then_some(s)
    }

    /// E of codes in the original basis, at normalized scale `s`.
    fn err(&self, cb: &Codebook, codes: &[u32; GROUPS], s: f32, unrotated: bool) -> f32 {
        let mut y = [0.0f32; 64];
        decode_codes(cb, |g| codes[g], s, &mut y);
        if !unrotated {
            unrotate(&mut y);
        }
        let mut e = 0.0;
        for ((x, y), d) in self.x.iter().zip(&y).zip(&self.d) {
            e += d * (x - y) * (x - y);
        }
        e
    }
}

fn quant_block(cb: &Codebook, x: &[f32; 64], imp: Option<&[f32; 64]>, out: &mut [u8; KQ2_BLOCK_BYTES]) {
    let x = x.map(|v| if v.is_finite() { v } else { 0.0 });
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        encode_block(0, false, &[0; GROUPS], out);
        return;
    }
    let e = amax.log2().floor() as i32;
    let x = x.map(|v| (f64::from(v) * 2f64.powi(-e)) as f32);
    let mut d = match imp {
        Some(w) => w.map(|v| if v.is_finite() && v > 0.0 { v } else { 0.0 }),
        None => [1.0; 64],
    };
    let dmax = d.iter().fold(0.0f32, |a, v| a.max(*v));
    d = if dmax > 0.0 { d.map(|v| v / dmax) } else { [1.0; 64] };
    // M = H·diag(d)·H/64 has M_ab = (H·d)[a ^ b]/64, so every 8×8 diagonal block is the same.
    let mut hd = d;
    fwht64(&mut hd);
    let mgg: [[f32; 8]; 8] = std::array::from_fn(|a| std::array::from_fn(|b| hd[a ^ b] / 64.0));
    let blk = Block { xr: rotate(&x), x, d, chol: cholesky8(mgg), e };

    let rms = (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 64.0).sqrt();
    let guess = ((rms * SCALE_GUESS).log2() + f64::from(e + E0)) * f64::from(STEPS) + 1.0;
    let k0 = guess.round().clamp(1.0, f64::from(KQ2_SCALE_MAX)) as u8;
    let ks = k0.saturating_sub(1).max(1)..=k0.saturating_add(1).min(KQ2_SCALE_MAX);

    let zero = Cand { k: 0, unrotated: false, codes: [0; GROUPS], err: blk.err(cb, &[0; GROUPS], 0.0, true) };
    let mut best = zero;
    let mut rotated: Vec<Cand> = Vec::with_capacity(3);
    for k in ks {
        let Some(s) = blk.scale(k) else { continue };
        let inv = 1.0 / s;
        let codes = std::array::from_fn(|g| nearest(cb, &std::array::from_fn(|i| blk.xr[8 * g + i] * inv)));
        rotated.push(Cand { k, unrotated: false, codes, err: blk.err(cb, &codes, s, false) });
        let codes = std::array::from_fn(|g| {
            let y = std::array::from_fn(|i| blk.x[8 * g + i] * inv);
            nearest_weighted(cb, &y, &std::array::from_fn(|i| blk.d[8 * g + i]))
        });
        let c = Cand { k, unrotated: true, codes, err: blk.err(cb, &codes, s, true) };
        if c.err < best.err {
            best = c;
        }
    }
    rotated.sort_by(|a, b| a.err.total_cmp(&b.err));
    for (i, &c) in rotated.iter().enumerate() {
        let c = if i < REFINED { refine_and_refit(cb, &blk, c) } else { c };
        if c.err < best.err {
            best = c;
        }
    }
    encode_block(best.k, best.unrotated, &best.codes, out);
}

/// [`refine`], then the weighted least-squares scale of the refined codes
/// (both neighbouring steps, each refined again); the best of these.
fn refine_and_refit(cb: &Codebook, blk: &Block, mut c: Cand) -> Cand {
    refine(cb, blk, &mut c);
    let mut u = [0.0f32; 64];
    decode_codes(cb, |g| c.codes[g], 1.0, &mut u);
    unrotate(&mut u);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((d, x), u) in blk.d.iter().zip(&blk.x).zip(&u) {
        num += f64::from(d * x * u);
        den += f64::from(d * u * u);
    }
    if !(num > 0.0 && den > 0.0) {
        return c;
    }
    let pos = ((num / den).log2() + f64::from(blk.e + E0)) * f64::from(STEPS) + 1.0;
    let pos = pos.clamp(1.0, f64::from(KQ2_SCALE_MAX));
    let mut best = c;
    for k in [pos.floor() as u8, pos.ceil() as u8] {
        if k == c.k {
            continue;
        }
        let Some(s) = blk.scale(k) else { continue };
        let mut t = Cand { k, err: blk.err(cb, &c.codes, s, false), ..c };
        refine(cb, blk, &mut t);
        if t.err < best.err {
            best = t;
        }
    }
    best
}

/// Improves rotated codes under the importance by coordinate descent over
/// the groups.
///
/// With r = x'/s − c (storage basis, code units) the block's error is
/// s²·rᵀ·M·r, M = H·diag(d)·H/64. With the other groups fixed it is a
/// quadratic in r_g whose continuous minimum puts c_g at
/// x'_g/s + M_gg⁻¹·((M·r)_g − M_gg·r_g); the codeword nearest that point
/// replaces c_g if the exact error change 2Δᵀ(M·r)_g + ΔᵀM_ggΔ is negative.
/// M·r costs two Hadamard transforms; M_gg is factored once per block.
fn refine(cb: &Codebook, blk: &Block, c: &mut Cand) {
    let (Some(l), Some(s)) = (blk.chol, blk.scale(c.k)) else { return };
    let u = blk.xr.map(|v| v / s);
    let mut cv = [0.0f32; 64];
    decode_codes(cb, |g| c.codes[g], 1.0, &mut cv);
    let mut r: [f32; 64] = std::array::from_fn(|i| u[i] - cv[i]);
    let mut changed = false;
    // M·r·64, recomputed only after r changed.
    let mut t = [0.0f32; 64];
    let mut stale = true;
    for _ in 0..SWEEPS {
        let mut moved = false;
        for g in 0..GROUPS {
            if stale {
                t = r;
                fwht64(&mut t);
                for (tj, dj) in t.iter_mut().zip(&blk.d) {
                    *tj *= dj;
                }
                fwht64(&mut t);
                stale = false;
            }
            let mr: [f32; 8] = std::array::from_fn(|i| t[8 * g + i] / 64.0);
            let rg: [f32; 8] = std::array::from_fn(|i| r[8 * g + i]);
            let mrg = mul_llt(&l, &rg);
            let delta = solve_llt(&l, &std::array::from_fn(|i| mr[i] - mrg[i]));
            let code = nearest(cb, &std::array::from_fn(|i| u[8 * g + i] + delta[i]));
            if code == c.codes[g] {
                continue;
            }
            let nc = decode_code(cb, code);
            let dr: [f32; 8] = std::array::from_fn(|i| u[8 * g + i] - nc[i] - rg[i]);
            let mdr = mul_llt(&l, &dr);
            if (0..8).map(|i| dr[i] * (2.0 * mr[i] + mdr[i])).sum::<f32>() < 0.0 {
                c.codes[g] = code;
                for i in 0..8 {
                    r[8 * g + i] += dr[i];
                }
                moved = true;
                stale = true;
            }
        }
        changed |= moved;
        if !moved {
            break;
        }
    }
    if changed {
        c.err = blk.err(cb, &c.codes, s, false);
    }
}

/// Cholesky factor L (lower triangular) of m plus a ridge of 10⁻⁴·mean(diag),
/// or `None` if m is degenerate.
fn cholesky8(mut m: [[f32; 8]; 8]) -> Option<[[f32; 8]; 8]> {
    let tr = (0..8).map(|i| m[i][i]).sum::<f32>() / 8.0;
    if !(tr > 0.0 && tr.is_finite()) {
        return None;
    }
    for (i, row) in m.iter_mut().enumerate() {
        row[i] += 1e-4 * tr;
    }
    let mut l = [[0.0f32; 8]; 8];
    for i in 0..8 {
        for j in 0..=i {
            let s = m[i][j] - (0..j).map(|k| l[i][k] * l[j][k]).sum::<f32>();
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return None;
                }
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    Some(l)
}

/// L·Lᵀ·v.
fn mul_llt(l: &[[f32; 8]; 8], v: &[f32; 8]) -> [f32; 8] {
    let t: [f32; 8] = std::array::from_fn(|k| (k..8).map(|i| l[i][k] * v[i]).sum());
    std::array::from_fn(|i| (0..=i).map(|k| l[i][k] * t[k]).sum())
}

/// (L·Lᵀ)⁻¹·b.
fn solve_llt(l: &[[f32; 8]; 8], b: &[f32; 8]) -> [f32; 8] {
    let mut y = [0.0f32; 8];
    for i in 0..8 {
        y[i] = (b[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f32>()) / l[i][i];
    }
    let mut x = [0.0f32; 8];
    for i in (0..8).rev() {
        x[i] = (y[i] - (i + 1..8).map(|k| l[k][i] * x[k]).sum::<f32>()) / l[i][i];
    }
    x
}

// ---------------------------------------------------------------------------
// Nearest codeword

/// Sign bits of `z` (bit i: z_i < 0), with the bit of coordinate `flip`
/// toggled when needed to reach `parity` negative coordinates.
#[inline]
fn signs_for(z: &[f32; 8], parity: u8, flip: usize) -> u32 {
    let mut s = z.iter().enumerate().fold(0u32, |s, (i, v)| if *v < 0.0 { s | 1 << i } else { s });
    if s.count_ones() & 1 != u32::from(parity) {
        s ^= 1 << flip;
    }
    s
}

/// The coordinate whose sign flip costs least for magnitudes `a`: the smallest w·a·|z|.
#[inline]
fn cheapest_flip(a: &[f32; 8], az: &[f32; 8], w: &[f32; 8]) -> usize {
    (0..8).min_by(|&i, &j| (w[i] * a[i] * az[i]).total_cmp(&(w[j] * a[j] * az[j]))).unwrap_or(0)
}

/// The 17-bit codeword of entry `e`, sign bits `s`, shift bit `t`.
#[inline]
fn codeword(e: usize, s: u32, t: u32) -> u32 {
    e as u32 | (s & 0x7f) << 9 | t << 16
}

/// Exhaustive search of `chunks`: the smallest Σ w (|z| − a)² (plus
/// 4·min w·a·|z| where the parity needs a flip) and its entry.
fn scan(chunks: &[Chunk], az: &[f32; 8], w: &[f32; 8], neg: bool) -> (f32, usize) {
    let wz: [f32; 8] = std::array::from_fn(|i| w[i] * az[i]);
    let base: f32 = (0..8).map(|i| wz[i] * az[i]).sum();
    let (mut bd, mut be) = (f32::INFINITY, 0);
    for ch in chunks {
        // Σ w (|z| − a)² = Σ w z² − 2 Σ wz·a + Σ w a²; a flip costs 4·wz·a.
        let mut dot = [0.0f32; 8];
        let mut sq = [0.0f32; 8];
        let mut mn = [f32::INFINITY; 8];
        for i in 0..8 {
            for l in 0..8 {
                let a = ch.a[i][l];
                let t = wz[i] * a;
                dot[l] += t;
                sq[l] += w[i] * a * a;
                mn[l] = if t < mn[l] { t } else { mn[l] };
            }
        }
        for l in 0..8 {
            let need = if neg { 1.0 - ch.parity[l] } else { ch.parity[l] };
            let v = base + sq[l] - 2.0 * dot[l] + 4.0 * mn[l] * need + ch.pad[l];
            if v < bd {
                bd = v;
                be = usize::from(ch.idx[l]);
            }
        }
    }
    (bd, be)
}

/// `sorted` (descending) placed on the coordinates `order` (by descending |z|).
#[inline]
fn arrange(sorted: &[u8; 8], order: &[usize; 8]) -> [u8; 8] {
    let mut k = [0u8; 8];
    for (&o, &v) in order.iter().zip(sorted) {
        k[o] = v;
    }
    k
}

/// Nearest codeword (Euclidean) to `y`.
///
/// For a shift t and magnitudes a, the best signs are those of z = y − t,
/// except that the number of negative signs must have a's parity; when it
/// does not, the coordinate with the smallest a_i·|z_i| flips (the cheapest
/// change). Over a permutation class the best arrangement pairs the sorted
/// magnitudes with the sorted |z| (rearrangement inequality) and the
/// cheapest flip is then the last pair, so a class costs one sorted dot
/// product. For the one class the codebook holds in part that value is a
/// lower bound, and its members are scanned only when the bound could win and
/// the sorted arrangement is missing.
fn nearest(cb: &Codebook, y: &[f32; 8]) -> u32 {
    const ONES: [f32; 8] = [1.0; 8];
    let mut best = (0u32, f32::INFINITY);
    for (sbit, t) in [(0u32, 0.25f32), (1, -0.25)] {
        let z: [f32; 8] = std::array::from_fn(|i| y[i] - t);
        let az = z.map(f32::abs);
        let neg = (z.iter().filter(|v| **v < 0.0).count() & 1) as u8;
        // Coordinates by descending |z| (insertion sort).
        let mut order: [usize; 8] = std::array::from_fn(|i| i);
        for i in 1..8 {
            let mut j = i;
            while j > 0 && az[order[j - 1]] < az[order[j]] {
                order.swap(j - 1, j);
                j -= 1;
            }
        }
        let saz = order.map(|i| az[i]);
        let zz: f32 = az.iter().map(|v| v * v).sum();
        // The best full class (distance, class) and the best entry of a partial one.
        let mut bc: Option<(f32, usize)> = None;
        let mut bp: Option<(f32, usize, usize)> = None;
        let mut limit = best.1;
        for (ci, c) in cb.classes.iter().enumerate() {
            let mut dot: f32 = c.a.iter().zip(&saz).map(|(a, z)| a * z).sum();
            if c.parity != neg {
                dot -= 2.0 * c.a[7] * saz[7];
            }
            let d = zz + c.norm2 - 2.0 * dot;
            if d >= limit {
                continue;
            }
            if c.full {
                bc = Some((d, ci));
                limit = d;
                continue;
            }
            let e = cb.lookup[key(&arrange(&c.k, &order))];
            let (d, e, flip) = if e != u16::MAX {
                (d, usize::from(e), order[7])
            } else {
                let (d, e) = scan(&cb.chunks[c.range.clone()], &az, &ONES, neg == 1);
                (d, e, cheapest_flip(&cb.vals[e], &az, &ONES))
            };
            if d < limit {
                bp = Some((d, e, flip));
                bc = None;
                limit = d;
            }
        }
        let found = match (bc, bp) {
            (Some((d, ci)), _) => Some((d, usize::from(cb.lookup[key(&arrange(&cb.classes[ci].k, &order))]), order[7])),
            (None, p) => p,
        };
        if let Some((d, e, flip)) = found
            && d < best.1
        {
            best = (codeword(e, signs_for(&z, cb.parity[e], flip), sbit), d);
        }
    }
    best.0
}

/// Per-coordinate costs of the magnitudes ½, 3/2, 5/2, 7/2 (`cost[i][m]`),
/// with what [`assign`] needs precomputed.
#[derive(Clone, Copy)]
struct Costs {
    cost: [[f32; 4]; 8],
    /// Σ_i cost[i][0]: every coordinate at ½.
    base: f32,
    /// cost[i][1] − cost[i][0]: the gain of 3/2 over ½ (negative is better).
    g1: [f32; 8],
    /// Coordinates by ascending `g1`.
    order: [u8; 8],
    /// Position of each coordinate in `order`.
    rank: [u8; 8],
    /// prefix[n]: the sum of the n smallest gains.
    prefix: [f32; 9],
}

impl Costs {
    fn new(cost: [[f32; 4]; 8]) -> Costs {
        let g1: [f32; 8] = std::array::from_fn(|i| cost[i][1] - cost[i][0]);
        let mut order: [u8; 8] = std::array::from_fn(|i| i as u8);
        for i in 1..8 {
            let mut j = i;
            while j > 0 && g1[usize::from(order[j - 1])] > g1[usize::from(order[j])] {
                order.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut rank = [0u8; 8];
        let mut prefix = [0.0f32; 9];
        for (r, &i) in order.iter().enumerate() {
            rank[usize::from(i)] = r as u8;
            prefix[r + 1] = prefix[r] + g1[usize::from(i)];
        }
        Costs { cost, base: cost.iter().map(|r| r[0]).sum(), g1, order, rank, prefix }
    }

    /// Total gain of the best `m` coordinates for 3/2 other than `p` and `q`
    /// (8 for none): the first m of `order` once those are skipped.
    #[inline]
    fn threes_gain(&self, m: u8, p: usize, q: usize) -> f32 {
        let m = usize::from(m);
        let mut n = m;
        let mut minus = 0.0;
        // Each skipped coordinate among the first n pulls in the next one.
        let (rp, rq) =
            (self.rank.get(p).map_or(9, |&r| usize::from(r)), self.rank.get(q).map_or(9, |&r| usize::from(r)));
        let (lo, hi) = if rp <= rq { (rp, rq) } else { (rq, rp) };
        if lo < n {
            n += 1;
            minus += self.g1[usize::from(self.order[lo])];
            if hi < n {
                n += 1;
                minus += self.g1[usize::from(self.order[hi])];
            }
        }
        self.prefix[n.min(8)] - minus
    }

    /// The best `m` coordinates for 3/2 outside `taken`: total gain and mask.
    #[inline]
    fn threes(&self, m: u8, taken: u8) -> (f32, u8) {
        let (mut sum, mut mask, mut n) = (0.0f32, 0u8, 0);
        for &i in &self.order {
            if n == m {
                break;
            }
            if taken >> i & 1 == 0 {
                sum += self.g1[usize::from(i)];
                mask |= 1 << i;
                n += 1;
            }
        }
        (sum, mask)
    }

    /// Extra cost of magnitude `m` over ½ at coordinate `i`.
    #[inline]
    fn extra(&self, i: usize, m: usize) -> f32 {
        self.cost[i][m] - self.cost[i][0]
    }
}

/// The cheapest arrangement of class `c` under `t`: its total cost and where
/// it puts the magnitudes above 3/2 (see [`arrangement`]).
///
/// Every class of the codebook has at most two coordinates above 3/2 (see
/// [`abs_entries`]): those are placed by enumeration, and the 3/2's then go
/// to the remaining coordinates that gain most from them.
fn assign(c: &Class, t: &Costs) -> (f32, Placement) {
    let m1 = c.count[1];
    let mut best = (f32::INFINITY, [8u8; 2]);
    match (c.count[2], c.count[3]) {
        (0, 0) => best = (t.threes_gain(m1, 8, 8), [8; 2]),
        (1, 0) | (0, 1) => {
            let m = if c.count[2] == 1 { 2 } else { 3 };
            for p in 0..8 {
                let v = t.threes_gain(m1, p, 8) + t.extra(p, m);
                if v < best.0 {
                    best = (v, [p as u8, 8]);
                }
            }
        }
        (2, 0) if m1 == 0 => {
            // The two coordinates where 5/2 costs least.
            let (mut a, mut b) = ((f32::INFINITY, 8u8), (f32::INFINITY, 8u8));
            for p in 0..8 {
                let v = t.extra(p, 2);
                if v < a.0 {
                    b = a;
                    a = (v, p as u8);
                } else if v < b.0 {
                    b = (v, p as u8);
                }
            }
            best = (a.0 + b.0, [a.1, b.1]);
        }
        (2, 0) | (1, 1) => {
            let (m, n) = if c.count[3] == 1 { (2, 3) } else { (2, 2) };
            for p in 0..8 {
                for q in 0..8 {
                    if p == q || (m == n && q < p) {
                        continue;
                    }
                    let v = t.threes_gain(m1, p, q) + t.extra(p, m) + t.extra(q, n);
                    if v < best.0 {
                        best = (v, [p as u8, q as u8]);
                    }
                }
            }
        }
        // No class of the table has more (a test checks); such a class would never be chosen.
        _ => {}
    }
    (t.base + best.0, best.1)
}

/// Where [`assign`] put the magnitudes above 3/2 (8: unused; the first holds
/// the 5/2 of a class with a 5/2 and a 7/2).
type Placement = [u8; 2];

/// The magnitudes (odd integers) of class `c` arranged as [`assign`] found under `t`.
fn arrangement(c: &Class, t: &Costs, rare: Placement) -> [u8; 8] {
    let taken = rare.iter().filter(|&&p| p < 8).fold(0u8, |m, &p| m | 1 << p);
    let (_, mask) = t.threes(c.count[1], taken);
    let mut k = [1u8; 8];
    for (i, v) in k.iter_mut().enumerate() {
        if mask >> i & 1 == 1 {
            *v = 3;
        }
    }
    // Rare magnitudes in ascending order: 5/2's first, then 7/2.
    let mut mags = [5u8, 5];
    if c.count[3] == 1 {
        mags = [if c.count[2] == 1 { 5 } else { 7 }, 7];
    }
    for (r, &p) in rare.iter().enumerate() {
        if p < 8 {
            k[usize::from(p)] = mags[r];
        }
    }
    k
}

/// Nearest codeword to `y` under the diagonal metric `w` (w ≥ 0).
///
/// Same sign rule as [`nearest`]. The weights break the permutation symmetry,
/// so each class is an assignment problem: [`assign`] solves it exactly
/// ignoring the parity, which is the class's exact optimum when its parity
/// matches the signs and a lower bound otherwise; then the optimum with a
/// flipped coordinate j is the assignment with row j's costs replaced by the
/// flipped ones, minimized over j. Classes are visited by ascending bound and
/// the search stops at the first bound that cannot win. Partly held classes
/// are scanned member by member.
fn nearest_weighted(cb: &Codebook, y: &[f32; 8], w: &[f32; 8]) -> u32 {
    const MAGS: [f32; 4] = [0.5, 1.5, 2.5, 3.5];
    let mut best = (0u32, f32::INFINITY);
    for (sbit, t) in [(0u32, 0.25f32), (1, -0.25)] {
        let z: [f32; 8] = std::array::from_fn(|i| y[i] - t);
        let az = z.map(f32::abs);
        let neg = (z.iter().filter(|v| **v < 0.0).count() & 1) as u8;
        let tab = Costs::new(std::array::from_fn(|i| MAGS.map(|a| w[i] * (az[i] - a) * (az[i] - a))));
        let mut bounds: [(f32, usize, Placement); MAX_CLASSES] = [(f32::INFINITY, 0, [8; 2]); MAX_CLASSES];
        for (ci, c) in cb.classes.iter().enumerate() {
            let (lb, rare) = assign(c, &tab);
            bounds[ci] = (lb, ci, rare);
        }
        // The tables with coordinate j's sign flipped, built when first needed.
        let mut flipped: Option<[Costs; 8]> = None;
        let bounds = &mut bounds[..cb.classes.len()];
        bounds.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        // (distance, entry, flip)
        let mut found: Option<(f32, usize, usize)> = None;
        for &(lb, ci, rare) in bounds.iter() {
            let limit = found.map_or(best.1, |f| f.0.min(best.1));
            if lb.is_nan() || lb >= limit {
                break;
            }
            let c = &cb.classes[ci];
            let cand = if !c.full {
                let (d, e) = scan(&cb.chunks[c.range.clone()], &az, w, neg == 1);
                (d, e, cheapest_flip(&cb.vals[e], &az, w))
            } else if c.parity == neg {
                (lb, usize::from(cb.lookup[key(&arrangement(c, &tab, rare))]), 0)
            } else {
                let fl = flipped.get_or_insert_with(|| {
                    std::array::from_fn(|j| {
                        let mut fc = tab.cost;
                        fc[j] = MAGS.map(|a| w[j] * (az[j] + a) * (az[j] + a));
                        Costs::new(fc)
                    })
                });
                let mut bj = (f32::INFINITY, [8u8; 2], 0);
                for (j, t) in fl.iter().enumerate() {
                    let (v, rare) = assign(c, t);
                    if v < bj.0 {
                        bj = (v, rare, j);
                    }
                }
                (bj.0, usize::from(cb.lookup[key(&arrangement(c, &fl[bj.2], bj.1))]), bj.2)
            };
            if cand.0 < limit {
                found = Some(cand);
            }
        }
        if let Some((d, e, flip)) = found {
            best = (codeword(e, signs_for(&z, cb.parity[e], flip), sbit), d);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    /// The inline rounding equals `round_ties_even` on the range it is used on (|x| ≤ 127):
    /// a dense grid, every tie k + ½ and the floats on either side of each.
    #[test]
    fn inline_round_ties_even_matches_std() {
        let grid = (-(128 << 12)..=(128 << 12)).map(|i| i as f32 / 4096.0);
        let ties = (-128..128).flat_map(|k| {
            let t = k as f32 + 0.5;
            [t, f32::from_bits(t.to_bits() - 1), f32::from_bits(t.to_bits() + 1)]
        });
        for x in grid.chain(ties) {
            let (got, want) = (super::round_ties_even_small(x), x.round_ties_even());
            assert!(got == want, "{x}: {got} vs {want}");
        }
    }
}
