"""IEEE half precision <-> float32 in integer arithmetic, for Numba (which has no float16 on the CPU).

`f16_to_f32` is the one software half decoder of the kernels: the KV cache's f16 rows and half scales
(attention_q.py) and the GGUF f16 scales of linear.py on x86 without F16C. It is branch-free int32
arithmetic, so a loop of it vectorizes (`f16_row_to_f32`). The explicit-SIMD intrinsics cannot call it: they
emit LLVM IR, and simd._IR.half is their IR decoder (a different method, see there).
numpy twin: `bits.view(np.float16).astype(np.float32)` (tests/test_kv_cache.py checks every finite half).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .simd import _HW_HALF

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


@intrinsic
def _f16x16_to_f32(typingctx, src, i, dst):
    """dst[i:i + 16] = the halves src[i:i + 16] as float32, in hardware (fpext of <16 x half>: vcvtph2ps on x86
    with F16C). C-contiguous 1-d arrays only."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (src, dst)):
        return None
    sig = types.void(src, types.intp, dst)

    def codegen(context, builder, signature, args):
        ps, pd = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 2))
        i = args[1]
        h = builder.load(builder.bitcast(builder.gep(ps, [i]), ir.VectorType(ir.IntType(16), 16).as_pointer()),
                         align=2)
        v = builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(ir.FloatType(), 16))
        builder.store(v, builder.bitcast(builder.gep(pd, [i]), v.type.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _f16x16(src, i, dst):
    """dst[i:i + 16] = src[i:i + 16]'s halves as float32 (typed per layout below)."""


@overload(_f16x16, jit_options=_JIT)
def _f16x16_impl(src, i, dst):
    if src.layout == "C" and dst.layout == "C":
        return lambda src, i, dst: _f16x16_to_f32(src, i, dst)

    def strided(src, i, dst):
        for d in range(16):
            dst[i + d] = f16_to_f32(src[i + d])
    return strided


@njit(**_JIT)
def f16_row_to_f32(src, dst):
    """dst[:] = src's half bits as float32: 16 at a time in hardware where the CPU converts halves (_HW_HALF) and
    both rows are contiguous, the rest with f16_to_f32 (a loop of it vectorizes)."""
    n = src.shape[0]
    i = 0
    if _HW_HALF:
        while i + 16 <= n:
            _f16x16(src, i, dst)
            i += 16
    for d in range(n - i):
        dst[i + d] = f16_to_f32(src[i + d])


@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its int32 bits (a bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, bits):
    """int32 bits -> the float32 they spell (a bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", **_JIT)
def f32_to_f16(x):
    """float32 -> IEEE half bits, rounded to nearest even; saturates at +-65504 instead of inf (the kernels never
    store inf/nan). Integer arithmetic on the bits (F. Giesen's float_to_half_fast3_rtne), so a loop of it
    vectorizes: subnormal halves by one float add that rounds x to a multiple of 2^-24, normal ones by adding
    the rounding bias (0xfff plus the lowest kept mantissa bit: ties to even) and dropping 13 mantissa bits."""
    bits = _f32_bits(np.float32(x))
    sign = (bits >> np.int32(16)) & np.int32(0x8000)
    a = bits & np.int32(0x7FFFFFFF)
    if a >= np.int32(0x477FE000):      # 65504 and above
        h = np.int32(0x7BFF)
    elif a < np.int32(0x38800000):     # below 2^-14: a subnormal half (or zero)
        h = _f32_bits(_bits_f32(a) + np.float32(0.5)) - np.int32(0x3F000000)
    else:
        h = (a + np.int32(-0x37FFF001) + ((a >> np.int32(13)) & np.int32(1))) >> np.int32(13)
    return np.uint16(h | sign)


@njit(**_JIT)
def f32_row_to_f16(src, dst):
    """dst[:] = src's float32 values as half bits (vectorizes)."""
    for d in range(src.shape[0]):
        dst[d] = f32_to_f16(src[d])


@njit(**_JIT)
def to_half(x):
    """A C-contiguous float32 array -> its half bits (uint16, same shape; f32_to_f16: saturating). numpy's
    astype(float16) took 1.6 ns a value (no F16C path), most of a prompt's per-channel key store."""
    out = np.empty(x.shape, np.uint16)
    f32_row_to_f16(x.reshape(x.size), out.reshape(out.size))
    return out


@njit(**_JIT)
def from_half(h):
    """A C-contiguous array of half bits -> float32 values (same shape)."""
    out = np.empty(h.shape, np.float32)
    f16_row_to_f32(h.reshape(h.size), out.reshape(out.size))
    return out
