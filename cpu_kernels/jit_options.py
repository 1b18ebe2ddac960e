"""Numba compile options shared by the CPU kernels."""


def prange_only() -> dict:
    """`parallel=` for a kernel whose parallelism is its explicit prange loops: Numba's other parallel rewrites
    (np.zeros / np.full / array expressions as parallel loops, loop fusion) are off. Each parallel loop is a
    gufunc compiled through a pipeline of its own (about a second of CPU each), and the kernels allocate only
    small per-job buffers, where a parallel fill only costs threads. A new dict per call: Numba consumes it."""
    return dict(prange=True, reduction=True, comprehension=False, inplace_binop=False, setitem=False, numpy=False,
                stencil=False, fusion=False)


def local_linked_copies() -> None:
    """Make each compiled kernel call its own copies of the functions it was linked with, in every process.

    Numba links a kernel's callees (row helpers, Numba's own numpy implementations) into the kernel's module as
    `linkonce_odr` copies, weak symbols in the object code. In the process that compiles them, every callee is also
    compiled on its own first and defined in the JIT, and the dynamic linker binds the kernel's calls to those
    standalone definitions; a later process loads the kernel from the disk cache with no standalone callee, and its
    calls bind to the kernel's own copies. The two copies are the same source optimized in different modules, and
    fastmath lets the optimizer order a reduction differently in each: a first run computed other bits than every
    later run (RMSNorm 6e-8 apart, enough to flip a greedy near-tie). Internal linkage, set after the module's
    optimization (the machine code is the same), binds the copies locally in both cases."""
    from llvmlite import binding as ll
    from numba.core import codegen

    lib = codegen.CPUCodeLibrary
    if not hasattr(lib, "_finalize_final_module") or not hasattr(ll.Linkage, "linkonce_odr"):
        return  # a Numba or llvmlite built otherwise: their own binding (the bits of a first run may differ)
    if getattr(lib._finalize_final_module, "edgeq_local", False):
        return
    finalize = lib._finalize_final_module

    def _finalize_final_module(self):
        for fn in self._final_module.functions:
            if not fn.is_declaration and fn.linkage == ll.Linkage.linkonce_odr:
                fn.linkage = ll.Linkage.internal
        return finalize(self)

    _finalize_final_module.edgeq_local = True
    lib._finalize_final_module = _finalize_final_module
