"""Speed of the quantized matrix kernels (cpu_kernels/linear.py) at the SmolLM2-135M and Gemma-3-270M shapes.

    python benchmarks/matvec_bench.py                         # every quantized type, 1 and 2 threads
    python benchmarks/matvec_bench.py --types Q4_1,Q8_0 --threads 2 --matmul 512

matvec: GB/s of weight bytes read per call (the decode cost model: every weight byte is read once per token).
matmul: GFLOP/s (2 * T * n_out * n_in per call) for T activation rows (prefill).
k-quants and IQ4_XS need rows of a multiple of 256 weights: shapes with n_in = 576 or 640 are skipped for them
(llama.cpp falls back to Q5_0/Q8_0 for those tensors). Weights are random codes with finite scales (speed
does not depend on the values). Each number is the median
of --repeat runs, each run the mean over >= --min-time seconds: the machines are shared and noisy.
One JSON line per measurement, then markdown tables (medians, then the best runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = {
    "smollm2": [(576, 576), (1536, 576), (576, 1536), (49152, 576)],
    "gemma3": [(640, 640), (2048, 640), (640, 1024), (640, 2048), (262144, 640)],
}
QUANT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
# byte offsets of the f16 scales per block, so that random bytes stay finite
SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_weights(qtype: str, n_out: int, n_in: int, rng) -> np.ndarray:
    from edgeq.cpu_kernels.linear import BLOCKS

    bw, bb = BLOCKS[qtype]
    if qtype in ("F32", "F16", "BF16"):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        if qtype == "F16":
            w = w.astype(np.float16)
        elif qtype == "BF16":
            w = (w.view(np.uint32) >> 16).astype(np.uint16)
        return w.view(np.uint8).reshape(-1)
    raw = rng.integers(0, 256, size=(n_out, n_in // bw, bb), dtype=np.uint8)
    s = (rng.random((n_out, n_in // bw, 1)) * 0.01).astype(np.float16).view(np.uint8)
    for p in SCALES[qtype]:
        raw[:, :, p:p + 2] = s
    return raw.reshape(-1)


def timeit(fn, min_time: float, repeat: int) -> tuple[float, float]:
    """(median, min) over `repeat` runs of the mean call time; the min is the least disturbed run."""
    fn()
    runs = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        runs.append(dt / n)
    return statistics.median(runs), min(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(QUANT))
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--matmul", type=int, default=512, help="T for the matmul (prefill) test; 0 = skip")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    a = ap.parse_args()

    import numba

    from edgeq.cpu_kernels.linear import BLOCKS, QuantLinear

    threads = [int(t) for t in a.threads.split(",")]
    shapes = [s for m in a.models.split(",") for s in SHAPES[m]]
    rng = np.random.default_rng(0)
    rows = []
    for qtype in a.types.split(","):
        mv = {}
        mv_best = {}
        mm = {}
        mm_best = {}
        for n_out, n_in in shapes:
            if n_in % BLOCKS[qtype][0]:
                continue
            q = QuantLinear(random_weights(qtype, n_out, n_in, rng), qtype, (n_out, n_in))
            x = rng.standard_normal(n_in).astype(np.float32)
            y = np.empty(n_out, np.float32)
            for th in threads:
                numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
                t, tmin = timeit(lambda: q.matvec(x, out=y), a.min_time, a.repeat)
                mv[(n_out, n_in, th)] = q.nbytes / t / 1e9
                mv_best[(n_out, n_in, th)] = q.nbytes / tmin / 1e9
                print(json.dumps(dict(kind="matvec", qtype=qtype, shape=[n_out, n_in], threads=th,
                                      us=round(t * 1e6, 1), gbs=round(mv[(n_out, n_in, th)], 2),
                                      best_gbs=round(q.nbytes / tmin / 1e9, 2))), flush=True)
            if a.matmul and n_out <= 4096:
                X = rng.standard_normal((a.matmul, n_in)).astype(np.float32)
                Y = np.empty((a.matmul, n_out), np.float32)
                th = threads[-1]
                numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
                t, tmin = timeit(lambda: q.matmul(X, out=Y), a.min_time, max(3, a.repeat // 2))
                flop = 2 * a.matmul * n_out * n_in
                mm[(n_out, n_in)] = flop / t / 1e9
                mm_best[(n_out, n_in)] = flop / tmin / 1e9
                print(json.dumps(dict(kind="matmul", qtype=qtype, shape=[n_out, n_in], T=a.matmul, threads=th,
                                      ms=round(t * 1e3, 2), gflops=round(mm[(n_out, n_in)], 1),
                                      best_gflops=round(flop / tmin / 1e9, 1))), flush=True)
        rows.append((qtype, mv, mm, mv_best, mm_best))

    for label, pick in (("median", lambda r: (r[1], r[2])), ("best run", lambda r: (r[3], r[4]))):
        print(f"\n## {label}\n")
        hdr = [f"{o}x{i}" for o, i in shapes]
        print("matvec GB/s (weight bytes / time), threads " + " | ".join(map(str, threads)) + " per cell\n")
        print("| type | " + " | ".join(hdr) + " |")
        print("|---" * (len(hdr) + 1) + "|")
        for r in rows:
            mv = pick(r)[0]
            cells = [" / ".join(f"{mv[(o, i, th)]:.1f}" for th in threads) if (o, i, threads[0]) in mv else "-"
                     for o, i in shapes]
            print(f"| {r[0]} | " + " | ".join(cells) + " |")
        if a.matmul:
            mshapes = [(o, i) for o, i in shapes if o <= 4096]
            print(f"\nmatmul T={a.matmul} GFLOP/s, {threads[-1]} threads\n")
            print("| type | " + " | ".join(f"{o}x{i}" for o, i in mshapes) + " |")
            print("|---" * (len(mshapes) + 1) + "|")
            for r in rows:
                mm = pick(r)[1]
                print(f"| {r[0]} | " + " | ".join(f"{mm[s]:.0f}" if s in mm else "-" for s in mshapes) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
