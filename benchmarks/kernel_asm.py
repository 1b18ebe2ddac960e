"""Instruction census of the hot decode kernels' machine code (the issue's "check the generated assembly").

    python benchmarks/kernel_asm.py [--out docs/results/kernel_asm.md]

Compiles every quantized matvec driver (cpu_kernels/linear.py + the SIMD row dots of cpu_kernels/simd.py)
and the decode attention kernel into an empty Numba cache (inspection needs a fresh compile) and counts the
instructions that matter: byte dot products (vpdpbusd / vpmaddubsw), FMAs, f16 conversions, gathers
(should be none), and zmm/ymm register use. Takes about a minute (cold compiles).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgeq-asm-")  # before numba is imported

import numpy as np  # noqa: E402

import edgeq  # noqa: E402, F401
from edgeq.cpu_kernels import linear as L  # noqa: E402
from edgeq.cpu_kernels import simd  # noqa: E402


def census(asm: str) -> dict:
    ins = Counter(re.findall(r"\t(v[a-z0-9]+)\s", asm))
    return {"vpdpbusd": ins["vpdpbusd"], "vpmaddubsw": ins["vpmaddubsw"], "vpmaddwd": ins["vpmaddwd"],
            "vfmadd": sum(v for k, v in ins.items() if k.startswith("vfmadd")),
            "f16 cvt": ins["vcvtph2ps"] + ins["vcvtsh2ss"],
            "gathers": sum(v for k, v in ins.items() if "gather" in k),
            "zmm": asm.count("%zmm"), "ymm": asm.count("%ymm")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for qt, (mm, _) in L._KERNELS.items():
        if mm is None:
            continue
        bw, bb = L.BLOCKS[qt]
        n_in = max(bw, 32)
        raw = np.zeros(bb * (n_in // bw) * 8, np.uint8)
        L._run_fused(mm, [raw], n_in, np.zeros((1, n_in), np.int8), np.zeros((1, n_in // 32), np.float32),
                     np.zeros((1, n_in // 16), np.int32), [np.zeros((1, 8), np.float32)])
        rows.append((f"matvec {qt}", census("\n".join(mm.inspect_asm().values()))))
    from edgeq.runtime.kv_cache import make_kv_cache

    class Layout:
        n_kv_heads, head_dim, window = 1, 64, 0

    cache = make_kv_cache([Layout()], 64, "q8", "q8")
    k = np.ones((4, 1, 64), np.float32)
    cache.store(0, 0, k, k)
    cache.attend(0, np.ones((1, 3, 64), np.float32), 3, 0.125)
    from edgeq.cpu_kernels import attention_q as aq

    L0 = cache.layers[0]
    kl, vl = L0.k.side.layout, L0.v.side.layout
    decode, job = aq.attention_kernels(kl, vl)[1], aq.decode_job_for(kl, vl)  # the job: called through its address
    rows.append(("attention decode (q8 cache)", census("\n".join([*decode.inspect_asm().values(),
                                                                   *job.inspect_asm().values()]))))
    keys = list(rows[0][1])
    lines = [f"SIMD level: {simd.LEVEL}", "", "| kernel | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(str(c[k]) for k in keys) + " |" for name, c in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("`python benchmarks/kernel_asm.py` (instruction counts in the compiled drivers, row dots inlined)\n\n"
                    + text + "\n")


if __name__ == "__main__":
    main()
