"""Scale / min searches of llama.cpp's quantizers (ggml-quants.c), compiled with Numba.

The numpy codecs in formats/quants.py call these for every type whose quantizer searches: the k-quants
(Q2_K..Q6_K) always, and Q4_0/Q4_1/Q5_0/Q5_1 when an importance vector is given. One kernel per type works
on whole rows, `prange` over rows, and writes finished blocks (ggml-common.h layouts) into `out`.

The arithmetic follows the C reference step by step in float32 (every literal and integer is cast to
float32 before it meets a float32, since numba would otherwise widen to float64), so on ordinary data the
bytes are those of llama.cpp's `ggml_quantize_chunk`. Where C relies on undefined behaviour (nearest_int of a
huge value, negative levels wrapping in a uint8) the level is clamped instead.

Searches, by name in ggml-quants.c:
- make_qkx2_quants / make_qkx3_quants: scale and min of an asymmetric group by a grid of 1/scale candidates,
  each refined by weighted least squares (Q2_K/Q4_K/Q5_K reference; Q4_1/Q5_1/k-quants with importance).
- make_qx_quants (rmse_type 1): symmetric scale by a grid of 19 candidates (Q6_K; Q3_K/Q4_0/Q5_0 with
  importance; the Q3_K super-block scale).
- make_q3_quants: symmetric scale by coordinate descent on the levels (Q3_K reference).
- make_qp_quants: the super-block's 6-bit (4-bit for Q2_K) scales of scales with importance.
With an importance vector qw, the per-value weight is qw[j] * sqrt(sigma2 + x[j]^2) as in llama.cpp.
"""
from __future__ import annotations

import math

import edgeq  # noqa: F401  (numba settings, edgeq/_numba_env.py, before numba is imported)
import numpy as np
from numba import njit, prange

from edgeq.formats.quants import KVALUES_IQ4NL, QK_K, QTYPES
from edgeq._numba_env import local_linked_copies

local_linked_copies()  # kernels bound to their own linked copies, in every process

_JIT = dict(cache=True, nogil=True, error_model="numpy")  # IEEE division, as in C

# bytes per block, from the registry
_Q2_K_BYTES, _Q3_K_BYTES, _Q4_K_BYTES, _Q5_K_BYTES, _Q6_K_BYTES = (
    QTYPES[q].block_bytes for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_Q4_0_BYTES, _Q4_1_BYTES, _Q5_0_BYTES, _Q5_1_BYTES = (QTYPES[q].block_bytes for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"))
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_EPS = np.float32(1e-15)       # GROUP_MAX_EPS


# ---------------------------------------------------------------- scalars

@njit(inline="always", **_JIT)
def _nint(v):
    """nearest_int: round half to even (llama.cpp's magic-number trick), with NaN/huge values clamped."""
    if not (v > -4194303.0):
        return -4194303
    if v > 4194303.0:
        return 4194303
    return int(np.rint(v))


@njit(**_JIT)
def _fp16(f):
    """float32 -> (fp16 bits, the fp16 value as float32), round to nearest even like GGML_FP32_TO_FP16."""
    a = abs(float(f))
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0
    if a != a:
        return sign | 0x7E00, f
    if a == 0.0:
        return sign, f
    if a == math.inf:
        return sign | 0x7C00, f
    e = math.frexp(a)[1]                 # a = m * 2**e, 0.5 <= m < 1
    q = max(e - 11, -24)                 # 11 significant bits, subnormals below 2**-14
    r = math.ldexp(np.rint(math.ldexp(a, -q)), q)
    if r > 65504.0:
        bits = 0x7C00
        r = math.inf
    elif r < 6.103515625e-05:            # 2**-14: subnormal
        bits = int(math.ldexp(r, 24))
    else:
        e2 = math.frexp(r)[1] - 1
        bits = ((e2 + 15) << 10) | (int(math.ldexp(r, 10 - e2)) - 1024)
    return sign | bits, np.float32(-r if sign else r)


@njit(inline="always", **_JIT)
def _put16(out, o, bits):
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF


# ---------------------------------------------------------------- searches

@njit(**_JIT)
def _make_qkx(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants / make_qkx3_quants (identical for finite input): levels L in 0..nmax of
    x ~ scale * L - the_min. Returns (scale, the_min)."""
    n = x.size
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > _F0:
        mn = _F0
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _F1 / iscale
    best = _F0
    for i in range(n):
        l = max(0, min(nmax, _nint(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fnmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            v = iscale * (x[i] - mn)
            l = _nint(min(v, fnmax)) if v > _F0 else 0
            Laux[i] = l
            fl = np.float32(l)
            wl = w[i] * fl
            sum_l += wl
            sum_l2 += wl * fl
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur += w[i] * diff
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(inline="always", **_JIT)
def _nint_sel(v):
    """_nint without branches (selects): the same value for every input, NaN included."""
    v = v if v > -4194303.0 else np.float32(-4194303.0)
    v = v if v < 4194303.0 else np.float32(4194303.0)
    return np.int32(np.rint(v))


@njit(**_JIT)
def _make_qkx_lanes(X, W, L, Laux, nmax, rmin, rdelta, nstep, use_mad, scale, the_min):
    """_make_qkx on `lanes` groups at once: X, W (n, lanes) float32 (column j = group j), L, Laux (n, lanes)
    int32; scale/the_min (lanes,) out. Every lane computes what _make_qkx computes for its column, in the
    same order: the inner loops run across lanes (SIMD), each lane's sums stay sequential."""
    n, lanes = X.shape
    mn = X[0].copy()
    mx = X[0].copy()
    sum_w = W[0].copy()
    sum_x = np.empty(lanes, np.float32)
    for j in range(lanes):
        sum_x[j] = sum_w[j] * X[0, j]
    for i in range(1, n):
        for j in range(lanes):
            x = X[i, j]
            mn[j] = x if x < mn[j] else mn[j]
            mx[j] = x if x > mx[j] else mx[j]
            sum_w[j] += W[i, j]
            sum_x[j] += W[i, j] * x
    fnmax = np.float32(nmax)
    iscale = np.empty(lanes, np.float32)
    best = np.zeros(lanes, np.float32)
    dead = np.empty(lanes, np.bool_)
    mn0 = np.empty(lanes, np.float32)
    for j in range(lanes):
        if mn[j] > _F0:
            mn[j] = _F0
        mn0[j] = mn[j]
        dead[j] = mx[j] <= mn[j]
        iscale[j] = fnmax / (mx[j] - mn[j]) if not dead[j] else _F0
        scale[j] = _F1 / iscale[j] if not dead[j] else _F0
    for i in range(n):
        for j in range(lanes):
            l = _nint_sel(iscale[j] * (X[i, j] - mn[j]))
            l = l if l < nmax else nmax
            l = l if l > 0 else 0
            L[i, j] = l
            diff = scale[j] * np.float32(l) + mn[j] - X[i, j]
            diff = abs(diff) if use_mad else diff * diff
            best[j] += W[i, j] * diff
    if nstep >= 1:
        sum_l = np.empty(lanes, np.float32)
        sum_l2 = np.empty(lanes, np.float32)
        sum_xl = np.empty(lanes, np.float32)
        this_scale = np.empty(lanes, np.float32)
        this_min = np.empty(lanes, np.float32)
        ok = np.empty(lanes, np.bool_)
        cur = np.empty(lanes, np.float32)
        for step in range(nstep + 1):
            for j in range(lanes):
                iscale[j] = (rmin + rdelta * np.float32(step) + fnmax) / (mx[j] - mn[j]) if not dead[j] else _F0
                sum_l[j] = _F0
                sum_l2[j] = _F0
                sum_xl[j] = _F0
            for i in range(n):
                for j in range(lanes):
                    x = X[i, j]
                    v = iscale[j] * (x - mn[j])
                    t = v if v < fnmax else fnmax
                    l = _nint_sel(t)
                    l = l if v > _F0 else 0
                    Laux[i, j] = l
                    fl = np.float32(l)
                    wl = W[i, j] * fl
                    sum_l[j] += wl
                    sum_l2[j] += wl * fl
                    sum_xl[j] += wl * x
            for j in range(lanes):
                D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
                ok[j] = D > _F0 and not dead[j]
                ts = _F0
                tm = _F0
                if ok[j]:
                    ts = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D
                    tm = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D
                    if tm > _F0:
                        tm = _F0
                        ts = sum_xl[j] / sum_l2[j]
                this_scale[j] = ts
                this_min[j] = tm
                cur[j] = _F0
            for i in range(n):
                for j in range(lanes):
                    diff = this_scale[j] * np.float32(Laux[i, j]) + this_min[j] - X[i, j]
                    diff = abs(diff) if use_mad else diff * diff
                    cur[j] += W[i, j] * diff
            for j in range(lanes):
                if ok[j] and cur[j] < best[j]:
                    for i in range(n):
                        L[i, j] = Laux[i, j]
                    best[j] = cur[j]
                    scale[j] = this_scale[j]
                    mn[j] = this_min[j]
    for j in range(lanes):
        if dead[j]:
            for i in range(n):
                L[i, j] = 0
            scale[j] = _F0
            mn[j] = mn0[j]
        the_min[j] = -mn[j]


@njit(**_JIT)
def _qkx_subblocks(x, w, n, L, nmax, rmin, rdelta, nstep, use_mad, scales, mins):
    """_make_qkx of every n-value sub-block of x (weights w) at once (_make_qkx_lanes): scales/mins per
    sub-block, the levels into L (x's order)."""
    lanes = x.size // n
    X = np.empty((n, lanes), np.float32)
    W = np.empty((n, lanes), np.float32)
    LT = np.empty((n, lanes), np.int32)
    La = np.empty((n, lanes), np.int32)
    for j in range(lanes):
        for i in range(n):
            X[i, j] = x[n * j + i]
            W[i, j] = w[n * j + i]
    _make_qkx_lanes(X, W, LT, La, nmax, rmin, rdelta, nstep, use_mad, scales, mins)
    for j in range(lanes):
        for i in range(n):
            L[n * j + i] = LT[i, j]


@njit(inline="always", **_JIT)
def _signed_absmax(x):
    """The value of largest magnitude (the first one on ties), 0 for an empty or all-zero x."""
    mx = _F0
    amax = _F0
    for i in range(x.size):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return mx


@njit(**_JIT)
def _make_qx(x, L, nmax, qw, has_qw):
    """make_qx_quants with rmse_type 1: levels L in 0..2*nmax-1 (offset nmax) of x ~ scale * (L - nmax),
    weights qw (or x^2). Returns scale."""
    n = x.size
    mx = _signed_absmax(x)
    if abs(mx) < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = -fnmax / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
        L[i] = l + nmax
        wi = qw[i] if has_qw else x[i] * x[i]
        fl = np.float32(l)
        sumlx += wi * x[i] * fl
        suml2 += wi * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(step)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
            wi = qw[i] if has_qw else x[i] * x[i]
            fl = np.float32(l)
            sumlx += wi * x[i] * fl
            suml2 += wi * fl * fl
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _make_q3(x, L, nmax):
    """make_q3_quants with do_rmse: levels L in 0..2*nmax-1 (offset nmax), weights x^2. Returns scale."""
    n = x.size
    mx = _signed_absmax(x)
    if abs(mx) < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = -np.float32(nmax) / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nint(iscale * x[i])))
        L[i] = l
        wi = x[i] * x[i]
        fl = np.float32(l)
        sumlx += wi * x[i] * fl
        suml2 += wi * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = x[i] * x[i]
            fli = np.float32(L[i])
            slx = sumlx - wi * x[i] * fli
            if slx > _F0:
                sl2 = suml2 - wi * fli * fli
                new_l = max(-nmax, min(nmax - 1, _nint(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += wi * x[i] * fn
                    sl2 += wi * fn * fn
                    if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _F0 else _F0


@njit(**_JIT)
def _make_qp(x, L, nmax, qw):
    """make_qp_quants: levels L in 0..nmax of non-negative x ~ scale * L with weights qw. Returns scale."""
    n = x.size
    mx = _F0
    for i in range(n):
        mx = max(mx, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = max(0, _nint(iscale * x[i]))
    scale = _F1 / iscale
    best = _F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(step) + fnmax) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = max(0, min(nmax, _nint(iscale_is * x[i])))
            diff = x[i] - scale_is * np.float32(l)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = max(0, min(nmax, _nint(iscale * x[i])))
        L[i] = l
        fl = np.float32(l)
        sumlx += qw[i] * x[i] * fl
        suml2 += qw[i] * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = qw[i]
            fli = np.float32(L[i])
            slx = sumlx - wi * x[i] * fli
            sl2 = suml2 - wi * fli * fli
            if slx > _F0 and sl2 > _F0:
                new_l = max(0, min(nmax, _nint(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += wi * x[i] * fn
                    sl2 += wi * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0


@njit(inline="always", **_JIT)
def _weights_sigma(x, qw, sigma2, w):
    """llama.cpp's importance weights: qw[j] * sqrt(sigma2 + x[j]^2)."""
    for l in range(x.size):
        w[l] = qw[l] * np.sqrt(sigma2 + x[l] * x[l])


@njit(inline="always", **_JIT)
def _sum_sq(x):
    s = _F0
    for l in range(x.size):
        s += x[l] * x[l]
    return s


# ---------------------------------------------------------------- Q4_K / Q5_K

@njit(**_JIT)
def _k45_block(x, qw, has_qw, nmax, L, ls, lm):
    """Scales/mins of one super-block for Q4_K (nmax 15) / Q5_K (nmax 31): fills L (levels of the search),
    ls, lm (6-bit). Returns (d bits, dmin bits, d, dmin) with d, dmin the fp16 values."""
    wb = np.empty(QK_K, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    if has_qw:
        sigma2 = np.float32(2.0) * _sum_sq(x) / np.float32(QK_K)
        sw = np.empty(8, np.float32)
        for j in range(8):
            w = wb[32 * j:32 * j + 32]
            _weights_sigma(x[32 * j:32 * j + 32], qw[32 * j:32 * j + 32], sigma2, w)
            s = _F0
            for l in range(32):
                s += w[l]
            sw[j] = s
        _qkx_subblocks(x, wb, 32, L, nmax, np.float32(-0.9), np.float32(0.05), 36, False, scales, mins)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        d_block = _make_qp(scales, Ls, 63, sw)
        m_block = _make_qp(mins, Lm, 63, sw)
        for j in range(8):
            ls[j] = min(63, Ls[j])
            lm[j] = min(63, Lm[j])
    else:
        max_scale = _F0
        max_min = _F0
        if nmax == 15:
            rmin, rdelta, nstep = np.float32(-1.0), np.float32(0.1), 20
        else:
            rmin, rdelta, nstep = np.float32(-0.5), np.float32(0.1), 15
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            av_x = np.sqrt(_sum_sq(xs) / np.float32(32))
            for l in range(32):
                wb[32 * j + l] = av_x + abs(xs[l])
        _qkx_subblocks(x, wb, 32, L, nmax, rmin, rdelta, nstep, False, scales, mins)
        for j in range(8):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = np.float32(63) / max_scale if max_scale > _F0 else _F0
        inv_min = np.float32(63) / max_min if max_min > _F0 else _F0
        for j in range(8):
            ls[j] = min(63, _nint(inv_scale * scales[j]) & 0xFF)
            lm[j] = min(63, _nint(inv_min * mins[j]) & 0xFF)
        d_block = max_scale / np.float32(63)
        m_block = max_min / np.float32(63)
    db, d = _fp16(d_block)
    mb, dm = _fp16(m_block)
    # requantize with the stored (fp16, 6-bit) scales
    for j in range(8):
        dj = d * np.float32(ls[j])
        if dj == _F0:
            continue
        mj = dm * np.float32(lm[j])
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, _nint((x[32 * j + ii] + mj) / dj)))
    return db, mb


@njit(inline="always", **_JIT)
def _pack_k4_scales(ls, lm, o):
    for j in range(8):
        if j < 4:
            o[j] = ls[j]
            o[j + 4] = lm[j]
        else:
            o[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            o[j - 4] |= (ls[j] >> 4) << 6
            o[j] |= (lm[j] >> 4) << 6


@njit(parallel=True, **_JIT)
def _quantize_k45(x, qw, has_qw, out, nmax, block_bytes):
    """Q4_K (nmax 15) / Q5_K (nmax 31) rows: d, dmin, 12 bytes of scales/mins, then for Q5_K qh[32] (the
    fifth bits: bit 2j / 2j+1 of byte l for values 64j+l / 64j+32+l), then the low nibbles."""
    rows, cols = x.shape
    nb = cols // QK_K
    qs = 16 if nmax == 15 else 48
    for r in prange(rows):
        L = np.empty(QK_K, np.uint8)
        ls = np.empty(8, np.uint8)
        lm = np.empty(8, np.uint8)
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            qb = qw[i * QK_K:(i + 1) * QK_K] if has_qw else qw
            y = out[r, i * block_bytes:(i + 1) * block_bytes]
            db, mb = _k45_block(xb, qb, has_qw, nmax, L, ls, lm)
            _put16(y, 0, db)
            _put16(y, 2, mb)
            _pack_k4_scales(ls, lm, y[4:16])
            for l in range(16, qs):
                y[l] = 0
            for j in range(4):
                m1 = np.uint8(1 << (2 * j))
                m2 = np.uint8(2 << (2 * j))
                for l in range(32):
                    l1 = L[64 * j + l]
                    l2 = L[64 * j + 32 + l]
                    if l1 > 15:     # Q5_K only: levels stay <= nmax
                        l1 -= 16
                        y[16 + l] |= m1
                    if l2 > 15:
                        l2 -= 16
                        y[16 + l] |= m2
                    y[qs + 32 * j + l] = l1 | (l2 << 4)


def quantize_q4_k(x, qw, has_qw, out):
    _quantize_k45(x, qw, has_qw, out, 15, _Q4_K_BYTES)


def quantize_q5_k(x, qw, has_qw, out):
    _quantize_k45(x, qw, has_qw, out, 31, _Q5_K_BYTES)


# ---------------------------------------------------------------- Q6_K

@njit(parallel=True, **_JIT)
def quantize_q6_k(x, qw, has_qw, out):
    rows, cols = x.shape
    nb = cols // QK_K
    for r in prange(rows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        sc = np.empty(16, np.int8)
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q6_K_BYTES:(i + 1) * _Q6_K_BYTES]
            max_scale = _F0
            max_abs = _F0
            for ib in range(16):
                qb = qw[i * QK_K + 16 * ib:i * QK_K + 16 * ib + 16] if has_qw else qw
                s = _make_qx(xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 32, qb, has_qw)
                scales[ib] = s
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < _EPS:
                for k in range(_Q6_K_BYTES):
                    y[k] = 0
                continue
            iscale = np.float32(-128) / max_scale
            db, d = _fp16(_F1 / iscale)
            _put16(y, 208, db)
            for ib in range(16):
                sc[ib] = min(127, _nint(iscale * scales[ib]))
                y[192 + ib] = np.uint8(sc[ib] & 0xFF)
            for j in range(16):
                dj = d * np.float32(sc[j])
                if dj == _F0:
                    continue
                for ii in range(16):
                    L[16 * j + ii] = max(-32, min(31, _nint(xb[16 * j + ii] / dj))) + 32
            for h in range(2):
                for l in range(32):
                    q1 = L[128 * h + l]
                    q2 = L[128 * h + l + 32]
                    q3 = L[128 * h + l + 64]
                    q4 = L[128 * h + l + 96]
                    y[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                    y[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                    y[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


# ---------------------------------------------------------------- Q3_K

@njit(parallel=True, **_JIT)
def quantize_q3_k(x, qw, has_qw, out):
    rows, cols = x.shape
    nb = cols // QK_K
    for r in prange(rows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        ls = np.zeros(16, np.int8)          # stored scales, 0..63 (offset 32)
        w = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int8)
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q3_K_BYTES:(i + 1) * _Q3_K_BYTES]
            if has_qw:
                sigma2 = np.float32(2.0) * _sum_sq(xb) / np.float32(QK_K)
                for j in range(16):
                    xs = xb[16 * j:16 * j + 16]
                    _weights_sigma(xs, qw[i * QK_K + 16 * j:i * QK_K + 16 * j + 16], sigma2, w)
                    s = _F0
                    for l in range(16):
                        s += w[l]
                    sw[j] = s
                    scales[j] = _make_qx(xs, L[16 * j:16 * j + 16], 4, w, True)
                d_block = _make_qx(scales, Ls, 32, sw, True)
                for j in range(16):
                    ls[j] = Ls[j]
            else:
                max_scale = _F0
                amax = _F0
                for j in range(16):
                    scales[j] = _make_q3(xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 4)
                    if abs(scales[j]) > amax:
                        amax = abs(scales[j])
                        max_scale = scales[j]
                if max_scale != _F0:
                    iscale = np.float32(-32) / max_scale
                    for j in range(16):
                        l = _nint(iscale * scales[j])
                        ls[j] = max(-32, min(31, l)) + 32
                    d_block = _F1 / iscale
                else:
                    for j in range(16):
                        ls[j] = 0
                    d_block = _F0
            for k in range(12):
                y[96 + k] = 0
            for j in range(16):
                l = ls[j]
                if j < 8:
                    y[96 + j] = l & 0xF
                else:
                    y[96 + j - 8] |= (l & 0xF) << 4
                y[96 + 8 + j % 4] |= ((l >> 4) & 3) << (2 * (j // 4))
            db, d = _fp16(d_block)
            _put16(y, 108, db)
            for j in range(16):
                dj = d * np.float32(ls[j] - 32)
                if dj == _F0:
                    continue
                for ii in range(16):
                    L[16 * j + ii] = max(-4, min(3, _nint(xb[16 * j + ii] / dj))) + 4
            for k in range(32):
                y[k] = 0
            for j in range(QK_K):
                if L[j] > 3:
                    y[j % 32] |= np.uint8(1 << (j // 32))
                    L[j] -= 4
            for h in range(2):
                for l in range(32):
                    y[32 + 32 * h + l] = (L[128 * h + l] | (L[128 * h + l + 32] << 2) |
                                          (L[128 * h + l + 64] << 4) | (L[128 * h + l + 96] << 6))


# ---------------------------------------------------------------- Q2_K

@njit(parallel=True, **_JIT)
def quantize_q2_k(x, qw, has_qw, out):
    rows, cols = x.shape
    nb = cols // QK_K
    for r in prange(rows):
        L = np.empty(QK_K, np.uint8)
        wb = np.empty(QK_K, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        for i in range(nb):
            xb = x[r, i * QK_K:(i + 1) * QK_K]
            y = out[r, i * _Q2_K_BYTES:(i + 1) * _Q2_K_BYTES]
            if has_qw:
                sigma2 = _sum_sq(xb) / np.float32(QK_K)
                for j in range(16):
                    w = wb[16 * j:16 * j + 16]
                    _weights_sigma(xb[16 * j:16 * j + 16], qw[i * QK_K + 16 * j:i * QK_K + 16 * j + 16], sigma2, w)
                    s = _F0
                    for l in range(16):
                        s += w[l]
                    sw[j] = s
                _qkx_subblocks(xb, wb, 16, L, 3, np.float32(-0.9), np.float32(0.05), 36, False, scales, mins)
                dmv = _make_qp(scales, Ls, 15, sw)
                mmv = _make_qp(mins, Lm, 15, sw)
                db, d = _fp16(dmv)
                mb, dm = _fp16(mmv)
                for j in range(16):
                    y[j] = Ls[j] | (Lm[j] << 4)
            else:
                max_scale = _F0
                max_min = _F0
                for l in range(QK_K):
                    wb[l] = abs(xb[l])
                _qkx_subblocks(xb, wb, 16, L, 3, np.float32(-0.5), np.float32(0.1), 15, True, scales, mins)
                for j in range(16):
                    if scales[j] > max_scale:
                        max_scale = scales[j]
                    if mins[j] > max_min:
                        max_min = mins[j]
                if max_scale > _F0:
                    iscale = np.float32(15) / max_scale
                    for j in range(16):
                        y[j] = _nint(iscale * scales[j]) & 0xFF
                    db, d = _fp16(max_scale / np.float32(15))
                else:
                    for j in range(16):
                        y[j] = 0
                    db, d = _fp16(_F0)
                if max_min > _F0:
                    iscale = np.float32(15) / max_min
                    for j in range(16):
                        y[j] |= (_nint(iscale * mins[j]) << 4) & 0xFF
                    mb, dm = _fp16(max_min / np.float32(15))
                else:
                    mb, dm = _fp16(_F0)
            _put16(y, 80, db)
            _put16(y, 82, mb)
            for j in range(16):
                dj = d * np.float32(y[j] & 0xF)
                if dj == _F0:
                    continue
                mj = dm * np.float32(y[j] >> 4)
                for ii in range(16):
                    L[16 * j + ii] = max(0, min(3, _nint((xb[16 * j + ii] + mj) / dj)))
            for h in range(2):
                for l in range(32):
                    y[16 + 32 * h + l] = (L[128 * h + l] | (L[128 * h + l + 32] << 2) |
                                          (L[128 * h + l + 64] << 4) | (L[128 * h + l + 96] << 6))


# ---------------------------------------------------------------- 32-value types with importance

@njit(**_JIT)
def _sym_w_row(xr, qw, yr, nmax):
    """quantize_row_q4_0_impl (nmax 8) / quantize_row_q5_0_impl (nmax 16): make_qx_quants per block."""
    nb = xr.size // 32
    block_bytes = _Q4_0_BYTES if nmax == 8 else _Q5_0_BYTES
    qo = 2 if nmax == 8 else 6
    L = np.empty(32, np.int8)
    w = np.empty(32, np.float32)
    sigma2 = _sum_sq(xr) / np.float32(xr.size)
    for ib in range(nb):
        xs = xr[32 * ib:32 * ib + 32]
        _weights_sigma(xs, qw[32 * ib:32 * ib + 32], sigma2, w)
        d = _make_qx(xs, L, nmax, w, True)
        y = yr[ib * block_bytes:(ib + 1) * block_bytes]
        _put16(y, 0, _fp16(d)[0])
        for j in range(16):
            y[qo + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)
        if nmax == 16:
            for k in range(4):
                y[2 + k] = 0
            for j in range(32):
                if L[j] & 0x10:
                    y[2 + j // 8] |= np.uint8(1 << (j % 8))


@njit(**_JIT)
def _asym_w_row(xr, qw, yr, nmax):
    """quantize_row_q4_1_impl (nmax 15) / quantize_row_q5_1_impl (nmax 31): make_qkx3_quants per block."""
    nb = xr.size // 32
    block_bytes = _Q4_1_BYTES if nmax == 15 else _Q5_1_BYTES
    qo = 4 if nmax == 15 else 8
    L = np.empty(32, np.uint8)
    Laux = np.empty(32, np.uint8)
    w = np.empty(32, np.float32)
    sigma2 = _sum_sq(xr) / np.float32(xr.size)
    for ib in range(nb):
        xs = xr[32 * ib:32 * ib + 32]
        _weights_sigma(xs, qw[32 * ib:32 * ib + 32], sigma2, w)
        d, the_min = _make_qkx(xs, w, L, Laux, nmax, np.float32(-0.9), np.float32(0.05), 36, False)
        y = yr[ib * block_bytes:(ib + 1) * block_bytes]
        _put16(y, 0, _fp16(d)[0])
        _put16(y, 2, _fp16(-the_min)[0])
        for j in range(16):
            y[qo + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)
        if nmax == 31:
            for k in range(4):
                y[4 + k] = 0
            for j in range(32):
                if L[j] & 0x10:
                    y[4 + j // 8] |= np.uint8(1 << (j % 8))


@njit(parallel=True, **_JIT)
def quantize_q4_0_w(x, qw, out):
    for r in prange(x.shape[0]):
        _sym_w_row(x[r], qw, out[r], 8)


@njit(parallel=True, **_JIT)
def quantize_q5_0_w(x, qw, out):
    for r in prange(x.shape[0]):
        _sym_w_row(x[r], qw, out[r], 16)


@njit(parallel=True, **_JIT)
def quantize_q4_1_w(x, qw, out):
    for r in prange(x.shape[0]):
        _asym_w_row(x[r], qw, out[r], 15)


@njit(parallel=True, **_JIT)
def quantize_q5_1_w(x, qw, out):
    for r in prange(x.shape[0]):
        _asym_w_row(x[r], qw, out[r], 31)


# ---------------------------------------------------------------- IQ4_NL / IQ4_XS

_IQ4_NL_BYTES, _IQ4_XS_BYTES = QTYPES["IQ4_NL"].block_bytes, QTYPES["IQ4_XS"].block_bytes
_IQ4 = KVALUES_IQ4NL.astype(np.float32)     # a global array: Numba freezes it as a constant
_IQ4_NTRY = 7                               # scale candidates -ntry..ntry (ggml_quantize_chunk's value)


@njit(inline="always", **_JIT)
def _iq4_index(x):
    """best_index_int8 over the 16 table levels: the nearest level, the upper one on a tie (level i once
    2x reaches level[i-1] + level[i]; the sums are exact in float32)."""
    x2 = x + x
    idx = 0
    step = 8
    while step > 0:
        j = idx + step
        if x2 >= _IQ4[j - 1] + _IQ4[j]:
            idx = j
        step >>= 1
    return idx


@njit(**_JIT)
def _iq4_search(x, qw, qoff, has_qw, scales, w, L):
    """quantize_row_iq4_nl_impl's per-32 search over one super-block x (32 or 256 values): fills
    scales[ib] (a float scale per 32, 0 for a near-zero group) and L (levels). Returns the signed scale of
    largest magnitude (first on ties). The importance of x[j] is qw[qoff + j]."""
    sigma2 = _sum_sq(x) * (np.float32(2.0) / np.float32(x.size))
    max_scale = _F0
    amax_scale = _F0
    for ib in range(x.size // 32):
        xb = x[32 * ib:32 * ib + 32]
        if has_qw:
            _weights_sigma(xb, qw[qoff + 32 * ib:qoff + 32 * ib + 32], sigma2, w)
        else:
            for j in range(32):
                w[j] = xb[j] * xb[j]
        amax = _F0
        mx = _F0
        for j in range(32):
            if abs(xb[j]) > amax:
                amax = abs(xb[j])
                mx = xb[j]
        if amax < _EPS:
            scales[ib] = _F0
            for j in range(32):
                L[32 * ib + j] = 0
            continue
        d = -mx / _IQ4[0]
        inv = _F1 / d
        sumqx = _F0
        sumq2 = _F0
        for j in range(32):
            l = _iq4_index(inv * xb[j])
            L[32 * ib + j] = l
            q = _IQ4[l]
            sumqx += w[j] * q * xb[j]
            sumq2 += w[j] * q * q
        d = sumqx / sumq2 if sumq2 > _F0 else _F0
        best = d * sumqx
        for itry in range(-_IQ4_NTRY, _IQ4_NTRY + 1):
            inv = (np.float32(itry) + _IQ4[0]) / mx
            sumqx = _F0
            sumq2 = _F0
            for j in range(32):
                q = _IQ4[_iq4_index(inv * xb[j])]
                sumqx += w[j] * q * xb[j]
                sumq2 += w[j] * q * q
            if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    return max_scale


@njit(inline="always", **_JIT)
def _pack_iq4(L, y, o, n):
    """n levels -> n/2 bytes at y[o:]: per 32 values, 16 low nibbles then 16 high ones."""
    for i in range(n // 32):
        for j in range(16):
            y[o + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(parallel=True, **_JIT)
def quantize_iq4_nl(x, qw, has_qw, out):
    """IQ4_NL (quantize_iq4_nl): d = the group's searched scale, levels re-picked with 1/d."""
    for r in prange(x.shape[0]):
        xr, yr = x[r], out[r]
        scales = np.empty(1, np.float32)
        w = np.empty(32, np.float32)
        L = np.empty(32, np.uint8)
        for ib in range(xr.size // 32):
            xb = xr[32 * ib:32 * ib + 32]
            _iq4_search(xb, qw, 32 * ib, has_qw, scales, w, L)
            y = yr[ib * _IQ4_NL_BYTES:(ib + 1) * _IQ4_NL_BYTES]
            _put16(y, 0, _fp16(scales[0])[0])
            inv = _F1 / scales[0] if scales[0] != _F0 else _F0
            for j in range(32):
                L[j] = _iq4_index(inv * xb[j])
            _pack_iq4(L, y, 2, 32)


@njit(parallel=True, **_JIT)
def quantize_iq4_xs(x, qw, has_qw, out):
    """IQ4_XS (quantize_iq4_xs): d = -max_scale/32, 6-bit scales l in -32..31 per 32 (nearest_int), levels
    re-picked with 1/(d*l)."""
    for r in prange(x.shape[0]):
        xr, yr = x[r], out[r]
        scales = np.empty(8, np.float32)
        w = np.empty(32, np.float32)
        L = np.empty(QK_K, np.uint8)
        for ibl in range(xr.size // QK_K):
            xs = xr[QK_K * ibl:QK_K * (ibl + 1)]
            max_scale = _iq4_search(xs, qw, QK_K * ibl, has_qw, scales, w, L)
            y = yr[ibl * _IQ4_XS_BYTES:(ibl + 1) * _IQ4_XS_BYTES]
            d = -max_scale / np.float32(32)
            _put16(y, 0, _fp16(d)[0])
            inv = _F1 / d if d != _F0 else _F0
            scales_h = 0
            for k in range(4):
                y[4 + k] = 0
            for ib in range(8):
                l = max(-32, min(31, _nint(inv * scales[ib])))
                dl = d * np.float32(l)
                idl = _F1 / dl if dl != _F0 else _F0
                for j in range(32):
                    L[32 * ib + j] = _iq4_index(idl * xs[32 * ib + j])
                l += 32
                y[4 + ib // 2] |= np.uint8((l & 0xF) << (4 * (ib % 2)))
                scales_h |= (l >> 4) << (2 * ib)
            _put16(y, 2, scales_h)
            _pack_iq4(L, y, 8, QK_K)
