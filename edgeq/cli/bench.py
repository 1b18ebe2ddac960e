"""`edgeq bench MODEL`: llama-bench-style prefill/decode speed, load time and peak RSS.

Same method as ../shared/tools/llamacpp_bench.py: the prompt is the first P tokens of a text (BOS added if
the model adds one); warm-up; prefill of P tokens in one call; N greedy decodes continuing after it.
"""
from __future__ import annotations

import json
import resource
import sys
import time


def add_arguments(p):
    p.add_argument("model", help="GGUF file or catalog name")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512)
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("-t", "--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--text", default=None, help="text whose first tokens form the prompt (default: Hamlet)")
    from edgeq.cli.common import add_cache_args, add_device_arg, add_mmap_arg

    add_device_arg(p)
    add_cache_args(p)
    add_mmap_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON line per thread count")


def _rss_mb() -> float:
    """Peak RSS of this process. VmHWM (Linux) belongs to this program's own memory map; ru_maxrss also
    carries the high-water mark of the parent it was forked from, which inflates it under a driver script."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(a) -> int:
    from edgeq.cli.common import device_choice, note_device
    from edgeq.runtime.bench import bench_one
    from edgeq.runtime.engine import load
    from edgeq.errors import EdgeqError

    try:
        threads = [int(x) for x in str(a.threads).split(",") if x]
    except ValueError:
        raise EdgeqError(f"bad thread list {a.threads!r}")
    if not threads or min(threads) < 1:
        raise EdgeqError("thread counts must be >= 1")
    if a.prompt_tokens < 1 or a.gen_tokens < 1 or a.prompt_tokens + a.gen_tokens > a.ctx:
        raise EdgeqError(f"-p {a.prompt_tokens} + -n {a.gen_tokens} must be positive and fit in --ctx {a.ctx}")
    if a.text is None:
        from edgeq.assets import text_path

        a.text = str(text_path("hamlet"))
    with open(a.text, "rb") as f:
        text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    rows = []
    for n_threads in threads:
        t = time.perf_counter()
        model = load(a.model, n_ctx=a.ctx, threads=n_threads, cache_type_k=a.cache_type_k,
                     cache_type_v=a.cache_type_v, device=device_choice(a), mmap=a.mmap)
        load_s = time.perf_counter() - t
        if not rows:
            note_device(model, a)
        prompt = model.tokenizer.encode(text[:20000], add_special=True, parse_special=False)[: a.prompt_tokens]
        if len(prompt) < a.prompt_tokens:
            raise EdgeqError(f"text too short for a {a.prompt_tokens}-token prompt")
        r = bench_one(model, prompt, a.gen_tokens)
        r.update(model=model.path.name, device=model.device, device_name=model.device_name, threads=n_threads,
                 load_s=load_s, peak_rss_mb=_rss_mb(),
                 kv_cache_mb=model.cache.nbytes / 2**20, n_ctx=a.ctx, pp=a.prompt_tokens, tg=a.gen_tokens)
        rows.append(r)
        if a.json:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        del model
    if not a.json:
        print(f"device: {rows[0]['device_name']}")
        print(f"{'model':<36} {'threads':>7} {'pp' + str(a.prompt_tokens) + ' t/s':>12} {'tg' + str(a.gen_tokens) + ' t/s':>12}"
              f" {'load s':>7} {'peak RSS MB':>12}")
        for r in rows:
            print(f"{r['model']:<36} {r['threads']:>7} {r['prefill_tps']:>12.1f} {r['decode_tps']:>12.1f}"
                  f" {r['load_s']:>7.2f} {r['peak_rss_mb']:>12.0f}")
    sys.stdout.flush()
    return 0
