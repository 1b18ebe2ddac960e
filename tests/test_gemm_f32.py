"""The float32 GEMM of prefill (cpu_kernels/gemm_f32.py) against numpy: every remainder of its row groups and token
blocks, an output column offset, and the half-float encodings it converts while building its tiles."""
import numpy as np
import pytest

from edgeq.cpu_kernels import gemm_f32 as g


def _halves(w: np.ndarray, kind: str):
    """(the encoding's bits as uint16, the float32 values they hold)."""
    if kind == "F16":
        h = w.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # BF16: the high half, truncated
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("R,n,T", [(1, 8, 1), (5, 64, 3), (31, 40, 7), (33, 96, 9), (100, 128, 17),
                                   (64, 256, 16), (2 * g.TILE_ROWS + 3, 72, 2 * g._MT + 1)])
@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_gemm_matches_numpy(R, n, T, kind):
    rng = np.random.default_rng(R * 1000 + n + T)
    w = rng.standard_normal((R, n)).astype(np.float32)
    X = rng.standard_normal((T, n)).astype(np.float32)
    out = np.full((T, R + 5), 7.0, np.float32)  # columns outside r0..r0+R keep their values
    if kind == "F32":
        g.gemm_f32(w, X, out, 3)
        values = w
    else:
        bits, values = _halves(w, kind)
        g.GEMM_HALF[kind](bits, X, out, 3)
    want = X.astype(np.float64) @ values.T.astype(np.float64)
    np.testing.assert_allclose(out[:, 3:3 + R], want, rtol=0, atol=1e-5 * np.sqrt(n) * np.abs(want).max())
    assert (out[:, :3] == 7).all() and (out[:, 3 + R:] == 7).all()
