"""`edgeq convert SRC -o OUT.gguf --type Q4_K_M`: a Hugging Face checkpoint → one GGUF file llama.cpp runs.

    edgeq convert ~/ckpt/SmolLM2-135M-Instruct -o smollm2-q4_k_m.gguf --type Q4_K_M
    edgeq convert HuggingFaceTB/SmolLM2-135M-Instruct -o s.gguf --type Q4_K_M --calibrate macbeth

Everything about the source is checked first (config, tokenizer, every tensor's name and shape, the
safetensors files' integrity); then tensors stream one at a time (read, transform, quantize, write) into
a temp file renamed into place at the end, so an error or Ctrl-C leaves no partial output.
`--calibrate TEXT` first writes a temporary F16 file, runs edgeq's own forward pass over the text and
collects the importance matrix (see imatrix.py) from the inputs of every matrix product.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.mixes import FILE_TYPES, TENSOR_TYPES, Recipe


@dataclass
class OutTensor:
    """One tensor to write: name, numpy-order shape, and a loader returning float32 values."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


def add_recipe_arguments(p: argparse.ArgumentParser, default_type: str | None) -> None:
    """Options shared with `edgeq quantize`."""
    p.add_argument("--type", dest="qtype", default=default_type, required=default_type is None,
                   type=str.upper, choices=list(FILE_TYPES), metavar="TYPE",
                   help=f"file type: {', '.join(FILE_TYPES)}" + (f" (default {default_type})" if default_type else ""))
    p.add_argument("--pure", action="store_true", help="one type for every matrix (no per-tensor rules)")
    p.add_argument("--output-type", type=str.upper, choices=TENSOR_TYPES, metavar="T",
                   help="type of output.weight (the classifier)")
    p.add_argument("--embedding-type", type=str.upper, choices=TENSOR_TYPES, metavar="T",
                   help="type of token_embd.weight")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calibrate", metavar="TEXT",
                   help="collect an importance matrix by running the model over TEXT (a file, or a known text name)")
    g.add_argument("--imatrix", metavar="FILE", help="use an importance matrix file (llama.cpp GGUF or legacy .dat)")
    p.add_argument("--save-imatrix", metavar="FILE", help="write the collected importance matrix (GGUF imatrix format)")
    p.add_argument("--chunks", type=int, default=32, help="calibration: windows of --calib-ctx tokens (default 32)")
    p.add_argument("--calib-ctx", type=int, default=512, help="calibration window in tokens (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads for calibration")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face checkpoint folder, or a hub repo id in the local HF cache")
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    add_recipe_arguments(p, default_type="F16")


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------

class Progress:
    """One status line on stderr, redrawn per tensor: count, bar, percent of elements, ETA."""

    def __init__(self, total: int, enabled: bool, label: str = ""):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.label = label
        self.t0 = time.perf_counter()

    def update(self, i: int, n: int, name: str, qtype: str, size: int) -> None:
        self.done += size
        if not self.tty:
            return
        frac = self.done / self.total
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        bar = "█" * int(frac * 24) + "░" * (24 - int(frac * 24))
        line = f"\r{self.label}[{i:>4}/{n}] {bar} {frac * 100:5.1f}% ETA {eta:5.1f}s  {name} → {qtype}"
        sys.stderr.write(line[:160].ljust(100))
        sys.stderr.flush()

    def finish(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 160 + "\r")
        if self.enabled:
            print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# the shared writer loop (convert and quantize)
# ------------------------------------------------------------------------------------------------

def check_output_path(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.is_dir():
        raise EdgeqError(f"{out}: is a directory (give a file name, e.g. {out / 'model.gguf'})")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise EdgeqError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgeqError(f"{folder}: output folder is not writable")
    return out


def _default_mode(path) -> None:
    """Temp files are created 0600; give the finished file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_model(path: str | os.PathLike, arch: str,
                metadata: Sequence[tuple[str, Any, Any, Any]],
                tensors: Sequence[OutTensor], recipe: Recipe, imatrix=None,
                quiet: bool = False, label: str = "") -> dict[str, Any]:
    """Quantize and write tensors one at a time into a new GGUF; returns stats (types, bytes, seconds)."""
    from edgeq.formats.gguf_write import GGUFOutput
    from edgeq.formats.quants import quantize

    t0 = time.perf_counter()
    types = {t.name: recipe.choose(t.name, t.shape) for t in tensors}
    counts: dict[str, int] = {}
    for q in types.values():
        counts[q] = counts.get(q, 0) + 1
    progress = Progress(sum(int(np.prod(t.shape)) for t in tensors), enabled=not quiet, label=label)
    n_bytes = 0
    with GGUFOutput(path, arch) as out:
        for key, value, vtype, sub in metadata:
            out.add_metadata(key, value, vtype, sub)
        for t in tensors:
            out.add_tensor_info(t.name, types[t.name], t.shape)
        for i, t in enumerate(tensors, 1):
            x = t.load()
            if tuple(x.shape) != tuple(t.shape):
                raise EdgeqError(f"tensor {t.name}: got shape {x.shape}, expected {t.shape}")
            q = types[t.name]
            x2 = x.reshape(-1, t.shape[-1])
            imp = None
            if imatrix is not None and q not in ("F32", "F16", "BF16") and x.ndim == 2:
                imp = imatrix.importance(t.name, t.shape[-1])
            raw = quantize(np.ascontiguousarray(x2, dtype=np.float32), q, imp)
            out.write_tensor(t.name, raw)
            n_bytes += raw.nbytes
            del x, x2, raw
            progress.update(i, len(tensors), t.name, q, int(np.prod(t.shape)))
    _default_mode(path)
    seconds = time.perf_counter() - t0
    n_el = sum(int(np.prod(t.shape)) for t in tensors)
    stats = {"seconds": seconds, "tensor_bytes": n_bytes, "file_bytes": os.path.getsize(path),
             "bits_per_weight": 8 * n_bytes / max(n_el, 1), "types": counts}
    mix = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    progress.finish(f"wrote {path}: {stats['file_bytes'] / 1e6:.1f} MB, {stats['bits_per_weight']:.2f} bits/weight "
                    f"({mix}) in {seconds:.1f}s")
    return stats


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------

def read_text(name_or_path: str) -> tuple[str, str]:
    """(text, dataset label) from a file path or a known text name (edgeq.assets)."""
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        from edgeq import assets

        try:
            p = Path(assets.text_path(name_or_path))
        except Exception:
            raise EdgeqError(f"{name_or_path}: no such text file (and not a known text name)") from None
    return p.read_text(encoding="utf-8", errors="replace"), p.name


def calibrate_gguf(model_path: str | os.PathLike, text: str, dataset: str, n_chunks: int, n_ctx: int,
                   threads: int | None, quiet: bool):
    """Importance matrix from edgeq's forward pass over `text` on an existing GGUF file."""
    from edgeq import engine, imatrix

    model = engine.load(str(model_path), n_ctx=n_ctx, threads=threads)
    tok = model.tokenizer
    ids = tok.encode(text, add_special=False)
    t0 = time.perf_counter()

    def progress(i: int, n: int) -> None:
        if not quiet and sys.stderr.isatty():
            el = time.perf_counter() - t0
            sys.stderr.write(f"\rcalibrating: chunk {i}/{n}, ETA {el / i * (n - i):5.1f}s ")
            sys.stderr.flush()

    im = imatrix.collect(lambda chunk, obs: model.collect_activations(chunk, obs), ids, n_ctx=n_ctx,
                         n_chunks=n_chunks, bos_id=tok.bos_id if tok.add_bos else None, dataset=dataset,
                         progress=progress)
    if not quiet:
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 60 + "\r")
        print(f"calibrated on {im.chunk_count} × {n_ctx} tokens of {dataset} in {time.perf_counter() - t0:.1f}s "
              f"({len(im)} matrices)", file=sys.stderr)
    return im


def resolve_imatrix(args, n_layer_names: Sequence[str], make_calibration_model: Callable[[Path], Path]):
    """--imatrix / --calibrate → an Imatrix or None; --save-imatrix writes it."""
    from edgeq import imatrix

    im = None
    if args.imatrix:
        im = imatrix.load(args.imatrix)
        missing = imatrix.check_names(im, n_layer_names)
        if missing and not args.quiet:
            print(f"note: the imatrix has no entry for {len(missing)} matrices (e.g. {missing[0]}); "
                  "those are quantized without importance", file=sys.stderr)
    elif args.calibrate:
        if args.chunks < 1 or args.calib_ctx < 16:
            raise EdgeqError("--chunks must be >= 1 and --calib-ctx >= 16")
        text, dataset = read_text(args.calibrate)
        folder = Path(args.output).expanduser().resolve().parent
        with tempfile.TemporaryDirectory(prefix=".edgeq-calib-", dir=folder) as tmp:
            model_path = make_calibration_model(Path(tmp))
            im = calibrate_gguf(model_path, text, dataset, args.chunks, args.calib_ctx, args.threads, args.quiet)
    if im is not None and args.save_imatrix:
        imatrix.save(im, args.save_imatrix)
        if not args.quiet:
            print(f"wrote importance matrix {args.save_imatrix} ({len(im)} entries)", file=sys.stderr)
    elif args.save_imatrix:
        raise EdgeqError("--save-imatrix needs --calibrate (or --imatrix)")
    return im


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------

def convert(src: str | os.PathLike, output: str | os.PathLike, qtype: str = "F16", *, pure: bool = False,
            output_type: str | None = None, embedding_type: str | None = None, imatrix=None,
            quiet: bool = True) -> dict[str, Any]:
    """Library entry point: convert a checkpoint; returns write_model's stats."""
    args = argparse.Namespace(src=str(src), output=str(output), qtype=qtype.upper(), pure=pure,
                              output_type=output_type, embedding_type=embedding_type, calibrate=None,
                              imatrix=None, save_imatrix=None, chunks=32, calib_ctx=512, threads=None, quiet=quiet)
    return _run(args, preset_imatrix=imatrix)


def _run(args, preset_imatrix=None) -> dict[str, Any]:
    from edgeq import hf_to_gguf
    from edgeq.hf_checkpoint import HFCheckpoint

    out = check_output_path(Path(args.output).expanduser())
    if args.save_imatrix:
        check_output_path(Path(args.save_imatrix).expanduser())
    if args.imatrix and not Path(args.imatrix).expanduser().is_file():
        raise EdgeqError(f"{args.imatrix}: no such imatrix file")
    ckpt = HFCheckpoint(args.src)
    conv = hf_to_gguf.plan(ckpt)
    hp = conv.hparams
    recipe = Recipe(args.qtype, n_layer=hp.n_layer, n_gqa=hp.n_gqa, tied="output.weight" not in
                    {t.name for t in conv.tensors}, pure=args.pure, output_type=args.output_type,
                    embedding_type=args.embedding_type)
    tensors = [OutTensor(t.name, t.shape, t.load) for t in conv.tensors]
    matrices = [t.name for t in tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]

    def calibration_model(folder: Path) -> Path:
        path = folder / "calibration-f16.gguf"
        f16 = Recipe("F16", n_layer=hp.n_layer)
        write_model(path, conv.arch, conv.metadata(f16.file_type), tensors, f16, quiet=args.quiet,
                    label="calibration model ")
        return path

    im = preset_imatrix if preset_imatrix is not None else resolve_imatrix(args, matrices, calibration_model)
    recipe.has_imatrix = im is not None
    stats = write_model(out, conv.arch, conv.metadata(recipe.file_type), tensors, recipe, im, quiet=args.quiet)
    ckpt.close()
    return stats


def main(args) -> int:
    _run(args)
    return 0
