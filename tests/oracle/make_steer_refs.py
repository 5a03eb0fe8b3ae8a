#!/usr/bin/env python3
"""llama.cpp reference runs for kiln's steering (issue 11): greedy tokens of
SmolLM2-135M-Instruct with control vectors applied by llama.cpp.

    python3 tests/oracle/make_steer_refs.py   # -> tests/fixtures/steer/llama_cpp_steer.json

Needs the build from tests/oracle/build_llama_cpp.sh (kiln-greedy-ids,
llama-completion, llama-cvector-generator) and a release kiln (cargo build --release).

Vectors:
- kiln's: recipes/steer/verbosity/verbosity.safetensors, converted to a llama.cpp
  control-vector GGUF by `kiln steer convert` (the file llama.cpp loads);
- llama.cpp's: tests/fixtures/steer/llama-cvector-verbosity-mean.gguf, made by
  `llama-cvector-generator --method mean` from the same prompt files (regenerated
  with --regen-cvector).

For each, llama-completion (llama.cpp's own control-vector loader) must load the file
and its greedy text must equal kiln-greedy-ids' (which applies the same file through
llama_set_adapter_cvec); the fixture keeps kiln-greedy-ids' token ids and top-2 logits.
Only the Python standard library is used.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
BIN = CACHE / "llama.cpp" / "build" / "bin"
MODEL = CACHE / "models" / "smollm2-135m-instruct-q4_1.gguf"
KILN = REPO / "target" / "release" / "kiln"
OUT = REPO / "tests" / "fixtures" / "steer" / "llama_cpp_steer.json"
CVGEN = REPO / "tests" / "fixtures" / "steer" / "llama-cvector-verbosity-mean.gguf"
PROMPT_DIR = REPO / "recipes" / "steer" / "verbosity"

PROMPTS = [
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow do bees make honey?<|im_end|>\n<|im_start|>assistant\n",
]
N_PREDICT = 32
# (vector, scale, first layer, last layer) as llama.cpp's --control-vector-scaled / -layer-range.
RUNS = [
    ("recipes/steer/verbosity/verbosity.safetensors", -4.0, 10, 19),
    ("recipes/steer/verbosity/verbosity.safetensors", 3.0, 5, 25),
    ("tests/fixtures/steer/llama-cvector-verbosity-mean.gguf", 4.0, 10, 19),
]


def sha256(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regen-cvector", action="store_true")
    args = ap.parse_args()
    if args.regen_cvector:
        subprocess.run([str(BIN / "llama-cvector-generator"), "-m", str(MODEL),
                        "--positive-file", str(PROMPT_DIR / "positive.txt"),
                        "--negative-file", str(PROMPT_DIR / "negative.txt"),
                        "--method", "mean", "-t", "2", "-o", str(CVGEN)], check=True)
    tmp = Path(tempfile.mkdtemp())
    runs = []
    for vec, scale, first, last in RUNS:
        path = REPO / vec
        if path.suffix == ".safetensors":
            gguf = tmp / (path.stem + ".gguf")
            subprocess.run([str(KILN), "steer", "convert", str(path), "-o", str(gguf)], check=True)
        else:
            gguf = path
        out = subprocess.run([str(BIN / "kiln-greedy-ids"), "-m", str(MODEL), "-t", "2", "-n", str(N_PREDICT),
                              "--cvec", str(gguf), str(scale), "--cvec-range", str(first), str(last), "gen", *PROMPTS],
                             check=True, capture_output=True)
        rows = [json.loads(l) for l in out.stdout.decode("utf-8", errors="replace").splitlines() if l.strip()]
        for prompt, row in zip(PROMPTS, rows):
            # llama.cpp's own loader (common's --control-vector-scaled) must take the same file.
            lc = subprocess.run([str(BIN / "llama-completion"), "-m", str(MODEL), "-p", prompt, "-n", "12",
                                 "-no-cnv", "--temp", "0", "--no-display-prompt", "-t", "2",
                                 "--control-vector-scaled", f"{gguf}:{scale}",
                                 "--control-vector-layer-range", str(first), str(last)],
                                capture_output=True)
            if lc.returncode != 0:
                sys.exit(f"llama-completion refused {gguf}: {lc.stderr.decode(errors='replace')[-2000:]}")
            text = lc.stdout.decode("utf-8", errors="replace").strip()
            if not row["generated_text"].strip().startswith(text[:40]):
                sys.exit(f"llama-completion and kiln-greedy-ids disagree: {text!r} vs {row['generated_text']!r}")
            runs.append({
                "vector": vec, "vector_sha256": sha256(path), "scale": scale, "first": first, "last": last,
                "prompt": prompt, "prompt_ids": row["prompt_ids"], "generated_ids": row["generated_ids"],
                "top": row["top_per_step"], "llama_completion_text": text,
            })
            print(f"{vec} x{scale} layers {first}..={last}: {row['generated_text'][:80]!r}")
    OUT.write_text(json.dumps({
        "generated_by": "tests/oracle/make_steer_refs.py (kiln-greedy-ids --cvec; llama-completion --control-vector-scaled)",
        "llama_cpp": "b11434",
        "model_sha256": sha256(MODEL),
        "n_predict": N_PREDICT,
        "runs": runs,
    }, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
