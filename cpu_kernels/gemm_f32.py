"""Prefill's float32 GEMM, out = X W^T, on an explicit SIMD micro-kernel: the float matrices' products (F32, and
F16/BF16 or any type without an int8 GEMM, dequantized a tile of rows at a time by linear.QuantLinear).

A dot-product loop (a weight row against an activation row, reduced over k) needs as many loads as FMAs and a
horizontal sum per output; this is the outer-product form of BLIS and llama.cpp's tinyBLAS instead:

* each group of TILE_ROWS weight rows is copied once into a buffer of its thread transposed, k-major
  (`tile[k, i]` = weight k of row i), half floats (F16, BF16) converted on the way: one vector load then holds
  weight k of VW rows;
* the micro-kernel `_micro` keeps _MG x _MT accumulators of VW floats in registers (row vectors x tokens) and, per
  k, loads _MG weight vectors and broadcasts one activation of each of _MT tokens: _MG + _MT loads per _MG x _MT
  FMAs (2 + 8 per 16 with 512-bit registers, 2 + 6 per 12 with 256-bit ones), no horizontal sums;
* the tile is reused by every token of the call (32 rows x n floats: 256 KB at n = 2048, in L2).

Each output is one chain of FMAs over k in order (float32), where numpy's BLAS reassociates: equal up to float32
rounding (the numpy twin in tests/test_gemm_f32.py).
"""
from __future__ import annotations

import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .linear import _bf16_to_f32, _half
from .simd import F32, I32, I64, _IR, _vec, data_ptrs

_WIDE = simd.LEVEL != "generic" and all(simd.llvm_binding.get_host_cpu_features().get(f)
                                        for f in ("avx512f", "avx512vl"))
VW = 16 if _WIDE else 8          # floats per vector register
# rows (in vectors) x tokens per micro-kernel call: 16 accumulators of 32 zmm registers, 12 of 16 ymm registers
_MG, _MT = (2, 8) if _WIDE else (2, 6)
TILE_ROWS = VW * _MG  # weight rows per parallel job (one tile)


def _micro_impl(typingctx, tile, X, t, n, res):
    """res[j, VW i + l] = sum over k < n of tile[k, VW i + l] * X[t + j, k] (i < _MG, j < _MT, l < VW); tile (n,
    TILE_ROWS), X (T, n), res (_MT, TILE_ROWS) float32, C-contiguous; the caller keeps t + _MT <= T (no bounds
    checks here)."""
    sig = types.void(tile, X, types.intp, types.intp, res)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pw, px, pr = data_ptrs(context, builder, signature, args, (0, 1, 4))
        t, n = args[2], args[3]
        c = lambda v: ir.Constant(I64, v)  # noqa: E731
        vf = _vec(F32, VW)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(_MT)] for _ in range(_MG)]
        rows = [builder.mul(builder.add(t, c(j)), n) for j in range(_MT)]  # element offset of each token's row
        with cgutils.for_range(builder, n) as loop:
            k = loop.index
            w = [x.at(pw, builder.mul(builder.add(builder.mul(k, c(TILE_ROWS)), c(VW * i)), c(4)), vf)
                 for i in range(_MG)]
            for j in range(_MT):
                a = x.splat(x.elem(px, builder.add(rows[j], k), F32), VW)
                for i in range(_MG):
                    builder.store(x.intr(f"llvm.fma.v{VW}f32", vf, [w[i], a, builder.load(acc[i][j])]), acc[i][j])
        out = builder.bitcast(pr, vf.as_pointer())
        for j in range(_MT):
            for i in range(_MG):
                builder.store(builder.load(acc[i][j]), builder.gep(out, [ir.Constant(I32, j * _MG + i)]), align=4)
        return context.get_dummy_value()
    return sig, codegen


_micro_impl.__name__ = _micro_impl.__qualname__ = f"fdot{TILE_ROWS}x{_MT}"
_micro = intrinsic(_micro_impl)


# ---------------------------------------------------------------- building the tile: 16 x 16 blocks transposed
def _transposer(kind: str):
    """An intrinsic t(W, row, k0, tile, col): tile[k0 + c, col + r] = W[row + r, k0 + c] for r, c < 16, the
    elements converted from `kind` ("F32", "F16": half bits, "BF16": the high half of a float32). The 16 rows
    are loaded as vectors and transposed in registers (4 rounds of two-input shuffles, each swapping the
    off-diagonal blocks of every 2s x 2s block), so the tile is written 16 floats at a time instead of one scalar
    store per weight. W (R, n), tile (n, TILE_ROWS), C-contiguous; no bounds checks (the caller's)."""
    esize = 4 if kind == "F32" else 2

    def impl(typingctx, W, row, k0, tile, col):
        sig = types.void(W, types.intp, types.intp, tile, types.intp)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pw, pt = data_ptrs(context, builder, signature, args, (0, 3))
            row, k0, col = args[1], args[2], args[4]
            n = builder.extract_value(context.make_array(signature.args[0])(context, builder, args[0]).shape, 1)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            vf = _vec(F32, 16)
            v = []
            for r in range(16):
                off = builder.mul(builder.add(builder.mul(builder.add(row, c(r)), n), k0), c(esize))
                if kind == "F32":
                    v.append(x.at(pw, off, vf))
                elif kind == "F16":
                    h = x.at(pw, off, _vec(ir.IntType(16), 16))
                    v.append(builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 16)), vf))
                else:
                    h = builder.zext(x.at(pw, off, _vec(ir.IntType(16), 16)), _vec(I32, 16))
                    v.append(builder.bitcast(builder.shl(h, x.const(I32, 16, 16)), vf))
            for s_ in (8, 4, 2, 1):
                for p in range(16):
                    if p & s_:
                        continue
                    q = p + s_
                    lo = [j if not j & s_ else 16 + j - s_ for j in range(16)]
                    hi = [j + s_ if not j & s_ else 16 + j for j in range(16)]
                    v[p], v[q] = (builder.shuffle_vector(v[p], v[q], ir.Constant(_vec(I32, 16), lo)),
                                  builder.shuffle_vector(v[p], v[q], ir.Constant(_vec(I32, 16), hi)))
            for r in range(16):
                off = builder.mul(builder.add(builder.mul(builder.add(k0, c(r)), c(TILE_ROWS)), col), c(4))
                builder.store(v[r], builder.bitcast(builder.gep(pt, [off]), vf.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    impl.__name__ = impl.__qualname__ = f"transpose16_{kind.lower()}"
    return intrinsic(impl)


# ---------------------------------------------------------------- the parallel driver, one per weight encoding
_conv = _transpose16 = None  # bound per encoding by _specialize: an element of W -> float32, 16 x 16 blocks


def _gemm_template(W, X, out, r0):
    """out[:, r0:r0+R] = X @ W.T for W (R, n) (float32, or half bits converted by `_conv`) and X (T, n) float32,
    C-contiguous."""
    R, n = W.shape
    T = X.shape[0]
    TR = TILE_ROWS
    t_full = T - T % _MT
    for g in prange((R + TR - 1) // TR):
        a = g * TR
        nr = min(TR, R - a)
        tile = np.empty((n, TR), np.float32)
        if nr < TR:  # the last group: zeros in the columns past its rows
            for k in range(n):
                for i in range(nr, TR):
                    tile[k, i] = 0.0
        i16, k16 = nr - nr % 16, n - n % 16
        for i0 in range(0, i16, 16):
            for k0 in range(0, k16, 16):
                _transpose16(W, a + i0, k0, tile, i0)
        for i in range(nr):  # what the 16 x 16 blocks leave: the last rows, the last columns
            w = W[a + i]
            for k in range(k16 if i < i16 else 0, n):
                tile[k, i] = _conv(w[k])
        res = np.empty((_MT, TR), np.float32)
        for t in range(0, t_full, _MT):
            _micro(tile, X, t, n, res)
            for j in range(_MT):
                for i in range(nr):
                    out[t + j, r0 + a + i] = res[j, i]
        if t_full < T:  # the last tokens, padded with zero rows
            xt = np.zeros((_MT, n), np.float32)
            for j in range(T - t_full):
                for k in range(n):
                    xt[j, k] = X[t_full + j, k]
            _micro(tile, xt, 0, n, res)
            for j in range(T - t_full):
                for i in range(nr):
                    out[t_full + j, r0 + a + i] = res[j, i]


@njit(inline="always", cache=True, fastmath=True, nogil=True)
def _same(v):
    return v


def _specialize(name: str, conv, kind: str):
    """The driver reading W through `conv` (as linear._specialize: a function with its own globals, so the on-disk
    cache finds it)."""
    bound = dict(_gemm_template.__globals__, _conv=conv, _transpose16=_transposer(kind))
    fn = pytypes.FunctionType(_gemm_template.__code__, bound, name)
    fn.__qualname__ = name
    fn.__doc__ = _gemm_template.__doc__
    return njit(parallel=True, cache=True, fastmath=True, nogil=True)(fn)


gemm_f32 = _specialize("gemm_f32", _same, "F32")  # W float32
# W as the uint16 bits of half floats (F16, BF16): converted as the tile is built, no float32 copy of the matrix
GEMM_HALF = {"F16": _specialize("gemm_f16", _half, "F16"), "BF16": _specialize("gemm_bf16", _bf16_to_f32, "BF16")}
