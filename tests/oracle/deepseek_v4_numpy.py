#!/usr/bin/env python3
"""DeepSeek-V4 forward pass in plain numpy: the executable specification.

    python3 tests/oracle/deepseek_v4_numpy.py [--fixture tests/fixtures/deepseek-v4] [--dtype float32|float64]

Reads a checkpoint (config.json + *.safetensors, Hugging Face `save_pretrained`
layout or the official upstream layout) and reproduces the logits of
transformers 5.23.0 `DeepseekV4ForCausalLM`, both for a whole-sequence prefill and
for incremental decoding with an explicit cache. Independent of torch/transformers
(only numpy and the standard library are imported). With the fixture's
`refs.safetensors` it checks itself and exits nonzero on a mismatch (> 1e-4).

The model, per token position p (shapes for one token; S tokens are processed
as a chunk and every op is row-wise except attention and the compressors):

    h      = embed[token]                                   [D]
    X      = h copied into hc streams                       [hc, D]
    for each layer:
        X  = hyper_block(X, attention)                      (mHC around the attention)
        X  = hyper_block(X, moe)                            (mHC around the MoE)
    y      = rms_norm(hc_head(X), norm) ; logits = head @ y

Cache per layer (LayerCache): the last (window-1) rotated K=V rows, plus for a
CSA/HCA layer a CompressorState (and for CSA a second one for the indexer).
Decode = forward_chunk() with S=1; prefill = forward_chunk() with S=n on an
empty cache; chunked prefill = several calls. There is no other code path.

Tensor names: canonical names below are the upstream DeepSeek ones
(`layers.N.attn.wq_a.weight`, `embed.weight`, `head.weight`, `hc_head_fn`, ...).
`save_pretrained` writes them with a `model.` prefix on most keys and keeps the
HF spelling for a few (`model.embed_tokens.weight`, `model.hc_head.hc_fn`);
`canonical_name()` folds all spellings together.
"""
import argparse
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURE = REPO / "tests" / "fixtures" / "deepseek-v4"
TOL = 1e-4

# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_safetensors(path):
    """Minimal safetensors reader: u64 LE header length, JSON header, raw LE data.
    BF16 is widened to float32 by shifting into the high half of a u32."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out, meta = {}, header.pop("__metadata__", {})
    for name, info in header.items():
        a, b = info["data_offsets"]
        buf = raw[base + a: base + b]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).copy()
    return out, meta


def canonical_name(name):
    """Map HF-saved / HF-internal-free spellings onto upstream DeepSeek names."""
    if name.startswith("model."):
        name = name[len("model."):]
    return {
        "embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "hc_head.hc_fn": "hc_head_fn",
        "hc_head.hc_base": "hc_head_base",
        "hc_head.hc_scale": "hc_head_scale",
    }.get(name, name)


@dataclass
class Config:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_experts: int
    top_k: int
    moe_inter: int
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    layer_types: list
    mlp_layer_types: list
    ratio: dict  # layer type -> compress ratio
    window: int
    index_heads: int
    index_head_dim: int
    index_topk: int
    hc: int
    sinkhorn_iters: int
    hc_eps: float
    eps: float
    rope: dict  # "main"/"compress" -> rope parameter dict

    @staticmethod
    def from_json(d):
        n = d["num_hidden_layers"]
        # layer types: explicit, else legacy per-layer `compress_ratios` (0/4/128)
        lt = d.get("layer_types")
        if lt is None:
            m = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
            lt = [m[r] for r in d["compress_ratios"]]
        rates = d.get("compress_rates") or {"compressed_sparse_attention": d.get("compress_rate_csa", 4),
                                            "heavily_compressed_attention": d.get("compress_rate_hca", 128)}
        mlt = d.get("mlp_layer_types")
        if mlt is None:
            nh = d.get("num_hash_layers", 3)
            mlt = ["hash_moe"] * min(n, nh) + ["moe"] * max(0, n - nh)
        prf = d.get("partial_rotary_factor")
        if prf is None:
            prf = d["qk_rope_head_dim"] / d["head_dim"] if "qk_rope_head_dim" in d else 64 / 512
        rp = d.get("rope_parameters") or {}
        if not (isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)):
            # flat form: the YaRN keys belong to the compress rope only
            flat = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            rp = {"main": {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)},
                  "compress": {**flat, "rope_theta": d.get("compress_rope_theta", 160000.0)}}
            rp["compress"].setdefault("rope_type", "default")
            if rp["compress"]["rope_type"] == "yarn":
                rp["compress"].setdefault("attention_factor", 1.0)
        return Config(
            vocab_size=d["vocab_size"], hidden=d["hidden_size"], n_layers=n,
            n_heads=d["num_attention_heads"], head_dim=d["head_dim"],
            rope_dim=int(d["head_dim"] * prf), q_lora_rank=d["q_lora_rank"],
            o_groups=d["o_groups"], o_lora_rank=d["o_lora_rank"],
            n_experts=d["n_routed_experts"], top_k=d["num_experts_per_tok"],
            moe_inter=d["moe_intermediate_size"], scoring_func=d.get("scoring_func", "sqrtsoftplus"),
            routed_scaling_factor=d.get("routed_scaling_factor", 1.5), swiglu_limit=d.get("swiglu_limit", 10.0),
            layer_types=list(lt[:n]), mlp_layer_types=list(mlt[:n]),
            ratio={"compressed_sparse_attention": rates["compressed_sparse_attention"],
                   "heavily_compressed_attention": rates["heavily_compressed_attention"]},
            window=d["sliding_window"], index_heads=d["index_n_heads"], index_head_dim=d["index_head_dim"],
            index_topk=d["index_topk"], hc=d["hc_mult"], sinkhorn_iters=d["hc_sinkhorn_iters"],
            hc_eps=d["hc_eps"], eps=d["rms_norm_eps"], rope=rp)


# ----------------------------------------------------------------------------
# Elementary ops
# ----------------------------------------------------------------------------

def linear(x, w):
    """y = x @ w^T (torch nn.Linear layout: w is [out, in])."""
    return x @ w.T


def rms_norm(x, w, eps):
    """Weighted RMSNorm over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def unweighted_rms_norm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def softplus(x):
    # torch's softplus (beta=1, threshold=20): x for x > 20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def softmax(x, axis=-1):
    """Softmax that tolerates -inf entries (weight 0) as long as one entry is finite."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


# ----------------------------------------------------------------------------
# RoPE: interleaved pairs on the *trailing* rope_dim channels of each head.
# Two tables: "main" (sliding layers) and "compress" (CSA/HCA layers, their
# compressors and the indexer), the latter usually YaRN-scaled.
# ----------------------------------------------------------------------------

def rope_inv_freq(params, rope_dim):
    """inv_freq [rope_dim/2] for `default` or `yarn` rope (transformers' formulas)."""
    base = float(params["rope_theta"])
    exps = np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)
    pos_freqs = np.power(np.float32(base), exps, dtype=np.float32)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    if params.get("rope_type", "default") == "default":
        return inv_extra, 1.0
    assert params["rope_type"] == "yarn", params
    factor = float(params["factor"])
    ompe = float(params["original_max_position_embeddings"])
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    attention_factor = params.get("attention_factor")
    if attention_factor is None:  # transformers' mscale; V4 configs force 1.0
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def corr_dim(n_rot):
        return rope_dim * math.log(ompe / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    # transformers reads `truncate` from the top level of rope_parameters, which for
    # V4 is the {main, compress} dict: it is therefore always True (floor/ceil).
    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = 1 - ramp  # 1 = keep original frequency (high-freq dims), 0 = interpolate by `factor`
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    return inv.astype(np.float32), float(attention_factor)


@dataclass
class Rope:
    inv_freq: np.ndarray
    scale: float

    def cos_sin(self, positions, dtype):
        f = np.asarray(positions, dtype=np.float32)[:, None] * self.inv_freq[None, :]  # [S, rd/2]
        return (np.cos(f) * self.scale).astype(dtype), (np.sin(f) * self.scale).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) of the trailing 2*len(cos) channels.
    x: [S, ..., d]; cos/sin: [S, rd/2] (broadcast over middle axes).
    Inverse rotation (used on the attention output) = apply_rope(x, cos, -sin)."""
    rd = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    out = x.copy()
    a, b = x[..., -rd::2], x[..., -rd + 1::2]  # even / odd channel of each pair
    out[..., -rd::2] = a * c - b * s
    out[..., -rd + 1::2] = b * c + a * s
    return out


# ----------------------------------------------------------------------------
# Compressor: pools `ratio` consecutive tokens into one KV row.
#   HCA: non-overlapping windows, projections are `dim` wide.
#   CSA: projections are 2*dim wide = [Ca | Cb]; entry w softmax-pools the
#        2*ratio slots {Ca of window w-1, Cb of window w} per channel (window -1
#        does not exist: entry 0 pools only Cb of window 0).
# Per channel c:  entry[c] = sum_j softmax_j(gate[j,c] + ape[j,c]) * kv[j,c],
# then weighted RMSNorm, then compress-RoPE at position w*ratio (window start).
# ----------------------------------------------------------------------------

@dataclass
class CompressorState:
    ratio: int
    dim: int
    overlap: bool  # CSA-style two series
    buf_kv: np.ndarray = None  # [n < ratio, width] projections of the open window
    buf_gate: np.ndarray = None  # [n < ratio, width] raw gate projections (no ape)
    prev_kv: np.ndarray = None  # CSA: Ca half of the last closed window [ratio, dim]
    prev_gate: np.ndarray = None  # CSA: its gate + ape[:, :dim] [ratio, dim]
    entries: np.ndarray = None  # [n_entries, dim] pooled, normed, rotated rows

    def init(self, dtype):
        width = 2 * self.dim if self.overlap else self.dim
        self.buf_kv = np.zeros((0, width), dtype)
        self.buf_gate = np.zeros((0, width), dtype)
        self.entries = np.zeros((0, self.dim), dtype)
        return self


def compressor_update(st: CompressorState, x, w, rope: Rope):
    """Feed S new token rows x [S, D]; append every window that closes. `w` holds
    wkv.weight, wgate.weight, ape, norm.weight of this compressor."""
    kv = np.concatenate([st.buf_kv, linear(x, w["wkv.weight"])], 0)
    gate = np.concatenate([st.buf_gate, linear(x, w["wgate.weight"])], 0)
    r, d = st.ratio, st.dim
    n_new = kv.shape[0] // r
    new_rows = []
    for i in range(n_new):
        wkv = kv[i * r:(i + 1) * r]  # [r, width]
        wg = gate[i * r:(i + 1) * r] + w["ape"]  # [r, width]
        if st.overlap:
            slots_kv, slots_g = wkv[:, d:], wg[:, d:]  # Cb of this window
            if st.prev_kv is not None:  # prepend Ca of the previous window
                slots_kv = np.concatenate([st.prev_kv, slots_kv], 0)
                slots_g = np.concatenate([st.prev_gate, slots_g], 0)
            st.prev_kv, st.prev_gate = wkv[:, :d], wg[:, :d]
        else:
            slots_kv, slots_g = wkv, wg
        pooled = np.sum(slots_kv * softmax(slots_g, axis=0), axis=0)  # softmax over slots, per channel
        new_rows.append(rms_norm(pooled, w["norm.weight"], w["eps"]))
    st.buf_kv, st.buf_gate = kv[n_new * r:], gate[n_new * r:]
    if new_rows:
        n0 = st.entries.shape[0]
        rows = np.stack(new_rows)
        cos, sin = rope.cos_sin([(n0 + i) * r for i in range(n_new)], rows.dtype)
        st.entries = np.concatenate([st.entries, apply_rope(rows, cos, sin)], 0)
    return st.entries


def visible_entries(positions, n_entries, ratio):
    """Causality of compressed rows: entry w (covering tokens [w*r, (w+1)*r)) is
    visible to the token at position p iff w < (p+1)//r. [S, T] bool."""
    thr = (np.asarray(positions) + 1) // ratio
    return np.arange(n_entries)[None, :] < thr[:, None]


# ----------------------------------------------------------------------------
# Lightning Indexer (CSA only): score every visible compressed indexer key,
# keep the top `index_topk`.
#   q_I  = rope_c(wq_b_I @ q_res)                 [S, nI, dI]   (no norm)
#   w_I  = (weights_proj @ x) * nI^-0.5           [S, nI]
#   s[t] = sum_h w_I[h] * relu(q_I[h] . K_I[t]) * dI^-0.5
# Selection among visible entries only: min(topk, #visible) largest scores.
# ----------------------------------------------------------------------------

def indexer_select(cfg: Config, w, x, q_res, positions, idx_keys, rope: Rope):
    S, T = x.shape[0], idx_keys.shape[0]
    if T == 0:
        return np.zeros((S, 0), bool), None
    q = linear(q_res, w["indexer.wq_b.weight"]).reshape(S, cfg.index_heads, cfg.index_head_dim)
    cos, sin = rope.cos_sin(positions, x.dtype)
    q = apply_rope(q, cos, sin)
    dots = np.einsum("shd,td->sht", q, idx_keys)
    hw = linear(x, w["indexer.weights_proj.weight"]) * cfg.index_heads ** -0.5  # [S, nI]
    scores = np.sum(np.maximum(dots, 0) * cfg.index_head_dim ** -0.5 * hw[:, :, None], axis=1)  # [S, T]
    visible = visible_entries(positions, T, cfg.ratio["compressed_sparse_attention"])
    scores = np.where(visible, scores, -np.inf)
    k = min(cfg.index_topk, T)
    sel = np.zeros((S, T), bool)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(sel, order, True, axis=1)
    return sel & visible, scores


# ----------------------------------------------------------------------------
# Attention block (one shared K=V head, MQA over n_heads query heads)
# ----------------------------------------------------------------------------

@dataclass
class LayerCache:
    window_kv: np.ndarray  # [<= window-1, head_dim] rotated K=V rows of the latest tokens
    comp: CompressorState = None  # CSA/HCA: the attention's compressed KV stream
    idx: CompressorState = None  # CSA: the indexer's compressed key stream


def new_cache(cfg: Config, dtype):
    caches = []
    for lt in cfg.layer_types:
        c = LayerCache(window_kv=np.zeros((0, cfg.head_dim), dtype))
        if lt != "sliding_attention":
            csa = lt == "compressed_sparse_attention"
            c.comp = CompressorState(cfg.ratio[lt], cfg.head_dim, overlap=csa).init(dtype)
            if csa:
                c.idx = CompressorState(cfg.ratio[lt], cfg.index_head_dim, overlap=True).init(dtype)
        caches.append(c)
    return caches


def attention(cfg: Config, w, x, positions, cache: LayerCache, layer_type, ropes, stats=None):
    """x: [S, D] (already input_layernorm'ed), positions: [S] absolute. Returns [S, D]."""
    S, H, hd = x.shape[0], cfg.n_heads, cfg.head_dim
    rope = ropes["main"] if layer_type == "sliding_attention" else ropes["compress"]
    cos, sin = rope.cos_sin(positions, x.dtype)

    # q: LoRA (wq_a -> weighted norm -> wq_b), then per-head unweighted RMSNorm, RoPE
    q_res = rms_norm(linear(x, w["attn.wq_a.weight"]), w["attn.q_norm.weight"], cfg.eps)  # [S, q_lora]
    q = linear(q_res, w["attn.wq_b.weight"]).reshape(S, H, hd)
    q = apply_rope(unweighted_rms_norm(q, cfg.eps), cos, sin)

    # the single K=V head: wkv -> weighted norm -> RoPE
    kv = apply_rope(rms_norm(linear(x, w["attn.wkv.weight"]), w["attn.norm.weight"], cfg.eps), cos, sin)

    # raw sliding window: cached rows are the positions just before positions[0]
    n_old = cache.window_kv.shape[0]
    keys = np.concatenate([cache.window_kv, kv], 0)
    key_pos = np.concatenate([np.arange(positions[0] - n_old, positions[0]), positions])
    p = np.asarray(positions)[:, None]
    raw_mask = (key_pos[None, :] <= p) & (key_pos[None, :] > p - cfg.window)  # [S, n_old+S]
    cache.window_kv = keys[max(keys.shape[0] - (cfg.window - 1), 0):]

    if layer_type != "sliding_attention":
        cw = {k[len("attn.compressor."):]: v for k, v in w.items() if k.startswith("attn.compressor.")}
        cw["eps"] = cfg.eps
        entries = compressor_update(cache.comp, x, cw, ropes["compress"])  # [T, hd]
        if layer_type == "compressed_sparse_attention":
            iw = {k[len("attn.indexer.compressor."):]: v for k, v in w.items()
                  if k.startswith("attn.indexer.compressor.")}
            iw["eps"] = cfg.eps
            idx_keys = compressor_update(cache.idx, x, iw, ropes["compress"])
            assert idx_keys.shape[0] == entries.shape[0]
            iww = {k[len("attn."):]: v for k, v in w.items() if k.startswith("attn.indexer.")}
            comp_mask, scores = indexer_select(cfg, iww, x, q_res, positions, idx_keys, ropes["compress"])
            if stats is not None and scores is not None:
                stats.append(scores)
        else:
            comp_mask = visible_entries(positions, entries.shape[0], cfg.ratio[layer_type])
        keys = np.concatenate([keys, entries], 0)
        mask = np.concatenate([raw_mask, comp_mask], 1)
    else:
        mask = raw_mask

    # softmax over [visible keys..., sink]; the sink's probability is discarded
    logits = np.einsum("shd,td->sht", q, keys) * hd ** -0.5  # [S, H, K]
    logits = np.where(mask[:, None, :], logits, -np.inf)
    sink = np.broadcast_to(w["attn.attn_sink"][None, :, None], (S, H, 1))
    probs = softmax(np.concatenate([logits, sink], -1), -1)[..., :-1]
    o = np.einsum("sht,td->shd", probs, keys)  # V = K

    # V carried RoPE at each key position: de-rotate at the query position
    o = apply_rope(o, cos, -sin)

    # grouped low-rank output: group g = heads [g*H/G, (g+1)*H/G) -> o_lora_rank, then wo_b
    G, R = cfg.o_groups, cfg.o_lora_rank
    og = o.reshape(S, G, H * hd // G)
    wo_a = w["attn.wo_a.weight"].reshape(G, R, H * hd // G)
    mid = np.einsum("sgi,gri->sgr", og, wo_a).reshape(S, G * R)
    return linear(mid, w["attn.wo_b.weight"])


# ----------------------------------------------------------------------------
# MoE: routed experts (learned top-k router or token-id hash) + shared expert
# ----------------------------------------------------------------------------

def swiglu_expert(x, w1, w3, w2, limit):
    """down( silu(min(gate, limit)) * clip(up, -limit, limit) ); w1=gate, w3=up, w2=down."""
    g = np.minimum(linear(x, w1), limit)
    u = np.clip(linear(x, w3), -limit, limit)
    return linear(silu(g) * u, w2)


def router_scores(cfg: Config, logits):
    if cfg.scoring_func == "sqrtsoftplus":
        return np.sqrt(softplus(logits))
    if cfg.scoring_func == "sigmoid":
        return sigmoid(logits)
    if cfg.scoring_func == "softmax":
        # NOTE: transformers 5.23 cannot build this (ACT2FN has no "softmax"); upstream meaning.
        return softmax(logits, -1)
    raise ValueError(cfg.scoring_func)


def moe(cfg: Config, w, x, token_ids, is_hash):
    """x: [S, D] (already post_attention_layernorm'ed)."""
    logits = linear(x, w["ffn.gate.weight"])  # [S, E]
    scores = router_scores(cfg, logits)
    if is_hash:
        idx = w["ffn.gate.tid2eid"][np.asarray(token_ids)].astype(np.int64)  # [S, k] fixed by token id
    else:
        # selection uses score + bias; ordering within the k does not matter
        sel = scores + w["ffn.gate.bias"]
        idx = np.argsort(-sel, axis=1, kind="stable")[:, :cfg.top_k]
    wts = np.take_along_axis(scores, idx, 1)  # weights from the unbiased scores
    wts = wts / (wts.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    out = np.zeros_like(x)
    for s in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[s, j])
            p = f"ffn.experts.{e}."
            out[s] += wts[s, j] * swiglu_expert(x[s], w[p + "w1.weight"], w[p + "w3.weight"],
                                                w[p + "w2.weight"], cfg.swiglu_limit)
    sh = swiglu_expert(x, w["ffn.shared_experts.w1.weight"], w["ffn.shared_experts.w3.weight"],
                       w["ffn.shared_experts.w2.weight"], cfg.swiglu_limit)
    return out + sh


# ----------------------------------------------------------------------------
# Manifold-constrained hyper-connections (mHC)
# ----------------------------------------------------------------------------

def hc_weights(cfg: Config, X, fn, base, scale):
    """X: [S, hc, D] -> pre [S, hc], post [S, hc], comb [S, hc, hc] (doubly stochastic)."""
    S, n = X.shape[0], cfg.hc
    mixes = linear(unweighted_rms_norm(X.reshape(S, -1), cfg.eps), fn)  # [S, (2+n)*n]
    pre = sigmoid(mixes[:, :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2 * sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = mixes[:, 2 * n:].reshape(S, n, n) * scale[2] + base[2 * n:].reshape(n, n)
    comb = softmax(comb, -1) + cfg.hc_eps  # row softmax
    # Sinkhorn: column-normalise once, then (iters-1) x (rows, columns)
    comb = comb / (comb.sum(-2, keepdims=True) + cfg.hc_eps)
    for _ in range(cfg.sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + cfg.hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + cfg.hc_eps)
    return pre, post, comb


def hyper_block(cfg: Config, X, fn, base, scale, block):
    """X' [k] = post[k] * block(sum_i pre[i] X[i]) + sum_j comb[j, k] X[j]."""
    pre, post, comb = hc_weights(cfg, X, fn, base, scale)
    y = block(np.einsum("sn,snd->sd", pre, X))
    return post[:, :, None] * y[:, None, :] + np.einsum("sjk,sjd->skd", comb, X)


def hc_head(cfg: Config, X, w):
    S = X.shape[0]
    mixes = linear(unweighted_rms_norm(X.reshape(S, -1), cfg.eps), w["hc_head_fn"])  # [S, hc]
    pre = sigmoid(mixes * w["hc_head_scale"][0] + w["hc_head_base"]) + cfg.hc_eps
    return np.einsum("sn,snd->sd", pre, X)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class Model:
    def __init__(self, ckpt_dir, dtype=np.float32):
        ckpt_dir = Path(ckpt_dir)
        self.cfg = Config.from_json(json.loads((ckpt_dir / "config.json").read_text()))
        self.dtype = dtype
        self.w = {}
        for f in sorted(ckpt_dir.glob("*.safetensors")):
            tensors, _ = load_safetensors(f)
            for k, v in tensors.items():
                self.w[canonical_name(k)] = v if v.dtype.kind in "iub" else v.astype(dtype)
        self.ropes = {}
        for kind in ("main", "compress"):
            inv, scale = rope_inv_freq(self.cfg.rope[kind], self.cfg.rope_dim)
            self.ropes[kind] = Rope(inv, scale)
        self.layers = []
        for i in range(self.cfg.n_layers):
            pre = f"layers.{i}."
            self.layers.append({k[len(pre):]: v for k, v in self.w.items() if k.startswith(pre)})

    def new_state(self):
        return {"pos": 0, "layers": new_cache(self.cfg, self.dtype)}

    def forward_chunk(self, state, token_ids, record=None):
        """Run S new tokens through the model with the cache `state`; returns logits [S, V].
        `record` (dict) optionally receives each layer's output streams and indexer scores."""
        cfg, token_ids = self.cfg, np.asarray(token_ids, dtype=np.int64)
        S = token_ids.shape[0]
        positions = np.arange(state["pos"], state["pos"] + S)
        X = np.repeat(self.w["embed.weight"][token_ids][:, None, :], cfg.hc, axis=1)  # [S, hc, D]
        for i, (w, lc) in enumerate(zip(self.layers, state["layers"])):
            lt = cfg.layer_types[i]
            stats = record.setdefault(f"indexer_scores{i}", []) if record is not None else None
            X = hyper_block(cfg, X, w["hc_attn_fn"], w["hc_attn_base"], w["hc_attn_scale"],
                            lambda h: attention(cfg, w, rms_norm(h, w["attn_norm.weight"], cfg.eps),
                                                positions, lc, lt, self.ropes, stats))
            X = hyper_block(cfg, X, w["hc_ffn_fn"], w["hc_ffn_base"], w["hc_ffn_scale"],
                            lambda h: moe(cfg, w, rms_norm(h, w["ffn_norm.weight"], cfg.eps), token_ids,
                                          cfg.mlp_layer_types[i] == "hash_moe"))
            if record is not None:
                record[f"layer{i}"] = X
        state["pos"] += S
        y = rms_norm(hc_head(cfg, X, self.w), self.w["norm.weight"], cfg.eps)
        return linear(y, self.w["head.weight"])


def kv_bytes_per_token(cfg: Config, bytes_per_elem=4):
    """Analytic cache size. The raw window is a fixed W-1 rows per layer (independent
    of context); compressed rows grow by 1 per `ratio` tokens. Returns a dict."""
    hd, di = cfg.head_dim, cfg.index_head_dim
    raw_fixed = sum((cfg.window - 1) * hd for _ in cfg.layer_types) * bytes_per_elem
    per_tok = 0.0
    for lt in cfg.layer_types:
        if lt == "compressed_sparse_attention":
            per_tok += (hd + di) / cfg.ratio[lt]
        elif lt == "heavily_compressed_attention":
            per_tok += hd / cfg.ratio[lt]
    return {"raw_window_bytes_total": raw_fixed, "compressed_bytes_per_token": per_tok * bytes_per_elem}


# ----------------------------------------------------------------------------
# Self-check against the transformers references
# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE,
                    help="folder holding tiny/ (checkpoint) and refs.safetensors")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args()

    model = Model(args.fixture / "tiny", np.dtype(args.dtype).type)
    refs, meta = load_safetensors(args.fixture / "refs.safetensors")
    print(f"numpy oracle ({args.dtype}) vs transformers {meta.get('transformers', '?')} references")
    worst, fails = 0.0, []

    def check(name, a, b, vs_ref=True):
        nonlocal worst
        d = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        if vs_ref:
            worst = max(worst, d)
        print(f"  {name:40s} max|diff| = {d:.3e}{'' if d <= TOL else '   <-- FAIL'}")
        if d > TOL:
            fails.append(name)

    def topk_gaps(score_list, k):
        """Gap between the k-th and (k+1)-th visible indexer score, where top-k drops rows."""
        gaps = []
        for sc in score_list:
            for row in sc:
                v = np.sort(row[np.isfinite(row)])[::-1]
                if v.size > k:
                    gaps.append(v[k - 1] - v[k])
        return gaps

    seqs = sorted({k.split(".")[0] for k in refs})
    for sq in seqs:
        toks = refs[f"{sq}.tokens"]
        P = int(refs[f"{sq}.prefill_len"][0])
        # full prefill on an empty cache
        st = model.new_state()
        rec = {}
        full = model.forward_chunk(st, toks, record=rec)
        check(f"{sq} full prefill logits", full, refs[f"{sq}.full_logits"])
        for i in range(model.cfg.n_layers):
            k = f"{sq}.layer{i}.out_streams"
            if k in refs:
                ref = refs[k]
                rel = np.max(np.abs(rec[f"layer{i}"] - ref)) / max(np.max(np.abs(ref)), 1e-30)
                print(f"    layer {i} ({model.cfg.layer_types[i][:7]}) output streams rel max|diff| {rel:.2e}")
            for name, cs in (("compressed_kv", "comp"), ("indexer_kv", "idx")):
                k = f"{sq}.layer{i}.{name}"
                if k in refs:
                    check(f"{sq} layer{i} final {name}", getattr(st["layers"][i], cs).entries, refs[k])
        # prefill P then decode one token at a time
        st = model.new_state()
        pre = model.forward_chunk(st, toks[:P])
        check(f"{sq} cached prefill[:{P}] logits", pre, refs[f"{sq}.prefill_logits"])
        dec = np.concatenate([model.forward_chunk(st, toks[t:t + 1]) for t in range(P, len(toks))], 0)
        check(f"{sq} decode logits ({len(toks) - P} steps)", dec, refs[f"{sq}.decode_logits"])
        if f"{sq}.chunks" in refs:
            st, outs, pos = model.new_state(), [], 0
            for n in refs[f"{sq}.chunks"].tolist():
                outs.append(model.forward_chunk(st, toks[pos:pos + n]))
                pos += n
            check(f"{sq} chunked {refs[f'{sq}.chunks'].tolist()}", np.concatenate(outs, 0),
                  refs[f"{sq}.chunked_logits"])
        # internal consistency of the numpy cache paths
        check(f"{sq} numpy full vs numpy decode", full[P:], dec, vs_ref=False)
        gaps = [g for i in range(model.cfg.n_layers) for g in topk_gaps(rec.get(f"indexer_scores{i}", []),
                                                                         model.cfg.index_topk)]
        if gaps:
            print(f"    indexer top-k boundary gap over {len(gaps)} queries of the full prefill: "
                  f"min {min(gaps):.3e}")

    kv = kv_bytes_per_token(model.cfg)
    print(f"cache (float32): raw windows {kv['raw_window_bytes_total']} bytes total (fixed), "
          f"compressed streams {kv['compressed_bytes_per_token']:.1f} bytes per token")
    if fails:
        print(f"FAIL ({len(fails)}): " + ", ".join(fails))
        sys.exit(1)
    print(f"OK: worst max|diff| vs transformers {worst:.3e} (tolerance {TOL})")


if __name__ == "__main__":
    main()
