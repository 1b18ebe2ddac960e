"""Quantization codecs: one class per GGML type, registered by name in `QTYPES`, with vectorised numpy
block codecs (`quantize_blocks` / `dequantize_blocks`) and the stable API `quantize` / `dequantize`.

Byte layouts are llama.cpp's (ggml-common.h). `dequantize` is bit-exact with `gguf.quants.dequantize`.
`quantize` produces the bytes of llama.cpp's `ggml_quantize_chunk` (tests/test_codecs.py checks both):
- without importance, the reference quantizers (`quantize_row_*_ref`): numpy formulas here for
  F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q8_K (identical to gguf-py's), the k-quant scale searches
  (make_qkx2_quants, make_q3_quants, make_qx_quants) in formats/kquant_search.py (Numba);
- with an importance vector (one non-negative weight per column, llama.cpp's imatrix), the importance-aware
  quantizers (`quantize_row_*_impl`, make_qkx3_quants / make_qp_quants / make_qx_quants with weights
  importance[j] * sqrt(sigma2 + x[j]^2)) for Q4_0/Q4_1/Q5_0/Q5_1 and the k-quants; F16/BF16/Q8_0/Q8_K
  ignore it, as llama.cpp does;
- IQ4_NL / IQ4_XS (4-bit indices into a fixed non-linear table): llama.cpp's one quantizer for both
  (`quantize_row_iq4_nl_impl`, a weighted search over 15 scale candidates, weights x^2 or the importance
  form), in formats/kquant_search.py.
"""
from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
QTYPES: dict[str, "QType"] = {}


def _f16(a) -> np.ndarray:
    """float32 -> fp16 bytes (round to nearest even, as GGML_FP32_TO_FP16; too large -> inf, as in C)."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=np.float32).astype(np.float16).view(np.uint8)


def _h(raw: np.ndarray) -> np.ndarray:
    """fp16 bytes (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


class QType:
    """A GGML tensor type: `block_size` values stored in `block_bytes` bytes."""

    name: str
    type_id: int
    block_size: int
    block_bytes: int

    def __init_subclass__(cls, name: str | None, **kw):
        super().__init_subclass__(**kw)
        if name is None:        # an abstract helper base
            return
        cls.name = name
        cls.type_id = int(GGMLQuantizationType[name])
        cls.block_size, cls.block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        QTYPES[name] = cls

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """float32 (n, block_size) -> uint8 (n, block_bytes), reference formulas (no importance)."""
        raise NotImplementedError(f"quantization to {cls.name} is not implemented")

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """uint8 (n, block_bytes) -> float32 (n, block_size)."""
        raise NotImplementedError

    @classmethod
    def quantize_rows(cls, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        """float32 (rows, cols) -> uint8 (rows, row_bytes). Types that use the importance override this."""
        rows, cols = x.shape
        out = cls.quantize_blocks(x.reshape(-1, cls.block_size))
        return out.reshape(rows, cols // cls.block_size * cls.block_bytes)


# ---------------------------------------------------------------- float types

class F32(QType, name="F32"):
    @classmethod
    def quantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks).view(np.float32).copy()


class F16(QType, name="F16"):
    @classmethod
    def quantize_blocks(cls, blocks):
        return _f16(blocks)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


class BF16(QType, name="BF16"):
    @classmethod
    def quantize_blocks(cls, blocks):
        # ggml_compute_fp32_to_bf16: NaN -> quiet NaN, otherwise round to nearest even on the upper half
        u = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = np.where(nan, (u >> 16) | 64, r)
        return r.astype(np.uint16).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks):
        u = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32)


# ---------------------------------------------------------------- 32-value block types

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes -> (n, 32) bit j of the little-endian uint32 (0/1)."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes of their bit 4."""
    return np.packbits((q >> 4).astype(np.uint8) & 1, axis=1, bitorder="little")


def _absmax_signed(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude per block (first one on ties, as llama.cpp's loop), (n, 1);
    +0.0 for an all-zero block (the loop's initial value, whatever the zeros' signs)."""
    i = np.abs(blocks).argmax(axis=1)[:, None]
    m = np.take_along_axis(blocks, i, axis=1)
    return np.where(m == 0, np.float32(0), m)


def _min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max (n, 1), the first occurrence on ties (the sign of a zero follows llama.cpp)."""
    mn = np.take_along_axis(blocks, blocks.argmin(axis=1)[:, None], axis=1)
    mx = np.take_along_axis(blocks, blocks.argmax(axis=1)[:, None], axis=1)
    return mn, mx


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _trunc_u8(v: np.ndarray, hi: int) -> np.ndarray:
    """C's MIN(hi, (int8_t)v) for v >= 0."""
    return np.minimum(np.trunc(v), hi).astype(np.uint8)


class _ImportanceSearched(QType, name=None):
    """A type quantized by its formula, or with an importance vector by a search in formats/kquant_search.py
    (`_kernel_w`)."""
    _kernel_w: str

    @classmethod
    def quantize_rows(cls, x, importance):
        if importance is None:
            return super().quantize_rows(x, None)
        return _search(cls._kernel_w, x, importance, cls, with_flag=False)


class Q8_0(QType, name="Q8_0"):
    @classmethod
    def quantize_blocks(cls, blocks):
        d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
        v = blocks * _inv(d)
        return np.concatenate([_f16(d), _roundf(v).view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _h(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) of float32 values, as int8."""
    a = np.abs(v)
    f = np.floor(a)
    r = f + (a - f >= np.float32(0.5))
    return (np.sign(v) * r).astype(np.int8)


class Q4_0(_ImportanceSearched, name="Q4_0"):
    _kernel_w = "quantize_q4_0_w"

    @classmethod
    def quantize_blocks(cls, blocks):
        d = (_absmax_signed(blocks) / np.float32(-8)).astype(np.float32)
        q = _trunc_u8(blocks * _inv(d) + np.float32(8.5), 15)
        return np.concatenate([_f16(d), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _h(blocks[:, :2])
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)


class Q4_1(_ImportanceSearched, name="Q4_1"):
    _kernel_w = "quantize_q4_1_w"

    @classmethod
    def quantize_blocks(cls, blocks):
        mn, mx = _min_max(blocks)
        d = ((mx - mn) / np.float32(15)).astype(np.float32)
        q = _trunc_u8((blocks - mn) * _inv(d) + np.float32(0.5), 15)
        return np.concatenate([_f16(d), _f16(mn), _pack_nibbles(q)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _h(blocks[:, 0:2]), _h(blocks[:, 2:4])
        return d * _nibbles(blocks[:, 4:]).astype(np.float32) + m


class Q5_0(_ImportanceSearched, name="Q5_0"):
    _kernel_w = "quantize_q5_0_w"

    @classmethod
    def quantize_blocks(cls, blocks):
        d = (_absmax_signed(blocks) / np.float32(-16)).astype(np.float32)
        q = _trunc_u8(blocks * _inv(d) + np.float32(16.5), 31)
        return np.concatenate([_f16(d), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _h(blocks[:, :2])
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


class Q5_1(_ImportanceSearched, name="Q5_1"):
    _kernel_w = "quantize_q5_1_w"

    @classmethod
    def quantize_blocks(cls, blocks):
        mn, mx = _min_max(blocks)
        d = ((mx - mn) / np.float32(31)).astype(np.float32)
        q = np.trunc((blocks - mn) * _inv(d) + np.float32(0.5)).astype(np.uint8)
        return np.concatenate([_f16(d), _f16(mn), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _h(blocks[:, 0:2]), _h(blocks[:, 2:4])
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
        return d * q.astype(np.float32) + m


# ---------------------------------------------------------------- searched quantizers (Numba)

def _search(kernel: str, x: np.ndarray, importance: np.ndarray | None, qtype: type[QType],
            with_flag: bool = True) -> np.ndarray:
    """Run a row kernel of formats/kquant_search.py (imported on first use: it compiles with Numba)."""
    from edgeq.formats import kquant_search

    rows, cols = x.shape
    out = np.zeros((rows, cols // qtype.block_size * qtype.block_bytes), dtype=np.uint8)
    fn = getattr(kquant_search, kernel)
    if with_flag:
        qw = importance if importance is not None else np.zeros(0, dtype=np.float32)
        fn(x, qw, importance is not None, out)
    else:
        fn(x, importance, out)
    return out


class _Searched(QType, name=None):
    """A type whose quantizer is a search in formats/kquant_search.py (`_kernel`, with importance or not)."""
    _kernel: str

    @classmethod
    def quantize_blocks(cls, blocks):
        return cls.quantize_rows(blocks.reshape(1, -1), None).reshape(-1, cls.block_bytes)

    @classmethod
    def quantize_rows(cls, x, importance):
        return _search(cls._kernel, x, importance, cls)


# ---------------------------------------------------------------- k-quants (256-value super-blocks)

def _k4_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes (n, 12) -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scale, mins


def _q4k_values(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32) 4-bit values in element order."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, 8, 32)


def _k45_dequantize(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K blocks (n, block_bytes) with their levels q (n, 8, 32) -> float32 (n, 256):
    d * scale * q - dmin * min per 32-value sub-block (d, dmin and the 12 packed scale bytes lead the block)."""
    n = blocks.shape[0]
    d, dmin = _h(blocks[:, 0:2]), _h(blocks[:, 2:4])
    sc, m = _k4_scale_min(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * m.astype(np.float32)).reshape(n, 8, 1)
    return (dl * q.astype(np.float32) - ml).reshape(n, QK_K)


class Q2_K(_Searched, name="Q2_K"):
    _kernel = "quantize_q2_k"

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        sc, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _h(blocks[:, 80:82]), _h(blocks[:, 82:84])
        dl = (d * (sc & 0x0F).astype(np.float32)).reshape(n, 16, 1)
        ml = (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
        q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = q.reshape(n, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


def _q3k_scales(sc: np.ndarray) -> np.ndarray:
    """12 packed bytes (n, 12) -> 16 signed scales (n, 16) in -32..31."""
    lo = np.concatenate([sc[:, :8] & 0x0F, sc[:, :8] >> 4], axis=1)
    hi = (sc[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    return (lo | (hi.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)


class Q3_K(_Searched, name="Q3_K"):
    _kernel = "quantize_q3_k"

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = _h(blocks[:, 108:110])
        dl = (d * _q3k_scales(sc).astype(np.float32)).reshape(n, 16, 1)
        ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = ql.reshape(n, 8, 32).astype(np.int8) - ((qh ^ 1) << 2).astype(np.int8)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q4_K(_Searched, name="Q4_K"):
    _kernel = "quantize_q4_k"

    @classmethod
    def dequantize_blocks(cls, blocks):
        return _k45_dequantize(blocks, _q4k_values(blocks[:, 16:144]))


class Q5_K(_Searched, name="Q5_K"):
    _kernel = "quantize_q5_k"

    @classmethod
    def dequantize_blocks(cls, blocks):
        qh = (blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        return _k45_dequantize(blocks, _q4k_values(blocks[:, 48:176]) | (qh << 4))


class Q6_K(_Searched, name="Q6_K"):
    _kernel = "quantize_q6_k"

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        ql, qh, sc = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
        d = _h(blocks[:, 208:210])
        dl = (d * sc.view(np.int8).astype(np.float32)).reshape(n, 16, 1)
        lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q8_K(QType, name="Q8_K"):
    @classmethod
    def quantize_blocks(cls, blocks):
        # quantize_row_q8_K_ref: scale from the signed value of largest magnitude, nearest_int, clamp 127
        mx = _absmax_signed(blocks)
        amax = np.abs(mx)
        with np.errstate(divide="ignore"):
            iscale = np.where(amax == 0, np.float32(0), np.float32(-127) / mx).astype(np.float32)
            d = np.where(amax == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
        q = np.minimum(np.rint(iscale * blocks), 127).astype(np.int8)
        bsums = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = np.ascontiguousarray(blocks[:, :4]).view(np.float32)
        return blocks[:, 4:260].view(np.int8).astype(np.float32) * d


# ---------------------------------------------------------------- i-quants with a non-linear table

# the 16 levels of IQ4_NL / IQ4_XS (ggml-common.h kvalues_iq4nl): 4-bit codes index this table
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _iq4_values(qs: np.ndarray) -> np.ndarray:
    """(n, 16k) bytes -> (n, k, 32) float32 table levels; per 16 bytes, low nibbles first then high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return KVALUES_IQ4NL[(q & 0x0F).reshape(n, -1, 32)].astype(np.float32)


def iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS blocks (n, 136) -> the 8 signed 6-bit sub-block scales (n, 8) in -32..31: the low 4 bits in
    scales_l (bytes 4..7, sub-block 2i low nibble, 2i+1 high nibble), the high 2 bits in scales_h (bytes 2..3)."""
    n = blocks.shape[0]
    lo = (blocks[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    sh = np.ascontiguousarray(blocks[:, 2:4]).view(np.uint16)
    hi = ((sh >> np.arange(0, 16, 2, dtype=np.uint16)) & 3).astype(np.uint8)
    return (lo | (hi << 4)).astype(np.int8) - np.int8(32)


class IQ4_NL(_Searched, name="IQ4_NL"):
    """32 values: d (f16), 16 bytes of 4-bit indices into KVALUES_IQ4NL; w = d * table[q]."""
    _kernel = "quantize_iq4_nl"

    @classmethod
    def dequantize_blocks(cls, blocks):
        return _h(blocks[:, :2]) * _iq4_values(blocks[:, 2:]).reshape(-1, 32)


class IQ4_XS(_Searched, name="IQ4_XS"):
    """256 values: d (f16), scales_h (u16), scales_l[4], 128 bytes of indices; w = d * (scale - 32) * table[q]."""
    _kernel = "quantize_iq4_xs"

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl = (_h(blocks[:, :2]) * iq4_xs_scales(blocks).astype(np.float32)).reshape(n, 8, 1)
        return (dl * _iq4_values(blocks[:, 8:])).reshape(n, QK_K)


# ---------------------------------------------------------------- public API

def _qtype(qtype: str) -> type[QType]:
    try:
        return QTYPES[qtype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization type {qtype!r} (known: {', '.join(QTYPES)})") from None


def block_size(qtype: str) -> int:
    return _qtype(qtype).block_size


def block_bytes(qtype: str) -> int:
    return _qtype(qtype).block_bytes


def row_bytes(qtype: str, n: int) -> int:
    q = _qtype(qtype)
    if n % q.block_size:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of the {qtype} block size {q.block_size}")
    return n // q.block_size * q.block_bytes


def quantize(x: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes), llama.cpp's bytes.

    `importance` (cols,), non-negative, weighs the error per column (llama.cpp's imatrix); F16/BF16/Q8_0/Q8_K
    ignore it. ValueError for an unknown type, a row length that is not a multiple of the block size,
    non-finite input, or a bad importance vector. Values too large for the fp16 block scales (|x| beyond
    ~65504 times the level count) give inf scales, as in llama.cpp."""
    q = _qtype(qtype)
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array (rows, cols), got shape {x.shape}")
    rows, cols = x.shape
    n_bytes = row_bytes(qtype, cols)  # also refuses a width that is not whole blocks
    x = np.ascontiguousarray(x, dtype=np.float32)
    step = max(1, _QUANT_CHUNK_VALUES // max(cols, 1))  # rows per pass: bounds the temporaries (rows are independent)
    for r0 in range(0, rows, step):   # (a bool per value of a 262k-row classifier at once: +311 MB of peak RSS)
        if not np.isfinite(x[r0:r0 + step]).all():
            raise ValueError(f"cannot quantize to {qtype}: input has non-finite values (nan/inf)")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape != (cols,):
            raise ValueError(f"importance has {importance.size} values, expected one per column ({cols})")
        if not np.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("importance must be finite and non-negative")
    out = np.empty((rows, n_bytes), dtype=np.uint8)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # IEEE semantics, as llama.cpp's C
        for r0 in range(0, rows, step):
            out[r0:r0 + step] = q.quantize_rows(x[r0:r0 + step], importance)
    return out


_QUANT_CHUNK_VALUES = 1 << 22  # values per quantize pass (16 MB of float32)


_DEQUANT_CHUNK = 1 << 15  # blocks per numpy pass: bounds the temporaries for large tables


def dequantize(raw: np.ndarray, qtype: str, shape: tuple) -> np.ndarray:
    """uint8 bytes (any shape, contiguous) -> float32 array of `shape`."""
    q = _qtype(qtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n % q.block_size:
        raise ValueError(f"{qtype}: {n} values is not a multiple of the {qtype} block size {q.block_size}")
    nb = n // q.block_size
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.nbytes != nb * q.block_bytes:
        raise ValueError(f"{qtype} tensor of shape {shape} needs {nb * q.block_bytes} bytes, got {raw.nbytes}")
    blocks = np.ascontiguousarray(raw).reshape(nb, q.block_bytes)
    out = np.empty((nb, q.block_size), dtype=np.float32)
    for s in range(0, nb, _DEQUANT_CHUNK):
        out[s:s + _DEQUANT_CHUNK] = q.dequantize_blocks(blocks[s:s + _DEQUANT_CHUNK])
    return out.reshape(shape)
