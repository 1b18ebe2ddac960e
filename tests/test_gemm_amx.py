"""cpu_kernels/gemm_amx.py (prefill on AMX bf16 tiles) against its numpy twin: the activations rounded to bfloat16 by
torch (round to nearest even), the weights dequantized by gguf-py and rounded the same way, a float64 product. The
products run only on a CPU with AMX (the rest of the suite then takes them in every long prefill); the fallback and
the refusals run everywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.cpu_kernels import gemm_amx, gemm_i8
from edgeq.cpu_kernels.linear import QuantLinear, matmul_many
from test_linear import make_weights, quantize_activations, rel_err

amx = pytest.mark.skipif(not gemm_amx.ready(), reason="no AMX tiles on this CPU (or EDGEQ_AMX=0)")
TYPES = sorted(gemm_amx.TYPES)


def bf16(a: np.ndarray) -> np.ndarray:
    """float64 values of `a` rounded to bfloat16 by torch."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(torch.bfloat16).to(torch.float64).numpy()


@pytest.mark.parametrize("T", [1, 16, 33, 64])
def test_activation_tiles_are_torchs_bfloat16_in_tile_order(T):
    X = np.random.default_rng(T).standard_normal((T, 96)).astype(np.float32) * 10.0 ** np.arange(-3, 3).repeat(16)
    X[0, :4] = [0.0, -0.0, 1e-40, 3.0e38]  # zero, negative zero, a subnormal, near the largest float
    xa = gemm_amx.to_bf16(X)
    assert xa.shape == (-(-T // 32) * 2, 3, 16, 32) and xa.ctypes.data % 64 == 0
    bits = torch.from_numpy(X).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    rows = xa.transpose(0, 2, 1, 3).reshape(-1, 96)
    np.testing.assert_array_equal(rows[:T], bits)
    assert not rows[T:].any()  # padding rows are zeros
    np.testing.assert_array_equal(gemm_amx.from_bf16(xa, T), bf16(X).astype(np.float32))


@amx
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_out,n_blocks,T", [(37, 1, 40), (64, 3, 64), (35, 2, 71), (96, 1, 97)])
def test_amx_gemm_equals_the_bf16_twin(qtype, n_out, n_blocks, T):
    """Row and token counts on and off the 32 x 32 blocks (whole blocks go straight to the output, the others through
    a buffer), several 256-weight blocks a row: a wrong pair order, scale, offset or tile address shows up far above
    float32 rounding; and the product stays within quantization error of the float one."""
    n_in = 256 * n_blocks
    raw, W = make_weights(qtype, n_out, n_in, seed=5 * n_out + n_blocks)
    X = np.random.default_rng(T).standard_normal((T, n_in)).astype(np.float32)
    Y = np.full((T, n_out), np.nan, np.float32)
    assert gemm_amx.use(qtype, T)
    gemm_i8.matmul_i8(raw, qtype, n_in, X, Y)
    assert rel_err(Y, bf16(X) @ bf16(W).T) < 1e-5, qtype
    assert rel_err(Y, X.astype(np.float64) @ W.T) < 1e-2


@amx
@pytest.mark.parametrize("qtype", TYPES)
def test_amx_gemm_at_the_extreme_codes(qtype):
    """Every code at its largest, activations of +-1 and large magnitudes: float32 sums, no overflow or lost row."""
    from test_gemm_i8 import extreme_weights

    n_out, n_in, T = 40, 512, 48
    raw, W = extreme_weights(qtype, n_out, n_in)
    X = np.random.default_rng(1).choice([-1.0, 1.0, 3e4, -3e4], size=(T, n_in)).astype(np.float32)
    Y = np.full((T, n_out), np.nan, np.float32)
    gemm_i8.matmul_i8(raw, qtype, n_in, X, Y)
    assert np.isfinite(Y).all()
    assert rel_err(Y, bf16(X) @ bf16(W).T) < 1e-5, qtype


@amx
def test_matrices_sharing_a_prompt_round_it_once():
    """Q/K/V or gate/up (linear.matmul_many): one bf16 rounding for the matrices on the tiles, one int8 quantization
    for a Q8_0 one beside them (it stays on the int8 kernel), each product the same as the matrix's own."""
    n_in, T = 512, gemm_amx.MIN_T + 9
    qs = [QuantLinear(make_weights(qt, n_out, n_in, seed=n_out)[0], qt, (n_out, n_in))
          for qt, n_out in (("Q4_K", 40), ("Q6_K", 33), ("Q8_0", 17))]
    X = np.random.default_rng(7).standard_normal((T, n_in)).astype(np.float32)
    calls = {"bf16": 0, "int8": 0}
    rnd, qnt = gemm_amx._round_tiles, gemm_i8.quantize_act
    try:
        gemm_amx._round_tiles = lambda *a: calls.__setitem__("bf16", calls["bf16"] + 1) or rnd(*a)
        gemm_i8.quantize_act = lambda *a: calls.__setitem__("int8", calls["int8"] + 1) or qnt(*a)
        ys = matmul_many(qs, X)
        assert calls == {"bf16": 1, "int8": 1}
        for q, y in zip(qs, ys):
            np.testing.assert_array_equal(y, q.matmul(X))
    finally:
        gemm_amx._round_tiles, gemm_i8.quantize_act = rnd, qnt
    W8 = make_weights("Q8_0", 17, n_in, seed=17)[1]
    assert rel_err(ys[2], quantize_activations(X) @ W8.T) < 1e-5  # Q8_0: the int8 kernel's exact twin


def test_short_prompts_q8_0_and_a_refusing_cpu_stay_on_the_int8_kernel(monkeypatch):
    """Below MIN_T rows, for Q8_0, and where the tiles are not lent (EDGEQ_AMX=0, no AMX, a refused arch_prctl):
    gemm_i8's vpdpbusd kernel, exact against its int8 twin; and the AMX driver refuses to run rather than fault."""
    assert not gemm_amx.use("Q4_K", gemm_amx.MIN_T - 1) and not gemm_amx.use("Q8_0", 500)
    monkeypatch.setattr(gemm_amx, "ready", lambda: False)
    assert not gemm_amx.use("Q4_K", 500)
    n_in, T = 512, 70
    raw, W = make_weights("Q4_K", 20, n_in, seed=2)
    X = np.random.default_rng(2).standard_normal((T, n_in)).astype(np.float32)
    Y = np.empty((T, 20), np.float32)
    gemm_i8.matmul_i8(raw, "Q4_K", n_in, X, Y)
    assert rel_err(Y, quantize_activations(X) @ W.T) < 1e-5
    with pytest.raises(RuntimeError, match="not available"):
        gemm_amx.matmul(raw, "Q4_K", n_in, gemm_amx.to_bf16(X), Y)


def test_the_switch_and_the_cpu_check(tmp_path):
    """EDGEQ_AMX=0 turns the tiles off before any arch_prctl; /proc/cpuinfo without amx flags means no AMX."""
    import os
    import platform
    import subprocess
    import sys

    code = ("from edgeq.cpu_kernels import gemm_amx; "
            "print(gemm_amx.ready(), gemm_amx.use('Q4_K', 500))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EDGEQ_AMX": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr[-2000:]
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return  # cpu_has_amx is False without reading anything
    flags = "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    for text, want in ((flags, True), (flags.replace(" amx_bf16", ""), False), ("processor : 0\n", False)):
        (tmp_path / "cpuinfo").write_text(text)
        assert gemm_amx.cpu_has_amx(str(tmp_path / "cpuinfo")) is want
    assert not gemm_amx.cpu_has_amx(str(tmp_path / "missing"))
