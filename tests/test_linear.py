"""cpu_kernels/linear.py against its numpy twin: gguf-py's dequantizers followed by a float64 product."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from edgeq.cpu_kernels.gemm_i8 import INT8_GEMM
from edgeq.cpu_kernels.linear import BLOCKS, QuantLinear, act_group, embed_rows

ALL = list(BLOCKS)
FLOAT = {"F32", "F16", "BF16"}
# byte offsets of the f16 (super-)block scales, which random bytes must not turn into inf/nan
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
            "IQ4_NL": (0,), "IQ4_XS": (0,)}


def make_weights(qtype: str, n_out: int, n_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 1-D, dequantized float64 (n_out, n_in)) for a random matrix of the given type."""
    rng = np.random.default_rng(seed)
    bw, bb = BLOCKS[qtype]
    if qtype in K_SCALES:  # gguf-py has no k-quant / i-quant quantizer: random codes with sane scales
        raw = rng.integers(0, 256, size=(n_out, n_in // bw, bb), dtype=np.uint8)
        scales = (rng.random((n_out, n_in // bw, 1)) * 0.02 + 1e-4).astype(np.float16).view(np.uint8)
        for p in K_SCALES[qtype]:
            raw[:, :, p:p + 2] = scales
    else:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        raw = quantize(w, GGMLQuantizationType[qtype])
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    ref = dequantize(raw.reshape(n_out, -1), GGMLQuantizationType[qtype]).reshape(n_out, n_in)
    return raw, ref.astype(np.float64)


def rel_err(y, ref) -> float:
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def tolerance(qtype: str, T: int) -> float:
    # float weights are exact up to float32 rounding; quantized weights with few rows use int8 activations
    # (error ~ 1/127 per block, relative to the output norm), many rows go through float32 tiles or, for the
    # types of gemm_i8.INT8_GEMM, int8 activations again
    return 1e-5 if qtype in FLOAT or (T >= 8 and qtype not in INT8_GEMM) else 2e-2  # INT8_GEMM: see use_int8


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("n_out,n_blocks", [(37, 1), (37, 3), (300, 2)])
def test_matvec_matmul_match_reference(qtype, n_out, n_blocks):
    bw = BLOCKS[qtype][0]
    n_in = max(bw, 32) * n_blocks
    raw, W = make_weights(qtype, n_out, n_in, seed=n_out + n_blocks)
    q = QuantLinear(raw, qtype, (n_out, n_in))
    assert (q.n_out, q.n_in, q.qtype, q.nbytes) == (n_out, n_in, qtype, raw.nbytes)
    rng = np.random.default_rng(1)
    for T in (1, 3, 17):
        X = rng.standard_normal((T, n_in)).astype(np.float32)
        ref = X.astype(np.float64) @ W.T
        Y = q.matmul(X)
        assert Y.shape == (T, n_out) and Y.dtype == np.float32
        assert rel_err(Y, ref) < tolerance(qtype, T), (qtype, T, rel_err(Y, ref))
        y = q.matvec(X[0])
        assert y.shape == (n_out,) and y.dtype == np.float32
        assert rel_err(y, ref[0]) < tolerance(qtype, 1)


def quantize_activations(X: np.ndarray, group: int = 32) -> np.ndarray:
    """numpy twin of linear._quantize_act (and of _quantize_act_super for group=256): X rounded to int8 codes on
    one scale per `group` values, returned as float64 codes*scale."""
    T, n = X.shape
    B = X.reshape(T, n // group, group).astype(np.float32)
    d = (np.abs(B).max(axis=2, keepdims=True) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.rint(B * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(T, n)


@pytest.mark.parametrize("group", [32, 256])
def test_activation_quantizers_match_numpy(group):
    """linear._quantized on one scale per 32 or per 256 values: codes times scales equal the numpy twin, every
    per-32 scale of a group is the group's one scale, and bsums are the sums of each 16 codes followed by each
    32's scale times its codes' sum (as float32 bits)."""
    from edgeq.cpu_kernels import linear

    X = np.random.default_rng(4).standard_normal((3, 1024)).astype(np.float32) * np.float32(3.0)
    X[1, 256:512] = 0.0                                   # an all-zero group: scale 0, codes 0
    qx, dx, bsums = linear._quantized(X, group)
    np.testing.assert_allclose(qx * np.repeat(dx, 32, axis=1), quantize_activations(X, group), rtol=0, atol=1e-6)
    per = dx.reshape(3, -1, group // 32)
    np.testing.assert_array_equal(per, np.repeat(per[:, :, :1], group // 32, axis=2))
    sums16 = qx.reshape(3, -1, 16).astype(np.int32).sum(axis=2)
    np.testing.assert_array_equal(bsums[:, :1024 // 16], sums16)
    np.testing.assert_array_equal(bsums[:, 1024 // 16:].view(np.float32),
                                  dx * (sums16[:, 0::2] + sums16[:, 1::2]).astype(np.float32))
    assert np.abs(qx).max() == 127 and not qx[1, 256:512].any()


@pytest.mark.parametrize("qtype", [t for t in ALL if t not in FLOAT])
@pytest.mark.parametrize("n_out,n_blocks", [(37, 1), (19, 4), (11, 7)])
def test_integer_path_exact_against_quantized_activations(qtype, n_out, n_blocks):
    """The decode kernels (cpu_kernels/simd.py row dots) equal W . dequant(quant(x)) up to float32 rounding:
    a wrong scale, min, bit or sub-block order shows up here, far below the 2e-2 of the test above. 7 blocks: on
    AVX-512 VNNI a 32-weight type's row dot takes two block pairs in a turn, then a last pair, then one block."""
    n_in = max(BLOCKS[qtype][0], 32) * n_blocks
    raw, W = make_weights(qtype, n_out, n_in, seed=7 * n_out + n_blocks)
    q = QuantLinear(raw, qtype, (n_out, n_in))
    X = np.random.default_rng(3).standard_normal((3, n_in)).astype(np.float32)
    ref = quantize_activations(X, act_group(qtype)) @ W.T
    assert rel_err(q.matmul(X), ref) < 1e-5, (qtype, rel_err(q.matmul(X), ref))
    assert rel_err(q.matvec(X[1]), ref[1]) < 1e-5


@pytest.mark.parametrize("qtype", ALL)
def test_embed_rows_match_dequantize(qtype):
    n_out, n_in = 37, max(BLOCKS[qtype][0], 32) * 2
    raw, W = make_weights(qtype, n_out, n_in)
    ids = np.array([0, 36, 5, 5, 17])
    E = embed_rows(raw, qtype, (n_out, n_in), ids)
    assert E.shape == (5, n_in) and E.dtype == np.float32
    np.testing.assert_allclose(E, W[ids], rtol=1e-6, atol=1e-7)
    assert embed_rows(raw, qtype, (n_out, n_in), []).shape == (0, n_in)
    # a prompt's many tokens take the parallel driver, a decode step's few the serial one: the same bits
    many = np.arange(40) % n_out
    assert np.array_equal(embed_rows(raw, qtype, (n_out, n_in), many)[:5], embed_rows(raw, qtype, (n_out, n_in),
                                                                                      many[:5]))


def test_out_argument_and_zero_activation():
    raw, W = make_weights("Q3_K", 64, 512)   # a type outside gemm_i8.INT8_GEMM: its prefill takes the float tiles
    q = QuantLinear(raw, "Q3_K", (64, 512))
    y = np.full(64, 7.0, np.float32)
    assert q.matvec(np.zeros(512, np.float32), out=y) is y
    np.testing.assert_array_equal(y, 0.0)
    # integer path (int8 activations), float32 tile path
    for T, tol in ((3, 2e-2), (9, 1e-5)):
        X = np.random.default_rng(0).standard_normal((T, 512)).astype(np.float32)
        Y = np.empty((T, 64), np.float32)
        assert q.matmul(X, out=Y) is Y
        assert rel_err(Y, X.astype(np.float64) @ W.T) < tol


def test_invalid_inputs_raise_value_error():
    raw, _ = make_weights("Q4_0", 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        QuantLinear(raw[:-1], "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="multiple of the block size"):
        QuantLinear(raw, "Q4_0", (8, 60))
    with pytest.raises(ValueError, match="unsupported"):
        QuantLinear(raw, "Q7_0", (8, 64))
    with pytest.raises(ValueError, match="uint8"):
        QuantLinear(raw.view(np.int8), "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="multiple of the block size"):
        QuantLinear(np.zeros(8 * 84, np.uint8), "Q2_K", (8, 32))
    q = QuantLinear(raw, "Q4_0", (8, 64))
    with pytest.raises(ValueError, match="x of shape"):
        q.matvec(np.zeros(63, np.float32))
    with pytest.raises(ValueError, match="shape"):
        q.matmul(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        q.matvec(np.zeros(64, np.float32), out=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="token ids"):
        embed_rows(raw, "Q4_0", (8, 64), [0, 8])
    with pytest.raises(ValueError, match="token ids"):
        embed_rows(raw, "Q4_0", (8, 64), [-1])
    with pytest.raises(ValueError, match="integer"):
        embed_rows(raw, "Q4_0", (8, 64), [0.5])


def test_memmap_view_is_used_without_copy(tmp_path):
    raw, W = make_weights("Q8_0", 40, 96)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 32 + raw.tobytes())  # GGUF tensor data is 32-byte aligned
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    q = QuantLinear(mm[32:], "Q8_0", (40, 96))
    x = np.random.default_rng(0).standard_normal(96).astype(np.float32)
    assert rel_err(q.matvec(x), W @ x) < 2e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_the_row_dots_prefetch_changes_no_bits(qtype):
    """The decode row dots' prefetch as the block loop goes (simd.ROW_AHEAD) is emitted beside the block IR, never in
    it: the same driver built with and without it gives the same bits (7 blocks: a 32-weight type's pair turns, its
    last pair and its last block; the k-quants' loop of one super-block a turn)."""
    from edgeq.cpu_kernels import linear as L
    from edgeq.cpu_kernels import simd

    n_in = max(BLOCKS[qtype][0], 32) * 7
    raw, _ = make_weights(qtype, 19, n_in, seed=5)
    X = np.random.default_rng(4).standard_normal((2, n_in)).astype(np.float32)
    act = L._quantized(X, act_group(qtype))
    ys = []
    for ahead in (0, 1024):
        mm = L._specialize(L._mm_template, qtype, simd._row_dot(qtype, simd.BLOCK_IR[qtype], ahead),
                           suffix=f"_test_ahead{ahead}", _ROW_BURST=0)
        y = np.empty((2, 19), np.float32)
        L._run_fused(mm, [raw], n_in, *act, [y])
        ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    q = QuantLinear(raw, qtype, (19, n_in))
    if q._mm is L._KERNELS[qtype][0]:  # the driver decode runs (not a one-row tile of batch_dot.ONE_ROW)
        np.testing.assert_array_equal(q.matmul(X), ys[1])


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K", "F16"])
def test_concurrent_calls_from_two_threads(qtype):
    raw, _ = make_weights(qtype, 300, 512)
    q = QuantLinear(raw, qtype, (300, 512))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((T, 512)).astype(np.float32) for T in (1, 9)]
    expect = [q.matmul(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                for x, e in zip(xs, expect):
                    np.testing.assert_array_equal(q.matmul(x), e)
                np.testing.assert_array_equal(q.matvec(xs[0][0]), expect[0][0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("qtypes", [("Q4_1", "Q4_1", "Q4_1"), ("Q4_K", "Q4_K"), ("Q5_0", "Q8_0", "Q5_0"), ("F16", "F16")])
def test_matvec_many_equals_separate_products(qtypes):
    """Q/K/V and gate/up run as one kernel call over all their rows (mixed types fall back to one call each)."""
    from edgeq.cpu_kernels.linear import matvec_many

    n_in = 512
    mats = [make_weights(t, n_out, n_in, seed=n_out) for t, n_out in zip(qtypes, (48, 16, 16))]
    qs = [QuantLinear(raw, t, (W.shape[0], n_in)) for t, (raw, W) in zip(qtypes, mats)]
    x = np.random.default_rng(5).standard_normal(n_in).astype(np.float32)
    ys = matvec_many(qs, x)
    assert [y.shape for y in ys] == [(W.shape[0],) for _, W in mats]
    for q, y in zip(qs, ys):  # the same row dots, compiled per tuple length: equal up to an ulp
        np.testing.assert_allclose(y, q.matvec(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        matvec_many(qs, x[:-1])


_CACHE_PROBE = """
import json
import numpy as np
from edgeq.cpu_kernels import linear
stats = {}
for qtype in ("Q4_0", "Q6_K", "F16"):
    n_in = 256
    raw = np.zeros(8 * linear._row_bytes(qtype, n_in), np.uint8)
    q = linear.QuantLinear(raw, qtype, (8, n_in))
    q.matvec(np.ones(n_in, np.float32))
    linear.embed_rows(raw, qtype, (8, n_in), [1, 2])                 # a decode step's few tokens: serial
    linear.embed_rows(raw, qtype, (8, n_in), np.arange(20) % 8)      # a prompt's: the parallel row dequantizer
    # the decode driver in use (F16: its half-row driver), the two row dequantizers
    for driver in (q._mm or linear._HALF_ROWS.get(qtype), linear._KERNELS[qtype][1], linear._ROWS_SERIAL[qtype]):
        if driver is not None:
            s = driver.stats
            stats[driver.py_func.__qualname__] = [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
print(json.dumps(stats))
"""


def test_generated_drivers_load_from_a_warm_cache(tmp_path):
    """The per-type drivers made by one template (linear._specialize) each have their own entry in Numba's
    on-disk cache: a fresh process with a warm cache folder compiles none of them."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run() -> dict:
        r = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    from edgeq.cpu_kernels import batch_dot, simd

    cold, warm = run(), run()
    mm_q4_0 = f"_mmb_q4_0_{batch_dot.ONE_ROW_TILES['Q4_0']}x1" if "Q4_0" in batch_dot.ONE_ROW_TILES else "_mm_q4_0"
    half_f16 = "_dot_half_ir_f16" if "F16" in simd.HALF_DOTS else "_dot_half_f16"
    names = {mm_q4_0, "_rows_q4_0", "_mm_q6_k", "_rows_q6_k", half_f16, "_rows_f16", "_rows_q4_0_serial",
             "_rows_q6_k_serial", "_rows_f16_serial"}
    assert set(cold) == set(warm) == names
    assert all(misses >= 1 for _, misses in cold.values()), cold
    assert all(hits >= 1 and misses == 0 for hits, misses in warm.values()), warm
