"""Where a process's memory goes: RSS after each stage of loading and running a model.

    python benchmarks/rss_breakdown.py smollm2-135m-instruct [--ctx 2048]

Stages: interpreter + numpy, `import numba`, Numba's target context (what the first call of any compiled
function builds: the registry of lowering implementations), edgeq's modules, the GGUF's metadata, the tokenizer,
the rest of the model load, a 512-token prefill (weights paged in, kernels loaded), 128 decode steps.
VmRSS after each stage, and VmHWM (peak) at the end. Run it with a warm Numba cache.
"""
from __future__ import annotations

import argparse
import time


def status() -> tuple[int, int]:
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) // 1024, int(d["VmHWM"].split()[0]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="stop after opening the GGUF and building its tokenizer (what they cost alone)")
    a = ap.parse_args()
    rows = []
    prev = [status()[0]]

    def stage(name, fn=lambda: None):
        t = time.perf_counter()
        out = fn()
        rss, hwm = status()
        rows.append((name, rss, rss - prev[0], hwm, time.perf_counter() - t))
        prev[0] = rss
        return out

    stage("python + argparse")
    stage("import numpy", lambda: __import__("numpy"))
    stage("import edgeq (sets Numba's env)", lambda: __import__("edgeq"))
    stage("import numba", lambda: __import__("numba"))

    def target():
        from numba.core import registry
        registry.cpu_target.target_context.refresh()
    stage("numba target context", target)
    stage("edgeq engine + kernels modules", lambda: __import__("edgeq.runtime.engine"))
    from edgeq.assets import resolve_model
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.runtime.tokenizer import Tokenizer
    path = resolve_model(a.model)
    if a.tokenizer_only:
        gf = stage("GGUF header + metadata", lambda: GGUFFile(path))
        tok = stage("tokenizer", lambda: Tokenizer.from_gguf(gf))  # noqa: F841 (kept alive, like the engine's)
    else:
        _run(a, path, stage)
    print(f"{path.name} ({path.stat().st_size / 2**20:.0f} MiB), ctx {a.ctx}\n")
    print("| stage | RSS MiB | delta | peak (VmHWM) | s |\n|---|---|---|---|---|")
    for name, rss, d, hwm, dt in rows:
        print(f"| {name} | {rss} | {d:+d} | {hwm} | {dt:.2f} |")
    if not a.tokenizer_only:
        print(f"\npeak - file = {rows[-1][3] - path.stat().st_size / 2**20:.0f} MiB")


def _run(a, path, stage) -> None:
    import edgeq
    m = stage("edgeq.load (whole model)", lambda: edgeq.load(str(path), n_ctx=a.ctx, threads=2))
    from edgeq.assets import text_path
    ids = m.encode_prompt(text_path("hamlet").read_text(encoding="utf-8")[:40000])[:512]
    stage("prefill 512", lambda: m._forward(ids))
    def decode():
        for t in ids[:128]:
            m._forward([t])  # logits dropped each step, as generation does
    stage("decode 128", decode)


if __name__ == "__main__":
    main()
