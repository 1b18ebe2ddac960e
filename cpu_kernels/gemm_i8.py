"""Prefill on int8 dot products: the weight matrix unpacked once per tile of rows, reused for every token.

The float prefill path (linear.QuantLinear with T >= _GEMM_MIN_T rows) dequantizes weight tiles to float32
and runs a float GEMM; this one keeps both sides in bytes, as llama.cpp's prefill does:

* activations: quantized once per 32 values (`quantize_act`: int8 codes `qx`, scales `dx`, and `xs` = the
  float sum of each 16 activations, dx * sum of their codes, for the weights' offsets);
* weights: each tile of _TILE_ROWS (32 with 512-bit VNNI, else 16) rows is unpacked by its type's
  `_unpack_<type>` into unsigned byte codes and two floats per 16 weights, w = scl * code - mins (every type below fits that form: Q8_0's signed bytes
  get +128 and an offset of 128 d, Q6_K's 6-bit codes an offset of 32 d sc, ...), stored 4 codes of each row
  side by side (tile[g, r] = codes 4g..4g+3 of row r), in a buffer of the thread that uses it (~1.5 bytes per
  weight: 32 rows stay in L2);
* the micro-kernel `_dot_tile` (explicit SIMD: vpdpbusd on 512-bit registers where the CPU has AVX512-VNNI,
  cpu_kernels/simd.py's 256-bit byte dot twice elsewhere) multiplies the tile's rows by _MT (4) token rows: one
  64-byte load holds 4 codes of 16 rows, one byte dot adds them times 4 broadcast activation codes into 16 int32
  lanes (one per row), so per scale group (32 codes; 16 for Q6_K) 2 x 4 integer sums are converted to float
  once and scaled by scl * dx; the offsets add mins times the float sum of the group's activations.

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
from .simd import F32, I8, I32, I64, _IR, _vec, data_ptrs

from edgeq.formats.quants import QTYPES



# ---------------------------------------------------------------- activations
@njit(**_JIT)
def _quantize_row(x, q, dx, xs):
    for b in range(x.shape[0] // QK):
        d, s0, s1 = _quantize_block(x[b * QK:(b + 1) * QK], q, b * QK)
        xs[2 * b] = d * np.float32(s0)
        xs[2 * b + 1] = d * np.float32(s1)
        dx[b] = d


@njit(parallel=True, **_JIT)
def quantize_act(X, qx, dx, xs):
    """X (T, n) float32 -> qx int8 (T', n) codes per 32 values, dx (T', n/32) their scales, xs (T', n/16) the
    float sums dx * (sum of 16 codes). Rows T..T'-1 (padding) are left as they are (zeros). A row per parallel
    iteration, its blocks in a serial function: views made inside the parallel loop's body cost atomic reference
    counts (a block's slice there: 1.6 ns a value, 6x the quantization itself)."""
    for t in prange(X.shape[0]):
        _quantize_row(X[t], qx[t], dx[t], xs[t])


# ---------------------------------------------------------------- weights: one row -> column i of the tile
# tile uint32 (n/4, R): tile[g, i] = codes 4g..4g+3 of the row (unsigned bytes, lowest first); scl and mins
# float32 (n/16, R): w[k] = scl[k // 16, i] * code[k] - mins[k // 16, i]. Each type builds the 4 codes of a word
# from one 32-bit load of its packed bits (the nibbles of 4 weights sit in 4 consecutive bytes in every type).
_LO4, _LO2, _LO1 = np.int32(0x0F0F0F0F), np.int32(0x03030303), np.int32(0x01010101)


@njit(inline="always", **_JIT)
def _unpack_q8_0(row, n, tile, i, scl, mins):
    for b in range(n // 32):
        d = _h2f(row[b * 34], row[b * 34 + 1])
        for m in range(8):
            tile[b * 8 + m, i] = np.uint32(_u32(row, b * 34 + 2 + 4 * m) ^ np.int32(-0x7F7F7F80))  # int8 q + 128
        scl[2 * b, i] = scl[2 * b + 1, i] = d
        mins[2 * b, i] = mins[2 * b + 1, i] = np.float32(128.0) * d


@njit(inline="always", **_JIT)
def _spread4(bits):
    """4 bits -> bit 4 of each of 4 bytes (Q5's fifth bits)."""
    return ((bits & 1) | ((bits & 2) << 7) | ((bits & 4) << 14) | ((bits & 8) << 21)) << 4


@njit(inline="always", **_JIT)
def _unpack_legacy(row, n, tile, i, scl, mins, with_min, fifth_bits):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 per 32: d (f16), [m (f16)], [32 fifth bits], 16 bytes of nibbles (low nibbles:
    weights 0..15, high: 16..31). Q4_0/Q5_0: w = d * (q - 8 or 16), an offset of 8 d or 16 d; Q4_1/Q5_1:
    w = d * q + m, an offset of -m."""
    qs = 2 + 2 * with_min + 4 * fifth_bits
    block_bytes = qs + 16
    for b in range(n // 32):
        o = b * block_bytes
        d = _h2f(row[o], row[o + 1])
        qh = _u32(row, o + 2 + 2 * with_min) if fifth_bits else np.int32(0)
        for m in range(4):
            v = _u32(row, o + qs + 4 * m)
            lo, hi = v & _LO4, (v >> 4) & _LO4
            if fifth_bits:
                lo |= _spread4((qh >> (4 * m)) & 15)
                hi |= _spread4((qh >> (16 + 4 * m)) & 15)
            tile[b * 8 + m, i] = np.uint32(lo)
            tile[b * 8 + 4 + m, i] = np.uint32(hi)
        scl[2 * b, i] = scl[2 * b + 1, i] = d
        if with_min:
            off = -_h2f(row[o + 2], row[o + 3])
        else:
            off = np.float32(16.0 if fifth_bits else 8.0) * d
        mins[2 * b, i] = mins[2 * b + 1, i] = off


@njit(inline="always", **_JIT)
def _unpack_q4_0(row, n, tile, i, scl, mins):
    _unpack_legacy(row, n, tile, i, scl, mins, False, False)


@njit(inline="always", **_JIT)
def _unpack_q4_1(row, n, tile, i, scl, mins):
    _unpack_legacy(row, n, tile, i, scl, mins, True, False)


@njit(inline="always", **_JIT)
def _unpack_q5_0(row, n, tile, i, scl, mins):
    _unpack_legacy(row, n, tile, i, scl, mins, False, True)


@njit(inline="always", **_JIT)
def _unpack_q5_1(row, n, tile, i, scl, mins):
    _unpack_legacy(row, n, tile, i, scl, mins, True, True)


@njit(inline="always", **_JIT)
def _unpack_k45(row, n, tile, i, scl, mins, block_bytes, qs_off, fifth_bits):
    """Q4_K / Q5_K (see linear._dq_k45): w = d * sc * q - dmin * mn per 32."""
    for sb in range(n // 256):
        o = sb * block_bytes
        d = _h2f(row[o], row[o + 1])
        dmin = _h2f(row[o + 2], row[o + 3])
        sc = row[o + 4:o + 16]
        for k in range(8):
            a, mn = _k_scale_min(sc, k)
            s = sb * 16 + 2 * k
            scl[s, i] = scl[s + 1, i] = d * np.float32(a)
            mins[s, i] = mins[s + 1, i] = dmin * np.float32(mn)
            sh = 4 * (k & 1)
            for m in range(8):
                q = (_u32(row, o + qs_off + (k >> 1) * 32 + 4 * m) >> sh) & _LO4
                if fifth_bits:
                    q |= ((_u32(row, o + 16 + 4 * m) >> k) & _LO1) << 4
                tile[sb * 64 + k * 8 + m, i] = np.uint32(q)


@njit(inline="always", **_JIT)
def _unpack_q4_k(row, n, tile, i, scl, mins):
    _unpack_k45(row, n, tile, i, scl, mins, QTYPES_Q4_K_BYTES, 16, False)


@njit(inline="always", **_JIT)
def _unpack_q5_k(row, n, tile, i, scl, mins):
    _unpack_k45(row, n, tile, i, scl, mins, QTYPES_Q5_K_BYTES, 48, True)


@njit(inline="always", **_JIT)
def _unpack_q6_k(row, n, tile, i, scl, mins):
    """Q6_K (see linear._dq_q6_k): w = d * sc * (q - 32) per 16."""
    for sb in range(n // 256):
        o = sb * 210
        d = _h2f(row[o + 208], row[o + 209])
        for k in range(16):
            s = d * np.float32(_i8(row[o + 192 + k]))
            scl[sb * 16 + k, i] = s
            mins[sb * 16 + k, i] = np.float32(32.0) * s
        for k in range(8):
            h = k >> 2
            kk = k & 3
            sl = 4 * (kk >> 1)
            shh = 2 * kk
            for m in range(8):
                ql = (_u32(row, o + h * 64 + (kk & 1) * 32 + 4 * m) >> sl) & _LO4
                qh = (_u32(row, o + 128 + h * 32 + 4 * m) >> shh) & _LO2
                tile[sb * 64 + k * 8 + m, i] = np.uint32(ql | (qh << 4))


QTYPES_Q4_K_BYTES, QTYPES_Q5_K_BYTES = QTYPES["Q4_K"].block_bytes, QTYPES["Q5_K"].block_bytes
_UNPACK = {"Q8_0": _unpack_q8_0, "Q4_0": _unpack_q4_0, "Q4_1": _unpack_q4_1, "Q5_0": _unpack_q5_0,
           "Q5_1": _unpack_q5_1, "Q4_K": _unpack_q4_k,
           "Q5_K": _unpack_q5_k, "Q6_K": _unpack_q6_k}


# ---------------------------------------------------------------- weights: 16 rows at once (AVX-512)
# What _unpack_<type> writes for one row, for 16 rows in one pass: one vpgatherdd fetches the same dword of a block
# from the 16 rows, the vector ops that follow are the scalar unpack's, lane by lane, and each result is one 64-byte
# store into a tile row (16 columns). The scalar unpack stored a dword at a time down a column; it was most of a
# short prompt's time (a 16-token prefill of the Qwen3-1.7B Q4_K_M shape: 385 of 479 ms in the Q4_K products).
# Each builder emits one block: gather(o) -> <16 x i32> the dword at byte o of the block in every row,
# put(arr, k, v) stores v (<16 x i32> or <16 x float>) into row k of tile / scl / mins (0 / 1 / 2).
def _halves(x, v, high: bool):
    """<16 x float>: the IEEE half in the low (or high) 16 bits of each lane of v."""
    h = x.b.lshr(v, x.const(I32, 16, 16)) if high else v
    return x.b.fpext(x.b.bitcast(x.b.trunc(h, _vec(ir.IntType(16), 16)), _vec(ir.HalfType(), 16)), _vec(F32, 16))


def _bits(x, v, shift: int, mask: int):
    """(v >> shift) & mask, lane by lane (logical shift)."""
    if shift:
        v = x.b.lshr(v, x.const(I32, 16, shift))
    return x.b.and_(v, x.const(I32, 16, mask))


def _spread4_16(x, bits):
    """_spread4 on 16 lanes: 4 bits -> bit 4 of each of 4 bytes."""
    parts = [x.b.shl(x.b.and_(bits, x.const(I32, 16, 1 << i)), x.const(I32, 16, 7 * i)) if i else
             x.b.and_(bits, x.const(I32, 16, 1)) for i in range(4)]
    return x.b.shl(x.b.or_(x.b.or_(parts[0], parts[1]), x.b.or_(parts[2], parts[3])), x.const(I32, 16, 4))


def _legacy16(with_min: bool, fifth_bits: bool):
    qs = 2 + 2 * with_min + 4 * fifth_bits

    def emit(x, gather, b, put):
        hdr = gather(0)
        d = _halves(x, hdr, False)
        off = x.b.fneg(_halves(x, hdr, True)) if with_min else \
            x.b.fmul(x.const(F32, 16, 16.0 if fifth_bits else 8.0), d)
        qh = gather(2 + 2 * with_min) if fifth_bits else None
        for m in range(4):
            v = gather(qs + 4 * m)
            lo, hi = _bits(x, v, 0, 0x0F0F0F0F), _bits(x, v, 4, 0x0F0F0F0F)
            if fifth_bits:
                lo = x.b.or_(lo, _spread4_16(x, _bits(x, qh, 4 * m, 15)))
                hi = x.b.or_(hi, _spread4_16(x, _bits(x, qh, 16 + 4 * m, 15)))
            put(0, b * 8 + m, lo)
            put(0, b * 8 + 4 + m, hi)
        for j in (0, 1):
            put(1, b * 2 + j, d)
            put(2, b * 2 + j, off)
    return emit


def _q8_0_16(x, gather, b, put):
    d = _halves(x, gather(0), False)
    for m in range(8):
        put(0, b * 8 + m, x.b.xor(gather(2 + 4 * m), x.const(I32, 16, -0x7F7F7F80)))  # int8 q + 128
    for j in (0, 1):
        put(1, b * 2 + j, d)
        put(2, b * 2 + j, x.b.fmul(x.const(F32, 16, 128.0), d))


def _q4_k_16(x, gather, b, put):
    hdr = gather(0)
    d, dmin = _halves(x, hdr, False), _halves(x, hdr, True)
    u0, u1, u2 = gather(4), gather(8), gather(12)
    for k in range(8):  # linear._k_scale_min, lane by lane
        j = 8 * (k % 4)
        if k < 4:
            sc, mn = _bits(x, u0, j, 63), _bits(x, u1, j, 63)
        else:
            sc = x.b.or_(_bits(x, u2, j, 15), _bits(x, u0, j + 2, 48))
            mn = x.b.or_(_bits(x, u2, j + 4, 15), _bits(x, u1, j + 2, 48))
        s, m = x.b.fmul(d, x.b.sitofp(sc, _vec(F32, 16))), x.b.fmul(dmin, x.b.sitofp(mn, _vec(F32, 16)))
        for h in (0, 1):
            put(1, b * 16 + 2 * k + h, s)
            put(2, b * 16 + 2 * k + h, m)
    for c in range(4):
        for m in range(8):
            v = gather(16 + 32 * c + 4 * m)
            put(0, b * 64 + 2 * c * 8 + m, _bits(x, v, 0, 0x0F0F0F0F))
            put(0, b * 64 + (2 * c + 1) * 8 + m, _bits(x, v, 4, 0x0F0F0F0F))


def _q6_k_16(x, gather, b, put):
    d = _halves(x, gather(206), True)  # bytes 208-209 (a dword from 208 would read past the block)
    for q in range(4):
        w = gather(192 + 4 * q)
        for e in range(4):  # the signed byte e of w
            sb = x.b.ashr(x.b.shl(w, x.const(I32, 16, 24 - 8 * e)), x.const(I32, 16, 24))
            s = x.b.fmul(d, x.b.sitofp(sb, _vec(F32, 16)))
            put(1, b * 16 + 4 * q + e, s)
            put(2, b * 16 + 4 * q + e, x.b.fmul(x.const(F32, 16, 32.0), s))
    for h in range(2):
        for m in range(8):
            qh = gather(128 + 32 * h + 4 * m)
            ql = (gather(64 * h + 4 * m), gather(64 * h + 32 + 4 * m))
            for kk in range(4):
                lo = _bits(x, ql[kk & 1], 4 * (kk >> 1), 0x0F0F0F0F)
                hi = x.b.shl(_bits(x, qh, 2 * kk, 0x03030303), x.const(I32, 16, 4))
                put(0, b * 64 + (4 * h + kk) * 8 + m, x.b.or_(lo, hi))


_UNPACK16_IR = {"Q8_0": _q8_0_16, "Q4_0": _legacy16(False, False), "Q4_1": _legacy16(True, False),
                "Q5_0": _legacy16(False, True), "Q5_1": _legacy16(True, True), "Q4_K": _q4_k_16, "Q6_K": _q6_k_16}


# The fill's gathers read 16 rows at once, 16 streams a row's block apart that the hardware prefetchers did not
# follow: the fill of a 1536 x 576 Q4_1 matrix took ~150-200 us, most of a prompt chunk's product at T = 8 and ~12%
# of it at T = 176 (Zen 4, no AMX). Each block now prefetches into L2 its share of the next 16 rows (the other half
# of the tile, or the next tile's first), as batch_dot's rows16 does. `python benchmarks/gemm_fill_ab.py [--model
# gemma3-270m]` (the ffn gate + down products, both fills alternated in one process, 2 threads): SmolLM2 (Q4_1) T = 8
# 9.76 -> 4.27 ms, T = 64 19.27 -> 14.12, T = 176 39.55 -> 35.06; Gemma 3 (Q4_K, Q5_0, Q6_K) 9.21 -> 4.10, 18.61 ->
# 13.50, 36.95 -> 32.05. Into L1 instead: the same. Read when a fill is compiled (benchmarks/gemm_fill_ab.py sets it).
FILL_AHEAD = True


def _unpack16(qtype: str):
    """Numba intrinsic u(raw, off, row_bytes, nr, n, tile, col, scl, mins): _unpack_<type> of the rows whose bytes
    start at off + i * row_bytes (i < 16) into columns col..col+15 of tile, scl and mins; rows past nr (>= 1) repeat
    the last real one. 16 * row_bytes must fit in 31 bits."""
    emit, q = _UNPACK16_IR[qtype], QTYPES[qtype]

    def impl(typingctx, raw, off, row_bytes, nr, n, tile, col, scl, mins):
        ip = types.intp
        sig = types.void(raw, ip, ip, ip, ip, tile, ip, scl, mins)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            raw0, *outs = data_ptrs(context, builder, signature, args, (0, 5, 7, 8))
            off, row_bytes, nr, n, col = args[1], args[2], args[3], args[4], args[6]
            R = cgutils.unpack_tuple(builder, context.make_array(signature.args[5])(context, builder, args[5]).shape,
                                     2)[1]
            base = builder.gep(raw0, [off])
            last = x.splat(builder.trunc(builder.sub(nr, c(1)), I32), 16)
            lanes = ir.Constant(_vec(I32, 16), list(range(16)))
            rows = builder.select(builder.icmp_signed("<", lanes, last), lanes, last)
            row_off = builder.mul(rows, x.splat(builder.trunc(row_bytes, I32), 16))
            with cgutils.for_range(builder, builder.udiv(n, c(q.block_size))) as loop:
                b = loop.index
                blk = builder.add(row_off, x.splat(builder.trunc(builder.mul(b, c(q.block_bytes)), I32), 16))
                # the next 16 rows' bytes (contiguous after these) into L2, a share per block as the loop goes
                # (FILL_AHEAD)
                pf = builder.add(builder.mul(row_bytes, c(16)), builder.mul(b, c(16 * q.block_bytes)))
                simd._prefetch_ahead(x, base, builder.sub(pf, c(64)), 16 * q.block_bytes, 64 if FILL_AHEAD else 0, 2)

                def gather(o):
                    return x.gather16(base, builder.add(blk, x.const(I32, 16, o)))

                def put(which, k, v):
                    at = builder.mul(builder.add(builder.mul(k.v if isinstance(k, _Index) else c(k), R), col), c(4))
                    p = builder.bitcast(builder.gep(outs[which], [at]), v.type.as_pointer())
                    builder.store(v, p, align=4)

                emit(x, gather, _Index(builder, b), put)
            return context.get_dummy_value()
        return sig, codegen
    impl.__name__ = impl.__qualname__ = "unpack16_" + qtype.lower()
    return intrinsic(impl)


class _Index:
    """An i64 IR value with the integer arithmetic the builders write (b * 8 + m)."""

    def __init__(self, builder, v):
        self.b, self.v = builder, v

    def __mul__(self, k: int) -> "_Index":
        return _Index(self.b, self.b.mul(self.v, ir.Constant(I64, k)))

    def __add__(self, k: int) -> "_Index":
        return _Index(self.b, self.b.add(self.v, ir.Constant(I64, k)))


# ---------------------------------------------------------------- the micro-kernel: _MG x 16 weight rows x _MT tokens
# The unpacked tile is stored 4 codes of 16 rows side by side ("k-groups": tile[g, r] = codes 4g..4g+3 of row r, as
# one uint32), so one 64-byte load holds 4 codes of 16 rows and one vpdpbusd multiplies it by 4 codes of a token
# (broadcast): each lane gathers one row's dot, no horizontal sums. The int32 lanes run over a whole scale group
# (32 codes; 16 for Q6_K, whose scales change every 16) and are converted to float once per group.
_WIDE = simd.LEVEL == "vnni" and all(simd.llvm_binding.get_host_cpu_features().get(f)
                                     for f in ("avx512vnni", "avx512bw", "avx512f"))
# _MG x 16 rows x _MT tokens: with 512-bit VNNI 2 x 16 x 4 (8 int32 + 8 float accumulators, 2 weight loads per 8
# byte dots in 32 zmm registers); with 256-bit registers (16 of them, each accumulator two) 1 x 16 x 4, measured on
# Zen 3 (`benchmarks/prefill_profile.py ... -p 200 -t 1`, CPU ms of the GEMM): SmolLM2 Q4_1 455 vs 500 (2 x 4),
# 500 (2 x 2), 575 (1 x 8); Qwen2.5-0.5B Q5_0 / Q6_K / Q4_K 905 / 215 / 164 vs 1058 / 255 / 225 (2 x 4)
_MG, _MT = (2, 4) if _WIDE else (1, 4)
_TILE_ROWS = 16 * _MG


def _udot16(x, acc, u, s):
    """acc (<16 x i32>) + the byte dots of u (<64 x i8>, unsigned) and s (<64 x i8>, signed), 4 bytes per lane."""
    v16 = _vec(ir.IntType(32), 16)
    if _WIDE:
        return x.intr("llvm.x86.avx512.vpdpbusd.512", v16, [acc, x.b.bitcast(u, v16), x.b.bitcast(s, v16)])
    halves = [x.udot(x.half_of(u, h), x.half_of(s, h)) for h in (0, 1)]  # the 256-bit (or portable) byte dot
    return x.b.add(acc, x.concat(halves[0], halves[1]))


def _udot16_pairs(x, u, s):
    """<64 x i8> unsigned . <64 x i8> signed -> <32 x i16>: the byte products summed in pairs (vpmaddubsw on
    each 256-bit half; the caller keeps the codes small enough that no pair saturates)."""
    return x.concat(*(x.pairs16(x.half_of(u, h), x.half_of(s, h)) for h in (0, 1)))


def _widen16(x, acc, p16):
    """acc (<16 x i32>) + the pairs of p16 (<32 x i16>) summed (vpmaddwd by ones on each half)."""
    ones = x.const(ir.IntType(16), 16, 1)
    return x.b.add(acc, x.concat(*(x.madd16(x.half_of(p16, h), ones) for h in (0, 1))))


def _per16(code_max: int) -> int:
    """How many k-groups' int16 pair sums add up before widening to int32 (simd.int16_runs; 1 with 512-bit VNNI,
    which sums in int32 at once). Saves the vpmaddwd per k-group that the 256-bit byte dot pays."""
    return 1 if _WIDE else simd.int16_runs(code_max)


def _micro(group: int, per: int = 1):
    """An intrinsic k(tile, scl, mins, R, r, qx, dx, xs, t, n, res): res[j, 16 i + l] = row r + 16 i + l of the
    unpacked tile . token row t + j (i < _MG, j < _MT, l < 16) over n codes, in scale groups of `group` (32 or 16)
    codes. tile uint32 (n/4, R), scl/mins float32 (n/16, R), qx int8 (T, n), dx (T, n/32), xs (T, n/16) float32,
    res (_MT, 16 _MG) float32, all C-contiguous; the caller keeps r + 16 _MG <= R and t + _MT <= T (no bounds
    checks here). per > 1: `per` k-groups' byte products are summed in int16 before widening (_per16)."""
    kg = group // 4          # k-groups of 4 codes per scale group
    per16 = group // 16      # entries of scl/mins/xs per scale group

    def impl(typingctx, tile, scl, mins, R, r, qx, dx, xs, t, n, res):
        sig = types.void(tile, scl, mins, types.intp, types.intp, qx, dx, xs, types.intp, types.intp, res)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pw, ps, pm, pq, pd, px, pr = data_ptrs(context, builder, signature, args, (0, 1, 2, 5, 6, 7, 10))
            R, r, t, n = args[3], args[4], args[8], args[9]
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            i32, v16f, v16i, b64 = ir.IntType(32), _vec(F32, 16), _vec(ir.IntType(32), 16), _vec(I8, 64)
            nb, n16 = builder.udiv(n, c(32)), builder.udiv(n, c(16))
            cols = [builder.add(r, c(16 * i)) for i in range(_MG)]
            toks = [builder.add(t, c(j)) for j in range(_MT)]
            facc = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, None)) for _ in range(_MT)]
                    for _ in range(_MG)]
            with cgutils.for_range(builder, builder.udiv(n, c(group))) as loop:
                grp = loop.index
                iacc = [[ir.Constant(v16i, None)] * _MT for _ in range(_MG)]
                pacc = [[None] * _MT for _ in range(_MG)]  # int16 pair sums not yet widened (per > 1)
                for g in range(kg):
                    kk = builder.add(builder.mul(grp, c(kg)), c(g))          # k-group index: codes 4 kk ..
                    w = [x.at(pw, builder.mul(builder.add(builder.mul(kk, R), cc), c(4)), b64) for cc in cols]
                    a = [builder.bitcast(x.splat(x.at(pq, builder.add(builder.mul(tt, n), builder.mul(kk, c(4))),
                                                      i32), 16), b64) for tt in toks]
                    for i in range(_MG):
                        for j in range(_MT):
                            if per == 1:
                                iacc[i][j] = _udot16(x, iacc[i][j], w[i], a[j])
                                continue
                            p = _udot16_pairs(x, w[i], a[j])
                            pacc[i][j] = p if pacc[i][j] is None else builder.add(pacc[i][j], p)
                            if (g + 1) % per == 0 or g == kg - 1:
                                iacc[i][j], pacc[i][j] = _widen16(x, iacc[i][j], pacc[i][j]), None
                s16 = builder.mul(grp, c(per16))                              # first scale entry of the group
                s = [x.at(ps, builder.mul(builder.add(builder.mul(s16, R), cc), c(4)), v16f) for cc in cols]
                # the offsets: one per scale group (Q4_K/Q5_K's mins and the 32-code types' zero points are per 32),
                # times the float sum of the group's activations
                m = [builder.fneg(x.at(pm, builder.mul(builder.add(builder.mul(s16, R), cc), c(4)), v16f))
                     for cc in cols]
                blk = builder.udiv(builder.mul(grp, c(group)), c(32))       # the activations' block of 32
                for j, tt in enumerate(toks):
                    d = x.splat(x.elem(pd, builder.add(builder.mul(tt, nb), blk), F32), 16)
                    xsum = x.elem(px, builder.add(builder.mul(tt, n16), s16), F32)
                    for h in range(1, per16):
                        xsum = builder.fadd(xsum, x.elem(px, builder.add(builder.add(builder.mul(tt, n16), s16), c(h)),
                                                         F32))
                    xsum = x.splat(xsum, 16)
                    for i in range(_MG):
                        f = builder.sitofp(iacc[i][j], v16f)
                        acc = x.intr("llvm.fma.v16f32", v16f, [f, builder.fmul(s[i], d), builder.load(facc[i][j])])
                        builder.store(x.intr("llvm.fma.v16f32", v16f, [m[i], xsum, acc]), facc[i][j])
            out = builder.bitcast(pr, v16f.as_pointer())
            for i in range(_MG):
                for j in range(_MT):
                    builder.store(builder.load(facc[i][j]), builder.gep(out, [ir.Constant(i32, j * _MG + i)]),
                                  align=4)
            return context.get_dummy_value()
        return sig, codegen
    impl.__name__ = impl.__qualname__ = f"dot{16 * _MG}x{_MT}_g{group}" + (f"_p{per}" if per > 1 else "")
    return intrinsic(impl)


_GROUP = {"Q6_K": 16}  # codes per scale group where not 32
# (codes per scale group, k-groups per int16 sum) -> the micro-kernel
_DOTS = {key: _micro(*key) for key in {(_GROUP.get(q, 32), _per16(m)) for q, m in simd.UNSIGNED_CODE_MAX.items()}}


# ---------------------------------------------------------------- the parallel driver, one per type
_dot_tile = None
_block_elems = _block_bytes = 0


def _rows_unpacker(unpack):
    """_unpack16's contract on the scalar unpack of one row (`unpack`, an _UNPACK entry): 16 rows one at a time,
    rows past nr repeating the last real one (for the types and CPUs without the gathers)."""
    @njit(inline="always", **_JIT)
    def rows16(raw, off, row_bytes, nr, n, tile, col, scl, mins):
        for i in range(16):
            o = off + min(i, nr - 1) * row_bytes
            unpack(raw[o:o + row_bytes], n, tile, col + i, scl, mins)
    return rows16


def _gemm_template(raw, n_in, qx, dx, xs, out):
    """out[t, r] = W[r] . dequant(qx[t]) for t < out.shape[0], W = raw's rows (type bound by _specialize); the
    tiles filled 16 rows at a time by _unpack_16 (_unpack16's gathers, or _rows_unpacker)."""
    T, n_out = out.shape
    R = _TILE_ROWS
    row_bytes = (n_in // _block_elems) * _block_bytes
    for g in prange((n_out + R - 1) // R):
        r0 = g * R
        nr = min(R, n_out - r0)
        tile = np.empty((n_in // 4, R), np.uint32)  # every column written below
        scl = np.empty((n_in // 16, R), np.float32)
        mins = np.empty((n_in // 16, R), np.float32)
        for c in range(0, R, 16):
            if c < nr:
                _unpack_16(raw, (r0 + c) * row_bytes, row_bytes, min(16, nr - c), n_in, tile, c, scl, mins)
            else:  # past the last row
                tile[:, c:c + 16] = 0
                scl[:, c:c + 16] = 0
                mins[:, c:c + 16] = 0
        res = np.empty((_MT, R), np.float32)
        for t in range(0, T, _MT):
            _dot_tile(tile, scl, mins, R, 0, qx, dx, xs, t, n_in, res)
            for jj in range(min(_MT, T - t)):
                out[t + jj, r0:r0 + nr] = res[jj, :nr]


_unpack_16 = None  # bound per type by _specialize
# with 512-bit VNNI (vpgatherdd) the types of _UNPACK16_IR unpack 16 rows at once
UNPACK16 = frozenset(_UNPACK16_IR) if _WIDE else frozenset()


def _specialize(qtype: str, gather: bool | None = None, suffix: str = ""):
    """The parallel driver for `qtype` (as linear._specialize: a function with its own globals, so the
    on-disk cache finds it); gather: the tiles unpacked by _unpack16 (default: where UNPACK16 has the type) or row
    by row (_rows_unpacker); suffix: a name of its own for a variant compiled under other settings (a benchmark's)."""
    q = QTYPES[qtype]
    gather = qtype in UNPACK16 if gather is None else gather
    bound = dict(_gemm_template.__globals__, _block_elems=q.block_size,
                 _dot_tile=_DOTS[_GROUP.get(qtype, 32), _per16(simd.UNSIGNED_CODE_MAX[qtype])],
                 _block_bytes=q.block_bytes,
                 _unpack_16=_unpack16(qtype) if gather else _rows_unpacker(_UNPACK[qtype]))
    name = "_gemm_i8_" + qtype.lower() + ("_gather" if gather else "") + suffix
    fn = pytypes.FunctionType(_gemm_template.__code__, bound, name)
    fn.__qualname__ = name
    fn.__doc__ = f"_gemm_template for {qtype}"
    return njit(parallel=True, cache=True, fastmath=_FAST, nogil=True)(fn)


_DRIVERS = {q: _specialize(q) for q in _UNPACK}

# the types whose prefill takes this path on this CPU: measured against the float tiles (docs/performance.md)
INT8_GEMM = tuple(q for q in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
                  if simd.LEVEL != "avx2" or simd.UNSIGNED_CODE_MAX[q] < 128)
# below this many weights the float tiles keep the products. 0: every matrix of these types, as decode and as
# llama.cpp's prefill. The int8 GEMM is 1.6-3.5x the float tiles down to 192 x 576 (SmolLM2's k/v, T = 128, one
# thread); a floor of 2^20 kept small models' prefill on float activations (closer to transformers' float model:
# SmolLM2 median error 0.012 vs 0.024) at 2.5x the time, though every decoded token already has that error
# (0.025 on the decode path) and perplexity does not see it (8 windows: SmolLM2 +0.10%, Gemma 3 -0.19%;
# docs/performance.md)
INT8_MIN_WEIGHTS = 0


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


class Activations:
    """A prompt's rows X (T, n) float32 as the prefill products take them, each form made once on first use, for
    every matrix that shares them (linear.matmul_many): int8() = quantized_activations(X), bf16() =
    gemm_amx.to_bf16(X)."""

    def __init__(self, X: np.ndarray):
        self.X = X
        self._int8 = self._bf16 = None

    def int8(self):
        if self._int8 is None:
            self._int8 = quantized_activations(self.X)
        return self._int8

    def bf16(self) -> np.ndarray:
        if self._bf16 is None:
            from . import gemm_amx

            self._bf16 = gemm_amx.to_bf16(self.X)
        return self._bf16


def matmul_i8(raw: np.ndarray, qtype: str, n_in: int, X: np.ndarray, out: np.ndarray,
              act: Activations | None = None) -> None:
    """out (T, n_out) = X (T, n_in) . W^T for W = raw (validated by the caller: linear._check) of `qtype`
    in _UNPACK; `act`: X's Activations when the caller shares them between matrices. On the AMX tiles where
    gemm_amx.use says so (bf16 activations), else on vpdpbusd (int8 activations)."""
    from . import gemm_amx  # builds on this module

    act = act if act is not None else Activations(X)
    if gemm_amx.use(qtype, out.shape[0]) and out.flags.c_contiguous:
        gemm_amx.matmul(raw, qtype, n_in, act.bf16(), out)
        return
    qx, dx, xs = act.int8()
    _DRIVERS[qtype](raw, n_in, qx, dx, xs, out)
