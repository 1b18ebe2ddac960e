"""Where a cold first run's time goes: every Numba compile of `edgeq run MODEL --chat -p Hi -n 8`'s path, timed.

Runs in this process with an empty kernel cache (a new NUMBA_CACHE_DIR), listens to Numba's compile events and
prints one row per dispatcher: its specializations, the compile CPU time (of the compiling thread) spent inside it (self: excluding the nested
compiles of the kernels it calls; total: including them), and its specializations. Compare with a --no-warmup run (what
the reply itself calls, compiled at first call) to see what the warm-up compiles that this run never calls.

    python benchmarks/compile_profile.py [--model smollm2-135m-instruct] [--no-warmup] [--ctk q8 --ctv q8]

--no-warmup: no scratch passes; kernels compile at their first real call (exactly what this run calls).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--ctk", default=None)
    ap.add_argument("--ctv", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every dispatcher's signatures and times here")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="edgeq-compile-profile-")
    os.environ["NUMBA_CACHE_DIR"] = tmp
    t_launch = time.perf_counter()

    import edgeq
    from edgeq.assets import model_path
    from numba.core import event
    from numba.core.dispatcher import Dispatcher

    stack: list[list] = []   # [name, start, child seconds]
    spent: dict[str, list[float]] = {}  # name -> [self s, total s, compiles]

    class Compiles(event.Listener):
        def on_start(self, ev):
            d = ev.data.get("dispatcher")
            name = f"{d.py_func.__module__}.{d.py_func.__name__}" if d is not None else "?"
            stack.append([name, time.thread_time(), 0.0])

        def on_end(self, ev):
            name, t0, child = stack.pop()
            dt = time.thread_time() - t0
            row = spent.setdefault(name, [0.0, 0.0, 0])
            row[0] += dt - child
            row[2] += 1
            if not any(s[0] == name for s in stack):  # recursion-free total
                row[1] += dt
            if stack:
                stack[-1][2] += dt

    event.register("numba:compile", Compiles())

    def dispatchers() -> dict[str, Dispatcher]:
        out = {}
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("edgeq.") and mod is not None:
                for obj in list(vars(mod).values()):
                    if isinstance(obj, Dispatcher):
                        out[f"{obj.py_func.__module__}.{obj.py_func.__name__}"] = obj
        return out

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    m = edgeq.load(model_path(a.model), cache_type_k=a.ctk, cache_type_v=a.ctv, threads=a.threads,
                   warm_up=not a.no_warmup)
    t_load = time.perf_counter() - t0
    cpu_load = time.process_time() - cpu0
    t1 = time.perf_counter()
    reply = "".join(m.chat([{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0))
    t_reply = time.perf_counter() - t1
    sigs = {name: [str(s) for s in d.signatures] for name, d in dispatchers().items()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"spent": spent, "signatures": sigs}, f, indent=1)
    rows = sorted(spent.items(), key=lambda kv: -kv[1][0])
    print(f"`python benchmarks/compile_profile.py --model {a.model}{' --no-warmup' if a.no_warmup else ''}`: "
          f"load {t_load:.1f} s wall / {cpu_load:.1f} s CPU (incl. warm-up), reply {t_reply:.1f} s, "
          f"{sum(r[2] for _, r in rows)} compiles, compile self-time {sum(r[0] for _, r in rows):.1f} s, "
          f"launch to end {time.perf_counter() - t_launch:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    print("| kernel | compiles | self s | total s | specializations |")
    print("|---|---|---|---|---|")
    for name, (self_s, total_s, n) in rows:
        print(f"| {name.replace('edgeq.', '')} | {n} | {self_s:.2f} | {total_s:.2f} | {len(sigs.get(name, ()))} |")
    print(f"\nreply: {reply!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
