#!/usr/bin/env python3
"""GGUF files with the exact shapes, tensor types and vocabulary size of real models, and random weights.

Real weights of these sizes cannot be downloaded here and speed does not depend on the values. Each file is
made the way a user makes one: a Hugging Face checkpoint (config of the real model, random bfloat16 weights
scaled like trained ones, a synthesised byte-level BPE tokenizer padded to the real vocabulary size) goes
through our converter (`edgeq.convert.convert`). Files are cached in ~/.cache/edgeq-bench/ (EDGEQ_BENCH_DIR).

    python benchmarks/make_size_models.py [NAME ...]      # default: all; prints one path per line
    python benchmarks/make_size_models.py --list

Memory: the checkpoint is written one ~1 GB shard at a time (tensor names and shapes from the transformers
model built on the meta device, values from torch.randn) and the converter streams tensors, so the peak
RSS stays near one shard plus one tensor drawn in float32 (5.0 GB measured for all five files, the 3B last).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

CACHE = Path(os.environ.get("EDGEQ_BENCH_DIR", Path.home() / ".cache" / "edgeq-bench"))

# the real models' config.json values (hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tying, rope)
CONFIGS = {
    "qwen2.5-0.5b": dict(
        cls="Qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645),
    "qwen3-1.7b": dict(
        cls="Qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=40960, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645),
    "llama3.2-3b": dict(
        cls="Llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009),
}
# name → (config, file type); the 3B last: it is the biggest to build
MODELS = {
    "qwen2.5-0.5b-q4_k_m": ("qwen2.5-0.5b", "Q4_K_M"),
    "qwen2.5-0.5b-q8_0": ("qwen2.5-0.5b", "Q8_0"),
    "qwen3-1.7b-q4_k_m": ("qwen3-1.7b", "Q4_K_M"),
    "qwen3-1.7b-q8_0": ("qwen3-1.7b", "Q8_0"),
    "qwen3-1.7b-f16": ("qwen3-1.7b", "F16"),   # the input of calibrated quantization at real size
    "llama3.2-3b-q4_k_m": ("llama3.2-3b", "Q4_K_M"),
}

# the real tokenizers: regular tokens, then special tokens up to the embedding rows (the converter pads the rest)
_QWEN_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TOKENIZERS = {
    "Qwen": dict(regex=_QWEN_RE, n_regular=151643, template=_CHATML, bos="<|endoftext|>", eos="<|im_end|>",
                 special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)]),
    "Llama": dict(regex=_LLAMA3_RE, n_regular=128000, template=_LLAMA3_TEMPLATE, bos="<|begin_of_text|>",
                  eos="<|eot_id|>",
                  special=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]),
}


def synth_tokenizer(kind: str, out: Path, seed: int = 0) -> None:
    """A byte-level BPE with the real pre-tokenizer, trained on Hamlet, then grown to the real number of
    regular tokens by merging random pairs of existing tokens (each new token gets its merge, as in a real
    vocabulary), then the special tokens; tokenizer.json + tokenizer_config.json in `out`."""
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgeq.assets import text_path

    spec = TOKENIZERS["Llama" if kind == "Llama" else "Qwen"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(text_path("hamlet"))], trainer)
    tj = json.loads(tok.to_str())
    vocab: dict[str, int] = tj["model"]["vocab"]
    merges: list = tj["model"]["merges"]
    pieces = sorted(vocab, key=vocab.get)
    rng = random.Random(seed)
    while len(vocab) < spec["n_regular"]:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(vocab)
        pieces.append(a + b)
        merges.append([a, b])
    tj["added_tokens"] = [{"id": spec["n_regular"] + i, "content": s, "single_word": False, "lstrip": False,
                           "rstrip": False, "normalized": False, "special": True}
                          for i, s in enumerate(spec["special"])]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": spec["bos"], "eos_token": spec["eos"], "add_bos_token": kind == "Llama",
        "chat_template": spec["template"], "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")


def random_checkpoint(config_name: str, out: Path, seed: int = 0, shard_bytes: int = 1 << 30) -> None:
    """config.json of the real model and random bf16 safetensors shards: std 0.02 matrices, unit norms, small
    biases (like trained weights: activations stay sane through every layer)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    kw = dict(CONFIGS[config_name])
    cls = kw.pop("cls")
    config = getattr(transformers, f"{cls}Config")(**kw, torch_dtype="bfloat16")
    config.architectures = [f"{cls}ForCausalLM"]
    with torch.device("meta"):  # names and shapes only: no memory, no init
        model = getattr(transformers, f"{cls}ForCausalLM")(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map, n_shard, size = {}, 0, 0

    def flush() -> None:
        nonlocal shard, n_shard, size
        n_shard += 1
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(out)


def make(name: str, quiet: bool = False) -> Path:
    """The cached GGUF file for `name` (see MODELS), built if missing."""
    from edgeq.convert import QuantOptions, convert

    config_name, qtype = MODELS[name]
    path = CACHE / f"{name}.gguf"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    ckpt = CACHE / f"{config_name}-hf"
    if not (ckpt / "config.json").is_file():
        tmp = CACHE / f"{config_name}-hf.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if not quiet:
            print(f"writing a random {config_name} checkpoint in {ckpt}", file=sys.stderr)
        synth_tokenizer(CONFIGS[config_name]["cls"], tmp)
        random_checkpoint(config_name, tmp)
        tmp.rename(ckpt)
    convert(ckpt, path, options=QuantOptions(qtype=qtype, quiet=quiet))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--list", action="store_true", help="print the names and exit")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args()
    if a.list:
        print("\n".join(MODELS))
        return 0
    unknown = [n for n in a.names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    for name in a.names or MODELS:
        print(make(name, a.quiet), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
