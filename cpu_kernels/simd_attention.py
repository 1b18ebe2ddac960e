"""SIMD intrinsics of the attention kernels (cpu_kernels/attention_q.py), in the style of cpu_kernels/simd.py.

Decode, on the q8 KV cache (int8 codes (Hkv, S, D) viewed as uint8, f16 scales (Hkv, S, D/32)), for the rows
at slots s_first, s_first+1, ... of one kv head (wrapping at nslots; row r = base + slot starts at code byte
r * D and scale element r * D/32):
    scores_q8(codes, scales, base, nslots, s_first, n_pos, q, out)  out[i] = q . row(slot i)
    wsum_q8(codes, scales, base, nslots, s_first, n_pos, w, out)    out[:] += sum_i w[i] * row(slot i)
Prefill, one block of 32 positions already dequantized to float32:
    block_scores(q, kt, out)       out[j] = q . kt[:, j]   (kt = the block's keys transposed, (D, 32))
  also decode on the per-channel 8-bit keys, kt = one group's uint8 codes (D, 32) (q already times the scales)
    block_wsum(p, a, z, v, acc)    acc[:] += sum_{a <= j < z} p[j] * v[j, :]
D (the head size) must be a multiple of 32 except for block_scores; the caller checks shapes (attention_q).
Sums run in 32-float vectors with four accumulators over the positions (one chain of FMAs would wait on
its own latency); numpy twins: tests/test_kv_cache.py.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import F32, I8, I64, _IR, _vec, data_ptrs

V32 = _vec(F32, 32)
UNROLL = 4


def _c(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _len(context, builder, signature, args, i) -> ir.Value:
    return builder.extract_value(context.make_array(signature.args[i])(context, builder, args[i]).shape, 0)


def _non_negative(builder, n):
    """max(n, 0): counts go through unsigned divisions, where a negative count would be huge."""
    return builder.select(builder.icmp_signed("<", n, ir.Constant(n.type, 0)), ir.Constant(n.type, 0), n)


def _kv_row(builder, base, nslots, s_first, i):
    """Row index base + (s_first + i) wrapped at nslots (i < nslots)."""
    s = builder.add(s_first, i)
    return builder.add(base, builder.select(builder.icmp_signed(">=", s, nslots), builder.sub(s, nslots), s))


def _fma_sum(x: _IR, n, start, term) -> ir.Value:
    """sum over i in [start, start + n) of term(i) = (vector, scalar): vector * scalar, in four accumulators."""
    b = x.b
    accs = [cgutils.alloca_once_value(b, ir.Constant(V32, None)) for _ in range(UNROLL)]
    for acc in accs:
        b.store(ir.Constant(V32, None), acc)

    def step(i, acc):
        vals, w = term(b.add(start, i))
        b.store(x.intr("llvm.fma.v32f32", V32, [vals, x.splat(w, 32), b.load(acc)]), acc)

    n = _non_negative(b, n)
    n4 = b.udiv(n, _c(UNROLL))
    with cgutils.for_range(b, n4) as loop:
        for u, acc in enumerate(accs):
            step(b.add(b.mul(loop.index, _c(UNROLL)), _c(u)), acc)
    with cgutils.for_range(b, b.sub(n, b.mul(n4, _c(UNROLL)))) as loop:
        step(b.add(b.mul(n4, _c(UNROLL)), loop.index), accs[0])
    return b.fadd(b.fadd(b.load(accs[0]), b.load(accs[1])), b.fadd(b.load(accs[2]), b.load(accs[3])))


def _add_to(x: _IR, base, chunk, total) -> None:
    """base[32 chunk : 32 chunk + 32] += total (float32)."""
    p = x.b.bitcast(x.b.gep(base, [x.b.mul(chunk, _c(128))]), V32.as_pointer())
    x.b.store(x.b.fadd(x.b.load(p, align=4), total), p, align=4)


def _q8_chunk(x: _IR, codes, scales, row, D, nbd, c):
    """Columns 32c..32c+31 of q8 cache row `row`: (their codes as floats, their scale)."""
    b = x.b
    vals = b.sitofp(x.at(codes, b.add(b.mul(row, D), b.mul(c, _c(32))), _vec(I8, 32)), V32)
    return vals, x.half(scales, b.mul(b.add(b.mul(row, nbd), c), _c(2)))


@intrinsic
def scores_q8(typingctx, codes, scales, base, nslots, s_first, n_pos, q, out):
    sig = types.void(codes, scales, types.intp, types.intp, types.intp, types.intp, q, out)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pc, ps, pq, po = data_ptrs(context, builder, signature, args, (0, 1, 6, 7))
        base, nslots, s_first, n_pos = args[2:6]
        D = _len(context, builder, signature, args, 6)
        nbd = builder.udiv(D, _c(32))
        with cgutils.for_range(builder, n_pos) as loop:
            row = _kv_row(builder, base, nslots, s_first, loop.index)

            def term(c):
                vals, scale = _q8_chunk(x, pc, ps, row, D, nbd, c)
                return builder.fmul(vals, x.at(pq, builder.mul(c, _c(128)), V32)), scale
            acc = _fma_sum(x, nbd, _c(0), term)
            s16 = builder.fadd(x.half_of(acc, 0), x.half_of(acc, 1))
            s8 = builder.fadd(x.half_of(s16, 0), x.half_of(s16, 1))
            optr = builder.bitcast(builder.gep(po, [builder.mul(loop.index, _c(4))]), F32.as_pointer())
            builder.store(x.hsum8(s8), optr, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def wsum_q8(typingctx, codes, scales, base, nslots, s_first, n_pos, w, out):
    sig = types.void(codes, scales, types.intp, types.intp, types.intp, types.intp, w, out)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pc, ps, pw, po = data_ptrs(context, builder, signature, args, (0, 1, 6, 7))
        base, nslots, s_first, n_pos = args[2:6]
        D = _len(context, builder, signature, args, 7)
        nbd = builder.udiv(D, _c(32))
        with cgutils.for_range(builder, nbd) as chunk:
            def term(i):
                vals, scale = _q8_chunk(x, pc, ps, _kv_row(builder, base, nslots, s_first, i), D, nbd, chunk.index)
                return vals, builder.fmul(x.elem(pw, i, F32), scale)
            _add_to(x, po, chunk.index, _fma_sum(x, n_pos, _c(0), term))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def block_scores(typingctx, q, kt, out):
    sig = types.void(q, kt, out)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pq, pk, po = data_ptrs(context, builder, signature, args, (0, 1, 2))
        D = _len(context, builder, signature, args, 0)
        if signature.args[1].dtype == types.uint8:  # codes of a uint8_per_channel group: 32 bytes a channel
            def column(d):
                return builder.uitofp(x.at(pk, builder.mul(d, _c(32)), _vec(I8, 32)), V32)
        else:
            def column(d):
                return x.at(pk, builder.mul(d, _c(128)), V32)
        total = _fma_sum(x, D, _c(0), lambda d: (column(d), x.elem(pq, d, F32)))
        builder.store(total, builder.bitcast(po, V32.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def block_wsum(typingctx, p, a, z, v, acc):
    sig = types.void(p, types.intp, types.intp, v, acc)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pp, pv, pa = data_ptrs(context, builder, signature, args, (0, 3, 4))
        D = _len(context, builder, signature, args, 4)
        row_bytes = builder.mul(D, _c(4))
        with cgutils.for_range(builder, builder.udiv(D, _c(32))) as chunk:
            def term(j):
                vals = x.at(pv, builder.add(builder.mul(j, row_bytes), builder.mul(chunk.index, _c(128))), V32)
                return vals, x.elem(pp, j, F32)
            _add_to(x, pa, chunk.index, _fma_sum(x, builder.sub(args[2], args[1]), args[1], term))
        return context.get_dummy_value()
    return sig, codegen
