#!/usr/bin/env python3
"""KV cache types on every architecture's tiny random model: perplexity and KL-divergence against the f16 cache.

    python benchmarks/kv_cache_families.py [--archs qwen2-kbias qwen3 ...] [--types f16,q8,q8t] [--ctx 256 --chunks 8]

Each tiny checkpoint comes from transformers' own config class (tests/test_convert.make_tiny: random weights, the
SmolLM2 tokenizer; Gemma 3 its small SentencePiece-style one), with its weight matrices scaled x6 (std 0.12
instead of 0.02: logits are no longer flat and attention matters); "qwen2-kbias" also gets Qwen2.5-like layer-0
k_proj biases (tests/test_kv_outliers.py). Converted by `edgeq convert --type F32`, then, per cache type,
  `edgeq perplexity TINY.gguf -f hamlet --ctx 256 --chunks 8 -ctk T -ctv T --json` (--save-logits for the first
  type, --kl-base against it for the others).
Their absolute perplexity means nothing (random weights); the change against f16 is the check. Writes a markdown
table to stdout and docs/results/kv_cache_families.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from yardstick import ROOT, run_json

sys.path.insert(0, str(ROOT / "tests"))
ARCHS = ["qwen2-kbias", "qwen2", "llama", "gemma3", "qwen3", "qwen3moe", "phi3", "granite", "smollm3"]


def edgeq(*args) -> list[str]:
    return [sys.executable, "-m", "edgeq.cli", *map(str, args)]


def make(arch: str, folder: Path) -> Path:
    import torch
    import transformers
    from test_convert import HF_CACHE, convert, make_tiny
    from test_kv_outliers import add_key_outliers

    base = arch.removesuffix("-kbias")
    ckpt = make_tiny(base, folder / arch, HF_CACHE / "SmolLM2-135M-Instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    model.save_pretrained(ckpt)
    if arch.endswith("-kbias"):
        add_key_outliers(ckpt)
    out = folder / f"{arch}.gguf"
    if convert(ckpt, out, "F32") != 0:
        raise SystemExit(f"convert failed: {arch}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--types", default="f16,q8,q8t", help="K[/V] cache types; the first is the reference")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    a = ap.parse_args()
    from edgeq.assets import text_path

    hamlet = text_path("hamlet")
    types = [(t.partition("/")[0], t.partition("/")[2] or t.partition("/")[0]) for t in a.types.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in a.archs:
            path = make(arch, tmp)
            r = {"arch": arch, "ppl": {}, "kl": {}, "same_top": {}}
            for i, (tk, tv) in enumerate(types):
                name = f"{tk}/{tv}"
                base = ["--save-logits", tmp / f"{arch}.logits"] if i == 0 else ["--kl-base", tmp / f"{arch}.logits"]
                res = run_json(edgeq("perplexity", path, "-f", hamlet, "--ctx", a.ctx, "--chunks", a.chunks,
                                     "-ctk", tk, "-ctv", tv, "-t", 2, "--json", *base))
                r["ppl"][name] = res["ppl"]
                if i:
                    r["kl"][name], r["same_top"][name] = res["kl"], res["same_top"]
                print(f"{arch} {name}: PPL {res['ppl']:.4f} KL {res.get('kl', 0):.6f}", file=sys.stderr)
            results.append(r)

    names = [f"{tk}/{tv}" for tk, tv in types]
    ref = names[0]
    lines = [f"Tiny random models (weights x6, `python benchmarks/kv_cache_families.py`): `edgeq perplexity TINY.gguf "
             f"-f hamlet --ctx {a.ctx} --chunks {a.chunks} -ctk K -ctv V`, ΔPPL and KL-divergence against the "
             f"{ref} cache.", "",
             "| model | " + " | ".join(f"PPL {n}" for n in names) + " | "
             + " | ".join(f"Δ {n} | KL {n}" for n in names[1:]) + " |",
             "|---|" + "---|" * (len(names) + 2 * (len(names) - 1))]
    for r in results:
        p = r["ppl"]
        cells = [f"{p[n]:.3f}" for n in names]
        cells += [f"{100 * (p[n] / p[ref] - 1):+.3f}% | {r['kl'][n]:.1e}" for n in names[1:]]
        lines.append(f"| {r['arch']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache_families.md").write_text(text + "\n")
    (out / "kv_cache_families.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
