#!/usr/bin/env python3
"""Calibrated quantization side by side (issue 19): llama.cpp's imatrix files against edgeq's importance
search, GPTQ and the per-matrix best of the two, from the same F16 file, judged by llama.cpp's own
`llama-perplexity` on a text disjoint from the calibration text.

    BIN=$(../shared/tools/llamacpp-cli.sh) python benchmarks/calibrated_quality.py --models smollm2

Per model: the real catalog file dequantized to F16 (`edgeq quantize REAL.gguf F16.gguf --type F16`: no
HF checkpoint here, so the "F16" reference is the dequantized Q4_1/Q4_K_M file) → llama.cpp:
`llama-imatrix -f macbeth --chunks 32 -c 512`, then `llama-quantize [--imatrix]` per type → edgeq: one
calibration over the same 32 × 512 tokens of macbeth (importance and input Hessians, timed, peak RSS),
then `quantize_file` per type and method → every file scored by `llama-perplexity -c 512` on hamlet
(and optionally by `edgeq perplexity --kl-base` for KL and same-top-token against F16).
Writes docs/results/calibrated_quality.{md,json}. OPENBLAS_NUM_THREADS=1 is set for edgeq's GPTQ: on a
shared machine OpenBLAS threads spin against other work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from yardstick import ROOT  # noqa: E402

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
METHODS = ("imatrix", "gptq", "best")


def sh(cmd: list, log: Path, timeout: int = 7200) -> str:
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    out = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out[-1500:]}")
    return out


def llama_ppl(bin_dir: Path, model: Path, text: Path, chunks: int, log: Path) -> tuple[float, float]:
    """(PPL, its standard error) over the first `chunks` windows; a finished log of this file with at least as
    many windows is reused (the running value after window `chunks`; its error only when the counts match)."""
    done = log.read_text(errors="replace") if log.is_file() else ""
    if not ("Final estimate" in done and log.stat().st_mtime > model.stat().st_mtime):
        done = sh([bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "--chunks", chunks, "-t", 2], log)
    at = re.search(rf"\[{chunks}\]([0-9.]+)", done)
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done)
    if not at or not final:
        raise RuntimeError(f"no PPL after {chunks} windows in {log}")
    whole = f"over {chunks} chunks" in done
    return float(at.group(1)), float(final.group(2)) if whole else float("nan")


def edgeq_kl(model: Path, text: Path, chunks: int, base: Path, save: bool) -> dict:
    cmd = [sys.executable, "-m", "edgeq.cli", "perplexity", model, "-f", text, "--chunks", chunks, "--json", "-t", 2]
    cmd += ["--save-logits", base] if save else ["--kl-base", base]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=3600).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _calibrate_part(f16: str, ids: list[int], windows: list[int], n_held_from: int, bos: int | None, out: str) -> None:
    """Worker: importance sums and input Hessians over some of the windows, pickled to `out`."""
    import pickle

    from edgeq.convert import gptq, imatrix
    from edgeq.runtime import engine

    model = engine.load(f16, n_ctx=512, threads=1)
    im, hs = imatrix.Imatrix(chunk_size=512), gptq.Hessians()

    def observer(name, x):
        im(name, x)
        hs(name, x)

    for c in windows:
        chunk = list(ids[c * 512:(c + 1) * 512])
        if bos is not None:
            chunk[0] = bos
        hs.held_out = c >= n_held_from
        model.collect_activations(chunk, observer)
    hs._last_x = None
    with open(out, "wb") as f:
        pickle.dump((im.sums, im.counts, hs.fit, hs.held, hs.tokens, hs.key_of), f)


def calibrate_parallel(f16: Path, text: str, n_chunks: int, workers: int, tmp: Path):
    """The same importance matrix and Hessians as calibrate.calibrate_gguf (windows, BOS, held-out quarter),
    the windows spread over `workers` processes (on a shared machine one process gets a fraction of a core)."""
    import multiprocessing as mp
    import pickle

    from edgeq.convert import gptq, imatrix
    from edgeq.runtime import engine

    tok = engine.load(str(f16), n_ctx=512).tokenizer
    ids = tok.encode(text, add_special=False)
    n = min(n_chunks, len(ids) // 512)
    n_held_from = n - max(1, n // 4)
    ctx = mp.get_context("spawn")
    procs, outs = [], []
    for w in range(workers):
        out = tmp / f"calib-part{w}.pkl"
        p = ctx.Process(target=_calibrate_part, args=(str(f16), ids[:n * 512], list(range(w, n, workers)), n_held_from,
                                                      tok.bos_id if tok.add_bos else None, str(out)))
        p.start()
        procs.append(p)
        outs.append(out)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("calibration worker failed")
    im = imatrix.Imatrix(chunk_size=512, chunk_count=n, datasets=["macbeth_gut.txt"], hessians=gptq.Hessians())
    hs = im.hessians
    for out in outs:
        with open(out, "rb") as f:
            sums, counts, fit, held, tokens, key_of = pickle.load(f)
        out.unlink()
        for k, v in sums.items():
            im.sums[k] = im.sums.get(k, 0) + v
            im.counts[k] = im.counts.get(k, 0) + counts[k]
        for k in fit:
            hs.fit[k] = hs.fit[k] + fit[k] if k in hs.fit else fit[k]
            hs.held[k] = hs.held[k] + held[k] if k in hs.held else held[k]
            t = hs.tokens.setdefault(k, [0, 0])
            t[0] += tokens[k][0]
            t[1] += tokens[k][1]
        hs.key_of.update(key_of)
    return im


def bench_model(key: str, args) -> dict:
    from edgeq.assets import model_path, text_path
    from edgeq.convert import QuantOptions, quantize_file
    from edgeq.convert.calibrate import read_text

    bin_dir = Path(args.bin)
    work = Path(args.work).expanduser() / key
    work.mkdir(parents=True, exist_ok=True)
    hamlet, macbeth = Path(text_path("hamlet")), Path(text_path("macbeth"))
    res: dict = {"model": key, "rows": [], "speed": {}}
    f16 = work / f"{key}-F16.gguf"
    if not f16.is_file():
        quantize_file(model_path(MODELS[key]), f16, options=QuantOptions(qtype="F16"))

    files: list[tuple[str, str, Path]] = [("F16", "dequantized original", f16)]
    outs = {(t, m): work / f"{key}-{t}-edgeq-{m}.gguf" for t in args.types for m in args.methods}
    if all(p.is_file() for p in outs.values()) and not args.force:   # a finished run: files reused, scored again
        files += [(t, f"edgeq {m}", p) for (t, m), p in outs.items()]
        args.methods = []
    text, dataset = read_text(str(macbeth))
    t0 = time.perf_counter()
    im = calibrate_parallel(f16, text, args.calib_chunks, args.workers, work) if args.methods else None
    if im is not None:
        res["speed"]["edgeq calibrate"] = {"seconds": time.perf_counter() - t0, "hessian_mb": im.hessians.nbytes() / 1e6}
    for t in args.types:
        for m in args.methods:
            out = work / f"{key}-{t}-edgeq-{m}.gguf"
            t0, cpu0 = time.perf_counter(), time.process_time()
            st = quantize_file(f16, out, imatrix=im, options=QuantOptions(qtype=t, method=m, force=True, quiet=True))
            res["speed"][f"edgeq {t} {m}"] = {"seconds": time.perf_counter() - t0,
                                              "cpu_seconds": time.process_time() - cpu0, "methods": st["methods"]}
            files.append((t, f"edgeq {m}", out))
            print(f"  {out.name}: {st['methods']}", file=sys.stderr)
    res["speed"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del im

    imat = work / f"{key}-llamacpp.imatrix.gguf"
    if not imat.is_file():
        t0 = time.perf_counter()
        sh([bin_dir / "llama-imatrix", "-m", f16, "-f", macbeth, "-o", imat, "--chunks", args.calib_chunks,
            "-c", 512, "-t", 2], work / "llama-imatrix.log")
        res["speed"]["llama-imatrix"] = {"seconds": time.perf_counter() - t0}
    for t in args.types:
        for who, extra in (("llama.cpp", []), ("llama.cpp imatrix", ["--imatrix", imat]))[0 if args.uncalibrated else 1:]:
            out = work / f"{key}-{t}-{who.replace(' ', '-').replace('.', '')}.gguf"
            if not out.is_file():
                sh([bin_dir / "llama-quantize", *extra, f16, out, t], work / f"quantize-{out.stem}.log")
            files.append((t, who, out))

    base_logits = work / f"{key}-F16.logits.npz"
    for t, who, path in files:
        ppl, se = llama_ppl(bin_dir, path, hamlet, args.chunks, work / f"ppl-{path.stem}.log")
        row = {"type": t, "quantizer": who, "file": path.name, "size_mb": path.stat().st_size / 1e6,
               "ppl": ppl, "ppl_se": se}
        if args.kl_chunks:
            rec = edgeq_kl(path, hamlet, args.kl_chunks, base_logits, save=(t == "F16"))
            row.update(ppl_edgeq=rec.get("ppl"), kl=rec.get("kl"), same_top=rec.get("same_top"))
        res["rows"].append(row)
        print(f"  {t:7s} {who:20s} {row['size_mb']:7.1f} MB  PPL {ppl:.3f} ± {se:.3f}", file=sys.stderr)
    base = res["rows"][0]["ppl"]
    for row in res["rows"]:
        row["dppl_pct"] = 100 * (row["ppl"] / base - 1)
    return res


def write_report(results: list[dict], out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibrated_quality.json").write_text(json.dumps(results, indent=1))
    lines = ["# Calibrated quantization: llama.cpp imatrix vs edgeq (importance search, GPTQ, best)", "",
             f"Perplexity by llama.cpp's `llama-perplexity -c 512` on hamlet ({args.chunks} windows); calibration on "
             f"{args.calib_chunks} × 512 tokens of macbeth for both. F16 = the catalog file dequantized. "
             "Generated by `benchmarks/calibrated_quality.py`.", ""]
    for res in results:
        lines += [f"## {res['model']}", "", "| type | quantizer | size MB | PPL | ΔPPL vs F16 | KL | same top % |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "–"
            st = f"{100 * r['same_top']:.1f}" if r.get("same_top") is not None else "–"
            lines.append(f"| {r['type']} | {r['quantizer']} | {r['size_mb']:.1f} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} | "
                         f"{r['dppl_pct']:+.2f}% | {kl} | {st} |")
        lines += ["", "| step | wall s | CPU s | note |", "|---|---|---|---|"]
        for k, v in res["speed"].items():
            if isinstance(v, dict):
                note = v.get("methods") or (f"Hessians {v['hessian_mb']:.0f} MB" if "hessian_mb" in v else "")
                lines.append(f"| {k} | {v['seconds']:.0f} | {v.get('cpu_seconds', float('nan')):.0f} | {note} |")
        lines += ["", f"edgeq process peak RSS: {res['speed'].get('peak_rss_mb', 0):.0f} MB", ""]
    (out_dir / "calibrated_quality.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODELS))
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity windows on hamlet")
    ap.add_argument("--kl-chunks", type=int, default=0, help="edgeq perplexity/KL windows (0: skip)")
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--uncalibrated", action="store_true", help="also llama.cpp's uncalibrated files")
    ap.add_argument("--force", action="store_true", help="quantize again even when edgeq's files exist")
    ap.add_argument("--workers", type=int, default=2, help="calibration processes")
    ap.add_argument("--bin", default=os.environ.get("BIN", str(Path.home() / ".cache/edgeq-llamacpp-cli/build/bin")))
    ap.add_argument("--work", default="~/.cache/edgeq-calib")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    results = [bench_model(m, args) for m in args.models]
    write_report(results, Path(args.out), args)
    print(f"wrote {args.out}/calibrated_quality.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
