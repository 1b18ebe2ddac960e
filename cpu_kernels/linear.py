"""Matrix products straight from GGUF quantized blocks (Numba): decode matvec, prefill matmul, embedding rows.

Weights are never repacked or copied: every kernel reads the file's blocks (a zero-copy view of the mmap),
including the f16 scales, which are converted in-kernel (`_h2f`: LLVM's half->float, one vcvtsh2ss /
vcvtph2ps instruction). Block layouts follow ggml-common.h; the numpy twins are gguf-py's
`gguf.quants.dequantize` (tests/test_linear.py). Process memory stays file pages + activations.

Decode (`matvec`, and `matmul` for a few rows): the activation row is quantized to int8 per 32 values
(llama.cpp's Q8_0/Q8_K idea: one float scale `dx` per 32, plus the integer sums `bsums` of every 16 for the
min / offset terms), then each weight row is dotted block by block by the explicit-SIMD row dots of
cpu_kernels/simd.py (vpdpbusd / vpmaddubsw byte dots, one float vector accumulator per row). The plain
loops of this module vectorise only to ~4 GB/s per thread for 4-bit types (LLVM reduces every block to a
scalar and never forms the byte dot instructions); the IR row dots read 10-25 GB/s per thread.
On AVX2 the 32-weight types run those row dots in tiles of 2-4 weight rows for one activation row
(batch_dot.ONE_ROW), and the k-quants take activations quantized per super-block of 256 (simd.SUPER_ACT,
`act_group`). The server's decode batch (a few rows at once, `matmul_rows_many`) takes cpu_kernels/batch_dot.py's drivers instead,
which unpack each weight block once for a tile of activation rows (`QuantLinear._integer_kernel`); a short prompt
keeps the single-row dots, so its rows equal decoding them one by one.
The dequantizers below use `_FAST` (fastmath without `reassoc`) and the SLP vectorizer
(NUMBA_SLP_VECTORIZE=1, set in edgeq/_numba_env.py): with reassociation LLVM's loop vectorizer vectorizes
*across* blocks with strided shuffles, 3-4x slower.

Prefill (`matmul` with T >= _GEMM_MIN_T rows): the int8 GEMM (gemm_i8.py) for the types it serves; float
matrices (F32, F16, BF16) go to gemm_f32.py's float32 GEMM directly, and the other types' weight tiles of
`_TILE_BYTES` are dequantized to float32 for it. Not OpenBLAS: OpenBLAS's thread pool and Numba's OpenMP pool
both spin-wait after their work, and alternating them (norm, matmul, rope, ... in a prefill) starves both
(measured 17x slower on 2 cores). Fewer rows use the integer kernel (each weight row is read once and dotted
with all T quantized activation rows).

Every kernel is compiled on first use of its type only (lazy), with cache=True.
"""
from __future__ import annotations

import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .half import f16_to_f32
from .host import proc_field
from .simd import _HW_HALF  # f16 -> f32 in hardware (x86 F16C, ARM64) or integer arithmetic

from edgeq.formats.quants import KVALUES_IQ4NL, QTYPES

# fastmath without 'reassoc' (see the module docstring): contract still gives FMAs.
_FAST = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
_JIT = dict(cache=True, fastmath=_FAST, nogil=True)

# the weight types these kernels read
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "IQ4_NL", "IQ4_XS")
# qtype -> (weights per block, bytes per block), from the registry (formats/quants.py)
BLOCKS: dict[str, tuple[int, int]] = {q: (QTYPES[q].block_size, QTYPES[q].block_bytes) for q in SUPPORTED}
QK = 32                      # activation quantization block
_SUPER = 256                 # activation quantization block of the k-quant row dots of simd.SUPER_ACT
_Q4_K_BYTES, _Q5_K_BYTES = QTYPES["Q4_K"].block_bytes, QTYPES["Q5_K"].block_bytes
_IQ4_NL_BYTES, _IQ4_XS_BYTES = QTYPES["IQ4_NL"].block_bytes, QTYPES["IQ4_XS"].block_bytes
_IQ4 = KVALUES_IQ4NL.astype(np.float32)  # the IQ4 level table (a global: Numba freezes it as a constant)
_TILE_BYTES = 4 << 20        # float32 weight tile for the prefill path of the types without an int8 GEMM


# bytes ahead of the current weight row to software-prefetch: 2x over none on big matrices, and measured per vendor.
# AMD: 4096 over 1024, on a step's decode products (every layer's matrices in turn, the two drivers alternated,
# medians of 15-60 steps, Zen 5, 2 threads): Qwen3-1.7B Q4_K_M 41.4 -> 42.9 GB/s, Llama-3.2-3B Q4_K_M 39.6 -> 40.8,
# Qwen2.5-0.5B Q8_0 39.9 -> 42.5, Gemma 3 34.4 -> 35.5, SmolLM2 level. Intel (a Xeon, 2 threads, every >= 2048-row
# matrix of the Qwen3-1.7B files in turn, distances alternated, medians of 3-5 passes): 1536 over 4096 with the
# weights in huge pages (engine.read_weights) Q4_K 20.0 -> 22.8 GB/s, Q6_K 22.3 -> 24.5, Q8_0 21.8 -> 26.1, F16
# 23.4 -> 24.4; on the file mapping Q4_K 18.1 -> 18.9, Q8_0 21.3 -> 23.2 (1024 and 2048 within 1-5% of 1536)
_PREFETCH = 1536 if proc_field("/proc/cpuinfo", "vendor_id") == "GenuineIntel" else 4096
# the decode driver's burst before each row, where the row dots do not prefetch as they go (simd.ROW_AHEAD)
_ROW_BURST = 0 if simd.ROW_AHEAD else _PREFETCH
_GEMM_MIN_T = 6              # matmul rows from which dequantize + float GEMM beats the integer kernel


# ---------------------------------------------------------------- scalars
@intrinsic
def _half_to_f32(typingctx, bits):
    """IEEE half bits (uint16) -> float32: one vcvtph2ps (F16C) on x86, a native convert on ARM."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) -> float32: the top half of a float32."""
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Software prefetch of &arr[idx] into L2 (llvm.prefetch with locality 2: prefetcht1 on x86; never faults). The
    block loops issue too few loads per cache line for the out-of-order window to hide DRAM latency on matrices
    beyond the LLC. Into L2, not L1: an L1 prefetch holds one of the core's few L1 miss buffers (16 on recent Intel
    cores) until its line arrives, which capped one core at ~8 GB/s from DRAM on an Intel Xeon, where prefetches
    into L2 use its larger queue (the Qwen3-1.7B Q4_K_M decode step 82 -> 67 ms there, 2 threads; the products
    of the big matrices 14 -> 19 GB/s; the L3-resident ones unchanged)."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])  # read, L2, data
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


@njit(inline="always", **_JIT)
def _prefetch_row(raw, start, nbytes):
    for o in range(start, min(start + nbytes, raw.shape[0]), 64):
        _prefetch(raw, o)


@njit(inline="always", **_JIT)
def _h2f_soft(b0, b1):
    """Two little-endian bytes of an IEEE half -> float32 in integer arithmetic (x86 without F16C)."""
    return f16_to_f32((np.int32(b0) & 255) | ((np.int32(b1) & 255) << 8))


@njit(inline="always", **_JIT)
def _h2f_hw(b0, b1):
    return _half_to_f32(np.uint16(np.uint16(b0) | (np.uint16(b1) << np.uint16(8))))


_h2f = _h2f_hw if _HW_HALF else _h2f_soft


@njit(inline="always", **_JIT)
def _half_soft(bits):
    return f16_to_f32(np.int32(bits))


_half = _half_to_f32 if _HW_HALF else _half_soft  # uint16 half bits -> float32


@njit(inline="always", **_JIT)
def _i8(b):
    """A uint8 byte read as int8, in int32."""
    return (np.int32(b) ^ np.int32(128)) - np.int32(128)


@njit(inline="always", **_JIT)
def _k_scale_min(sc, k):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block k (0..7) from the 12 packed bytes `sc`."""
    if k < 4:
        s = np.int32(sc[k]) & 63
        m = np.int32(sc[k + 4]) & 63
    else:
        s = (np.int32(sc[k + 4]) & 15) | ((np.int32(sc[k - 4]) >> 2) & 48)
        m = (np.int32(sc[k + 4]) >> 4) | ((np.int32(sc[k]) >> 2) & 48)
    return s, m


@njit(inline="always", **_JIT)
def _q3_scale(sc, i):
    """Q3_K: signed 6-bit scale of sub-block i (0..15) from the 12 packed bytes `sc`."""
    lo = (np.int32(sc[i]) & 15) if i < 8 else (np.int32(sc[i - 8]) >> 4)
    hi = (np.int32(sc[8 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return (lo | (hi << 4)) - np.int32(32)


# ---------------------------------------------------------------- activation quantization
def _quantize_ir(xi, px, pq, o, n_vec: int):
    """IR: n_vec vectors of 16 floats at px -> int8 codes at pq + o on the scale amax/127 (amax over all of them,
    codes rint(x * 127/amax), 0 where amax is 0); returns (scale, [sum of each vector's 16 codes] as i32)."""
    builder = xi.b
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    v16f, v16i = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
    vs = [xi.at(px, ir.Constant(i64, 64 * h), v16f) for h in range(n_vec)]
    m = xi.intr("llvm.fabs.v16f32", v16f, [vs[0]])
    for v in vs[1:]:
        m = xi.intr("llvm.maxnum.v16f32", v16f, [m, xi.intr("llvm.fabs.v16f32", v16f, [v])])
    amax = xi.intr("llvm.vector.reduce.fmax.v16f32", f32, [m])
    zero = ir.Constant(f32, 0.0)
    d = builder.fdiv(amax, ir.Constant(f32, 127.0))
    inv = builder.select(builder.fcmp_ordered(">", amax, zero), builder.fdiv(ir.Constant(f32, 1.0), d), zero)
    sums = []
    for h, v in enumerate(vs):
        c = builder.fptosi(xi.intr("llvm.rint.v16f32", v16f, [builder.fmul(v, xi.splat(inv, 16))]), v16i)
        dst = builder.gep(pq, [builder.add(o, ir.Constant(i64, 16 * h))])
        builder.store(builder.trunc(c, ir.VectorType(ir.IntType(8), 16)),
                      builder.bitcast(dst, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        sums.append(xi.intr("llvm.vector.reduce.add.v16i32", i32, [c]))
    return d, sums


@intrinsic
def _quantize_block(typingctx, x, q, o):
    """One block of QK floats x (C-contiguous) -> int8 codes q[o:o+QK] on the scale amax/127; returns (scale, sum
    of codes 0..15, sum of codes 16..31). Decode (_quantize_act) and the int8 prefill GEMM (gemm_i8) both use it.
    Vector IR (two 16-float vectors): the scalar loop it replaces (amax, d = amax / 127, inv = 1 / d, codes
    rint(x * inv)) ran ~1.7 ns a value on one thread, a tenth of a prompt's prefill; the same operations in the same
    order: the same bits."""
    if not (isinstance(x, types.Array) and x.layout == "C" and x.dtype == types.float32):
        return None
    ret = types.Tuple((types.float32, types.int32, types.int32))
    sig = ret(x, q, types.intp)

    def codegen(context, builder, signature, args):
        px, pq = simd.data_ptrs(context, builder, signature, args, (0, 1))
        d, sums = _quantize_ir(simd._IR(builder), px, pq, args[2], QK // 16)
        return context.make_tuple(builder, ret, [d, sums[0], sums[1]])
    return sig, codegen


@njit(**_JIT)
def _quantize_act(X, qx, dx, bsums, dsums):
    """X (T, n) float32 -> qx int8 (T, n), dx (T, n/32) scales, bsums (T, n/16) int32 sums of each 16 codes,
    dsums (T, n/32) each block's scale times the sum of its 32 codes (the k-quants' min terms: _quantized).

    Serial: only used for T < _GEMM_MIN_T rows, where starting the thread pool costs more than the work."""
    T, n = X.shape
    for t in range(T):
        for b in range(n // QK):
            d, s0, s1 = _quantize_block(X[t, b * QK:(b + 1) * QK], qx[t], b * QK)
            dx[t, b] = d
            bsums[t, 2 * b] = s0
            bsums[t, 2 * b + 1] = s1
            dsums[t, b] = d * np.float32(s0 + s1)


@intrinsic
def _quantize_super_block(typingctx, x, q, o, sums, so):
    """One super-block of _SUPER floats x (C-contiguous) -> int8 codes q[o:o+_SUPER] on the scale amax/127, the sums
    of each 16 codes -> sums[so:so+16]; returns the scale. _quantize_block's vector IR over 16 vectors of 16 (the
    scalar loop it replaces, np.rint a call per value, took 5.8 us for 2048 values against 1.9 for the per-32
    quantization): the same operations in the same order, the same bits (_quantize_ir, as _quantize_block)."""
    if not (isinstance(x, types.Array) and x.layout == "C" and x.dtype == types.float32):
        return None
    sig = types.float32(x, q, types.intp, sums, types.intp)

    def codegen(context, builder, signature, args):
        px, pq, ps = simd.data_ptrs(context, builder, signature, args, (0, 1, 3))
        d, sums = _quantize_ir(simd._IR(builder), px, pq, args[2], _SUPER // 16)
        i32 = ir.IntType(32)
        sv = ir.Constant(ir.VectorType(i32, 16), None)
        for h, c in enumerate(sums):
            sv = builder.insert_element(sv, c, ir.Constant(i32, h))
        dst = builder.gep(builder.bitcast(ps, i32.as_pointer()), [args[4]])
        builder.store(sv, builder.bitcast(dst, ir.VectorType(i32, 16).as_pointer()), align=4)
        return d
    return sig, codegen


@njit(**_JIT)
def _quantize_act_super(X, qx, dx, bsums, dsums):
    """_quantize_act with one scale per super-block of 256 (llama.cpp's Q8_K), for the types of simd.SUPER_ACT:
    dx (T, n/32) holds each super-block's scale 8 times, so every row dot reads it as per-32 scales."""
    T, n = X.shape
    for t in range(T):
        for g in range(n // _SUPER):
            d = _quantize_super_block(X[t, g * _SUPER:(g + 1) * _SUPER], qx[t], g * _SUPER, bsums[t], g * (_SUPER // 16))
            for b in range(_SUPER // QK):
                k = g * (_SUPER // QK) + b
                dx[t, k] = d
                dsums[t, k] = d * np.float32(bsums[t, 2 * k] + bsums[t, 2 * k + 1])


def act_group(qtype: str) -> int:
    """How many activations share one int8 scale in the decode row dots of `qtype` (32, or 256 for simd.SUPER_ACT)."""
    return _SUPER if qtype in simd.SUPER_ACT else QK


@njit(inline="always", **_JIT)
def _u32(w, o):
    return (np.int32(w[o]) | (np.int32(w[o + 1]) << 8) | (np.int32(w[o + 2]) << 16) | (np.int32(w[o + 3]) << 24))


# ---------------------------------------------------------------- row dequantizers: one weight row -> float32
@njit(**_JIT)
def _dq_f16(row, n, y):
    for i in range(n):
        y[i] = _h2f(row[2 * i], row[2 * i + 1])


@njit(**_JIT)
def _dq_bf16(row, n, y):
    for i in range(n):
        y[i] = _bf16_to_f32(np.uint16(np.uint16(row[2 * i]) | (np.uint16(row[2 * i + 1]) << np.uint16(8))))


@njit(**_JIT)
def _dq_q8_0(row, n, y):
    for b in range(n // 32):
        d = _h2f(row[b * 34], row[b * 34 + 1])
        for j in range(32):
            y[b * 32 + j] = d * np.float32(_i8(row[b * 34 + 2 + j]))


@njit(**_JIT)
def _dq_q4_0(row, n, y):
    for b in range(n // 32):
        d = _h2f(row[b * 18], row[b * 18 + 1])
        for j in range(16):
            v = np.int32(row[b * 18 + 2 + j])
            y[b * 32 + j] = d * np.float32((v & 15) - 8)
            y[b * 32 + 16 + j] = d * np.float32((v >> 4) - 8)


@njit(**_JIT)
def _dq_q4_1(row, n, y):
    for b in range(n // 32):
        d = _h2f(row[b * 20], row[b * 20 + 1])
        m = _h2f(row[b * 20 + 2], row[b * 20 + 3])
        for j in range(16):
            v = np.int32(row[b * 20 + 4 + j])
            y[b * 32 + j] = d * np.float32(v & 15) + m
            y[b * 32 + 16 + j] = d * np.float32(v >> 4) + m


@njit(**_JIT)
def _dq_q5_0(row, n, y):
    for b in range(n // 32):
        o = b * 22
        d = _h2f(row[o], row[o + 1])
        qh = _u32(row, o + 2)
        for j in range(16):
            v = np.int32(row[o + 6 + j])
            y[b * 32 + j] = d * np.float32(((v & 15) | (((qh >> j) & 1) << 4)) - 16)
            y[b * 32 + 16 + j] = d * np.float32(((v >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)


@njit(**_JIT)
def _dq_q5_1(row, n, y):
    for b in range(n // 32):
        o = b * 24
        d = _h2f(row[o], row[o + 1])
        m = _h2f(row[o + 2], row[o + 3])
        qh = _u32(row, o + 4)
        for j in range(16):
            v = np.int32(row[o + 8 + j])
            y[b * 32 + j] = d * np.float32((v & 15) | (((qh >> j) & 1) << 4)) + m
            y[b * 32 + 16 + j] = d * np.float32((v >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m


@njit(**_JIT)
def _dq_q2_k(row, n, y):
    for sb in range(n // 256):
        o = sb * 84
        d = _h2f(row[o + 80], row[o + 81])
        dmin = _h2f(row[o + 82], row[o + 83])
        for k in range(8):
            sh = 2 * (k & 3)
            for j in range(32):
                c = np.int32(row[o + 2 * k + (j >> 4)])
                q = (np.int32(row[o + 16 + (k >> 2) * 32 + j]) >> sh) & 3
                y[sb * 256 + k * 32 + j] = d * np.float32(c & 15) * np.float32(q) - dmin * np.float32(c >> 4)


@njit(**_JIT)
def _dq_q3_k(row, n, y):
    for sb in range(n // 256):
        o = sb * 110
        sc = row[o + 96:o + 108]
        d = _h2f(row[o + 108], row[o + 109])
        for k in range(8):
            sh = 2 * (k & 3)
            for j in range(32):
                q = ((np.int32(row[o + 32 + (k >> 2) * 32 + j]) >> sh) & 3) | (((np.int32(row[o + j]) >> k) & 1) << 2)
                y[sb * 256 + k * 32 + j] = d * np.float32(_q3_scale(sc, 2 * k + (j >> 4))) * np.float32(q - 4)


@njit(inline="always", **_JIT)
def _dq_k45(row, n, y, block_bytes, qs_off, fifth_bits):
    """Q4_K / Q5_K (fifth_bits: qh[32] at byte 16, bit k of byte j = fifth bit of sub-block k; the nibbles
    at qs_off): d, dmin (f16), 12 bytes of 6-bit scales/mins, w = d * sc * q - dmin * mn."""
    for sb in range(n // 256):
        o = sb * block_bytes
        d = _h2f(row[o], row[o + 1])
        dmin = _h2f(row[o + 2], row[o + 3])
        sc = row[o + 4:o + 16]
        for k in range(8):
            a, m = _k_scale_min(sc, k)
            da = d * np.float32(a)
            dm = dmin * np.float32(m)
            sh = 4 * (k & 1)
            for j in range(32):
                q = (np.int32(row[o + qs_off + (k >> 1) * 32 + j]) >> sh) & 15
                if fifth_bits:
                    q |= ((np.int32(row[o + 16 + j]) >> k) & 1) << 4
                y[sb * 256 + k * 32 + j] = da * np.float32(q) - dm


@njit(**_JIT)
def _dq_q4_k(row, n, y):
    _dq_k45(row, n, y, _Q4_K_BYTES, 16, False)


@njit(**_JIT)
def _dq_q5_k(row, n, y):
    _dq_k45(row, n, y, _Q5_K_BYTES, 48, True)


@njit(**_JIT)
def _dq_q6_k(row, n, y):
    for sb in range(n // 256):
        o = sb * 210
        d = _h2f(row[o + 208], row[o + 209])
        for k in range(8):
            h = k >> 2
            kk = k & 3
            sl = 4 * (kk >> 1)
            shh = 2 * kk
            for j in range(32):
                ql = (np.int32(row[o + h * 64 + (kk & 1) * 32 + j]) >> sl) & 15
                qh = (np.int32(row[o + 128 + h * 32 + j]) >> shh) & 3
                sc = _i8(row[o + 192 + 2 * k + (j >> 4)])
                y[sb * 256 + k * 32 + j] = d * np.float32(sc) * np.float32((ql | (qh << 4)) - 32)


@njit(**_JIT)
def _dq_iq4_nl(row, n, y):
    for b in range(n // 32):
        o = b * _IQ4_NL_BYTES
        d = _h2f(row[o], row[o + 1])
        for j in range(16):
            v = np.int32(row[o + 2 + j])
            y[b * 32 + j] = d * _IQ4[v & 15]
            y[b * 32 + 16 + j] = d * _IQ4[v >> 4]


@njit(**_JIT)
def _dq_iq4_xs(row, n, y):
    for sb in range(n // 256):
        o = sb * _IQ4_XS_BYTES
        d = _h2f(row[o], row[o + 1])
        sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
        for k in range(8):
            ls = (((np.int32(row[o + 4 + k // 2]) >> (4 * (k % 2))) & 15) | (((sh >> (2 * k)) & 3) << 4)) - 32
            dl = d * np.float32(ls)
            for j in range(16):
                v = np.int32(row[o + 8 + 16 * k + j])
                y[sb * 256 + k * 32 + j] = dl * _IQ4[v & 15]
                y[sb * 256 + k * 32 + 16 + j] = dl * _IQ4[v >> 4]


# ---------------------------------------------------------------- parallel drivers, one pair per type
@njit(inline="always", **_JIT)
def _n_rows(outs):
    return outs[0].shape[1] + outs[1].shape[1] + outs[2].shape[1]


@njit(inline="always", **_JIT)
def _locate(outs, i):
    """Global row i of the 3 matrices stacked in `outs` order (see _run_fused) -> (matrix, row in it).
    i arrives as the parallel loop's unsigned index: made int64 first (uint64 - int64 is float64 in Numba).
    Inlined in Numba's IR: a kernel of its own compiled once per driver signature (0.2 s each of a first run)."""
    i = np.int64(i)
    n0 = outs[0].shape[1]
    if i < n0:
        return 0, i
    n1 = n0 + outs[1].shape[1]
    if i < n1:
        return 1, i - n0
    return 2, i - n1


# The drivers, one pair per type, are specializations of two templates (_specialize): the templates read the
# per-type globals below, which Numba freezes at compile time, so each type's driver is compiled with its own
# constants and row function, as a hand-written copy per type would be.
# _mm_<type>: outs[m][t, r] = W_m[r] . X[t] over quantized activations, for 3 matrices sharing the input
#        (raws[m] their bytes: Q/K/V or gate/up run as one parallel loop over all their rows, after one
#        activation quantization); prange over weight rows, so each row is read once from memory and reused
#        for all T activation rows from L1.
# _rows_<type>: dequantize the listed rows to float32 (embedding lookup, prefill tiles).
_row_fn = _block_elems = _block_bytes = None  # placeholders, bound per type by _specialize


def _mm_template(raws, n_in, qx, dx, bsums, outs):
    nb = n_in // _block_elems
    row_bytes = nb * _block_bytes
    for i in prange(_n_rows(outs)):
        m, r = _locate(outs, i)
        raw, out = raws[m], outs[m]
        if _ROW_BURST:
            _prefetch_row(raw, r * row_bytes + _ROW_BURST, row_bytes)
        for t in range(qx.shape[0]):
            out[t, r] = _row_fn(raw, r * row_bytes, nb, qx[t], dx[t], bsums[t])


def _rows_template(raw, ids, n_in, out):
    row_bytes = (n_in // _block_elems) * _block_bytes
    for i in prange(ids.shape[0]):
        r = ids[i]
        _row_fn(raw[r * row_bytes:(r + 1) * row_bytes], n_in, out[i])


def _specialize(template, qtype: str, row_fn, fastmath=_FAST, suffix: str = "", parallel: bool = True, **extra):
    """The njit driver `template` for `qtype` (parallel unless told): `_row_fn` = row_fn, the registry's block
    sizes and any `extra` globals.

    A new function over the template's code with its own globals, not a closure: Numba keys a cached closure
    by its pickled cell contents, and a pickled dispatcher or intrinsic carries a per-process uuid, so a
    closure would never be loaded from the on-disk cache. Its own qualname (`suffix` tells apart two drivers of one
    template and type) names its cache index file."""
    q = QTYPES[qtype]
    bound = dict(template.__globals__, _row_fn=row_fn, _block_elems=q.block_size, _block_bytes=q.block_bytes, **extra)
    name = template.__name__.replace("_template", "_" + qtype.lower()) + suffix
    fn = pytypes.FunctionType(template.__code__, bound, name)
    fn.__qualname__ = name
    fn.__doc__ = f"{template.__name__} for {qtype}"
    return njit(parallel=parallel, **dict(_JIT, fastmath=fastmath))(fn)


# qtype -> row dequantizer; the integer row dots are simd.ROW_DOTS
_ROW_DEQUANT = {
    "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
    "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k, "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
    "F16": _dq_f16, "BF16": _dq_bf16, "IQ4_NL": _dq_iq4_nl, "IQ4_XS": _dq_iq4_xs,
}
# qtype -> (integer matvec/matmul kernel or None, row dequantizer); compiled on first call
_KERNELS = {
    qtype: (_specialize(_mm_template, qtype, simd.ROW_DOTS[qtype]) if qtype in simd.ROW_DOTS else None,
            _specialize(_rows_template, qtype, dq))
    for qtype, dq in _ROW_DEQUANT.items()
}
# qtype -> _rows_template without a parallel loop (prange runs as range), for embed_rows' up to _SERIAL_IDS tokens (a
# decode step's): none to start, and none to compile on a first run's path to its first token (a parallel loop's
# gufunc: ~0.5 s). The same row function: the same values. Compiled on first call.
_ROWS_SERIAL = {qtype: _specialize(_rows_template, qtype, dq, suffix="_serial", parallel=False)
                for qtype, dq in _ROW_DEQUANT.items()}
_SERIAL_IDS = 16


# ---------------------------------------------------------------- half-precision rows for decode
# F16/BF16 matrices in decode (a few activation rows): each weight row converted in registers as it is read
# (vcvtph2ps on x86) and dotted with the float32 activations: one pass over the weights, none of the float32
# tile that prefill's dequantize + GEMM writes and reads again (which held 1.7B F16 decode at 27% of the bound).
@njit(inline="always", **_JIT)
def _prefetch_half_row(W, i, ahead):
    """Row i of the 16-bit weights W (R, n) `ahead` bytes on into L2, a 64-byte line (32 halves) at a time: the
    big matrices of a Qwen3-1.7B F16 file 18.0 -> 22.5 GB/s on the file mapping, 22.6 -> 24.4 in huge pages (Xeon)."""
    R, n = W.shape
    for o in range(i * n + ahead // 2, min((i + 1) * n + ahead // 2, R * n), 32):
        _prefetch(W, o)


def _dot_half_template(W, X, out):
    """out (T, R) = X (T, n) . W^T for W (R, n) 16-bit floats (bits), `_row_fn` their conversion (bound by
    _specialize: _half for F16, _bf16_to_f32 for BF16)."""
    R, n = W.shape
    for g in prange((R + 3) // 4):
        for i in range(4 * g, min(R, 4 * g + 4)):
            _prefetch_half_row(W, i, _PREFETCH)  # a template global: prefetch_distance.py sets its own
            w = W[i]
            for t in range(X.shape[0]):
                x = X[t]
                a = np.float32(0.0)
                for k in range(n):
                    a += _row_fn(w[k]) * x[k]
                out[t, i] = a


# ---------------------------------------------------------------- Python API (all validation happens here)
def _row_bytes(qtype: str, n_in: int) -> int:
    block_elems, block_bytes = BLOCKS[qtype]
    return (n_in // block_elems) * block_bytes


def _check(raw: np.ndarray, qtype: str, shape) -> tuple[int, int]:
    if qtype not in BLOCKS:
        raise ValueError(f"unsupported weight type {qtype!r}; expected one of {', '.join(BLOCKS)}")
    if len(shape) != 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"{qtype}: shape must be (n_out, n_in) with positive sizes, got {tuple(shape)}")
    n_out, n_in = int(shape[0]), int(shape[1])
    block_elems = BLOCKS[qtype][0]
    if n_in % block_elems:
        raise ValueError(f"{qtype}: row length {n_in} is not a multiple of the block size {block_elems}")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{qtype}: weights must be a 1-D uint8 array of raw bytes")
    if not raw.flags.c_contiguous:
        raise ValueError(f"{qtype}: weight bytes must be contiguous")
    need = n_out * _row_bytes(qtype, n_in)
    if raw.nbytes != need:
        raise ValueError(f"{qtype} {n_out}x{n_in}: expected {need} bytes of weights, got {raw.nbytes}")
    return n_out, n_in


def _quantized(X: np.ndarray, group: int = QK):
    """X's int8 codes qx (T, n), per-32 scales dx (T, n/32) and bsums (T, n/16 + n/32): the int32 sums of each 16
    codes, then the float32 bits of each 32's scale times its codes' sum (simd.kquant_min_sums: a Q4_K/Q5_K
    super-block's min term is one 8-float load and multiply there, not 16 sums added in pairs, widened and
    converted), on one scale per `group` values (act_group)."""
    T, n = X.shape
    qx = np.empty((T, n), np.int8)
    dx = np.empty((T, n // QK), np.float32)
    bsums = np.empty((T, n // 16 + n // QK), np.int32)
    dsums = bsums[:, n // 16:].view(np.float32)
    (_quantize_act_super if group == _SUPER else _quantize_act)(X, qx, dx, bsums, dsums)
    return qx, dx, bsums


_FUSED = 3                              # matrices per kernel call: Q/K/V
_NO_ROWS = np.zeros(0, np.uint8)
_NO_ROWS_RO = np.zeros(0, np.uint8)
_NO_ROWS_RO.flags.writeable = False
_NO_OUT: dict[int, np.ndarray] = {}      # T -> a (T, 0) output: a padding matrix's (empty) result


def _pad(raw: np.ndarray) -> np.ndarray:
    """A zero-row matrix of the same Numba type as `raw` (mmap views are read-only, copies are not)."""
    return _NO_ROWS if raw.flags.writeable else _NO_ROWS_RO


def _no_out(T: int) -> np.ndarray:
    o = _NO_OUT.get(T)
    if o is None:
        o = _NO_OUT[T] = np.empty((T, 0), np.float32)
    return o


def _fused_weights(raws: list) -> list[tuple]:
    """The weights of one kernel call each, as 3-tuples (padded with zero-row matrices): one compiled
    specialization per weight type instead of one per tuple length (each costs cold-start time and ~5 MB of
    resident compiled code). Matrices k, k+1, k+2 go in tuple k // 3."""
    if len({bool(r.flags.writeable) for r in raws}) > 1:  # one Numba tuple holds one array type
        raws = [r.view() for r in raws]
        for r in raws:
            r.flags.writeable = False
    return [tuple(raws[k:k + _FUSED]) + (_pad(raws[k]),) * max(0, k + _FUSED - len(raws))
            for k in range(0, len(raws), _FUSED)]


def _run_fused(mm, raws: list, n_in: int, qx, dx, bsums, outs: list) -> None:
    """mm over the matrices `raws`, up to _FUSED at once (_fused_weights), into `outs`."""
    e = _no_out(qx.shape[0])
    for k, r in zip(range(0, len(raws), _FUSED), _fused_weights(raws)):
        o = list(outs[k:k + _FUSED])
        mm(r, n_in, qx, dx, bsums, tuple(o + [e] * (_FUSED - len(o))))


def _out(out, shape) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of shape {shape}")
    return out


class QuantLinear:
    """y = W x for a weight matrix W (n_out, n_in) kept in its GGUF encoding (a zero-copy view of the file)."""

    def __init__(self, raw: np.ndarray, qtype: str, shape: tuple[int, int], int8_prefill: bool = True):
        """`int8_prefill=False`: prefill on float tiles even where the int8 GEMM is faster (gemm_i8.use_int8)."""
        self.n_out, self.n_in = _check(raw, qtype, shape)
        self.qtype = qtype
        self.raw = raw
        self.nbytes = raw.nbytes
        self._f32 = raw.view(np.float32).reshape(self.n_out, self.n_in) if qtype == "F32" else None
        # F16/BF16 decode: the half rows read in place (_dot_half_template)
        self._half = raw.view(np.uint16).reshape(self.n_out, self.n_in) if qtype in _HALF_ROWS else None
        self._mm, self._rows = _KERNELS.get(qtype, (None, None))
        # a few rows at once (batch_dot.py): tiles, and activation rows as vector lanes from LANES_FROM rows on; and
        # where measured faster, weight-row tiles for one activation row in place of the single-row dots
        self._mm_rows, self._min_rows, self._mm_lanes, self._lanes_from, one_row = _multi_row(qtype)
        self._mm = one_row or self._mm
        # the lanes on a packed copy of the matrix (batch_dot.pack_rows16), made by the first batch that runs them
        self._mm_packed = _packed_lanes(qtype)
        self._packed: np.ndarray | None = None
        self._group = act_group(qtype)  # activations per int8 scale in the integer kernels
        self._raws3 = _fused_weights([raw])[0]  # the kernels take 3 matrices (see _fused_weights)
        # prefill on int8 dots (gemm_i8.py), or None
        self._int8_gemm = _int8_gemm(qtype, self.n_out, self.n_in) if int8_prefill else None
        self._plans: dict[tuple, _RowsPlan] = {}  # matmul_rows_many's plans for lists starting with this matrix

    def _integer_kernel(self, T: int):
        """The integer kernel for T activation rows: the multi-row drivers from the measured row counts on."""
        if self._mm_rows is None or T < self._min_rows[self.qtype]:
            return self._mm
        if self._mm_lanes is None or T < self._lanes_from:
            return self._mm_rows
        return self._mm_packed or self._mm_lanes

    def packed_batches(self, on: bool) -> bool:
        """Whether batches take the lanes on the packed copy (where the type has them), or the file's bytes only;
        off drops a copy already made. -> whether that changed which kernel a batch runs."""
        kernel = _packed_lanes(self.qtype) if on else None
        changed, self._mm_packed = kernel is not self._mm_packed, kernel
        if not on:
            self._packed = None
            for plan in self._plans.values():
                plan.packed.clear()
        return changed

    def packed16(self) -> np.ndarray:
        """The matrix in the packed lanes' layout (batch_dot.pack_rows16): made once, on the first call (a server's
        first batch), as many bytes as the matrix; a single stream never makes it."""
        if self._packed is None:
            from . import batch_dot

            self._packed = batch_dot.pack_rows16(self.raw, self.qtype, self.n_out, self.n_in)
        return self._packed

    def _x2d(self, X: np.ndarray, what: str) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_in:
            raise ValueError(f"{what}: expected shape (T, {self.n_in}), got {X.shape}")
        return np.ascontiguousarray(X, dtype=np.float32)

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (n_in,) -> W x float32 (n_out,)."""
        x = np.asarray(x)
        if x.ndim != 1 or x.shape[0] != self.n_in:
            raise ValueError(f"matvec: expected x of shape ({self.n_in},), got {x.shape}")
        y = _out(out, (self.n_out,))
        self._product(np.ascontiguousarray(x, dtype=np.float32)[None, :], y[None, :])
        return y

    def matmul(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X float32 (T, n_in) -> X W^T float32 (T, n_out)."""
        X = self._x2d(X, "matmul")
        Y = _out(out, (X.shape[0], self.n_out))
        if X.shape[0]:
            self._product(X, Y)
        return Y

    def _product(self, X: np.ndarray, Y: np.ndarray, act=None) -> None:
        """Y = X W^T; `act`: X's gemm_i8.Activations, when the caller shares them between matrices."""
        T = X.shape[0]
        if self._f32 is not None:
            gemm_f32.gemm_f32(self._f32, X, Y, 0)
        elif self._half is not None and T < _GEMM_MIN_T:
            _HALF_ROWS[self.qtype](self._half, X, Y)
        elif self._half is not None:
            gemm_f32.GEMM_HALF[self.qtype](self._half, X, Y, 0)
        elif self._mm is not None and T < _GEMM_MIN_T:
            qx, dx, bsums = _quantized(X, self._group)
            e = _no_out(X.shape[0])
            # the decode kernel (the single-row dots, or their one-row tiles: batch_dot.ONE_ROW), not batch_dot's
            # multi-row tiles: a short prompt's rows must equal what decoding them one by one gives (the engine
            # re-runs a prompt's last token on a reused cache: same greedy text)
            self._mm(self._raws3, self.n_in, qx, dx, bsums, (Y, e, e))
        elif self._int8_gemm is not None:
            self._int8_gemm(self.raw, self.qtype, self.n_in, X, Y, act)
        else:
            # dequantize a tile of weight rows to float32, then the float32 GEMM; the tile's rows a multiple of
            # the GEMM's row groups times the threads, so that each thread has as many groups
            step = gemm_f32.TILE_ROWS * numba.get_num_threads()
            rows = min(self.n_out, max(step, _TILE_BYTES // (4 * self.n_in) // step * step))
            tile = np.empty((rows, self.n_in), np.float32)
            for r0 in range(0, self.n_out, rows):
                r1 = min(self.n_out, r0 + rows)
                w = tile[:r1 - r0]
                self._rows(self.raw, np.arange(r0, r1, dtype=np.int64), self.n_in, w)
                gemm_f32.gemm_f32(w, X, Y, r0)


def _dot_half_ir_template(W, X, out):
    """_dot_half_template with the row dot in vector IR (`_row_fn` = simd.HALF_DOTS[qtype], which prefetches as it
    goes where simd.ROW_AHEAD; the burst before each row otherwise). The Qwen3-1.7B F16 file's >= 2048-row matrices
    in turn, 2 threads, huge pages (Xeon): 24.0 -> 27.4-31.5 GB/s against the template above."""
    R = W.shape[0]
    for g in prange((R + 3) // 4):
        for i in range(4 * g, min(R, 4 * g + 4)):
            if not simd.ROW_AHEAD:
                _prefetch_half_row(W, i, _PREFETCH)
            for t in range(X.shape[0]):
                out[t, i] = _row_fn(W, i, X, t)


# the vector-IR row dot where simd.HALF_DOTS has one, else the loop template in full fastmath (its k-loop reduction
# needs reassociation to vectorize)
_HALF_ROWS = {q: _specialize(_dot_half_ir_template, q, simd.HALF_DOTS[q]) if q in simd.HALF_DOTS else
              _specialize(_dot_half_template, q, conv, fastmath=True)
              for q, conv in (("F16", _half), ("BF16", _bf16_to_f32))}


def _int8_gemm(qtype: str, n_out: int, n_in: int):
    """gemm_i8.matmul_i8 where this matrix's prefill is faster on int8 dot products than on float tiles
    (measured: gemm_i8.use_int8), else None. Imported here: gemm_i8 builds on this module's helpers."""
    from . import gemm_i8

    return gemm_i8.matmul_i8 if gemm_i8.use_int8(qtype, n_out, n_in) else None


def _multi_row(qtype: str):
    """(batch_dot's multi-row tiles for qtype or None, batch_dot.MIN_ROWS: qtype -> the fewest rows they take, its
    lanes driver or None, batch_dot.LANES_FROM[qtype]: the fewest rows that take it, its one-activation-row tiles or
    None).
    Imported here: batch_dot builds on this module's helpers."""
    from . import batch_dot

    return (batch_dot.KERNELS.get(qtype), batch_dot.MIN_ROWS, batch_dot.LANE_KERNELS.get(qtype),
            batch_dot.LANES_FROM.get(qtype),
            batch_dot.ONE_ROW.get(qtype))


def _packed_lanes(qtype: str):
    """batch_dot's lanes driver on the packed copy of a `qtype` matrix, or None (not AVX-512, or another type)."""
    from . import batch_dot

    return batch_dot.PACKED_KERNELS.get(qtype)


def matmul_many(qs: list["QuantLinear"], X: np.ndarray) -> list[np.ndarray]:
    """[q.matmul(X) for q in qs] for matrices sharing a prompt's rows (Q/K/V, gate/up): the activations of those
    that take the int8 GEMM are quantized (or rounded to bf16 for gemm_amx) once for all of them."""
    X = qs[0]._x2d(X, "matmul")
    if any(q.n_in != X.shape[1] for q in qs):
        raise ValueError(f"matmul: expected X of shape (T, {X.shape[1]}) for every matrix")
    int8 = X.shape[0] >= _GEMM_MIN_T and sum(q._int8_gemm is not None for q in qs) > 1
    act = None
    if int8:
        from . import gemm_i8

        act = gemm_i8.Activations(X)
    ys = []
    for q in qs:
        Y = np.empty((X.shape[0], q.n_out), np.float32)
        if X.shape[0]:
            q._product(X, Y, act if q._int8_gemm is not None else None)
        ys.append(Y)
    return ys


def matvec_many(qs: list["QuantLinear"], x: np.ndarray) -> list[np.ndarray]:
    """[W x for W in qs] for matrices sharing the input (Q/K/V, gate/up): those of one quantized type run as one
    parallel kernel call after one activation quantization (a mix's odd one out, e.g. a Q8_0 attn_v beside
    Q5_0 q/k, gets its own call); float matrices use matvec."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"matvec: expected x of shape ({qs[0].n_in},) for every matrix, got {x.shape}")
    return [y[0] for y in matmul_rows_many(qs, x[None, :])]


def matmul_rows_many(qs: list["QuantLinear"], X: np.ndarray) -> list[np.ndarray]:
    """[X W^T for W in qs] (X: (T, n_in), a few rows: a decode batch) with the integer row kernels whatever T, so
    each weight row is read once for all T rows; matrices of one quantized type share one call (as matvec_many).
    Prefill's many rows go to QuantLinear.matmul instead (dequantized tiles + float GEMM). The grouping is worked
    out once per list of matrices (_rows_plan): a decode step makes ~4 calls per layer, where per-call Python
    was 40% of a small model's Q/K/V product."""
    plan = _rows_plan(qs)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != plan.n_in:
        raise ValueError(f"matvec: expected x of shape (T, {plan.n_in}) for every matrix, got {X.shape}")
    ys: list[np.ndarray | None] = [None] * len(qs)
    for i in plan.others:
        ys[i] = qs[i].matmul(X)
    if plan.fused:
        T = X.shape[0]
        X = np.ascontiguousarray(X, dtype=np.float32)
        acts = {}  # act_group -> X quantized on it, once per call
        e = _no_out(T)
        for k, (owner, _, idx, n_outs) in enumerate(plan.fused):
            qx, dx, bsums = acts.get(owner._group) or acts.setdefault(owner._group, _quantized(X, owner._group))
            outs = [np.empty((T, n), np.float32) for n in n_outs]
            kernel = owner._integer_kernel(T)
            kernel(plan.weights(k, kernel), plan.n_in, qx, dx, bsums, tuple(outs + [e] * (_FUSED - len(outs))))
            for i, y in zip(idx, outs):
                ys[i] = y
    return ys


def rows_calls(qs: list["QuantLinear"], T: int) -> list[tuple] | None:
    """The kernel calls matmul_rows_many makes for these matrices on T rows, in its order: (kernel, activation group,
    n_in, the call's 3 weight arrays, the matrices' indices in qs); None where a matrix has no integer kernel
    (cpu_kernels/decode_pass.py makes the same calls from compiled code)."""
    plan = _rows_plan(qs)
    if plan.others:
        return None
    return [(kernel, owner._group, plan.n_in, plan.weights(k, kernel), idx)
            for k, (owner, _, idx, _) in enumerate(plan.fused) for kernel in [owner._integer_kernel(T)]]


class _RowsPlan:
    """What matmul_rows_many does for one list of matrices: `others` (indices of matrices without an integer
    kernel: QuantLinear.matmul), `fused` (per kernel call: the QuantLinear whose kernel runs, the call's 3-tuple
    of weights (_fused_weights), the matrices' indices and output widths)."""

    __slots__ = ("n_in", "others", "fused", "members", "packed")

    def __init__(self, qs: list["QuantLinear"]):
        self.n_in = qs[0].n_in
        if any(q.n_in != self.n_in for q in qs):
            raise ValueError(f"matvec: the matrices' inputs differ ({sorted({q.n_in for q in qs})})")
        self.others = [i for i, q in enumerate(qs) if q._mm is None]
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(qs):
            if q._mm is not None:
                groups.setdefault(q.qtype, []).append(i)
        self.fused, self.members, self.packed = [], [], {}
        for idx in groups.values():
            for k, raws3 in zip(range(0, len(idx), _FUSED), _fused_weights([qs[i].raw for i in idx])):
                part = idx[k:k + _FUSED]
                self.fused.append((qs[idx[0]], raws3, part, [qs[i].n_out for i in part]))
                self.members.append([qs[i] for i in part])

    def weights(self, k: int, kernel) -> tuple:
        """The 3 weight arrays of fused call k for `kernel`: the matrices' packed copies for the packed lanes
        (QuantLinear.packed16, made here the first time), else the file's bytes."""
        owner, raws3 = self.fused[k][:2]
        if kernel is None or kernel is not owner._mm_packed:
            return raws3
        packed = self.packed.get(k)
        if packed is None:
            packed = self.packed[k] = _fused_weights([q.packed16() for q in self.members[k]])[0]
        return packed


def _rows_plan(qs: list["QuantLinear"]) -> _RowsPlan:
    """The plan for this list of matrices, kept on the first of them (keyed by the list's matrices)."""
    key = tuple(qs)
    plans = qs[0]._plans
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _RowsPlan(qs)
    return plan


def embed_rows(raw: np.ndarray, qtype: str, shape: tuple[int, int], ids) -> np.ndarray:
    """Rows `ids` of the (n_vocab, n_embd) table as float32 (len(ids), n_embd): the token-embedding lookup."""
    n_out, n_in = _check(raw, qtype, shape)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"embed_rows: ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_out):
        raise ValueError(f"embed_rows: token ids must be in [0, {n_out}), got range [{ids.min()}, {ids.max()}]")
    out = np.empty((ids.size, n_in), np.float32)
    if qtype == "F32":
        out[:] = raw.view(np.float32).reshape(n_out, n_in)[ids]
    elif ids.size:
        (_ROWS_SERIAL[qtype] if ids.size <= _SERIAL_IDS else _KERNELS[qtype][1])(raw, ids, n_in, out)
    return out


from . import gemm_f32  # noqa: E402 (it builds on this module's half conversions)
