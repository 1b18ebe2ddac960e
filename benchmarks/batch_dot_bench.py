#!/usr/bin/env python3
"""Decode of a few activation rows (the server's batch): single-row dots vs cpu_kernels/batch_dot.py's tiles.

    python benchmarks/batch_dot_bench.py                                  # the serve types, T = 1,2,3,4,8,16
    python benchmarks/batch_dot_bench.py --types Q4_1,Q4_K --rows 2,8 --tiles 4x2,2x4,1x8
    python benchmarks/batch_dot_bench.py --model smollm2-135m-instruct --rows 1,2,4,8   # the model's own weights
    python benchmarks/batch_dot_bench.py --classifier gemma3-270m [--rows 8] [--threads 2]

For each type, shape and row count T: microseconds of this thread's CPU time per product (activation
quantization included) for linear._mm_<type> (each activation row dotted by the single-row dot) and for the
multi-row driver, at one Numba thread (CPU time of the thread is robust on a shared machine). --tiles times
other weight x activation tile shapes than the shipped batch_dot._MR x _NT (compiled uncached). The
crossover row count per type is what batch_dot.MIN_ROWS records. --model: a decode step's products over the
model's own (memory-mapped) weights, per group of matrices (the server's matmul_rows_many calls): as shipped, with
the lanes on the file's bytes instead of the packed copy (QuantLinear.packed_batches), and with the tiles off
(batch_dot.MIN_ROWS), interleaved, best of 5: large matrices stream from memory, small ones stay in cache. Shapes: SmolLM2-135M's FFN (1536 x 576)
for 32-blocks, Gemma-3-270M's (2048 x 640 -> 2048 x 768, a multiple of 256) for k-quants and IQ4_XS.
--classifier: a Q8_0 classifier's product at T rows (the model's own, streamed from memory) on the drivers that
AVX-512 can run it on, alternated, medians and minima of --repeat calls (wall time with --threads > 1): the lanes
(activation rows as lanes), the weight rows as lanes on the packed copy (what ships), on the file's bytes prefetching
the next tile into L1, or the tile two on into L2 (batch_dot._ROWS16_LAYOUT's choice).
"""
from __future__ import annotations

import argparse
import time
import types as pytypes

import numpy as np

from matvec_bench import random_weights

SERVE = "Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q6_K"


def variant(qtype: str, mr: int, nt: int):
    """batch_dot's driver for another tile shape (uncached: its cache entry would collide with the shipped one)."""
    import numba

    from edgeq.cpu_kernels import batch_dot, simd
    from edgeq.cpu_kernels.linear import _FAST, BLOCKS

    t = batch_dot._mmb_template
    bound = dict(t.__globals__, _MR=mr, _NT=nt, _row_fn=batch_dot._rows_dot(qtype, simd.BLOCK_IR[qtype], mr, nt),
                 _block_elems=BLOCKS[qtype][0], _block_bytes=BLOCKS[qtype][1])
    return numba.njit(parallel=True, fastmath=_FAST, nogil=True)(pytypes.FunctionType(t.__code__, bound, "v"))


def cpu_us(fn, min_time: float) -> float:
    fn()
    n, t0 = 0, time.thread_time()
    while time.thread_time() - t0 < min_time:
        fn()
        n += 1
    return (time.thread_time() - t0) / n * 1e6


def model_products(name: str, rows: list[int]) -> None:
    import numba

    from edgeq.cpu_kernels import batch_dot
    from edgeq.cpu_kernels.linear import matmul_rows_many
    from edgeq.runtime.engine import load

    m = load(name, n_ctx=256, threads=1)
    m._set_threads()
    numba.set_num_threads(1)
    w, rng = m.weights, np.random.default_rng(0)
    on = dict(batch_dot.MIN_ROWS)
    off = {q: 1 << 30 for q in on}
    groups = {"qkv": lambda L: [L.wq, L.wk, L.wv], "o": lambda L: [L.wo], "gate_up": lambda L: [L.w_gate, L.w_up],
              "down": lambda L: [L.w_down]}
    qs_all = [lin.q for L in w.layers for lin in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)] + [w.output.q]
    print(f"{m.path.name}: ms per decode step's products, shipped / the lanes on the file's bytes instead of the "
          "packed copy / tiles off (best of 5), speedup of shipped over tiles off")
    print("| T | " + " | ".join(list(groups) + ["output"]) + " |")
    print("|---:|" + "---|" * (len(groups) + 1))
    for T in rows:
        cells = []
        calls = {g: [[lin.q for lin in pick(L)] for L in w.layers] for g, pick in groups.items()}
        calls["output"] = [[w.output.q]]
        for g, qss in calls.items():
            xs = [rng.standard_normal((T, qs[0].n_in)).astype(np.float32) for qs in qss]

            def run():
                for qs, x in zip(qss, xs):
                    matmul_rows_many(qs, x)
            best = {}
            for _ in range(5):
                for mode, table, packed in (("on", on, True), ("file", on, False), ("off", off, True)):
                    batch_dot.MIN_ROWS.update(table)
                    for q in qs_all:
                        q.packed_batches(packed)
                    run()  # makes the packed copies (untimed)
                    t0 = time.thread_time()
                    run()
                    best[mode] = min(best.get(mode, 1e9), (time.thread_time() - t0) * 1e3)
            batch_dot.MIN_ROWS.update(on)
            cells.append(f"{best['on']:.2f} / {best['file']:.2f} / {best['off']:.2f} ({best['off'] / best['on']:.2f}x)")
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)


def classifier_drivers(name: str, T: int, threads: int, repeat: int) -> None:
    import statistics

    import numba

    from edgeq.cpu_kernels import batch_dot as bd
    from edgeq.cpu_kernels import simd
    from edgeq.cpu_kernels.linear import _quantized, _run_fused, _specialize
    from edgeq.runtime.engine import load

    if not simd._ZMM:
        raise SystemExit("--classifier: the weight-row lanes need AVX-512")
    m = load(name, n_ctx=256, threads=threads)
    m._set_threads()
    numba.set_num_threads(threads)
    q = m.weights.output.q
    if q.qtype != "Q8_0":
        raise SystemExit(f"--classifier: {name}'s classifier is {q.qtype}, not Q8_0")
    qx, dx, bsums = _quantized(np.random.default_rng(0).standard_normal((T, q.n_in)).astype(np.float32))
    prefetch = {False: "next tile into L1", True: "tile two on into L2"}
    shipped = bd._ROWS16_LAYOUT["Q8_0"][2]
    drivers = {"lanes": _specialize(bd._mml_template, "Q8_0", bd._lanes_dot("Q8_0", bd._lane_q8_0, bd._MR_LANES,
                                                                             bd.LANES), suffix="_bench_lanes"),
               "rows16 on the packed copy (shipped)": bd.PACKED_KERNELS.get("Q8_0"),
               f"rows16, {prefetch[shipped]} (as shipped)": bd.LANE_KERNELS["Q8_0"],
               f"rows16, {prefetch[not shipped]}": _specialize(bd._mm16_template, "Q8_0",
                                                               bd._rows16_dot("Q8_0", far=not shipped),
                                                               suffix="_bench_other_prefetch")}
    outs = {k: np.zeros((T, q.n_out), np.float32) for k in drivers}
    clock = time.thread_time if threads == 1 else time.perf_counter
    ms: dict[str, list[float]] = {k: [] for k in drivers}
    for i in range(repeat + 1):  # the first round compiles and warms
        for k, f in drivers.items():
            t0 = clock()
            _run_fused(f, [q.packed16() if f is bd.PACKED_KERNELS.get("Q8_0") else q.raw], q.n_in, qx, dx, bsums,
                       [outs[k]])
            if i:
                ms[k].append((clock() - t0) * 1e3)
    ref = outs["lanes"]
    print(f"{m.path.name}: {q.n_out} x {q.n_in} Q8_0 classifier, {T} rows, {threads} thread(s), {repeat} calls each")
    print("| driver | median ms | min ms | max abs diff vs lanes |")
    print("|---|---:|---:|---:|")
    for k, v in ms.items():
        print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {float(np.abs(outs[k] - ref).max()):.2g} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=SERVE)
    p.add_argument("--rows", default="1,2,3,4,8,16")
    p.add_argument("--tiles", default="", help="extra tile shapes MRxNT, e.g. 2x4,1x8")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--model", default="", help="time the products of this model's decode step instead")
    p.add_argument("--classifier", default="", metavar="MODEL", help="time this model's Q8_0 classifier on each "
                   "AVX-512 driver instead (8 rows, or the first of --rows where given)")
    p.add_argument("--threads", type=int, default=1, help="--classifier: Numba threads")
    p.add_argument("--repeat", type=int, default=21, help="--classifier: calls per driver")
    a = p.parse_args()
    if a.classifier:
        classifier_drivers(a.classifier, int(a.rows.split(",")[0]) if a.rows != p.get_default("rows") else 8,
                           a.threads, a.repeat)
        return 0
    if a.model:
        model_products(a.model, [int(t) for t in a.rows.split(",")])
        return 0
    import numba

    from edgeq.cpu_kernels.linear import QuantLinear, _quantized, _run_fused, act_group

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    tiles = [tuple(int(v) for v in s.split("x")) for s in a.tiles.split(",") if s]
    head = ["single-row", "shipped"] + [f"{mr}x{nt}" for mr, nt in tiles]  # shipped: what QuantLinear picks for T
    print("| type | shape | T | " + " | ".join(f"{h} us" for h in head) + " | speedup |")
    print("|---|---|---:|" + "---:|" * (len(head) + 1))
    for qtype in a.types.split(","):
        n_out, n_in = (2048, 768) if qtype.endswith("_K") or qtype == "IQ4_XS" else (1536, 576)
        raw = random_weights(qtype, n_out, n_in, rng)
        q = QuantLinear(raw, qtype, (n_out, n_in))
        variants = [variant(qtype, mr, nt) for mr, nt in tiles]
        for T in (int(t) for t in a.rows.split(",")):
            kernels = [q._mm, q._integer_kernel(T)] + variants
            X = rng.standard_normal((T, n_in)).astype(np.float32)
            Y = np.empty((T, n_out), np.float32)

            def run(k):
                qx, dx, bsums = _quantized(X, act_group(qtype))
                _run_fused(k, [q.packed16() if k is q._mm_packed else raw], n_in, qx, dx, bsums, [Y])
            us = [cpu_us(lambda k=k: run(k), a.min_time) for k in kernels]
            print(f"| {qtype} | {n_out}x{n_in} | {T} | " + " | ".join(f"{u:.0f}" for u in us) +
                  f" | {us[0] / us[1]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
