"""Numba settings that must be in place before numba is first imported.

The threading layer: Numba's `workqueue` aborts the process when two threads run parallel code at
once (the chat UI generates from a worker thread), so a thread-safe layer is required.

The SLP vectorizer (off by default in Numba) turns the per-block integer dot products of the quantized
matrix kernels (cpu_kernels/linear.py) into vpmaddwd on zmm registers: 3-4x faster decode. Numba's cache
key ignores these flags, so the on-disk cache lives in a folder named after them: a kernel compiled under
other settings is never loaded by mistake.
"""
import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")
if "NUMBA_CACHE_DIR" not in os.environ:
    _tag = "slp{}-lv{}-opt{}".format(os.environ["NUMBA_SLP_VECTORIZE"], os.environ.get("NUMBA_LOOP_VECTORIZE", "1"),
                                     os.environ.get("NUMBA_OPT", "3"))
    _base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_base, "edgeq", "numba-" + _tag)
