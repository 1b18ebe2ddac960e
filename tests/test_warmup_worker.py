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


class Pipe:
    """A worker's stdin: what the parent told it."""

    def __init__(self):
        self.words = []

    def write(self, data):
        self.words.append(data.decode().strip())

    def flush(self):
        pass


def test_an_early_start_compiles_its_half_then_waits_for_the_worker_attention(monkeypatch):
    """The main process's side of an early start: the row stores (then "stores" to the worker), the single-token
    passes with attention stubbed, a wait for the worker's "attention", the single-token passes for real (which load
    the worker's kernels), then "keep" (the worker may outlive this process to finish the prompt kernels)."""
    r, w = os.pipe()
    worker = FakeWorker()
    worker.stdin, worker.stdout = Pipe(), os.fdopen(r, "rb")
    order = []
    monkeypatch.setattr(warmup, "_compile_stores", lambda cfg, types: order.append(("stores", worker.stdin.words[:])))

    def passes(arch, weights, cfg, cache, passes, before_decode=None):
        stub = isinstance(cache, warmup._NoAttention)
        order.append(("stub" if stub else "real", worker.stdin.words[:], passes))
        if stub:  # the worker answers once the parent's stores are in: here, right after the stubbed passes
            os.write(w, b"attention\n")

    monkeypatch.setattr(warmup, "_run_passes", passes)
    monkeypatch.setattr(warmup, "_scratch_cache", lambda cfg, types, filled=0: ("scratch", filled))
    model = SimpleNamespace(arch=None, weights=None, cfg=None, cache_types=(None, None), _set_threads=lambda: None)
    pending = warmup._early_passes(model, worker, lambda: None)
    assert order == [("stores", []), ("stub", ["stores"], warmup.DECODE_PASSES),
                     ("real", ["stores"], warmup.DECODE_PASSES)]
    assert worker.stdin.words == ["stores", "keep"]
    assert not pending.ready()  # the worker runs on
    worker.running = False
    assert pending.ready()
    os.close(w)


def test_an_early_start_goes_on_when_its_worker_dies(monkeypatch):
    """A worker that exits before its attention kernels (EOF on its stdout): the real passes compile them here."""
    r, w = os.pipe()
    os.close(w)
    worker = FakeWorker()
    worker.stdin, worker.stdout = Pipe(), os.fdopen(r, "rb")
    ran = []
    monkeypatch.setattr(warmup, "_compile_stores", lambda cfg, types: None)
    monkeypatch.setattr(warmup, "_run_passes", lambda *a, **k: ran.append(type(a[3]).__name__))
    monkeypatch.setattr(warmup, "_scratch_cache", lambda cfg, types, filled=0: "scratch")
    model = SimpleNamespace(arch=None, weights=None, cfg=None, cache_types=(None, None), _set_threads=lambda: None)
    warmup._early_passes(model, worker, lambda: None)
    assert ran == ["_NoAttention", "str"]


def test_early_only_when_asked(model, monkeypatch):
    """warm_up(early=False) (the library's default, the server, bench) keeps the decode worker and the full passes."""
    workers = started(monkeypatch)
    early = []
    monkeypatch.setattr(warmup, "_start_early_worker", lambda m, stamp: early.append(m))
    monkeypatch.setattr(warmup, "scratch_passes", lambda m, before_decode: before_decode())
    warmup.warm_up(model)
    assert early == [] and len(workers) == 1


def test_an_early_warm_up_hands_the_worker_to_the_model(model, monkeypatch):
    workers = []
    monkeypatch.setattr(warmup, "_start_early_worker", lambda m, stamp: workers.append(FakeWorker()) or workers[-1])
    monkeypatch.setattr(warmup, "_early_passes", lambda m, worker, announce: ("pending", worker))
    warmup.warm_up(model, early=True)
    assert model.pending_kernels == ("pending", workers[0])
    assert workers[0].running and not os.path.exists(warmup.ready_stamp(model))  # the worker writes the stamp


def test_a_failed_early_start_stops_its_worker(model, monkeypatch):
    workers = []
    monkeypatch.setattr(warmup, "_start_early_worker", lambda m, stamp: workers.append(FakeWorker()) or workers[-1])

    def fail(m, worker, announce):
        raise RuntimeError("boom")

    monkeypatch.setattr(warmup, "_early_passes", fail)
    with pytest.raises(RuntimeError):
        warmup.warm_up(model, early=True)
    assert workers[0].killed
