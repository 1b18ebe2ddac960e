"""Each quantized weight as a point of its block's grid: value = a · LEVELS[k] + b, with a and b fixed by the
block's scale fields and k the stored level index. `decode` reads (k, a, b) per element out of the block
bytes, `encode` writes new level indices into the same bytes (scale fields untouched): what a
rounding that keeps a block's scales but chooses its levels itself (GPTQ, edgeq/convert/gptq.py) needs.

Layouts are those of quants.py (llama.cpp's ggml-common.h); `a · LEVELS[k] + b` equals
`quants.dequantize` bit for bit up to float32 rounding (tests/test_gptq.py).
"""
from __future__ import annotations

import numpy as np

from edgeq.formats.quants import KVALUES_IQ4NL, QTYPES, _h, _k4_scale_min, _q3k_scales, iq4_xs_scales

_SH4 = np.array([0, 2, 4, 6], dtype=np.uint8)
_SH2 = np.array([0, 4], dtype=np.uint8)
_BITS8 = np.arange(8, dtype=np.uint8)


def _levels(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=np.float32)


# level index k → level value (ascending in k: nearest-level search relies on it)
LEVELS: dict[str, np.ndarray] = {
    "Q4_0": _levels(-8, 7), "Q4_1": _levels(0, 15), "Q5_0": _levels(-16, 15), "Q5_1": _levels(0, 31),
    "Q8_0": _levels(-128, 127), "Q2_K": _levels(0, 3), "Q3_K": _levels(-4, 3), "Q4_K": _levels(0, 15),
    "Q5_K": _levels(0, 31), "Q6_K": _levels(-32, 31),
    "IQ4_NL": KVALUES_IQ4NL.astype(np.float32), "IQ4_XS": KVALUES_IQ4NL.astype(np.float32),
}
GRID_TYPES = tuple(LEVELS)


def _per(v: np.ndarray, n: int, group: int, bs: int) -> np.ndarray:
    """(n, bs/group) per-group factors → (n, bs) per element."""
    return np.repeat(v.reshape(n, -1).astype(np.float32), group, axis=1).reshape(n, bs)


# ---------------------------------------------------------------- bit fields in element order

def _nib32(qs):          # (n, 16) → (n, 32): low nibbles first, then high (Q4_0/Q4_1/Q5_*/IQ4_NL)
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _put_nib32(k):
    return ((k[:, :16] & 15) | (k[:, 16:] << 4)).astype(np.uint8)


def _bits32(qh):         # (n, 4) → (n, 32): bit j of the little-endian uint32
    return np.unpackbits(qh, axis=1, bitorder="little")


def _put_bits32(bit):
    return np.packbits(bit.astype(np.uint8) & 1, axis=1, bitorder="little")


def _crumbs256(qs):      # (n, 64) → (n, 256): 2-bit fields, Q2_K/Q3_K order
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _SH4.reshape(1, 1, 4, 1)) & 3).reshape(n, 256)


def _put_crumbs256(k):
    n = k.shape[0]
    q = (k.reshape(n, 2, 4, 32).astype(np.uint8) & 3) << _SH4.reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(n, 64)


def _hbits256(h):        # (n, 32) → (n, 256): bit b of byte j is element 32·b + j (Q3_K hmask, Q5_K qh)
    n = h.shape[0]
    return ((h.reshape(n, 1, 32) >> _BITS8.reshape(1, 8, 1)) & 1).reshape(n, 256)


def _put_hbits256(bit):
    n = bit.shape[0]
    q = (bit.reshape(n, 8, 32).astype(np.uint8) & 1) << _BITS8.reshape(1, 8, 1)
    return np.bitwise_or.reduce(q, axis=1)


def _nib256(qs):         # (n, 128) → (n, 256): Q4_K/Q5_K order (32 bytes → low nibbles, then high)
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _SH2.reshape(1, 1, 2, 1)) & 15).reshape(n, 256)


def _put_nib256(k):
    n = k.shape[0]
    q = (k.reshape(n, 4, 2, 32).astype(np.uint8) & 15) << _SH2.reshape(1, 1, 2, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(n, 128)


def _nib_iq4xs(qs):      # (n, 128) → (n, 256): per 16 bytes, 16 low nibbles then 16 high
    n = qs.shape[0]
    return ((qs.reshape(n, 8, 1, 16) >> _SH2.reshape(1, 1, 2, 1)) & 15).reshape(n, 256)


def _put_nib_iq4xs(k):
    n = k.shape[0]
    q = (k.reshape(n, 8, 2, 16).astype(np.uint8) & 15) << _SH2.reshape(1, 1, 2, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(n, 128)


def _q6_lo(ql):          # (n, 128) → (n, 256) low 4 bits
    n = ql.shape[0]
    return ((ql.reshape(n, 2, 1, 64) >> _SH2.reshape(1, 1, 2, 1)) & 15).reshape(n, 256)


def _put_q6_lo(k):
    n = k.shape[0]
    q = (k.reshape(n, 2, 2, 64).astype(np.uint8) & 15) << _SH2.reshape(1, 1, 2, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(n, 128)


# ---------------------------------------------------------------- per type: (k, a, b) and back

def _decode(qtype: str, B: np.ndarray):
    n, bs = B.shape[0], QTYPES[qtype].block_size
    zero = np.zeros((n, bs), np.float32)
    if qtype in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        d = _per(_h(B[:, 0:2]), n, bs, bs)
        off = 4 if qtype in ("Q4_1", "Q5_1") else 2
        b = _per(_h(B[:, 2:4]), n, bs, bs) if off == 4 else zero
        if qtype == "Q8_0":
            return B[:, 2:].view(np.int8).astype(np.int16) + 128, d, b
        if qtype in ("Q4_0", "Q4_1"):
            return _nib32(B[:, off:]), d, b
        return _nib32(B[:, off + 4:]) | (_bits32(B[:, off:off + 4]) << 4), d, b
    if qtype == "Q2_K":
        d, dmin = _h(B[:, 80:82]), _h(B[:, 82:84])
        sc = B[:, :16]
        return (_crumbs256(B[:, 16:80]), _per(d * (sc & 15), n, 16, bs), -_per(dmin * (sc >> 4), n, 16, bs))
    if qtype == "Q3_K":
        d = _h(B[:, 108:110])
        k = _crumbs256(B[:, 32:96]) | (_hbits256(B[:, :32]) << 2)
        return k, _per(d * _q3k_scales(B[:, 96:108]).astype(np.float32), n, 16, bs), zero
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _h(B[:, 0:2]), _h(B[:, 2:4])
        sc, m = _k4_scale_min(B[:, 4:16])
        a, b = _per(d * sc, n, 32, bs), -_per(dmin * m, n, 32, bs)
        if qtype == "Q4_K":
            return _nib256(B[:, 16:144]), a, b
        return _nib256(B[:, 48:176]) | (_hbits256(B[:, 16:48]) << 4), a, b
    if qtype == "Q6_K":
        d = _h(B[:, 208:210])
        k = _q6_lo(B[:, :128]) | (_crumbs256(B[:, 128:192]) << 4)
        return k, _per(d * B[:, 192:208].view(np.int8).astype(np.float32), n, 16, bs), zero
    if qtype == "IQ4_NL":
        return _nib32(B[:, 2:18]), _per(_h(B[:, :2]), n, 32, bs), zero
    if qtype == "IQ4_XS":
        a = _per(_h(B[:, :2]) * iq4_xs_scales(B).astype(np.float32), n, 32, bs)
        return _nib_iq4xs(B[:, 8:]), a, zero
    raise ValueError(f"no level grid for {qtype}")


def _encode(qtype: str, B: np.ndarray, k: np.ndarray) -> np.ndarray:
    B = B.copy()
    if qtype == "Q8_0":
        B[:, 2:] = (k.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        off = 4 if qtype in ("Q4_1", "Q5_1") else 2
        if qtype in ("Q4_0", "Q4_1"):
            B[:, off:] = _put_nib32(k)
        else:
            B[:, off:off + 4] = _put_bits32(k >> 4)
            B[:, off + 4:] = _put_nib32(k)
    elif qtype == "Q2_K":
        B[:, 16:80] = _put_crumbs256(k)
    elif qtype == "Q3_K":
        B[:, 32:96] = _put_crumbs256(k)
        B[:, :32] = _put_hbits256(k >> 2)
    elif qtype == "Q4_K":
        B[:, 16:144] = _put_nib256(k)
    elif qtype == "Q5_K":
        B[:, 16:48] = _put_hbits256(k >> 4)
        B[:, 48:176] = _put_nib256(k)
    elif qtype == "Q6_K":
        B[:, :128] = _put_q6_lo(k)
        B[:, 128:192] = _put_crumbs256(k >> 4)
    elif qtype == "IQ4_NL":
        B[:, 2:18] = _put_nib32(k)
    elif qtype == "IQ4_XS":
        B[:, 8:] = _put_nib_iq4xs(k)
    else:
        raise ValueError(f"no level grid for {qtype}")
    return B


def decode(raw: np.ndarray, qtype: str, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of block bytes (rows, row_bytes) → level indices k (uint8/int16), a, b (float32), each (rows, n_cols)."""
    q = QTYPES[qtype]
    rows = raw.shape[0]
    k, a, b = _decode(qtype, np.ascontiguousarray(raw).reshape(-1, q.block_bytes))
    return k.reshape(rows, n_cols), a.reshape(rows, n_cols), b.reshape(rows, n_cols)


def encode(raw: np.ndarray, qtype: str, k: np.ndarray) -> np.ndarray:
    """The same rows with their level indices replaced by k (rows, n_cols); scale fields unchanged."""
    q = QTYPES[qtype]
    rows = raw.shape[0]
    blocks = _encode(qtype, np.ascontiguousarray(raw).reshape(-1, q.block_bytes),
                     np.asarray(k).reshape(-1, q.block_size).astype(np.int16))
    return blocks.reshape(rows, -1)


def nearest(w: np.ndarray, a: np.ndarray, b: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the grid point a·levels[k] + b nearest to w (elementwise; any sign of a; a = 0: level 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a != 0, (w - b) / a, levels[0])
    mid = (levels[1:] + levels[:-1]) * np.float32(0.5)
    return np.searchsorted(mid, t).astype(np.int16)
