"""Importance matrix: per input column, the mean square of the activations entering each weight matrix.

Collected like llama.cpp's llama-imatrix (sum of x² over every token, and the token count, per matrix);
used as `importance` when quantizing that matrix's rows. Files are llama.cpp's current imatrix GGUF
(general.type = "imatrix"; tensors `<name>.in_sum2` (1, n_in) and `<name>.counts` (1, 1);
imatrix.chunk_count / chunk_size / datasets), which llama-quantize --imatrix reads. The legacy `.dat`
format is read too.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgeq.errors import EdgeqError


class ImatrixError(EdgeqError):
    """An importance-matrix file that cannot be read, or does not fit the model."""


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)    # name → float64 (n_in,) Σx²
    counts: dict[str, int] = field(default_factory=dict)         # name → tokens seen
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    hessians: object = None   # gptq.Hessians collected alongside (for GPTQ); never saved to the file
    prepared: object = None   # writer.PreparedTensors quantized during a layer-by-layer calibration; never saved

    def __call__(self, name: str, x: np.ndarray) -> None:
        """The model observer: x is the (T, n_in) input of matrix `name`."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        s = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        if name in self.sums:
            if self.sums[name].shape != s.shape:
                raise ImatrixError(f"imatrix: {name} seen with {s.shape[0]} and {self.sums[name].shape[0]} columns")
            self.sums[name] += s
            self.counts[name] += x.shape[0]
        else:
            self.sums[name] = s
            self.counts[name] = x.shape[0]

    def importance(self, name: str, n_cols: int) -> np.ndarray | None:
        """Mean x² per column for `name`, or None when the matrix was never seen."""
        s = self.sums.get(name)
        if s is None or not self.counts.get(name):
            return None
        if s.shape[0] != n_cols:
            raise ImatrixError(f"imatrix entry {name} has {s.shape[0]} values, the tensor rows have {n_cols}")
        imp = (s / self.counts[name]).astype(np.float32)
        if not np.all(np.isfinite(imp)):
            raise ImatrixError(f"imatrix entry {name} has non-finite values")
        return imp

    def __len__(self) -> int:
        return len(self.sums)


def collect(run_chunk: Callable[[list[int], Imatrix], None], tokens: list[int], n_ctx: int = 512,
            n_chunks: int = 32, bos_id: int | None = None, dataset: str = "",
            progress: Callable[[int, int], None] | None = None, hessians=None) -> Imatrix:
    """Run the model over up to n_chunks windows of n_ctx tokens (llama-imatrix's chunking: the
    first token of each window replaced by BOS when the model adds one). `hessians` (gptq.Hessians), when
    given, observes too: the last quarter of the windows (at least one, when there are two) as held-out."""
    chunks = windows(tokens, n_ctx, n_chunks, bos_id)
    n = len(chunks)
    im = Imatrix(chunk_size=n_ctx, datasets=[dataset] if dataset else [], hessians=hessians)
    observer = im
    if hessians is not None:
        def observer(name, x):
            im(name, x)
            hessians(name, x)
    n_fit = fitting_windows(n)
    for c, chunk in enumerate(chunks):
        if hessians is not None:
            hessians.held_out = c >= n_fit
        run_chunk(chunk, observer)
        im.chunk_count += 1
        if progress:
            progress(c + 1, n)
    return im


def windows(tokens: list[int], n_ctx: int, n_chunks: int, bos_id: int | None = None) -> list[list[int]]:
    """Up to n_chunks windows of n_ctx tokens (llama-imatrix's chunking: the first token of each window
    replaced by BOS when the model adds one)."""
    n = min(n_chunks, len(tokens) // n_ctx)
    if n < 1:
        raise ImatrixError(f"calibration text too short: {len(tokens)} tokens, need at least {n_ctx}")
    out = [list(tokens[c * n_ctx:(c + 1) * n_ctx]) for c in range(n)]
    if bos_id is not None:
        for chunk in out:
            chunk[0] = bos_id
    return out


def fitting_windows(n: int) -> int:
    """How many of n windows GPTQ fits on: the last quarter (at least one, when there are two) is held out."""
    return n - max(1, n // 4) if n >= 2 else n


def save(im: Imatrix, path: str | os.PathLike) -> None:
    """Write llama.cpp's imatrix GGUF (temp file + rename)."""
    from gguf import GGUFWriter
    from gguf.constants import GGUFValueType as V

    from edgeq.formats.gguf_write import atomic_output

    with atomic_output(path) as tmp:
        w = GGUFWriter(tmp, arch="")
        w.add_key_value("general.type", "imatrix", V.STRING)
        w.add_key_value("imatrix.chunk_count", int(im.chunk_count), V.UINT32)
        w.add_key_value("imatrix.chunk_size", int(im.chunk_size), V.UINT32)
        w.add_key_value("imatrix.datasets", list(im.datasets) or [""], V.ARRAY)
        for name in sorted(im.sums):
            w.add_tensor(name + ".in_sum2", im.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(name + ".counts", np.array([[float(im.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def load(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix GGUF or a legacy llama.cpp .dat file."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception as e:
        raise ImatrixError(f"{path}: not a readable GGUF file ({e})") from None
    kind = r.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise ImatrixError(f"{path}: not an imatrix file (general.type is not 'imatrix')")
    im = Imatrix()
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if key in r.fields:
            setattr(im, attr, int(r.fields[key].contents()))
    if "imatrix.datasets" in r.fields:
        im.datasets = list(r.fields["imatrix.datasets"].contents())
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    for name, data in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise ImatrixError(f"{path}: {base}.counts is missing")
        if data.ndim == 2 and data.shape[0] > 1:  # per-expert rows: not used by the models edgeq converts
            continue
        im.sums[base] = data.reshape(-1).astype(np.float64)
        im.counts[base] = int(round(float(counts.reshape(-1)[0])))
    return im


def _load_legacy(path: Path) -> Imatrix:
    """llama.cpp's original format: n_entries, then per entry (name, ncall, nval, nval floats) where the
    floats are already Σx²/count·ncall; optionally the chunk count and dataset name at the end."""
    data = path.read_bytes()
    im = Imatrix()
    try:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            vals = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return vals

        (n_entries,) = take("<i")
        if not 0 < n_entries < 1_000_000:
            raise ValueError("bad entry count")
        for _ in range(n_entries):
            (n_name,) = take("<i")
            name = data[pos:pos + n_name].decode("utf-8")
            pos += n_name
            ncall, nval = take("<ii")
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
            pos += 4 * nval
            # keep the mean (vals / ncall) with a nominal count of 1 token per call
            im.sums[name] = vals
            im.counts[name] = max(ncall, 1)
        if pos + 4 <= len(data):
            (im.chunk_count,) = take("<i")
            if pos + 4 <= len(data):
                (n,) = take("<i")
                im.datasets = [data[pos:pos + n].decode("utf-8", "replace")] if n > 0 else []
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ImatrixError(f"{path}: not an imatrix file (GGUF or legacy .dat): {e}") from None
    return im


def check_names(im: Imatrix, names: Iterable[str]) -> list[str]:
    """Matrices of the model with no imatrix entry (warned about, quantized without importance)."""
    return [n for n in names if n not in im.sums]
