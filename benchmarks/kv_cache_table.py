#!/usr/bin/env python3
"""The KV-cache table of the README (issue 6): memory at ctx 8192, perplexity at ctx 2048 per cache type,
side by side with llama.cpp's f16 / q8_0 / q4_0 caches on the same file, and the long-context run.

    python benchmarks/kv_cache_table.py --chunks 4 [--models smollm2-135m-instruct gemma3-270m] [--long]

Every number comes from the CLIs a user runs, one process each:
  memory      `edgeq bench MODEL --ctx 8192 -p 16 -n 1 -ctk T -ctv T --json`   (kv_cache_mb)
  perplexity  `edgeq perplexity MODEL -f hamlet --ctx 2048 --chunks N -ctk T -ctv T --json`
  llama.cpp   `llamacpp_ppl.py MODEL --text hamlet --n-ctx 2048 --max-chunks N --kv f16|q8_0|q4_0`
  long run    `edgeq bench MODEL --ctx 8192 -p 4096 -n 4096 -ctk q8 -ctv q8 --json` (--long; peak RSS)
Writes a markdown table to stdout and docs/results/kv_cache_table.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from yardstick import ROOT, TOOLS, llamacpp_python, run_json
EDGEQ_TYPES = ["f16", "q8", "q8t", "q4"]  # q8t: per-token int8 keys, the default before per-channel keys
LLAMA_TYPES = {"f16": "f16", "q8": "q8_0", "q8t": "q8_0", "q4": "q4_0"}


def edgeq(*args) -> list[str]:
    return [sys.executable, "-m", "edgeq.cli", *map(str, args)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--chunks", type=int, default=4, help="windows of 2048 tokens for perplexity")
    ap.add_argument("--long", action="store_true", help="also decode to ctx 8192 (slow: minutes)")
    ap.add_argument("--types", nargs="+", default=EDGEQ_TYPES, help="edgeq cache types (the first: f16)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's perplexity runs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    from edgeq.assets import model_path, text_path

    hamlet = text_path("hamlet")
    py = None if a.no_llamacpp else llamacpp_python()
    results = []
    for name in a.models:
        path = model_path(name)
        r = {"model": path.name, "mem_mb": {}, "ppl": {}, "ppl_llamacpp": {}}
        for t in a.types:
            r["mem_mb"][t] = run_json(edgeq("bench", path, "--ctx", 8192, "-p", 16, "-n", 1, "-ctk", t, "-ctv", t,
                                             "--json"))["kv_cache_mb"]
            r["ppl"][t] = run_json(edgeq("perplexity", path, "-f", hamlet, "--ctx", 2048, "--chunks", a.chunks,
                                          "-ctk", t, "-ctv", t, "-t", 2, "--json"))["ppl"]
            if py and LLAMA_TYPES[t] in [LLAMA_TYPES[u] for u in r["ppl_llamacpp"]]:  # the same llama.cpp run
                r["ppl_llamacpp"][t] = next(r["ppl_llamacpp"][u] for u in r["ppl_llamacpp"]
                                            if LLAMA_TYPES[u] == LLAMA_TYPES[t])
            elif py:
                r["ppl_llamacpp"][t] = run_json([py, TOOLS / "llamacpp_ppl.py", path, "--text", hamlet, "--n-ctx",
                                                  2048, "--max-chunks", a.chunks, "--threads", 2,
                                                  "--kv", LLAMA_TYPES[t]])["ppl"]
            print(f"{name} {t}: {r['mem_mb'][t]:.2f} MiB, PPL {r['ppl'][t]:.4f}, "
                  f"llama.cpp {r['ppl_llamacpp'].get(t, float('nan')):.4f}", file=sys.stderr)
        if a.long:
            r["long"] = run_json(edgeq("bench", path, "--ctx", 8192, "-p", 4096, "-n", 4095, "-ctk", "q8", "-ctv",
                                        "q8", "--json"))
        results.append(r)

    lines = [f"KV cache at ctx 8192 (`edgeq bench --ctx 8192 ... -ctk T -ctv T`, kv_cache_mb) and perplexity on "
             f"Hamlet at ctx 2048 ({a.chunks} windows, `edgeq perplexity --ctx 2048 --chunks {a.chunks} -ctk T -ctv T`;"
             f" llama.cpp: `llamacpp_ppl.py --n-ctx 2048 --max-chunks {a.chunks} --kv q8_0|q4_0`, flash attention). "
             "Made by `python benchmarks/kv_cache_table.py`.", "",
             "| model | cache | MiB at 8192 | vs f16 | PPL edgeq | Δ vs f16 | PPL llama.cpp (f16 / q8_0 / q4_0) | Δ vs f16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in a.types:
            m, p, lp = r["mem_mb"][t], r["ppl"][t], r["ppl_llamacpp"].get(t)
            d = 100 * (p / r["ppl"]["f16"] - 1)
            ld = f"{100 * (lp / r['ppl_llamacpp']['f16'] - 1):+.2f}%" if lp else "–"
            lps = f"{lp:.4f}" if lp else "–"
            lines.append(f"| {r['model']} | {t} | {m:.2f} | {m / r['mem_mb']['f16']:.3f}x | {p:.4f} | {d:+.2f}% | "
                         f"{lps} | {ld} |")
    for r in results:
        if "long" in r:
            L = r["long"]
            lines.append(f"\nLong context, {r['model']}: prefill {L['pp']} + decode {L['tg']} tokens to ctx "
                         f"{L['pp'] + L['tg']} with q8/q8: decode {L['decode_tps']:.1f} t/s, peak RSS "
                         f"{L['peak_rss_mb']:.0f} MB, KV cache {L['kv_cache_mb']:.1f} MiB")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache_table.md").write_text(text + "\n")
    (out / "kv_cache_table.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
