"""cpu_kernels/batch_dot.py (a few activation rows per weight-row pass) against the single-row dots and the numpy
twin (test_linear: gguf-py's dequantizer, quantized activations, a float64 product)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.cpu_kernels import batch_dot
from edgeq.cpu_kernels.linear import BLOCKS, QuantLinear, act_group, matmul_rows_many
from edgeq.formats.quants import QTYPES
from test_gemm_i8 import CODE_BYTES
from test_linear import make_weights, quantize_activations, rel_err

TYPES = list(batch_dot.KERNELS)
# The tiles sum a row's blocks in one chain where the single-row dot of a 32-weight type sums even and odd blocks
# apart (simd._PAIRED), and Numba compiles with fastmath 'contract' (the backend fuses multiply-adds per compiled
# loop): the two differ by float32 roundings of the partial sums (k-quants measured: <= 3e-7 of the row's largest
# output).
SAME = 2e-6


def _matrices(qtype: str, n_outs, blocks: int, seed: int):
    n_in = max(BLOCKS[qtype][0], 32) * blocks
    mats = [make_weights(qtype, n, n_in, seed=seed + n) for n in n_outs]
    return n_in, [QuantLinear(raw, qtype, (n, n_in)) for n, (raw, _) in zip(n_outs, mats)], [W for _, W in mats]


@pytest.mark.parametrize("qtype", TYPES)
def test_multi_row_equals_the_single_row_path(qtype):
    """Three fused matrices whose row counts are no multiple of the weight tile (_MR) nor of the thread split,
    odd and even activation row counts (partial activation tiles): every row as the single-row dot gives it."""
    n_in, qs, Ws = _matrices(qtype, (37, 6, 1), 3, seed=11)
    for T in (2, 3, 5, 16):
        X = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
        ys = matmul_rows_many(qs, X)
        for q, W, y in zip(qs, Ws, ys):
            one = np.stack([q.matvec(x) for x in X])
            assert np.abs(y - one).max() <= SAME * np.abs(one).max(), (qtype, T)
            assert rel_err(y, quantize_activations(X, act_group(qtype)) @ W.T) < 1e-5, (qtype, T)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K", "Q6_K"])
def test_a_row_does_not_depend_on_its_batch(qtype):
    """A sequence's products are the same bits whatever else is in the batch and wherever it sits in it, among
    batches that take the same driver (the tiles below batch_dot.LANES_FROM[qtype] rows, the lanes from there
    on)."""
    n_in, qs, _ = _matrices(qtype, (21,), 2, seed=3)
    X = np.random.default_rng(0).standard_normal((7, n_in)).astype(np.float32)
    lanes_from = batch_dot.LANES_FROM.get(qtype, 99)
    (full,) = matmul_rows_many(qs, X)
    for rows in ([2, 5, 1, 0, 6], [6, 0, 3, 5, 1], [5] * 9):
        (part,) = matmul_rows_many(qs, X[rows])
        np.testing.assert_array_equal(part, full[rows])
    few = min(3, lanes_from - 1)  # the tiles
    (head,) = matmul_rows_many(qs, X[:few])
    for rows in ([1, 0], [0, few - 1], [1, 1]):
        (part,) = matmul_rows_many(qs, X[rows])
        np.testing.assert_array_equal(part, head[rows])


def test_dispatch_by_row_count(monkeypatch):
    """One row keeps the single-row kernel; from MIN_ROWS rows on, QuantLinear.matmul and matmul_rows_many run
    the multi-row driver (its output, bit for bit)."""
    from edgeq.cpu_kernels import linear

    monkeypatch.setitem(batch_dot.MIN_ROWS, "Q4_K", 3)
    n_in, (q,), _ = _matrices("Q4_K", (13,), 2, seed=5)
    assert q._integer_kernel(1) is q._mm and q._integer_kernel(2) is q._mm
    assert q._integer_kernel(3) is q._integer_kernel(16) is batch_dot.KERNELS["Q4_K"]
    X = np.random.default_rng(1).standard_normal((4, n_in)).astype(np.float32)
    direct = np.empty((4, 13), np.float32)
    qx, dx, bsums = linear._quantized(X, act_group("Q4_K"))
    linear._run_fused(batch_dot.KERNELS["Q4_K"], [q.raw], n_in, qx, dx, bsums, [direct])
    np.testing.assert_array_equal(q.matmul(X), direct)
    np.testing.assert_array_equal(matmul_rows_many([q], X)[0], direct)


def test_lanes_take_batches_from_lanes_from_rows():
    """On VNNI and AVX2 CPUs the 32-weight block types run batches of LANES_FROM[qtype] rows and more on the lanes
    driver (its output, bit for bit), fewer rows on the tiles; the lanes' products match the numpy twin."""
    from edgeq.cpu_kernels import linear, simd

    if simd.LEVEL not in ("vnni", "avx2"):
        assert batch_dot.LANE_KERNELS == {} == batch_dot.LANES_FROM
        return
    assert set(batch_dot.LANE_KERNELS) == set(batch_dot.LANES_FROM) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    for qtype in batch_dot.LANE_KERNELS:
        n_in, (q,), (W,) = _matrices(qtype, (13,), 2, seed=5)
        start = batch_dot.LANES_FROM[qtype]
        # one row fewer: the tiles, or the single-row dots below the tiles' MIN_ROWS (VNNI's Q8_0 lanes start at 4)
        fewer = batch_dot.KERNELS[qtype] if start - 1 >= batch_dot.MIN_ROWS[qtype] else q._mm
        assert q._integer_kernel(start - 1) is fewer
        assert q._integer_kernel(start) is q._integer_kernel(16) is _shipped_lanes(qtype)
        X = np.random.default_rng(1).standard_normal((start + 8, n_in)).astype(np.float32)
        direct = np.empty((X.shape[0], 13), np.float32)
        qx, dx, bsums = linear._quantized(X)
        linear._run_fused(batch_dot.LANE_KERNELS[qtype], [q.raw], n_in, qx, dx, bsums, [direct])
        np.testing.assert_array_equal(matmul_rows_many([q], X)[0], direct)
        assert rel_err(direct, quantize_activations(X, act_group(qtype)) @ W.T) < 1e-5, qtype


def test_lanes_reach_the_extreme_codes():
    """The AVX2 lanes add int16 pair sums before widening them: with every code at its extreme (4-bit codes 15,
    5-bit 31, Q8_0 -128 and 127) against activations of +-127, nothing saturates (the numpy twin agrees)."""
    for qtype in batch_dot.LANE_KERNELS:
        n_in, (q,), _ = _matrices(qtype, (9,), 2, seed=2)
        raw = q.raw.copy().reshape(9, -1, QTYPES[qtype].block_bytes)
        if qtype == "Q8_0":
            raw[:5, :, 2:], raw[5:, :, 2:] = 0x80, 0x7F  # rows of -128, rows of 127
        else:
            raw[:, :, CODE_BYTES[qtype]] = 0xFF  # every code at its largest
        q2 = QuantLinear(raw.reshape(-1), qtype, (9, n_in))
        X = np.ones((8, n_in), np.float32)  # codes +-127: rows of +1 and of -1, then mixed signs
        X[1] = -1.0
        X[2:] = np.random.default_rng(3).choice([-1.0, 1.0], size=(6, n_in))
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        W = dequantize(raw.reshape(9, -1), GGMLQuantizationType[qtype]).astype(np.float64)
        assert q2._integer_kernel(8) is _shipped_lanes(qtype)
        (y,) = matmul_rows_many([q2], X)
        assert rel_err(y, quantize_activations(X, act_group(qtype)) @ W.T) < 1e-5, qtype


def test_rows16_prefetch_changes_no_bit():
    """The weight-row lanes (AVX-512: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) prefetch the next tile into L1 or the tile two on into L2
    (batch_dot._ROWS16_LAYOUT): hints only, the same products bit for bit, partial tiles included."""
    from edgeq.cpu_kernels import linear, simd
    from edgeq.cpu_kernels.linear import _specialize

    if not simd._ZMM:
        pytest.skip("the weight-row lanes run on AVX-512 only")
    for qtype in ("Q4_1", "Q8_0"):  # one of each prefetch as shipped; the other built here
        n_in, (q,), _ = _matrices(qtype, (37,), 2, seed=7)
        X = np.random.default_rng(8).standard_normal((11, n_in)).astype(np.float32)
        qx, dx, bsums = linear._quantized(X)
        other = not batch_dot._ROWS16_LAYOUT[qtype][2]
        k = _specialize(batch_dot._mm16_template, qtype, batch_dot._rows16_dot(qtype, far=other),
                        suffix=f"_test_far{int(other)}")
        y = np.empty((11, 37), np.float32)
        linear._run_fused(k, [q.raw], n_in, qx, dx, bsums, [y])
        assert q._integer_kernel(11) is _shipped_lanes(qtype)  # the shipped prefetch
        np.testing.assert_array_equal(y, matmul_rows_many([q], X)[0])


def _shipped_lanes(qtype: str):
    """The lanes driver QuantLinear runs for a batch: on the packed copy where batch_dot has one (AVX-512's 4- and
    5-bit types), else on the file's bytes."""
    return batch_dot.PACKED_KERNELS.get(qtype) or batch_dot.LANE_KERNELS[qtype]


def test_packed_lanes_equal_the_lanes_on_the_files_bytes():
    """The 4-, 5- and 8-bit types' weight-row lanes on batch_dot.pack_rows16's copy (AVX-512): the products of the lanes
    on the file's bytes, bit for bit, for full and partial tiles (1, 13, 16, 37 rows), extreme codes and partial
    activation tiles; the copy is as large as the file's bytes of its whole tiles, made once, and only by a batch."""
    from edgeq.cpu_kernels import linear, simd

    if not simd._ZMM:
        assert batch_dot.PACKED_KERNELS == {}
        pytest.skip("the packed lanes run on AVX-512 only")
    assert set(batch_dot.PACKED_KERNELS) == set(batch_dot.PACKED16) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    for qtype in batch_dot.PACKED16:
        for n_out in (1, 13, 16, 37):
            n_in, (q,), _ = _matrices(qtype, (n_out,), 3, seed=n_out)
            raw = q.raw.copy().reshape(n_out, -1, QTYPES[qtype].block_bytes)
            raw[: n_out // 2 + 1, 0, CODE_BYTES[qtype]] = 0xFF if qtype != "Q8_0" else 0x80  # extreme codes (-128)
            q = QuantLinear(raw.reshape(-1), qtype, (n_out, n_in))
            q.matvec(np.ones(n_in, np.float32))
            matmul_rows_many([q], np.ones((2, n_in), np.float32))
            assert q._packed is None  # one row, and two (the tiles), read the file's bytes
            for T in (3, 8, 11):
                X = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
                qx, dx, bsums = linear._quantized(X)
                direct = np.empty((T, n_out), np.float32)
                linear._run_fused(batch_dot.LANE_KERNELS[qtype], [q.raw], n_in, qx, dx, bsums, [direct])
                np.testing.assert_array_equal(matmul_rows_many([q], X)[0], direct)
                assert q._packed is not None
            assert q._packed.nbytes == -(-n_out // 16) * 16 * (q.raw.nbytes // n_out)
            assert q.packed16() is q._packed  # made once


def test_every_integer_type_has_a_multi_row_driver():
    """Built from the one table of block IR (simd.BLOCK_IR), so a new row-dot type gets one without a copy."""
    from edgeq.cpu_kernels import simd

    assert set(batch_dot.KERNELS) == set(simd.ROW_DOTS) == set(batch_dot.MIN_ROWS)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_K"])
def test_one_row_tiles_replace_the_single_row_dots(qtype):
    """Where batch_dot.ONE_ROW has a driver for the type (AVX2: weight-row tiles for one activation row), QuantLinear
    runs it wherever the single-row dots ran: a short prompt's rows equal decoding them one at a time, bit for bit,
    and equal the single-row dots up to a float32 rounding."""
    from edgeq.cpu_kernels import linear

    n_in, (q,), (W,) = _matrices(qtype, (37,), 3, seed=2)
    assert q._mm is batch_dot.ONE_ROW.get(qtype, linear._KERNELS[qtype][0])
    X = np.random.default_rng(9).standard_normal((5, n_in)).astype(np.float32)
    Y = q.matmul(X)                          # 5 rows: below _GEMM_MIN_T, the integer kernel
    for t in range(5):
        np.testing.assert_array_equal(Y[t], q.matvec(X[t]))
    single = np.empty((5, 37), np.float32)
    qx, dx, bsums = linear._quantized(X, act_group(qtype))
    linear._run_fused(linear._KERNELS[qtype][0], [q.raw], n_in, qx, dx, bsums, [single])
    assert np.abs(Y - single).max() <= SAME * np.abs(single).max()
    assert rel_err(Y, quantize_activations(X, act_group(qtype)) @ W.T) < 1e-5
