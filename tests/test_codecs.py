"""formats/quants.py (and the searches in formats/kquant_search.py) against independent oracles:
gguf-py's numpy codecs (bit-exact dequantization, byte-exact reference quantizers), llama.cpp's
ggml_quantize_chunk when its library is installed, and round-trip error bounds on gaussian data."""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgeq.formats.quants import QTYPES, block_bytes, block_size, dequantize, quantize, row_bytes

ALL = list(QTYPES)
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# types llama.cpp quantizes with an importance-aware search when given an imatrix
WITH_IMPORTANCE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"] + KQUANTS + ["IQ4_NL", "IQ4_XS"]
# gguf-py implements these quantizers, as llama.cpp's reference (no importance) formulas
GGUF_QUANTIZERS = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# byte offsets of the fp16 scales inside a block (random bytes there could be inf/nan)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
# relative RMSE of quantize -> dequantize on standard gaussian data, as measured (byte-identical to
# llama.cpp's ggml_quantize_chunk) with ~5% headroom
REL_RMSE = {"F32": 0.0, "F16": 3e-4, "BF16": 2e-3, "Q8_0": 0.006, "Q8_K": 0.0075, "Q4_0": 0.091, "Q4_1": 0.082,
            "Q5_0": 0.045, "Q5_1": 0.040, "Q2_K": 0.31, "Q3_K": 0.159, "Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.0187,
            "IQ4_NL": 0.080, "IQ4_XS": 0.081}


def gaussian(rows=64, cols=1024, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for n_blocks blocks, with finite fp16 scales (float types: any bit pattern)."""
    rng = np.random.default_rng(seed)
    q = QTYPES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, q.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, ()):
        raw[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == "Q8_K":
        raw[:, :4] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float32).view(np.uint8).reshape(-1, 4)
    return raw


# ---------------------------------------------------------------- registry

def test_registry_matches_gguf_constants():
    assert set(ALL) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS"}
    for name, q in QTYPES.items():
        t = GGMLQuantizationType[name]
        assert q.name == name and q.type_id == int(t)
        assert (q.block_size, q.block_bytes) == GGML_QUANT_SIZES[t]
        assert (block_size(name), block_bytes(name)) == GGML_QUANT_SIZES[t]
        assert callable(q.quantize_blocks) and callable(q.dequantize_blocks)
    assert row_bytes("Q4_K", 1536) == 6 * 144
    assert row_bytes("F16", 7) == 14


def test_unknown_type_is_named():
    for call in (lambda: block_size("Q9_X"), lambda: block_bytes("Q9_X"), lambda: row_bytes("Q9_X", 256),
                 lambda: quantize(gaussian(1, 256), "Q9_X"), lambda: dequantize(np.zeros(4, np.uint8), "Q9_X", (1,))):
        with pytest.raises(ValueError, match="Q9_X"):
            call()


# ---------------------------------------------------------------- dequantize: bit-exact with gguf-py

@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_random_blocks_bit_exact(qtype):
    q = QTYPES[qtype]
    raw = random_blocks(qtype, 3000)
    n = raw.shape[0] * q.block_size
    got = dequantize(raw, qtype, (n // 64, 64) if n % 64 == 0 else (n,))
    assert got.dtype == np.float32
    if qtype == "Q8_K":  # not in gguf-py: block_q8_K is d (float32) * qs (int8)
        d = raw[:, :4].copy().view(np.float32)
        ref = raw[:, 4:260].view(np.int8).astype(np.float32) * d
    else:
        ref = gguf_dequantize(raw, GGMLQuantizationType[qtype])
    assert same_bits(got.reshape(-1), np.asarray(ref).reshape(-1))
    # also through the block method, and from a flat (any shape) byte buffer
    assert same_bits(q.dequantize_blocks(raw).reshape(-1), got.reshape(-1))
    assert same_bits(dequantize(raw.reshape(-1), qtype, (n,)), got.reshape(-1))


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_dequantize_real_files_bit_exact(fixture, request):
    from edgeq.formats.gguf_file import GGUFFile     # (gguf.GGUFReader parses the same, ~50x slower to open)

    seen = set()
    with GGUFFile(request.getfixturevalue(fixture)) as gf:
        for t in gf.tensors.values():
            raw = t.data.reshape(-1, row_bytes(t.qtype, t.shape[-1]))
            if raw.shape[0] > 4096:     # the embedding tables: their first and last rows (keeps the test short)
                raw = np.concatenate([raw[:2048], raw[-2048:]])
            shape = (raw.shape[0], t.shape[-1])
            got = dequantize(raw, t.qtype, shape)
            ref = gguf_dequantize(raw, GGMLQuantizationType[t.qtype])
            assert same_bits(got, np.asarray(ref).reshape(shape)), t.name
            seen.add(t.qtype)
    assert seen & {"Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q6_K"}


def test_dequantize_wrong_byte_count():
    raw = quantize(gaussian(2, 256), "Q4_K")
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw[:, :-1].copy(), "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, "Q4_K", (3, 256))
    with pytest.raises(ValueError, match="block size"):
        dequantize(raw, "Q4_K", (2, 100))


# ---------------------------------------------------------------- quantize

@pytest.mark.parametrize("qtype", GGUF_QUANTIZERS)
def test_quantize_matches_gguf_bytes(qtype):
    x = gaussian(32, 512, seed=1)
    x[0, :64] = 0.0                      # an all-zero block
    x[1, :32] = 3.5                      # a constant block
    ref = np.ascontiguousarray(gguf_quantize(x, GGMLQuantizationType[qtype])).view(np.uint8)
    got = quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == (32, row_bytes(qtype, 512))
    assert np.array_equal(got, ref.reshape(got.shape))


@pytest.mark.parametrize("qtype", ALL)
def test_round_trip_error(qtype):
    x = gaussian()
    got = dequantize(quantize(x, qtype), qtype, x.shape)
    rel = np.sqrt(np.mean((got - x) ** 2) / np.mean(x ** 2))
    assert rel <= REL_RMSE[qtype]


def _naive(x: np.ndarray, group: int, levels: int, symmetric: bool) -> np.ndarray:
    """Min/max (or absmax) quantizer of the same structure with exact float32 scales."""
    b = x.reshape(-1, group)
    if symmetric:
        m = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
        d = m / -(levels // 2)
        q = np.clip(np.rint(b / d), -(levels // 2), levels // 2 - 1) * d
    else:
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d = (hi - lo) / (levels - 1)
        q = np.clip(np.rint((b - lo) / d), 0, levels - 1) * d + lo
    return q.reshape(x.shape)


@pytest.mark.parametrize("qtype, group, levels, symmetric", [
    ("Q2_K", 16, 4, False), ("Q3_K", 16, 8, True), ("Q4_K", 32, 16, False), ("Q5_K", 32, 32, False),
    ("Q6_K", 16, 64, True)])
def test_kquants_beat_naive_minmax(qtype, group, levels, symmetric):
    x = gaussian(seed=2)
    err = np.mean((dequantize(quantize(x, qtype), qtype, x.shape) - x) ** 2)
    naive = np.mean((_naive(x, group, levels, symmetric) - x) ** 2)
    assert err < 0.985 * naive


def test_iq4_search_beats_plain_table_scale():
    """IQ4_NL with the scale searched (llama.cpp's 15 candidates, refined) beats the one-shot scale
    d = absmax / 127 with every value snapped to its nearest table level."""
    from edgeq.formats.quants import KVALUES_IQ4NL

    x = gaussian(seed=2)
    b = x.reshape(-1, 32)
    d = np.abs(b).max(1, keepdims=True) / 127
    table = KVALUES_IQ4NL.astype(np.float32)
    naive = table[np.abs(b[:, :, None] / d[:, :, None] - table).argmin(2)] * d
    err = np.mean((dequantize(quantize(x, "IQ4_NL"), "IQ4_NL", x.shape) - x) ** 2)
    assert err < 0.95 * np.mean((naive.reshape(x.shape) - x) ** 2)


@pytest.mark.parametrize("qtype", WITH_IMPORTANCE)
def test_importance_lowers_weighted_error(qtype):
    rng = np.random.default_rng(3)
    x = gaussian(64, 1024, seed=3)
    importance = np.full(1024, 0.05, np.float32)
    importance[rng.choice(1024, 24, replace=False)] = 50.0
    def werr(imp):
        xq = dequantize(quantize(x, qtype, imp), qtype, x.shape)
        return float((importance * (x - xq) ** 2).sum())
    assert werr(importance) < 0.9 * werr(None)


def test_importance_of_ones_is_close_to_plain():
    x = gaussian(16, 1024, seed=4)
    for qtype in ("Q4_K", "Q6_K", "Q4_0"):
        plain = np.mean((dequantize(quantize(x, qtype), qtype, x.shape) - x) ** 2)
        ones = np.mean((dequantize(quantize(x, qtype, np.ones(1024, np.float32)), qtype, x.shape) - x) ** 2)
        assert ones < 1.1 * plain


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="row length 300 is not a multiple of the Q4_K block size 256"):
        quantize(gaussian(2, 300), "Q4_K")
    with pytest.raises(ValueError, match="block size 32"):
        quantize(gaussian(2, 48), "Q8_0")
    x = gaussian(2, 256)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[1, 7] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize(y, "Q4_K")
    with pytest.raises(ValueError, match="importance"):
        quantize(x, "Q4_K", np.ones(128, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros((2, 2, 256), np.float32), "Q8_0")


def test_quantize_edge_values_round_trip():
    x = np.zeros((6, 256), np.float32)
    x[1] = 0.25                                            # constant
    x[2] = -np.abs(gaussian(1, 256, seed=5)[0])            # all negative
    x[3, 5] = 7.0                                          # one spike
    x[4] = gaussian(1, 256, seed=6)[0] * 3e-4              # small (fp16 subnormal scales)
    x[5] = gaussian(1, 256, seed=7)[0] * 300.0             # large
    for qtype in ALL:
        for imp in (None, np.linspace(0, 2, 256, dtype=np.float32)):
            xq = dequantize(quantize(x, qtype, imp), qtype, x.shape)
            assert np.isfinite(xq).all(), qtype
            assert not xq[0].any(), qtype
            scale = np.abs(x).max(axis=1, keepdims=True)
            assert (np.abs(xq - x) <= 0.5 * scale + 1e-12).all(), qtype


def test_fp16_rounding_helper_matches_numpy():
    from edgeq.formats.kquant_search import _fp16

    rng = np.random.default_rng(8)
    vals = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 6.1e-5,
         1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, np.inf, -np.inf]]).astype(np.float32)
    with np.errstate(over="ignore"):
        ref = vals.astype(np.float16)
    for v, r in zip(vals, ref):
        bits, val = _fp16(v)
        assert bits == int(r.view(np.uint16)), v
        assert np.float32(val).view(np.uint32) == np.float32(r).view(np.uint32), v


# ---------------------------------------------------------------- llama.cpp itself, when installed

def _llamacpp_quantize_chunk():
    libs = [lib for venv in ("edgeq-llamacpp-noamx", "edgeq-llamacpp")   # quantizing needs no AMX kernel
            for lib in glob.glob(os.path.expanduser(f"~/.cache/{venv}/lib/python3*/site-packages/llama_cpp/lib/"
                                                    "libggml-base.so"))]
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def run(x, qtype, importance=None):
        t = int(GGMLQuantizationType[qtype])
        out = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), np.uint8)
        lib.ggml_quantize_init(t)
        fn(t, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
           None if importance is None else importance.ctypes.data)
        return out
    return run


@pytest.mark.parametrize("qtype", ["Q8_0"] + WITH_IMPORTANCE)
def test_bytes_equal_llamacpp(qtype):
    llama = _llamacpp_quantize_chunk()
    if llama is None:
        pytest.skip("llama-cpp-python (~/.cache/edgeq-llamacpp[-noamx]) not installed")
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((24, 512)) * 0.02).astype(np.float32)
    x[:, :5] *= 40.0                                     # outlier columns, as in real weights
    x[0] = 0.0
    importance = (rng.random(512) ** 4 * 10).astype(np.float32)
    for imp in (None, importance):
        assert np.array_equal(quantize(x, qtype, imp), llama(x, qtype, imp)), (qtype, imp is not None)
