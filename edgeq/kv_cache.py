"""The key/value cache: one (n_kv_heads, n_ctx, head_dim) buffer pair per layer, allocated once.

`store` writes the keys/values of new positions; `attend` runs attention of new queries over
everything stored so far (sliding-window layers read only their window).
"""
from __future__ import annotations

import numpy as np

from edgeq.cpu_kernels.ops import attention


class KVCache:
    def __init__(self, layouts, n_ctx: int):
        self.n_ctx = n_ctx
        self.layouts = layouts
        self.k = [np.zeros((L.n_kv_heads, n_ctx, L.head_dim), np.float32) for L in layouts]
        self.v = [np.zeros((L.n_kv_heads, n_ctx, L.head_dim), np.float32) for L in layouts]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def store(self, il: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        T = k.shape[0]
        if pos0 + T > self.n_ctx:
            raise ValueError(f"KV cache full: positions {pos0}..{pos0 + T} > n_ctx {self.n_ctx}")
        self.k[il][:, pos0:pos0 + T, :] = k.transpose(1, 0, 2)
        self.v[il][:, pos0:pos0 + T, :] = v.transpose(1, 0, 2)

    def attend(self, il: int, q: np.ndarray, pos0: int, scale: float) -> np.ndarray:
        return attention(q, self.k[il], self.v[il], pos0, scale, self.layouts[il].window)


CACHE_TYPES = ("f32",)


def make_kv_cache(layouts, n_ctx: int, type_k: str | None = None, type_v: str | None = None) -> KVCache:
    """The cache for these layer layouts; type None means the default type."""
    from edgeq.errors import EdgeqError

    for t in (type_k, type_v):
        if t is not None and t not in CACHE_TYPES:
            raise EdgeqError(f"unknown cache type {t!r} (choose from {', '.join(CACHE_TYPES)})")
    return KVCache(layouts, n_ctx)
