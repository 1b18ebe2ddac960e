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

    if device.cuda_module() is None:
        pytest.skip("numba-cuda is not installed (pip install edgeq[cuda])", allow_module_level=True)
    return device


def rerun_in_simulator(test_file: str) -> None:
    """Run a test module again in a fresh process with the simulator on; fail with its output."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("EDGEQ_CUDA_TESTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
