"""`edgeq quantize IN.gguf OUT.gguf --type Q4_K_M`: requantize an existing GGUF file.

Each tensor is dequantized to float32 and quantized to the type the recipe picks (convert/mixes.py); the
metadata is copied with its original types, general.file_type set to the new type. Requantizing an
already quantized file compounds the errors (llama-quantize refuses without --allow-requantize):
start from an F32/F16/BF16 file when there is one.
"""
from __future__ import annotations

from edgeq.cli.common import add_recipe_arguments


def add_arguments(p) -> None:
    p.add_argument("input", help="GGUF file to requantize")
    p.add_argument("output", help="output .gguf file")
    add_recipe_arguments(p, default_type=None)


def main(args) -> int:
    from edgeq.convert import QuantOptions, quantize_file

    quantize_file(args.input, args.output, options=QuantOptions.of(args))
    return 0
