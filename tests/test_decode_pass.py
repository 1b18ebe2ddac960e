"""The compiled decode step (cpu_kernels/decode_pass.py, models/llama.compiled_step) against the Python layers.

The step calls the kernels the Python path calls, on the same arrays in the same order: its logits and the KV
cache it leaves must be those of `llama.layer` run from Python, bit for bit, whatever the family's options (Q/K/V
biases, q/k norms, layers without RoPE, Granite's multipliers, tied or separate classifiers), the weight types
(the k-quants on 256-wide rows, the 32-blocks), the cache types, and for one sequence or a server's batch of
several in one KVPool. Tiny random checkpoints by transformers, converted by `edgeq convert`.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert import HF_CACHE, IDS, LONG_IDS, convert, make_tiny, needs_quants  # noqa: E402

# rows of 256 (the k-quants' super-block), 8 heads of 32 over 2 KV heads
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
ARCHS = ("llama", "qwen2", "qwen3", "smollm3", "granite", "gemma3")


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_path):
    from edgeq.convert.hf_checkpoint import materialize_from_gguf

    return materialize_from_gguf(smollm2_path, HF_CACHE / "SmolLM2-135M-Instruct")  # made once, cached


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("decode_pass")
    made = {}

    def get(arch: str, qtype: str):
        key = (arch, qtype)
        if key not in made:
            folder = root / arch
            if not folder.is_dir():
                make_tiny(arch, folder, tokenizer_dir, sizes=SIZES)
            out = root / f"{arch}-{qtype}.gguf"
            assert convert(folder, out, qtype) == 0
            made[key] = out
        return made[key]
    return get


def _module(m):
    """The module whose compiled_step the model's forward passes call (llama.py for the whole family)."""
    return sys.modules[m.arch.forward.__module__]


def _decode(m, cache, prompt, steps, compiled, monkeypatch):
    """Logits of `steps` single-token forwards after `prompt` (greedy), the compiled step on or off."""
    mod = _module(m)
    with monkeypatch.context() as mp:
        if not compiled:
            mp.setattr(mod, "compiled_step", lambda *a: None)
        else:
            real = mod.compiled_step

            def must(*a):
                out = real(*a)
                assert out is not None, "the compiled step did not apply"
                return out
            mp.setattr(mod, "compiled_step", must)
        m.arch.forward(m.weights, m.cfg, np.asarray(prompt, np.int64), 0, cache)
        tok, out = 11, []
        for i in range(steps):
            lg = m.arch.forward(m.weights, m.cfg, np.array([tok]), len(prompt) + i, cache)
            out.append(lg[0].copy())
            tok = int(lg[0].argmax())
    return np.array(out)


def _cache_state(cache):
    return [np.concatenate([a.ravel().view(np.uint8) for s in (L.k.side, L.v.side) for a in s[1:]])
            for L in cache.layers]


@needs_quants
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_compiled_decode_equals_python_layers(files, arch, qtype, monkeypatch):
    import edgeq
    from edgeq.runtime.kv_cache import make_kv_cache

    m = edgeq.load(str(files(arch, qtype)), n_ctx=128, threads=2)
    runs = []
    for compiled in (False, True):
        cache = make_kv_cache(m.cfg.kv_layouts(), 128)
        runs.append((_decode(m, cache, LONG_IDS[:40], 8, compiled, monkeypatch), _cache_state(cache),
                     [L.n for L in cache.layers]))
    (a, ca, na), (b, cb, nb) = runs
    assert np.array_equal(a, b)
    assert na == nb == [48] * m.cfg.n_layer
    assert all(np.array_equal(x, y) for x, y in zip(ca, cb))
    assert np.isfinite(b).all() and np.abs(b).max() > 0
    # one compiled signature, the one a first run's worker compiles ahead (decode_pass.compile)
    from edgeq.cpu_kernels import decode_pass

    assert decode_pass._step.signatures == [decode_pass.STEP_ARGS]


@needs_quants
@pytest.mark.parametrize("types", [("f16", "f16"), ("q4", "q4"), ("q8t", "q8")])
def test_compiled_decode_cache_types(files, types, monkeypatch):
    import edgeq
    from edgeq.runtime.kv_cache import make_kv_cache

    m = edgeq.load(str(files("qwen3", "Q4_K_M")), n_ctx=128, threads=2)
    a, b = (_decode(m, make_kv_cache(m.cfg.kv_layouts(), 128, *types), IDS, 40, c, monkeypatch)
            for c in (False, True))  # 12 + 40 positions: a per-channel key group completes and a new one opens
    assert np.array_equal(a, b)


@needs_quants
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_compiled_batch_step_equals_python_layers(files, arch, monkeypatch):
    """The server's step: one token of each of 3 sequences of a KVPool, at different positions."""
    import edgeq
    from edgeq.runtime.kv_cache import KVPool

    m = edgeq.load(str(files(arch, "Q4_K_M")), n_ctx=128, threads=2)
    prompts = [LONG_IDS[:37], IDS[:5], IDS]
    outs = []
    for compiled in (False, True):
        pool = KVPool(m.cfg.kv_layouts(), 128, 4)
        caches = [pool.caches[i] for i in (2, 0, 3)]  # not in pool order
        for c, ids in zip(caches, prompts):
            m.arch.forward(m.weights, m.cfg, np.asarray(ids, np.int64), 0, c)
        pos, toks, steps = np.array([len(p) for p in prompts]), np.array([7, 8, 9]), []
        with monkeypatch.context() as mp:
            real, ran = _module(m).compiled_step, []

            def step(*a):
                out = real(*a) if compiled else None
                ran.append(out is not None)
                return out
            mp.setattr(_module(m), "compiled_step", step)
            for _ in range(4):
                lg = m.arch.forward_batch(m.weights, m.cfg, toks, pos, caches)
                steps.append(lg.copy())
                toks, pos = lg.argmax(1), pos + 1
        outs.append(np.array(steps))
        assert ran == [compiled] * 4
    assert np.array_equal(outs[0], outs[1])
    assert m.weights._decode_tables[3] is not None  # the step's tables for 3 rows (base.decode_tables)


@needs_quants
def test_compiled_step_declines_what_it_does_not_run(files, tokenizer_dir, tmp_path):
    """It steps aside (None) where the caches are not one group appending after what they hold, and for models
    it does not run (experts, LongRoPE's attention factor, float matrices); the Python layers then run."""
    import edgeq
    from edgeq.models import llama
    from edgeq.runtime.kv_cache import make_kv_cache

    m = edgeq.load(str(files("llama", "Q8_0")), n_ctx=64, threads=1)
    w, cfg, layouts = m.weights, m.cfg, m.cfg.kv_layouts()
    a, b = make_kv_cache(layouts, 64), make_kv_cache(layouts, 64)
    for c in (a, b):
        m.arch.forward(w, cfg, np.asarray(IDS, np.int64), 0, c)
    n = len(IDS)
    assert llama.compiled_step(w, cfg, [5, 6], np.array([n, n]), [a, b]) is None      # two groups
    assert llama.compiled_step(w, cfg, [5], np.array([n - 3]), [a]) is None           # not right after
    assert llama.compiled_step(w, cfg, [5], np.array([n]), [a]) is not None
    assert [L.n for L in a.layers] == [n + 1] * cfg.n_layer
    for name, qtype in (("qwen3moe", "Q8_0"), ("phi3", "Q8_0"), ("llama", "F16")):
        out = tmp_path / f"{name}-{qtype}.gguf"
        folder = tmp_path / ("tiny-longrope" if name == "phi3" else name)  # the name test_convert gives Phi-3's
        if not folder.is_dir():
            make_tiny(name, folder, tokenizer_dir)
        assert convert(folder, out, qtype) == 0
        m = edgeq.load(str(out), n_ctx=64, threads=1)
        assert llama._make_decode_tables(m.weights, m.cfg, 1) is None, name
        assert np.isfinite(m.logits(IDS[:3])).all()
