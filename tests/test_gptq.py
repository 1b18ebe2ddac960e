"""GPTQ into fixed quantization grids (edgeq/convert/gptq.py) and the level grids it rounds to
(formats/quant_grid.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeq.convert import gptq
from edgeq.formats import quant_grid
from edgeq.formats.quants import dequantize, quantize


def _correlated(rng, n_tok: int, n_in: int) -> np.ndarray:
    """Inputs with strongly correlated columns and uneven scales (what real activations look like)."""
    base = rng.standard_normal((n_tok, n_in // 4 + 1))
    mix = rng.standard_normal((base.shape[1], n_in))
    x = base @ mix + 0.3 * rng.standard_normal((n_tok, n_in))
    return (x * rng.uniform(0.2, 3.0, n_in)).astype(np.float32)


@pytest.mark.parametrize("qtype", quant_grid.GRID_TYPES)
def test_grid_is_the_dequantized_tensor_and_encode_writes_levels(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    raw = quantize(x, qtype, rng.random(512).astype(np.float32))
    k, a, b = quant_grid.decode(raw, qtype, 512)
    lev = quant_grid.LEVELS[qtype]
    np.testing.assert_allclose(a * lev[k] + b, dequantize(raw, qtype, x.shape), rtol=1e-6, atol=1e-6)
    assert np.array_equal(quant_grid.encode(raw, qtype, k), raw)
    k2 = rng.integers(0, len(lev), size=k.shape)
    raw2 = quant_grid.encode(raw, qtype, k2)
    np.testing.assert_allclose(dequantize(raw2, qtype, x.shape), a * lev[k2] + b, rtol=1e-6, atol=1e-6)
    assert np.array_equal(quant_grid.nearest(a * lev[k2] + b, a, b, lev)[a != 0], k2[a != 0])


def _grid_round(a, b, lev):
    return lambda j, w: a[:, j] * lev[quant_grid.nearest(w, a[:, j], b[:, j], lev)] + b[:, j]


def test_reference_is_sequential_least_squares():
    """GPTQ's column step = round the least-squares optimum of the remaining columns given the ones already
    rounded (the objective solved directly, no Cholesky), column after column."""
    rng = np.random.default_rng(2)
    n_in, rows = 12, 5
    X = _correlated(rng, 64, n_in).astype(np.float64)
    H = X.T @ X
    W = rng.standard_normal((rows, n_in))
    a = np.full((rows, n_in), 0.4)
    b = np.full((rows, n_in), -0.6)
    lev = quant_grid.LEVELS["Q2_K"]
    rnd = _grid_round(a, b, lev)
    Hd = gptq._damped(H, gptq.DAMP)
    Q = np.zeros_like(W)
    for j in range(n_in):
        done, rest = slice(0, j), slice(j, n_in)
        dF = W[:, done] - Q[:, done]
        # argmin over u of tr(D Hd Dᵀ), D = [dF, W_rest − u]: W_rest − u = −dF H_FR H_RR⁻¹
        u = W[:, rest] + dF @ Hd[done, rest] @ np.linalg.inv(Hd[rest, rest])
        Q[:, j] = rnd(j, u[:, 0])
    np.testing.assert_allclose(gptq.gptq_reference(W, H, rnd), Q, atol=1e-12)


def test_reference_near_brute_force_optimum_and_beats_nearest():
    rng = np.random.default_rng(3)
    n_in = 8
    X = _correlated(rng, 40, n_in).astype(np.float64)
    H = X.T @ X
    w = rng.uniform(-0.75, 0.75, (1, n_in))   # inside the grid: rounding, not clipping, decides
    a, b, lev = np.full((1, n_in), 0.5), np.full((1, n_in), -0.75), quant_grid.LEVELS["Q2_K"]
    grid = a[0, 0] * lev + b[0, 0]
    best = min(gptq.output_error(w, np.array([c]), H) for c in itertools.product(grid, repeat=n_in))
    e_gptq = gptq.output_error(w, gptq.gptq_reference(w, H, _grid_round(a, b, lev), damp=0.0), H)
    e_rtn = gptq.output_error(w, a * lev[quant_grid.nearest(w, a, b, lev)] + b, H)
    assert best <= e_gptq < e_rtn


def test_fast_path_equals_reference_without_reordering():
    rng = np.random.default_rng(4)
    n_in, rows = 300, 7    # more than one lazy batch, a ragged last one
    X = _correlated(rng, 400, n_in).astype(np.float64)
    H = X.T @ X
    W = rng.standard_normal((rows, n_in))
    a = rng.uniform(0.1, 0.3, (rows, n_in))
    b = -rng.uniform(0.5, 1.0, (rows, n_in))
    lev = quant_grid.LEVELS["Q3_K"]
    K = gptq.gptq_levels(W, H, a, b, lev, block=64, act_order=False, dtype=np.float64)
    np.testing.assert_allclose(a * lev[K] + b, gptq.gptq_reference(W, H, _grid_round(a, b, lev)), atol=1e-12)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS", "Q4_0", "Q5_1"])
def test_gptq_lowers_output_error_on_correlated_inputs(qtype):
    rng = np.random.default_rng(5)
    n_in, rows = 512, 32
    X = _correlated(rng, 2048, n_in)
    H = X.T.astype(np.float64) @ X
    W = (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)
    imp = gptq.importance_of(H, X.shape[0])
    plain = dequantize(quantize(W, qtype, imp), qtype, W.shape)
    raw = gptq.quantize_gptq(W, qtype, H, imp)
    assert raw.shape == quantize(W, qtype, imp).shape
    e_plain = gptq.output_error(W, plain, H)
    e_gptq = gptq.output_error(W, dequantize(raw, qtype, W.shape), H)
    assert e_gptq < 0.9 * e_plain


def test_hessians_share_one_per_input_and_split_held_out():
    hs = gptq.Hessians()
    rng = np.random.default_rng(6)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        hs(name, x)
    y = rng.standard_normal((5, 8)).astype(np.float32)
    hs.held_out = True
    hs("blk.0.attn_q.weight", y)
    hs("blk.0.attn_k.weight", y)
    assert len(hs.fit) == 1
    np.testing.assert_allclose(hs.get("blk.0.attn_k.weight", "fit"), x.T.astype(np.float64) @ x, rtol=1e-5)
    np.testing.assert_allclose(hs.get("blk.0.attn_q.weight", "held"), y.T.astype(np.float64) @ y, rtol=1e-5)
    assert hs.tokens["blk.0.attn_q.weight"] == [10, 5] and hs.has_held_out("blk.0.attn_k.weight")


@pytest.mark.parametrize("choice_rows", [gptq.CHOICE_ROWS, 5])
def test_best_keeps_the_method_with_lower_held_out_error(monkeypatch, choice_rows):
    """(With 5 CHOICE_ROWS the two methods are compared on 5 strided rows of the 16; the whole matrix is
    still quantized.)"""
    monkeypatch.setattr(gptq, "CHOICE_ROWS", choice_rows)
    rng = np.random.default_rng(7)
    n_in, rows = 256, 16
    hs = gptq.Hessians()
    W = (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)
    X = _correlated(rng, 1024, n_in)
    hs("m", X[:768])
    hs.held_out = True
    hs("m", X[768:])
    raw, choice = gptq.calibrated_quantize("m", W, "Q3_K", hs, "best", gptq.importance_of(hs.get("m"), 1024))
    assert choice.method == min(choice.errors, key=choice.errors.get)
    assert choice.errors["gptq"] < choice.errors["imatrix"]
    assert np.array_equal(raw, gptq.regrid(W, hs.get("m"), quantize(W, "Q3_K", gptq.importance_of(hs.get("m"), 1024)),
                                           "Q3_K"))


@pytest.mark.parametrize("method", ["best", "gptq"])
def test_lazy_rows_in_slabs_give_the_bytes_of_the_whole_matrix(monkeypatch, method):
    """A matrix handed over as LazyRows (the classifier, read from the file a slab at a time) and quantized
    in slabs of 3 rows gives the same bytes and choice as the whole float32 matrix at once; only slabs and the
    strided choice rows are ever read."""
    rng = np.random.default_rng(11)
    n_in, rows = 256, 16
    W = (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)
    X = _correlated(rng, 1024, n_in)
    hs = gptq.Hessians()
    hs("m", X[:768])
    hs.held_out = True
    hs("m", X[768:])
    imp = gptq.importance_of(hs.get("m"), 1024)
    monkeypatch.setattr(gptq, "CHOICE_ROWS", 5)
    whole, choice = gptq.calibrated_quantize("m", W, "Q4_K", hs, method, imp)
    reads = []

    def rows_of(index):
        reads.append(len(np.arange(rows)[index]))
        return W[index]

    monkeypatch.setattr(gptq, "SLAB_BYTES", 3 * n_in * 4)
    slabbed, choice2 = gptq.calibrated_quantize("m", gptq.LazyRows(W.shape, rows_of), "Q4_K", hs, method, imp)
    assert np.array_equal(slabbed, whole) and choice2 == choice
    assert max(reads) <= 5 and sum(reads) == rows + (5 if method == "best" else 0)


def test_regrid_works_in_row_chunks_of_bounded_memory(monkeypatch):
    """A huge classifier (Gemma 3's 262k rows) is re-gridded ROW_CHUNK rows at a time: the bytes of one piece,
    and the temporaries of one chunk (not float64 copies of the whole matrix) at the peak."""
    import tracemalloc

    rng = np.random.default_rng(8)
    rows, n_in = 16384, 256
    X = _correlated(rng, 1024, n_in)
    H = X.T.astype(np.float64) @ X
    W = (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)
    raw = quantize(W, "Q4_K", gptq.importance_of(H, 1024))
    whole = gptq.regrid(W, H, raw, "Q4_K")
    monkeypatch.setattr(gptq, "ROW_CHUNK", 1024)
    tracemalloc.start()
    chunked = gptq.regrid(W, H, raw, "Q4_K")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (chunked != whole).mean() < 1e-3   # (float32 GEMMs of other sizes may round a tie the other way)
    assert peak < raw.nbytes + 8 * W.nbytes // 16 + 4 * n_in * n_in * 8   # the whole matrix in float64: 8 × W.nbytes / 4


def test_float32_gptq_matches_float64_output_error():
    """The column updates in float32 (the Cholesky factor still in float64) lose nothing measurable."""
    rng = np.random.default_rng(9)
    n_in, rows = 512, 64
    X = _correlated(rng, 2048, n_in)
    H = X.T.astype(np.float64) @ X
    W = (rng.standard_normal((rows, n_in)) * 0.05).astype(np.float32)
    raw = quantize(W, "Q3_K", gptq.importance_of(H, 2048))
    _, a, b = quant_grid.decode(raw, "Q3_K", n_in)
    lev = quant_grid.LEVELS["Q3_K"]
    err = {dt: gptq.output_error(W, a * lev[gptq.gptq_levels(W, H, a, b, lev, dtype=dt)] + b, H)
           for dt in (np.float32, np.float64)}
    assert abs(err[np.float32] - err[np.float64]) < 0.01 * err[np.float64]


def test_matrices_sharing_an_input_share_one_factorization(monkeypatch):
    """q/k/v (gate/up) read one input: its damped H⁻¹ Cholesky factor is computed once per window set."""
    rng = np.random.default_rng(10)
    hs = gptq.Hessians()
    X = _correlated(rng, 512, 256)
    for held in (False, True):
        hs.held_out = held
        x = X[384:] if held else X[:384]
        for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            hs(name, x)
    calls = []
    real = gptq._factor
    monkeypatch.setattr(gptq, "_factor", lambda *a: calls.append(1) or real(*a))
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        W = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
        gptq.calibrated_quantize(name, W, "Q4_K", hs, "best", gptq.importance_of(hs.get(name), 512))
    assert 1 <= len(calls) <= 2   # the fitting windows' factor, and all windows' when GPTQ won


@pytest.mark.parametrize("n", [1, 7, 128, 129, 600])
def test_factor_is_the_cholesky_factor_of_the_inverse(n):
    """_factor's reversed Cholesky + blocked triangular inverse equals the direct cholesky(inv(H)) that
    gptq_reference uses (same order, same damping), for sizes below, at and across the inverse's leaf size."""
    rng = np.random.default_rng(n)
    X = _correlated(rng, 3 * n + 4, n).astype(np.float64)
    H = X.T @ X
    for act_order in (False, True):
        U, perm = gptq._factor(H, gptq.DAMP, act_order, np.float64)
        direct = np.linalg.cholesky(np.linalg.inv(gptq._damped(H, gptq.DAMP)[np.ix_(perm, perm)])).T
        np.testing.assert_allclose(U, direct, rtol=1e-9, atol=1e-12 * np.abs(direct).max())
        assert np.array_equal(U, np.triu(U))
    L = np.tril(rng.standard_normal((300, 300))) + 20 * np.eye(300)
    np.testing.assert_allclose(gptq.lower_inverse(L, leaf=16) @ L, np.eye(300), atol=1e-12)


def test_blas_threads_limits_openblas_and_restores_it():
    from edgeq.convert.calibrate import _openblas, blas_threads

    blas = _openblas()
    if blas is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS found in /proc/self/maps")
    get, put = blas
    before = get()
    put(2)
    try:
        with blas_threads(1):
            assert get() == 1
        assert get() == 2
    finally:
        put(before)
