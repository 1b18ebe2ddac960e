"""`edgeq convert SRC -o OUT.gguf --type Q4_K_M`: a Hugging Face checkpoint → one GGUF file llama.cpp runs.

    edgeq convert ~/ckpt/SmolLM2-135M-Instruct -o smollm2-q4_k_m.gguf --type Q4_K_M
    edgeq convert HuggingFaceTB/SmolLM2-135M-Instruct -o s.gguf --type Q4_K_M --calibrate macbeth

Everything about the source is checked first (config, tokenizer, every tensor's name and shape, the
safetensors files' integrity); then tensors stream one at a time into a temp file renamed into place at
the end. `--calibrate TEXT` first writes a temporary F16 file, runs edgeq's own forward pass over the text
and collects the importance matrix from the inputs of every matrix product (edgeq/convert/).
"""
from __future__ import annotations

from edgeq.cli.common import add_recipe_arguments


def add_arguments(p) -> None:
    p.add_argument("src", help="Hugging Face checkpoint folder, or a hub repo id OWNER/REPO (downloads config, tokenizer and "
                                     "safetensors into the HF cache; HF_HUB_OFFLINE=1: the cache only)")
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    add_recipe_arguments(p, default_type="F16")


def main(args) -> int:
    from edgeq.convert import QuantOptions, convert

    convert(args.src, args.output, options=QuantOptions.of(args))
    return 0
