"""Qwen3 (dense, 0.6B-32B): Qwen2 without q/k/v biases, with an RMSNorm of each q and k head before RoPE."""
from __future__ import annotations

from edgeq.models import base, llama
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "qwen3", **overrides) -> "Config":
        overrides = {"rope_neox": True, "qk_norm": True, **overrides}
        return super().from_gguf(gf, arch, **overrides)


class HFSpec(base.HFSpec):
    """llama.cpp's Qwen3Model (a Qwen2Model): tensors as stored, head_dim always explicit."""

    arch = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_types = ("qwen3",)
    defaults = {**base.HFSpec.defaults, "n_ctx": 40960, "rms_eps": 1e-6, "rope_theta": 1e6}
    layer_tensors = {**base.HFSpec.layer_tensors, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

    def layer_shapes(self, hp):
        return {**super().layer_shapes(hp), "attn_q_norm.weight": (hp.head_dim,), "attn_k_norm.weight": (hp.head_dim,)}


HF = HFSpec()
