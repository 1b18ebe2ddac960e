"""What every architecture shares: reading hyperparameters, binding tensors, the linear layer.

A model module (llama.py, qwen2.py, gemma3.py) defines `Config.from_gguf(gf)`, `load_weights(gf, cfg)`
and `forward(w, cfg, tokens, pos0, cache, observer=None, all_logits=False)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeq.cpu_kernels.linear import SUPPORTED, QuantLinear, embed_rows, matmul_many, matmul_rows_many
from edgeq.errors import ModelError
from edgeq.formats.quants import dequantize

# observer(tensor_name, x_in (T, n_in)) sees the input of every matrix product (calibration).
Observer = Callable[[str, np.ndarray], None]


# Bounds on hyperparameters: far above any real model, low enough that nothing sized from them can be huge.
MAX_EMBD = 1 << 16
MAX_LAYERS = 1024
MAX_FF = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 2048
MAX_CTX = 1 << 24
MAX_VOCAB = 1 << 24


def _short(value: Any, limit: int = 40) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {value.dtype}"
    text = repr(value[:limit + 1] if isinstance(value, (str, list)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def hparam(gf, arch: str, key: str, default: Any = ..., cast=None, lo: float | None = None,
           hi: float | None = None, above: float | None = None) -> Any:
    """`<arch>.<key>` from the metadata; a missing required key is a ModelError, and so is a value that is not a
    number (cast int or float; NaN and infinities refused) or lies outside [lo, hi] or not above `above`."""
    full = f"{arch}.{key}"
    value = gf.get(full, None)
    if value is None:
        if default is ...:
            raise ModelError(f"{gf.path}: metadata key {full} is missing")
        return default
    if isinstance(value, (list, np.ndarray)):  # per-layer arrays (e.g. head_count_kv) are not supported: take the first
        if len(value) == 0:
            raise ModelError(f"{gf.path}: metadata key {full} is an empty array")
        value = value[0]
    if cast in (int, float):
        value = _number(gf.path, full, value, cast)
    elif cast:
        value = cast(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
        bounds = f"> {above}" if above is not None else f"at least {lo}" if hi is None else f"in {lo}..{hi}"
        raise ModelError(f"{gf.path}: {full} = {value} is out of range (must be {bounds})")
    return value


def _number(path, key: str, value: Any, cast) -> int | float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ModelError(f"{path}: {key} must be a number, not {_short(value)}")
    if not np.isfinite(value):
        raise ModelError(f"{path}: {key} must be a finite number, not {value}")
    if cast is int:
        if value != int(value):
            raise ModelError(f"{path}: {key} must be a whole number, not {value}")
        return int(value)
    return float(value)


def check_attention(gf, arch: str, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, n_rot: int) -> None:
    """Head counts and sizes consistent with each other (before anything is sized from them)."""
    if n_head % n_head_kv:
        raise ModelError(f"{gf.path}: {n_head} attention heads are not a multiple of {n_head_kv} KV heads")
    if gf.get(f"{arch}.attention.key_length") is None and n_embd % n_head:
        raise ModelError(f"{gf.path}: embedding length {n_embd} is not a multiple of {n_head} heads")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM or n_rot % 2 or n_rot > head_dim:
        raise ModelError(f"{gf.path}: head size {head_dim} and rotary dims {n_rot} must be even, head size at most "
                         f"{MAX_HEAD_DIM}, "
                         f"rotary dims at most the head size")


def check_vocab_and_layers(gf, n_vocab: int, n_layer: int) -> None:
    """The vocabulary matches the embedding rows (as llama.cpp requires), and no layer is left out."""
    tokens = gf.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != n_vocab:
        raise ModelError(f"{gf.path}: the vocabulary has {len(tokens)} tokens, the embedding {n_vocab} rows")
    if any(name.startswith(f"blk.{n_layer}.") for name in gf.tensors):
        raise ModelError(f"{gf.path}: the file has more layers than its block_count ({n_layer})")


class Linear:
    """A weight matrix y = x @ W.T (+ b) read straight from its quantized blocks."""

    def __init__(self, name: str, q: QuantLinear, bias: np.ndarray | None = None):
        self.name = name
        self.q = q
        self.bias = bias
        self.n_out, self.n_in = q.n_out, q.n_in

    def __call__(self, x: np.ndarray, observer: Observer | None = None) -> np.ndarray:
        if observer is not None:
            observer(self.name, x)
        y = self.q.matvec(x[0])[None, :] if x.shape[0] == 1 else self.q.matmul(x)
        if self.bias is not None:
            y += self.bias
        return y


def linears(layers: list[Linear], x: np.ndarray, observer: Observer | None = None) -> list[np.ndarray]:
    """[layer(x) for layer in layers] for layers that share their input (Q/K/V, gate/up): for one token, a
    single kernel call over all their rows (cpu_kernels/linear.matmul_rows_many); for a prompt, one quantization of
    the activations for all of them (linear.matmul_many)."""
    if observer is not None:
        for lin in layers:
            observer(lin.name, x)
    qs = [lin.q for lin in layers]
    ys = matmul_rows_many(qs, x) if x.shape[0] == 1 else matmul_many(qs, x)
    for lin, y in zip(layers, ys):
        if lin.bias is not None:
            y += lin.bias
    return ys


def batch_linears(layers: list[Linear], x: np.ndarray) -> list[np.ndarray]:
    """[layer(x) for layer in layers] for a decode batch (x: a few rows, one per sequence): the integer row
    kernels, one call per weight type, each weight row read once for every sequence."""
    ys = matmul_rows_many([lin.q for lin in layers], x)
    for lin, y in zip(layers, ys):
        if lin.bias is not None:
            y += lin.bias
    return ys


# products(layers, x) -> [layer(x) for layer in layers] (linears for a prompt, batch_linears for a decode batch)
Products = Callable[[list[Linear], np.ndarray], list[np.ndarray]]
# attention(il, q, k, v) -> (T, n_head, head_dim): stores k/v of layer il and attends with q
Attention = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def prompt_attention(cache, pos0: int, scale: float) -> Attention:
    """Attention for a forward pass over T new tokens of one sequence (positions pos0..) on `cache`; a single
    token stores and attends in one decode kernel call (the cache's `decode_step`, runtime/kv_cache.DecodeStep)."""
    step = cache.decode_step([cache], np.array([pos0]))

    def attention(il, q, k, v):
        if q.shape[0] == 1:
            return step.attend(il, q, k, v, scale)
        cache.store(il, pos0, k, v)
        return cache.attend(il, q, pos0, scale)
    return attention


def decode_tables(w, B: int, make: Callable[[int], Any]):
    """`make(B)`: a model's side of the compiled decode step (cpu_kernels/decode_pass.Tables, or None where it does
    not apply) for batches of B rows, made once and kept on the weights `w`."""
    cache = w.__dict__.setdefault("_decode_tables", {})
    if B not in cache:
        cache[B] = make(B)
    return cache[B]


def forget_decode_tables(w) -> None:
    """Drop the tables `decode_tables` kept on the weights `w` (they hold the weights' addresses: after a change of
    which copy a batch reads, QuantLinear.packed_batches)."""
    w.__dict__.pop("_decode_tables", None)


def compiled_decode(w, make_tables: Callable[[int], Any], caches: list, positions: np.ndarray,
                    embed: Callable[[], np.ndarray], freqs: Callable[[Any], np.ndarray],
                    n_vocab: int) -> np.ndarray | None:
    """One token of each of `caches` at `positions` through cpu_kernels/decode_pass.step with the model's tables
    (`decode_tables(w, B, make_tables)`): logits (B, n_vocab), the caches advanced by one position. None where the
    step is not compiled yet (decode_pass.ready), the tables are None, or the caches are not distinct caches of one
    group (a KVPool's, or a single cache) each appending right after the positions it holds, as the decode
    attention's one call per layer needs (runtime/kv_cache.DecodeStep). embed(): the rows' hidden states;
    freqs(tables): the RoPE tables the step's layers index."""
    from edgeq.cpu_kernels import decode_pass

    B = len(caches)
    if not hasattr(caches[0], "decode_tables") or not decode_pass.ready():
        return None
    tables = decode_tables(w, B, make_tables)
    plist = positions.tolist()
    if tables is None or not caches[0].decode_step(caches, positions).together or \
            any(L.n != p for c, p in zip(caches, plist) for L in c.layers):
        return None
    logits = np.empty((B, n_vocab), np.float32)
    decode_pass.step(embed(), positions, np.array([c.index for c in caches], np.int64), tables,
                     caches[0].decode_tables(), freqs(tables), logits)
    for c, p in zip(caches, plist):
        for L in c.layers:
            L.n = p + 1
    return logits


def batch_attention(caches: list, positions: np.ndarray, scale: float, prompt_rows: int = 0) -> Attention:
    """Attention for a decode batch: row i is one token at positions[i] of caches[i], each on its own cache
    (the caches' `decode_step`, runtime/kv_cache.DecodeStep: one kernel call per layer for a KVPool's slots).
    With prompt_rows = T > 0 the first T rows are a prompt chunk of caches[0] (positions[0]..) and the rows after
    them one token of each of caches[1:]: the chunk attends as in `forward`, the others as a decode batch."""
    if not prompt_rows:
        step = caches[0].decode_step(caches, positions)
        return lambda il, q, k, v: step.attend(il, q, k, v, scale)
    T = prompt_rows
    prompt = prompt_attention(caches[0], int(positions[0]), scale)
    if len(caches) == 1:
        return prompt
    rest = batch_attention(caches[1:], positions[T:], scale)
    return lambda il, q, k, v: np.concatenate([prompt(il, q[:T], k[:T], v[:T]), rest(il, q[T:], k[T:], v[T:])])


def all_linears(obj):
    """Every Linear inside a model's weights or one layer's (dataclass fields, lists of them: layers, experts)."""
    if isinstance(obj, Linear):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from all_linears(x)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from all_linears(getattr(obj, f.name))


class Embedding:
    """Token embedding table, rows looked up (and dequantized) on demand."""

    def __init__(self, info):
        self.raw, self.qtype, self.shape = info.data, info.qtype, tuple(info.shape)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return embed_rows(self.raw, self.qtype, self.shape, tokens)


class TensorBinder:
    """Looks tensors up by GGUF name and checks their shapes; every problem is one ModelError line."""

    def __init__(self, gf):
        self.gf = gf

    def info(self, name: str, shape: tuple[int, ...]):
        t = self.gf.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.gf.path}: tensor {name} is missing")
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"{self.gf.path}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.qtype not in SUPPORTED:
            raise ModelError(f"{self.gf.path}: tensor {name} is {t.qtype}, a type edgeq cannot compute "
                             f"(it runs {', '.join(SUPPORTED)}): use a file quantized to one of those")
        return t

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def linear(self, name: str, n_out: int, n_in: int, bias: bool = False) -> Linear:
        t = self.info(name + ".weight", (n_out, n_in))
        b = self.vector(name + ".bias", n_out) if bias else None
        return Linear(name + ".weight", QuantLinear(t.data, t.qtype, (n_out, n_in)), b)

    def fused_linears(self, name: str, parts: list[int], n_in: int) -> list[Linear]:
        """A matrix stored as row blocks of several (Phi-3's attn_qkv, its gate+up ffn_up): one Linear per
        block, each a view of its rows (quantized rows are independent)."""
        t = self.info(name + ".weight", (sum(parts), n_in))
        row_bytes = t.data.nbytes // sum(parts)
        out, start = [], 0
        for n in parts:
            raw = t.data[start * row_bytes:(start + n) * row_bytes]
            out.append(Linear(name + ".weight", QuantLinear(raw, t.qtype, (n, n_in))))
            start += n
        return out

    def stacked_linears(self, name: str, n: int, n_out: int, n_in: int) -> list[Linear]:
        """A stacked (n, n_out, n_in) tensor (MoE experts) as n Linears, each a view of its slab."""
        t = self.info(name + ".weight", (n, n_out, n_in))
        size = t.data.nbytes // n
        return [Linear(name + ".weight", QuantLinear(t.data[i * size:(i + 1) * size], t.qtype, (n_out, n_in)))
                for i in range(n)]

    def vector(self, name: str, n: int) -> np.ndarray:
        """A 1-D tensor (norm weight, bias) as a float32 copy (small)."""
        t = self.info(name, (n,))
        return np.ascontiguousarray(dequantize(t.data, t.qtype, (n,)), dtype=np.float32)

    def embedding(self, name: str, n_vocab: int, n_embd: int) -> Embedding:
        return Embedding(self.info(name, (n_vocab, n_embd)))


@dataclass
class KVLayout:
    """What the KV cache must hold for one layer."""

    n_kv_heads: int
    head_dim: int
    window: int = 0  # > 0: sliding-window layer, only the last `window` positions are ever read


@dataclass(frozen=True)
class ForwardPlan:
    """A model's layer sequence as data, for forward passes written outside its module (gpu_kernels, which
    never import models). `Config.plan()` gives it; fields default to the plain Llama network."""

    rope_tables: tuple[str | None, ...]  # per layer: the Weights attribute holding its RoPE frequencies, None: no RoPE
    attn_scale: float                    # softmax scale of q·k
    rope_neox: bool = False              # RoPE pairing (i, i + n/2) instead of (2i, 2i+1)
    qk_norm: bool = False                # RMSNorm of each q and k head before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False             # RMSNorm of the attention / FFN output before the residual (Gemma 3)
    gelu: bool = False                   # GeGLU instead of SwiGLU
    embed_scale: float = 1.0             # token embeddings times this (Gemma 3, Granite)
    residual_scale: float = 1.0          # attention / FFN outputs times this before the residual (Granite)
    logit_scale: float = 1.0             # logits divided by this (Granite)
    rope_attn_factor: float = 1.0        # rotated dims of q and k times this after RoPE (LongRoPE, Phi-3)
    rope_long_table: str | None = None   # LongRoPE: the Weights attribute whose table replaces the layers' own
    rope_long_above: int = 0             # when the context holds more positions than this (llama.cpp's rule)
    n_expert_used: int = 0               # > 0: the FFN is a mixture of experts (Layer.moe), this many per token


class HFSpec:
    """How a Hugging Face checkpoint of one architecture becomes GGUF, as llama.cpp's convert_hf_to_gguf.py
    writes it (names from gguf-py's TENSOR_NAMES). edgeq.convert holds what all share (hyperparameters,
    vocabulary, file order) and asks the model module's spec for the rest; `hp` is its Hparams, `hp.raw` the
    (text) config.json."""

    arch = ""
    hf_architectures: tuple[str, ...] = ()   # config.json `architectures[0]`
    hf_model_types: tuple[str, ...] = ()     # config.json `model_type`, for checkpoints without `architectures`
    defaults: dict[str, Any] = dict(n_ctx=2048, rms_eps=1e-5, rope_theta=10000.0, tied=False)
    # HF name after `layers.N.` (without .weight/.bias) → GGUF name after `blk.N.`
    layer_tensors: dict[str, str] = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    reads_head_dim = True             # False: config.json's head_dim is ignored (llama.cpp's Granite)
    write_head_dim = False            # attention.key_length/value_length even when head_dim is implicit
    rope_types: tuple[str, ...] = ()  # rope scaling types beyond "linear" that the spec writes (llama3, longrope)
    trim_embedding_to_vocab = False   # llama.cpp drops embedding rows beyond the tokenizer's (Gemma 3)
    spm_add_space_prefix: bool | None = None  # forced tokenizer.ggml.add_space_prefix of SentencePiece vocabularies

    def check(self, hp, where: str) -> None:
        """Refuse (ModelError) a configuration the runtime cannot run."""

    def stacked_tensor(self, hf_key: str) -> tuple[str, int] | None:
        """(GGUF name after blk.N., index) when the HF per-layer name is one slice of a stacked GGUF tensor
        (an MoE expert's matrix in ffn_*_exps); None otherwise."""
        return None

    def qkv_bias(self, hp) -> bool:
        return bool(hp.raw.get("attention_bias", False))

    def metadata(self, hp) -> list[tuple[str, Any, str]]:
        """`<arch>.<key>` entries beyond the common ones, as (key, value, kind in u32/f32/str/bool)."""
        return []

    def layer_shapes(self, hp) -> dict[str, tuple[int, ...]]:
        """Every per-layer GGUF tensor (name after blk.N.) with its numpy-order shape."""
        d, hd, ff = hp.n_embd, hp.head_dim, hp.n_ff
        q, kv = hp.n_head * hd, hp.n_head_kv * hd
        out = {"attn_norm.weight": (d,), "attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d),
               "attn_output.weight": (d, q), "ffn_norm.weight": (d,), "ffn_gate.weight": (ff, d),
               "ffn_up.weight": (ff, d), "ffn_down.weight": (d, ff)}
        if self.qkv_bias(hp):
            out.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
        return out

    def extra_tensors(self, hp) -> dict[str, np.ndarray]:
        """Tensors computed from the config rather than read (llama3 rope_freqs)."""
        return {}

    def transform(self, name: str, x: np.ndarray, hp) -> np.ndarray:
        """The checkpoint's tensor as llama.cpp stores it under GGUF `name` (mlx-lm's `sanitize`)."""
        return x
