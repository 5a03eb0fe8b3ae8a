#!/usr/bin/env python3
"""Reference matmul outputs from ggml itself, for kiln's llama.cpp-numerics dot definitions.

Runs `kiln-ggml-matmul` (tests/oracle/ggml_matmul.cpp, built by build_llama_cpp.sh) on weight
tensors of real GGUF files with deterministic activations, the way llama.cpp runs a matmul
(weights in its CPU_REPACK buffer, two threads), and stores the SHA-256 of each output's f32
bits in tests/fixtures/oracle/matmul.json. tests/oracle_llama_cpp.rs recomputes each output
with kiln's definitions (`kiln_quant::ggml_dot`) and compares the hashes: equal means equal
bit for bit.

The Q4_0 and IQ4_NL files are made by kiln from the SmolLM2 checkpoint (the test makes them
again and checks their SHA-256 first):

    kiln export smollm2-135m-instruct-q4_1.gguf --gguf smollm2-135m-instruct-q4_0-kiln.gguf --type q4_0
    kiln export smollm2-135m-instruct-q4_1.gguf --gguf smollm2-135m-instruct-iq4_nl-kiln.gguf --type iq4_nl

Usage: python3 tests/oracle/make_matmul_refs.py   (files under ${KILN_CACHE:-~/.cache/kiln}/models)
Only the Python standard library is used.
"""
import hashlib
import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

from make_llama_refs import sha256  # same directory: the file hash both scripts record

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
# The AVX2 numerics oracle build (build_llama_cpp.sh); kiln follows llama.cpp's AVX2 CPU code.
BIN = CACHE / "llama.cpp" / "build-avx2" / "bin" / "kiln-ggml-matmul"
MODELS = CACHE / "models"

# key: (file, how it was made, the `kiln export` arguments after SRC that remake it from
# SmolLM2's registry file, or None for a registry file itself).
KQUANT_RULES = ["--type", "q8_0", "--rule", "blk.0.ffn_down=q2_k", "--rule", "blk.1.ffn_down=q3_k",
                "--rule", "blk.2.ffn_down=q5_k", "--rule", "blk.3.ffn_down=q6_k"]
FILES = {
    "smollm2-q4_1": ("smollm2-135m-instruct-q4_1.gguf", "the registry checkpoint (Q4_1 weights, Q8_0 token_embd)", None),
    "smollm2-q4_0": ("smollm2-135m-instruct-q4_0-kiln.gguf", "kiln export SRC --gguf OUT --type q4_0", ["--type", "q4_0"]),
    "smollm2-iq4_nl": ("smollm2-135m-instruct-iq4_nl-kiln.gguf", "kiln export SRC --gguf OUT --type iq4_nl",
                       ["--type", "iq4_nl"]),
    "smollm2-kquants": ("smollm2-135m-instruct-kquants-kiln.gguf",
                        "kiln export SRC --gguf OUT " + " ".join(KQUANT_RULES), KQUANT_RULES),
    "qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b.gguf", "the registry checkpoint (Q5_0/Q8_0/Q4_K/Q6_K)", None),
}

# (file, tensor, K, token counts): decode (1), llama.cpp's gemm groups of four plus gemv
# leftovers (5, 6, 9), longer prompts (20); for the K-quants the tiled kernels llama.cpp runs
# from 8 token rows (7 below it, 8 and 20 through them).
CASES = [
    ("smollm2-q4_1", "blk.0.attn_q.weight", 576, [1, 5, 9]),
    ("smollm2-q4_1", "token_embd.weight", 576, [1, 5]),
    ("smollm2-q4_0", "blk.0.attn_q.weight", 576, [1, 5, 6, 9, 20]),
    ("smollm2-q4_0", "blk.3.ffn_down.weight", 1536, [1, 9]),
    ("smollm2-iq4_nl", "blk.0.attn_q.weight", 576, [1, 5, 6, 9, 20]),
    ("smollm2-iq4_nl", "blk.0.attn_k.weight", 576, [1, 6]),
    ("smollm2-iq4_nl", "blk.3.ffn_down.weight", 1536, [1, 9]),
    ("smollm2-iq4_nl", "token_embd.weight", 576, [1, 5]),
    ("smollm2-kquants", "blk.0.ffn_down.weight", 1536, [1, 7, 8, 20]),
    ("smollm2-kquants", "blk.1.ffn_down.weight", 1536, [1, 7, 8, 20]),
    ("smollm2-kquants", "blk.2.ffn_down.weight", 1536, [1, 7, 8, 20]),
    ("smollm2-kquants", "blk.3.ffn_down.weight", 1536, [1, 7, 8, 20]),
    ("qwen2.5-coder-0.5b", "blk.0.ffn_down.weight", 4864, [1, 7, 8, 9, 20]),
    ("qwen2.5-coder-0.5b", "blk.0.attn_q.weight", 896, [20]),
    ("qwen2.5-coder-0.5b", "blk.0.attn_v.weight", 896, [20]),
]


def activations(k, t):
    """Token row `t` of K values: ((i·7919 + t·104729) mod 2001 − 1000) / 250, times 8 for
    every 37th element (outliers). Every step is exact or one correctly rounded f32 division,
    so kiln's test computes the same bits."""
    out = []
    for i in range(k):
        v = struct.unpack("f", struct.pack("f", float((i * 7919 + t * 104729) % 2001 - 1000)))[0]
        v = struct.unpack("f", struct.pack("f", v / 250.0))[0]
        # (float64 division of two exact f32 values, rounded once to f32: the f32 quotient.)
        if i % 37 == 0:
            v *= 8.0
        out.append(v)
    return out


def main():
    files = {}
    for key, (name, made_by, export) in FILES.items():
        files[key] = {"file": name, "made_by": made_by, "sha256": sha256(MODELS / name)}
        if export is not None:
            files[key]["export"] = export
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, tensor, k, tokens in CASES:
            for t in tokens:
                x = Path(tmp) / "x.bin"
                y = Path(tmp) / "y.bin"
                rows = [v for r in range(t) for v in activations(k, r)]
                x.write_bytes(struct.pack(f"<{len(rows)}f", *rows))
                subprocess.run([str(BIN), str(MODELS / FILES[key][0]), tensor, str(x), str(t), str(y)],
                               check=True, stderr=subprocess.DEVNULL)
                cases.append({"file": key, "tensor": tensor, "tokens": t,
                              "sha256": hashlib.sha256(y.read_bytes()).hexdigest()})
                print(key, tensor, t, cases[-1]["sha256"][:16])
    ref = {
        "schema": "kiln-ggml-matmul/1",
        "llama_cpp_version": "b11434",
        "generated_by": "tests/oracle/make_matmul_refs.py (kiln-ggml-matmul = tests/oracle/ggml_matmul.cpp)",
        "how": "ggml CPU backend, 2 threads, each weight in the buffer llama.cpp would pick (CPU_REPACK where it supports the matmul); y is T rows "
               "of N f32 (little-endian), hashed whole",
        "activations": "row t, element i: f32(((i*7919 + t*104729) % 2001 - 1000)) / 250 (f32), "
                       "times 8 where i % 37 == 0",
        "files": files,
        "cases": cases,
    }
    out = REPO / "tests" / "fixtures" / "oracle" / "matmul.json"
    out.write_text(json.dumps(ref, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
