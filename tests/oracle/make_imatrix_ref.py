#!/usr/bin/env python3
"""llama-imatrix reference for `kiln calibrate` (tests/calibrate.rs).

Runs llama.cpp's `llama-imatrix` (build: tests/oracle/build_llama_cpp.sh) on
SmolLM2-135M with tests/fixtures/text/calib-excerpt.txt, 2 chunks of 128 tokens,
and stores in tests/fixtures/oracle/smollm2-imatrix.json, per weight: the token
count, the total of `in_sum2` over channels, and for a few weights the whole
per-channel `in_sum2` vector. Needs the `gguf` package to read llama-imatrix's
output.

    python3 tests/oracle/make_imatrix_ref.py
"""
import json
import os
import subprocess
import tempfile
from pathlib import Path

from gguf import GGUFReader

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
BIN = CACHE / "llama.cpp" / "build" / "bin"
MODEL = CACHE / "models" / "smollm2-135m-instruct-q4_1.gguf"
TEXT = REPO / "tests" / "fixtures" / "text" / "calib-excerpt.txt"
CTX, CHUNKS = 128, 2
FULL = [f"blk.{b}.{w}.weight" for b in (0, 15) for w in ("attn_q", "attn_output", "ffn_down")]


def main():
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "imatrix.gguf"
        cmd = [str(BIN / "llama-imatrix"), "-m", str(MODEL), "-f", str(TEXT), "-c", str(CTX),
               "--chunks", str(CHUNKS), "-t", "2", "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        r = GGUFReader(str(out))
        t = {x.name: [float(v) for v in x.data.ravel()] for x in r.tensors}
    weights = {}
    for name in sorted(n[: -len(".in_sum2")] for n in t if n.endswith(".in_sum2")):
        s = t[name + ".in_sum2"]
        e = {"count": t[name + ".counts"][0], "total": sum(s)}
        if name in FULL:
            e["in_sum2"] = [float(f"{v:.6g}") for v in s]
        weights[name] = e
    ref = {
        "generated_by": " ".join(["llama-imatrix"] + cmd[2:-2] + ["-o", "OUT.gguf"]).replace(str(CACHE), "$KILN_CACHE").replace(str(REPO) + "/", ""),
        "llama_cpp": "b11434",
        "ctx": CTX,
        "chunks": CHUNKS,
        "weights": weights,
    }
    dst = REPO / "tests" / "fixtures" / "oracle" / "smollm2-imatrix.json"
    dst.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {dst} ({len(weights)} weights)")


if __name__ == "__main__":
    main()
