#!/usr/bin/env python3
"""edgeq's perplexity with every matrix product's input rounded the way llama.cpp's CPU kernels round it.

llama.cpp multiplies a quantized matrix by converting the activations to the weight type's `vec_dot_type`
first (ggml-cpu's type traits): Q8_K, one float scale per 256 values, for the k-quants and IQ4_XS; Q8_0 / Q8_1,
one fp16 scale per 32, for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL; fp16 for F16 matrices. edgeq rounds them to int8
per 32 values for every type (cpu_kernels/linear.py), and keeps them float32 in prefill below the int8 GEMM's
size (cpu_kernels/gemm_i8.INT8_MIN_WEIGHTS). On a quantized file the two evaluators therefore differ by more
than their kernels' float sums: this script puts llama.cpp's rounding into edgeq's forward pass (the
calibration observer hook, which sees each product's input before the product reads it) to show how much of a
gap between `llama-perplexity` and `edgeq perplexity` on the same file is that rounding and not the file.

    python benchmarks/llamacpp_rounding.py FILE.gguf [--text hamlet] [--chunks 2]

Prints one JSON line: the PPL with llama.cpp's rounding and with edgeq's own (f16 KV cache, as
llama-perplexity's default), over the first `chunks` windows of 512 (llama-perplexity's scoring).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref, decoded: per 256 values iscale = -127 / (the value of largest |x|),
    q = min(127, nearest(iscale · x)), x ≈ q / iscale (the scale is a float32)."""
    T, n = x.shape
    b = x.reshape(T, n // 256, 256)
    mx = np.take_along_axis(b, np.abs(b).argmax(axis=2)[..., None], axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0)).astype(np.float32)
        q = np.minimum(np.rint(iscale * b), 127)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return (q * d).reshape(T, n).astype(np.float32)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref (and Q8_1's values), decoded: per 32 values d = max|x| / 127,
    q = roundf(x / d), d stored as fp16."""
    T, n = x.shape
    b = x.reshape(T, n // 32, 32)
    d = (np.abs(b).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    safe = np.where(d > 0, d, np.float32(1))
    q = np.where(d > 0, np.trunc(b / safe + np.copysign(np.float32(0.5), b)), 0)   # roundf: half away from 0
    return (q * d.astype(np.float16).astype(np.float32)).reshape(T, n).astype(np.float32)


def round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


# weight type → how llama.cpp's CPU backend rounds that product's input (ggml-cpu.c type_traits_cpu)
VEC_DOT_ROUNDING = {**dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"), round_q8_k),
                    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"), round_q8_0),
                    "F16": round_f16}


class _Observed:
    """The model as runtime/perplexity sees it (tokenizer, logits), each product's input shown to `observer`."""

    def __init__(self, model, observer):
        self.model, self.tokenizer, self.observer = model, model.tokenizer, observer

    def logits(self, token_ids):
        return self.model.logits(token_ids, observer=self.observer)


def perplexities(path: str, text: str, chunks: int) -> dict:
    """{'edgeq': edgeq's own PPL, 'llamacpp_rounding': with llama.cpp's rounding} over `chunks` windows of 512,
    scored as `edgeq perplexity` scores them (runtime/perplexity.py)."""
    import edgeq
    from edgeq.cpu_kernels import gemm_i8
    from edgeq.runtime.perplexity import _perplexity, text_tokens

    def load():
        return edgeq.load(path, n_ctx=512, threads=2, cache_type_k="f16", cache_type_v="f16")

    model = load()
    tokens = text_tokens(model, text)
    own = _perplexity(model, tokens, 512, chunks, None, None, None).ppl
    del model
    # the rounded inputs go to float products: edgeq's int8 prefill GEMM would round them again per 32 values
    gemm_i8.INT8_MIN_WEIGHTS = 1 << 62
    model = load()
    types = {name: str(t.qtype) for name, t in model.gguf.tensors.items()}

    def llamacpp_rounding(name: str, x: np.ndarray) -> None:
        rounding = VEC_DOT_ROUNDING.get(types.get(name, ""))
        if rounding is not None:
            x[...] = rounding(x)   # in place: the product reads x after the observer (models/base.Linear)

    rounded = _perplexity(_Observed(model, llamacpp_rounding), tokens, 512, chunks, None, None, None).ppl
    return {"edgeq": own, "llamacpp_rounding": rounded, "chunks": chunks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", default="hamlet", help="a text file, or a bundled text's name")
    ap.add_argument("--chunks", type=int, default=2)
    args = ap.parse_args()
    from pathlib import Path

    from edgeq.assets import text_path

    path = Path(args.text) if Path(args.text).is_file() else text_path(args.text)
    print(json.dumps(perplexities(args.model, path.read_text(encoding="utf-8", errors="replace"), args.chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
