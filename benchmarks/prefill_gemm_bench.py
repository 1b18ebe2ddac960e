#!/usr/bin/env python3
"""Prefill matmul per weight type: float32 tiles + float GEMM (linear.QuantLinear's float path) against the int8
GEMM (cpu_kernels/gemm_i8.py), at the matrix shapes of the real-size files (benchmarks/make_size_models.py).

    python benchmarks/prefill_gemm_bench.py [--types Q4_K,Q6_K,Q8_0,Q5_0] [-T 512] [--threads 2] [--repeat 3]
        [--cpu-time]

GFLOP/s = 2 T n_out n_in / seconds, median of --repeat calls after one warm-up; both paths on the same weights
(random codes with finite scales: speed does not depend on the values), one after the other. --cpu-time
(with --threads 1) times the process's CPU time instead of the wall clock: on a loaded machine the wall clock
measures the scheduler, the CPU time still the kernel. The choice of
gemm_i8.INT8_GEMM comes from this table (docs/performance.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = {  # (n_out, n_in): attention q/o, ffn gate/up, ffn down (the small models: k/v too)
    "gemma3-270m": [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)],
    "qwen2.5-0.5b": [(896, 896), (128, 896), (4864, 896), (896, 4864)],
    "qwen3-1.7b": [(2048, 2048), (6144, 2048), (2048, 6144)],
    "llama3.2-3b": [(3072, 3072), (8192, 3072), (3072, 8192)],
}
SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def weights(qtype: str, n_out: int, n_in: int):
    import numpy as np

    from edgeq.cpu_kernels.linear import BLOCKS

    bw, bb = BLOCKS[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(n_out, n_in // bw, bb), dtype=np.uint8)
    scales = (rng.random((n_out, n_in // bw, 1)) * 0.02 + 1e-4).astype(np.float16).view(np.uint8)
    for p in SCALES[qtype]:
        raw[:, :, p:p + 2] = scales
    return raw.reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q5_0")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("-T", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true", help="CPU seconds instead of wall seconds (use 1 thread)")
    a = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))
    import numpy as np

    from edgeq.cpu_kernels import gemm_i8
    from edgeq.cpu_kernels.linear import BLOCKS, QuantLinear

    clock = time.process_time if a.cpu_time else time.perf_counter

    def rate(fn, flop):
        fn()
        ts = []
        for _ in range(a.repeat):
            t = clock()
            fn()
            ts.append(clock() - t)
        return flop / statistics.median(ts) / 1e9

    print(f"T = {a.T}, {a.threads} threads, SIMD level {gemm_i8.simd.LEVEL}, "
          f"{'CPU' if a.cpu_time else 'wall'} seconds\n")
    print("| type | shape (n_out x n_in) | float tiles GFLOP/s | int8 GEMM GFLOP/s | int8 / float |")
    print("|---|---|---|---|---|")
    X = np.random.default_rng(1).standard_normal((a.T, 8192)).astype(np.float32)
    for qtype in a.types.split(","):
        for model in a.models.split(","):
            for n_out, n_in in SHAPES[model]:
                if n_in % BLOCKS[qtype][0]:
                    continue
                q = QuantLinear(weights(qtype, n_out, n_in), qtype, (n_out, n_in))
                x = np.ascontiguousarray(X[:, :n_in])
                Y = np.empty((a.T, n_out), np.float32)
                flop = 2.0 * a.T * n_out * n_in
                q._int8_gemm = None
                f = rate(lambda: q.matmul(x, Y), flop)
                i = rate(lambda: gemm_i8.matmul_i8(q.raw, qtype, n_in, x, Y), flop)
                print(f"| {qtype} | {n_out} x {n_in} | {f:.0f} | {i:.0f} | {i / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
