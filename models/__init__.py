"""edgeq.models: one module per architecture, looked up by the file's `general.architecture`.

Adding an architecture = adding `models/<arch>.py` with Config, load_weights and forward.
"""
import importlib

from edgeq.errors import ModelError

ARCHITECTURES = ("llama", "qwen2", "gemma3")


def architecture(name: str):
    """The module implementing architecture `name` (as spelled in general.architecture)."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {name[:40]!r} (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(f"edgeq.models.{name}")
