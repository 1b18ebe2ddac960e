"""Writing one GGUF file: tensors streamed one at a time (load, quantize, write) into a temp file that is
renamed into place at the end, so an error or Ctrl-C leaves no partial output. Shared by convert and
quantize (edgeq/convert/__init__.py)."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edgeq.convert.mixes import Recipe
from edgeq.errors import EdgeqError
from edgeq.file_checks import check_output_path as check_output_path  # outputs: no device, no silent overwrite
from edgeq.progress import Progress


@dataclass
class OutTensor:
    """One tensor to write: name, numpy-order shape, and a loader returning float32 values; `rows(index)`,
    where the source can, returns just the rows at `index` (a slice or an index array) as float32."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    rows: Callable[[Any], np.ndarray] | None = None


class PreparedTensors:
    """Tensors quantized before the writing starts (layer by layer, during calibration: calibrate.py): their
    bytes wait in an unlinked temp file beside the output, not in memory, until write_model copies them."""

    def __init__(self, folder: str | os.PathLike):
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".edgeq-prepared-")
        self._where: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.methods: dict[str, str] = {}   # name → how it was quantized (gptq.calibrated_quantize's choice)

    def put(self, name: str, raw: np.ndarray, method: str) -> None:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        self._where[name] = (self._file.seek(0, os.SEEK_END), raw.shape)
        self._file.write(raw.data)
        self.methods[name] = method

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        offset, shape = self._where[name]
        self._file.seek(offset)
        return np.fromfile(self._file, dtype=np.uint8, count=int(np.prod(shape))).reshape(shape)


def _default_mode(path) -> None:
    """Temp files are created 0600; give the finished file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_model(path: str | os.PathLike, arch: str,
                metadata: Sequence[tuple[str, Any, Any, Any]],
                tensors: Sequence[OutTensor], recipe: Recipe, imatrix=None,
                quiet: bool = False, label: str = "", method: str = "imatrix") -> dict[str, Any]:
    """Quantize and write tensors one at a time into a new GGUF; returns stats (types, bytes, seconds).

    With an imatrix that carries Hessians (calibration by edgeq), `method` 'gptq' or 'best' quantizes each
    matrix by GPTQ, or by whichever of the importance search and GPTQ has the lower held-out output
    error (convert/gptq.py); 'awq-gptq' and 'best' first fold AWQ scales into the graph where the
    architecture allows (convert/awq.py; kept only where they lower the held-out error). One that carries
    prepared tensors (calibrate.quantize_by_layer did all that already, layer by layer) has those copied
    as they are. stats["methods"] counts the matrices per method, stats["awq"] the groups scaled."""
    from edgeq.convert.gptq import calibrated_quantize
    from edgeq.formats.gguf_write import GGUFOutput
    from edgeq.formats.quants import quantize

    t0 = time.perf_counter()
    types = {t.name: recipe.choose(t.name, t.shape) for t in tensors}
    counts: dict[str, int] = {}
    for q in types.values():
        counts[q] = counts.get(q, 0) + 1
    progress = Progress(sum(int(np.prod(t.shape)) for t in tensors), label=label, enabled=not quiet)
    n_bytes = 0
    hessians = getattr(imatrix, "hessians", None) if method != "imatrix" else None
    prepared = getattr(imatrix, "prepared", None)
    methods: dict[str, int] = {}
    folding = _awq_folding(arch, metadata, tensors, types, imatrix) if hessians is not None and method in AWQ_METHODS \
        else None
    if folding is not None:
        hessians = folding.hessians
    with GGUFOutput(path, arch) as out:
        for key, value, vtype, sub in metadata:
            out.add_metadata(key, value, vtype, sub)
        for t in tensors:
            out.add_tensor_info(t.name, types[t.name], t.shape)
        for i, t in enumerate(tensors, 1):
            if prepared is not None and t.name in prepared:
                raw = prepared.get(t.name)
                m = prepared.methods[t.name]
                if m:   # (None: a folded norm or bias, not a quantized matrix)
                    methods[m] = methods.get(m, 0) + 1
                out.write_tensor(t.name, raw)
                n_bytes += raw.nbytes
                progress.update(advance=int(np.prod(t.shape)), detail=f"[{i:>4}/{len(tensors)}] {t.name} → {types[t.name]}")
                continue
            x = folding.load(t.name) if folding is not None else t.load()
            if tuple(x.shape) != tuple(t.shape):
                raise EdgeqError(f"tensor {t.name}: got shape {x.shape}, expected {t.shape}")
            q = types[t.name]
            x2 = x.reshape(-1, t.shape[-1])
            imp = None
            if imatrix is not None and q not in ("F32", "F16", "BF16") and x.ndim == 2:
                imp = imatrix.importance(t.name, t.shape[-1])
                if folding is not None:
                    imp = folding.importance(t.name, imp)
            x2 = np.ascontiguousarray(x2, dtype=np.float32)
            if hessians is not None and imp is not None:
                raw, choice = calibrated_quantize(t.name, x2, q, hessians, "gptq" if method == "awq-gptq" else method,
                                                  imp)
                m = choice.method if choice else "imatrix"
                methods[m] = methods.get(m, 0) + 1
            else:
                raw = quantize(x2, q, imp)
            out.write_tensor(t.name, raw)
            n_bytes += raw.nbytes
            del x, x2, raw
            progress.update(advance=int(np.prod(t.shape)), detail=f"[{i:>4}/{len(tensors)}] {t.name} → {q}")
    _default_mode(path)
    seconds = time.perf_counter() - t0
    n_el = sum(int(np.prod(t.shape)) for t in tensors)
    stats = {"seconds": seconds, "tensor_bytes": n_bytes, "file_bytes": os.path.getsize(path),
             "bits_per_weight": 8 * n_bytes / max(n_el, 1), "types": counts, "methods": methods}
    if folding is not None:
        stats["awq"] = awq_stats(folding.alphas, folding.folded())
    elif getattr(imatrix, "awq", None) is not None:   # folded layer by layer during calibration
        stats["awq"] = imatrix.awq
    mix = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    progress.finish(f"wrote {path}: {stats['file_bytes'] / 1e6:.1f} MB, {stats['bits_per_weight']:.2f} bits/weight "
                    f"({mix}) in {seconds:.1f}s"
                   + (f"; matrices by {', '.join(f'{k} ×{v}' for k, v in sorted(methods.items()))}" if methods else "")
                   + (f"; AWQ scales in {stats['awq']['scaled']} of {stats['awq']['groups']} groups" if "awq" in stats else ""))
    return stats


AWQ_METHODS = ("awq-gptq", "best")


def _awq_folding(arch: str, metadata, tensors: Sequence[OutTensor], types: dict[str, str], imatrix):
    """The AWQ fold for this write (convert/awq.py), or None where the architecture has no fold rule; the scale
    search is kept on the imatrix, so quantizing the same calibration by another method reuses it."""
    meta = {key: value for key, value, *_ in metadata}
    n_head = int(meta.get(f"{arch}.attention.head_count", 0) or 0)
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    return awq_folding(arch, n_head, n_head_kv, tensors, types, imatrix.hessians,
                       imatrix.__dict__.setdefault("awq_scales", {}))


def awq_folding(arch: str, n_head: int, n_head_kv: int, tensors: Sequence, types: dict[str, str], hessians,
                cache: dict):
    """An awq.Folding over `tensors` (anything with .name, .shape, .load) judged by `hessians` (all layers', or
    one layer's when calibrate.quantize_by_layer folds layer by layer), GPTQ deciding; None where the
    architecture has no fold rule."""
    from edgeq.convert import awq
    from edgeq.convert.gptq import quantize_gptq
    from edgeq.formats.quants import dequantize, quantize

    if arch not in awq.FOLDS or n_head < 1 or n_head_kv < 1:
        return None

    def quantizer_for(qtype: str):
        def quantized(W, H, imp):   # (one factorization per scaled H: the GPTQ of its folded matrices reuses it)
            return dequantize(quantize_gptq(W, qtype, H, imp, factor_of=hessians.factor_of), qtype, W.shape)
        return quantized

    def coarse_for(qtype: str):
        return lambda W, H, imp: dequantize(quantize(W, qtype, imp), qtype, W.shape)

    return awq.Folding(arch, {t.name: t.load for t in tensors}, {t.name: tuple(t.shape) for t in tensors}, types,
                       hessians, n_head, n_head_kv, quantizer_for, cache, coarse_for)


def awq_stats(alphas: dict[str, float], folded: list[str]) -> dict[str, Any]:
    return {"groups": len(alphas), "scaled": sum(a > 0 for a in alphas.values()), "alphas": alphas,
            "folded": folded}
