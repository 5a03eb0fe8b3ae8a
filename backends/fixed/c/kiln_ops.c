/* kiln fixed-point kernels (C99, integer only). Statement for statement the Rust
 * definition in kiln's backends/fixed/src/int.rs and interp.rs: activations are Q16
 * int32, products and sums int64, right shifts round half up, narrowing saturates. */

/* Cortex-M4/M7 (and any Armv7E-M/Armv8-M with the DSP extension): the matmul's inner loop
 * takes two 16x8-bit products per SMLAD. Integer sums are exact, so this path computes
 * the same bits as the portable one. */
#if defined(__ARM_FEATURE_SIMD32) && defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
#define K_SIMD32 1
#endif

static inline int64_t k_asr(int64_t x, int s) {
    return x >= 0 ? (x >> s) : -(((-x) - 1) >> s) - 1;
}

static inline int64_t k_rshr(int64_t x, int s) {
    return s == 0 ? x : k_asr(x + ((int64_t)1 << (s - 1)), s);
}

static inline int64_t k_shift_round(int64_t x, int s) {
    int64_t lim = (int64_t)1 << 62;
    int l;
    if (s > 62) return 0;
    if (s >= 0) return k_rshr(x, s);
    l = -s;
    if (l >= 62 || x > (lim >> l) || x < -(lim >> l)) return x > 0 ? lim : (x < 0 ? -lim : 0);
    return x * ((int64_t)1 << l);
}

static inline int32_t k_sat32(int64_t x) {
    return x > INT32_MAX ? INT32_MAX : (x < INT32_MIN ? INT32_MIN : (int32_t)x);
}

static inline int16_t k_sat16(int64_t x) {
    return x > 32767 ? 32767 : (x < -32767 ? -32767 : (int16_t)x);
}

static int k_bitlen(uint64_t u) {
    int n = 0;
    while (u) {
        n++;
        u >>= 1;
    }
    return n;
}

#if defined(KILN_USE_RMS_NORM)
static uint32_t k_isqrt(uint64_t n) {
    uint64_t rem = n, root = 0, bit = (uint64_t)1 << 62;
    while (bit > n) bit >>= 2;
    while (bit != 0) {
        if (rem >= root + bit) {
            rem -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    return (uint32_t)root;
}
#endif

static int k_block_shift(const int32_t *x, int32_t n) {
    uint64_t amax = 0;
    int32_t i;
    int b;
    for (i = 0; i < n; i++) {
        int64_t v = x[i];
        uint64_t a = (uint64_t)(v < 0 ? -v : v);
        if (a > amax) amax = a;
    }
    b = k_bitlen(amax);
    return b > 15 ? b - 15 : 0;
}

#if defined(KILN_USE_KV8)
/* 8-bit mantissas with a shared shift (an 8-bit KV cache row). */
static int k_quantize8(const int32_t *x, int8_t *m, int32_t n) {
    int sh = k_block_shift(x, n) + 8;
    int32_t i;
    for (i = 0; i < n; i++) {
        int64_t v = k_rshr(x[i], sh);
        m[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
    }
    return sh;
}
#endif

#if defined(KILN_USE_KV4)
/* 4-bit mantissas (-8..7, two per byte, low nibble first) with a shared shift (one group of
   a 4-bit KV cache row); n is even. */
static int k_quantize4(const int32_t *x, uint8_t *m, int32_t n) {
    int sh = k_block_shift(x, n) + 12;
    int32_t i;
    for (i = 0; i < n; i += 2) {
        int64_t a = k_rshr(x[i], sh), b = k_rshr(x[i + 1], sh);
        a = a > 7 ? 7 : (a < -8 ? -8 : a);
        b = b > 7 ? 7 : (b < -8 ? -8 : b);
        m[i / 2] = (uint8_t)((((uint32_t)(a + 8)) ^ 8u) | ((((uint32_t)(b + 8)) ^ 8u) << 4));
    }
    return sh;
}

/* Element i of a 4-bit row, signed. */
#define K_NIB(m, i) ((int32_t)((((uint32_t)(m)[(i) >> 1] >> (((i) & 1) * 4)) & 15u) ^ 8u) - 8)
#endif

static int k_quantize16(const int32_t *x, int16_t *m, int32_t n) {
    int sh = k_block_shift(x, n);
    int32_t i;
    for (i = 0; i < n; i++) m[i] = k_sat16(k_rshr(x[i], sh));
    return sh;
}

#define K_LOG2E_Q30 ((int64_t)1549082005)

#if defined(KILN_USE_ATTENTION) || defined(KILN_USE_ACT_N) || defined(KILN_USE_GLU)
static int64_t k_exp_neg(int64_t x) {
    int64_t u, n, f, fr, a, b, v;
    if (x < 0) x = 0;
    if (x > INT32_MAX) x = INT32_MAX;
    u = k_rshr((int64_t)(int32_t)x * K_LOG2E_Q30, 30);
    n = u >> 16;
    if (n >= 31) return 0;
    f = u & 0xFFFF;
    fr = f & 1023;
    a = kiln_exp2_q30[f >> 10];
    b = kiln_exp2_q30[(f >> 10) + 1];
    v = a + k_rshr((b - a) * fr, 10);
    return k_rshr(v, 14 + (int)n);
}
#endif

#if defined(KILN_USE_ATTENTION) || defined(KILN_USE_ACT_N) || defined(KILN_USE_GLU)
static int64_t k_sigmoid(int64_t x) {
    int64_t e = k_exp_neg(x < 0 ? -x : x);
    /* floor(2^32 / d) for d in [2^16, 2^17] with a 32-bit division (a hardware
     * instruction on Cortex-M3 and up, where a 64-bit one is a library call) */
    uint32_t d = (uint32_t)(65536 + e), q = 0xFFFFFFFFu / d;
    int64_t s;
    if ((uint32_t)((q + 1u) * d) == 0u) q++;
    s = q;
    return x >= 0 ? s : 65536 - s;
}
#endif

#if defined(KILN_USE_ACT_N) || defined(KILN_USE_GLU)
static int32_t k_act(int kind, int32_t x) {
    if (kind == 0) return k_sat32(k_rshr((int64_t)x * k_sigmoid(x), 16));
    {
        int64_t xc = x, x2, x3, inner, z;
        if (xc > ((int64_t)16 << 16)) xc = (int64_t)16 << 16;
        if (xc < -((int64_t)16 << 16)) xc = -((int64_t)16 << 16);
        x2 = k_rshr(xc * xc, 16);
        x3 = k_rshr(x2 * xc, 16);
        inner = xc + k_rshr(x3 * 2930, 16);
        z = k_rshr(inner * 104581, 16);
        return k_sat32(k_rshr((int64_t)x * k_sigmoid(z), 16));
    }
}
#endif

#if defined(KILN_USE_ATTENTION)
static int64_t k_div_round(int64_t a, int64_t b) {
    return a >= 0 ? (a + b / 2) / b : -((-a + b / 2) / b);
}
#endif

#if defined(KILN_USE_EMBED)
static void k_embed(int32_t *y, const int8_t *w, const int32_t *mult, const int32_t *shift, int32_t cols,
                    int32_t token) {
    const int8_t *row = w + (int32_t)token * cols;
    int64_t m = mult[token];
    int s = shift[token] - 16;
    int32_t i;
    for (i = 0; i < cols; i++) y[i] = k_sat32(k_shift_round(row[i] * m, s));
}
#endif

#if defined(KILN_USE_RMS_NORM)
static void k_rms_norm(const int32_t *x, int32_t *y, int32_t n, int32_t group, const int32_t *gamma,
                       int32_t gamma_len, uint64_t eps_q) {
    int32_t g0, i;
    for (g0 = 0; g0 < n; g0 += group) {
        const int32_t *xg = x + g0;
        int32_t *yg = y + g0;
        const int32_t *gg = gamma ? gamma + (g0 % gamma_len) : 0;
        int sh = k_block_shift(xg, group), z;
        uint64_t ss = 0, v, s;
        int64_t inv;
        for (i = 0; i < group; i++) {
            int64_t m = k_rshr(xg[i], sh);
            ss += (uint64_t)(m * m);
        }
        v = ss / (uint64_t)group +
            (uint64_t)k_rshr((int64_t)(eps_q > (uint64_t)INT64_MAX ? (uint64_t)INT64_MAX : eps_q),
                             2 * sh < 62 ? 2 * sh : 62);
        if (v == 0) v = 1;
        z = 62 - k_bitlen(v);
        if (z % 2 != 0) z -= 1;
        s = k_isqrt(v << z);
        inv = (int64_t)(((uint64_t)1 << 61) / s);
        for (i = 0; i < group; i++) {
            int64_t m = k_rshr(xg[i], sh);
            int64_t t = k_rshr(m * inv, 30);
            int64_t gm = gg ? gg[i] : 65536;
            yg[i] = k_sat32(k_shift_round(t * gm, 31 - z / 2));
        }
    }
}
#endif

#if defined(KILN_USE_MATMUL)
static void k_matmul(const int32_t *x, int32_t *y, int32_t rows, int32_t cols, const int8_t *w,
                     const int32_t *mult, const int32_t *shift, const int32_t *bias, int16_t *m) {
    int sh = k_quantize16(x, m, cols);
    int32_t r, i, c0;
#ifdef K_SIMD32
    /* Mantissas reordered (m0, m2, m1, m3) per group of four, so one word holds the pair
     * that meets sext(w0, w2) and the next the pair for sext(w1, w3). */
    int32_t body = cols & ~3;
    for (i = 0; i < body; i += 4) {
        int16_t t = m[i + 1];
        m[i + 1] = m[i + 2];
        m[i + 2] = t;
    }
#endif
    for (r = 0; r < rows; r++) {
        const int8_t *row = w + (int32_t)r * cols;
        int64_t acc = 0, v;
        /* int32 partial sums of at most 256 products (each below 2^22) are exact */
        for (c0 = 0; c0 < cols; c0 += 256) {
            int32_t part = 0, end = c0 + 256 < cols ? c0 + 256 : cols;
            i = c0;
#ifdef K_SIMD32
            for (; i + 8 <= end; i += 8) {
                uint32_t w0, w1, a0, a1, a2, a3;
                memcpy(&w0, row + i, 4);
                memcpy(&w1, row + i + 4, 4);
                memcpy(&a0, m + i, 4);
                memcpy(&a1, m + i + 2, 4);
                memcpy(&a2, m + i + 4, 4);
                memcpy(&a3, m + i + 6, 4);
                part = __smlad((int32_t)a0, __sxtb16((int32_t)w0), part);
                part = __smlad((int32_t)a1, __sxtb16((int32_t)((w0 >> 8) | (w0 << 24))), part);
                part = __smlad((int32_t)a2, __sxtb16((int32_t)w1), part);
                part = __smlad((int32_t)a3, __sxtb16((int32_t)((w1 >> 8) | (w1 << 24))), part);
            }
            for (; i + 4 <= end; i += 4) {
                uint32_t w0, a0, a1;
                memcpy(&w0, row + i, 4);
                memcpy(&a0, m + i, 4);
                memcpy(&a1, m + i + 2, 4);
                part = __smlad((int32_t)a0, __sxtb16((int32_t)w0), part);
                part = __smlad((int32_t)a1, __sxtb16((int32_t)((w0 >> 8) | (w0 << 24))), part);
            }
#endif
            for (; i < end; i++) part += (int32_t)m[i] * (int32_t)row[i];
            acc += part;
        }
        v = k_shift_round(acc * (int64_t)mult[r], shift[r] - sh);
        if (bias) v += bias[r];
        y[r] = k_sat32(v);
    }
}
#endif

#if defined(KILN_USE_EMBED_Q4)
static void k_embed_q4(int32_t *y, const uint8_t *w, const int16_t *gmult, const int32_t *shift, int32_t cols,
                       int32_t token) {
    int32_t groups = cols / 32, i;
    const uint8_t *row = w + (int32_t)token * groups * 16;
    const int16_t *gm = gmult + (int32_t)token * groups;
    int s = shift[token] - 16;
    for (i = 0; i < cols; i++) {
        int64_t q = (int64_t)((i % 2 == 0) ? (row[i / 2] & 15) : (row[i / 2] >> 4)) - 8;
        y[i] = k_sat32(k_shift_round(q * gm[i / 32], s));
    }
}
#endif

#if defined(KILN_USE_MATMUL_Q4)
/* 4-bit groups of 32: dot_g = sum m[i] * q[i] - 8 * sum m[i] (the input's group sums once
 * per matmul), acc = sum over groups of mult[g] * dot_g, all exact integers. */
static void k_matmul_q4(const int32_t *x, int32_t *y, int32_t rows, int32_t cols, const uint8_t *w,
                        const int16_t *gmult, const int32_t *shift, const int32_t *bias, int16_t *m, int32_t *gsum) {
    int sh = k_quantize16(x, m, cols);
    int32_t groups = cols / 32, r, g, i;
    for (g = 0; g < groups; g++) {
        int32_t t = 0;
        for (i = 0; i < 32; i++) t += m[g * 32 + i];
        gsum[g] = t;
    }
#ifdef K_SIMD32
    /* Mantissas reordered (m0, m4, m2, m6, m1, m5, m3, m7) per eight, the order in which
     * UXTB16 spreads the low and high nibbles of one weight word. */
    for (i = 0; i < cols; i += 8) {
        int16_t t[8];
        memcpy(t, m + i, sizeof t);
        m[i + 1] = t[4];
        m[i + 2] = t[2];
        m[i + 3] = t[6];
        m[i + 4] = t[1];
        m[i + 5] = t[5];
        m[i + 6] = t[3];
        m[i + 7] = t[7];
    }
#endif
    for (r = 0; r < rows; r++) {
        const uint8_t *row = w + (int32_t)r * groups * 16;
        const int16_t *gm = gmult + (int32_t)r * groups;
        int64_t acc = 0, v;
        for (g = 0; g < groups; g++) {
            const uint8_t *b = row + g * 16;
            const int16_t *mg = m + g * 32;
            int32_t part = 0;
#ifdef K_SIMD32
            for (i = 0; i < 16; i += 4) {
                uint32_t wv, lo, hi, a0, a1, a2, a3;
                memcpy(&wv, b + i, 4);
                memcpy(&a0, mg + 2 * i, 4);
                memcpy(&a1, mg + 2 * i + 2, 4);
                memcpy(&a2, mg + 2 * i + 4, 4);
                memcpy(&a3, mg + 2 * i + 6, 4);
                lo = wv & 0x0F0F0F0Fu;
                hi = (wv >> 4) & 0x0F0F0F0Fu;
                part = __smlad((int32_t)a0, (int32_t)__uxtb16(lo), part);
                part = __smlad((int32_t)a1, (int32_t)__uxtb16((lo >> 8) | (lo << 24)), part);
                part = __smlad((int32_t)a2, (int32_t)__uxtb16(hi), part);
                part = __smlad((int32_t)a3, (int32_t)__uxtb16((hi >> 8) | (hi << 24)), part);
            }
#else
            for (i = 0; i < 16; i++) {
                part += (int32_t)mg[2 * i] * (int32_t)(b[i] & 15);
                part += (int32_t)mg[2 * i + 1] * (int32_t)(b[i] >> 4);
            }
#endif
            acc += (int64_t)gm[g] * (int64_t)(part - 8 * gsum[g]);
        }
        v = k_shift_round(acc, shift[r] - sh);
        if (bias) v += bias[r];
        y[r] = k_sat32(v);
    }
}
#endif

#if defined(KILN_USE_ADD)
static void k_add(const int32_t *a, const int32_t *b, int32_t *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = k_sat32((int64_t)a[i] + b[i]);
}
#endif

#if defined(KILN_USE_MUL)
static void k_mul(const int32_t *a, const int32_t *b, int32_t *y, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = k_sat32(k_rshr((int64_t)a[i] * b[i], 16));
}
#endif

#if defined(KILN_USE_SCALE)
static void k_scale(const int32_t *x, int32_t *y, int32_t n, int32_t mult, int shift) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = k_sat32(k_shift_round((int64_t)x[i] * mult, shift));
}
#endif

#if defined(KILN_USE_ACT_N)
static void k_act_n(const int32_t *x, int32_t *y, int32_t n, int kind) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = k_act(kind, x[i]);
}
#endif

#if defined(KILN_USE_GLU)
static void k_glu(const int32_t *g, const int32_t *u, int32_t *y, int32_t n, int kind) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = k_sat32(k_rshr((int64_t)k_act(kind, g[i]) * u[i], 16));
}
#endif

#if defined(KILN_USE_ROPE)
static void k_rope(const int32_t *x, int32_t *y, int32_t n, const int16_t *table, int32_t pos, int32_t head_dim,
                   int32_t rot, int neox) {
    int32_t half = rot / 2, h, i;
    const int16_t *cs = table + (int32_t)pos * half * 2;
    memcpy(y, x, (size_t)n * sizeof(int32_t));
    for (h = 0; h < n; h += head_dim) {
        int32_t *hp = y + h;
        for (i = 0; i < half; i++) {
            int32_t i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            int64_t c = cs[2 * i], s = cs[2 * i + 1], x0 = hp[i0], x1 = hp[i1];
            hp[i0] = k_sat32(k_rshr(x0 * c - x1 * s, 14));
            hp[i1] = k_sat32(k_rshr(x0 * s + x1 * c, 14));
        }
    }
}
#endif

#if defined(KILN_USE_ATTENTION)
/* A KV-cache slot: 16-bit (k16/v16) or 8-bit (k8/v8) mantissas, one shift per row and head.
 * It holds `rows` positions: the first `sink`, then a ring of the last rows - sink
 * (every position when rows is the context). */
typedef struct {
    int16_t *k16, *v16;
    int8_t *k8, *v8;
    uint8_t *ks, *vs;
    int32_t kv_heads, head_dim, rows, sink;
#if defined(KILN_USE_KV4)
    /* 4-bit slots: two mantissas per byte, a shift per 32 channels (KS/VS). */
    uint8_t *k4, *v4;
#endif
} k_slot;
#endif

#if defined(KILN_USE_ATTENTION)
/* The row of slot c that holds position j (a compare only until a ring wraps). */
static int32_t k_row(const k_slot *c, int32_t j) {
    return j < c->rows ? j : c->sink + (j - c->sink) % (c->rows - c->sink);
}

/* Attention of one token at `pos` over slot c: keys are the first min(sink, lo) positions,
 * then lo..pos (lo from the window); key jj is position jj or jj - s + lo. */
static void k_attention(const int32_t *q, const int32_t *kn, const int32_t *vn, int32_t *y, k_slot *c,
                        int32_t pos, int32_t heads, int32_t mult, int32_t shift, int32_t window, int32_t sink,
                        int softcap, int32_t cm1, int32_t cs1, int32_t cm2, int32_t cs2, int16_t *mq,
                        int32_t *scores) {
    int32_t hd = c->head_dim, kvh_n = c->kv_heads, h, j, jj, d, lo, s, n, group = heads / kvh_n;
    int32_t wr = k_row(c, pos), g, r, end, nw, first;
    /* The keys' rows as three runs: the sinks, the window up to the ring's end, the rest
     * of the window after the ring wraps (empty for a slot that holds the whole context). */
    int32_t seg[3][2];
    if (kn) {
        for (h = 0; h < kvh_n; h++) {
            int32_t at = (wr * kvh_n + h) * hd;
#if defined(KILN_USE_KV4)
            if (c->k4) {
                int32_t g, ng = hd / 32;
                for (g = 0; g < ng; g++) {
                    int32_t e = h * hd + 32 * g, sh = (wr * kvh_n + h) * ng + g;
                    c->ks[sh] = (uint8_t)k_quantize4(kn + e, c->k4 + at / 2 + 16 * g, 32);
                    c->vs[sh] = (uint8_t)k_quantize4(vn + e, c->v4 + at / 2 + 16 * g, 32);
                }
                continue;
            }
#endif
#if defined(KILN_USE_KV8)
            if (c->k8) {
                c->ks[wr * kvh_n + h] = (uint8_t)k_quantize8(kn + h * hd, c->k8 + at, hd);
                c->vs[wr * kvh_n + h] = (uint8_t)k_quantize8(vn + h * hd, c->v8 + at, hd);
                continue;
            }
#endif
            c->ks[wr * kvh_n + h] = (uint8_t)k_quantize16(kn + h * hd, c->k16 + at, hd);
            c->vs[wr * kvh_n + h] = (uint8_t)k_quantize16(vn + h * hd, c->v16 + at, hd);
        }
    }
    lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    s = sink < lo ? sink : lo;
    n = pos + 1 - lo + s;
    nw = pos + 1 - lo;
    first = c->rows - k_row(c, lo) < nw ? c->rows - k_row(c, lo) : nw;
    seg[0][0] = 0;
    seg[0][1] = s;
    seg[1][0] = k_row(c, lo);
    seg[1][1] = first;
    seg[2][0] = c->sink;
    seg[2][1] = nw - first;
    for (h = 0; h < heads; h++) {
        int32_t kvh = h / group, mx = INT32_MIN;
        int shq = k_quantize16(q + h * hd, mq, hd);
        int64_t total = 0;
        for (jj = 0; jj < n; jj++) {
            int64_t dot = 0;
            int32_t sc;
            int shk = 0;
            j = k_row(c, jj < s ? jj : jj - s + lo);
            d = 0;
#if defined(KILN_USE_KV4)
            if (c->k4) {
                /* Groups with different shifts are aligned to the largest (rounding the others). */
                const uint8_t *kr4 = c->k4 + (j * kvh_n + kvh) * hd / 2;
                const uint8_t *shs = c->ks + (j * kvh_n + kvh) * (hd / 32);
                int32_t g, ng = hd / 32;
                for (g = 0; g < ng; g++)
                    if (shs[g] > shk) shk = shs[g];
                for (g = 0; g < ng; g++) {
                    int64_t dg = 0;
                    for (d = 0; d < 32; d++) dg += (int32_t)mq[32 * g + d] * K_NIB(kr4 + 16 * g, d);
                    dot += k_shift_round(dg, shk - shs[g]);
                }
            } else
#endif
#if defined(KILN_USE_KV8)
            if (c->k8) {
                const int8_t *kr8 = c->k8 + (j * kvh_n + kvh) * hd;
                shk = c->ks[j * kvh_n + kvh];
                for (; d < hd; d++) dot += (int32_t)mq[d] * (int32_t)kr8[d];
            } else
#endif
            {
                const int16_t *kr = c->k16 + (j * kvh_n + kvh) * hd;
                shk = c->ks[j * kvh_n + kvh];
#ifdef K_SIMD32
                for (; d + 2 <= hd; d += 2) {
                    uint32_t a, b;
                    memcpy(&a, mq + d, 4);
                    memcpy(&b, kr + d, 4);
                    dot = __smlald((int32_t)a, (int32_t)b, dot);
                }
#endif
                for (; d < hd; d++) dot += (int32_t)mq[d] * (int32_t)kr[d];
            }
            sc = k_sat32(k_shift_round(dot * mult, shift + 16 - shq - shk));
            if (softcap) {
                int64_t zz = k_shift_round((int64_t)sc * cm1, cs1);
                int64_t t = 2 * k_sigmoid(zz) - 65536;
                sc = k_sat32(k_shift_round(t * cm2, cs2));
            }
            scores[jj] = sc;
            if (sc > mx) mx = sc;
        }
        for (jj = 0; jj < n; jj++) {
            scores[jj] = (int32_t)k_exp_neg((int64_t)mx - scores[jj]);
            total += scores[jj];
        }
        for (d = 0; d < hd; d++) {
            int64_t acc = 0;
            jj = 0;
            for (g = 0; g < 3; g++) {
                for (r = seg[g][0], end = seg[g][0] + seg[g][1]; r < end; r++, jj++) {
                    int32_t row = r * kvh_n + kvh, at = row * hd + d;
#if defined(KILN_USE_KV4)
                    if (c->v4) {
                        acc += scores[jj] * ((int64_t)K_NIB(c->v4 + row * hd / 2, d) *
                                            ((int64_t)1 << c->vs[row * (hd / 32) + d / 32]));
                        continue;
                    }
#endif
#if defined(KILN_USE_KV8)
                    int64_t m = c->v8 ? c->v8[at] : c->v16[at];
#else
                    int64_t m = c->v16[at];
#endif
                    int64_t vv = m * ((int64_t)1 << c->vs[row]);
                    acc += scores[jj] * vv;
                }
            }
            y[h * hd + d] = k_sat32(k_div_round(acc, total));
        }
    }
}
#endif
