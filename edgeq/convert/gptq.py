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

import numpy as np

from edgeq.formats import quant_grid
from edgeq.formats.quants import quantize

DAMP = 0.01             # λ = DAMP · mean(diag H), as in GPTQ: keeps H invertible and the updates bounded
BLOCK = 32              # lazy-batch width: columns updated together before the trailing rank-B update (32-128
                        # cost the same flops; 32 keeps the per-column update in cache)
MAX_HESSIAN_COLS = 4096  # wider inputs (a 1.7B's ffn_down) get no Hessian: n_in² floats each, per layer


@dataclass
class Hessians:
    """Observer: H = Σ xᵀx (float32) per distinct input, fitting and held-out windows kept apart."""

    fit: dict[str, np.ndarray] = field(default_factory=dict)     # input key → (n_in, n_in)
    held: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)   # input key → [fit tokens, held-out tokens]
    key_of: dict[str, str] = field(default_factory=dict)         # matrix name → input key
    held_out: bool = False                                       # set by imatrix.collect per window
    _last_x: object = None
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

    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.fit.values()) + sum(h.nbytes for h in self.held.values())

    def has_held_out(self, name: str) -> bool:
        key = self.key_of.get(name)
        return key is not None and self.tokens.get(key, [0, 0])[1] > 0 and self.tokens[key][0] > 0


def output_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W−Q) H (W−Q)ᵀ) = ‖(W−Q)Xᵀ‖² for H = XᵀX."""
    D = np.asarray(W, np.float64) - Q
    return float(np.einsum("ij,ij->", D @ H, D))


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


def gptq_levels(W: np.ndarray, H: np.ndarray, a: np.ndarray, b: np.ndarray, levels: np.ndarray,
                damp: float = DAMP, block: int | None = None, act_order: bool = True) -> np.ndarray:
    """The fast path: level indices k (rows, n_in) on the grids a·levels[k] + b, lazy-batch GPTQ, columns
    in decreasing diag(H) (act order: the most used inputs are rounded first, while all others can still
    absorb their error)."""
    n = W.shape[1]
    block = block or BLOCK
    perm = np.argsort(-np.diagonal(H), kind="stable") if act_order else np.arange(n)
    # column-major work arrays (one input column = one contiguous row): the column loop touches whole rows
    Wt = np.array(W.T[perm], dtype=np.float64)
    at, bt = np.ascontiguousarray(a.T[perm]), np.ascontiguousarray(b.T[perm])
    Hp = _damped(H, damp)[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(Hp)).T
    lev = levels.astype(np.float64)
    K = np.empty(Wt.shape, dtype=np.int16)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wt[i1:i2]                      # a view: updated in place
        E1 = np.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[j]
            k = quant_grid.nearest(w, at[i1 + j], bt[i1 + j], levels)
            K[i1 + j] = k
            err = (w - (at[i1 + j] * lev[k] + bt[i1 + j])) / U1[j, j]
            W1[j:] -= U1[j, j:, None] * err
            E1[j] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ E1
    out = np.empty_like(K)
    out[perm] = K
    return np.ascontiguousarray(out.T)


def quantize_gptq(W: np.ndarray, qtype: str, H: np.ndarray, importance: np.ndarray | None = None,
                  act_order: bool = True) -> np.ndarray:
    """Bytes (rows, row_bytes) of `qtype`: block scales from the importance search, levels by GPTQ."""
    raw = quantize(W, qtype, importance)
    if qtype not in quant_grid.GRID_TYPES:
        return raw
    _, a, b = quant_grid.decode(raw, qtype, W.shape[1])
    k = gptq_levels(W, H, a, b, quant_grid.LEVELS[qtype], act_order=act_order)
    return quant_grid.encode(raw, qtype, k)


def importance_of(H: np.ndarray, n_tokens: int) -> np.ndarray:
    """llama.cpp's imatrix entry (mean x² per input column) from H."""
    return (np.diagonal(H) / max(n_tokens, 1)).astype(np.float32)


@dataclass
class Choice:
    method: str
    errors: dict[str, float]   # method → held-out output error relative to ‖W Xᵀ‖²


def calibrated_quantize(name: str, W: np.ndarray, qtype: str, hs: Hessians, method: str,
                        importance: np.ndarray | None) -> tuple[np.ndarray, Choice | None]:
    """Bytes of matrix `name` by `method` ('gptq' or 'best'); None choice when it fell back to the imatrix."""
    from edgeq.formats.quants import dequantize

    H_all = hs.get(name, "all")
    if H_all is None or qtype not in quant_grid.GRID_TYPES:
        return quantize(W, qtype, importance), None
    if method == "gptq" or not hs.has_held_out(name):
        return quantize_gptq(W, qtype, H_all, importance), Choice("gptq", {})
    # fit on the fitting windows, judge on the held-out ones, then redo the winner with every window
    key = hs.key_of[name]
    H_fit, H_held = hs.get(name, "fit"), hs.get(name, "held")
    imp_fit = importance_of(H_fit, hs.tokens[key][0])
    cands = {"imatrix": quantize(W, qtype, imp_fit), "gptq": quantize_gptq(W, qtype, H_fit, imp_fit)}
    ref = max(output_error(W, np.zeros_like(W), H_held), 1e-30)
    errors = {m: output_error(W, dequantize(raw, qtype, W.shape), H_held) / ref for m, raw in cands.items()}
    best = min(errors, key=errors.get)
    if best == "imatrix":
        return quantize(W, qtype, importance), Choice(best, errors)
    return quantize_gptq(W, qtype, H_all, importance), Choice(best, errors)
