#!/usr/bin/env python3
"""The decode row dots' software prefetch, measured: every matrix of at least 2048 rows of a file, of each weight
type asked for, through the single-token driver compiled once per variant in this process (no source edit), the
variants alternated, medians of the passes, GB/s of weights read. Two kinds: a burst of a row's span D bytes ahead
before each row (`--distances`, cpu_kernels/linear.py `_ROW_BURST`), and the row dot's own prefetch, a line D bytes
ahead per 64 bytes as its block loop goes (`--in-loop`, cpu_kernels/simd.py `ROW_AHEAD`), each also with a second
prefetch into L2 F bytes ahead for every F of `--l2` (0: none; the shipped single-row dots: simd.ROW_NEAR / ROW_FAR).

    python benchmarks/prefetch_distance.py ~/.cache/edgeq-bench/qwen3-1.7b-q4_k_m.gguf [--types Q4_K Q6_K]
        [--distances 0 1024 1536 2048 4096] [--in-loop 1536 2048] [--l2 0 3072] [--passes 5] [--mmap] [-t 2]

F16/BF16: the bursts on the loop driver (`_dot_half_template`, its `_PREFETCH`), the in-loop distances on the vector-IR
row dot (simd.HALF_DOTS, what decode runs). Distance 0: no prefetch.
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


def variants(qtype: str, distances: list[int], inloop: list[int], l2: tuple = (0,)) -> dict:
    """label -> the decode driver of qtype: "D B" with a burst D bytes ahead before each row (row dots without their
    own prefetch; 0: none), "in D" with the row dot's own prefetch D bytes ahead of each block (simd._row_dot's
    `ahead`, no burst). F16/BF16: bursts on the loop driver (`_dot_half_template`, its _PREFETCH), in-loop on the
    vector-IR one (`_dot_half_ir_template`, simd._half_row_dot)."""
    if qtype in ("F16", "BF16"):  # the loop template in full fastmath, as linear._HALF_ROWS where no HALF_DOTS
        row_fn = L._half if qtype == "F16" else L._bf16_to_f32
        out = {f"{d} B": L._specialize(L._dot_half_template, qtype, row_fn, fastmath=True, suffix=f"_pf{d}",
                                       _PREFETCH=d or 1 << 40) for d in distances}
        for d in inloop if qtype in simd.HALF_DOTS and simd.ROW_AHEAD else ():
            out[f"in {d}"] = L._specialize(L._dot_half_ir_template, qtype, simd._half_row_dot(qtype, d),
                                           suffix=f"_in{d}")
        return out
    plain = simd._row_dot(qtype, simd.BLOCK_IR[qtype])
    out = {f"{d} B": L._specialize(L._mm_template, qtype, plain, fastmath=L._FAST, suffix=f"_pf{d}", _ROW_BURST=d)
           for d in distances}
    for d in inloop:
        for f in l2:
            out[f"in {d}" + (f"+L2 {f}" if f else "")] = L._specialize(
                L._mm_template, qtype, simd._row_dot(qtype, simd.BLOCK_IR[qtype], ahead=d, far=f), fastmath=L._FAST,
                suffix=f"_in{d}_l2{f}", _ROW_BURST=0)
    return out


def measure(gf: GGUFFile, qtype: str, distances: list[int], inloop: list[int], passes: int, l2: tuple = (0,)) -> dict:
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
    fns = variants(qtype, distances, inloop, l2)
    for f in fns.values():
        f(*calls[0])  # compile
    nbytes = sum(t.nbytes for t in ts)
    res = {d: [] for d in fns}
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
    ap.add_argument("--in-loop", nargs="*", type=int, default=[], help="distances of the row dots' own prefetch, "
                    "one per 64 bytes as the block loop goes (the row burst off)")
    ap.add_argument("--l2", nargs="*", type=int, default=[0], help="with each --in-loop distance, a second prefetch "
                    "into L2 this many bytes ahead (0: none)")
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
    print(f"{gf.path}: {where}, {a.threads} threads, this CPU's burst {L._ROW_BURST} (F16 {L._PREFETCH}), in-loop "
          f"{simd.ROW_AHEAD} (the single-row dots {simd.ROW_NEAR} + L2 {simd.ROW_FAR}), GB/s (medians of {a.passes})")
    labels = [f"{d} B" for d in a.distances] + [f"in {d}" + (f"+L2 {f}" if f else "") for d in a.in_loop
                                                  for f in a.l2]
    print("| type | matrices | MB | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for qtype in types:
        if qtype not in simd.ROW_DOTS and qtype not in ("F16", "BF16"):
            continue
        r = measure(gf, qtype, a.distances, a.in_loop, a.passes, tuple(a.l2))
        if r:
            print(f"| {qtype} | {r['matrices']} | {r['MB']:.0f} | " + " | ".join(f"{r[k]:.1f}" if k in r else "-"
                                                                              for k in labels)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
