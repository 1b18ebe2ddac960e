#!/usr/bin/env python3
"""What the decode's arithmetic costs on top of its memory traffic: the same decode steps (a prompt of P tokens, then
N tokens, greedy) with the single-token row dots of the chosen weight types replaced by loads only: every 64-byte
line of every block still read, in the same order, with the same in-loop prefetch (cpu_kernels/simd.py ROW_NEAR/FAR),
its words folded into a test whose result goes into the row's sum, so that nothing is optimised away and the products
stay ~0 (the activations stay bounded: garbage products slowed the rest of the step). The products are wrong and the time is
what reading the weights takes beside the rest of the step. Each variant runs in a fresh process, the variants
alternated, medians of the rounds.

    python benchmarks/decode_arithmetic.py ~/.cache/edgeq-bench/qwen3-1.7b-q4_k_m.gguf [--types Q4_K Q6_K]
        [-p 512] [-n 48] [--rounds 3] [-t 2]

Variants: "real" (the kernels as they are), "control:T1+T2" (the real row dots of those types put in through the same
replacement as the loads-only ones), "loads:T1+T2" (every type asked for without arithmetic), and each type alone.
A decode that is x ms a token with the control and y with the loads only spends x - y on the arithmetic that the
memory stream does not hide; issue 17's 70% of the bandwidth bound needs the token at
file size / (0.7 x bandwidth). The control is the baseline because the replacement alone has moved the time: on the
Qwen3-1.7B-shape Q8_0 file (2026-12-06, Xeon) one run of 3 rounds had the control 4.4 ms a token faster than "real"
with the same products (66.6 against 70.9 ms), the next run 0.2 ms slower (73.5 against 73.3), for a reason not found
(the same driver template, row dot and globals): "real" against "control" shows how far a run can be trusted.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import statistics
import subprocess
import sys
import time


def _loads_block(block_bytes: int):
    """Block IR (simd._row_dot's `block` argument) reading one 32-bit word of each 64-byte line of a block and its
    last word, xor-folded; the row's sum gets 1.0 where the fold equals a magic word and 0.0 elsewhere, so the loads
    stay (the result depends on them) and the products stay ~0. With the fold itself added (up to 2^31 a block) a
    Llama-3.2-3B shape's token took 165 ms instead of 96: the activations grow without bound through the layers,
    presumably onto slow paths for non-finite or subnormal values."""
    from llvmlite import ir

    from edgeq.cpu_kernels import simd

    offs = list(range(0, block_bytes, 64)) + [block_bytes - 4]

    def block(x, acc, row, o, b, qx, dx, bsums):
        s = None
        for off in offs:
            v = x.at(row, x.b.add(o, ir.Constant(simd.I64, off)), simd.I32)
            s = v if s is None else x.b.xor(s, v)
        magic = x.b.icmp_unsigned("==", s, ir.Constant(simd.I32, 0x5EED1234))
        acc.add(x.b.select(magic, ir.Constant(simd.F32, 1.0), ir.Constant(simd.F32, 0.0)))
    return block


def _install(qtypes: list[str], loads: bool) -> None:
    """Replace the decode drivers of `qtypes` (linear._KERNELS, read by QuantLinear at load) with loads-only ones, or
    (loads=False: the control) with the real row dots through the same replacement. A
    type that decodes through batch_dot's one-row tiles (ONE_ROW, on AVX2) loses them, so that its single-token
    products take the loads-only driver instead of silently staying real; likewise a type whose row dot runs block pairs
    (simd.PAIR_IR, AVX-512: Q8_0, Q4_0, ...) loses them, or its row dot would keep the real pairs and use the loads
    block only for an odd last block."""
    from edgeq.cpu_kernels import batch_dot, simd
    from edgeq.cpu_kernels import linear as L
    from edgeq.formats.quants import QTYPES

    tag = hashlib.sha1(inspect.getsource(_loads_block).encode()).hexdigest()[:8]  # its own cache entry per version
    for q in qtypes:
        if loads:
            simd.PAIR_IR.pop(q, None)  # read when the row dot's IR is generated: the driver's first call, after this
            dot = simd._row_dot(q, _loads_block(QTYPES[q].block_bytes), simd.ROW_NEAR, simd.ROW_FAR)
        else:
            dot = simd.ROW_DOTS[q]
        mm = L._specialize(L._mm_template, q, dot, suffix=f"_{'loads' if loads else 'control'}_{tag}", _ROW_BURST=0)
        L._KERNELS[q] = (mm, L._KERNELS[q][1])
        batch_dot.ONE_ROW.pop(q, None)


def child(a) -> None:
    import numpy as np

    if a.child != "real":
        kind, _, qtypes = a.child.partition(":")
        _install(qtypes.split("+"), loads=kind == "loads")
    import edgeq
    from edgeq.assets import text_path

    m = edgeq.load(a.model, n_ctx=a.prompt_tokens + a.gen_tokens + 16, threads=a.threads)
    missing = [q for q in a.types if q not in {t.qtype for t in m.gguf.tensors.values()}]
    ids = m.encode_prompt(text_path("hamlet").read_text(encoding="utf-8")[:40000])[:a.prompt_tokens]
    m.reset()
    m._forward(ids)
    tok = ids[-1]
    m._forward([tok])  # the single-token kernels load (or compile) here, outside the timed steps
    t0 = time.perf_counter()
    for _ in range(a.gen_tokens):
        tok = int(np.argmax(m._forward([tok])))
    print(f"RESULT {1000 * (time.perf_counter() - t0) / a.gen_tokens:.3f} {','.join(missing)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--gen-tokens", type=int, default=48)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model = os.path.expanduser(a.model)
    if a.child:
        child(a)
        return
    every = "+".join(a.types)
    variants = ["real", "control:" + every, "loads:" + every] + (["loads:" + q for q in a.types] if len(a.types) > 1
                                                                 else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    base = [sys.executable, os.path.abspath(__file__), a.model, "--types", *a.types, "-p", str(a.prompt_tokens),
            "-n", str(a.gen_tokens), "-t", str(a.threads)]
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            out = subprocess.run(base + ["--child", v], capture_output=True, text=True, check=True).stdout
            ms, _, missing = out.split("RESULT ")[-1].strip().partition(" ")
            if missing:
                print(f"note: the file has no tensor of type {missing}")
            times[v].append(float(ms))
            print(f"round {r + 1}: {v:24s} {float(ms):7.2f} ms a token", flush=True)
    control = statistics.median(times["control:" + every])
    print(f"\n{os.path.basename(a.model)}: decode after a {a.prompt_tokens}-token prompt, {a.gen_tokens} tokens, "
          f"{a.threads} threads, medians of {a.rounds} (fresh processes, alternated)")
    print("| variant | ms a token | less than control |\n|---|---|---|")
    for v in variants:
        t = statistics.median(times[v])
        print(f"| {v} | {t:.2f} | {control - t:.2f} |")


if __name__ == "__main__":
    main()
