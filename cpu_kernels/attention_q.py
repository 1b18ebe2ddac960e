"""Attention over a quantized KV cache, and the codecs that fill it (Numba).

Cache layouts, per layer and per K/V side (S = cache slots, Hkv = kv heads, D = head_dim):
  f32  data (Hkv, S, D) float32                         (debugging)
  f16  data (Hkv, S, D) uint16 holding IEEE half bits   (Numba has no float16 on the CPU)
  q8   codes (Hkv, S, D) int8, scales (Hkv, S, D/32) f16 bits: x = d * code            (per token, blocks along D)
  q4   codes (Hkv, S, D/32, 16) uint8, scales/mins (Hkv, S, D/32) f16: x = d * code + m (per token, 4-bit asymmetric;
       byte i of a block holds elements i (low nibble) and i + 16 (high nibble), like ggml's q4_0)
  q4c  keys only, KIVI's per-channel layout: groups of 32 consecutive positions; codes (Hkv, S/2, D) uint8 where
       row grp*16 + i//2 holds token i of the group (even i low nibble, odd i high), scales/mins (Hkv, S/32, D) f16;
       the not-yet-full group lives in `pend` (Hkv, 32, D) f16 bits, indexed by position % 32.

Position p lives in slot p % S (S = n_ctx, or a ring of window + batch slots on sliding-window layers).

The attention kernel is a flash-attention loop: jobs = (kv head, tile of query rows, split of the key range),
keys/values are dequantized 32 positions at a time into small float32 buffers (never the whole cache), with an
online softmax per query row; splits are merged at the end (decode of a single token still uses every core).
numpy twins of every codec and of attention live in tests/test_kv_cache.py.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import simd_attention
from .ops import fast_exp

_JIT = dict(cache=True, fastmath=True, nogil=True)

F32, F16, Q8, Q4, Q4C = 0, 1, 2, 3, 4
KINDS = {"f32": F32, "f16": F16, "q8": Q8, "q4": Q4, "q4c": Q4C}
QBLOCK = 32          # elements per scale (along D for q8/q4, along positions for q4c)
TILE_Q = 16          # query positions per job (times the GQA group's heads)
_NEG = np.float32(-1e30)  # finite "minus infinity": fastmath assumes no infs


# ---------------------------------------------------------------- half <-> float, scalars (scales)
@njit(**_JIT)
def h2f(h):
    """IEEE half bits (uint16) -> float32: zero, subnormal and normal numbers (no inf/nan in the cache)."""
    h = np.int64(h)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * np.float32(5.960464477539063e-08)                       # m * 2^-24
    else:
        v = np.float32(m + 1024) * np.float32(1 << e) * np.float32(2.9802322387695312e-08)  # * 2^(e-25)
    if h & 0x8000:
        v = -v
    return v


@njit(**_JIT)
def f2h(x):
    """float -> IEEE half bits, rounded to nearest; saturates at +-65504 instead of inf."""
    s = 0
    x = np.float64(x)
    if x < 0.0:
        s = 0x8000
        x = -x
    if x == 0.0:
        return np.uint16(s)
    if x >= 65504.0:
        return np.uint16(s | 0x7BFF)
    if x < 6.103515625e-05:                      # subnormal half: multiples of 2^-24 (1024 -> smallest normal)
        return np.uint16(s | int(round(x * 16777216.0)))
    mant, e = math.frexp(x)                      # x = mant * 2^e, mant in [0.5, 1)
    M = int(round(mant * 2048.0))                # 11 significant bits
    if M == 2048:
        M = 1024
        e += 1
    e16 = e + 14
    if e16 > 30:
        return np.uint16(s | 0x7BFF)
    return np.uint16(s | (e16 << 10) | (M - 1024))


# ---------------------------------------------------------------- store: quantize new rows
@njit(**_JIT)
def quant_q8_rows(x, slots, codes, scales):
    # x (T, Hkv, D) float32 -> codes[h, slots[t], :] int8, scales[h, slots[t], :] (one per 32)
    T, Hkv, D = x.shape
    for t in range(T):
        s = slots[t]
        for h in range(Hkv):
            for b in range(D // QBLOCK):
                o = b * QBLOCK
                amax = np.float32(0.0)
                for i in range(QBLOCK):
                    a = abs(x[t, h, o + i])
                    if a > amax:
                        amax = a
                dh = f2h(amax / np.float32(127.0))
                d = h2f(dh)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                scales[h, s, b] = dh
                for i in range(QBLOCK):
                    c = round(x[t, h, o + i] * inv)
                    codes[h, s, o + i] = np.int8(min(127.0, max(-127.0, c)))


@njit(**_JIT)
def quant_q4_rows(x, slots, codes, scales, mins):
    # x (T, Hkv, D) float32 -> 4-bit asymmetric codes (Hkv, S, D/32, 16) per block of 32 along D;
    # byte i of a block holds element i (low nibble) and element i + 16 (high nibble), like ggml's q4_0
    T, Hkv, D = x.shape
    for t in range(T):
        s = slots[t]
        for h in range(Hkv):
            for b in range(D // QBLOCK):
                o = b * QBLOCK
                lo = x[t, h, o]
                hi = lo
                for i in range(1, QBLOCK):
                    v = x[t, h, o + i]
                    lo = min(lo, v)
                    hi = max(hi, v)
                mh = f2h(lo)
                m = h2f(mh)
                dh = f2h((hi - m) / np.float32(15.0))
                d = h2f(dh)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                scales[h, s, b] = dh
                mins[h, s, b] = mh
                for i in range(QBLOCK // 2):
                    c0 = min(15.0, max(0.0, round((x[t, h, o + i] - m) * inv)))
                    c1 = min(15.0, max(0.0, round((x[t, h, o + i + 16] - m) * inv)))
                    codes[h, s, b, i] = np.uint8(int(c0) | (int(c1) << 4))


@njit(**_JIT)
def quant_q4c_groups(xg, grps, codes, scales, mins):
    # xg (G, 32, Hkv, D) float32: whole groups of 32 positions; group j goes to group slot grps[j].
    G, _, Hkv, D = xg.shape
    for j in range(G):
        gs = grps[j]
        for h in range(Hkv):
            for d in range(D):
                lo = xg[j, 0, h, d]
                hi = lo
                for i in range(1, QBLOCK):
                    v = xg[j, i, h, d]
                    lo = min(lo, v)
                    hi = max(hi, v)
                mh = f2h(lo)
                m = h2f(mh)
                dh = f2h((hi - m) / np.float32(15.0))
                sc = h2f(dh)
                inv = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
                scales[h, gs, d] = dh
                mins[h, gs, d] = mh
                for i in range(0, QBLOCK, 2):
                    c0 = min(15.0, max(0.0, round((xg[j, i, h, d] - m) * inv)))
                    c1 = min(15.0, max(0.0, round((xg[j, i + 1, h, d] - m) * inv)))
                    codes[h, gs * 16 + i // 2, d] = np.uint8(int(c0) | (int(c1) << 4))


@njit(**_JIT)
def dequant_q4c_group(codes, scales, mins, gs, n, out):
    # the first n positions of group slot gs -> out (Hkv, n, D) float32 (reopening a group after a rewind)
    Hkv, _, D = codes.shape
    for h in range(Hkv):
        for d in range(D):
            sc = h2f(scales[h, gs, d])
            m = h2f(mins[h, gs, d])
            for i in range(n):
                c = (codes[h, gs * 16 + i // 2, d] >> (4 * (i & 1))) & 15
                out[h, i, d] = sc * np.float32(c) + m


# ---------------------------------------------------------------- attention
@njit(**_JIT)
def _half_row(src, dst):
    # src: D half bits -> dst float32 with int32 arithmetic only (vectorizes; Numba has no float16)
    for d in range(src.shape[0]):
        h = np.int32(src[d])
        e = (h >> np.int32(10)) & np.int32(31)
        mant = (h & np.int32(1023)) + (np.int32(1024) if e > 0 else np.int32(0))
        v = np.float32(mant) * np.float32(np.int32(1) << max(e, np.int32(1))) * np.float32(2.9802322387695312e-08)
        dst[d] = -v if h & np.int32(0x8000) else v


@njit(**_JIT)
def _load_rows(kind, af, ah, ai8, au4, au8, asc, amn, pend, g, b0, j0, j1, nslots, full, buf, cs, cm):
    """Positions b0+j0 .. b0+j1-1 (inside one aligned block of 32) of kv head g -> buf[j0:j1] (float32).

    Inner loops index with plain range variables only: computed indices get wraparound checks that stop
    LLVM from vectorizing."""
    D = buf.shape[1]
    if kind == Q4C and b0 + j1 > full:
        # positions at or past `full` are still in the full-precision pending group
        for j in range(j0, j1):
            pos = b0 + j
            if pos >= full:
                _half_row(pend[g, pos % QBLOCK], buf[j])
            else:
                gs = (pos % nslots) // QBLOCK
                i = (pos % nslots) % QBLOCK
                _half_row(asc[g, gs], cs)
                _half_row(amn[g, gs], cm)
                for d in range(D):
                    c = np.int32(au8[g, gs * 16 + i // 2, d] >> (4 * (i & 1))) & np.int32(15)
                    buf[j, d] = cs[d] * np.float32(c) + cm[d]
        return
    if kind == Q4C:
        gs = (b0 % nslots) // QBLOCK
        _half_row(asc[g, gs], cs)
        _half_row(amn[g, gs], cm)
        for j in range(j0, j1):
            i = (b0 + j) % nslots % QBLOCK
            r = gs * 16 + i // 2
            sh = np.int32(4 * (i & 1))
            for d in range(D):
                buf[j, d] = cs[d] * np.float32((np.int32(au8[g, r, d]) >> sh) & np.int32(15)) + cm[d]
        return
    nbd = D // QBLOCK
    if D % QBLOCK == 0:
        buf4 = buf.reshape(QBLOCK, nbd, 2, QBLOCK // 2)  # [j, block, low/high half, i]
        cs3 = cs.reshape(nbd, QBLOCK)
    else:  # only f32/f16 caches allow head_dim % 32 != 0, and they never use these views
        buf4 = np.empty((0, 0, 2, 0), dtype=buf.dtype)
        cs3 = np.empty((0, 0), dtype=cs.dtype)
    for j in range(j0, j1):
        s = (b0 + j) % nslots
        if kind == F32:
            for d in range(D):
                buf[j, d] = af[g, s, d]
        elif kind == F16:
            _half_row(ah[g, s], buf[j])
        elif kind == Q8:  # ai8 (Hkv, S, D): int8 codes viewed as uint8
            for b in range(nbd):
                sc = h2f(asc[g, s, b])
                for i in range(QBLOCK):
                    cs3[b, i] = sc
            # sign-extend with int32 ops over a runtime-length loop: this form vectorizes (Numba's
            # int8 -> float goes through int64, and fixed 32-long loops get unrolled instead)
            for d in range(D):
                buf[j, d] = cs[d] * np.float32((np.int32(ai8[g, s, d]) ^ np.int32(128)) - np.int32(128))
        else:  # Q4, au4 (Hkv, S, D/32, 16): byte i of a block holds elements i and i + 16
            for b in range(nbd):
                sc = h2f(asc[g, s, b])
                m = h2f(amn[g, s, b])
                for i in range(QBLOCK // 2):
                    byte = np.int32(au4[g, s, b, i])
                    buf4[j, b, 0, i] = sc * np.float32(byte & np.int32(15)) + m
                    buf4[j, b, 1, i] = sc * np.float32(byte >> np.int32(4)) + m


@njit(**_JIT)
def _exp_block(x, a, z, mx):
    """x[a:z] = exp(x[a:z] - mx) (all <= 0), returns their sum; ops.fast_exp vectorizes (math.exp would be
    a scalar libm call: Numba has no SVML here)."""
    tot = np.float32(0.0)
    for j in range(a, z):
        e = fast_exp(x[j] - mx)
        x[j] = e
        tot += e
    return tot


@njit(parallel=True, **_JIT)
def attend_kernel(q, n_kv, pos0, scale, window, nslots, n_split, full,
                  kkind, kf, kh, ki8, ku4, ku8, ks, km, kpend,
                  vkind, vf, vh, vi8, vu4, vu8, vs, vm, vpend, out):
    # q (T, H, D) at positions pos0..; out (T, H, D). Head h reads kv head h // (H // Hkv).
    T, H, D = q.shape
    Hkv = n_kv
    n_rep = H // Hkv
    n_qt = (T + TILE_Q - 1) // TILE_Q
    pm = np.empty((n_split, T, H), np.float32)
    pl = np.empty((n_split, T, H), np.float32)
    pacc = np.empty((n_split, T, H, D), np.float32)
    n_jobs = Hkv * n_qt * n_split
    for job in prange(n_jobs):
        sp = job % n_split
        rest = job // n_split
        g = rest % Hkv
        k = rest // Hkv
        qt = k // 2 if k % 2 == 0 else n_qt - 1 - k // 2   # zigzag: causal tiles differ in work
        t0 = qt * TILE_Q
        t1 = min(T, t0 + TILE_Q)
        rows = (t1 - t0) * n_rep
        lo = 0
        if window > 0:
            lo = max(0, pos0 + t0 - window + 1)
        hi = pos0 + t1
        blo = lo // QBLOCK
        nb = (hi + QBLOCK - 1) // QBLOCK - blo
        bs0 = blo + (nb * sp) // n_split
        bs1 = blo + (nb * (sp + 1)) // n_split
        qb = np.empty((rows, D), np.float32)
        m = np.empty(rows, np.float32)
        l = np.zeros(rows, np.float32)
        acc = np.zeros((rows, D), np.float32)
        jlo = np.empty(rows, np.int64)
        jhi = np.empty(rows, np.int64)
        for r in range(rows):
            m[r] = _NEG
            t = t0 + r // n_rep
            h = g * n_rep + r % n_rep
            for d in range(D):
                qb[r, d] = q[t, h, d] * scale
        kb = np.empty((QBLOCK, D), np.float32)
        kt = np.zeros((D, QBLOCK), np.float32)  # the block's keys transposed (columns outside ulo..uhi: stale)
        vb = np.empty((QBLOCK, D), np.float32)
        sc = np.empty((rows, QBLOCK), np.float32)
        cs = np.empty(D, np.float32)
        cm = np.empty(D, np.float32)
        for blk in range(bs0, bs1):
            b0 = blk * QBLOCK
            ulo = QBLOCK
            uhi = 0
            for r in range(rows):
                p = pos0 + t0 + r // n_rep
                a = -b0
                if window > 0:
                    a = p - window + 1 - b0
                a = max(a, 0)
                z = min(QBLOCK, p + 1 - b0)
                jlo[r] = a
                jhi[r] = z
                if a < z:
                    ulo = min(ulo, a)
                    uhi = max(uhi, z)
            if ulo >= uhi:
                continue
            _load_rows(kkind, kf, kh, ki8, ku4, ku8, ks, km, kpend, g, b0, ulo, uhi, nslots, full, kb, cs, cm)
            for j in range(ulo, uhi):
                for d in range(D):
                    kt[d, j] = kb[j, d]
            for r in range(rows):
                a = jlo[r]
                z = jhi[r]
                if a >= z:
                    continue
                simd_attention.block_scores(qb[r], kt, sc[r])  # all 32 scores of the block as one vector
                mx = m[r]
                for j in range(a, z):
                    mx = max(mx, sc[r, j])
                if mx > m[r]:
                    corr = np.float32(math.exp(m[r] - mx))
                    l[r] *= corr
                    for d in range(D):
                        acc[r, d] *= corr
                    m[r] = mx
                l[r] += _exp_block(sc[r], a, z, mx)
            _load_rows(vkind, vf, vh, vi8, vu4, vu8, vs, vm, vpend, g, b0, ulo, uhi, nslots, full, vb, cs, cm)
            for r in range(rows):
                if jlo[r] >= jhi[r]:
                    continue
                if D % QBLOCK == 0:
                    simd_attention.block_wsum(sc[r], jlo[r], jhi[r], vb, acc[r])
                else:  # f16/f32 caches with head_dim not a multiple of 32
                    for j in range(jlo[r], jhi[r]):
                        w = sc[r, j]
                        for d in range(D):
                            acc[r, d] += w * vb[j, d]
        for r in range(rows):
            t = t0 + r // n_rep
            h = g * n_rep + r % n_rep
            pm[sp, t, h] = m[r]
            pl[sp, t, h] = l[r]
            for d in range(D):
                pacc[sp, t, h, d] = acc[r, d]
    for job in prange(T * H):
        t = job // H
        h = job - t * H
        mx = pm[0, t, h]
        for sp in range(1, n_split):
            mx = max(mx, pm[sp, t, h])
        tot = np.float32(0.0)
        for d in range(D):
            out[t, h, d] = 0.0
        for sp in range(n_split):
            c = np.float32(math.exp(pm[sp, t, h] - mx))
            if pl[sp, t, h] == 0.0:
                continue
            tot += c * pl[sp, t, h]
            for d in range(D):
                out[t, h, d] += c * pacc[sp, t, h, d]
        inv = np.float32(1.0) / tot
        for d in range(D):
            out[t, h, d] *= inv


@njit(parallel=True, **_JIT)
def attend_decode_kernel(q, n_kv, pos, scale, window, nslots, n_split, full,
                         kkind, kf, kh, ki8, ku4, ku8, ks, km, kpend,
                         vkind, vf, vh, vi8, vu4, vu8, vs, vm, vpend, out):
    """One query token (q (H, D) at position `pos`) -> out (H, D): the decode step's attention.

    Same cache reads as attend_kernel, organised for a single token: jobs = (kv head, split of the key
    range); each job scores all its positions for the group's query heads at once (scores kept, plain
    two-pass softmax instead of online rescaling), then sums the values; the splits merge at the end."""
    H, D = q.shape
    n_rep = H // n_kv
    lo = max(0, pos - window + 1) if window > 0 else 0
    blo = lo // QBLOCK
    nb = pos // QBLOCK + 1 - blo
    span = (nb + n_split - 1) // n_split * QBLOCK
    pm = np.empty((n_split, H), np.float32)
    pl = np.zeros((n_split, H), np.float32)
    pacc = np.zeros((n_split, H, D), np.float32)
    for job in prange(n_kv * n_split):
        sp = job % n_split
        g = job // n_split
        b_first = blo + (nb * sp) // n_split
        b_last = blo + (nb * (sp + 1)) // n_split
        if b_first >= b_last:
            for r in range(n_rep):
                pm[sp, g * n_rep + r] = _NEG
            continue
        p0 = b_first * QBLOCK
        qb = np.empty((n_rep, D), np.float32)
        for r in range(n_rep):
            for d in range(D):
                qb[r, d] = q[g * n_rep + r, d] * scale
        sc = np.full((n_rep, span), _NEG, np.float32)
        buf = np.empty((QBLOCK, D), np.float32)
        cs = np.empty(D, np.float32)
        cm = np.empty(D, np.float32)
        p_lo = max(lo, p0)
        p_hi = min(pos + 1, b_last * QBLOCK)
        if kkind == Q8:
            # q8 keys: float dots straight from the int8 codes (simd_attention.scores_q8)
            for r in range(n_rep):
                simd_attention.scores_q8(ki8, ks, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, qb[r],
                                         sc[r, p_lo - p0:])
        else:
            for blk in range(b_first, b_last):
                b0 = blk * QBLOCK
                j0 = max(lo - b0, 0)
                j1 = min(QBLOCK, pos + 1 - b0)
                _load_rows(kkind, kf, kh, ki8, ku4, ku8, ks, km, kpend, g, b0, j0, j1, nslots, full, buf, cs, cm)
                for j in range(j0, j1):
                    kr = buf[j]
                    for r in range(n_rep):
                        s = np.float32(0.0)
                        for d in range(D):
                            s += qb[r, d] * kr[d]
                        sc[r, b0 - p0 + j] = s
        n = (b_last - b_first) * QBLOCK
        for r in range(n_rep):
            mx = _NEG
            for j in range(n):
                mx = max(mx, sc[r, j])
            pm[sp, g * n_rep + r] = mx
            pl[sp, g * n_rep + r] = _exp_block(sc[r], 0, n, mx)
        acc = np.zeros((n_rep, D), np.float32)
        if vkind == Q8:
            for r in range(n_rep):
                simd_attention.wsum_q8(vi8, vs, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, sc[r, p_lo - p0:],
                                       acc[r])
        else:
            for blk in range(b_first, b_last):
                b0 = blk * QBLOCK
                j0 = max(lo - b0, 0)
                j1 = min(QBLOCK, pos + 1 - b0)
                _load_rows(vkind, vf, vh, vi8, vu4, vu8, vs, vm, vpend, g, b0, j0, j1, nslots, full, buf, cs, cm)
                for j in range(j0, j1):
                    vr = buf[j]
                    for r in range(n_rep):
                        w = sc[r, b0 - p0 + j]
                        for d in range(D):
                            acc[r, d] += w * vr[d]
        for r in range(n_rep):
            for d in range(D):
                pacc[sp, g * n_rep + r, d] = acc[r, d]
    for h in range(H):
        mx = pm[0, h]
        for sp in range(1, n_split):
            mx = max(mx, pm[sp, h])
        tot = np.float32(0.0)
        for d in range(D):
            out[h, d] = 0.0
        for sp in range(n_split):
            if pl[sp, h] == 0.0:
                continue
            c = np.float32(math.exp(pm[sp, h] - mx))
            tot += c * pl[sp, h]
            for d in range(D):
                out[h, d] += c * pacc[sp, h, d]
        inv = np.float32(1.0) / tot
        for d in range(D):
            out[h, d] *= inv
