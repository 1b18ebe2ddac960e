"""Granite 3.x (dense): the Llama network with multipliers on the embeddings, the attention scores and the
residual branches, and logits divided by a scale."""
from __future__ import annotations

from edgeq.models import llama
from edgeq.models.base import hparam
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)

# GGUF key (after "granite.") ← config.json key, and the Config field it sets
MULTIPLIERS = (("embedding_scale", "embedding_multiplier", "embed_scale"),
               ("attention.scale", "attention_multiplier", "attn_scale"),
               ("residual_scale", "residual_multiplier", "residual_scale"),
               ("logit_scale", "logits_scaling", "logit_scale"))


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "granite", **overrides) -> "Config":
        scales = {field: hparam(gf, arch, key, 1.0 if field != "attn_scale" else 0.0, cast=float, lo=0.0, hi=1e6)
                  for key, _, field in MULTIPLIERS}
        if scales["logit_scale"] == 0.0:
            scales["logit_scale"] = 1.0  # llama.cpp: 0 means unset
        return super().from_gguf(gf, arch, **{**scales, **overrides})


class HFSpec(llama.HFSpec):
    """llama.cpp's GraniteModel (a LlamaModel): the multipliers written as `<arch>.*_scale` keys."""

    arch = "granite"
    hf_architectures = ("GraniteForCausalLM",)
    hf_model_types = ("granite",)
    reads_head_dim = False

    def metadata(self, hp):
        return super().metadata(hp) + [(key, float(hp.raw[hf_key]), "f32") for key, hf_key, _ in MULTIPLIERS
                                       if hp.raw.get(hf_key)]


HF = HFSpec()
