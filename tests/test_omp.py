"""runtime/omp.py: a thread lets its OpenMP workers go, and Scheduler.start lets the starting thread's go."""
import os
import threading
import time

import numba
import numpy as np
import pytest
from numba import njit, prange

import edgeq  # noqa: F401  (its Numba settings: the omp threading layer)
from edgeq.runtime import omp


@njit(parallel=True, cache=False)
def _add_rows(x):
    for i in prange(x.shape[0]):
        x[i] += i


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _drops_to(count: int, timeout: float = 10.0) -> bool:
    """Whether the process's thread count falls to `count` or below within `timeout` (a worker exits shortly
    after it is told to)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _tasks() <= count:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_release_frees_the_calling_threads_workers_and_kernels_still_run():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: the OpenMP runtime starts no worker threads")
    numba.set_num_threads(2)
    x = np.zeros(64)
    _add_rows(x)  # this thread's pool: one worker beside it
    assert numba.threading_layer() == "omp"
    with_pool = _tasks()
    assert omp.release() is True
    assert _drops_to(with_pool - 1), f"{_tasks()} threads after release, {with_pool} before"
    _add_rows(x)  # a new pool, and the right result
    np.testing.assert_array_equal(x, 2 * np.arange(64))


@pytest.fixture(scope="module")
def model(smollm2_path):
    from edgeq.runtime.engine import load

    return load(smollm2_path, n_ctx=256, threads=2)


def test_scheduler_start_releases_the_starting_threads_workers(model, monkeypatch):
    """The forward passes move to the scheduler thread: the thread that starts it lets its workers go first, or
    the two pools outnumber 2 CPUs and every kernel waits for a sleeping worker (omp's docstring)."""
    from edgeq.runtime import scheduler

    calls = []
    monkeypatch.setattr(scheduler.omp, "release", lambda: calls.append(threading.get_ident()) or True)
    sched = scheduler.Scheduler(model, n_slots=1, n_ctx=64).start()
    try:
        assert calls == [threading.get_ident()]
    finally:
        sched.stop()

