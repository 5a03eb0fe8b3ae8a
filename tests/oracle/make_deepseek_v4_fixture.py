#!/usr/bin/env python3
"""Tiny DeepSeek-V4 fixture + reference logits from Hugging Face transformers.

    /work/venv-dsv4/bin/python tests/oracle/make_deepseek_v4_fixture.py
    # venv: python3 -m venv V && V/bin/pip install --no-cache-dir transformers==5.23.0 torch safetensors numpy

Writes
    tests/fixtures/deepseek-v4/tiny/config.json, model.safetensors  (save_pretrained layout)
    tests/fixtures/deepseek-v4/refs.safetensors                     (token ids + logits)

The model is a randomly initialised `DeepseekV4ForCausalLM` (transformers 5.23.0,
float32, eager attention, CPU) that has every DeepSeek-V4 feature switched on:
sliding-only, CSA (ratio 4 + Lightning Indexer top-k) and HCA (ratio 16) layers,
hash-MoE and learned-router MoE layers, shared expert, hyper-connections (hc_mult 4,
Sinkhorn), q-LoRA, grouped output projection, attention sinks, partial interleaved
RoPE with two bases (main θ=1e4, compress θ=1.6e5 + YaRN), swiglu clamp.
Weights are re-drawn from a seeded generator at O(1) scale so that every branch
visibly moves the logits (HF's own init leaves sinks/ape/biases at zero).

References are computed by the model *reloaded* from disk (so they describe the
saved checkpoint, not the in-memory one). For each of two token sequences:
    full      : one forward over the whole sequence (cache on)
    decode    : prefill tokens[:P], then one token at a time; logits of every step
    chunked   : (sequence 0 only) prefill, then multi-token chunks with the cache
plus, for sequence 0, every decoder layer's output streams and the final
compressed KV / indexer KV of each compressed layer, for debugging an importer.

The script also checks that no top-k decision (Lightning Indexer, learned router)
sits on a near tie, reports how much the sliding window / indexer / swiglu clamp
actually drop or clip, and exits nonzero on any failed check.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "fixtures" / "deepseek-v4"
SEED = 5

# Every layer type and every MLP type appears at least once; (attn, mlp) pairs:
# sliding+hash, CSA+hash, HCA+hash, CSA+moe, HCA+moe, sliding+moe.
CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    partial_rotary_factor=0.25,  # rope dims = 16 (the trailing 16 of each head)
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "sliding_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "hash_moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    sliding_window=16,
    index_n_heads=16,
    index_head_dim=32,
    index_topk=8,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    swiglu_limit=1.5,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    # YaRN as the real checkpoints use it; the config forces attention_factor=1.0.
    rope_parameters={
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    max_position_embeddings=1048576,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)

# (length, prefill length P) per sequence; P is deliberately not window-aligned for
# sequence 0 (37 = 9*4+1 = 2*16+5) and tiny for sequence 1.
SEQUENCES = [(128, 37), (97, 5)]
# Chunked-prefill schedule for sequence 0: chunk lengths after the first prefill.
CHUNKS0 = [37, 21, 1, 1, 14, 54]  # sums to 128
TIE_GAP_MIN = 1e-4
TOL = 1e-4


def redraw_weights(model: DeepseekV4ForCausalLM, gen: torch.Generator) -> None:
    """Overwrite every parameter/buffer with seeded O(1)-scale values."""
    cfg = model.config

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 2 and name.endswith("weight") and "norm" not in name:
                # Linear / embedding; rows get unit-variance outputs for unit inputs
                fan_in = p.shape[1]
                std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
                p.copy_(normal(p.shape, std))
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.copy_(normal(p.shape, p.shape[-1] ** -0.5))
            elif "norm" in name and leaf == "weight":
                p.copy_(normal(p.shape, 0.1, 1.0))
            elif leaf == "sinks":
                p.copy_(normal(p.shape, 1.0))
            elif leaf == "position_bias":  # `ape`
                p.copy_(normal(p.shape, 0.5))
            elif leaf in ("fn", "hc_fn"):
                p.copy_(normal(p.shape, p.shape[1] ** -0.5))
            elif leaf in ("base", "hc_base"):
                p.copy_(normal(p.shape, 0.5))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(normal(p.shape, 0.3, 1.0))
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(normal(b.shape, 0.1))
            elif name.endswith("tid2eid"):
                # distinct experts per token (duplicates would be applied twice)
                rows = [torch.randperm(cfg.n_routed_experts, generator=gen)[: cfg.num_experts_per_tok]
                        for _ in range(cfg.vocab_size)]
                b.copy_(torch.stack(rows).to(b.dtype))


def write_safetensors(path, tensors, metadata):
    """Byte-deterministic safetensors writer (safetensors' own `save_file` orders the
    `__metadata__` dict differently from run to run). Tensors are laid out in sorted
    name order; the header is padded with spaces to a multiple of 8 bytes."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        b = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


class Probe:
    """Forward hooks that record top-k margins and clamp activity."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.indexer_gaps = []  # boundary gap per (query) where top-k actually drops rows
        self.indexer_drops = 0
        self.indexer_queries = 0
        self.router_gaps = []
        self.clamp_hits = 0
        self.clamp_total = 0
        self._scores = None
        for m in model.modules():
            if isinstance(m, mdl.DeepseekV4IndexerScorer):
                m.register_forward_hook(self._scorer)
            elif isinstance(m, mdl.DeepseekV4Indexer):
                m.register_forward_hook(self._indexer)
            elif isinstance(m, mdl.DeepseekV4TopKRouter):
                m.register_forward_hook(self._router)
            elif isinstance(m, mdl.DeepseekV4Experts):
                m.register_forward_pre_hook(self._experts)
            elif isinstance(m, mdl.DeepseekV4MLP):
                m.register_forward_hook(self._mlp)

    def _scorer(self, mod, args, out):
        self._scores = out.detach().double()  # [B, S, T]

    def _indexer(self, mod, args, out):
        position_ids = args[2][0]
        scores = self._scores[0]
        ratio, k = self.cfg.compress_rates["compressed_sparse_attention"], self.cfg.index_topk
        for s, p in enumerate(position_ids.tolist()):
            n_valid = min((p + 1) // ratio, scores.shape[-1])
            if n_valid == 0:
                continue
            self.indexer_queries += 1
            if n_valid <= k:
                continue
            self.indexer_drops += 1
            v = torch.sort(scores[s, :n_valid], descending=True).values
            self.indexer_gaps.append(float(v[k - 1] - v[k]))

    def _router(self, mod, args, out):
        flat = args[0].reshape(-1, mod.hidden_dim)
        logits = torch.nn.functional.linear(flat, mod.weight).double()
        sel = mod.score_fn(logits) + mod.e_score_correction_bias.double()
        v = torch.sort(sel, dim=-1, descending=True).values
        self.router_gaps.extend((v[:, mod.top_k - 1] - v[:, mod.top_k]).tolist())

    def _experts(self, mod, args):
        x, idx = args[0], args[1]
        for e in idx.unique().tolist():
            tok = (idx == e).any(-1)
            gu = torch.nn.functional.linear(x[tok], mod.gate_up_proj[e])
            g, u = gu.chunk(2, dim=-1)
            self.clamp_hits += int((g > mod.limit).sum() + (u.abs() > mod.limit).sum())
            self.clamp_total += 2 * g.numel()

    def _mlp(self, mod, args, out):
        x = args[0]
        g, u = mod.gate_proj(x), mod.up_proj(x)
        self.clamp_hits += int((g > mod.limit).sum() + (u.abs() > mod.limit).sum())
        self.clamp_total += 2 * g.numel()


@torch.no_grad()
def run_full(model, ids, use_cache=True):
    cache = DynamicCache(config=model.config) if use_cache else None
    out = model(input_ids=ids, past_key_values=cache, use_cache=use_cache)
    return out.logits[0], cache


@torch.no_grad()
def run_chunks(model, ids, chunks):
    """Feed `ids` through the cache in the given chunk lengths; return per-position logits."""
    cache = DynamicCache(config=model.config)
    logits, pos = [], 0
    for n in chunks:
        out = model(input_ids=ids[:, pos: pos + n], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0])
        pos += n
    assert pos == ids.shape[1]
    return torch.cat(logits, 0), cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--config-override", type=str, default=None,
                    help="JSON dict merged into CONFIG (for variant checks; do not commit its output)")
    ap.add_argument("--seed", type=int, default=SEED, help="weights use seed, token ids seed+1")
    ap.add_argument("--no-numpy-check", action="store_true", help="skip running the numpy oracle at the end")
    args = ap.parse_args()

    seed = args.seed
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # deterministic reductions
    conf = dict(CONFIG)
    if args.config_override:
        conf.update(json.loads(args.config_override))
    cfg = DeepseekV4Config(**conf)
    cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(cfg).eval()
    redraw_weights(model, torch.Generator().manual_seed(seed))

    tiny = args.out / "tiny"
    if tiny.exists():
        shutil.rmtree(tiny)
    model.save_pretrained(tiny)
    # generation_config.json is not part of the architecture; keep the fixture to the two files
    gen_cfg = tiny / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()

    # Reload and insist that every tensor survived the save/rename/load round trip.
    reloaded = DeepseekV4ForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager").eval()
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    bad = [k for k in sd0 if k not in sd1 or not torch.equal(sd0[k], sd1[k])]
    if bad or set(sd0) != set(sd1):
        sys.exit(f"FAIL: reload changed tensors: {bad[:10]} / key sets differ: {set(sd0) ^ set(sd1)}")
    print(f"reload round trip: {len(sd0)} tensors identical")
    model = reloaded
    probe = Probe(model, model.config)

    gen = torch.Generator().manual_seed(seed + 1)
    refs = {}
    failures = []

    def check(name, a, b):
        d = float((a - b).abs().max())
        flag = "" if d <= TOL else "   <-- FAIL"
        print(f"  {name:44s} max|diff| = {d:.3e}{flag}")
        if d > TOL:
            failures.append(name)

    for si, (length, P) in enumerate(SEQUENCES):
        ids = torch.randint(2, model.config.vocab_size, (1, length), generator=gen)
        ids[0, 0] = model.config.bos_token_id
        print(f"sequence {si}: length {length}, prefill {P}")
        full, cache = run_full(model, ids, use_cache=True)
        nocache, _ = run_full(model, ids, use_cache=False)
        dec, _ = run_chunks(model, ids, [P] + [1] * (length - P))
        check(f"seq{si} full(cache) vs full(no cache)", full, nocache)
        check(f"seq{si} full vs prefill+decode", full, dec)
        refs[f"seq{si}.tokens"] = ids[0].to(torch.int64)
        refs[f"seq{si}.prefill_len"] = torch.tensor([P], dtype=torch.int64)
        refs[f"seq{si}.full_logits"] = full.float()
        refs[f"seq{si}.decode_logits"] = dec[P:].float()  # logits at positions P..length-1
        refs[f"seq{si}.prefill_logits"] = dec[:P].float()  # logits of the cached prefill call
        if si == 0:
            ch, _ = run_chunks(model, ids, CHUNKS0)
            check("seq0 full vs chunked " + str(CHUNKS0), full, ch)
            refs["seq0.chunks"] = torch.tensor(CHUNKS0, dtype=torch.int64)
            refs["seq0.chunked_logits"] = ch.float()
            # per-layer output streams of the full forward, for importer debugging
            layer_out = {}
            hooks = [layer.register_forward_hook(
                lambda m, a, o, i=i: layer_out.__setitem__(i, o.detach()))
                for i, layer in enumerate(model.model.layers)]
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            for h in hooks:
                h.remove()
            for i in range(len(model.model.layers)):
                refs[f"seq0.layer{i}.out_streams"] = layer_out[i][0].float()  # [S, hc, D]
            # compressed streams at the end of the cached full forward
            for i, lt in enumerate(model.config.layer_types):
                cl = cache.layers[i]
                if lt != "sliding_attention":
                    refs[f"seq0.layer{i}.compressed_kv"] = cl.compressed_kv["compressor"][0].float()
                if lt == "compressed_sparse_attention":
                    refs[f"seq0.layer{i}.indexer_kv"] = cl.compressed_kv["indexer"][0].float()

    # ---- probes: are the interesting branches active, and are decisions well separated?
    ig = np.array(probe.indexer_gaps)
    rg = np.array(probe.router_gaps)
    print(f"indexer: {probe.indexer_queries} query evaluations, top-k dropped rows in {probe.indexer_drops}; "
          f"min boundary gap {ig.min():.3e} (median {np.median(ig):.3e})")
    print(f"router (learned): {rg.size} selections, min top-k boundary gap {rg.min():.3e}")
    print(f"swiglu clamp: {probe.clamp_hits}/{probe.clamp_total} gate/up pre-activations clipped "
          f"({100.0 * probe.clamp_hits / max(probe.clamp_total, 1):.1f}%)")
    W = model.config.sliding_window
    print(f"sliding window {W}: raw tokens dropped for every query at position >= {W}")
    if probe.indexer_drops == 0:
        failures.append("indexer never drops a compressed row")
    if ig.min() < TIE_GAP_MIN:
        failures.append(f"indexer top-k near tie ({ig.min():.3e}); change seed/dims")
    if rg.min() < TIE_GAP_MIN:
        failures.append(f"router top-k near tie ({rg.min():.3e}); change seed/dims")
    if probe.clamp_hits == 0:
        failures.append("swiglu clamp never active")

    write_safetensors(args.out / "refs.safetensors", refs,
                      metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                                "seed": str(seed), "generator": "tests/oracle/make_deepseek_v4_fixture.py"})
    for f in sorted(args.out.rglob("*")):
        if f.is_file():
            print(f"wrote {f.relative_to(REPO) if f.is_relative_to(REPO) else f} ({f.stat().st_size} bytes)")

    if not args.no_numpy_check:
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("deepseek_v4_numpy.py")),
                            "--fixture", str(args.out)])
        if r.returncode != 0:
            failures.append("numpy oracle disagrees")

    if failures:
        print("FAILED:", "; ".join(failures))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
