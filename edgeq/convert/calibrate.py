"""Calibration: an importance matrix from edgeq's own forward pass over a text (see imatrix.py)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from edgeq.errors import EdgeqError
from edgeq.progress import Progress


DEFAULT_TEXT = "macbeth"  # `--calibrate` alone: English prose and verse, disjoint from the hamlet evaluation text
METHODS = ("imatrix", "gptq", "awq-gptq", "best")  # how a calibrated matrix is quantized (convert/gptq.py, awq.py)
MAX_BYTES_PER_TOKEN = 32  # calibration reads at most this many bytes per token it needs (whole text if smaller)


def read_text(name_or_path: str, max_bytes: int | None = None) -> tuple[str, str]:
    """(text, dataset label) from a file path or a known text name (edgeq.assets); at most `max_bytes` bytes
    are read (cut at the last whole line), so a huge or endless file costs only what calibration uses."""
    from edgeq.file_checks import open_input, shown

    p = Path(name_or_path).expanduser()
    if not p.exists():
        from edgeq import assets

        try:
            p = Path(assets.text_path(name_or_path))
        except Exception:
            raise EdgeqError(f"{shown(name_or_path)}: no such text file (and not a known text name)") from None
    with open_input(p, "text file") as f:
        data = f.read(max_bytes) if max_bytes else f.read()
        if max_bytes and len(data) == max_bytes and b"\n" in data:
            data = data[:data.rindex(b"\n") + 1]
    return data.decode("utf-8", errors="replace"), p.name


def calibrate_gguf(model_path: str | os.PathLike, text: str, dataset: str, n_chunks: int, n_ctx: int,
                   threads: int | None, quiet: bool, hessians: bool = False):
    """Importance matrix from edgeq's forward pass over `text` on an existing GGUF file; with `hessians`,
    also the inputs' XᵀX for GPTQ (im.hessians)."""
    from edgeq.convert import gptq, imatrix
    from edgeq.runtime import engine

    model = engine.load(str(model_path), n_ctx=n_ctx, threads=threads)
    tok = model.tokenizer
    ids = tok.encode(text, add_special=False)
    bar = Progress(n_chunks, label="calibrating ", enabled=not quiet)
    im = imatrix.collect(lambda chunk, obs: model.collect_activations(chunk, obs), ids, n_ctx=n_ctx,
                         n_chunks=n_chunks, bos_id=tok.bos_id if tok.add_bos else None, dataset=dataset,
                         progress=lambda i, n: bar.update(i, detail=f"chunk {i}/{n}"),
                         hessians=gptq.Hessians() if hessians else None)
    bar.finish(f"calibrated on {im.chunk_count} × {n_ctx} tokens of {dataset} in {bar.elapsed():.1f}s "
               f"({len(im)} matrices" + (f", input Hessians {im.hessians.nbytes() / 1e6:.0f} MB" if im.hessians else "")
               + ")")
    return im


def resolve_imatrix(opts, output: str | os.PathLike, matrix_names: Sequence[str],
                    make_calibration_model: Callable[[Path], Path]):
    """opts.imatrix / opts.calibrate → an Imatrix or None; opts.save_imatrix writes it (opts: QuantOptions)."""
    from edgeq.convert import imatrix

    im = None
    if opts.method not in METHODS:
        raise EdgeqError(f"unknown calibration method {opts.method!r} (known: {', '.join(METHODS)})")
    if opts.imatrix:
        im = imatrix.load(opts.imatrix)
        if opts.method in ("gptq", "awq-gptq") and not opts.quiet:
            print(f"note: an imatrix file holds no input correlations: --method {opts.method} needs --calibrate; "
                  "quantizing with the importance search", file=sys.stderr)
        missing = imatrix.check_names(im, matrix_names)
        if missing and not opts.quiet:
            print(f"note: the imatrix has no entry for {len(missing)} matrices (e.g. {missing[0]}); "
                  "those are quantized without importance", file=sys.stderr)
    elif opts.calibrate:
        if opts.chunks < 1 or opts.calib_ctx < 16:
            raise EdgeqError("--chunks must be >= 1 and --calib-ctx >= 16")
        text, dataset = read_text(opts.calibrate, max_bytes=opts.chunks * opts.calib_ctx * MAX_BYTES_PER_TOKEN)
        folder = Path(output).expanduser().resolve().parent
        with tempfile.TemporaryDirectory(prefix=".edgeq-calib-", dir=folder) as tmp:
            model_path = make_calibration_model(Path(tmp))
            im = calibrate_gguf(model_path, text, dataset, opts.chunks, opts.calib_ctx, opts.threads, opts.quiet,
                                hessians=opts.method != "imatrix")
    if im is not None and opts.save_imatrix:
        imatrix.save(im, opts.save_imatrix)
        if not opts.quiet:
            print(f"wrote importance matrix {opts.save_imatrix} ({len(im)} entries)", file=sys.stderr)
    elif opts.save_imatrix:
        raise EdgeqError("--save-imatrix needs --calibrate (or --imatrix)")
    return im
