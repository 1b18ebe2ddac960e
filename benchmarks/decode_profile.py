#!/usr/bin/env python3
"""Where a decode step's time goes: timers around every matvec, attention, norm, RoPE, activation, KV store
and the sampler, over N decode steps after a prompt of P tokens (2 threads by default).

    python benchmarks/decode_profile.py smollm2-135m-instruct [-p 512] [-n 128] [-t 2] [--prefill]
    python benchmarks/decode_profile.py FILE.gguf --matrices [-n 8] [-t 1,2]

Prints ms per token per part; "other" is the rest of the forward pass (Python glue). A decode token runs as one
compiled call (cpu_kernels/decode_pass.py: "compiled step", every layer's kernels and the classifier);
--python-layers times the same kernels called from Python's layers instead, part by part.
--matrices: the decode's matrix products alone, grouped by role and weight type, each group called as the
forward pass calls it (Q/K/V, gate/up fused per type) over every layer in turn, so the weights come from DRAM
as in a real step. Per group: ms per token by wall clock and by CPU time (process_time: on a shared machine the
CPU time is the steadier measure; with 2 threads it includes the pool's spin-waits), and GB/s of weight bytes
read by each, to compare with the machine's read bandwidth.
"""
from __future__ import annotations

import argparse
import collections
import time

import edgeq
from edgeq.assets import text_path
from edgeq.models import base, gemma3, llama
from edgeq.runtime.sampling import Sampler, SamplingParams


def matrices(m, steps: int, threads: list[int]) -> None:
    """Time the decode matvecs per (role, weight type) group; see the module docstring."""
    import numba
    import numpy as np

    from edgeq.cpu_kernels.linear import matvec_many

    groups: dict[str, list] = collections.defaultdict(list)  # label -> calls: lists of QuantLinear sharing x
    layers, out = m.weights.layers, m.weights.output

    def add(role, lins):
        by_type = collections.defaultdict(list)
        for lin in lins:
            by_type[lin.q.qtype].append(lin.q)
        for qtype, qs in by_type.items():
            shape = "+".join(str(q.n_out) for q in qs) + f"x{qs[0].n_in}"
            groups[f"{role:9s} {qtype:5s} {shape}"].append(qs)

    for L in layers:
        add("attn_qkv", [L.wq, L.wk, L.wv])
        add("attn_out", [L.wo])
        add("ffn_gu", [L.w_gate, L.w_up])
        add("ffn_down", [L.w_down])
    add("output", [out])
    rng = np.random.default_rng(0)
    for t in threads:
        numba.set_num_threads(t)
        print(f"{m.path.name}: decode matrices, {t} thread(s), {steps} steps after a warm-up")
        tot_w = tot_c = tot_b = 0.0
        for label, calls in groups.items():
            xs = [rng.standard_normal(qs[0].n_in).astype(np.float32) for qs in calls]
            nbytes = sum(q.nbytes for qs in calls for q in qs)
            for qs, x in zip(calls, xs):
                matvec_many(qs, x)  # compile / page in
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                for qs, x in zip(calls, xs):
                    matvec_many(qs, x)
            wall, cpu = (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps
            tot_w, tot_c, tot_b = tot_w + wall, tot_c + cpu, tot_b + nbytes
            print(f"  {label:32s} {len(calls):3d} calls  {1000 * wall:8.2f} ms wall {nbytes / wall / 1e9:6.1f} GB/s"
                  f"  {1000 * cpu:8.2f} ms cpu {t * nbytes / cpu / 1e9:6.1f} GB/s per {t} thread(s)")
        print(f"  {'all':32s} {'':9s}  {1000 * tot_w:8.2f} ms wall {tot_b / tot_w / 1e9:6.1f} GB/s"
              f"  {1000 * tot_c:8.2f} ms cpu   ({tot_b / 1e6:.0f} MB/token)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--steps", type=int, default=128)
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill instead (3 runs)")
    ap.add_argument("--matrices", action="store_true", help="time the decode's matrix products per group (-t: a "
                    "comma list of thread counts)")
    ap.add_argument("--python-layers", action="store_true", help="decode through models/llama.py's layers from "
                    "Python (the kernels part by part) instead of the compiled step")
    ap.add_argument("-t", "--threads", default="2")
    ap.add_argument("--cpu", action="store_true", help="time with this thread's CPU clock instead of the wall "
                    "clock (with -t 1: steadier on a shared machine, where the wall clock counts other processes)")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    m = edgeq.load(a.model, n_ctx=2048, threads=max(threads))
    if a.matrices:
        matrices(m, a.steps, threads)
        return
    a.threads = threads[0]
    clock = time.perf_counter
    if a.cpu:
        if a.threads != 1:
            raise SystemExit("--cpu needs -t 1 (the other threads' time is not in this thread's clock)")
        clock = time.thread_time
    total, calls = collections.defaultdict(float), collections.Counter()

    depth = [0]  # timers inside timers (linears -> Linear.__call__ at prefill) count once, at the outer one

    def wrap(owner, attr, label):
        f = getattr(owner, attr)

        def timed(*args, **kw):
            depth[0] += 1
            t = clock()
            try:
                return f(*args, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    total[label] += clock() - t
                    calls[label] += 1

        setattr(owner, attr, timed)

    ids = m.encode_prompt(text_path("hamlet").read_text(encoding="utf-8")[:40000])[:a.prompt_tokens]
    m.reset()
    m._forward(ids)
    for mod in (llama, gemma3):  # the forward passes call these module globals
        for fn in ("rmsnorm", "add_rmsnorm", "qk_norm_rope", "silu_mul", "gelu_mul"):
            if hasattr(mod, fn):
                wrap(mod, fn, fn)
        wrap(mod, "linears", "matvec")  # Q/K/V and gate/up as one call each
    for mod in (llama, gemma3):
        if a.python_layers:
            mod.compiled_step = lambda *args: None
        else:
            wrap(mod, "compiled_step", "compiled step")
    wrap(base.Linear, "__call__", "matvec")
    wrap(base.Embedding, "__call__", "embed")
    from edgeq.runtime.kv_cache import DecodeStep

    wrap(type(m.cache), "attend", "attend")
    wrap(type(m.cache), "store", "store")
    wrap(DecodeStep, "attend", "attend")  # a decode token stores and attends in one kernel call
    if a.prefill:
        total.clear()
        calls.clear()
        n = 3
        t0 = clock()
        for _ in range(n):
            m.reset()
            m._forward(ids)
        wall = clock() - t0
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
    t0 = clock()
    for _ in range(a.steps):
        logits = m._forward([tok])
        t = clock()
        tok = sampler(logits, ids)
        t_sample += clock() - t
    wall = clock() - t0
    n = a.steps
    print(f"{m.path.name}: {1000 * wall / n:.2f} ms/token ({n / wall:.1f} t/s), context {len(ids)}..{len(ids) + n}, "
          f"{a.threads} threads, {'CPU' if a.cpu else 'wall'} time")
    for k, v in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"  {k:8s} {1000 * v / n:7.3f} ms/token  {calls[k] // n} calls/token")
    print(f"  sampling {1000 * t_sample / n:7.3f} ms/token")
    print(f"  other    {1000 * (wall - t_sample - sum(total.values())) / n:7.3f} ms/token")


if __name__ == "__main__":
    main()
