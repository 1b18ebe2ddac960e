"""`edgeq run`'s start: Python's cyclic garbage collector off from launch until the first token, then what exists frozen.

A load builds hundreds of thousands of small objects (Numba's and numpy's imports, the GGUF metadata's token strings,
the BPE's vocabulary and merge pairs), and the collector runs every 700 new container objects and now and then over
all the older ones. Turning it back on after the load alone gave nothing back (its first pass then walks everything
the load left: 0.610 against 0.589 s to SmolLM2's first byte); `gc.freeze()` first moves what exists into the
permanent generation, which later passes skip: 0.580 -> 0.548 s (medians of 9, alternated, on the 2-core Intel host).
Only for `edgeq run` (cli.main), whose one model lives as long as the process: frozen objects are never collected, so
a process that drops models (the chat's model picker, a library user, the tests) keeps the collector as it is. It
runs again before a compile (warmup.warm_up: a first run, a model without its ready stamp; engine.Model where it
skips the warm-up), whose cyclic garbage comes by the megabyte."""
from __future__ import annotations

import gc

_held = False  # pause() turned the collector off and resume() has not run since


def pause() -> None:
    """Turn the collector off until resume() (a no-op when it is off already)."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def resume() -> None:
    """After pause(): freeze the objects that exist now, then turn the collector back on; otherwise nothing."""
    global _held
    if _held:
        _held = False
        gc.freeze()
        gc.enable()
