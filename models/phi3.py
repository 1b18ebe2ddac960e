"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama network with fused q/k/v and gate/up matrices, NeoX RoPE over part
of each head, and LongRoPE (short and long per-frequency factors, rotated dims scaled by an attention factor).
"""
from __future__ import annotations

import math

import numpy as np

from edgeq.errors import ModelError
from edgeq.models import base, llama
from edgeq.models.base import MAX_CTX, hparam
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "phi3", **overrides) -> "Config":
        n_ctx = hparam(gf, arch, "context_length", 4096, cast=int, lo=1, hi=MAX_CTX)
        opts = dict(rope_neox=True, fused_qkv=True, fused_gate_up=True,
                    n_ctx_orig=hparam(gf, arch, "rope.scaling.original_context_length", n_ctx, cast=int, lo=1,
                                      hi=MAX_CTX),
                    rope_attn_factor=hparam(gf, arch, "rope.scaling.attn_factor", 1.0, cast=float, above=0.0,
                                            hi=100.0),
                    sliding_window=hparam(gf, arch, "attention.sliding_window", 0, cast=int, lo=0, hi=MAX_CTX))
        return super().from_gguf(gf, arch, **{**opts, **overrides})


class HFSpec(base.HFSpec):
    """llama.cpp's Phi3MiniModel: fused matrices kept, rope.dimension_count from partial_rotary_factor,
    LongRoPE factors as rope_factors_short/long tensors."""

    arch = "phi3"
    hf_architectures = ("Phi3ForCausalLM",)
    hf_model_types = ("phi3",)
    defaults = {**base.HFSpec.defaults, "n_ctx": 4096}
    layer_tensors = {**base.HFSpec.layer_tensors, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    rope_types = ("longrope", "su")

    def n_rot(self, hp) -> int:
        factor = hp.raw.get("partial_rotary_factor") or hp.rope_scaling.get("partial_rotary_factor") or 1.0
        return int(float(factor) * hp.n_embd) // hp.n_head

    def n_ctx_orig(self, hp) -> int:
        return int(hp.raw.get("original_max_position_embeddings")
                   or hp.rope_scaling.get("original_max_position_embeddings") or hp.n_ctx)

    def check(self, hp, where):
        if hp.qkv_bias:
            raise ModelError(f"{where}: phi3 with attention biases is not supported")
        if hp.rope_scaling:
            half = self.n_rot(hp) // 2
            for key in ("short_factor", "long_factor"):
                factors = hp.rope_scaling.get(key)
                if not isinstance(factors, list) or len(factors) != half:
                    raise ModelError(f"{where}: rope_scaling.{key} must be a list of {half} numbers")

    def metadata(self, hp):
        m = [("rope.scaling.original_context_length", self.n_ctx_orig(hp), "u32"),
             ("rope.dimension_count", self.n_rot(hp), "u32"),
             ("attention.sliding_window", int(hp.raw.get("sliding_window") or 0), "u32")]
        if hp.rope_scaling:
            scale = hp.n_ctx / self.n_ctx_orig(hp)
            attn_factor = hp.rope_scaling.get("attention_factor") or (
                math.sqrt(1 + math.log(scale) / math.log(self.n_ctx_orig(hp))) if scale > 1.0 else 1.0)
            m.append(("rope.scaling.attn_factor", float(attn_factor), "f32"))
        return m

    def layer_shapes(self, hp):
        d, hd, ff = hp.n_embd, hp.head_dim, hp.n_ff
        q, kv = hp.n_head * hd, hp.n_head_kv * hd
        return {"attn_norm.weight": (d,), "attn_qkv.weight": (q + 2 * kv, d), "attn_output.weight": (d, q),
                "ffn_norm.weight": (d,), "ffn_up.weight": (2 * ff, d), "ffn_down.weight": (d, ff)}

    def extra_tensors(self, hp):
        if not hp.rope_scaling:
            return {}
        return {f"rope_factors_{kind}.weight": np.asarray(hp.rope_scaling[f"{kind}_factor"], dtype=np.float32)
                for kind in ("long", "short")}


HF = HFSpec()
