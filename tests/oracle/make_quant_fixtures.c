// Quantizer oracle: runs ggml's own quantizers (llama.cpp b11434, libggml-base)
// on deterministic pseudo-random weight-like rows and writes inputs, importance
// vectors and outputs under tests/fixtures/quant/ for
// backends/quant/tests/quantize_ggml.rs. Built and run by make_quant_fixtures.sh.
//
// For every tensor T (rows x cols) it writes
//   T.input.f32       rows*cols little-endian f32
//   T.imatrix.f32     cols f32 (one positive importance per column)
//   T.<type>.bin      ggml_quantize_chunk(type, input, rows, cols, NULL)
//   T.<type>.imat.bin ggml_quantize_chunk(type, input, rows, cols, imatrix)

#include "ggml.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// splitmix64: portable, deterministic.
static uint64_t rng_state;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits (exact in f32).
static float uniform(void) { return (float)(next_u64() >> 40) * (1.0f / 16777216.0f); }

// Approximately standard normal (Irwin-Hall with 12 uniforms); no libm, so the
// inputs do not depend on the C library.
static float gauss(void) {
    float s = 0.0f;
    for (int i = 0; i < 12; ++i) s += uniform();
    return s - 6.0f;
}

// Heavy-tailed: a normal divided by a uniform bounded away from zero.
static float heavy(void) { return gauss() / (0.05f + uniform()); }

static const char * out_dir;

static void write_file(const char * name, const void * data, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", out_dir, name);
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

// Row generators for tensor "a": each row exercises a different shape of data.
static void fill_row_a(int r, float * x, int n) {
    for (int i = 0; i < n; ++i) {
        float g = gauss();
        float v;
        switch (r) {
            case 0:  v = 0.02f * g; break;                                    // plain weights
            case 1:  v = 0.02f * g * (next_u64() % 100 == 0 ? 20.0f : 1.0f); break; // 1% outliers
            case 2:  v = 0.01f * heavy(); break;                              // heavy tails
            case 3:  v = 1.0f + 0.1f * g; break;                              // norm-like, all positive
            case 4:  v = -0.5f - 0.05f * (g < 0 ? -g : g); break;             // all negative
            case 5:  v = i == 137 ? 7.5f : 0.02f * g; break;                  // one huge outlier
            case 6:  v = i < n / 2 ? 1e-8f * g : 0.03f * g; break;            // tiny half
            case 7:  v = (i / 16) % 3 == 1 ? 0.0f : 0.02f * g; break;         // zero sub-blocks
            case 8:  v = 100.0f * g; break;                                   // large magnitude
            case 9:  v = (i / 32) % 2 ? 1e-12f * g : 1e-17f * g; break;       // below GROUP_MAX_EPS
            case 10: v = 0.01f * (float)((int)(g * 4.0f)); break;             // coarse grid (ties)
            case 11: v = 0.5f; break;                                         // constant
            case 12: v = next_u64() % 10 == 0 ? 0.05f * g : 0.0f; break;      // sparse
            case 13: v = 2.0f * uniform() - 1.0f; break;                      // uniform
            case 14: v = 0.05f + 0.01f * g; break;                            // offset
            default: v = 0.02f * g * (float)(1 << ((i / 32) % 6)); break;    // block-varying scale
        }
        x[i] = v;
    }
}

// Tensor "b": per-column scale pattern (some channels much larger) plus outliers.
static void fill_row_b(int r, float * x, int n) {
    for (int i = 0; i < n; ++i) {
        float col_scale = (i % 97 == 3) ? 8.0f : (i % 7 == 0 ? 2.0f : 1.0f);
        float v = 0.03f * col_scale * gauss();
        if (next_u64() % 500 == 0) v *= 30.0f;
        if (r == 3) v += 0.02f;
        x[i] = v;
    }
}

// Tensor "c": an all-zero row and a row with a single nonzero element.
static void fill_row_c(int r, float * x, int n) {
    for (int i = 0; i < n; ++i) x[i] = 0.0f;
    if (r == 1) x[200] = -0.25f;
}

// imatrix-like importance: mean squares of activations, i.e. chi-square-ish,
// with a few "massive activation" channels.
static void fill_imatrix(float * w, int n) {
    for (int i = 0; i < n; ++i) {
        float g = gauss();
        float v = g * g + 0.01f;
        if (next_u64() % 64 == 0) v *= 100.0f;
        w[i] = v;
    }
}

struct type_name { enum ggml_type type; const char * name; };

static const struct type_name TYPES[] = {
    { GGML_TYPE_Q2_K, "q2_k" }, { GGML_TYPE_Q3_K, "q3_k" }, { GGML_TYPE_Q4_K, "q4_k" },
    { GGML_TYPE_Q5_K, "q5_k" }, { GGML_TYPE_Q6_K, "q6_k" },
    { GGML_TYPE_Q4_0, "q4_0" }, { GGML_TYPE_Q4_1, "q4_1" }, { GGML_TYPE_Q5_0, "q5_0" },
    { GGML_TYPE_Q5_1, "q5_1" }, { GGML_TYPE_Q8_0, "q8_0" },
};

static void tensor(const char * name, int rows, int cols, uint64_t seed, void (*fill)(int, float *, int)) {
    rng_state = seed;
    float * x = malloc(sizeof(float) * (size_t)rows * cols);
    float * imat = malloc(sizeof(float) * (size_t)cols);
    for (int r = 0; r < rows; ++r) fill(r, x + (size_t)r * cols, cols);
    fill_imatrix(imat, cols);

    char file[256];
    snprintf(file, sizeof file, "%s.input.f32", name);
    write_file(file, x, sizeof(float) * (size_t)rows * cols);
    snprintf(file, sizeof file, "%s.imatrix.f32", name);
    write_file(file, imat, sizeof(float) * (size_t)cols);

    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; ++t) {
        const size_t bytes = ggml_row_size(TYPES[t].type, cols) * (size_t)rows;
        void * out = malloc(bytes);
        for (int weighted = 0; weighted < 2; ++weighted) {
            memset(out, 0xAA, bytes);
            size_t got = ggml_quantize_chunk(TYPES[t].type, x, out, 0, rows, cols, weighted ? imat : NULL);
            if (got != bytes) {
                fprintf(stderr, "%s %s: ggml_quantize_chunk wrote %zu bytes, expected %zu\n", name, TYPES[t].name, got, bytes);
                exit(1);
            }
            snprintf(file, sizeof file, "%s.%s%s.bin", name, TYPES[t].name, weighted ? ".imat" : "");
            write_file(file, out, bytes);
        }
        free(out);
    }
    free(x);
    free(imat);
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    out_dir = argv[1];
    tensor("a", 16, 512, 0x6b696c6e00000001ULL, fill_row_a);
    tensor("b", 4, 768, 0x6b696c6e00000002ULL, fill_row_b);
    tensor("c", 2, 256, 0x6b696c6e00000003ULL, fill_row_c);
    return 0;
}
