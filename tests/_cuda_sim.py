"""What the CUDA test modules (test_gpu_kernels.py, test_cuda_forward.py) share: numba.cuda imported under
numba-cuda's simulator, and the rerun of a module in a fresh process when that was not possible.

The simulator is chosen when `numba.cuda` is first imported (NUMBA_ENABLE_CUDASIM). The rest of the suite
never imports numba.cuda, so `import_numba_cuda()` sets the variable, imports numba.cuda, and puts the
variable back: the CPU kernels and any subprocess are unaffected. EDGEQ_CUDA_TESTS=gpu keeps the real GPU.
"""
import os
import subprocess
import sys

import pytest


def import_numba_cuda():
    """Import numba.cuda (under the simulator unless EDGEQ_CUDA_TESTS=gpu or it is imported already) and
    return edgeq.gpu_kernels.device; skip the calling module when numba-cuda is not installed."""
    if "numba.cuda" not in sys.modules and os.environ.get("EDGEQ_CUDA_TESTS") != "gpu":
        saved = os.environ.get("NUMBA_ENABLE_CUDASIM")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        try:
            import numba.cuda  # noqa: F401  (reads the variable now, once)
        except Exception:  # numba-cuda missing: device.cuda_module() says so below
            pass
        finally:
            if saved is None:
                del os.environ["NUMBA_ENABLE_CUDASIM"]
            else:
                os.environ["NUMBA_ENABLE_CUDASIM"] = saved
    from edgeq.gpu_kernels import device

    if device.simulator():
        _lock_simulator_shared_arrays()
    if device.cuda_module() is None:
        pytest.skip("numba-cuda is not installed (pip install edgeq[cuda])", allow_module_level=True)
    return device


def _lock_simulator_shared_arrays() -> None:
    """numba-cuda's simulator (0.30) hands a block's threads their `cuda.shared.array` by a check-then-set on a
    dict with no lock: two threads that enter at once each get an array of their own, so one thread's writes
    never reach the others (a block reduction then sums garbage: NaN or wrong logits now and then, more often
    on a loaded machine). The same lookup, keyed as the simulator keys it (the calling line), under a lock."""
    import threading

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    simulated = kernelapi.FakeCUDAShared.array
    if getattr(simulated, "edgeq_locked", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer), or the simulator's error
            return simulated(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    array.edgeq_locked = True
    kernelapi.FakeCUDAShared.array = array


def rerun_in_simulator(test_file: str) -> None:
    """Run a test module again in a fresh process with the simulator on; fail with its output."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("EDGEQ_CUDA_TESTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
