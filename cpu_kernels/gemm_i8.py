"""Prefill on int8 dot products: the weight matrix unpacked once per tile of rows, reused for every token.

The float prefill path (linear.QuantLinear with T >= _GEMM_MIN_T rows) dequantizes weight tiles to float32
and runs a float GEMM; this one keeps both sides in bytes, as llama.cpp's prefill does:

* activations: quantized once per 32 values (`quantize_act`: int8 codes `qx`, scales `dx`, and `xs` = the
  float sum of each 16 activations, dx * sum of their codes, for the weights' offsets);
* weights: each group of _ROWS rows is unpacked by its type's `_unpack_<type>` into unsigned byte codes and
  two floats per 16 weights, w = scl * code - mins (every type below fits that form: Q8_0's signed bytes
  get +128 and an offset of 128 d, Q6_K's 6-bit codes an offset of 32 d sc, ...), in a buffer of the
  thread that uses it (~1.5 bytes per weight, _ROWS rows: L2 sized);
* the micro-kernel `_dot_tile` (explicit SIMD, cpu_kernels/simd.py's byte dot: vpdpbusd on VNNI) multiplies
  _MR unpacked rows by _MT token rows: per 32 weights _MR x _MT byte dots, each converted to float once and
  scaled by scl * dx; the offsets add a 2-wide dot of mins and xs.

Row = sum over blocks of dx * (scl . codes x qx) - mins . xs, exactly W . dequant(quant(x)) up to float32
rounding (the numpy twin in tests/test_gemm_i8.py). Which types take this path is decided by measurement
(benchmarks/prefill_gemm_bench.py, docs/performance.md): `use_int8`.
"""
from __future__ import annotations

import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .linear import _FAST, _JIT, QK, _h2f, _i8, _k_scale_min, _quantize_block, _u32
from .simd import F32, I8, I64, _IR, _vec, data_ptrs

from edgeq.formats.quants import QTYPES

_ROWS = 32   # weight rows unpacked at once per thread (a multiple of the micro-kernel's _MR)


# ---------------------------------------------------------------- activations
@njit(parallel=True, **_JIT)
def quantize_act(X, qx, dx, xs):
    """X (T, n) float32 -> qx int8 (T', n) codes per 32 values, dx (T', n/32) their scales, xs (T', n/16) the
    float sums dx * (sum of 16 codes). Rows T..T'-1 (padding) are left as they are (zeros)."""
    T, n = X.shape
    for t in prange(T):
        for b in range(n // QK):
            d, s0, s1 = _quantize_block(X[t, b * QK:(b + 1) * QK], qx[t], b * QK)
            xs[t, 2 * b] = d * np.float32(s0)
            xs[t, 2 * b + 1] = d * np.float32(s1)
            dx[t, b] = d


# ---------------------------------------------------------------- weights: one row -> codes, scl, mins
# codes uint8 (n,), scl and mins float32 (n/16,): w[i] = scl[i // 16] * codes[i] - mins[i // 16]
@njit(inline="always", **_JIT)
def _unpack_q8_0(row, n, codes, scl, mins):
    for b in range(n // 32):
        d = _h2f(row[b * 34], row[b * 34 + 1])
        for j in range(32):
            codes[b * 32 + j] = row[b * 34 + 2 + j] ^ np.uint8(128)  # int8 q + 128
        scl[2 * b] = scl[2 * b + 1] = d
        mins[2 * b] = mins[2 * b + 1] = np.float32(128.0) * d


@njit(inline="always", **_JIT)
def _unpack_q4_0(row, n, codes, scl, mins):
    for b in range(n // 32):
        d = _h2f(row[b * 18], row[b * 18 + 1])
        for j in range(16):
            v = row[b * 18 + 2 + j]
            codes[b * 32 + j] = v & np.uint8(15)
            codes[b * 32 + 16 + j] = v >> np.uint8(4)
        scl[2 * b] = scl[2 * b + 1] = d
        mins[2 * b] = mins[2 * b + 1] = np.float32(8.0) * d


@njit(inline="always", **_JIT)
def _unpack_q5_0(row, n, codes, scl, mins):
    for b in range(n // 32):
        o = b * 22
        d = _h2f(row[o], row[o + 1])
        qh = _u32(row, o + 2)
        for j in range(16):
            v = np.int32(row[o + 6 + j])
            codes[b * 32 + j] = (v & 15) | (((qh >> j) & 1) << 4)
            codes[b * 32 + 16 + j] = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
        scl[2 * b] = scl[2 * b + 1] = d
        mins[2 * b] = mins[2 * b + 1] = np.float32(16.0) * d


@njit(inline="always", **_JIT)
def _unpack_k45(row, n, codes, scl, mins, block_bytes, qs_off, fifth_bits):
    """Q4_K / Q5_K (see linear._dq_k45): w = d * sc * q - dmin * mn per 32."""
    for sb in range(n // 256):
        o = sb * block_bytes
        d = _h2f(row[o], row[o + 1])
        dmin = _h2f(row[o + 2], row[o + 3])
        sc = row[o + 4:o + 16]
        for k in range(8):
            a, m = _k_scale_min(sc, k)
            i = sb * 16 + 2 * k
            scl[i] = scl[i + 1] = d * np.float32(a)
            mins[i] = mins[i + 1] = dmin * np.float32(m)
            sh = 4 * (k & 1)
            for j in range(32):
                q = (np.int32(row[o + qs_off + (k >> 1) * 32 + j]) >> sh) & 15
                if fifth_bits:
                    q |= ((np.int32(row[o + 16 + j]) >> k) & 1) << 4
                codes[sb * 256 + k * 32 + j] = q


@njit(inline="always", **_JIT)
def _unpack_q4_k(row, n, codes, scl, mins):
    _unpack_k45(row, n, codes, scl, mins, QTYPES_Q4_K_BYTES, 16, False)


@njit(inline="always", **_JIT)
def _unpack_q5_k(row, n, codes, scl, mins):
    _unpack_k45(row, n, codes, scl, mins, QTYPES_Q5_K_BYTES, 48, True)


@njit(inline="always", **_JIT)
def _unpack_q6_k(row, n, codes, scl, mins):
    """Q6_K (see linear._dq_q6_k): w = d * sc * (q - 32) per 16."""
    for sb in range(n // 256):
        o = sb * 210
        d = _h2f(row[o + 208], row[o + 209])
        for i in range(16):
            s = d * np.float32(_i8(row[o + 192 + i]))
            scl[sb * 16 + i] = s
            mins[sb * 16 + i] = np.float32(32.0) * s
        for k in range(8):
            h = k >> 2
            kk = k & 3
            sl = 4 * (kk >> 1)
            shh = 2 * kk
            for j in range(32):
                ql = (np.int32(row[o + h * 64 + (kk & 1) * 32 + j]) >> sl) & 15
                qh = (np.int32(row[o + 128 + h * 32 + j]) >> shh) & 3
                codes[sb * 256 + k * 32 + j] = ql | (qh << 4)


QTYPES_Q4_K_BYTES, QTYPES_Q5_K_BYTES = QTYPES["Q4_K"].block_bytes, QTYPES["Q5_K"].block_bytes
_UNPACK = {"Q8_0": _unpack_q8_0, "Q4_0": _unpack_q4_0, "Q5_0": _unpack_q5_0, "Q4_K": _unpack_q4_k,
           "Q5_K": _unpack_q5_k, "Q6_K": _unpack_q6_k}
# the largest code of each type: the AVX2 byte dot (vpmaddubsw) saturates its int16 pair sums past 127 x 128
_MAX_CODE = {"Q8_0": 255, "Q4_0": 15, "Q5_0": 31, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63}


# ---------------------------------------------------------------- the micro-kernel: _MR weight rows x _MT tokens
_MR, _MT = 4, 2   # 8 byte dots per block from 4 + 2 loads of 32 bytes


def _micro(nr: int, nt: int):
    """An intrinsic k(codes, scl, mins, r, qx, dx, xs, t, nb, res): res[nt i + j] = row r+i of the unpacked tile .
    token row t+j (i < nr, j < nt), over nb blocks of 32. codes (R, 32 nb) uint8, scl/mins (R, 2 nb) float32,
    qx (T, 32 nb) int8, dx (T, nb), xs (T, 2 nb) float32, all C-contiguous; the caller keeps r + nr <= R and
    t + nt <= T (no bounds checks here)."""
    def impl(typingctx, codes, scl, mins, r, qx, dx, xs, t, nb, res):
        sig = types.void(codes, scl, mins, types.intp, qx, dx, xs, types.intp, types.intp, res)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pc, ps, pm, pq, pd, px, pr = data_ptrs(context, builder, signature, args, (0, 1, 2, 4, 5, 6, 9))
            r, t, nb = args[3], args[7], args[8]
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            n, nb2 = builder.mul(nb, c(32)), builder.mul(nb, c(2))
            rows = [builder.add(r, c(i)) for i in range(nr)]
            toks = [builder.add(t, c(j)) for j in range(nt)]
            v8, v2 = _vec(F32, 8), _vec(F32, 2)
            # in the entry block (alloca_once): the caller calls this inside its loops
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(nt)] for _ in range(nr)]
            accm = [[cgutils.alloca_once_value(builder, ir.Constant(v2, None)) for _ in range(nt)] for _ in range(nr)]
            spread = ir.Constant(_vec(ir.IntType(32), 8), [0, 0, 0, 0, 1, 1, 1, 1])
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                o32, o2 = builder.mul(b, c(32)), builder.mul(b, c(2))
                w = [x.at(pc, builder.add(builder.mul(rr, n), o32), _vec(I8, 32)) for rr in rows]
                a = [x.at(pq, builder.add(builder.mul(tt, n), o32), _vec(I8, 32)) for tt in toks]
                s16 = [builder.mul(builder.add(builder.mul(rr, nb2), o2), c(4)) for rr in rows]
                s = [builder.shuffle_vector(x.at(ps, k, v2), ir.Constant(v2, ir.Undefined), spread) for k in s16]
                m = [x.at(pm, k, v2) for k in s16]
                d = [x.splat(x.elem(pd, builder.add(builder.mul(tt, nb), b), F32), 8) for tt in toks]
                xsum = [x.at(px, builder.mul(builder.add(builder.mul(tt, nb2), o2), c(4)), v2) for tt in toks]
                for i in range(nr):
                    for j in range(nt):
                        f = builder.sitofp(x.udot(w[i], a[j]), v8)
                        builder.store(x.fma8(f, builder.fmul(s[i], d[j]), builder.load(accs[i][j])), accs[i][j])
                        builder.store(x.intr("llvm.fma.v2f32", v2, [m[i], xsum[j], builder.load(accm[i][j])]),
                                      accm[i][j])
            out = builder.bitcast(pr, F32.as_pointer())
            for i in range(nr):
                for j in range(nt):
                    mm = builder.load(accm[i][j])
                    off = builder.fadd(builder.extract_element(mm, ir.Constant(ir.IntType(32), 0)),
                                       builder.extract_element(mm, ir.Constant(ir.IntType(32), 1)))
                    builder.store(builder.fsub(x.hsum8(builder.load(accs[i][j])), off),
                                  builder.gep(out, [ir.Constant(ir.IntType(32), nt * i + j)]))
            return context.get_dummy_value()
        return sig, codegen
    impl.__name__ = impl.__qualname__ = f"dot{nr}x{nt}"
    return intrinsic(impl)


_dot_tile = _micro(_MR, _MT)


# ---------------------------------------------------------------- the parallel driver, one per type
_unpack = None  # bound per type by _specialize
_block_elems = _block_bytes = 0


def _gemm_template(raw, n_in, qx, dx, xs, out):
    """out[t, r] = W[r] . dequant(qx[t]) for t < out.shape[0], W = raw's rows (type bound by _specialize)."""
    T, n_out = out.shape
    nb = n_in // 32
    row_bytes = (n_in // _block_elems) * _block_bytes
    for g in prange((n_out + _ROWS - 1) // _ROWS):
        r0 = g * _ROWS
        nr = min(_ROWS, n_out - r0)
        codes = np.zeros((_ROWS, n_in), np.uint8)
        scl = np.zeros((_ROWS, 2 * nb), np.float32)
        mins = np.zeros((_ROWS, 2 * nb), np.float32)
        for i in range(nr):
            o = (r0 + i) * row_bytes
            _unpack(raw[o:o + row_bytes], n_in, codes[i], scl[i], mins[i])
        res = np.empty(_MR * _MT, np.float32)
        for t in range(0, T, _MT):
            for i in range(0, nr, _MR):
                _dot_tile(codes, scl, mins, i, qx, dx, xs, t, nb, res)
                for ii in range(min(_MR, nr - i)):
                    for jj in range(min(_MT, T - t)):
                        out[t + jj, r0 + i + ii] = res[ii * _MT + jj]


def _specialize(qtype: str):
    """The parallel driver for `qtype` (as linear._specialize: a function with its own globals, so the
    on-disk cache finds it)."""
    q = QTYPES[qtype]
    bound = dict(_gemm_template.__globals__, _unpack=_UNPACK[qtype], _block_elems=q.block_size,
                 _block_bytes=q.block_bytes)
    name = "_gemm_i8_" + qtype.lower()
    fn = pytypes.FunctionType(_gemm_template.__code__, bound, name)
    fn.__qualname__ = name
    fn.__doc__ = f"_gemm_template for {qtype}"
    return njit(parallel=True, cache=True, fastmath=_FAST, nogil=True)(fn)


_DRIVERS = {q: _specialize(q) for q in _UNPACK}

# the types whose prefill takes this path on this CPU: measured against the float tiles (docs/performance.md)
INT8_GEMM = tuple(q for q in ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
                  if simd.LEVEL != "avx2" or _MAX_CODE[q] < 128)
# below this many weights the float tiles win (896 x 896: 0.83x for int8): the activation quantization, the same
# for any n_out, is a large share of a small matrix's product
INT8_MIN_WEIGHTS = 1 << 20


def use_int8(qtype: str, n_out: int, n_in: int) -> bool:
    """Whether prefill of this matrix runs on the int8 GEMM (measured: benchmarks/prefill_gemm_bench.py)."""
    return qtype in INT8_GEMM and n_out * n_in >= INT8_MIN_WEIGHTS


def quantized_activations(X: np.ndarray):
    """(qx, dx, xs) of X (T, n) float32, padded with zero rows to a multiple of _MT rows."""
    T, n = X.shape
    Tp = -(-T // _MT) * _MT
    qx = np.zeros((Tp, n), np.int8)
    dx = np.zeros((Tp, n // QK), np.float32)
    xs = np.zeros((Tp, n // 16), np.float32)
    quantize_act(X, qx, dx, xs)
    return qx, dx, xs


def matmul_i8(raw: np.ndarray, qtype: str, n_in: int, X: np.ndarray, out: np.ndarray, act=None) -> None:
    """out (T, n_out) = X (T, n_in) . W^T for W = raw (validated by the caller: linear._check) of `qtype`
    in _UNPACK; `act`: X's quantized_activations when the caller already has them."""
    qx, dx, xs = act if act is not None else quantized_activations(X)
    _DRIVERS[qtype](raw, n_in, qx, dx, xs, out)
