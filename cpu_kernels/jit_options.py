"""Numba compile options shared by the CPU kernels."""


def prange_only() -> dict:
    """`parallel=` for a kernel whose parallelism is its explicit prange loops: Numba's other parallel rewrites
    (np.zeros / np.full / array expressions as parallel loops, loop fusion) are off. Each parallel loop is a
    gufunc compiled through a pipeline of its own (about a second of CPU each), and the kernels allocate only
    small per-job buffers, where a parallel fill only costs threads. A new dict per call: Numba consumes it."""
    return dict(prange=True, reduction=True, comprehension=False, inplace_binop=False, setitem=False, numpy=False,
                stencil=False, fusion=False)
