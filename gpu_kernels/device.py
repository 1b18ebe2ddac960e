"""Where the CUDA kernels run: a real GPU through numba-cuda, or numba-cuda's simulator.

The simulator (NUMBA_ENABLE_CUDASIM=1, read once when `numba.cuda` is first imported) runs every CUDA
thread as a Python thread on the CPU: slow, but it needs no GPU, so the kernels can be checked anywhere.
Install with `pip install edgeq[cuda]` (numba-cuda); on a GPU machine add the toolkit wheels with
`pip install "numba-cuda[cu12]"` or `"numba-cuda[cu13]"` to match the driver.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np


def cuda_module():
    """`numba.cuda`, or None when numba-cuda is not installed (or fails to import)."""
    try:
        from numba import cuda
    except Exception:  # ImportError, or missing CUDA bindings raised as something else
        return None
    return cuda


def simulator() -> bool:
    """True when numba.cuda runs in its CPU simulator.

    Asked of the module itself: numba.cuda picks the simulator once, at import, but numba's config flag
    (ENABLE_CUDASIM) is re-read from the environment later, so it may no longer say so."""
    cuda = cuda_module()
    if cuda is None:
        return False
    return "simulator" in getattr(cuda.is_available, "__module__", "")


def available() -> bool:
    """numba-cuda is importable and a GPU (or the simulator) is there to run kernels."""
    cuda = cuda_module()
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken: treat as no GPU
        return False


def installed() -> bool:
    """numba-cuda is installed (checked without importing it)."""
    if "numba.cuda" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("numba_cuda") is not None
    except (ImportError, ValueError):
        return False


def _driver_visible() -> bool:
    """An NVIDIA driver could be there (Linux: its device nodes; WSL: /dev/dxg). Other systems: maybe."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg"))


def gpu_present() -> bool:
    """A real GPU (not the simulator) can run the kernels: what `device="auto"` asks.

    Cheap when there is obviously none (numba-cuda missing, no driver, or the simulator requested):
    `numba.cuda` is then not imported, so a later import can still choose the simulator."""
    if "numba.cuda" not in sys.modules:
        if not installed() or os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
            return False
        if not _driver_visible():
            return False
    return available() and not simulator()


def unavailable_reason() -> str:
    """Why there is no CUDA device to run on, in a few words (for one-line messages)."""
    if not installed() or cuda_module() is None:
        return "numba-cuda not installed; pip install 'edgeq[cuda]' 'numba-cuda[cu12]'"
    if simulator():
        return "numba-cuda simulator only"
    return "no CUDA GPU or driver found"


def describe() -> str:
    """One line for logs and `edgeq bench`: which device the kernels run on."""
    if not available():
        return "no CUDA device"
    if simulator():
        return "numba-cuda simulator (CPU)"
    dev = cuda_module().get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return f"{name} (compute {dev.compute_capability[0]}.{dev.compute_capability[1]})"


def to_device(a: np.ndarray):
    """Copy a host array to the device (contiguous first: kernels index raw strides)."""
    return cuda_module().to_device(np.ascontiguousarray(a))


def device_empty(shape, dtype=np.float32):
    return cuda_module().device_array(shape, dtype=dtype)
