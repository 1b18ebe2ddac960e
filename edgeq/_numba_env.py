"""Numba settings that must be in place before numba is first imported.

The threading layer: Numba's `workqueue` aborts the process when two threads run parallel code at
once (the chat UI generates from a worker thread), so a thread-safe layer is required.

The SLP vectorizer (off by default in Numba) is turned on for the loops not written as explicit SIMD
(the float prefill GEMM, norms, activations). The quantized row dots that carry decode are explicit SIMD
(LLVM IR intrinsics in cpu_kernels/simd.py) and do not depend on it. Numba's cache key ignores these flags, so the on-disk cache lives in a folder named after them: a kernel compiled under
other settings (or for another EDGEQ_SIMD level) is never loaded by mistake.
"""
import hashlib
import importlib.util
import os
import sys


def _kernel_sources_hash() -> str:
    """8 hex digits of the kernel sources: every module of cpu_kernels/, and the modules of formats/ that are
    Numba code themselves (the codec searches) or that a kernel module imports (the registry it reads at compile
    time). Numba checks a cached function against its own file only, so an edit of a module it calls into
    (cpu_kernels/simd.py's intrinsics, an inlined helper) would otherwise load stale machine code: a folder per
    source version makes every kernel edit recompile, while an upgrade that changes no kernel source (the GGUF
    reader, the writer) keeps the cache."""
    def sources(package: str) -> dict[str, bytes]:
        spec = importlib.util.find_spec(package)
        out = {}
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        out[name] = f.read()
        return out

    kernels = sources("edgeq.cpu_kernels")
    imported = b"".join(kernels.values())
    formats = {name: text for name, text in sources("edgeq.formats").items()
               if b"numba" in text or b"edgeq.formats." + name[:-3].encode() in imported}
    h = hashlib.sha256()
    for package, files in (("edgeq.cpu_kernels", kernels), ("edgeq.formats", formats)):
        for name, text in files.items():
            h.update(package.encode() + name.encode() + b"\0" + text)
    return h.hexdigest()[:8]


def _prune_old_caches(current: str, max_age_days: float = 14.0) -> None:
    """Remove sibling numba-* cache folders untouched for two weeks (old source versions); never raises."""
    import shutil
    import time

    parent = os.path.dirname(current)
    try:
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            if name.startswith("numba-") and path != current and \
                    time.time() - os.path.getmtime(path) > max_age_days * 86400:
                shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")
if "NUMBA_CACHE_DIR" not in os.environ:
    # EDGEQ_SIMD (cpu_kernels/simd.py) picks the byte-dot instructions baked into the compiled kernels
    _tag = "slp{}-lv{}-opt{}-simd{}".format(os.environ["NUMBA_SLP_VECTORIZE"],
                                            os.environ.get("NUMBA_LOOP_VECTORIZE", "1"), os.environ.get("NUMBA_OPT", "3"),
                                            os.environ.get("EDGEQ_SIMD", "auto").strip().lower() or "auto")
    if os.environ.get("EDGEQ_SOFT_HALF") == "1":
        _tag += "-softhalf"
    _base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(_base, "edgeq", "numba-" + _tag + "-" + _kernel_sources_hash())
    _prune_old_caches(os.environ["NUMBA_CACHE_DIR"])

# OpenBLAS (numpy's BLAS) workers spin for ~2^28 cycles after each call before they sleep: in a calibration, where
# BLAS calls (Hessians, GPTQ updates, error products) alternate with numba's parallel kernels, a spinning worker
# took a core from numba (2 BLAS threads made the numba half 1.4x slower: nothing gained); 2^4 cycles lets them sleep
# at once (2 BLAS threads then 1.25x faster overall). OpenBLAS reads it when numpy loads it: in effect only where
# edgeq is imported before numpy (the CLI), which BLAS_SLEEPS records for calibrate.blas_threads' callers.
BLAS_SLEEPS = "numpy" not in sys.modules or os.environ.get("OPENBLAS_THREAD_TIMEOUT", "").strip() in ("1", "2", "3", "4")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def import_numba() -> None:
    """Import Numba without PyYAML where there is no config file for it to read. Numba's config module imports yaml
    whenever it is installed (huggingface-hub brings it), for a `.numba_config.yaml` in the working directory that
    is rarely there: 16-38 ms of every start. Without that file, yaml is kept out of Numba's import only (anything
    importing it later gets it); with it, Numba imports and reads it as ever."""
    if "numba" in sys.modules:
        return
    keep_out = "yaml" not in sys.modules and not os.path.exists(".numba_config.yaml")
    if keep_out:
        sys.modules["yaml"] = None  # `import yaml` raises ImportError: Numba's config goes without it
    try:
        import numba  # noqa: F401
    finally:
        if keep_out and "yaml" in sys.modules and sys.modules["yaml"] is None:
            del sys.modules["yaml"]


def plain_array_typeof() -> None:
    """Numba types an ndarray argument (each kernel's first call, a matrix's specialization) after checking it is no
    `np.ma.MaskedArray`, and that attribute imports numpy.ma (10-22 ms of a start) in a process that has none. An
    array whose type is exactly np.ndarray is never a masked one: it is typed as Numba's function does, less that
    check, until numpy.ma has been imported anyway; subclasses, and everything once numpy.ma is loaded, go to
    Numba's own function."""
    import numpy as np
    from numba.core import errors, types
    from numba.core.typing import typeof
    from numba.np import numpy_support

    impl = getattr(typeof, "typeof_impl", None)
    numba_fn = impl.dispatch(np.ndarray) if hasattr(impl, "dispatch") else None
    if numba_fn is None or getattr(numba_fn, "edgeq_plain", False):
        return
    if not all(hasattr(numpy_support, a) for a in ("from_dtype", "map_layout")):
        return

    def typeof_ndarray(val, c):
        if type(val) is not np.ndarray or "numpy.ma" in sys.modules:
            return numba_fn(val, c)
        try:
            dtype = numpy_support.from_dtype(val.dtype)
        except errors.NumbaNotImplementedError:
            raise errors.NumbaValueError(f"Unsupported array dtype: {val.dtype}")
        return types.Array(dtype, val.ndim, numpy_support.map_layout(val), readonly=not val.flags.writeable)

    typeof_ndarray.edgeq_plain = True
    impl.register(np.ndarray)(typeof_ndarray)


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
