#!/usr/bin/env python3
"""Compares kiln's kq2 format with llama.cpp's 2- and 3-bit formats on real weights.

Steps (everything temporary goes under --work, default /tmp/kq2cmp):

1. dump rows of a few tensors of a GGUF model (dequantized with the `gguf`
   package) and their importance (`in_sum2 / counts` from a kiln imatrix,
   `kiln calibrate ... -o imatrix.safetensors`) as raw little-endian f32;
2. build tests/oracle/ggml_quant_err.c against llama.cpp's libggml-base.so and
   run it for each ggml type: quantize with the importance, dequantize back;
3. run `cargo run --release -p kiln-quant --example kq2_vs_ggml -- WORK`,
   which quantizes the same rows with kq2 and prints the importance-weighted
   relative RMSE of every format, sqrt(sum_j imp_j (w - w')^2 / sum_j imp_j w^2)
   over all sampled rows.

ggml's k-quants and IQ2 types need rows that are a multiple of 256; rows of 896
(Qwen2.5-0.5B's attn_q, ffn_gate, ffn_up) are handed to ggml two at a time as
rows of 1792 with the importance repeated, so some of ggml's 256-blocks
straddle two weight rows (kq2 works per 64 and does not care). Each tensor's
row count is rounded down to an even number for that.

Usage:
  kiln calibrate MODEL.gguf -f tests/fixtures/text/calib-excerpt.txt --ctx 256 \\
      --chunks 4 -o /tmp/qwen.imatrix.safetensors
  tests/oracle/kq2_compare.py [--model M] [--imatrix I] [--rows N] [--work DIR]
"""

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
LLAMA = CACHE / "llama.cpp"
GGML_TYPES = ["iq2_xxs", "iq2_xs", "iq2_s", "q2_K", "q3_K"]
DEFAULT_TENSORS = [
    f"blk.{layer}.{name}.weight"
    for layer in (0, 12, 23)
    for name in ("attn_q", "ffn_gate", "ffn_up", "ffn_down")
]


def read_imatrix(path):
    """Mean squared activation per input column: name -> f32[k]."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, meta in header.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        a, b = meta["data_offsets"]
        s2 = np.frombuffer(data[a:b], dtype="<f4")
        ca, cb = header[name + ".counts"]["data_offsets"]
        counts = np.frombuffer(data[ca:cb], dtype="<f4")
        out[name] = (s2 / np.maximum(counts, 1.0)).astype("<f4")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(CACHE / "models" / "qwen2.5-coder-0.5b.gguf"))
    ap.add_argument("--imatrix", default="/tmp/qwen.imatrix.safetensors")
    ap.add_argument("--rows", type=int, default=256, help="rows sampled (evenly spaced) per tensor")
    ap.add_argument("--work", default="/tmp/kq2cmp")
    ap.add_argument("--tensors", nargs="*", default=DEFAULT_TENSORS)
    ap.add_argument("--skip-cargo", action="store_true", help="only prepare the data and ggml outputs")
    args = ap.parse_args()

    import gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    imat = read_imatrix(args.imatrix)
    reader = gguf.GGUFReader(args.model)
    tensors = {t.name: t for t in reader.tensors}

    helper = work / "ggml_quant_err"
    inc, lib = LLAMA / "src" / "ggml" / "include", LLAMA / "build" / "bin"
    subprocess.run(
        [os.environ.get("CC", "cc"), "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{inc}",
         str(HERE / "ggml_quant_err.c"), "-o", str(helper), f"-L{lib}", "-lggml-base", f"-Wl,-rpath,{lib}"],
        check=True,
    )

    manifest = []
    for name in args.tensors:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype("<f4")
        nrows, k = w.shape
        take = min(args.rows, nrows) // 2 * 2
        idx = np.linspace(0, nrows - 1, take).round().astype(int)
        rows = np.ascontiguousarray(w[idx])
        imp = imat[name]
        assert imp.shape == (k,), (name, imp.shape, k)
        rows.tofile(work / f"{name}.f32")
        imp.tofile(work / f"{name}.imp.f32")
        # ggml needs whole 256-blocks per row: pair rows when k is not a multiple of 256.
        pair = 1 if k % 256 == 0 else 2
        np.tile(imp, pair).astype("<f4").tofile(work / f"{name}.impg.f32")
        entry = {"name": name, "rows": take, "cols": k, "source": t.tensor_type.name, "ggml": {}}
        for ty in GGML_TYPES:
            out = work / f"{name}.{ty}.f32"
            r = subprocess.run(
                [str(helper), ty, str(k * pair), str(take // pair), str(work / f"{name}.f32"),
                 str(work / f"{name}.impg.f32"), str(out)],
                capture_output=True, text=True,
            )
            if r.returncode != 0:
                print(f"{name} {ty}: {r.stderr.strip()}", file=sys.stderr)
                continue
            _, bpw, _ = r.stdout.split()
            entry["ggml"][ty] = float(bpw)
        manifest.append(entry)
        print(f"dumped {name}: {take} rows of {k} ({t.tensor_type.name})", file=sys.stderr)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    # The same, one tensor a line, for the Rust example: NAME ROWS COLS TYPE=BPW...
    (work / "manifest.txt").write_text("".join(
        f"{e['name']} {e['rows']} {e['cols']} " + " ".join(f"{t}={b}" for t, b in e["ggml"].items()) + "\n"
        for e in manifest
    ))

    if not args.skip_cargo:
        subprocess.run(
            ["cargo", "run", "--release", "-q", "-p", "kiln-quant", "--example", "kq2_vs_ggml", "--", str(work)],
            cwd=REPO, check=True,
        )


if __name__ == "__main__":
    main()
