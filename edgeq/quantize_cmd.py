"""`edgeq quantize IN.gguf OUT.gguf --type Q4_K_M`: requantize an existing GGUF file.

Each tensor is dequantized to float32 and quantized to the type the recipe picks (mixes.py); the
metadata is copied with its original types, general.file_type set to the new type. Requantizing an
already quantized file compounds the errors (llama-quantize refuses without --allow-requantize):
start from an F32/F16/BF16 file when there is one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from edgeq.convert_cmd import OutTensor, add_recipe_arguments, check_output_path, resolve_imatrix, write_model
from edgeq.errors import EdgeqError
from edgeq.mixes import Recipe

_FLOAT = ("F32", "F16", "BF16")


def add_arguments(p) -> None:
    p.add_argument("input", help="GGUF file to requantize")
    p.add_argument("output", help="output .gguf file")
    add_recipe_arguments(p, default_type=None)


def _hparam(gf, key: str, default=None):
    v = gf.get(f"{gf.arch}.{key}", default)
    return v[0] if isinstance(v, list) else v


def quantize_file(src_path, out_path, args) -> dict:
    from gguf.constants import GGML_QUANT_VERSION, GGUFValueType, Keys

    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.gguf_write import INTERNAL_KEYS
    from edgeq.formats.quants import dequantize

    out = check_output_path(Path(out_path).expanduser())
    if args.save_imatrix:
        check_output_path(Path(args.save_imatrix).expanduser())
    with GGUFFile(src_path) as gf:
        n_layer = _hparam(gf, "block_count")
        if n_layer is None:
            raise EdgeqError(f"{src_path}: no {gf.arch}.block_count: not a model file")
        n_head = _hparam(gf, "attention.head_count", 1)
        n_head_kv = _hparam(gf, "attention.head_count_kv", n_head) or n_head
        recipe = Recipe(args.qtype, n_layer=int(n_layer), n_gqa=max(1, int(n_head) // int(n_head_kv)),
                        tied="output.weight" not in gf.tensors, pure=args.pure,
                        output_type=args.output_type, embedding_type=args.embedding_type)
        if not args.quiet:
            already = sorted({t.qtype for t in gf.tensors.values() if t.qtype not in _FLOAT})
            if already:
                print(f"note: {src_path} is already quantized ({', '.join(already)}): requantizing adds error",
                      file=sys.stderr)

        tensors = [OutTensor(t.name, tuple(t.shape),
                             lambda t=t: dequantize(t.data, t.qtype, tuple(t.shape)))
                   for t in gf.tensors.values()]
        matrices = [t.name for t in tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
        im = resolve_imatrix(args, matrices, lambda folder: Path(src_path))
        recipe.has_imatrix = im is not None

        skip = INTERNAL_KEYS | {Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
        metadata = []
        for key, value in gf.metadata.items():
            if key not in skip:
                metadata.append((key, value, *gf.metadata_types[key]))
        metadata.append((Keys.General.FILE_TYPE, int(recipe.file_type), GGUFValueType.UINT32, None))
        metadata.append((Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, GGUFValueType.UINT32, None))
        return write_model(out, gf.arch, metadata, tensors, recipe, im, quiet=args.quiet)


def main(args) -> int:
    src = Path(args.input).expanduser()
    if not src.is_file():
        raise EdgeqError(f"{args.input}: no such file")
    quantize_file(src, args.output, args)
    return 0
