"""`edgeq run`'s start: Python's cyclic garbage collector off until the model is loaded, then its objects frozen.

A load builds hundreds of thousands of small objects (Numba's and numpy's imports, the GGUF metadata's token strings,
the BPE's vocabulary and merge pairs), and the collector, run every 700 new container objects and now and then over
all the older ones, took ~50 ms of SmolLM2's warm start on the 2-core Intel host. Turning it back on alone gives that
back (its first pass then walks everything the load left); `gc.freeze()` first moves what exists into the permanent
generation, which later passes skip. Only for `edgeq run` (cli.main), whose one model lives as long as the process:
frozen objects are never collected, so a process that drops models (the chat's model picker, a library user, the
tests) keeps the collector as it is. It runs again before a first run's compile (engine.Model), whose cyclic garbage
comes by the megabyte."""
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
