"""Compile (or load from Numba's disk cache) every CPU kernel a loaded model can reach, before its first token.

Numba compiles a kernel at its first call with new argument types. Without this, a fresh machine compiles the
prefill kernels before the first token and the single-token decode kernels right after it, mid-reply, where
neither Ctrl-C nor Esc can act. Instead, scratch forward passes with the model's own weights (memory-mapped,
read-only: their own Numba types) over a throwaway KV cache of the model's cache types take every path that
generation takes: a batched prefill (dequantize + float GEMM, all logits), a short one (integer kernel, batched
attention), single-token decode, and a rewind into stored positions (a chat's next turn). Specializations
depend on array types, never on sizes or positions, so a few positions stand for any context length.

The passes run in a daemon thread while the caller waits in short joins: Numba spends most of a compile in LLVM
(ctypes, GIL released), so Ctrl-C reaches the caller at once; an interrupted compile finishes in the background
or dies with the process.

Once the passes have run for a file and cache types, a stamp in the kernel cache folder says so (`ready_stamp`),
and later loads skip them: every kernel they would reach is in Numba's disk cache, and loads at its first real
call (milliseconds) instead of in scratch passes that cost a forward pass (Gemma 3: a 262k-row classifier).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from typing import Callable

import numpy as np

Report = Callable[[str], None]

FIRST_RUN_MESSAGE = "preparing kernels for this CPU, once (a minute or two on a slow machine)…"
_SCRATCH_CTX = 64
_POLL_S = 0.05


def scratch_passes(model) -> None:
    """Run every forward path of `model` once over a throwaway KV cache (the model's own cache is untouched)."""
    from edgeq.runtime.kv_cache import make_kv_cache

    cfg = model.cfg
    cache = make_kv_cache(cfg.kv_layouts(), _SCRATCH_CTX, *model.cache_types, max_batch=_SCRATCH_CTX)

    def ids(n: int) -> np.ndarray:
        return np.arange(1, n + 1, dtype=np.int64) % cfg.n_vocab

    def run(n: int, pos: int, **kw) -> None:
        model.arch.forward(model.weights, cfg, ids(n), pos, cache, **kw)

    model._set_threads()  # Numba's thread count is per calling thread
    run(8, 0, all_logits=True)   # every row's logits (perplexity): the classifier's GEMM, on 8 rows (memory)
    run(40, 0)                   # a prompt: GEMM path; 32-position groups (q4 keys) full and partial
    run(3, 40)                   # a short prompt: integer kernel, batched attention
    run(1, 43)                   # decode
    run(1, 31)                   # a rewind into a stored group, completed by one token (an array layout of its own)
    run(2, 20)                   # a rewind by a few tokens, as a chat's next turn does


@contextlib.contextmanager
def _on_first_compile(callback: Callable[[], None]):
    """Calls `callback()` once, at the first real compile while inside (a kernel loaded from the disk cache is
    no compile). Yields a dict whose "compiled" says whether one happened."""
    from numba.core import event

    seen = {"compiled": False}

    class FirstCompile(event.Listener):
        def on_start(self, ev):
            if not seen["compiled"]:
                seen["compiled"] = True
                callback()

        def on_end(self, ev):
            pass

    listener = FirstCompile()
    event.register("numba:compile", listener)
    try:
        yield seen
    finally:
        event.unregister("numba:compile", listener)


def ready_stamp(model) -> str | None:
    """The file whose presence says the scratch passes already ran for this model file and cache types against
    this kernel cache: None when there is no on-disk cache. The key holds what decides whether Numba's cache
    can serve every kernel: the file (path, size, mtime), the cache types, the kernel sources' hash (a cache
    folder named by the user is not keyed by it), Numba's and Python's versions."""
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    if not cache_dir:
        return None
    import numba

    from edgeq import _numba_env

    try:
        st = os.stat(model.path)
        sources = _numba_env._kernel_sources_hash()
    except (AttributeError, OSError):
        return None
    key = repr((str(os.path.abspath(model.path)), st.st_size, st.st_mtime_ns, tuple(model.cache_types),
                sources, numba.__version__, sys.version_info[:2]))
    return os.path.join(cache_dir, "edgeq-ready", hashlib.sha256(key.encode()).hexdigest()[:24])


def _write_stamp(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("every kernel this model file and cache types reach is in this cache\n")
    except OSError:
        pass  # a read-only cache: the passes run again next time, nothing worse


def warm_up(model, report: Report | None = None) -> float:
    """Make every kernel of `model` ready; returns the seconds spent. `report(line)` hears, on a first run only,
    that kernels are being prepared and when they are ready. KeyboardInterrupt reaches the caller at once.
    Nothing to do when `ready_stamp(model)` exists: the kernels then load from the disk cache at first use."""
    t0 = time.perf_counter()
    stamp = ready_stamp(model)
    if stamp is not None and os.path.exists(stamp):
        return 0.0
    say = report or (lambda line: None)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            scratch_passes(model)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            failure.append(e)

    with _on_first_compile(lambda: say(FIRST_RUN_MESSAGE)) as seen:
        worker = threading.Thread(target=work, name="edgeq-warmup", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(_POLL_S)  # short joins: a signal handler runs between them
    if failure:
        raise failure[0]
    if stamp is not None:
        _write_stamp(stamp)
    elapsed = time.perf_counter() - t0
    if seen["compiled"]:
        say(f"kernels ready ({elapsed:.1f} s; cached for the next run)")
    return elapsed
