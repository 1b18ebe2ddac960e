"""Qwen2: the Llama network with biases on q/k/v and NeoX-order RoPE (no Q/K permutation in the file)."""
from __future__ import annotations

from edgeq.models import base, llama
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "qwen2", **overrides) -> "Config":
        overrides = {"rope_neox": True, "qkv_bias": True, **overrides}
        return super().from_gguf(gf, arch, **overrides)


class HFSpec(base.HFSpec):
    """llama.cpp's Qwen2Model: tensors as stored, q/k/v biases always."""

    arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)

    def qkv_bias(self, hp) -> bool:
        return True


HF = HFSpec()
