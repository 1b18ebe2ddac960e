"""Llama (SmolLM2, TinyLlama, Llama 3): pre-norm decoder, RoPE, GQA attention, SwiGLU FFN.

Qwen2 is the same network with q/k/v biases and NeoX-order RoPE: models/qwen2.py reuses this forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeq.cpu_kernels.ops import rmsnorm, rope, rope_inv_freq, silu_mul
from edgeq.models.base import (MAX_CTX, MAX_EMBD, MAX_FF, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, KVLayout,
                               Linear, Observer, TensorBinder, check_attention, check_vocab_and_layers, hparam,
                               linears, batch_linears)


@dataclass
class Config:
    arch: str
    n_vocab: int              # rows of token_embd
    n_embd: int               # hidden size
    n_layer: int
    n_ff: int                 # FFN inner size
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int          # trained context length
    rms_eps: float
    rope_base: float
    n_rot: int                # rotated dims per head
    rope_neox: bool = False   # False: pairs (2i, 2i+1), llama.cpp's normal mode for permuted Q/K
    qkv_bias: bool = False    # Qwen2
    tied_output: bool = False  # no output.weight: the classifier is token_embd
    rope_freq_factors: np.ndarray | None = field(default=None, repr=False)  # Llama 3 rope scaling

    @classmethod
    def from_gguf(cls, gf, arch: str = "llama", **overrides) -> "Config":
        n_embd = hparam(gf, arch, "embedding_length", cast=int, lo=1, hi=MAX_EMBD)
        n_head = hparam(gf, arch, "attention.head_count", cast=int, lo=1, hi=MAX_HEADS)
        head_dim = hparam(gf, arch, "attention.key_length", n_embd // n_head, cast=int, lo=1, hi=MAX_HEAD_DIM)
        emb = gf.tensors.get("token_embd.weight")
        cfg = dict(
            arch=arch,
            n_vocab=int(emb.shape[0]) if emb is not None else hparam(gf, arch, "vocab_size", cast=int, lo=1,
                                                                      hi=MAX_VOCAB),
            n_embd=n_embd,
            n_layer=hparam(gf, arch, "block_count", cast=int, lo=1, hi=MAX_LAYERS),
            n_ff=hparam(gf, arch, "feed_forward_length", cast=int, lo=1, hi=MAX_FF),
            n_head=n_head,
            n_head_kv=hparam(gf, arch, "attention.head_count_kv", n_head, cast=int, lo=1, hi=n_head),
            head_dim=head_dim,
            n_ctx_train=hparam(gf, arch, "context_length", 2048, cast=int, lo=1, hi=MAX_CTX),
            rms_eps=hparam(gf, arch, "attention.layer_norm_rms_epsilon", 1e-5, cast=float, above=0.0, hi=1.0),
            rope_base=hparam(gf, arch, "rope.freq_base", 10000.0, cast=float, above=0.0),
            n_rot=hparam(gf, arch, "rope.dimension_count", head_dim, cast=int, lo=2, hi=MAX_HEAD_DIM),
            tied_output="output.weight" not in gf.tensors,
        )
        cfg.update(overrides)
        check_attention(gf, arch, cfg["n_embd"], cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"], cfg["n_rot"])
        check_vocab_and_layers(gf, cfg["n_vocab"], cfg["n_layer"])
        return cls(**cfg)

    def kv_layouts(self) -> list[KVLayout]:
        return [KVLayout(self.n_head_kv, self.head_dim) for _ in range(self.n_layer)]


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear


@dataclass
class Weights:
    tok_embd: object
    layers: list[Layer]
    output_norm: np.ndarray
    output: Linear
    inv_freq: np.ndarray


def load_weights(gf, cfg: Config) -> Weights:
    t = TensorBinder(gf)
    d, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(Layer(
            attn_norm=t.vector(p + "attn_norm.weight", d),
            wq=t.linear(p + "attn_q", cfg.n_head * hd, d, bias=cfg.qkv_bias),
            wk=t.linear(p + "attn_k", cfg.n_head_kv * hd, d, bias=cfg.qkv_bias),
            wv=t.linear(p + "attn_v", cfg.n_head_kv * hd, d, bias=cfg.qkv_bias),
            wo=t.linear(p + "attn_output", d, cfg.n_head * hd),
            ffn_norm=t.vector(p + "ffn_norm.weight", d),
            w_gate=t.linear(p + "ffn_gate", ff, d),
            w_up=t.linear(p + "ffn_up", ff, d),
            w_down=t.linear(p + "ffn_down", d, ff),
        ))
    if t.has("rope_freqs.weight"):
        cfg.rope_freq_factors = t.vector("rope_freqs.weight", cfg.n_rot // 2)
    return Weights(
        tok_embd=t.embedding("token_embd.weight", cfg.n_vocab, d),
        layers=layers,
        output_norm=t.vector("output_norm.weight", d),
        output=t.linear("token_embd" if cfg.tied_output else "output", cfg.n_vocab, d),
        inv_freq=rope_inv_freq(cfg.n_rot, cfg.rope_base, cfg.rope_freq_factors),
    )


def forward(w: Weights, cfg: Config, tokens: np.ndarray, pos0: int, cache,
            observer: Observer | None = None, all_logits: bool = False) -> np.ndarray:
    """Run `tokens` (at positions pos0..) through the network, writing their keys/values into `cache`.

    Returns logits (T, n_vocab) if all_logits, else (1, n_vocab) for the last token."""
    T = len(tokens)
    positions = np.arange(pos0, pos0 + T)
    hd, scale = cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim)
    x = w.tok_embd(tokens)                                           # (T, d)
    for il, L in enumerate(w.layers):
        # attention
        h = rmsnorm(x, L.attn_norm, cfg.rms_eps)
        q, k, v = linears([L.wq, L.wk, L.wv], h, observer)
        q = q.reshape(T, cfg.n_head, hd)
        k = k.reshape(T, cfg.n_head_kv, hd)
        v = v.reshape(T, cfg.n_head_kv, hd)
        rope(q, positions, w.inv_freq, cfg.rope_neox)
        rope(k, positions, w.inv_freq, cfg.rope_neox)
        cache.store(il, pos0, k, v)
        a = cache.attend(il, q, pos0, scale)                          # (T, n_head, hd)
        x += L.wo(a.reshape(T, cfg.n_head * hd), observer)
        # feed-forward (SwiGLU)
        h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)
        g = silu_mul(*linears([L.w_gate, L.w_up], h, observer))
        x += L.w_down(g, observer)
    x = x if all_logits else x[-1:]
    x = rmsnorm(x, w.output_norm, cfg.rms_eps)
    return w.output(x, observer)


def forward_batch(w: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray, caches: list) -> np.ndarray:
    """One decode step for N sequences at once: token i sits at positions[i] of caches[i].

    The matrix products run over all N rows together (each weight read once per step); attention runs per
    sequence on its own cache. Returns logits (N, n_vocab)."""
    N = len(tokens)
    positions = np.asarray(positions, dtype=np.int64)
    hd, scale = cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim)
    x = w.tok_embd(np.asarray(tokens, dtype=np.int64))              # (N, d)
    a = np.empty((N, cfg.n_head, hd), np.float32)
    for il, L in enumerate(w.layers):
        h = rmsnorm(x, L.attn_norm, cfg.rms_eps)
        q, k, v = batch_linears([L.wq, L.wk, L.wv], h)
        q = np.ascontiguousarray(q.reshape(N, cfg.n_head, hd))
        k = np.ascontiguousarray(k.reshape(N, cfg.n_head_kv, hd))
        v = v.reshape(N, cfg.n_head_kv, hd)
        rope(q, positions, w.inv_freq, cfg.rope_neox)
        rope(k, positions, w.inv_freq, cfg.rope_neox)
        for i, cache in enumerate(caches):
            p = int(positions[i])
            cache.store(il, p, k[i:i + 1], v[i:i + 1])
            a[i] = cache.attend(il, q[i:i + 1], p, scale)[0]
        x += batch_linears([L.wo], a.reshape(N, cfg.n_head * hd))[0]
        h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)
        g = silu_mul(*batch_linears([L.w_gate, L.w_up], h))
        x += batch_linears([L.w_down], g)[0]
    x = rmsnorm(x, w.output_norm, cfg.rms_eps)
    return batch_linears([w.output], x)[0]
