"""What every architecture shares: reading hyperparameters, binding tensors, the linear layer.

A model module (llama.py, qwen2.py, gemma3.py) defines `Config.from_gguf(gf)`, `load_weights(gf, cfg)`
and `forward(w, cfg, tokens, pos0, cache, observer=None, all_logits=False)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeq.cpu_kernels.linear import QuantLinear, embed_rows, matmul_rows_many, matvec_many
from edgeq.errors import ModelError
from edgeq.formats.quants import dequantize

# observer(tensor_name, x_in (T, n_in)) sees the input of every matrix product (calibration).
Observer = Callable[[str, np.ndarray], None]


def hparam(gf, arch: str, key: str, default: Any = ..., cast=None) -> Any:
    """`<arch>.<key>` from the metadata; a missing required key is a ModelError."""
    full = f"{arch}.{key}"
    value = gf.get(full, None)
    if value is None:
        if default is ...:
            raise ModelError(f"{gf.path}: metadata key {full} is missing")
        return default
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv) are not supported: take the first
        value = value[0]
    return cast(value) if cast else value


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
    single kernel call over all their rows (cpu_kernels/linear.matvec_many)."""
    if x.shape[0] != 1:
        return [lin(x, observer) for lin in layers]
    if observer is not None:
        for lin in layers:
            observer(lin.name, x)
    ys = [y[None, :] for y in matvec_many([lin.q for lin in layers], x[0])]
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
        return t

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def linear(self, name: str, n_out: int, n_in: int, bias: bool = False) -> Linear:
        t = self.info(name + ".weight", (n_out, n_in))
        b = self.vector(name + ".bias", n_out) if bias else None
        return Linear(name + ".weight", QuantLinear(t.data, t.qtype, (n_out, n_in)), b)

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
