/* kiln watch-build harness: runs a fixed prompt and greedy decode steps through the
 * generated library and prints, per step, the token and a FNV-1a hash of the Q16
 * logits (and with KILN_DUMP_LOGITS every logit), then probes the context limit.
 * The platform supplies kiln_out (text out) and kiln_ticks (a free-running counter). */
#include <stdint.h>
#include "kiln_model.h"
#include "prompt.h"

void kiln_out(const char *s);
uint32_t kiln_ticks(void);
int kiln_harness(void);

static char *put_u(char *p, uint64_t v, unsigned base, int width) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v != 0);
    while (n < width) tmp[n++] = '0';
    while (n > 0) *p++ = tmp[--n];
    return p;
}

static char *put_i(char *p, int64_t v) {
    if (v < 0) {
        *p++ = '-';
        return put_u(p, (uint64_t)(-v), 10, 0);
    }
    return put_u(p, (uint64_t)v, 10, 0);
}

static char *put_s(char *p, const char *s) {
    while (*s) *p++ = *s++;
    return p;
}

static uint64_t fnv(const int32_t *l, int32_t n) {
    uint64_t h = 14695981039346656037u;
    int32_t i;
    int b;
    for (i = 0; i < n; i++) {
        uint32_t u = (uint32_t)l[i];
        for (b = 0; b < 4; b++) {
            h ^= (u >> (8 * b)) & 0xFF;
            h *= 1099511628211u;
        }
    }
    return h;
}

static int32_t logits[KILN_VOCAB];

static void report(const char *what, int32_t s, int32_t tok, uint32_t ticks) {
    char line[96], *p = line;
    p = put_s(p, what);
    *p++ = ' ';
    p = put_i(p, s);
    *p++ = ' ';
    p = put_i(p, tok);
    *p++ = ' ';
    p = put_u(p, fnv(logits, KILN_VOCAB), 16, 16);
    *p++ = ' ';
    p = put_u(p, ticks, 10, 0);
    *p++ = '\n';
    *p = 0;
    kiln_out(line);
#ifdef KILN_DUMP_LOGITS
    {
        int32_t i;
        for (i = 0; i < KILN_VOCAB; i++) {
            p = put_i(line, logits[i]);
            *p++ = '\n';
            *p = 0;
            kiln_out(line);
        }
    }
#endif
}

int kiln_harness(void) {
    static const int32_t prompt[] = KILN_PROMPT;
    int32_t tok, s, r;
    uint32_t t0;
    char line[64], *p;
    kiln_init();
    t0 = kiln_ticks();
    tok = kiln_prefill(prompt, (int32_t)(sizeof prompt / sizeof prompt[0]), logits);
    report("prefill", (int32_t)(sizeof prompt / sizeof prompt[0]), tok, kiln_ticks() - t0);
    if (tok < 0) return 1;
    for (s = 0; s < KILN_STEPS; s++) {
        t0 = kiln_ticks();
        tok = kiln_decode_step(tok, logits);
        report("step", s, tok, kiln_ticks() - t0);
        if (tok < 0) return 1;
    }
    /* Fill the context: every step up to the limit runs, the next is refused. */
    r = 0;
    while (r >= 0) r = kiln_decode_step(0, 0);
    p = put_s(line, "limit ");
    p = put_i(p, r);
    *p++ = ' ';
    p = put_i(p, kiln_pos());
    *p++ = '\n';
    *p = 0;
    kiln_out(line);
    return r == KILN_ERR_CONTEXT && kiln_pos() == KILN_MAX_CONTEXT ? 0 : 1;
}
