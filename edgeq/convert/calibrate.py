"""Calibration: an importance matrix from edgeq's own forward pass over a text (see imatrix.py), run one layer
at a time; with GPTQ (gptq.py) each layer's matrices are quantized as soon as that layer has been seen."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.progress import Progress

if TYPE_CHECKING:
    from edgeq.convert import gptq, imatrix


DEFAULT_TEXT = "macbeth"  # `--calibrate` alone: English prose and verse, disjoint from the hamlet evaluation text
METHODS = ("imatrix", "gptq", "awq-gptq", "best")  # how a calibrated matrix is quantized (convert/gptq.py, awq.py)
MAX_BYTES_PER_TOKEN = 32  # calibration reads at most this many bytes per token it needs (whole text if smaller)
# the calibration forward runs a float (F16/BF16/F32) layer's matrices as Q8_0 copies made for that layer: the
# int8 prefill GEMM is ~3.4x faster than float tiles (Qwen3-1.7B shape: 98.7 vs 28.7 t/s), the activations
# it gives differ from the float ones by Q8_0's rounding (llama.cpp's users run llama-imatrix on Q8_0 files
# for the same reason); docs/quality.md measures what it changes
FORWARD_TYPE = "Q8_0"
# ... and those copies smaller than this many weights prefill on float activations (float tiles), not on the int8
# GEMM the runtime uses for every size: the statistics of small models' attention matrices keep the float
# activations' precision (against transformers, SmolLM2's prefill error is 0.012 that way, 0.024 on int8
# activations), at little cost in time where matrices are that small. The 32-window report in docs/quality.md
# was made with exactly this forward.
FORWARD_INT8_MIN_WEIGHTS = 1 << 20


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


def _openblas():
    """(get, set) of the thread count of the OpenBLAS that numpy loaded, or None (another BLAS, not Linux)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", ""):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        return get, put
    except OSError:
        pass
    return None


@contextmanager
def blas_threads(n: int):
    """numpy's OpenBLAS limited to n threads inside the block (nothing done where it is not found). Its idle
    workers spin after every call: on a busy machine, more of them than free cores made a 2048² Cholesky and
    inverse take 7 s instead of 3 s of wall time, and twice the CPU time."""
    blas = _openblas()
    if blas is None:
        yield
        return
    get, put = blas
    old = get()
    put(max(1, int(n)))
    try:
        yield
    finally:
        put(old)


def forward_linear(raw, qtype: str, shape: tuple[int, int]):
    """The QuantLinear the calibration forward runs for a `qtype` matrix: prefill on float tiles below
    FORWARD_INT8_MIN_WEIGHTS weights, on the runtime's int8 GEMM from there."""
    from edgeq.cpu_kernels.linear import QuantLinear

    return QuantLinear(raw, qtype, shape, int8_prefill=shape[0] * shape[1] >= FORWARD_INT8_MIN_WEIGHTS)


@contextmanager
def forward_weights(layer, qtype: str | None = FORWARD_TYPE):
    """Inside the block, the float matrices of `layer` (a model's Layer) are `qtype` copies (see FORWARD_TYPE);
    the originals are put back after it, and the copies freed: one layer's copies exist at a time."""
    from edgeq.formats.quants import block_size, dequantize, quantize
    from edgeq.models.base import all_linears

    swapped = []
    if qtype is not None:
        for lin in all_linears(layer):
            q = lin.q
            if q.qtype in ("F32", "F16", "BF16") and q.n_in % block_size(qtype) == 0:
                x = dequantize(q.raw, q.qtype, (q.n_out, q.n_in))
                lin.q = forward_linear(quantize(x, qtype).reshape(-1), qtype, (q.n_out, q.n_in))
                swapped.append((lin, q))
                del x
    try:
        yield
    finally:
        for lin, q in swapped:
            lin.q = q


@dataclass
class LayerSeen:
    """What the matrices of one step of the network read over every calibration window: a decoder layer
    (index < n_layer) or the classifier (index == n_layer)."""

    index: int
    names: list[str]           # its matrices in the order they were read (GGUF names)
    hessians: "gptq.Hessians"  # XᵀX per distinct input, fitting and held-out windows apart (this step only)
    imatrix: "imatrix.Imatrix"  # importance sums of every step so far (this one complete)
    arch: str = ""             # the GGUF architecture and its attention heads (AWQ's v→o fold needs them)
    n_head: int = 0
    n_head_kv: int = 0


def calibrate_by_layer(model_path: str | os.PathLike, text: str, dataset: str, n_chunks: int, n_ctx: int,
                       threads: int | None, quiet: bool, on_layer: Callable[[LayerSeen], None] | None = None,
                       observer: Callable[[str, np.ndarray], None] | None = None,
                       forward_type: str | None = FORWARD_TYPE):
    """The importance matrix of edgeq's forward pass over `text` on a GGUF file, computed as GPTQ's sequential
    calibration: every window through one decoder layer at a time, then `on_layer` (which quantizes that
    layer's matrices; None: no Hessians are collected) before the next layer runs.

    Only one layer's Hessians exist at a time (the whole model's would be n_layer × a few n_embd² floats), and
    the hidden states of every window are kept between layers instead (windows × n_ctx × n_embd float32). The
    classifier is one more step, on the final norm of the hidden states of every token (as llama-imatrix, which
    evaluates every token's logits), but no logits are computed. The next
    layer reads the unquantized layer's outputs, as a full forward pass would: the importance stays llama.cpp's
    imatrix (of the network as given, float matrices run as FORWARD_TYPE copies) and each layer costs one pass,
    not one pass for the Hessians plus a quantized one for the outputs. `observer(name, x)`, when given, sees
    every matrix input too (e.g. a per-layer activation sample taken before on_layer quantizes that layer).
    `forward_type`: the type the float matrices run as (forward_weights; None: as they are)."""
    from edgeq.convert import gptq, imatrix
    from edgeq.runtime import engine
    from edgeq.runtime.engine import N_BATCH

    # on the file mapping: the layer loop gives each layer's pages back (release_pages) to keep the RSS near a layer
    model = engine.load(str(model_path), n_ctx=n_ctx, threads=threads, mmap=True)
    model._set_threads()
    arch, w, cfg, tok = model.arch, model.weights, model.cfg, model.tokenizer
    windows = imatrix.windows(tok.encode(text, add_special=False), n_ctx, n_chunks,
                              tok.bos_id if tok.add_bos else None)
    n_fit = imatrix.fitting_windows(len(windows))
    im = imatrix.Imatrix(chunk_size=n_ctx, chunk_count=len(windows), datasets=[dataset] if dataset else [])
    hidden = np.stack([arch.embed(w, cfg, np.asarray(c, dtype=np.int64)) for c in windows])  # (windows, T, d)
    bar = Progress(cfg.n_layer + 1, label="calibrating ", enabled=not quiet)
    t_quantize = 0.0
    for il in range(cfg.n_layer + 1):
        hs, names = gptq.Hessians(), {}

        def observe(name: str, x: np.ndarray) -> None:
            names.setdefault(name)
            im(name, x)
            if on_layer is not None:
                hs(name, x)
            if observer is not None:
                observer(name, x)

        with forward_weights(w.layers[il] if il < cfg.n_layer else None, forward_type):
            for c, x in enumerate(hidden):
                hs.held_out = c >= n_fit
                if il == cfg.n_layer:
                    observe(w.output.name, arch.classifier_input(w, cfg, x))
                    continue
                for s in range(0, n_ctx, N_BATCH):   # the engine's prefill batches: the same kernels and cache
                    arch.forward_layers(w, cfg, x[s:s + N_BATCH], s, model.cache, range(il, il + 1), observe)
        if il == cfg.n_layer:
            hidden = None   # (not read again: freed before the classifier, the largest matrix, is quantized)
        if on_layer is not None:
            bar.update(il + 0.5, detail=f"layer {il}/{cfg.n_layer}: quantizing" if il < cfg.n_layer
                       else "classifier: quantizing")
            t0 = time.perf_counter()
            on_layer(LayerSeen(il, list(names), hs, im, model.gguf.arch, cfg.n_head, cfg.n_head_kv))
            t_quantize += time.perf_counter() - t0
            hs.clear()   # freed before the next layer's are made
        model.gguf.release_pages()   # the weights of the layer just run leave the RSS
        bar.update(il + 1, detail=f"layer {il + 1}/{cfg.n_layer}")
    split = f"; {bar.elapsed() - t_quantize:.1f}s forward, {t_quantize:.1f}s quantizing" if on_layer else ""
    bar.finish(f"calibrated{' and quantized' if on_layer else ''} layer by layer on {len(windows)} × {n_ctx} "
               f"tokens of {dataset} in {bar.elapsed():.1f}s ({len(im)} matrices{split})")
    return im


def quantize_by_layer(opts, model_path: Path, text: str, dataset: str, tensors: Sequence, recipe, folder: Path):
    """calibrate_by_layer with each layer's matrices quantized by opts.method as soon as its Hessians are
    complete (gptq.calibrated_quantize, from the tensors' own loaders), the bytes set aside in
    im.prepared for write_model. Matrices without a Hessian (inputs wider than gptq.MAX_HESSIAN_COLS,
    stacked experts) or of a float type are left to write_model, with the importance collected here."""
    from edgeq.convert.gptq import LazyRows, calibrated_quantize
    from edgeq.convert.writer import AWQ_METHODS, PreparedTensors, awq_folding, awq_stats
    from edgeq.formats.quants import quantize

    by_name = {t.name: t for t in tensors if len(t.shape) == 2}
    types = {t.name: recipe.choose(t.name, t.shape) for t in tensors}
    prepared = PreparedTensors(folder)
    awq_cache: dict = {}
    alphas: dict[str, float] = {}
    folded: list[str] = []

    def on_layer(seen: LayerSeen) -> None:
        # AWQ (awq-gptq, best): this layer's groups searched on its own Hessians and folded before its
        # matrices are quantized; the folded norms/biases are set aside with them
        folding = awq_folding(seen.arch, seen.n_head, seen.n_head_kv, tensors, types, seen.hessians, awq_cache) \
            if opts.method in AWQ_METHODS else None
        hessians = folding.hessians if folding is not None else seen.hessians
        for name in seen.names:
            t = by_name.get(name)
            if t is None or not seen.hessians.has(name):
                continue
            qtype = types[name]
            if qtype in ("F32", "F16", "BF16"):
                continue
            if folding is not None and name in folding.layer_of:
                W = np.ascontiguousarray(folding.load(name), dtype=np.float32)
            elif t.rows is not None:   # read a slab at a time (the classifier: 1.24 GB as float32 at 1.7B)
                W = LazyRows(t.shape, t.rows)
            else:
                W = np.ascontiguousarray(t.load(), dtype=np.float32)
            if W.shape != tuple(t.shape):
                raise EdgeqError(f"tensor {name}: got shape {W.shape}, expected {tuple(t.shape)}")
            imp = seen.imatrix.importance(name, t.shape[-1])
            if folding is not None:
                imp = folding.importance(name, imp)
            raw, choice = calibrated_quantize(name, W, qtype, hessians, "gptq" if opts.method == "awq-gptq"
                                              else opts.method, imp)
            prepared.put(name, raw, choice.method if choice else "imatrix")
            del W, raw
        if folding is not None:
            for name, x in sorted(folding._ready.items()):  # folded tensors not quantized above (norms, biases)
                x = np.ascontiguousarray(x, dtype=np.float32)
                prepared.put(name, quantize(x.reshape(-1, x.shape[-1]), types[name], None), None)
            alphas.update(folding.alphas)
            folded.extend(folding.folded())

    im = calibrate_by_layer(model_path, text, dataset, opts.chunks, opts.calib_ctx, opts.threads, opts.quiet, on_layer)
    im.prepared = prepared
    if opts.method in AWQ_METHODS and alphas:
        im.awq = awq_stats(alphas, sorted(folded))
    return im


def resolve_imatrix(opts, output: str | os.PathLike, matrix_names: Sequence[str],
                    make_calibration_model: Callable[[Path], Path], tensors: Sequence = (), recipe=None):
    """opts.imatrix / opts.calibrate → an Imatrix or None; opts.save_imatrix writes it (opts: QuantOptions).

    With --calibrate and a method other than imatrix, the matrices are quantized during the calibration,
    layer by layer (quantize_by_layer: `tensors` are the writer's OutTensors, `recipe` their types)."""
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
        from edgeq.runtime.engine import default_threads

        with ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".edgeq-calib-", dir=folder))
            model_path = make_calibration_model(Path(tmp))
            # BLAS (Hessians, GPTQ's updates, error products) on every core where its workers sleep at once
            # between calls (_numba_env.BLAS_SLEEPS); else on half: numba's pool runs the forward passes and the
            # importance search between BLAS calls, and OpenBLAS workers left spinning would take its cores
            from edgeq._numba_env import BLAS_SLEEPS

            n = opts.threads or default_threads()
            stack.enter_context(blas_threads(n if BLAS_SLEEPS else n // 2))
            if opts.method == "imatrix":
                im = calibrate_by_layer(model_path, text, dataset, opts.chunks, opts.calib_ctx, opts.threads,
                                        opts.quiet)
            else:
                recipe.has_imatrix = True   # (the types depend on it: fixed before any matrix is quantized)
                im = quantize_by_layer(opts, model_path, text, dataset, tensors, recipe, folder)
    if im is not None and opts.save_imatrix:
        imatrix.save(im, opts.save_imatrix)
        if not opts.quiet:
            print(f"wrote importance matrix {opts.save_imatrix} ({len(im)} entries)", file=sys.stderr)
    elif opts.save_imatrix:
        raise EdgeqError("--save-imatrix needs --calibrate (or --imatrix)")
    return im
