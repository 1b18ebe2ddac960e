"""CUDA kernels (gpu_kernels/) against numpy twins, under numba-cuda's simulator unless asked otherwise.

The simulator is chosen when `numba.cuda` is first imported (NUMBA_ENABLE_CUDASIM): tests/_cuda_sim.py sets
the variable, imports numba.cuda, and puts the variable back, so the CPU kernels and any subprocess are
unaffected. If something imported numba.cuda earlier without the simulator and there is no GPU, the kernel tests skip and
`test_in_simulator_subprocess` runs this file again in a fresh process with the simulator on.
EDGEQ_CUDA_TESTS=gpu runs the kernels on the real GPU instead. Shapes are tiny and odd: the simulator
runs each CUDA thread as a Python thread.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from _cuda_sim import import_numba_cuda, rerun_in_simulator

device = import_numba_cuda()

from numba import cuda  # noqa: E402  (the simulator swaps module globals named `cuda` inside kernels)

from edgeq.gpu_kernels.linear import f16_to_f32  # noqa: E402


@cuda.jit
def _decode_f16(b, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = f16_to_f32(b[2 * i], b[2 * i + 1])


needs_device = pytest.mark.skipif(not device.available(), reason="numba.cuda was imported without the "
                                  "simulator and there is no GPU (see test_in_simulator_subprocess)")
T = 16  # threads per block in the simulator: small keeps it fast, >1 exercises the reductions

F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}


def random_raw(rng, qtype, n_out, n_in):
    """Random block bytes (every bit pattern of the quants) with sane f16 scales in the scale fields."""
    from edgeq.gpu_kernels.linear import QTYPE_BLOCKS

    if qtype in ("F16", "F32"):
        dtype = np.float16 if qtype == "F16" else np.float32
        return rng.standard_normal((n_out, n_in)).astype(dtype).view(np.uint8)
    block_elems, block_bytes = QTYPE_BLOCKS[qtype]
    raw = rng.integers(0, 256, (n_out, n_in // block_elems, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(raw.shape[:2] + (2,))
    return raw.reshape(n_out, -1)


def dequant_ref(raw, qtype, shape):
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(shape).astype(np.float32)


# ---------------------------------------------------------------- matrix products
@needs_device
@pytest.mark.parametrize("qtype,n_in", [("F32", 45), ("F16", 45), ("Q8_0", 96), ("Q4_0", 96), ("Q4_1", 64),
                                        ("Q5_0", 96), ("Q5_1", 64), ("Q4_K", 512), ("Q5_K", 256), ("Q6_K", 512)])
def test_matmul_matches_gguf_dequantize(qtype, n_in):
    from edgeq.gpu_kernels.linear import CudaLinear

    rng = np.random.default_rng(sum(qtype.encode()))
    n_out, tokens = 3, 2
    raw = random_raw(rng, qtype, n_out, n_in)
    W = dequant_ref(raw, qtype, (n_out, n_in))
    X = rng.standard_normal((tokens, n_in)).astype(np.float32)
    lin = CudaLinear(raw.reshape(-1), qtype, (n_out, n_in), threads=T)
    ref = X.astype(np.float64) @ W.T.astype(np.float64)
    tol = 1e-5 * np.abs(X).sum(1, keepdims=True) * np.abs(W).max()  # float32 summation order differs
    assert np.all(np.abs(lin.matmul_host(X) - ref) <= tol)
    np.testing.assert_allclose(lin.matvec_host(X[1]), ref[1], rtol=0, atol=float(tol[1, 0]))


@needs_device
def test_matvec_on_device_arrays():
    from edgeq.gpu_kernels.linear import CudaLinear

    rng = np.random.default_rng(1)
    raw = random_raw(rng, "Q8_0", 5, 64)
    lin = CudaLinear(raw, "Q8_0", (5, 64), threads=T)
    x = rng.standard_normal(64).astype(np.float32)
    d_out = device.device_empty(5)
    lin.matvec(device.to_device(x), d_out)
    np.testing.assert_allclose(d_out.copy_to_host(), dequant_ref(raw, "Q8_0", (5, 64)) @ x, rtol=1e-5, atol=1e-4)
    assert lin.nbytes == raw.size  # kept as raw block bytes


@needs_device
@pytest.mark.parametrize("qtype,n_in", [("IQ4_NL", 64), ("IQ4_XS", 256)])
def test_types_without_a_kernel_are_dequantized_at_upload(qtype, n_in):
    from edgeq.formats.quants import QTYPES
    from edgeq.gpu_kernels.forward import upload_matrix

    rng = np.random.default_rng(2)
    q = QTYPES[qtype]
    raw = rng.integers(0, 256, (3, n_in // q.block_size, q.block_bytes), dtype=np.uint8)
    raw[..., 0:2] = (rng.standard_normal((3, n_in // q.block_size, 1)) * 0.05).astype(np.float16).view(np.uint8)
    raw = raw.reshape(-1)
    lin = upload_matrix(raw, qtype, (3, n_in), threads=T)
    assert lin.qtype == "F16"
    W = dequant_ref(raw.reshape(3, -1), qtype, (3, n_in)).astype(np.float16).astype(np.float64)
    x = rng.standard_normal(n_in).astype(np.float32)
    np.testing.assert_allclose(lin.matvec_host(x), W @ x, rtol=1e-4, atol=1e-3)


def test_linear_rejects_bad_shapes():
    from edgeq.gpu_kernels.linear import CudaLinear

    with pytest.raises(ValueError, match="multiple"):
        CudaLinear(np.zeros(3 * 34, np.uint8), "Q4_K", (3, 32))
    with pytest.raises(ValueError, match="bytes"):
        CudaLinear(np.zeros(10, np.uint8), "Q8_0", (3, 32))
    with pytest.raises(ValueError, match="no CUDA kernel"):
        CudaLinear(np.zeros(10, np.uint8), "Q2_K", (1, 256))


@needs_device
def test_f16_bit_decoding():
    special = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x8001]
    rng = np.random.default_rng(2)
    bits = np.array(special + list(rng.integers(0, 2**16, 52)), dtype=np.uint16)
    out = np.zeros(bits.size, np.float32)
    _decode_f16[2, 32](bits.view(np.uint8), out)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float32))  # NaN == NaN here


# ---------------------------------------------------------------- ops: numpy twins
def rmsnorm_ref(x, w, eps):
    return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w


def rope_ref(x, pos, inv_freq, neox):
    x = x.astype(np.float64).copy()
    half = inv_freq.size
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half], x[..., half:2 * half] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    return x


def attention_ref(q, kc, vc, pos0, scale, window):
    T, H, D = q.shape
    rep = H // kc.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        p = pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(H):
            s = kc[h // rep, lo:p + 1] @ q[t, h] * scale
            e = np.exp(s - s.max())
            out[t, h] = e / e.sum() @ vc[h // rep, lo:p + 1]
    return out


@needs_device
def test_rmsnorm():
    from edgeq.gpu_kernels import ops

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    d_x = device.to_device(x)
    ops.rmsnorm(d_x, device.to_device(w), 1e-6, d_x, threads=T)  # in place
    np.testing.assert_allclose(d_x.copy_to_host(), rmsnorm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@needs_device
@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox):
    from edgeq.cpu_kernels.ops import rope_inv_freq
    from edgeq.gpu_kernels import ops

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 10)).astype(np.float32)
    pos = np.array([0, 7, 300], dtype=np.int32)
    inv = rope_inv_freq(8, 10000.0)  # partial rotation: the last 2 dims stay
    d_x = device.to_device(x)
    ops.rope(d_x, device.to_device(pos), device.to_device(inv), neox, threads=4)
    np.testing.assert_allclose(d_x.copy_to_host(), rope_ref(x, pos, inv, neox), rtol=1e-4, atol=1e-4)


@needs_device
@pytest.mark.parametrize("window", [0, 3])
def test_attention_gqa(window):
    from edgeq.gpu_kernels import ops

    rng = np.random.default_rng(5)
    T, H, H_kv, D, ctx, pos0 = 3, 4, 2, 12, 11, 6
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    kc = rng.standard_normal((H_kv, ctx, D)).astype(np.float32)
    vc = rng.standard_normal((H_kv, ctx, D)).astype(np.float32)
    d_out = device.device_empty((T, H, D))
    # 4 threads over up to 9 keys: several chunks, so the online-softmax rescaling is exercised.
    ops.attention(device.to_device(q), device.to_device(kc), device.to_device(vc), pos0, D ** -0.5, d_out,
                  window=window, threads=4)
    np.testing.assert_allclose(d_out.copy_to_host(), attention_ref(q, kc, vc, pos0, D ** -0.5, window),
                               rtol=1e-4, atol=1e-5)


@needs_device
def test_silu_and_gelu_mul():
    from edgeq.cpu_kernels import ops as cpu_ops
    from edgeq.gpu_kernels import ops

    rng = np.random.default_rng(6)
    g = (rng.standard_normal((3, 37)) * 3).astype(np.float32)
    u = rng.standard_normal((3, 37)).astype(np.float32)
    for gpu_fn, cpu_fn in [(ops.silu_mul, cpu_ops.silu_mul), (ops.gelu_mul, cpu_ops.gelu_mul)]:
        d_out = device.device_empty(g.shape)
        gpu_fn(device.to_device(g), device.to_device(u), d_out, threads=T)
        np.testing.assert_allclose(d_out.copy_to_host(), cpu_fn(g, u), rtol=1e-5, atol=1e-6)


@needs_device
def test_add_add_bias_and_store_kv():
    from edgeq.gpu_kernels import ops

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    y = rng.standard_normal((3, 37)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    d_x = device.to_device(x)
    ops.add(d_x, device.to_device(y), threads=T)
    np.testing.assert_array_equal(d_x.copy_to_host(), x + y)
    ops.add_bias(d_x, device.to_device(b), threads=T)
    np.testing.assert_array_equal(d_x.copy_to_host(), x + y + b)
    k = rng.standard_normal((2, 3, 5)).astype(np.float32)  # (T, H_kv, D) at positions 4, 5
    cache = np.zeros((3, 8, 5), np.float32)
    d_cache = device.to_device(cache)
    ops.store_kv(device.to_device(k), d_cache, 4, threads=4)
    cache[:, 4:6] = k.transpose(1, 0, 2)
    np.testing.assert_array_equal(d_cache.copy_to_host(), cache)


def test_ops_reject_bad_shapes():
    from edgeq.gpu_kernels import ops

    with pytest.raises(ValueError):
        ops.rmsnorm(np.zeros((2, 4), np.float32), np.zeros(3, np.float32), 1e-6, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="outside the cache"):
        z = np.zeros((2, 2, 4), np.float32)
        ops.attention(z, np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32), 1, 1.0, z)
    with pytest.raises(ValueError, match="outside the cache"):
        ops.store_kv(np.zeros((2, 1, 4), np.float32), np.zeros((1, 2, 4), np.float32), 1)
    with pytest.raises(ValueError):
        ops.add_bias(np.zeros((2, 4), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        ops.add(np.zeros((2, 4), np.float32), np.zeros((4, 2), np.float32))


# ---------------------------------------------------------------- when this process cannot simulate
@pytest.mark.skipif(device.available(), reason="the kernels ran in this process")
def test_in_simulator_subprocess():
    rerun_in_simulator(__file__)


def test_kernels_compile_to_ptx():
    """The real CUDA compiler accepts every kernel (needs the NVVM wheel, not a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-m", "edgeq.gpu_kernels.ptx_check", "--cc", "8.0"],
                       env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip() or "NVVM not available")
    assert r.returncode == 0, r.stdout + r.stderr
