"""Decode speed with a long context, per KV cache type.

Model mode (the default): load the model once per cache type, prefill the first P tokens of a text (Hamlet by
default), then time N single-token decode steps; repeated R times with the types interleaved (the machines
are noisy), medians reported.

    python benchmarks/kv_cache_bench.py smollm2-135m-instruct --prefill 4096 -n 32 --types f16,q8,q4,q4c/q4

Kernel mode (--kernel LAYOUT, no model file needed): the same cache types filled with P random positions,
timing one decode step of attention over every layer of a model-shaped cache (smollm2, gemma3 or qwen3-1.7b).
With --batch B: B sequences of one KVPool (the server's slots) at P + 16 b positions, each timed step storing and
attending one token of every sequence through one kernel call per layer (runtime/kv_cache.DecodeStep, the
server's decode pass); the steps run on, so every sequence completes a group of 32 positions at its natural rate.

    python benchmarks/kv_cache_bench.py --kernel smollm2 --prefill 200 --batch 8 -n 64 --types q8 -t 2
With --aligned as well, the sequences start at the group boundaries at or below P (P // 32 * 32 + 32 b), so every
sequence's step has the same position mod 32: the row adds the median step by that position (`ms_by_mod32`), where
31 is the step whose store fills a group of per-channel keys and quantizes it.

    python benchmarks/kv_cache_bench.py --kernel smollm2 --prefill 192 --batch 8 -n 64 --repeat 15 --types q8 -t 2 --aligned
One JSON line per type: median over runs of the per-run median step time, and the minimum step time (the
least disturbed by other processes on a shared machine); `vs_first` / `min_vs_first` are ratios to the first type.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

LAYOUTS = {  # (n_layer, n_kv_heads, n_heads, head_dim, window pattern)
    "smollm2": (30, 3, 9, 64, None),
    "gemma3": (18, 1, 4, 256, (512, 6)),
    "qwen3-1.7b": (28, 8, 16, 128, None),
}


def parse_types(s: str) -> list[tuple[str, str]]:
    out = []
    for item in s.split(","):
        k, _, v = item.partition("/")
        out.append((k, v or k))
    return out


def kernel_layouts(name: str):
    from types import SimpleNamespace

    n_layer, n_kv, _, D, swa = LAYOUTS[name]
    win = lambda i: swa[0] if swa and i % swa[1] < swa[1] - 1 else 0  # noqa: E731
    return [SimpleNamespace(n_kv_heads=n_kv, head_dim=D, window=win(i)) for i in range(n_layer)]


def bench_kernel(name: str, types, n_pos: int, n_steps: int, repeat: int, batch: int = 1,
                 aligned: bool = False) -> list[dict]:
    from edgeq.runtime.kv_cache import make_kv_cache

    if batch > 1:
        return bench_batch(name, types, n_pos, n_steps, repeat, batch, aligned)

    _, n_kv, H, D, _ = LAYOUTS[name]
    layouts = kernel_layouts(name)
    rng = np.random.default_rng(0)
    caches = {}
    for tk, tv in types:
        c = make_kv_cache(layouts, n_pos + n_steps + 1, tk, tv)
        for il in range(len(layouts)):
            for p in range(0, n_pos, 512):
                T = min(512, n_pos - p)
                c.store(il, p, rng.standard_normal((T, n_kv, D), dtype=np.float32),
                        rng.standard_normal((T, n_kv, D), dtype=np.float32))
        caches[(tk, tv)] = c
    q = rng.standard_normal((1, H, D), dtype=np.float32)
    kv = rng.standard_normal((1, n_kv, D), dtype=np.float32)
    times = {t: [] for t in types}
    mins = {t: [] for t in types}
    for _ in range(repeat):
        for t in types:
            c = caches[t]
            c.attend(0, q, n_pos - 1, 0.125)  # warm-up / compile
            ts = []
            for s in range(n_steps):
                t0 = time.perf_counter()
                for il in range(len(layouts)):
                    c.store(il, n_pos + s, kv, kv)
                    c.attend(il, q, n_pos + s, 0.125)
                ts.append(time.perf_counter() - t0)
            times[t].append(statistics.median(ts))
            mins[t].append(min(ts))
    base = statistics.median(times[types[0]])
    return [{"mode": "kernel", "layout": name, "ctk": t[0], "ctv": t[1], "context": n_pos,
             "attn_ms_per_token": 1e3 * statistics.median(v), "vs_first": statistics.median(v) / base,
             "min_ms": 1e3 * min(mins[t]), "min_vs_first": min(mins[t]) / min(mins[types[0]]),
             "runs_ms": [round(1e3 * x, 3) for x in v], "kv_cache_mb": caches[t].nbytes / 2**20}
            for t, v in times.items()]


def bench_batch(name: str, types, n_pos: int, n_steps: int, repeat: int, batch: int, aligned: bool) -> list[dict]:
    """--batch: a decode step's attention for `batch` sequences of a KVPool, as the server runs it; aligned: the
    sequences at group boundaries, the steps also kept by their position mod 32."""
    from edgeq.runtime.kv_cache import DecodeStep, KVPool

    _, n_kv, H, D, _ = LAYOUTS[name]
    layouts = kernel_layouts(name)
    rng = np.random.default_rng(0)
    start = np.array([n_pos // 32 * 32 + 32 * b if aligned else n_pos + 16 * b for b in range(batch)], np.int64)
    pools = {}
    for tk, tv in types:
        pool = KVPool(layouts, int(start[-1]) + n_steps + 1, batch, tk, tv)
        for c, n in zip(pool.caches, start.tolist()):
            for il in range(len(layouts)):
                c.store(il, 0, rng.standard_normal((n, n_kv, D), dtype=np.float32),
                        rng.standard_normal((n, n_kv, D), dtype=np.float32))
        pools[(tk, tv)] = pool
    q = rng.standard_normal((batch, H, D), dtype=np.float32)
    kv = rng.standard_normal((batch, n_kv, D), dtype=np.float32)

    def step(caches, positions) -> float:
        s = DecodeStep(caches, positions)
        t0 = time.perf_counter()
        for il in range(len(layouts)):
            s.attend(il, q, kv, kv, 0.125)
        return time.perf_counter() - t0

    def rewind(caches) -> None:  # back to the prefilled positions
        for c, n in zip(caches, start.tolist()):
            for L in c.layers:
                L.n = n

    times = {t: [] for t in types}
    mins = {t: [] for t in types}
    by_mod = {t: {} for t in types}  # --aligned: every run's steps by their position mod 32
    for _ in range(repeat):
        for t in types:
            caches = pools[t].caches
            step(caches, start)  # warm-up / compile, its token taken back
            rewind(caches)
            ts = [step(caches, start + s) for s in range(n_steps)]
            rewind(caches)
            times[t].append(statistics.median(ts))
            mins[t].append(min(ts))
            for s, x in enumerate(ts):
                by_mod[t].setdefault(int(start[0] + s) % 32, []).append(x)
    base = statistics.median(times[types[0]])
    rows = [{"mode": "kernel", "layout": name, "ctk": t[0], "ctv": t[1], "batch": batch,
             "context": f"{int(start[0])}..{int(start[-1]) + n_steps}", "attn_ms_per_step": 1e3 * statistics.median(v),
             "attn_ms_per_token": 1e3 * statistics.median(v) / batch, "vs_first": statistics.median(v) / base,
             "min_ms": 1e3 * min(mins[t]), "min_vs_first": min(mins[t]) / min(mins[types[0]]),
             "runs_ms": [round(1e3 * x, 3) for x in v]} for t, v in times.items()]
    if aligned:
        for r, t in zip(rows, types):
            r["ms_by_mod32"] = {k: round(1e3 * statistics.median(v), 3) for k, v in sorted(by_mod[t].items())}
    return rows


def bench_model(model_name: str, types, n_prefill: int, n_steps: int, repeat: int, threads: int, text: str | None):
    from edgeq.runtime.engine import load

    if text is None:
        from edgeq.assets import text_path

        text = str(text_path("hamlet"))
    raw = open(text, "rb").read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    n_ctx = n_prefill + n_steps + 8
    models = {t: load(model_name, n_ctx=n_ctx, threads=threads, cache_type_k=t[0], cache_type_v=t[1]) for t in types}
    prompt = next(iter(models.values())).tokenizer.encode(raw, add_special=True, parse_special=False)[:n_prefill]
    times = {t: [] for t in types}
    mins = {t: [] for t in types}
    prefill = {t: [] for t in types}
    for _ in range(repeat):
        for t in types:
            m = models[t]
            m.reset()
            t0 = time.perf_counter()
            logits = m._forward(prompt)
            prefill[t].append(time.perf_counter() - t0)
            nxt = int(np.argmax(logits))
            ts = []
            for _ in range(n_steps):
                t0 = time.perf_counter()
                logits = m._forward([nxt])
                ts.append(time.perf_counter() - t0)
                nxt = int(np.argmax(logits))
            times[t].append(statistics.median(ts))
            mins[t].append(min(ts))
    base = statistics.median(times[types[0]])
    return [{"mode": "model", "model": model_name, "ctk": t[0], "ctv": t[1], "context": len(prompt),
             "threads": threads, "decode_ms_per_token": 1e3 * statistics.median(v),
             "vs_first": statistics.median(v) / base,
             "min_ms": 1e3 * min(mins[t]), "min_vs_first": min(mins[t]) / min(mins[types[0]]),
             "decode_tps": 1.0 / statistics.median(v), "runs_ms": [round(1e3 * x, 2) for x in v],
             "prefill_s": statistics.median(prefill[t]), "kv_cache_mb": models[t].cache.nbytes / 2**20}
            for t, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--kernel", choices=sorted(LAYOUTS), default=None, help="attention-only, model-shaped cache")
    ap.add_argument("--prefill", type=int, default=4096, help="context before the timed decode steps")
    ap.add_argument("-n", "--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--types", default="f16,q8,q4,q4c/q4", help="K[/V] cache types; the first is the baseline")
    ap.add_argument("--text", default=None)
    ap.add_argument("--batch", type=int, default=1, help="kernel mode: sequences decoding together (1..64)")
    ap.add_argument("--aligned", action="store_true", help="--batch: sequences at group boundaries, steps by position "
                    "mod 32")
    a = ap.parse_args()
    if not 1 <= a.batch <= 64:
        ap.error("--batch: 1..64")
    if a.aligned and (a.batch < 2 or not a.kernel):
        ap.error("--aligned: kernel mode with --batch 2 or more")
    import numba

    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    types = parse_types(a.types)
    if a.kernel:
        rows = bench_kernel(a.kernel, types, a.prefill, a.steps, a.repeat, a.batch, a.aligned)
    else:
        rows = bench_model(a.model, types, a.prefill, a.steps, a.repeat, a.threads, a.text)
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
