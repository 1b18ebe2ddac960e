"""Options shared by several verbs (model, context, threads, sampling)."""
from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=None, help="GGUF file or catalog name (default: smollm2-135m-instruct)")
    else:
        p.add_argument("model", help="GGUF file, catalog name (e.g. smollm2-135m-instruct) or hub repo "
                                     "OWNER/REPO[:QUANT]")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: min(trained, 4096))")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores, at most 8)")
    add_device_arg(p)
    add_cache_args(p)
    add_mmap_arg(p)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where the model runs: auto (the default: a CUDA GPU if numba-cuda finds one, else the CPU), "
                        "cpu, cuda")


def add_think_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="thinking models (Qwen3): --think lets the model reason in a <think> block first, --no-think "
                        "answers at once (the template's enable_thinking; default: the template's default)")


def template_kwargs(a) -> dict | None:
    """The chat template variables that --think/--no-think set (None: leave the template's default)."""
    think = getattr(a, "think", None)
    return None if think is None else {"enable_thinking": think}


def device_choice(a: argparse.Namespace) -> str:
    """The device asked for; "auto" when --device was not given."""
    return a.device or "auto"


def note_device(model, a: argparse.Namespace) -> None:
    """One line on stderr when auto fell back to the CPU, only if the user asked for `--device auto` or -v:
    a machine without a GPU is the common case, not news on every run (the library itself prints nothing)."""
    if device_choice(a) == "auto" and model.device == "cpu" and (a.device == "auto" or getattr(a, "verbose", False)):
        from edgeq.gpu_kernels import device as gpu

        if not gpu.installed():
            why = "no CUDA device (numba-cuda not installed)"
        elif gpu.gpu_present():
            why = "the CUDA path has no quantized KV cache (-ctk/-ctv)"
        else:
            why = "no CUDA device (no GPU found)"
        print(f"note: {why}; running on the CPU", file=sys.stderr)


def add_mmap_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="--mmap: run on the file's memory mapping (shared with other processes, nothing copied); "
                        "--no-mmap: read the weights into huge-page memory (faster decode, a copy at load); default: "
                        "read files of 256 MiB and more where the memory is there (edgeq/runtime/engine.py)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ctk", "--cache-type-k", default=None, help="KV cache type for keys: f16, q8 (default: int8 per channel), q8t (int8 per token), q4 "
                        "(see edgeq/runtime/kv_cache.py for every name)")
    p.add_argument("-ctv", "--cache-type-v", default=None, help="KV cache type for values: f16, q8 (default), q4")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def check_sampling_args(a: argparse.Namespace) -> None:
    """The sampling options, checked before any slow work (NaN temperatures, negative seeds, -n -1...)."""
    from edgeq.errors import EdgeqError
    from edgeq.runtime.sampling import SamplingParams

    if a.max_tokens < 1:
        raise EdgeqError("-n/--max-tokens must be >= 1")
    SamplingParams(a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, seed=a.seed).validate()


def sampling_kwargs(a: argparse.Namespace) -> dict:
    check_sampling_args(a)
    return dict(max_tokens=a.max_tokens, temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repeat_penalty=a.repeat_penalty, seed=a.seed, stop=a.stop)


def say(line: str) -> None:
    """A progress line from the library (first-run kernel preparation...) on stderr."""
    print(line, file=sys.stderr, flush=True)


def exit_now_if_threads_linger(code: int, grace_s: float = 0.0) -> None:
    """Exit with `code` at once when a thread that cannot be stopped (a kernel compile, a model load in the chat's
    worker) is still running after `grace_s`: the interpreter would otherwise wait for it at exit."""
    import os
    import threading
    import time

    deadline = time.monotonic() + grace_s
    # only edgeq's own unstoppable threads (edgeq/runtime/warmup.py's compile, the chat's model load) count:
    # a host program's threads (a test runner calling main() in-process) are none of ours to cut short
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name.startswith("edgeq-")]
    for t in others:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in others):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def load_model(a: argparse.Namespace):
    from edgeq.runtime.engine import load

    if a.threads is not None and a.threads < 1:
        from edgeq.errors import EdgeqError

        raise EdgeqError("--threads must be >= 1")
    if hasattr(a, "max_tokens"):  # a verb with sampling options: refuse bad ones before the slow load
        check_sampling_args(a)
    model = load(resolve_with_progress(a.model) if isinstance(a.model, str) else a.model, n_ctx=a.ctx,
                 threads=a.threads, cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                 device=device_choice(a), report=say, early_start=True, mmap=getattr(a, "mmap", None))
    note_device(model, a)
    return model


def resolve_with_progress(ref: str):
    """A model reference → local path, a download (catalog or hub) drawing its progress on stderr."""
    from edgeq import assets
    from edgeq.text import safe_line

    bar = download_progress(True)
    try:
        return assets.resolve_model(ref, quiet=False, progress=bar,
                                    report=lambda line: print(safe_line(line, 1000), file=sys.stderr, flush=True))
    finally:
        bar.finish()


def add_recipe_arguments(p: argparse.ArgumentParser, default_type: str | None) -> None:
    """Options of `edgeq convert` and `edgeq quantize` (edgeq.convert.QuantOptions)."""
    from edgeq.convert.calibrate import DEFAULT_TEXT, METHODS
    from edgeq.convert.mixes import FILE_TYPES, TENSOR_TYPES

    p.add_argument("--type", dest="qtype", default=default_type, required=default_type is None,
                   type=str.upper, choices=list(FILE_TYPES), metavar="TYPE",
                   help=f"file type: {', '.join(FILE_TYPES)}" + (f" (default {default_type})" if default_type else ""))
    p.add_argument("--pure", action="store_true", help="one type for every matrix (no per-tensor rules)")
    p.add_argument("--output-type", type=str.upper, choices=TENSOR_TYPES, metavar="T",
                   help="type of output.weight (the classifier)")
    p.add_argument("--embedding-type", type=str.upper, choices=TENSOR_TYPES, metavar="T",
                   help="type of token_embd.weight")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calibrate", metavar="TEXT", nargs="?", const=DEFAULT_TEXT,
                   help="calibrate by running the model over TEXT (a file, or a known text name; "
                        f"default {DEFAULT_TEXT})")
    g.add_argument("--imatrix", metavar="FILE", help="use an importance matrix file (llama.cpp GGUF or legacy .dat)")
    p.add_argument("--method", choices=METHODS, default="best",
                   help="with --calibrate: imatrix (llama.cpp's importance search), gptq (error-compensating "
                        "rounding on the same block scales), awq-gptq (AWQ per-channel scales folded into the "
                        "norms and v/up rows, then gptq; llama, qwen2/3, smollm3, granite, gemma3), best (AWQ "
                        "scales where they lower the held-out output error, then per matrix the better of "
                        "imatrix and gptq; default)")
    p.add_argument("--save-imatrix", metavar="FILE", help="write the collected importance matrix (GGUF imatrix format)")
    p.add_argument("--chunks", type=int, default=32, help="calibration: windows of --calib-ctx tokens (default 32)")
    p.add_argument("--calib-ctx", type=int, default=512, help="calibration window in tokens (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads for calibration")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output (and --save-imatrix) if it exists")


def download_progress(enabled: bool):
    """A byte progress callback drawing edgeq's one progress bar (one bar per file)."""
    from edgeq.progress import Progress
    from edgeq.text import safe_line

    state: dict = {}

    def update(done: int, total: int, label: str) -> None:
        bar = state.get(label)
        if bar is None:
            if state:
                next(reversed(state.values())).clear()
            bar = state[label] = Progress(total, label=safe_line(label, 40) + " ", enabled=enabled)
        bar.update(done, detail=f"{done / 1e6:.0f}/{total / 1e6:.0f} MB")
    update.finish = lambda: [b.clear() for b in state.values()]
    return update
