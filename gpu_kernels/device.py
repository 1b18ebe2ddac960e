"""Where the CUDA kernels run: a real GPU through numba-cuda, or numba-cuda's simulator.

The simulator (NUMBA_ENABLE_CUDASIM=1, read once when `numba.cuda` is first imported) runs every CUDA
thread as a Python thread on the CPU: slow, but it needs no GPU, so the kernels can be checked anywhere.
Install with `pip install edgeq[cuda]` (numba-cuda); on a GPU machine add the toolkit wheels with
`pip install "numba-cuda[cu12]"` or `"numba-cuda[cu13]"` to match the driver.
"""
from __future__ import annotations

import numpy as np


def cuda_module():
    """`numba.cuda`, or None when numba-cuda is not installed (or fails to import)."""
    try:
        from numba import cuda
    except Exception:  # ImportError, or missing CUDA bindings raised as something else
        return None
    return cuda


def simulator() -> bool:
    """True when numba.cuda runs in its CPU simulator."""
    cuda = cuda_module()
    if cuda is None:
        return False
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def available() -> bool:
    """numba-cuda is importable and a GPU (or the simulator) is there to run kernels."""
    cuda = cuda_module()
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken: treat as no GPU
        return False


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
