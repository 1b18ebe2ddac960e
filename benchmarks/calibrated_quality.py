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
`--verify TYPE:METHOD ...` instead checks that this code still makes a work folder's results: it calibrates again,
compares with the pickled calibration (bit for bit), re-quantizes the named files and compares their sha256.
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
METHODS = ("imatrix", "gptq", "awq-gptq", "best")


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
    if not ("Final estimate" in done and f"[{chunks}]" in done and log.stat().st_mtime > model.stat().st_mtime):
        done = sh([bin_dir / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "--chunks", chunks, "-t", 2], log)
    at = re.search(rf"\[{chunks}\]([0-9.]+)", done)
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done)
    if not at or not final:
        raise RuntimeError(f"no PPL after {chunks} windows in {log}")
    whole = f"over {chunks} chunks" in done
    return float(at.group(1)), float(final.group(2)) if whole else float("nan")


def edgeq_kl(model: Path, text: Path, chunks: int, base: Path, save: bool) -> dict:
    """`edgeq perplexity --json` (PPL, and KL / same-top against `base`); cached next to the file (.kl.json).
    With an f16 KV cache, as llama-perplexity's: the two evaluators then differ only in their kernels."""
    cache = model.with_suffix(f".kl{chunks}-f16kv.json")
    if cache.is_file() and cache.stat().st_mtime > model.stat().st_mtime and (save or base.is_file()):
        return json.loads(cache.read_text())
    cmd = [sys.executable, "-m", "edgeq.cli", "perplexity", model, "-f", text, "--chunks", chunks, "--json", "-t", 2,
           "-ctk", "f16", "-ctv", "f16"]
    cmd += ["--save-logits", base, "--force"] if save else ["--kl-base", base]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=3600).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    if rec:
        cache.write_text(json.dumps(rec))
    return rec


def rounding_ppl(model: Path, text: Path, chunks: int) -> dict:
    """benchmarks/llamacpp_rounding.py on `model` (edgeq's PPL with llama.cpp's activation rounding, and its
    own), cached next to the file (.llr{chunks}.json)."""
    cache = model.with_suffix(f".llr{chunks}.json")
    if cache.is_file() and cache.stat().st_mtime > model.stat().st_mtime:
        return json.loads(cache.read_text())
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llamacpp_rounding.py"), str(model),
                          "--text", str(text), "--chunks", str(chunks)], capture_output=True, text=True,
                         timeout=3600).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    if rec:
        cache.write_text(json.dumps(rec))
    return rec


def seed(work: Path, src: Path) -> None:
    """Reuse an earlier run's F16 and llama.cpp files (symlinks) and their perplexity logs (copied with their
    times, so llama_ppl reuses them): edgeq's own files are always made anew by this code."""
    import shutil

    if not src.is_dir():
        return
    for f in src.iterdir():
        if "edgeq" in f.name or (work / f.name).exists():
            continue
        if f.suffix == ".gguf":
            (work / f.name).symlink_to(f)
        elif f.name.startswith("ppl-") and "edgeq" not in f.name:
            shutil.copy2(f, work / f.name)


def _calibrate_part(f16: str, ids: list[int], windows: list[int], n_held_from: int, bos: int | None, out: str) -> None:
    """Worker: importance sums and input Hessians over some of the windows, pickled to `out`. The matrices run
    as `edgeq quantize --calibrate` runs them (calibrate.forward_weights: Q8_0 copies of the float ones)."""
    import pickle
    from contextlib import ExitStack

    from edgeq.convert import gptq, imatrix
    from edgeq.convert.calibrate import forward_weights
    from edgeq.runtime import engine

    model = engine.load(f16, n_ctx=512, threads=1)
    im, hs = imatrix.Imatrix(chunk_size=512), gptq.Hessians()

    def observer(name, x):
        im(name, x)
        hs(name, x)

    with ExitStack() as stack:
        for layer in model.weights.layers:
            stack.enter_context(forward_weights(layer))
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


def calibration(f16: Path, macbeth: Path, args, cache: Path, res: dict):
    """The calibration (importance sums and Hessians), pickled in `cache` so later runs quantize without it."""
    import pickle

    from edgeq.convert.calibrate import read_text

    if cache.is_file():
        with open(cache, "rb") as f:
            return pickle.load(f)
    text, _ = read_text(str(macbeth))
    t0 = time.perf_counter()
    im = calibrate_parallel(f16, text, args.calib_chunks, args.workers, cache.parent)
    res["speed"]["edgeq calibrate"] = {"seconds": time.perf_counter() - t0, "hessian_mb": im.hessians.nbytes() / 1e6}
    im.hessians._last_x = None
    with open(cache.with_suffix(".tmp"), "wb") as f:
        pickle.dump(im, f)
    os.replace(cache.with_suffix(".tmp"), cache)
    return im


def bench_model(key: str, args, done=lambda res: None) -> dict:
    from edgeq.assets import model_path, text_path
    from edgeq.convert import QuantOptions, quantize_file

    bin_dir = Path(args.bin)
    work = Path(args.work).expanduser() / key
    work.mkdir(parents=True, exist_ok=True)
    hamlet, macbeth = Path(text_path("hamlet")), Path(text_path("macbeth"))
    res: dict = {"model": key, "rows": [], "speed": {}}
    seed(work, Path(args.seed_from).expanduser() / key)
    f16 = work / f"{key}-F16.gguf"
    if not f16.is_file():
        quantize_file(model_path(MODELS[key]), f16, options=QuantOptions(qtype="F16"))

    calib = work / "calibration.pkl"
    imat = work / f"{key}-llamacpp.imatrix.gguf"
    if not imat.is_file():
        t0 = time.perf_counter()
        sh([bin_dir / "llama-imatrix", "-m", f16, "-f", macbeth, "-o", imat, "--chunks", args.calib_chunks,
            "-c", 512, "-t", 2], work / "llama-imatrix.log")
        res["speed"]["llama-imatrix"] = {"seconds": time.perf_counter() - t0}
    im = None

    def score(t: str, who: str, path: Path) -> None:
        ppl, se = llama_ppl(bin_dir, path, hamlet, args.chunks, work / f"ppl-{path.stem}.log")
        res["rows"].append({"type": t, "quantizer": who, "file": path.name, "size_mb": path.stat().st_size / 1e6,
                            "ppl": ppl, "ppl_se": se, "dppl_pct": 100 * (ppl / res["rows"][0]["ppl"] - 1) if res["rows"]
                            else 0.0, "path": str(path)})
        print(f"  {t:7s} {who:20s} {path.stat().st_size / 1e6:7.1f} MB  PPL {ppl:.3f} ± {se:.3f}", file=sys.stderr)
        done(res)

    score("F16", "dequantized original", f16)
    for t in args.types:   # one type at a time, scored as soon as its files exist: a long run leaves whole rows
        for m in args.methods:
            out = work / f"{key}-{t}-edgeq-{m}.gguf"
            fresh = out.is_file() and calib.is_file() and out.stat().st_mtime > calib.stat().st_mtime
            if not fresh or args.force:
                if im is None:
                    im = calibration(f16, macbeth, args, calib, res)
                t0, cpu0 = time.perf_counter(), time.process_time()
                st = quantize_file(f16, out, imatrix=im, options=QuantOptions(qtype=t, method=m, force=True, quiet=True))
                awq = st.get("awq", {})
                res["speed"][f"edgeq {t} {m}"] = {
                    "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                    "methods": st["methods"], **({"awq_scaled": f"{awq['scaled']}/{awq['groups']}"} if awq else {})}
                print(f"  {out.name}: {st['methods']} {res['speed'][f'edgeq {t} {m}'].get('awq_scaled', '')}",
                      file=sys.stderr)
                res["speed"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            score(t, f"edgeq {m}", out)
        for who, extra in (("llama.cpp", []), ("llama.cpp imatrix", ["--imatrix", imat]))[0 if args.uncalibrated else 1:]:
            out = work / f"{key}-{t}-{who.replace(' ', '-').replace('.', '')}.gguf"
            if not out.is_file():
                sh([bin_dir / "llama-quantize", *extra, f16, out, t], work / f"quantize-{out.stem}.log")
            score(t, who, out)
    del im

    base_logits = work / f"{key}-F16.logits.npz"
    for row in res["rows"]:   # the slower KL pass after every PPL
        if not args.kl_chunks:
            break
        path = Path(row["path"])
        rec = edgeq_kl(path, hamlet, args.kl_chunks, base_logits, save=(row["type"] == "F16"))
        row.update(ppl_edgeq=rec.get("ppl"), kl=rec.get("kl"), same_top=rec.get("same_top"),
                   ppl_llama_at_kl=llama_ppl(bin_dir, path, hamlet, args.kl_chunks, work / f"ppl-{path.stem}.log")[0])
        if args.llamacpp_rounding:
            row.update(ppl_edgeq_llamacpp_rounding=rounding_ppl(path, hamlet, args.kl_chunks).get("llamacpp_rounding"))
        done(res)
    return res


COLORS = {"llama.cpp": "#bbbbbb", "llama.cpp imatrix": "#777777", "edgeq imatrix": "#9ecae1",
          "edgeq gptq": "#4292c6", "edgeq awq-gptq": "#fd8d3c", "edgeq best": "#d94701",
          "edgeq awq-gptq (no 5% rule)": "#fdd0a2", "edgeq best (no 5% rule)": "#a63603"}


def plot_svg(results: list[dict], chunks: int = 8) -> str:
    """ΔPPL over F16 per model and type, one bar per quantizer: a small hand-written SVG (no matplotlib)."""
    groups = [(res["model"], t, [r for r in res["rows"] if r["type"] == t])
              for res in results for t in dict.fromkeys(r["type"] for r in res["rows"] if r["type"] != "F16")]
    bar, gap, left, top = 11, 14, 150, 44
    top_val = max([r["dppl_pct"] for _, _, rows in groups for r in rows] + [1.0])
    width = 760
    scale = (width - left - 90) / top_val
    y, out = top, []
    for model, t, rows in groups:
        out.append(f'<text x="{left - 8}" y="{y + bar * len(rows) / 2 + 4}" text-anchor="end">{model} {t}</text>')
        for r in rows:
            w = max(r["dppl_pct"], 0) * scale
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" '
                       f'fill="{COLORS.get(r["quantizer"], "#444")}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 3}" font-size="9">{r["dppl_pct"]:+.1f}%</text>')
            y += bar
        y += gap
    used = [q for q in COLORS if any(r["quantizer"] == q for _, _, rows in groups for r in rows)]
    legend = "".join(f'<rect x="{8 + 150 * (i % 4)}" y="{6 + 14 * (i // 4)}" width="10" height="10" fill="{COLORS[q]}"/>'
                     f'<text x="{21 + 150 * (i % 4)}" y="{15 + 14 * (i // 4)}" font-size="9">{q}</text>'
                     for i, q in enumerate(used))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>{legend}{"".join(out)}'
            f'<text x="{left}" y="{y + 4}" font-size="9">ΔPPL over F16 (llama-perplexity, Hamlet {chunks} × 512)</text></svg>\n')


def write_report(results: list[dict], out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibrated_quality.json").write_text(json.dumps(results, indent=1))
    (out_dir / "calibrated_quality.svg").write_text(plot_svg(results, args.chunks))
    lines = ["# Calibrated quantization: llama.cpp imatrix vs edgeq (importance search, GPTQ, AWQ + GPTQ, best)", "",
             f"Perplexity by llama.cpp's `llama-perplexity -c 512` on hamlet ({args.chunks} windows); calibration on "
             f"{args.calib_chunks} × 512 tokens of macbeth for both. F16 = the catalog file dequantized. KL and "
             "same-top-token against F16, and edgeq's own PPL, by `edgeq perplexity --kl-base -ctk f16 -ctv f16` (an "
             "f16 KV cache, as llama-perplexity's) over the first "
             f"{args.kl_chunks or '–'} windows (`llama @KL`: llama.cpp's running PPL after as many windows); "
             "`at llama.cpp's rounding`: edgeq's PPL with each product's input rounded as llama.cpp's CPU kernels "
             "round it (Q8_K per 256 values for k-quants, Q8_0 per 32, fp16; `benchmarks/llamacpp_rounding.py`). "
             "Generated by `benchmarks/calibrated_quality.py`.", "", "![ΔPPL](calibrated_quality.svg)", ""]
    for res in results:
        lines += [f"## {res['model']}", "", "| type | quantizer | size MB | PPL | ΔPPL vs F16 | KL | same top % | "
                  "edgeq PPL / llama @KL | edgeq at llama.cpp's rounding / llama @KL |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "–"
            st = f"{100 * r['same_top']:.1f}" if r.get("same_top") is not None else "–"
            agree = (f"{r['ppl_edgeq']:.3f} / {r['ppl_llama_at_kl']:.3f} ({100 * (r['ppl_edgeq'] / r['ppl_llama_at_kl'] - 1):+.2f}%)"
                     if r.get("ppl_edgeq") and r.get("ppl_llama_at_kl") else "–")
            em = r.get("ppl_edgeq_llamacpp_rounding")
            emulated = (f"{em:.3f} ({100 * (em / r['ppl_llama_at_kl'] - 1):+.2f}%)" if em and r.get("ppl_llama_at_kl")
                        else "–")
            lines.append(f"| {r['type']} | {r['quantizer']} | {r['size_mb']:.1f} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} | "
                         f"{r['dppl_pct']:+.2f}% | {kl} | {st} | {agree} | {emulated} |")
        lines += ["", "| step | wall s | CPU s | note |", "|---|---|---|---|"]
        for k, v in res["speed"].items():
            if isinstance(v, dict):
                note = v.get("methods") or (f"Hessians {v['hessian_mb']:.0f} MB" if "hessian_mb" in v else "")
                if v.get("awq_scaled"):
                    note = f"{note}, AWQ scales kept in {v['awq_scaled']} groups"
                lines.append(f"| {k} | {v['seconds']:.0f} | {v.get('cpu_seconds', float('nan')):.0f} | {note} |")
        lines += ["", f"edgeq process peak RSS: {res['speed'].get('peak_rss_mb', 0):.0f} MB", ""]
    (out_dir / "calibrated_quality.md").write_text("\n".join(lines))


def type_method(spec: str) -> tuple[str, str]:
    """argparse type of --verify: TYPE:METHOD, a file type `edgeq quantize --type` takes and a method."""
    from edgeq.convert.mixes import FILE_TYPES

    t, _, m = spec.partition(":")
    if t.upper() not in FILE_TYPES or m not in METHODS:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected TYPE:METHOD, e.g. Q3_K_M:best (methods: "
                                         f"{', '.join(METHODS)})")
    return t.upper(), m


def verify(key: str, args) -> bool:
    """Whether this code makes the work folder's calibration (bit for bit) and the files `args.verify` names
    (TYPE:METHOD, byte for byte): the scored files are then what `edgeq quantize --calibrate` writes today."""
    import hashlib
    import pickle
    import tempfile

    import numpy as np

    from edgeq.assets import text_path
    from edgeq.convert import QuantOptions, quantize_file
    from edgeq.convert.calibrate import read_text

    work = Path(args.work).expanduser() / key
    f16 = work / f"{key}-F16.gguf"
    with open(work / "calibration.pkl", "rb") as f:
        old = pickle.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        im = calibrate_parallel(f16, read_text(text_path("macbeth"))[0], args.calib_chunks, args.workers, Path(tmp))
        same = (set(old.sums) == set(im.sums) and all(np.array_equal(old.sums[k], im.sums[k]) for k in old.sums)
                and all(np.array_equal(old.hessians.get(k, w), im.hessians.get(k, w))
                        for k in old.hessians.key_of for w in ("fit", "held")))
        print(f"{key}: calibration {'identical to' if same else 'DIFFERENT from'} {work / 'calibration.pkl'}")
        ok = same
        for t, m in args.verify:
            out, ref = Path(tmp) / f"{t}-{m}.gguf", work / f"{key}-{t}-edgeq-{m}.gguf"
            quantize_file(f16, out, imatrix=im, options=QuantOptions(qtype=t, method=m, force=True, quiet=True))
            a, b = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (out, ref))
            print(f"{key}: {t} {m}: {'identical' if a == b else 'DIFFERENT'} (sha256 {a[:16]}, scored {b[:16]})")
            ok = ok and a == b
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODELS))
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_XS"])
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity windows on hamlet")
    ap.add_argument("--kl-chunks", type=int, default=0, help="edgeq perplexity/KL windows (0: skip)")
    ap.add_argument("--calib-chunks", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--uncalibrated", action="store_true", help="also llama.cpp's uncalibrated files")
    ap.add_argument("--llamacpp-rounding", action="store_true", help="with --kl-chunks: also edgeq's PPL with "
                    "llama.cpp's activation rounding (benchmarks/llamacpp_rounding.py)")
    ap.add_argument("--force", action="store_true", help="quantize again even when edgeq's files exist")
    ap.add_argument("--workers", type=int, default=2, help="calibration processes")
    ap.add_argument("--bin", default=os.environ.get("BIN", str(Path.home() / ".cache/edgeq-llamacpp-cli/build/bin")))
    ap.add_argument("--work", default="~/.cache/edgeq-calib-awq")
    ap.add_argument("--seed-from", default="~/.cache/edgeq-calib", help="an earlier work folder to reuse F16 and "
                    "llama.cpp files from")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .svg from the .json")
    ap.add_argument("--verify", nargs="+", type=type_method, metavar="TYPE:METHOD", help="check that this code makes the work "
                    "folder's calibration and these files, bit for bit (no scoring)")
    args = ap.parse_args()
    if args.verify:
        return 0 if all([verify(m, args) for m in args.models]) else 1
    if args.report_only:
        write_report(json.loads((Path(args.out) / "calibrated_quality.json").read_text()), Path(args.out), args)
        return 0
    results: list[dict] = []
    for m in args.models:   # the report is rewritten as rows come in: a long run leaves its part behind
        bench_model(m, args, done=lambda res: write_report(results + [res], Path(args.out), args))
        results = json.loads((Path(args.out) / "calibrated_quality.json").read_text())
    print(f"wrote {args.out}/calibrated_quality.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
