"""Decode of a few rows at once (the server's batch: one token of each of 2..16 sequences): each weight block is
loaded and unpacked once and dotted with every row's quantized activations.

linear._mm_<type> reads each weight row once from memory but runs the single-row dot (simd.ROW_DOTS) once per
activation row: the block is unpacked again for every row, and each row's block terms form one serial chain of
float adds. Here a tile of _MR weight rows x _NT activation rows emits the block IR of simd.BLOCK_IR once per
(weight row, activation row) pair inside one loop over the blocks: LLVM merges the identical pure values (a
weight block's loads and unpacking, shared by the _NT activation rows; an activation block's codes, scale and
sums, shared by the _MR weight rows) and the _MR x _NT accumulator chains overlap. Measured on SmolLM2's Q4_1
layers (1 thread, `benchmarks/batch_dot_bench.py --model`): 1.25-1.5x at 8 rows, 1.3x at 2 rows.

The 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) run batches of LANES_FROM[qtype] rows and more on
`_mml_template` instead: the activation rows become the 8 lanes of a vector (their codes interleaved once per
call) and each weight dword is broadcast against them, so a block's integer dot for 8 rows is 8 byte dots with
the sums already in per-row lanes, scaled by two vector FMAs: no per-row conversion, scale or horizontal sum.
VNNI: one vpdpbusd per dword (AVX-512: one per two dwords, `_zmm_lane_sums`, and 2 weight rows per tile);
`benchmarks/batch_dot_bench.py --rows 2,3,4,8 --tiles 4x2` (1536 x 576, 1 thread):
at 8 rows 1.6-1.9x faster than the tiles (2.3-3.3x the single-row dots). AVX2 (no VNNI): vpmaddubsw + vpmaddwd,
the int16 pair sums of several dwords added before widening where they cannot overflow, the 4-bit codes
broadcast straight from memory: at 8 rows 1.7x (Q8_0, Q5_0) to 2.9x (Q4_1) faster than the tiles. At 2 rows the
tiles take half a lane group's time (a lane group costs the same with 2 rows as with 8), hence LANES_FROM. The
k-quants keep the tiles. On AVX-512, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 make 16 weight rows the lanes instead (`_mm16_template`).

On AVX2 the same tiles with one activation row (ONE_ROW: 4 weight rows, 2 for Q8_0) replace the single-row dots
of the 32-weight types for decode and short prompts: four rows' block chains overlap where one row's chain and
its fixed cost bound the single-row dot (1.3-1.5x on weights streamed from memory).

Each row's blocks are summed in one chain here, where the single-row dot of a 32-weight type sums its even and
odd blocks apart (simd._PAIRED), and the backend fuses multiply-adds per compiled loop (Numba's fastmath
'contract'), so rows differ from the single-row dot by float32 roundings. Every
tile (and every lane) runs the same code, so a row's result is the same bits whatever the other rows of the
batch are and wherever it sits, among the batches that take one driver (MIN_ROWS to LANES_FROM[qtype] - 1
rows, or LANES_FROM[qtype] and more; tests/test_batch_dot.py): there a sequence's products do not depend on what
else is in the batch. A partial tile dots its missing rows with the last real ones (no reads out of bounds) and
stores only the real ones.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .linear import _JIT, _prefetch_row, _specialize
from .simd import F32, I8, I16, I32, I64, _Acc, _IR, _vec, data_ptrs

from edgeq.formats.quants import QTYPES

_MR, _NT = 4, 2  # weight rows x activation rows per tile (measured: benchmarks/batch_dot_bench.py)


def _store_result(x, pout, sout, n_t, nr, r0, t, i, value):
    """out[t, r0 + i] = value (float32) where i < nr and t < n_t: a tile's rows past the ends are not stored (pout:
    out's data as i8*, sout: its row stride in bytes)."""
    b = x.b
    ok = b.and_(b.icmp_signed("<", i, nr), b.icmp_signed("<", t, n_t))
    with b.if_then(ok, likely=True):
        p = b.gep(pout, [b.add(b.mul(t, sout), b.mul(b.add(r0, i), ir.Constant(I64, 4)))])
        b.store(value, b.bitcast(p, F32.as_pointer()), align=4)


def _rows_dot(qtype: str, block, mr: int, nt: int):
    """Numba intrinsic dot(raw, off, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0): out[t, r0 + i] = weight row
    i (raw's bytes from off + i * row_bytes, nb blocks) . quantized activation row t, for i < min(mr, nr) and
    t0 <= t < min(t0 + nt, out.shape[0]). qx (T, n) int8, dx (T, n/32) float32, bsums (T, n/16) int32 and out
    (T, n_out) float32 are C-contiguous; the caller keeps nr >= 1, t0 < T and r0 + nr <= n_out (no bounds
    checks here). Rows past the ends dot the last real ones (no reads out of bounds) and are not stored."""
    block_bytes = QTYPES[qtype].block_bytes

    def impl(typingctx, raw, off, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0):
        ip = types.intp
        sig = types.void(raw, ip, ip, ip, ip, qx, dx, bsums, ip, out, ip)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            raw0, pqx, pdx, pbs, pout = data_ptrs(context, builder, signature, args, (0, 5, 6, 7, 9))
            off, row_bytes, nr, nb, t0, r0 = args[1], args[2], args[3], args[4], args[8], args[10]
            x.nb = nb
            arrs = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (5, 6, 7, 9)]
            sqx, sdx, sbs, sout = (cgutils.unpack_tuple(builder, a.strides, 2)[0] for a in arrs)
            n_t = cgutils.unpack_tuple(builder, arrs[3].shape, 2)[0]

            def clamp(v, n):
                return builder.select(builder.icmp_signed("<", v, n), v, builder.sub(n, c(1)))
            ws = [c(i) for i in range(mr)]
            rows = [builder.gep(raw0, [builder.add(off, builder.mul(clamp(i, nr), row_bytes))]) for i in ws]
            ts = [builder.add(t0, c(j)) for j in range(nt)]
            acts = [tuple(builder.gep(p, [builder.mul(clamp(t, n_t), s)]) for p, s in ((pqx, sqx), (pdx, sdx),
                                                                                       (pbs, sbs))) for t in ts]
            accs = [[_Acc(x) for _ in range(nt)] for _ in range(mr)]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                o = builder.mul(b, c(block_bytes))
                for row in rows:
                    simd._prefetch_levels(x, row, o, block_bytes, simd.ROW_NEAR, simd.ROW_FAR)
                for row, racc in zip(rows, accs):
                    for acc, (aq, ad, ab) in zip(racc, acts):
                        block(x, acc, row, o, b, aq, ad, ab)
            for i, racc in zip(ws, accs):
                for t, acc in zip(ts, racc):
                    _store_result(x, pout, sout, n_t, nr, r0, t, i, acc.total())
            return context.get_dummy_value()
        return sig, codegen
    impl.__doc__ = f"{mr} {qtype} rows . {nt} quantized activation rows"
    impl.__name__ = impl.__qualname__ = f"dot{mr}x{nt}_" + qtype.lower()
    return intrinsic(impl)


_row_fn = _block_elems = _block_bytes = None  # placeholders, bound per type by _specialize
# The tiles' and lanes' dots prefetch as the single-row dots do (simd.ROW_NEAR into L1 and ROW_FAR into L2: a line per
# 64 bytes of each weight row each as the block loop goes; Gemma 3's 8-sequence step 26.9-27.05 -> 26.4-26.5 ms against
# ROW_AHEAD into L1 alone, SmolLM2's level; before that, a burst two tiles ahead): Gemma 3's 8-sequence step (its Q4_K /
# Q6_K tiles, Q5_0 / Q8_0 lanes; `python benchmarks/serve_step.py --model gemma3-270m --batches 8 --threads 2`, the two
# alternated) 28.0 / 27.1 -> 25.9 / 25.4 ms of CPU. The rows16 gathers below (SmolLM2's Q4_1) prefetch the next tile
# as they go instead (a line per row every 2 or 4 blocks measured worse than the burst there: 15.9 / 14.9 -> 17.6-18.4 /
# 15.3-15.9 ms).


@njit(inline="always", **_JIT)
def _n_tiles(outs, mr):
    """Tiles of mr weight rows over the 3 matrices in `outs` (the last of each matrix maybe fewer rows)."""
    tiles = 0
    for m in range(3):
        tiles += (outs[m].shape[1] + mr - 1) // mr
    return tiles


@njit(inline="always", **_JIT)
def _locate_tile(outs, g, mr):
    """Tile g of the weight rows of the 3 matrices in `outs` (mr rows each, the last of a matrix maybe fewer)
    -> (matrix, first row, rows in the tile). g arrives as the parallel loop's unsigned index."""
    g = np.int64(g)
    for m in range(3):
        n = outs[m].shape[1]
        tiles = (n + mr - 1) // mr
        if g < tiles:
            return m, g * mr, min(mr, n - g * mr)
        g -= tiles
    return 0, 0, 0


def _mmb_template(raws, n_in, qx, dx, bsums, outs):
    """outs[m][t, r] = W_m[r] . X[t] (as linear._mm_template), in tiles of _MR weight rows x _NT activation rows."""
    nb = n_in // _block_elems
    row_bytes = nb * _block_bytes
    T = qx.shape[0]
    for g in prange(_n_tiles(outs, _MR)):
        m, r0, nr = _locate_tile(outs, g, _MR)
        raw, out = raws[m], outs[m]
        if not simd.ROW_AHEAD:  # the row dots prefetch as they go where they can, else two tiles ahead: DRAM latency
            _prefetch_row(raw, (r0 + 2 * _MR) * row_bytes, _MR * row_bytes)
        for t0 in range(0, T, _NT):
            _row_fn(raw, r0 * row_bytes, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0)


# ---------------------------------------------------------------- activation rows as vector lanes
# The 32-weight block types: the byte dot runs with a weight block's dword k (4 codes) broadcast to 8 lanes
# against dword k of 8 activation rows (their codes interleaved once per call), so one vpdpbusd (VNNI; AVX2:
# _avx2_lane_sums) serves 8 rows and a block's integer sum for each of them comes out in its own lane, with no
# horizontal sums: per weight row and block, 8 broadcasts + 8 byte dots + one conversion and two vector FMAs
# (scale, offset) for all 8 rows, against a byte dot, a conversion, a scale and an FMA per row in the tiles above.
# (On VNNI, broadcasting each dword straight from the row in memory, 4-bit codes unpacked after it, measured 0-25%
# slower than unpacking once and broadcasting from the register: one vpermd there. AVX2 has no one-instruction
# dword broadcast from a register, and the memory broadcast wins: Q4_1 150 vs 236 us at 8 rows, 1536 x 576.)
def _lane_q4_0(x, row, o):
    d = x.half(row, o)
    return x.nibbles(x.at(row, x.off(o, 2), _vec(I8, 16))), d, x.b.fmul(d, ir.Constant(F32, -8.0))


def _lane_q4_1(x, row, o):
    return x.nibbles(x.at(row, x.off(o, 4), _vec(I8, 16))), x.half(row, o), x.half(row, x.off(o, 2))


def _lane_q5_0(x, row, o):
    d = x.half(row, o)
    q = x.b.or_(x.nibbles(x.at(row, x.off(o, 6), _vec(I8, 16))), simd._high_bits(x, x.at(row, x.off(o, 2), I32), 4))
    return q, d, x.b.fmul(d, ir.Constant(F32, -16.0))


def _lane_q5_1(x, row, o):
    q = x.b.or_(x.nibbles(x.at(row, x.off(o, 8), _vec(I8, 16))), simd._high_bits(x, x.at(row, x.off(o, 4), I32), 4))
    return q, x.half(row, o), x.half(row, x.off(o, 2))


def _lane_q8_0(x, row, o):
    # signed codes made unsigned by flipping the top bit (w + 128): the byte dot wants one unsigned operand
    d = x.half(row, o)
    w = x.b.xor(x.at(row, x.off(o, 2), _vec(I8, 32)), x.const(I8, 32, -128))
    return w, d, x.b.fmul(d, ir.Constant(F32, -128.0))


def _lane_q8_0_signed(x, row, o):
    # AVX2: the signed codes as they are (no offset); _avx2_lane_sums moves their signs onto the activations
    return x.at(row, x.off(o, 2), _vec(I8, 32)), x.half(row, o), None


# qtype -> lane(x, row, o) = (32 unsigned codes c, scale d, offset e) of the block at row + o, with weight
# w_j = d * c_j + e: a block's dot with activations x (codes q, scale dx) is d * dx * (c . q) + e * dx * sum(q)
# (on AVX2 Q8_0's codes stay signed and e is None: _avx2_lane_sums takes their signs)
LANE_CODES = {"Q4_0": _lane_q4_0, "Q4_1": _lane_q4_1, "Q5_0": _lane_q5_0, "Q5_1": _lane_q5_1,
              "Q8_0": _lane_q8_0 if simd.LEVEL == "vnni" else _lane_q8_0_signed}
# where a block's packed 4-bit codes start (AVX2 broadcasts them from memory: _avx2_lane_sums)
_NIBBLES_AT = {"Q4_0": 2, "Q4_1": 4}
LANES = 8  # activation rows per lane group (one <8 x i32>; 4 lanes for small batches measured only 0-7% faster)
# weight rows per tile: 4 (x 2 chains of byte dots in flight); 2 with the 512-bit lane sums (_zmm_lane_sums), where
# 4 rows spill registers: a step's lane products at 8 rows (every layer's matrices and the classifier, Zen 5, 2
# threads, medians of 12) SmolLM2 7.92 ms (256-bit sums, 4 rows) -> 6.42 (512-bit, 4) -> 5.87 (512-bit, 2), Gemma 3
# 13.26 -> 11.88 -> 7.82, its 262144 x 640 Q8_0 classifier 9.03 -> 8.55 -> 4.67 ms (now bound by memory); the same
# bits (integer sums, the same float operations per lane)
_MR_LANES = 2 if simd._ZMM else 4


def _lanes_dot(qtype: str, lane, mr: int, lanes: int):
    """Numba intrinsic dot(raw, off, row_bytes, nr, nb, qxi, dxi, sxi, t0, out, r0): out[t0 + l, r0 + i] =
    weight row i (raw's bytes from off + i * row_bytes, nb blocks) . activation row t0 + l, for i < min(mr, nr)
    and l < lanes with t0 + l < out.shape[0]. qxi (nb, 8, lanes) int32: dword k of block b of each lane's
    activation codes; dxi, sxi (nb, lanes) float32: each lane's block scale and scale * code sum (zeros in
    unused lanes); all C-contiguous. Rows past nr dot the last real one and are not stored. Each lane runs the
    same operations whatever the vector width (no horizontal sums, explicit FMAs): 4 and 8 lanes give the
    same bits."""
    assert lanes == 8, "the byte dots below fill one 256-bit vector"
    block_bytes = QTYPES[qtype].block_bytes
    VI, VF = _vec(I32, lanes), _vec(F32, lanes)
    fma = f"llvm.fma.v{lanes}f32"
    lane_sums = (_zmm_lane_sums if simd._ZMM else _vnni_lane_sums if simd.LEVEL == "vnni" else
                 functools.partial(_avx2_lane_sums, code_max=None if qtype == "Q8_0" else simd.UNSIGNED_CODE_MAX[qtype],
                                   nibbles_at=_NIBBLES_AT.get(qtype)))

    def impl(typingctx, raw, off, row_bytes, nr, nb, qxi, dxi, sxi, t0, out, r0):
        ip = types.intp
        sig = types.void(raw, ip, ip, ip, ip, qxi, dxi, sxi, ip, out, ip)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            raw0, pq, pd, ps, pout = data_ptrs(context, builder, signature, args, (0, 5, 6, 7, 9))
            off, row_bytes, nr, nb, t0, r0 = args[1], args[2], args[3], args[4], args[8], args[10]
            aout = context.make_array(signature.args[9])(context, builder, args[9])
            sout = cgutils.unpack_tuple(builder, aout.strides, 2)[0]
            n_t = cgutils.unpack_tuple(builder, aout.shape, 2)[0]
            last = builder.sub(nr, c(1))
            rows = [builder.gep(raw0, [builder.add(off, builder.mul(
                builder.select(builder.icmp_signed("<", c(i), nr), c(i), last), row_bytes))]) for i in range(mr)]
            zero_f = ir.Constant(VF, None)
            accs = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(2)] for _ in range(mr)]
            for pair in accs:
                for p in pair:
                    builder.store(zero_f, p)
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                o = builder.mul(b, c(block_bytes))
                qv = [x.at(pq, builder.mul(builder.add(builder.mul(b, c(8)), c(k)), c(4 * lanes)), VI)
                      for k in range(8)]
                dv = x.at(pd, builder.mul(b, c(4 * lanes)), VF)
                sv = x.at(ps, builder.mul(b, c(4 * lanes)), VF)
                for row in rows:
                    simd._prefetch_levels(x, row, o, block_bytes, simd.ROW_NEAR, simd.ROW_FAR)
                for row, (pf, pm) in zip(rows, accs):
                    codes, d, e = lane(x, row, o)
                    isum = builder.sitofp(lane_sums(x, codes, qv, row, o), VF)
                    builder.store(x.intr(fma, VF, [isum, builder.fmul(x.splat(d, lanes), dv), builder.load(pf)]), pf)
                    if e is not None:
                        builder.store(x.intr(fma, VF, [x.splat(e, lanes), sv, builder.load(pm)]), pm)
            for i, (pf, pm) in enumerate(accs):
                tot = builder.fadd(builder.load(pf), builder.load(pm))
                for lane_i in range(lanes):
                    _store_result(x, pout, sout, n_t, nr, r0, builder.add(t0, c(lane_i)), c(i),
                                  builder.extract_element(tot, ir.Constant(I32, lane_i)))
            return context.get_dummy_value()
        return sig, codegen
    impl.__doc__ = f"{mr} {qtype} rows . {lanes} activation rows as lanes"
    impl.__name__ = impl.__qualname__ = f"lanes{mr}x{lanes}_" + qtype.lower()
    return intrinsic(impl)


def _zmm_lane_sums(x, codes, qv, row, o):
    """_vnni_lane_sums on 512-bit registers: dwords k and k+1 of the codes broadcast to the low and high 8 lanes of
    one <16 x i32> (one vpermd) against dwords k and k+1 of the 8 activation rows (adjacent in the interleaved
    activations: one 64-byte operand), so a block takes 4 vpermd + 4 vpdpbusd instead of 8 + 8; the two halves
    added at the end. Integer sums: the same values as _vnni_lane_sums."""
    cw = x.b.bitcast(codes, _vec(I32, 8))
    v16 = _vec(I32, 16)
    undef = ir.Constant(cw.type, ir.Undefined)
    sums = [ir.Constant(v16, None)] * 2
    for j in range(4):
        w2 = x.b.shuffle_vector(cw, undef, ir.Constant(v16, [2 * j] * 8 + [2 * j + 1] * 8))
        a2 = x.concat(qv[2 * j], qv[2 * j + 1])
        sums[j % 2] = x.intr("llvm.x86.avx512.vpdpbusd.512", v16, [sums[j % 2], w2, a2])
    tot = x.b.add(sums[0], sums[1])
    return x.b.add(x.half_of(tot, 0), x.half_of(tot, 1))


def _broadcast(x, cw, k: int):
    """Dword k of <8 x i32> cw in all 8 lanes."""
    return x.b.shuffle_vector(cw, ir.Constant(cw.type, ir.Undefined), ir.Constant(cw.type, [k] * 8))


def _vnni_lane_sums(x, codes, qv, row, o):
    """<32 x i8> unsigned weight codes, qv[k] = dword k of each lane's activations -> <8 x i32>: lane l =
    sum over k of the 4-byte dot of the codes' dword k with qv[k]'s lane l (vpdpbusd, two chains: each waits on
    its own latency)."""
    cw = x.b.bitcast(codes, _vec(I32, 8))
    sums = [ir.Constant(cw.type, None)] * 2
    for k in range(8):
        sums[k % 2] = x.intr("llvm.x86.avx512.vpdpbusd.256", cw.type, [sums[k % 2], _broadcast(x, cw, k), qv[k]])
    return x.b.add(sums[0], sums[1])


def _avx2_lane_sums(x, codes, qv, row, o, code_max, nibbles_at):
    """_vnni_lane_sums without VNNI: vpmaddubsw (pairs of byte products in int16) then vpmaddwd by ones (pairs
    of those in int32). Unsigned codes up to code_max: the int16 pair sums of several dwords are added before
    widening while they cannot overflow (simd.int16_runs: 8 dwords for 4-bit codes, 4 for 5-bit).
    code_max None: signed codes (Q8_0): |w| against the activations carrying w's sign, widened every dword.
    nibbles_at: the block's packed 4-bit codes start there (Q4_0/Q4_1): each dword of 8 nibbles is broadcast
    straight from memory and split in the register (a load and 3 operations for two code dwords, against 2
    shuffles per dword from the unpacked codes: AVX2 has no one-instruction dword broadcast from a register)."""
    ones = x.const(I16, 16, 1)
    cw = x.b.bitcast(codes, _vec(I32, 8))
    if nibbles_at is not None:
        m4 = ir.Constant(cw.type, [0x0F0F0F0F] * 8)
        packed = [x.splat(x.at(row, x.off(o, nibbles_at + 4 * j), I32), 8) for j in range(4)]
        words = ([x.b.and_(p, m4) for p in packed] +
                 [x.b.and_(x.b.lshr(p, ir.Constant(cw.type, [4] * 8)), m4) for p in packed])
    elif code_max is None:  # Q8_0: the codes' dwords broadcast from memory
        words = [x.splat(x.at(row, x.off(o, 2 + 4 * k), I32), 8) for k in range(8)]
    else:
        words = [_broadcast(x, cw, k) for k in range(8)]
    if code_max is None:
        zero = ir.Constant(codes.type, None)
        sums = []
        for k in range(8):
            w = x.b.bitcast(words[k], codes.type)
            aw = x.b.select(x.b.icmp_signed("<", w, zero), x.b.sub(zero, w), w)  # |-128| = 0x80: 128 unsigned
            s = x.intr("llvm.x86.avx2.psign.b", codes.type, [x.b.bitcast(qv[k], codes.type), w])
            sums.append(x.madd16(x.pairs16(aw, s), ones))
    else:
        per = simd.int16_runs(code_max)  # dwords per int16 sum
        sums = []
        for k0 in range(0, 8, per):
            p = [x.pairs16(x.b.bitcast(words[k], codes.type), x.b.bitcast(qv[k], codes.type))
                 for k in range(k0, min(8, k0 + per))]
            sums.append(x.madd16(_tree(x.b.add, p), ones))
    return _tree(x.b.add, sums)


def _tree(add, vs):
    """vs[0] + vs[1] + ... as a balanced tree (independent adds in flight)."""
    while len(vs) > 1:
        vs = [add(vs[i], vs[i + 1]) if i + 1 < len(vs) else vs[i] for i in range(0, len(vs), 2)]
    return vs[0]


@njit(**_JIT)
def _interleave(qx, dx, bsums, qxi, dxi, sxi):
    """Activation rows (qx (T, n) int8, dx (T, n/32), bsums (T, n/16)) -> lane groups of L rows (L = qxi's last
    axis): qxi[g, b, k, l] = dword k of block b of row g * L + l, dxi[g, b, l] its block scale, sxi[g, b, l]
    scale * code sum."""
    T, n = qx.shape
    L = qxi.shape[3]
    q32 = qx.view(np.int32)
    for t in range(T):
        g = t // L
        ln = t - g * L
        for b in range(n // 32):
            for k in range(8):
                qxi[g, b, k, ln] = q32[t, b * 8 + k]
            dxi[g, b, ln] = dx[t, b]
            sxi[g, b, ln] = dx[t, b] * np.float32(bsums[t, 2 * b] + bsums[t, 2 * b + 1])


def _mml_template(raws, n_in, qx, dx, bsums, outs):
    """outs[m][t, r] = W_m[r] . X[t] (as linear._mm_template), in tiles of _MR_LANES weight rows x LANES
    activation rows held as vector lanes."""
    nb = n_in // _block_elems
    row_bytes = nb * _block_bytes
    T = qx.shape[0]
    G = (T + LANES - 1) // LANES
    qxi = np.zeros((G, nb, 8, LANES), np.int32)
    dxi = np.zeros((G, nb, LANES), np.float32)
    sxi = np.zeros((G, nb, LANES), np.float32)
    _interleave(qx, dx, bsums, qxi, dxi, sxi)
    for g in prange(_n_tiles(outs, _MR_LANES)):
        m, r0, nr = _locate_tile(outs, g, _MR_LANES)
        raw, out = raws[m], outs[m]
        if not simd.ROW_AHEAD:
            _prefetch_row(raw, (r0 + 2 * _MR_LANES) * row_bytes, _MR_LANES * row_bytes)
        for gi in range(G):
            _row_fn(raw, r0 * row_bytes, row_bytes, nr, nb, qxi[gi], dxi[gi], sxi[gi], gi * LANES, out, r0)


# ---------------------------------------------------------------- weight rows as vector lanes (AVX-512)
# The lanes above broadcast each weight dword to 8 activation rows: per weight row and block, 4 dword shuffles, the
# nibbles unpacked, the scales converted, for 8 rows' products. Here the 16 lanes of a vector are 16 weight rows
# instead: a block's 16 bytes of codes from 16 rows are 16 loads, put 4 to a 512-bit register and transposed as
# dwords inside its 128-bit lanes (_rows16_words: word k, lane i = row i's dword k), then a few ANDs and shifts;
# its scales one vpgatherdd (row addresses as 32-bit byte offsets) and two conversions; each activation row's 4
# codes are broadcast from memory into one vpdpbusd per dword, the 8 activation rows' chains interleaved: per
# block of 16 rows x 8 activation rows, 64 byte dots against ~100 other instructions. SmolLM2's Q4_1 matrices at
# 8 rows (2 threads, matmul_rows_many, medians of 300 calls): gate + up 101 -> 68 us, Q/K/V 45 -> 28, down 59 -> 40
# against the lanes above; at 16 rows 186 -> 126, 71 -> 48, 111 -> 72 (with 5 gathers a block, the codes' 4
# included). The codes' loads and transpose instead of their 4 gathers (Zen 4, where a 16-dword gather is slow; a
# decode step's products at 8 rows, `benchmarks/batch_dot_bench.py --model smollm2-135m-instruct --rows 8`, 1
# thread, same minute): Q/K/V 2.30 -> 1.69 ms, O 1.42 -> 1.06, gate + up 6.11 -> 4.42, down 4.55 -> 2.38; the
# 8-sequence step (`benchmarks/serve_step.py --threads 2 --batches 8 --thread --gen-tokens 128`, alternated, 5
# pairs) 12.6-16.0 ms -> 10.5-13.3. The header's gather as loads and a transpose too measured level; Q8_0 on its
# 49152 x 576 classifier, streamed from memory, is no faster here than the lanes (with gathers it was slower:
# 1406 -> 1613 us at 8 rows), so Q8_0 kept the lanes then. Each output is one chain of two FMAs per block (scale,
# offset), where the lanes keep the offsets in a second sum: the same values to float32 rounding.
# Q8_0 runs here too since 2026-12-07: its 32 codes are two such 16-byte transposes, the top bits flipped (w + 128,
# offset -128 d). Loads and transposes where the gathers had lost to the lanes; its classifiers stream from memory, so
# it prefetches the tile two on into L2 where the 4-bit types bring the next one into L1 (Zen 4, 8 rows, medians of
# alternated calls, `python benchmarks/batch_dot_bench.py --classifier MODEL [--threads 2]`): SmolLM2's 49152 x 576
# classifier 1 thread lanes 3.45 ms -> 3.61 (next tile into L1) / 2.41 (two on into L2), 2 threads 2.25 -> 2.27 /
# 1.79; Gemma 3's 262144 x 640 1 thread 22.5 -> 23.6 / 16.3, 2 threads 10.1 -> 10.3 / 7.7 ms; at 3 rows (Gemma 3, 1
# thread) 19.1 -> 14.3 / 14.5. SmolLM2's Q4_1 layers measured level either way (9.2 / 9.4 ms a step at 1 thread, an
# ad-hoc timer of the two prefetches), so they keep theirs.
# Q5_0 and Q5_1 since 2026-12-07 (night): the 4-bit codes as Q4_0's / Q4_1's, each code's fifth bit from the
# block's 32-bit qh (one more gather a block) put in place by a byte shuffle, a bit test and a masked add a dword of
# codes (_rows16_fifth_bits). Gemma 3's Q5_0 matrices at 8 rows against the activation-row lanes they ran on (Zen 4,
# alternated in one process, medians of 11): Q/K/V 2.65 -> 1.90 ms a step, gate + up 6.69 -> 4.55 on 1 thread; 2.00
# -> 1.57 and 4.05 -> 3.22 on 2; its 8-sequence step (`python benchmarks/serve_step.py --model gemma3-270m --threads
# 1 --batches 8 --thread`, alternated) 36.3-37.4 -> 33.5-34.1 ms of CPU.
# The same night the 16 rows' loads took their addresses from five pointers and x86's scaled index (_ROW_BASES)
# instead of 16 clamped offsets (LLVM had kept those in two vectors and moved each row's out every block: 22
# vector-to-integer moves of ~210 instructions); a partial tile is padded to 16 rows by _mm16_template. `python
# benchmarks/batch_dot_bench.py --model M --rows 8` (1 thread, two alternated runs): SmolLM2's Q/K/V 1.64 -> 1.49-1.53
# ms, O 0.97-1.02 -> 0.89-0.92, gate + up 4.53-4.56 -> 4.11-4.38, down 2.37-2.42 -> 2.25-2.31, the classifier 2.42-2.46
# -> 2.18-2.23; Gemma 3's classifier 3.99-4.14x -> 4.37-4.54x the tiles' speed, its Q5_0 gate + up 4.27-4.51x ->
# 4.63-4.73x. What is left at ~130 cycles a block (3.6 GHz) against 64 byte dots is vector work on the same pipes: the
# transposes, the float epilogue (8 conversions, 8 products, 16 FMAs for 16 rows x 8 activation rows).
# type -> (block header: d, an f16 at byte 0; e = the block's offset: "min" (an f16 at byte 2) or a multiple of d;
# byte offset of the codes (16 bytes of nibbles, or Q8_0's 32 bytes); prefetch into L2 two tiles on (else L1, next);
# byte offset of the fifth bits (a 32-bit qh) or None)
_ROWS16_LAYOUT = {"Q4_0": (-8.0, 2, False, None), "Q4_1": ("min", 4, False, None), "Q8_0": (-128.0, 2, True, None),
                  "Q5_0": (-16.0, 6, False, 2), "Q5_1": ("min", 8, False, 4)}
ROWS16_TOKENS = 8  # activation rows per pass over a tile's blocks


def _rows16_dot(qtype: str, far: bool | None = None, packed: bool = False):
    """Numba intrinsic dot(raw, off, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0): out[t0 + j, r0 + i] = weight
    row i (raw's bytes from off + i * row_bytes, nb blocks) . activation row t0 + j, for i < min(16, nr) and j <
    ROWS16_TOKENS with t0 + j < out.shape[0]; qx (T, n) int8, dx (T, n/32), bsums (T, n/16) as linear._quantized,
    out (T, n_out) float32, C-contiguous. 16 rows are read from off whatever nr (a partial tile's caller pads it:
    _mm16_template), rows past nr are not stored; activation rows past T compute the last real one and are not
    stored either. 16 * row_bytes must fit in 31 bits. far: the prefetch (None: the type's, from
    _ROWS16_LAYOUT; benchmarks/batch_dot_bench.py --classifier times both). packed: raw is pack_rows16's copy of the
    matrix (off: the tile's first row times row_bytes, as in the file's layout; nr only says which rows to store)."""
    offset, _, type_far, qh_at = _ROWS16_LAYOUT[qtype]
    far = type_far if far is None else far
    block_bytes = QTYPES[qtype].block_bytes
    d_at, e_at, qh_packed = _packed_parts(qtype) if packed else (0, 0, 0)

    def impl(typingctx, raw, off, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0):
        ip = types.intp
        sig = types.void(raw, ip, ip, ip, ip, qx, dx, bsums, ip, out, ip)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            v16i, v16f, v16h = _vec(I32, 16), _vec(F32, 16), _vec(ir.HalfType(), 16)
            raw0, pq, pd, pb, po = data_ptrs(context, builder, signature, args, (0, 5, 6, 7, 9))
            off, row_bytes, nr, nb, t0, r0 = args[1], args[2], args[3], args[4], args[8], args[10]
            aq = context.make_array(signature.args[5])(context, builder, args[5])
            n_t, n_in = cgutils.unpack_tuple(builder, aq.shape, 2)
            sout = cgutils.unpack_tuple(builder, context.make_array(signature.args[9])(context, builder, args[9]).strides,
                                        2)[0]
            base = builder.gep(raw0, [off])
            lanes = ir.Constant(v16i, list(range(16)))  # 16 readable rows (a partial tile comes padded)
            row_off = builder.mul(lanes, x.splat(builder.trunc(row_bytes, I32), 16))  # the header's gather
            toks = [builder.add(t0, c(j)) for j in range(ROWS16_TOKENS)]
            toks = [builder.select(builder.icmp_signed("<", t, n_t), t, builder.sub(n_t, c(1))) for t in toks]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, None)) for _ in toks]
            for a in accs:
                builder.store(ir.Constant(v16f, None), a)
            nb_all = builder.udiv(n_in, c(32))
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                # the next tile's bytes (16 rows on: contiguous), spread over the block loop as it goes: each block
                # prefetches the next tile's 16 * block_bytes at the same share of it (see the note above
                # _mm16_template)
                pf = builder.add(builder.mul(row_bytes, c(16)), builder.mul(b, c(16 * block_bytes)))
                if far:  # Q8_0: into L2, two tiles on (see _ROWS16_LAYOUT)
                    simd._prefetch_ahead(x, base, builder.add(pf, builder.mul(row_bytes, c(16))), 16 * block_bytes, 64, 2)
                else:
                    simd._prefetch_ahead(x, base, builder.sub(pf, c(64)), 16 * block_bytes, 64)  # 64 ahead of pf - 64: pf
                if packed:  # the block's 16 rows side by side: 4 words of codes, then d (and m, qh) per row
                    cb = builder.gep(base, [builder.mul(b, c(16 * block_bytes))])
                    d = builder.fpext(x.at(cb, c(d_at), v16h), v16f)
                    e = builder.fpext(x.at(cb, c(e_at), v16h), v16f) if offset == "min" else \
                        builder.fmul(d, ir.Constant(v16f, [offset] * 16))
                    codes = _rows16_codes(x, qtype, [x.at(cb, c(64 * k), v16i) for k in range(d_at // 64)],
                                          x.at(cb, c(qh_packed), v16i) if qh_at is not None else None)
                else:
                    d, e, codes = _rows16_block(x, qtype, base, row_bytes, row_off, b)
                qrows = [builder.add(builder.mul(t, n_in), builder.mul(b, c(32))) for t in toks]
                isums = [ir.Constant(v16i, None)] * len(toks)
                for g in range(8):  # the activation rows' chains interleaved: 8 independent byte dots in flight
                    for j, qrow in enumerate(qrows):
                        a = x.splat(x.at(pq, builder.add(qrow, c(4 * g)), I32), 16)
                        isums[j] = x.intr("llvm.x86.avx512.vpdpbusd.512", v16i, [isums[j], codes[g], a])
                for t, acc, isum in zip(toks, accs, isums):
                    dxt = x.elem(pd, builder.add(builder.mul(t, nb_all), b), F32)
                    # dx * the block's code sum: bsums' float32 tail, after its 2 * nb_all sums of 16 (a row: 3 nb_all)
                    sxt = x.elem(pb, builder.add(builder.mul(t, builder.mul(nb_all, c(3))),
                                                 builder.add(builder.mul(nb_all, c(2)), b)), F32)
                    s = x.intr("llvm.fma.v16f32", v16f, [builder.sitofp(isum, v16f), builder.fmul(d, x.splat(dxt, 16)),
                                                         builder.load(acc)])
                    builder.store(x.intr("llvm.fma.v16f32", v16f, [e, x.splat(sxt, 16), s]), acc)
            for j, acc in enumerate(accs):
                tot = builder.load(acc)
                for i in range(16):
                    _store_result(x, po, sout, n_t, nr, r0, builder.add(t0, c(j)), c(i),
                                  builder.extract_element(tot, ir.Constant(I32, i)))
            return context.get_dummy_value()
        return sig, codegen
    impl.__doc__ = f"16 {qtype} rows as lanes . {ROWS16_TOKENS} activation rows" + (" (packed)" if packed else "")
    impl.__name__ = impl.__qualname__ = ("rows16p_" if packed else "rows16_") + qtype.lower()
    return intrinsic(impl)


def _rows16_block(x, qtype: str, base, row_bytes, row_off, b):
    """Block b of 16 rows in the file's layout (row i at base + i * row_bytes; row_off: <16 x i32> the rows' byte
    offsets, for the header's gathers) -> (d, e: <16 x float> the rows' scales and offsets; codes: _rows16_codes)."""
    builder = x.b
    c = lambda v: ir.Constant(I64, v)  # noqa: E731
    offset, codes_at, _, qh_at = _ROWS16_LAYOUT[qtype]
    block_bytes = QTYPES[qtype].block_bytes
    v16i, v16f, v16h = _vec(I32, 16), _vec(F32, 16), _vec(ir.HalfType(), 16)
    blk = builder.add(row_off, x.splat(builder.trunc(builder.mul(b, c(block_bytes)), I32), 16))
    hdr = x.gather16(base, blk)
    d = builder.fpext(builder.bitcast(builder.trunc(hdr, _vec(I16, 16)), v16h), v16f)
    if offset == "min":
        e = builder.fpext(builder.bitcast(builder.trunc(builder.lshr(hdr, ir.Constant(v16i, [16] * 16)),
                                                        _vec(I16, 16)), v16h), v16f)
    else:
        e = builder.fmul(d, ir.Constant(v16f, [offset] * 16))
    at = builder.add(builder.mul(b, c(block_bytes)), c(codes_at))
    words = _rows16_words(x, base, row_bytes, at)
    if qtype == "Q8_0":  # 32 codes: two 16-byte transposes
        words += _rows16_words(x, base, row_bytes, builder.add(at, c(16)))
    # Q5: code k's fifth bit is bit k of the block's qh
    qh = x.gather16(base, builder.add(blk, ir.Constant(v16i, [qh_at] * 16))) if qh_at is not None else None
    return d, e, _rows16_codes(x, qtype, words, qh)


def _rows16_codes(x, qtype: str, words, qh):
    """A block's dwords of packed codes (words: <16 x i32>, word k lane i = row i's dword k; 4 of nibbles, Q8_0's
    8 of bytes) -> its 8 words of unsigned codes (word k lane i = row i's codes 4k..4k+3): Q8_0's signed bytes with
    the top bit flipped (w + 128), the 4-bit types' low nibbles (weights 0..15) then high ones (16..31), and with qh
    (<16 x i32>, Q5) their fifth bits (_rows16_fifth_bits)."""
    b = x.b
    v16i = _vec(I32, 16)
    if qtype == "Q8_0":
        return [b.xor(w, ir.Constant(v16i, [-0x7F7F7F80] * 16)) for w in words]  # 0x80808080
    m4 = ir.Constant(v16i, [0x0F0F0F0F] * 16)
    codes = [b.and_(w, m4) for w in words] + [b.and_(b.lshr(w, ir.Constant(v16i, [4] * 16)), m4) for w in words]
    return codes if qh is None else _rows16_fifth_bits(x, qh, codes)


# ---------------------------------------------------------------- the lanes' types packed for them
# pack_rows16: a copy of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 matrix in the order the weight-row lanes read it, made
# once when a batch first needs it (QuantLinear.packed16; a server's warm-up): per tile of 16 rows (the last padded
# with copies of the matrix's last row), per block, 16 * block_bytes bytes: the codes' dwords as 64-byte words (word k,
# lane i = row i's dword k: 4 of nibbles, Q8_0's 8 of bytes), the 16 rows' d (f16), their m (f16; Q4_1, Q5_1), their
# qh (u32; Q5). The same bytes as the file's (so as large, a whole last tile), read as contiguous 64-byte loads
# instead of 16 (Q8_0: 32) loads, a transpose and one or two gathers a block: the same codes and scales, so the same
# products bit for bit. The file's bytes stay for everything else (one or two rows, prompts, the embedding); `edgeq
# serve --no-packed-weights` goes without the copy. SmolLM2's step products at 8 rows, 1 thread (`python
# benchmarks/batch_dot_bench.py --model smollm2-135m-instruct --rows 8`, best of 5, packed / file's bytes): Q/K/V
# 1.37 / 1.56 ms, O 0.94 / 1.09, gate + up 3.49 / 4.13, down 2.05 / 2.24, the 49152 x 576 Q8_0 classifier 1.69 /
# 2.38 (2 threads, `--classifier smollm2-135m-instruct --threads 2`: 1.80 / 2.21); the copies 96 MB (Gemma 3: 223 MB,
# its Q5_0 layers and its 262144 x 640 classifier).
PACKED16 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _packed_parts(qtype: str) -> tuple[int, int, int]:
    """Byte offsets in a packed block of 16 rows: (d, m, qh); -1 where the type has none (the codes' words at 0)."""
    has_min, has_qh = _ROWS16_LAYOUT[qtype][0] == "min", _ROWS16_LAYOUT[qtype][3] is not None
    d_at = 512 if qtype == "Q8_0" else 256  # after the codes' words: 8 of Q8_0's bytes, 4 of nibbles
    return d_at, d_at + 32 if has_min else -1, d_at + (64 if has_min else 32) if has_qh else -1


def pack_rows16(raw: np.ndarray, qtype: str, n_out: int, n_in: int) -> np.ndarray:
    """The matrix raw (n_out rows of the type's blocks, the file's layout) in the packed layout above (read-only)."""
    bb = QTYPES[qtype].block_bytes
    nb = n_in // 32
    _, codes_at, _, qh_at = _ROWS16_LAYOUT[qtype]
    n_tiles = -(-n_out // 16)
    blocks = np.asarray(raw, np.uint8).reshape(n_out, nb, bb)
    if n_tiles * 16 > n_out:
        blocks = np.concatenate([blocks, np.repeat(blocks[-1:], n_tiles * 16 - n_out, axis=0)])
    tiles = blocks.reshape(n_tiles, 16, nb, bb).transpose(0, 2, 1, 3)  # (tile, block, row, bytes)
    out = np.empty((n_tiles, nb, 16 * bb), np.uint8)
    d_at, m_at, qh_packed = _packed_parts(qtype)
    codes = tiles[..., codes_at:codes_at + d_at // 16].reshape(n_tiles, nb, 16, d_at // 64, 4).transpose(0, 1, 3, 2, 4)
    out[..., :d_at] = codes.reshape(n_tiles, nb, d_at)
    out[..., d_at:d_at + 32] = tiles[..., 0:2].reshape(n_tiles, nb, 32)
    if m_at >= 0:
        out[..., m_at:m_at + 32] = tiles[..., 2:4].reshape(n_tiles, nb, 32)
    if qh_packed >= 0:
        out[..., qh_packed:qh_packed + 64] = tiles[..., qh_at:qh_at + 4].reshape(n_tiles, nb, 64)
    flat = out.reshape(-1)
    flat.flags.writeable = False
    return flat


def _rows16_fifth_bits(x, qh, codes):
    """Q5's 32 codes of 16 rows (codes: 8 <16 x i32>, word k lane i = row i's codes 4k..4k+3, each < 16) with their
    fifth bits: byte j of word k gets 16 where bit 4k + j of its row's qh (<16 x i32>) is set. qh's byte k // 2 goes
    to the word's 4 bytes (one in-lane byte shuffle), each tested against its own bit (a mask of 64 bits), and 16
    added under it."""
    b = x.b
    v64 = _vec(I8, 64)
    qb = b.bitcast(qh, v64)
    out = []
    for k, w in enumerate(codes):
        spread = b.shuffle_vector(qb, ir.Constant(v64, None), ir.Constant(_vec(I32, 64), [
            4 * i + k // 2 for i in range(16) for _ in range(4)]))
        bits = ir.Constant(v64, [1 << (4 * (k % 2) + j) for _ in range(16) for j in range(4)])
        on = b.icmp_unsigned("!=", b.and_(spread, bits), ir.Constant(v64, None))
        wb = b.bitcast(w, v64)
        out.append(b.bitcast(b.select(on, b.add(wb, x.const(I8, 64, 16)), wb), w.type))
    return out


# row i of a tile -> the row k whose address it is read from: row i = k + (0, 1, 2, 4 or 8), five pointers a block
_ROW_BASES = {0: 0, 1: 0, 2: 0, 3: 3, 4: 0, 5: 5, 6: 5, 7: 3, 8: 0, 9: 5, 10: 10, 11: 10, 12: 10, 13: 5, 14: 10, 15: 15}


def _rows16_words(x, base, row_bytes, o):
    """The 4 dwords of packed codes at byte o of 16 rows (base + i * row_bytes + o) as 4 <16 x i32>, word k lane i =
    row i's dword k: 16 unaligned 16-byte loads, put 4 to a 512-bit register (rows j, 4 + j, 8 + j, 12 + j in its
    128-bit lanes), then a 4 x 4 dword transpose inside the lanes (8 unpacks), where 4 vpgatherdd took ~30% of the
    kernel's time on Zen 4. The rows' addresses are _ROW_BASES' pointers plus row_bytes times 0, 1, 2, 4 or 8 (x86's
    scaled index): 16 row offsets held apart had LLVM keep them in two vectors and extract each row's every block (22
    vector-to-integer moves a block; see the note above _ROWS16_LAYOUT)."""
    b = x.b
    v4, v16 = _vec(I32, 4), _vec(I32, 16)
    at = {k: b.gep(base, [b.add(o, b.mul(row_bytes, ir.Constant(I64, k)))]) for k in set(_ROW_BASES.values())}
    rows = [x.at(at[k], b.mul(row_bytes, ir.Constant(I64, i - k)), v4) for i, k in _ROW_BASES.items()]
    cat = lambda p, q, n: b.shuffle_vector(p, q, ir.Constant(_vec(I32, 2 * n), list(range(2 * n))))  # noqa: E731
    a = [cat(cat(rows[j], rows[4 + j], 4), cat(rows[8 + j], rows[12 + j], 4), 8) for j in range(4)]

    def unpack(p, q, idx):
        return b.shuffle_vector(p, q, ir.Constant(v16, [4 * lane + i for lane in range(4) for i in idx]))
    lo_dq, hi_dq, lo_qdq, hi_qdq = (0, 16, 1, 17), (2, 18, 3, 19), (0, 1, 16, 17), (2, 3, 18, 19)
    t0, t1 = unpack(a[0], a[1], lo_dq), unpack(a[0], a[1], hi_dq)
    t2, t3 = unpack(a[2], a[3], lo_dq), unpack(a[2], a[3], hi_dq)
    return [unpack(t0, t2, lo_qdq), unpack(t0, t2, hi_qdq), unpack(t1, t3, lo_qdq), unpack(t1, t3, hi_qdq)]


def _mm16_template(raws, n_in, qx, dx, bsums, outs):
    """outs[m][t, r] = W_m[r] . X[t] (as linear._mm_template), in tiles of 16 weight rows as vector lanes x
    ROWS16_TOKENS activation rows. The row dot prefetches the next tile's bytes (one contiguous span) a share per
    block as its loop goes, where a burst of the tile two ahead before each tile stalled on its own ~90 lines:
    SmolLM2's 8-sequence decode step (2 threads, 300 positions, medians of 6 x 15 steps) 16.0 -> 13.8-14.0 ms (the
    tile two ahead instead of the next one: 14.2-14.7)."""
    nb = n_in // _block_elems
    row_bytes = nb * _block_bytes
    T = qx.shape[0]
    for g in prange(_n_tiles(outs, 16)):
        m, r0, nr = _locate_tile(outs, g, 16)
        raw, out, off = raws[m], outs[m], r0 * row_bytes
        if nr < 16 and not _PACKED:  # a matrix's last tile, short of rows: its rows, then the last one again
            pad = np.empty(16 * row_bytes, np.uint8)
            pad[:nr * row_bytes] = raw[off:off + nr * row_bytes]
            for i in range(nr, 16):
                pad[i * row_bytes:(i + 1) * row_bytes] = raw[off + (nr - 1) * row_bytes:off + nr * row_bytes]
            raw, off = pad, 0
        for t0 in range(0, T, ROWS16_TOKENS):
            _row_fn(raw, off, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0)


_PACKED = False  # bound per driver by _specialize: _mm16_template's weights are pack_rows16's copy


# qtype -> the multi-row tiles (same arguments as linear._mm_<type>); compiled on first call
# On AVX-512, Q4_K and Q6_K take tiles of 1 weight row x 2 activation rows (their 512-bit row dots hold more
# registers than 4 rows leave): a step's Q4_K/Q6_K products (Gemma 3, 2 threads, medians of 10) at 8 rows 3.80 ms
# (4 x 2) -> 2.90 (1 x 2), 2.67 (1 x 4); at 2 rows 1.13 -> 0.93 (1 x 4: 1.35); at 3 and 4 rows 2.20 -> 1.51, 1.90
# -> 1.55; Qwen2.5-0.5B Q4_K_M at 8 rows 10.25 -> 8.86 (1 x 8). The same bits whatever the tile (one chain per
# row and activation row).
_TILE = {qtype: (1, 2) if simd._ZMM and qtype in ("Q4_K", "Q6_K") else (_MR, _NT) for qtype in simd.BLOCK_IR}
KERNELS = {qtype: _specialize(_mmb_template, qtype, _rows_dot(qtype, block, *_TILE[qtype]), _MR=_TILE[qtype][0],
                              _NT=_TILE[qtype][1])
           for qtype, block in simd.BLOCK_IR.items()}
# qtype -> weight rows per tile of the one-activation-row drivers that replace linear._mm_<type> (the single-row
# dots) wherever those ran: a decode step's products and prompts of a few rows (so a prompt's rows still equal
# decoding them one by one: one kernel). Measured on AVX2 (Zen 3, 65536 x 576, weights streamed from memory, 2
# threads, ad-hoc timer over linear's drivers): Q4_0 16.7 vs 11.3 GB/s, Q4_1 16.9 vs 11.0, Q5_0 15.1 vs 11.7, Q5_1
# 15.0 vs 11.1, IQ4_NL 17.0 vs 11.7 with 4 rows; Q8_0 27.4 vs 25.3 with 2 (4: 17.6); the k-quants lose (Q4_K
# 24576 x 2048: 13.2 vs 19.9 GB/s, Q6_K 11.4 vs 22.7). Four weight rows' chains overlap where one row's block
# chain and its per-row overhead (a 576-wide row is 18 blocks) bound the single-row dot. Not measured on AVX-512,
# where the single-row dots keep their 512-bit path.
ONE_ROW_TILES = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 4, "Q5_1": 4, "IQ4_NL": 4, "Q8_0": 2} if simd.LEVEL == "avx2" else {}
ONE_ROW = {qtype: _specialize(_mmb_template, qtype, _rows_dot(qtype, simd.BLOCK_IR[qtype], mr, 1), suffix=f"_{mr}x1",
                              _MR=mr, _NT=1)
           for qtype, mr in ONE_ROW_TILES.items()}
# qtype -> the lanes driver (the 32-weight block types, VNNI and AVX2), for batches of LANES_FROM[qtype] rows and
# more: a lane group costs the same for 2 rows as for 8. VNNI (1536 x 576, 1 thread): at 2 rows the tiles cost
# about half of it (Q4_1 61 vs 109 us), at 3 the two are level, from 4 on the lanes win (8 rows: Q4_1 114 vs 213
# us, Q8_0 118 vs 186, Q5_0 134 vs 261; benchmarks/batch_dot_bench.py --rows 2,3,4,8 --tiles 4x2). AVX2 (Zen 3,
# same shape, 1 thread, best of 200 calls): lanes Q4_1 135-150 us at any row count (2-8), Q8_0 and Q5_0 221-226;
# tiles Q4_1 98 / 188 / 190 / 435 us at 2 / 3 / 4 / 8 rows, Q8_0 107 / 196 / 196 / 375, Q5_0 100 / 192 / 192 /
# 378: the 4-bit types take the lanes from 3 rows, the 5- and 8-bit ones (a dword broadcast from a register, a
# sign moved per dword) from 5.
LANE_KERNELS = {qtype: _specialize(_mml_template, qtype, _lanes_dot(qtype, lane, _MR_LANES, LANES))
                for qtype, lane in LANE_CODES.items()} if simd.LEVEL in ("vnni", "avx2") else {}
# With AVX-512 (vpgatherdd, 512-bit vpdpbusd) Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 take the weight rows as lanes instead
if simd._ZMM:
    LANE_KERNELS.update({qtype: _specialize(_mm16_template, qtype, _rows16_dot(qtype), suffix="_rows16", _PACKED=False)
                         for qtype in _ROWS16_LAYOUT})
# qtype -> the weight-row lanes on pack_rows16's copy (AVX-512), which QuantLinear runs in place of LANE_KERNELS'
PACKED_KERNELS = {qtype: _specialize(_mm16_template, qtype, _rows16_dot(qtype, packed=True), suffix="_rows16p",
                                     _PACKED=True) for qtype in PACKED16} if simd._ZMM else {}
# With the 512-bit lane sums the lanes win from 3 rows (a step's lane-type products at 3 rows: SmolLM2 6.93 ms on
# the tiles, 5.05 on the lanes; Gemma 3 9.74 vs 7.62; at 2 rows the tiles keep it: 4.04 vs 4.97, 7.65 vs 8.86).
LANES_FROM = {qtype: 3 if simd._ZMM else 4 if simd.LEVEL == "vnni" else 3 if qtype in _NIBBLES_AT else 5
              for qtype in LANE_KERNELS}
# qtype -> the fewest activation rows for which these drivers beat the single-row dots (measured:
# benchmarks/batch_dot_bench.py on 1536 x 576 and 2048 x 768 matrices, and SmolLM2's own weights); fewer rows
# take linear._mm_<type>. Q8_0 from 4: on SmolLM2's 49152 x 576 classifier (28 MB, streamed from memory) the
# tiles cost 2.3 ms at 2 rows against 1.6 for the single-row dots, the same at 4, 15-20% less at 8.
MIN_ROWS = {qtype: (3 if simd._ZMM else 4) if qtype == "Q8_0" else 2 for qtype in KERNELS}  # 3: the 512-bit lanes
