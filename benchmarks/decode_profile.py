#!/usr/bin/env python3
"""Where a decode step's time goes: timers around every matvec, attention, norm, RoPE, activation, KV store
and the sampler, over N decode steps after a prompt of P tokens (2 threads by default).

    python benchmarks/decode_profile.py smollm2-135m-instruct [-p 512] [-n 128] [-t 2] [--prefill]

Prints ms per token per part; "other" is the rest of the forward pass (Python glue).
"""
from __future__ import annotations

import argparse
import collections
import time

import edgeq
from edgeq.assets import text_path
from edgeq.models import base, gemma3, llama
from edgeq.runtime.sampling import Sampler, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--steps", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill instead (3 runs)")
    a = ap.parse_args()
    m = edgeq.load(a.model, n_ctx=2048, threads=a.threads)
    total, calls = collections.defaultdict(float), collections.Counter()

    depth = [0]  # timers inside timers (linears -> Linear.__call__ at prefill) count once, at the outer one

    def wrap(owner, attr, label):
        f = getattr(owner, attr)

        def timed(*args, **kw):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    total[label] += time.perf_counter() - t
                    calls[label] += 1

        setattr(owner, attr, timed)

    ids = m.encode_prompt(text_path("hamlet").read_text(encoding="utf-8")[:40000])[:a.prompt_tokens]
    m.reset()
    m._forward(ids)
    for mod in (llama, gemma3):  # the forward passes call these module globals
        for fn in ("rmsnorm", "rope", "silu_mul", "gelu_mul"):
            if hasattr(mod, fn):
                wrap(mod, fn, fn)
        wrap(mod, "linears", "matvec")  # Q/K/V and gate/up as one call each
    wrap(base.Linear, "__call__", "matvec")
    wrap(base.Embedding, "__call__", "embed")
    wrap(type(m.cache), "attend", "attend")
    wrap(type(m.cache), "store", "store")
    if a.prefill:
        total.clear()
        calls.clear()
        n = 3
        t0 = time.perf_counter()
        for _ in range(n):
            m.reset()
            m._forward(ids)
        wall = time.perf_counter() - t0
        print(f"{m.path.name}: prefill of {len(ids)} tokens {1000 * wall / n:.1f} ms ({n * len(ids) / wall:.1f} t/s), "
              f"{a.threads} threads")
        for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
            print(f"  {k:8s} {1000 * v / n:8.1f} ms  {calls[k] // n} calls")
        print(f"  other    {1000 * (wall - sum(total.values())) / n:8.1f} ms")
        return
    sampler = Sampler(SamplingParams(0.8, 40, 0.95, 0.05, 1.0, 64, 0))
    tok, t_sample = ids[-1], 0.0
    m._forward([tok])  # the single-token kernels compile (or load from the cache) here, not in the timed steps
    total.clear()
    calls.clear()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        logits = m._forward([tok])
        t = time.perf_counter()
        tok = sampler(logits, ids)
        t_sample += time.perf_counter() - t
    wall = time.perf_counter() - t0
    n = a.steps
    print(f"{m.path.name}: {1000 * wall / n:.2f} ms/token ({n / wall:.1f} t/s), context {len(ids)}..{len(ids) + n}, "
          f"{a.threads} threads")
    for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"  {k:8s} {1000 * v / n:7.3f} ms/token  {calls[k] // n} calls/token")
    print(f"  sampling {1000 * t_sample / n:7.3f} ms/token")
    print(f"  other    {1000 * (wall - t_sample - sum(total.values())) / n:7.3f} ms/token")


if __name__ == "__main__":
    main()
