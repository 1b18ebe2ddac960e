#!/usr/bin/env python3
"""Prefill of 512 tokens on ONE thread, timed in process CPU seconds, edgeq and llama.cpp side by side.

    python benchmarks/prefill_cpu_vs_llamacpp.py FILE_OR_MODEL [...] [--runs 3] [--edgeq-python PY]

On a machine shared with other work the wall clock measures the scheduler; the CPU time of a one-thread
prefill still measures the code. Each side runs in its own process (edgeq in this python, llama.cpp in the
python of yardstick.llamacpp_python()), alternating, after one warm-up prefill of the same prompt (kernels
compiled or loaded, weights paged in); the medians are compared as a ratio (> 1: edgeq is faster).
--edgeq-python runs edgeq's side with another python (another checkout's, to compare commits).
The prompt is the first 512 tokens of the hamlet text, as `edgeq bench` and ../shared/tools/llamacpp_bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N_TOKENS = 512


def child_edgeq(model: str, text: str) -> float:
    import edgeq

    m = edgeq.load(model, n_ctx=2048, threads=1)
    with open(text, encoding="utf-8") as f:
        ids = m.encode_prompt(f.read()[:40000])[:N_TOKENS]
    m.reset()
    m._forward(ids)
    m.reset()
    t = time.process_time()
    m._forward(ids)
    return time.process_time() - t


def child_llamacpp(model: str, text: str) -> float:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=1, n_threads_batch=1,
                logits_all=False, verbose=False)
    ctx, mem = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    with open(text, "rb") as f:
        toks = llm.tokenize(f.read().decode("utf-8")[:20000].encode("utf-8"), add_bos=True, special=False)
    prompt = toks[:N_TOKENS]

    def decode():
        arr = (llama_cpp.llama_token * len(prompt))(*prompt)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed")
        llama_cpp.llama_synchronize(ctx)

    decode()
    llama_cpp.llama_memory_clear(mem, True)
    t = time.process_time()
    decode()
    dt = time.process_time() - t
    llm.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--edgeq-python", default=sys.executable, help="the python of edgeq's side")
    ap.add_argument("--child", choices=["edgeq", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = child_edgeq if a.child == "edgeq" else child_llamacpp
        print(json.dumps({"cpu_s": fn(a.files[0], a.text)}), flush=True)
        return

    from yardstick import last_json, llamacpp_python

    from edgeq.assets import resolve_model, text_path

    text = str(text_path("hamlet"))
    py = llamacpp_python()
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    print("| file | edgeq t/s (CPU) | llama.cpp t/s (CPU) | edgeq / llama.cpp |\n|---|---|---|---|", flush=True)
    for model in (str(resolve_model(f)) for f in a.files):  # catalog names -> paths (llama.cpp takes a path)
        times: dict[str, list[float]] = {"edgeq": [], "llamacpp": []}
        for _ in range(a.runs):
            for side, exe in (("edgeq", a.edgeq_python), ("llamacpp", py)):
                if exe is None:
                    continue
                p = subprocess.run([exe, __file__, model, "--child", side, "--text", text], capture_output=True,
                                   text=True, env=env)
                if p.returncode:
                    raise SystemExit(f"{side} on {model} failed: {p.stderr.strip()[-1500:]}")
                times[side].append(last_json(p.stdout)["cpu_s"])
        e = N_TOKENS / statistics.median(times["edgeq"])
        ll = N_TOKENS / statistics.median(times["llamacpp"]) if times["llamacpp"] else float("nan")
        print(f"| {os.path.basename(model)} | {e:.1f} | {ll:.1f} | {e / ll:.2f} |", flush=True)


if __name__ == "__main__":
    main()
