"""GPTQ's column loop inside one lazy batch (edgeq/convert/gptq.py), compiled: per row, round each column to
the nearest point of that row's grid and push the error onto the batch's later columns.

Rows are independent given H, so they run in parallel (`prange`); the arithmetic is numpy's loop element by
element (no fastmath: the same float32 roundings, hence the same levels, as the numpy twin in the tests)."""
from __future__ import annotations

import edgeq  # noqa: F401  (numba settings, edgeq/_numba_env.py, before numba is imported)
from numba import njit, prange

_JIT = dict(cache=True, nogil=True, error_model="numpy")


_ROWS = 256   # rows per parallel task: each of the batch's 32 columns is a contiguous (vectorized) run of them


@njit(parallel=True, **_JIT)
def gptq_batch(Wt, at, bt, U1, levels, mid, K, E1, i1):
    """Columns i1..i1+len(U1) of Wt (n_in, rows), column-major, updated in place: K[i1 + j] gets the level
    indices (nearest a·levels[k] + b, as quant_grid.nearest), E1[j] the scaled errors that the trailing update
    spreads over the columns after the batch."""
    B, rows = U1.shape[0], Wt.shape[1]
    n_mid = mid.shape[0]
    for rb in prange((rows + _ROWS - 1) // _ROWS):
        r0, r1 = rb * _ROWS, min(rows, (rb + 1) * _ROWS)
        for j in range(B):
            c = i1 + j
            for r in range(r0, r1):
                w = Wt[c, r]
                a, b = at[c, r], bt[c, r]
                k = 0
                if a != 0:
                    t = (w - b) / a
                    lo, hi = 0, n_mid          # first mid >= t (np.searchsorted, side="left")
                    while lo < hi:
                        m = (lo + hi) // 2
                        if mid[m] < t:
                            lo = m + 1
                        else:
                            hi = m
                    k = lo
                K[c, r] = k
                E1[j, r] = (w - (a * levels[k] + b)) / U1[j, j]
            for jj in range(j + 1, B):
                u = U1[j, jj]
                for r in range(r0, r1):
                    Wt[i1 + jj, r] -= u * E1[j, r]
