#!/usr/bin/env python3
"""The CUDA path on a GPU machine, in one run: kernel tests on the GPU, CUDA-vs-CPU logits, perplexity and
speed on both devices (issue 8's measurement; docs/results/cuda.md).

    pip install -e ".[cuda]"              # numba-cuda
    python benchmarks/cuda_check.py --install cu12 --out docs/results/cuda_run.md
        [--models smollm2-135m-instruct gemma3-270m] [--threads 16] [--skip-tests] [--quick]

--install cu12|cu13 adds the CUDA toolkit wheels (`numba-cuda[cu12]`, for drivers >= 525; `[cu13]` for
drivers >= 580) when numba-cuda cannot reach a GPU yet, then restarts itself. Models are catalog names or
GGUF paths (the catalog ones must be downloaded already, or reachable). Exit 2: no GPU to run on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], env=None, timeout=1800) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def ensure_gpu(install: str | None) -> None:
    from edgeq.gpu_kernels import device

    if device.gpu_present():
        return
    if install and not os.environ.get("EDGEQ_CUDA_CHECK_REEXEC"):
        r = sh([sys.executable, "-m", "pip", "install", "-q", f"numba-cuda[{install}]>=0.30"])
        print(r.stdout[-2000:], r.stderr[-2000:])
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, EDGEQ_CUDA_CHECK_REEXEC="1"))
    print(f"cuda_check: no GPU to run on ({device.unavailable_reason()})", file=sys.stderr)
    sys.exit(2)


def last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {out[-1000:]}")


def prompt_ids(model, n: int) -> list[int]:
    from edgeq.assets import text_path

    text = text_path("hamlet").read_text(encoding="utf-8")[5000:60000]
    return model.tokenizer.encode(text, add_special=True, parse_special=False)[:n]


def parity(name: str, threads: int, n_tokens: int, n_decode: int) -> dict:
    """Logits of the same tokens on both devices: a prefill of n_tokens (Gemma 3: past its 512 window, in
    two batches), then n_decode greedy steps on each, fed the CPU's choices."""
    import edgeq

    cpu = edgeq.load(name, n_ctx=2048, threads=threads, cache_type_k="f32", cache_type_v="f32", device="cpu")
    t = time.perf_counter()
    gpu = edgeq.load(name, n_ctx=2048, device="cuda")
    upload_s = time.perf_counter() - t
    ids = prompt_ids(cpu, n_tokens)
    a = cpu.logits(ids)
    t = time.perf_counter()
    b = gpu.logits(ids)
    first_s = time.perf_counter() - t  # includes compiling the kernels
    rel = np.abs(a - b).max(axis=1) / np.abs(a).max(axis=1)
    steps = []
    nxt = int(np.argmax(a[-1]))
    for _ in range(n_decode):
        x, y = cpu._forward([nxt]), gpu._forward([nxt])
        steps.append(float(np.abs(x - y).max() / np.abs(x).max()))
        nxt = int(np.argmax(x))
    return {"model": Path(cpu.path).name, "device": gpu.device_name, "tokens": len(ids),
            "max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
            "argmax_agree": float((a.argmax(1) == b.argmax(1)).mean()), "decode_max_rel": max(steps),
            "fallback_types": sorted(gpu._gpu.fallback_types), "gpu_weight_mb": gpu._gpu.weight_nbytes / 2**20,
            "upload_s": upload_s, "first_call_s": first_s}


def perplexity(name: str, dev: str, threads: int, chunks: int, cache: str | None) -> dict:
    from edgeq.assets import text_path

    cmd = [sys.executable, "-m", "edgeq.cli", "perplexity", name, "-f", text_path("hamlet"), "--ctx", "512",
           "--chunks", str(chunks), "--device", dev, "-t", str(threads), "--json"]
    if cache:
        cmd += ["-ctk", cache, "-ctv", cache]
    r = sh(cmd)
    if r.returncode:
        return {"error": r.stderr.strip()[-500:]}
    return last_json(r.stdout)


def bench(name: str, dev: str, threads: int, pp: int, tg: int) -> dict:
    r = sh([sys.executable, "-m", "edgeq.cli", "bench", name, "--device", dev, "-t", str(threads), "-p", str(pp),
            "-n", str(tg), "--ctx", str(pp + tg + 16), "--json"])
    if r.returncode:
        return {"error": r.stderr.strip()[-500:]}
    return last_json(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="CPU threads for the CPU side")
    ap.add_argument("--install", choices=("cu12", "cu13"), default=None)
    ap.add_argument("--skip-tests", action="store_true", help="skip the kernel/forward tests on the GPU")
    ap.add_argument("--quick", action="store_true", help="smaller runs (2 ppl chunks, pp128/tg32)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    ensure_gpu(a.install)
    from edgeq.gpu_kernels import device

    lines = [f"# CUDA check on {device.describe()}", ""]
    raw: dict = {"device": device.describe()}

    if not a.skip_tests:
        env = dict(os.environ, EDGEQ_CUDA_TESTS="gpu")
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        r = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py",
                "tests/test_cuda_forward.py"], env=env)
        tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        lines += [f"tests on the GPU (EDGEQ_CUDA_TESTS=gpu): rc={r.returncode}: {tail}", ""]
        if r.returncode:
            print(r.stdout[-6000:], r.stderr[-3000:])

    chunks, pp, tg = (2, 128, 32) if a.quick else (8, 512, 128)
    lines += ["## Logits: CUDA vs CPU (float32 KV cache on both)", "",
              "| model | tokens | max rel. Δ | median rel. Δ | same argmax | decode max rel. Δ | upload s | first call s |"
              " fallback types |", "|---|---|---|---|---|---|---|---|---|"]
    for m in a.models:
        n = 700 if "gemma" in m.lower() else 600  # two prefill batches; Gemma 3: past the 512 window
        p = parity(m, a.threads, 128 if a.quick else n, 8)
        raw.setdefault("parity", []).append(p)
        lines.append(f"| {p['model']} | {p['tokens']} | {p['max_rel']:.2e} | {p['median_rel']:.2e} | "
                     f"{100 * p['argmax_agree']:.1f} % | {p['decode_max_rel']:.2e} | {p['upload_s']:.1f} | "
                     f"{p['first_call_s']:.1f} | {', '.join(p['fallback_types']) or '-'} |")
        print(lines[-1], flush=True)

    lines += ["", f"## Perplexity (Hamlet, --ctx 512, {chunks} chunks)", "",
              "| model | device | KV cache | PPL | seconds |", "|---|---|---|---|---|"]
    for m in a.models:
        for dev, cache in (("cuda", None), ("cpu", "f32"), ("cpu", None)):
            r = perplexity(m, dev, a.threads, chunks, cache)
            raw.setdefault("perplexity", []).append(dict(r, model_arg=m, device_arg=dev, cache=cache))
            ppl = f"{r['ppl']:.4f} ± {r['stderr']:.4f}" if "ppl" in r else r.get("error", "?")
            kv = "f32" if dev == "cuda" else (cache or "default (q8)")
            lines.append(f"| {m} | {dev} | {kv} | {ppl} | {r.get('seconds', '-')} |")
            print(lines[-1], flush=True)

    lines += ["", f"## Speed (edgeq bench -p {pp} -n {tg})", "",
              f"| model | device | pp{pp} tok/s | tg{tg} tok/s | load s |", "|---|---|---|---|---|"]
    for m in a.models:
        for dev in ("cuda", "cpu"):
            r = bench(m, dev, a.threads, pp, tg)
            raw.setdefault("bench", []).append(dict(r, model_arg=m, device_arg=dev))
            if "error" in r:
                lines.append(f"| {m} | {dev} | {r['error']} | | |")
            else:
                name = r.get("device_name", dev) + (f", {a.threads} threads" if dev == "cpu" else "")
                lines.append(f"| {m} | {name} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | {r['load_s']:.2f} |")
            print(lines[-1], flush=True)

    report = "\n".join(lines) + "\n"
    print("\n" + report)
    print("JSON:", json.dumps(raw))
    if a.out:
        Path(a.out).write_text(report + "\n<!-- raw: " + json.dumps(raw) + " -->\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
