"""Cached kernels load without Numba's full target refresh (warmup.fast_cache_loads): they must still run right
(allocating kernels need the Numba runtime, parallel ones their thread pool), and a kernel that misses the cache
afterwards must still compile."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

KERNELS = textwrap.dedent('''
    import numpy as np
    from numba import njit, prange


    @njit(cache=True)
    def allocates(n):
        out = np.empty(n, dtype=np.float32)
        for i in range(n):
            out[i] = i * 0.5
        return out


    @njit(cache=True, parallel=True)
    def parallel_sum(x):
        out = np.zeros(x.shape[0])
        for i in prange(x.shape[0]):
            out[i] = x[i].sum()
        return out


    @njit(cache=True)
    def pair(x):
        return x.min(), x.max()


    @njit(cache=True)
    def scaled(x, k):
        return x * k + 1.0
''')

RUN = textwrap.dedent('''
    import json, sys
    import numpy as np
    import edgeq._numba_env  # noqa: F401
    from numba.core import event
    if sys.argv[1] == "fast":
        from edgeq.runtime.warmup import fast_cache_loads
        fast_cache_loads()
    compiled = []

    class Listen(event.Listener):
        def on_start(self, ev):
            compiled.append(ev.data["dispatcher"].py_func.__name__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Listen())
    from numba.core.runtime import nrtdynmod
    nrt_compiles = []
    _create = nrtdynmod.create_nrt_module
    nrtdynmod.create_nrt_module = lambda ctx: nrt_compiles.append(1) or _create(ctx)
    import kernels
    x = np.arange(12.0).reshape(3, 4)
    out = {"allocates": kernels.allocates(5).tolist(), "parallel_sum": kernels.parallel_sum(x).tolist(),
           "pair": list(kernels.pair(x[1])), "registries_loaded": "numba.np.polynomial.polynomial_functions" in sys.modules,
           "array_code_imported": "numba.np.arrayobj" in sys.modules}
    out["compiled_before_miss"] = list(compiled)
    out["scaled"] = kernels.scaled(2.0, 3.0)
    library = kernels.scaled.overloads[kernels.scaled.signatures[0]].library
    out["linking_module_parsed"] = library._shared_module is not None
    if len(sys.argv) > 2:  # a kernel that is not in the cache, after the fast loads
        from numba import njit

        @njit
        def fresh(a):
            return np.cumsum(a)[-1] * 2 + np.argmax(a)  # numpy lowering from the registries
        out["fresh"] = float(fresh(x[0]))

        @njit
        def caller(a):  # links the loaded kernel's module into its own
            return kernels.scaled(a, 2.0) + kernels.scaled(1.0, a)
        out["caller"] = caller(5.0)
    out["compiled"] = compiled
    out["nrt_compiled"] = bool(nrt_compiles)
    from llvmlite.binding import ffi
    out["lock_callbacks"] = len(ffi.lib._lock._cblist)
    print(json.dumps(out))
''')


def run(tmp_path, mode, *extra):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(tmp_path / "run.py"), mode, *extra], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_cached_kernels_load_and_run_without_the_full_refresh(tmp_path):
    (tmp_path / "kernels.py").write_text(KERNELS)
    (tmp_path / "run.py").write_text(RUN)
    first = run(tmp_path, "numba")  # compiles and saves all three
    assert {"allocates", "pair", "parallel_sum"} <= set(first["compiled_before_miss"])
    expected = {"allocates": [0.0, 0.5, 1.0, 1.5, 2.0], "parallel_sum": [6.0, 22.0, 38.0], "pair": [4.0, 7.0]}
    for k, v in expected.items():
        assert first[k] == v
    plain = run(tmp_path, "numba")  # Numba's own loads: the refresh imports every registry
    assert plain["compiled"] == [] and plain["registries_loaded"]
    fast = run(tmp_path, "fast", "miss")
    assert fast["compiled_before_miss"] == [], "loaded from the cache, not compiled"
    assert not fast["registries_loaded"], "the loads refreshed the whole target context"
    # the kernels' Environments name numba.np.arrayobj (np.empty, x.min()): Numba's loads import it for globals
    # that nopython code never reads; the fast loads stand a dict for it (warmup._light_environments)
    assert plain["array_code_imported"] and not fast["array_code_imported"]
    for k, v in expected.items():
        assert fast[k] == v
    # a miss after the fast loads compiles (Numba's compiler refreshes the context itself), without Numba's
    # llvm_lock events around every call into LLVM (warmup._quiet_llvm_lock)
    assert "fresh" in fast["compiled"] and fast["fresh"] == 6.0 * 2 + 3
    assert plain["lock_callbacks"] == 1 and fast["lock_callbacks"] == 0
    # the loaded kernel's linking module stays bitcode until something links against it (warmup._lazy_linking_modules)
    assert plain["linking_module_parsed"] and not fast["linking_module_parsed"]
    assert plain["scaled"] == fast["scaled"] == 7.0
    assert "caller" in fast["compiled"] and fast["caller"] == 11.0 + 6.0


def test_the_runtime_library_loads_from_the_cache(tmp_path):
    """The Numba runtime's compiled part (NRT_incref...) is saved beside the kernels at the first fast load and loaded
    from there after (warmup._initialize_nrt): allocating kernels run on it, a later cache miss links against it,
    and a damaged file is compiled again and replaced."""
    (tmp_path / "kernels.py").write_text(KERNELS)
    (tmp_path / "run.py").write_text(RUN)
    expected = {"allocates": [0.0, 0.5, 1.0, 1.5, 2.0], "parallel_sum": [6.0, 22.0, 38.0], "pair": [4.0, 7.0]}
    first = run(tmp_path, "fast")  # compiles the kernels (and the runtime, through Numba's compiler)
    assert first["nrt_compiled"]
    run(tmp_path, "fast")          # loads the kernels: the runtime is compiled once more and saved
    saved = list((tmp_path / "cache").glob("edgeq-nrt-*.pkl"))
    assert len(saved) == 1 and saved[0].stat().st_size > 1000
    loaded = run(tmp_path, "fast", "miss")
    assert not loaded["nrt_compiled"], "the runtime library was compiled although its object code was saved"
    assert loaded["compiled_before_miss"] == []
    for k, v in expected.items():
        assert loaded[k] == v
    assert "fresh" in loaded["compiled"] and loaded["fresh"] == 6.0 * 2 + 3
    saved[0].write_bytes(b"not a pickle" * 100)
    damaged = run(tmp_path, "fast")
    assert damaged["nrt_compiled"] and damaged["allocates"] == expected["allocates"]
    assert not run(tmp_path, "fast")["nrt_compiled"], "the damaged file was not replaced"


SAME_BITS = textwrap.dedent('''
    import hashlib, json
    import numpy as np
    import edgeq._numba_env  # noqa: F401
    from edgeq.cpu_kernels import ops
    rng = np.random.default_rng(0)
    w = rng.standard_normal(576).astype(np.float32)
    h = hashlib.sha256()
    for rows in (14, 40):  # RMSNorm's serial and parallel drivers, each calling the row function
        h.update(ops.rmsnorm(rng.standard_normal((rows, 576)).astype(np.float32), w, 1e-5).tobytes())
    print(json.dumps({"digest": h.hexdigest(), "compiled": bool(ops._rmsnorm_serial.stats.cache_misses)}))
''')


def test_a_kernel_computes_the_same_bits_compiled_and_loaded_from_the_cache(tmp_path):
    """The process that compiles a kernel and every later one that loads it from the disk cache compute the same
    bits (_numba_env.local_linked_copies): without it the compiling process's calls bound to the callee's
    standalone compile and later ones to the kernel's own copy, two optimizations of a fastmath reduction whose
    RMSNorm outputs differed by 6e-8 (a greedy near-tie flipped between a first run and the next)."""
    (tmp_path / "run.py").write_text(SAME_BITS)
    first, later = run(tmp_path, "-"), run(tmp_path, "-")
    assert first["compiled"] and not later["compiled"]
    assert first["digest"] == later["digest"]


def test_elf_symbols_are_the_linking_modules_definitions(tmp_path):
    """The symbols a cached kernel's object code defines (warmup.elf_defined_symbols) are those its linking module
    defines, which Numba parses the bitcode to list; anything that is not an ELF-64 object is None."""
    import llvmlite.binding as ll
    import numba

    from edgeq.runtime.warmup import elf_defined_symbols

    @numba.njit
    def kernel(x):
        return np.sum(x * x) if x.size else 0.0

    kernel(np.ones(3))
    library = kernel.overloads[kernel.signatures[0]].library
    object_code, bitcode = library.serialize_using_object_code()[2]
    module = ll.parse_bitcode(bitcode)
    defined = {g.name for gs in (module.functions, module.global_variables) for g in gs if not g.is_declaration}
    assert len(defined) > 3 and elf_defined_symbols(object_code) == defined
    for junk in (b"", b"\x7fELF", object_code[:100], b"\x7fELF\x02\x01" + b"\xff" * 200, b"MZ" + object_code[2:]):
        assert elf_defined_symbols(junk) is None


EXTENSIONS = textwrap.dedent('''
    import json, sys
    import numpy as np
    import edgeq._numba_env  # noqa: F401
    from edgeq.runtime.warmup import fast_cache_loads
    fast_cache_loads()
    from numba.core import entrypoints
    from edgeq.cpu_kernels import ops
    x = np.ones((3, 8), dtype=np.float32)
    ops.rmsnorm(x, np.ones(8, dtype=np.float32), 1e-5)
    out = {"compiled": bool(ops._rmsnorm_serial.stats.cache_misses), "after_edgeq": entrypoints._already_initialized}
    from numba import njit
    other = njit(lambda a: a + 1)
    out["other"] = other(1)
    out["after_other"] = entrypoints._already_initialized
    print(json.dumps(out))
''')


def test_edgeq_kernels_load_without_reading_every_distribution(tmp_path):
    """An edgeq kernel's first call skips Numba's extension entry points (found by reading the entry points of every
    installed distribution) where it loads from the cache; a compile runs them first, and so does any other
    dispatcher (warmup._defer_extension_init)."""
    (tmp_path / "run.py").write_text(EXTENSIONS)
    first, later = run(tmp_path, "-"), run(tmp_path, "-")
    assert first["compiled"] and first["after_edgeq"], "a compile initializes the extensions first"
    assert not later["compiled"] and not later["after_edgeq"]
    assert later["other"] == 2 and later["after_other"]
