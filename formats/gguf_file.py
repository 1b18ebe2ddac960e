"""GGUF container reader: memory-mapped, and validated field by field before anything is handed out.

The parser is our own (not `gguf.GGUFReader`): every length and count read from the file is checked against
the bytes that remain before anything is allocated, so a malformed or hostile file fails fast with one
`FormatError` instead of a crash, a hang or a huge allocation. The format itself (value types, tensor type
ids, block sizes) comes from `gguf.constants`, described there once as data.

Layout (little-endian, v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 kv count; kv pairs
(string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 ne[n_dims] innermost first,
u32 ggml type, u64 offset relative to the data section); padding to `general.alignment`; tensor data.

A missing file raises FileNotFoundError (the CLI prints it as "no such file"); everything else is FormatError.
"""
from __future__ import annotations

import dataclasses
import mmap
import threading
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from edgeq.formats.errors import FormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Caps on what one field may claim, far above any real file, so a flipped byte cannot make a huge string:
MAX_KEY_BYTES = 65535           # the GGUF spec's limit for a key
MAX_NAME_BYTES = 1024           # tensor names (llama.cpp allows 63)
MAX_STRING_BYTES = 64 << 20     # one string value or array item (chat templates are a few KB)
MAX_STRING_ITEMS = 1 << 24      # items of a string array (vocabularies have at most a few 100k tokens)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Fixed-size value types: numpy dtype (little-endian) of one item.
_SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + c) for t, c in zip(_SCALAR_DTYPES, "BbHhIifBQqd")}
assert all(st.size == _SCALAR_DTYPES[t].itemsize for t, st in _SCALAR_STRUCTS.items())

# Smallest possible encodings, used to bound counts by the bytes left before reading anything.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_READ_CHUNK = 64 << 20  # bytes per read() of read_into_memory (a stop asked for is seen between two)
_READ_THREADS = 4       # at most, for read_into_memory
_HUGE_PAGE = 2 << 20


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of a GGUF file: where its bytes are and how to read them.

    `shape` is in numpy order (GGUF stores ne0, the innermost dimension, first), e.g. (n_out, n_in) for a
    matrix. `data` is a read-only zero-copy uint8 view of exactly `nbytes` bytes of the memory-mapped file.
    `offset` is the absolute position of those bytes in the file.
    """

    name: str
    qtype: str  # llama.cpp's type name: "F32", "Q4_K", ...
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)
    offset: int
    n_elements: int
    nbytes: int
    type_id: int  # the ggml type id stored in the file


def short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for error messages about values a file chose."""
    if isinstance(value, np.ndarray):
        return f"<array of {value.size} {value.dtype}>"
    text = repr(value[:limit + 1] if isinstance(value, (str, bytes, list)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Parser:
    """Reads the header fields in order, every read checked against the end of the file."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, {self.size - self.pos} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.fail(f"{what}: length {n} is over the limit of {limit} bytes")
        self.need(n, what)
        s = str(self.buf[self.pos:self.pos + n], "utf-8", "replace")
        self.pos += n
        return s

    def value_type(self, what: str) -> GGUFValueType:
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {t}") from None

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        st = _SCALAR_STRUCTS[vtype]
        self.need(st.size, what)
        v = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return bool(v) if vtype == GGUFValueType.BOOL else v

    def array(self, what: str) -> tuple[GGUFValueType, list | np.ndarray]:
        """A string array as a list of str; a numeric one as a read-only numpy view of the mapping (a Python
        list would take 8-30 times the file's bytes)."""
        sub = self.value_type(f"{what} item type")
        if sub == GGUFValueType.ARRAY:
            raise self.fail(f"{what}: arrays of arrays are not supported")
        count = self.u64(f"{what} count")
        if sub == GGUFValueType.STRING:
            if count > (self.size - self.pos) // 8:
                raise self.fail(f"{what}: {count} strings cannot fit in the {self.size - self.pos} bytes left")
            if count > MAX_STRING_ITEMS:
                raise self.fail(f"{what}: {count} strings is over the limit of {MAX_STRING_ITEMS}")
            return sub, self._strings(count, what)
        dtype = _SCALAR_DTYPES[sub]
        self.need(count * dtype.itemsize, f"{what} ({count} items)")
        raw = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        if sub == GGUFValueType.BOOL:
            # a view as bool only where every byte is 0 or 1; otherwise a 1-byte-per-item copy
            raw = raw.view(np.bool_) if raw.max(initial=0) <= 1 else raw != 0
        return sub, raw

    def _strings(self, count: int, what: str) -> list[str]:
        # The hot loop of opening a file (262144 tokens for gemma3): kept to locals and one check per item.
        buf, pos, end = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out = [""] * count
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
            n = unpack(buf, pos)[0]
            pos += 8
            if n > MAX_STRING_BYTES:
                self.pos = pos
                raise self.fail(f"{what}[{i}]: length {n} is over the limit of {MAX_STRING_BYTES} bytes")
            if n > end - pos:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            out[i] = str(buf[pos:pos + n], "utf-8", "replace")
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file, memory-mapped and validated on open.

    `metadata` holds plain Python values (str, int, float, bool), lists of str for string arrays and read-only
    numpy arrays (views of the mapping) for numeric ones; `metadata_types` the GGUF
    value type of each key as `(type, item_type)` (item_type is None unless type is ARRAY), so a writer can
    copy keys unchanged. `tensors` maps names to `TensorInfo`s (zero-copy views) in file order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:  # FileNotFoundError / IsADirectoryError pass through
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 4 or head[:4] != MAGIC:
                raise FormatError(f"{self.path}: not a GGUF file (starts with {head[:4]!r}, expected {MAGIC!r})")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        self._anon = None  # the tensor data read into memory (read_into_memory), or None: views of _mm
        self._reader = None  # a read_into_memory under way: (threads, memory, stop event, their errors)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ parsing

    def _parse(self) -> None:
        p = _Parser(self._mm, self.file_size, self.path)
        p.pos = 4
        version = p.u32("version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in VERSIONS:
                raise p.fail("big-endian GGUF files are not supported")
            raise p.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata count")
        left = self.file_size - p.pos
        if n_kv > left // _MIN_KV_BYTES or n_tensors > left // _MIN_TENSOR_INFO_BYTES \
                or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise p.fail(f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in a {self.file_size}-byte file")

        for i in range(n_kv):
            key = p.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if key in self.metadata:
                raise p.fail(f"duplicate metadata key {short(key)}")
            vtype = p.value_type(f"type of metadata {short(key)}")
            if vtype == GGUFValueType.ARRAY:
                sub, value = p.array(f"metadata {short(key)}")
            else:
                sub, value = None, p.scalar(vtype, f"metadata {short(key)}")
            self.metadata[key] = value
            self.metadata_types[key] = (vtype, sub)

        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise p.fail(f"general.alignment must be a power of two, got {short(alignment)}")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = p.string(f"name of tensor #{i}", MAX_NAME_BYTES)
            what = f"tensor {short(name)}"
            n_dims = p.u32(f"{what} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise p.fail(f"{what}: n_dims {n_dims} not in 1..{MAX_DIMS}")
            ne = [p.u64(f"{what} dims") for _ in range(n_dims)]
            type_id = p.u32(f"{what} type")
            offset = p.u64(f"{what} offset")
            infos.append((name, ne, type_id, offset))

        data_start = -(-p.pos // alignment) * alignment
        self.data_offset = data_start
        checked, seen = [], set()
        for name, ne, type_id, offset in infos:
            what = f"tensor {short(name)}"
            if name in seen:
                raise p.fail(f"duplicate tensor name {short(name)}")
            if type_id not in _TYPES:
                raise p.fail(f"{what}: unknown ggml type id {type_id}")
            qtype, block_elems, block_bytes = _TYPES[type_id]
            if any(d <= 0 for d in ne):
                raise p.fail(f"{what}: dimensions {ne} must be positive")
            if ne[0] % block_elems:
                raise p.fail(f"{what}: row length {ne[0]} is not a multiple of the {qtype} block size {block_elems}")
            n_elements = 1
            for d in ne:
                n_elements *= d
            nbytes = n_elements // block_elems * block_bytes
            if offset % alignment:
                raise p.fail(f"{what}: data offset {offset} is not a multiple of the alignment {alignment}")
            start = data_start + offset
            if nbytes > self.file_size or start + nbytes > self.file_size:
                raise p.fail(f"{what}: data [{start}, {start + nbytes}) runs past the end of the file "
                             f"({self.file_size} bytes)")
            seen.add(name)
            checked.append((name, qtype, tuple(reversed(ne)), start, n_elements, nbytes, type_id))
        spans = sorted((start, nbytes, name) for name, _, _, start, _, nbytes, _ in checked)
        for (o1, n1, a), (o2, _, b) in zip(spans, spans[1:]):
            if o1 + n1 > o2:
                raise p.fail(f"tensors {short(a)} and {short(b)} overlap")

        # Only now, with everything checked, hand out views of the mapping.
        u8 = np.frombuffer(self._mm, dtype=np.uint8) if checked else None
        for name, qtype, shape, start, n_elements, nbytes, type_id in checked:
            self.tensors[name] = TensorInfo(name=name, qtype=qtype, shape=shape, data=u8[start:start + nbytes],
                                            offset=start, n_elements=n_elements, nbytes=nbytes, type_id=type_id)

    # ------------------------------------------------------------------ access

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{self.path}: metadata key general.architecture is missing")
        return arch

    def release_pages(self) -> None:
        """Unmap the file's pages that this process has read (they stay in the page cache, and come back
        at the next read without disk I/O): a pass over every tensor of a multi-GB file then holds only
        the pages it is using in its RSS, not the whole file. No-op where madvise is missing."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def read_into_memory(self, background: bool = False) -> None:
        """Read the tensor data into private anonymous memory, asking for transparent huge pages, and point every
        tensor's `data` there (read-only views, as before); the file mapping then serves only the metadata.
        background=True: the read runs in a thread and the views move at `finish_read()` (until then they stay on
        the mapping: the same bytes), so that it overlaps other work of a load (the tokenizer's build).

        Why: the decode kernels stream every weight once per token. On the 4 KiB pages of a file mapping each
        page costs a TLB miss and stops the hardware prefetchers at its edge; on 2 MiB pages a decode step of
        the Qwen3-1.7B Q4_K_M shape took 60-62 ms instead of 64-68 (F16: 154 instead of 194), 2 threads on an
        Intel Xeon (benchmarks/decode_profile.py). read() copies from the page cache without mapping the file
        pages into this process: the resident size stays one copy of the weights. Costs the copy at load
        (~0.3 s per GB where free memory is at hand) and the page cache sharing between processes."""
        n = self.file_size - self.data_offset
        if self._mm is None or not self.tensors or n <= 0 or self._anon is not None or self._reader is not None:
            return
        if hasattr(mmap, "MAP_ANONYMOUS"):
            anon = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP serves it
        else:  # Windows: anonymous memory without flags
            anon = mmap.mmap(-1, n)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            anon.madvise(mmap.MADV_HUGEPAGE)
        stop, failure = threading.Event(), []
        # a few threads, each its own span (2 MiB-aligned) and file descriptor: the page faults of fresh memory
        # are the slow part, and run in parallel (3.45 GB: 0.5-0.8 s with 2 threads, 0.9-2.9 s with one, 2 cores)
        pread = hasattr(os, "preadv")
        parts = max(1, min(_READ_THREADS, os.cpu_count() or 1, n // _READ_CHUNK)) if pread else 1
        bounds = [n * i // parts // _HUGE_PAGE * _HUGE_PAGE for i in range(parts)] + [n]

        def read(lo: int, hi: int) -> None:
            view = memoryview(anon)
            try:
                with open(self.path, "rb") as f:
                    got = lo
                    while got < hi and not stop.is_set():
                        end = min(hi, got + _READ_CHUNK)
                        if pread:
                            k = os.preadv(f.fileno(), [view[got:end]], self.data_offset + got)
                        else:  # no preadv (Windows): one thread, sequential reads
                            f.seek(self.data_offset + got)
                            k = f.readinto(view[got:end])
                        if not k:
                            raise FormatError(f"{self.path}: the file shrank while it was read ({got} of {n} data "
                                              f"bytes)")
                        got += k
            except (OSError, FormatError) as e:
                failure.append(e)
            finally:
                view.release()

        threads = [threading.Thread(target=read, args=(bounds[i], bounds[i + 1]), name="edgeq-read-weights",
                                    daemon=True) for i in range(parts)]
        self._reader = (threads, anon, stop, failure)
        for t in threads:
            t.start()
        if not background:
            self.finish_read()

    def finish_read(self) -> None:
        """Wait for a background read_into_memory and move the tensor views onto its memory; its error (an OSError,
        a FormatError) raises here. Nothing to do without one."""
        if self._reader is None:
            return
        threads, anon, stop, failure = self._reader
        for t in threads:
            t.join()
        self._reader = None
        if stop.is_set() or failure:
            anon.close()
            if failure:
                raise failure[0]
            return
        u8 = np.frombuffer(anon, dtype=np.uint8)
        u8.flags.writeable = False
        self._anon = anon
        for name, t in self.tensors.items():
            o = t.offset - self.data_offset
            self.tensors[name] = dataclasses.replace(t, data=u8[o:o + t.nbytes])

    @property
    def in_memory(self) -> bool:
        """Whether the tensor data was read into memory (read_into_memory) rather than mapped."""
        return self._anon is not None

    def close(self) -> None:
        """Drop the tensor views and unmap; views still held elsewhere keep the mapping alive until freed."""
        self.tensors = {}
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader[2].set()  # a background read stops at its next chunk; its memory goes with its thread
        for attr in ("_mm", "_anon"):
            mm = getattr(self, attr, None)
            setattr(self, attr, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # someone still holds a view: the mapping goes when it does
                    pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, version={getattr(self, 'version', '?')}, tensors={len(self.tensors)})"


# ggml type id -> (llama.cpp name, elements per block, bytes per block)
_TYPES = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
