// ggml_quant_err: quantizes f32 rows with llama.cpp's own quantizer and writes
// them back dequantized, so that kiln's formats can be compared with ggml's on
// the same rows and the same importance vector (tests/oracle/kq2_compare.sh,
// backends/quant/examples/kq2_vs_ggml.rs).
//
//   ggml_quant_err TYPE N_PER_ROW NROWS IN.f32 IMPORTANCE.f32|- OUT.f32
//
// TYPE is a ggml type name (iq2_xxs, iq2_xs, iq2_s, q2_K, q3_K, ...).
// IN.f32 holds NROWS*N_PER_ROW little-endian f32, IMPORTANCE.f32 N_PER_ROW f32
// (one weight per column, e.g. an imatrix's mean squared activations), or `-`
// for none (refused for the types that require one, e.g. the IQ2 family).
// OUT.f32 receives ggml's dequantization (type traits' to_float) of the rows.
// Prints one line to stdout: "<type> <bits per weight> <row bytes>".
//
// Build (see kq2_compare.sh):
//   cc -std=c11 -O2 -I$LLAMA/src/ggml/include ggml_quant_err.c
//      -L$LLAMA/build/bin -lggml-base -Wl,-rpath,$LLAMA/build/bin
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

static float *read_f32(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    float *buf = malloc(n * sizeof(float));
    if (!buf || fread(buf, sizeof(float), n, f) != n) {
        fprintf(stderr, "%s: expected %zu f32\n", path, n);
        exit(1);
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s TYPE N_PER_ROW NROWS IN.f32 IMPORTANCE.f32|- OUT.f32\n", argv[0]);
        return 2;
    }
    enum ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *name = ggml_type_name((enum ggml_type)t);
        if (name && strcmp(name, argv[1]) == 0) {
            type = (enum ggml_type)t;
            break;
        }
    }
    if (type == GGML_TYPE_COUNT) {
        fprintf(stderr, "unknown ggml type %s\n", argv[1]);
        return 2;
    }
    const int64_t n_per_row = atoll(argv[2]);
    const int64_t nrows = atoll(argv[3]);
    const int64_t blck = ggml_blck_size(type);
    if (n_per_row <= 0 || nrows <= 0 || n_per_row % blck != 0) {
        fprintf(stderr, "%s: rows of %lld are not a whole number of %lld-element blocks\n", argv[1],
                (long long)n_per_row, (long long)blck);
        return 3;
    }
    const size_t n = (size_t)(n_per_row * nrows);
    float *src = read_f32(argv[4], n);
    float *imp = strcmp(argv[5], "-") == 0 ? NULL : read_f32(argv[5], (size_t)n_per_row);
    if (!imp && ggml_quantize_requires_imatrix(type)) {
        fprintf(stderr, "%s requires an importance matrix\n", argv[1]);
        return 3;
    }
    const size_t row_size = ggml_row_size(type, n_per_row);
    uint8_t *q = malloc(row_size * (size_t)nrows);
    float *out = malloc(n * sizeof(float));
    if (!q || !out) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    ggml_quantize_init(type);
    const size_t written = ggml_quantize_chunk(type, src, q, 0, nrows, n_per_row, imp);
    if (written != row_size * (size_t)nrows) {
        fprintf(stderr, "ggml_quantize_chunk wrote %zu bytes, expected %zu\n", written, row_size * (size_t)nrows);
        return 1;
    }
    const struct ggml_type_traits *traits = ggml_get_type_traits(type);
    for (int64_t r = 0; r < nrows; r++) {
        traits->to_float(q + (size_t)r * row_size, out + (size_t)(r * n_per_row), n_per_row);
    }
    FILE *f = fopen(argv[6], "wb");
    if (!f || fwrite(out, sizeof(float), n, f) != n || fclose(f) != 0) {
        perror(argv[6]);
        return 1;
    }
    printf("%s %.4f %zu\n", argv[1], 8.0 * (double)row_size / (double)n_per_row, row_size);
    ggml_quantize_free();
    free(src);
    free(imp);
    free(q);
    free(out);
    return 0;
}
