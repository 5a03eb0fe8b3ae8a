// kiln-greedy-ids: a small oracle tool written against llama.cpp's public C API
// (llama.h only). Built by tests/oracle/build_llama_cpp.sh; driven by
// tests/oracle/make_llama_refs.py.
//
// Usage:
//   kiln-greedy-ids -m MODEL [-t THREADS] [-n N_PREDICT] [--top K]
//                   [--cvec FILE SCALE --cvec-range FIRST LAST] gen TEXT...
//   kiln-greedy-ids -m MODEL tok TEXT...
//
// For each TEXT argument one JSON object is written to stdout, one per line.
//
// gen: tokenizes TEXT the way llama.cpp's tools do by default
//      (add_special = true -> BOS only if the GGUF asks for it, parse_special = true),
//      decodes the whole prompt as one batch, then greedily (argmax over the raw
//      logits, lowest id wins ties) decodes N_PREDICT tokens one at a time.
//      It does NOT stop at end-of-generation tokens; their positions are reported
//      in "eog_steps".  For every step the top-K (id, logit) pairs are reported.
//      Each prompt starts from an empty KV cache.
//      --cvec applies a control-vector GGUF (tensors direction.N, f32 [n_embd]) times
//      SCALE to the outputs of layers FIRST..=LAST through llama_set_adapter_cvec,
//      read the way llama.cpp's common loader reads it (data starts at layer 1).
// tok: tokenizes TEXT with add_special = true, and with parse_special = true and false.
//
// Strings are emitted as JSON with bytes >= 0x80 copied through unchanged; a
// detokenized string may end in a partial UTF-8 sequence, so the driver decodes
// stdout with errors="replace".  "*_hex" fields carry the exact bytes.

#include "llama.h"
#include "gguf.h"
#include "ggml.h"

#include <algorithm>
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static std::string json_str(const std::string & s) {
    std::string o = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"':  o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n";  break;
            case '\r': o += "\\r";  break;
            case '\t': o += "\\t";  break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    o += buf;
                } else {
                    o += (char) c;
                }
        }
    }
    return o + "\"";
}

static std::string hex(const std::string & s) {
    static const char * d = "0123456789abcdef";
    std::string o;
    for (unsigned char c : s) { o += d[c >> 4]; o += d[c & 15]; }
    return o;
}

static std::string ids_json(const std::vector<llama_token> & v) {
    std::string o = "[";
    for (size_t i = 0; i < v.size(); ++i) {
        if (i) o += ",";
        o += std::to_string(v[i]);
    }
    return o + "]";
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special) {
    int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, add_special, parse_special);
    if (n < 0) n = -n; // (0 tokens returns 0)
    std::vector<llama_token> toks(n);
    int r = llama_tokenize(vocab, text.data(), (int32_t) text.size(), toks.data(), n, add_special, parse_special);
    if (r < 0) { fprintf(stderr, "tokenize failed\n"); exit(1); }
    toks.resize(r);
    return toks;
}

static std::string piece(const llama_vocab * vocab, llama_token t) {
    char buf[256];
    int n = llama_token_to_piece(vocab, t, buf, sizeof(buf), 0, true);
    if (n < 0) { fprintf(stderr, "token_to_piece failed\n"); exit(1); }
    return std::string(buf, n);
}

static std::string detok(const llama_vocab * vocab, const std::vector<llama_token> & toks) {
    std::vector<char> buf(toks.size() * 64 + 64);
    int n = llama_detokenize(vocab, toks.data(), (int32_t) toks.size(), buf.data(), (int32_t) buf.size(), false, true);
    if (n < 0) { buf.resize(-n); n = llama_detokenize(vocab, toks.data(), (int32_t) toks.size(), buf.data(), (int32_t) buf.size(), false, true); }
    return std::string(buf.data(), std::max(n, 0));
}

static void log_cb(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN || getenv("KILN_ORACLE_VERBOSE")) fputs(text, stderr);
}

// Reads a control-vector GGUF into llama_set_adapter_cvec's layout (layer 1 at
// offset 0), each direction times `scale`. Returns n_embd, or -1 on error.
static int load_cvec(const std::string & path, float scale, std::vector<float> & data) {
    ggml_context * gctx = nullptr;
    gguf_init_params gp = { /*no_alloc*/ false, &gctx };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) { fprintf(stderr, "cannot read %s\n", path.c_str()); return -1; }
    int n_embd = -1;
    for (int64_t t = 0; t < gguf_get_n_tensors(g); ++t) {
        const std::string name = gguf_get_tensor_name(g, t);
        if (name.rfind("direction.", 0) != 0) { fprintf(stderr, "%s: tensor %s\n", path.c_str(), name.c_str()); return -1; }
        const int layer = atoi(name.c_str() + 10);
        ggml_tensor * ten = ggml_get_tensor(gctx, name.c_str());
        if (layer < 1 || !ten || ten->type != GGML_TYPE_F32) { fprintf(stderr, "%s: bad %s\n", path.c_str(), name.c_str()); return -1; }
        n_embd = (int) ggml_nelements(ten);
        if ((int) data.size() < n_embd * layer) data.resize((size_t) n_embd * layer, 0.0f);
        const float * src = (const float *) ten->data;
        for (int j = 0; j < n_embd; ++j) data[(size_t) n_embd * (layer - 1) + j] += src[j] * scale;
    }
    gguf_free(g);
    ggml_free(gctx);
    return n_embd;
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string cvec_path;
    float cvec_scale = 1.0f;
    int cvec_first = 1, cvec_last = 0;
    std::string model_path, mode;
    int n_threads = 2, n_predict = 64, top_k = 2;
    int i = 1;
    for (; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-m" && i + 1 < argc) model_path = argv[++i];
        else if (a == "-t" && i + 1 < argc) n_threads = atoi(argv[++i]);
        else if (a == "-n" && i + 1 < argc) n_predict = atoi(argv[++i]);
        else if (a == "--top" && i + 1 < argc) top_k = atoi(argv[++i]);
        else if (a == "--cvec" && i + 2 < argc) { cvec_path = argv[++i]; cvec_scale = (float) atof(argv[++i]); }
        else if (a == "--cvec-range" && i + 2 < argc) { cvec_first = atoi(argv[++i]); cvec_last = atoi(argv[++i]); }
        else if (a == "gen" || a == "tok") { mode = a; ++i; break; }
        else { fprintf(stderr, "unknown arg %s\n", a.c_str()); return 2; }
    }
    if (model_path.empty() || mode.empty()) {
        fprintf(stderr, "usage: %s -m MODEL [-t N] [-n N] [--top K] (gen|tok) TEXT...\n", argv[0]);
        return 2;
    }

    llama_log_set(log_cb, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    // KILN_NO_REPACK=1: weights stay in ggml's plain CPU buffer (no repacked kernels).
    if (getenv("KILN_NO_REPACK")) mp.use_extra_bufts = false;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "failed to load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const llama_token bos = llama_vocab_bos(vocab);

    if (mode == "tok") {
        for (; i < argc; ++i) {
            std::string text = argv[i];
            auto ids  = tokenize(vocab, text, true, true);
            auto ids2 = tokenize(vocab, text, true, false);
            std::string pieces = "[";
            for (size_t k = 0; k < ids.size(); ++k) { if (k) pieces += ","; pieces += json_str(hex(piece(vocab, ids[k]))); }
            pieces += "]";
            printf("{\"text_hex\":%s,\"ids\":%s,\"ids_parse_special_false\":%s,\"pieces_hex\":%s}\n",
                   json_str(hex(text)).c_str(), ids_json(ids).c_str(), ids_json(ids2).c_str(), pieces.c_str());
            fflush(stdout);
        }
        llama_model_free(model);
        return 0;
    }

    for (; i < argc; ++i) {
        std::string text = argv[i];
        std::vector<llama_token> prompt = tokenize(vocab, text, /*add_special*/ true, /*parse_special*/ true);
        const bool bos_added = !prompt.empty() && prompt[0] == bos && add_bos;

        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = (uint32_t) (prompt.size() + n_predict + 8);
        cp.n_batch = std::max<uint32_t>(cp.n_ctx, 32);
        cp.n_ubatch = cp.n_batch;
        cp.n_threads = n_threads;
        cp.n_threads_batch = n_threads;
        cp.no_perf = true;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }
        if (!cvec_path.empty()) {
            std::vector<float> data;
            const int n_embd = load_cvec(cvec_path, cvec_scale, data);
            const int last = cvec_last > 0 ? cvec_last : llama_model_n_layer(model);
            if (n_embd < 0 || llama_set_adapter_cvec(ctx, data.data(), data.size(), n_embd, cvec_first, last) != 0) {
                fprintf(stderr, "control vector %s not applied\n", cvec_path.c_str());
                return 1;
            }
        }

        std::vector<llama_token> gen;
        std::vector<int> eog_steps;
        std::string top = "[";
        std::vector<llama_token> cur = prompt;
        for (int step = 0; step < n_predict; ++step) {
            llama_batch b = llama_batch_get_one(cur.data(), (int32_t) cur.size());
            if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed at step %d\n", step); return 1; }
            const float * logits = llama_get_logits_ith(ctx, -1);
            std::vector<int> idx(n_vocab);
            for (int v = 0; v < n_vocab; ++v) idx[v] = v;
            const int k = std::min(top_k > 0 ? top_k : 1, n_vocab);
            std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int c) {
                return logits[a] > logits[c] || (logits[a] == logits[c] && a < c);
            });
            const llama_token next = idx[0];
            if (step) top += ",";
            top += "[";
            for (int j = 0; j < k; ++j) {
                char buf[64];
                snprintf(buf, sizeof(buf), "%s[%d,%.6f]", j ? "," : "", idx[j], logits[idx[j]]);
                top += buf;
            }
            top += "]";
            gen.push_back(next);
            if (llama_vocab_is_eog(vocab, next)) eog_steps.push_back(step);
            cur.assign(1, next);
        }
        top += "]";

        std::string pieces = "[";
        for (size_t k = 0; k < gen.size(); ++k) { if (k) pieces += ","; pieces += json_str(hex(piece(vocab, gen[k]))); }
        pieces += "]";
        std::string eog = "[";
        for (size_t k = 0; k < eog_steps.size(); ++k) { if (k) eog += ","; eog += std::to_string(eog_steps[k]); }
        eog += "]";
        const std::string gtext = detok(vocab, gen);

        printf("{\"text_hex\":%s,\"add_bos\":%s,\"bos_id\":%d,\"bos_added\":%s,\"prompt_ids\":%s,"
               "\"generated_ids\":%s,\"generated_text\":%s,\"generated_text_hex\":%s,"
               "\"generated_pieces_hex\":%s,\"eog_steps\":%s,\"top_per_step\":%s}\n",
               json_str(hex(text)).c_str(), add_bos ? "true" : "false", bos, bos_added ? "true" : "false",
               ids_json(prompt).c_str(), ids_json(gen).c_str(), json_str(gtext).c_str(), json_str(hex(gtext)).c_str(),
               pieces.c_str(), eog.c_str(), top.c_str());
        fflush(stdout);
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
