#!/usr/bin/env python3
"""Build the contrastive prompt files for the verbosity steering direction.

Reads pairs.json (next to this script) and writes, next to it:
  positive.txt  - each question under a system prompt asking for long, detailed
                  answers, ending where the assistant's answer begins
  negative.txt  - the same question under a system prompt asking for one short
                  sentence, ending at the same place
  positive-answers.txt / negative-answers.txt - the other contrast: the same
                  question answered verbosely / concisely (ends after the answer)
Line i of each file comes from pair i. Each prompt uses the SmolLM2-Instruct
ChatML template with newlines written as the two characters backslash and n
(the prompt-file convention of llama.cpp's cvector-generator).

The shipped direction (verbosity.safetensors) is computed from positive.txt /
negative.txt at the last token (`--positions last`): the state where the model
starts its answer, which is where it settles how long the answer will be.

Usage: python3 make_prompts.py   (stdlib only; output is deterministic)
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VERBOSE = "Answer every question at great length: give background, many details, examples and a summary."
CONCISE = "Answer every question in one short sentence, with no extra detail."
NL = "\\n"  # literal backslash-n, expanded back to a newline by the consumer


def prompt(question: str, answer: str, instruction: str = "") -> str:
    system = SYSTEM + (". " + instruction if instruction else "")
    return (
        "<|im_start|>system" + NL + system + "<|im_end|>" + NL
        + "<|im_start|>user" + NL + question + "<|im_end|>" + NL
        + "<|im_start|>assistant" + NL + answer
    )


def main() -> None:
    with open(os.path.join(HERE, "pairs.json"), encoding="utf-8") as f:
        pairs = json.load(f)

    for p in pairs:
        for key in ("question", "concise", "verbose"):
            text = p[key]
            if any(c in text for c in "\n\r\t") or "\\n" in text:
                raise SystemExit(f"pair field {key!r} contains a newline/tab: {text[:60]!r}")

    outputs = {
        "positive.txt": [prompt(p["question"], "", VERBOSE) for p in pairs],
        "negative.txt": [prompt(p["question"], "", CONCISE) for p in pairs],
        "positive-answers.txt": [prompt(p["question"], p["verbose"]) for p in pairs],
        "negative-answers.txt": [prompt(p["question"], p["concise"]) for p in pairs],
    }
    for name, lines in outputs.items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {name}: {len(lines)} prompts")


if __name__ == "__main__":
    main()
