#!/usr/bin/env python3
"""The int8 prefill GEMM (cpu_kernels/gemm_i8.py) with and without its tile fill's prefetch (gemm_i8.FILL_AHEAD),
alternated in one process over a model's own weights.

    python benchmarks/gemm_fill_ab.py [--model smollm2-135m-instruct] [--threads 2] [-T 8,64,176] [--rounds 10]

Both variants are gemm_i8's drivers under names of their own (gemm_i8._specialize's suffix, each name only ever
compiled, and cached, under its one setting): FILL_AHEAD is read when a driver's fill is compiled, so it is set before
each variant's first call. Each round times every layer's ffn gate and down products once per variant (the order alternating by round, the first two rounds dropped); medians in ms. The
machines this runs on drift by a third within minutes, so only variants alternated in one process compare.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-T", "--tokens", default="8,64,176", help="prompt rows per product")
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    if not 3 <= a.rounds <= 100:
        ap.error("--rounds: 3..100")
    tokens = [int(t) for t in a.tokens.split(",")]
    if not all(1 <= t <= 4096 for t in tokens):
        ap.error("-T: 1..4096 each")

    import numba
    import numpy as np

    from edgeq.cpu_kernels import gemm_i8 as g
    from edgeq.runtime.engine import load

    model = load(a.model, n_ctx=256, threads=a.threads)
    mats = [lin.q for L in model.weights.layers for lin in (L.w_gate, L.w_down)]
    mats = [q for q in mats if q.qtype in g.UNPACK16]
    if not mats:
        raise SystemExit(f"{a.model}: no ffn matrix of a type the gathered fill unpacks ({sorted(g.UNPACK16)})")

    rng = np.random.default_rng(0)
    drivers, shipped = {}, g.FILL_AHEAD
    try:
        for ahead in (False, True):
            g.FILL_AHEAD = ahead
            for qt in sorted({q.qtype for q in mats}):
                d = g._specialize(qt, gather=True, suffix=f"_fill_ab{int(ahead)}")
                q0 = next(q for q in mats if q.qtype == qt)
                qx, dx, xs = g.quantized_activations(rng.standard_normal((4, q0.n_in)).astype(np.float32))
                d(q0.raw, q0.n_in, qx, dx, xs, np.empty((4, q0.n_out), np.float32))  # compiled with this setting
                drivers[qt, ahead] = d
    finally:
        g.FILL_AHEAD = shipped
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"{a.model}: {len(mats)} ffn gate + down matrices ({', '.join(sorted({q.qtype for q in mats}))}), "
          f"{numba.get_num_threads()} threads, medians of {a.rounds - 2} alternated rounds")
    for T in tokens:
        X = {n: g.quantized_activations(rng.standard_normal((T, n)).astype(np.float32)) for n in {q.n_in for q in mats}}
        outs = [np.empty((T, q.n_out), np.float32) for q in mats]
        times = {False: [], True: []}
        for r in range(a.rounds):
            for ahead in ((False, True) if r % 2 else (True, False)):
                t0 = time.perf_counter()
                for q, out in zip(mats, outs):
                    drivers[q.qtype, ahead](q.raw, q.n_in, *X[q.n_in], out)
                times[ahead].append(time.perf_counter() - t0)
        off, on = (statistics.median(times[k][2:]) * 1e3 for k in (False, True))
        print(f"T={T}: without the fill's prefetch {off:.2f} ms, with it {on:.2f} ms ({on / off - 1:+.1%})", flush=True)


if __name__ == "__main__":
    main()
