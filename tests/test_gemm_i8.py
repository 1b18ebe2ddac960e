"""cpu_kernels/gemm_i8.py (the int8 prefill GEMM) against its numpy twin: gguf-py's dequantizer for the weights,
test_linear.quantize_activations for the activations, a float64 product."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.cpu_kernels import gemm_amx, gemm_i8
from edgeq.cpu_kernels.linear import _GEMM_MIN_T, QuantLinear, act_group, matmul_many, matmul_rows_many
from test_linear import make_weights, quantize_activations, rel_err

TYPES = list(gemm_i8.INT8_GEMM)  # this SIMD level's (tests/test_simd_levels.py runs the others)


@pytest.fixture(autouse=True)
def _int8_kernel(monkeypatch):
    """These tests are the vpdpbusd kernel's: long prompts stay on it even on an AMX CPU (tests/test_gemm_amx.py)."""
    monkeypatch.setattr(gemm_amx, "use", lambda qtype, T: False)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_out,n_blocks,T", [(37, 1, 17), (64, 3, 6), (35, 2, 41)])
def test_int8_gemm_exact_against_quantized_activations(qtype, n_out, n_blocks, T):
    """Odd and even row and token counts (the micro-kernel takes _MR x _MT), several blocks per row: a wrong scale,
    offset, code or block order shows up far above float32 rounding."""
    n_in = 256 * n_blocks
    raw, W = make_weights(qtype, n_out, n_in, seed=5 * n_out + n_blocks)
    X = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
    Y = np.full((T, n_out), np.nan, np.float32)
    gemm_i8.matmul_i8(raw, qtype, n_in, X, Y)
    assert rel_err(Y, quantize_activations(X) @ W.T) < 1e-5, qtype
    # and within quantization tolerance of the float product
    assert rel_err(Y, X.astype(np.float64) @ W.T) < 2e-2


# the bytes of a block that hold its codes (and high bits): set to 0xFF, every code is at its largest
CODE_BYTES = {"Q4_0": slice(2, 18), "Q4_1": slice(4, 20), "Q5_0": slice(2, 22), "Q5_1": slice(4, 24),
              "Q8_0": slice(2, 34), "Q4_K": slice(16, 144), "Q5_K": slice(16, 176), "Q6_K": slice(0, 192)}


def extreme_weights(qtype: str, n_out: int, n_in: int):
    """make_weights' rows with every code byte (and high bit) at 0xFF: (raw, W float64 dequantized by gguf-py)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from edgeq.formats.quants import QTYPES

    raw, _ = make_weights(qtype, n_out, n_in, seed=3)
    blocks = raw.copy().reshape(n_out, -1, QTYPES[qtype].block_bytes)
    blocks[:, :, CODE_BYTES[qtype]] = 0xFF
    raw = blocks.reshape(-1)
    return raw, dequantize(raw.reshape(n_out, -1), GGMLQuantizationType[qtype]).astype(np.float64)


@pytest.mark.parametrize("qtype", TYPES)
def test_int8_gemm_at_the_extreme_codes(qtype):
    """Without 512-bit VNNI the micro-kernel adds several k-groups' byte products in int16 before widening them
    (gemm_i8._per16): with every weight code at its largest against activations of +-127 (rows of +1, of -1, and
    mixed signs), no sum overflows (the numpy twin agrees)."""
    n_out, n_in, T = 20, 512, 9
    raw, W = extreme_weights(qtype, n_out, n_in)
    X = np.ones((T, n_in), np.float32)
    X[1] = -1.0
    X[2:] = np.random.default_rng(1).choice([-1.0, 1.0], size=(T - 2, n_in))
    Y = np.full((T, n_out), np.nan, np.float32)
    gemm_i8.matmul_i8(raw, qtype, n_in, X, Y)
    assert rel_err(Y, quantize_activations(X) @ W.T) < 1e-5, qtype


@pytest.mark.skipif(not gemm_i8.UNPACK16, reason="the 16-row unpack needs 512-bit VNNI (AVX-512 gathers)")
@pytest.mark.parametrize("qtype", sorted(gemm_i8.UNPACK16))
@pytest.mark.parametrize("n_out", [5, 16, 37, 64])
def test_sixteen_row_unpack_equals_the_row_by_row_one(qtype, n_out):
    """The tiles unpacked 16 rows at a time by gathers (_unpack16) give the same products, bit for bit, as the
    scalar unpack of one row at a time (the driver specialized with gather=False): every code, scale and offset of every
    row, including a last tile with fewer than 16 (or 32) rows and extreme codes in some blocks."""
    from edgeq.formats.quants import QTYPES

    q = QTYPES[qtype]
    n_in = 512
    raw, _ = make_weights(qtype, n_out, n_in, seed=n_out)
    blocks = raw.copy().reshape(n_out, -1, q.block_bytes)
    blocks[::3, 1, CODE_BYTES[qtype]] = 0xFF
    raw = blocks.reshape(-1)
    scalar = gemm_i8._specialize(qtype, gather=False)  # the same driver, its tiles unpacked row by row
    X = np.random.default_rng(n_out).standard_normal((7, n_in)).astype(np.float32)
    qx, dx, xs = gemm_i8.quantized_activations(X)
    Y, Y_ref = np.full((7, n_out), np.nan, np.float32), np.full((7, n_out), np.nan, np.float32)
    gemm_i8.matmul_i8(raw, qtype, n_in, X, Y)
    scalar(raw, n_in, qx, dx, xs, Y_ref)
    assert np.array_equal(Y, Y_ref), qtype


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("min_weights", [0, 1 << 30])
def test_quant_linear_prefill_takes_the_int8_path_for_the_chosen_types(qtype, min_weights, monkeypatch):
    """The int8 GEMM for the types of INT8_GEMM and matrices of at least INT8_MIN_WEIGHTS, else float tiles
    (exact against the unquantized activations)."""
    monkeypatch.setattr(gemm_i8, "INT8_MIN_WEIGHTS", min_weights)
    n_out, n_in, T = 19, 512, 2 * _GEMM_MIN_T + 1
    raw, W = make_weights(qtype, n_out, n_in, seed=11)
    q = QuantLinear(raw, qtype, (n_out, n_in))
    X = np.random.default_rng(0).standard_normal((T, n_in)).astype(np.float32)
    int8 = qtype in gemm_i8.INT8_GEMM and min_weights == 0
    Y = q.matmul(X)
    assert (rel_err(Y, quantize_activations(X) @ W.T) < 1e-5) == int8
    assert rel_err(Y, X.astype(np.float64) @ W.T) < (2e-2 if int8 else 1e-5)


def test_matrices_sharing_a_prompt_quantize_its_activations_once(monkeypatch):
    """Q/K/V or gate/up at prefill (linear.matmul_many): one activation quantization for every matrix on the int8
    GEMM, and each product the same as the matrix's own matmul."""
    monkeypatch.setattr(gemm_i8, "INT8_MIN_WEIGHTS", 0)
    n_in, T = 512, 2 * _GEMM_MIN_T + 3
    qs = [QuantLinear(make_weights(qt, n_out, n_in, seed=n_out)[0], qt, (n_out, n_in))
          for qt, n_out in (("Q4_K", 40), ("Q4_K", 17), ("Q6_K", 33))]
    X = np.random.default_rng(7).standard_normal((T, n_in)).astype(np.float32)
    calls = []
    quantize = gemm_i8.quantize_act
    monkeypatch.setattr(gemm_i8, "quantize_act", lambda *a: calls.append(1) or quantize(*a))
    ys = matmul_many(qs, X)
    assert len(calls) == 1
    for q, y in zip(qs, ys):
        np.testing.assert_array_equal(y, q.matmul(X))
    assert len(calls) == 1 + len(qs)  # each matmul alone quantizes its own


@pytest.mark.parametrize("T", [2, 5, 8])
def test_decode_batches_keep_the_integer_row_kernels(T):
    """The server's batched decode (a few rows) goes through matmul_rows_many: exact on quantized activations."""
    raw, W = make_weights("Q4_K", 21, 512, seed=3)
    q = QuantLinear(raw, "Q4_K", (21, 512))
    X = np.random.default_rng(T).standard_normal((T, 512)).astype(np.float32)
    (Y,) = matmul_rows_many([q], X)
    assert rel_err(Y, quantize_activations(X, act_group("Q4_K")) @ W.T) < 1e-5


def test_activation_padding_rows_are_zero():
    X = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    qx, dx, xs = gemm_i8.quantized_activations(X)
    assert qx.shape == (4, 64) and dx.shape == (4, 2) and xs.shape == (4, 4)
    assert not qx[3].any() and not dx[3].any() and not xs[3].any()
    codes = qx[:3].astype(np.float64) * np.repeat(dx[:3], 32, axis=1)
    np.testing.assert_allclose(codes, quantize_activations(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(xs[:3], codes.reshape(3, 4, 16).sum(axis=2), rtol=1e-5, atol=1e-6)
