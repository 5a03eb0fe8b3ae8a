"""PyTorch peer for `kiln bench` on a GPU: transformers loads the same GGUF
(dequantized to fp16, as transformers does for GGUF checkpoints) and runs
prefill of `pp` tokens and greedy decode of `tg` tokens with its KV cache, in
eager mode. Prints one JSON object.

Usage: python3 torch_baseline.py DIR FILE.gguf [pp] [tg] [reps]
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    d, f = sys.argv[1], sys.argv[2]
    pp = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    tg = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    reps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float16).cuda().eval()
    load_s = time.time() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    pp_s, tg_s = [], []
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first repetition warms up
            ids = torch.randint(0, vocab, (1, pp), generator=g).cuda()
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(ids, use_cache=True)
            torch.cuda.synchronize()
            p = time.perf_counter() - t
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(tg):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            d_s = time.perf_counter() - t
            if rep > 0:
                pp_s.append(p)
                tg_s.append(d_s)
    print(json.dumps({
        "peer": "pytorch-transformers-eager-fp16",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name(0),
        "load_seconds": load_s,
        "prefill_tokens": pp,
        "decode_tokens": tg,
        "repetitions": reps,
        "prefill_tokens_per_second": pp * reps / sum(pp_s),
        "decode_tokens_per_second": tg * reps / sum(tg_s),
    }))


if __name__ == "__main__":
    main()
