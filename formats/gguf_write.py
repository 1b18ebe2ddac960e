"""Streaming GGUF writer on top of `gguf.GGUFWriter`: all metadata and tensor infos first, then the tensors'
bytes one at a time (never the whole model in memory), written to a temp file renamed into place at the end.

    with GGUFOutput("out.gguf", "llama") as out:
        copy_metadata(src, out)
        out.add_tensor_info("tok_embd.weight", "Q4_K", (n_vocab, n_embd))
        ...
        out.write_tensor("tok_embd.weight", raw_uint8)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

# Keys the container itself owns: GGUFWriter writes general.architecture; the alignment is the writer's choice.
INTERNAL_KEYS = frozenset({"general.architecture", "general.alignment"})

_U32_MAX, _I32_MIN, _I32_MAX = 2**32 - 1, -2**31, 2**31 - 1


# ---------------------------------------------------------------- temp files left by a killed writer
_IMPORTED = time.time()


def process_start_time() -> float:
    """When this process started (Linux /proc), else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # field 22: start in clock ticks since boot; measured back from now (boot time is whole seconds only)
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie has exited: nobody reaps orphans in some containers
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_temp(path: str | os.PathLike, pid: int | None) -> bool:
    """True for a temp file or folder of ours whose writer is gone: untouched since before this process
    started, and the process named in it (`pid`, None for names without one) no longer runs. The time test
    alone keeps a live writer's file; the pid test keeps the file of a writer that is only slow."""
    try:
        if os.lstat(path).st_mtime >= process_start_time():
            return False
    except FileNotFoundError:
        return False
    return pid is None or pid == os.getpid() or not pid_alive(pid)


def _temp_pattern(basename: str) -> re.Pattern:
    # ".NAME.PID.XXXXXXXX.tmp" (mkstemp's 8 random characters); ".NAME.XXXXXXXX.tmp" before the pid was added
    return re.compile(rf"\.{re.escape(basename)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files a killed writer of `path` left in its folder; return their names."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = _temp_pattern(os.path.basename(path))
    removed = []
    for entry in os.scandir(folder):
        m = pattern.fullmatch(entry.name)
        if m and entry.is_file(follow_symlinks=False) and stale_temp(entry.path, m[1] and int(m[1])):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed


def new_temp(path: str | os.PathLike) -> str:
    """A fresh empty temp file beside `path`, named so `remove_stale_temps` recognises it if its writer dies
    (a new random name: never a fixed one someone could have planted a link at). Stale ones go first."""
    remove_stale_temps(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def publish(tmp: str, path: str | os.PathLike) -> None:
    """Move a finished temp file over `path`, with the permissions a plain open() would have given it
    (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """`with atomic_output(path) as tmp:` write the file at `tmp`; it replaces `path` only when the block ends
    without an exception (nothing is left behind when it raises or is interrupted)."""
    tmp = new_temp(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _int_type(lo: int, hi: int) -> GGUFValueType:
    """The type llama.cpp's converter would pick: UINT32 unless the values need a sign or more bits."""
    if lo >= 0:
        if hi <= _U32_MAX:
            return GGUFValueType.UINT32
        if hi < 2**64:
            return GGUFValueType.UINT64
    elif _I32_MIN <= lo and hi <= _I32_MAX:
        return GGUFValueType.INT32
    elif -2**63 <= lo and hi < 2**63:
        return GGUFValueType.INT64
    raise ValueError(f"integer out of the 64-bit range: {lo if lo < -2**63 else hi}")


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples → plain Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _scalar_type(v: Any, key: str) -> GGUFValueType:
    if isinstance(v, bool):
        return GGUFValueType.BOOL
    if isinstance(v, int):
        return _int_type(v, v)
    if isinstance(v, float):
        return GGUFValueType.FLOAT32
    if isinstance(v, str):
        return GGUFValueType.STRING
    raise ValueError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF")


def infer_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(type, item type for arrays) for a plain Python value, as llama.cpp's converter would write it."""
    value = _plain(value)
    if not isinstance(value, list):
        return _scalar_type(value, key), None
    if not value:
        raise ValueError(f"metadata {key!r}: an empty list needs an explicit item type")
    if all(isinstance(v, bool) for v in value):
        return GGUFValueType.ARRAY, GGUFValueType.BOOL
    if all(isinstance(v, str) for v in value):
        return GGUFValueType.ARRAY, GGUFValueType.STRING
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return GGUFValueType.ARRAY, _int_type(min(value), max(value))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return GGUFValueType.ARRAY, GGUFValueType.FLOAT32
    raise ValueError(f"metadata {key!r}: list items must all be str, bool, or numbers (no nesting)")


def _value_type(t: GGUFValueType | str | int | None) -> GGUFValueType | None:
    if t is None or isinstance(t, GGUFValueType):
        return t
    return GGUFValueType[t.upper()] if isinstance(t, str) else GGUFValueType(t)


def _qtype(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        raise ValueError(f"unknown tensor type {qtype!r}") from None


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that also writes empty arrays (valid GGUF; gguf-py refuses them) when the item type is known."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", sub_type, 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


class GGUFOutput:
    """A GGUF file being written: `add_metadata`/`add_tensor_info` first, then `write_tensor` in the same order.

    The bytes go to a temp file in the destination's folder, renamed over `path` by `close()` (or a clean exit
    from the `with` block); on any error, KeyboardInterrupt included, the temp file is removed and `path` is
    left untouched.
    """

    def __init__(self, path: str | os.PathLike, arch: str):
        self.path = os.fspath(path)
        self.arch = arch
        self._w = _Writer(None, arch)
        self._infos: list[tuple[str, int]] = []  # (name, nbytes) in declaration order
        self._next = 0  # index in _infos of the next tensor to write
        self._tmp: str | None = None
        self._done = False

    # ------------------------------------------------------------------ declaring

    def add_metadata(self, key: str, value: Any, vtype: GGUFValueType | str | None = None,
                     sub_type: GGUFValueType | str | None = None) -> None:
        """Add one key. Types are inferred (int → UINT32 unless it needs a sign or 64 bits, float → FLOAT32,
        lists → ARRAY of the items' type) unless given; `vtype` may be ARRAY with `sub_type` the item type."""
        self._check_declaring()
        value = _plain(value)
        vtype, sub_type = _value_type(vtype), _value_type(sub_type)
        if key == "general.architecture":
            if value != self.arch:
                raise ValueError(f"general.architecture {value!r} differs from the writer's arch {self.arch!r}")
            return  # GGUFWriter writes it itself
        if key == "general.alignment":
            self._w.add_custom_alignment(int(value))  # the writer must pad to it, not just record it
            return
        if vtype is None:
            vtype, sub_type = infer_type(key, value)
        elif vtype == GGUFValueType.ARRAY and sub_type is None:
            sub_type = infer_type(key, value)[1]
        if vtype == GGUFValueType.ARRAY and not isinstance(value, list):
            raise ValueError(f"metadata {key!r}: ARRAY needs a list, got {type(value).__name__}")
        self._w.add_key_value(key, value, vtype, sub_type=sub_type)

    def add_tensor_info(self, name: str, qtype: str | int, shape: Sequence[int]) -> None:
        """Declare a tensor: llama.cpp type name ("Q4_K", "F32", ...) and numpy-order element shape."""
        self._check_declaring()
        t = _qtype(qtype)
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= 4 or any(d <= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} must have 1..4 positive dimensions")
        block_elems, block_bytes = GGML_QUANT_SIZES[t]
        if shape[-1] % block_elems:
            raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the {t.name} "
                             f"block size {block_elems}")
        nbytes = int(np.prod(shape, dtype=object)) // block_elems * block_bytes
        # With raw_dtype given and a non-uint8 dtype, GGUFWriter takes `shape` as the element shape as is.
        self._w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        self._infos.append((name, nbytes))

    def _check_declaring(self) -> None:
        if self._tmp is not None or self._done:
            raise RuntimeError("GGUFOutput: metadata and tensor infos must all come before the first write_tensor")

    # ------------------------------------------------------------------ writing

    def _start(self) -> None:
        self._tmp = new_temp(self.path)
        self._w.write_header_to_file(Path(self._tmp))
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()

    def write_tensor(self, name: str, raw: np.ndarray) -> None:
        """Write the next declared tensor's bytes (any contiguous array; its bytes are taken as they are)."""
        if self._done:
            raise RuntimeError("GGUFOutput: already closed")
        if self._next >= len(self._infos):
            raise ValueError(f"tensor {name!r} was never declared with add_tensor_info (or is written twice)")
        expected, nbytes = self._infos[self._next]
        if name != expected:
            raise ValueError(f"tensors must be written in declaration order: expected {expected!r}, got {name!r}")
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if raw.nbytes != nbytes:
            raise ValueError(f"tensor {name!r}: {raw.nbytes} bytes given, its type and shape need {nbytes}")
        if self._tmp is None:
            self._start()
        self._w.write_tensor_data(raw)
        self._next += 1

    def close(self) -> None:
        """Finish the file (every declared tensor must have been written) and move it into place."""
        if self._done:
            return
        if self._next != len(self._infos):
            missing = [n for n, _ in self._infos[self._next:]]
            raise ValueError(f"{len(missing)} declared tensors were never written (first: {missing[0]!r})")
        if self._tmp is None:
            self._start()
        self._w.close()
        publish(self._tmp, self.path)
        self._tmp, self._done = None, True

    def abort(self) -> None:
        """Give up: close and delete the temp file; the destination is left as it was."""
        self._done = True
        try:
            self._w.close()
        finally:
            if self._tmp is not None:
                try:
                    os.unlink(self._tmp)
                except FileNotFoundError:
                    pass
                self._tmp = None

    def __enter__(self) -> "GGUFOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def copy_metadata(src, out: GGUFOutput, skip: Iterable[str] = ()) -> None:
    """Copy every metadata key of an open GGUFFile into `out` with its original GGUF type, except the
    container's own keys (architecture, alignment) and those in `skip`."""
    skip = INTERNAL_KEYS | set(skip)
    for key, value in src.metadata.items():
        if key not in skip:
            vtype, sub_type = src.metadata_types[key]
            out.add_metadata(key, value, vtype, sub_type)


def write_gguf(path: str | os.PathLike, arch: str, metadata: dict[str, Any],
               tensors: Iterable[tuple[str, str, Sequence[int], np.ndarray]],
               metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] | None = None) -> None:
    """Write a whole file at once: metadata (types inferred unless in `metadata_types`) and
    `(name, qtype, numpy-order shape, raw bytes)` tensors."""
    tensors = list(tensors)
    metadata_types = metadata_types or {}
    with GGUFOutput(path, arch) as out:
        for key, value in metadata.items():
            out.add_metadata(key, value, *metadata_types.get(key, (None, None)))
        for name, qtype, shape, _ in tensors:
            out.add_tensor_info(name, qtype, shape)
        for name, _, _, raw in tensors:
            out.write_tensor(name, raw)
