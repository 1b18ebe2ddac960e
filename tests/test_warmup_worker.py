"""The first run's decode worker (a second process that compiles the decode kernels into the shared disk cache) and
the lock that makes concurrent Numba cache saves safe."""
import contextlib
import fcntl
import os
from types import SimpleNamespace

import pytest

from edgeq.runtime import warmup


class FakeWorker:
    def __init__(self):
        self.killed = self.waited = False
        self.running = True

    def poll(self):
        return None if self.running else 0

    def kill(self):
        self.killed, self.running = True, False

    def wait(self, timeout=None):
        self.waited, self.running = True, False
        return 0


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setattr(warmup.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("EDGEQ_WARMUP_WORKER", raising=False)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    return SimpleNamespace(path=f, cache_types=(None, None))


def started(monkeypatch) -> list:
    workers = []

    def start(model):
        workers.append(FakeWorker())
        return workers[-1]

    monkeypatch.setattr(warmup, "_start_decode_worker", start)
    return workers


def test_the_prompt_passes_wait_for_the_worker_before_decode(model, monkeypatch):
    workers = started(monkeypatch)
    seen = {"compiled": False}
    monkeypatch.setattr(warmup, "_on_first_compile", contextlib.contextmanager(lambda callback: (yield seen)))
    order = []

    def passes(m, before_decode):
        seen["compiled"] = True  # a prompt kernel compiled: the cache was cold
        order.append(("prompt", workers[0].running))
        before_decode()
        order.append(("decode", workers[0].running))

    monkeypatch.setattr(warmup, "scratch_passes", passes)
    warmup.warm_up(model)
    assert order == [("prompt", True), ("decode", False)]
    assert workers[0].waited and not workers[0].killed


def test_a_warm_cache_does_not_wait_for_the_worker(model, monkeypatch):
    """Nothing compiled in the prompt passes: the decode kernels are cached too, so the worker is stopped."""
    workers = started(monkeypatch)
    monkeypatch.setattr(warmup, "scratch_passes", lambda m, before_decode: before_decode())
    warmup.warm_up(model)
    assert workers[0].killed


def test_a_failed_pass_stops_the_worker(model, monkeypatch):
    workers = started(monkeypatch)

    def fail(m, before_decode):
        raise RuntimeError("boom")

    monkeypatch.setattr(warmup, "scratch_passes", fail)
    with pytest.raises(RuntimeError):
        warmup.warm_up(model)
    assert workers[0].killed and not workers[0].running


@pytest.mark.parametrize("cpus,env,cache", [(1, None, True), (2, "0", True), (2, None, False)])
def test_no_worker_on_one_cpu_when_turned_off_or_without_a_disk_cache(model, monkeypatch, cpus, env, cache):
    workers = started(monkeypatch)
    monkeypatch.setattr(warmup.os, "cpu_count", lambda: cpus)
    if env is not None:
        monkeypatch.setenv("EDGEQ_WARMUP_WORKER", env)
    if not cache:
        monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(warmup, "scratch_passes", lambda m, before_decode: before_decode())
    warmup.warm_up(model)
    assert workers == []


def test_cache_saves_hold_the_lock(tmp_path, monkeypatch):
    """A Numba cache save runs under an exclusive lock on the cache folder's lock file (another process saving
    waits): tried here from a second open file, which flock treats as another holder."""
    from numba.core import caching

    held = []

    def save(self, key, data):
        with open(os.path.join(self._cache_path, ".edgeq-save.lock"), "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)

    monkeypatch.setattr(caching.IndexDataCacheFile, "save", save)
    warmup._serialize_cache_saves()
    warmup._serialize_cache_saves()  # once only: a second wrapper would deadlock on its own lock
    caching.IndexDataCacheFile.save(SimpleNamespace(_cache_path=str(tmp_path)), "key", b"data")
    assert held == [True]
