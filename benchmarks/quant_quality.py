#!/usr/bin/env python3
"""Quantization quality and converter speed: edgeq's quantizer (with and without an importance matrix)
against llama.cpp's, from the same F16 file, judged by the same evaluator.

    python benchmarks/quant_quality.py                       # SmolLM2, Q4_K_M Q3_K_M Q2_K
    python benchmarks/quant_quality.py --models smollm2 gemma3 --chunks 16

Per model: the real GGUF → an fp32 HF checkpoint (transformers, cached in ~/.cache/edgeq/hf) →
`edgeq convert --type F16` (timed, peak RSS) and `--type Q4_K_M` straight from the checkpoint (the speed
target) → for each type: `edgeq quantize F16 → T`, the same with `--imatrix` collected by
`--calibrate macbeth`, and llama.cpp's llama_model_quantize (shared/tools/llamacpp_quantize.py).
Every file is scored on hamlet by shared/tools/llamacpp_ppl.py (llama-perplexity's method: 512-token
windows, second half scored) and, when edgeq's runtime can run it, by `edgeq perplexity` with
KL-divergence and same-top-token against the F16 file. Writes docs/results/quant_quality.{md,json,png}.
matplotlib is only needed for the plot (not an edgeq dependency).

The calibrated methods (`--method imatrix|gptq|awq-gptq|best`, issue 19) against llama.cpp's imatrix files, with
IQ4_XS, KL and llama.cpp's PPL on every file: benchmarks/calibrated_quality.py (docs/quality.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from yardstick import ROOT, TOOLS, last_json, llamacpp_python
MODELS = {"smollm2": ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"), "gemma3": ("gemma3-270m", "gemma-3-270m")}


def run(cmd: list[str], label: str, timeout: int = 3600) -> tuple[str, float, int]:
    """Run a command; (stdout, seconds, 0)."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout, time.perf_counter() - t0, 0


def timed(cmd: list[str], label: str) -> tuple[float, int]:
    """Seconds and peak RSS (KB) of a child process, measured by os.wait4."""
    import tempfile

    with tempfile.TemporaryFile() as errf:  # a file, not a pipe: a chatty child must never block on stderr
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=errf)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{label} failed: {err.strip()[-2000:]}")
    return dt, usage.ru_maxrss


def edgeq(*args) -> list[str]:
    return [sys.executable, "-m", "edgeq.cli", *map(str, args)]


def gguf_bits(path: Path) -> tuple[float, int]:
    """(bits per weight over all tensors, file bytes)."""
    import gguf

    r = gguf.GGUFReader(path)
    n_el = sum(int(t.n_elements) for t in r.tensors)
    n_bytes = sum(int(t.n_bytes) for t in r.tensors)
    return 8 * n_bytes / n_el, path.stat().st_size


def llamacpp_ppl(py: Path, model: Path, text: Path, chunks: int) -> dict:
    out, dt, _ = run([py, TOOLS / "llamacpp_ppl.py", model, "--text", text, "--max-chunks", chunks,
                      "--threads", "2"], f"llamacpp_ppl {model.name}")
    rec = last_json(out)
    rec["eval_seconds"] = dt
    return rec


def edgeq_ppl(model: Path, text: Path, chunks: int, base_logits: Path, save: bool) -> dict | None:
    cmd = edgeq("perplexity", model, "-f", text, "--chunks", chunks, "--json", "-t", "2")
    cmd += ["--save-logits", base_logits] if save else ["--kl-base", base_logits]
    try:
        out, _, _ = run(cmd, f"edgeq perplexity {model.name}")
        return last_json(out)
    except Exception as e:  # the runtime may not run every type yet: leave the column empty
        print(f"  edgeq perplexity unavailable for {model.name}: {str(e)[:200]}", file=sys.stderr)
        return None


def bench_model(key: str, types: list[str], args, py: Path | None) -> dict:
    from edgeq.assets import model_path, text_path
    from edgeq.convert.hf_checkpoint import materialize_from_gguf

    catalog, dirname = MODELS[key]
    work = Path(args.work).expanduser() / key
    work.mkdir(parents=True, exist_ok=True)
    hf = materialize_from_gguf(model_path(catalog), Path.home() / ".cache/edgeq/hf" / dirname)
    hamlet, macbeth = Path(text_path("hamlet")), Path(text_path("macbeth"))
    res: dict = {"model": key, "checkpoint": str(hf), "speed": {}, "rows": []}

    f16 = work / f"{key}-F16.gguf"
    dt, rss = timed(edgeq("convert", hf, "-o", f16, "--type", "F16", "-q"), "convert F16")
    res["speed"]["convert_F16"] = {"seconds": dt, "peak_rss_mb": rss / 1024}
    q4 = work / f"{key}-Q4_K_M-direct.gguf"
    dt, rss = timed(edgeq("convert", hf, "-o", q4, "--type", "Q4_K_M", "-q"), "convert Q4_K_M")
    res["speed"]["convert_Q4_K_M"] = {"seconds": dt, "peak_rss_mb": rss / 1024}
    print(f"{key}: convert F16 {res['speed']['convert_F16']['seconds']:.1f}s, Q4_K_M {dt:.1f}s "
          f"(peak RSS {rss / 1024:.0f} MB)", file=sys.stderr)

    imat = work / f"{key}-macbeth.imatrix.gguf"
    files: list[tuple[str, str, Path]] = [("F16", "edgeq", f16)]
    for t in types:
        out = work / f"{key}-{t}-edgeq.gguf"
        timed(edgeq("quantize", f16, out, "--type", t, "-q"), f"quantize {t}")
        files.append((t, "edgeq", out))
        out = work / f"{key}-{t}-edgeq-imatrix.gguf"
        if not imat.is_file():
            dt, rss = timed(edgeq("quantize", f16, out, "--type", t, "-q", "--calibrate", macbeth, "--chunks",
                                  args.calib_chunks, "--save-imatrix", imat), f"calibrate {t}")
            res["speed"]["calibrate_and_quantize"] = {"seconds": dt, "peak_rss_mb": rss / 1024,
                                                      "chunks": args.calib_chunks}
        else:
            timed(edgeq("quantize", f16, out, "--type", t, "-q", "--imatrix", imat), f"quantize {t} imatrix")
        files.append((t, "edgeq + imatrix", out))
        if py is not None:
            out = work / f"{key}-{t}-llamacpp.gguf"
            timed([py, TOOLS / "llamacpp_quantize.py", f16, out, t], f"llama.cpp quantize {t}")
            files.append((t, "llama.cpp", out))

    base_logits = work / f"{key}-F16.logits.npz"
    for t, who, path in files:
        bits, size = gguf_bits(path)
        row = {"type": t, "quantizer": who, "file": path.name, "bits_per_weight": bits, "size_mb": size / 1e6}
        if py is not None:
            rec = llamacpp_ppl(py, path, hamlet, args.chunks)
            row.update(ppl_llamacpp=rec["ppl"], ppl_llamacpp_stderr=rec["ppl_stderr"], n_scored=rec["n_scored"])
        if not args.no_edgeq_eval:
            rec = edgeq_ppl(path, hamlet, args.kl_chunks, base_logits, save=(t == "F16"))
            if rec:
                row.update(ppl_edgeq=rec.get("ppl"), kl=rec.get("kl"), same_top=rec.get("same_top"))
        res["rows"].append(row)
        print(f"  {t:7s} {who:16s} {bits:5.2f} bpw {size / 1e6:7.1f} MB  PPL {row.get('ppl_llamacpp', float('nan')):.3f}"
              f"  edgeq {row.get('ppl_edgeq') or float('nan'):.3f}  KL {row.get('kl') or float('nan'):.4f}",
              file=sys.stderr)
    base = res["rows"][0].get("ppl_llamacpp")
    for row in res["rows"]:
        if base and row.get("ppl_llamacpp"):
            row["dppl_pct"] = 100 * (row["ppl_llamacpp"] / base - 1)
    return res


def write_report(results: list[dict], out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant_quality.json").write_text(json.dumps(results, indent=1))
    lines = ["# Quantization quality: edgeq vs llama.cpp", "",
             f"PPL on hamlet by llama.cpp (`llamacpp_ppl.py`, {args.chunks} windows of 512, second half scored); "
             f"edgeq PPL/KL/same-top by `edgeq perplexity` on the first {args.kl_chunks} windows against the F16 "
             "file. imatrix: `--calibrate macbeth` "
             f"({args.calib_chunks} × 512 tokens). Generated by `benchmarks/quant_quality.py`.", ""]
    for res in results:
        lines += [f"## {res['model']}", "", "| step | seconds | peak RSS MB |", "|---|---|---|"]
        for k, v in res["speed"].items():
            lines.append(f"| {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} |")
        lines += ["", "| type | quantizer | bits/weight | size MB | PPL (llama.cpp) | ΔPPL vs F16 | PPL (edgeq) | KL | same top % |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "–"

        for r in res["rows"]:
            lines.append(f"| {r['type']} | {r['quantizer']} | {r['bits_per_weight']:.2f} | {r['size_mb']:.1f} | "
                         f"{f(r.get('ppl_llamacpp'), '.3f')} | {f(r.get('dppl_pct'), '+.2f')}% | "
                         f"{f(r.get('ppl_edgeq'), '.3f')} | {f(r.get('kl'), '.4f')} | "
                         f"{f(100 * r['same_top'] if r.get('same_top') is not None else None, '.1f')} |")
        lines.append("")
    (out_dir / "quant_quality.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    markers = {"edgeq": "o", "edgeq + imatrix": "s", "llama.cpp": "^"}
    for ax, res in zip(axes[0], results):
        for who, m in markers.items():
            rows = sorted((r for r in res["rows"] if r["quantizer"] == who and r.get("ppl_llamacpp") and r["type"] != "F16"),
                          key=lambda r: r["bits_per_weight"])
            if rows:
                ax.plot([r["bits_per_weight"] for r in rows], [r["ppl_llamacpp"] for r in rows], m + "-", label=who)
                for r in rows:
                    ax.annotate(r["type"], (r["bits_per_weight"], r["ppl_llamacpp"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        base = res["rows"][0].get("ppl_llamacpp")
        if base:
            ax.axhline(base, color="gray", ls="--", lw=1, label="F16")
        ax.set_title(res["model"])
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("perplexity on hamlet (llama.cpp evaluator)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quant_quality.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODELS))
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--chunks", type=int, default=8, help="llama.cpp perplexity windows")
    ap.add_argument("--kl-chunks", type=int, default=4, help="edgeq perplexity/KL windows")
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--no-edgeq-eval", action="store_true")
    ap.add_argument("--work", default="~/.cache/edgeq/bench-quant")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    py = llamacpp_python()
    py = Path(py) if py else None
    if py is None:
        print("llama-cpp-python venv not found: llama.cpp columns left empty", file=sys.stderr)
    results = [bench_model(m, args.types, args, py) for m in args.models]
    write_report(results, Path(args.out), args)
    print(f"wrote {args.out}/quant_quality.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
