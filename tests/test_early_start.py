"""An early start (the CLI's run and chat on a first run: runtime/warmup.py warm_up(early=True)): the model answers
once the single-token kernels are ready, prompts go token by token until a worker process has compiled the prompt
kernels, and that worker then leaves the ready stamp, even after its parent has exited."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from _procs import COMPILE_LISTENER, processes_naming
from edgeq.runtime.warmup import BACKGROUND_MESSAGE

# Runs in a fresh process with an empty kernel cache: an early load, then a first chat answer, recording every
# Numba compile in this process after load() returned (the prompt must take the ready single-token kernels).
EARLY = r"""
import json, os, sys
import numpy as np
import edgeq
from edgeq.runtime import engine, warmup
""" + COMPILE_LISTENER + r"""

steps = []  # each sampling step: its five most likely token ids and their logits


class Recording(engine.Sampler):
    def __call__(self, logits, history=None):
        top = np.argsort(logits)[::-1][:5]
        steps.append([[int(i), float(logits[i])] for i in top])
        return super().__call__(logits, history)


engine.Sampler = Recording

path, mode = sys.argv[1], sys.argv[2]
m = edgeq.load(path, n_ctx=256, threads=2, early_start=mode == "early")
pending = m.pending_kernels is not None and not m.pending_kernels.ready()
event.register("numba:compile", Compiles())
reply = "".join(m.chat([{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0))
during = list(compiles)
if m.pending_kernels is not None:
    m.pending_kernels.wait()
print(json.dumps({"pending": pending, "reply": reply, "compiles": during, "steps": steps,
                  "stamped": os.path.exists(warmup.ready_stamp(m))}))
"""


def run(path, mode, env):
    p = subprocess.run([sys.executable, "-c", EARLY, str(path), mode], capture_output=True, text=True, timeout=900,
                       env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_an_early_start_answers_on_the_single_token_kernels_and_completes_the_cache(smollm2_path, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    early = run(smollm2_path, "early", env)
    assert early["pending"]  # load returned while the prompt kernels were still compiling
    assert early["compiles"] == []  # the prompt went through the single-token kernels, which were ready
    assert early["stamped"]  # the worker finished: every kernel is in the cache
    later = run(smollm2_path, "full", env)  # a load as every later run gets it: stamped, prompt batched
    assert not later["pending"] and later["compiles"] == []
    assert early["reply"].strip() and later["reply"].strip()
    assert_same_or_near_tie(early["steps"], later["steps"])


def assert_same_or_near_tie(a: list, b: list) -> None:
    """Greedy replies of the single-token and the batched prompt kernels are the same tokens, or part at a near-tie:
    the two kernels round differently (3-5% of the largest logit apart on this file, as each is from llama.cpp's),
    so where the best two tokens are closer than that either may win. At the first step where the picks differ,
    each run's pick and the other's must both be among its five best, less than 4% of its best logit apart."""
    for step_a, step_b in zip(a, b):
        pick_a, pick_b = step_a[0][0], step_b[0][0]
        if pick_a == pick_b:
            continue
        for step in (step_a, step_b):
            logits = dict((i, v) for i, v in step)
            assert pick_a in logits and pick_b in logits, (step_a, step_b)
            assert abs(logits[pick_a] - logits[pick_b]) <= 0.04 * abs(step[0][1]), (step_a, step_b)
        return
    assert len(a) == len(b)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_the_worker_finishes_the_cache_after_a_run_exits(smollm2_path, tmp_path):
    """`edgeq run` exits right after its answer; its worker goes on and leaves the ready stamp, then exits."""
    cache = tmp_path / "numba"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    p = subprocess.run([sys.executable, "-m", "edgeq.cli", "run", str(smollm2_path), "--chat", "-p", "Hi", "-n", "4",
                        "--temp", "0"], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and BACKGROUND_MESSAGE in p.stderr
    deadline = time.monotonic() + 600
    while processes_naming(str(cache)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_naming(str(cache))
    assert os.listdir(cache / "edgeq-ready")


class FakePending:
    def __init__(self, ready_after: int):
        self.polls, self.ready_after, self.waited = 0, ready_after, False

    def ready(self):
        self.polls += 1
        return self.polls > self.ready_after

    def wait(self):
        self.waited = True


@pytest.fixture(scope="module")
def model(smollm2_path):
    import edgeq

    return edgeq.load(str(smollm2_path), n_ctx=128, threads=2)


def _chunks(model, monkeypatch) -> list[int]:
    sizes = []
    forward = model.arch.forward

    def spy(weights, cfg, tokens, pos0, cache, **kw):
        sizes.append(len(tokens))
        return forward(weights, cfg, tokens, pos0, cache, **kw)

    monkeypatch.setattr(model.arch, "forward", spy)
    return sizes


def test_a_prompt_goes_token_by_token_until_the_prompt_kernels_are_ready(model, monkeypatch):
    ids = model.encode_prompt("The quick brown fox jumps over the lazy dog again and again")
    model.reset()
    want = model.append(ids)
    sizes = _chunks(model, monkeypatch)
    model.reset()
    model.pending_kernels = pending = FakePending(ready_after=3)
    got = model.append(ids)
    # polled before the call (not ready), then before tokens 2, 3 and 4: ready there, the rest in one batch
    assert sizes == [1, 1, 1, len(ids) - 3]
    assert model.pending_kernels is None and not pending.waited
    # the single-token and the batched kernels round differently (int8 row dots against the int8 GEMM, decode
    # against prefill attention): 3-5% of the largest logit apart on this file, as each is from llama.cpp's
    np.testing.assert_allclose(got, want, atol=0.08 * np.abs(want).max())
    assert got.argmax() == want.argmax()
    assert model.tokens == ids


def test_while_the_worker_compiles_the_passes_run_on_one_thread(model, monkeypatch):
    """The early start's worker holds a core: two threads would take turns with it, every parallel loop waiting for
    the thread that lost its core (a cold first run's reply took 14-18 s instead of 9 on 2 cores)."""
    import numba

    threads = []
    forward = model.arch.forward

    def spy(weights, cfg, tokens, pos0, cache, **kw):
        threads.append((len(tokens), numba.get_num_threads()))
        return forward(weights, cfg, tokens, pos0, cache, **kw)

    monkeypatch.setattr(model.arch, "forward", spy)
    ids = model.encode_prompt("The quick brown fox")
    model.reset()
    model.pending_kernels = FakePending(ready_after=3)
    model.append(ids)                # polled before the call and tokens 2 and 3, ready before token 4
    model.append([ids[0]])           # a decode step once the prompt kernels are ready
    model.pending_kernels = FakePending(ready_after=10 ** 6)
    model.append([ids[1]])           # a decode step while they are not
    model.pending_kernels = None     # before the assertion: the module's model serves the tests after this one
    assert threads == [(1, 1), (1, 1), (1, 1), (len(ids) - 3, 2), (1, 2), (1, 1)]


def test_all_logits_wait_for_the_prompt_kernels(model, monkeypatch):
    ids = model.encode_prompt("The quick brown fox")
    sizes = _chunks(model, monkeypatch)
    model.pending_kernels = pending = FakePending(ready_after=10 ** 6)
    logits = model.logits(ids)
    assert pending.waited and model.pending_kernels is None
    assert sizes == [len(ids)] and logits.shape == (len(ids), model.cfg.n_vocab)
