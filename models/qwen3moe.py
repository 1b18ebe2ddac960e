"""Qwen3-MoE (30B-A3B...): Qwen3's attention, and in every layer a mixture of SwiGLU experts, a few chosen per
token by a softmax router; the experts are stacked quantized tensors (ffn_*_exps), read one slab per expert."""
from __future__ import annotations

import re

from edgeq.errors import ModelError
from edgeq.models import llama, qwen3
from edgeq.models.base import MAX_FF, hparam
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)

MAX_EXPERTS = 1024

_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj$")


def _n_experts(raw: dict) -> int:
    """Qwen's config.json says num_experts; transformers 5 writes num_local_experts."""
    return raw.get("num_experts", raw.get("num_local_experts"))


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "qwen3moe", **overrides) -> "Config":
        n_expert = hparam(gf, arch, "expert_count", cast=int, lo=1, hi=MAX_EXPERTS)
        opts = dict(rope_neox=True, qk_norm=True, n_expert=n_expert,
                    n_expert_used=hparam(gf, arch, "expert_used_count", cast=int, lo=1, hi=n_expert),
                    n_ff_expert=hparam(gf, arch, "expert_feed_forward_length", cast=int, lo=1, hi=MAX_FF))
        return super().from_gguf(gf, arch, **{**opts, **overrides})


class HFSpec(qwen3.HFSpec):
    """llama.cpp's Qwen3MoeModel: each expert's matrices stacked into ffn_{gate,up,down}_exps, the router as
    ffn_gate_inp; its graph always renormalizes the chosen experts' weights."""

    arch = "qwen3moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_types = ("qwen3_moe",)
    layer_tensors = {k: v for k, v in qwen3.HFSpec.layer_tensors.items() if not k.startswith("mlp.")} | {
        "mlp.gate": "ffn_gate_inp"}

    def stacked_tensor(self, hf_key):
        m = _EXPERT.match(hf_key)
        return (f"ffn_{m.group(2)}_exps", int(m.group(1))) if m else None

    def check(self, hp, where):
        raw = {**hp.raw, "num_experts": _n_experts(hp.raw)}
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if not isinstance(raw.get(key), int) or not 0 < raw[key] <= (MAX_EXPERTS if "experts" in key else MAX_FF):
                raise ModelError(f"{where}: qwen3moe needs a positive whole {key} in config.json")
        if not raw.get("norm_topk_prob", False):
            raise ModelError(f"{where}: qwen3moe without norm_topk_prob is not supported (llama.cpp renormalizes)")
        if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
            raise ModelError(f"{where}: qwen3moe with dense layers (mlp_only_layers, decoder_sparse_step) "
                             "is not supported")

    def metadata(self, hp):
        r = hp.raw
        return [("expert_used_count", int(r["num_experts_per_tok"]), "u32"), ("expert_count", _n_experts(r), "u32"),
                ("expert_feed_forward_length", int(r["moe_intermediate_size"]), "u32")]

    def layer_shapes(self, hp):
        d, ne, fe = hp.n_embd, _n_experts(hp.raw), int(hp.raw["moe_intermediate_size"])
        dense = {k: v for k, v in super().layer_shapes(hp).items() if not k.startswith(("ffn_gate", "ffn_up", "ffn_down"))}
        return {**dense, "ffn_gate_inp.weight": (ne, d), "ffn_gate_exps.weight": (ne, fe, d),
                "ffn_up_exps.weight": (ne, fe, d), "ffn_down_exps.weight": (ne, d, fe)}


HF = HFSpec()
