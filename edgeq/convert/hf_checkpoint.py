"""A Hugging Face checkpoint folder, read without torch: config, tokenizer files, safetensors tensors.

Tensors are read one at a time from memory-mapped safetensors files (the header is parsed here, so
bfloat16 needs no torch and a truncated or corrupt file is found before anything is written).
`materialize_from_gguf` (tests and benchmarks only, needs transformers) makes a checkpoint from a GGUF file.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError


class CheckpointError(EdgeqError):
    """The source is not a usable Hugging Face checkpoint (missing file, corrupt safetensors, bad config)."""


# safetensors dtype → (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1), "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, absolute byte offset, dtype and shape (row-major, HF order)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a .safetensors header; every inconsistency is a CheckpointError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{path}: tensor {name}: {end - start} bytes for shape {shape} {dtype}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        entries[name] = TensorEntry(name, path, dtype, shape, base + start, nbytes)
    return entries


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def resolve_source(src: str | os.PathLike, quiet: bool = True) -> Path:
    """A local checkpoint folder, or a hub repo id: its snapshot in the Hugging Face cache, downloading only
    the files conversion needs (HF_HUB_OFFLINE=1: the cached snapshot only)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{src}: expected a checkpoint folder (config.json, *.safetensors, tokenizer files)")
    from edgeq import hub

    text = str(src)
    if not hub.is_repo_id(text):  # recognised by its shape: a path that is not there is never sent to the hub
        raise CheckpointError(f"{src}: no such folder")
    return hub.checkpoint(text, quiet=quiet)


class HFCheckpoint:
    """One checkpoint folder. `tensors` maps HF names to where their bytes are; `load(name)` reads one."""

    def __init__(self, src: str | os.PathLike, quiet: bool = True):
        self.path = resolve_source(src, quiet)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path}: config.json is missing")
        self.config: dict[str, Any] = _read_json(cfg_path)
        self.tensors: dict[str, TensorEntry] = self._index_tensors()
        self.tokenizer_json: dict[str, Any] | None = None
        if (self.path / "tokenizer.json").is_file():
            self.tokenizer_json = _read_json(self.path / "tokenizer.json")
        sp = self.path / "tokenizer.model"
        self.sentencepiece_model: Path | None = sp if sp.is_file() else None
        if self.tokenizer_json is None and self.sentencepiece_model is None:
            raise CheckpointError(f"{self.path}: no tokenizer (tokenizer.json or tokenizer.model)")
        self.tokenizer_config = self._optional_json("tokenizer_config.json")
        self.generation_config = self._optional_json("generation_config.json")
        self.special_tokens_map = self._optional_json("special_tokens_map.json")
        self.added_tokens = self._optional_json("added_tokens.json")
        self.chat_template = self._chat_template()

    def _optional_json(self, name: str) -> dict[str, Any]:
        p = self.path / name
        return _read_json(p) if p.is_file() else {}

    def _chat_template(self) -> str | None:
        tpl = self.tokenizer_config.get("chat_template")
        if isinstance(tpl, list):  # named templates: llama.cpp writes the default one
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if tpl is None and (self.path / "chat_template.jinja").is_file():
            tpl = (self.path / "chat_template.jinja").read_text(encoding="utf-8")
        if tpl is None and (self.path / "chat_template.json").is_file():
            tpl = _read_json(self.path / "chat_template.json").get("chat_template")
        return tpl if isinstance(tpl, str) else None

    def _index_tensors(self) -> dict[str, TensorEntry]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pth")):
                raise CheckpointError(f"{self.path}: only PyTorch .bin/.pth weights; convert them to safetensors first")
            raise CheckpointError(f"{self.path}: no *.safetensors weights")
        tensors: dict[str, TensorEntry] = {}
        for name in files:
            part = self.path / name
            if not part.is_file():
                raise CheckpointError(f"{part}: missing (listed in model.safetensors.index.json)")
            for k, e in read_safetensors_header(part).items():
                if k in tensors:
                    raise CheckpointError(f"{self.path}: tensor {k} is in two files")
                tensors[k] = e
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(f"{self.path}: tensors listed in the index are missing: {', '.join(missing[:5])}")
        return tensors

    def load(self, name: str) -> np.ndarray:
        """One tensor as a float32 array (read with a plain file read: peak memory is about one tensor)."""
        e = self.tensors[name]
        np_dtype = _DTYPES[e.dtype][0]
        with open(e.file, "rb") as f:
            f.seek(e.offset)
            a = np.fromfile(f, dtype=np.dtype(np_dtype).newbyteorder("<"), count=e.nbytes // _DTYPES[e.dtype][1])
        if a.nbytes != e.nbytes:
            raise CheckpointError(f"{e.file}: truncated while reading {name}")
        a = a.reshape(e.shape)
        if e.dtype == "BF16":  # bfloat16 is the top half of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False) if a.dtype != np.float32 else a

    def close(self) -> None:
        """Nothing is held open between reads; kept for symmetry with file-like objects."""


def materialize_from_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a float32 HF checkpoint (safetensors + tokenizer) made by transformers from a GGUF file.

    For tests and benchmarks (needs transformers and torch); runs offline. Kept out of the way once made.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them; the weights are plain fp32
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    import shutil

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
