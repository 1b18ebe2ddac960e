"""IEEE half precision <-> float32 in integer arithmetic, for Numba (which has no float16 on the CPU).

`f16_to_f32` is the one software half decoder of the kernels: the KV cache's f16 rows and half scales
(attention_q.py) and the GGUF f16 scales of linear.py on x86 without F16C. It is branch-free int32
arithmetic, so a loop of it vectorizes (`f16_row_to_f32`). The explicit-SIMD intrinsics cannot call it: they
emit LLVM IR, and simd._IR.half is their IR decoder (a different method, see there).
numpy twin: `bits.view(np.float16).astype(np.float32)` (tests/test_kv_cache.py checks every finite half).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(cache=True, fastmath=True, nogil=True)


@njit(inline="always", **_JIT)
def f16_to_f32(h):
    """IEEE half bits (any integer type holding them) -> float32: zero, subnormal and normal numbers (the kernels
    never store inf/nan). value = mantissa (with the implicit 1024 when e > 0) * 2^(max(e, 1) - 25), exact."""
    h = np.int32(h)
    e = (h >> np.int32(10)) & np.int32(31)
    mant = (h & np.int32(1023)) + (np.int32(1024) if e > 0 else np.int32(0))
    v = np.float32(mant) * np.float32(np.int32(1) << max(e, np.int32(1))) * np.float32(2.9802322387695312e-08)
    return -v if h & np.int32(0x8000) else v


@njit(**_JIT)
def f16_row_to_f32(src, dst):
    """dst[:] = src's half bits as float32 (vectorizes)."""
    for d in range(src.shape[0]):
        dst[d] = f16_to_f32(src[d])


@njit(**_JIT)
def f32_to_f16(x):
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
