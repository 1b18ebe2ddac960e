#!/usr/bin/env python3
"""Where a prompt's prefill time goes: timers around the matrix products (the int8 GEMM per weight type, the
activations' quantization, the float-tile products), attention, norms, RoPE, activations, KV store, embedding.

    python benchmarks/prefill_profile.py FILE_OR_MODEL [-p 512] [-t 1] [--runs 3] [--wall]

Times process CPU seconds by default (use -t 1: on a shared machine the wall clock measures the scheduler);
--wall times the wall clock instead (for runs on several threads). Prints ms per prefill and the share of
each part; "matvec rest" is the float-tile products and the glue around the matrix calls, "other" the rest of
the forward pass (Python glue, residual adds, the classifier of the last token).
"""
from __future__ import annotations

import argparse
import collections
import time

import edgeq
from edgeq.assets import text_path
from edgeq.cpu_kernels import gemm_amx, gemm_i8
from edgeq.models import base, gemma3, llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wall", action="store_true", help="wall seconds instead of CPU seconds")
    a = ap.parse_args()
    clock = time.perf_counter if a.wall else time.process_time
    m = edgeq.load(a.model, n_ctx=2048, threads=a.threads)
    ids = m.encode_prompt(text_path("hamlet").read_text(encoding="utf-8")[:40000])[:a.prompt_tokens]
    m.reset()
    m._forward(ids)  # kernels compiled or loaded, weights paged in

    total, calls = collections.defaultdict(float), collections.Counter()
    inner = collections.defaultdict(float)  # parts of "matvec", timed wherever they are called
    depth = [0]  # timers inside timers (linears -> Linear.__call__) count once, at the outer one

    def wrap(owner, attr, label, part_of_matvec=False):
        get = owner.__getitem__ if isinstance(owner, dict) else lambda k: getattr(owner, k)
        f = get(attr)

        def timed(*args, **kw):
            depth[0] += not part_of_matvec
            t = clock()
            try:
                return f(*args, **kw)
            finally:
                dt = clock() - t
                depth[0] -= not part_of_matvec
                if part_of_matvec:
                    inner[label] += dt
                elif depth[0] == 0:
                    total[label] += dt
                    calls[label] += 1

        if isinstance(owner, dict):
            owner[attr] = timed
        else:
            setattr(owner, attr, timed)

    for mod in (llama, gemma3):  # the forward passes call these module globals
        for fn in ("rmsnorm", "rope", "silu_mul", "gelu_mul"):
            if hasattr(mod, fn):
                wrap(mod, fn, fn)
        wrap(mod, "linears", "matvec")  # Q/K/V and gate/up as one call each
    wrap(base.Linear, "__call__", "matvec")
    wrap(base.Embedding, "__call__", "embed")
    wrap(type(m.cache), "attend", "attend")
    wrap(type(m.cache), "store", "store")
    for q in list(gemm_i8._DRIVERS):  # matmul_i8 looks its driver up per call
        wrap(gemm_i8._DRIVERS, q, f"gemm {q}", part_of_matvec=True)
    wrap(gemm_i8, "quantize_act", "quant act", part_of_matvec=True)
    for q in list(gemm_amx._DRIVERS):  # where the prompt's products run on AMX tiles (gemm_amx.use)
        wrap(gemm_amx._DRIVERS, q, f"amx {q}", part_of_matvec=True)
    wrap(gemm_amx, "_round_tiles", "bf16 act", part_of_matvec=True)

    n = a.runs
    t0 = clock()
    for _ in range(n):
        m.reset()
        m._forward(ids)
    spent = clock() - t0

    def line(label, v, extra=""):
        print(f"  {label:12s} {1000 * v / n:8.1f} ms  {100 * v / spent:5.1f} %  {extra}")

    print(f"{m.path.name}: prefill of {len(ids)} tokens {1000 * spent / n:.1f} ms ({n * len(ids) / spent:.1f} t/s), "
          f"{a.threads} threads, {'wall' if a.wall else 'CPU'} seconds")
    for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
        line(k, v, f"{calls[k] // n} calls")
        if k == "matvec":
            for k2, v2 in sorted(inner.items(), key=lambda kv: -kv[1]):
                line("  " + k2, v2)
            line("  rest", v - sum(inner.values()), "(float tiles, glue)")
    line("other", spent - sum(total.values()))


if __name__ == "__main__":
    main()
