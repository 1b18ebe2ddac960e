"""SIMD intrinsics of the attention kernels (cpu_kernels/attention_q.py), in the style of cpu_kernels/simd.py.

Decode, on the q8 KV cache (int8 codes (Hkv, S, D) viewed as uint8, f16 scales (Hkv, S, D/32)), for the rows
at slots s_first, s_first+1, ... of one kv head (wrapping at nslots; row r = base + slot starts at code byte
r * D and scale element r * D/32):
    wsum_q8(codes, scales, base, nslots, s_first, n_pos, w, out)    out[:] += sum_i w[i] * row(slot i)
    scores_q8_R(codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0), R = 1, 2, 3
                                   out[r0 + r, col0 + i] = q[r0 + r] . row(slot i), r < R (16 positions a pass)
Prefill, one block of 32 positions already dequantized to float32:
    block_scores(q, kt, out)       out[j] = q . kt[:, j]   (kt = the block's keys transposed, (D, 32))
  also decode on the per-channel 8-bit keys, kt = one group's uint8 codes (D, 32) (q already times the scales)
    block_wsum(p, a, z, v, acc)    acc[:] += sum_{a <= j < z} p[j] * v[j, :]
Two query heads of one kv head at once in decode (PAIRS, AVX-512: each code converted to float once for both):
    wsum_q8_2(codes, scales, base, nslots, s_first, n_pos, w, col0, r0, out)
                                   out[r0 + r, :] += sum_i w[r0 + r, col0 + i] * row(slot i), r = 0, 1
    block_scores_2(q, r0, kt, out) out[r0 + r, j] = q[r0 + r] . kt[:, j] (uint8 codes), r = 0, 1
D (the head size) must be a multiple of 32 except for block_scores; the caller checks shapes (attention_q).
Sums run in 32-float vectors with four accumulators over the positions (one chain of FMAs would wait on
its own latency); numpy twins: tests/test_kv_cache.py.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ops import EXP2_POLY, LOG2E
from .simd import _ZMM, F32, I8, I32, I64, _IR, _prefetch, _vec, data_ptrs

V32 = _vec(F32, 32)
UNROLL = 4
# decode: two query heads of one kv head per pass over its codes (wsum_q8_2, block_scores_2), each code converted to
# float once for both; on AVX-512, where two rows' 8 accumulators fit the 32 registers
PAIRS = _ZMM


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


def _dim(context, builder, signature, args, i, axis) -> ir.Value:
    return builder.extract_value(context.make_array(signature.args[i])(context, builder, args[i]).shape, axis)


def _fma_sum(x: _IR, n, start, term) -> ir.Value:
    """sum over i in [start, start + n) of term(i) = (vector, scalar): vector * scalar, in four accumulators."""
    def one_row(i):
        vals, w = term(i)
        return vals, [w]
    return _fma_sums(x, n, start, 1, one_row)[0]


def _fma_sums(x: _IR, n, start, rows: int, term) -> list:
    """[sum over i in [start, start + n) of vector(i) * w_r(i) for r < rows], term(i) = (vector(i), [w_r(i)]): one
    vector (codes converted once) for several rows' weights (the query heads of one kv head), each row in four
    accumulators of its own, summed in the order _fma_sum sums one row."""
    b = x.b
    accs = [[cgutils.alloca_once_value(b, ir.Constant(V32, None)) for _ in range(UNROLL)] for _ in range(rows)]
    for row in accs:
        for acc in row:
            b.store(ir.Constant(V32, None), acc)

    def step(i, u):
        vals, ws = term(b.add(start, i))
        for row, w in zip(accs, ws):
            b.store(x.intr("llvm.fma.v32f32", V32, [vals, x.splat(w, 32), b.load(row[u])]), row[u])

    n = _non_negative(b, n)
    n4 = b.udiv(n, _c(UNROLL))
    with cgutils.for_range(b, n4) as loop:
        for u in range(UNROLL):
            step(b.add(b.mul(loop.index, _c(UNROLL)), _c(u)), u)
    with cgutils.for_range(b, b.sub(n, b.mul(n4, _c(UNROLL)))) as loop:
        step(b.add(b.mul(n4, _c(UNROLL)), loop.index), 0)
    return [b.fadd(b.fadd(b.load(a[0]), b.load(a[1])), b.fadd(b.load(a[2]), b.load(a[3]))) for a in accs]


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


def _tree_steps():
    """The lane shuffles that add 16 vectors of 16 partial sums (one vector per position) into one vector of their 16
    totals: pairs are combined as they arrive (at most five vectors a row live), level l halving each position's
    lanes (8, 4, 2, 1 lanes kept). Returns (lo, hi) index lists per level and the final lane of each position."""
    def combine(x, y, h):
        lo, hi = [], []
        for s in range(16 // (2 * h)):
            lo += [s * 2 * h + t for t in range(h)] + [16 + s * 2 * h + t for t in range(h)]
            hi += [s * 2 * h + h + t for t in range(h)] + [16 + s * 2 * h + h + t for t in range(h)]
        xy = x + y
        return [xy[a] | xy[b] for a, b in zip(lo, hi)], lo, hi

    levels = {}
    stack = []
    for p in range(16):
        v, lvl = [frozenset({(p, lane)}) for lane in range(16)], 0
        while stack and stack[-1][1] == lvl:
            u, _ = stack.pop()
            v, lo, hi = combine(u, v, 8 >> lvl)
            levels[lvl] = (lo, hi)
            lvl += 1
        stack.append((v, lvl))
    (final, _), = stack
    where = {}
    for lane, parts in enumerate(final):
        (pos,) = {p for p, _ in parts}
        assert len(parts) == 16  # every lane of that position's vector, once
        where[pos] = lane
    return [levels[lvl] for lvl in range(4)], [where[p] for p in range(16)]


_TREE, _TREE_ORDER = _tree_steps()
V16 = _vec(F32, 16)


def _scores_q8_rows(rows: int):
    """q8 scores of `rows` query rows at once, 16 positions per pass: out[r0 + r, col0 + i] = q[r0 + r] . row(slot i)
    for i < n_pos, r < rows (q (R, D), out (R, W) C-contiguous float32; columns outside col0..col0+n_pos-1 untouched).
    Each position's codes are converted to float and scaled once for all rows; each row's products over D are kept
    as 16 lanes and the 16 positions' vectors added lane-wise into one vector of 16 scores (_tree_steps), instead of
    a horizontal sum per position and row. A row's values do not depend on `rows`."""
    @intrinsic
    def scores_q8_rows(typingctx, codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0):
        ip = types.intp
        sig = types.void(codes, scales, ip, ip, ip, ip, q, ip, out, ip)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            b = builder
            pc, ps, pq, po = data_ptrs(context, b, signature, args, (0, 1, 6, 8))
            base, nslots, s_first, r0, col0 = args[2], args[3], args[4], args[7], args[9]
            n_pos = _non_negative(b, args[5])
            D = _dim(context, b, signature, args, 6, 1)
            W = _dim(context, b, signature, args, 8, 1)
            nbd = b.udiv(D, _c(32))
            q_rows = [b.mul(b.mul(b.add(r0, _c(r)), D), _c(4)) for r in range(rows)]
            o_rows = [b.mul(b.add(b.mul(b.add(r0, _c(r)), W), col0), _c(4)) for r in range(rows)]
            accs = [cgutils.alloca_once(b, V32) for _ in range(rows)]
            tmp = cgutils.alloca_once(b, V16)
            n_grp = b.udiv(b.add(n_pos, _c(15)), _c(16))
            with cgutils.for_range(b, n_grp) as grp:
                i0 = b.mul(grp.index, _c(16))
                stacks = [[] for _ in range(rows)]
                for j in range(16):
                    i = b.add(i0, _c(j))
                    i = b.select(b.icmp_unsigned("<", i, n_pos), i, _c(0))  # past the end: any valid row, not stored
                    row = _kv_row(b, base, nslots, s_first, i)
                    for acc in accs:
                        b.store(ir.Constant(V32, None), acc)
                    with cgutils.for_range(b, nbd) as chunk:
                        vals, scale = _q8_chunk(x, pc, ps, row, D, nbd, chunk.index)
                        vals = b.fmul(vals, x.splat(scale, 32))
                        for qr, acc in zip(q_rows, accs):
                            qv = x.at(pq, b.add(qr, b.mul(chunk.index, _c(128))), V32)
                            b.store(x.intr("llvm.fma.v32f32", V32, [vals, qv, b.load(acc)]), acc)
                    for stack, acc in zip(stacks, accs):
                        a = b.load(acc)
                        v, lvl = b.fadd(x.half_of(a, 0), x.half_of(a, 1)), 0
                        while stack and stack[-1][1] == lvl:
                            u, _ = stack.pop()
                            lo, hi = _TREE[lvl]
                            v = b.fadd(b.shuffle_vector(u, v, ir.Constant(_vec(I32, 16), lo)),
                                       b.shuffle_vector(u, v, ir.Constant(_vec(I32, 16), hi)))
                            lvl += 1
                        stack.append((v, lvl))
                left = b.sub(n_pos, i0)
                for stack, orow in zip(stacks, o_rows):
                    (v, _), = stack
                    v = b.shuffle_vector(v, ir.Constant(V16, ir.Undefined), ir.Constant(_vec(I32, 16), _TREE_ORDER))
                    dst = b.gep(po, [b.add(orow, b.mul(i0, _c(4)))])
                    with b.if_else(b.icmp_unsigned(">=", left, _c(16))) as (whole, part):
                        with whole:
                            b.store(v, b.bitcast(dst, V16.as_pointer()), align=4)
                        with part:  # the last group's valid lanes only
                            b.store(v, tmp)
                            src = b.bitcast(tmp, F32.as_pointer())
                            with cgutils.for_range(b, left) as k:
                                b.store(b.load(b.gep(src, [k.index])),
                                        b.gep(b.bitcast(dst, F32.as_pointer()), [k.index]), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return scores_q8_rows


def _wsum_q8_rows(rows: int):
    """wsum_q8 for `rows` weight rows at once: out[r0 + r, :] += sum_i w[r0 + r, col0 + i] * row(slot i), r < rows
    (w (R, W), out (R, D) C-contiguous float32); each code converted once for all rows, each row summed in
    wsum_q8's order."""
    @intrinsic
    def wsum_q8_rows(typingctx, codes, scales, base, nslots, s_first, n_pos, w, col0, r0, out):
        ip = types.intp
        sig = types.void(codes, scales, ip, ip, ip, ip, w, ip, ip, out)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pc, ps, pw, po = data_ptrs(context, builder, signature, args, (0, 1, 6, 9))
            base, nslots, s_first, n_pos, col0, r0 = args[2], args[3], args[4], args[5], args[7], args[8]
            D = _dim(context, builder, signature, args, 9, 1)
            W = _dim(context, builder, signature, args, 6, 1)
            nbd = builder.udiv(D, _c(32))
            w_rows = [builder.mul(builder.add(r0, _c(r)), W) for r in range(rows)]
            with cgutils.for_range(builder, nbd) as chunk:
                def term(i):
                    vals, scale = _q8_chunk(x, pc, ps, _kv_row(builder, base, nslots, s_first, i), D, nbd, chunk.index)
                    col = builder.add(col0, i)
                    return vals, [builder.fmul(x.elem(pw, builder.add(wr, col), F32), scale) for wr in w_rows]
                for r, total in enumerate(_fma_sums(x, n_pos, _c(0), rows, term)):
                    row = builder.gep(po, [builder.mul(builder.mul(builder.add(r0, _c(r)), D), _c(4))])
                    _add_to(x, row, chunk.index, total)
            return context.get_dummy_value()
        return sig, codegen
    return wsum_q8_rows


def _block_scores_rows(rows: int):
    """block_scores on a uint8_per_channel group's codes kt (D, 32) for `rows` query rows at once: out[r0 + r, :] =
    q[r0 + r] . kt[:, j] for r < rows (q (R, D), out (R, 32) C-contiguous float32); each code converted once for all
    rows, each row summed in block_scores' order."""
    @intrinsic
    def block_scores_rows(typingctx, q, r0, kt, out):
        sig = types.void(q, types.intp, kt, out)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pq, pk, po = data_ptrs(context, builder, signature, args, (0, 2, 3))
            r0 = args[1]
            D = _dim(context, builder, signature, args, 0, 1)
            q_rows = [builder.mul(builder.add(r0, _c(r)), D) for r in range(rows)]

            if signature.args[2].dtype == types.uint8:  # a uint8_per_channel group's codes
                def column(d):
                    return builder.uitofp(x.at(pk, builder.mul(d, _c(32)), _vec(I8, 32)), V32)
            else:  # float32 keys, transposed (prefill)
                def column(d):
                    return x.at(pk, builder.mul(d, _c(128)), V32)

            def term(d):
                return column(d), [x.elem(pq, builder.add(qr, d), F32) for qr in q_rows]
            for r, total in enumerate(_fma_sums(x, D, _c(0), rows, term)):
                p = builder.gep(po, [builder.mul(builder.add(r0, _c(r)), _c(128))])
                builder.store(total, builder.bitcast(p, V32.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_scores_rows


def _block_wsum_rows(rows: int):
    """block_wsum for `rows` rows of weights at once: acc[r0 + r, :] += sum_{a <= j < z} p[r0 + r, j] * v[j, :]
    (p (R, 32), v (32, D), acc (R, D) float32 C-contiguous); each value row loaded once for all rows, each row
    summed in block_wsum's order."""
    @intrinsic
    def block_wsum_rows(typingctx, p, r0, a, z, v, acc):
        sig = types.void(p, types.intp, types.intp, types.intp, v, acc)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            pp, pv, pa = data_ptrs(context, builder, signature, args, (0, 4, 5))
            r0, a, z = args[1], args[2], args[3]
            D = _dim(context, builder, signature, args, 5, 1)
            row_bytes = builder.mul(D, _c(4))
            p_rows = [builder.mul(builder.add(r0, _c(r)), _c(32)) for r in range(rows)]
            with cgutils.for_range(builder, builder.udiv(D, _c(32))) as chunk:
                def term(j):
                    vals = x.at(pv, builder.add(builder.mul(j, row_bytes), builder.mul(chunk.index, _c(128))), V32)
                    return vals, [x.elem(pp, builder.add(pr, j), F32) for pr in p_rows]
                for r, total in enumerate(_fma_sums(x, builder.sub(z, a), a, rows, term)):
                    row = builder.gep(pa, [builder.mul(builder.add(r0, _c(r)), row_bytes)])
                    _add_to(x, row, chunk.index, total)
            return context.get_dummy_value()
        return sig, codegen
    return block_wsum_rows


scores_q8_1 = _scores_q8_rows(1)
scores_q8_2 = _scores_q8_rows(2)
scores_q8_3 = _scores_q8_rows(3)
wsum_q8_2 = _wsum_q8_rows(2)
wsum_q8_3 = _wsum_q8_rows(3)
block_scores_2 = _block_scores_rows(2)
block_scores_3 = _block_scores_rows(3)
block_wsum_2 = _block_wsum_rows(2)


# ---------------------------------------------------------------- a key block's softmax terms (prefill)
# Per query row and block of 32 keys, the online softmax takes the scores' maximum over the row's keys of the block
# and exp(score - max) of each with their sum. As scalar loops with runtime bounds these were 60% of a prompt's
# attention (SmolLM2, 200 tokens); here the 32 scores are one <32 x float> vector, lanes outside [a, z) masked.
def _lane_mask(x: _IR, a, z):
    """<32 x i1>: lane j in [a, z)."""
    lanes = ir.Constant(_vec(I64, 32), list(range(32)))
    return x.b.and_(x.b.icmp_signed(">=", lanes, x.splat(a, 32)), x.b.icmp_signed("<", lanes, x.splat(z, 32)))


def _row_ptr(context, builder, signature, args, i_arr, i_row):
    """i8* to row args[i_row] of the (R, 32) float32 array args[i_arr]."""
    (p,) = data_ptrs(context, builder, signature, args, (i_arr,))
    return builder.gep(p, [builder.mul(args[i_row], _c(128))])


@intrinsic
def block_max(typingctx, sc, r, a, z, m):
    """max(m, sc[r, a:z]) for a (R, 32) float32 C-contiguous, 0 <= a < z <= 32."""
    sig = types.float32(sc, types.intp, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        v = x.at(_row_ptr(context, builder, signature, args, 0, 1), _c(0), V32)
        neg = ir.Constant(V32, [float("-inf")] * 32)
        v = builder.select(_lane_mask(x, args[2], args[3]), v, neg)
        mx = x.intr("llvm.vector.reduce.fmax.v32f32", F32, [v])
        return builder.select(builder.fcmp_ordered(">", mx, args[4]), mx, args[4])
    return sig, codegen


def _exp32(x: _IR, v):
    """ops.fast_exp on a <32 x float> vector (Cephes' exp2f: 2^n from the exponent bits times a polynomial)."""
    b = x.b

    def k(c):
        return ir.Constant(V32, [c] * 32)
    y = x.intr("llvm.minnum.v32f32", V32, [x.intr("llvm.maxnum.v32f32", V32, [b.fmul(v, k(LOG2E)), k(-125.0)]),
                                          k(127.0)])
    n = x.intr("llvm.floor.v32f32", V32, [b.fadd(y, k(0.5))])
    f = b.fsub(y, n)
    p = k(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        p = x.intr("llvm.fma.v32f32", V32, [p, f, k(c)])
    vi = _vec(ir.IntType(32), 32)
    e = b.shl(b.add(b.fptosi(n, vi), ir.Constant(vi, [127] * 32)), ir.Constant(vi, [23] * 32))
    return b.fmul(p, b.bitcast(e, V32))


@intrinsic
def block_exp(typingctx, sc, r, a, z, mx):
    """sc[r, j] = exp(sc[r, j] - mx) for j in [a, z), 0 elsewhere in the row; returns their sum (sc (R, 32) float32
    C-contiguous)."""
    sig = types.float32(sc, types.intp, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        p = _row_ptr(context, builder, signature, args, 0, 1)
        v = x.at(p, _c(0), V32)
        e = _exp32(x, builder.fsub(v, x.splat(args[4], 32)))
        e = builder.select(_lane_mask(x, args[2], args[3]), e, ir.Constant(V32, None))
        builder.store(e, builder.bitcast(p, V32.as_pointer()), align=4)
        s16 = builder.fadd(x.half_of(e, 0), x.half_of(e, 1))
        s8 = builder.fadd(x.half_of(s16, 0), x.half_of(s16, 1))
        return x.hsum8(s8)
    return sig, codegen


# ---------------------------------------------------------------- software prefetch of a span (decode attention)
@intrinsic
def prefetch_l2(typingctx, arr, start, n):
    """prefetch_l2(arr, start, n): bytes [start, start + n) of arr's data into L2 (simd._prefetch, prefetcht1), one per
    64-byte line. A prefetch never faults: a span reaching past the array is harmless, and it changes no value."""
    sig = types.void(arr, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        p, = data_ptrs(context, builder, signature, args, (0,))
        n_lines = builder.udiv(builder.add(_non_negative(builder, args[2]), _c(63)), _c(64))
        with cgutils.for_range(builder, n_lines) as line:
            _prefetch(x, builder.gep(p, [builder.add(args[1], builder.mul(line.index, _c(64)))]), 2)
        return context.get_dummy_value()
    return sig, codegen
