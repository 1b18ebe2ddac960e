"""KV cache types and the quantized attention kernels against numpy twins (float64 attention).

Each cache type is checked twice: tightly against attention over the numpy twin of its codec (so the kernel
reads the blocks exactly as stored), and loosely against attention over the original float keys/values
(the codec's own error stays small).
"""
import zlib

import numpy as np
import pytest

from edgeq.cpu_kernels import attention_q as aq
from edgeq.cpu_kernels import half
from edgeq.errors import EdgeqError
from edgeq.runtime.kv_cache import CACHE_TYPES, make_kv_cache

QB = 32


class KVLayout:  # the fields of models.base.KVLayout the cache reads (no model code needed here)
    def __init__(self, n_kv_heads, head_dim, window=0):
        self.n_kv_heads, self.head_dim, self.window = n_kv_heads, head_dim, window


# ---------------------------------------------------------------- numpy twins of the codecs
def f16r(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def twin_q8(x):
    """per token, blocks of 32 along the last axis, symmetric int8 with a half scale"""
    xb = x.reshape(*x.shape[:-1], -1, QB).astype(np.float32)
    d = f16r(np.abs(xb).max(-1, keepdims=True) / np.float32(127))
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    c = np.clip(np.round(xb * inv), -127, 127)
    return (c * d).reshape(x.shape)


def twin_q4(x):
    """per token, blocks of 32 along the last axis, 4-bit asymmetric with half scale and min"""
    xb = x.reshape(*x.shape[:-1], -1, QB).astype(np.float32)
    m = f16r(xb.min(-1, keepdims=True))
    d = f16r((xb.max(-1, keepdims=True) - m) / np.float32(15))
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    c = np.clip(np.round((xb - m) * inv), 0, 15)
    return (c * d + m).reshape(x.shape)


def twin_q4c(x):
    """x (n, Hkv, D) by position: whole groups of 32 positions per channel at 4 bits, the tail in half"""
    x = f16r(x)
    n = x.shape[0]
    full = n // QB * QB
    out = x.copy()
    if full:
        g = x[:full].reshape(-1, QB, *x.shape[1:])
        m = f16r(g.min(1, keepdims=True))
        d = f16r((g.max(1, keepdims=True) - m) / np.float32(15))
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
        c = np.clip(np.round((g - m) * inv), 0, 15)
        out[:full] = (c * d + m).reshape(full, *x.shape[1:])
    return out


def twin_q8c(x):
    """x (n, Hkv, D) by position: whole groups of 32 positions per channel at 8 bits (asymmetric), the tail in
    half"""
    x = f16r(x)
    n = x.shape[0]
    full = n // QB * QB
    out = x.copy()
    if full:
        g = x[:full].reshape(-1, QB, *x.shape[1:])
        m = f16r(g.min(1, keepdims=True))
        d = f16r((g.max(1, keepdims=True) - m) / np.float32(255))
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
        c = np.clip(np.round((g - m) * inv), 0, 255)
        out[:full] = (c * d + m).reshape(full, *x.shape[1:])
    return out


TWIN_V = {"f32": lambda x: x, "f16": f16r, "q8": twin_q8, "q8t": twin_q8, "q4": twin_q4, "q4t": twin_q4}
TWIN_K = dict(TWIN_V, q8=twin_q8c, q8c=twin_q8c, q4=twin_q4c, q4c=twin_q4c)  # keys: per channel


def ref_attention(q, K, V, pos0, scale, window):
    """float64 causal GQA attention: q (T, H, D) at pos0..; K/V (n, Hkv, D) for positions 0..n-1."""
    T, H, D = q.shape
    n_rep = H // K.shape[1]
    out = np.zeros((T, H, D))
    for t in range(T):
        p = pos0 + t
        lo = max(0, p - window + 1) if window else 0
        for h in range(H):
            s = K[lo:p + 1, h // n_rep].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ V[lo:p + 1, h // n_rep].astype(np.float64)
    return out


def rand_kv(rng, T, Hkv, D):
    k = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    k[:, :, 3] += 4.0  # an outlier channel in the keys, as real models have
    v = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    return k, v


# ---------------------------------------------------------------- half precision scalars
def test_half_conversions_match_numpy():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000),
                         [0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, 1e-9, 3e-5, 65519.0]])
    for x in xs:
        want = np.float16(np.clip(x, -65504, 65504)).view(np.uint16)
        got = half.f32_to_f16(x)
        assert abs(int(got) - int(want)) <= 1 or (x == 0), (x, got, want)  # ties may round either way
    # the vectorized row conversion (the decode kernel's stores): float32 bit patterns across the whole range, and
    # every tie between two halves with its neighbours, exactly as numpy rounds them (to even)
    halves = np.arange(0, 0x7BFF, dtype=np.uint16)
    a, b = halves.view(np.float16).astype(np.float64), (halves + 1).view(np.float16).astype(np.float64)
    ties = ((a + b) / 2).astype(np.float32)
    xs = np.concatenate([np.arange(0, 0x477FE000, 1009, dtype=np.uint32).view(np.float32), ties,
                         np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(1e9))])
    xs = np.concatenate([xs, -xs])
    got = np.empty(xs.size, np.uint16)
    half.f32_row_to_f16(xs, got)
    np.testing.assert_array_equal(got, xs.astype(np.float16).view(np.uint16))
    half.f32_row_to_f16(np.array([65504, 65520, 1e6, -7e4], np.float32), got[:4])  # saturates instead of inf
    assert got[:4].tolist() == [0x7BFF, 0x7BFF, 0x7BFF, 0xFBFF]
    bits = np.arange(0, 65536, dtype=np.uint32).astype(np.uint16)
    finite = bits[np.isfinite(bits.view(np.float16))]
    for h in finite[::7]:
        assert half.f16_to_f32(h) == np.float32(h.view(np.float16)), h
    row = np.empty(len(finite), np.float32)  # the vectorized row conversion the f16 cache uses: every half
    half.f16_row_to_f32(finite, row)
    np.testing.assert_array_equal(row, finite.view(np.float16).astype(np.float32))


def test_linear_soft_half_decoder_matches_numpy():
    """linear.py's byte-pair decoder (x86 without F16C) agrees with numpy on every finite half."""
    from edgeq.cpu_kernels import linear

    bits = np.arange(0, 65536, dtype=np.uint32).astype(np.uint16)
    finite = bits[np.isfinite(bits.view(np.float16))][::5]
    lo, hi = (finite & 255).astype(np.uint8), (finite >> 8).astype(np.uint8)
    got = np.array([linear._h2f_soft(a, b) for a, b in zip(lo, hi)], np.float32)
    np.testing.assert_array_equal(got, finite.view(np.float16).astype(np.float32))


# ---------------------------------------------------------------- storage layouts and the split merge
def test_every_layout_is_one_kernel_type():
    """Each side's tuple has the same Numba type whatever its layout (unused arrays are empty): one signature per
    kernel, whose layouts are bound when it is made (attention_q.attention_kernels)."""
    import numba

    types = {numba.typeof(tuple(aq.new_side(name, 2, 64, 64))) for name in aq.LAYOUTS}
    assert len(types) == 1, types
    side = aq.new_side("uint4_per_channel", 2, 64, 64)
    assert side.layout == aq.UINT4_PER_CHANNEL and side.pending.shape == (2, QB, 64)
    assert side.int8_codes.size == 0 and side.uint4_codes.size == 0 and side.scales.shape == (2, 2, 64)


def test_merge_splits_against_numpy():
    """Partial softmax results of key splits, rescaled to the overall max: equals the softmax over all keys;
    an empty split (l = 0, max = -1e30) contributes nothing."""
    rng = np.random.default_rng(5)
    D, n_keys, bounds = 8, 20, [0, 6, 6, 20]  # the second split saw no key
    s = rng.standard_normal(n_keys).astype(np.float32) * 3
    v = rng.standard_normal((n_keys, D)).astype(np.float32)
    n_split = len(bounds) - 1
    pm = np.full((n_split, 1), -1e30, np.float32)
    pl = np.zeros((n_split, 1), np.float32)
    pacc = np.zeros((n_split, 1, D), np.float32)
    for sp in range(n_split):
        a, z = bounds[sp], bounds[sp + 1]
        if a < z:
            pm[sp, 0] = s[a:z].max()
            e = np.exp(s[a:z] - pm[sp, 0])
            pl[sp, 0], pacc[sp, 0] = e.sum(), e @ v[a:z]
    out = np.empty(D, np.float32)
    aq._merge_splits(pm, pl, pacc, 0, out)
    w = np.exp(s.astype(np.float64) - s.max())
    np.testing.assert_allclose(out, (w / w.sum()) @ v, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attention vs twins
def assert_twin(got, want, tk, tv):
    """Tight agreement; quantized codecs may round a rare exact tie the other way (fastmath reciprocal):
    allow a few elements off by a small amount."""
    bad = np.abs(got - want) > 2e-4 + 1e-3 * np.abs(want)
    if tk in ("f32", "f16") and tv in ("f32", "f16"):
        assert not bad.any(), np.abs(got - want).max()
    else:
        assert bad.mean() < 1e-2 and np.abs(got - want).max() < 5e-2, (bad.mean(), np.abs(got - want).max())


COMBOS = [("f32", "f32"), ("f16", "f16"), ("q8", "q8"), ("q8t", "q8t"), ("q4t", "q4"), ("q4", "q4"), ("q8", "f16"),
          ("f16", "q4"), ("q4c", "q8"), ("q8c", "q4")]
# loose bounds vs the exact float reference (max abs error of outputs of unit-variance values)
LOOSE = {"f32": 1e-5, "f16": 3e-3, "q8": 6e-2, "q8c": 6e-2, "q8t": 6e-2, "q4": 0.6, "q4c": 0.6, "q4t": 0.6}


@pytest.mark.parametrize("tk,tv", COMBOS)
@pytest.mark.parametrize("D,Hkv,H,window", [(64, 3, 9, 0), (96, 2, 2, 0), (64, 1, 4, 24)])
def test_attention_against_twins(tk, tv, D, Hkv, H, window):
    rng = np.random.default_rng(zlib.crc32(f"{tk}{tv}{D}{window}".encode()))
    n_ctx = 160
    cache = make_kv_cache([KVLayout(Hkv, D, window)] * 2, n_ctx, tk, tv, max_batch=40)
    scale = 1 / np.sqrt(D)
    K = np.zeros((0, Hkv, D), np.float32)
    V = np.zeros((0, Hkv, D), np.float32)
    pos = 0
    for T in (7, 33, 1, 40, 1, 1, 25, 31, 1):  # positions spanning many store calls and q4c groups
        k, v = rand_kv(rng, T, Hkv, D)
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        cache.store(1, pos, k, v)
        got = cache.attend(1, q, pos, scale)
        K, V = np.concatenate([K, k]), np.concatenate([V, v])
        Kt = TWIN_K[tk](K)
        Vt = TWIN_V[tv](V)
        want = ref_attention(q, Kt, Vt, pos, scale, window)
        assert_twin(got, want, tk, tv)
        exact = ref_attention(q, K, V, pos, scale, window)
        assert np.abs(got - exact).max() < max(LOOSE[tk], LOOSE[tv]), (tk, tv, np.abs(got - exact).max())
        pos += T
    assert cache.layers[1].n == pos and cache.layers[0].n == 0


def test_f32_cache_matches_ops_attention():
    from edgeq.cpu_kernels.ops import attention

    rng = np.random.default_rng(1)
    T, Hkv, H, D, n_ctx = 37, 2, 6, 64, 64
    k, v = rand_kv(rng, T, Hkv, D)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    cache = make_kv_cache([KVLayout(Hkv, D, 16)], n_ctx, "f32", "f32")
    cache.store(0, 0, k, v)
    kc = np.zeros((Hkv, n_ctx, D), np.float32)
    vc = np.zeros((Hkv, n_ctx, D), np.float32)
    kc[:, :T], vc[:, :T] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    np.testing.assert_allclose(cache.attend(0, q, 0, 0.125), attention(q, kc, vc, 0, 0.125, 16), atol=1e-5)


# ---------------------------------------------------------------- sliding-window ring and rewinds
@pytest.mark.parametrize("tk,tv", [("f16", "f16"), ("q8", "q8"), ("q8t", "q8t"), ("q4", "q4"), ("q4t", "q4t")])
def test_ring_buffer_long_sequence(tk, tv):
    rng = np.random.default_rng(2)
    Hkv, H, D, window, n_ctx = 1, 4, 64, 40, 400
    cache = make_kv_cache([KVLayout(Hkv, D, window)], n_ctx, tk, tv, max_batch=24)
    L = cache.layers[0]
    assert L.ring and L.nslots == 64  # window + batch, rounded up to a block: memory independent of n_ctx
    K = np.zeros((0, Hkv, D), np.float32)
    V = np.zeros((0, Hkv, D), np.float32)
    pos = 0
    while pos < 300:
        T = int(rng.integers(1, 25))
        k, v = rand_kv(rng, T, Hkv, D)
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        cache.store(0, pos, k, v)
        got = cache.attend(0, q, pos, 0.125)
        K, V = np.concatenate([K, k]), np.concatenate([V, v])
        want = ref_attention(q, TWIN_K[tk](K), TWIN_V[tv](V), pos, 0.125, window)
        assert_twin(got, want, tk, tv)  # q4c: ring slots are block-aligned, so the groups are the same
        pos += T
    with pytest.raises(ValueError):
        cache.store(0, pos, *rand_kv(rng, 30, Hkv, D))  # more than the ring's slack at once
    assert cache.can_rewind_to(pos) and cache.can_rewind_to(pos - 10) and cache.can_rewind_to(0)
    assert not cache.can_rewind_to(pos - 40) and not cache.can_rewind_to(pos + 1)
    with pytest.raises(ValueError):
        cache.store(0, pos - 40, *rand_kv(rng, 1, Hkv, D))
    cache.store(0, 0, *rand_kv(rng, 3, Hkv, D))  # from scratch is always possible
    assert L.n == 3


@pytest.mark.parametrize("tk,tv", [("f32", "f32"), ("q8", "q4"), ("q4", "q8"), ("q4t", "q4t"), ("q8t", "q8t")])
def test_rewind_overwrites(tk, tv):
    """The engine rewinds to a common prefix by storing later positions again (also mid q4c group)."""
    rng = np.random.default_rng(3)
    Hkv, H, D = 2, 4, 64
    cache = make_kv_cache([KVLayout(Hkv, D)], 128, tk, tv)
    k, v = rand_kv(rng, 100, Hkv, D)
    cache.store(0, 0, k, v)
    for rew in (70, 64, 45):
        k2, v2 = rand_kv(rng, 9, Hkv, D)
        q = rng.standard_normal((9, H, D)).astype(np.float32)
        cache.store(0, rew, k2, v2)
        got = cache.attend(0, q, rew, 0.125)
        K = np.concatenate([k[:rew], k2])
        V = np.concatenate([v[:rew], v2])
        exact = ref_attention(q, K, V, rew, 0.125, 0)
        assert np.abs(got - exact).max() < max(LOOSE[tk], LOOSE[tv])
        k[rew:rew + 9], v[rew:rew + 9] = k2, v2
        assert cache.layers[0].n == rew + 9
    with pytest.raises(ValueError):
        cache.store(0, 60, *rand_kv(rng, 1, Hkv, D))  # a gap


@pytest.mark.parametrize("tk", ["q8", "q4"])
def test_a_rewind_to_a_marked_position_continues_with_the_same_bits(tk):
    """A prompt of 40 positions is marked (the engine keeps its logits); 30 generated positions quantize its
    per-channel key group (32..63); rewinding to 40 (the same prompt again) and storing the same rows gives the
    same attention bits as the first time, where an unmarked rewind reopens the group dequantized. A write before
    the mark drops it."""
    rng = np.random.default_rng(5)
    Hkv, H, D = 2, 4, 64
    cache = make_kv_cache([KVLayout(Hkv, D)], 128, tk, "q8")
    k, v = rand_kv(rng, 70, Hkv, D)
    q = rng.standard_normal((70, H, D)).astype(np.float32)

    def continue_from_prompt():
        outs = []
        for p in range(40, 70):  # one position at a time, as decoding
            cache.store(0, p, k[p:p + 1], v[p:p + 1])
            outs.append(cache.attend(0, q[p:p + 1], p, 0.125))
        return np.concatenate(outs)

    cache.store(0, 0, k[:40], v[:40])
    cache.mark(40)
    first = continue_from_prompt()          # position 63 fills the group: quantized from here on
    assert np.array_equal(continue_from_prompt(), first), "the marked rewind computed other bits"
    cache.store(0, 0, k[:40], v[:40])       # the prompt stored again: the mark goes (the rows may have changed)
    assert cache.layers[0].k.marked is None
    continue_from_prompt()
    unmarked = continue_from_prompt()       # rewinds into the quantized group without a mark: dequantized rows
    assert not np.array_equal(unmarked, first) and np.abs(unmarked - first).max() < LOOSE[tk]


# ---------------------------------------------------------------- validation, sizes, defaults
def test_validation_and_types():
    cache = make_kv_cache([KVLayout(2, 64)], 32, None, None)
    assert (cache.type_k, cache.type_v) == ("q8", "q8")
    # the default keys are per channel (outlier channels), values per token
    assert (cache.layers[0].k.layout, cache.layers[0].v.layout) == ("uint8_per_channel", "int8_per_token")
    with pytest.raises(ValueError):
        cache.store(0, 0, np.zeros((4, 3, 64), np.float32), np.zeros((4, 3, 64), np.float32))
    with pytest.raises(ValueError):
        cache.store(0, 30, np.zeros((4, 2, 64), np.float32), np.zeros((4, 2, 64), np.float32))
    with pytest.raises(ValueError):
        cache.attend(0, np.zeros((1, 4, 64), np.float32), 0, 1.0)  # nothing stored yet
    with pytest.raises(ValueError):
        cache.attend(0, np.zeros((1, 3, 64), np.float32), 0, 1.0)
    for bad in (("q4c", "q4c"), ("f16", "q8c"), ("q5", None), (None, "int8")):
        with pytest.raises(EdgeqError):
            make_kv_cache([KVLayout(2, 64)], 32, *bad)
    with pytest.raises(EdgeqError):
        make_kv_cache([KVLayout(2, 40)], 32, "q8", "f16")
    assert set(CACHE_TYPES) >= {"f16", "q8", "q8c", "q8t", "q4", "q4c", "q4t", "f32"}
    c = make_kv_cache([KVLayout(2, 64)], 32, "q8t", "q8t")
    assert (c.layers[0].k.layout, c.layers[0].v.layout) == ("int8_per_token", "int8_per_token")
    c = make_kv_cache([KVLayout(2, 64)], 32, "q4", "q4")
    assert (c.layers[0].k.layout, c.layers[0].v.layout) == ("uint4_per_channel", "uint4_per_token")  # KIVI
    assert make_kv_cache([KVLayout(2, 64)], 32, "F16", "Q8").type_v == "q8"


def _layouts(name):
    if name == "smollm2":  # 30 layers, 3 kv heads of 64
        return [KVLayout(3, 64) for _ in range(30)]
    return [KVLayout(1, 256, 512 if i % 6 < 5 else 0) for i in range(18)]  # gemma3-270m


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_memory_at_8192(model):
    L = _layouts(model)
    f16 = make_kv_cache(L, 8192, "f16", "f16").nbytes
    if model == "smollm2":
        assert f16 == 30 * 2 * 3 * 8192 * 64 * 2
    assert make_kv_cache(L, 8192, "q8", "q8").nbytes <= 0.56 * f16  # per-channel keys: + a scale and min per 32
    assert make_kv_cache(L, 8192, "q8t", "q8t").nbytes <= 0.535 * f16
    assert make_kv_cache(L, 8192, "q4", "q4").nbytes <= 0.32 * f16
    assert make_kv_cache(L, 8192, "q4t", "q4").nbytes <= 0.32 * f16
    assert make_kv_cache(L, 8192, "f32", "f32").nbytes == 2 * f16


@pytest.mark.parametrize("t", ["f16", "q8", "q8t", "q4", "q4t"])
def test_batching_does_not_change_the_cache(t):
    """Prefill in one call or decode one position at a time: same stored blocks, same attention."""
    rng = np.random.default_rng(4)
    Hkv, H, D, n = 2, 4, 64, 77
    k, v = rand_kv(rng, n, Hkv, D)
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    a = make_kv_cache([KVLayout(Hkv, D)], 128, t, t)
    b = make_kv_cache([KVLayout(Hkv, D)], 128, t, t)
    a.store(0, 0, k, v)
    for p in range(n):
        b.store(0, p, k[p:p + 1], v[p:p + 1])
    np.testing.assert_allclose(a.attend(0, q, n - 1, 0.125), b.attend(0, q, n - 1, 0.125), atol=1e-6)


@pytest.mark.parametrize("head_dim", [16, 48])
@pytest.mark.parametrize("ctype", ["f16", "f32"])
def test_float_cache_head_dim_not_multiple_of_32(head_dim, ctype):
    """f16/f32 caches accept any head_dim (the quantized ones need whole blocks of 32): causal attention
    equals a numpy softmax reference."""
    from edgeq.runtime.kv_cache import make_kv_cache
    from edgeq.models.base import KVLayout

    rng = np.random.default_rng(head_dim)
    T, Hkv, H = 7, 2, 4
    c = make_kv_cache([KVLayout(Hkv, head_dim)], 64, ctype, ctype)
    k, v = (rng.standard_normal((T, Hkv, head_dim)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((T, H, head_dim)).astype(np.float32)
    c.store(0, 0, k, v)
    out = c.attend(0, q, 0, 0.25)
    ref = np.empty_like(q)
    for t in range(T):
        for h in range(H):
            s = (k[:t + 1, h // 2] @ q[t, h]) * 0.25
            p = np.exp(s - s.max())
            ref[t, h] = (p / p.sum()) @ v[:t + 1, h // 2]
    np.testing.assert_allclose(out, ref, atol=2e-3 if ctype == "f16" else 1e-5)


# ---------------------------------------------------------------- per-channel 8-bit keys and outlier channels
def test_block_scores_on_uint8_codes_against_numpy():
    """simd_attention.block_scores on a group's uint8 codes (D, 32): the decode path of the q8 keys."""
    from edgeq.cpu_kernels import simd_attention
    from numba import njit

    @njit
    def scores(q, codes, out):
        simd_attention.block_scores(q, codes, out)

    rng = np.random.default_rng(7)
    for D in (32, 64, 256):
        q = rng.standard_normal(D).astype(np.float32)
        codes = rng.integers(0, 256, (D, QB)).astype(np.uint8)
        out = np.empty(QB, np.float32)
        scores(q, codes, out)
        np.testing.assert_allclose(out, q.astype(np.float64) @ codes, rtol=1e-5, atol=1e-3)


def test_two_head_block_scores_against_numpy_and_one_head():
    """simd_attention.block_scores_2 (decode's two query heads of a kv head per pass over a group's codes): rows r0
    and r0 + 1 against numpy, the same values as block_scores on each row, the other rows untouched."""
    from edgeq.cpu_kernels import simd_attention
    from numba import njit

    @njit
    def two(q, r0, codes, out):
        simd_attention.block_scores_2(q, r0, codes, out)

    @njit
    def one(q, codes, out):
        simd_attention.block_scores(q, codes, out)

    rng = np.random.default_rng(11)
    for D in (32, 64, 128, 256):
        q = rng.standard_normal((4, D)).astype(np.float32)
        codes = rng.integers(0, 256, (D, QB)).astype(np.uint8)
        out = np.full((4, QB), 7.0, np.float32)
        two(q, 1, codes, out)
        np.testing.assert_allclose(out[1:3], q[1:3].astype(np.float64) @ codes, rtol=1e-5, atol=1e-3)
        assert (out[[0, 3]] == 7.0).all()
        for r in (1, 2):
            single = np.empty(QB, np.float32)
            one(q[r], codes, single)
            np.testing.assert_array_equal(out[r], single)


def test_wsum_q8_one_and_two_heads_against_numpy():
    """simd_attention.wsum_q8 and wsum_q8_2 (q8 values: int8 codes, a half scale per 32) over a ring of slots
    that wraps, against numpy; the two-head sum gives each row what wsum_q8 gives it."""
    from edgeq.cpu_kernels import simd_attention
    from numba import njit

    @njit
    def one(codes, scales, base, nslots, s_first, n_pos, w, out):
        simd_attention.wsum_q8(codes, scales, base, nslots, s_first, n_pos, w, out)

    @njit
    def two(codes, scales, base, nslots, s_first, n_pos, w, col0, r0, out):
        simd_attention.wsum_q8_2(codes, scales, base, nslots, s_first, n_pos, w, col0, r0, out)

    rng = np.random.default_rng(12)
    Hkv, nslots = 2, 64
    for D in (32, 64, 128):
        codes = rng.integers(-127, 128, (Hkv, nslots, D)).astype(np.int8)
        scales = (rng.random((Hkv, nslots, D // QB)) * 0.1 + 0.01).astype(np.float16)
        g, s_first, n_pos, col0 = 1, 50, 37, 5  # slots 50..63 then 0..22: the ring wraps
        w = rng.random((3, n_pos + col0 + 3)).astype(np.float32)
        slots = (s_first + np.arange(n_pos)) % nslots
        rows = codes[g, slots].astype(np.float64) * np.repeat(scales[g, slots].astype(np.float64), QB, axis=1)
        start = rng.standard_normal((3, D)).astype(np.float32)
        out = start.copy()
        two(codes.view(np.uint8), scales.view(np.uint16), g * nslots, nslots, s_first, n_pos, w, col0, 1, out)
        want = start[1:3] + w[1:3, col0:col0 + n_pos].astype(np.float64) @ rows
        np.testing.assert_allclose(out[1:3], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(out[0], start[0])
        for r in (1, 2):
            single = start[r].copy()
            one(codes.view(np.uint8), scales.view(np.uint16), g * nslots, nslots, s_first, n_pos,
                np.ascontiguousarray(w[r, col0:]), single)
            np.testing.assert_array_equal(out[r], single)


def test_scores_q8_rows_against_numpy_and_one_row():
    """simd_attention.scores_q8_1/2/3 (q8t keys: int8 codes, a half scale per 32; 16 positions a pass, their
    per-lane sums added across positions) over a ring that wraps, lengths around the 16-position groups: against
    numpy, each row what the one-row kernel gives it, nothing written outside the rows and columns asked for."""
    from edgeq.cpu_kernels import simd_attention
    from numba import njit

    @njit
    def run(rows, codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0):
        if rows == 3:
            simd_attention.scores_q8_3(codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0)
        elif rows == 2:
            simd_attention.scores_q8_2(codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0)
        else:
            simd_attention.scores_q8_1(codes, scales, base, nslots, s_first, n_pos, q, r0, out, col0)

    rng = np.random.default_rng(13)
    Hkv, nslots, g, s_first, col0 = 2, 64, 1, 50, 5
    for D in (32, 64, 128):
        for n_pos in (0, 1, 15, 16, 17, 37, 64):
            codes = rng.integers(-127, 128, (Hkv, nslots, D)).astype(np.int8)
            scales = (rng.random((Hkv, nslots, D // QB)) * 0.1 + 0.01).astype(np.float16)
            q = rng.standard_normal((5, D)).astype(np.float32)
            slots = (s_first + np.arange(n_pos)) % nslots
            keys = codes[g, slots].astype(np.float64) * np.repeat(scales[g, slots].astype(np.float64), QB, axis=1)
            args = (codes.view(np.uint8), scales.view(np.uint16), g * nslots, nslots, s_first, n_pos, q)
            for rows in (3, 2):
                out = np.full((5, col0 + n_pos + 3), 7.0, np.float32)
                run(rows, *args, 1, out, col0)
                np.testing.assert_allclose(out[1:1 + rows, col0:col0 + n_pos], q[1:1 + rows] @ keys.T, rtol=1e-5,
                                           atol=1e-3)
                touched = np.zeros(out.shape, bool)
                touched[1:1 + rows, col0:col0 + n_pos] = True
                assert (out[~touched] == 7.0).all()
                one = np.full_like(out, 7.0)
                for r in range(1, 1 + rows):
                    run(1, *args, r, one, col0)
                np.testing.assert_array_equal(one, out)


def test_half_rows_in_hardware_and_software_agree():
    """f16_row_to_f32 (16 halves at a time in hardware where the CPU has it, the rest in integer arithmetic) on
    contiguous and strided rows of every length around 16: numpy's conversion exactly."""
    from edgeq.cpu_kernels.half import f16_row_to_f32
    from numba import njit

    @njit
    def strided(src, dst):
        f16_row_to_f32(src[::3], dst[::2])

    rng = np.random.default_rng(14)
    bits = rng.integers(0, 0x7C00, 200).astype(np.uint16) | (rng.integers(0, 2, 200) << 15).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    for n in (0, 1, 15, 16, 17, 33, 64):
        out = np.full(n, 9.0, np.float32)
        f16_row_to_f32(bits[:n].copy(), out)
        np.testing.assert_array_equal(out, want[:n])
        out = np.full(2 * n, 9.0, np.float32)
        strided(bits[:3 * n].copy(), out)
        np.testing.assert_array_equal(out[::2], want[:3 * n:3])
        assert (out[1::2] == 9.0).all()


def outlier_keys(rng, T, Hkv, D):
    """Keys like Qwen2.5's layer 0: a k_proj bias with median |b| ~6 and a few channels at +-100..150."""
    k, v = rand_kv(rng, T, Hkv, D)
    bias = rng.normal(0, 9, D).astype(np.float32)
    bias[[5, 17, 40]] = [145.0, -120.0, 100.0]
    return k + bias, v


@pytest.mark.parametrize("T", [1, 9])  # the decode kernel and the prefill kernel
def test_outlier_channels_per_channel_keys(T):
    """With outlier channels, the default per-channel keys keep attention close to f16's; the old per-token
    int8 keys (q8t) do not: their scale follows the outlier and rounds the other channels away."""
    rng = np.random.default_rng(8)
    Hkv, H, D, n = 2, 4, 64, 100
    k, v = outlier_keys(rng, n, Hkv, D)
    q = rng.standard_normal((T, H, D)).astype(np.float32) * 0.3
    errs = {}
    for tk in ("q8", "q8t", "f16"):
        c = make_kv_cache([KVLayout(Hkv, D)], 128, tk, "f16")
        c.store(0, 0, k[:n - T], v[:n - T])
        c.store(0, n - T, k[n - T:], v[n - T:])
        got = c.attend(0, q, n - T, 1 / np.sqrt(D))
        errs[tk] = np.abs(got - ref_attention(q, k, v, n - T, 1 / np.sqrt(D), 0)).max()
        assert_twin(got, ref_attention(q, TWIN_K[tk](k), f16r(v), n - T, 1 / np.sqrt(D), 0), tk, "f16")
    assert errs["q8"] < 3 * errs["f16"] + 2e-3, errs
    assert errs["q8t"] > 10 * errs["q8"], errs


# ---------------------------------------------------------------- a pool's batched decode (the server's slots)
@pytest.mark.parametrize("tk,tv,window", [("q8", "q8", 0), ("q8", "q8", 40), ("f16", "f16", 0), ("f32", "f32", 40),
                                          ("q4", "q4", 40), ("q8t", "q8t", 0), ("q4t", "q8", 0), ("q8", "q4t", 40)])
def test_pool_decode_is_each_cache_decoding_alone(tk, tv, window):
    """A KVPool's one kernel call per layer (store + attend of every sequence of a decode step) gives the bits
    of each cache's own store + attend: outputs and every stored array, across group completions, a
    sliding-window ring's wrap, batches of changing membership and order, a rewound sequence (which takes the
    per-cache path) and its return to the batch."""
    from edgeq.runtime.kv_cache import DecodeStep, KVPool

    rng = np.random.default_rng(7)
    Hkv, H, D, n_ctx = 2, 6, 64, 400
    layouts = [KVLayout(Hkv, D, window), KVLayout(Hkv, D)]
    pool = KVPool(layouts, n_ctx, 4, tk, tv, max_batch=24)
    alone = [make_kv_cache(layouts, n_ctx, tk, tv, max_batch=24) for _ in range(4)]
    pos = [31, 5, 63, 40]
    for c, a, n in zip(pool.caches, alone, pos):
        for il in range(2):
            k, v = rand_kv(rng, n, Hkv, D)
            for p0 in range(0, n, 20):  # prompt chunks within the ring's slack
                c.store(il, p0, k[p0:p0 + 20], v[p0:p0 + 20])
                a.store(il, p0, k[p0:p0 + 20], v[p0:p0 + 20])
    used = 0
    for step in range(90):
        seqs = [[0, 1, 2, 3], [2, 0], [3, 1, 0, 2], [1]][step % 4]
        if step == 50:
            pos[3] -= 7  # a rewind: DecodeStep falls back to store + attend per cache for that step
        B = len(seqs)
        q = rng.standard_normal((B, H, D)).astype(np.float32)
        k, v = rand_kv(rng, B, Hkv, D)
        p = np.array([pos[i] for i in seqs])
        ds = DecodeStep([pool.caches[i] for i in seqs], p)
        for il in range(2):
            used += ds.together and all(pool.caches[i].layers[il].n == pos[i] for i in seqs)
            got = ds.attend(il, q, k, v, 0.125)
            for b, i in enumerate(seqs):
                alone[i].store(il, pos[i], k[b:b + 1], v[b:b + 1])
                want = alone[i].attend(il, q[b:b + 1], pos[i], 0.125)[0]
                np.testing.assert_array_equal(got[b], want)
        for i in seqs:
            pos[i] += 1
    assert used > 150  # nearly every layer of every step took the pool's kernel
    for c, a in zip(pool.caches, alone):
        for Lc, La in zip(c.layers, a.layers):
            assert Lc.n == La.n
            for sc, sa in ((Lc.k.side, La.k.side), (Lc.v.side, La.v.side)):
                for x, y in zip(sc[1:], sa[1:]):
                    np.testing.assert_array_equal(x, y)
    assert pool.caches[0].layers[0].ring == bool(window)


def test_pool_arrays_from_the_huge_page_arena_are_separate_zeroed_arrays():
    """kv_cache._HugePageArena (a server pool's arrays, carved from memory maps advised into huge pages): zeroed,
    writable, C-contiguous, 64-byte aligned, none overlapping another (a new map when one is full or an array is
    larger than a map); a KVPool's caches store and attend as caches of their own do."""
    from types import SimpleNamespace

    from edgeq.runtime.kv_cache import KVPool, _HugePageArena, make_kv_cache

    arena = _HugePageArena()
    arena.CHUNK = 1 << 16
    shapes = [((3, 5, 7), np.float32), ((0, 4), np.uint16), ((100,), np.uint8), ((200, 100), np.float32),
              ((2, 2), np.uint16)]
    arrays = [arena.zeros(s, d) for s, d in shapes]
    for a, (s, d) in zip(arrays, shapes):
        assert a.shape == s and a.dtype == d and a.flags.c_contiguous and a.flags.writeable and not a.any()
        assert a.size == 0 or a.ctypes.data % 64 == 0
    for i, a in enumerate(arrays):
        a[...] = i + 1
    for i, a in enumerate(arrays):
        assert (a == i + 1).all()

    layouts = [SimpleNamespace(n_kv_heads=2, head_dim=64, window=0)] * 2
    pool = KVPool(layouts, 96, 3)
    alone = make_kv_cache(layouts, 96)
    rng = np.random.default_rng(15)
    k, v = rand_kv(rng, 40, 2, 64)
    q = rng.standard_normal((40, 4, 64)).astype(np.float32)
    for cache in (pool.caches[1], alone):
        cache.store(1, 0, k, v)
    np.testing.assert_array_equal(pool.caches[1].attend(1, q, 0, 0.125), alone.attend(1, q, 0, 0.125))
