"""edgeq.models: one module per architecture, looked up by the file's `general.architecture`.

Adding an architecture = adding `models/<arch>.py` (named as llama.cpp's general.architecture) with Config,
load_weights, forward and its Hugging Face spec `HF` (models/base.HFSpec): the folder is the list.
"""
import importlib
import pkgutil

from edgeq.errors import ModelError

ARCHITECTURES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"
                             and not m.name.startswith("_")))


def architecture(name: str):
    """The module implementing architecture `name` (as spelled in general.architecture)."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture {name[:40]!r} (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(f"edgeq.models.{name}")


def hf_specs():
    """Every architecture's Hugging Face spec (models/base.HFSpec), for the converter."""
    return [architecture(name).HF for name in ARCHITECTURES]
