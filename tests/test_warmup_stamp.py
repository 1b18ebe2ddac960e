"""The warm-up's ready stamp: scratch passes run once per model file, cache types and kernel sources."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeq.runtime import warmup


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("EDGEQ_WARMUP_WORKER", "0")  # tests/test_warmup_worker.py
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    return SimpleNamespace(path=f, cache_types=(None, None))


def test_passes_run_once_then_the_stamp_skips_them(model, monkeypatch):
    calls = []
    monkeypatch.setattr(warmup, "scratch_passes", lambda m, before_decode: calls.append(m))
    warmup.warm_up(model)
    assert calls == [model] and os.path.exists(warmup.ready_stamp(model))
    warmup.warm_up(model)
    assert calls == [model]


def test_a_failed_pass_leaves_no_stamp(model, monkeypatch):
    def fail(m, before_decode):
        raise RuntimeError("boom")

    monkeypatch.setattr(warmup, "scratch_passes", fail)
    with pytest.raises(RuntimeError):
        warmup.warm_up(model)
    assert not os.path.exists(warmup.ready_stamp(model))


def test_the_stamp_depends_on_file_cache_types_and_kernel_sources(model, monkeypatch):
    first = warmup.ready_stamp(model)
    assert first.startswith(os.environ["NUMBA_CACHE_DIR"])
    assert warmup.ready_stamp(SimpleNamespace(path=model.path, cache_types=("q4", "q4"))) != first
    os.utime(model.path, ns=(1, 1))  # the file replaced (same path)
    touched = warmup.ready_stamp(model)
    assert touched != first
    from edgeq import _numba_env

    monkeypatch.setattr(_numba_env, "_kernel_sources_hash", lambda: "0123abcd")
    assert warmup.ready_stamp(model) != touched  # a kernel edited: Numba recompiles, so must the passes


def test_the_kernel_hash_covers_kernel_sources_only(tmp_path, monkeypatch):
    """The kernel cache folder's hash changes with cpu_kernels/ and the formats modules that kernels import or that
    are Numba code, not with the GGUF reader or writer: an upgrade that changes no kernel keeps the cache."""
    import importlib.util

    from edgeq import _numba_env

    trees = {"edgeq.cpu_kernels": tmp_path / "k", "edgeq.formats": tmp_path / "f"}
    for folder in trees.values():
        folder.mkdir()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(
        submodule_search_locations=[str(trees[name])]))
    (trees["edgeq.cpu_kernels"] / "linear.py").write_text("from edgeq.formats.quants import QTYPES\n")
    (trees["edgeq.formats"] / "quants.py").write_text("QTYPES = {}\n")
    (trees["edgeq.formats"] / "search.py").write_text("from numba import njit\n")
    (trees["edgeq.formats"] / "gguf_write.py").write_text("def write(): pass\n")
    base = _numba_env._kernel_sources_hash()
    (trees["edgeq.formats"] / "gguf_write.py").write_text("def write(): return 1\n")
    assert _numba_env._kernel_sources_hash() == base
    for name, folder in (("quants.py", "edgeq.formats"), ("search.py", "edgeq.formats"),
                         ("linear.py", "edgeq.cpu_kernels")):
        path = trees[folder] / name
        path.write_text(path.read_text() + "# edited\n")
        assert _numba_env._kernel_sources_hash() != base, name
        base = _numba_env._kernel_sources_hash()


def test_no_stamp_without_a_disk_cache(model, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    assert warmup.ready_stamp(model) is None
    assert Path(model.path).exists()
