"""The OpenMP thread pools behind the parallel kernels (Numba's `omp` threading layer: edgeq/_numba_env.py).

The OpenMP runtime keeps a pool of worker threads for every thread that has started a parallel region, for as long
as that thread lives. When the pools' threads together outnumber the CPUs, libgomp throttles their spin-waiting:
a worker then sleeps between two kernels and every kernel waits for its wake-up. On the 2-core KVM host a parallel
launch from a second thread took 6.5-60 us against 2.6 us from one thread alone, and the server's scheduler driven
from its own thread after the model had decoded in the main thread (as `start_server` after `Model.generate` in
the same thread) took 18.1 ms a step for one sequence and 25.9-26.8 ms for eight, against 6.9 and 15.2 with that
thread's workers released (SmolLM2, 2 threads: `python benchmarks/serve_step.py --batches 1,8 --threads 2 --thread
[--keep-pool]`). `edgeq serve` loads the model without a parallel kernel in its main thread and was not slowed.
`release()` in the thread that hands its kernels over frees its pool (Scheduler.start calls it; ~20 us, and ~33 us
for that thread's next kernel to start a new one).
"""
from __future__ import annotations

import ctypes
import os

# the OpenMP runtimes Numba's omp layer links (GNU on Linux, LLVM's elsewhere); only an already loaded one is used
_LIBRARIES = ("libgomp.so.1", "libomp.so", "libomp.dylib", "libiomp5.so")
_PAUSE_SOFT = 1  # omp_pause_soft: the runtime frees its threads, keeps its state


_pause = None  # omp_pause_resource_all of the loaded runtime, once found


def _pause_all():
    """The loaded OpenMP runtime's omp_pause_resource_all, looked up once it is there (None until then: the runtime
    loads with the first parallel kernel)."""
    global _pause
    if _pause is None and hasattr(os, "RTLD_NOLOAD"):
        for name in _LIBRARIES:
            try:
                fn = ctypes.CDLL(name, mode=os.RTLD_NOLOAD).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            _pause = fn
            break
    return _pause


def release() -> bool:
    """Free the calling thread's OpenMP worker threads (`omp_pause_resource_all(omp_pause_soft)`, OpenMP 5.0): the
    next parallel kernel this thread starts makes a new pool. Call it where a thread is done launching kernels and
    another takes over. False where no loaded OpenMP runtime has it (another threading layer, an old runtime) or it
    refused (the caller is inside a parallel region)."""
    fn = _pause_all()
    return fn is not None and fn(_PAUSE_SOFT) == 0
