"""SmolLM3: the Llama network without RoPE on every 4th layer (llama.cpp fixes the step at 4)."""
from __future__ import annotations

from edgeq.errors import ModelError
from edgeq.models import llama
from edgeq.models.llama import (Weights, classifier_input, embed, forward, forward_batch,  # noqa: F401  (same network)
                               forward_layers, load_weights)

NO_ROPE_EVERY = 4  # llama.cpp's n_no_rope_layer_step for smollm3 (not in the file)


class Config(llama.Config):
    @classmethod
    def from_gguf(cls, gf, arch: str = "smollm3", **overrides) -> "Config":
        return super().from_gguf(gf, arch, **{"no_rope_every": NO_ROPE_EVERY, **overrides})


class HFSpec(llama.HFSpec):
    """llama.cpp's SmolLM3Model (a LlamaModel); `no_rope_layers` must be its fixed pattern."""

    arch = "smollm3"
    hf_architectures = ("SmolLM3ForCausalLM",)
    hf_model_types = ("smollm3",)

    def check(self, hp, where):
        want = [int((i + 1) % NO_ROPE_EVERY != 0) for i in range(hp.n_layer)]
        got = hp.raw.get("no_rope_layers", want)
        if list(got) != want:
            raise ModelError(f"{where}: smollm3 no_rope_layers other than every {NO_ROPE_EVERY}th layer "
                             "are not supported (llama.cpp fixes the pattern)")


HF = HFSpec()
