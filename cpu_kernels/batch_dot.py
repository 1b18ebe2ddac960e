"""Decode of a few rows at once (the server's batch: one token of each of 2..16 sequences): each weight block is
loaded and unpacked once and dotted with every row's quantized activations.

linear._mm_<type> reads each weight row once from memory but runs the single-row dot (simd.ROW_DOTS) once per
activation row: the block is unpacked again for every row, and each row's block terms form one serial chain of
float adds. Here a tile of _MR weight rows x _NT activation rows emits the block IR of simd.BLOCK_IR once per
(weight row, activation row) pair inside one loop over the blocks: LLVM merges the identical pure values (a
weight block's loads and unpacking, shared by the _NT activation rows; an activation block's codes, scale and
sums, shared by the _MR weight rows) and the _MR x _NT accumulator chains overlap. Measured on SmolLM2's Q4_1
layers (1 thread, `benchmarks/batch_dot_bench.py --model`): 1.25-1.5x at 8 rows, 1.3x at 2 rows.

Each row's blocks are summed in the single-row dot's order, but the backend fuses multiply-adds per compiled
loop (Numba's fastmath 'contract'), so rows differ from the single-row dot by a float32 rounding or two. Every
tile runs the same code, so a row's result is the same bits whatever the other rows of the batch are and
wherever it sits, in any batch of at least MIN_ROWS rows (tests/test_batch_dot.py): there a sequence's
products do not depend on what else is in the batch. A partial tile dots its missing rows with the last real
ones (no reads out of bounds) and stores only the real ones.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .linear import _JIT, _prefetch_row, _specialize
from .simd import F32, I64, _Acc, _IR, data_ptrs

from edgeq.formats.quants import QTYPES

_MR, _NT = 4, 2  # weight rows x activation rows per tile (measured: benchmarks/batch_dot_bench.py)


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
                for row, racc in zip(rows, accs):
                    for acc, (aq, ad, ab) in zip(racc, acts):
                        block(x, acc, row, o, b, aq, ad, ab)
            for i, racc in zip(ws, accs):
                for t, acc in zip(ts, racc):
                    ok = builder.and_(builder.icmp_signed("<", i, nr), builder.icmp_signed("<", t, n_t))
                    with builder.if_then(ok, likely=True):
                        col = builder.mul(builder.add(r0, i), c(4))
                        p = builder.gep(pout, [builder.add(builder.mul(t, sout), col)])
                        builder.store(acc.total(), builder.bitcast(p, F32.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    impl.__doc__ = f"{mr} {qtype} rows . {nt} quantized activation rows"
    impl.__name__ = impl.__qualname__ = f"dot{mr}x{nt}_" + qtype.lower()
    return intrinsic(impl)


_row_fn = _block_elems = _block_bytes = None  # placeholders, bound per type by _specialize


@njit(**_JIT)
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
    tiles = 0
    for m in range(3):
        tiles += (outs[m].shape[1] + _MR - 1) // _MR
    for g in prange(tiles):
        m, r0, nr = _locate_tile(outs, g, _MR)
        raw, out = raws[m], outs[m]
        _prefetch_row(raw, (r0 + 2 * _MR) * row_bytes, _MR * row_bytes)  # two tiles ahead: DRAM latency
        for t0 in range(0, T, _NT):
            _row_fn(raw, r0 * row_bytes, row_bytes, nr, nb, qx, dx, bsums, t0, out, r0)


# qtype -> the multi-row driver (same arguments as linear._mm_<type>); compiled on first call
KERNELS = {qtype: _specialize(_mmb_template, qtype, _rows_dot(qtype, block, _MR, _NT))
           for qtype, block in simd.BLOCK_IR.items()}
# qtype -> the fewest activation rows for which these drivers beat the single-row dots (measured:
# benchmarks/batch_dot_bench.py on 1536 x 576 and 2048 x 768 matrices, and SmolLM2's own weights); fewer rows
# take linear._mm_<type>. Q8_0 from 4: on SmolLM2's 49152 x 576 classifier (28 MB, streamed from memory) the
# tiles cost 2.3 ms at 2 rows against 1.6 for the single-row dots, the same at 4, 15-20% less at 8.
MIN_ROWS = {qtype: 4 if qtype == "Q8_0" else 2 for qtype in KERNELS}
