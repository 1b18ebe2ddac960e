"""Numba settings that must be in place before numba is first imported.

The threading layer: Numba's `workqueue` aborts the process when two threads run parallel code at
once (the chat UI generates from a worker thread), so a thread-safe layer is required.
"""
import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
