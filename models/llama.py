"""Llama (SmolLM2, TinyLlama, Llama 3): pre-norm decoder, RoPE, GQA attention, SwiGLU FFN.

The Llama family shares this file: its variants are Config options, each a small file of its own that sets
them (qwen2: q/k/v biases and NeoX RoPE; qwen3: q/k norms; smollm3: no RoPE on every 4th layer; granite:
embedding, attention, residual and logit multipliers; phi3: fused matrices, partial rotary, LongRoPE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeq.cpu_kernels import decode_pass
from edgeq.cpu_kernels.ops import add_rmsnorm, qk_norm_rope, rmsnorm, rope_inv_freq, silu_mul
from edgeq.models import base
from edgeq.models.base import (MAX_CTX, MAX_EMBD, MAX_FF, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, ForwardPlan,
                               KVLayout, Linear, Observer, TensorBinder, check_attention, check_vocab_and_layers,
                               hparam, linears, batch_linears)


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
    qk_norm: bool = False     # Qwen3: RMSNorm of each q and k head before RoPE
    no_rope_every: int = 0    # > 0: layers il with (il + 1) % no_rope_every == 0 skip RoPE (SmolLM3)
    embed_scale: float = 1.0  # Granite's multipliers (1 elsewhere)
    attn_scale: float = 0.0   # softmax scale; 0: 1/sqrt(head_dim)
    residual_scale: float = 1.0
    logit_scale: float = 1.0  # logits are divided by it
    fused_qkv: bool = False   # Phi-3: q, k, v rows in one matrix attn_qkv
    fused_gate_up: bool = False  # Phi-3: gate then up rows in one ffn_up of 2 * n_ff rows
    n_ctx_orig: int = 0       # LongRoPE: contexts above this use the long factors (llama.cpp's rule)
    rope_attn_factor: float = 1.0  # LongRoPE: rotated dims of q and k times this
    sliding_window: int = 0   # > 0: every layer attends to the last sliding_window positions (Phi-3)
    n_expert: int = 0         # > 0: the FFN is a mixture of experts (Qwen3-MoE), n_expert_used chosen per token
    n_expert_used: int = 0
    n_ff_expert: int = 0      # an expert's FFN inner size
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
        return [KVLayout(self.n_head_kv, self.head_dim, self.sliding_window) for _ in range(self.n_layer)]

    def uses_rope(self, il: int) -> bool:
        return not (self.no_rope_every and (il + 1) % self.no_rope_every == 0)

    def plan(self) -> ForwardPlan:
        return ForwardPlan(
            rope_tables=tuple("inv_freq" if self.uses_rope(il) else None for il in range(self.n_layer)),
            attn_scale=self.attn_scale or 1.0 / math.sqrt(self.head_dim), rope_neox=self.rope_neox,
            qk_norm=self.qk_norm, embed_scale=self.embed_scale, residual_scale=self.residual_scale,
            logit_scale=self.logit_scale, rope_attn_factor=self.rope_attn_factor, rope_long_table="inv_freq_long",
            rope_long_above=self.n_ctx_orig, n_expert_used=self.n_expert_used if self.n_expert else 0)


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
    q_norm: np.ndarray | None = None  # cfg.qk_norm
    k_norm: np.ndarray | None = None
    moe: "Experts | None" = None       # cfg.n_expert: replaces w_gate/w_up/w_down


@dataclass
class Experts:
    """A mixture-of-experts FFN: a router and, per expert, SwiGLU matrices (views of the stacked tensors)."""

    router: Linear
    gate: list[Linear]
    up: list[Linear]
    down: list[Linear]


@dataclass
class Weights:
    tok_embd: object
    layers: list[Layer]
    output_norm: np.ndarray
    output: Linear
    inv_freq: np.ndarray
    inv_freq_long: np.ndarray | None = None  # LongRoPE: for contexts above cfg.n_ctx_orig


def load_weights(gf, cfg: Config) -> Weights:
    t = TensorBinder(gf)
    d, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff
    q, kv = cfg.n_head * hd, cfg.n_head_kv * hd
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        if cfg.fused_qkv:
            wq, wk, wv = t.fused_linears(p + "attn_qkv", [q, kv, kv], d)
        else:
            wq, wk, wv = (t.linear(p + name, n, d, bias=cfg.qkv_bias)
                          for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)))
        moe = None
        if cfg.n_expert:
            w_gate = w_up = None
            ne, fe = cfg.n_expert, cfg.n_ff_expert
            moe = Experts(t.linear(p + "ffn_gate_inp", ne, d), t.stacked_linears(p + "ffn_gate_exps", ne, fe, d),
                          t.stacked_linears(p + "ffn_up_exps", ne, fe, d), t.stacked_linears(p + "ffn_down_exps", ne, d, fe))
        elif cfg.fused_gate_up:
            w_gate, w_up = t.fused_linears(p + "ffn_up", [ff, ff], d)
        else:
            w_gate, w_up = t.linear(p + "ffn_gate", ff, d), t.linear(p + "ffn_up", ff, d)
        layers.append(Layer(
            attn_norm=t.vector(p + "attn_norm.weight", d),
            wq=wq, wk=wk, wv=wv,
            wo=t.linear(p + "attn_output", d, q),
            ffn_norm=t.vector(p + "ffn_norm.weight", d),
            w_gate=w_gate, w_up=w_up,
            w_down=t.linear(p + "ffn_down", d, ff) if moe is None else None,
            moe=moe,
            q_norm=t.vector(p + "attn_q_norm.weight", hd) if cfg.qk_norm else None,
            k_norm=t.vector(p + "attn_k_norm.weight", hd) if cfg.qk_norm else None,
        ))
    if t.has("rope_freqs.weight"):
        cfg.rope_freq_factors = t.vector("rope_freqs.weight", cfg.n_rot // 2)
    inv_freq_long = None
    if t.has("rope_factors_long.weight"):  # LongRoPE: short factors for short contexts, long ones above
        cfg.rope_freq_factors = t.vector("rope_factors_short.weight", cfg.n_rot // 2)
        inv_freq_long = rope_inv_freq(cfg.n_rot, cfg.rope_base, t.vector("rope_factors_long.weight", cfg.n_rot // 2))
    return Weights(
        tok_embd=t.embedding("token_embd.weight", cfg.n_vocab, d),
        layers=layers,
        output_norm=t.vector("output_norm.weight", d),
        output=t.linear("token_embd" if cfg.tied_output else "output", cfg.n_vocab, d),
        inv_freq=rope_inv_freq(cfg.n_rot, cfg.rope_base, cfg.rope_freq_factors),
        inv_freq_long=inv_freq_long,
    )


def rope_table(w: Weights, cfg: Config, n_ctx: int) -> np.ndarray:
    """The RoPE frequencies for a context of n_ctx positions: LongRoPE's long factors above the original
    context, as llama.cpp chooses them (by context size, so that cached keys never mix the two)."""
    return w.inv_freq_long if w.inv_freq_long is not None and n_ctx > cfg.n_ctx_orig else w.inv_freq


def forward(w: Weights, cfg: Config, tokens: np.ndarray, pos0: int, cache,
            observer: Observer | None = None, all_logits: bool = False) -> np.ndarray:
    """Run `tokens` (at positions pos0..) through the network, writing their keys/values into `cache`.

    Returns logits (T, n_vocab) if all_logits, else (1, n_vocab) for the last token."""
    if len(tokens) == 1 and observer is None:  # a decode token: every layer in one compiled call where it can
        logits = compiled_step(w, cfg, tokens, np.array([pos0], np.int64), [cache])
        if logits is not None:
            return logits
    x = embed(w, cfg, tokens)                                       # (T, d)
    forward_layers(w, cfg, x, pos0, cache, range(cfg.n_layer), observer)
    return _logits(w, cfg, x if all_logits else x[-1:], lambda layers, h: linears(layers, h, observer))


def forward_layers(w: Weights, cfg: Config, x: np.ndarray, pos0: int, cache, layers: range,
                   observer: Observer | None = None) -> None:
    """Decoder layers `layers` on the hidden states x (T, d) at positions pos0.. in place: `forward` runs them
    all, calibration (convert/calibrate.py) one layer at a time over every window."""
    attention = base.prompt_attention(cache, pos0, _scale(cfg))
    products = lambda lins, h: linears(lins, h, observer)  # noqa: E731
    positions, inv_freq = np.arange(pos0, pos0 + x.shape[0]), rope_table(w, cfg, cache.n_ctx)
    o = None
    for il in layers:
        o = layer(w.layers[il], cfg, il, x, positions, inv_freq, attention, products, observer, o)
    if o is not None:
        x += o


def forward_batch(w: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray, caches: list,
                  prompt_rows: int = 0) -> np.ndarray:
    """One decode step for N sequences at once: token i sits at positions[i] of caches[i].

    The same layers as `forward`; the matrix products run over all N rows together (each weight read once per
    step), attention runs per sequence on its own cache. Returns logits (N, n_vocab).
    With prompt_rows = T > 0 the first T rows are instead a chunk of caches[0]'s prompt (at positions[0]..,
    one row per token) and the N rows after them one token of each of caches[1:]: the server's step that reads
    the weights once for a prompt chunk and every decoding sequence. Returns logits (1 + N, n_vocab): the chunk's
    last token, then the N sequences."""
    positions = np.asarray(positions, dtype=np.int64)
    if not prompt_rows:
        logits = compiled_step(w, cfg, tokens, positions, caches)
        if logits is not None:
            return logits
    attention = base.batch_attention(caches, positions, _scale(cfg), prompt_rows)
    x = embed(w, cfg, np.asarray(tokens, dtype=np.int64))          # (T + N, d)
    products = linears if prompt_rows else batch_linears           # a chunk's many rows: the prompt GEMM
    inv_freq = rope_table(w, cfg, caches[0].n_ctx)
    o = None
    for il, L in enumerate(w.layers):
        o = layer(L, cfg, il, x, positions, inv_freq, attention, products, None, o)
    x += o
    return _logits(w, cfg, x[max(prompt_rows - 1, 0):], batch_linears)


def layer(L: Layer, cfg: Config, il: int, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray,
          attention: base.Attention, products: base.Products, observer: Observer | None = None,
          residual: np.ndarray | None = None) -> np.ndarray:
    """Decoder layer il on x (T, d): the rows are a prompt's tokens (forward) or one token per sequence
    (forward_batch); `attention` and `products` say which. `residual`: the layer before's feed-forward output, not
    yet added to x (None for the first layer); returns this layer's, for the next layer or the caller to add (each
    residual add shares a kernel call with the norm after it)."""
    T, hd = x.shape[0], cfg.head_dim
    res = np.float32(cfg.residual_scale)
    # attention
    h = rmsnorm(x, L.attn_norm, cfg.rms_eps) if residual is None else add_rmsnorm(x, residual, L.attn_norm, cfg.rms_eps)
    q, k, v = products([L.wq, L.wk, L.wv], h)
    # each head's norm where the model has them (Qwen3), then RoPE: one kernel call for q and k
    q, k = qk_norm_rope(q.reshape(T, cfg.n_head, hd), k.reshape(T, cfg.n_head_kv, hd), positions,
                        inv_freq if cfg.uses_rope(il) else None, cfg.rope_neox, L.q_norm, L.k_norm, cfg.rms_eps)
    v = v.reshape(T, cfg.n_head_kv, hd)
    if cfg.uses_rope(il) and cfg.rope_attn_factor != 1.0:
        q[..., :cfg.n_rot] *= np.float32(cfg.rope_attn_factor)
        k[..., :cfg.n_rot] *= np.float32(cfg.rope_attn_factor)
    a = attention(il, q, k, v)                                       # (T, n_head, hd)
    o = products([L.wo], a.reshape(T, cfg.n_head * hd))[0]
    del q, k, v, a  # a prompt's (T, ...) arrays of the attention, freed before the feed-forward's larger ones
    # feed-forward (SwiGLU, or a mixture of SwiGLU experts) on the norm of x += o (one kernel call)
    h = add_rmsnorm(x, o if res == 1.0 else o * res, L.ffn_norm, cfg.rms_eps)
    del o
    if L.moe is not None:
        o = experts(L.moe, h, cfg.n_expert_used, observer)
    else:
        g, u = products([L.w_gate, L.w_up], h)
        o = products([L.w_down], silu_mul(g, u, out=g))[0]
    return o if res == 1.0 else o * res


def compiled_step(w: Weights, cfg: Config, tokens, positions: np.ndarray, caches: list) -> np.ndarray | None:
    """`forward_batch`'s decode step (one token of each of `caches`, at `positions`) as one compiled call
    (cpu_kernels/decode_pass.py): the same kernels on the same arrays in the same order, so the same logits, without
    ~10 Python dispatches a layer. None where it does not apply (a mixture of experts, LongRoPE's attention factor,
    a matrix without an integer kernel, caches that are not one group each appending right after what it holds):
    the caller then runs the layers from Python."""
    logits = base.compiled_decode(w, lambda B: _make_decode_tables(w, cfg, B), caches, positions,
                                  lambda: embed(w, cfg, np.asarray(tokens, np.int64)),
                                  lambda _: rope_table(w, cfg, caches[0].n_ctx)[None], cfg.n_vocab)
    return logits if logits is None or cfg.logit_scale == 1.0 else logits / np.float32(cfg.logit_scale)


def _make_decode_tables(w: Weights, cfg: Config, B: int) -> "decode_pass.Tables | None":
    dp, Ls = decode_pass, w.layers
    qkv = [lin for L in Ls for lin in (L.wq, L.wk, L.wv)]
    if cfg.n_expert or cfg.rope_attn_factor != 1.0 or \
            any(lin.bias is not None for L in Ls for lin in (L.wo, L.w_gate, L.w_up, L.w_down)) or \
            w.output.bias is not None or len({lin.bias is None for lin in qkv}) > 1:
        return None  # biases: on every Q/K/V matrix (Qwen2) or none
    table = dp.product_table(Ls, w.output, B)
    if table is None:
        return None
    n = len(Ls)
    biases = np.stack([np.concatenate([L.wq.bias, L.wk.bias, L.wv.bias]) for L in Ls]) if Ls[0].wq.bias is not None \
        else np.zeros((n, 0))
    return dp.Tables(
        table, np.stack([np.stack([L.attn_norm, L.ffn_norm]) for L in Ls]), np.zeros((n, 2, 0)),
        np.stack([L.q_norm for L in Ls]) if cfg.qk_norm else np.zeros((n, 0)),
        np.stack([L.k_norm for L in Ls]) if cfg.qk_norm else np.zeros((n, 0)), cfg.qk_norm, biases,
        [0 if cfg.uses_rope(il) else -1 for il in range(n)], cfg.rope_neox, cfg.rms_eps, cfg.residual_scale, False,
        (cfg.n_head, cfg.n_head_kv, cfg.head_dim, Ls[0].w_gate.n_out, cfg.n_head * cfg.head_dim), _scale(cfg),
        w.output_norm)


def _scale(cfg: Config) -> float:
    return cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)


def embed(w: Weights, cfg: Config, tokens: np.ndarray) -> np.ndarray:
    """The hidden states (T, d) entering the first layer."""
    x = w.tok_embd(tokens)
    if cfg.embed_scale != 1.0:
        x *= np.float32(cfg.embed_scale)
    return x


def classifier_input(w: Weights, cfg: Config, x: np.ndarray) -> np.ndarray:
    """What the classifier w.output reads: the final norm of the hidden states."""
    return rmsnorm(x, w.output_norm, cfg.rms_eps)


def _logits(w: Weights, cfg: Config, x: np.ndarray, products: base.Products) -> np.ndarray:
    logits = products([w.output], classifier_input(w, cfg, x))[0]
    return logits if cfg.logit_scale == 1.0 else logits / np.float32(cfg.logit_scale)


def experts(m: Experts, h: np.ndarray, k: int, observer: Observer | None = None) -> np.ndarray:
    """Each row of h through its k best experts (softmax over the router, the k weights renormalized, as
    llama.cpp's qwen3moe); only the chosen experts' matrices are read."""
    logits = m.router(h, observer)                                     # (T, n_expert)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    w = np.take_along_axis(p, top, axis=1)
    w /= w.sum(axis=1, keepdims=True)                                  # softmax, then renormalized over the k
    out = np.zeros_like(h)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)
        g = silu_mul(*linears([m.gate[e], m.up[e]], np.ascontiguousarray(h[rows]), observer))
        out[rows] += w[rows, slot][:, None].astype(np.float32) * m.down[e](g, observer)
    return out


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints (read by edgeq.convert)
# ------------------------------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half Q/K rows → interleaved pairs (GGUF "normal" RoPE)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(rope_scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """rope_freqs.weight for Llama 3.x "llama3" rope scaling (convert_hf_to_gguf.py's formula)."""
    rs = rope_scaling
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class HFSpec(base.HFSpec):
    """llama.cpp's LlamaModel: Q/K rows permuted for interleaved RoPE, vocab_size and rope.dimension_count
    written, "llama3" rope scaling as a rope_freqs tensor."""

    arch = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    hf_model_types = ("llama",)
    rope_types = ("llama3",)
    permute = True

    def metadata(self, hp):
        return [("vocab_size", hp.n_vocab, "u32"), ("rope.dimension_count", hp.head_dim, "u32")]

    def extra_tensors(self, hp):
        if hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) == "llama3":
            return {"rope_freqs.weight": llama3_rope_factors(hp.rope_scaling, hp.rope_theta, hp.head_dim)}
        return {}

    def transform(self, name, x, hp):
        if self.permute and ".attn_q." in name:
            return permute_qk(x, hp.n_head)
        if self.permute and ".attn_k." in name:
            return permute_qk(x, hp.n_head_kv)
        return x


HF = HFSpec()
