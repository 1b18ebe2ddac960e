#!/usr/bin/env python3
"""edgeq vs llama.cpp, side by side in one run: prefill, decode, load, peak RSS, start-up.

Each measurement runs in its own process, edgeq and llama.cpp alternating, and the medians are compared
as ratios (the machines are noisy). llama.cpp is measured by ../shared/tools/llamacpp_bench.py with the
python of the venv built by ../shared/tools/llamacpp-env.sh.

    python benchmarks/speed_vs_llamacpp.py --runs 3 --threads 2 [--models smollm2-135m-instruct ...] [--sizes all]
        [--files A.gguf ...]

By default the whole table: the two catalog models, then the real-size random-weight files of
benchmarks/make_size_models.py (built and cached on first use; `--sizes NAME ...` picks some, `--sizes none`
skips them). "bound" is the memory-bandwidth bound of decode: this machine's read bandwidth (measured once,
with the run's thread count) over the bytes a decoded token reads (every matrix, the token embedding only
when it is the classifier too); "% bound" is edgeq's decode as a share of it.
Writes a markdown table to stdout (and --out FILE).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


from yardstick import TOOLS, llamacpp_python, run_json


def run_edgeq(model: str, threads: int, text: str, ctx: int, extra: list[str]) -> dict:
    return run_json([sys.executable, "-m", "edgeq.cli", "bench", model, "-p", "512", "-n", "128", "-t", str(threads),
                     "--ctx", str(ctx), "--text", text, "--json", *extra])


def run_llamacpp(py: str, model: str, threads: int, text: str, ctx: int) -> dict:
    return run_json([py, TOOLS / "llamacpp_bench.py", "--model", model, "--threads", str(threads), "--text", text,
                     "--n-ctx", str(ctx), "--no-tg0"])


def first_token_s(model: str, threads: int) -> float:
    """Wall time from launching `edgeq run --chat` to the first byte of the reply on stdout."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", model, "--chat", "-p", "Hi", "-n", "4",
                          "--temp", "0", "-t", str(threads)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    dt = time.perf_counter() - t
    p.communicate()
    return dt


_BANDWIDTH = """
import time, numpy as np, numba
from numba import njit, prange

@njit(parallel=True, fastmath=True, cache=False)
def total(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s

a = np.ones(512 * 2**20, dtype=np.float32)  # 2 GiB: past any L3 (the Intel host reports 480 MB of it)
total(a)
best = 1e9
for _ in range(7):
    t = time.perf_counter(); total(a); best = min(best, time.perf_counter() - t)
print(a.nbytes / best / 1e9)
"""


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth of this machine: a read-only sum over a 2 GiB array on `threads` Numba threads (as the
    decode kernels read), best of 7. 2 GiB, not 512 MB: the Intel host's L3 reports 480 MB, and a 512 MB sum there
    read 29.3 GB/s where 1 / 2 / 3 GB read 29.0 / 27.9 / 26.1 (best of 7, 2 threads), a bound set too high. In a child
    process: a 2 GiB array here would raise the ru_maxrss that every later child inherits on Linux."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    return float(subprocess.run([sys.executable, "-c", _BANDWIDTH], capture_output=True, text=True,
                                check=True, env=env).stdout)


def weight_bytes_per_token(path: str) -> int:
    from edgeq.formats.gguf_file import GGUFFile

    gf = GGUFFile(path)
    total = sum(t.nbytes for n, t in gf.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight")
    if "output.weight" not in gf.tensors:  # tied classifier reads the whole embedding table
        total += gf.tensors["token_embd.weight"].nbytes
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--sizes", nargs="*", default=["all"],
                    help="real-size files of make_size_models.py: names, 'all' (default) or 'none'")
    ap.add_argument("--files", nargs="*", default=[], help="more GGUF files")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--edgeq-args", default="", help="extra args for edgeq bench, e.g. '-ctk f16 -ctv f16'")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from edgeq.assets import text_path
    from edgeq.runtime.engine import resolve_model

    import make_size_models

    sizes = [] if a.sizes == ["none"] else list(make_size_models.MODELS) if a.sizes == ["all"] else a.sizes
    unknown = [n for n in sizes if n not in make_size_models.MODELS]
    if unknown:
        ap.error(f"unknown --sizes name {unknown[0]!r}; known: {', '.join(make_size_models.MODELS)}")
    paths = [str(resolve_model(name)) for name in a.models]
    paths += [str(make_size_models.make(name)) for name in sizes]
    paths += a.files
    text = str(text_path("hamlet"))
    py = llamacpp_python(build=True)
    bw = memory_bandwidth_gbs(a.threads)
    cmd = " ".join(sys.argv[1:])
    lines = [f"`python benchmarks/speed_vs_llamacpp.py {cmd}` — {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, memory read bandwidth {bw:.1f} GB/s ({a.threads} threads)", ""]
    lines += ["| model | size MB | edgeq pp512 t/s | llama.cpp pp512 t/s | ratio | edgeq tg128 t/s | llama.cpp tg128 t/s "
              "| ratio | bound t/s | % bound | edgeq load s | llama.cpp load s | edgeq peak RSS MB "
              "| llama.cpp peak RSS MB | edgeq first token s |", "|" + "---|" * 15]
    for path in paths:
        e, l = [], []
        for _ in range(a.runs):  # alternate, each in a fresh process
            e.append(run_edgeq(path, a.threads, text, a.ctx, a.edgeq_args.split()))
            l.append(run_llamacpp(py, path, a.threads, text, a.ctx))
        ft = statistics.median(first_token_s(path, a.threads) for _ in range(a.runs))
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        epp, lpp = med(e, "prefill_tps"), med(l, "pp_tps")
        etg, ltg = med(e, "decode_tps"), med(l, "tg_tps")
        bound = bw * 1e9 / weight_bytes_per_token(path)
        lines.append(f"| {Path(path).name} | {os.path.getsize(path) / 1e6:.0f} | {epp:.1f} | {lpp:.1f} | {epp / lpp:.2f} "
                     f"| {etg:.1f} | {ltg:.1f} | {etg / ltg:.2f} | {bound:.0f} | {100 * etg / bound:.0f} "
                     f"| {med(e, 'load_s'):.2f} "
                     f"| {med(l, 't_load_s'):.2f} | {med(e, 'peak_rss_mb'):.0f} | {med(l, 'ru_maxrss_kib') / 1024:.0f} "
                     f"| {ft:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    out = "\n".join(lines) + "\n"
    print(out)
    if a.out:
        Path(a.out).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
