"""cpu_kernels/ops.py against numpy twins written independently here, on odd shapes."""
import math

import numpy as np
import pytest

from edgeq.cpu_kernels import ops

rng = np.random.default_rng(0)


def np_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, pos, base, n_rot, neox):
    x = x.astype(np.float64).copy()
    half = n_rot // 2
    inv = base ** (-np.arange(half) * 2.0 / n_rot)
    for t, p in enumerate(pos):
        ang = p * inv
        c, s = np.cos(ang), np.sin(ang)
        if neox:
            a, b = x[t, :, :half].copy(), x[t, :, half:n_rot].copy()
            x[t, :, :half], x[t, :, half:n_rot] = a * c - b * s, a * s + b * c
        else:
            a, b = x[t, :, 0:n_rot:2].copy(), x[t, :, 1:n_rot:2].copy()
            x[t, :, 0:n_rot:2], x[t, :, 1:n_rot:2] = a * c - b * s, a * s + b * c
    return x


def np_attention(q, k, v, pos0, scale, window):
    T, H, D = q.shape
    rep = H // k.shape[0]
    out = np.zeros((T, H, D))
    for t in range(T):
        p = pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(H):
            kk = k[h // rep, lo:p + 1].astype(np.float64)
            s = kk @ q[t, h] * scale
            w = np.exp(s - s.max())
            w /= w.sum()
            out[t, h] = w @ v[h // rep, lo:p + 1]
    return out


@pytest.mark.parametrize("shape", [(1, 7), (3, 576), (5, 2, 33)])
def test_rmsnorm(shape):
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-6), np_rmsnorm(x, w, 1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("T,H,D,n_rot", [(1, 1, 8, 8), (5, 3, 64, 64), (3, 2, 20, 12)])
def test_rope(neox, T, H, D, n_rot):
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    pos = np.arange(7, 7 + T)
    want = np_rope(x, pos, 10000.0, n_rot, neox)
    got = ops.rope(x.copy(), pos, ops.rope_inv_freq(n_rot, 10000.0), neox)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,H,Hkv,D,pos0,window", [(1, 9, 3, 64, 20, 0), (7, 4, 1, 33, 0, 0), (5, 4, 2, 16, 30, 8),
                                                   (1, 2, 2, 8, 0, 0), (13, 6, 3, 5, 3, 4)])
def test_attention(T, H, Hkv, D, pos0, window):
    ctx = pos0 + T + 3
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((Hkv, ctx, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, ctx, D)).astype(np.float32)
    scale = 1 / math.sqrt(D)
    got = ops.attention(q, k, v, pos0, scale, window)
    np.testing.assert_allclose(got, np_attention(q, k, v, pos0, scale, window), rtol=1e-4, atol=1e-5)


def test_attention_rejects_positions_outside_cache():
    q = np.zeros((2, 2, 4), np.float32)
    k = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError):
        ops.attention(q, k, k, 3, 1.0)


def test_fast_exp_matches_numpy():
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = ops.fast_exp(x[i])

    x = np.concatenate([np.linspace(-86, 88, 100_001), rng.standard_normal(1000) * 5]).astype(np.float32)
    y = np.empty_like(x)
    apply(x, y)
    # float32 rounding of x * log2(e) alone gives |x| * 6e-8 relative error: 5e-6 at |x| = 88
    small = np.abs(x) < 10
    np.testing.assert_allclose(y[small], np.exp(x[small].astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(y, np.exp(x.astype(np.float64)), rtol=1e-5)
    big = np.array([-1e4, -200, 200, 1e4], np.float32)  # clamped, finite
    apply(big, y[:4])
    assert np.isfinite(y[:4]).all() and y[0] < 1e-37 and y[3] > 1e37


def test_gated_activations():
    g = rng.standard_normal((3, 37)).astype(np.float32) * 3
    g[0, :6] = [0.0, -100.0, 100.0, -1e4, 1e4, 40.0]  # saturated tails stay finite and exact
    u = rng.standard_normal((3, 37)).astype(np.float32)
    gd = g.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(1e4) = inf in the reference: silu -> 0, as it should
        silu = gd / (1 + np.exp(-gd)) * u
    gelu = 0.5 * gd * (1 + np.tanh(math.sqrt(2 / math.pi) * (gd + 0.044715 * gd ** 3))) * u
    for fn, want in ((ops.silu_mul, silu), (ops.gelu_mul, gelu)):
        got = fn(g, u)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # into g itself (what the models' feed-forward does: one (T, n_ff) buffer less): g returned, the same values
        # (a driver of its own: a row's scalar tail past the vector lanes may round its last bit otherwise)
        g2 = g.copy()
        assert fn(g2, u, out=g2) is g2
        np.testing.assert_allclose(g2, got, rtol=1e-6, atol=0)
        out = np.full_like(g, np.nan)
        assert fn(g, u, out=out) is out and np.array_equal(out, got)
        # an `out` that is not a C-contiguous float32 array of g's shape is left alone: a new array comes back
        wrong = np.zeros((3, 74), np.float32)[:, ::2]
        back = fn(g, u, out=wrong)
        assert back is not wrong and np.array_equal(back, got) and not wrong.any()


@pytest.mark.parametrize("rows,n", [(1, 37), (3, 1536), (8, 1537), (16, 640)])
def test_gated_in_place_serial_equals_parallel(rows, n):
    """A decode step's few rows take the serial in-place drivers, a prompt's the parallel ones: the same bits, so a
    sequence decodes alike alone, in a batch and after a prompt chunk."""
    g = rng.standard_normal((rows, n)).astype(np.float32) * 4
    u = rng.standard_normal((rows, n)).astype(np.float32)
    for parallel, serial in ops._IN_PLACE_SERIAL.items():
        a, b = g.copy(), g.copy()
        serial(a, u)
        parallel(b, u)
        assert np.array_equal(a, b)


def test_softmax():
    x = rng.standard_normal((4, 50)).astype(np.float32) * 10
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(ops.softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("norm,rotate,neox", [(True, True, True), (False, True, False), (True, False, True)])
def test_qk_norm_rope_is_the_norms_then_rope(T, norm, rotate, neox):
    """qk_norm_rope: each head of q and k RMSNorm'd (when given weights), then RoPE (when given frequencies), as
    rmsnorm and rope called one after the other, for a decode row and a prompt's rows (its parallel kernel past
    SERIAL_ROWS): within float32 rounding (fastmath may sum a row's squares in another order in another compiled
    kernel, as rmsnorm's own serial and parallel kernels may); the rotation against the numpy twin."""
    rng = np.random.default_rng(T)
    H, Hkv, D = 6, 2, 32
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    qw, kw = (rng.standard_normal(D).astype(np.float32) for _ in range(2))
    pos = np.arange(5, 5 + T)
    inv = ops.rope_inv_freq(D, 10000.0)
    want_q = ops.rmsnorm(q, qw, 1e-6) if norm else q.copy()
    want_k = ops.rmsnorm(k, kw, 1e-6) if norm else k.copy()
    if rotate:
        ops.rope(want_q, pos, inv, neox)
        ops.rope(want_k, pos, inv, neox)
    got_q, got_k = ops.qk_norm_rope(q.copy(), k.copy(), pos, inv if rotate else None, neox,
                                    qw if norm else None, kw if norm else None, 1e-6)
    np.testing.assert_allclose(got_q, want_q, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(got_k, want_k, rtol=2e-6, atol=2e-6)
    if rotate and not norm:
        np.testing.assert_allclose(got_q, np_rope(q, pos, 10000.0, D, neox), rtol=1e-4, atol=1e-5)


def test_qk_norm_rope_refuses_mismatched_shapes():
    q, k = np.zeros((2, 4, 16), np.float32), np.zeros((2, 2, 8), np.float32)
    with pytest.raises(ValueError):
        ops.qk_norm_rope(q, k, np.arange(2), ops.rope_inv_freq(16, 1e4), True)
    with pytest.raises(ValueError):
        ops.qk_norm_rope(q, np.zeros((2, 2, 16), np.float32), np.arange(2), None, True, np.ones(16, np.float32), None)


@pytest.mark.parametrize("T", [1, 40])
def test_add_rmsnorm_is_the_residual_then_the_norm(T):
    """add_rmsnorm: x += o in place, then the same bits as rmsnorm(x), for a decode row and a prompt's rows."""
    rng = np.random.default_rng(T)
    x, o = (rng.standard_normal((T, 96)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(96).astype(np.float32)
    want_x = x + o
    want = ops.rmsnorm(want_x, w, 1e-5)
    got = ops.add_rmsnorm(x, o, w, 1e-5)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        ops.add_rmsnorm(x, o[:, :8], w, 1e-5)
