#!/usr/bin/env python3
"""Quantizer quality: edgeq's codecs (formats/quants.py) against llama.cpp's `ggml_quantize_chunk`, on the
real weight matrices of a GGUF file, with and without an importance vector.

    python benchmarks/quant_rmse.py                      # SmolLM2-135M-Instruct, all quantizable types
    python benchmarks/quant_rmse.py --model PATH.gguf --types Q4_K Q6_K --out -

Every 2-D `blk.*` matrix of the file is dequantized to float32 (the source), then quantized by both
implementations to each type (matrices whose row length is not a multiple of the type's block size are
skipped, as llama.cpp would fall back to another type for them). Reported per type: RMSE of
quantize -> dequantize over all matrices (both dequantized by edgeq; the codec is bit-exact with gguf-py),
its ratio edgeq / llama.cpp, whether the bytes are identical, and the quantize time of each.
With importance: the weighted RMSE sqrt(sum w (x - xq)^2 / sum w), with w a fixed synthetic importance per
matrix column (lognormal, seed 0; llama.cpp's imatrix is also a positive per-column vector).

llama.cpp comes from the llama-cpp-python install in ~/.cache/edgeq-llamacpp-noamx (libggml-base.so through
ctypes; override with EDGEQ_LIBGGML=path). Its quantizer runs on one thread, edgeq's on Numba's threads.
Two sources by default: the plain matrices, and the same dithered off their Q4_1 grid (--sources).
Writes docs/results/quant_rmse.md (or prints it with --out -).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]


def load_libggml():
    """ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) from llama-cpp-python's libggml."""
    cands = [os.environ.get("EDGEQ_LIBGGML", "")] + sorted(glob.glob(os.path.expanduser(
        "~/.cache/edgeq-llamacpp-noamx/lib/python3*/site-packages/llama_cpp/lib/libggml-base.so")))
    path = next((c for c in cands if c and os.path.isfile(c)), None)
    if path is None:
        sys.exit("libggml-base.so not found (install llama-cpp-python in ~/.cache/edgeq-llamacpp-noamx "
                 "or set EDGEQ_LIBGGML)")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib, path


def llamacpp_quantize(lib, x: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType

    from edgeq.formats.quants import row_bytes

    t = int(GGMLQuantizationType[qtype])
    out = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), np.uint8)
    lib.ggml_quantize_init(t)
    lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None if importance is None else importance.ctypes.data)
    return out


def load_matrices(path: str, dither: bool) -> list[tuple[str, np.ndarray]]:
    """The file's 2-D blk.* matrices as float32. With `dither`, each value moves by uniform noise of up to half
    its block's quantization step (the fp16 scale d at the start of every 32-value block): the source then
    no longer sits on the grid of its own type, which would favour grids that contain it."""
    from edgeq.formats import GGUFFile
    from edgeq.formats.quants import block_bytes, dequantize

    rng = np.random.default_rng(1)
    out = []
    with GGUFFile(path) as gf:
        for t in gf.tensors.values():
            if not (t.name.startswith("blk.") and len(t.shape) == 2):
                continue
            x = np.ascontiguousarray(dequantize(t.data, t.qtype, t.shape))
            if dither:
                if t.qtype not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
                    sys.exit(f"--dither needs 32-value blocks with the scale first, {t.name} is {t.qtype}")
                d = np.abs(t.data.reshape(-1, block_bytes(t.qtype))[:, :2].copy().view(np.float16).astype(np.float32))
                noise = rng.uniform(-0.5, 0.5, x.size).astype(np.float32).reshape(-1, 32) * d
                x = (x.reshape(-1, 32) + noise).reshape(x.shape)
            out.append((t.name, x))
    return out


def measure(lib, mats, qtype: str, use_importance: bool) -> dict:
    from edgeq.formats.quants import block_size, dequantize, quantize

    bs = block_size(qtype)
    rng = np.random.default_rng(0)
    err = {"edgeq": 0.0, "llama.cpp": 0.0}
    secs = {"edgeq": 0.0, "llama.cpp": 0.0}
    wsum = 0.0
    n_mats = 0
    identical = True
    quantize(mats[0][1][:1, :(mats[0][1].shape[1] // bs) * bs] if mats[0][1].shape[1] >= bs else
             np.zeros((1, bs), np.float32), qtype)                                        # JIT warm-up
    for _, x in mats:
        if x.shape[1] % bs:
            continue
        n_mats += 1
        imp = rng.lognormal(0.0, 1.5, x.shape[1]).astype(np.float32) if use_importance else None
        w = imp[None, :].astype(np.float64) if use_importance else 1.0
        for who in ("edgeq", "llama.cpp"):
            t0 = time.perf_counter()
            raw = quantize(x, qtype, imp) if who == "edgeq" else llamacpp_quantize(lib, x, qtype, imp)
            secs[who] += time.perf_counter() - t0
            xq = dequantize(raw, qtype, x.shape)
            err[who] += float((w * (x.astype(np.float64) - xq) ** 2).sum())
            if who == "edgeq":
                ours = raw
            else:
                identical &= bool(np.array_equal(ours, raw))
        wsum += float(np.broadcast_to(w, x.shape).sum())
    if n_mats == 0:
        return {}
    rmse = {k: (v / wsum) ** 0.5 for k, v in err.items()}
    ratio = rmse["edgeq"] / rmse["llama.cpp"] if rmse["llama.cpp"] > 0 else (1.0 if rmse["edgeq"] == 0 else np.inf)
    return {"n": n_mats, "rmse": rmse, "ratio": ratio, "identical": identical,
            "secs": secs}


def table(rows) -> list[str]:
    out = ["| type | importance | matrices | RMSE edgeq | RMSE llama.cpp | edgeq / llama.cpp | bytes identical "
           "| time edgeq | time llama.cpp |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for qtype, use_imp, r in rows:
        out.append(f"| {qtype} | {'yes' if use_imp else 'no'} | {r['n']} | {r['rmse']['edgeq']:.4e} | "
                   f"{r['rmse']['llama.cpp']:.4e} | {r['ratio']:.4f} | {'yes' if r['identical'] else 'no'} | "
                   f"{r['secs']['edgeq']:.2f} s | {r['secs']['llama.cpp']:.2f} s |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2-135M-Instruct Q4_1 asset)")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--sources", nargs="+", choices=["plain", "dithered"], default=["plain", "dithered"],
                    help="plain: the dequantized matrices; dithered: plus uniform noise of +-half their own step")
    ap.add_argument("--out", default=str(ROOT / "docs/results/quant_rmse.md"), help="markdown file, or - for stdout")
    args = ap.parse_args(argv)

    import edgeq  # noqa: F401  (numba settings first)
    import numba

    if args.model is None:
        from edgeq.assets import model_path
        args.model = str(model_path("smollm2-135m-instruct"))
    lib, libpath = load_libggml()

    cmd = "python benchmarks/quant_rmse.py" + ("" if args.types == TYPES else " --types " + " ".join(args.types)) \
        + ("" if args.sources == ["plain", "dithered"] else " --sources " + " ".join(args.sources))
    lines = [
        "# Quantizer RMSE: edgeq vs llama.cpp",
        "",
        f"Command: `{cmd}`  ",
        f"llama.cpp: `ggml_quantize_chunk` from `{libpath.replace(str(Path.home()), '~')}` (one thread); "
        f"edgeq: `edgeq.formats.quants.quantize` on {numba.get_num_threads()} Numba threads (times include "
        "nothing but the quantize call; Numba compiled beforehand).  ",
        "Per type only the matrices whose row length is a multiple of its block size are used (the k-quants see "
        "the 30 `ffn_down` matrices, rows of 1536; the others all 210).  ",
        "Importance: a fixed synthetic per-column vector (lognormal, sigma 1.5, seed 0), given to both; the RMSE "
        "is then weighted by it. Q8_0 ignores it (as in llama.cpp).",
    ]
    all_rows = []
    for source in args.sources:
        mats = load_matrices(args.model, source == "dithered")
        n_vals = sum(x.size for _, x in mats)
        print(f"{source}: {len(mats)} matrices, {n_vals / 1e6:.1f}M values from {args.model}", file=sys.stderr)
        rows = []
        for qtype in args.types:
            for use_imp in (False, True):
                r = measure(lib, mats, qtype, use_imp)
                if not r:
                    continue
                rows.append((qtype, use_imp, r))
                print(f"{qtype:5s} imp={use_imp!s:5s} rmse edgeq {r['rmse']['edgeq']:.4e} llama.cpp "
                      f"{r['rmse']['llama.cpp']:.4e} ratio {r['ratio']:.4f} identical={r['identical']} "
                      f"({r['secs']['edgeq']:.2f}s / {r['secs']['llama.cpp']:.2f}s)", file=sys.stderr)
        all_rows += rows
        title = {"plain": "every 2-D `blk.*` matrix dequantized to float32",
                 "dithered": "the same plus uniform noise of +-half each 32-value block's own Q4_1 step (so the "
                             "values no longer sit on the source's Q4_1 grid, which favours grids that contain it: "
                             "in the plain table Q4_1 and Q5_1-with-importance are near lossless, Q5_1 and Q5_0 "
                             "without importance look poor)"}[source]
        lines += ["", f"## Source {source}: {title}",
                  f"`{Path(args.model).name}`: {len(mats)} matrices, {n_vals / 1e6:.1f}M values.", ""]
        lines += table(rows)
    worst = max(r["ratio"] for _, _, r in all_rows)
    lines += ["", f"Worst ratio edgeq / llama.cpp: {worst:.4f} (goal: <= 1.01 for every type). "
              + ("The bytes are identical to llama.cpp's for every type, source and importance setting."
                 if all(r["identical"] for _, _, r in all_rows) else "Rows marked 'no' differ in bytes."), ""]
    text = "\n".join(lines)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
