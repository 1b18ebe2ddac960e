#!/usr/bin/env python3
"""Perplexity of the same file by edgeq and by llama.cpp (llama-perplexity's method in both), side by side.

    python benchmarks/ppl_vs_llamacpp.py [--models smollm2-135m-instruct gemma3-270m] [--ctx 512] [--chunks 16]
      [--edgeq-args "-ctk f16 -ctv f16"]

edgeq: `edgeq perplexity MODEL -f hamlet --ctx C --chunks N --json`; llama.cpp: shared/tools/llamacpp_ppl.py
with the no-AMX llama-cpp-python build (EDGEQ_LLAMACPP_PY overrides). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys

from yardstick import TOOLS, llamacpp_python, run_json


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--edgeq-args", default="")
    a = ap.parse_args()
    from edgeq.assets import text_path
    from edgeq.runtime.engine import resolve_model

    text = text_path("hamlet")
    py = llamacpp_python(build=True)
    lines = [f"`python benchmarks/ppl_vs_llamacpp.py --ctx {a.ctx} --chunks {a.chunks}"
             f"{' --edgeq-args ' + repr(a.edgeq_args) if a.edgeq_args else ''}` (Hamlet)", "",
             "| model | edgeq PPL | llama.cpp PPL | edgeq / llama.cpp | scored tokens |", "|---|---|---|---|---|"]
    for name in a.models:
        path = resolve_model(name)
        e = run_json([sys.executable, "-m", "edgeq.cli", "perplexity", path, "-f", text, "--ctx", a.ctx,
                       "--chunks", a.chunks, "-t", "2", "--json", *a.edgeq_args.split()])
        ll = run_json([py, TOOLS / "llamacpp_ppl.py", path, "--text", text, "--n-ctx", a.ctx,
                        "--max-chunks", a.chunks, "--threads", "2"])
        lines.append(f"| {path.name} | {e['ppl']:.4f} ± {e['stderr']:.3f} | {ll['ppl']:.4f} ± {ll['ppl_stderr']:.3f} | "
                     f"{e['ppl'] / ll['ppl']:.4f} | {e['tokens']} / {ll['n_scored']} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
