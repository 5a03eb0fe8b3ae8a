// kiln-ggml-matmul: one matmul y = W·x on ggml's CPU backend, exactly as llama.cpp runs it:
// W is a tensor of a GGUF file, placed in the CPU_REPACK buffer (llama.cpp's default for the
// types it repacks; `plain` keeps it in the plain CPU buffer), x is T rows of K f32 values
// read from a file, y (T rows of N f32 values) is written to a file. Two threads.
// Written by kiln against ggml's public headers; see tests/oracle/README.md.
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
int main(int argc, char ** argv) {
    if (argc < 6) { fprintf(stderr, "usage: kiln-ggml-matmul MODEL TENSOR X.bin T OUT.bin [plain]\n"); return 2; }
    ggml_context * meta = nullptr;
    gguf_init_params ip = { false, &meta };
    gguf_context * g = gguf_init_from_file(argv[1], ip);
    if (!g) { fprintf(stderr, "gguf\n"); return 1; }
    ggml_tensor * w0 = ggml_get_tensor(meta, argv[2]);
    const int64_t K = w0->ne[0], N = w0->ne[1];
    const int T = atoi(argv[4]);
    const bool plain = argc > 6;
    ggml_backend_t cpu = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(cpu, 2);
    ggml_backend_dev_t dev = ggml_backend_get_device(cpu);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (!plain) {
        // As llama.cpp picks a weight's buffer: the first extra buffer type whose device
        // supports the matmul with the weight in it (a zero-size buffer of that type).
        for (ggml_backend_buffer_type_t * e = get_extra(dev); e && *e; ++e) {
            ggml_init_params pp = { ggml_tensor_overhead() * 4, nullptr, true };
            ggml_context * cp = ggml_init(pp);
            ggml_tensor * wp = ggml_new_tensor_2d(cp, w0->type, K, N);
            ggml_tensor * op = ggml_mul_mat(cp, wp, ggml_new_tensor_2d(cp, GGML_TYPE_F32, K, 512));
            ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(*e, 0);
            wp->buffer = dummy;
            const bool ok = ggml_backend_dev_supports_op(dev, op);
            ggml_backend_buffer_free(dummy);
            ggml_free(cp);
            if (ok) { buft = *e; break; }
        }
    }
    fprintf(stderr, "weight buffer: %s\n", ggml_backend_buft_name(buft));
    ggml_init_params pw = { ggml_tensor_overhead() * 4, nullptr, true };
    ggml_context * cw = ggml_init(pw);
    ggml_tensor * w = ggml_new_tensor_2d(cw, w0->type, K, N);
    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(cw, buft);
    ggml_backend_tensor_set(w, w0->data, 0, ggml_nbytes(w0));
    ggml_init_params pc = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true };
    ggml_context * c = ggml_init(pc);
    ggml_tensor * x = ggml_new_tensor_2d(c, GGML_TYPE_F32, K, T);
    ggml_tensor * y = ggml_mul_mat(c, w, x);
    ggml_cgraph * gf = ggml_new_graph(c);
    ggml_build_forward_expand(gf, y);
    ggml_backend_buffer_t bc = ggml_backend_alloc_ctx_tensors(c, cpu);
    std::vector<float> xs(K * T);
    FILE * f = fopen(argv[3], "rb"); fread(xs.data(), 4, xs.size(), f); fclose(f);
    ggml_backend_tensor_set(x, xs.data(), 0, xs.size() * 4);
    ggml_backend_graph_compute(cpu, gf);
    std::vector<float> ys(N * T);
    ggml_backend_tensor_get(y, ys.data(), 0, ys.size() * 4);
    f = fopen(argv[5], "wb"); fwrite(ys.data(), 4, ys.size(), f); fclose(f);
    (void) bw; (void) bc;
    return 0;
}
