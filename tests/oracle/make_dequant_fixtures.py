#!/usr/bin/env python3
"""Writes the bit-exact (de)quantization fixtures in tests/fixtures/dequant/ using gguf-py as the oracle.

Usage:
    python3 tests/oracle/make_dequant_fixtures.py [--smollm2 GGUF] [--qwen GGUF] [--llama-quantize BIN]

Defaults (see tests/oracle/README.md for how they are fetched and built), under
${KILN_CACHE:-~/.cache/kiln}:
    --smollm2         models/smollm2-135m-instruct-q4_1.gguf   (or $KILN_SMOLLM2_GGUF)
    --qwen            models/qwen2.5-coder-0.5b.gguf           (or $KILN_QWEN05_GGUF)
    --llama-quantize  llama.cpp/build/bin/llama-quantize       (llama.cpp b11434)

Requires the `gguf` and `numpy` packages (pip install gguf numpy); the committed
fixtures were generated with gguf 0.19.0 / numpy 2.4.6. The output is
deterministic.

Outputs, for every dtype:
    <type>.bin   raw blocks (little-endian elements for f32/f16/bf16)
    <type>.f32   gguf.quants.dequantize(<type>.bin) as little-endian float32
for the types gguf-py can quantize (f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0):
    quant_input.f32   one float32 row (544 values = 17 blocks)
    <type>.quant.bin  gguf.quants.quantize(quant_input.f32)
and for frontend/tests/gguf_real.rs:
    smollm2_token_embd_row0.f32   row 0 of SmolLM2's token_embd.weight, dequantized
MANIFEST.txt lists every file with its source.

Where the blocks come from ("first N blocks" = the first N blocks of the
tensor's data, i.e. the start of row 0):
    f32    SmolLM2 blk.0.attn_norm.weight[:120] + 8 special values
    f16    the same values * 0.01, rounded by gguf-py + 8 special bit patterns
    bf16   likewise
    q4_1   SmolLM2 blk.0.attn_q.weight, first 16 blocks         (real file)
    q8_0   SmolLM2 token_embd.weight, first 16 blocks           (real file)
    q5_0   Qwen2.5-Coder-0.5B blk.0.ffn_gate.weight, 16 blocks  (real file)
    q4_k   Qwen2.5-Coder-0.5B blk.2.ffn_down.weight, 4 blocks   (real file)
    q6_k   Qwen2.5-Coder-0.5B blk.0.ffn_down.weight, 4 blocks   (real file)
    q2_k, q3_k, q5_k, q4_0, q5_1
           llama-quantize (ggml's own quantizers) run on SmolLM2 with
           blk.{0,1,2,3,4}.ffn_down.weight forced to q2_k/q3_k/q5_k/q4_0/q5_1
           (requantized from Q4_1): first 4 (k-quants) or 16 blocks
    every k-quant also gets 4 seeded random blocks whose f16 scale fields are
    finite (one negative, one subnormal), to reach bit patterns real data
    rarely has; q4_0 gets one extra block with d = +inf (inf and NaN outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "dequant"
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))

# Tensors of SmolLM2 that llama-quantize is told to produce in each type.
FORCED = {
    T.Q2_K: "blk.0.ffn_down.weight",
    T.Q3_K: "blk.1.ffn_down.weight",
    T.Q5_K: "blk.2.ffn_down.weight",
    T.Q4_0: "blk.3.ffn_down.weight",
    T.Q5_1: "blk.4.ffn_down.weight",
    T.IQ4_NL: "blk.5.ffn_down.weight",
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor(reader: GGUFReader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise SystemExit(f"{reader.data.filename}: tensor {name} not found")


def first_blocks(reader: GGUFReader, name: str, qtype: T, n_blocks: int) -> np.ndarray:
    t = tensor(reader, name)
    if t.tensor_type != qtype:
        raise SystemExit(f"{name} is {t.tensor_type.name}, expected {qtype.name}")
    _, type_size = GGML_QUANT_SIZES[qtype]
    return t.data.reshape(-1).view(np.uint8)[: n_blocks * type_size].copy()


def oracle(raw: np.ndarray, qtype: T) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with np.errstate(invalid="ignore"):  # the d=+inf block makes NaNs on purpose
        out = np.asarray(dequantize(raw.reshape(1, -1), qtype), dtype=np.float32).reshape(-1)
    assert out.size == raw.size // type_size * block_size
    return out


def random_kquant_blocks(qtype: T, rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Random bytes with every f16 scale field set to a finite value."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    # (d offset, dmin offset or None) per type.
    fields = {
        T.Q2_K: (80, 82),
        T.Q3_K: (108, None),
        T.Q4_K: (0, 2),
        T.Q5_K: (0, 2),
        T.Q6_K: (208, None),
    }[qtype]
    for i in range(n_blocks):
        d = float(rng.uniform(1e-4, 5e-2))
        dmin = float(rng.uniform(1e-4, 5e-2))
        if i == 1:
            d = -d  # negative super-block scale
        if i == 2:
            d = 3e-7  # f16 subnormal
        for off, val in zip(fields, (d, dmin)):
            if off is not None:
                blocks[i, off : off + 2] = np.array([val], dtype=np.float16).view(np.uint8)
    return blocks.reshape(-1)


class Fixtures:
    def __init__(self) -> None:
        self.manifest: list[str] = []

    def write(self, name: str, data: np.ndarray, note: str) -> None:
        path = OUT / name
        path.write_bytes(np.ascontiguousarray(data).tobytes())
        self.manifest.append(f"{name:30} {path.stat().st_size:5} B  {note}")

    def pair(self, qtype: T, name: str, raw: np.ndarray, note: str) -> None:
        self.write(f"{name}.bin", raw, note)
        self.write(f"{name}.f32", oracle(raw, qtype), f"gguf.quants.dequantize({name}.bin)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smollm2",
        type=Path,
        default=Path(os.environ.get("KILN_SMOLLM2_GGUF", CACHE / "models" / "smollm2-135m-instruct-q4_1.gguf")),
    )
    ap.add_argument(
        "--qwen",
        type=Path,
        default=Path(os.environ.get("KILN_QWEN05_GGUF", CACHE / "models" / "qwen2.5-coder-0.5b.gguf")),
    )
    ap.add_argument("--llama-quantize", type=Path, default=CACHE / "llama.cpp" / "build" / "bin" / "llama-quantize")
    args = ap.parse_args()
    for p in (args.smollm2, args.qwen, args.llama_quantize):
        if not p.exists():
            raise SystemExit(f"{p} does not exist (see --help and tests/oracle/README.md)")

    OUT.mkdir(parents=True, exist_ok=True)
    fx = Fixtures()
    smol = GGUFReader(args.smollm2)
    qwen = GGUFReader(args.qwen)
    rng = np.random.default_rng(20250207)

    with tempfile.TemporaryDirectory() as tmp:
        mixed_path = Path(tmp) / "smollm2-mixed.gguf"
        cmd = [str(args.llama_quantize), "--allow-requantize"]
        for qtype, name in FORCED.items():
            cmd += ["--tensor-type", f"{re.escape(name.removesuffix('.weight'))}={qtype.name.lower()}"]
        cmd += [str(args.smollm2), str(mixed_path), "Q4_1", "2"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mixed = GGUFReader(mixed_path)
        forced = {q: first_blocks(mixed, n, q, 16) for q, n in FORCED.items()}
        del mixed

    # --- plain types -------------------------------------------------------
    norm = np.asarray(tensor(smol, "blk.0.attn_norm.weight").data, dtype=np.float32).reshape(-1)
    special_f32 = np.array(
        [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001, 0x80800000],
        dtype=np.uint32,
    ).view(np.float32)
    f32 = np.concatenate([norm[:120], special_f32]).astype(np.float32)
    fx.pair(T.F32, "f32", f32.view(np.uint8), "SmolLM2 blk.0.attn_norm.weight[:120] + specials")

    scaled = norm[:120] * np.float32(0.01)
    special_f16 = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x83FF], dtype=np.uint16)
    f16 = np.concatenate([quantize(scaled, T.F16).view(np.uint16), special_f16])
    fx.pair(T.F16, "f16", f16.view(np.uint8), "SmolLM2 blk.0.attn_norm.weight[:120]*0.01 as f16 + specials")

    special_bf16 = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F], dtype=np.uint16)
    bf16 = np.concatenate([quantize(scaled, T.BF16).view(np.uint16), special_bf16])
    fx.pair(T.BF16, "bf16", bf16.view(np.uint8), "SmolLM2 blk.0.attn_norm.weight[:120]*0.01 as bf16 + specials")

    # --- legacy block types -------------------------------------------------
    fx.pair(T.Q4_1, "q4_1", first_blocks(smol, "blk.0.attn_q.weight", T.Q4_1, 16),
            "SmolLM2 blk.0.attn_q.weight, first 16 blocks (real file)")
    fx.pair(T.Q8_0, "q8_0", first_blocks(smol, "token_embd.weight", T.Q8_0, 16),
            "SmolLM2 token_embd.weight, first 16 blocks (real file)")
    fx.pair(T.Q5_0, "q5_0", first_blocks(qwen, "blk.0.ffn_gate.weight", T.Q5_0, 16),
            "Qwen2.5-Coder-0.5B blk.0.ffn_gate.weight, first 16 blocks (real file)")
    inf_block = forced[T.Q4_0][:18].copy()
    inf_block[0:2] = np.array([0x7C00], dtype=np.uint16).view(np.uint8)
    fx.pair(T.Q4_0, "q4_0", np.concatenate([forced[T.Q4_0], inf_block]),
            f"llama-quantize SmolLM2 {FORCED[T.Q4_0]} to Q4_0, first 16 blocks + 1 block with d=+inf")
    fx.pair(T.Q5_1, "q5_1", forced[T.Q5_1],
            f"llama-quantize SmolLM2 {FORCED[T.Q5_1]} to Q5_1, first 16 blocks")
    # IQ4_NL: every index in both nibbles and a negative scale, besides the real blocks.
    all_codes = forced[T.IQ4_NL][:18].copy()
    all_codes[0:2] = np.array([0xA8F3], dtype=np.uint16).view(np.uint8)  # d = -0.0999
    all_codes[2:18] = np.array([(i & 15) | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)
    fx.pair(T.IQ4_NL, "iq4_nl", np.concatenate([forced[T.IQ4_NL], all_codes]),
            f"llama-quantize SmolLM2 {FORCED[T.IQ4_NL]} to IQ4_NL, first 16 blocks + 1 block of all codes, d < 0")

    # --- k-quants: 4 real blocks + 4 random ones -----------------------------
    real_k = {
        T.Q4_K: (first_blocks(qwen, "blk.2.ffn_down.weight", T.Q4_K, 4),
                 "Qwen2.5-Coder-0.5B blk.2.ffn_down.weight, first 4 blocks (real file)"),
        T.Q6_K: (first_blocks(qwen, "blk.0.ffn_down.weight", T.Q6_K, 4),
                 "Qwen2.5-Coder-0.5B blk.0.ffn_down.weight, first 4 blocks (real file)"),
    }
    for qtype in (T.Q2_K, T.Q3_K, T.Q5_K):
        _, type_size = GGML_QUANT_SIZES[qtype]
        real_k[qtype] = (forced[qtype][: 4 * type_size],
                         f"llama-quantize SmolLM2 {FORCED[qtype]} to {qtype.name}, first 4 blocks")
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        real, note = real_k[qtype]
        raw = np.concatenate([real, random_kquant_blocks(qtype, rng, 4)])
        fx.pair(qtype, qtype.name.lower(), raw, note + " + 4 seeded random blocks")

    # --- quantizers ----------------------------------------------------------
    embd = oracle(first_blocks(smol, "token_embd.weight", T.Q8_0, 8), T.Q8_0)
    noise = rng.normal(0.0, 0.05, size=7 * 32).astype(np.float32)
    ties = np.array([0.5, -0.5] + [0.25] * 30, dtype=np.float32)  # +max and -max tie
    quant_in = np.concatenate([embd, noise, np.zeros(32, np.float32), ties]).astype(np.float32)
    fx.write("quant_input.f32", quant_in,
             "SmolLM2 token_embd.weight[:256] (dequantized) + 224 x N(0, 0.05) + 32 zeros + a +-max tie block")
    for qtype in (T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        q = np.asarray(quantize(quant_in.reshape(1, -1), qtype)).reshape(-1).view(np.uint8)
        fx.write(f"{qtype.name.lower()}.quant.bin", q, f"gguf.quants.quantize(quant_input.f32, {qtype.name})")

    # --- real-file check for frontend/tests/gguf_real.rs ----------------------
    row0 = oracle(first_blocks(smol, "token_embd.weight", T.Q8_0, 576 // 32), T.Q8_0)
    fx.write("smollm2_token_embd_row0.f32", row0, "SmolLM2 token_embd.weight row 0 (576 values), dequantized")

    header = [
        "Generated by tests/oracle/make_dequant_fixtures.py; do not edit.",
        f"SmolLM2: {args.smollm2.name} sha256 {sha256(args.smollm2)}",
        f"Qwen:    {args.qwen.name} sha256 {sha256(args.qwen)}",
        "llama-quantize: llama.cpp b11434 (tests/oracle/build_llama_cpp.sh)",
        "",
    ]
    (OUT / "MANIFEST.txt").write_text("\n".join(header + fx.manifest) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(fx.manifest)} fixtures to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
