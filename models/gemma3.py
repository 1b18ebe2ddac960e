"""Gemma 3 (text): scaled embeddings, q/k RMSNorm, pre+post norms around attention and FFN, GeGLU,
tied classifier, sliding-window attention on local layers (own RoPE base) and a global layer every 6th.

Norm weights in GGUF already include Gemma's +1 (llama.cpp's converter adds it), so plain RMSNorm applies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeq.cpu_kernels import decode_pass
from edgeq.cpu_kernels.ops import gelu_mul, qk_norm_rope, rmsnorm, rope_inv_freq
from edgeq.errors import ModelError
from edgeq.models import base
from edgeq.models.base import (MAX_CTX, MAX_EMBD, MAX_FF, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, ForwardPlan,
                               KVLayout, Linear, Observer, TensorBinder, check_attention, check_vocab_and_layers,
                               hparam, linears, batch_linears)


@dataclass
class Config:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float          # global layers
    rope_base_local: float    # sliding-window layers
    rope_scale_global: float  # linear RoPE scaling factor of the global layers (1 = none)
    sliding_window: int
    swa_pattern: int          # every swa_pattern-th layer is global

    @classmethod
    def from_gguf(cls, gf, arch: str = "gemma3", **overrides) -> "Config":
        n_embd = hparam(gf, arch, "embedding_length", cast=int, lo=1, hi=MAX_EMBD)
        n_head = hparam(gf, arch, "attention.head_count", cast=int, lo=1, hi=MAX_HEADS)
        scaling = gf.get(f"{arch}.rope.scaling.type", None)
        positive = dict(cast=float, above=0.0)
        cfg = dict(
            arch=arch,
            n_vocab=int(gf.tensors["token_embd.weight"].shape[0]) if "token_embd.weight" in gf.tensors
            else hparam(gf, arch, "vocab_size", cast=int, lo=1, hi=MAX_VOCAB),
            n_embd=n_embd,
            n_layer=hparam(gf, arch, "block_count", cast=int, lo=1, hi=MAX_LAYERS),
            n_ff=hparam(gf, arch, "feed_forward_length", cast=int, lo=1, hi=MAX_FF),
            n_head=n_head,
            n_head_kv=hparam(gf, arch, "attention.head_count_kv", n_head, cast=int, lo=1, hi=n_head),
            head_dim=hparam(gf, arch, "attention.key_length", n_embd // n_head, cast=int, lo=1, hi=MAX_HEAD_DIM),
            n_ctx_train=hparam(gf, arch, "context_length", 32768, cast=int, lo=1, hi=MAX_CTX),
            rms_eps=hparam(gf, arch, "attention.layer_norm_rms_epsilon", 1e-6, cast=float, above=0.0, hi=1.0),
            rope_base=hparam(gf, arch, "rope.freq_base", 1e6, **positive),
            rope_base_local=hparam(gf, arch, "rope.freq_base_swa", 10000.0, **positive),
            rope_scale_global=hparam(gf, arch, "rope.scaling.factor", 1.0, **positive) if scaling == "linear" else 1.0,
            sliding_window=hparam(gf, arch, "attention.sliding_window", 512, cast=int, lo=1, hi=MAX_CTX),
            swa_pattern=hparam(gf, arch, "attention.sliding_window_pattern", 6, cast=int, lo=0, hi=MAX_LAYERS),
        )
        cfg.update(overrides)
        # gemma3 rotates the whole head (no rope.dimension_count)
        check_attention(gf, arch, cfg["n_embd"], cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"], cfg["head_dim"])
        check_vocab_and_layers(gf, cfg["n_vocab"], cfg["n_layer"])
        return cls(**cfg)

    def is_local(self, il: int) -> bool:
        return self.swa_pattern > 0 and il % self.swa_pattern < self.swa_pattern - 1

    def kv_layouts(self) -> list[KVLayout]:
        return [KVLayout(self.n_head_kv, self.head_dim, self.sliding_window if self.is_local(i) else 0)
                for i in range(self.n_layer)]

    def plan(self) -> ForwardPlan:
        return ForwardPlan(
            rope_tables=tuple("inv_freq_local" if self.is_local(il) else "inv_freq_global" for il in range(self.n_layer)),
            attn_scale=1.0 / math.sqrt(self.head_dim), rope_neox=True, qk_norm=True, post_norms=True, gelu=True,
            embed_scale=math.sqrt(self.n_embd))


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    q_norm: np.ndarray
    k_norm: np.ndarray
    wo: Linear
    post_attn_norm: np.ndarray
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear
    post_ffn_norm: np.ndarray


@dataclass
class Weights:
    tok_embd: object
    layers: list[Layer]
    output_norm: np.ndarray
    output: Linear
    inv_freq_global: np.ndarray
    inv_freq_local: np.ndarray


def load_weights(gf, cfg: Config) -> Weights:
    t = TensorBinder(gf)
    d, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(Layer(
            attn_norm=t.vector(p + "attn_norm.weight", d),
            wq=t.linear(p + "attn_q", cfg.n_head * hd, d),
            wk=t.linear(p + "attn_k", cfg.n_head_kv * hd, d),
            wv=t.linear(p + "attn_v", cfg.n_head_kv * hd, d),
            q_norm=t.vector(p + "attn_q_norm.weight", hd),
            k_norm=t.vector(p + "attn_k_norm.weight", hd),
            wo=t.linear(p + "attn_output", d, cfg.n_head * hd),
            post_attn_norm=t.vector(p + "post_attention_norm.weight", d),
            ffn_norm=t.vector(p + "ffn_norm.weight", d),
            w_gate=t.linear(p + "ffn_gate", ff, d),
            w_up=t.linear(p + "ffn_up", ff, d),
            w_down=t.linear(p + "ffn_down", d, ff),
            post_ffn_norm=t.vector(p + "post_ffw_norm.weight", d),
        ))
    tied = not t.has("output.weight")
    return Weights(
        tok_embd=t.embedding("token_embd.weight", cfg.n_vocab, d),
        layers=layers,
        output_norm=t.vector("output_norm.weight", d),
        output=t.linear("token_embd" if tied else "output", cfg.n_vocab, d),
        inv_freq_global=rope_inv_freq(hd, cfg.rope_base) / np.float32(cfg.rope_scale_global),
        inv_freq_local=rope_inv_freq(hd, cfg.rope_base_local),
    )


def forward(w: Weights, cfg: Config, tokens: np.ndarray, pos0: int, cache,
            observer: Observer | None = None, all_logits: bool = False) -> np.ndarray:
    if len(tokens) == 1 and observer is None:  # a decode token: every layer in one compiled call where it can
        logits = compiled_step(w, cfg, tokens, np.array([pos0], np.int64), [cache])
        if logits is not None:
            return logits
    x = embed(w, cfg, tokens)                                       # (T, d)
    forward_layers(w, cfg, x, pos0, cache, range(cfg.n_layer), observer)
    x = x if all_logits else x[-1:]
    return linears([w.output], classifier_input(w, cfg, x), observer)[0]


def embed(w: Weights, cfg: Config, tokens: np.ndarray) -> np.ndarray:
    """The hidden states (T, d) entering the first layer: scaled embeddings."""
    return w.tok_embd(tokens) * np.float32(math.sqrt(cfg.n_embd))


def forward_layers(w: Weights, cfg: Config, x: np.ndarray, pos0: int, cache, layers: range,
                   observer: Observer | None = None) -> None:
    """Layers `layers` on the hidden states x (T, d) at positions pos0.. in place (see llama.forward_layers)."""
    attention = base.prompt_attention(cache, pos0, 1.0 / math.sqrt(cfg.head_dim))
    products = lambda lins, h: linears(lins, h, observer)  # noqa: E731
    positions = np.arange(pos0, pos0 + x.shape[0])
    for il in layers:
        layer(w, w.layers[il], cfg, il, x, positions, attention, products)


def classifier_input(w: Weights, cfg: Config, x: np.ndarray) -> np.ndarray:
    """What the classifier w.output reads: the final norm of the hidden states."""
    return rmsnorm(x, w.output_norm, cfg.rms_eps)


def forward_batch(w: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray, caches: list,
                  prompt_rows: int = 0) -> np.ndarray:
    """One decode step for N sequences at once (see llama.forward_batch, prompt_rows too): matrix products over
    the batch, attention per sequence on its own cache. Returns logits (N, n_vocab), or (1 + N, n_vocab)."""
    positions = np.asarray(positions, dtype=np.int64)
    if not prompt_rows:
        logits = compiled_step(w, cfg, tokens, positions, caches)
        if logits is not None:
            return logits
    attention = base.batch_attention(caches, positions, 1.0 / math.sqrt(cfg.head_dim), prompt_rows)
    x = embed(w, cfg, np.asarray(tokens, dtype=np.int64))
    products = linears if prompt_rows else batch_linears
    for il, L in enumerate(w.layers):
        layer(w, L, cfg, il, x, positions, attention, products)
    return batch_linears([w.output], classifier_input(w, cfg, x[max(prompt_rows - 1, 0):]))[0]


def compiled_step(w: Weights, cfg: Config, tokens, positions: np.ndarray, caches: list) -> np.ndarray | None:
    """`forward_batch`'s decode step as one compiled call (cpu_kernels/decode_pass.py, as llama.compiled_step): the
    same kernels in the same order as `layer`, so the same logits; None where it does not apply."""
    return base.compiled_decode(w, lambda B: _make_decode_tables(w, cfg, B), caches, positions,
                                lambda: embed(w, cfg, np.asarray(tokens, np.int64)), lambda t: t.freqs, cfg.n_vocab)


def _make_decode_tables(w: Weights, cfg: Config, B: int) -> "decode_pass.Tables | None":
    dp, Ls = decode_pass, w.layers
    table = dp.product_table(Ls, w.output, B)
    if table is None or any(lin.bias is not None for L in Ls for lin in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up,
                                                                            L.w_down)):
        return None
    tables = dp.Tables(
        table, np.stack([np.stack([L.attn_norm, L.ffn_norm]) for L in Ls]),
        np.stack([np.stack([L.post_attn_norm, L.post_ffn_norm]) for L in Ls]), np.stack([L.q_norm for L in Ls]),
        np.stack([L.k_norm for L in Ls]), True, np.zeros((len(Ls), 0)),
        [0 if cfg.is_local(il) else 1 for il in range(len(Ls))], True, cfg.rms_eps, 1.0, True,
        (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_ff, cfg.n_head * cfg.head_dim), 1.0 / math.sqrt(cfg.head_dim),
        w.output_norm)
    tables.freqs = np.ascontiguousarray(np.stack([w.inv_freq_local, w.inv_freq_global]), dtype=np.float32)
    return tables


def layer(w: Weights, L: Layer, cfg: Config, il: int, x: np.ndarray, positions: np.ndarray,
          attention: base.Attention, products: base.Products) -> None:
    """Layer il on x (T, d) in place: the rows are a prompt's tokens (forward) or one token per sequence
    (forward_batch); `attention` and `products` say which."""
    T, hd = x.shape[0], cfg.head_dim
    inv_freq = w.inv_freq_local if cfg.is_local(il) else w.inv_freq_global
    # attention with q/k norms, then a post-attention norm before the residual
    h = rmsnorm(x, L.attn_norm, cfg.rms_eps)
    q, k, v = products([L.wq, L.wk, L.wv], h)
    q, k = qk_norm_rope(q.reshape(T, cfg.n_head, hd), k.reshape(T, cfg.n_head_kv, hd), positions, inv_freq, True,
                        L.q_norm, L.k_norm, cfg.rms_eps)
    v = v.reshape(T, cfg.n_head_kv, hd)
    a = attention(il, q, k, v)
    x += rmsnorm(products([L.wo], a.reshape(T, cfg.n_head * hd))[0], L.post_attn_norm, cfg.rms_eps)
    del q, k, v, a  # a prompt's (T, ...) arrays of the attention, freed before the feed-forward's larger ones
    # feed-forward (GeGLU), post-FFN norm before the residual
    h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)
    g, u = products([L.w_gate, L.w_up], h)
    g = gelu_mul(g, u, out=g)
    x += rmsnorm(products([L.w_down], g)[0], L.post_ffn_norm, cfg.rms_eps)


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints (read by edgeq.convert)
# ------------------------------------------------------------------------------------------------

class HFSpec(base.HFSpec):
    """llama.cpp's Gemma3Model: norms stored with Gemma's +1, the classifier tied, out-of-vocabulary
    embedding rows dropped, head size and sliding window always written."""

    arch = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")  # (the text part only)
    hf_model_types = ("gemma3_text", "gemma3")
    defaults = dict(n_head=8, n_head_kv=4, head_dim=256, n_ctx=131072, rms_eps=1e-6, rope_theta=1e6, tied=True)
    layer_tensors = {**base.HFSpec.layer_tensors,
                     "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm"}
    trim_embedding_to_vocab = True
    spm_add_space_prefix = False
    write_head_dim = True

    def check(self, hp, where):
        hp.tied = True
        if hp.raw.get("attn_logit_softcapping") is not None:
            raise ModelError(f"{where}: gemma3 with attn_logit_softcapping is not supported")

    def metadata(self, hp):
        m = []
        if hp.raw.get("sliding_window"):
            m.append(("attention.sliding_window", int(hp.raw["sliding_window"]), "u32"))
        if hp.rope_theta_local not in (None, 10000.0):  # llama.cpp's built-in default for local layers
            m.append(("rope.freq_base_swa", hp.rope_theta_local, "f32"))
        return m

    def layer_shapes(self, hp):
        d, hd = hp.n_embd, hp.head_dim
        return {**super().layer_shapes(hp), "attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,),
                "post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)}

    def transform(self, name, x, hp):
        if name.endswith("norm.weight"):
            return x + np.float32(1.0)  # Gemma3RMSNorm multiplies by (1 + w)
        return x


HF = HFSpec()
