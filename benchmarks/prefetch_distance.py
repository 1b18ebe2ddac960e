#!/usr/bin/env python3
"""The decode row dots' software prefetch distance (cpu_kernels/linear.py `_PREFETCH`), measured: every matrix of at
least 2048 rows of a file, of each weight type asked for, through the single-token driver compiled once per distance
in this process (no source edit), the distances alternated, medians of the passes, GB/s of weights read.

    python benchmarks/prefetch_distance.py ~/.cache/edgeq-bench/qwen3-1.7b-q4_k_m.gguf [--types Q4_K Q6_K]
        [--distances 0 1024 1536 2048 4096] [--passes 5] [--mmap] [-t 2]

F16/BF16 run through the half-precision decode driver (`_dot_half_template`). Distance 0: no prefetch (a start
past any array, where the prefetch loops issue nothing).
--mmap: the weights on the file mapping (4 KiB pages) instead of read into huge pages (engine.read_weights).
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from edgeq.cpu_kernels import linear as L
from edgeq.cpu_kernels import simd
from edgeq.formats.gguf_file import GGUFFile


def variants(qtype: str, distances: list[int]) -> dict:
    """distance -> the decode driver of qtype compiled with that _PREFETCH (0: 1 << 40, past any array)."""
    if qtype in ("F16", "BF16"):  # full fastmath, as linear._HALF_ROWS
        template, row_fn, fastmath = L._dot_half_template, L._half if qtype == "F16" else L._bf16_to_f32, True
    else:
        template, row_fn, fastmath = L._mm_template, simd.ROW_DOTS[qtype], L._FAST
    return {d: L._specialize(template, qtype, row_fn, fastmath=fastmath, suffix=f"_pf{d}", _PREFETCH=d or 1 << 40)
            for d in distances}


def measure(gf: GGUFFile, qtype: str, distances: list[int], passes: int) -> dict:
    ts = [t for t in gf.tensors.values() if t.qtype == qtype and len(t.shape) == 2 and t.shape[0] >= 2048]
    if not ts:
        return {}
    rng = np.random.default_rng(0)
    half = qtype in ("F16", "BF16")
    outs = [np.empty((1, t.shape[0]), np.float32) for t in ts]
    if half:
        args = [(t.data.view(np.uint16).reshape(t.shape),
                 rng.standard_normal((1, t.shape[1])).astype(np.float32)) for t in ts]
        calls = [(a + (o,)) for a, o in zip(args, outs)]
    else:
        acts = {n: L._quantized(rng.standard_normal((1, n)).astype(np.float32), L.act_group(qtype))
                for n in {t.shape[1] for t in ts}}
        e = L._no_out(1)
        calls = [(L._fused_weights([t.data])[0], t.shape[1], *acts[t.shape[1]], (o, e, e)) for t, o in zip(ts, outs)]
    fns = variants(qtype, distances)
    for f in fns.values():
        f(*calls[0])  # compile
    nbytes = sum(t.nbytes for t in ts)
    res = {d: [] for d in distances}
    for _ in range(passes):
        for d, f in fns.items():
            t0 = time.perf_counter()
            for c in calls:
                f(*c)
            res[d].append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {"matrices": len(ts), "MB": nbytes / 1e6, **{d: float(np.median(v)) for d, v in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--types", nargs="*", default=None, help="weight types (default: every 2-D type in the file)")
    ap.add_argument("--distances", nargs="*", type=int, default=[0, 1024, 1536, 2048, 4096])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--mmap", action="store_true", help="the weights on the file mapping, not in huge pages")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    gf = GGUFFile(os.path.expanduser(a.file))
    if not a.mmap:
        gf.read_into_memory()
    types = a.types or sorted({t.qtype for t in gf.tensors.values() if len(t.shape) == 2})
    where = "file mapping" if a.mmap else "huge pages"
    print(f"{gf.path}: {where}, {a.threads} threads, this CPU's _PREFETCH {L._PREFETCH}, GB/s (medians of {a.passes})")
    print("| type | matrices | MB | " + " | ".join(f"{d} B" for d in a.distances) + " |")
    print("|---|---|---|" + "---|" * len(a.distances))
    for qtype in types:
        if qtype not in simd.ROW_DOTS and qtype not in ("F16", "BF16"):
            continue
        r = measure(gf, qtype, a.distances, a.passes)
        if r:
            print(f"| {qtype} | {r['matrices']} | {r['MB']:.0f} | " + " | ".join(f"{r[d]:.1f}" for d in a.distances)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
