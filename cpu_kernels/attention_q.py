"""Attention over a quantized KV cache, and the codecs that fill it (Numba).

Storage layouts, per layer and per K/V side (S = cache slots, Hkv = kv heads, D = head_dim), with the KVSide
fields each one uses; the user's cache types (f16, q8, q4, ...) map onto these in edgeq/runtime/kv_cache.py:
  float32            float32 (Hkv, S, D)                        (debugging)
  float16            float16 (Hkv, S, D) uint16 half bits       (Numba has no float16 on the CPU)
  int8_per_token     int8_codes (Hkv, S, D), scales (Hkv, S, D/32) half bits: x = d * code   (blocks along D)
  uint4_per_token    uint4_codes (Hkv, S, D/32, 16), scales/mins (Hkv, S, D/32) half bits: x = d * code + m
                     (4-bit asymmetric; byte i of a block holds elements i (low nibble) and i + 16 (high
                     nibble), like ggml's q4_0)
  uint4_per_channel  keys only, KIVI's layout: groups of 32 consecutive positions per channel;
                     uint4_channel_codes (Hkv, S/2, D) where row grp*16 + i//2 holds token i of the group (even i
                     low nibble, odd i high), scales/mins (Hkv, S/32, D) half bits; the not-yet-full group lives
                     in `pending` (Hkv, 32, D) half bits, indexed by position % 32.
  uint8_per_channel  keys only, the same groups at 8 bits: uint8_channel_codes (Hkv, S/32, D, 32), [h, grp, d, i]
                     = channel d of token i of the group (a group's keys transposed: decode scores 32 positions
                     as one vector), x = d * code + m with scales/mins (Hkv, S/32, D) half bits; `pending` as
                     above. Asymmetric per channel because keys have outlier channels (Qwen2.5's k biases reach
                     +-145): a per-token scale is set by the outlier and crushes the token's other channels.
One side is a `KVSide`: its layout code and every array above (those its layout does not use are empty).

Position p lives in slot p % S (S = n_ctx, or a ring of window + batch slots on sliding-window layers).

The attention kernel is a flash-attention loop: jobs = (kv head, tile of query rows, split of the key range),
keys/values are dequantized 32 positions at a time into small float32 buffers (never the whole cache), with an
online softmax per query row; splits are merged at the end (decode of a single token still uses every core).
Decode has its own kernel for one token of each of B sequences (a single token is a batch of one): it stores
the new keys/values (`_store_row_template`, the codes of kv_cache._Store.write) and attends, jobs = (sequence,
kv head, key split), in one call per layer: the server's decode step over its slots (edgeq/runtime/kv_cache.py
KVPool) is one parallel launch per layer instead of a store and an attend per sequence.
numpy twins of every codec and of attention live in tests/test_kv_cache.py.
"""
from __future__ import annotations

import functools
import math
import types as pytypes
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from . import native_call, simd_attention
from .half import f16_row_to_f32, f16_to_f32, f32_row_to_f16, f32_to_f16
from .jit_options import prange_only

_PAIRS = simd_attention.PAIRS  # two query heads per pass over a kv head's codes in decode (simd_attention)

_JIT = dict(cache=True, fastmath=True, nogil=True)

FLOAT32, FLOAT16, INT8_PER_TOKEN, UINT4_PER_TOKEN, UINT4_PER_CHANNEL, UINT8_PER_CHANNEL = 0, 1, 2, 3, 4, 5
LAYOUTS = {"float32": FLOAT32, "float16": FLOAT16, "int8_per_token": INT8_PER_TOKEN,
           "uint4_per_token": UINT4_PER_TOKEN, "uint4_per_channel": UINT4_PER_CHANNEL,
           "uint8_per_channel": UINT8_PER_CHANNEL}
PER_CHANNEL = ("uint4_per_channel", "uint8_per_channel")  # groups of 32 positions: S % 32 == 0, a pending group
QBLOCK = 32          # elements per scale (along D per token, along positions per channel)
TILE_Q = 16          # query positions per job (times the GQA group's heads)
_NEG = np.float32(-1e30)  # finite "minus infinity": fastmath assumes no infs


class KVSide(NamedTuple):
    """Keys or values of one layer, as the attention kernels read them (layouts: the module docstring).

    The kernels take it as a plain tuple, `tuple(side)`, unpacked in this field order: Numba's dispatcher
    types a plain tuple of arrays in C but a namedtuple in Python (measured: twice the cost of a call)."""
    layout: int                       # FLOAT32 .. UINT8_PER_CHANNEL
    float32: np.ndarray
    float16: np.ndarray
    int8_codes: np.ndarray            # viewed as uint8: the kernels sign-extend in int32 arithmetic (vectorizes)
    uint4_codes: np.ndarray           # per token
    uint4_channel_codes: np.ndarray   # per channel
    uint8_channel_codes: np.ndarray   # per channel, groups transposed
    scales: np.ndarray
    mins: np.ndarray
    pending: np.ndarray


# positions of fields in tuple(KVSide) that the decode kernel reads directly (Numba freezes globals as constants)
_INT8_CODES, _U8C_CODES, _SCALES, _MINS = (KVSide._fields.index(f) for f in (
    "int8_codes", "uint8_channel_codes", "scales", "mins"))

# array field -> (dtype, ndim); a layout's unused fields are empty arrays of the same type, so every side has
# one Numba type and the kernels compile once for all layouts
_ARRAY_TYPES = {"float32": (np.float32, 3), "float16": (np.uint16, 3), "int8_codes": (np.uint8, 3),
                "uint4_codes": (np.uint8, 4), "uint4_channel_codes": (np.uint8, 3),
                "uint8_channel_codes": (np.uint8, 4), "scales": (np.uint16, 3),
                "mins": (np.uint16, 3), "pending": (np.uint16, 3)}


def new_side(layout: str, n_kv: int, nslots: int, D: int, n_seq: int | None = None, zeros=np.zeros) -> KVSide:
    """Zeroed arrays of one side in `layout` (a key of LAYOUTS); PER_CHANNEL layouts need nslots % 32 == 0.
    With n_seq: a pool of that many sides, every array with a leading sequence axis (`side_at` takes one).
    zeros(shape, dtype): where the arrays come from (a C-contiguous zeroed array)."""
    per_token = (n_kv, nslots, D // QBLOCK)
    per_channel = (n_kv, nslots // QBLOCK, D)
    shapes = {
        "float32": {"float32": (n_kv, nslots, D)},
        "float16": {"float16": (n_kv, nslots, D)},
        "int8_per_token": {"int8_codes": (n_kv, nslots, D), "scales": per_token},
        "uint4_per_token": {"uint4_codes": (n_kv, nslots, D // QBLOCK, QBLOCK // 2), "scales": per_token,
                            "mins": per_token},
        "uint4_per_channel": {"uint4_channel_codes": (n_kv, nslots // 2, D), "scales": per_channel,
                              "mins": per_channel, "pending": (n_kv, QBLOCK, D)},
        "uint8_per_channel": {"uint8_channel_codes": (n_kv, nslots // QBLOCK, D, QBLOCK), "scales": per_channel,
                              "mins": per_channel, "pending": (n_kv, QBLOCK, D)},
    }[layout]
    lead = () if n_seq is None else (n_seq,)
    return KVSide(LAYOUTS[layout], **{f: zeros(lead + shapes.get(f, (0,) * ndim), dtype)
                                      for f, (dtype, ndim) in _ARRAY_TYPES.items()})


def side_at(pool: KVSide, i: int) -> KVSide:
    """Sequence i's side of a pool made by new_side(..., n_seq): views, C-contiguous like a side of its own (the
    kernels see one type)."""
    return KVSide(pool.layout, *(a[i] for a in pool[1:]))


# ---------------------------------------------------------------- store: quantize new rows
@njit(**_JIT)
def quantize_int8_per_token(x, slots, codes, scales):
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
                dh = f32_to_f16(amax / np.float32(127.0))
                d = f16_to_f32(dh)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                scales[h, s, b] = dh
                for i in range(QBLOCK):  # np.rint: round half to even as round() did, and it vectorizes
                    c = np.rint(x[t, h, o + i] * inv)
                    codes[h, s, o + i] = np.int8(min(np.float32(127.0), max(np.float32(-127.0), c)))


@njit(inline="always", **_JIT)
def _uint4_scale_min(lo, hi):
    """A 4-bit asymmetric block over [lo, hi] -> (scale bits, min bits, min, 1/scale (0 for a flat block))."""
    mh = f32_to_f16(lo)
    m = f16_to_f32(mh)
    dh = f32_to_f16((hi - m) / np.float32(15.0))
    d = f16_to_f32(dh)
    return dh, mh, m, np.float32(1.0) / d if d > 0 else np.float32(0.0)


@njit(inline="always", **_JIT)
def _uint4_pair(x0, x1, m, inv):
    """Two values -> one byte of 4-bit codes (x0 in the low nibble)."""
    c0 = min(15.0, max(0.0, round((x0 - m) * inv)))
    c1 = min(15.0, max(0.0, round((x1 - m) * inv)))
    return np.uint8(int(c0) | (int(c1) << 4))


@njit(**_JIT)
def quantize_uint4_per_token(x, slots, codes, scales, mins):
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
                dh, mh, m, inv = _uint4_scale_min(lo, hi)
                scales[h, s, b] = dh
                mins[h, s, b] = mh
                for i in range(QBLOCK // 2):
                    codes[h, s, b, i] = _uint4_pair(x[t, h, o + i], x[t, h, o + i + 16], m, inv)


@njit(**_JIT)
def quantize_uint4_per_channel(xg, grps, codes, scales, mins):
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
                dh, mh, m, inv = _uint4_scale_min(lo, hi)
                scales[h, gs, d] = dh
                mins[h, gs, d] = mh
                for i in range(0, QBLOCK, 2):
                    codes[h, gs * 16 + i // 2, d] = _uint4_pair(xg[j, i, h, d], xg[j, i + 1, h, d], m, inv)


@njit(**_JIT)
def dequantize_uint4_per_channel_group(codes, scales, mins, gs, n, out):
    # the first n positions of group slot gs -> out (Hkv, n, D) float32 (reopening a group after a rewind)
    Hkv, _, D = codes.shape
    for h in range(Hkv):
        for d in range(D):
            sc = f16_to_f32(scales[h, gs, d])
            m = f16_to_f32(mins[h, gs, d])
            for i in range(n):
                c = (codes[h, gs * 16 + i // 2, d] >> (4 * (i & 1))) & 15
                out[h, i, d] = sc * np.float32(c) + m


@njit(**_JIT)
def quantize_uint8_per_channel(xg, grps, codes, scales, mins):
    # xg (G, 32, Hkv, D) float32 holding half values (the pending group's precision): whole groups of 32
    # positions; group j goes to group slot grps[j]; codes[h, gs, d, i] = round((x - m) / scale), m = the min
    # (exact in half, so no code clips at 0)
    # the channels' minimum and maximum run over d innermost (contiguous: vectorized; over the positions, 32
    # loads Hkv * D floats apart, they took 4.7 ns a value)
    G, _, Hkv, D = xg.shape
    lo = np.empty(D, np.float32)
    hi = np.empty(D, np.float32)
    for j in range(G):
        gs = grps[j]
        for h in range(Hkv):
            for d in range(D):
                lo[d] = xg[j, 0, h, d]
                hi[d] = xg[j, 0, h, d]
            for i in range(1, QBLOCK):
                for d in range(D):
                    v = xg[j, i, h, d]
                    lo[d] = min(lo[d], v)
                    hi[d] = max(hi[d], v)
            for d in range(D):  # as before the min / max loops moved: the same codes
                mh = f32_to_f16(lo[d])
                m = f16_to_f32(mh)
                dh = f32_to_f16((hi[d] - m) / np.float32(255.0))
                sc = f16_to_f32(dh)
                inv = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
                scales[h, gs, d] = dh
                mins[h, gs, d] = mh
                for i in range(QBLOCK):
                    codes[h, gs, d, i] = np.uint8(min(255.0, max(0.0, round((xg[j, i, h, d] - m) * inv))))


@njit(**_JIT)
def dequantize_uint8_per_channel_group(codes, scales, mins, gs, n, out):
    # the first n positions of group slot gs -> out (Hkv, n, D) float32 (reopening a group after a rewind)
    Hkv, _, D, _ = codes.shape
    for h in range(Hkv):
        for d in range(D):
            sc = f16_to_f32(scales[h, gs, d])
            m = f16_to_f32(mins[h, gs, d])
            for i in range(n):
                out[h, i, d] = sc * np.float32(codes[h, gs, d, i]) + m


# ---------------------------------------------------------------- attention
def _load_rows_template(side, g, b0, j0, j1, nslots, full, buf, cs, cm):
    """Positions b0+j0 .. b0+j1-1 (inside one aligned block of 32) of kv head g of one KVSide -> buf[j0:j1]
    (float32); cs, cm: (D,) scratch for per-channel scales and mins.

    Inner loops index with plain range variables only: computed indices get wraparound checks that stop
    LLVM from vectorizing."""
    _, f32, f16, i8, u4, u4c, u8c, scales, mins, pending = side  # KVSide's fields
    D = buf.shape[1]
    if _SIDE_LAYOUT == UINT8_PER_CHANNEL:
        if b0 >= full:  # blocks are group-aligned: wholly quantized or wholly in the pending group
            for j in range(j0, j1):
                f16_row_to_f32(pending[g, j], buf[j])
            return
        gs = (b0 % nslots) // QBLOCK
        f16_row_to_f32(scales[g, gs], cs)
        f16_row_to_f32(mins[g, gs], cm)
        for d in range(D):
            for j in range(j0, j1):
                buf[j, d] = cs[d] * np.float32(u8c[g, gs, d, j]) + cm[d]
        return
    if _SIDE_LAYOUT == UINT4_PER_CHANNEL and b0 + j1 > full:
        # positions at or past `full` are still in the full-precision pending group
        for j in range(j0, j1):
            pos = b0 + j
            if pos >= full:
                f16_row_to_f32(pending[g, pos % QBLOCK], buf[j])
            else:
                gs = (pos % nslots) // QBLOCK
                i = (pos % nslots) % QBLOCK
                f16_row_to_f32(scales[g, gs], cs)
                f16_row_to_f32(mins[g, gs], cm)
                for d in range(D):
                    c = np.int32(u4c[g, gs * 16 + i // 2, d] >> (4 * (i & 1))) & np.int32(15)
                    buf[j, d] = cs[d] * np.float32(c) + cm[d]
        return
    if _SIDE_LAYOUT == UINT4_PER_CHANNEL:
        gs = (b0 % nslots) // QBLOCK
        f16_row_to_f32(scales[g, gs], cs)
        f16_row_to_f32(mins[g, gs], cm)
        for j in range(j0, j1):
            i = (b0 + j) % nslots % QBLOCK
            r = gs * 16 + i // 2
            sh = np.int32(4 * (i & 1))
            for d in range(D):
                buf[j, d] = cs[d] * np.float32((np.int32(u4c[g, r, d]) >> sh) & np.int32(15)) + cm[d]
        return
    nbd = D // QBLOCK
    if D % QBLOCK == 0:
        buf4 = buf.reshape(QBLOCK, nbd, 2, QBLOCK // 2)  # [j, block, low/high half, i]
        cs3 = cs.reshape(nbd, QBLOCK)
    else:  # only float layouts allow head_dim % 32 != 0, and they never use these views
        buf4 = np.empty((0, 0, 2, 0), dtype=buf.dtype)
        cs3 = np.empty((0, 0), dtype=cs.dtype)
    for j in range(j0, j1):
        s = (b0 + j) % nslots
        if _SIDE_LAYOUT == FLOAT32:
            for d in range(D):
                buf[j, d] = f32[g, s, d]
        elif _SIDE_LAYOUT == FLOAT16:
            f16_row_to_f32(f16[g, s], buf[j])
        elif _SIDE_LAYOUT == INT8_PER_TOKEN:
            for b in range(nbd):
                sc = f16_to_f32(scales[g, s, b])
                for i in range(QBLOCK):
                    cs3[b, i] = sc
            # sign-extend with int32 ops over a runtime-length loop: this form vectorizes (Numba's
            # int8 -> float goes through int64, and fixed 32-long loops get unrolled instead)
            for d in range(D):
                buf[j, d] = cs[d] * np.float32((np.int32(i8[g, s, d]) ^ np.int32(128)) - np.int32(128))
        else:  # UINT4_PER_TOKEN: byte i of a block holds elements i and i + 16
            for b in range(nbd):
                sc = f16_to_f32(scales[g, s, b])
                m = f16_to_f32(mins[g, s, b])
                for i in range(QBLOCK // 2):
                    byte = np.int32(u4[g, s, b, i])
                    buf4[j, b, 0, i] = sc * np.float32(byte & np.int32(15)) + m
                    buf4[j, b, 1, i] = sc * np.float32(byte >> np.int32(4)) + m


@njit(**_JIT)
def _merge_splits(pm, pl, pacc, r, out):
    """Row r's partial softmax results of the key splits -> out (D,): split sp holds max score pm[sp, r], sum of
    exponentials pl[sp, r] (0: the split saw no key) and weighted value sum pacc[sp, r]; rescaled to the
    overall max and normalized."""
    n_split, _, D = pacc.shape
    mx = pm[0, r]
    for sp in range(1, n_split):
        mx = max(mx, pm[sp, r])
    tot = np.float32(0.0)
    for d in range(D):
        out[d] = 0.0
    for sp in range(n_split):
        if pl[sp, r] == 0.0:
            continue
        c = np.float32(math.exp(pm[sp, r] - mx))
        tot += c * pl[sp, r]
        for d in range(D):
            out[d] += c * pacc[sp, r, d]
    inv = np.float32(1.0) / tot
    for d in range(D):
        out[d] *= inv


def _attend_template(q, keys, values, n_kv, pos0, scale, window, nslots, n_split, full, out, fns):
    """Causal attention of q (T, H, D) at positions pos0.. over the cache -> out (T, H, D); keys, values:
    tuple(KVSide). Head h reads kv head h // (H // n_kv); `full` = positions already in whole per-channel groups;
    fns: the row loads' addresses (`addresses(k_layout, v_layout, LOADS)`)."""
    T, H, D = q.shape
    Hkv = n_kv
    n_rep = H // Hkv
    k_u8c, k_scales, k_mins = keys[_U8C_CODES], keys[_SCALES], keys[_MINS]
    n_qt = (T + TILE_Q - 1) // TILE_Q
    # per split, per row t * H + h: max score, sum of exponentials, weighted value sum (_merge_splits)
    pm = np.empty((n_split, T * H), np.float32)
    pl = np.empty((n_split, T * H), np.float32)
    pacc = np.empty((n_split, T * H, D), np.float32)
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
            if _K_LAYOUT == UINT8_PER_CHANNEL and b0 < full:  # the group is stored transposed already
                gs = (b0 % nslots) // QBLOCK
                f16_row_to_f32(k_scales[g, gs], cs)
                f16_row_to_f32(k_mins[g, gs], cm)
                for d in range(D):
                    for j in range(QBLOCK):
                        kt[d, j] = cs[d] * np.float32(k_u8c[g, gs, d, j]) + cm[d]
            else:
                native_call.call(_load_k, fns[_F_LOAD_K], (keys, g, b0, ulo, uhi, nslots, full, kb, cs, cm))
                for j in range(ulo, uhi):
                    for d in range(D):
                        kt[d, j] = kb[j, d]
            r = 0
            while r < rows:  # all 32 scores of the block as one vector, two query rows per pass over the keys
                if r + 1 < rows:
                    simd_attention.block_scores_2(qb, r, kt, sc)
                    r += 2
                else:
                    simd_attention.block_scores(qb[r], kt, sc[r])
                    r += 1
            for r in range(rows):
                a = jlo[r]
                z = jhi[r]
                if a >= z:  # no key of this block: zero weights, so the value sums below can take rows in pairs
                    for j in range(QBLOCK):
                        sc[r, j] = 0.0
                    continue
                mx = simd_attention.block_max(sc, r, a, z, m[r])
                if mx > m[r]:
                    corr = np.float32(math.exp(m[r] - mx))
                    l[r] *= corr
                    for d in range(D):
                        acc[r, d] *= corr
                    m[r] = mx
                l[r] += simd_attention.block_exp(sc, r, a, z, mx)
            native_call.call(_load_v, fns[_F_LOAD_V], (values, g, b0, ulo, uhi, nslots, full, vb, cs, cm))
            if D % QBLOCK == 0:
                # two rows per pass over the values, on the keys both use (a row's weights outside its own keys
                # are zeros: adding them leaves its sums as they are)
                r = 0
                while r < rows:
                    if r + 1 < rows:
                        a = min(jlo[r], jlo[r + 1])
                        z = max(jhi[r], jhi[r + 1])
                        if a < z:
                            simd_attention.block_wsum_2(sc, r, a, z, vb, acc)
                        r += 2
                    else:
                        if jlo[r] < jhi[r]:
                            simd_attention.block_wsum(sc[r], jlo[r], jhi[r], vb, acc[r])
                        r += 1
            else:  # float layouts with head_dim not a multiple of 32
                for r in range(rows):
                    for j in range(jlo[r], jhi[r]):
                        w = sc[r, j]
                        for d in range(D):
                            acc[r, d] += w * vb[j, d]
        for r in range(rows):
            t = t0 + r // n_rep
            h = g * n_rep + r % n_rep
            pm[sp, t * H + h] = m[r]
            pl[sp, t * H + h] = l[r]
            for d in range(D):
                pacc[sp, t * H + h, d] = acc[r, d]
    for job in prange(T * H):
        t = job // H
        _merge_splits(pm, pl, pacc, job, out[t, job - t * H])


# Decode on per-channel 8-bit keys (the default "q8" cache) waits on its codes: a batch's caches (8 sequences of
# SmolLM2 at 600 positions: 2 MB a layer, 60 MB a step) come from L3 or memory, and a profile put most of the job's
# samples on the loads of the key and value codes. The group loop prefetches into L2 the keys KEY_AHEAD groups of
# 32 positions on and the value rows of its own group (summed after the scores). One thread, 8 sequences x 600
# positions, per layer, alternated fresh processes: 460-478 -> 408-428 us (1 group ahead: 436-453, 3: 427-435);
# one sequence of 600: 45.5-49.6 -> 40.4-46.6 us.
KEY_AHEAD = 2


@njit(**_JIT)
def decode_splits(n_kv, pos, window, threads):
    """Key splits of one decode token's attention: a few jobs per thread (kv heads x splits), each at least a
    block of 32 positions (KVCache.attend and the batch kernel choose alike, so a sequence's bits do not depend
    on the batch it decodes in)."""
    lo = max(0, pos - window + 1) if window > 0 else 0
    n_blocks = (pos + 1 - lo + QBLOCK - 1) // QBLOCK + 1
    return max(1, min(n_blocks - 1, 2 * threads // n_kv + 1))


def _decode_job_template(qb3, kpool, vpool, b, seq, n_kv, pos, scale, window, nslots, n_split, full, job, pm3, pl3,
                         pacc4, fns):
    """Job `job` = (kv head g, key split sp) of one token's attention for row b of the decode kernel's batch
    (sequence seq of the pools): scores all its positions for the group's query heads at once (scores kept, plain
    two-pass softmax instead of online rescaling), then sums the values; -> pm[sp, h] (max score), pl[sp, h] (sum
    of exponentials, left 0 by an empty split), pacc[sp, h] (weighted value sum) for the group's heads h, of pm3[b]
    ... The job takes the kernel's whole arrays and indexes them itself: the kernel's parallel loop, compiled twice
    (its gufunc, then linked into the kernel), only passes them on."""
    q, keys, values = qb3[b], _side_at(kpool, seq), _side_at(vpool, seq)
    pm, pl, pacc = pm3[b], pl3[b], pacc4[b]
    H, D = q.shape
    n_rep = H // n_kv
    k_codes, k_scales, k_u8c, k_mins = keys[_INT8_CODES], keys[_SCALES], keys[_U8C_CODES], keys[_MINS]
    v_codes, v_scales = values[_INT8_CODES], values[_SCALES]
    lo = max(0, pos - window + 1) if window > 0 else 0
    blo = lo // QBLOCK
    nb = pos // QBLOCK + 1 - blo
    span = (nb + n_split - 1) // n_split * QBLOCK
    sp = job % n_split
    g = job // n_split
    b_first = blo + (nb * sp) // n_split
    b_last = blo + (nb * (sp + 1)) // n_split
    if b_first >= b_last:
        for r in range(n_rep):
            pm[sp, g * n_rep + r] = _NEG
        return
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
    if _K_LAYOUT == INT8_PER_TOKEN:
        # int8 keys: float dots straight from the codes, 16 positions at a time, up to three query heads per pass
        # over the codes (simd_attention.scores_q8_rows)
        r = 0
        while r < n_rep:
            if _PAIRS and r + 2 < n_rep:
                simd_attention.scores_q8_3(k_codes, k_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, qb, r,
                                           sc, p_lo - p0)
                r += 3
            elif _PAIRS and r + 1 < n_rep:
                simd_attention.scores_q8_2(k_codes, k_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, qb, r,
                                           sc, p_lo - p0)
                r += 2
            else:
                simd_attention.scores_q8_1(k_codes, k_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, qb, r,
                                           sc, p_lo - p0)
                r += 1
    elif _K_LAYOUT == UINT8_PER_CHANNEL:
        # per-channel 8-bit keys, group by group: q . (scale * code + min) = (q * scale) . code + q . min,
        # the 32 positions of a group as one vector (simd_attention.block_scores on the transposed codes)
        qs = np.empty((n_rep, D), np.float32)
        bias = np.empty(n_rep, np.float32)
        g32 = np.empty((n_rep, QBLOCK), np.float32)
        n_groups = k_u8c.shape[1]
        for blk in range(b_first, b_last):
            b0 = blk * QBLOCK
            j0 = max(lo - b0, 0)
            j1 = min(QBLOCK, pos + 1 - b0)
            if b0 >= full:  # the pending group, in half precision
                native_call.call(_load_k, fns[_F_LOAD_K], (keys, g, b0, j0, j1, nslots, full, buf, cs, cm))
                for j in range(j0, j1):
                    for r in range(n_rep):
                        s = np.float32(0.0)
                        for d in range(D):
                            s += qb[r, d] * buf[j, d]
                        sc[r, b0 - p0 + j] = s
                continue
            gs = (b0 % nslots) // QBLOCK
            # into L2 as the groups go (KEY_AHEAD): the keys KEY_AHEAD groups on, and this group's value rows,
            # summed after the scores
            ahead = b0 + KEY_AHEAD * QBLOCK
            if ahead < full and blk + KEY_AHEAD < b_last:
                nxt = (g * n_groups + (ahead % nslots) // QBLOCK) * D
                simd_attention.prefetch_l2(k_u8c, nxt * QBLOCK, D * QBLOCK)
                simd_attention.prefetch_l2(k_scales, nxt * 2, D * 2)
                simd_attention.prefetch_l2(k_mins, nxt * 2, D * 2)
            if _V_LAYOUT == INT8_PER_TOKEN:
                vr = g * nslots + b0 % nslots
                simd_attention.prefetch_l2(v_codes, vr * D, QBLOCK * D)
                simd_attention.prefetch_l2(v_scales, vr * (D // QBLOCK) * 2, QBLOCK * (D // QBLOCK) * 2)
            f16_row_to_f32(k_scales[g, gs], cs)
            f16_row_to_f32(k_mins[g, gs], cm)
            for r in range(n_rep):
                b_r = np.float32(0.0)
                for d in range(D):
                    qs[r, d] = qb[r, d] * cs[d]
                    b_r += qb[r, d] * cm[d]
                bias[r] = b_r
            r = 0
            while r < n_rep:  # two or three query heads per pass over the group's codes where it pays (PAIRS)
                if _PAIRS and r + 2 < n_rep:
                    simd_attention.block_scores_3(qs, r, k_u8c[g, gs], g32)
                    r += 3
                elif _PAIRS and r + 1 < n_rep:
                    simd_attention.block_scores_2(qs, r, k_u8c[g, gs], g32)
                    r += 2
                else:
                    simd_attention.block_scores(qs[r], k_u8c[g, gs], g32[r])
                    r += 1
            o = b0 - p0
            for r in range(n_rep):  # slices indexed from 0: a computed index's wraparound check keeps this scalar
                dst, src, b_r = sc[r, o + j0:o + j1], g32[r, j0:j1], bias[r]
                for j in range(j1 - j0):
                    dst[j] = src[j] + b_r
    else:
        for blk in range(b_first, b_last):
            b0 = blk * QBLOCK
            j0 = max(lo - b0, 0)
            j1 = min(QBLOCK, pos + 1 - b0)
            native_call.call(_load_k, fns[_F_LOAD_K], (keys, g, b0, j0, j1, nslots, full, buf, cs, cm))
            for j in range(j0, j1):
                kr = buf[j]
                for r in range(n_rep):
                    s = np.float32(0.0)
                    for d in range(D):
                        s += qb[r, d] * kr[d]
                    sc[r, b0 - p0 + j] = s
    # the softmax's max and exponentials in vector code, a block of 32 scores at a time (as the prompt kernel's)
    nbk = span // QBLOCK
    sc32 = sc.reshape(n_rep * nbk, QBLOCK)
    for r in range(n_rep):
        mx = _NEG
        for i in range(b_last - b_first):
            mx = simd_attention.block_max(sc32, r * nbk + i, 0, QBLOCK, mx)
        pm[sp, g * n_rep + r] = mx
        tot = np.float32(0.0)
        for i in range(b_last - b_first):
            tot += simd_attention.block_exp(sc32, r * nbk + i, 0, QBLOCK, mx)
        pl[sp, g * n_rep + r] = tot
    acc = np.zeros((n_rep, D), np.float32)
    if _V_LAYOUT == INT8_PER_TOKEN:
        r = 0
        while r < n_rep:
            if _PAIRS and r + 2 < n_rep:
                simd_attention.wsum_q8_3(v_codes, v_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, sc,
                                         p_lo - p0, r, acc)
                r += 3
            elif _PAIRS and r + 1 < n_rep:
                simd_attention.wsum_q8_2(v_codes, v_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo, sc,
                                         p_lo - p0, r, acc)
                r += 2
            else:
                simd_attention.wsum_q8(v_codes, v_scales, g * nslots, nslots, p_lo % nslots, p_hi - p_lo,
                                       sc[r, p_lo - p0:], acc[r])
                r += 1
    else:
        for blk in range(b_first, b_last):
            b0 = blk * QBLOCK
            j0 = max(lo - b0, 0)
            j1 = min(QBLOCK, pos + 1 - b0)
            native_call.call(_load_v, fns[_F_LOAD_V], (values, g, b0, j0, j1, nslots, full, buf, cs, cm))
            for j in range(j0, j1):
                vr = buf[j]
                for r in range(n_rep):
                    w = sc[r, b0 - p0 + j]
                    for d in range(D):
                        acc[r, d] += w * vr[d]
    for r in range(n_rep):
        for d in range(D):
            pacc[sp, g * n_rep + r, d] = acc[r, d]


def _attend_decode_template(q, k, v, kpool, vpool, seqs, positions, held, store, n_kv, scale, window, nslots,
                            threads, out, fns):
    """One decode token of each of B sequences -> out (B, H, D). Row b is sequence seqs[b] of kpool / vpool
    (tuple(KVSide) whose arrays have a leading sequence axis: a KVPool's, or one cache's own arrays as a pool of
    one) at position positions[b]; store: first append k[b], v[b] (B, Hkv, D) there (right after the positions
    it holds). held[b] = the positions the layer then holds. Attends q[b] (B, H, D): jobs = (sequence, kv head,
    key split), each `_decode_job_template`, the splits merged at the end. One token alone and a batch run this
    same code (fastmath lets two compilations of one loop round differently), so a row's bits never depend on
    the batch it decodes in. fns: `addresses(k_layout, v_layout)` (the stores, the job and the loads it calls)."""
    B, H, D = q.shape
    if store:
        for b in range(B):
            native_call.call(_store_k, fns[_F_STORE_K], (kpool, seqs[b], k, b, positions[b], nslots))
            native_call.call(_store_v, fns[_F_STORE_V], (vpool, seqs[b], v, b, positions[b], nslots))
    splits = np.empty(B, np.int64)
    S = 1
    for b in range(B):  # a loop, not splits.max(): Numba's max compiles five helpers (~0.9 s of a first run)
        splits[b] = decode_splits(n_kv, positions[b], window, threads)
        S = max(S, splits[b])
    pm = np.full((B, S, H), _NEG, np.float32)
    pl = np.zeros((B, S, H), np.float32)
    pacc = np.zeros((B, S, H, D), np.float32)
    for job in prange(B * n_kv * S):
        b = job // (n_kv * S)
        r = job - b * n_kv * S
        g = r // S
        sp = r - g * S
        ns = splits[b]
        if sp >= ns:  # this sequence has fewer splits: the row stays empty (pl 0), which the merge skips
            continue
        native_call.call(_decode_job, fns[_F_JOB], (q, kpool, vpool, b, seqs[b], n_kv, positions[b], scale, window,
                                                    nslots, ns, held[b] // QBLOCK * QBLOCK, g * ns + sp, pm, pl, pacc,
                                                    fns))
    for r in range(B * H):  # serial: a few microseconds, not worth a parallel launch
        b = r // H
        _merge_splits(pm[b], pl[b], pacc[b], r - b * H, out[b, r - b * H])


@njit(inline="always", **_JIT)
def _side_at(pool, i):
    """Sequence i's KVSide (as a tuple) out of a pool's KVSide, whose arrays have a leading sequence axis."""
    return (pool[0], pool[1][i], pool[2][i], pool[3][i], pool[4][i], pool[5][i], pool[6][i], pool[7][i], pool[8][i],
            pool[9][i])


def _store_row_template(pool, seq, xb, b, pos, nslots):
    """x = xb[b] (Hkv, D) float32 -> position `pos` of sequence seq's KVSide in `pool`, appended after positions
    0..pos-1 (a decode token; the same codes as edgeq/runtime/kv_cache._Store.write)."""
    _, f32, f16, i8, u4, u4c, u8c, scales, mins, pending = _side_at(pool, seq)  # KVSide's fields
    x = xb[b]
    Hkv, D = x.shape
    s = pos % nslots
    if _SIDE_LAYOUT == FLOAT32:
        for h in range(Hkv):
            for d in range(D):
                f32[h, s, d] = x[h, d]
    elif _SIDE_LAYOUT == FLOAT16:
        for h in range(Hkv):
            f32_row_to_f16(x[h], f16[h, s])
    elif _SIDE_LAYOUT == INT8_PER_TOKEN:
        quantize_int8_per_token(x.reshape((1, Hkv, D)), np.full(1, s, np.int64), i8.view(np.int8), scales)
    elif _SIDE_LAYOUT == UINT4_PER_TOKEN:
        quantize_uint4_per_token(x.reshape((1, Hkv, D)), np.full(1, s, np.int64), u4, scales, mins)
    else:  # per channel: the row joins the pending group (half precision); the last one quantizes the group
        i = pos % QBLOCK
        if i < QBLOCK - 1:
            for h in range(Hkv):
                f32_row_to_f16(x[h], pending[h, i])
        else:
            xg = np.empty((1, QBLOCK, Hkv, D), np.float32)
            for h in range(Hkv):
                for d in range(D):
                    for j in range(QBLOCK - 1):
                        xg[0, j, h, d] = f16_to_f32(pending[h, j, d])
                    xg[0, QBLOCK - 1, h, d] = f16_to_f32(f32_to_f16(x[h, d]))
            grps = np.full(1, (pos - i) % nslots // QBLOCK, np.int64)
            if _SIDE_LAYOUT == UINT8_PER_CHANNEL:
                quantize_uint8_per_channel(xg, grps, u8c, scales, mins)
            else:
                quantize_uint4_per_channel(xg, grps, u4c, scales, mins)


# ---------------------------------------------------------------- one kernel per pair of cache layouts
# The templates above read their layouts from globals that _specialize binds per layout: Numba freezes globals as
# constants and prunes the branches of every other layout before typing them, so a model compiles the code of its
# own cache types only (one kernel holding every layout's branches cost 3x the compile time; docs/performance.md).
_SIDE_LAYOUT = _K_LAYOUT = _V_LAYOUT = -1  # bound per layout by _specialize
_load_k = _load_v = _decode_job = _store_k = _store_v = None
_LAYOUT_NAMES = {code: name for name, code in LAYOUTS.items()}


def _specialize(template, name: str, parallel: bool, native_only: bool = False, **bound):
    """njit of a new function over `template`'s code with `bound` in its globals, not a closure: Numba keys a
    cached closure by its pickled cells, and a pickled dispatcher carries a per-process uuid, so a closure would
    never load from the on-disk cache. Its own name names its cache index file. native_only: called only through
    native_call (never from Python), so without Numba's Python and C wrappers (for the job: 30% of its code,
    unboxing two tuples of ten arrays)."""
    fn = pytypes.FunctionType(template.__code__, dict(template.__globals__, **bound), name)
    fn.__qualname__ = name
    fn.__doc__ = template.__doc__
    wrappers = dict(no_cpython_wrapper=True, no_cfunc_wrapper=True) if native_only else {}
    return njit(parallel=prange_only() if parallel else False, **_JIT, **wrappers)(fn)


# The kernels call the row loads, the row stores and the decode job through their addresses (cpu_kernels/native_call.py:
# a linked callee is compiled again inside every caller), passed in `fns`, an int64 array indexed by these; each callee
# is declared with the one signature it is called with. Every KVSide has one Numba type (new_side's empty arrays),
# and so has every pool of them (a leading sequence axis): the stores and the job take the decode kernel's pools
# and whole arrays with the row and sequence to index (passing each sequence's views built them in the kernel's
# parallel loop, whose code is compiled twice: the decode kernel alone 4.6-5.0 -> 2.4-2.6 s, the stores 3.5 -> 2.4).
_PARTS = ("job", "store_k", "store_v", "load_k", "load_v")  # the callees, in the order of their `fns` entries
_F_JOB, _F_STORE_K, _F_STORE_V, _F_LOAD_K, _F_LOAD_V = range(len(_PARTS))
_SIDE_T = numba.typeof(tuple(new_side("float32", 1, QBLOCK, QBLOCK)))
_POOL_T = numba.typeof(tuple(new_side("float32", 1, QBLOCK, QBLOCK, n_seq=1)))
_I64, _F32 = numba.int64, numba.float32
_F32_1, _F32_2, _F32_3, _F32_4 = _F32[::1], _F32[:, ::1], _F32[:, :, ::1], _F32[:, :, :, ::1]
_LOAD_SIG = (_SIDE_T, _I64, _I64, _I64, _I64, _I64, _I64, _F32_2, _F32_1, _F32_1)
_STORE_SIG = (_POOL_T, _I64, _F32_3, _I64, _I64, _I64)
_JOB_SIG = (_F32_3, _POOL_T, _POOL_T, _I64, _I64, _I64, _I64, _F32, _I64, _I64, _I64, _I64, _I64, _F32_3, _F32_3,
            _F32_4, numba.int64[::1])


@functools.cache
def _load_rows_for(layout: int):
    fn = _specialize(_load_rows_template, "_load_rows_" + _LAYOUT_NAMES[layout], False, True, _SIDE_LAYOUT=layout)
    native_call.declare(fn, _LOAD_SIG)
    return fn


@functools.cache
def _store_row_for(layout: int):
    fn = _specialize(_store_row_template, "_store_row_" + _LAYOUT_NAMES[layout], False, True, _SIDE_LAYOUT=layout)
    native_call.declare(fn, _STORE_SIG)
    return fn


def _bound(k_layout: int, v_layout: int) -> dict:
    return dict(_K_LAYOUT=k_layout, _V_LAYOUT=v_layout, _load_k=_load_rows_for(k_layout),
                _load_v=_load_rows_for(v_layout), _store_k=_store_row_for(k_layout), _store_v=_store_row_for(v_layout))


@functools.cache
def decode_job_for(k_layout: int, v_layout: int):
    """The decode kernel's job (`_decode_job_template`) for this pair of layouts: a kernel of its own, which a
    first run's warm-up compiles in one process while another compiles the store rows (runtime/warmup.py)."""
    pair = _LAYOUT_NAMES[k_layout] + "__" + _LAYOUT_NAMES[v_layout]
    fn = _specialize(_decode_job_template, "attend_decode_job__" + pair, False, True, **_bound(k_layout, v_layout))
    native_call.declare(fn, _JOB_SIG)
    return fn


@functools.cache
def addresses(k_layout: int, v_layout: int, parts: tuple = _PARTS):
    """`fns` of the kernels for this pair of layouts: the callees' addresses (each compiled, or loaded from the disk
    cache, here), those not in `parts` 0. The prefill kernel and the decode job call only the loads; the decode
    kernel calls every one."""
    b = _bound(k_layout, v_layout)
    fns = {"job": decode_job_for(k_layout, v_layout), "store_k": b["_store_k"], "store_v": b["_store_v"],
           "load_k": b["_load_k"], "load_v": b["_load_v"]}
    out = np.zeros(len(_PARTS), np.int64)
    for i, name in enumerate(_PARTS):
        if name in parts:
            out[i] = native_call.address(fns[name])
    return out


LOADS = ("load_k", "load_v")  # addresses(k, v, LOADS): what the prefill kernel and the decode job call


def store_row_for(layout: int):
    """The decode kernel's store of one new row in `layout` (`_store_row_template`)."""
    return _store_row_for(layout)


@functools.cache
def attention_kernels(k_layout: int, v_layout: int):
    """(prefill kernel, decode kernel) for keys stored in `k_layout` and values in `v_layout` (LAYOUTS' codes):
    `_attend_template` and `_attend_decode_template` with those layouts bound; compiled at their first call."""
    pair = _LAYOUT_NAMES[k_layout] + "__" + _LAYOUT_NAMES[v_layout]
    bound = dict(_bound(k_layout, v_layout), _decode_job=decode_job_for(k_layout, v_layout))
    return (_specialize(_attend_template, "attend_kernel__" + pair, True, **bound),
            _specialize(_attend_decode_template, "attend_decode_kernel__" + pair, True, **bound))
