"""Quantization recipes: which type each tensor gets for a file type like Q4_K_M.

The rules are llama.cpp's (src/llama-quant.cpp, llama_tensor_get_type) for the types edgeq writes:
the classifier (or a tied token embedding) gets Q6_K, attn_v and ffn_down get more bits in the first
and last eighth of the layers and every third layer in between (`use_more_bits`), and a tensor whose
rows are not a whole number of blocks falls back to a type whose blocks fit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf.constants import LlamaFileType

from edgeq.errors import EdgeqError
from edgeq.formats.quants import block_size

# --type → (general.file_type, base tensor type)
FILE_TYPES: dict[str, tuple[LlamaFileType, str]] = {
    "F32": (LlamaFileType.ALL_F32, "F32"),
    "F16": (LlamaFileType.MOSTLY_F16, "F16"),
    "BF16": (LlamaFileType.MOSTLY_BF16, "BF16"),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, "Q3_K"),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, "Q3_K"),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, "Q3_K"),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, "Q2_K"),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
    "Q4_1": (LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
    "IQ4_NL": (LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL"),
    "IQ4_XS": (LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS"),
}
# tensor types a user may name with --output-type / --embedding-type
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
                "IQ4_NL", "IQ4_XS")

# a 256-block type that does not fit a row → llama.cpp's tensor_type_fallback
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
_FLOAT = ("F32", "F16", "BF16")


class RecipeError(EdgeqError):
    """An unknown --type / --output-type / --embedding-type."""


def file_type(name: str) -> tuple[LlamaFileType, str]:
    try:
        return FILE_TYPES[name.upper()]
    except KeyError:
        raise RecipeError(f"unknown type {name!r} (choose from {', '.join(FILE_TYPES)})") from None


def tensor_type_arg(name: str | None) -> str | None:
    if name is None:
        return None
    if name.upper() not in TENSOR_TYPES:
        raise RecipeError(f"unknown tensor type {name!r} (choose from {', '.join(TENSOR_TYPES)})")
    return name.upper()


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def fallback(qtype: str, n_cols: int) -> str:
    """A type whose blocks fit a row of n_cols values (F16 when nothing quantized does)."""
    if n_cols % block_size(qtype) == 0:
        return qtype
    q = _FALLBACK.get(qtype, "F16")
    return q if n_cols % block_size(q) == 0 else "F16"


@dataclass
class Recipe:
    """The per-tensor type choice for one file type. `choose(name, shape)` is all the writer calls."""

    ftype: str                        # --type, e.g. "Q4_K_M"
    n_layer: int
    n_gqa: int = 1                    # n_head / n_head_kv
    tied: bool = False                # no output.weight: token_embd is also the classifier
    pure: bool = False                # one type for every matrix, no per-tensor rules
    output_type: str | None = None
    embedding_type: str | None = None
    has_imatrix: bool = False

    def __post_init__(self):
        self.file_type, self.base = file_type(self.ftype)
        self.ftype = self.ftype.upper()
        self.output_type = tensor_type_arg(self.output_type)
        self.embedding_type = tensor_type_arg(self.embedding_type)

    def choose(self, name: str, shape: tuple[int, ...]) -> str:
        """Tensor type for one tensor (shape in numpy order: rows = shape[0], row length = shape[-1])."""
        if len(shape) < 2 or not name.endswith(".weight") or "_norm.weight" in name:
            return "F32"  # norms, biases, rope factors
        n_cols = shape[-1]
        is_output = name == "output.weight"
        is_embd = name == "token_embd.weight"
        if is_embd and self.embedding_type:
            return fallback(self.embedding_type, n_cols)
        if is_output and self.output_type:
            return fallback(self.output_type, n_cols)
        if self.base in _FLOAT:
            return self.base
        q = self.base if self.pure else self._rule(name, n_cols, is_output, is_embd)
        return fallback(q, n_cols)

    def _rule(self, name: str, n_cols: int, is_output: bool, is_embd: bool) -> str:
        """llama_tensor_get_type_impl, for the file types in FILE_TYPES."""
        ft, q, n = self.ftype, self.base, self.n_layer
        i = _layer(name)
        if is_output or (self.tied and is_embd):
            if self.output_type:
                return self.output_type
            if n_cols % block_size(q) != 0:
                return "Q8_0"
            return q if q == "Q8_0" else "Q6_K"
        if is_embd:
            return q
        if "attn_v.weight" in name:
            if ft == "Q2_K":
                return "Q4_K" if self.n_gqa >= 4 else "Q3_K"
            if ft == "Q3_K_M":
                return "Q5_K" if i < 2 else "Q4_K"
            if ft == "Q3_K_L":
                return "Q5_K"
            if ft in ("IQ4_NL", "IQ4_XS") and self.n_gqa >= 4:
                return "Q5_K"
            if ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if ft == "Q4_K_S" and i < 4:
                return "Q5_K"
            return q
        if "ffn_down" in name:
            if ft == "Q2_K":
                return "Q3_K"
            if ft == "Q3_K_M":
                return "Q5_K" if i < n // 16 else "Q4_K"
            if ft == "Q3_K_L":
                return "Q5_K"
            if ft == "Q4_K_M":
                return "Q6_K" if use_more_bits(i, n) else q
            if ft in ("IQ4_NL", "IQ4_XS") and not self.has_imatrix and i < n // 8:
                return "Q5_K"
            if ft == "Q5_K_M" and use_more_bits(i, n):
                return "Q6_K"
            if ft == "Q4_K_S" and i < n // 8:
                return "Q5_K"
            if ft in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
                return "Q4_1" if ft == "Q4_0" else "Q5_1"
            return q
        if "attn_output.weight" in name:
            return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft, q)
        return q
