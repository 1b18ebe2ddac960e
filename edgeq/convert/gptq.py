"""GPTQ into fixed quantization grids: error-compensating rounding for the k-quants (and the 32-value and IQ4
types), with the block scales a standard quantizer chose.

A matrix W (rows, n_in) sees inputs X (tokens, n_in); its output error is ‖(W−Q)Xᵀ‖² = tr((W−Q) H (W−Q)ᵀ)
with H = XᵀX. The importance search (quants.quantize with importance = diag(H)/tokens, llama.cpp's imatrix)
fixes every block's scale fields; GPTQ then re-chooses the level of each weight column by column, pushing
each column's rounding error onto the columns not yet quantized through H⁻¹ (Frantar et al. 2022, the
lazy-batch Cholesky form), so later roundings undo earlier ones as far as the inputs' correlations allow.
"Rounding" is the nearest point of that block's grid (formats/quant_grid.py): the bytes keep the GGUF layout.

`Hessians` is the calibration observer that accumulates H per distinct input (q/k/v share one, gate/up
one), split into fitting windows and held-out windows; `choose` keeps, per matrix, whichever method gives
the lower output error on the held-out windows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgeq.cpu_kernels.gptq import gptq_batch
from edgeq.formats import quant_grid
from edgeq.formats.quants import quantize

DAMP = 0.01             # λ = DAMP · mean(diag H), as in GPTQ: keeps H invertible and the updates bounded
BLOCK = 32              # lazy-batch width: columns updated together before the trailing rank-B update (32-128
                        # cost the same flops; 32 keeps the per-column update in cache)
MAX_HESSIAN_COLS = 4096  # wider inputs (a 1.7B's ffn_down) get no Hessian: GPTQ costs rows·n_in² flops
ROW_CHUNK = 8192        # rows per GPTQ pass and per output-error pass: bounds the work arrays of huge matrices
FACTORS_KEPT = 8        # Hessians.factor_of's memory: one layer's (3 inputs x fit/all, AWQ's scaled ones)
SLAB_BYTES = 256 << 20  # float32 rows quantized at a time by calibrated_quantize (bounds a classifier's copy)
CHOICE_ROWS = 512       # rows on which 'best' compares GPTQ with the importance search (strided_rows)
CACHE_ROWS = 512        # rows per column sweep: each lazy batch's trailing update rewrites the rows' remaining
                        # columns, which stay in cache at this size (6144 x 2048 Q4_K: 1.97 s in one sweep, 0.88 s
                        # in sweeps of 512 rows, 1.16 s of 256: too few rows per parallel task)


@dataclass
class Hessians:
    """Observer: H = Σ xᵀx (float32) per distinct input, fitting and held-out windows kept apart."""

    fit: dict[str, np.ndarray] = field(default_factory=dict)     # input key → (n_in, n_in)
    held: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)   # input key → [fit tokens, held-out tokens]
    key_of: dict[str, str] = field(default_factory=dict)         # matrix name → input key
    held_out: bool = False                                       # set by imatrix.collect per window
    _last_x: object = None
    _factors: dict = field(default_factory=dict)                 # (input key, windows) → factor()
    _by_content: dict = field(default_factory=dict)              # factor_of's, by the Hessian's bytes
    _last_key: str = ""

    def __call__(self, name: str, x: np.ndarray) -> None:
        if x is self._last_x:   # q/k/v (gate/up) are handed the same array: one Hessian for the group
            self.key_of.setdefault(name, self._last_key)
            return
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        key = self.key_of.setdefault(name, name)
        self._last_x, self._last_key = x, key
        if x2.shape[1] > MAX_HESSIAN_COLS:
            return
        part = self.held if self.held_out else self.fit
        h = x2.T @ x2
        if key in part:
            part[key] += h
        else:
            part[key] = h
            self.fit.setdefault(key, np.zeros_like(h))
            self.held.setdefault(key, np.zeros_like(h))
        self.tokens.setdefault(key, [0, 0])[int(self.held_out)] += x2.shape[0]

    def get(self, name: str, which: str = "all") -> np.ndarray | None:
        """float64 H of matrix `name`: 'fit', 'held' or 'all' windows; None when not collected."""
        key = self.key_of.get(name)
        if key is None or key not in self.fit:
            return None
        if which == "fit":
            return self.fit[key].astype(np.float64)
        if which == "held":
            return self.held[key].astype(np.float64)
        return self.fit[key].astype(np.float64) + self.held[key]

    def factor(self, name: str, which: str = "all") -> tuple[np.ndarray, np.ndarray]:
        """regrid's (U, perm) for H of `name` ('fit' or 'all' windows), computed once per input: the matrices
        that share an input (q/k/v, gate/up) share it, and the O(n_in³) factorization is not redone."""
        key = (self.key_of[name], which)
        if key not in self._factors:
            self._factors[key] = self.factor_of(self.get(name, which))
        return self._factors[key]

    def factor_of(self, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """regrid's (U, perm) for any Hessian (one of these, or one scaled from it by AWQ), remembered by content
        for the last FACTORS_KEPT asked: AWQ's search factors the scaled H of the α it then folds, which the
        folded matrices' GPTQ asks for again (and α = 0's is the collected H's own)."""
        import hashlib

        H = np.ascontiguousarray(H)
        key = (H.shape, H.dtype.str, hashlib.blake2b(H.view(np.uint8), digest_size=16).digest())
        if key in self._by_content:
            self._by_content[key] = self._by_content.pop(key)   # most recent last
        else:
            self._by_content[key] = _factor(H, DAMP, True, np.float32)
            while len(self._by_content) > FACTORS_KEPT:
                del self._by_content[next(iter(self._by_content))]
        return self._by_content[key]

    def clear(self) -> None:
        """Free every matrix held (a finished layer's)."""
        self.fit.clear(), self.held.clear(), self._factors.clear(), self._by_content.clear()

    def has(self, name: str) -> bool:
        key = self.key_of.get(name)
        return key is not None and key in self.fit

    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.fit.values()) + sum(h.nbytes for h in self.held.values())

    def has_held_out(self, name: str) -> bool:
        key = self.key_of.get(name)
        return key is not None and self.tokens.get(key, [0, 0])[1] > 0 and self.tokens[key][0] > 0


def output_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W−Q) H (W−Q)ᵀ) = ‖(W−Q)Xᵀ‖² for H = XᵀX (ROW_CHUNK rows at a time). The (rows x n) @ (n x n) product
    runs in H's precision (a float32 H: half the cost, for searches that only rank errors); the sum in float64."""
    total = 0.0
    for r0 in range(0, W.shape[0], ROW_CHUNK):
        D = (np.asarray(W[r0:r0 + ROW_CHUNK], np.float64) - Q[r0:r0 + ROW_CHUNK]).astype(H.dtype, copy=False)
        total += float(np.einsum("ij,ij->", D @ H, D, dtype=np.float64))
    return total


def _damped(H: np.ndarray, damp: float) -> np.ndarray:
    H = np.array(H, dtype=np.float64)
    diag = np.diagonal(H)
    mean = float(diag.mean()) if diag.size else 0.0
    H[np.diag_indices_from(H)] += damp * mean if mean > 0 else 1.0
    dead = np.diagonal(H) <= 0   # a column no input ever reached: any rounding is free
    H[dead, dead] = 1.0
    return H


def gptq_reference(W: np.ndarray, H: np.ndarray, round_col, damp: float = DAMP) -> np.ndarray:
    """Plain GPTQ, one column at a time over the whole row (no lazy batch, no reordering), float64.

    round_col(j, w) → the grid values nearest to column j's weights w (rows,). Returns Q (rows, n_in)."""
    W = np.array(W, dtype=np.float64)
    U = np.linalg.cholesky(np.linalg.inv(_damped(H, damp))).T   # H⁻¹ = UᵀU, U upper
    Q = np.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = round_col(j, W[:, j])
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    return Q


def _factor(H: np.ndarray, damp: float, act_order: bool, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(U, perm): the column order (decreasing diag(H) with act order) and the upper Cholesky factor of the
    damped, permuted H⁻¹ (H⁻¹ = UᵀU), computed in float64, returned in `dtype`.

    Without forming H⁻¹ (gptq_reference's cholesky(inv(H)): 3n³ flops): with J the order reversal, JHJ = LLᵀ
    gives H = VVᵀ for the upper V = JLJ, so H⁻¹ = V⁻ᵀV⁻¹ and U = V⁻¹ = J L⁻¹ J (Cholesky factors with a
    positive diagonal are unique): one Cholesky and one triangular inverse, 2n³/3 flops."""
    n = H.shape[0]
    perm = np.argsort(-np.diagonal(H), kind="stable") if act_order else np.arange(n)
    Hp = _damped(H, damp)[np.ix_(perm, perm)]
    L = np.linalg.cholesky(Hp[::-1, ::-1])
    return np.ascontiguousarray(lower_inverse(L)[::-1, ::-1], dtype=dtype), perm


def lower_inverse(L: np.ndarray, leaf: int = 128) -> np.ndarray:
    """L⁻¹ of a lower-triangular L (numpy has no trtri): [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]],
    halves recursively, the off-diagonal blocks by matrix products (n³/3 flops)."""
    n = L.shape[0]
    if n <= leaf:
        return np.tril(np.linalg.inv(L))
    h = n // 2
    out = np.zeros_like(L)
    Ai, Ci = lower_inverse(L[:h, :h], leaf), lower_inverse(L[h:, h:], leaf)
    out[:h, :h], out[h:, h:] = Ai, Ci
    out[h:, :h] = -(Ci @ (L[h:, :h] @ Ai))
    return out


def gptq_levels(W: np.ndarray, H: np.ndarray, a: np.ndarray, b: np.ndarray, levels: np.ndarray,
                damp: float = DAMP, block: int | None = None, act_order: bool = True,
                dtype=np.float32) -> np.ndarray:
    """The fast path: level indices k (rows, n_in) on the grids a·levels[k] + b, lazy-batch GPTQ, columns
    in decreasing diag(H) (act order: the most used inputs are rounded first, while all others can still
    absorb their error).

    H⁻¹'s Cholesky factor is computed in float64 once; the column updates run in `dtype` (float32 as in
    GPTQ's own code: half the memory and twice the GEMM speed of float64) over ROW_CHUNK rows at a time
    (rows are independent given H)."""
    U, perm = _factor(H, damp, act_order, dtype)
    lev = levels.astype(dtype)
    out = np.empty(W.shape, dtype=np.int16)
    for r0 in range(0, W.shape[0], ROW_CHUNK):
        r1 = r0 + ROW_CHUNK
        out[r0:r1] = _gptq_rows(W[r0:r1], a[r0:r1], b[r0:r1], U, perm, lev, levels, block or BLOCK, dtype)
    return out


def regrid(W: np.ndarray, H: np.ndarray | None, raw: np.ndarray, qtype: str, act_order: bool = True,
           damp: float = DAMP, factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The bytes `raw` (rows, row_bytes) of W with every level re-chosen by GPTQ, block scales kept; decoded
    and encoded ROW_CHUNK rows at a time, so a 262k-row classifier never has all its grids in memory.
    `factor`: H's (U, perm) when already computed (Hessians.factor), H is then not read."""
    U, perm = factor if factor is not None else _factor(H, damp, act_order, np.float32)
    levels = quant_grid.LEVELS[qtype]
    lev = levels.astype(np.float32)
    out = np.empty_like(raw)
    for r0 in range(0, W.shape[0], ROW_CHUNK):
        r1 = r0 + ROW_CHUNK
        _, a, b = quant_grid.decode(raw[r0:r1], qtype, W.shape[1])
        k = _gptq_rows(W[r0:r1], a, b, U, perm, lev, levels, BLOCK, np.float32)
        out[r0:r1] = quant_grid.encode(raw[r0:r1], qtype, k)
    return out


def _gptq_rows(W, a, b, U, perm, lev, levels, block, dtype) -> np.ndarray:
    """Level indices (rows, n_in) of W's rows on their grids, CACHE_ROWS rows at a time."""
    if W.shape[0] <= CACHE_ROWS:
        return _gptq_cached_rows(W, a, b, U, perm, lev, levels, block, dtype)
    out = np.empty(W.shape, dtype=np.int16)
    for r0 in range(0, W.shape[0], CACHE_ROWS):
        r1 = r0 + CACHE_ROWS
        out[r0:r1] = _gptq_cached_rows(W[r0:r1], a[r0:r1], b[r0:r1], U, perm, lev, levels, block, dtype)
    return out


def _gptq_cached_rows(W, a, b, U, perm, lev, levels, block, dtype) -> np.ndarray:
    n = W.shape[1]
    # column-major work arrays (one input column = one contiguous row): the column loop touches whole rows
    Wt = np.array(W.T[perm], dtype=dtype)
    at, bt = np.ascontiguousarray(a.T[perm]), np.ascontiguousarray(b.T[perm])
    K = np.empty(Wt.shape, dtype=np.int16)
    mid = (levels[1:] + levels[:-1]) * np.float32(0.5)   # quant_grid.nearest's decision points
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        E1 = np.empty((i2 - i1, Wt.shape[1]), dtype=dtype)
        gptq_batch(Wt, at, bt, np.ascontiguousarray(U[i1:i2, i1:i2]), lev, mid, K, E1, i1)   # the column loop
        Wt[i2:] -= U[i1:i2, i2:].T @ E1     # the trailing rank-B update: one GEMM per lazy batch
    out = np.empty_like(K)
    out[perm] = K
    return out.T


def quantize_gptq(W: np.ndarray, qtype: str, H: np.ndarray, importance: np.ndarray | None = None,
                  act_order: bool = True, factor_of=None) -> np.ndarray:
    """Bytes (rows, row_bytes) of `qtype`: block scales from the importance search, levels by GPTQ.
    `factor_of(H)`: where H's factor comes from (e.g. Hessians.factor_of, which remembers it); computed here
    otherwise. Types without a level grid: the importance search alone."""
    raw = quantize(W, qtype, importance)
    if qtype not in quant_grid.GRID_TYPES:
        return raw
    return regrid(W, H, raw, qtype, act_order, factor=factor_of(H) if factor_of is not None else None)


def importance_of(H: np.ndarray, n_tokens: int) -> np.ndarray:
    """llama.cpp's imatrix entry (mean x² per input column) from H."""
    return (np.diagonal(H) / max(n_tokens, 1)).astype(np.float32)


def strided_rows(n: int, limit: int) -> slice | np.ndarray:
    """At most `limit` of n rows, evenly strided (first and last included): a sample of rows that estimates a
    matrix's summed output error (rows are independent given H)."""
    return slice(None) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)


@dataclass
class Choice:
    method: str
    errors: dict[str, float]   # method → held-out output error relative to ‖W Xᵀ‖²


def relative_errors(W: np.ndarray, candidates: dict[str, np.ndarray], qtype: str, H: np.ndarray) -> dict[str, float]:
    """Output error of each candidate's bytes against W, relative to ‖W Xᵀ‖²: ROW_CHUNK rows dequantized at a
    time, the reference computed once, the products in float32 (summed in float64): the candidates differ by
    percents, far above float32's rounding."""
    from edgeq.formats.quants import dequantize

    H32 = np.asarray(H, dtype=np.float32)
    errors, ref = dict.fromkeys(candidates, 0.0), 0.0
    for r0 in range(0, W.shape[0], ROW_CHUNK):
        w = np.asarray(W[r0:r0 + ROW_CHUNK], dtype=np.float32)
        ref += float(np.einsum("ij,ij->", w @ H32, w, dtype=np.float64))
        for method, raw in candidates.items():
            D = w - dequantize(raw[r0:r0 + ROW_CHUNK], qtype, w.shape)
            errors[method] += float(np.einsum("ij,ij->", D @ H32, D, dtype=np.float64))
    return {method: e / max(ref, 1e-30) for method, e in errors.items()}


class LazyRows:
    """A matrix read a slab of rows at a time: `rows(index)` (a slice or an index array) → float32 rows.
    calibrated_quantize then never holds it whole as float32 (a 151936 x 2048 classifier is 1.24 GB)."""

    def __init__(self, shape: tuple[int, int], rows: Callable[[Any], np.ndarray]):
        self.shape = tuple(int(s) for s in shape)
        self.rows = rows

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.rows(index), dtype=np.float32)


def _by_slabs(W, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """make(rows) over W (an array or LazyRows) SLAB_BYTES of float32 rows at a time, stacked (rows are
    independent: the same bytes as one call on the whole matrix)."""
    n_rows, n_in = W.shape
    step = max(1, SLAB_BYTES // (4 * max(n_in, 1)))
    if isinstance(W, np.ndarray) and n_rows <= step:
        return make(W)
    out = None
    for r0 in range(0, n_rows, step):
        part = make(np.ascontiguousarray(W[r0:r0 + step], dtype=np.float32))
        if out is None:
            out = np.empty((n_rows, part.shape[1]), dtype=part.dtype)
        out[r0:r0 + part.shape[0]] = part
    return out


def calibrated_quantize(name: str, W, qtype: str, hs: Hessians, method: str,
                        importance: np.ndarray | None) -> tuple[np.ndarray, Choice | None]:
    """Bytes of matrix `name` by `method` ('gptq' or 'best'); None choice when it fell back to the imatrix.
    W: float32 (rows, n_in), or LazyRows for a matrix too large to hold whole; quantized SLAB_BYTES of rows
    at a time either way.

    'best': one importance search fixes the block scales of both candidates, the importance search's own
    levels and GPTQ's levels fitted on the fitting windows; the one with the lower error on the held-out
    windows is kept, GPTQ redone on every window when it wins. (The scales are shared, so the search runs
    once per row.) The two are compared on at most CHOICE_ROWS evenly strided rows: each row's error is
    independent given H, and a Qwen3-1.7B layer's full-matrix comparison cost ~15 s."""
    if not hs.has(name) or qtype not in quant_grid.GRID_TYPES:
        return _by_slabs(W, lambda w: quantize(w, qtype, importance)), None
    choice = Choice("gptq", {})
    if method != "gptq" and hs.has_held_out(name):
        r = strided_rows(W.shape[0], CHOICE_ROWS)
        w = np.ascontiguousarray(W[r], dtype=np.float32)
        raw = quantize(w, qtype, importance)
        errors = relative_errors(w, {"imatrix": raw, "gptq": regrid(w, None, raw, qtype, factor=hs.factor(name, "fit"))},
                                 qtype, hs.get(name, "held"))
        choice = Choice(min(errors, key=errors.get), errors)
        del w, raw
    if choice.method == "imatrix":
        return _by_slabs(W, lambda w: quantize(w, qtype, importance)), choice
    factor = hs.factor(name, "all")
    return _by_slabs(W, lambda w: regrid(w, None, quantize(w, qtype, importance), qtype, factor=factor)), choice
