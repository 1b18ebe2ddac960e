"""The runtime: a loaded model, its KV cache, and generation (streamed text pieces).

    model = edgeq.load("smollm2-135m-instruct")
    for piece in model.chat([{"role": "user", "content": "Hi!"}]):
        print(piece, end="")
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgeq.errors import ContextError, EdgeqError
from edgeq.runtime.sampling import Sampler, SamplingParams

# tokens per forward call during prefill. 256, not 512: a 512-token call's activations (Qwen2.5-0.5B: gate and up
# 512 x 4864 float32, 10 MB each) raised peak RSS by 14 MB (736 -> 722 MB, `edgeq bench -p 512`), at the same
# prefill speed (int8 GEMM: 590-663 vs 554-664 t/s there, Qwen3-1.7B Q4_K_M 148-202 vs 187-194, 2 threads)
N_BATCH = 256
DEVICES = ("auto", "cpu", "cuda")
# template variables that the conversation itself sets: template_kwargs may not replace them
RESERVED_TEMPLATE_VARS = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"})


def resolve_model(path_or_name: str | os.PathLike) -> Path:
    """A path to a file, a local model's name, or a catalog name (downloaded on first use)."""
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        raise EdgeqError(f"{p} is a directory, not a GGUF file")
    from edgeq import assets

    return assets.resolve_model(str(path_or_name))


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def cpu_name() -> str:
    """The processor's name where the system says it (Linux /proc/cpuinfo), else "CPU"."""
    import platform

    from edgeq.cpu_kernels.host import proc_field

    name = proc_field("/proc/cpuinfo", "model name")
    if name is not None:
        return "CPU: " + name
    return f"CPU: {platform.processor()}" if platform.processor() else "CPU"


def select_device(device: str = "auto", cache_type_k: str | None = None, cache_type_v: str | None = None) -> str:
    """The device ("cpu" or "cuda") a requested one resolves to.

    "auto": a real GPU when numba-cuda finds one (never the simulator), unless a quantized KV cache was
    asked for (the CUDA cache is float32). "cuda": an EdgeqError when there is nothing to run on; numba-cuda's
    simulator is accepted (tests)."""
    if device not in DEVICES:
        raise EdgeqError(f"unknown device {device!r} (choose {', '.join(DEVICES)})")
    if device == "cpu":
        return "cpu"
    from edgeq.gpu_kernels import device as gpu

    quantized_cache = any(t not in (None, "f32") for t in (cache_type_k, cache_type_v))
    if device == "auto":
        return "cuda" if not quantized_cache and gpu.gpu_present() else "cpu"
    if not gpu.available():
        raise EdgeqError(f"device cuda is not available ({gpu.unavailable_reason()})")
    if quantized_cache:
        raise EdgeqError("the CUDA path keeps a float32 KV cache: drop --cache-type-k/-v (or use f32), "
                         "or run on the CPU")
    return "cuda"


# mmap=None reads the weights into huge-page memory (GGUFFile.read_into_memory) from this much tensor data on:
# decode 4-25% faster (Intel Xeon, 2 threads: SmolLM2 7.38 -> 7.10 ms/token, Gemma 3 270M 14.8 -> 13.1, Qwen2.5-0.5B
# Q8_0 29.9 -> 27.6, Qwen3-1.7B Q4_K_M 65.7 -> 61.3, F16 197 -> 154, Llama-3.2-3B Q4_K_M 112.7 -> 106.5:
# benchmarks/decode_profile.py, runs alternated) for the copy at load, 0.3-1.2 s per GB on that VM (fresh memory is
# slow to fault in there). Below it the file stays mapped: the catalog's small models answer sooner (their warm-start
# targets, 0.5 and 1.0 s to the first token: read, SmolLM2's 98 MB took 0.47-0.54 s instead of 0.36-0.38 to load,
# and Gemma 3's 253 MB 0.57-0.92 s to its first token instead of 0.53; benchmarks/first_run.py)
READ_MIN_BYTES = 256 << 20


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is none (not Linux) or it does not parse."""
    from edgeq.cpu_kernels.host import proc_field

    kib = (proc_field("/proc/meminfo", "MemAvailable") or "").split()  # "12345 kB"
    return int(kib[0]) * 1024 if kib and kib[0].isdigit() else None


def _huge_pages_on(path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> bool:
    """Whether transparent huge pages serve a region that asks for them (Linux: "always" or "madvise")."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim): what a large build freed (the
    tokenizer's) otherwise stays in this process's RSS. No-op without glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl has no malloc_trim)
        pass


def read_weights(gguf, mmap: bool | None) -> bool:
    """Whether to read the weights into memory: mmap False -> yes, True -> no; None -> where transparent huge
    pages are on, the tensor data is at least READ_MIN_BYTES and the memory available holds it twice over (the
    page cache keeps its own copy for as long as nothing needs the room)."""
    if mmap is not None:
        return not mmap
    data = gguf.file_size - gguf.data_offset
    if data < READ_MIN_BYTES or not _huge_pages_on():
        return False
    available = _meminfo_available()
    return available is not None and available >= 2 * data


class Model:
    """A model loaded from one GGUF file: weights stay in their quantized blocks, on the file's mapping or read into
    huge-page memory (read_weights)."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None,
                 cache_type_k: str | None = None, cache_type_v: str | None = None, device: str = "cpu",
                 warm_up: bool = True, report=None, early_start: bool = False, mmap: bool | None = None):
        from edgeq import startup

        t0 = time.perf_counter()
        self._load(path, n_ctx, threads, cache_type_k, cache_type_v, device, mmap)
        if self.device != "cuda" and warm_up:  # every kernel ready now, so that nothing compiles mid-reply
            from edgeq.runtime.warmup import warm_up as prepare_kernels

            # runtime/warmup.py; it turns edgeq run's collector back on before it compiles (edgeq/startup.py)
            prepare_kernels(self, report, early=early_start)
        else:
            startup.resume()  # edgeq run's collector back on: kernels compile at first use (edgeq/startup.py)
        self.tokens: list[int] = []  # what the KV cache holds: position i has tokens[i]
        self._prompt_logits: tuple[list[int], np.ndarray] | None = None  # last prefilled prompt, its logits
        self._lock = threading.Lock()
        self.last_stats: dict = {}
        self.load_s = time.perf_counter() - t0

    def _load(self, path, n_ctx, threads, cache_type_k, cache_type_v, device, mmap) -> None:
        """The file, its weights, tokenizer, template and the KV cache (Model's constructor, less the kernels)."""
        from edgeq.runtime.chat_template import ChatTemplate
        from edgeq.formats.gguf_file import GGUFFile
        from edgeq.runtime.kv_cache import make_kv_cache
        from edgeq.models import architecture
        from edgeq.runtime.tokenizer import Tokenizer
        from edgeq.runtime.warmup import fast_cache_loads

        self.device = select_device(device, cache_type_k, cache_type_v)  # before any slow work
        fast_cache_loads()
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        reading = read_weights(self.gguf, mmap)
        try:
            self.arch = architecture(self.gguf.arch)
            self.cfg = self.arch.Config.from_gguf(self.gguf)
            self.threads = threads or default_threads()
            self._set_threads()
            # the weights before the tokenizer, as the errors of a bad file come (a missing tensor first); when
            # reading, bound again below to the memory the read filled
            self.weights = self.arch.load_weights(self.gguf, self.cfg)
            self.tokenizer = Tokenizer.from_gguf(self.gguf)
            # the BPE merges now live in the tokenizer; as Python strings they would stay resident beside it
            # (Qwen's 151k: 14 MB)
            self.gguf.metadata.pop("tokenizer.ggml.merges", None)
            release_free_heap()  # the build's scratch (Qwen's vocabulary: ~50 MB at its peak), before the weights
            if reading:
                # in threads, beside the rest of the load; the tensors' views move at finish_read. Not before the
                # tokenizer's build: the read's memory and the build's scratch would add up in the peak RSS
                self.gguf.read_into_memory(background=True)
            self.template = ChatTemplate.from_gguf(self.gguf)
            # the token texts too (the tokenizer has them: a BPE's compactly, TokenTable). self.gguf.metadata keeps
            # every other key.
            self.gguf.metadata.pop("tokenizer.ggml.tokens", None)
            if reading:
                self.gguf.finish_read()
                self.weights = self.arch.load_weights(self.gguf, self.cfg)
        except BaseException:
            self.gguf.close()  # a background read stops
            raise
        n_ctx = n_ctx or min(self.cfg.n_ctx_train, 4096)
        if n_ctx < 16 or n_ctx > self.cfg.n_ctx_train:
            raise ContextError(f"n_ctx {n_ctx} must be between 16 and the model's trained context {self.cfg.n_ctx_train}")
        self.n_ctx = n_ctx
        self._gpu = None
        self.pending_kernels = None  # an early start's prompt kernels, still compiling (runtime/warmup.py)
        if self.device == "cuda":
            from edgeq.gpu_kernels import device as gpu
            from edgeq.gpu_kernels.forward import CudaForward

            try:
                self._gpu = CudaForward(self.weights, self.cfg, n_ctx)   # weights uploaded once, f32 KV cache
            except Exception as e:  # driver errors (out of device memory...) are one line, bugs still raise
                if not type(e).__name__.startswith("Cuda"):
                    raise
                raise EdgeqError(f"CUDA: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self.cache = self._gpu.cache
            self.device_name = gpu.describe()
        else:
            self.cache_types = (cache_type_k, cache_type_v)  # as asked (None: the default type)
            self.cache = make_kv_cache(self.cfg.kv_layouts(), n_ctx, cache_type_k, cache_type_v, max_batch=N_BATCH)
            self.device_name = cpu_name()

    # ------------------------------------------------------------ facts
    @property
    def info(self) -> dict:
        from collections import Counter

        types = Counter(t.qtype for t in self.gguf.tensors.values() if len(t.shape) == 2)
        return {
            "name": self.gguf.get("general.name", self.path.stem),
            "arch": self.gguf.arch,
            "path": str(self.path),
            "qtype": types.most_common(1)[0][0] if types else "?",
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.cfg.n_ctx_train,
            "has_chat_template": self.template is not None,
            "device": self.device,
        }

    # ------------------------------------------------------------ evaluation
    def _set_threads(self, most: int | None = None) -> None:
        import numba

        # set_num_threads is per calling thread: set it wherever forward runs (the TUI uses a worker)
        numba.set_num_threads(min(self.threads, most or self.threads, numba.config.NUMBA_NUM_THREADS))

    def _forward(self, tokens: list[int], all_logits: bool = False, observer=None) -> np.ndarray:
        """Append `tokens` to the cache (in batches), returning logits of the last or of all of them."""
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise ContextError(f"context full: {len(self.tokens)} + {len(tokens)} tokens > n_ctx {self.n_ctx}")
        if observer is not None and self._gpu is not None:
            raise EdgeqError("collecting activations runs on the CPU only: load the model with device='cpu'")
        pending = self.pending_kernels
        if pending is not None and (pending.ready() or all_logits or observer is not None):
            pending.wait()
            self.pending_kernels = pending = None
        if pending is not None:
            # a first run's prompt kernels are still compiling (an early start): the single-token path, whose
            # kernels are ready, until they are; on one thread, as the compiling worker holds a core (two threads
            # would take turns with it, each parallel loop waiting for the one that lost its core)
            for i, t in enumerate(tokens):
                if i and pending.ready():
                    self.pending_kernels = None
                    return self._forward_now(tokens[i:])
                logits = self._forward_now([t], threads=1)
            return logits
        return self._forward_now(tokens, all_logits, observer)

    def _forward_now(self, tokens: list[int], all_logits: bool = False, observer=None,
                     threads: int | None = None) -> np.ndarray:
        self._set_threads(threads)
        outs = []
        for i in range(0, len(tokens), N_BATCH):
            chunk = np.asarray(tokens[i:i + N_BATCH], dtype=np.int64)
            if self._gpu is not None:
                logits = self._gpu(chunk, len(self.tokens), all_logits=all_logits)
            else:
                logits = self.arch.forward(self.weights, self.cfg, chunk, len(self.tokens), self.cache,
                                           observer=observer, all_logits=all_logits)
            self.tokens.extend(int(t) for t in chunk)
            outs.append(logits)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def append(self, token_ids: Iterable[int]) -> np.ndarray:
        """Evaluate tokens after those already in the cache; the next-token logits of the last one."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids)
        with self._lock:
            return self._forward(ids)

    def reset(self) -> None:
        self.tokens = []
        self._prompt_logits = None

    def logits(self, token_ids: Iterable[int], observer=None) -> np.ndarray:
        """Logits (T, vocab) of every position, evaluated from an empty context; `observer(name, x)` sees each
        matrix product's input first (models/base.py)."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids)
        with self._lock:
            self.reset()
            return self._forward(ids, all_logits=True, observer=observer)

    def collect_activations(self, token_ids: Iterable[int], observer) -> None:
        """Run tokens from an empty context, calling observer(tensor_name, x_in) before each matrix product."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids)
        with self._lock:
            self.reset()
            self._forward(ids, all_logits=False, observer=observer)

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise EdgeqError("no tokens to evaluate")
        if min(ids) < 0 or max(ids) >= self.cfg.n_vocab:
            raise EdgeqError(f"token id out of range 0..{self.cfg.n_vocab - 1}")
        if len(ids) > self.n_ctx:
            raise ContextError(f"{len(ids)} tokens do not fit in the context ({self.n_ctx}); raise --ctx "
                               f"(up to {self.cfg.n_ctx_train}) or shorten the input")

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold `ids` and return the next-token logits, reusing the common prefix."""
        keep = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            keep += 1
        saved = self._prompt_logits
        if saved is not None and keep == len(ids) and saved[0] == ids and self.cache.can_rewind_to(keep):
            # the same prompt again (regenerate, or a repeated request): its logits were kept, so temperature
            # 0 answers the same. Re-evaluating its last token alone would take the single-token kernels,
            # whose rounding differs from the batched prefill's and can flip a near-tie.
            self.tokens = self.tokens[:keep]
            self._n_evaluated = 0
            return saved[1].copy()
        keep = min(keep, len(ids) - 1)  # at least one token is evaluated, for its logits
        if not self.cache.can_rewind_to(keep):
            keep = 0  # a sliding-window ring has overwritten positions that `keep` still needs
        self.tokens = self.tokens[:keep]
        self._n_evaluated = len(ids) - keep
        logits = self._forward(ids[keep:])
        self._prompt_logits = (list(ids), logits.copy())
        self.cache.mark(len(ids))
        return logits

    # ------------------------------------------------------------ generation
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special=True, parse_special=True)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> str:
        """The prompt text of a conversation; `tools` (JSON schemas) go to templates that render them, and
        `template_kwargs` are more template variables (Qwen3's `enable_thinking`: False writes an empty
        thinking block, so the model answers at once)."""
        if self.template is not None:
            extra = dict(template_kwargs or {})
            reserved = sorted(RESERVED_TEMPLATE_VARS & set(extra))
            if reserved:
                raise EdgeqError(f"template variable {reserved[0]!r} cannot be set (the conversation sets it)")
            if tools:
                extra["tools"] = tools
            return self.template.render(messages, add_generation_prompt=True, **extra)
        # a base model has no template: plain completion of the conversation's text
        return "\n\n".join(m["content"] for m in messages if m.get("content"))

    @property
    def thinks(self) -> bool:
        """Whether the chat template knows `<think>` blocks (replies are then split: runtime/reasoning.py)."""
        from edgeq.runtime.reasoning import template_thinks

        return self.template is not None and template_thinks(self.template.source)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 template_kwargs: dict | None = None) -> list[int]:
        ids = self.encode_prompt(self.render_chat(messages, tools, template_kwargs))
        bos = self.tokenizer.bos_id
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:  # template wrote BOS and the tokenizer added one
            ids = ids[1:]
        return ids

    def count_chat_tokens(self, messages: list[dict], template_kwargs: dict | None = None) -> int:
        return len(self.chat_ids(messages, template_kwargs=template_kwargs))

    def generate(self, prompt: str, **kw) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces."""
        return self._generate(self.encode_prompt(prompt), **kw)

    def chat(self, messages: list[dict], template_kwargs: dict | None = None, **kw) -> Iterator[str]:
        """Stream the assistant's reply to `messages`; earlier turns already in the cache are not recomputed.
        `template_kwargs`: chat template variables, e.g. {"enable_thinking": False}."""
        return self._generate(self.chat_ids(messages, template_kwargs=template_kwargs), **kw)

    def _generate(self, ids: list[int], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
                  top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                  seed: int | None = None, stop: Iterable[str] = (), cancel: threading.Event | None = None,
                  ) -> Iterator[str]:
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed))
        if not ids:
            raise EdgeqError("empty prompt")
        self._check_ids(ids)
        if len(ids) >= self.n_ctx:
            raise ContextError(f"prompt of {len(ids)} tokens does not fit in the context ({self.n_ctx})")
        stops = [s for s in stop if s]
        return self._stream(ids, max_tokens, sampler, stops, cancel)

    def _stream(self, ids, max_tokens, sampler, stops, cancel) -> Iterator[str]:
        with self._lock:
            t0 = time.perf_counter()
            logits = self._prefill(ids)
            t1 = time.perf_counter()
            stats = {"prompt_tokens": len(ids), "prompt_eval_tokens": self._n_evaluated,
                     "prompt_s": t1 - t0, "gen_tokens": 0, "gen_s": 0.0, "stop": "length"}
            self.last_stats = stats
            decoder = self.tokenizer.stream_decoder()
            eog = self.tokenizer.eog_ids
            history = list(ids)
            pending = ""  # text held back while it could be the start of a stop string
            n = 0
            try:
                while n < max_tokens:
                    if cancel is not None and cancel.is_set():
                        stats["stop"] = "cancelled"
                        break
                    tok = sampler(logits, history)
                    if tok in eog:
                        stats["stop"] = "eos"
                        break
                    n += 1
                    history.append(tok)
                    pending += decoder.feed(tok)
                    out, pending, hit = split_stop(pending, stops)
                    if out:
                        yield out
                    if hit:
                        stats["stop"] = "stop"
                        pending = ""
                        break
                    if len(self.tokens) + 1 >= self.n_ctx:
                        stats["stop"] = "context"
                        break
                    if n < max_tokens:
                        logits = self._forward([tok])
                    stats["gen_tokens"] = n
                    stats["gen_s"] = time.perf_counter() - t1
                tail = pending + decoder.flush()
                if tail and stats["stop"] != "stop":
                    yield tail
            finally:
                stats["gen_tokens"] = n
                stats["gen_s"] = time.perf_counter() - t1


def split_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string was hit)."""
    if not stops:
        return text, "", False
    for s in stops:
        i = text.find(s)
        if i >= 0:
            return text[:i], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return (text[:-hold], text[-hold:], False) if hold else (text, "", False)


def load(path_or_name, n_ctx: int | None = None, threads: int | None = None, cache_type_k: str | None = None,
         cache_type_v: str | None = None, device: str = "cpu", warm_up: bool = True, report=None,
         early_start: bool = False, mmap: bool | None = None, **kwargs) -> Model:
    """Load a model from a GGUF path or a catalog name. Cache types: None (the default), "f16", "q8", "q4".

    On the CPU, every kernel the model can need is compiled (first run) or loaded from the disk cache before
    this returns (warm_up=False skips that: kernels then compile at first use); `report(line)` hears about a
    first run's compile (edgeq/runtime/warmup.py). Ctrl-C interrupts it at once. early_start=True: a first run
    returns once the single-token kernels are ready (what an answer needs first); the prompt kernels finish in a
    background process, and prompts go through the single-token kernels until then (warmup.warm_up's `early`).

    device: "cpu" (the default), "cuda" (numba-cuda and a GPU; an EdgeqError otherwise) or "auto" (a GPU
    when there is one, else the CPU). `model.device` says which was taken, `model.device_name` names it.
    mmap: True runs on the file's mapping, False reads the weights into huge-page memory, None chooses
    (read_weights)."""
    if kwargs:
        raise EdgeqError(f"unknown option(s): {', '.join(kwargs)}")
    return Model(resolve_model(path_or_name), n_ctx=n_ctx, threads=threads, cache_type_k=cache_type_k,
                 cache_type_v=cache_type_v, device=device, warm_up=warm_up, report=report,
                 early_start=early_start, mmap=mmap)
