"""edgeq.models: one module per architecture, looked up by the file's `general.architecture`.

Adding an architecture = adding `models/<arch>.py` with Config, load_weights, forward and its Hugging Face
spec `HF` (models/base.HFSpec), and naming it here.
"""
import importlib

from edgeq.errors import ModelError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "smollm3", "granite")


def architecture(name: str):
    """The module implementing architecture `name` (as spelled in general.architecture)."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {name[:40]!r} (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(f"edgeq.models.{name}")


def hf_specs():
    """Every architecture's Hugging Face spec (models/base.HFSpec), for the converter."""
    return [architecture(name).HF for name in ARCHITECTURES]
