"""Prefill and decode speed of a loaded model, llama-bench's method (../shared/tools/llamacpp_bench.py):
warm-up; a prefill of the whole prompt; N greedy decodes continuing after it."""
from __future__ import annotations

import time

import numpy as np


def bench_one(model, prompt: list[int], n_gen: int) -> dict:
    # every step ends with the logits on the host (the CUDA path copies them back), so the timings
    # include all device work
    # warm-up as llama-bench's: 32 prompt tokens and one decode step (touches the weights and loads the
    # kernels; next-token logits only)
    model.reset()
    model.append([int(np.argmax(model.append(prompt[:32])))])
    model.reset()
    t = time.perf_counter()
    logits = model.append(prompt)             # prefill in batches of up to 512
    t_pp = time.perf_counter() - t
    nxt = int(np.argmax(logits))
    t = time.perf_counter()
    for _ in range(n_gen):
        logits = model.append([nxt])
        nxt = int(np.argmax(logits))
    t_tg = time.perf_counter() - t
    model.reset()
    return {"prefill_tps": len(prompt) / t_pp, "decode_tps": n_gen / t_tg, "t_pp_s": t_pp, "t_tg_s": t_tg}
