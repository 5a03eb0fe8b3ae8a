#!/usr/bin/env python3
"""Produce glassllm reference numbers for kiln's glassllm → Hugging Face conversion tests.

The oracle is the glassllm package itself (PyPI glassllm==0.1.0, a NumPy-only model):
for a few fixed prompts it records glassllm's own token ids (Tokenizer.encode), the
last-position logits of a full forward pass (float32 model built from the fp16
weights, as GlassLM.load does) and a greedy 16-token continuation (GlassLM.generate).

Installs nothing: it needs numpy and the unpacked wheel, by default at
${KILN_CACHE:-~/.cache/kiln}/pkgs/glassllm-0.1.0/ (the folder holding glassllm/).

    python3 tests/oracle/make_glassllm_refs.py                  # -> tests/fixtures/glassllm/reference.json
    python3 tests/oracle/make_glassllm_refs.py --pkg DIR --out FILE
"""
import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
DEFAULT_PKG = CACHE / "pkgs" / "glassllm-0.1.0"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "glassllm" / "reference.json"

# Plain prose, dialogue with curly quotes and a newline, and a character outside the
# alphabet (é, after NFC) that becomes <unk>.
PROMPTS = [
    "Once upon a time, there was a little",
    "\u201cWhere are you going?\u201d said the old man.\nThe",
    "She drank her cafe\u0301 and looked out of the window at the",
]
N_NEW = 16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pkg", type=Path, default=DEFAULT_PKG, help="folder holding the unpacked glassllm package")
    ap.add_argument("--lang", default="en")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if not (args.pkg / "glassllm" / "__init__.py").is_file():
        print(f"error: no glassllm package under {args.pkg} (unzip glassllm-0.1.0-py3-none-any.whl there)",
              file=sys.stderr)
        return 1
    sys.path.insert(0, str(args.pkg))
    import numpy as np
    import glassllm

    model, tok = glassllm.load_pretrained(args.lang)
    cases = []
    for text in PROMPTS:
        ids = tok.encode(text)
        logits = model.forward(ids).data[0, -1].astype(np.float32)
        greedy = [step.token for step in model.generate(ids, N_NEW, greedy=True)]
        cases.append({
            "prompt": text,
            "ids": ids,
            "last_logits": [round(float(x), 5) for x in logits],
            "greedy": greedy,
            "greedy_text": tok.decode(greedy),
        })
    doc = {
        "source": f"glassllm {glassllm.__version__} ({args.lang}), via tests/oracle/make_glassllm_refs.py",
        "numpy": np.__version__,
        "vocab_size": tok.vocab_size,
        "bos_prepended": False,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
