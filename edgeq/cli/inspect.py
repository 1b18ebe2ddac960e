"""`edgeq inspect FILE [--json] [--tensors]`: what a GGUF file holds, without loading the model."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from edgeq.text import safe_line

# json.dumps escapes C0 controls itself; with ensure_ascii=False it leaves DEL, C1 controls and lone
# surrogates raw, so those become \u escapes too (same JSON value, nothing a terminal would obey).
_JSON_RAW = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0), *range(0xD800, 0xE000))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a GGUF file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor (name, type, shape)")


def summary(gf) -> dict[str, Any]:
    """The facts `inspect` shows, as a JSON-ready dict."""
    arch = gf.get("general.architecture")
    hp = (lambda key: _plain(gf.get(f"{arch}.{key}"))) if arch else (lambda key: None)
    n_params = sum(t.n_elements for t in gf.tensors.values())
    data_bytes = sum(t.nbytes for t in gf.tensors.values())
    tokens = gf.get("tokenizer.ggml.tokens")
    emb = gf.tensors.get("token_embd.weight")
    vocab = len(tokens) if isinstance(tokens, list) and tokens else (emb.shape[0] if emb is not None else hp("vocab_size"))
    heads = hp("attention.head_count")
    heads_kv = hp("attention.head_count_kv")
    by_type = Counter(t.qtype for t in gf.tensors.values())
    return {
        "file": gf.path,
        "file_size": gf.file_size,
        "gguf_version": gf.version,
        "architecture": arch,
        "name": _plain(gf.get("general.name")),
        "parameters": n_params,
        "bits_per_weight": round(8 * data_bytes / n_params, 3) if n_params else None,
        "tensor_count": len(gf.tensors),
        "tensor_types": dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        "context_length": hp("context_length"),
        "embedding_length": hp("embedding_length"),
        "layers": hp("block_count"),
        "heads": heads,
        "heads_kv": heads_kv,
        "vocab_size": vocab,
        "tokenizer": _plain(gf.get("tokenizer.ggml.model")),
        "tokenizer_pre": _plain(gf.get("tokenizer.ggml.pre")),
        "chat_template": gf.get("tokenizer.chat_template") is not None,
        "metadata_keys": len(gf.metadata),
    }


def _plain(v: Any) -> Any:
    """Numeric metadata arrays are numpy views: short ones as lists (per-layer head counts), long ones summed up."""
    if hasattr(v, "dtype") and getattr(v, "ndim", 0) == 1:
        return v.tolist() if v.size <= 64 else f"<{v.size} values>"
    return v


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit} ({n:,})"
    return f"{n:,}"


def _table(s: dict[str, Any]) -> list[str]:
    def opt(v):
        return "-" if v is None else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))

    heads = opt(s["heads"]) if s["heads_kv"] in (None, s["heads"]) else f"{opt(s['heads'])} ({opt(s['heads_kv'])} kv)"
    tok = opt(s["tokenizer"]) + (f" / {s['tokenizer_pre']}" if s["tokenizer_pre"] else "")
    rows = [
        ("file", s["file"]),
        ("architecture", opt(s["architecture"])),
        ("name", opt(s["name"])),
        ("parameters", _count(s["parameters"])),
        ("file size", f"{_size(s['file_size'])} ({s['file_size']:,} bytes, GGUF v{s['gguf_version']})"),
        ("bits/weight", opt(s["bits_per_weight"])),
        ("tensors", f"{s['tensor_count']}: " + ", ".join(f"{n} {t}" for t, n in s["tensor_types"].items())),
        ("context length", opt(s["context_length"])),
        ("embedding length", opt(s["embedding_length"])),
        ("layers", opt(s["layers"])),
        ("heads", heads),
        ("vocab size", opt(s["vocab_size"])),
        ("tokenizer", tok),
        ("chat template", "yes" if s["chat_template"] else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {safe_line(str(v), 1000)}" for k, v in rows]  # metadata and names are untrusted


def main(args: argparse.Namespace) -> int:
    from edgeq.file_checks import check_input_file
    from edgeq.formats.gguf_file import GGUFFile

    check_input_file(args.file, "GGUF file")  # a FIFO would hang the reader, /dev/zero fill memory
    with GGUFFile(args.file) as gf:
        s = summary(gf)
        tensors = [{"name": t.name, "type": t.qtype, "shape": list(t.shape)} for t in gf.tensors.values()]
    out = sys.stdout
    if args.json:
        if args.tensors:
            s["tensors"] = tensors
        out.write(json.dumps(s, ensure_ascii=False).translate(_JSON_RAW) + "\n")
        return 0
    out.write("\n".join(_table(s)) + "\n")
    if args.tensors:
        names = [safe_line(t["name"]) for t in tensors]
        width = max(map(len, names), default=0)
        out.write("\n")
        for name, t in zip(names, tensors):
            shape = " x ".join(str(d) for d in t["shape"])
            out.write(f"{name:<{width}}  {t['type']:<7} {shape}\n")
    return 0
