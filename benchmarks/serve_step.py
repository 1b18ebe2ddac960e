#!/usr/bin/env python3
"""What one step of the server's scheduler costs, without HTTP: the Scheduler driven directly in this thread (or,
--thread, in a thread of its own as in the server).

    python benchmarks/serve_step.py [--model smollm2-135m-instruct] [--threads 1] [--batches 1,2,4,8]
        [--thread [--keep-pool]]

For each batch size N: N chat prompts of ~--prompt-tokens tokens are prefilled (chunked, as the server does), then
decoded together for --gen-tokens steps; a decode step is split into the batched forward (`forward_batch`), choosing
the tokens (penalties, sampling, detokenizing, the events) and the rest (the step's own bookkeeping). Reported as
CPU time of this thread (numba's other threads not counted: --threads 1 makes it the whole cost, and immune to other
processes on a shared machine) and wall time. Then edgeq's own decode (`Model.append`, the path of `edgeq run`) for
reference. Aggregate tokens/s at N = N / step time; the issue's targets compare it with N = 1.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import prompt_text, words_for  # noqa: E402


class Clock:
    """CPU (this thread) and wall seconds spent inside the wrapped functions."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def wrap(self, f):
        def timed(*args, **kw):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                self.cpu += time.thread_time() - c
                self.wall += time.perf_counter() - w
        return timed


PARTS = {}  # label -> Clock: the decode steps' CPU time by part (--parts)


def wrap_parts() -> None:
    """Clocks around the parts of the forward passes (their module globals) and the batch attention."""
    from edgeq.models import base, gemma3, llama
    from edgeq.runtime.kv_cache import DecodeStep

    def wrap(owner, attr, label):
        if hasattr(owner, attr):
            setattr(owner, attr, PARTS.setdefault(label, Clock()).wrap(getattr(owner, attr)))

    for mod in (llama, gemma3):
        for fn in ("rmsnorm", "rope", "silu_mul", "gelu_mul", "embed"):
            wrap(mod, fn, fn)
        wrap(mod, "batch_linears", "products")
        wrap(mod, "linears", "products (chunk)")
    wrap(base.Linear, "__call__", "products")  # a mixture of experts' router and expert matrices (llama.experts)
    wrap(DecodeStep, "attend", "attention")


def measure(m, n: int, a) -> dict:
    from edgeq.runtime.sampling import SamplingParams
    from edgeq.runtime.scheduler import Done, GenRequest, Scheduler

    s = Scheduler(m, n_slots=n, n_ctx=a.ctx)
    s._warm_up()
    s.prefill_chunk = s._measure_chunk()  # as the server does after its warm-up
    fwd, batch, choose = Clock(), Clock(), Clock()
    arch = m.arch
    orig = arch.forward, arch.forward_batch
    arch.forward, arch.forward_batch = fwd.wrap(orig[0]), batch.wrap(orig[1])
    s._choose = choose.wrap(s._choose)
    try:
        rng = random.Random(n)
        done = []
        for i in range(n):
            ids = m.chat_ids([{"role": "user", "content": prompt_text(a.prompt_words, rng)}], None)
            s.submit(GenRequest(ids, max_tokens=a.gen_tokens, params=SamplingParams(temperature=0.7, seed=i)),
                     lambda ev: done.append(ev) if isinstance(ev, Done) else None)
        s._admit()
        c, w = time.thread_time(), time.perf_counter()
        while any(getattr(sl, "todo", None) for sl in s.slots):
            s._step()
        prefill = {"cpu": time.thread_time() - c, "wall": time.perf_counter() - w, "tokens": n * len(ids)}
        # decode steps, counted only while all n sequences decode: a request that ends early (an end-of-turn
        # token) leaves smaller batches behind, which would flatter the n-sequence step
        clocks = (batch, choose, *PARTS.values())
        totals = {id(k): [0.0, 0.0] for k in clocks}
        steps = 0
        cpu = wall = 0.0
        while len(done) < n:
            full = sum(sl.job is not None and sl.next_token is not None for sl in s.slots) == n
            before = [(k.cpu, k.wall) for k in clocks]
            c, w = time.thread_time(), time.perf_counter()
            s._step()
            if full:
                cpu, wall, steps = cpu + time.thread_time() - c, wall + time.perf_counter() - w, steps + 1
                for k, (kc, kw) in zip(clocks, before):
                    totals[id(k)][0] += k.cpu - kc
                    totals[id(k)][1] += k.wall - kw
        if steps == 0:
            raise RuntimeError(f"no step decoded all {n} sequences: raise --gen-tokens")
        for k in clocks:
            k.cpu, k.wall = totals[id(k)]
    finally:
        arch.forward, arch.forward_batch = orig
    gen = sum(d.completion_tokens for d in done)
    return {"n": n, "steps": steps, "gen": gen, "cpu": cpu / steps, "wall": wall / steps,
            "batch": batch.cpu / steps, "choose": choose.cpu / steps, "prefill": prefill,
            "parts": {k: c.cpu / steps for k, c in PARTS.items() if c.cpu}}


def own_decode(m, a) -> tuple[float, float]:
    m.reset()
    logits = m.append(m.tokenizer.encode(prompt_text(a.prompt_words, random.Random(7))))
    c, w = time.thread_time(), time.perf_counter()
    for _ in range(a.gen_tokens):
        logits = m.append([int(np.argmax(logits))])
    return (time.thread_time() - c) / a.gen_tokens, (time.perf_counter() - w) / a.gen_tokens


def in_thread(m, n: int, a) -> dict:
    """measure() in a thread of its own, as the server runs its scheduler (Scheduler.start): this thread's OpenMP
    workers released first, as Scheduler.start does, or kept (--keep-pool: what the server did before)."""
    import threading

    from edgeq.runtime import omp

    if not a.keep_pool:
        omp.release()
    out: dict = {}
    def run():
        m._set_threads()  # Numba's thread count is per calling thread
        out.update(measure(m, n, a))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--parts", action="store_true", help="split forward_batch's CPU time by part (norms, products, "
                   "attention ...): the decode steps' table after the main one")
    p.add_argument("--thread", action="store_true", help="drive the scheduler from a thread of its own, as the "
                   "server does (after releasing this thread's OpenMP workers, as Scheduler.start does)")
    p.add_argument("--keep-pool", action="store_true", help="with --thread: keep this thread's OpenMP workers")
    a = p.parse_args()
    if a.parts:
        wrap_parts()
    from edgeq.runtime.engine import load

    m = load(a.model, n_ctx=a.ctx, threads=a.threads)
    a.prompt_words = words_for(m, a.prompt_tokens)  # the message length of a --prompt-tokens request
    m._set_threads()
    rows = []
    for n in a.batches.split(","):  # own decode measured next to each level: a shared machine's load drifts
        dec_cpu, dec_wall = own_decode(m, a)
        rows.append({**(in_thread(m, int(n), a) if a.thread else measure(m, int(n), a)), "own_cpu": dec_cpu,
                     "own_wall": dec_wall})
    print(f"\nmodel {m.path.name}, {a.threads} thread(s), ~{a.prompt_tokens} prompt tokens, {a.gen_tokens} generated\n")
    print("| sequences | own decode CPU ms/token | step CPU ms | forward_batch | choose tokens | other | step wall ms "
          "| agg tok/s (CPU) | vs own decode | prefill CPU ms/token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        other = r["cpu"] - r["batch"] - r["choose"]
        pf = r["prefill"]
        print(f"| {r['n']} | {r['own_cpu'] * 1e3:.2f} | {r['cpu'] * 1e3:.2f} | {r['batch'] * 1e3:.2f} | "
              f"{r['choose'] * 1e3:.2f} | {other * 1e3:.2f} | {r['wall'] * 1e3:.2f} | {r['n'] / r['cpu']:.0f} | "
              f"{r['n'] / r['cpu'] * r['own_cpu']:.2f}x | {pf['cpu'] / pf['tokens'] * 1e3:.2f} |")
    if a.parts:
        labels = sorted({k for r in rows for k in r["parts"]})
        print("\ndecode step CPU ms by part (forward_batch's; the rest of it is Python glue)\n")
        print("| sequences | " + " | ".join(labels) + " | glue |")
        print("|---:|" + "---:|" * (len(labels) + 1))
        for r in rows:
            glue = r["batch"] - sum(r["parts"].values())
            print(f"| {r['n']} | " + " | ".join(f"{r['parts'].get(k, 0) * 1e3:.2f}" for k in labels) +
                  f" | {glue * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
