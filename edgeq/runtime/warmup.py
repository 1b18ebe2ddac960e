"""Compile (or load from Numba's disk cache) every CPU kernel a loaded model can reach, before its first token.

Numba compiles a kernel at its first call with new argument types. Without this, a fresh machine compiles the
prefill kernels before the first token and the single-token decode kernels right after it, mid-reply, where
neither Ctrl-C nor Esc can act. Instead, scratch forward passes with the model's own weights (memory-mapped,
read-only: their own Numba types) over a throwaway KV cache of the model's cache types take every path that
generation takes: a batched prefill (dequantize + float GEMM, all logits), a short one (integer kernel, batched
attention), single-token decode, and a rewind into stored positions (a chat's next turn). Specializations
depend on array types, never on sizes or positions, so a few positions stand for any context length.

The passes run in a daemon thread while the caller waits in short joins: Numba spends most of a compile in LLVM
(ctypes, GIL released), so Ctrl-C reaches the caller at once; an interrupted compile finishes in the background
or dies with the process.

Once the passes have run for a file and cache types, a stamp in the kernel cache folder says so (`ready_stamp`),
and later loads skip them: every kernel they would reach is in Numba's disk cache, and loads at its first real
call (milliseconds) instead of in scratch passes that cost a forward pass (Gemma 3: a 262k-row classifier).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

from edgeq.cpu_kernels.ops import sample_top_k

Report = Callable[[str], None]

FIRST_RUN_MESSAGE = "preparing kernels for this CPU, once (a minute or two on a slow machine)…"
# the end of an early start's first-run line (benchmarks/first_run.py waits for the worker's stamp when it sees it)
BACKGROUND_MESSAGE = "the kernels for long prompts finish compiling in the background, cached for the next run"
_SCRATCH_CTX = 64
_POLL_S = 0.05
_WORKER_WAIT_S = 300.0
_WORKER_LIFE_S = 900.0  # an early start's worker never outlives this


# (tokens, position, all_logits) of each scratch pass, in order (each starts from the cache the previous left)
PASSES = (
    (8, 0, True),     # every row's logits (perplexity): the classifier's GEMM, on 8 rows (memory)
    (40, 0, False),   # a prompt: GEMM path; 32-position groups (q4 keys) full and partial
    (3, 40, False),   # a short prompt: integer kernel, batched attention
    (1, 43, False),   # decode
    (1, 31, False),   # a rewind into a stored group, completed by one token (an array layout of its own)
    (2, 20, False),   # a rewind by a few tokens, as a chat's next turn does
)
# the single-token passes, which a worker process can compile over a cache that only looks filled (_decode_worker)
DECODE_PASSES = PASSES[3:5]


def _scratch_cache(cfg, cache_types, filled: int = 0):
    """A throwaway KV cache of `cache_types` whose first `filled` positions look held (as zeros)."""
    from edgeq.runtime.kv_cache import make_kv_cache

    cache = make_kv_cache(cfg.kv_layouts(), _SCRATCH_CTX, *cache_types, max_batch=_SCRATCH_CTX)
    cache.pretend_filled(filled)
    return cache


def _run_passes(arch, weights, cfg, cache, passes, before_decode: Callable[[], None] = lambda: None) -> None:
    """Run `passes` over `cache` (a scratch cache, or _NoAttention); `before_decode()` runs before the first
    single-token pass."""
    waited = False
    for n, pos, all_logits in passes:
        if n == 1 and not waited:
            before_decode()
            waited = True
        ids = np.arange(1, n + 1, dtype=np.int64) % cfg.n_vocab
        logits = arch.forward(weights, cfg, ids, pos, cache, all_logits=all_logits)
    if waited:  # the sampler's kernel (~1.3 s to compile), where the single-token kernels compile
        sample_top_k(np.ascontiguousarray(logits[-1], dtype=np.float32), 1, 1.0, 0.0, 1.0, 0.5)


class _NoAttention:
    """A KV cache stand-in for single-token passes whose attention is zeros: the passes then compile every kernel
    they reach except attention's (an early start's worker compiles those meanwhile, `_attention_passes`)."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx

    def decode_step(self, caches, positions):
        return self

    def attend(self, il, q, k, v, scale):
        return np.zeros(q.shape, np.float32)


def _attention_passes(cfg, cache_types) -> None:
    """The attention kernels of DECODE_PASSES alone: the decode kernel's store-and-attend and a rewind's store and
    attend, called on a scratch cache layer by layer with zero rows (the types, not the values, decide what
    compiles)."""
    layouts = cfg.kv_layouts()
    cache = _scratch_cache(cfg, cache_types, filled=DECODE_PASSES[0][1])
    for _, pos, _ in DECODE_PASSES:
        step = cache.decode_step([cache], np.array([pos]))
        for il, L in enumerate(layouts):
            z = np.zeros((1, L.n_kv_heads, L.head_dim), np.float32)
            step.attend(il, z, z, z, 1.0)


def _compile_stores(cfg, cache_types) -> None:
    """The decode kernel's row stores (compiled for the one signature it calls them with, cpu_kernels/native_call.py)
    and a rewind's store, called on a scratch cache: an early start's main process compiles them while its worker
    compiles the decode job (`_compile_decode_job`), before the decode kernel needs both."""
    from edgeq.cpu_kernels import attention_q as aq
    from edgeq.cpu_kernels import native_call

    pos, rewind = DECODE_PASSES[0][1], DECODE_PASSES[1][1]
    cache = _scratch_cache(cfg, cache_types, filled=pos + 1)
    for il, L in enumerate(cache.layers):
        z = np.zeros((1, L.n_kv, L.D), np.float32)
        for side in (L.k, L.v):
            native_call.address(aq.store_row_for(side.side.layout))  # compiled (called only from the decode kernel)
        cache.store(il, rewind, z, z)  # a rewind's store (the second single-token pass): the cache's own codecs


def _compile_decode_job(cfg, cache_types) -> None:
    """The decode kernel's job (and the row loads it calls) for the signatures the kernel calls them with, and its
    split merge, called with the argument types the kernel gives it."""
    from edgeq.cpu_kernels import attention_q as aq

    pos = DECODE_PASSES[0][1]
    for L in _scratch_cache(cfg, cache_types, filled=pos).layers:
        H, D = L.n_kv, L.D
        pm, pl, pacc = np.zeros((1, H), np.float32), np.ones((1, H), np.float32), np.zeros((1, H, D), np.float32)
        aq.addresses(L.k.side.layout, L.v.side.layout, aq.LOADS + ("job",))  # compiled: the row loads, the job
        aq._merge_splits(pm, pl, pacc, 0, np.zeros(D, np.float32))
        aq.decode_splits(L.n_kv, pos, L.window, 1)


def _compile_decode_step(arch) -> None:
    """The compiled decode step (cpu_kernels/decode_pass.py) of an architecture that has one (the Llama family's
    modules share llama.py's forward), which needs no model to compile: it calls every kernel through an address
    it is given."""
    if hasattr(sys.modules.get(getattr(arch.forward, "__module__", ""), None), "compiled_step"):
        from edgeq.cpu_kernels import decode_pass

        decode_pass.compile()


def scratch_passes(model, before_decode: Callable[[], None] = lambda: None) -> None:
    """Run every forward path of `model` once over a throwaway KV cache (the model's own cache is untouched);
    `before_decode()` runs before the single-token passes (warm_up waits there for its decode worker)."""
    model._set_threads()  # Numba's thread count is per calling thread
    _run_passes(model.arch, model.weights, model.cfg, _scratch_cache(model.cfg, model.cache_types), PASSES,
                before_decode)
    _compile_decode_step(model.arch)  # loaded from the disk cache where the decode worker compiled it
    _run_passes(model.arch, model.weights, model.cfg,
                _scratch_cache(model.cfg, model.cache_types, DECODE_PASSES[0][1]), DECODE_PASSES[:1])


@contextlib.contextmanager
def _on_first_compile(callback: Callable[[], None]):
    """Calls `callback()` once, at the first real compile while inside (a kernel loaded from the disk cache is
    no compile). Yields a dict whose "compiled" says whether one happened."""
    from numba.core import event

    seen = {"compiled": False}

    class FirstCompile(event.Listener):
        def on_start(self, ev):
            if not seen["compiled"]:
                seen["compiled"] = True
                callback()

        def on_end(self, ev):
            pass

    listener = FirstCompile()
    event.register("numba:compile", listener)
    try:
        yield seen
    finally:
        event.unregister("numba:compile", listener)


def ready_stamp(model) -> str | None:
    """The file whose presence says the scratch passes already ran for this model file and cache types against
    this kernel cache: None when there is no on-disk cache. The key holds what decides whether Numba's cache
    can serve every kernel: the file (path, size, mtime), the cache types, the kernel sources' hash (a cache
    folder named by the user is not keyed by it), Numba's and Python's versions."""
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    if not cache_dir:
        return None
    import numba

    from edgeq import _numba_env

    try:
        st = os.stat(model.path)
        sources = _numba_env._kernel_sources_hash()
    except (AttributeError, OSError):
        return None
    key = repr((str(os.path.abspath(model.path)), st.st_size, st.st_mtime_ns, tuple(model.cache_types),
                sources, numba.__version__, sys.version_info[:2]))
    return os.path.join(cache_dir, "edgeq-ready", hashlib.sha256(key.encode()).hexdigest()[:24])


def _write_stamp(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("every kernel this model file and cache types reach is in this cache\n")
    except OSError:
        pass  # a read-only cache: the passes run again next time, nothing worse


def _serialize_cache_saves() -> bool:
    """Make each Numba cache save (index read, index write, data write: three steps) atomic across processes with
    a lock file in the cache folder. Each file is written to a temporary name and renamed (numba/core/caching.py),
    so a reader never sees half a file, but two processes saving two signatures of one function at once can leave
    the index naming one signature's data file while the other's code fills it: loaded, that would run with the
    wrong argument types. The warm-up's decode worker and the main process compile shared helpers at the same time.
    An interrupted save leaves an index entry without its data file at worst, which Numba treats as a miss.
    False where there is no flock (not POSIX): then no worker runs."""
    try:
        import fcntl
    except ImportError:
        return False
    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "edgeq_locked", False):
        return True

    def locked_save(self, key, data):
        try:
            f = open(os.path.join(self._cache_path, ".edgeq-save.lock"), "a")
        except OSError:
            return save(self, key, data)  # a read-only cache: no save will succeed anyway
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            return save(self, key, data)

    locked_save.edgeq_locked = True
    caching.IndexDataCacheFile.save = locked_save
    return True


def fast_cache_loads() -> None:
    """Load cached kernels without Numba's full target refresh. Numba's cache calls `target_context.refresh()`
    before every load: the first one imports and installs every typing and lowering registry (numpy, typed
    containers, random, linalg...: ~0.2 s of a warm start, half of what loading the first token's 15 kernels costs),
    although a loaded kernel is machine code that is never typed or lowered again. A load needs only the Numba
    runtime (NRT: the allocator the kernels call), initialized here; a kernel that misses the cache compiles through
    Numba's compiler, which refreshes the context itself before it types anything."""
    from numba.core import caching
    from numba.core.runtime import rtsys

    if getattr(caching.Cache.load_overload, "edgeq_fast", False):
        return
    if not all(hasattr(caching.Cache, a) for a in ("_load_overload", "_guard_against_spurious_io_errors")) \
            or not hasattr(rtsys, "initialize"):
        return  # a Numba whose cache is built otherwise: its own loads, slower but right

    def load_overload(self, sig, target_context):
        _initialize_nrt(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        # None when the guard swallowed an I/O error (as Numba's own load_overload)

    load_overload.edgeq_fast = True
    caching.Cache.load_overload = load_overload
    _light_environments()
    _quiet_llvm_lock()
    _lazy_linking_modules()
    _defer_extension_init()


def _quiet_llvm_lock() -> None:
    """Drop the callbacks Numba hangs on llvmlite's lock: each of them broadcasts a "numba:llvm_lock" event (an Event
    object, a walk over the listeners) at every acquire and release, that is around every call into LLVM, and only
    Numba's compile statistics listen (the llvm_lock timer of a dispatcher's metadata, then absent). Loading the 19
    cached kernels of SmolLM2's first token makes ~4100 such calls: launch to first byte of `edgeq run --chat -p Hi`
    0.575 / 0.570 -> 0.563 / 0.562 s (medians of 11, alternated, twice), Gemma 3 0.631 -> 0.600 (of 7)."""
    from llvmlite.binding import ffi

    lock = getattr(getattr(ffi, "lib", None), "_lock", None)
    callbacks = getattr(lock, "_cblist", None)
    if not isinstance(callbacks, list):
        return  # an llvmlite built otherwise: its lock as it is
    for acq, rel in list(callbacks):
        if getattr(acq, "__qualname__", "") == "_initialize_llvm_lock_event.<locals>.enter_fn":
            ffi.unregister_lock_callback(acq, rel)


def elf_defined_symbols(obj: bytes) -> set[str] | None:
    """Names of the symbols an ELF-64 little-endian object file defines (its .symtab, less undefined, section and
    file symbols); None for any other format or a table that does not parse."""
    import struct

    try:
        if obj[:6] != b"\x7fELF\x02\x01":
            return None
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
        names = set()
        for i in range(shnum):
            sh = shoff + i * shentsize
            if struct.unpack_from("<I", obj, sh + 4)[0] != 2:  # SHT_SYMTAB
                continue
            off, size, link = struct.unpack_from("<QQI", obj, sh + 24)
            strings, = struct.unpack_from("<Q", obj, shoff + link * shentsize + 24)
            for name, info, _, section, _, _ in struct.iter_unpack("<IBBHQQ", obj[off:off + size - size % 24]):
                if section == 0 or name == 0 or info & 0xF in (3, 4):  # undefined, STT_SECTION, STT_FILE
                    continue
                start = strings + name
                names.add(obj[start:obj.index(b"\0", start)].decode())
        return names
    except (struct.error, ValueError, OverflowError):  # UnicodeDecodeError is a ValueError
        return None


def _lazy_linking_modules() -> None:
    """Load a cached kernel without parsing its linking module. Numba caches a kernel as its machine code and, beside
    it, the LLVM bitcode of the same module that another function compiled later would link in; a load parses that
    bitcode at once (2.4 ms a kernel here, 49 of the ~75 ms that SmolLM2's first token spends loading its 20 cached
    libraries) only to list the symbols it defines, which the machine code's own symbol table lists as well
    (identical sets on all of them). The bitcode is kept and parsed the first time something links against it
    (`_get_module_for_linking`), which a warm run never does. Objects other than ELF-64 load Numba's way."""
    import llvmlite.binding as ll
    from numba.core import codegen

    lib_cls = codegen.CPUCodeLibrary
    if getattr(lib_cls._unserialize, "edgeq_lazy", False):
        return
    if not all(hasattr(lib_cls, a) for a in ("_unserialize", "_get_module_for_linking", "_set_compiled_object",
                                             "enable_object_caching", "_finalize_final_module")):
        return
    numba_unserialize = lib_cls._unserialize.__func__
    numba_linking = lib_cls._get_module_for_linking

    def unserialize(cls, cg, state):
        name, kind, data = state
        engine = getattr(cg, "_engine", None)
        names = elf_defined_symbols(data[0]) if kind == "object" else None
        if not names or not isinstance(getattr(engine, "_defined_symbols", None), set):
            return numba_unserialize(cls, cg, state)  # not ELF-64, or no symbol found: Numba's way
        self = cg.create_library(name)
        self.enable_object_caching()
        self._set_compiled_object(data[0])
        self._edgeq_linking_bitcode = data[1]
        self._finalize_final_module()
        engine._defined_symbols |= names
        return self

    def get_module_for_linking(self):
        bitcode = self.__dict__.pop("_edgeq_linking_bitcode", None)
        if bitcode is not None and self._shared_module is None:
            self._shared_module = ll.parse_bitcode(bitcode)
        return numba_linking(self)

    unserialize.edgeq_lazy = True
    lib_cls._unserialize = classmethod(unserialize)
    lib_cls._get_module_for_linking = get_module_for_linking


def _defer_extension_init() -> None:
    """Numba's first call of any dispatcher runs every installed `numba_extensions` entry point, found by reading the
    entry points of every installed distribution (10-15 ms with this venv's 90; more in a larger environment), so
    that a type an extension defines can be typed. edgeq's kernels take numpy arrays and scalars only: their first
    calls skip it, and a kernel that misses the cache runs it before it compiles (the same order as Numba's). Every
    other dispatcher in the process keeps Numba's hook as it is."""
    from numba.core import dispatcher, entrypoints

    dispatcher_cls, compiler_cls = dispatcher.Dispatcher, getattr(dispatcher, "_FunctionCompiler", None)
    numba_hook = getattr(dispatcher_cls, "_compilation_chain_init_hook", None)
    if numba_hook is None or compiler_cls is None or not hasattr(entrypoints, "init_all"):
        return
    if getattr(numba_hook, "edgeq_deferred", False):
        return
    numba_compile = compiler_cls.compile

    def hook(self):
        if not str(getattr(self.py_func, "__module__", "")).startswith("edgeq."):
            numba_hook(self)

    def compile(self, args, return_type):
        entrypoints.init_all()
        return numba_compile(self, args, return_type)

    hook.edgeq_deferred = True
    dispatcher_cls._compilation_chain_init_hook = hook
    compiler_cls.compile = compile


def _light_environments() -> None:
    """A cached kernel's pickle rebuilds the Environment of every function it was compiled from, each by importing
    that function's module for its globals: kernels that inline Numba's array code import `numba.np.arrayobj`
    and `arraymath`, and with them Numba's string, linalg and SciPy registries (~25 ms of a warm start) that the
    machine code never calls. A nopython function never reads its Environment's globals (only object mode does,
    which edgeq's kernels never use), so a module not imported yet is stood for by a dict that names it."""
    import importlib

    from numba.core import environment

    if getattr(environment._rebuild_env, "edgeq_light", False):
        return
    if not all(hasattr(environment, a) for a in ("lookup_environment", "Environment")):
        return

    def rebuild_env(modname, consts, env_name):
        env = environment.lookup_environment(env_name)
        if env is not None:
            return env
        mod = sys.modules.get(modname)
        if mod is None and not str(modname).startswith("numba."):
            mod = importlib.import_module(modname)
        env = environment.Environment(mod.__dict__ if mod is not None else {"__name__": modname})
        env.consts[:] = consts
        env.env_name = env_name
        environment.Environment._memo[env_name] = env
        return env

    rebuild_env.edgeq_light = True
    environment._rebuild_env = rebuild_env


def _initialize_nrt(ctx) -> None:
    """Numba's `rtsys.initialize`, with its compiled part from a file of the kernel cache after the first time.

    The runtime's atomic reference counts (`NRT_incref`...) are LLVM IR that Numba compiles in every process: 30-50
    ms, and the optimizer and code generator it runs stay resident (~20 MB of libllvmlite's pages that loading
    cached kernels alone never touches). The same library as object code, loaded the way Numba loads a cached kernel,
    costs ~6 ms and ~9 MB. Keyed by what decides the machine code (Numba's and llvmlite's versions, the CPU and its
    features, the optimization level); anything unexpected falls back to Numba's own initialize."""
    from numba.core.runtime import rtsys

    if getattr(rtsys, "_init", None) is not False:  # done already, or a runtime built otherwise
        rtsys.initialize(ctx)
        return
    try:
        from numba.core.runtime import _nrt_python as _nrt
        from numba.core.runtime import nrtdynmod

        from llvmlite import binding as ll
        from numba.core import config

        path = _nrt_cache_path(ctx)
        if path is None or not hasattr(_nrt, "c_helpers"):
            raise LookupError
        if config.NRT_STATS:
            _nrt.memsys_enable_stats()
        for py_name, address in _nrt.c_helpers.items():  # the C helpers the library calls, as rtsys registers them
            ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)
        library = _load_nrt(ctx, path)
        if library is None:
            from numba.core import compiler_lock

            with compiler_lock.global_compiler_lock:
                ir_mod, library = nrtdynmod.create_nrt_module(ctx)
                library.enable_object_caching()
                library.add_ir_module(ir_mod)
                library.finalize()
            _save_nrt(library, path)
    except Exception:  # noqa: BLE001 (a Numba built otherwise: its own initialize, slower but right)
        rtsys.initialize(ctx)
        return
    rtsys._library = library
    rtsys._init = True


def _nrt_cache_path(ctx) -> str | None:
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    if not cache_dir:
        return None
    import llvmlite
    import numba
    from llvmlite import binding as ll
    from numba.core import config

    codegen = ctx.codegen()
    key = repr((numba.__version__, llvmlite.__version__, sys.version_info[:2], ll.get_process_triple(),
                ll.get_host_cpu_name(), codegen._tm_features, config.OPT))
    return os.path.join(cache_dir, "edgeq-nrt-" + hashlib.sha256(key.encode()).hexdigest()[:24] + ".pkl")


def _load_nrt(ctx, path: str):
    import pickle

    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
        library = ctx.codegen().unserialize_library(state)
        library.get_pointer_to_function("NRT_incref")  # links it now: a damaged file fails here, not in a kernel
        return library
    except Exception:  # noqa: BLE001 (missing, truncated or from another build: compile it again)
        return None


def _save_nrt(library, path: str) -> None:
    import pickle

    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump(library.serialize_using_object_code(), f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _use_worker() -> bool:
    """Whether a first run compiles the decode kernels in a second process: more than one CPU, and not turned off
    (EDGEQ_WARMUP_WORKER=0, for A/B measurements)."""
    return (os.cpu_count() or 1) > 1 and os.environ.get("EDGEQ_WARMUP_WORKER", "1") != "0"


def _spawn_worker(model, extra: list[str], pipes: bool):
    """A worker process running this module (`__main__` below) on the model's file and cache types, its stdin and
    stdout pipes ours when `pipes`; None if it cannot start."""
    k, v = model.cache_types
    io = subprocess.PIPE if pipes else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "edgeq.runtime.warmup", str(model.path), k or "", v or "",
                                 *extra], stdin=io, stdout=io, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, EDGEQ_PARENT_PID=str(os.getpid())))
    except OSError:
        return None


def _start_decode_worker(model):
    """A process that compiles the single-token passes' kernels into the shared disk cache (`_decode_worker`)
    while this one compiles the prompt passes' kernels; None if it cannot start."""
    return _spawn_worker(model, [], pipes=False)


def _watch_parent(keep: threading.Event | None = None) -> None:
    """In a worker: exit when the parent process does (a parent killed by a signal cannot stop it), until `keep`
    is set (from then on the worker may outlive it)."""
    parent = int(os.environ.get("EDGEQ_PARENT_PID", "0"))
    if not parent:
        return

    def watch() -> None:
        while keep is None or not keep.is_set():
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def _open_in_worker(path: str):
    """A worker's start: safe cache saves, light cache loads, one thread (the other cores are compiling, then
    answering); the GGUF file, its architecture and config."""
    _serialize_cache_saves()
    fast_cache_loads()
    import numba

    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.models import architecture

    numba.set_num_threads(1)
    gf = GGUFFile(path)
    arch = architecture(gf.arch)
    return gf, arch, arch.Config.from_gguf(gf)


def _decode_worker(path: str, type_k: str | None, type_v: str | None) -> None:
    """The worker's side: the model's weights (memory-mapped) and the decode passes over a scratch cache whose first
    positions only look held. Exits when its parent does."""
    _watch_parent()
    gf, arch, cfg = _open_in_worker(path)
    _compile_decode_step(arch)
    weights = arch.load_weights(gf, cfg)
    _run_passes(arch, weights, cfg, _scratch_cache(cfg, (type_k, type_v), DECODE_PASSES[0][1]), DECODE_PASSES)


def _start_early_worker(model, stamp: str):
    """An early start's worker process (`_early_worker`), its stdin and stdout pipes ours; None if it cannot start."""
    return _spawn_worker(model, [stamp], pipes=True)


def _early_worker(path: str, type_k: str | None, type_v: str | None, stamp: str) -> None:
    """An early start's worker: the decode kernel's job, then (once the parent says "stores": the row stores it
    compiled meanwhile are in the disk cache) the single-token attention kernels (then "attention" on stdout), then every
    scratch pass (the prompt kernels compile; what the main process saved loads), then the ready stamp. Until its
    parent writes "keep" to its stdin (the parent is answering), it exits with its parent (Ctrl-C of a first run
    stops everything); after that it finishes the cache even if the parent has exited, within _WORKER_LIFE_S."""
    heard = {"stores": threading.Event(), "keep": threading.Event()}

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() in heard:
                heard[line.strip()].set()
            if heard["keep"].is_set():
                return

    _watch_parent(heard["keep"])
    threading.Thread(target=listen, daemon=True).start()
    deadline = threading.Timer(_WORKER_LIFE_S, lambda: os._exit(1))
    deadline.daemon = True
    deadline.start()
    try:
        _early_worker_passes(path, type_k, type_v, stamp, heard["stores"])
    finally:
        os._exit(0)  # now, whatever the threads (a failed pass: what it left undone compiles at first use)


def _early_worker_passes(path: str, type_k: str | None, type_v: str | None, stamp: str,
                         stores: threading.Event) -> None:
    gf, arch, cfg = _open_in_worker(path)
    _compile_decode_job(cfg, (type_k, type_v))
    stores.wait(_WORKER_WAIT_S)  # the parent's store rows, in the disk cache (or they compile here)
    _attention_passes(cfg, (type_k, type_v))
    with contextlib.suppress(OSError):
        sys.stdout.write("attention\n")
        sys.stdout.flush()
    _compile_decode_step(arch)  # the parent answers on the layers from Python until this is in the disk cache
    weights = arch.load_weights(gf, cfg)
    _run_passes(arch, weights, cfg, _scratch_cache(cfg, (type_k, type_v)), PASSES)
    _write_stamp(stamp)


class PromptKernels:
    """The prompt path's kernels, still compiling in an early start's worker process, which writes the ready stamp
    and exits when they are all in the disk cache: until then the engine feeds prompts through the single-token
    path (engine.Model._forward), whose kernels are ready."""

    def __init__(self, worker):
        self._worker = worker

    def ready(self) -> bool:
        """Whether the worker has finished (or failed: what it left undone then compiles at first use)."""
        return self._worker.poll() is not None

    def wait(self) -> None:
        """Until ready(), in short sleeps (Ctrl-C reaches the caller)."""
        deadline = time.monotonic() + _WORKER_WAIT_S
        while not self.ready():
            if time.monotonic() > deadline:  # stuck or starved: what it has not saved compiles at first use
                self._worker.kill()
            time.sleep(_POLL_S)


def _early_passes(model, worker, announce: Callable[[], None]) -> PromptKernels:
    """The main process's side of an early start (in warm_up's thread): the decode kernel's row stores, the
    single-token passes with attention stubbed (every other kernel they reach compiles here), then, once the worker has the attention kernels in the
    disk cache, the single-token passes for real (those load). The worker goes on to the prompt kernels.
    `announce()` runs when the wait for the worker is long (this process may have compiled nothing)."""
    import select

    model._set_threads()
    arch, weights, cfg = model.arch, model.weights, model.cfg
    _compile_stores(cfg, model.cache_types)
    _tell(worker, "stores")
    _run_passes(arch, weights, cfg, _NoAttention(_SCRATCH_CTX), DECODE_PASSES)
    t0 = time.monotonic()
    while time.monotonic() < t0 + _WORKER_WAIT_S:
        if time.monotonic() > t0 + 0.5:
            announce()  # nothing compiled here (cached), but the worker's attention kernels are compiling
        if select.select([worker.stdout], [], [], _POLL_S)[0]:
            worker.stdout.readline()  # "attention", or b"" when the worker has exited: compile what is missing here
            break
    _run_passes(arch, weights, cfg, _scratch_cache(cfg, model.cache_types, DECODE_PASSES[0][1]), DECODE_PASSES)
    _tell(worker, "keep")
    return PromptKernels(worker)


def _tell(worker, word: str) -> None:
    try:
        worker.stdin.write(word.encode() + b"\n")
        worker.stdin.flush()
    except OSError:
        pass  # it has exited already


def warm_up(model, report: Report | None = None, early: bool = False) -> float:
    """Make every kernel of `model` ready; returns the seconds spent. `report(line)` hears, on a first run only,
    that kernels are being prepared and when they are ready. KeyboardInterrupt reaches the caller at once.
    Nothing to do when `ready_stamp(model)` exists: the kernels then load from the disk cache at first use.

    With more than one CPU, a worker process compiles the decode kernels into the disk cache meanwhile; the passes
    here wait for it before their single-token passes, which then load those kernels from the cache (what the
    worker did not leave there compiles here as before: the worker only saves time).

    early=True (the CLI's run and chat): return once the single-token kernels are ready, which a first answer
    needs (`_early_passes`: this process compiles all but attention's, the worker attention's); the worker then
    goes on to the prompt kernels, `model.pending_kernels` (PromptKernels) says when they are ready, and the
    engine feeds prompts token by token until then."""
    t0 = time.perf_counter()
    stamp = ready_stamp(model)
    if stamp is not None and os.path.exists(stamp):
        return 0.0
    from edgeq import startup

    startup.resume()  # edgeq run's garbage collector back on: a compile's cyclic garbage comes by the megabyte
    say = report or (lambda line: None)
    failure: list[BaseException] = []
    result: list = []
    worker = early_worker = None
    if stamp is not None and _use_worker() and _serialize_cache_saves():
        early_worker = _start_early_worker(model, stamp) if early else None
        if early_worker is None:
            worker = _start_decode_worker(model)
    announced: list[bool] = []

    def announce() -> None:
        if not announced:
            announced.append(True)
            say(FIRST_RUN_MESSAGE)

    def wait_for_worker() -> None:
        if worker is None:
            return
        if not seen["compiled"]:  # the prompt kernels were all in the cache: so are the decode kernels, likely
            worker.kill()
        try:
            worker.wait(_WORKER_WAIT_S)
        except subprocess.TimeoutExpired:  # stuck or starved: what it has not saved compiles here
            worker.kill()

    def work() -> None:
        try:
            if early_worker is not None:
                result.append(_early_passes(model, early_worker, announce))
            else:
                scratch_passes(model, wait_for_worker)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            failure.append(e)

    try:
        with _on_first_compile(announce) as seen:
            thread = threading.Thread(target=work, name="edgeq-warmup", daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(_POLL_S)  # short joins: a signal handler runs between them
    finally:
        for w in (worker, None if result else early_worker):
            if w is not None and w.poll() is None:
                w.kill()  # Ctrl-C, or a failed pass
                w.wait()
    if failure:
        raise failure[0]
    elapsed = time.perf_counter() - t0
    if result:
        model.pending_kernels = result[0]
        if announced:
            say(f"ready to answer ({elapsed:.1f} s); {BACKGROUND_MESSAGE}")
        return elapsed
    if stamp is not None:
        _write_stamp(stamp)
    if announced:
        say(f"kernels ready ({elapsed:.1f} s; cached for the next run)")
    return elapsed


if __name__ == "__main__":  # the decode worker (_start_decode_worker) or an early start's (_start_early_worker)
    if len(sys.argv) > 4:
        _early_worker(sys.argv[1], sys.argv[2] or None, sys.argv[3] or None, sys.argv[4])
    else:
        _decode_worker(sys.argv[1], sys.argv[2] or None, sys.argv[3] or None)
