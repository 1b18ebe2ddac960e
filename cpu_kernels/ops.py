"""Numba kernels for everything in a transformer layer except the matrix products.

Each kernel is a small pure function over float32 arrays; numpy twins live in tests/test_ops.py.
Python wrappers check shapes and dtypes before a kernel runs (Numba does no bounds checks).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .half import _bits_f32  # int32 bits -> float32 (a bitcast)

_JIT = dict(cache=True, fastmath=True, nogil=True)


# ---------------------------------------------------------------- exp that vectorizes
LOG2E = 1.4426950408889634
# exp2 of the fraction, Horner's coefficients from the highest power (also simd_attention._exp32's, in vector IR)
EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
             2.402264791363012e-1, 6.931472028550421e-1, 1.0)


@njit(inline="always", **_JIT)
def fast_exp(x):
    """exp(x) for float32, relative error ~2e-7 near 0 (|x| * 6e-8 from rounding x * log2 e): Cephes' exp2f,
    2^n from the exponent bits times a polynomial of the fraction. math.exp is a scalar libm call in Numba
    (no SVML), 10-20x slower in the activation loops; this one vectorizes. x is clamped to [-86.6, 88]
    (results 2^-125 .. 2^127: no inf or subnormal, which fastmath assumes away)."""
    y = min(max(x * np.float32(LOG2E), np.float32(-125.0)), np.float32(127.0))
    n = np.floor(y + np.float32(0.5))
    f = y - n
    p = np.float32(EXP2_POLY[0])
    p = p * f + np.float32(EXP2_POLY[1])
    p = p * f + np.float32(EXP2_POLY[2])
    p = p * f + np.float32(EXP2_POLY[3])
    p = p * f + np.float32(EXP2_POLY[4])
    p = p * f + np.float32(EXP2_POLY[5])
    p = p * f + np.float32(EXP2_POLY[6])
    return p * _bits_f32((np.int32(n) + np.int32(127)) << np.int32(23))


# Each op: a row function and a parallel driver over rows; RMSNorm, RoPE and the gated activations (in place) also
# have a serial driver for a few rows (decode, a decode batch), where starting a parallel region (~3 us, far more
# when the cores are shared) costs more than the rows' work. Both drivers compute each row the same way.
SERIAL_ROWS = 16
# ---------------------------------------------------------------- RMSNorm
@njit(**_JIT)
def _rmsnorm_row(x, w, eps, out, r):
    n = x.shape[1]
    ss = np.float32(0.0)
    for i in range(n):
        ss += x[r, i] * x[r, i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[r, i] = x[r, i] * inv * w[i]


@njit(parallel=True, **_JIT)
def _rmsnorm(x, w, eps, out):
    for r in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, r)


@njit(**_JIT)
def _rmsnorm_serial(x, w, eps, out):
    for r in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, r)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis of x (any leading shape); w has the last axis' length."""
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"rmsnorm: x last dim {x.shape[-1]} != weight {w.shape[0]}")
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    o2 = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    kernel = _rmsnorm if x2.shape[0] > SERIAL_ROWS else _rmsnorm_serial
    kernel(x2, np.ascontiguousarray(w, dtype=np.float32), np.float32(eps), o2)
    return o2.reshape(x.shape)


@njit(**_JIT)
def _add_rmsnorm_row(x, o, w, eps, out, r):
    for i in range(x.shape[1]):
        x[r, i] += o[r, i]
    _rmsnorm_row(x, w, eps, out, r)


@njit(parallel=True, **_JIT)
def _add_rmsnorm(x, o, w, eps, out):
    for r in prange(x.shape[0]):
        _add_rmsnorm_row(x, o, w, eps, out, r)


@njit(**_JIT)
def _add_rmsnorm_serial(x, o, w, eps, out):
    for r in range(x.shape[0]):
        _add_rmsnorm_row(x, o, w, eps, out, r)


def add_rmsnorm(x: np.ndarray, o: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x += o in place (a residual), then RMSNorm(x) as a new array: one kernel call for the two where x is a
    C-contiguous float32 (T, n) array (else numpy's add, then `rmsnorm`)."""
    if x.ndim != 2 or o.shape != x.shape or w.shape != (x.shape[1],):
        raise ValueError(f"add_rmsnorm: x {x.shape}, o {o.shape}, weight {w.shape} do not match")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x += o
        return rmsnorm(x, w, eps)
    out = np.empty_like(x)
    (_add_rmsnorm if x.shape[0] > SERIAL_ROWS else _add_rmsnorm_serial)(
        x, np.ascontiguousarray(o, dtype=np.float32), np.ascontiguousarray(w, dtype=np.float32), np.float32(eps), out)
    return out


# ---------------------------------------------------------------- RoPE
@njit(**_JIT)
def _rope_row(x, positions, inv_freq, neox, t):
    # x: (T, H, D), row t rotated in place over the first 2*len(inv_freq) dims of each head.
    H = x.shape[1]
    half = inv_freq.shape[0]
    p = np.float32(positions[t])
    for i in range(half):
        ang = p * inv_freq[i]
        c = np.float32(math.cos(ang))
        s = np.float32(math.sin(ang))
        for h in range(H):
            if neox:
                a = x[t, h, i]
                b = x[t, h, i + half]
                x[t, h, i] = a * c - b * s
                x[t, h, i + half] = a * s + b * c
            else:
                a = x[t, h, 2 * i]
                b = x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = a * c - b * s
                x[t, h, 2 * i + 1] = a * s + b * c


@njit(parallel=True, **_JIT)
def _rope(x, positions, inv_freq, neox):
    for t in prange(x.shape[0]):
        _rope_row(x, positions, inv_freq, neox, t)


@njit(**_JIT)
def _rope_serial(x, positions, inv_freq, neox):
    for t in range(x.shape[0]):
        _rope_row(x, positions, inv_freq, neox, t)


def rope_inv_freq(n_rot: int, base: float, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """theta_i = base^(-2i/n_rot), divided by per-frequency factors when the model has them (Llama 3)."""
    inv = 1.0 / (base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot))
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    return inv.astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x (T, H, D) in place. neox=False pairs (2i, 2i+1) (llama.cpp's normal mode, used with the
    converter's Q/K permutation); neox=True pairs (i, i + n_rot/2) (Qwen2, Gemma)."""
    if x.ndim != 3 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("rope: x must be a contiguous float32 (T, H, D) array")
    if 2 * inv_freq.shape[0] > x.shape[2] or positions.shape[0] != x.shape[0]:
        raise ValueError("rope: rotation width or positions do not match x")
    (_rope if x.shape[0] > SERIAL_ROWS else _rope_serial)(x, positions.astype(np.int64), inv_freq, neox)
    return x


# ---------------------------------------------------------------- Q/K head norms and RoPE in one call
# A decode token's queries and keys take one kernel call here instead of two RMSNorms and two RoPEs (Qwen3, Gemma 3)
# or two RoPEs (Llama, Qwen2): each call from Python costs microseconds, and many more after a matrix product has
# streamed its weights through the caches (the interpreter's code and data then come from L3).
@njit(**_JIT)
def _qk_row(q, k, qw, kw, eps, norm, positions, inv_freq, neox, t):
    if norm:  # each head's RMSNorm in place: _rmsnorm_row reads a row before it writes it
        for h in range(q.shape[1]):
            _rmsnorm_row(q[t], qw, eps, q[t], h)
        for h in range(k.shape[1]):
            _rmsnorm_row(k[t], kw, eps, k[t], h)
    if inv_freq.shape[0]:
        _rope_row(q, positions, inv_freq, neox, t)
        _rope_row(k, positions, inv_freq, neox, t)


@njit(parallel=True, **_JIT)
def _qk(q, k, qw, kw, eps, norm, positions, inv_freq, neox):
    for t in prange(q.shape[0]):
        _qk_row(q, k, qw, kw, eps, norm, positions, inv_freq, neox, t)


@njit(**_JIT)
def _qk_serial(q, k, qw, kw, eps, norm, positions, inv_freq, neox):
    for t in range(q.shape[0]):
        _qk_row(q, k, qw, kw, eps, norm, positions, inv_freq, neox, t)


_NO_FREQ = np.zeros(0, np.float32)


def qk_norm_rope(q: np.ndarray, k: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray | None, neox: bool,
                 q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None, eps: float = 0.0):
    """Queries q (T, H, D) and keys k (T, Hkv, D): each head RMSNorm'd with q_norm / k_norm (both or neither), then
    rotated by `rope` (inv_freq None: no rotation); in place where q and k are C-contiguous float32, else on
    copies. Returns (q, k). The same row functions as `rmsnorm` and `rope`, in one kernel call (equal to them within
    float32 rounding: fastmath may order a norm's sum of squares differently in another compiled kernel)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    if q.ndim != 3 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"qk_norm_rope: q {q.shape} and k {k.shape} are not (T, H, D) and (T, Hkv, D)")
    norm = q_norm is not None
    if norm and (k_norm is None or q_norm.shape != (q.shape[2],) or k_norm.shape != (q.shape[2],)):
        raise ValueError(f"qk_norm_rope: q/k norm weights must both have the head size {q.shape[2]}")
    freq = _NO_FREQ if inv_freq is None else inv_freq
    if 2 * freq.shape[0] > q.shape[2] or (inv_freq is not None and positions.shape[0] != q.shape[0]):
        raise ValueError("qk_norm_rope: rotation width or positions do not match q")
    w_q = np.ascontiguousarray(q_norm, dtype=np.float32) if norm else _NO_FREQ
    w_k = np.ascontiguousarray(k_norm, dtype=np.float32) if norm else _NO_FREQ
    (_qk if q.shape[0] > SERIAL_ROWS else _qk_serial)(q, k, w_q, w_k, np.float32(eps), norm,
                                                      positions.astype(np.int64, copy=False), freq, neox)
    return q, k


# ---------------------------------------------------------------- attention
@njit(parallel=True, **_JIT)
def _attention(q, kc, vc, pos0, scale, window, out):
    # q: (T, H, D); kc/vc: (H_kv, ctx, D) holding positions 0..pos0+T-1; out: (T, H, D).
    T, H, D = q.shape
    n_rep = H // kc.shape[0]
    for job in prange(T * H):
        t = job // H
        h = job - t * H
        g = h // n_rep
        p = pos0 + t
        start = 0
        if window > 0 and p - window + 1 > 0:
            start = p - window + 1
        n = p + 1 - start
        scores = np.empty(n, dtype=np.float32)
        m = np.float32(-np.inf)
        for j in range(n):
            s = np.float32(0.0)
            for d in range(D):
                s += q[t, h, d] * kc[g, start + j, d]
            s *= scale
            scores[j] = s
            if s > m:
                m = s
        total = np.float32(0.0)
        for j in range(n):
            e = np.float32(math.exp(scores[j] - m))
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(D):
            out[t, h, d] = 0.0
        for j in range(n):
            wj = scores[j] * inv
            for d in range(D):
                out[t, h, d] += wj * vc[g, start + j, d]


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float,
              window: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Causal attention of T new queries at positions pos0.. over cached keys/values 0..pos0+T-1.

    Grouped-query: head h reads kv head h // (H / H_kv). window > 0 limits each query to the last
    `window` positions (sliding-window layers)."""
    T, H, D = q.shape
    n_kv, ctx, dk = k_cache.shape
    if dk != D or v_cache.shape != k_cache.shape or H % n_kv != 0:
        raise ValueError("attention: q/k/v shapes do not match")
    if pos0 < 0 or pos0 + T > ctx:
        raise ValueError(f"attention: positions {pos0}..{pos0 + T} outside the cache ({ctx})")
    if out is None:
        out = np.empty((T, H, D), dtype=np.float32)
    _attention(q, k_cache, v_cache, pos0, np.float32(scale), window, out)
    return out


# ---------------------------------------------------------------- activations
@njit(inline="always", **_JIT)
def _silu(a):
    return a / (np.float32(1.0) + fast_exp(-a))


@njit(inline="always", **_JIT)
def _gelu(a):
    # GELU, tanh approximation (gelu_pytorch_tanh), as Gemma uses:
    # 0.5 a (1 + tanh(z)) = a / (1 + exp(-2z)), z = sqrt(2/pi) (a + 0.044715 a^3)
    c2 = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
    return a / (np.float32(1.0) + fast_exp(c2 * (a + np.float32(0.044715) * a * a * a)))


@njit(**_JIT)
def _silu_row(g, u, out, r):
    for i in range(g.shape[1]):
        out[r, i] = _silu(g[r, i]) * u[r, i]


@njit(**_JIT)
def _gelu_row(g, u, out, r):
    for i in range(g.shape[1]):
        out[r, i] = _gelu(g[r, i]) * u[r, i]


@njit(parallel=True, **_JIT)
def _silu_mul(g, u, out):
    for r in prange(g.shape[0]):
        _silu_row(g, u, out, r)


@njit(parallel=True, **_JIT)
def _gelu_mul(g, u, out):
    for r in prange(g.shape[0]):
        _gelu_row(g, u, out, r)


# In place (out is g) through drivers whose loads and stores name one array: passed to the row function as a
# separate `out`, g's own memory fails the vectorized loop's runtime overlap check and every element takes the
# scalar loop (10x slower). The same values as the drivers above (a row's scalar tail past the vector lanes may
# round its last bit otherwise).
@njit(parallel=True, **_JIT)
def _silu_mul_in_place(g, u):
    for r in prange(g.shape[0]):
        for i in range(g.shape[1]):
            g[r, i] = _silu(g[r, i]) * u[r, i]


@njit(parallel=True, **_JIT)
def _gelu_mul_in_place(g, u):
    for r in prange(g.shape[0]):
        for i in range(g.shape[1]):
            g[r, i] = _gelu(g[r, i]) * u[r, i]


# serial drivers of the same loops for a decode step's few rows (prange splits rows, so one row never had a second
# thread), compiled without a parallel loop's gufunc: 0.9 s less of a first run before its first token. Numpy's
# error model, as the parallel loops' gufuncs have: Python's checks every division for zero, which keeps the loop
# scalar (3.9 ns an element against 0.5-0.6 vectorized, one thread, 8 x 1536); the same bits as the parallel drivers
# (tests/test_ops.py)
@njit(error_model="numpy", **_JIT)
def _silu_mul_in_place_serial(g, u):
    for r in range(g.shape[0]):
        for i in range(g.shape[1]):
            g[r, i] = _silu(g[r, i]) * u[r, i]


@njit(error_model="numpy", **_JIT)
def _gelu_mul_in_place_serial(g, u):
    for r in range(g.shape[0]):
        for i in range(g.shape[1]):
            g[r, i] = _gelu(g[r, i]) * u[r, i]


_IN_PLACE_SERIAL = {_silu_mul_in_place: _silu_mul_in_place_serial, _gelu_mul_in_place: _gelu_mul_in_place_serial}


def _gated(kernel, in_place, g, u, out):
    if g.shape != u.shape:
        raise ValueError("gate and up shapes differ")
    u2 = np.ascontiguousarray(u, dtype=np.float32).reshape(-1, g.shape[-1])
    if out is g and g.dtype == np.float32 and g.flags.c_contiguous and g.flags.writeable:
        (in_place if u2.shape[0] > SERIAL_ROWS else _IN_PLACE_SERIAL[in_place])(g.reshape(u2.shape), u2)
        return g
    g2 = np.ascontiguousarray(g, dtype=np.float32).reshape(u2.shape)
    if out is None or out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != g.shape:
        out = np.empty(g.shape, np.float32)
    kernel(g2, u2, out.reshape(g2.shape))
    return out


def silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """SwiGLU: silu(g) * u, into `out` when it is a C-contiguous float32 array of g's shape (g itself: a prompt's
    (T, n_ff) buffer less at the peak), else into a new array."""
    return _gated(_silu_mul, _silu_mul_in_place, g, u, out)


def gelu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """GeGLU: gelu_tanh(g) * u, into `out` as silu_mul."""
    return _gated(_gelu_mul, _gelu_mul_in_place, g, u, out)


# ---------------------------------------------------------------- softmax
@njit(**_JIT)
def _softmax(x, out):
    rows, n = x.shape
    for r in range(rows):
        m = x[r, 0]
        for i in range(1, n):
            if x[r, i] > m:
                m = x[r, i]
        s = np.float32(0.0)
        for i in range(n):
            e = np.float32(math.exp(x[r, i] - m))
            out[r, i] = e
            s += e
        inv = np.float32(1.0) / s
        for i in range(n):
            out[r, i] *= inv


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(x2)
    _softmax(x2, out)
    return out.reshape(x.shape)


# ---------------------------------------------------------------- sampling: top-k, top-p, min-p, temperature, draw
TOP_K_POOL = 64  # the top-k prefilter's pools, here and in its numpy twin (runtime/sampling._top_k_indices)


@njit(inline="always", cache=True, nogil=True)
def _insert_top(vals, ids, cnt, k, v, i):
    """Insert (v, i) into vals/ids[:cnt], ordered by value (largest first) then index (lowest first), keeping at
    most k; -> the new count."""
    if cnt == k and not (v > vals[k - 1] or (v == vals[k - 1] and i < ids[k - 1])):
        return cnt
    j = min(cnt, k - 1)
    while j > 0 and (v > vals[j - 1] or (v == vals[j - 1] and i < ids[j - 1])):
        vals[j] = vals[j - 1]
        ids[j] = ids[j - 1]
        j -= 1
    vals[j] = v
    ids[j] = i
    return min(cnt + 1, k)


@njit(cache=True, nogil=True)
def sample_top_k(logits, k, top_p, min_p, temperature, u):
    """One draw of runtime/sampling.Sampler's chain after the penalties, in one call: the k largest logits, best
    first (ties by index), then top-p, min-p, temperature and the draw by the uniform number u (numpy's
    Generator.choice with p: the cumulative weights over their total, the first one > u). 0 < k < len(logits).
    Large vocabularies take a max-pooled prefilter (as `_top_k_indices`): the k-th largest of 64-strided pools'
    maxima bounds the k-th largest logit from below, so only the pools reaching it are scanned. Plain loops only
    (numpy's sort, partition and searchsorted would add seconds to a first run's compile). Returns the token, or
    -1 when a kept logit is NaN or the best is not finite (the caller's numpy path decides those). No fastmath:
    NaN and inf compare as numpy's do."""
    n = logits.shape[0]
    vals = np.empty(k, np.float32)
    ids = np.empty(k, np.int64)
    cnt = 0
    if n % TOP_K_POOL == 0 and n >= 8 * TOP_K_POOL * k:
        w = n // TOP_K_POOL
        pooled = logits[:w].copy()
        for j in range(1, TOP_K_POOL):
            row = logits[j * w:(j + 1) * w]
            for i in range(w):
                if row[i] > pooled[i]:
                    pooled[i] = row[i]
        for i in range(w):  # the k largest pool maxima; m: the k-th
            cnt = _insert_top(vals, ids, cnt, k, pooled[i], i)
        m = vals[k - 1]
        cnt = 0
        for i in range(w):
            if pooled[i] >= m:
                for j in range(TOP_K_POOL):
                    v = logits[j * w + i]
                    if v >= m:
                        cnt = _insert_top(vals, ids, cnt, k, v, j * w + i)
    else:
        for i in range(n):
            cnt = _insert_top(vals, ids, cnt, k, logits[i], i)
    c0 = np.float64(vals[0])
    if c0 != c0 or c0 == np.inf or c0 == -np.inf:
        return -1
    probs = np.empty(cnt, np.float64)
    tot = 0.0
    for i in range(cnt):
        if vals[i] != vals[i]:
            return -1
        probs[i] = math.exp(np.float64(vals[i]) - c0)
        tot += probs[i]
    keep = cnt
    if top_p < 1.0:
        cum = 0.0
        for i in range(cnt):
            cum += probs[i] / tot
            if cum >= top_p:
                keep = i + 1
                break
    if min_p > 0.0:
        lim = min_p * (probs[0] / tot)
        j = 0
        while j < keep and probs[j] / tot >= lim:
            j += 1
        keep = j
    wts = np.empty(keep, np.float64)
    tot = 0.0
    for i in range(keep):
        wts[i] = math.exp((np.float64(vals[i]) - c0) / temperature)
        tot += wts[i]
    cum = 0.0
    for i in range(keep):  # cumulative weights over their total, then over the last (numpy's choice)
        cum += wts[i] / tot
        wts[i] = cum
    for i in range(keep):
        if wts[i] / wts[keep - 1] > u:
            return ids[i]
    return ids[keep - 1]
