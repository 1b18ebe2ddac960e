"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Order as in llama.cpp's default chain: penalties → top-k → top-p → min-p → temperature → draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.cpu_kernels.ops import TOP_K_POOL as _POOL  # the prefilter's pools: one number for the kernel and this
from edgeq.cpu_kernels.ops import sample_top_k

FAST_TOP_K = 256  # top_k up to this goes through the kernel


@dataclass
class SamplingParams:
    temperature: float = 0.8     # 0 → greedy
    top_k: int = 40              # 0 → off
    top_p: float = 0.95          # 1 → off
    min_p: float = 0.05          # 0 → off
    repeat_penalty: float = 1.0  # 1 → off
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        from edgeq.errors import EdgeqError

        def number(name, v, integer=False):
            # NaN passes every comparison below, so it is refused first, with strings and the like
            ok = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.integer, np.floating))
            if isinstance(v, bool) or not ok or not np.isfinite(v):
                raise EdgeqError(f"{name} must be a finite {'integer' if integer else 'number'}, not {v!r:.40}")

        number("temperature", self.temperature)
        number("top-k", self.top_k, integer=True)
        number("top-p", self.top_p)
        number("min-p", self.min_p)
        number("repeat penalty", self.repeat_penalty)
        number("repeat-last-n", self.repeat_last_n, integer=True)
        if self.temperature < 0:
            raise EdgeqError("temperature must be >= 0")
        if self.top_k < 0:
            raise EdgeqError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EdgeqError("top-p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise EdgeqError("min-p must be in [0, 1)")
        if self.repeat_penalty <= 0:
            raise EdgeqError("repeat penalty must be > 0")
        if self.repeat_last_n < 0:
            raise EdgeqError("repeat-last-n must be >= 0")
        if self.seed is not None:
            number("seed", self.seed, integer=True)
            if self.seed < 0:
                raise EdgeqError("seed must be >= 0")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and history:
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        if 0 < p.top_k <= FAST_TOP_K and logits.ndim == 1 and p.top_k < logits.shape[0]:
            # the chain below in one kernel call (cpu_kernels/ops.sample_top_k, this numpy code its twin): a
            # server's decode step samples a row per sequence: ~130 us each in numpy calls there, ~43 in the kernel
            tok = sample_top_k(np.ascontiguousarray(logits), int(p.top_k), float(p.top_p), float(p.min_p),
                               float(p.temperature), self.rng.random())  # one signature: compiled once
            if tok >= 0:
                return int(tok)
        return self.numpy_draw(logits)

    def numpy_draw(self, logits: np.ndarray) -> int:
        """The chain after the penalties in numpy (top_k 0 or large; non-finite logits; ops.sample_top_k's twin)."""
        p = self.p
        # candidates sorted by logit, best first
        k = p.top_k if 0 < p.top_k < logits.shape[0] else logits.shape[0]
        idx = _top_k_indices(logits, k) if k < logits.shape[0] else np.arange(logits.shape[0])
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        cand = logits[idx].astype(np.float64)
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, cand, probs = idx[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            idx, cand = idx[keep], cand[keep]
        scaled = (cand - cand[0]) / p.temperature
        w = np.exp(scaled)
        w /= w.sum()
        return int(idx[self.rng.choice(len(idx), p=w)])


def _top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits (unordered). For large vocabularies a max-pooled prefilter first: k
    pools have a maximum >= the k-th largest pool maximum m, so at least k logits are >= m, hence every
    one of the top k is >= m too and survives the filter `logits >= m` (a few hundred candidates).
    Any partition into pools will do: pool j is every (n / _POOL)-th logit from j, so the maxima are _POOL
    element-wise maxima of contiguous rows (20 us for 262144 logits; contiguous pools of 64, a reduction along
    numpy's short inner axis, took 290 us)."""
    n = logits.shape[0]
    if n % _POOL or n < 8 * _POOL * k:
        return np.argpartition(-logits, k - 1)[:k]
    pooled = logits.reshape(_POOL, -1).max(axis=0)
    m = np.partition(pooled, pooled.size - k)[pooled.size - k]
    cand = np.flatnonzero(logits >= m)
    return cand[np.argpartition(-logits[cand], k - 1)[:k]]
